//! `isotope audit text|model|verify` on the real model: the JSON contract, corpus
//! formats, an evidence bundle that verifies (and one that does not), reading mode on
//! a student directory and through a served model's prompt log-probs, and clear
//! errors on bad input.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::workspace;
use serde_json::Value;

fn model() -> String {
    common::model().display().to_string()
}

fn isotope() -> Command {
    let mut c = common::isotope();
    c.env("ISOTOPE_MODEL", model())
        // One llama.cpp thread: two OpenMP threads on a loaded 2-core box spin.
        .env("ISOTOPE_THREADS", "1");
    c
}

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

fn fixed_key(dir: &Path, b: u8) -> PathBuf {
    let path = dir.join(format!("k{b}.key"));
    std::fs::write(
        &path,
        format!("secret = {}\n", format!("{b:02x}").repeat(32)),
    )
    .unwrap();
    path
}

/// Watermarked answers from `isotope generate`, as harvest-style JSONL lines.
fn watermarked_jsonl(key: &Path, n: usize) -> String {
    let prompts = [
        "Write a short story about a lighthouse keeper and a storm.",
        "Explain how bread rises, for a child.",
        "Describe a walk through a market in the morning.",
    ];
    (0..n)
        .map(|i| {
            let (code, stdout, stderr) = run(isotope()
                .args(["generate", "--prompt", prompts[i % prompts.len()]])
                .args(["--max-tokens", "120", "--temperature", "1", "--json"])
                .args(["--seed", &i.to_string()])
                .arg("--watermark-key")
                .arg(key));
            assert_eq!(code, 0, "{stderr}");
            let v: Value = serde_json::from_str(stdout.trim()).unwrap();
            serde_json::json!({"id": format!("{i}-0"), "prompt": prompts[i % prompts.len()], "response": v["text"]})
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn audit_json(args: &[&str], keys: &[&Path], files: &[&Path]) -> Value {
    let mut cmd = isotope();
    cmd.args(["audit", "text", "--json"]).args(args);
    for k in keys {
        cmd.arg("--watermark-key").arg(k);
    }
    cmd.args(files);
    let (code, stdout, stderr) = run(&mut cmd);
    assert_eq!(code, 0, "{stderr}");
    serde_json::from_str(stdout.trim()).unwrap()
}

#[test]
fn audit_text_contract_bundle_and_verify() {
    let dir = tempfile::tempdir().unwrap();
    let k1 = fixed_key(dir.path(), 1);
    let k2 = fixed_key(dir.path(), 2);
    let marked = dir.path().join("harvest.jsonl");
    std::fs::write(&marked, watermarked_jsonl(&k1, 3)).unwrap();
    let human = workspace().join("data/gsm8k/test.jsonl");

    // The contract: one object with p_value, scored_tokens, mode.
    let v = audit_json(&[], &[&k1], &[&marked]);
    assert_eq!(v["mode"], "text");
    assert!(v["scored_tokens"].as_u64().unwrap() > 100, "{v}");
    assert!(v["p_value"].as_f64().unwrap() < 1e-6, "{v}");
    assert_eq!(v["texts"], 3);

    // Several keys: per-key results and the corrected p-value.
    let v = audit_json(&[], &[&k2, &k1], &[&marked]);
    assert_eq!(v["variants"][0]["per_key"].as_array().unwrap().len(), 2);
    assert_eq!(
        v["variants"][0]["best_key_id"],
        v["variants"][0]["per_key"][1]["key_id"]
    );

    // Human text (GSM8K answers) under the same key is not flagged.
    let v = audit_json(&["--scheme", "kgw"], &[&k1], &[&human]);
    assert!(v["texts"].as_u64().unwrap() > 1000, "{v}");
    assert!(v["p_value"].as_f64().unwrap() > 1e-3, "{v}");

    // Bundle → verify with the key; with another key it fails and says why.
    let bundle = dir.path().join("bundle");
    let mut cmd = isotope();
    cmd.args(["audit", "text", "--watermark-key"])
        .arg(&k1)
        .arg("--bundle")
        .arg(&bundle)
        .arg(&marked);
    let (code, stdout, stderr) = run(&mut cmd);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("WATERMARK FOUND"), "{stdout}");
    let manifest = std::fs::read_to_string(bundle.join("bundle.json")).unwrap();
    assert!(
        !manifest.contains(&"01".repeat(32)),
        "the key itself is never written"
    );
    let (code, stdout, stderr) = run(isotope()
        .args(["audit", "verify"])
        .arg(&bundle)
        .arg("--watermark-key")
        .arg(&k1));
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.starts_with("OK"), "{stdout}");
    let (code, stdout, stderr) = run(isotope()
        .args(["audit", "verify", "--json"])
        .arg(&bundle)
        .arg("--watermark-key")
        .arg(&k2));
    assert_ne!(code, 0);
    assert!(stdout.contains("not one of the bundle's keys"), "{stdout}");
    assert!(stderr.contains("does not verify"), "{stderr}");
}

#[test]
fn audit_model_reading_mode_and_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let k1 = fixed_key(dir.path(), 1);
    let ours = dir.path().join("ours.jsonl");
    std::fs::write(&ours, watermarked_jsonl(&k1, 2)).unwrap();
    // A tiny student directory (untrained): reading mode runs end to end and the
    // innocent model is not flagged.
    let train = dir.path().join("train.jsonl");
    std::fs::write(&train, std::fs::read_to_string(&ours).unwrap()).unwrap();
    let student = dir.path().join("student");
    let (code, _, stderr) = run(isotope()
        .args(["distill", "train", "--data"])
        .arg(&train)
        .arg("--out")
        .arg(&student)
        .args(["--student", "tiny", "--max-steps", "1", "--json"])
        .args(["--tokenizer-gguf", &model()]));
    assert_eq!(code, 0, "{stderr}");
    // Unsupervised: other text it reads (human GSM8K answers); supervised: ours.
    let other = dir.path().join("other.jsonl");
    let gsm = std::fs::read_to_string(workspace().join("data/gsm8k/test.jsonl")).unwrap();
    std::fs::write(&other, gsm.lines().take(3).collect::<Vec<_>>().join("\n")).unwrap();
    let bundle = dir.path().join("bundle");
    let (code, stdout, stderr) = run(isotope()
        .args(["audit", "model", "--json", "--suspect"])
        .arg(&student)
        .arg("--supervised-with")
        .arg(&ours)
        .arg("--texts")
        .arg(&other)
        .arg("--watermark-key")
        .arg(&k1)
        .arg("--bundle")
        .arg(&bundle));
    assert_eq!(code, 0, "{stderr}");
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["mode"], "reading");
    let names = |v: &Value| -> Vec<String> {
        v["variants"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(names(&v), ["unsupervised", "supervised"]);
    assert_eq!(v["texts"], 5, "{v}");
    assert!(v["scored_tokens"].as_u64().unwrap() > 20, "{v}");
    assert!(v["p_value"].as_f64().unwrap() > 1e-3, "{v}");
    let (code, stdout, stderr) = run(isotope()
        .args(["audit", "verify"])
        .arg(&bundle)
        .arg("--watermark-key")
        .arg(&k1));
    assert_eq!(code, 0, "{stdout}{stderr}");

    // The same student as a GGUF is read through llama.cpp: same texts, same windows.
    let gguf = dir.path().join("student.gguf");
    let (code, _, stderr) = run(isotope()
        .args(["distill", "export", "--dtype", "f32", "--student"])
        .arg(&student)
        .arg("--out")
        .arg(&gguf)
        .args(["--tokenizer-gguf", &model()]));
    assert_eq!(code, 0, "{stderr}");
    // `audit model` reading our outputs through the GGUF, with `extra` arguments.
    let audit_gguf = |extra: &[&str]| {
        run(isotope()
            .args(["audit", "model"])
            .args(extra)
            .arg("--suspect")
            .arg(&gguf)
            .arg("--supervised-with")
            .arg(&ours)
            .arg("--watermark-key")
            .arg(&k1))
    };
    let read_gguf = |statistic: &str| {
        let (code, stdout, stderr) = audit_gguf(&["--json", "--reading-statistic", statistic]);
        assert_eq!(code, 0, "{stderr}");
        (
            serde_json::from_str::<Value>(stdout.trim()).unwrap(),
            stderr,
        )
    };
    // The untrained model is flat: no candidate reaches 1/128, so the mass statistic
    // (the default) counts each window's top-1 with weight 1 — the top-1 test.
    let (m, _) = read_gguf("mass");
    let (g, _) = read_gguf("top1");
    // The human report lists each key's result, with the weighted (probability-mass)
    // share when the reading weighed its candidates (this flat model's weights are
    // all 1, so the tally is the plain top-1 count and has none).
    let (code, stdout, stderr) = audit_gguf(&[]);
    assert_eq!(code, 0, "{stderr}");
    let key_line = stdout
        .lines()
        .find(|l| l.contains("tuples, statistic"))
        .unwrap_or_else(|| panic!("{stdout}"));
    let weighted = m["variants"][0]["per_key"][0].get("weighted").is_some();
    assert_eq!(key_line.contains("weighted share"), weighted, "{stdout}");
    assert_eq!(m["reading_statistic"], "mass");
    let first = |v: &Value| v["variants"][0]["per_key"][0]["p_value"].clone();
    assert_eq!(first(&m), first(&g), "{m}\n{g}");
    assert_eq!(g["mode"], "reading");
    // Only our outputs read: the supervised variant alone, nothing to correct for.
    assert_eq!(names(&g), ["supervised"]);
    assert_eq!(g["p_value"], g["variants"][0]["p_value"]);
    assert!(g["scored_tokens"].as_u64().unwrap() > 20, "{g}");
    assert!(g["p_value"].as_f64().unwrap() > 1e-3, "{g}");
    // The mass statistic needs a window-seeded green list.
    let (code, _, stderr) = audit_gguf(&["--scheme", "gumbel", "--reading-statistic", "mass"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("--reading-statistic top1"), "{stderr}");
    // A file that is not a GGUF is refused with its name.
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, "not a model").unwrap();
    let (code, _, stderr) = run(isotope()
        .args(["audit", "model", "--suspect"])
        .arg(&junk)
        .arg("--texts")
        .arg(&ours)
        .arg("--watermark-key")
        .arg(&k1));
    assert_ne!(code, 0);
    assert!(stderr.contains("junk.gguf"), "{stderr}");

    // Bad input: a suspect that does not exist, an unreachable API, no prompts.
    let (code, _, stderr) = run(isotope()
        .args([
            "audit",
            "model",
            "--suspect",
            "/nonexistent/student",
            "--texts",
        ])
        .arg(&ours)
        .arg("--watermark-key")
        .arg(&k1));
    assert_ne!(code, 0);
    assert!(stderr.contains("neither an http(s) URL"), "{stderr}");
    let (code, _, stderr) = run(isotope()
        .args(["audit", "model", "--suspect", "http://127.0.0.1:9"])
        .arg("--watermark-key")
        .arg(&k1));
    assert_ne!(code, 0);
    assert!(stderr.contains("--prompts"), "{stderr}");
    // Unigram shares one window seed across all positions: refused, with the way out.
    let (code, _, stderr) = run(isotope()
        .args(["audit", "model", "--scheme", "unigram", "--suspect"])
        .arg(&student)
        .arg("--texts")
        .arg(&ours)
        .arg("--watermark-key")
        .arg(&k1));
    assert_ne!(code, 0);
    assert!(
        stderr.contains("unigram") && stderr.contains("audit text"),
        "{stderr}"
    );
    let (code, _, stderr) = run(isotope()
        .args(["audit", "text", "--watermark-key"])
        .arg(&k1)
        .arg(dir.path().join("missing.txt")));
    assert_ne!(code, 0);
    assert!(stderr.contains("missing.txt"), "{stderr}");
}

/// `isotope serve` on a fresh data directory under `dir` (with `extra` flags), and an
/// API key for an `auditor` account: (server, base URL, API key).
fn auditor_server(dir: &Path, extra: &[&str]) -> (common::Server, String, String) {
    let data = dir.join("data");
    let (code, stdout, stderr) = run(isotope()
        .args(["keys", "create", "--account", "auditor", "--data-dir"])
        .arg(&data));
    assert_eq!(code, 0, "{stderr}");
    let api_key = stdout.lines().last().unwrap().trim().to_owned();
    let mut args = vec!["--data-dir", data.to_str().unwrap()];
    args.extend_from_slice(extra);
    let server = common::start(&args);
    let url = format!("http://{}", server.addr);
    (server, url, api_key)
}

#[test]
fn black_box_audit_of_a_live_server() {
    // The suspect here is our own watermarking server: the most radioactive model
    // there is. Under its key the audit fires; under another key it does not; a wrong
    // API key is a clear error.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (server, url, api_key) = auditor_server(dir.path(), &[]);
    let prompts = workspace().join("data/gsm8k/test.jsonl");
    let other = fixed_key(dir.path(), 7);
    let bundle = dir.path().join("bundle");
    let (code, stdout, stderr) = run(isotope()
        .args([
            "audit",
            "model",
            "--json",
            "--suspect",
            &url,
            "--api-key",
            &api_key,
        ])
        .arg("--prompts")
        .arg(&prompts)
        .args(["--budget-tokens", "480", "--max-tokens", "80"])
        .arg("--watermark-key")
        .arg(data.join("watermark.key"))
        .arg("--watermark-key")
        .arg(&other)
        .arg("--bundle")
        .arg(&bundle));
    assert_eq!(code, 0, "{stderr}");
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    eprintln!("black-box: {v}");
    assert_eq!(v["mode"], "black-box");
    assert_eq!(v["texts"], 6);
    assert!(v["p_value"].as_f64().unwrap() < 1e-6, "{v}");
    let per_key = v["variants"][0]["per_key"].as_array().unwrap();
    assert!(per_key[1]["p_value"].as_f64().unwrap() > 1e-3, "{v}");
    assert!(bundle.join("harvest.jsonl").exists());
    let (code, stdout, stderr) = run(isotope()
        .args(["audit", "verify"])
        .arg(&bundle)
        .arg("--watermark-key")
        .arg(data.join("watermark.key"))
        .arg("--watermark-key")
        .arg(&other));
    assert_eq!(code, 0, "{stdout}{stderr}");

    let (code, _, stderr) = run(isotope()
        .args([
            "audit",
            "model",
            "--suspect",
            &url,
            "--api-key",
            "isk_wrong_key",
        ])
        .arg("--prompts")
        .arg(&prompts)
        .args(["--budget-tokens", "100"])
        .arg("--watermark-key")
        .arg(&other));
    assert_ne!(code, 0);
    assert!(stderr.contains("querying the suspect"), "{stderr}");

    // Reading through this server's prompt log-probs: it does not allow `echo` with
    // `logprobs`, and the audit says so; asking for both kinds at once is refused.
    let ours = dir.path().join("ours.jsonl");
    std::fs::write(&ours, watermarked_jsonl(&other, 1)).unwrap();
    let (code, _, stderr) = run(isotope()
        .args(["audit", "model", "--suspect", &url, "--api-key", &api_key])
        .arg("--supervised-with")
        .arg(&ours)
        .arg("--watermark-key")
        .arg(&other));
    assert_ne!(code, 0);
    assert!(
        stderr.contains("reading through") && stderr.contains("`echo`"),
        "{stderr}"
    );
    let (code, _, stderr) = run(isotope()
        .args(["audit", "model", "--suspect", &url])
        .arg("--prompts")
        .arg(&prompts)
        .arg("--texts")
        .arg(&ours)
        .arg("--watermark-key")
        .arg(&other));
    assert_ne!(code, 0);
    assert!(stderr.contains("not both"), "{stderr}");
    drop(server);
}

/// Reading mode through an API (`echo` + `logprobs`) reads exactly what reading the
/// served GGUF does: the same predictions, hence the same tuples and p-values; an
/// interrupted reading resumes from the bundle.
#[test]
fn reading_through_an_api_equals_reading_the_weights() {
    let dir = tempfile::tempdir().unwrap();
    let (server, url, api_key) = auditor_server(dir.path(), &["--allow-echo-logprobs"]);
    let k1 = fixed_key(dir.path(), 1);
    let ours = dir.path().join("ours.jsonl");
    std::fs::write(&ours, watermarked_jsonl(&k1, 2)).unwrap();
    let other = dir.path().join("other.jsonl");
    let gsm = std::fs::read_to_string(workspace().join("data/gsm8k/test.jsonl")).unwrap();
    std::fs::write(&other, gsm.lines().take(3).collect::<Vec<_>>().join("\n")).unwrap();
    let audit = |suspect: &str, bundle: &Path, extra: &[&str]| {
        let (code, stdout, stderr) = run(isotope()
            .args(["audit", "model", "--json", "--suspect", suspect])
            .args(["--api-key", &api_key])
            .args(extra)
            .arg("--supervised-with")
            .arg(&ours)
            .arg("--texts")
            .arg(&other)
            .arg("--watermark-key")
            .arg(&k1)
            .arg("--bundle")
            .arg(bundle));
        assert_eq!(code, 0, "{stderr}");
        let v: Value = serde_json::from_str(stdout.trim()).unwrap();
        (v, stderr)
    };
    // One field of every text a bundle's reader read.
    let field = |bundle: &Path, name: &str| -> Vec<Value> {
        ["texts.jsonl", "supervised.jsonl"]
            .iter()
            .flat_map(|f| {
                std::fs::read_to_string(bundle.join(f))
                    .unwrap()
                    .lines()
                    .map(|l| serde_json::from_str::<Value>(l).unwrap()[name].clone())
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let predictions = |bundle: &Path| field(bundle, "predictions");
    let by_file = dir.path().join("by-file");
    let (w, _) = audit(&model(), &by_file, &[]);
    let by_api = dir.path().join("by-api");
    let (a, _) = audit(&url, &by_api, &[]);
    assert_eq!(a["mode"], "reading");
    assert_eq!(a["texts"], 5, "{a}");
    assert!(a["scored_tokens"].as_u64().unwrap() > 100, "{a}");
    assert_eq!(a["variants"], w["variants"], "api {a}\nweights {w}");
    assert_eq!(a["p_value"], w["p_value"]);
    assert_eq!(predictions(&by_api), predictions(&by_file));
    // The default statistic for this scheme is the green mass: the candidate lists
    // (ids, log-probs) read through the API are the file's too.
    assert_eq!(a["reading_statistic"], "mass", "{a}");
    let tops = |bundle: &Path| field(bundle, "top");
    let api_tops = tops(&by_api);
    assert!(api_tops.iter().all(|t| t.is_array()));
    assert_eq!(api_tops, tops(&by_file));
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(by_api.join("bundle.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["parameters"]["reader"], "api-echo", "{manifest}");
    assert_eq!(manifest["parameters"]["reading_piece"], 1024, "{manifest}");
    assert_eq!(
        manifest["parameters"]["reading_statistic"], "mass",
        "{manifest}"
    );
    assert_eq!(manifest["parameters"]["reading_top"], 20, "{manifest}");
    let (code, stdout, stderr) = run(isotope()
        .args(["audit", "verify"])
        .arg(&by_api)
        .arg("--watermark-key")
        .arg(&k1));
    assert_eq!(code, 0, "{stdout}{stderr}");

    // Interrupted after one piece: the rerun reads only the rest, same result.
    let cache = by_api.join("readings.jsonl");
    let kept: Vec<String> = std::fs::read_to_string(&cache)
        .unwrap()
        .lines()
        .take(2)
        .map(str::to_owned)
        .collect();
    std::fs::write(&cache, kept.join("\n") + "\n").unwrap();
    let (again, stderr) = audit(&url, &by_api, &[]);
    assert!(
        stderr.contains("resuming: 1 pieces read before, 4 to read"),
        "{stderr}"
    );
    assert_eq!(again["variants"], a["variants"]);
    // In shorter pieces the predictions differ (each piece starts afresh), still valid.
    let short = dir.path().join("short");
    let (s, _) = audit(&url, &short, &["--reading-piece", "16"]);
    assert_ne!(predictions(&short), predictions(&by_api));
    assert!(s["p_value"].as_f64().unwrap() > 1e-3, "{s}");
    // The bundle belongs to that suspect: another one is refused.
    let (code, _, stderr) = run(isotope()
        .args([
            "audit",
            "model",
            "--suspect",
            &url,
            "--suspect-model",
            "other",
        ])
        .args(["--api-key", &api_key])
        .arg("--texts")
        .arg(&other)
        .arg("--watermark-key")
        .arg(&k1)
        .arg("--bundle")
        .arg(&by_api));
    assert_ne!(code, 0);
    assert!(stderr.contains("another suspect"), "{stderr}");
    drop(server);
}
