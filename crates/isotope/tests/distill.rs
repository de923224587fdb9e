//! `isotope distill` end to end: harvest from the real `isotope serve` (complete run,
//! malformed prompt lines, kill and resume with no duplicates and no losses), `train
//! --json` on the harvested set (the contract fields; top-k aligned with the teacher's
//! tokens), `eval`, and `generate --model DIR` on the trained student. The 429 path is
//! tested against a test double in `crates/isotope-distill/tests/harvest.rs`.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::{Command as StdCommand, Stdio};
use std::time::{Duration, Instant};

use common::{model, workspace};
use serde_json::Value;

/// The binary run from the workspace root (relative data paths resolve there).
fn isotope() -> StdCommand {
    let mut c = common::isotope();
    c.current_dir(workspace());
    c
}

fn run(cmd: &mut StdCommand) -> (String, String) {
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "command failed:\n{stderr}\nstdout:\n{stdout}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    (stdout, stderr)
}

fn last_json(stdout: &str) -> Value {
    serde_json::from_str(stdout.lines().last().expect("output")).unwrap()
}

fn start_server(data_dir: &Path) -> common::Server {
    common::start(&["--data-dir", data_dir.to_str().unwrap()])
}

fn ids(path: &Path) -> (usize, HashSet<String>) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut n = 0;
    let mut set = HashSet::new();
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).expect("every line is a whole record");
        assert!(v["response"].is_string());
        set.insert(v["id"].as_str().unwrap().to_owned());
        n += 1;
    }
    (n, set)
}

fn harvest_cmd(endpoint: &str, key: &str, prompts: &Path, out: &Path) -> StdCommand {
    let mut c = isotope();
    c.args([
        "distill",
        "harvest",
        "--endpoint",
        endpoint,
        "--api-key",
        key,
    ])
    .arg("--prompts")
    .arg(prompts)
    .arg("--out")
    .arg(out)
    .args(["--seed", "7", "--temperature", "0.8"]);
    c
}

#[test]
fn harvest_resume_train_eval_generate() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("store");
    let (stdout, _) = run(isotope()
        .args(["keys", "create", "--account", "distiller", "--data-dir"])
        .arg(&data_dir));
    let key = stdout.lines().last().unwrap().trim().to_owned();
    let server = start_server(&data_dir);
    let endpoint = format!("http://{}", server.addr);

    // 1. A complete harvest, with malformed lines reported by number, and top-k.
    let prompts = dir.path().join("prompts.jsonl");
    let mut text = String::new();
    let topics = [
        "Name a colour.",
        "What is 2 + 3?",
        "Say hello.",
        "Name a fruit.",
        "What is the capital of France?",
        "Count to three.",
    ];
    for (i, t) in topics.iter().enumerate() {
        text.push_str(&format!("{{\"prompt\": {}}}\n", serde_json::json!(t)));
        if i == 1 {
            text.push_str("{not json\n");
        }
        if i == 3 {
            text.push_str("{\"text\": \"no prompt field\"}\n");
        }
    }
    std::fs::write(&prompts, &text).unwrap();
    let out = dir.path().join("harvest.jsonl");
    let (stdout, stderr) = run(harvest_cmd(&endpoint, &key, &prompts, &out).args([
        "--max-tokens",
        "12",
        "--top-logprobs",
        "5",
        "--concurrency",
        "2",
        "--json",
    ]));
    assert!(stderr.contains("prompts.jsonl:3: skipped"), "{stderr}");
    assert!(stderr.contains("prompts.jsonl:6: skipped"), "{stderr}");
    let report = last_json(&stdout);
    assert_eq!(report["written"], 6, "{report}");
    assert_eq!(report["failed"], 0, "{report}");
    assert_eq!(report["prompt_lines_skipped"], 2, "{report}");
    assert!(report["completion_tokens"].as_u64().unwrap() > 0);
    assert!(report["requests"].as_u64().unwrap() >= 6);
    let (n, set) = ids(&out);
    assert_eq!((n, set.len()), (6, 6));

    // 2. Kill a harvest part-way, rerun: no duplicates, no losses.
    let many = dir.path().join("many.jsonl");
    let lines: String = (0..16)
        .map(|i| format!("{{\"question\": \"What is {i} + {i}?\"}}\n"))
        .collect();
    std::fs::write(&many, lines).unwrap();
    let out2 = dir.path().join("resume.jsonl");
    let mut child = harvest_cmd(&endpoint, &key, &many, &out2)
        .args(["--max-tokens", "24", "--concurrency", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let have = std::fs::read_to_string(&out2)
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if have >= 3 {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "harvest ended before it could be killed"
        );
        assert!(Instant::now() < deadline, "no records within 300 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let (before, _) = ids(&out2);
    assert!(before < 16, "the harvest finished before the kill");
    let (stdout, _) = run(harvest_cmd(&endpoint, &key, &many, &out2).args([
        "--max-tokens",
        "24",
        "--concurrency",
        "2",
        "--json",
    ]));
    let report = last_json(&stdout);
    assert_eq!(report["existing"], before, "{report}");
    assert_eq!(report["missing"], 0, "{report}");
    let (n, set) = ids(&out2);
    assert_eq!(
        (n, set.len()),
        (16, 16),
        "duplicates or losses after resume"
    );
    drop(server);

    // 3. Train on the harvested set with the KD loss on its top-k: the contract.
    let student = dir.path().join("student");
    let (stdout, _) = run(isotope()
        .args(["distill", "train", "--data"])
        .arg(&out)
        .arg("--out")
        .arg(&student)
        .args([
            "--student",
            "tiny",
            "--loss",
            "kl",
            "--top-k",
            "5",
            "--batch-size",
            "3",
            "--epochs",
            "2",
            "--seq-len",
            "96",
            "--json",
        ]));
    let t = last_json(&stdout);
    for field in ["first_loss", "final_loss", "tokens_per_sec", "params"] {
        assert!(
            t[field].as_f64().is_some_and(f64::is_finite),
            "{field}: {t}"
        );
    }
    assert_eq!(t["steps"], 4, "{t}");
    assert!(t["params"].as_u64().unwrap() > 1_000_000, "{t}");
    // Every harvested line's top-k lined up with the teacher's own tokens.
    assert_eq!(t["examples_with_top_logprobs"], 6, "{t}");
    assert!(student.join("model.safetensors").exists());

    // 4. Eval against the teacher, a little of everything.
    let (stdout, _) = run(isotope()
        .args(["distill", "eval", "--student"])
        .arg(&student)
        .arg("--teacher")
        .arg(model())
        .arg("--data")
        .arg(&out2)
        .args([
            "--limit",
            "3",
            "--answers",
            "1",
            "--answer-max-tokens",
            "8",
            "--on-policy-samples",
            "2",
            "--on-policy-max-tokens",
            "6",
            "--json",
        ]));
    let e = last_json(&stdout);
    assert_eq!(e["examples"], 3, "{e}");
    assert!(e["student_perplexity"].as_f64().unwrap() > 1.0, "{e}");
    let agree = e["top1_agreement"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&agree), "{e}");
    assert!(e["kl_teacher_student"].as_f64().unwrap() >= 0.0, "{e}");
    assert_eq!(e["answers_compared"], 1, "{e}");
    // The student's own samples, scored by the teacher (stopping at <|im_end|> may end
    // a sample early, never make it longer).
    let own = &e["on_policy"];
    assert_eq!(own["samples"], 2, "{e}");
    let own_tokens = own["tokens"].as_u64().unwrap();
    assert!((1..=12).contains(&own_tokens), "{e}");
    assert!(own["kl"].as_f64().unwrap() >= 0.0, "{e}");

    // 5. `generate --model DIR` runs the student.
    let generate = |model: &Path| {
        run(isotope().args(["generate", "--model"]).arg(model).args([
            "--prompt",
            "Name a colour.",
            "--max-tokens",
            "6",
            "--seed",
            "3",
            "--json",
        ]))
    };
    let (stdout, _) = generate(&student);
    let g = last_json(&stdout);
    let toks = g["tokens"].as_array().unwrap();
    assert!(!toks.is_empty() && toks.len() <= 6, "{g}");
    assert!(g["text"].is_string());
    // Seeded sampling through the shared Sampler is reproducible.
    let (again, _) = generate(&student);
    assert_eq!(last_json(&again)["tokens"], g["tokens"]);

    // 6. `distill export` writes a GGUF that llama.cpp runs through `generate`.
    let gguf = dir.path().join("student.gguf");
    let (stdout, _) = run(isotope()
        .args(["distill", "export", "--student"])
        .arg(&student)
        .arg("--out")
        .arg(&gguf)
        .arg("--tokenizer-gguf")
        .arg(model())
        .arg("--json"));
    let x = last_json(&stdout);
    assert_eq!(x["dtype"], "q8_0", "{x}");
    assert_eq!(
        x["bytes"].as_u64(),
        Some(std::fs::metadata(&gguf).unwrap().len())
    );
    assert_eq!(x["params"], t["params"], "{x}");
    assert!(!dir.path().join("student.gguf.part").exists());
    let (stdout, _) = generate(&gguf);
    let n = last_json(&stdout)["tokens"].as_array().map(Vec::len);
    assert!(n.is_some_and(|n| (1..=6).contains(&n)), "{stdout}");
    // Bad input: a directory that holds no student, and an unknown type.
    let o = isotope()
        .args(["distill", "export", "--student"])
        .arg(dir.path())
        .arg("--out")
        .arg(dir.path().join("x.gguf"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("loading the student"), "{err}");
    let o = isotope()
        .args(["distill", "export", "--student"])
        .arg(&student)
        .args(["--out", "x.gguf", "--dtype", "q4"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("q8_0"));
}

#[test]
fn train_refuses_to_overwrite_without_resume() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d.jsonl");
    let lines: String = (0..4)
        .map(|i| format!("{{\"prompt\": \"p{i}\", \"response\": \"r{i} is the answer\"}}\n"))
        .collect();
    std::fs::write(&data, lines).unwrap();
    let out = dir.path().join("s");
    let train = |extra: &[&str]| {
        let mut c = isotope();
        c.args(["distill", "train", "--data"])
            .arg(&data)
            .arg("--out")
            .arg(&out)
            .args(["--max-steps", "2", "--batch-size", "2", "--json"])
            .args(extra);
        c
    };
    let (stdout, _) = run(&mut train(&[]));
    assert_eq!(last_json(&stdout)["steps"], 2);
    let o = train(&[]).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--resume"));
    run(&mut train(&["--resume"]));
}

/// `distill train --teacher GGUF`: a text-only harvest trains with the KD loss on the
/// local teacher's scores, and `--on-policy 1` trains every step on the student's own
/// samples; `--on-policy` without a teacher is refused with what to add.
#[test]
fn train_with_local_teacher_and_on_policy() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d.jsonl");
    let lines: String = [
        "What is 2 + 3?",
        "Name a fruit.",
        "Say hello.",
        "Count to three.",
    ]
    .iter()
    .map(|p| format!("{{\"prompt\": \"{p}\", \"response\": \"Here is my answer.\"}}\n"))
    .collect();
    std::fs::write(&data, lines).unwrap();
    let train = |out: &str, extra: &[&str]| {
        let mut c = isotope();
        c.args(["distill", "train", "--data"])
            .arg(&data)
            .arg("--out")
            .arg(dir.path().join(out))
            .args([
                "--loss",
                "kl",
                "--top-k",
                "5",
                "--epochs",
                "2",
                "--batch-size",
                "2",
                "--threads",
                "1",
                "--json",
            ])
            .args(extra);
        c
    };
    let o = train("a", &["--on-policy", "0.5"]).output().unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--teacher"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let teacher = model();
    let teacher = teacher.to_str().unwrap();
    let (stdout, _) = run(&mut train("b", &["--teacher", teacher]));
    let t = last_json(&stdout);
    assert_eq!(t["steps"], 4, "{t}");
    assert_eq!(t["examples_with_top_logprobs"], 0, "{t}");
    assert_eq!(t["teacher_scored"], 8, "{t}");
    assert_eq!(t["on_policy_steps"], 0, "{t}");
    let (stdout, _) = run(&mut train(
        "c",
        &[
            "--teacher",
            teacher,
            "--on-policy",
            "1",
            "--on-policy-max-tokens",
            "8",
        ],
    ));
    let t = last_json(&stdout);
    assert_eq!(t["on_policy_steps"], 4, "{t}");
    assert!(t["final_loss"].as_f64().is_some_and(f64::is_finite), "{t}");
}
