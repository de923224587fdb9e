//! `isotope redteam` end to end on a tiny configuration: the real model served twice
//! in-process (watermarked with the sentinel on, and plain), real HTTP harvests, two
//! candle students, audits, and the report files. Sizes are far too small for the
//! watermarked student to be detectable; what is checked is the pipeline, the report's
//! contract, the control's null result and resuming.

use std::path::PathBuf;
use std::process::Command as StdCommand;

use assert_cmd::cargo::CommandCargoExt;
use serde_json::Value;

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn isotope() -> StdCommand {
    let mut c = StdCommand::cargo_bin("isotope").unwrap();
    for var in ["ISOTOPE_MODEL", "ISOTOPE_WATERMARK_KEY", "ISOTOPE_THREADS"] {
        c.env_remove(var);
    }
    c.current_dir(workspace());
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

#[test]
fn redteam_help() {
    let (code, stdout, _) = run(isotope().args(["redteam", "--help"]));
    assert_eq!(code, 0);
    for flag in [
        "--out",
        "--prompts",
        "--harvest-minutes",
        "--max-tokens",
        "--student",
        "--epochs",
        "--price-per-million-tokens",
        "--config",
    ] {
        assert!(stdout.contains(flag), "{flag} missing: {stdout}");
    }
    // A time limit that is not a number of minutes is refused with what to pass.
    let (code, _, stderr) = run(isotope().args(["redteam", "--harvest-minutes=ten"]));
    assert_eq!(code, 2);
    assert!(stderr.contains("minutes"), "{stderr}");
}

#[test]
fn redteam_tiny_end_to_end_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    // Part of the configuration from a file, the rest from flags (flags win).
    let config = dir.path().join("redteam.toml");
    std::fs::write(
        &config,
        "benign_accounts = 1\nbenign_requests = 2\nheldout_prompts = 3\nprompts = 99\n\
         audit_temperature = 0.5\n",
    )
    .unwrap();
    let args = |cmd: &mut StdCommand| {
        cmd.args(["redteam", "--json", "--out"])
            .arg(&out)
            .arg("--config")
            .arg(&config)
            .args([
                "--prompts",
                "6",
                "--max-tokens",
                "32",
                "--heldout-max-tokens",
                "24",
            ])
            .args(["--epochs", "1", "--seq-len", "96", "--checkpoints", "2"])
            .args(["--audit-texts", "6", "--threads", "1", "--slots", "2"])
            .args(["--price-per-million-tokens", "2.5", "--mixes", "0.5"]);
    };
    let mut cmd = isotope();
    args(&mut cmd);
    let (code, stdout, stderr) = run(&mut cmd);
    assert_eq!(code, 0, "{stderr}");
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();

    for f in ["report.html", "report.json", "watermark.key"] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert_eq!(
        html.matches("<svg").count(),
        4,
        "four plots (one for the mixture)"
    );
    assert!(html.contains("mix-50"), "the mixture has a row");
    assert!(html.contains("h = 1"), "the report states the window");
    assert!(
        html.contains("sampled at temperature 0.5"),
        "the report states the black-box answers' temperature"
    );
    let file: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(file["arms"], v["arms"]);

    assert_eq!(v["window"], 1);
    assert_eq!(v["config"]["prompts"], 6, "flags win over the file");
    assert_eq!(v["config"]["benign_accounts"], 1, "the file is read");
    assert_eq!(v["config"]["audit_temperature"], 0.5);
    assert_eq!(v["arms"][0]["arm"], "watermarked");
    assert_eq!(v["arms"][1]["arm"], "control");
    for arm in v["arms"].as_array().unwrap() {
        assert_eq!(arm["harvest"]["records"], 6, "{arm}");
        let s = &arm["student"];
        assert_eq!(s["points"].as_array().unwrap().len(), 2, "{s}");
        // the final reading audit is the last stage's (a resumed run recomputes it:
        // checked equal below)
        assert_eq!(s["points"][1]["p_value"], s["reading"]["p_value"], "{s}");
        assert!(!s["loss_curve"].as_array().unwrap().is_empty());
        for audit in ["reading", "black_box"] {
            let a = &s[audit];
            assert!(a["p_value"].as_f64().is_some(), "{a}");
            assert!(a["scored_tokens"].as_u64().unwrap() > 0, "{a}");
        }
        let names: Vec<&str> = s["reading"]["variants"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["unsupervised", "supervised"]);
    }
    // The unsupervised reading reads new watermarked answers to the held-out prompts,
    // asked by the provider outside the harvest: not in any training set, not in the
    // sentinel's timeline.
    let fresh = std::fs::read_to_string(out.join("watermarked/fresh.jsonl")).unwrap();
    assert_eq!(fresh.lines().count(), 3, "{fresh}");
    let harvested: Vec<Value> = std::fs::read_to_string(out.join("watermarked/harvest.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for l in fresh.lines() {
        let r: Value = serde_json::from_str(l).unwrap();
        assert!(!r["response"].as_str().unwrap().is_empty(), "{r}");
        assert!(harvested.iter().all(|h| h["prompt"] != r["prompt"]), "{r}");
    }
    assert!(
        !v["sentinel"].to_string().contains("auditor"),
        "{}",
        v["sentinel"]
    );
    // The mixture: half the prompts answered by each teacher, same ids as the arms.
    let mix = &v["mixes"][0];
    assert_eq!(mix["name"], "mix-50", "{mix}");
    assert_eq!(mix["examples"], 6, "{mix}");
    assert_eq!(mix["watermarked_examples"], 3, "{mix}");
    assert_eq!(mix["student"]["points"].as_array().unwrap().len(), 2);
    // Its supervised reading reads the answers we served to its harvester (its three
    // watermarked ones); the diluted reading every answer the watermarked arm served.
    for p in mix["student"]["points"].as_array().unwrap() {
        assert_eq!(p["supervised_texts"], 3, "{p}");
    }
    for p in v["arms"][0]["student"]["points"].as_array().unwrap() {
        assert_eq!(p["supervised_texts"], 6, "{p}");
    }
    let sup_tuples = |r: &Value| {
        r["variants"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == "supervised")
            .map(|x| x["per_key"][0]["scored_tokens"].as_u64().unwrap())
            .unwrap()
    };
    let diluted = &mix["diluted_reading"];
    assert!(
        sup_tuples(diluted) > sup_tuples(&mix["student"]["reading"]),
        "{diluted}"
    );
    let lines = |arm: &str| -> Vec<Value> {
        std::fs::read_to_string(out.join(arm).join("harvest.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (wm, ctl, mixed) = (lines("watermarked"), lines("control"), lines("mix-50"));
    assert_eq!(mixed.len(), 6);
    let from = |set: &[Value], r: &Value| {
        set.iter()
            .any(|x| x["id"] == r["id"] && x["response"] == r["response"])
    };
    let n_wm = mixed.iter().filter(|r| from(&wm, r)).count();
    assert!(mixed.iter().all(|r| from(&wm, r) || from(&ctl, r)));
    // (A watermarked and a control answer can coincide only if both are identical.)
    assert!(
        n_wm >= 3,
        "{n_wm} of the mixture's answers are the watermarked teacher's"
    );

    // The control student never saw the key: its audits are not significant.
    let control = &v["arms"][1]["student"];
    assert!(
        control["reading"]["p_value"].as_f64().unwrap() > 1e-3,
        "{control}"
    );
    assert!(
        control["black_box"]["p_value"].as_f64().unwrap() > 1e-3,
        "{control}"
    );

    // Sentinel and cost: the harvester and the benign account are in the timeline,
    // and the cost is the harvester's billed tokens at the price.
    let accounts: Vec<&str> = v["sentinel"]["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["account"].as_str().unwrap())
        .collect();
    assert!(accounts.contains(&"harvester-1"), "{accounts:?}");
    assert!(accounts.contains(&"benign-1"), "{accounts:?}");
    let cost = &v["cost"];
    let tokens =
        cost["prompt_tokens"].as_u64().unwrap() + cost["completion_tokens"].as_u64().unwrap();
    assert!(tokens > 6 * 20, "{cost}");
    assert!((cost["total"].as_f64().unwrap() - tokens as f64 * 2.5 / 1e6).abs() < 1e-12);

    // A rerun resumes: no harvest again (same records), same training result.
    let mut cmd = isotope();
    args(&mut cmd);
    let (code, stdout, stderr) = run(&mut cmd);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("harvest already done"), "{stderr}");
    let again: Value = serde_json::from_str(stdout.trim()).unwrap();
    for i in 0..2 {
        assert_eq!(again["arms"][i]["harvest"], v["arms"][i]["harvest"]);
        assert_eq!(
            again["arms"][i]["student"]["points"],
            v["arms"][i]["student"]["points"]
        );
        assert_eq!(
            again["arms"][i]["student"]["reading"]["p_value"],
            v["arms"][i]["student"]["reading"]["p_value"]
        );
    }
    assert_eq!(
        again["mixes"][0]["student"]["points"],
        mix["student"]["points"]
    );

    // A rerun that asks for other settings than the kept work's is refused, naming
    // them, and leaves the run as it was.
    let report = std::fs::read_to_string(out.join("report.json")).unwrap();
    let mut cmd = isotope();
    args(&mut cmd);
    let (code, _, stderr) = run(cmd.args(["--lr", "0.002"]));
    assert_ne!(code, 0);
    assert!(
        stderr.contains("lr 0.001 → 0.002") && stderr.contains("--out"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("report.json")).unwrap(),
        report
    );

    // Bad input: a mixture share outside (0, 1) is refused before anything runs.
    let (code, _, stderr) = run(isotope()
        .args(["redteam", "--mixes", "0.25,1.5", "--out"])
        .arg(dir.path().join("bad-mix")));
    assert_ne!(code, 0);
    assert!(stderr.contains("mix fraction"), "{stderr}");
    let (code, _, stderr) = run(isotope()
        .args(["redteam", "--audit-temperature=-1", "--out"])
        .arg(dir.path().join("bad-temperature")));
    assert_ne!(code, 0);
    assert!(stderr.contains("audit_temperature"), "{stderr}");

    // Bad input: a missing teacher model is a clear error.
    let (code, _, stderr) = run(isotope()
        .args(["redteam", "--model", "/nonexistent/model.gguf", "--out"])
        .arg(dir.path().join("other")));
    assert_ne!(code, 0);
    assert!(stderr.contains("/nonexistent/model.gguf"), "{stderr}");
}
