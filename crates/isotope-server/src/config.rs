//! Server configuration. The CLI merges `isotope.toml`, environment variables and
//! flags (flags win) into one [`ServerConfig`]; this crate only consumes it.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::policy::PolicyTable;

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
            allow_echo_logprobs: false,
            store_texts: true,
            retention_days: None,
            group_commit_max_batch: 256,
            group_commit_max_delay_ms: 5,
            default_limits: DefaultLimits::default(),
            policy: PolicyTable::default(),
            admin_token: None,
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
