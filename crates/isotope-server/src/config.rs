//! Server configuration. The CLI merges `isotope.toml`, environment variables and
//! flags (flags win) into one [`ServerConfig`]; this crate only consumes it.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::policy::{Level, PolicyTable};

/// Everything `isotope serve` needs. Field names are the `isotope.toml` keys.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on.
    pub addr: SocketAddr,
    /// GGUF model file.
    pub model: PathBuf,
    /// Model id clients send (default: the file name without `.gguf`).
    pub model_name: Option<String>,
    /// `sqlite://path` (default, under `data_dir`) or `postgres://…`.
    pub database_url: Option<String>,
    /// Where single-node state lives (SQLite file, generated watermark key).
    pub data_dir: PathBuf,
    /// Watermark key used for generation. Generated under `data_dir` on first start in
    /// SQLite mode; required with PostgreSQL (every replica must share it).
    pub watermark_key: Option<PathBuf>,
    /// Older keys still used for detection (key rotation).
    pub detection_keys: Vec<PathBuf>,
    /// Watermark scheme spec, e.g. `kgw` or `gumbel`.
    pub scheme: String,
    /// Watermark every response (default). Turning it off is for benchmarks only:
    /// responses are then untraceable, and the server says so at start-up.
    pub watermark: bool,
    /// Sequences decoded together.
    pub slots: usize,
    /// Context (prompt + completion) per sequence.
    pub ctx_per_slot: u32,
    /// Prompt tokens fed per decode step.
    pub prefill_chunk: usize,
    /// CPU threads for llama.cpp (default: all cores).
    pub threads: Option<usize>,
    /// Jobs allowed to wait for a slot; beyond that requests get 503.
    pub queue: usize,
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// Largest `top_logprobs` a client may ask for (OpenAI: 20).
    pub max_top_logprobs: u32,
    /// Largest `n`.
    pub max_n: u32,
    /// Most prompts in one batched `/v1/completions` request (each is answered `n`
    /// times; choice `i` answers prompt `i / n`).
    pub max_prompts: u32,
    /// Allow `/v1/completions` with `echo` and `logprobs` together: that returns the
    /// model's log-probabilities of arbitrary client text — a teacher's soft labels on
    /// demand — so it is off unless the operator turns it on.
    pub allow_echo_logprobs: bool,
    /// Store prompt and completion texts (else hashes only).
    pub store_texts: bool,
    /// Days to keep texts (hashes are kept); `None` keeps them.
    pub retention_days: Option<u32>,
    /// Usage events committed per transaction, at most.
    pub group_commit_max_batch: usize,
    /// Longest wait for more events before committing.
    pub group_commit_max_delay_ms: u64,
    /// Limits for keys that have none of their own.
    pub default_limits: DefaultLimits,
    /// Output policy per risk level.
    pub policy: PolicyTable,
    /// Bearer token for `/admin/*` (unset: admin API disabled).
    pub admin_token: Option<String>,
    /// Take the client address from the first `X-Forwarded-For` entry instead of the
    /// TCP peer. Only behind a reverse proxy that sets it: otherwise clients choose
    /// the address the sentinel links accounts by.
    pub trust_forwarded_for: bool,
    /// The online sentinel (`[sentinel]` in isotope.toml).
    pub sentinel: SentinelSettings,
    /// Antidistillation sampling's proxy (`[defence]`); the policy table says for
    /// which levels it is on, and how strong.
    pub defence: DefenceSettings,
}

/// `[defence]`: the proxy student antidistillation sampling consults. Loaded at
/// start-up only when some level of the policy table sets `antidistill_lambda`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DefenceSettings {
    /// A student directory (`isotope distill train`) or a GGUF with the teacher's
    /// tokenizer.
    pub proxy: Option<PathBuf>,
    /// Its held-out gradient (`isotope defence gradient --out`).
    pub gradient: Option<PathBuf>,
    /// Finite-difference step ε.
    pub eps: f64,
    /// Teacher candidates adjusted per step (others are removed when λ > 0).
    pub top_k: usize,
    /// Plausibility α: candidates below α × the most likely token's probability are
    /// removed too (λ > 0 only).
    pub min_p: f32,
    /// Never make a token more likely that would repeat an n-gram of the answer.
    pub no_repeat_ngram: usize,
}

impl Default for DefenceSettings {
    fn default() -> Self {
        Self {
            proxy: None,
            gradient: None,
            eps: 1e-2,
            top_k: 32,
            min_p: isotope_defence::DEFAULT_MIN_P,
            no_repeat_ngram: 3,
        }
    }
}

/// `[sentinel]`: harvesting detection inside `isotope serve`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SentinelSettings {
    /// Watch every usage event and apply the sentinel's levels (default on).
    pub enabled: bool,
    /// A trained sentinel model (JSON, as written by `isotope sentinel train`); default:
    /// the built-in model (trained on simulated traffic, embedded in the binary).
    pub model: Option<PathBuf>,
    /// Replace the model's calibrated flag threshold (a probability; the higher levels
    /// keep their fixed logit steps above it). For experiments and tests: the
    /// calibrated value is what the false-positive numbers were measured with.
    pub flag_threshold: Option<f64>,
    /// Replace the model's minimum request count before an account's own score counts.
    pub min_requests: Option<u64>,
    /// POST every alert here as JSON (optional).
    pub webhook_url: Option<String>,
    /// Timeout of one webhook attempt.
    pub webhook_timeout_ms: u64,
    /// Further attempts after a failed one (exponential backoff from 250 ms).
    pub webhook_retries: u32,
    /// Usage events waiting for the sentinel; beyond that new events are dropped
    /// (counted in /metrics) rather than slowing requests down.
    pub queue: usize,
    /// Level changes at or above this level (or down from it) create alerts.
    pub alert_level: Level,
    /// all-MiniLM-L6-v2 directory, read when the model uses the `minilm` embedder.
    pub minilm_dir: PathBuf,
}

impl Default for SentinelSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            model: None,
            flag_threshold: None,
            min_requests: None,
            webhook_url: None,
            webhook_timeout_ms: 5_000,
            webhook_retries: 3,
            queue: 16_384,
            alert_level: Level::Flag,
            minilm_dir: PathBuf::from(isotope_sentinel::minilm::DEFAULT_DIR),
        }
    }
}

/// Per-key limits applied when a key has none of its own.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DefaultLimits {
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
    pub token_quota: Option<u64>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            model: PathBuf::from("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
            model_name: None,
            database_url: None,
            data_dir: PathBuf::from("isotope-data"),
            watermark_key: None,
            detection_keys: Vec::new(),
            scheme: "kgw".into(),
            watermark: true,
            slots: 8,
            ctx_per_slot: 2048,
            prefill_chunk: 256,
            threads: None,
            queue: 64,
            max_body_bytes: 4 << 20,
            max_top_logprobs: 20,
            max_n: 8,
            max_prompts: 16,
            allow_echo_logprobs: false,
            store_texts: true,
            retention_days: None,
            group_commit_max_batch: 256,
            group_commit_max_delay_ms: 5,
            default_limits: DefaultLimits::default(),
            policy: PolicyTable::default(),
            admin_token: None,
            trust_forwarded_for: false,
            sentinel: SentinelSettings::default(),
            defence: DefenceSettings::default(),
        }
    }
}

impl ServerConfig {
    /// The database URL, defaulting to SQLite under `data_dir`.
    pub fn database_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("isotope.db").display()))
    }

    /// True when the store is PostgreSQL (fleet mode).
    pub fn is_fleet(&self) -> bool {
        let url = self.database_url();
        url.starts_with("postgres://") || url.starts_with("postgresql://")
    }

    /// Check the policy table and that the defence it asks for is configured; the
    /// message says what to set.
    pub fn check_policy(&self) -> anyhow::Result<()> {
        self.policy.validate().map_err(anyhow::Error::msg)?;
        let d = &self.defence;
        match (&d.proxy, &d.gradient) {
            (Some(_), None) | (None, Some(_)) => anyhow::bail!(
                "[defence] needs both `proxy` and `gradient` (the gradient comes from \
                 `isotope defence gradient --proxy P --tasks T --out G`)"
            ),
            (None, None) if self.policy.uses_antidistill() => anyhow::bail!(
                "the policy table sets `antidistill_lambda` but no proxy is configured: \
                 set [defence] proxy and gradient (or --defence-proxy/--defence-gradient), \
                 or remove antidistill_lambda"
            ),
            _ => {}
        }
        for p in [&d.proxy, &d.gradient].into_iter().flatten() {
            if !p.exists() {
                anyhow::bail!("[defence] file {} not found", p.display());
            }
        }
        Ok(())
    }

    /// The model id served.
    pub fn model_name(&self) -> String {
        self.model_name.clone().unwrap_or_else(|| {
            self.model
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into())
        })
    }
}
