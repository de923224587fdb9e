//! `isotope serve`: the OpenAI-compatible front door.
//!
//! The only crate that knows the OpenAI wire format. Cross-cutting concerns are
//! layers around thin handlers: authentication and rate limits ([`auth`]), request
//! metrics, body limits, tracing. Handlers ([`api`]) validate, apply the output
//! [`policy`], and hand a job to the [`scheduler`] — they never sample tokens. Every
//! response is watermarked by server policy (clients cannot opt out) and recorded as a
//! usage event through the store's group-commit writer before its last byte is sent.

// `ApiError` carries a `HeaderMap` (rate-limit headers) and is built at most once per
// request, on the error path; boxing it would add an allocation and noise for no
// measurable gain.
#![allow(clippy::result_large_err)]

pub mod api;
pub mod auth;
pub mod config;
pub mod error;
pub mod loadgen;
pub mod logprobs;
pub mod openai;
pub mod policy;
pub mod reasoning;
pub mod scheduler;
pub mod sentinel;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use isotope_engine::{BatchConfig, LoadOptions, Model};
use isotope_store::{Store, UsageWriter};
use isotope_watermark::{ExcludedTokens, Scheme, WatermarkKey};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::json;

pub use config::ServerConfig;
use error::ApiError;

/// The loaded model, its scheduler, and what the watermark needs from its vocabulary.
pub struct Engine {
    pub model: Arc<Model>,
    pub scheduler: scheduler::Scheduler,
    /// Control tokens the watermark never biases (from the model's vocabulary).
    pub excluded: ExcludedTokens,
    /// Antidistillation sampling's shared proxies, when some policy level uses them.
    pub defence: Option<Arc<isotope_defence::Antidistill>>,
    /// (window, token) tuples common in human text, left out by `/admin/detect` as by
    /// `isotope detect` (`None` when the built-in list does not fit this model).
    pub common: Option<Arc<isotope_watermark::CommonTuples>>,
}

/// The watermark applied to every response.
pub struct Watermark {
    pub key: Arc<WatermarkKey>,
    pub scheme: Scheme,
    /// Every key detection should try (the active one first), for rotation.
    pub detection_keys: Vec<Arc<WatermarkKey>>,
}

impl Watermark {
    /// The sampler hook for one sequence with the active key (`greedy`: the request
    /// samples at temperature 0, where the hook picks a scheme that survives it).
    pub fn hook(
        &self,
        excluded: &ExcludedTokens,
        greedy: bool,
    ) -> isotope_watermark::WatermarkHook {
        isotope_watermark::WatermarkHook::new(
            Arc::clone(&self.key),
            &self.scheme,
            Arc::clone(excluded),
            greedy,
        )
    }
}

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    pub cfg: Arc<ServerConfig>,
    pub store: Arc<dyn Store>,
    pub writer: UsageWriter,
    /// Set once the model is loaded; until then `/v1/*` answers 503.
    pub engine: Arc<OnceLock<Arc<Engine>>>,
    pub watermark: Arc<Watermark>,
    pub model_name: String,
    pub metrics: PrometheusHandle,
    pub started_at: i64,
    /// The online sentinel (`None` when disabled).
    pub sentinel: Option<sentinel::SentinelHandle>,
}

/// What `serve` reports once the model is loaded.
#[derive(Clone, Debug)]
pub struct Ready {
    pub addr: SocketAddr,
    pub model_name: String,
    pub watermark_key_id: String,
    pub scheme: String,
    pub database_url: String,
    pub load_secs: f64,
}

fn metrics_handle() -> anyhow::Result<PrometheusHandle> {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let recorder = PrometheusBuilder::new()
        .set_buckets(&[
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        ])
        .context("configuring metrics")?
        .build_recorder();
    let handle = recorder.handle();
    // A second server in the same process (tests) reuses the first recorder.
    if metrics::set_global_recorder(recorder).is_ok() {
        let _ = HANDLE.set(handle.clone());
        Ok(handle)
    } else {
        HANDLE
            .get()
            .cloned()
            .context("a different metrics recorder is already installed")
    }
}

/// Read a watermark key file, warning when other users can read it.
pub fn read_key(path: &Path) -> anyhow::Result<Arc<WatermarkKey>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read watermark key file {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    "watermark key file is readable by other users; run `chmod 600` on it"
                );
            }
        }
    }
    let key = WatermarkKey::parse_file(&text)
        .with_context(|| format!("invalid watermark key file {}", path.display()))?;
    Ok(Arc::new(key))
}

/// The generation key: the configured file, or — single node only — one generated
/// under `data_dir` on first start (mode 0600).
fn generation_key(cfg: &ServerConfig) -> anyhow::Result<(Arc<WatermarkKey>, PathBuf)> {
    if let Some(path) = &cfg.watermark_key {
        return Ok((read_key(path)?, path.clone()));
    }
    if cfg.is_fleet() {
        bail!(
            "with PostgreSQL every replica must use the same provisioned watermark key: create \
             one with `isotope keygen --out wm.key`, distribute it, and pass --watermark-key \
             (or `watermark_key` in isotope.toml)"
        );
    }
    let path = cfg.data_dir.join("watermark.key");
    if path.exists() {
        return Ok((read_key(&path)?, path));
    }
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("cannot create data directory {}", cfg.data_dir.display()))?;
    let key = WatermarkKey::generate().context("generating a watermark key")?;
    write_private(&path, key.to_file_string().as_bytes())?;
    tracing::info!(key_id = key.id(), path = %path.display(), "generated a new watermark key");
    Ok((Arc::new(key), path))
}

/// Create `path` with mode 0600 (never overwriting).
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Build the router over a ready state (exposed for tests and embedding).
pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(api::chat))
        .route("/v1/completions", post(api::completions))
        .route("/v1/models", get(api::models))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ));
    let admin = Router::new()
        .route("/admin/alerts", get(admin_alerts))
        .route("/admin/detect", post(admin_detect))
        .route_layer(middleware::from_fn_with_state(state.clone(), admin_auth));
    Router::new()
        .merge(v1)
        .merge(admin)
        .fallback(|req: Request| async move { ApiError::not_found(req.uri().path()) })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(DefaultBodyLimit::max(state.cfg.max_body_bytes))
        .layer(middleware::from_fn(track))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        // Probes and scrapes are added after the layers, so they are neither traced
        // nor counted: a readiness probe polls /health every second or so, and while
        // the model loads each of its 503s would otherwise be an ERROR log line.
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .with_state(state)
}

/// Request counts and latency by route and status.
async fn track(req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    let route = match path.as_str() {
        "/v1/chat/completions" | "/v1/completions" | "/v1/models" | "/admin/alerts" => path,
        _ => "other".to_owned(),
    };
    let start = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    metrics::counter!("isotope_http_requests_total", "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("isotope_http_response_seconds", "route" => route)
        .record(start.elapsed().as_secs_f64());
    resp
}

async fn health(State(app): State<AppState>) -> Response {
    match app.engine.get() {
        Some(engine) => Json(json!({
            "status": "ok",
            "model": app.model_name,
            "active_sequences": engine.scheduler.load().active.load(std::sync::atomic::Ordering::Relaxed),
            "queued": engine.scheduler.load().queued.load(std::sync::atomic::Ordering::Relaxed),
            // `starting` until the sentinel has its model and has replayed the store.
            "sentinel": match &app.sentinel {
                None => "off",
                Some(s) if s.caught_up() => "ready",
                Some(_) => "starting",
            },
        }))
        .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "loading"})),
        )
            .into_response(),
    }
}

async fn metrics_text(State(app): State<AppState>) -> Response {
    (
        [("content-type", "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
        .into_response()
}

async fn admin_auth(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let Some(expected) = app.cfg.admin_token.as_deref() else {
        return ApiError::forbidden("The admin API is disabled: set `admin_token` to enable it.")
            .into_response();
    };
    let given = bearer(req.headers()).unwrap_or("");
    use subtle::ConstantTimeEq;
    if given.as_bytes().ct_eq(expected.as_bytes()).into() {
        next.run(req).await
    } else {
        ApiError::unauthorized().into_response()
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get("authorization")?.to_str().ok()?;
    let (s, t) = v.split_once(' ')?;
    s.eq_ignore_ascii_case("bearer").then(|| t.trim())
}

async fn admin_alerts(State(app): State<AppState>) -> Result<Response, ApiError> {
    let alerts = app.store.list_alerts(0, 1000).await?;
    Ok(Json(json!({"object": "list", "data": alerts})).into_response())
}

/// `POST /admin/detect` `{"text": …}`: watermark detection with every key the server
/// knows (the active one and the rotated-out `detection_keys`), corrected for testing
/// them all — the provider's own check of a text, without shipping keys to a laptop.
async fn admin_detect(
    State(app): State<AppState>,
    raw: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    #[derive(serde::Deserialize)]
    struct Body {
        text: String,
    }
    let raw =
        raw.map_err(|e| ApiError::invalid(format!("Could not read the request body: {e}")))?;
    let body: Body = openai::parse_body(&raw)?;
    if body.text.trim().is_empty() {
        return Err(ApiError::invalid_param("text", "`text` is empty."));
    }
    let engine = app
        .engine
        .get()
        .ok_or_else(|| ApiError::unavailable("The model is still loading; retry shortly."))?
        .clone();
    let wm = Arc::clone(&app.watermark);
    let report = tokio::task::spawn_blocking(move || {
        let tokens = engine.model.tokenize(&body.text, false, false);
        let multi = isotope_watermark::detect_multi_key(
            &wm.detection_keys,
            &wm.scheme,
            &engine.excluded,
            engine.common.as_ref(),
            &tokens,
        );
        json!({
            "scheme": wm.scheme.to_string(),
            "p_value": multi.p_value,
            "log10_p_value": multi.log10_p_value,
            "scored_tokens": multi.per_key.iter().map(|d| d.scored_tokens).max().unwrap_or(0),
            "tokens": tokens.len(),
            "key_id": multi.best_key_id,
            "keys_tested": wm.detection_keys.len(),
            "common_filter": engine.common.is_some(),
            "per_key": multi.per_key,
        })
    })
    .await
    .map_err(|e| ApiError::internal("detection", e))?;
    Ok(Json(report).into_response())
}

/// Run the server until `shutdown` resolves. Binds first (so `/health` answers 503
/// while the model loads), then loads the model and starts the scheduler, then calls
/// `on_ready`.
pub async fn serve(
    cfg: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_ready: impl FnOnce(&Ready) + Send + 'static,
) -> anyhow::Result<()> {
    let scheme: Scheme = cfg
        .scheme
        .parse()
        .with_context(|| format!("watermark scheme `{}`", cfg.scheme))?;
    let (key, _key_path) = generation_key(&cfg)?;
    let mut detection_keys = vec![Arc::clone(&key)];
    for path in &cfg.detection_keys {
        detection_keys.push(read_key(path)?);
    }
    if !cfg.model.exists() {
        bail!(
            "model {} not found: run `scripts/setup.sh` to fetch it, or pass --model",
            cfg.model.display()
        );
    }
    // A configured sentinel model is read now, so a bad file stops the start-up; the
    // built-in one is trained in the background.
    sentinel::check_settings(&cfg.sentinel)?;
    cfg.check_policy()?;
    let sentinel_model = match (&cfg.sentinel.model, cfg.sentinel.enabled) {
        (Some(_), true) => Some(sentinel::load_model(&cfg.sentinel)?),
        _ => None,
    };
    let url = cfg.database_url();
    if url.starts_with("sqlite://") {
        std::fs::create_dir_all(&cfg.data_dir)
            .with_context(|| format!("cannot create data directory {}", cfg.data_dir.display()))?;
    }
    let store = isotope_store::open(&url)
        .await
        .with_context(|| format!("opening the store at {}", redact_url(&url)))?;
    let writer = UsageWriter::spawn(
        Arc::clone(&store),
        cfg.group_commit_max_batch.max(1),
        Duration::from_millis(cfg.group_commit_max_delay_ms),
    );
    let listener = tokio::net::TcpListener::bind(cfg.addr)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.addr))?;
    let addr = listener.local_addr()?;
    let engine_cell: Arc<OnceLock<Arc<Engine>>> = Arc::new(OnceLock::new());
    let model_name = cfg.model_name();
    let cfg = Arc::new(cfg);
    let started_at = auth::now_ms();
    let (sentinel, sentinel_worker) = if cfg.sentinel.enabled {
        let (h, w) = sentinel::SentinelHandle::new(cfg.sentinel.queue);
        (Some(h), Some(w))
    } else {
        (None, None)
    };
    let watermark = Arc::new(Watermark {
        key: Arc::clone(&key),
        scheme: scheme.clone(),
        detection_keys,
    });
    let state = AppState {
        cfg: Arc::clone(&cfg),
        store: Arc::clone(&store),
        writer: writer.clone(),
        engine: Arc::clone(&engine_cell),
        watermark,
        model_name: model_name.clone(),
        metrics: metrics_handle()?,
        started_at,
        sentinel,
    };
    // Serve at once, so `/health` answers 503 (and `/v1/*` 503) while models load.
    let app = router(state);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut server = tokio::spawn(async move {
        let mut stop_rx = stop_rx;
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        })
        .await
    });
    let shutdown = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    tokio::pin!(shutdown);

    // The sentinel starts now (its catch-up overlaps the model load); requests wait
    // for nothing of it.
    if let Some(worker) = sentinel_worker {
        sentinel::spawn(
            worker,
            sentinel_model,
            cfg.sentinel.clone(),
            Arc::clone(&store),
            started_at,
        );
    }

    // Load the model off the async runtime.
    let load_started = Instant::now();
    let load_cfg = Arc::clone(&cfg);
    let loaded = tokio::task::spawn_blocking(
        move || -> anyhow::Result<(Arc<Model>, scheduler::Scheduler, Option<Arc<isotope_defence::Antidistill>>)> {
            let model = Arc::new(Model::load(&load_cfg.model, &LoadOptions::default())?);
            let defence = match (&load_cfg.defence.proxy, &load_cfg.defence.gradient) {
                (Some(proxy), Some(grad)) => {
                    let d = &load_cfg.defence;
                    let cfg = isotope_defence::AntidistillConfig {
                        lambda: 1.0,
                        eps: d.eps,
                        top_k: d.top_k,
                        min_p: d.min_p,
                        no_repeat_ngram: d.no_repeat_ngram,
                    };
                    Some(
                        isotope_defence::antidistill_for_teacher(&model, proxy, grad, cfg)
                            .context("loading the antidistillation proxy ([defence])")?,
                    )
                }
                _ => None,
            };
            let batch = BatchConfig {
                slots: load_cfg.slots,
                ctx_per_slot: load_cfg.ctx_per_slot.min(model.n_ctx_train()),
                prefill_chunk: load_cfg.prefill_chunk,
                threads: load_cfg.threads,
            };
            let sched = scheduler::Scheduler::start(Arc::clone(&model), batch, load_cfg.queue)?;
            Ok((model, sched, defence))
        },
    );
    let (model, sched, defence) = tokio::select! {
        r = loaded => r.context("model loading task")??,
        _ = &mut shutdown => {
            let _ = server.await;
            writer.shutdown().await;
            return Ok(());
        }
        r = &mut server => {
            r.context("HTTP server task")?.context("serving HTTP")?;
            bail!("the HTTP server stopped while the model was loading");
        }
    };
    let common = match isotope_eval::shipped_common_tuples(&model) {
        Ok(c) => Some(Arc::new(c)),
        Err(e) => {
            tracing::warn!("/admin/detect scores every tuple: {e}");
            None
        }
    };
    let _ = engine_cell.set(Arc::new(Engine {
        excluded: model.control_mask().into(),
        common,
        model,
        scheduler: sched,
        defence,
    }));
    if let Some(days) = cfg.retention_days {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(3600));
            loop {
                tick.tick().await;
                let cutoff = auth::now_ms() - i64::from(days) * 86_400_000;
                match store.purge_texts_older_than(cutoff).await {
                    Ok(n) if n > 0 => tracing::info!(events = n, "purged texts past retention"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!("retention purge failed: {e}"),
                }
            }
        });
    }
    if !cfg.watermark {
        tracing::warn!("watermark DISABLED by configuration: responses are untraceable");
    }
    on_ready(&Ready {
        addr,
        model_name,
        watermark_key_id: key.id().to_owned(),
        scheme: if cfg.watermark {
            scheme.to_string()
        } else {
            "OFF (benchmark mode)".to_owned()
        },
        database_url: redact_url(&url),
        load_secs: load_started.elapsed().as_secs_f64(),
    });
    tokio::select! {
        _ = &mut shutdown => {}
        r = &mut server => {
            r.context("HTTP server task")?.context("serving HTTP")?;
            writer.shutdown().await;
            return Ok(());
        }
    }
    server
        .await
        .context("HTTP server task")?
        .context("serving HTTP")?;
    writer.shutdown().await;
    Ok(())
}

/// A database URL with any password replaced, for logs and messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}://{user}:***@{}", &url[..s], &url[at + 1..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}
