//! The `isotope` binary end to end: output contract and error handling.

use std::path::PathBuf;

use assert_cmd::Command;

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model() -> PathBuf {
    std::env::var_os("ISOTOPE_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"))
}

fn isotope() -> Command {
    let mut c = Command::cargo_bin("isotope").unwrap();
    c.env_remove("ISOTOPE_MODEL");
    c
}

/// Runs and returns (exit code, stdout, stderr), asserting it did not panic.
fn run(args: &[&str]) -> (i32, String, String) {
    let out = isotope().args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
    )
}

#[test]
fn generate_json_contract() {
    let m = model();
    let args = [
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--prompt",
        "Name a colour.",
        "--temperature",
        "0",
        "--max-tokens",
        "12",
        "--json",
    ];
    let (code, stdout, stderr) = run(&args);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert!(v["text"].as_str().is_some_and(|t| !t.is_empty()));
    let tokens = v["tokens"].as_array().unwrap();
    assert!(!tokens.is_empty() && tokens.len() <= 12);
    assert!(v["prompt_tokens_per_sec"].as_f64().unwrap() > 0.0);
    assert!(v["gen_tokens_per_sec"].as_f64().unwrap() > 0.0);
    // Greedy is deterministic across processes.
    let (_, again, _) = run(&args);
    let w: serde_json::Value = serde_json::from_str(again.trim()).unwrap();
    assert_eq!(v["tokens"], w["tokens"]);
    assert_eq!(v["text"], w["text"]);
}

#[test]
fn streaming_output_equals_json_text() {
    let m = model();
    let common = [
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--prompt",
        "Write one sentence about cats.",
        "--seed",
        "11",
        "--temperature",
        "0.8",
        "--max-tokens",
        "20",
    ];
    let (code, streamed, _) = run(&common);
    assert_eq!(code, 0);
    let mut with_json = common.to_vec();
    with_json.push("--json");
    let (_, json, _) = run(&with_json);
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(streamed.trim_end_matches('\n'), v["text"].as_str().unwrap());
}

#[test]
fn missing_model_says_what_to_do() {
    let (code, _, stderr) = run(&[
        "generate",
        "--model",
        "/nonexistent/m.gguf",
        "--prompt",
        "x",
    ]);
    assert_eq!(code, 1);
    assert!(stderr.contains("/nonexistent/m.gguf"), "{stderr}");
}

#[test]
fn corrupt_model_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.gguf");
    std::fs::write(&bad, b"GGUF but then garbage").unwrap();
    let (code, _, stderr) = run(&[
        "generate",
        "--model",
        bad.to_str().unwrap(),
        "--prompt",
        "x",
    ]);
    assert_eq!(code, 1);
    assert!(stderr.contains("corrupt"), "{stderr}");
}

#[test]
fn prompt_longer_than_context_is_refused() {
    let m = model();
    let long = "word ".repeat(400);
    let (code, _, stderr) = run(&[
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--prompt",
        &long,
        "--ctx",
        "128",
    ]);
    assert_eq!(code, 1);
    assert!(stderr.contains("context holds 128"), "{stderr}");
}

#[test]
fn invalid_sampling_parameters_name_the_flag() {
    let m = model();
    for (flag, value) in [
        ("--top-p", "1.5"),
        ("--temperature", "-1"),
        ("--min-p", "2"),
    ] {
        let (code, _, stderr) = run(&[
            "generate",
            "--model",
            m.to_str().unwrap(),
            "--prompt",
            "x",
            flag,
            value,
        ]);
        assert_ne!(code, 0, "{flag} {value} accepted");
        assert!(stderr.contains(flag), "{flag}: {stderr}");
    }
    // Not a number at all: clap's own usage error.
    let (code, _, stderr) = run(&["generate", "--prompt", "x", "--top-p", "lots"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("--top-p"), "{stderr}");
}
