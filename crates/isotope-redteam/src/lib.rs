//! `isotope redteam`: the whole story on one machine, with one command (issue #7).
//!
//! 1. **Teacher, watermarked**: `isotope_server::serve` in-process (SQLite store under
//!    `OUT/watermarked/server`, sentinel on, the run's own watermark key), one
//!    *harvester* account and a few *benign* accounts. The harvester runs
//!    `isotope_distill::harvest` (resumable JSONL) while the benign accounts send a
//!    trickle of human-written instructions. When the server stops serving the
//!    harvester (the sentinel blocks it), the attacker comes back with a fresh account,
//!    up to `max_accounts` — what a real one would do; every account it burns is in the
//!    report.
//! 2. **Teacher, plain**: a second in-process server with `watermark = false` — the
//!    operator's configuration switch, never a request field, so the public server
//!    still cannot be asked to leave the watermark out — answers the same prompts
//!    with the same seeds: the control student's data differs from the watermarked
//!    student's only by the watermark. Before it, the provider has its watermarked
//!    teacher answer the held-out prompts (`fresh_texts`): new outputs no student
//!    trains on, for the unsupervised reading.
//! 3. **Students**: one per arm (`tiny`, `small` or initialised from a GGUF), trained
//!    with `isotope_distill::train` in `checkpoints` stages (resumable); after each stage
//!    a white-box reading-mode audit — *supervised* (the student reads the harvest) and
//!    *unsupervised* (it reads the new outputs) — which gives p-value against harvest
//!    tokens trained on.
//! 4. **Audits** of the final students: reading mode as above and black-box: the student
//!    answers held-out prompts (never harvested) through `Student::generate` and the
//!    answers are scored with the prompts' windows excluded (`isotope_audit::score`).
//! 5. **Report**: `report.json` and `report.html` (inline SVG plots) in `OUT`: p-value
//!    vs harvest tokens, both loss curves, the sentinel's alerts and the harvester's
//!    levels over time, and what the harvest cost at the configured price.
//!
//! No result is fixed in advance: whatever the audits measure is reported, including a
//! watermarked student that is not detected.

pub mod report;
mod svg;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use isotope_audit::{
    score, top1_predictions, top_predictions, AuditResult, Evidence, EvidenceText, Mode,
    ReadingStatistic, Scoring, READING_TOP,
};
use isotope_distill::{
    chatml_prompt, load_jsonl, read_train_log, train, DType, DataOptions, Device, HarvestConfig,
    HarvestProgress, HarvestRecord, Prompt, Student, StudentConfig, StudentTokenizer, TrainConfig,
    CHATML_END,
};
use isotope_engine::Model;
use isotope_sampling::{Sampler, SamplingParams};
use isotope_server::ServerConfig;
use isotope_store::{KeyLimits, Store};
use isotope_watermark::WatermarkKey;
use serde::{Deserialize, Serialize};

pub use report::Report;

/// Errors of a red-team run.
#[derive(Debug, thiserror::Error)]
pub enum RedteamError {
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
    #[error("the {arm} teacher server: {message}")]
    Server { arm: String, message: String },
    #[error(transparent)]
    Store(#[from] isotope_store::StoreError),
    #[error(transparent)]
    Distill(#[from] isotope_distill::DistillError),
    #[error(transparent)]
    Audit(#[from] isotope_audit::AuditError),
    #[error("watermark key: {0}")]
    Key(String),
}

pub type Result<T, E = RedteamError> = std::result::Result<T, E>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RedteamError + '_ {
    move |source| RedteamError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Everything a run is sized by. Field names are the config file's keys.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedteamConfig {
    /// Output directory (report, harvests, students, servers' stores).
    pub out: PathBuf,
    /// The teacher GGUF.
    pub model: PathBuf,
    /// Watermark scheme of the teacher (a small window, h ≤ 2, is what a student
    /// trained from scratch on ~100k tokens can absorb: each window recurs often).
    pub scheme: String,
    /// Harvest prompts (JSONL: `prompt`, `instruction`, `question`).
    pub prompt_file: PathBuf,
    /// Harvest prompts used (the first N usable lines): an upper bound, see
    /// `harvest_minutes`.
    pub prompts: usize,
    /// Minutes each arm's harvest may take (0: no limit). The watermarked arm starts
    /// no request after this long; the control arm then answers exactly the prompts
    /// the watermarked arm got, so both arms see the same prompts. It keeps the
    /// default run inside its time budget on any machine: a fast one harvests all
    /// `prompts`, a slow one fewer (the report says how many tokens each arm got).
    #[serde(default = "default_harvest_minutes")]
    pub harvest_minutes: f64,
    /// `max_tokens` of every harvest request.
    pub max_tokens: u32,
    /// Sampling temperature asked for by the harvester.
    pub temperature: f32,
    /// Harvest requests in flight.
    pub concurrency: usize,
    /// Accounts the attacker may burn (a blocked account is replaced by a new one).
    pub max_accounts: usize,
    /// Human-written instructions for the benign accounts.
    pub benign_file: PathBuf,
    pub benign_accounts: usize,
    /// Requests per benign account.
    pub benign_requests: usize,
    /// Held-out prompts for the black-box audit (never harvested).
    pub heldout_file: PathBuf,
    pub heldout_prompts: usize,
    /// `max_tokens` of the students' black-box answers.
    pub heldout_max_tokens: usize,
    /// Temperature the auditor samples the students' black-box answers at — its own
    /// choice, not the harvest's. A moderate one: at 1.0 a small student's answers are
    /// mostly draws from its flat tail, which carry no trace of what it learned; near 0
    /// it repeats itself and the deduplication leaves few tuples.
    #[serde(default = "default_audit_temperature")]
    pub audit_temperature: f32,
    /// `tiny`, `small`, or a llama GGUF to initialise the students from.
    pub student: String,
    pub epochs: usize,
    pub batch_size: usize,
    pub seq_len: usize,
    pub lr: f64,
    /// Training stages, each followed by a reading-mode audit (points of the
    /// p-value-vs-tokens curve).
    pub checkpoints: usize,
    /// Harvested texts the students read in the supervised reading-mode audit (at
    /// most); the unsupervised one reads the teacher's answers to the held-out prompts.
    pub audit_texts: usize,
    /// Sentinel on in the watermarked teacher (default on).
    pub sentinel: bool,
    /// Replace the sentinel model's calibrated flag threshold (experiments only).
    pub flag_threshold: Option<f64>,
    /// Price of the teacher's API, per million tokens (prompt + completion).
    pub price_per_million_tokens: f64,
    /// Sequences the teacher decodes together.
    pub slots: usize,
    /// llama.cpp threads (default: all cores).
    pub threads: Option<usize>,
    pub seed: u64,
    /// Extra students trained on mixtures: for each fraction f, a random f of the
    /// harvest prompts (nested: the 5% set lies inside the 25% set) are answered by
    /// the watermarked teacher and the rest by the control teacher, same prompts and
    /// about the same tokens as the two arms — the power of the audit vs the share of
    /// watermarked data in a student's training set. Empty: the two arms only.
    #[serde(default)]
    pub mixes: Vec<f64>,
}

impl Default for RedteamConfig {
    fn default() -> Self {
        Self {
            out: PathBuf::from("redteam-out"),
            model: PathBuf::from("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
            scheme: "kgw:gamma=0.25,delta=2,h=1,seeding=left".into(),
            prompt_file: PathBuf::from("data/gsm8k/train.jsonl"),
            prompts: 400,
            harvest_minutes: default_harvest_minutes(),
            max_tokens: 200,
            temperature: 1.0,
            concurrency: 4,
            max_accounts: 3,
            benign_file: PathBuf::from("data/self-instruct/user_oriented_instructions.jsonl"),
            benign_accounts: 2,
            benign_requests: 6,
            heldout_file: PathBuf::from("data/gsm8k/test.jsonl"),
            heldout_prompts: 80,
            heldout_max_tokens: 128,
            audit_temperature: default_audit_temperature(),
            student: "tiny".into(),
            epochs: 4,
            batch_size: 4,
            seq_len: 320,
            lr: 1e-3,
            checkpoints: 4,
            audit_texts: 200,
            sentinel: true,
            flag_threshold: None,
            price_per_million_tokens: 0.5,
            slots: 4,
            threads: None,
            seed: 0,
            mixes: Vec::new(),
        }
    }
}

/// 6 minutes per arm. Training time scales with the tokens harvested, so on any
/// machine each student takes about half its harvest's time (4 epochs); with the
/// teacher's answers for the unsupervised reading and the audits, the default run
/// takes about 22 minutes on a 2-core machine where the teacher writes ~165 tokens/s
/// and stays within 30 on one half as fast.
fn default_harvest_minutes() -> f64 {
    6.0
}

fn default_audit_temperature() -> f32 {
    0.7
}

impl RedteamConfig {
    /// The harvest's time limit per arm (`None`: no limit).
    fn harvest_limit(&self) -> Option<Duration> {
        (self.harvest_minutes > 0.0).then(|| Duration::from_secs_f64(self.harvest_minutes * 60.0))
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(RedteamError::Config(m.into()));
        if self.prompts == 0 || self.max_tokens == 0 || self.concurrency == 0 {
            return bad("prompts, max_tokens and concurrency must be at least 1");
        }
        if self.epochs == 0 || self.batch_size == 0 || self.checkpoints == 0 {
            return bad("epochs, batch_size and checkpoints must be at least 1");
        }
        if self.max_accounts == 0 {
            return bad("max_accounts must be at least 1");
        }
        if self.mixes.iter().any(|f| !(*f > 0.0 && *f < 1.0)) {
            return bad(
                "each mix fraction must lie strictly between 0 and 1 (the arms are 1 and 0)",
            );
        }
        if !(self.harvest_minutes >= 0.0 && self.harvest_minutes < 1e6) {
            return bad("harvest_minutes must be a non-negative number (0: no limit)");
        }
        if !(self.audit_temperature >= 0.0 && self.audit_temperature <= 2.0) {
            return bad("audit_temperature must lie between 0 and 2");
        }
        if !(self.price_per_million_tokens >= 0.0 && self.price_per_million_tokens.is_finite()) {
            return bad("price_per_million_tokens must be a non-negative number");
        }
        if !self.model.exists() {
            return Err(RedteamError::Config(format!(
                "teacher model {} not found: run `scripts/setup.sh`, or pass --model",
                self.model.display()
            )));
        }
        Ok(())
    }
}

/// What the caller is told while a run goes on (for progress bars).
pub enum Event<'a> {
    /// A new stage starts; `total` items (prompts, steps) when known.
    Stage {
        name: String,
        total: u64,
    },
    Harvest(&'a HarvestProgress),
    Train(&'a isotope_distill::Progress),
    /// Items done in the current stage (audits, generation).
    Step(u64),
    /// Something worth a line on stderr.
    Note(String),
}

/// The two arms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arm {
    Watermarked,
    Control,
}

impl Arm {
    pub fn name(self) -> &'static str {
        match self {
            Arm::Watermarked => "watermarked",
            Arm::Control => "control",
        }
    }
}

/// What the run's harvests amounted to (kept in `OUT/ARM/harvest.json` so a rerun
/// does not start a server for a finished harvest).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HarvestSummary {
    pub records: usize,
    pub prompts: usize,
    pub completion_tokens: u64,
    pub prompt_tokens: u64,
    pub requests: u64,
    pub rate_limited: u64,
    pub retries: u64,
    /// Accounts the harvester used (more than one: it was blocked and came back).
    pub accounts: Vec<String>,
    /// Why a harvest run stopped early, per account.
    pub stops: Vec<String>,
    pub elapsed_secs: f64,
    /// Benign requests answered.
    pub benign_records: usize,
    /// The arm's time limit (`harvest_minutes`) stopped it before every prompt was
    /// answered.
    #[serde(default)]
    pub time_limited: bool,
}

/// One point of the p-value-vs-tokens curve.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AuditPoint {
    pub step: usize,
    pub total_steps: usize,
    /// Harvested completion tokens processed in training so far (passes counted).
    pub harvest_tokens_trained: u64,
    /// Headline reading-mode p-value (corrected over both variants).
    pub p_value: f64,
    /// Reading the teacher's new outputs (`None`: none were available).
    #[serde(default)]
    pub unsupervised_p: Option<f64>,
    /// Reading the harvest.
    pub supervised_p: Option<f64>,
    pub scored_tokens: u64,
    /// Texts the supervised reading read. A kept point is reused only when this
    /// matches (points of older runs, without it, are read again).
    #[serde(default)]
    pub supervised_texts: Option<usize>,
}

/// Open the store of a server directory.
async fn open_store(dir: &Path) -> Result<Arc<dyn Store>> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    Ok(isotope_store::open(&format!("sqlite://{}", dir.join("isotope.db").display())).await?)
}

/// API keys of the run's accounts, created once and kept (0600) for reruns.
async fn account_keys(
    store: &dyn Store,
    path: &Path,
    names: &[String],
) -> Result<BTreeMap<String, String>> {
    let mut keys: BTreeMap<String, String> = match std::fs::read_to_string(path) {
        Ok(t) => serde_json::from_str(&t).unwrap_or_default(),
        Err(_) => BTreeMap::new(),
    };
    let mut changed = false;
    for n in names {
        if !keys.contains_key(n) {
            let k = store.create_api_key(n, KeyLimits::default()).await?;
            keys.insert(n.clone(), k.token);
            changed = true;
        }
    }
    if changed {
        let _ = std::fs::remove_file(path);
        isotope_server::write_private(
            path,
            serde_json::to_string_pretty(&keys)
                .expect("serialises")
                .as_bytes(),
        )
        .map_err(|e| RedteamError::Config(format!("{e:#}")))?;
    }
    Ok(keys)
}

/// A running in-process teacher server.
struct Teacher {
    addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow_free::Result>,
    arm: Arm,
}

/// The server's `anyhow::Result`, flattened to a string so this crate's errors stay
/// `thiserror`.
mod anyhow_free {
    pub type Result = std::result::Result<(), String>;
}

impl Teacher {
    async fn start(cfg: ServerConfig, arm: Arm) -> Result<Teacher> {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut task = tokio::spawn(async move {
            isotope_server::serve(
                cfg,
                async move {
                    let _ = stop_rx.await;
                },
                move |r| {
                    let _ = ready_tx.send(r.addr);
                },
            )
            .await
            .map_err(|e| format!("{e:#}"))
        });
        let server_err = |message: String| RedteamError::Server {
            arm: arm.name().into(),
            message,
        };
        let addr = tokio::select! {
            a = ready_rx => a.map_err(|_| server_err("stopped before it was ready".into()))?,
            r = &mut task => {
                let m = match r {
                    Ok(Err(e)) => e,
                    Ok(Ok(())) => "stopped before it was ready".into(),
                    Err(e) => e.to_string(),
                };
                return Err(server_err(m));
            }
        };
        // `/health` is 200 once the LLM and the sentinel model are loaded.
        let client = reqwest::Client::new();
        let started = Instant::now();
        loop {
            let ok = client
                .get(format!("http://{addr}/health"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                break;
            }
            if started.elapsed() > Duration::from_secs(600) {
                return Err(server_err("not healthy after 10 minutes".into()));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Ok(Teacher {
            addr,
            stop: Some(stop_tx),
            task,
            arm,
        })
    }

    async fn stop(mut self) -> Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match (&mut self.task).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(m)) => Err(RedteamError::Server {
                arm: self.arm.name().into(),
                message: m,
            }),
            Err(e) => Err(RedteamError::Server {
                arm: self.arm.name().into(),
                message: e.to_string(),
            }),
        }
    }
}

fn server_config(cfg: &RedteamConfig, arm: Arm, dir: &Path, key: &Path) -> ServerConfig {
    let mut s = ServerConfig {
        addr: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        model: cfg.model.clone(),
        data_dir: dir.to_path_buf(),
        watermark_key: Some(key.to_path_buf()),
        scheme: cfg.scheme.clone(),
        watermark: arm == Arm::Watermarked,
        slots: cfg.slots.max(1),
        ctx_per_slot: 1024,
        threads: cfg.threads,
        queue: 256,
        ..ServerConfig::default()
    };
    s.sentinel.enabled = arm == Arm::Watermarked && cfg.sentinel;
    s.sentinel.flag_threshold = cfg.flag_threshold;
    s
}

fn read_records(path: &Path) -> Result<Vec<HarvestRecord>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(path)(e)),
    };
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

fn first_prompts(path: &Path, n: usize) -> Result<Vec<Prompt>> {
    let (mut p, _) = isotope_distill::read_prompts(path)?;
    p.truncate(n);
    if p.is_empty() && n > 0 {
        return Err(RedteamError::Config(format!(
            "no usable prompts in {}",
            path.display()
        )));
    }
    Ok(p)
}

/// Harvest one arm (skipped when `OUT/ARM/harvest.json` says it is complete).
async fn harvest_arm(
    cfg: &RedteamConfig,
    arm: Arm,
    key_path: &Path,
    prompts: &[Prompt],
    events: &mut (dyn FnMut(Event) + Send),
) -> Result<HarvestSummary> {
    let dir = cfg.out.join(arm.name());
    let summary_path = dir.join("harvest.json");
    if let Ok(t) = std::fs::read_to_string(&summary_path) {
        if let Ok(s) = serde_json::from_str::<HarvestSummary>(&t) {
            events(Event::Note(format!(
                "{}: harvest already done ({} records), not repeated",
                arm.name(),
                s.records
            )));
            return Ok(s);
        }
    }
    let server_dir = dir.join("server");
    let store = open_store(&server_dir).await?;
    let keys_path = dir.join("api-keys.json");
    let benign: Vec<String> = if arm == Arm::Watermarked {
        (1..=cfg.benign_accounts)
            .map(|i| format!("benign-{i}"))
            .collect()
    } else {
        Vec::new()
    };
    let mut names = vec!["harvester-1".to_owned()];
    names.extend(benign.iter().cloned());
    let mut keys = account_keys(store.as_ref(), &keys_path, &names).await?;
    events(Event::Stage {
        name: format!("{}: starting the teacher server", arm.name()),
        total: 0,
    });
    let teacher = Teacher::start(server_config(cfg, arm, &server_dir, key_path), arm).await?;
    let endpoint = format!("http://{}", teacher.addr);
    let started = Instant::now();

    // Benign traffic alongside: one request at a time per account, paced.
    let benign_prompts = first_prompts(&cfg.benign_file, cfg.benign_accounts * cfg.benign_requests)
        .unwrap_or_default();
    let mut benign_tasks = Vec::new();
    for (i, name) in benign.iter().enumerate() {
        let ps: Vec<Prompt> = benign_prompts
            .iter()
            .skip(i * cfg.benign_requests)
            .take(cfg.benign_requests)
            .enumerate()
            .map(|(j, p)| Prompt {
                index: j,
                ..p.clone()
            })
            .collect();
        let hc = HarvestConfig {
            endpoint: endpoint.clone(),
            api_key: keys.get(name).cloned(),
            concurrency: 1,
            rps: Some(0.2),
            max_tokens: cfg.max_tokens,
            seed: Some(cfg.seed + 1_000 + i as u64),
            max_retries: 2,
            ..HarvestConfig::default()
        };
        let out = dir.join(format!("{name}.jsonl"));
        benign_tasks.push(tokio::spawn(async move {
            isotope_distill::harvest(&hc, &ps, &out, &mut |_| {}).await
        }));
    }

    events(Event::Stage {
        name: format!("{}: harvesting", arm.name()),
        total: prompts.len() as u64,
    });
    let out = dir.join("harvest.jsonl");
    let mut summary = HarvestSummary {
        prompts: prompts.len(),
        ..HarvestSummary::default()
    };
    let mut account = 1usize;
    let mut rounds = 0;
    loop {
        let name = format!("harvester-{account}");
        if !keys.contains_key(&name) {
            keys = account_keys(store.as_ref(), &keys_path, std::slice::from_ref(&name)).await?;
        }
        if !summary.accounts.contains(&name) {
            summary.accounts.push(name.clone());
        }
        let hc = HarvestConfig {
            endpoint: endpoint.clone(),
            api_key: keys.get(&name).cloned(),
            concurrency: cfg.concurrency,
            max_tokens: cfg.max_tokens,
            temperature: Some(cfg.temperature),
            seed: Some(cfg.seed),
            // one budget for the arm, across the accounts it burns
            time_limit: cfg
                .harvest_limit()
                .map(|l| l.saturating_sub(started.elapsed())),
            ..HarvestConfig::default()
        };
        let r =
            isotope_distill::harvest(&hc, prompts, &out, &mut |p| events(Event::Harvest(p))).await;
        rounds += 1;
        match r {
            Ok(rep) => {
                summary.requests += rep.requests;
                summary.rate_limited += rep.rate_limited;
                summary.retries += rep.retries;
                if rep.time_limited {
                    summary.time_limited = true;
                    summary.stops.push(format!(
                        "{name}: time limit ({} min) reached, {} prompts not asked",
                        cfg.harvest_minutes, rep.missing
                    ));
                    events(Event::Note(format!(
                        "{}: harvest stopped at its time limit ({} min); {} of {} prompts \
                         answered",
                        arm.name(),
                        cfg.harvest_minutes,
                        rep.total - rep.missing,
                        rep.total
                    )));
                    break;
                }
                if rep.missing == 0 || rounds >= cfg.max_accounts + 2 {
                    if rep.missing > 0 {
                        summary.stops.push(format!(
                            "{name}: {} records still missing ({})",
                            rep.missing,
                            rep.last_error.unwrap_or_default()
                        ));
                    }
                    break;
                }
            }
            Err(e) => {
                summary.stops.push(format!("{name}: {e}"));
                events(Event::Note(format!("{}: {name} stopped: {e}", arm.name())));
                if account >= cfg.max_accounts {
                    break;
                }
                account += 1;
            }
        }
    }
    summary.elapsed_secs = started.elapsed().as_secs_f64();
    for t in benign_tasks {
        match t.await {
            Ok(Ok(r)) => summary.benign_records += r.existing + r.written,
            Ok(Err(e)) => summary.stops.push(format!("benign: {e}")),
            Err(e) => summary.stops.push(format!("benign task: {e}")),
        }
    }
    teacher.stop().await?;
    let records = read_records(&out)?;
    summary.records = records.len();
    for r in &records {
        let u = r.usage.as_ref();
        let get = |k: &str| u.and_then(|u| u[k].as_u64()).unwrap_or(0);
        summary.completion_tokens += get("completion_tokens");
        summary.prompt_tokens += get("prompt_tokens");
    }
    store.close().await;
    std::fs::write(
        &summary_path,
        serde_json::to_string_pretty(&summary).expect("serialises"),
    )
    .map_err(io_err(&summary_path))?;
    Ok(summary)
}

/// New watermarked outputs for the *unsupervised* reading-mode audit: the watermarked
/// teacher's answers to the held-out prompts, which no student trains on
/// (`watermarked/fresh.jsonl`). The provider asks them itself — an `auditor` account
/// on a teacher of its own (same model, key and scheme; sentinel off, own store), so
/// they are neither part of the harvest nor in the sentinel's timeline. Resumable like
/// any harvest.
async fn fresh_texts(
    cfg: &RedteamConfig,
    key_path: &Path,
    heldout: &[Prompt],
    events: &mut (dyn FnMut(Event) + Send),
) -> Result<Vec<HarvestRecord>> {
    let dir = cfg.out.join(Arm::Watermarked.name());
    let out = dir.join("fresh.jsonl");
    if let Ok(done) = read_records(&out) {
        if done.len() >= heldout.len() {
            return Ok(done);
        }
    }
    let server_dir = dir.join("fresh-server");
    let store = open_store(&server_dir).await?;
    let keys = account_keys(
        store.as_ref(),
        &server_dir.join("api-keys.json"),
        &["auditor".to_owned()],
    )
    .await?;
    let mut sc = server_config(cfg, Arm::Watermarked, &server_dir, key_path);
    sc.sentinel.enabled = false;
    events(Event::Stage {
        name: "watermarked: new outputs for the unsupervised reading".into(),
        total: heldout.len() as u64,
    });
    let teacher = Teacher::start(sc, Arm::Watermarked).await?;
    let hc = HarvestConfig {
        endpoint: format!("http://{}", teacher.addr),
        api_key: keys.get("auditor").cloned(),
        concurrency: cfg.concurrency,
        max_tokens: cfg.max_tokens,
        temperature: Some(cfg.temperature),
        seed: Some(cfg.seed + 2_000),
        ..HarvestConfig::default()
    };
    let r = isotope_distill::harvest(&hc, heldout, &out, &mut |p| events(Event::Harvest(p))).await;
    teacher.stop().await?;
    store.close().await;
    r?;
    read_records(&out)
}

/// The run's watermark key: `OUT/watermark.key`, generated (0600) on first run.
fn run_key(out: &Path) -> Result<(Arc<WatermarkKey>, PathBuf)> {
    let path = out.join("watermark.key");
    if !path.exists() {
        let k = WatermarkKey::generate().map_err(|e| RedteamError::Key(e.to_string()))?;
        isotope_server::write_private(&path, k.to_file_string().as_bytes())
            .map_err(|e| RedteamError::Key(format!("{e:#}")))?;
    }
    let k = isotope_server::read_key(&path).map_err(|e| RedteamError::Key(format!("{e:#}")))?;
    Ok((k, path))
}

fn evidence_text(model: &Model, source: String, text: String) -> EvidenceText {
    EvidenceText {
        tokens: model.tokenize(&text, false, false),
        source,
        text,
        predictions: None,
        top: None,
    }
}

/// Harvest answers as texts to read (each named by its record id).
fn answer_texts<'a>(
    model: &Model,
    records: impl IntoIterator<Item = &'a HarvestRecord>,
) -> Vec<EvidenceText> {
    records
        .into_iter()
        .map(|r| evidence_text(model, r.id.clone(), r.response.clone()))
        .collect()
}

/// Reading-mode audit of `student`: it reads `fresh` (new outputs of ours it did not
/// train on: the *unsupervised* variant) and `ours` (the harvest it may have trained
/// on: the *supervised* variant).
fn reading_audit(
    student: &Student,
    fresh: &[EvidenceText],
    ours: &[EvidenceText],
    keys: &[Arc<WatermarkKey>],
    scoring: &Scoring,
) -> Result<AuditResult> {
    let read = |texts: &[EvidenceText]| -> Result<Vec<EvidenceText>> {
        let mut texts = texts.to_vec();
        for t in &mut texts {
            if scoring.reading == ReadingStatistic::Mass {
                let top = top_predictions(student, &t.tokens, READING_TOP)?;
                t.predictions = Some(top.iter().map(|c| c[0].0).collect());
                t.top = Some(top);
            } else {
                t.predictions = Some(top1_predictions(student, &t.tokens)?);
            }
        }
        Ok(texts)
    };
    let ev = Evidence {
        prompts: Vec::new(),
        texts: read(fresh)?,
        supervised: read(ours)?,
    };
    Ok(score(Mode::Reading, &ev, keys, scoring, |_| {})?)
}

/// Black-box audit: the student answers held-out prompts; the answers are scored with
/// the prompts' windows excluded.
#[allow(clippy::too_many_arguments)]
fn black_box_audit(
    cfg: &RedteamConfig,
    student: &Student,
    tok: &StudentTokenizer,
    model: &Model,
    heldout: &[Prompt],
    keys: &[Arc<WatermarkKey>],
    scoring: &Scoring,
    out: &Path,
    events: &mut (dyn FnMut(Event) + Send),
) -> Result<AuditResult> {
    let stop: Vec<u32> = tok.token_id(CHATML_END).into_iter().collect();
    let mut ev = Evidence::default();
    let mut lines = String::new();
    for (i, p) in heldout.iter().enumerate() {
        let prompt_ids = tok.encode(&chatml_prompt(&p.text, None))?;
        let params = SamplingParams {
            temperature: cfg.audit_temperature,
            seed: cfg.seed + i as u64,
            ..SamplingParams::default()
        };
        let mut sampler = Sampler::new(params, 0);
        let mut ids = student.generate(&prompt_ids, &mut sampler, cfg.heldout_max_tokens, &stop)?;
        ids.retain(|t| !stop.contains(t));
        let text = tok.decode(&ids)?;
        lines.push_str(&serde_json::json!({"prompt": p.text, "response": text}).to_string());
        lines.push('\n');
        ev.prompts.push(evidence_text(
            model,
            format!("heldout:{}", p.line),
            p.text.clone(),
        ));
        ev.texts
            .push(evidence_text(model, format!("answer:{}", p.line), text));
        events(Event::Step(i as u64 + 1));
    }
    std::fs::write(out, lines).map_err(io_err(out))?;
    Ok(score(Mode::BlackBox, &ev, keys, scoring, |_| {})?)
}

/// One arm's student: staged training with a reading audit after every stage, then
/// the black-box audit.
#[allow(clippy::too_many_arguments)]
fn student_arm(
    cfg: &RedteamConfig,
    name: &str,
    tok: &StudentTokenizer,
    model: &Model,
    fresh: &[EvidenceText],
    ours: &[EvidenceText],
    heldout: &[Prompt],
    keys: &[Arc<WatermarkKey>],
    scoring: &Scoring,
    events: &mut (dyn FnMut(Event) + Send),
) -> Result<(report::ArmStudent, Student)> {
    let dir = cfg.out.join(name);
    let data_path = dir.join("harvest.jsonl");
    let data = load_jsonl(&data_path, Some(tok), &DataOptions::default())?;
    let response_tokens: u64 = data.examples.iter().map(|e| e.response_len() as u64).sum();
    let student = match cfg.student.as_str() {
        "tiny" | "small" => Student::new(
            StudentConfig::preset(&cfg.student)?,
            cfg.seed,
            &Device::Cpu,
            DType::F32,
        )?,
        path => Student::from_gguf(Path::new(path), &Device::Cpu)?,
    };
    let student_dir = dir.join("student");
    let points_path = dir.join("audit-points.json");
    let mut points: Vec<AuditPoint> = std::fs::read_to_string(&points_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    points.retain(|p| p.supervised_texts == Some(ours.len()));
    let per_epoch = data.examples.len().div_ceil(cfg.batch_size);
    let total = per_epoch * cfg.epochs;
    let mut last = None;
    // the last stage's reading audit is the final one (re-done only when a resumed
    // run skipped that stage)
    let mut last_reading = None;
    for k in 1..=cfg.checkpoints {
        let stop = (total * k).div_ceil(cfg.checkpoints).max(1);
        events(Event::Stage {
            name: format!(
                "{name}: training the student, stage {k}/{}",
                cfg.checkpoints
            ),
            total: stop as u64,
        });
        let tc = TrainConfig {
            epochs: cfg.epochs,
            batch_size: cfg.batch_size,
            seq_len: cfg.seq_len,
            lr: cfg.lr,
            seed: cfg.seed,
            stop_after: Some(stop),
            checkpoint_every: 0,
            resume: true,
            ..TrainConfig::default()
        };
        let rep = train(&student, &data, Some(tok), &tc, &student_dir, &mut |p| {
            events(Event::Train(p))
        })?;
        if points.iter().any(|p| p.step == rep.steps) {
            last = Some(rep);
            last_reading = None;
            continue;
        }
        events(Event::Stage {
            name: format!("{name}: reading-mode audit at step {}", rep.steps),
            total: 0,
        });
        let r = reading_audit(&student, fresh, ours, keys, scoring)?;
        let variant = |n: &str| r.variants.iter().find(|v| v.name == n).map(|v| v.p_value);
        points.push(AuditPoint {
            step: rep.steps,
            total_steps: rep.total_steps,
            harvest_tokens_trained: (response_tokens as f64 * rep.steps as f64
                / per_epoch.max(1) as f64)
                .round() as u64,
            p_value: r.p_value,
            unsupervised_p: variant("unsupervised"),
            supervised_p: variant("supervised"),
            scored_tokens: r.scored_tokens,
            supervised_texts: Some(ours.len()),
        });
        std::fs::write(
            &points_path,
            serde_json::to_string_pretty(&points).expect("serialises"),
        )
        .map_err(io_err(&points_path))?;
        last = Some(rep);
        last_reading = Some(r);
    }
    let rep = last.expect("at least one stage");
    events(Event::Stage {
        name: format!("{name}: final audits"),
        total: heldout.len() as u64,
    });
    let reading = match last_reading {
        Some(r) => r,
        None => reading_audit(&student, fresh, ours, keys, scoring)?,
    };
    let black_box = black_box_audit(
        cfg,
        &student,
        tok,
        model,
        heldout,
        keys,
        scoring,
        &dir.join("heldout-answers.jsonl"),
        events,
    )?;
    let log = read_train_log(&student_dir)?;
    let arm = report::ArmStudent {
        params: rep.params,
        examples: rep.examples,
        steps: rep.steps,
        first_loss: rep.first_loss,
        final_loss: rep.final_loss,
        tokens_per_sec: rep.tokens_per_sec,
        response_tokens,
        loss_curve: log.iter().map(|e| (e.step, e.loss)).collect(),
        points,
        reading,
        black_box,
    };
    Ok((arm, student))
}

/// Directory name of the mixture with watermarked share `fraction` (`mix-25`, `mix-5`,
/// `mix-2.5`).
fn mix_name(fraction: f64) -> String {
    let pct = (fraction * 1000.0).round() / 10.0;
    format!("mix-{pct}")
}

/// Write `OUT/NAME/harvest.jsonl`: every prompt both arms answered, from the
/// watermarked arm (`wm`) for a seeded random `fraction` of them and from the control
/// arm (`control`) for the rest. One permutation per run, so the watermarked prompts
/// of a smaller fraction are a subset of a larger one's (the mixtures differ only in
/// what they add). Returns the mixture's size and its watermarked answers: what we
/// served to a harvester whose training set this is.
fn write_mix(
    cfg: &RedteamConfig,
    wm: &[HarvestRecord],
    control: &[HarvestRecord],
    fraction: f64,
    name: &str,
) -> Result<(usize, Vec<HarvestRecord>)> {
    let control: HashMap<&str, &HarvestRecord> =
        control.iter().map(|r| (r.id.as_str(), r)).collect();
    let mut pairs: Vec<(&HarvestRecord, &HarvestRecord)> = wm
        .iter()
        .filter_map(|w| control.get(w.id.as_str()).map(|c| (w, *c)))
        .collect();
    // Harvest order depends on which request finished first; sort by id first so the
    // permutation, and so the mixture, is a function of the seed alone.
    pairs.sort_by(|a, b| a.0.id.cmp(&b.0.id));
    let order = isotope_distill::shuffled_order(cfg.seed ^ 0x6d69_7865_735f_7631, 0, pairs.len());
    let take = (fraction * pairs.len() as f64).round() as usize;
    let mut from_wm = vec![false; pairs.len()];
    for &i in order.iter().take(take) {
        from_wm[i] = true;
    }
    let dir = cfg.out.join(name);
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let path = dir.join("harvest.jsonl");
    let mut text = String::new();
    let mut served = Vec::with_capacity(take);
    for (&(w, c), wm) in pairs.iter().zip(&from_wm) {
        let r = if *wm { w } else { c };
        text.push_str(&serde_json::to_string(r).expect("serialises"));
        text.push('\n');
        if *wm {
            served.push(w.clone());
        }
    }
    std::fs::write(&path, text).map_err(io_err(&path))?;
    Ok((pairs.len(), served))
}

/// Everything the sentinel did in the watermarked teacher, from its store.
async fn sentinel_timeline(cfg: &RedteamConfig) -> Result<report::SentinelReport> {
    let store = open_store(&cfg.out.join(Arm::Watermarked.name()).join("server")).await?;
    let accounts: HashMap<i64, String> = store
        .list_accounts()
        .await?
        .into_iter()
        .map(|a| (a.id, a.name))
        .collect();
    let mut events = Vec::new();
    let mut after = 0;
    loop {
        let page = store.usage_events_since(after, 5_000).await?;
        let Some(last) = page.last() else { break };
        after = last.id;
        events.extend(page);
    }
    let alerts = store.list_alerts(0, 100_000).await?;
    store.close().await;
    let t0 = events.iter().map(|e| e.created_at_ms).min().unwrap_or(0);
    let mut per: BTreeMap<String, report::AccountTimeline> = BTreeMap::new();
    for e in &events {
        let name = accounts
            .get(&e.account_id)
            .cloned()
            .unwrap_or_else(|| e.account_id.to_string());
        let level = e
            .policy
            .as_deref()
            .and_then(|p| serde_json::from_str::<serde_json::Value>(p).ok())
            .and_then(|v| v["level"].as_str().map(str::to_owned))
            .unwrap_or_else(|| "observe".into());
        let t = per
            .entry(name.clone())
            .or_insert_with(|| report::AccountTimeline {
                account: name,
                ..Default::default()
            });
        t.requests += 1;
        t.prompt_tokens += u64::from(e.prompt_tokens);
        t.completion_tokens += u64::from(e.completion_tokens);
        if e.status >= 400 {
            t.refused += 1;
        }
        t.points.push(report::TimelinePoint {
            minutes: (e.created_at_ms - t0) as f64 / 60_000.0,
            completion_tokens: t.completion_tokens,
            level: level.clone(),
        });
        if level != "observe" && t.first_restricted_minutes.is_none() {
            t.first_restricted_minutes = Some((e.created_at_ms - t0) as f64 / 60_000.0);
        }
        t.final_level = level;
    }
    Ok(report::SentinelReport {
        enabled: cfg.sentinel,
        start_ms: t0,
        alerts: alerts
            .iter()
            .map(|a| report::AlertRow {
                minutes: (a.created_at_ms - t0) as f64 / 60_000.0,
                account: a
                    .account_id
                    .and_then(|id| accounts.get(&id).cloned())
                    .unwrap_or_default(),
                level: a.level.clone(),
                score: a.score,
                reasons: a.reasons.clone(),
            })
            .collect(),
        accounts: per.into_values().collect(),
    })
}

/// Settings a finished harvest was made with: changing one makes a kept harvest
/// mean something else.
const HARVEST_SETTINGS: &[&str] = &[
    "model",
    "scheme",
    "prompt_file",
    "prompts",
    "harvest_minutes",
    "max_tokens",
    "temperature",
    "max_accounts",
    "benign_file",
    "benign_accounts",
    "benign_requests",
    "heldout_file",
    "heldout_prompts",
    "sentinel",
    "flag_threshold",
    "seed",
];

/// Settings a kept student, its audit points or its black-box answers were made
/// with.
const STUDENT_SETTINGS: &[&str] = &[
    "student",
    "epochs",
    "batch_size",
    "seq_len",
    "lr",
    "checkpoints",
    "audit_texts",
    "heldout_file",
    "heldout_prompts",
    "heldout_max_tokens",
    "audit_temperature",
    "seed",
];

/// A rerun resumes what `cfg.out` already holds (harvests, students, audit points),
/// so it must ask for what that work was made with: else the report would mix, say,
/// 4-epoch audit points into an 8-epoch run under the new settings' name. Refuses,
/// naming each changed setting, when finished work of that kind exists. Settings
/// that change no kept result (threads, slots, concurrency, price, mixtures) may
/// differ.
fn check_resume(cfg: &RedteamConfig, config_path: &Path) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(config_path) else {
        return Ok(());
    };
    let Ok(old) = serde_json::from_str::<RedteamConfig>(&text) else {
        return Err(RedteamError::Config(format!(
            "{} is not a red-team config this isotope reads: use a new --out",
            config_path.display()
        )));
    };
    let out = &cfg.out;
    let arms_and_mixes = || {
        std::fs::read_dir(out)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir())
    };
    let harvested = arms_and_mixes().any(|d| d.join("harvest.json").exists())
        || out
            .join(Arm::Watermarked.name())
            .join("fresh.jsonl")
            .exists();
    let trained = arms_and_mixes().any(|d| d.join("student").exists());
    let changed = changed_settings(&old, cfg, harvested, trained);
    if changed.is_empty() {
        return Ok(());
    }
    Err(RedteamError::Config(format!(
        "{} holds finished work made with other settings ({}); a rerun resumes it only \
         with the same ones. Use a new --out (copying an arm's harvest.json and \
         harvest.jsonl there reuses its harvest), or the settings in {}",
        out.display(),
        changed.join(", "),
        config_path.display()
    )))
}

/// `name old → new` for each setting of the groups whose work exists that differs.
fn changed_settings(
    old: &RedteamConfig,
    new: &RedteamConfig,
    harvested: bool,
    trained: bool,
) -> Vec<String> {
    let (a, b) = (
        serde_json::to_value(old).expect("serialises"),
        serde_json::to_value(new).expect("serialises"),
    );
    let mut names: Vec<&str> = Vec::new();
    if harvested {
        names.extend(HARVEST_SETTINGS);
    }
    if trained {
        for n in STUDENT_SETTINGS {
            if !names.contains(n) {
                names.push(n);
            }
        }
    }
    names
        .into_iter()
        .filter(|n| a.get(n) != b.get(n))
        .map(|n| {
            let show = |v: Option<&serde_json::Value>| {
                v.map_or_else(|| "unset".to_owned(), |v| v.to_string())
            };
            format!("{n} {} → {}", show(a.get(n)), show(b.get(n)))
        })
        .collect()
}

/// Run everything; writes `report.json` and `report.html` into `cfg.out`. `model` is
/// the teacher's tokenizer (vocab-only is enough) and `scoring` the audit's scheme,
/// control tokens and common-tuples list — the same the `audit` commands use.
pub fn run(
    cfg: &RedteamConfig,
    model: &Model,
    scoring: &Scoring,
    events: &mut (dyn FnMut(Event) + Send),
) -> Result<Report> {
    cfg.validate()?;
    let started = Instant::now();
    std::fs::create_dir_all(&cfg.out).map_err(io_err(&cfg.out))?;
    let config_path = cfg.out.join("config.json");
    check_resume(cfg, &config_path)?;
    std::fs::write(
        &config_path,
        serde_json::to_string_pretty(cfg).expect("serialises"),
    )
    .map_err(io_err(&config_path))?;
    let (key, key_path) = run_key(&cfg.out)?;
    let keys = vec![key.clone()];
    let prompts = first_prompts(&cfg.prompt_file, cfg.prompts)?;
    let heldout = first_prompts(&cfg.heldout_file, cfg.heldout_prompts)?;

    let rt = tokio::runtime::Runtime::new().map_err(io_err(Path::new("tokio runtime")))?;
    let (wm, wm_records, fresh, control, sentinel) = rt.block_on(async {
        let wm = harvest_arm(cfg, Arm::Watermarked, &key_path, &prompts, events).await?;
        let fresh = fresh_texts(cfg, &key_path, &heldout, events).await?;
        let wm_records = read_records(&cfg.out.join("watermarked/harvest.jsonl"))?;
        // The control teacher's key is never used (watermark off); it only satisfies
        // the server's start-up.
        let control_key = cfg.out.join(Arm::Control.name()).join("unused.key");
        std::fs::create_dir_all(cfg.out.join(Arm::Control.name())).map_err(io_err(&cfg.out))?;
        if !control_key.exists() {
            let k = WatermarkKey::generate().map_err(|e| RedteamError::Key(e.to_string()))?;
            isotope_server::write_private(&control_key, k.to_file_string().as_bytes())
                .map_err(|e| RedteamError::Key(format!("{e:#}")))?;
        }
        // Same prompts as the watermarked arm actually got (a time limit may have
        // cut it short), so the two students differ only in the watermark.
        let answered: HashSet<usize> = wm_records.iter().map(|r| r.prompt_index).collect();
        let control_prompts: Vec<Prompt> = prompts
            .iter()
            .filter(|p| answered.contains(&p.index))
            .cloned()
            .collect();
        let control =
            harvest_arm(cfg, Arm::Control, &control_key, &control_prompts, events).await?;
        let sentinel = sentinel_timeline(cfg).await?;
        Ok::<_, RedteamError>((wm, wm_records, fresh, control, sentinel))
    })?;
    drop(rt);

    let tok = StudentTokenizer::from_gguf(&cfg.model)?;
    let ours = answer_texts(model, wm_records.iter().take(cfg.audit_texts));
    let fresh = answer_texts(model, &fresh);
    let mut students = Vec::new();
    for arm in [Arm::Watermarked, Arm::Control] {
        students.push(
            student_arm(
                cfg,
                arm.name(),
                &tok,
                model,
                &fresh,
                &ours,
                &heldout,
                &keys,
                scoring,
                events,
            )?
            .0,
        );
    }
    let mut mixes = Vec::new();
    let control_records = if cfg.mixes.is_empty() {
        Vec::new()
    } else {
        read_records(&cfg.out.join(Arm::Control.name()).join("harvest.jsonl"))?
    };
    for &fraction in &cfg.mixes {
        let name = mix_name(fraction);
        let (examples, served) = write_mix(cfg, &wm_records, &control_records, fraction, &name)?;
        // Supervised: what we served to the harvester whose training set this is.
        let own = answer_texts(model, served.iter().take(cfg.audit_texts));
        let (student, weights) = student_arm(
            cfg, &name, &tok, model, &fresh, &own, &heldout, &keys, scoring, events,
        )?;
        events(Event::Stage {
            name: format!("{name}: reading every served answer (diluted)"),
            total: 0,
        });
        let diluted = reading_audit(&weights, &[], &ours, &keys, scoring)?;
        mixes.push(report::MixReport {
            fraction,
            name,
            examples,
            watermarked_examples: served.len(),
            student,
            diluted_reading: Some(diluted),
        });
    }
    let control_student = students.pop().expect("two arms");
    let wm_student = students.pop().expect("two arms");
    let harvester_tokens: (u64, u64) = sentinel
        .accounts
        .iter()
        .filter(|a| a.account.starts_with("harvester"))
        .fold((0, 0), |acc, a| {
            (acc.0 + a.prompt_tokens, acc.1 + a.completion_tokens)
        });
    let report = Report {
        tool_version: env!("CARGO_PKG_VERSION").into(),
        config: cfg.clone(),
        scheme: scoring.scheme.to_string(),
        window: scoring.scheme.context(),
        key_id: key.id().to_owned(),
        key_commitment: key.commitment(),
        arms: vec![
            report::ArmReport {
                arm: Arm::Watermarked,
                harvest: wm,
                student: wm_student,
            },
            report::ArmReport {
                arm: Arm::Control,
                harvest: control,
                student: control_student,
            },
        ],
        mixes,
        cost: report::Cost::new(
            cfg.price_per_million_tokens,
            harvester_tokens.0,
            harvester_tokens.1,
        ),
        sentinel,
        wall_secs: started.elapsed().as_secs_f64(),
    };
    report::write(&cfg.out, &report)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn record(id: usize, response: &str) -> String {
        serde_json::to_string(&HarvestRecord {
            id: isotope_distill::record_id(id, 0),
            prompt_index: id,
            sample: 0,
            line: id + 1,
            prompt: format!("prompt {id}"),
            response: response.into(),
            finish_reason: Some("length".into()),
            model: None,
            seed: None,
            usage: None,
            logprobs: None,
        })
        .unwrap()
    }

    #[test]
    fn a_resume_with_other_settings_is_refused_for_the_work_that_exists() {
        let dir = tempfile::tempdir().unwrap();
        let old = RedteamConfig {
            out: dir.path().to_path_buf(),
            model: dir.path().join("teacher.gguf"),
            ..RedteamConfig::default()
        };
        let path = dir.path().join("config.json");
        std::fs::write(&path, serde_json::to_string(&old).unwrap()).unwrap();
        let new = RedteamConfig {
            epochs: 8,
            temperature: 0.5,
            threads: Some(1),
            slots: 2,
            ..old.clone()
        };
        // nothing finished yet: any settings go
        check_resume(&new, &path).unwrap();
        // a harvest exists: its settings are fixed, the students' are not yet
        let wm = dir.path().join("watermarked");
        std::fs::create_dir_all(&wm).unwrap();
        std::fs::write(wm.join("harvest.json"), "{}").unwrap();
        let e = check_resume(&new, &path).unwrap_err().to_string();
        assert!(e.contains("temperature 1.0 → 0.5"), "{e}");
        assert!(
            !e.contains("epochs") && !e.contains("threads") && !e.contains("slots"),
            "{e}"
        );
        // a student exists too: its settings are fixed as well
        std::fs::create_dir_all(dir.path().join("mix-25/student")).unwrap();
        let e = check_resume(&new, &path).unwrap_err().to_string();
        assert!(e.contains("epochs 4 → 8") && e.contains("--out"), "{e}");
        // the same settings resume; so do other threads, slots and mixtures
        let same = RedteamConfig {
            threads: Some(2),
            mixes: vec![0.25],
            ..old.clone()
        };
        check_resume(&same, &path).unwrap();
        // the output directory's own path may change (a copied run)
        let moved = RedteamConfig {
            out: dir.path().join("elsewhere"),
            ..old.clone()
        };
        assert!(changed_settings(&old, &moved, true, true).is_empty());
    }

    /// The setting lists name fields by their serialised names: a misspelt or renamed
    /// one would silently never be compared.
    #[test]
    fn every_checked_setting_is_a_config_field() {
        let v = serde_json::to_value(RedteamConfig::default()).unwrap();
        for n in HARVEST_SETTINGS.iter().chain(STUDENT_SETTINGS) {
            assert!(v.get(n).is_some(), "{n} is not a RedteamConfig field");
        }
    }

    #[test]
    fn mix_names() {
        assert_eq!(mix_name(0.25), "mix-25");
        assert_eq!(mix_name(0.05), "mix-5");
        assert_eq!(mix_name(0.025), "mix-2.5");
    }

    /// Exact counts, only prompts both arms answered, nested across fractions, and
    /// independent of the order the harvests were written in.
    #[test]
    fn mixtures_are_exact_nested_and_order_free() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = RedteamConfig {
            out: dir.path().to_path_buf(),
            seed: 7,
            ..RedteamConfig::default()
        };
        let write = |arm: &str, lines: Vec<String>| {
            std::fs::create_dir_all(dir.path().join(arm)).unwrap();
            std::fs::write(
                dir.path().join(arm).join("harvest.jsonl"),
                lines.join("\n") + "\n",
            )
            .unwrap();
        };
        // 40 watermarked answers in reverse order; the control misses prompt 39.
        write(
            "watermarked",
            (0..40)
                .rev()
                .map(|i| record(i, &format!("wm {i}")))
                .collect(),
        );
        write(
            "control",
            (0..39).map(|i| record(i, &format!("plain {i}"))).collect(),
        );
        let read = |name: &str| -> Vec<HarvestRecord> {
            read_records(&dir.path().join(name).join("harvest.jsonl")).unwrap()
        };
        let wm_ids = |name: &str| -> HashSet<String> {
            read(name)
                .into_iter()
                .filter(|r| r.response.starts_with("wm"))
                .map(|r| r.id)
                .collect()
        };
        let mix = |cfg: &RedteamConfig, fraction: f64, name: &str| {
            let (wm, control) = (read("watermarked"), read("control"));
            let (n, served) = write_mix(cfg, &wm, &control, fraction, name).unwrap();
            let ids: HashSet<String> = served.iter().map(|r| r.id.clone()).collect();
            // What it returns as served is what it wrote from the watermarked arm.
            assert_eq!(ids, wm_ids(name));
            assert!(served.iter().all(|r| r.response.starts_with("wm")));
            (n, served.len())
        };
        assert_eq!(mix(&cfg, 0.25, "a"), (39, 10));
        assert_eq!(mix(&cfg, 0.1, "b"), (39, 4));
        assert_eq!(read("a").len(), 39);
        assert!(read("a").iter().all(|r| r.id != "39-0"));
        let (a, b) = (wm_ids("a"), wm_ids("b"));
        assert_eq!((a.len(), b.len()), (10, 4));
        assert!(b.is_subset(&a), "smaller mixtures lie inside larger ones");

        // Same records in another order: the same mixture.
        write(
            "watermarked",
            (0..40).map(|i| record(i, &format!("wm {i}"))).collect(),
        );
        mix(&cfg, 0.25, "c");
        assert_eq!(wm_ids("c"), a);
        // Another seed: another mixture of the same size.
        let other = RedteamConfig {
            seed: 8,
            ..cfg.clone()
        };
        assert_eq!(mix(&other, 0.25, "d").1, 10);
        assert_ne!(wm_ids("d"), a);
    }
}
