//! Output policies by risk level (issue #8), end to end: the real binary and model, a
//! real SQLite store, HTTP. One server, one API key pinned at each level, the same
//! requests from each: the benign (`observe`) key gets exactly what it asked for and
//! the others get exactly their level's policy — rounded log-probs, refused `echo`,
//! withheld or summarised reasoning, antidistillation sampling — and every applied
//! policy is on the usage event.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command as StdCommand;
use std::time::Duration;

use common::{isotope, model, run_ok, start, workspace, Server};
use serde_json::{json, Value};

/// POST `body` to `path` with `key`; the status and the body as text.
fn send(server: &Server, key: &str, path: &str, body: Value) -> (u16, String) {
    let url = format!("http://{}{path}", server.addr);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let resp = reqwest::Client::new()
            .post(url)
            .bearer_auth(key)
            .timeout(Duration::from_secs(300))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.text().await.unwrap())
    })
}

fn post(server: &Server, key: &str, path: &str, body: Value) -> (u16, Value) {
    let (status, text) = send(server, key, path, body);
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// The concatenated `choices[0].text` of a streamed completion (ends at `[DONE]`).
fn sse_text(server: &Server, key: &str, body: Value) -> String {
    let (status, raw) = send(server, key, "/v1/completions", body);
    assert_eq!(status, 200, "{raw}");
    assert!(raw.trim_end().ends_with("data: [DONE]"), "{raw}");
    raw.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| {
            let v: Value = serde_json::from_str(d).unwrap();
            v["choices"][0]["text"].as_str().unwrap_or("").to_owned()
        })
        .collect()
}

/// A few GSM8K question/answer pairs as a distillation JSONL file.
fn tasks(dir: &Path) -> PathBuf {
    let data = dir.join("tasks.jsonl");
    let gsm = std::fs::read_to_string(workspace().join("data/gsm8k/train.jsonl"))
        .expect("data/gsm8k/train.jsonl");
    let lines: Vec<String> = gsm
        .lines()
        .take(12)
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            json!({"prompt": v["question"], "response": v["answer"]}).to_string()
        })
        .collect();
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    data
}

/// A tiny student on the teacher's vocabulary, trained for a few steps (seconds).
fn tiny_student(dir: &Path, name: &str, seed: u64) -> PathBuf {
    let student = dir.join(name);
    run_ok(
        isotope()
            .args(["distill", "train", "--data"])
            .arg(tasks(dir))
            .arg("--out")
            .arg(&student)
            .arg("--tokenizer-gguf")
            .arg(model())
            .args(["--student", "tiny", "--max-steps", "3", "--batch-size", "4"])
            .args(["--seq-len", "128", "--seed", &seed.to_string(), "--json"]),
    );
    student
}

/// Train a tiny proxy student and its gradient on a few GSM8K answers (seconds).
fn proxy(dir: &Path) -> (PathBuf, PathBuf) {
    let student = tiny_student(dir, "proxy", 1);
    let grad = dir.join("grad.safetensors");
    run_ok(
        isotope()
            .args(["defence", "gradient", "--proxy"])
            .arg(&student)
            .arg("--tasks")
            .arg(tasks(dir))
            .arg("--out")
            .arg(&grad)
            .arg("--json"),
    );
    (student, grad)
}

fn all_logprobs(choice: &Value) -> Vec<f64> {
    let lp = &choice["logprobs"];
    let mut out: Vec<f64> = lp["token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    for m in lp["top_logprobs"].as_array().unwrap() {
        if let Some(m) = m.as_object() {
            out.extend(m.values().filter_map(Value::as_f64));
        }
    }
    out
}

#[test]
fn each_level_gets_exactly_its_policy() {
    let dir = tempfile::tempdir().unwrap();
    let (student, grad) = proxy(dir.path());
    // Each level sets its own levers (a level written here replaces that level's
    // defaults entirely).
    let config = dir.path().join("isotope.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[policy.flag]
logprob_decimals = 1
reasoning = "summarise"

[policy.throttle]
logprob_noise = 0.5
refuse_echo = true

[policy.degrade]
antidistill_lambda = 8.0
reasoning = "withhold"

[defence]
proxy = "{}"
gradient = "{}"
"#,
            student.display(),
            grad.display()
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    let db = format!("sqlite://{}", data.join("isotope.db").display());
    let store = ["--database-url", db.as_str()];
    std::fs::create_dir_all(&data).unwrap();
    let mut keys = Vec::new();
    for level in ["observe", "flag", "throttle", "degrade"] {
        let out = run_ok(
            isotope()
                .args(["keys", "create", "--account", level])
                .args(store),
        );
        keys.push(out.lines().last().unwrap().trim().to_owned());
    }
    let list: Value = serde_json::from_str(&run_ok(
        isotope().args(["keys", "list", "--json"]).args(store),
    ))
    .unwrap();
    for k in list["keys"].as_array().unwrap() {
        let level = k["account_name"].as_str().unwrap();
        if level != "observe" {
            let id = k["key_id"].as_str().unwrap();
            run_ok(
                isotope()
                    .args(["keys", "set-level", id, &format!("pin:{level}")])
                    .args(store),
            );
        }
    }
    let (observe, flag, throttle, degrade) = (&keys[0], &keys[1], &keys[2], &keys[3]);
    // A rotated-out key: still used by detection, never for generation.
    let old_key = dir.path().join("old.key");
    run_ok(isotope().args(["keygen", "--out"]).arg(&old_key));
    let server = start(&[
        "--admin-token",
        "admin-secret",
        "--detection-key",
        old_key.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--database-url",
        &db,
        "--no-sentinel",
        "--allow-echo-logprobs",
    ]);

    // 1. Log-probs: exact for the benign key, rounded at `flag`, noised at `throttle`;
    //    the sampled text is the same at all three (no sampling lever there).
    let ask = |key: &str| {
        post(
            &server,
            key,
            "/v1/completions",
            json!({"model": "SmolLM2-135M-Instruct.Q4_1", "prompt": "The capital of France is",
                   "max_tokens": 12, "temperature": 0.8, "seed": 11, "logprobs": 5}),
        )
    };
    let (s0, obs) = ask(observe);
    let (s1, fl) = ask(flag);
    let (s2, th) = ask(throttle);
    assert_eq!((s0, s1, s2), (200, 200, 200), "{obs} {fl} {th}");
    let text = |v: &Value| v["choices"][0]["text"].as_str().unwrap().to_owned();
    assert_eq!(text(&obs), text(&fl));
    assert_eq!(text(&obs), text(&th));
    let lp_obs = all_logprobs(&obs["choices"][0]);
    let lp_fl = all_logprobs(&fl["choices"][0]);
    let lp_th = all_logprobs(&th["choices"][0]);
    assert!(lp_obs.len() > 12 && lp_obs.len() == lp_fl.len() && lp_obs.len() == lp_th.len());
    assert!(
        lp_obs
            .iter()
            .any(|x| ((x * 10.0).round() - x * 10.0).abs() > 1e-3),
        "benign log-probs look rounded: {lp_obs:?}"
    );
    assert!(
        lp_fl
            .iter()
            .all(|x| ((x * 10.0).round() - x * 10.0).abs() < 1e-4 && *x <= 0.0),
        "flag log-probs not rounded to 0.1: {lp_fl:?}"
    );
    let moved = lp_obs
        .iter()
        .zip(&lp_th)
        .filter(|(a, b)| (*a - *b).abs() > 1e-3)
        .count();
    assert!(moved * 2 > lp_obs.len(), "throttle log-probs barely noised");
    assert!(lp_th.iter().all(|x| *x <= 0.0));

    // 2. echo + logprobs: allowed for the benign key, refused at `throttle`.
    let echo = json!({"model": "SmolLM2-135M-Instruct.Q4_1", "prompt": "One two three",
                      "max_tokens": 1, "echo": true, "logprobs": 2});
    let (s, v) = post(&server, observe, "/v1/completions", echo.clone());
    assert_eq!(s, 200, "{v}");
    assert!(v["choices"][0]["text"]
        .as_str()
        .unwrap()
        .starts_with("One two three"));
    let (s, v) = post(&server, throttle, "/v1/completions", echo);
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"]["param"], "echo", "{v}");

    // 3. Reasoning: the prompt opens a section the answer continues (as reasoning
    //    models' templates do). Benign: returned whole; degrade: withheld (but
    //    counted); flag: replaced by the model's own summary, inside the tags.
    let think = |key: &str| {
        post(
            &server,
            key,
            "/v1/completions",
            json!({"model": "SmolLM2-135M-Instruct.Q4_1",
                   "prompt": "Question: Tom has 3 apples and buys 4 more. How many apples?\n<think>\n",
                   "max_tokens": 24, "temperature": 0.8, "seed": 5}),
        )
    };
    let (s, v) = think(observe);
    assert_eq!(s, 200, "{v}");
    let whole = text(&v);
    assert!(
        !whole.trim().is_empty() && !whole.contains("<think>"),
        "{whole:?}"
    );
    let (s, v) = think(degrade);
    assert_eq!(s, 200, "{v}");
    // Either nothing (the section never closed) or only what follows `</think>`.
    let withheld = text(&v);
    assert!(
        withheld.trim().is_empty()
            || !whole.contains(withheld.trim())
            || whole.contains("</think>"),
        "reasoning leaked: {withheld:?}"
    );
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() > 0, "{v}");
    // Streamed, a withheld section sends no text either (the SSE path holds back
    // possible tag prefixes token by token).
    let streamed = sse_text(
        &server,
        degrade,
        json!({"model": "SmolLM2-135M-Instruct.Q4_1",
               "prompt": "Question: Tom has 3 apples and buys 4 more. How many apples?\n<think>\n",
               "max_tokens": 24, "temperature": 0.8, "seed": 5, "stream": true}),
    );
    assert_eq!(
        streamed, withheld,
        "streamed and whole withheld answers differ"
    );
    let (s, v) = think(flag);
    assert_eq!(s, 200, "{v}");
    let summarised = text(&v);
    eprintln!("reasoning whole: {whole:?}\nwithheld: {withheld:?}\nsummarised: {summarised:?}");
    assert!(
        summarised.starts_with("<think>") && summarised.contains("</think>"),
        "{summarised:?}"
    );

    // 4. Antidistillation at `degrade` (λ = 8) changes what is sampled; the benign key
    //    with the same seed gets plain sampling, the same as `flag`'s.
    let chat = |key: &str, q: &str| {
        post(
            &server,
            key,
            "/v1/chat/completions",
            json!({"model": "SmolLM2-135M-Instruct.Q4_1",
                   "messages": [{"role": "user", "content": q}],
                   "max_tokens": 24, "temperature": 0.8, "seed": 3}),
        )
    };
    let mut differ = 0;
    let questions = [
        "Write one sentence about the sea.",
        "Name three fruits.",
        "What is 12 times 4?",
    ];
    for q in questions {
        let (_, a) = chat(observe, q);
        let (_, b) = chat(flag, q);
        let (s, c) = chat(degrade, q);
        assert_eq!(s, 200, "{c}");
        let content = |v: &Value| {
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        assert_eq!(content(&a), content(&b), "benign sampling changed");
        eprintln!("plain: {:?}\ndefended: {:?}", content(&a), content(&c));
        if content(&a) != content(&c) {
            differ += 1;
        }
    }
    assert!(
        differ >= 2,
        "antidistillation changed {differ} of 3 answers"
    );

    // 5. `/admin/detect` tests a text with every key the server knows (active +
    //    rotated), admin token required.
    let (s, long) = post(
        &server,
        observe,
        "/v1/chat/completions",
        json!({"model": "SmolLM2-135M-Instruct.Q4_1",
               "messages": [{"role": "user", "content": "Write a short story about a lighthouse."}],
               "max_tokens": 160, "temperature": 0.8, "seed": 21}),
    );
    assert_eq!(s, 200, "{long}");
    let story = long["choices"][0]["message"]["content"].as_str().unwrap();
    let (s, d) = post(
        &server,
        "admin-secret",
        "/admin/detect",
        json!({"text": story}),
    );
    assert_eq!(s, 200, "{d}");
    assert_eq!(d["keys_tested"], 2, "{d}");
    assert_eq!(d["per_key"].as_array().unwrap().len(), 2, "{d}");
    assert!(
        d["p_value"].as_f64().unwrap() < 1e-4,
        "served text not detected: {d}"
    );
    let human = "Natalia sold clips to 48 of her friends in April, and then she sold half as \
                 many clips in May. How many clips did Natalia sell altogether in April and May?";
    let (s, d) = post(
        &server,
        "admin-secret",
        "/admin/detect",
        json!({"text": human}),
    );
    assert_eq!(s, 200, "{d}");
    assert!(
        d["p_value"].as_f64().unwrap() > 1e-3,
        "human text flagged: {d}"
    );
    let (s, _) = post(&server, observe, "/admin/detect", json!({"text": human}));
    assert_eq!(s, 401);
    let (s, d) = post(&server, "admin-secret", "/admin/detect", json!({"text": 3}));
    assert_eq!(s, 400, "{d}");

    // 6. Every applied policy is on the usage event; none on the benign key's.
    drop(server);
    let script = r#"
import json, sqlite3, sys
con = sqlite3.connect(sys.argv[1])
rows = con.execute("select a.name, e.policy from usage_events e join accounts a on a.id = e.account_id").fetchall()
print(json.dumps(rows))
"#;
    let out = run_ok(
        StdCommand::new(workspace().join(".venv/bin/python"))
            .arg("-c")
            .arg(script)
            .arg(data.join("isotope.db")),
    );
    let rows: Vec<(String, Option<String>)> = serde_json::from_str(out.trim()).unwrap();
    assert!(rows.len() >= 15, "{rows:?}");
    for (account, policy) in &rows {
        match account.as_str() {
            "observe" => assert!(policy.is_none(), "benign event has a policy: {policy:?}"),
            level => {
                let p: Value = serde_json::from_str(policy.as_deref().unwrap()).unwrap();
                assert_eq!(p["level"], level, "{p}");
                if level == "degrade" {
                    assert_eq!(p["treatment"]["antidistill_lambda"], 8.0, "{p}");
                    assert_eq!(p["treatment"]["reasoning"], "withhold", "{p}");
                }
                if level == "flag" {
                    assert_eq!(p["treatment"]["reasoning"], "summarise", "{p}");
                }
            }
        }
    }
}

/// `isotope eval defences` end to end at toy size: every λ gets a teacher and a student
/// row with metrics in range, the baseline's increases are zero, students start from
/// the named weights (not the proxy), and the plot is written.
#[test]
fn eval_defences_reports_teacher_and_student_quality() {
    let dir = tempfile::tempdir().unwrap();
    let (proxy, grad) = proxy(dir.path());
    let other = tiny_student(dir.path(), "attacker", 2);
    let png = dir.path().join("tradeoff.png");
    let out = run_ok(
        isotope()
            .args(["eval", "defences", "--model"])
            .arg(model())
            .arg("--antidistill-proxy")
            .arg(&proxy)
            .arg("--antidistill-grad")
            .arg(&grad)
            .arg("--student-init")
            .arg(&other)
            .args([
                "--lambdas",
                "0,8",
                "--train-prompts",
                "4",
                "--heldout-prompts",
                "2",
            ])
            .args(["--max-tokens", "12", "--epochs", "1", "--concurrency", "2"])
            // one llama.cpp thread: spinning threads on a busy 2-core machine cost
            // minutes; alone this takes ~50 s
            .args(["--threads", "1"])
            .arg("--data")
            .arg(workspace().join("data"))
            .arg("--png")
            .arg(&png)
            .arg("--json"),
    );
    let r: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(r["student_init"], other.display().to_string(), "{r}");
    assert!(r["student_kl_before"].as_f64().unwrap() > 0.0, "{r}");
    let points = r["points"].as_array().unwrap();
    assert_eq!(points.len(), 2, "{r}");
    let share = |p: &Value, k: &str| {
        let v = p[k].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{k} = {v}: {p}");
        v
    };
    for p in points {
        assert!(p["teacher_ppl"].as_f64().unwrap() >= 1.0, "{p}");
        assert!(p["teacher_tokens"].as_u64().unwrap() > 0, "{p}");
        share(p, "teacher_top1_agreement");
        assert!(share(p, "teacher_distinct2") > 0.0, "{p}");
        share(p, "student_top1_agreement");
        let kl = p["student_kl"].as_f64().unwrap();
        assert!(kl.is_finite() && kl >= 0.0, "{p}");
        assert!(p["student_ppl"].as_f64().unwrap().is_finite(), "{p}");
    }
    for k in [
        "teacher_ppl_increase",
        "student_ppl_increase",
        "student_kl_increase",
    ] {
        assert_eq!(points[0][k], 0.0, "{k}: {r}");
    }
    // the defence at λ = 8 changes what the teacher says (same seeds as λ = 0)
    assert_ne!(points[0]["teacher_ppl"], points[1]["teacher_ppl"], "{r}");
    assert!(std::fs::metadata(&png).unwrap().len() > 1000);
}
