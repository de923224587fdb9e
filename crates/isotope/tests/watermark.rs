//! `isotope keygen`, `generate --watermark-key` and `detect` on the real model.

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use serde_json::Value;

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model() -> String {
    std::env::var("ISOTOPE_MODEL").unwrap_or_else(|_| {
        workspace()
            .join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
            .display()
            .to_string()
    })
}

fn isotope() -> Command {
    let mut c = Command::cargo_bin("isotope").unwrap();
    c.env_remove("ISOTOPE_MODEL")
        .env_remove("ISOTOPE_WATERMARK_KEY");
    c
}

/// (exit code, stdout, stderr); asserts no panic.
fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
    )
}

fn keygen(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let (code, _, stderr) = run(isotope().args(["keygen", "--out"]).arg(&path));
    assert_eq!(code, 0, "{stderr}");
    path
}

/// A fixed key, so detection tests are reproducible (keygen itself is tested above).
fn fixed_key(dir: &Path, secret_byte: u8) -> PathBuf {
    let path = dir.join(format!("fixed-{secret_byte}.key"));
    std::fs::write(
        &path,
        format!("secret = {}\n", format!("{secret_byte:02x}").repeat(32)),
    )
    .unwrap();
    path
}

fn generate(key: Option<&Path>, scheme: &str, temperature: &str, seed: &str) -> Value {
    let mut cmd = isotope();
    cmd.args([
        "generate",
        "--model",
        &model(),
        "--prompt",
        "Write a short story about a lighthouse keeper and a storm.",
        "--max-tokens",
        "200",
        "--temperature",
        temperature,
        "--seed",
        seed,
        "--scheme",
        scheme,
        "--json",
    ]);
    if let Some(k) = key {
        cmd.arg("--watermark-key").arg(k);
    }
    let (code, stdout, stderr) = run(&mut cmd);
    assert_eq!(code, 0, "{stderr}");
    serde_json::from_str(stdout.trim()).unwrap()
}

fn detect(keys: &[&Path], scheme: &str, text: &str) -> Value {
    let mut cmd = isotope();
    cmd.args(["detect", "--model", &model(), "--scheme", scheme, "--json"]);
    for k in keys {
        cmd.arg("--watermark-key").arg(k);
    }
    cmd.write_stdin(text.to_owned());
    let (code, stdout, stderr) = run(&mut cmd);
    assert_eq!(code, 0, "{stderr}");
    serde_json::from_str(stdout.trim()).unwrap()
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
#[cfg(unix)]
fn keygen_files_are_private_and_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "a.key");
    assert_eq!(mode(&key), 0o600);
    let text = std::fs::read_to_string(&key).unwrap();
    assert!(text.contains("key_id = wk_") && text.contains("secret = "));
    let (code, _, stderr) = run(isotope().args(["keygen", "--out"]).arg(&key));
    assert_eq!(code, 1);
    assert!(stderr.contains("must not exist"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(&key).unwrap(),
        text,
        "key was overwritten"
    );

    // `isotope keygen > file`: stdout is a regular file and becomes 0600 too.
    let redirected = dir.path().join("stdout.key");
    let file = std::fs::File::create(&redirected).unwrap();
    let status = std::process::Command::new(assert_cmd::cargo::cargo_bin("isotope"))
        .arg("keygen")
        .stdout(file)
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(mode(&redirected), 0o600);
    assert_ne!(std::fs::read_to_string(&redirected).unwrap(), text);
}

#[test]
fn every_scheme_is_detected_in_its_own_output_only() {
    let dir = tempfile::tempdir().unwrap();
    let key = fixed_key(dir.path(), 0x5a);
    let plain = generate(None, "kgw", "0.8", "5");
    assert!(plain.get("watermark").is_none());
    for scheme in ["kgw", "unigram", "gumbel", "synthid"] {
        let out = generate(Some(&key), scheme, "0.8", "5");
        assert_eq!(
            out["watermark"]["scheme"]
                .as_str()
                .unwrap()
                .split(':')
                .next(),
            Some(scheme)
        );
        let text = out["text"].as_str().unwrap();
        let d = detect(&[&key], scheme, text);
        eprintln!("{scheme}: {} tokens, {d}", out["completion_tokens"]);
        // Unigram's one fixed list, deduplicated by token, sees far fewer distinct
        // tuples (≈100 of 200 tokens) and is the weakest scheme at this length.
        let bar = if scheme == "unigram" { 1e-3 } else { 1e-4 };
        assert!(
            d["p_value"].as_f64().unwrap() < bar,
            "{scheme}: watermarked text not detected: {d}"
        );
        // The common-tuple filter leaves Unigram (tuple = the token alone) only the
        // rarer tokens of a response: ~20 of 200 here, against ~190 for the others.
        let min_scored = if scheme == "unigram" { 10 } else { 50 };
        assert!(d["scored_tokens"].as_u64().unwrap() > min_scored, "{d}");
        let d = detect(&[&key], scheme, plain["text"].as_str().unwrap());
        assert!(
            d["p_value"].as_f64().unwrap() > 1e-3,
            "{scheme}: unwatermarked text flagged: {d}"
        );
    }
}

#[test]
fn greedy_distortion_free_schemes_fall_back_to_kgw() {
    let dir = tempfile::tempdir().unwrap();
    let key = fixed_key(dir.path(), 0x3c);
    let out = generate(Some(&key), "gumbel", "0", "1");
    let applied = out["watermark"]["scheme"].as_str().unwrap();
    assert!(applied.starts_with("kgw:"), "{applied}");
    let d = detect(&[&key], applied, out["text"].as_str().unwrap());
    assert!(d["p_value"].as_f64().unwrap() < 1e-3, "{d}");
}

#[test]
fn several_keys_name_the_right_one() {
    let dir = tempfile::tempdir().unwrap();
    let a = fixed_key(dir.path(), 0x11);
    let b = fixed_key(dir.path(), 0x22);
    let out = generate(Some(&b), "kgw", "0.9", "3");
    let d = detect(&[&a, &b], "kgw", out["text"].as_str().unwrap());
    assert_eq!(d["key_id"], d["per_key"][1]["key_id"]);
    assert_ne!(d["per_key"][0]["key_id"], d["per_key"][1]["key_id"]);
    assert_eq!(d["per_key"].as_array().unwrap().len(), 2);
    assert!(d["p_value"].as_f64().unwrap() < 1e-4, "{d}");
}

#[test]
fn bad_inputs_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let key = fixed_key(dir.path(), 0x77);
    let bad = dir.path().join("bad.key");
    std::fs::write(&bad, "secret = 1234\n").unwrap();
    let cases: Vec<(Vec<String>, &str, &str)> = vec![
        (
            vec![
                "detect".into(),
                "--watermark-key".into(),
                bad.display().to_string(),
            ],
            "some text",
            "64 hexadecimal digits",
        ),
        (
            vec![
                "detect".into(),
                "--watermark-key".into(),
                "/nonexistent/k".into(),
            ],
            "some text",
            "/nonexistent/k",
        ),
        (
            vec![
                "detect".into(),
                "--watermark-key".into(),
                key.display().to_string(),
                "--scheme".into(),
                "kgb".into(),
            ],
            "some text",
            "expected one of kgw, unigram, gumbel, synthid",
        ),
        (
            vec![
                "detect".into(),
                "--watermark-key".into(),
                key.display().to_string(),
            ],
            "   \n",
            "no text on stdin",
        ),
        (
            vec![
                "generate".into(),
                "--prompt".into(),
                "x".into(),
                "--watermark-key".into(),
                key.display().to_string(),
                "--scheme".into(),
                "kgw:gamma=1.5".into(),
            ],
            "",
            "gamma must be in (0, 1)",
        ),
    ];
    for (args, stdin, needle) in cases {
        let mut cmd = isotope();
        cmd.args(&args)
            .arg("--model")
            .arg(model())
            .write_stdin(stdin);
        let (code, _, stderr) = run(&mut cmd);
        assert_eq!(code, 1, "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

#[test]
fn detect_reports_the_common_tuple_filter_and_it_can_be_turned_off() {
    let dir = tempfile::tempdir().unwrap();
    let key = fixed_key(dir.path(), 0x6b);
    // Formulaic human text (GSM8K-style worked answers): full of tuples the shipped
    // common-tuples list leaves out.
    let text = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n\
                Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n\
                #### 72\n\
                Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n\
                Working 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n\
                #### 10\n\
                In the beginning, Betty has only 100 / 2 = $<<100/2=50>>50.\n\
                Betty's grandparents gave her 15 * 2 = $<<15*2=30>>30.\n\
                This means, Betty needs 100 - 50 - 30 - 15 = $<<100-50-30-15=5>>5 more.\n\
                #### 5\n";
    let detect_with = |extra: &[&str]| -> Value {
        let mut cmd = isotope();
        cmd.args(["detect", "--model", &model(), "--json"])
            .arg("--watermark-key")
            .arg(&key)
            .args(extra)
            .write_stdin(text);
        let (code, stdout, stderr) = run(&mut cmd);
        assert_eq!(code, 0, "{stderr}");
        serde_json::from_str(stdout.trim()).unwrap()
    };
    let on = detect_with(&[]);
    assert_eq!(on["common_filter"], Value::Bool(true), "{on}");
    let excluded = on["common_excluded"].as_u64().unwrap();
    assert!(excluded > 0, "formulaic text hit no common tuple: {on}");
    let off = detect_with(&["--no-common-filter"]);
    assert_eq!(off["common_filter"], Value::Bool(false), "{off}");
    assert_eq!(off["common_excluded"].as_u64(), Some(0), "{off}");
    // Without the filter the common tuples are scored too.
    assert_eq!(
        off["scored_tokens"].as_u64().unwrap(),
        on["scored_tokens"].as_u64().unwrap() + excluded,
        "on: {on}, off: {off}"
    );
    for d in [&on, &off] {
        let p = d["p_value"].as_f64().unwrap();
        assert!(p > 0.0 && p <= 1.0, "{d}");
    }
}

#[test]
fn detect_entropy_aware_adds_fields_and_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let key = fixed_key(dir.path(), 0x5e);
    let text = "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute. Working 50 minutes, she \
                earned 0.2 x 50 = $<<0.2*50=10>>10. The lighthouse keeper watched the storm \
                roll in over the grey water, wondering whether the supply boat would come.";
    let detect_with = |extra: &[&str]| -> (i32, String, String) {
        let mut cmd = isotope();
        cmd.args(["detect", "--model", &model(), "--threads", "1", "--json"])
            .arg("--watermark-key")
            .arg(&key)
            .args(extra)
            .write_stdin(text);
        run(&mut cmd)
    };
    let parse = |(code, stdout, stderr): (i32, String, String)| -> Value {
        assert_eq!(code, 0, "{stderr}");
        serde_json::from_str(stdout.trim()).unwrap()
    };
    let plain = parse(detect_with(&[]));
    let aware = parse(detect_with(&["--entropy-aware"]));
    for d in [&plain, &aware] {
        let p = d["p_value"].as_f64().unwrap();
        assert!(p > 0.0 && p <= 1.0, "{d}");
        assert!(
            d["scheme"].is_string() && d["scored_tokens"].is_u64(),
            "{d}"
        );
    }
    assert!(plain.get("entropy_aware").is_none(), "{plain}");
    assert_eq!(aware["entropy_aware"], Value::Bool(true), "{aware}");
    assert_eq!(aware["entropy_rule"], "weighted", "{aware}");
    // Weight 0 only removes positions: never more tuples than the plain test.
    let kept = aware["entropy_kept"].as_u64().unwrap();
    let scored = aware["scored_tokens"].as_u64().unwrap();
    assert!(scored <= kept, "{aware}");
    assert!(
        scored < plain["scored_tokens"].as_u64().unwrap(),
        "{aware} {plain}"
    );
    // A stricter rule keeps fewer.
    let strict = parse(detect_with(&[
        "--entropy-aware",
        "--entropy-rule",
        "shannon:3",
    ]));
    assert!(strict["entropy_kept"].as_u64().unwrap() < kept, "{strict}");
    // Bad rules are clear errors.
    let (code, _, stderr) = detect_with(&["--entropy-aware", "--entropy-rule", "spike:7"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("bad entropy rule"), "{stderr}");
}
