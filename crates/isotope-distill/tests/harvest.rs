//! Harvest against a local test double of an OpenAI-compatible server: the 429 path
//! (retry-after honoured, every record still written once), a fatal 401, and resume
//! without duplicates. The real `isotope serve` is exercised by the CLI tests
//! (`crates/isotope/tests/distill.rs`).

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use isotope_distill::{harvest, parse_prompts, HarvestConfig, HarvestRecord};
use serde_json::{json, Value};

#[derive(Default)]
struct Double {
    calls: AtomicUsize,
    /// The first this-many completion calls get a 429 with `retry-after: 1`.
    rate_limit_first: usize,
    /// Then this many get a 503 without a hint.
    unavailable_next: usize,
    /// Every call answers 401.
    unauthorized: bool,
    /// Every answer takes this long.
    delay: Duration,
}

async fn completions(
    State(d): State<Arc<Double>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let n = d.calls.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(d.delay).await;
    if d.unauthorized || headers.get("authorization").is_none() {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": {"message": "bad key", "type": "invalid_request_error"}})),
        )
            .into_response();
    }
    if n < d.rate_limit_first {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", "1")],
            Json(json!({"error": {"message": "slow down", "code": "rate_limit_exceeded"}})),
        )
            .into_response();
    }
    if n < d.rate_limit_first + d.unavailable_next {
        return (StatusCode::SERVICE_UNAVAILABLE, "busy").into_response();
    }
    let prompt = body["messages"][0]["content"].as_str().unwrap_or_default();
    Json(json!({
        "id": "c", "object": "chat.completion", "model": body["model"],
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": format!("echo: {prompt}")}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    }))
    .into_response()
}

async fn models() -> Json<Value> {
    Json(json!({"object": "list", "data": [{"id": "double", "object": "model"}]}))
}

async fn serve(d: Arc<Double>) -> String {
    let app = Router::new()
        .route("/v1/chat/completions", post(completions))
        .route("/v1/models", get(models))
        .with_state(d);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

fn prompts(n: usize) -> Vec<isotope_distill::Prompt> {
    let text: String = (0..n)
        .map(|i| format!("{{\"prompt\": \"question {i}\"}}\n"))
        .collect();
    parse_prompts(&text).0
}

fn records(path: &std::path::Path) -> Vec<HarvestRecord> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn config(endpoint: String) -> HarvestConfig {
    HarvestConfig {
        endpoint,
        api_key: Some("k".into()),
        concurrency: 3,
        max_tokens: 8,
        initial_backoff: Duration::from_millis(50),
        ..HarvestConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_429_honouring_retry_after() {
    let d = Arc::new(Double {
        rate_limit_first: 3,
        unavailable_next: 2,
        ..Double::default()
    });
    let endpoint = serve(d.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let ps = prompts(6);
    let cfg = HarvestConfig {
        samples_per_prompt: 2,
        ..config(endpoint)
    };
    let start = Instant::now();
    let mut calls = 0;
    let report = harvest(&cfg, &ps, &out, &mut |_| calls += 1).await.unwrap();
    assert!(
        start.elapsed() >= Duration::from_millis(950),
        "retry-after: 1 was not honoured ({:?})",
        start.elapsed()
    );
    assert_eq!(report.written, 12);
    assert_eq!(report.failed, 0);
    assert_eq!(report.missing, 0);
    assert_eq!(report.model, "double");
    assert_eq!(report.rate_limited, 3);
    assert_eq!(report.server_errors, 2);
    assert_eq!(report.retries, 5);
    assert_eq!(report.requests, 17);
    assert_eq!(report.completion_tokens, 24);
    assert_eq!(calls, 13, "one progress call at start and one per record");
    let recs = records(&out);
    let ids: HashSet<_> = recs.iter().map(|r| r.id.clone()).collect();
    assert_eq!(ids.len(), 12);
    for r in &recs {
        assert_eq!(r.response, format!("echo: {}", r.prompt));
        assert_eq!(r.prompt, format!("question {}", r.prompt_index));
        assert_eq!(r.finish_reason.as_deref(), Some("stop"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_without_duplicates() {
    let d = Arc::new(Double::default());
    let endpoint = serve(d.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let ps = prompts(9);
    let first = harvest(
        &HarvestConfig {
            limit: Some(4),
            ..config(endpoint.clone())
        },
        &ps,
        &out,
        &mut |_| {},
    )
    .await
    .unwrap();
    assert_eq!(first.written, 4);
    assert_eq!(first.missing, 5);
    // A kill in the middle of a write leaves a partial line: cut off and redone.
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(&out).unwrap();
    f.write_all(br#"{"id":"8-0","prompt_index":8,"prom"#)
        .unwrap();
    drop(f);
    let second = harvest(&config(endpoint.clone()), &ps, &out, &mut |_| {})
        .await
        .unwrap();
    assert_eq!(second.existing, 4);
    assert_eq!(second.written, 5);
    assert!(second.truncated_bytes > 0);
    let recs = records(&out);
    assert_eq!(recs.len(), 9);
    let ids: HashSet<_> = recs.iter().map(|r| r.id.clone()).collect();
    assert_eq!(ids.len(), 9);
    // Nothing left: no request at all.
    let before = d.calls.load(Ordering::SeqCst);
    let third = harvest(&config(endpoint), &ps, &out, &mut |_| {})
        .await
        .unwrap();
    assert_eq!((third.written, third.existing), (0, 9));
    assert_eq!(d.calls.load(Ordering::SeqCst), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthorized_stops_the_run() {
    let d = Arc::new(Double {
        unauthorized: true,
        ..Double::default()
    });
    let endpoint = serve(d.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let cfg = HarvestConfig {
        model: Some("m".into()),
        concurrency: 1,
        ..config(endpoint)
    };
    let err = harvest(&cfg, &prompts(20), &out, &mut |_| {})
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("401"), "{err}");
    assert!(
        d.calls.load(Ordering::SeqCst) <= 2,
        "kept going after a 401: {} calls",
        d.calls.load(Ordering::SeqCst)
    );
}

/// A time limit stops starting requests (those in flight finish and are written); a
/// rerun continues with the rest, and a subset of the prompts (what another harvest
/// got) is matched by prompt index, not position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_limit_stops_and_a_rerun_continues() {
    let d = Arc::new(Double {
        delay: Duration::from_millis(150),
        ..Double::default()
    });
    let endpoint = serve(d.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let ps = prompts(40);
    let cfg = HarvestConfig {
        concurrency: 2,
        time_limit: Some(Duration::from_millis(400)),
        ..config(endpoint.clone())
    };
    let first = harvest(&cfg, &ps, &out, &mut |_| {}).await.unwrap();
    assert!(first.time_limited);
    assert!(
        (2..40).contains(&first.written),
        "{} written in 400 ms at 2 × 150 ms",
        first.written
    );
    assert_eq!(first.failed, 0);
    assert_eq!(first.missing, 40 - first.written);
    assert_eq!(
        records(&out).len(),
        first.written,
        "in-flight records were written"
    );
    let second = harvest(&config(endpoint.clone()), &ps, &out, &mut |_| {})
        .await
        .unwrap();
    assert!(!second.time_limited);
    assert_eq!((second.existing, second.missing), (first.written, 0));

    // A subset with gaps in its indices: only those prompts, records keyed by index.
    let subset: Vec<_> = ps.iter().filter(|p| p.index % 3 == 1).cloned().collect();
    let out2 = dir.path().join("subset.jsonl");
    let third = harvest(&config(endpoint), &subset, &out2, &mut |_| {})
        .await
        .unwrap();
    assert_eq!((third.written, third.missing), (subset.len(), 0));
    for r in records(&out2) {
        assert_eq!(r.prompt_index % 3, 1);
        assert_eq!(r.prompt, format!("question {}", r.prompt_index));
    }
}
