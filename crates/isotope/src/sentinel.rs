//! `isotope sentinel simulate|eval|score|train|bench`: wiring to `isotope-sentinel` and
//! the store. Simulated traffic goes to a JSONL events file (`{"event", "label"}` per
//! line); `eval` replays such a file; `score` replays a live store's usage events.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use isotope_sentinel::{
    embedder_for, EmbedderKind, Model, Scenario, Sentinel, SentinelConfig, Simulated,
};
use serde_json::json;

/// Seed `simulate` uses unless told otherwise: not one the default model was fitted
/// or calibrated on (those are in `TrainConfig::default`).
pub const DEFAULT_SIM_SEED: u64 = 2024;

#[derive(clap::Args, Debug)]
pub struct SentinelArgs {
    #[command(subcommand)]
    command: SentinelCommand,
    /// all-MiniLM-L6-v2 directory (config.json, tokenizer.json, model.safetensors),
    /// read when a model uses the `minilm` embedder; `scripts/setup.sh` unpacks it here.
    #[arg(long, global = true, env = "ISOTOPE_MINILM_DIR", default_value = isotope_sentinel::minilm::DEFAULT_DIR)]
    minilm_dir: PathBuf,
}

#[derive(clap::Subcommand, Debug)]
enum SentinelCommand {
    /// Simulate labelled benign and harvesting traffic into a JSONL events file.
    Simulate {
        /// Scenario (TOML or JSON; see examples/sentinel-scenario.toml). Default: the
        /// built-in mixed scenario on the evaluation prompt split.
        #[arg(long)]
        scenario: Option<PathBuf>,
        /// Events file to write.
        #[arg(long)]
        out: PathBuf,
        /// Simulation seed.
        #[arg(long, default_value_t = DEFAULT_SIM_SEED)]
        seed: u64,
        /// Multiply every population by this (e.g. 0.1 for a quick run).
        #[arg(long)]
        scale: Option<f64>,
        /// Also send the events as real requests to this running `isotope serve`
        /// (e.g. http://127.0.0.1:8080): one account and API key per simulated account
        /// is created in the server's store (--config/--database-url/--data-dir, as
        /// for `isotope keys`), and the store's alerts are reported per label after.
        #[arg(long, value_name = "URL")]
        send: Option<String>,
        /// With --send: simulated time runs this many times faster than wall time
        /// (0: as fast as --concurrency allows).
        #[arg(long, default_value_t = 60.0, requires = "send")]
        speed: f64,
        /// With --send: requests in flight at most.
        #[arg(long, default_value_t = 4, requires = "send")]
        concurrency: usize,
        /// With --send: cap on each request's max_tokens (a real model generates every
        /// token; simulated answers run to thousands).
        #[arg(long, default_value_t = 16, requires = "send")]
        max_tokens: u32,
        /// With --send: send at most N events, spread over the accounts (each one's
        /// first request, then each one's second, …), so every account is seen.
        #[arg(long, requires = "send")]
        limit: Option<usize>,
        /// With --send: model id to request (default: the first in /v1/models).
        #[arg(long, requires = "send")]
        send_model: Option<String>,
        #[command(flatten)]
        store: crate::serve::ConfigArgs,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Replay a labelled events file through the sentinel: per-strategy TPR, benign
    /// FPR with its Clopper–Pearson bound, ROC AUC, requests until flagged.
    Eval {
        /// Events file from `isotope sentinel simulate`.
        #[arg(long)]
        events: PathBuf,
        /// Sentinel model (JSON); default: the built-in one.
        #[arg(long, conflicts_with = "leave_one_out")]
        model: Option<PathBuf>,
        /// Leave-one-strategy-out: for each harvesting strategy S in the file, train
        /// the built-in recipe (tuning split, its own seeds) without S, calibrate, and
        /// report how it does on S (and the benign FPR of that model).
        #[arg(long)]
        leave_one_out: bool,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Throughput and memory: replay events through one sentinel on one core and
    /// print events scored per second and bytes per account.
    Bench {
        /// Events file; default: the built-in mixed scenario (seed 2024) simulated.
        #[arg(long)]
        events: Option<PathBuf>,
        /// Multiply the simulated scenario's populations by this.
        #[arg(long)]
        scale: Option<f64>,
        /// Sentinel model (JSON); default: the built-in one.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Replay a store's usage events and print each account's score, level, cluster
    /// and reasons (highest score first).
    Score {
        /// The store: `sqlite://PATH` or `postgres://…`.
        #[arg(long = "db", env = "ISOTOPE_DATABASE_URL")]
        db: String,
        /// Sentinel model (JSON); default: the built-in one.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Accounts to print (text mode).
        #[arg(long, default_value_t = 30)]
        top: usize,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Train the built-in recipe from scratch (simulated traffic on the tuning prompt
    /// split; deterministic, about a minute) and write the model as JSON, for
    /// `[sentinel] model`, `--model`, or to refresh the embedded built-in model.
    Train {
        /// Model file to write.
        #[arg(long)]
        out: PathBuf,
        /// Prompt embedder the model is trained with (and will need): `hashed`
        /// (n-gram hashing, no files; the built-in model's) or `minilm`
        /// (all-MiniLM-L6-v2 from --minilm-dir; embeds every simulated prompt once,
        /// minutes on CPU).
        #[arg(long, default_value_t = EmbedderKind::Hashed)]
        embedder: EmbedderKind,
    },
}

pub fn sentinel(a: SentinelArgs) -> Result<()> {
    let dir = a.minilm_dir;
    match a.command {
        SentinelCommand::Simulate {
            scenario,
            out,
            seed,
            scale,
            send,
            speed,
            concurrency,
            max_tokens,
            limit,
            send_model,
            store,
            json,
        } => {
            let live = send.map(|url| crate::simlive::Live {
                url,
                speed,
                concurrency,
                max_tokens,
                limit,
                model: send_model,
            });
            simulate(scenario, out, seed, scale, live.map(|l| (l, store)), json)
        }
        SentinelCommand::Eval {
            events,
            model,
            leave_one_out,
            json,
        } => {
            if leave_one_out {
                loo(events, &dir, json)
            } else {
                eval(events, model, &dir, json)
            }
        }
        SentinelCommand::Bench {
            events,
            scale,
            model,
            json,
        } => bench(events, scale, model, &dir, json),
        SentinelCommand::Score {
            db,
            model,
            top,
            json,
        } => score(db, model, &dir, top, json),
        SentinelCommand::Train { out, embedder } => {
            let kind = embedder;
            let emb = kind.load(&dir).context("loading the prompt embedder")?;
            let tc = isotope_sentinel::TrainConfig::default();
            if kind != EmbedderKind::Hashed {
                // embed the training traffic's prompts first, with a progress bar
                let (fit, cal) = tc.simulations().context("simulating")?;
                let mut events = fit.events;
                events.extend(cal.events);
                prepare_embeddings(&events, &emb);
            }
            let bar = spinner("training the sentinel model on simulated traffic");
            let model = isotope_sentinel::train(&tc, &emb);
            bar.finish_and_clear();
            let model = model.context("training")?;
            let mut text = serde_json::to_string(&model).context("serialising the model")?;
            text.push('\n');
            std::fs::write(&out, text)
                .with_context(|| format!("cannot write {}", out.display()))?;
            eprintln!("wrote {} ({})", out.display(), model.trained_on);
            Ok(())
        }
    }
}

fn spinner(msg: &'static str) -> ProgressBar {
    let bar = ProgressBar::new_spinner().with_message(msg);
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

fn load_model(path: Option<PathBuf>) -> Result<Arc<Model>> {
    match path {
        Some(p) => {
            let text = std::fs::read_to_string(&p)
                .with_context(|| format!("cannot read sentinel model {}", p.display()))?;
            let m: Model = serde_json::from_str(&text).with_context(|| {
                format!(
                    "{} is not a sentinel model (write one with `isotope sentinel train`)",
                    p.display()
                )
            })?;
            m.validate()
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("sentinel model {}", p.display()))?;
            Ok(Arc::new(m))
        }
        None => isotope_sentinel::default_model().map_err(anyhow::Error::msg),
    }
}

/// Embeds every distinct prompt of `events` up front, with a progress bar (a model
/// embedder takes milliseconds per prompt; the hashed one needs nothing).
fn prepare_embeddings(
    events: &[isotope_store::UsageEvent],
    emb: &Arc<dyn isotope_sentinel::Embedder>,
) {
    if !emb.wants_prepare() {
        return;
    }
    let texts = isotope_sentinel::eval::prompt_texts(events);
    let pb = bar(texts.len(), "prompts embedded");
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    emb.prepare(&refs, &|n| pb.inc(n as u64));
    pb.finish_and_clear();
}

fn bar(len: usize, what: &str) -> ProgressBar {
    ProgressBar::new(len as u64).with_style(
        ProgressStyle::with_template(&format!(
            "{{bar:30}} {{pos}}/{{len}} {what} {{per_sec}} {{elapsed_precise}} (eta {{eta}})"
        ))
        .expect("static template"),
    )
}

fn simulate(
    scenario: Option<PathBuf>,
    out: PathBuf,
    seed: u64,
    scale: Option<f64>,
    live: Option<(crate::simlive::Live, crate::serve::ConfigArgs)>,
    json: bool,
) -> Result<()> {
    let mut sc = match &scenario {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read scenario {}", p.display()))?;
            Scenario::parse(&text).with_context(|| format!("scenario {}", p.display()))?
        }
        None => Scenario::default_mixed(),
    };
    if let Some(f) = scale {
        if !(f > 0.0 && f.is_finite()) {
            bail!("--scale must be a positive number, got {f}");
        }
        sc = sc.scaled(f);
    }
    let t = Instant::now();
    let bar = spinner("simulating traffic");
    let sim = isotope_sentinel::simulate(&sc, seed);
    bar.finish_and_clear();
    let sim = sim.context("simulating")?;
    std::fs::write(&out, sim.to_jsonl())
        .with_context(|| format!("cannot write {}", out.display()))?;
    let mut per_label: BTreeMap<&str, usize> = BTreeMap::new();
    for l in sim.labels.values() {
        *per_label.entry(l.as_str()).or_default() += 1;
    }
    let sim_seconds = t.elapsed().as_secs_f64();
    let report = match live {
        Some((live, cfg)) => {
            let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            Some(rt.block_on(async {
                let store = cfg.open_store().await?;
                let r = crate::simlive::send(&sim, store.clone(), &live).await;
                store.close().await;
                r
            })?)
        }
        None => None,
    };
    if json {
        println!(
            "{}",
            json!({
                "scenario": sc.name,
                "seed": seed,
                "out": out,
                "events": sim.events.len(),
                "accounts": sim.labels.len(),
                "accounts_per_label": per_label,
                "seconds": sim_seconds,
                "live": report,
            })
        );
    } else {
        println!(
            "{}: {} events from {} accounts (seed {seed}) → {}",
            sc.name,
            sim.events.len(),
            sim.labels.len(),
            out.display()
        );
        for (l, n) in per_label {
            println!("  {l:<12} {n:>6} accounts");
        }
        if let Some(r) = report {
            println!(
                "sent {} requests to {} ({}) in {:.1} s:",
                r.requests, r.url, r.model, r.seconds
            );
            println!(
                "  {:<12} {:>8} {:>8} {:>6} {:>6} {:>7} {:>5} {:>8}",
                "label", "accounts", "requests", "2xx", "429", "403", "other", "flagged"
            );
            for (l, o) in &r.per_label {
                println!(
                    "  {:<12} {:>8} {:>8} {:>6} {:>6} {:>7} {:>5} {:>8}",
                    l,
                    o.accounts,
                    o.requests,
                    o.ok,
                    o.rate_limited,
                    o.blocked,
                    o.other,
                    o.flagged_accounts
                );
            }
        }
    }
    Ok(())
}

fn read_events(events: &PathBuf) -> Result<Simulated> {
    let text = std::fs::read_to_string(events)
        .with_context(|| format!("cannot read events file {}", events.display()))?;
    let sim = Simulated::from_jsonl(&text)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("events file {}", events.display()))?;
    if sim.events.is_empty() {
        bail!("{} holds no events", events.display());
    }
    if !sim.labels.values().any(|l| l == "benign") {
        bail!(
            "{} has no benign accounts: FPR needs some (label \"benign\")",
            events.display()
        );
    }
    Ok(sim)
}

fn loo(events: PathBuf, minilm_dir: &Path, json: bool) -> Result<()> {
    let sim = read_events(&events)?;
    let tc = isotope_sentinel::TrainConfig::default();
    // the built-in recipe with the built-in model's embedder
    let emb = embedder_for(&*load_model(None)?, minilm_dir).map_err(anyhow::Error::msg)?;
    let t = Instant::now();
    let bar = spinner("training one model per left-out strategy");
    let r = isotope_sentinel::leave_one_out(&tc, &emb, &sim);
    bar.finish_and_clear();
    let r = r.context("leave-one-strategy-out")?;
    if json {
        let mut v = serde_json::to_value(&r)?;
        v["mode"] = json!("leave_one_out");
        v["seconds"] = json!(t.elapsed().as_secs_f64());
        println!("{v}");
        return Ok(());
    }
    let f = |x: Option<f64>, d: usize| x.map_or("-".into(), |x| format!("{x:.d$}"));
    println!(
        "leave-one-strategy-out on {} ({} benign accounts); each row: a model trained without that strategy",
        events.display(),
        r.benign_accounts
    );
    println!(
        "{:<12} {:>8} {:>7} {:>9} {:>7} {:>10} {:>8} {:>8}",
        "held out", "accounts", "TPR", "TPR(all)", "AUC", "req→flag", "FPR", "FPR≤"
    );
    for e in &r.entries {
        println!(
            "{:<12} {:>8} {:>7.3} {:>9.3} {:>7} {:>10} {:>8.4} {:>8.4}",
            e.strategy,
            e.accounts,
            e.tpr,
            e.tpr_trained_on_all,
            f(e.auc, 3),
            f(e.median_requests_until_flagged, 0),
            e.fpr,
            e.fpr_upper95
        );
    }
    println!("mean held-out TPR {:.3}", r.mean_tpr);
    Ok(())
}

fn bench(
    events: Option<PathBuf>,
    scale: Option<f64>,
    model: Option<PathBuf>,
    minilm_dir: &Path,
    json: bool,
) -> Result<()> {
    let sim = match &events {
        Some(p) => read_events(p)?,
        None => {
            let mut sc = Scenario::default_mixed();
            if let Some(f) = scale {
                if !(f > 0.0 && f.is_finite()) {
                    bail!("--scale must be a positive number, got {f}");
                }
                sc = sc.scaled(f);
            }
            isotope_sentinel::simulate(&sc, DEFAULT_SIM_SEED).context("simulating")?
        }
    };
    let model = load_model(model)?;
    let emb = embedder_for(&model, minilm_dir).map_err(anyhow::Error::msg)?;
    let bar = spinner("scoring events on one core");
    let r = isotope_sentinel::bench(&sim.events, model, &emb);
    bar.finish_and_clear();
    let r = r.map_err(anyhow::Error::msg)?;
    if json {
        println!("{}", serde_json::to_value(&r)?);
        return Ok(());
    }
    println!(
        "{} events from {} accounts on one core: {:.0} events/s (incl. {} re-scores); \
         re-scoring every account once: {:.3} s; {:.0} bytes per account; embedder {}",
        r.events,
        r.accounts,
        r.events_per_sec_per_core,
        r.rescored,
        r.assess_all_seconds,
        r.bytes_per_account,
        r.embedder
    );
    Ok(())
}

fn eval(events: PathBuf, model: Option<PathBuf>, minilm_dir: &Path, json: bool) -> Result<()> {
    let sim = read_events(&events)?;
    let model = load_model(model)?;
    let emb = embedder_for(&model, minilm_dir).map_err(anyhow::Error::msg)?;
    let t = Instant::now();
    prepare_embeddings(&sim.events, &emb);
    let pb = bar(sim.events.len(), "events");
    let r = isotope_sentinel::evaluate_with(&sim.events, &sim.labels, model, &emb, &mut |n| {
        pb.set_position(n as u64)
    });
    pb.finish_and_clear();
    let r = r.map_err(anyhow::Error::msg)?;
    let secs = t.elapsed().as_secs_f64();
    if json {
        let mut v = serde_json::to_value(&r)?;
        v["events_per_second"] = json!(r.events as f64 / secs.max(1e-9));
        println!("{v}");
        return Ok(());
    }
    let f = |x: Option<f64>, d: usize| x.map_or("-".into(), |x| format!("{x:.d$}"));
    println!(
        "{} events, {} benign and {} harvesting accounts ({:.0} events/s)",
        r.events,
        r.benign_accounts,
        r.harvest_accounts,
        r.events as f64 / secs.max(1e-9)
    );
    println!(
        "TPR {:.3}  benign FPR {:.4} ({} flagged; Clopper–Pearson 95% upper {:.4})  AUC {}  median requests until flagged {}",
        r.tpr,
        r.fpr,
        r.benign_flagged,
        r.fpr_upper95,
        f(r.auc, 4),
        f(r.median_requests_until_flagged, 0)
    );
    println!(
        "{:<12} {:>8} {:>8} {:>6} {:>7} {:>10}",
        "strategy", "accounts", "flagged", "TPR", "AUC", "req→flag"
    );
    for (name, s) in &r.per_strategy {
        println!(
            "{:<12} {:>8} {:>8} {:>6.3} {:>7} {:>10}",
            name,
            s.accounts,
            s.flagged,
            s.tpr,
            f(s.auc, 3),
            f(s.median_requests_until_flagged, 0)
        );
    }
    println!("model: {}", r.model);
    Ok(())
}

fn score(
    db: String,
    model: Option<PathBuf>,
    minilm_dir: &Path,
    top: usize,
    json: bool,
) -> Result<()> {
    let model = load_model(model)?;
    let emb = embedder_for(&model, minilm_dir).map_err(anyhow::Error::msg)?;
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let events = rt.block_on(async {
        let store = isotope_store::open(&db)
            .await
            .with_context(|| format!("opening the store at {}", isotope_server::redact_url(&db)))?;
        let total = store.count_usage_events().await?;
        let pb = bar(total as usize, "events read");
        let mut all = Vec::new();
        let mut cursor = 0;
        loop {
            let page = store.usage_events_since(cursor, 5_000).await?;
            let Some(last) = page.last() else { break };
            cursor = last.id;
            pb.inc(page.len() as u64);
            all.extend(page);
        }
        pb.finish_and_clear();
        store.close().await;
        anyhow::Ok(all)
    })?;
    prepare_embeddings(&events, &emb);
    let mut s = Sentinel::new(SentinelConfig::new(model.clone(), emb).map_err(anyhow::Error::msg)?);
    let pb = bar(events.len(), "events scored");
    for (i, e) in events.iter().enumerate() {
        s.observe(e);
        if i % 1024 == 0 {
            pb.set_position(i as u64);
        }
    }
    pb.finish_and_clear();
    let now = isotope_server::auth::now_ms();
    let assessments = s.assess(now);
    if json {
        println!(
            "{}",
            json!({
                "events": events.len(),
                "accounts": assessments.len(),
                "thresholds": model.thresholds,
                "model": model.trained_on,
                "assessments": assessments,
            })
        );
        return Ok(());
    }
    println!(
        "{} events, {} accounts (flag at score {:.4})",
        events.len(),
        assessments.len(),
        model.thresholds.flag
    );
    println!(
        "{:>8} {:>8} {:>5} {:>8} {:>7} {:<9} reasons",
        "account", "cluster", "size", "requests", "score", "level"
    );
    for a in assessments.iter().take(top) {
        let reasons: Vec<String> = a
            .reasons
            .iter()
            .map(|r| format!("{}={:.3} (+{:.2})", r.feature, r.value, r.contribution))
            .collect();
        println!(
            "{:>8} {:>8} {:>5} {:>8} {:>7.4} {:<9} {}",
            a.account_id,
            a.cluster_id,
            a.cluster_size,
            a.requests,
            a.score,
            a.level.as_str(),
            reasons.join(", ")
        );
    }
    Ok(())
}
