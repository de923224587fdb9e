//! A small closed-loop load generator for OpenAI-compatible chat endpoints: `c`
//! workers each send streaming requests back to back until `requests` are done or
//! the time limit passes. Measures time to first token, whole-request latency and
//! completion tokens per second (from the final usage chunk, i.e. the server's own
//! count). Used by `isotope loadtest` to compare servers side by side.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use serde::Serialize;

/// One load level against one server.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// Base URL, e.g. `http://127.0.0.1:8080/v1`.
    pub base_url: String,
    pub api_key: String,
    pub model: String,
    pub concurrency: usize,
    /// Requests to complete in total.
    pub requests: usize,
    pub max_tokens: u32,
    pub temperature: f32,
    pub prompts: Arc<Vec<String>>,
    /// Stop sending new requests after this long.
    pub time_limit: Duration,
}

/// What one load level measured.
#[derive(Clone, Debug, Serialize)]
pub struct LoadResult {
    pub concurrency: usize,
    pub requests_ok: usize,
    pub errors: usize,
    pub completion_tokens: u64,
    pub wall_secs: f64,
    /// Completion tokens per second over the whole level.
    pub tokens_per_sec: f64,
    pub requests_per_sec: f64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
}

struct Sample {
    latency: Duration,
    ttft: Duration,
    tokens: u64,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn one(
    http: &reqwest::Client,
    cfg: &LoadConfig,
    prompt: &str,
    seed: u64,
) -> anyhow::Result<Sample> {
    let started = Instant::now();
    let body = serde_json::json!({
        "model": cfg.model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": cfg.max_tokens,
        "temperature": cfg.temperature,
        "seed": seed,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let resp = http
        .post(format!("{}/chat/completions", cfg.base_url))
        .bearer_auth(&cfg.api_key)
        .json(&body)
        .send()
        .await
        .context("sending the request")?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        bail!("HTTP {status}: {text}");
    }
    let mut stream = resp.bytes_stream();
    let mut buf = Vec::new();
    let mut ttft = None;
    let mut tokens = 0;
    let mut done = false;
    while let Some(chunk) = stream.next().await {
        buf.extend_from_slice(&chunk.context("reading the stream")?);
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            let line = String::from_utf8_lossy(&event);
            let Some(data) = line.trim().strip_prefix("data:") else {
                continue;
            };
            let data = data.trim();
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(data).context("bad SSE chunk")?;
            if let Some(e) = v.get("error") {
                bail!("stream error: {e}");
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                tokens = n;
            }
            if ttft.is_none()
                && v["choices"][0]["delta"]["content"]
                    .as_str()
                    .is_some_and(|s| !s.is_empty())
            {
                ttft = Some(started.elapsed());
            }
        }
    }
    if !done {
        bail!("stream ended without [DONE]");
    }
    let latency = started.elapsed();
    Ok(Sample {
        latency,
        ttft: ttft.unwrap_or(latency),
        tokens,
    })
}

/// Run one load level.
pub async fn run_load(cfg: &LoadConfig) -> anyhow::Result<LoadResult> {
    if cfg.prompts.is_empty() || cfg.concurrency == 0 {
        bail!("the load test needs prompts and a concurrency of at least 1");
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()?;
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..cfg.concurrency {
        let (http, cfg, next) = (http.clone(), cfg.clone(), Arc::clone(&next));
        workers.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut errors = 0usize;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= cfg.requests || started.elapsed() > cfg.time_limit {
                    break;
                }
                let prompt = &cfg.prompts[i % cfg.prompts.len()];
                match one(&http, &cfg, prompt, i as u64).await {
                    Ok(s) => samples.push(s),
                    Err(e) => {
                        tracing::warn!("load request failed: {e:#}");
                        errors += 1;
                    }
                }
            }
            (samples, errors)
        }));
    }
    let mut samples = Vec::new();
    let mut errors = 0;
    for w in workers {
        let (s, e) = w.await?;
        samples.extend(s);
        errors += e;
    }
    let wall = started.elapsed().as_secs_f64();
    let mut lat: Vec<f64> = samples
        .iter()
        .map(|s| s.latency.as_secs_f64() * 1e3)
        .collect();
    let mut ttft: Vec<f64> = samples.iter().map(|s| s.ttft.as_secs_f64() * 1e3).collect();
    lat.sort_by(f64::total_cmp);
    ttft.sort_by(f64::total_cmp);
    let tokens: u64 = samples.iter().map(|s| s.tokens).sum();
    Ok(LoadResult {
        concurrency: cfg.concurrency,
        requests_ok: samples.len(),
        errors,
        completion_tokens: tokens,
        wall_secs: wall,
        tokens_per_sec: tokens as f64 / wall.max(1e-9),
        requests_per_sec: samples.len() as f64 / wall.max(1e-9),
        latency_p50_ms: percentile(&lat, 0.5),
        latency_p99_ms: percentile(&lat, 0.99),
        ttft_p50_ms: percentile(&ttft, 0.5),
        ttft_p99_ms: percentile(&ttft, 0.99),
    })
}
