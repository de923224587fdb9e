//! The sentinel inside `isotope serve`: every usage event, in-process, into
//! [`isotope_sentinel::Sentinel`]; per-account levels out, read by the auth layer on
//! the next request; level changes stored as alerts and POSTed to a webhook.
//!
//! Why a separate OS thread fed by a bounded channel: scoring is CPU work that must
//! never sit on a request's path. A request hands its committed event over with
//! `try_send` (no await, no lock held across anything); when the sentinel falls
//! behind it lags, and when its queue is full it drops (counted in /metrics) — a
//! request is never slowed or failed by it. Levels are a `RwLock<HashMap>` written
//! only when a level changes.
//!
//! Why catch up from the store at start: the sentinel's state is memory only, so on
//! start it replays every stored usage event (`usage_events_since`) before the live
//! ones; events committed after start may come both ways and are deduplicated by
//! `request_id`. Alerts already stored seed what was announced, so a restart does not
//! re-alert what the replay re-discovers.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use isotope_sentinel::{Assessment, Embedder, Model, Sentinel, SentinelConfig, Thresholds};
use isotope_store::{Alert, Level, Store, UsageEvent};
use serde_json::json;
use tokio::sync::mpsc;

use crate::config::SentinelSettings;

/// Events read per store page during catch-up.
const CATCH_UP_PAGE: u32 = 2_000;

struct Shared {
    levels: RwLock<HashMap<i64, Level>>,
    caught_up: AtomicBool,
}

/// The server's handle on the sentinel: cheap to clone, never blocks.
#[derive(Clone)]
pub struct SentinelHandle {
    tx: mpsc::Sender<UsageEvent>,
    shared: Arc<Shared>,
}

/// What the worker needs once the model is loaded (see [`SentinelHandle::new`]).
pub struct SentinelWorker {
    rx: mpsc::Receiver<UsageEvent>,
    shared: Arc<Shared>,
}

impl SentinelHandle {
    /// A handle and the receiving end for [`SentinelWorker::start`]. Events handed
    /// over before the worker starts wait in the queue.
    pub fn new(queue: usize) -> (SentinelHandle, SentinelWorker) {
        let (tx, rx) = mpsc::channel(queue.max(1));
        let shared = Arc::new(Shared {
            levels: RwLock::new(HashMap::new()),
            caught_up: AtomicBool::new(false),
        });
        (
            SentinelHandle {
                tx,
                shared: Arc::clone(&shared),
            },
            SentinelWorker { rx, shared },
        )
    }

    /// Hands a committed usage event to the sentinel without waiting.
    pub fn observe(&self, event: UsageEvent) {
        match self.tx.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics::counter!("isotope_sentinel_events_dropped_total").increment(1);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// The sentinel's current level of an account (`Observe` when unknown).
    pub fn level(&self, account_id: i64) -> Level {
        self.shared
            .levels
            .read()
            .map(|m| m.get(&account_id).copied().unwrap_or_default())
            .unwrap_or_default()
    }

    /// Whether the start-up replay of stored events has finished.
    pub fn caught_up(&self) -> bool {
        self.shared.caught_up.load(Ordering::Relaxed)
    }
}

/// Refuses settings that cannot work (checked at start-up, before anything loads).
pub fn check_settings(settings: &SentinelSettings) -> anyhow::Result<()> {
    if let Some(flag) = settings.flag_threshold {
        if !(flag > 0.0 && flag < 1.0) {
            anyhow::bail!("sentinel.flag_threshold must be a probability in (0, 1), got {flag}");
        }
    }
    if let Some(url) = &settings.webhook_url {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            anyhow::bail!("sentinel.webhook_url must be an http:// or https:// URL, got {url}");
        }
    }
    Ok(())
}

/// Starts the sentinel on the current runtime: with `model`, or once the configured or
/// built-in (embedded) model is loaded, off the runtime. A failure to load is logged
/// and leaves the sentinel off; requests are never affected.
pub fn spawn(
    worker: SentinelWorker,
    model: Option<Loaded>,
    settings: SentinelSettings,
    store: Arc<dyn Store>,
    started_at_ms: i64,
) {
    let rt = tokio::runtime::Handle::current();
    tokio::spawn(async move {
        let model = match model {
            Some(m) => m,
            None => {
                let s = settings.clone();
                let t = Instant::now();
                match tokio::task::spawn_blocking(move || load_model(&s)).await {
                    Ok(Ok(m)) => {
                        tracing::info!(secs = t.elapsed().as_secs_f64(), "sentinel model ready");
                        m
                    }
                    Ok(Err(e)) => {
                        tracing::error!("sentinel disabled: {e:#}");
                        return;
                    }
                    Err(e) => {
                        tracing::error!("sentinel disabled: model task failed: {e}");
                        return;
                    }
                }
            }
        };
        if let Err(e) = worker.start(model, settings, store, started_at_ms, rt) {
            tracing::error!("sentinel disabled: cannot start its thread: {e}");
        }
    });
}

/// A sentinel model and the prompt embedder it was trained with.
#[derive(Clone)]
pub struct Loaded {
    /// The model, with the configured overrides applied.
    pub model: Arc<Model>,
    /// Its embedder (the model refuses any other).
    pub embedder: Arc<dyn Embedder>,
}

/// Loads the configured sentinel model (or the built-in one), applies the configured
/// overrides and loads the embedder it needs (all-MiniLM-L6-v2 from
/// `sentinel.minilm_dir` for a model trained with it). Blocking: call it off the async
/// runtime.
pub fn load_model(settings: &SentinelSettings) -> anyhow::Result<Loaded> {
    use anyhow::Context;
    check_settings(settings)?;
    let mut model = match &settings.model {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read sentinel model {}", path.display()))?;
            let m: Model = serde_json::from_str(&text)
                .with_context(|| format!("sentinel model {}", path.display()))?;
            m.validate()
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("sentinel model {}", path.display()))?;
            m
        }
        None => (*isotope_sentinel::default_model().map_err(anyhow::Error::msg)?).clone(),
    };
    if let Some(flag) = settings.flag_threshold {
        model.thresholds = Thresholds::from_flag(flag);
    }
    if let Some(n) = settings.min_requests {
        model.min_requests = n;
    }
    let embedder = isotope_sentinel::embedder_for(&model, &settings.minilm_dir)
        .map_err(anyhow::Error::msg)
        .context("sentinel prompt embedder")?;
    Ok(Loaded {
        model: Arc::new(model),
        embedder,
    })
}

impl SentinelWorker {
    /// Starts the worker thread: catch-up from the store, then live events. Store and
    /// webhook calls run on `rt`; scoring runs on the thread.
    pub fn start(
        self,
        loaded: Loaded,
        settings: SentinelSettings,
        store: Arc<dyn Store>,
        started_at_ms: i64,
        rt: tokio::runtime::Handle,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let webhook = settings.webhook_url.clone().map(|url| Webhook {
            url,
            client: reqwest::Client::builder()
                .timeout(Duration::from_millis(settings.webhook_timeout_ms.max(1)))
                .build()
                .unwrap_or_default(),
            retries: settings.webhook_retries,
        });
        let mut w = Worker {
            sentinel: Sentinel::new(
                SentinelConfig::new(loaded.model, loaded.embedder)
                    .map_err(std::io::Error::other)?,
            ),
            shared: self.shared,
            store,
            rt,
            announced: HashMap::new(),
            alert_level: settings.alert_level,
            webhook,
        };
        let rx = self.rx;
        std::thread::Builder::new()
            .name("isotope-sentinel".into())
            .spawn(move || w.run(rx, started_at_ms))
    }
}

#[derive(Clone)]
struct Webhook {
    url: String,
    client: reqwest::Client,
    retries: u32,
}

struct Worker {
    sentinel: Sentinel,
    shared: Arc<Shared>,
    store: Arc<dyn Store>,
    rt: tokio::runtime::Handle,
    /// Last level alerted per account (seeded from stored alerts).
    announced: HashMap<i64, Level>,
    alert_level: Level,
    webhook: Option<Webhook>,
}

impl Worker {
    fn run(&mut self, mut rx: mpsc::Receiver<UsageEvent>, started_at_ms: i64) {
        let store = Arc::clone(&self.store);
        match self.rt.block_on(store.list_alerts(0, u32::MAX)) {
            Ok(alerts) => {
                for a in alerts {
                    if let (Some(id), Ok(level)) = (a.account_id, a.level.parse::<Level>()) {
                        self.announced.insert(id, level);
                    }
                }
            }
            Err(e) => tracing::warn!("sentinel: cannot read stored alerts: {e}"),
        }
        // Replay what is stored; remember events that may also arrive live.
        let t = Instant::now();
        let mut cursor = 0i64;
        let mut replayed = 0u64;
        let mut maybe_live: HashSet<String> = HashSet::new();
        loop {
            let page = match self
                .rt
                .block_on(store.usage_events_since(cursor, CATCH_UP_PAGE))
            {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!("sentinel: catch-up stopped, store error: {e}");
                    break;
                }
            };
            let Some(last) = page.last() else { break };
            cursor = last.id;
            self.sentinel.prepare_embeddings(&page);
            for ev in &page {
                if ev.created_at_ms >= started_at_ms {
                    maybe_live.insert(ev.request_id.clone());
                }
                self.observe(ev);
            }
            replayed += page.len() as u64;
        }
        self.shared.caught_up.store(true, Ordering::Relaxed);
        tracing::info!(
            events = replayed,
            accounts = self.sentinel.accounts(),
            secs = t.elapsed().as_secs_f64(),
            "sentinel caught up with the store"
        );
        while let Some(ev) = rx.blocking_recv() {
            if !maybe_live.is_empty() && maybe_live.remove(&ev.request_id) {
                continue;
            }
            self.observe(&ev);
        }
    }

    fn observe(&mut self, ev: &UsageEvent) {
        let t = Instant::now();
        let assessment = self.sentinel.observe(ev);
        metrics::counter!("isotope_sentinel_events_total").increment(1);
        if let Some(a) = assessment {
            for member in self.sentinel.cluster_members(ev.account_id) {
                let level = self.sentinel.level(member);
                self.apply(member, level, &a, ev);
            }
        }
        metrics::histogram!("isotope_sentinel_observe_seconds").record(t.elapsed().as_secs_f64());
        metrics::gauge!("isotope_sentinel_accounts").set(self.sentinel.accounts() as f64);
    }

    fn apply(&mut self, account_id: i64, level: Level, a: &Assessment, ev: &UsageEvent) {
        let changed = {
            let mut levels = match self.shared.levels.write() {
                Ok(l) => l,
                Err(p) => p.into_inner(),
            };
            let old = levels.insert(account_id, level).unwrap_or_default();
            old != level
        };
        if changed {
            metrics::counter!("isotope_sentinel_level_changes_total", "level" => level.as_str())
                .increment(1);
        }
        let previous = self.announced.get(&account_id).copied().unwrap_or_default();
        if level == previous || level.max(previous) < self.alert_level {
            return;
        }
        self.announced.insert(account_id, level);
        let alert = Alert {
            id: 0,
            created_at_ms: crate::auth::now_ms(),
            account_id: Some(account_id),
            api_key_id: (account_id == ev.account_id).then(|| ev.api_key_id.clone()),
            level: level.as_str().to_owned(),
            score: a.score,
            reasons: json!({
                "source": "sentinel",
                "previous_level": previous,
                "requests": if account_id == a.account_id { Some(a.requests) } else { None },
                "account_score": (account_id == a.account_id).then_some(a.account_score),
                "cluster": {
                    "id": a.cluster_id,
                    "size": a.cluster_size,
                    "score": a.cluster_score,
                },
                "assessed_account": a.account_id,
                "event_time_ms": a.at_ms,
                "features": a.reasons,
            }),
        };
        tracing::warn!(
            account = account_id,
            level = level.as_str(),
            previous = previous.as_str(),
            score = a.score,
            cluster = a.cluster_id,
            "sentinel level change"
        );
        let store = Arc::clone(&self.store);
        let webhook = self.webhook.clone();
        self.rt.spawn(async move {
            let id = match store.insert_alert(&alert).await {
                Ok(id) => id,
                Err(e) => {
                    metrics::counter!("isotope_sentinel_alert_failures_total").increment(1);
                    tracing::error!("sentinel: alert not stored: {e}");
                    0
                }
            };
            if let Some(w) = webhook {
                let body = Alert { id, ..alert };
                post_webhook(&w, &body).await;
            }
        });
    }
}

/// POSTs one alert, retrying with exponential backoff; failures are logged and
/// counted, never propagated.
async fn post_webhook(w: &Webhook, alert: &Alert) {
    let body = json!({"type": "isotope.sentinel.alert", "alert": alert});
    let mut delay = Duration::from_millis(250);
    for attempt in 0..=w.retries {
        let outcome = w.client.post(&w.url).json(&body).send().await;
        match outcome {
            Ok(r) if r.status().is_success() => {
                metrics::counter!("isotope_sentinel_webhook_sent_total").increment(1);
                return;
            }
            Ok(r) => tracing::warn!(
                attempt,
                status = r.status().as_u16(),
                "sentinel webhook refused the alert"
            ),
            Err(e) => tracing::warn!(attempt, "sentinel webhook failed: {e}"),
        }
        if attempt < w.retries {
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
    }
    metrics::counter!("isotope_sentinel_webhook_failures_total").increment(1);
    tracing::error!(url = %w.url, "sentinel webhook: alert not delivered");
}
