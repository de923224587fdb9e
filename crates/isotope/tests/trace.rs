//! `isotope trace` end to end: the real `isotope serve` (real model, real SQLite — and
//! PostgreSQL when `ISOTOPE_TEST_POSTGRES_URL` is set), completions over real HTTP,
//! then the served texts, an edited copy and an unrelated human text traced back
//! through the usage log and the watermark.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command as StdCommand, Stdio};

use common::{model, workspace};
use serde_json::{json, Value};

/// The binary with the test model, one thread, and no ./isotope.toml of the
/// developer's checkout.
fn isotope() -> StdCommand {
    let mut c = common::isotope();
    c.env("ISOTOPE_MODEL", model())
        .env("ISOTOPE_THREADS", "1")
        .current_dir(std::env::temp_dir());
    c
}

fn run(cmd: &mut StdCommand) -> (i32, String, String) {
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
    )
}

fn serve(store: &[&str], extra: &[&str]) -> common::Server {
    common::start_cmd(
        isotope()
            .args(["serve", "--addr", "127.0.0.1:0", "--slots", "2"])
            .args(["--ctx", "1024", "--threads", "1", "--no-sentinel"])
            .args(store)
            .args(extra),
    )
}

fn create_key(store: &[&str], account: &str) -> String {
    let (code, stdout, stderr) = run(isotope()
        .args(["keys", "create", "--account", account])
        .args(store));
    assert_eq!(code, 0, "{stderr}");
    stdout.lines().last().unwrap().trim().to_owned()
}

/// One chat completion over HTTP; returns its text.
fn complete(addr: &str, key: &str, prompt: &str, seed: u64) -> String {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let v: Value = reqwest::Client::new()
            .post(format!("http://{addr}/v1/chat/completions"))
            .bearer_auth(key)
            .json(&json!({
                "model": "SmolLM2-135M-Instruct.Q4_1",
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 120,
                "temperature": 1.0,
                "seed": seed,
            }))
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap()
            .json()
            .await
            .unwrap();
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned()
    })
}

/// A copy with a few words changed and the last fifth cut off.
fn edit(text: &str) -> String {
    let words: Vec<&str> = text.split_whitespace().collect();
    let keep = words.len() * 4 / 5;
    words[..keep]
        .iter()
        .enumerate()
        .map(|(i, w)| if i % 25 == 7 { "indeed" } else { w })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A human-written GSM8K answer.
fn human_text() -> String {
    let text = std::fs::read_to_string(workspace().join("data/gsm8k/test.jsonl")).unwrap();
    let v: Value = serde_json::from_str(text.lines().nth(3).unwrap()).unwrap();
    v["answer"].as_str().unwrap().to_owned()
}

fn trace_json(store: &[&str], args: &[&str], files: &[&Path]) -> Value {
    let mut cmd = isotope();
    cmd.args(["trace", "--json"])
        .args(store)
        .args(args)
        .args(files);
    let (code, stdout, stderr) = run(&mut cmd);
    assert_eq!(code, 0, "{stderr}");
    serde_json::from_str(stdout.trim()).unwrap()
}

/// The scenario on one store: alice gets two completions and bob one; the served
/// texts, an edited copy and a human text are traced.
fn scenario(store: &[&str], serve_extra: &[&str], trace_keys: &[&str], dir: &Path) {
    eprintln!("scenario on {:?}", store.first());
    let alice = create_key(store, "alice");
    let bob = create_key(store, "bob");
    let server = serve(store, serve_extra);
    let a1 = complete(
        &server.addr,
        &alice,
        "Write a short story about a lighthouse keeper and a storm.",
        1,
    );
    let a2 = complete(&server.addr, &alice, "Explain how bread rises.", 2);
    let b1 = complete(
        &server.addr,
        &bob,
        "Describe a walk through a market in the morning.",
        3,
    );
    drop(server);
    // With the fixed key and seeds the texts are the same on every run.
    assert!(a1.split_whitespace().count() > 40, "{a1}");
    assert!(a2.split_whitespace().count() > 40, "{a2}");

    let files: Vec<PathBuf> = [
        ("exact.txt", format!("{a1}\n")),
        ("edited.txt", edit(&a1)),
        ("human.txt", human_text()),
    ]
    .into_iter()
    .map(|(name, text)| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    })
    .collect();
    let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let v = trace_json(store, trace_keys, &refs);
    eprintln!("trace: {v:#}");
    assert_eq!(v["index"]["indexed_now"], 3, "{v}");
    let texts = v["texts"].as_array().unwrap();
    // The served text: found, exactly, with its account, key, time and endpoint.
    let exact = &texts[0];
    let m = &exact["matches"][0];
    assert_eq!(exact["served"], true);
    assert_eq!(m["account"], "alice", "{exact}");
    assert_eq!(m["exact"], true);
    assert_eq!(m["similarity"], 1.0);
    assert_eq!(m["endpoint"], "/v1/chat/completions");
    assert!(m["api_key_id"].as_str().unwrap().starts_with("ik_"));
    assert!(m["created_at_ms"].as_i64().unwrap() > 1_600_000_000_000);
    assert_eq!(exact["matches"].as_array().unwrap().len(), 1, "{exact}");
    assert!(
        exact["watermark"]["p_value"].as_f64().unwrap() < 1e-3,
        "{exact}"
    );
    // The edited copy: found, not exact, still alice's.
    let edited = &texts[1];
    let m = &edited["matches"][0];
    assert_eq!(m["account"], "alice", "{edited}");
    assert_eq!(m["exact"], false);
    assert_eq!(m["event_id"], exact["matches"][0]["event_id"]);
    assert!(m["similarity"].as_f64().unwrap() > 0.5, "{edited}");
    // The human text: never served, not watermarked.
    let human = &texts[2];
    assert_eq!(human["served"], false, "{human}");
    assert!(human["matches"].as_array().unwrap().is_empty());
    assert!(
        human["watermark"]["p_value"].as_f64().unwrap() > 1e-3,
        "{human}"
    );

    // Stdin, JSONL (a competitor's dataset): bob's and alice's second answer found;
    // the index is already up to date.
    let mut cmd = isotope();
    cmd.args(["trace", "--json"])
        .args(store)
        .args(trace_keys)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let lines = format!(
        "{}\n{}\n",
        json!({"prompt": "x", "response": b1}),
        json!({"text": edit(&a2)})
    );
    child
        .stdin
        .take()
        .unwrap()
        .write_all(lines.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["index"]["indexed_now"], 0, "{v}");
    assert_eq!(v["index"]["indexed_events"], 3, "{v}");
    assert_eq!(v["texts"][0]["source"], "stdin:1");
    assert_eq!(v["texts"][0]["matches"][0]["account"], "bob", "{v}");
    assert_eq!(v["texts"][1]["matches"][0]["account"], "alice", "{v}");
}

/// A fixed watermark key (mode 0600), so served texts are the same on every run.
fn fixed_key(path: &Path) {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    writeln!(f, "secret = {}", "07".repeat(32)).unwrap();
}

#[test]
fn trace_finds_served_texts_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // The server uses DATA_DIR/watermark.key when it exists.
    fixed_key(&data.join("watermark.key"));
    let data_s = data.to_str().unwrap();
    let store = ["--data-dir", data_s];
    scenario(&store, &[], &[], dir.path());

    // Human-readable output names the account.
    let (code, stdout, stderr) = run(isotope()
        .args(["trace"])
        .args(store)
        .arg(dir.path().join("exact.txt")));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("SERVED") && stdout.contains("account alice"),
        "{stdout}"
    );

    // Clear errors: no store there, an unreadable key file.
    let (code, _, stderr) = run(isotope()
        .args(["trace", "--database-url"])
        .arg(format!(
            "sqlite://{}/nowhere/isotope.db",
            dir.path().display()
        ))
        .args(["--watermark-key"])
        .arg(data.join("watermark.key"))
        .arg(dir.path().join("exact.txt")));
    assert_ne!(code, 0);
    assert!(stderr.contains("no isotope store"), "{stderr}");
    assert!(!dir.path().join("nowhere").exists(), "no store was created");
    let (code, _, stderr) = run(isotope()
        .args(["trace"])
        .args(store)
        .args(["--watermark-key", "/nonexistent/wm.key"])
        .arg(dir.path().join("exact.txt")));
    assert_ne!(code, 0);
    assert!(stderr.contains("/nonexistent/wm.key"), "{stderr}");
}

#[test]
fn trace_by_hash_when_the_server_stores_hashes_only() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    fixed_key(&data.join("watermark.key"));
    let store = ["--data-dir", data.to_str().unwrap()];
    let key = create_key(&store, "carol");
    let server = serve(&store, &["--hash-only"]);
    let text = complete(&server.addr, &key, "Explain how bread rises.", 5);
    drop(server);
    let exact = dir.path().join("exact.txt");
    std::fs::write(&exact, &text).unwrap();
    let edited = dir.path().join("edited.txt");
    std::fs::write(&edited, edit(&text)).unwrap();
    let v = trace_json(&store, &[], &[&exact, &edited]);
    let m = &v["texts"][0]["matches"][0];
    assert_eq!(m["account"], "carol", "{v}");
    assert_eq!(m["exact"], true);
    // Without stored text there is nothing to compare an edited copy with; the
    // watermark is what remains.
    assert_eq!(v["texts"][1]["served"], false, "{v}");
    assert!(
        v["texts"][1]["watermark"]["p_value"].as_f64().unwrap() < 1e-2,
        "{v}"
    );
}

#[test]
fn trace_finds_served_texts_on_postgres() {
    let Ok(admin) = std::env::var("ISOTOPE_TEST_POSTGRES_URL") else {
        assert!(
            std::env::var("CI").is_err(),
            "ISOTOPE_TEST_POSTGRES_URL must be set in CI (.ci/run starts PostgreSQL)"
        );
        eprintln!("skipped: ISOTOPE_TEST_POSTGRES_URL not set");
        return;
    };
    let mut suffix = [0u8; 6];
    getrandom_suffix(&mut suffix);
    let db = format!(
        "isotope_trace_{}",
        suffix
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    psql(&admin, &format!("CREATE DATABASE {db}"));
    let (base, _) = admin.rsplit_once('/').unwrap();
    let url = format!("{base}/{db}");
    let dir = tempfile::tempdir().unwrap();
    let wm = dir.path().join("wm.key");
    fixed_key(&wm);
    let store = ["--database-url", url.as_str()];
    let wm_s = wm.to_str().unwrap();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        scenario(
            &store,
            &["--watermark-key", wm_s],
            &["--watermark-key", wm_s],
            dir.path(),
        )
    }));
    psql(
        &admin,
        &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
    );
    if let Err(e) = outcome {
        std::panic::resume_unwind(e);
    }
}

fn getrandom_suffix(buf: &mut [u8]) {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (nanos >> (8 * i)) as u8 ^ (std::process::id() >> (i % 4)) as u8;
    }
}

fn psql(url: &str, sql: &str) {
    let out = StdCommand::new("psql")
        .args([url, "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .expect("psql runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
