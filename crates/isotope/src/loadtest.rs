//! `isotope loadtest`: the whole HTTP path under load, watermark on vs off side by
//! side in one run. Starts two in-process servers on loopback (same model, same
//! settings, one with the watermark disabled), then for each concurrency level runs
//! the same closed-loop load against each, alternating, and prints tokens/s and
//! latency percentiles with the on/off ratio. Each server answers one warm-up request
//! first (page-ins and allocator growth would otherwise land on whichever runs
//! first), and the order alternates between levels (on→off, off→on, …) so a drift
//! in machine load does not always favour the same side.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use isotope_server::loadgen::{run_load, LoadConfig, LoadResult};
use isotope_server::ServerConfig;
use serde::Serialize;

#[derive(clap::Args, Debug)]
pub struct LoadtestArgs {
    /// GGUF model file.
    #[arg(long, env = "ISOTOPE_MODEL", default_value = crate::DEFAULT_MODEL)]
    model: PathBuf,
    /// Concurrency levels (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,4,8,16")]
    concurrency: Vec<usize>,
    /// Requests per level and server.
    #[arg(long, default_value_t = 16)]
    requests: usize,
    /// Completion tokens per request.
    #[arg(long, default_value_t = 64)]
    max_tokens: u32,
    /// Sequences the servers decode together.
    #[arg(long, default_value_t = 8)]
    slots: usize,
    /// Stop a level after this many seconds.
    #[arg(long, default_value_t = 300)]
    time_limit: u64,
    /// Prompts: JSONL with an `instruction` or `prompt` field per line
    /// (default: data/self-instruct/user_oriented_instructions.jsonl).
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Watermark scheme of the watermarked server.
    #[arg(long, default_value = "kgw")]
    scheme: String,
    /// CPU threads for llama.cpp.
    #[arg(long, env = "ISOTOPE_THREADS")]
    threads: Option<usize>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Row {
    concurrency: usize,
    watermark_on: LoadResult,
    watermark_off: LoadResult,
    /// tokens/s with the watermark ÷ tokens/s without.
    throughput_ratio: f64,
}

fn load_prompts(path: &PathBuf) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read prompts file {}", path.display()))?;
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(_) => continue,
        };
        if let Some(p) = v["instruction"].as_str().or(v["prompt"].as_str()) {
            out.push(p.to_owned());
        }
    }
    if out.is_empty() {
        bail!(
            "no prompts in {} (expected JSONL lines with `instruction` or `prompt`)",
            path.display()
        );
    }
    Ok(out)
}

struct Running {
    base_url: String,
    api_key: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<()>>,
    _dir: tempfile::TempDir,
}

async fn start(cfg: ServerConfig, dir: tempfile::TempDir) -> Result<Running> {
    let store = isotope_store::open(&cfg.database_url()).await?;
    let api_key = store
        .create_api_key("loadtest", Default::default())
        .await?
        .token;
    store.close().await;
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(isotope_server::serve(
        cfg,
        async {
            let _ = stop_rx.await;
        },
        move |r| {
            let _ = ready_tx.send(r.addr);
        },
    ));
    let addr = match ready_rx.await {
        Ok(a) => a,
        Err(_) => {
            return Err(task
                .await?
                .err()
                .unwrap_or_else(|| anyhow::anyhow!("server stopped")))
        }
    };
    Ok(Running {
        base_url: format!("http://{addr}/v1"),
        api_key,
        stop,
        task,
        _dir: dir,
    })
}

pub fn loadtest(a: LoadtestArgs) -> Result<()> {
    let prompts = Arc::new(load_prompts(&a.prompts.clone().unwrap_or_else(|| {
        PathBuf::from("data/self-instruct/user_oriented_instructions.jsonl")
    }))?);
    crate::generate::check_model_present(&crate::ModelArgs {
        model: a.model.clone(),
        threads: a.threads,
    })?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let mut servers = Vec::new();
        for watermark in [true, false] {
            let dir = tempfile::tempdir()?;
            let cfg = ServerConfig {
                addr: "127.0.0.1:0".parse()?,
                model: a.model.clone(),
                data_dir: dir.path().to_owned(),
                scheme: a.scheme.clone(),
                watermark,
                slots: a.slots,
                ctx_per_slot: 1024,
                threads: a.threads,
                queue: 256,
                ..ServerConfig::default()
            };
            servers.push(start(cfg, dir).await?);
        }
        let model_name = a
            .model
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let load = |s: &Running, concurrency: usize, requests: usize, max_tokens: u32| LoadConfig {
            base_url: s.base_url.clone(),
            api_key: s.api_key.clone(),
            model: model_name.clone(),
            concurrency,
            requests,
            max_tokens,
            temperature: 0.8,
            prompts: Arc::clone(&prompts),
            time_limit: Duration::from_secs(a.time_limit),
        };
        for s in &servers {
            let warm = run_load(&load(s, 1, 1, 8)).await?;
            if warm.requests_ok != 1 {
                bail!("warm-up request to {} failed", s.base_url);
            }
        }
        let mut rows = Vec::new();
        for (level, &c) in a.concurrency.iter().enumerate() {
            // servers[0] has the watermark on; alternate which side runs first.
            let order: [usize; 2] = if level % 2 == 0 { [0, 1] } else { [1, 0] };
            let mut results: [Option<LoadResult>; 2] = [None, None];
            for i in order {
                let r = run_load(&load(&servers[i], c, a.requests, a.max_tokens)).await?;
                if !a.json {
                    eprintln!(
                        "c={c:<3} watermark {:<3} {:>7.1} tok/s  p50 {:>7.0} ms  p99 {:>7.0} ms  ttft p50 {:>6.0} ms  ({} ok, {} errors)",
                        if i == 0 { "on" } else { "off" },
                        r.tokens_per_sec,
                        r.latency_p50_ms,
                        r.latency_p99_ms,
                        r.ttft_p50_ms,
                        r.requests_ok,
                        r.errors
                    );
                }
                results[i] = Some(r);
            }
            let [on, off] = results.map(|r| r.expect("both servers ran"));
            rows.push(Row {
                concurrency: c,
                throughput_ratio: on.tokens_per_sec / off.tokens_per_sec.max(1e-9),
                watermark_on: on,
                watermark_off: off,
            });
        }
        for s in servers {
            let _ = s.stop.send(());
            let _ = s.task.await;
        }
        if a.json {
            println!(
                "{}",
                serde_json::json!({"model": model_name, "scheme": a.scheme, "rows": rows})
            );
        } else {
            println!(
                "{:>4} {:>10} {:>10} {:>7} {:>9} {:>9} {:>9} {:>9}",
                "c", "tok/s on", "tok/s off", "ratio", "p50 on", "p50 off", "p99 on", "p99 off"
            );
            for r in &rows {
                println!(
                    "{:>4} {:>10.1} {:>10.1} {:>7.3} {:>8.0}ms {:>8.0}ms {:>8.0}ms {:>8.0}ms",
                    r.concurrency,
                    r.watermark_on.tokens_per_sec,
                    r.watermark_off.tokens_per_sec,
                    r.throughput_ratio,
                    r.watermark_on.latency_p50_ms,
                    r.watermark_off.latency_p50_ms,
                    r.watermark_on.latency_p99_ms,
                    r.watermark_off.latency_p99_ms
                );
            }
        }
        Ok(())
    })
}
