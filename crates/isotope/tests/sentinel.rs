//! The sentinel end to end: the real `isotope serve` (real model, real SQLite, real
//! HTTP) with the sentinel on, a harvesting-like client and a benign one, a webhook
//! receiver; and the `isotope sentinel simulate → eval` round trip.
//!
//! The server runs the built-in model with its production shapes. Those are
//! calibrated for an online FPR of ~0.05% over days of traffic, so a harvest of tens
//! of requests is — by design — not enough evidence at the production threshold
//! (0.92): the built-in model needs persistence or volume (measured with the built-in
//! model on synthetic events shaped like this test's clients, `isotope-sentinel`'s
//! `asking_for_soft_labels_never_lowers_the_score`: 80 templated requests with top-20
//! logprobs score 0.005). The test's isotope.toml therefore lowers `flag_threshold`
//! to 0.03 (throttle follows at its fixed logit step, ≈ 0.078); on the real server the
//! harvester reached throttle after 155 requests (timing dependent: the rates count),
//! so it gets up to 400.
//! What this test checks is the online machinery — events reach the sentinel, levels
//! are enforced from the next request, alerts and webhook, pins — not the model's
//! accuracy, which `isotope sentinel eval` measures on ≥ 1,000 benign accounts.
//! `min_requests = 5` is the production value.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{isotope, run_ok, workspace};
use serde_json::{json, Value};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The server on a fixed address, not waited for: the test watches `/health` answer
/// 503 while the model loads.
fn spawn_server(config: &std::path::Path, addr: &str) -> common::Server {
    common::spawn(
        common::serve_cmd()
            .arg("--config")
            .arg(config)
            .args(["--addr", addr, "--threads", "1"])
            .env("ISOTOPE_LOG", "isotope_server=info,warn"),
    )
}

/// A tiny webhook receiver: every POSTed JSON body is kept.
async fn webhook_receiver() -> (String, Arc<Mutex<Vec<Value>>>) {
    use axum::routing::post;
    let got: Arc<Mutex<Vec<Value>>> = Arc::default();
    let g = Arc::clone(&got);
    let app = axum::Router::new().route(
        "/hook",
        post(move |axum::Json(v): axum::Json<Value>| {
            let g = Arc::clone(&g);
            async move {
                g.lock().unwrap().push(v);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, got)
}

/// Varied human-written instructions (self-instruct), for the benign client.
fn human_prompts(n: usize) -> Vec<String> {
    let text = std::fs::read_to_string(
        workspace().join("data/self-instruct/user_oriented_instructions.jsonl"),
    )
    .unwrap();
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["instruction"].as_str().map(str::to_owned))
        .step_by(17)
        .take(n)
        .collect()
}

struct Outcome {
    status: u16,
    body: Value,
}

async fn chat(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    ip: &str,
    ua: &str,
    body: Value,
) -> Outcome {
    let r = http
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .header("x-forwarded-for", ip)
        .header("user-agent", ua)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body = r.json::<Value>().await.unwrap_or(Value::Null);
    Outcome { status, body }
}

async fn alerts(http: &reqwest::Client, base: &str) -> Vec<Value> {
    let v: Value = http
        .get(format!("{base}/admin/alerts"))
        .bearer_auth("admintest")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["data"].as_array().cloned().unwrap_or_default()
}

/// Whether every log-prob in a response is a multiple of 0.1: the throttle level's
/// default treatment (`logprob_decimals = 1`; served as f32, hence the 1e-4 slack).
/// Hundreds of unrounded top-20 values
/// all landing on the grid by chance is impossible.
fn logprobs_rounded(body: &Value) -> bool {
    let Some(content) = body["choices"][0]["logprobs"]["content"].as_array() else {
        return false;
    };
    let mut values = Vec::new();
    for t in content {
        values.push(t["logprob"].as_f64().unwrap_or(f64::NAN));
        for alt in t["top_logprobs"].as_array().into_iter().flatten() {
            values.push(alt["logprob"].as_f64().unwrap_or(f64::NAN));
        }
    }
    !values.is_empty()
        && values
            .iter()
            .all(|v| (v * 10.0 - (v * 10.0).round()).abs() < 1e-4)
}

// The harvester asks for answers of 64 tokens with top-20 logprobs, as fast as the
// server answers: a soft-label harvest in its first minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harvester_is_flagged_and_throttled_while_benign_client_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_owned();
    let (hook_url, hooks) = webhook_receiver().await;
    let config = dir.path().join("isotope.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {data:?}\nadmin_token = \"admintest\"\ntrust_forwarded_for = true\n\
             [sentinel]\nflag_threshold = 0.03\nmin_requests = 5\nwebhook_url = {hook_url:?}\nwebhook_retries = 1\n"
        ),
    )
    .unwrap();
    let create = |account: &str| {
        let out = run_ok(
            isotope()
                .args(["keys", "create", "--account", account, "--config"])
                .arg(&config),
        );
        out.lines().last().unwrap().trim().to_owned()
    };
    let harvest_key = create("harvester");
    let benign_key = create("benign");

    let addr = format!("127.0.0.1:{}", free_port());
    let base = format!("http://{addr}");
    let server = spawn_server(&config, &addr);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();

    // /health: 503 while loading (the listener is up before the model is), then 200;
    // the clients start once the sentinel has its model and has replayed the store.
    let start = Instant::now();
    let mut saw_loading = false;
    loop {
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "server not healthy in 180 s:\n{}",
            server.log.lock().unwrap()
        );
        match http.get(format!("{base}/health")).send().await {
            Ok(r) if r.status() == 503 => saw_loading = true,
            Ok(r) if r.status() == 200 => {
                let v: Value = r.json().await.unwrap();
                if v["sentinel"] == "ready" {
                    break;
                }
            }
            Ok(r) => panic!("/health answered {}", r.status()),
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(saw_loading, "/health never answered 503 while loading");
    eprintln!("server ready after {:.1}s", start.elapsed().as_secs_f64());

    // The benign client: varied human instructions at its own pace, one asking for a
    // couple of logprobs (developers do).
    let prompts = human_prompts(8);
    let ua_benign = "Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0";
    for (i, p) in prompts.iter().enumerate().take(4) {
        let o = chat(
            &http,
            &base,
            &benign_key,
            "192.168.7.20",
            ua_benign,
            json!({"model": "SmolLM2-135M-Instruct.Q4_1", "max_tokens": 8,
                   "messages": [{"role": "user", "content": p}], "seed": i}),
        )
        .await;
        assert_eq!(o.status, 200, "{}", o.body);
    }

    // The harvester: templated topic sweep, always top-20 logprobs, as fast as it can.
    let topics = [
        "photosynthesis",
        "the French revolution",
        "binary search",
        "inflation",
        "volcanoes",
        "the immune system",
        "supply chains",
        "prime numbers",
        "plate tectonics",
        "jazz",
        "neural networks",
        "the water cycle",
        "game theory",
        "black holes",
        "vaccines",
        "compound interest",
        "the Roman empire",
        "climate change",
        "DNA replication",
        "gravity",
    ];
    let ua_bot = "python-requests/2.31.0";
    let mut throttled_at = None;
    let mut degraded_at = None;
    let mut blocked_at = None;
    let mut sent = 0;
    for i in 0..400usize {
        let topic = topics[i % topics.len()];
        let o = chat(
            &http,
            &base,
            &harvest_key,
            "10.9.8.7",
            ua_bot,
            json!({"model": "SmolLM2-135M-Instruct.Q4_1", "max_tokens": 64,
                   "logprobs": true, "top_logprobs": 20, "temperature": 1.0,
                   "messages": [{"role": "user", "content":
                       format!("Explain {topic} in detail. Give a thorough, step by step answer with examples. Variant {i}.")}]}),
        )
        .await;
        sent += 1;
        if i % 10 == 0 {
            eprintln!("harvester request {i}: {}", o.status);
        }
        match o.status {
            200 => {
                let lp = &o.body["choices"][0]["logprobs"];
                if lp.is_null() && degraded_at.is_none() {
                    degraded_at = Some(i);
                }
                if logprobs_rounded(&o.body) && throttled_at.is_none() {
                    throttled_at = Some(i);
                }
            }
            403 | 429 => {
                blocked_at = Some(i);
                break;
            }
            s => panic!("harvester got {s}: {}", o.body),
        }
        if throttled_at.or(degraded_at).is_some_and(|d| i >= d + 3) {
            break;
        }
    }
    assert!(
        throttled_at.is_some() || degraded_at.is_some() || blocked_at.is_some(),
        "the harvester was neither throttled, degraded nor blocked in {sent} requests:\n{}",
        server.log.lock().unwrap()
    );

    // The benign client still gets everything, logprobs included.
    for (i, p) in prompts.iter().enumerate().skip(4) {
        let o = chat(
            &http,
            &base,
            &benign_key,
            "192.168.7.20",
            ua_benign,
            json!({"model": "SmolLM2-135M-Instruct.Q4_1", "max_tokens": 8,
                   "logprobs": true, "top_logprobs": 2,
                   "messages": [{"role": "user", "content": p}], "seed": i}),
        )
        .await;
        assert_eq!(o.status, 200, "benign client refused: {}", o.body);
        assert!(
            o.body["choices"][0]["logprobs"]["content"].is_array(),
            "benign client lost its logprobs: {}",
            o.body
        );
        assert!(
            !logprobs_rounded(&o.body),
            "benign client's logprobs were rounded (throttled): {}",
            o.body
        );
    }

    // Alerts: the harvester's, with reasons and cluster; none for the benign account.
    let mut list = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        list = alerts(&http, &base).await;
        if !list.is_empty() && !hooks.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let harvester_alerts: Vec<&Value> = list
        .iter()
        .filter(|a| a["reasons"]["cluster"]["size"].is_number())
        .filter(|a| {
            a["api_key_id"]
                .as_str()
                .is_some_and(|k| harvest_key.contains(&k[3..]))
        })
        .collect();
    assert!(
        !harvester_alerts.is_empty(),
        "no alert for the harvester: {list:#?}"
    );
    let top = harvester_alerts.last().unwrap();
    assert!(
        ["throttle", "degrade", "block"].contains(&top["level"].as_str().unwrap()),
        "{top}"
    );
    assert!(
        !top["reasons"]["features"].as_array().unwrap().is_empty(),
        "alert without reasons: {top}"
    );
    let harvester_account = top["account_id"].as_i64().unwrap();
    assert!(
        list.iter()
            .all(|a| a["account_id"].as_i64() == Some(harvester_account)),
        "an alert names another account (the benign one?): {list:#?}"
    );
    // Without auth the alerts stay closed.
    let r = http
        .get(format!("{base}/admin/alerts"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // The webhook got the alerts.
    let got = hooks.lock().unwrap().clone();
    assert!(!got.is_empty(), "webhook received nothing");
    assert!(
        got.iter()
            .all(|v| v["alert"]["account_id"].as_i64() == Some(harvester_account)),
        "{got:#?}"
    );

    // Metrics.
    let m = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "isotope_sentinel_events_total",
        "isotope_sentinel_accounts",
        "isotope_sentinel_level_changes_total",
        "isotope_sentinel_observe_seconds",
        "isotope_sentinel_webhook_sent_total",
    ] {
        assert!(m.contains(name), "/metrics lacks {name}");
    }

    // An operator pins the harvester back to observe: served normally again.
    let list_keys: Value = serde_json::from_str(&run_ok(
        isotope()
            .args(["keys", "list", "--json", "--config"])
            .arg(&config),
    ))
    .unwrap();
    let hk = list_keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["account_name"] == "harvester")
        .unwrap()["key_id"]
        .as_str()
        .unwrap()
        .to_owned();
    run_ok(
        isotope()
            .args(["keys", "set-level", &hk, "pin:observe", "--config"])
            .arg(&config),
    );
    let o = chat(
        &http,
        &base,
        &harvest_key,
        "10.9.8.7",
        ua_bot,
        json!({"model": "SmolLM2-135M-Instruct.Q4_1", "max_tokens": 4,
               "logprobs": true, "top_logprobs": 20,
               "messages": [{"role": "user", "content": "Explain tides."}]}),
    )
    .await;
    assert_eq!(o.status, 200, "{}", o.body);
    assert!(
        o.body["choices"][0]["logprobs"]["content"].is_array() && !logprobs_rounded(&o.body),
        "a pinned harvester is still treated: {}",
        o.body
    );
    eprintln!(
        "harvester: {sent} requests, throttled at {throttled_at:?}, degraded at {degraded_at:?}, \
         blocked at {blocked_at:?}; \
         {} alerts",
        list.len()
    );
    drop(server);
}

#[test]
fn simulate_then_eval_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let out = run_ok(
        isotope()
            .args([
                "sentinel", "simulate", "--json", "--seed", "7", "--scale", "0.05", "--out",
            ])
            .arg(&events),
    );
    let sim: Value = serde_json::from_str(out.trim()).unwrap();
    assert!(sim["events"].as_u64().unwrap() > 1000, "{sim}");
    assert!(
        sim["accounts_per_label"]["benign"].as_u64().unwrap() > 20,
        "{sim}"
    );
    let lines = std::fs::read_to_string(&events).unwrap();
    assert_eq!(
        lines.lines().count() as u64,
        sim["events"].as_u64().unwrap()
    );

    let out = run_ok(
        isotope()
            .args(["sentinel", "eval", "--json", "--events"])
            .arg(&events),
    );
    let r: Value = serde_json::from_str(out.trim()).unwrap();
    for k in ["tpr", "fpr", "fpr_upper95", "auc", "per_strategy"] {
        assert!(!r[k].is_null(), "eval JSON lacks {k}: {r}");
    }
    assert_eq!(r["events"], sim["events"]);
    assert!(r["tpr"].as_f64().unwrap() >= 0.8, "{r}");
    assert!(r["fpr_upper95"].as_f64().unwrap() >= r["fpr"].as_f64().unwrap());
    for s in ["bulk", "sybil", "slow_low"] {
        assert!(
            r["per_strategy"][s]["accounts"].as_u64().unwrap() > 0,
            "{r}"
        );
    }

    // The shipped example scenario parses and simulates.
    let ex = dir.path().join("example.jsonl");
    let out = run_ok(
        isotope()
            .args([
                "sentinel",
                "simulate",
                "--json",
                "--scale",
                "0.2",
                "--scenario",
            ])
            .arg(workspace().join("examples/sentinel-scenario.toml"))
            .arg("--out")
            .arg(&ex),
    );
    let sim: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(sim["scenario"], "example_smallx0.2");

    // Errors say what to fix, without panicking.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{not json\n").unwrap();
    let out = isotope()
        .args(["sentinel", "eval", "--events"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 1") && !err.contains("panicked"), "{err}");
}

/// `sentinel simulate --send`: the simulated events go to a real server as real
/// requests, one account and key per simulated account, and what came back is
/// reported per label; the server's store then holds that traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulate_sends_its_traffic_to_a_running_server() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_owned();
    let config = dir.path().join("isotope.toml");
    std::fs::write(
        &config,
        format!("data_dir = {data:?}\nadmin_token = \"admintest\"\ntrust_forwarded_for = true\n"),
    )
    .unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let base = format!("http://{addr}");
    let server = spawn_server(&config, &addr);
    let http = reqwest::Client::new();
    let start = Instant::now();
    loop {
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "server not healthy in 180 s:\n{}",
            server.log.lock().unwrap()
        );
        if let Ok(r) = http.get(format!("{base}/health")).send().await {
            if r.status() == 200 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let events = dir.path().join("events.jsonl");
    let limit = 60;
    let mut cmd = isotope();
    cmd.args([
        "sentinel",
        "simulate",
        "--json",
        "--scale",
        "0.2",
        "--scenario",
    ])
    .arg(workspace().join("examples/sentinel-scenario.toml"))
    .arg("--out")
    .arg(&events)
    .args(["--send", &base, "--speed", "0", "--concurrency", "3"])
    .args([
        "--max-tokens",
        "2",
        "--limit",
        &limit.to_string(),
        "--config",
    ])
    .arg(&config);
    let out = tokio::task::spawn_blocking(move || run_ok(&mut cmd))
        .await
        .unwrap();
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    let live = &v["live"];
    assert_eq!(live["requests"], limit, "{v}");
    // `limit` events spread over the accounts — every account's first request, then
    // every account's second, … — from the file the command wrote
    let mut evs: Vec<Value> = std::fs::read_to_string(&events)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .collect();
    evs.sort_by_key(|e| e["event"]["created_at_ms"].as_i64().unwrap());
    let mut rank = std::collections::HashMap::new();
    let mut ranked: Vec<(usize, Value)> = evs
        .into_iter()
        .map(|e| {
            let r = rank
                .entry(e["event"]["account_id"].as_i64().unwrap())
                .or_insert(0);
            *r += 1;
            (*r, e)
        })
        .collect();
    ranked.sort_by_key(|(r, _)| *r);
    let all_accounts = rank.len();
    let evs: Vec<Value> = ranked.into_iter().take(limit).map(|(_, e)| e).collect();
    let accounts: std::collections::BTreeSet<i64> = evs
        .iter()
        .map(|e| e["event"]["account_id"].as_i64().unwrap())
        .collect();
    assert_eq!(
        live["accounts"].as_object().unwrap().len(),
        accounts.len(),
        "{v}"
    );
    // the scenario has fewer accounts than the limit: every one of them sent
    assert!(all_accounts <= limit, "{all_accounts} accounts");
    assert_eq!(accounts.len(), all_accounts, "{v}");
    let (mut sent, mut ok) = (0, 0);
    for (label, o) in live["per_label"].as_object().unwrap() {
        let n = o["requests"].as_u64().unwrap();
        let parts: u64 = ["ok", "rate_limited", "blocked", "other"]
            .iter()
            .map(|k| o[k].as_u64().unwrap())
            .sum();
        assert_eq!(parts, n, "{label}: {o}");
        let want = evs.iter().filter(|e| e["label"] == *label).count() as u64;
        assert_eq!(n, want, "{label}: {o}");
        sent += n;
        ok += o["ok"].as_u64().unwrap();
    }
    assert_eq!(sent, limit as u64);
    assert!(ok >= limit as u64 / 2, "most requests answered: {v}");

    // the server stored the traffic under the new accounts
    let db = format!("sqlite://{data}/isotope.db");
    let out = run_ok(isotope().args(["sentinel", "score", "--json", "--db", &db]));
    let s: Value = serde_json::from_str(out.trim()).unwrap();
    assert!(s["events"].as_u64().unwrap() >= ok, "{s}");
    assert_eq!(
        s["accounts"].as_u64().unwrap(),
        accounts.len() as u64,
        "{s}"
    );

    // a server that is not there is a clear error
    let out = isotope()
        .args(["sentinel", "simulate", "--scale", "0.05", "--out"])
        .arg(dir.path().join("x.jsonl"))
        .args(["--send", "http://127.0.0.1:9", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach") && !err.contains("panicked"),
        "{err}"
    );
    drop(server);
}
