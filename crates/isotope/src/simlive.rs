//! `isotope sentinel simulate --send URL`: the simulated traffic as real requests
//! against a running `isotope serve`.
//!
//! Every simulated account gets its own account and API key in the server's store
//! (the same store the server uses, opened through the usual config/env/flags), then
//! the events go out in time order, paced by `--speed` (simulated time runs that many
//! times faster than wall time; 0 sends as fast as `--concurrency` allows), each one
//! rebuilt as the OpenAI request it stands for: same messages or prompt, `n`,
//! `logprobs`/`top_logprobs`, `temperature`, `user`, User-Agent and — for a server
//! with `trust_forwarded_for` — the simulated client address as `X-Forwarded-For`.
//! `max_tokens` is capped by `--max-tokens` because a real model generates every
//! token (the default cap keeps a few hundred requests to minutes on a CPU).
//!
//! The server's sentinel then sees the traffic as it would see real clients; at the
//! end the store's alerts are read back and reported per label, next to what each
//! label's requests got (2xx, 429 rate-limited, 403 blocked, other).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use isotope_sentinel::Simulated;
use isotope_store::{KeyLimits, UsageEvent};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

/// How to send.
pub struct Live {
    /// Server base URL (`http://127.0.0.1:8080`).
    pub url: String,
    /// Simulated-time speed-up; 0: no pacing.
    pub speed: f64,
    /// Requests in flight at most.
    pub concurrency: usize,
    /// Cap on every request's `max_tokens`.
    pub max_tokens: u32,
    /// Send at most this many events, spread over the accounts (see [`spread`]).
    pub limit: Option<usize>,
    /// Model id to send (default: ask `/v1/models`).
    pub model: Option<String>,
}

/// Per label, what happened.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LabelOutcome {
    /// Accounts that sent at least one request.
    pub accounts: usize,
    /// Requests sent.
    pub requests: usize,
    /// 2xx answers.
    pub ok: usize,
    /// 429 answers (rate limits, quotas).
    pub rate_limited: usize,
    /// 403 answers (blocked).
    pub blocked: usize,
    /// Anything else, including transport errors.
    pub other: usize,
    /// Accounts with an alert at `flag` or above in the store afterwards.
    pub flagged_accounts: usize,
}

/// The report of a live run.
#[derive(Clone, Debug, Serialize)]
pub struct LiveReport {
    pub url: String,
    pub model: String,
    pub requests: usize,
    pub seconds: f64,
    pub per_label: BTreeMap<String, LabelOutcome>,
    /// Server account name of each simulated account id.
    pub accounts: BTreeMap<i64, String>,
}

/// The request an event stands for: (path, body).
fn request_of(ev: &UsageEvent, model: &str, cap: u32) -> Result<(&'static str, Value)> {
    let prompt = ev
        .prompt_text
        .as_deref()
        .context("event without prompt text")?;
    let max_tokens = ev
        .max_tokens
        .unwrap_or(ev.completion_tokens.max(1))
        .clamp(1, cap.max(1));
    let mut body = json!({ "model": model, "max_tokens": max_tokens });
    let chat = ev.endpoint.ends_with("/chat/completions");
    if chat {
        let messages: Value = serde_json::from_str(prompt)
            .with_context(|| format!("event {}: chat prompt is not JSON", ev.request_id))?;
        body["messages"] = messages;
        if ev.logprobs || ev.top_logprobs.is_some() {
            body["logprobs"] = json!(true);
        }
        if let Some(k) = ev.top_logprobs {
            body["top_logprobs"] = json!(k);
        }
    } else {
        body["prompt"] = json!(prompt);
        if let Some(k) = ev.top_logprobs {
            body["logprobs"] = json!(k);
        } else if ev.logprobs {
            body["logprobs"] = json!(0);
        }
    }
    if ev.n > 1 {
        body["n"] = json!(ev.n);
    }
    if let Some(t) = ev.temperature {
        body["temperature"] = json!(t);
    }
    if let Some(u) = &ev.user {
        body["user"] = json!(u);
    }
    Ok((
        if chat {
            "/v1/chat/completions"
        } else {
            "/v1/completions"
        },
        body,
    ))
}

/// Creates the accounts, sends the events, reads the alerts back.
pub async fn send(
    sim: &Simulated,
    store: Arc<dyn isotope_store::Store>,
    live: &Live,
) -> Result<LiveReport> {
    if !(live.speed >= 0.0 && live.speed.is_finite()) {
        bail!(
            "--speed must be 0 (no pacing) or a positive number, got {}",
            live.speed
        );
    }
    if live.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let base = live.url.trim_end_matches('/').to_owned();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .context("building the HTTP client")?;
    // the server must be there before accounts are created for it
    http.get(format!("{base}/health"))
        .send()
        .await
        .with_context(|| format!("cannot reach {base} (is `isotope serve` running?)"))?;
    let mut events: Vec<&UsageEvent> = sim.events.iter().collect();
    events.sort_by_key(|e| e.created_at_ms);
    if let Some(n) = live.limit {
        events = spread(events, n);
    }
    if events.is_empty() {
        bail!("no events to send");
    }

    let label_of = |account: i64| {
        sim.labels
            .get(&account)
            .cloned()
            .unwrap_or_else(|| "unlabelled".into())
    };
    // one account and key per simulated account
    let run = isotope_server::auth::now_ms();
    let mut tokens: HashMap<i64, String> = HashMap::new();
    let mut accounts = BTreeMap::new();
    let mut server_label: HashMap<i64, String> = HashMap::new();
    for e in &events {
        if tokens.contains_key(&e.account_id) {
            continue;
        }
        let label = label_of(e.account_id);
        let name = format!("sim-{run}-{label}-{}", e.account_id);
        let key = store
            .create_api_key(&name, KeyLimits::default())
            .await
            .with_context(|| format!("creating an API key for {name}"))?;
        server_label.insert(key.record.account_id, label);
        accounts.insert(e.account_id, name);
        tokens.insert(e.account_id, key.token);
    }

    let model = match &live.model {
        Some(m) => m.clone(),
        None => {
            let any_key = tokens.values().next().expect("at least one account");
            let r = http
                .get(format!("{base}/v1/models"))
                .bearer_auth(any_key)
                .send()
                .await
                .with_context(|| format!("cannot reach {base} (is `isotope serve` running?)"))?;
            let status = r.status();
            let v: Value = r.json().await.context("/v1/models did not answer JSON")?;
            match v["data"][0]["id"].as_str() {
                Some(id) => id.to_owned(),
                None => bail!(
                    "{base}/v1/models answered {status} without a model ({v}); is the store \
                     (--config/--database-url) the one this server uses? Or pass --send-model"
                ),
            }
        }
    };
    let pb = ProgressBar::new(events.len() as u64).with_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} requests sent {per_sec} (eta {eta})")
            .expect("static template"),
    );
    let sem = Arc::new(Semaphore::new(live.concurrency));
    let t0 = Instant::now();
    let first_ms = events[0].created_at_ms;
    let mut tasks = Vec::with_capacity(events.len());
    for e in &events {
        if live.speed > 0.0 {
            let due = Duration::from_secs_f64(
                (e.created_at_ms - first_ms).max(0) as f64 / 1000.0 / live.speed,
            );
            if let Some(wait) = due.checked_sub(t0.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        let (path, body) = request_of(e, &model, live.max_tokens)?;
        let permit = sem.clone().acquire_owned().await.expect("semaphore open");
        let mut req = http
            .post(format!("{base}{path}"))
            .bearer_auth(&tokens[&e.account_id])
            .json(&body);
        if let Some(ua) = &e.user_agent {
            req = req.header(reqwest::header::USER_AGENT, ua);
        }
        if let Some(addr) = &e.client_addr {
            req = req.header("x-forwarded-for", addr);
        }
        let label = label_of(e.account_id);
        let account = e.account_id;
        let pb = pb.clone();
        tasks.push(tokio::spawn(async move {
            let status = match req.send().await {
                Ok(r) => {
                    let s = r.status().as_u16();
                    // read the whole answer: the server logs the event when it is done
                    let _ = r.bytes().await;
                    s
                }
                Err(_) => 0,
            };
            drop(permit);
            pb.inc(1);
            (label, account, status)
        }));
    }
    let mut per_label: BTreeMap<String, LabelOutcome> = BTreeMap::new();
    let mut seen: HashMap<String, std::collections::HashSet<i64>> = HashMap::new();
    for t in tasks {
        let (label, account, status) = t.await.context("a request task failed")?;
        let o = per_label.entry(label.clone()).or_default();
        o.requests += 1;
        match status {
            200..=299 => o.ok += 1,
            429 => o.rate_limited += 1,
            403 => o.blocked += 1,
            _ => o.other += 1,
        }
        seen.entry(label).or_default().insert(account);
    }
    pb.finish_and_clear();
    let seconds = t0.elapsed().as_secs_f64();
    for (label, accs) in &seen {
        per_label.get_mut(label).expect("counted above").accounts = accs.len();
    }
    // give the sentinel a moment to fold the last events in, then read the alerts
    tokio::time::sleep(Duration::from_secs(2)).await;
    let alerts = store
        .list_alerts(run - 1, 100_000)
        .await
        .context("reading the alerts back")?;
    let mut flagged: HashMap<&str, std::collections::HashSet<i64>> = HashMap::new();
    for a in &alerts {
        let Some(id) = a.account_id else { continue };
        let Some(label) = server_label.get(&id) else {
            continue;
        };
        if a.level != "observe" {
            flagged.entry(label.as_str()).or_default().insert(id);
        }
    }
    for (label, o) in per_label.iter_mut() {
        o.flagged_accounts = flagged.get(label.as_str()).map_or(0, |s| s.len());
    }
    Ok(LiveReport {
        url: base,
        model,
        requests: events.len(),
        seconds,
        per_label,
        accounts,
    })
}

/// At most `n` of `events` (in time order): every account's first request, then
/// every account's second, and so on, kept in time order.
///
/// Why not simply the first `n` in time: the accounts of a scenario start at different
/// times, so a prefix holds mostly whoever started first (in the default scenario,
/// benign accounts) and a harvester may send nothing at all. What the sentinel must
/// show on a small live run is each account's *beginning* — requests until flagged
/// counts from there — so each account gets an equal share of it.
pub(crate) fn spread(events: Vec<&UsageEvent>, n: usize) -> Vec<&UsageEvent> {
    let mut seen: HashMap<i64, usize> = HashMap::new();
    let mut ranked: Vec<(usize, &UsageEvent)> = events
        .into_iter()
        .map(|e| {
            let r = seen.entry(e.account_id).or_default();
            *r += 1;
            (*r, e)
        })
        .collect();
    // stable: within one rank, time order stays
    ranked.sort_by_key(|&(r, _)| r);
    ranked.truncate(n);
    let mut out: Vec<&UsageEvent> = ranked.into_iter().map(|(_, e)| e).collect();
    out.sort_by_key(|e| e.created_at_ms);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(endpoint: &str, prompt: &str) -> UsageEvent {
        UsageEvent {
            id: 0,
            request_id: "r1".into(),
            account_id: 3,
            api_key_id: "k".into(),
            created_at_ms: 0,
            endpoint: endpoint.into(),
            model: "m".into(),
            prompt_text: Some(prompt.into()),
            prompt_hash: String::new(),
            turns: 1,
            completion_text: None,
            completion_hash: None,
            prompt_tokens: 5,
            completion_tokens: 300,
            n: 2,
            logprobs: true,
            top_logprobs: Some(5),
            max_tokens: Some(512),
            temperature: Some(0.7),
            watermark_scheme: None,
            watermark_key_id: None,
            latency_ms: 0,
            status: 200,
            finish_reason: None,
            client_addr: None,
            user_agent: None,
            user: Some("u1".into()),
            policy: None,
            partial: false,
        }
    }

    #[test]
    fn chat_events_become_chat_requests_with_their_options() {
        let e = ev(
            "/v1/chat/completions",
            r#"[{"role":"user","content":"hi"},{"role":"assistant","content":"yo"},{"role":"user","content":"more"}]"#,
        );
        let (path, b) = request_of(&e, "smol", 16).unwrap();
        assert_eq!(path, "/v1/chat/completions");
        assert_eq!(b["messages"].as_array().unwrap().len(), 3);
        assert_eq!(b["max_tokens"], 16, "capped");
        assert_eq!(b["logprobs"], true);
        assert_eq!(b["top_logprobs"], 5);
        assert_eq!(b["n"], 2);
        assert_eq!(b["user"], "u1");
        assert_eq!(b["model"], "smol");
    }

    #[test]
    fn a_limit_spreads_over_the_accounts_and_keeps_time_order() {
        // account 1 starts early and sends a lot; accounts 2 and 3 start late
        let mk = |account_id, t| UsageEvent {
            account_id,
            created_at_ms: t,
            ..ev("/v1/completions", "x")
        };
        let evs: Vec<UsageEvent> = (0..10)
            .map(|t| mk(1, t))
            .chain([mk(2, 20), mk(3, 21), mk(2, 22), mk(3, 23), mk(2, 24)])
            .collect();
        let refs: Vec<&UsageEvent> = evs.iter().collect();
        let got = |n| -> Vec<(i64, i64)> {
            spread(refs.clone(), n)
                .iter()
                .map(|e| (e.account_id, e.created_at_ms))
                .collect()
        };
        assert_eq!(got(3), [(1, 0), (2, 20), (3, 21)], "one each first");
        // ranks 1 and 2 of every account (6), then the earliest rank 3; in time order
        assert_eq!(
            got(7),
            [(1, 0), (1, 1), (1, 2), (2, 20), (3, 21), (2, 22), (3, 23)]
        );
        assert_eq!(got(100).len(), evs.len(), "no limit reached: everything");
        assert!(got(0).is_empty());
    }

    #[test]
    fn completion_events_become_completion_requests() {
        let mut e = ev("/v1/completions", "Once upon a time");
        e.max_tokens = None;
        e.completion_tokens = 7;
        let (path, b) = request_of(&e, "smol", 16).unwrap();
        assert_eq!(path, "/v1/completions");
        assert_eq!(b["prompt"], "Once upon a time");
        assert_eq!(
            b["max_tokens"], 7,
            "the simulated length when it asked for none"
        );
        assert_eq!(b["logprobs"], 5, "legacy completions take an integer");
        let bad = ev("/v1/chat/completions", "not json");
        assert!(request_of(&bad, "smol", 16).is_err());
    }
}
