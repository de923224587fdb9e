#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the store's tests (and for trying fleet mode).
#
#   scripts/postgres.sh start   # idempotent; prints the URL on stdout, logs on stderr
#   scripts/postgres.sh stop
#   scripts/postgres.sh url
#
#   export ISOTOPE_TEST_POSTGRES_URL="$(scripts/postgres.sh start)"
#
# Trust authentication on 127.0.0.1 only, fsync off: for tests, never for data you
# care about. Installs PostgreSQL with apt-get when no binaries are found. PostgreSQL
# refuses to run as root, so as root the cluster runs as the `postgres` system user
# (created if missing). Environment: ISOTOPE_PG_PORT (54329), ISOTOPE_PG_DIR.
set -euo pipefail

PORT="${ISOTOPE_PG_PORT:-54329}"
URL="postgres://postgres@127.0.0.1:${PORT}/postgres"
if [ "$(id -u)" = 0 ]; then
    # Root's home is usually private; the postgres user must own the cluster.
    DIR="${ISOTOPE_PG_DIR:-/var/tmp/isotope-pg}"
else
    DIR="${ISOTOPE_PG_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/isotope-pg}"
fi
DATA="$DIR/data"
LOG="$DIR/postgres.log"

log() { echo "postgres.sh: $*" >&2; }

find_bindir() {
    local d
    if command -v pg_ctl >/dev/null 2>&1 && command -v initdb >/dev/null 2>&1; then
        dirname "$(command -v pg_ctl)"
        return 0
    fi
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [ -x "$d/pg_ctl" ] && [ -x "$d/initdb" ]; then
            echo "$d"
            return 0
        fi
    done
    return 1
}

install_postgres() {
    log "no PostgreSQL binaries found; installing with apt-get"
    local sudo=""
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null 2>&1 || { log "not root and no sudo: install PostgreSQL yourself"; exit 1; }
        sudo="sudo"
    fi
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >&2
}

# Runs a PostgreSQL binary as the cluster's owner.
as_owner() {
    if [ "$(id -u)" = 0 ]; then
        if command -v runuser >/dev/null 2>&1; then
            runuser -u postgres -- "$@"
        else
            su postgres -s /bin/sh -c "$(printf '%q ' "$@")"
        fi
    else
        "$@"
    fi
}

ensure_user() {
    [ "$(id -u)" = 0 ] || return 0
    if ! id postgres >/dev/null 2>&1; then
        log "creating system user postgres"
        useradd --system --home-dir "$DIR" --shell /bin/sh postgres
    fi
}

running() {
    [ -f "$DATA/PG_VERSION" ] && as_owner "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1
}

wait_ready() {
    local i
    for i in $(seq 1 60); do
        if [ -x "$BIN/pg_isready" ]; then
            "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT" && return 0
        else
            return 0
        fi
        sleep 0.5
    done
    log "server did not accept connections on 127.0.0.1:$PORT; see $LOG"
    return 1
}

start() {
    BIN="$(find_bindir)" || { install_postgres; BIN="$(find_bindir)" || { log "PostgreSQL still not found after install"; exit 1; }; }
    ensure_user
    mkdir -p "$DIR"
    if [ "$(id -u)" = 0 ]; then chown postgres: "$DIR"; fi
    if running; then
        log "already running ($DATA)"
    else
        if [ ! -f "$DATA/PG_VERSION" ]; then
            log "initdb $DATA"
            as_owner "$BIN/initdb" -D "$DATA" -U postgres --auth=trust --encoding=UTF8 --no-locale >"$DIR/initdb.log" 2>&1 \
                || { cat "$DIR/initdb.log" >&2; exit 1; }
        fi
        log "starting on 127.0.0.1:$PORT (log: $LOG)"
        as_owner "$BIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t 60 \
            -o "-p $PORT -k $DIR -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300" \
            start >&2 || { tail -n 30 "$LOG" >&2 || true; exit 1; }
    fi
    wait_ready
    echo "$URL"
}

stop() {
    BIN="$(find_bindir)" || { log "no PostgreSQL binaries: nothing to stop"; return 0; }
    if running; then
        as_owner "$BIN/pg_ctl" -D "$DATA" -m fast -w stop >&2
    else
        log "not running"
    fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    url) echo "$URL" ;;
    *) echo "usage: $0 start|stop|url" >&2; exit 2 ;;
esac
