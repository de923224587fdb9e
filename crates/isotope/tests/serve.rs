//! `isotope serve` end to end: the real binary, the real model, a real SQLite (and,
//! when `ISOTOPE_TEST_POSTGRES_URL` is set, PostgreSQL) store, driven by the official
//! `openai` Python SDK (`tests/openai_sdk.py`, installed into .venv by setup).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command as StdCommand, Stdio};
use std::time::{Duration, Instant};

use common::{isotope, model, run_ok, start, workspace};
use serde_json::Value;

fn python() -> PathBuf {
    let p = workspace().join(".venv/bin/python");
    assert!(
        p.exists(),
        "{} missing: run scripts/setup.sh (it installs the openai SDK for these tests)",
        p.display()
    );
    p
}

fn create_key(store: &[&str], account: &str, extra: &[&str]) -> String {
    let out = run_ok(
        isotope()
            .args(["keys", "create", "--account", account])
            .args(store)
            .args(extra),
    );
    out.lines().last().unwrap().trim().to_owned()
}

fn detect(key: &Path, text: &str) -> Value {
    let mut child = isotope()
        .args(["detect", "--json", "--watermark-key"])
        .arg(key)
        .arg("--model")
        .arg(model())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn openai_sdk_against_sqlite_server() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let store = ["--data-dir", data];
    let key = create_key(&store, "alice", &[]);
    assert!(key.starts_with("isk_"), "{key}");
    let limited = create_key(&store, "bob", &["--requests-per-minute", "2"]);
    let server = start(&store);
    let base = format!("http://{}/v1", server.addr);

    let out = StdCommand::new(python())
        .arg(workspace().join("crates/isotope/tests/openai_sdk.py"))
        .args([
            "--base-url",
            &base,
            "--key",
            &key,
            "--limited-key",
            &limited,
        ])
        .args(["--model", "SmolLM2-135M-Instruct.Q4_1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "openai SDK checks failed:\n{stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();

    // The key was generated on first start, private to its owner.
    let wm = dir.path().join("watermark.key");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&wm).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // Every response is watermarked: the served texts together detect. (The key is
    // fresh on every run, so the p-value is random: the 160-token story alone at
    // T 0.8 / top-p 0.95 once came out at 1.4e-4 — about the measured power at that
    // length and temperature — so the test reads all texts, ~400 tokens, at 1e-3.)
    let texts: Vec<&str> = report["texts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t.as_str())
        .collect();
    assert!(texts.len() >= 3, "{report}");
    let story = texts.join("\n\n");
    let story = story.as_str();
    let d = detect(&wm, story);
    let p = d["p_value"].as_f64().unwrap();
    assert!(p < 1e-3, "served text should carry the watermark: {d}");
    // A different key sees nothing.
    let other = dir.path().join("other.key");
    run_ok(isotope().args(["keygen", "--out"]).arg(&other));
    let d = detect(&other, story);
    assert!(d["p_value"].as_f64().unwrap() > 1e-3, "{d}");

    // Usage was recorded per key.
    let keys: Value = serde_json::from_str(&run_ok(
        isotope().args(["keys", "list", "--json"]).args(store),
    ))
    .unwrap();
    let alice = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["account_name"] == "alice")
        .unwrap();
    assert!(alice["tokens_used"].as_u64().unwrap() > 300, "{alice}");
    drop(server);
}

#[test]
fn fleet_mode_needs_a_provisioned_key() {
    let Ok(url) = std::env::var("ISOTOPE_TEST_POSTGRES_URL") else {
        assert!(
            std::env::var("CI").is_err(),
            "ISOTOPE_TEST_POSTGRES_URL must be set in CI (.ci/run starts PostgreSQL)"
        );
        eprintln!("skipped: ISOTOPE_TEST_POSTGRES_URL not set");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // Without --watermark-key a PostgreSQL-backed replica refuses to start.
    let out = isotope()
        .arg("serve")
        .arg("--model")
        .arg(model())
        .args(["--addr", "127.0.0.1:0", "--database-url", &url])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--watermark-key"), "{err}");

    let wm = dir.path().join("wm.key");
    run_ok(isotope().args(["keygen", "--out"]).arg(&wm));
    let store = ["--database-url", url.as_str()];
    let key = create_key(&store, "fleet-user", &[]);
    let server = start(&[
        "--database-url",
        &url,
        "--watermark-key",
        wm.to_str().unwrap(),
    ]);
    let script = format!(
        "from openai import OpenAI\n\
         c = OpenAI(base_url='http://{}/v1', api_key='{key}', max_retries=0)\n\
         r = c.chat.completions.create(model='SmolLM2-135M-Instruct.Q4_1', \
         messages=[{{'role':'user','content':'Say hi'}}], max_tokens=8, temperature=0)\n\
         assert r.choices[0].message.content and r.usage.completion_tokens > 0\n",
        server.addr
    );
    let started = Instant::now();
    let out = StdCommand::new(python())
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(started.elapsed() < Duration::from_secs(120));
    let keys: Value = serde_json::from_str(&run_ok(
        isotope().args(["keys", "list", "--json"]).args(store),
    ))
    .unwrap();
    let used = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["account_name"] == "fleet-user")
        .map(|k| k["tokens_used"].as_u64().unwrap())
        .unwrap();
    assert!(used > 0);
}
