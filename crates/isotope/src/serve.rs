//! `isotope serve` and `isotope keys`: configuration merging (isotope.toml < env <
//! flags) and wiring to `isotope-server` / `isotope-store`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use isotope_server::policy::ManualLevel;
use isotope_server::ServerConfig;
use isotope_store::KeyLimits;

/// Where the configuration comes from, shared by `serve` and `keys`.
#[derive(clap::Args, Debug, Clone)]
pub struct ConfigArgs {
    /// Configuration file (TOML; default: ./isotope.toml when it exists).
    #[arg(long, env = "ISOTOPE_CONFIG")]
    config: Option<PathBuf>,
    /// Store: `sqlite://PATH` (default: isotope-data/isotope.db) or `postgres://…`.
    #[arg(long, env = "ISOTOPE_DATABASE_URL")]
    database_url: Option<String>,
    /// Directory for single-node state (SQLite file, generated watermark key).
    #[arg(long, env = "ISOTOPE_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

impl ConfigArgs {
    /// The file layer: the given config file, ./isotope.toml, or defaults.
    pub(crate) fn file(&self) -> Result<ServerConfig> {
        let path = match &self.config {
            Some(p) => Some(p.clone()),
            None => Some(PathBuf::from("isotope.toml")).filter(|p| p.exists()),
        };
        let mut cfg = match path {
            Some(p) => load_toml(&p)?,
            None => ServerConfig::default(),
        };
        if let Some(u) = &self.database_url {
            cfg.database_url = Some(u.clone());
        }
        if let Some(d) = &self.data_dir {
            cfg.data_dir = d.clone();
        }
        Ok(cfg)
    }

    pub(crate) async fn open_store(&self) -> Result<std::sync::Arc<dyn isotope_store::Store>> {
        let cfg = self.file()?;
        let url = cfg.database_url();
        if url.starts_with("sqlite://") {
            std::fs::create_dir_all(&cfg.data_dir).with_context(|| {
                format!("cannot create data directory {}", cfg.data_dir.display())
            })?;
        }
        isotope_store::open(&url)
            .await
            .with_context(|| format!("opening the store at {}", isotope_server::redact_url(&url)))
    }
}

fn load_toml(path: &Path) -> Result<ServerConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("config file {}", path.display()))
}

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// GGUF model file.
    #[arg(long, env = "ISOTOPE_MODEL")]
    model: Option<PathBuf>,
    /// Model id clients send (default: the file name without .gguf).
    #[arg(long, env = "ISOTOPE_MODEL_NAME")]
    model_name: Option<String>,
    /// Address to listen on (default 127.0.0.1:8080).
    #[arg(long, env = "ISOTOPE_ADDR")]
    addr: Option<SocketAddr>,
    /// Watermark key file for generation (default: generated under the data
    /// directory on first start; required with PostgreSQL).
    #[arg(long, env = "ISOTOPE_WATERMARK_KEY")]
    watermark_key: Option<PathBuf>,
    /// Older watermark key still used for detection (repeatable; key rotation).
    #[arg(long)]
    detection_key: Vec<PathBuf>,
    /// Watermark scheme: kgw (default), unigram, gumbel, synthid, with parameters.
    #[arg(long, env = "ISOTOPE_SCHEME")]
    scheme: Option<String>,
    /// Serve WITHOUT the watermark (benchmarks only: responses are untraceable).
    #[arg(long)]
    no_watermark: bool,
    /// Sequences decoded together.
    #[arg(long, env = "ISOTOPE_SLOTS")]
    slots: Option<usize>,
    /// Context per sequence (prompt + completion).
    #[arg(long)]
    ctx: Option<u32>,
    /// CPU threads for llama.cpp.
    #[arg(long, env = "ISOTOPE_THREADS")]
    threads: Option<usize>,
    /// Requests allowed to wait for a slot before 503.
    #[arg(long)]
    queue: Option<usize>,
    /// Default requests per minute for keys without their own limit.
    #[arg(long)]
    requests_per_minute: Option<u32>,
    /// Default tokens per minute for keys without their own limit.
    #[arg(long)]
    tokens_per_minute: Option<u32>,
    /// Store only hashes of prompts and completions, not the texts.
    #[arg(long)]
    hash_only: bool,
    /// Days to keep prompt and completion texts.
    #[arg(long)]
    retention_days: Option<u32>,
    /// Allow `echo` with `logprobs` on /v1/completions.
    #[arg(long)]
    allow_echo_logprobs: bool,
    /// Bearer token for /admin/* endpoints.
    #[arg(long, env = "ISOTOPE_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Turn the online sentinel off (no harvesting detection, no automatic levels).
    #[arg(long)]
    no_sentinel: bool,
    /// Sentinel model (JSON); default: the built-in one.
    #[arg(long, env = "ISOTOPE_SENTINEL_MODEL")]
    sentinel_model: Option<PathBuf>,
    /// POST sentinel alerts to this URL.
    #[arg(long, env = "ISOTOPE_SENTINEL_WEBHOOK_URL")]
    sentinel_webhook_url: Option<String>,
    /// Take client addresses from X-Forwarded-For (only behind a proxy that sets it).
    #[arg(long)]
    trust_forwarded_for: bool,
    /// Proxy student for antidistillation sampling (`[defence] proxy`); the policy
    /// table's `antidistill_lambda` says at which levels it is used.
    #[arg(long)]
    defence_proxy: Option<PathBuf>,
    /// The proxy's held-out gradient (`[defence] gradient`).
    #[arg(long)]
    defence_gradient: Option<PathBuf>,
}

fn merge(a: &ServeArgs) -> Result<ServerConfig> {
    let mut cfg = a.config.file()?;
    macro_rules! over {
        ($($field:ident => $target:ident),*) => {
            $( if let Some(v) = &a.$field { cfg.$target = v.clone(); } )*
        };
    }
    over!(model => model, addr => addr, scheme => scheme, slots => slots,
          ctx => ctx_per_slot, queue => queue);
    if let Some(v) = &a.model_name {
        cfg.model_name = Some(v.clone());
    }
    if let Some(v) = &a.watermark_key {
        cfg.watermark_key = Some(v.clone());
    }
    if !a.detection_key.is_empty() {
        cfg.detection_keys = a.detection_key.clone();
    }
    if a.threads.is_some() {
        cfg.threads = a.threads;
    }
    if a.requests_per_minute.is_some() {
        cfg.default_limits.requests_per_minute = a.requests_per_minute;
    }
    if a.tokens_per_minute.is_some() {
        cfg.default_limits.tokens_per_minute = a.tokens_per_minute;
    }
    if a.no_watermark {
        cfg.watermark = false;
    }
    if a.hash_only {
        cfg.store_texts = false;
    }
    if a.retention_days.is_some() {
        cfg.retention_days = a.retention_days;
    }
    if a.allow_echo_logprobs {
        cfg.allow_echo_logprobs = true;
    }
    if a.admin_token.is_some() {
        cfg.admin_token = a.admin_token.clone();
    }
    if a.no_sentinel {
        cfg.sentinel.enabled = false;
    }
    if a.sentinel_model.is_some() {
        cfg.sentinel.model = a.sentinel_model.clone();
    }
    if a.sentinel_webhook_url.is_some() {
        cfg.sentinel.webhook_url = a.sentinel_webhook_url.clone();
    }
    if a.trust_forwarded_for {
        cfg.trust_forwarded_for = true;
    }
    if a.defence_proxy.is_some() {
        cfg.defence.proxy = a.defence_proxy.clone();
    }
    if a.defence_gradient.is_some() {
        cfg.defence.gradient = a.defence_gradient.clone();
    }
    Ok(cfg)
}

pub fn serve(a: ServeArgs) -> Result<()> {
    let cfg = merge(&a)?;
    crate::generate::check_model_present(&crate::ModelArgs {
        model: cfg.model.clone(),
        threads: cfg.threads,
    })?;
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(isotope_server::serve(
        cfg,
        async {
            let _ = tokio::signal::ctrl_c().await;
            eprintln!("isotope: shutting down (finishing open requests)");
        },
        |ready| {
            eprintln!(
                "isotope: serving {} on http://{} (model loaded in {:.1}s; watermark {} with key {}; store {})",
                ready.model_name,
                ready.addr,
                ready.load_secs,
                ready.scheme,
                ready.watermark_key_id,
                ready.database_url
            );
            eprintln!(
                "  create an API key:  isotope keys create --account demo\n  then call it:       curl http://{}/v1/chat/completions -H \"Authorization: Bearer $KEY\" \\\n                        -H 'content-type: application/json' \\\n                        -d '{{\"model\":\"{}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello!\"}}]}}'",
                ready.addr, ready.model_name
            );
        },
    ))
}

#[derive(clap::Args, Debug)]
pub struct KeysArgs {
    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(clap::Subcommand, Debug)]
enum KeysCommand {
    /// Create an API key for an account (created if new); prints the key once, on the
    /// last line.
    Create {
        #[command(flatten)]
        config: ConfigArgs,
        /// Account name.
        #[arg(long)]
        account: String,
        /// Requests per minute for this key.
        #[arg(long)]
        requests_per_minute: Option<u32>,
        /// Tokens per minute for this key.
        #[arg(long)]
        tokens_per_minute: Option<u32>,
        /// Lifetime token quota for this key.
        #[arg(long)]
        token_quota: Option<u64>,
        /// Print one JSON object (with the key) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List API keys (never their secrets).
    List {
        #[command(flatten)]
        config: ConfigArgs,
        #[arg(long)]
        json: bool,
    },
    /// Revoke an API key by id (ik_…).
    Revoke {
        #[command(flatten)]
        config: ConfigArgs,
        key_id: String,
    },
    /// Set a key's policy level: observe, flag, throttle, degrade or block is a floor
    /// (the sentinel may raise the key above it), `pin:LEVEL` fixes it whatever the
    /// sentinel says (`pin:observe` clears a false alarm), `auto` follows the sentinel.
    SetLevel {
        #[command(flatten)]
        config: ConfigArgs,
        key_id: String,
        level: String,
    },
}

pub fn keys(a: KeysArgs) -> Result<()> {
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async move {
        match a.command {
            KeysCommand::Create {
                config,
                account,
                requests_per_minute,
                tokens_per_minute,
                token_quota,
                json,
            } => {
                if account.trim().is_empty() {
                    bail!("--account must not be empty");
                }
                let store = config.open_store().await?;
                let limits = KeyLimits {
                    requests_per_minute,
                    tokens_per_minute,
                    token_quota,
                };
                let new = store.create_api_key(&account, limits).await?;
                if json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "key_id": new.record.key_id,
                            "account": new.record.account_name,
                            "api_key": new.token,
                        })
                    );
                } else {
                    eprintln!(
                        "created API key {} for account {} (shown once; store it now):",
                        new.record.key_id, new.record.account_name
                    );
                    println!("{}", new.token);
                }
            }
            KeysCommand::List { config, json } => {
                let store = config.open_store().await?;
                let keys = store.list_api_keys().await?;
                if json {
                    println!("{}", serde_json::json!({ "keys": keys }));
                } else {
                    println!(
                        "{:<16} {:<20} {:<9} {:>12} {:<10} limits",
                        "key_id", "account", "status", "tokens_used", "level"
                    );
                    for k in keys {
                        println!(
                            "{:<16} {:<20} {:<9} {:>12} {:<10} rpm={} tpm={} quota={}",
                            k.key_id,
                            k.account_name,
                            if k.revoked_at_ms.is_some() {
                                "revoked"
                            } else {
                                "active"
                            },
                            k.tokens_used,
                            k.policy_level.as_deref().unwrap_or("auto"),
                            opt(k.limits.requests_per_minute),
                            opt(k.limits.tokens_per_minute),
                            opt(k.limits.token_quota),
                        );
                    }
                }
            }
            KeysCommand::Revoke { config, key_id } => {
                let store = config.open_store().await?;
                if !store.revoke_api_key(&key_id).await? {
                    bail!("no active API key with id {key_id} (see `isotope keys list`)");
                }
                eprintln!("revoked {key_id}");
            }
            KeysCommand::SetLevel {
                config,
                key_id,
                level,
            } => {
                let level = if level == "auto" {
                    None
                } else {
                    Some(level.parse::<ManualLevel>().map_err(|e| {
                        anyhow::anyhow!("{e}, optionally prefixed by `pin:`, or `auto`")
                    })?)
                };
                let store = config.open_store().await?;
                if !store
                    .set_key_policy_level(&key_id, level.map(|l| l.to_string()))
                    .await?
                {
                    bail!("no API key with id {key_id} (see `isotope keys list`)");
                }
                eprintln!(
                    "{key_id}: policy level {}",
                    level.map(|l| l.to_string()).as_deref().unwrap_or("auto")
                );
            }
        }
        Ok(())
    })
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}
