//! `isotope redteam`: flags and config file into an `isotope_redteam::RedteamConfig`,
//! progress bars, a summary. The run itself is `isotope_redteam::run`.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use isotope_audit::Scoring;
use isotope_engine::{LoadOptions, Model};
use isotope_redteam::{Event, RedteamConfig};

use crate::watermark::{common_list, excluded, parse_scheme};

#[derive(Args, Debug)]
pub struct RedteamArgs {
    /// Output directory: report.html, report.json, harvests, students (a rerun with the
    /// same directory resumes: finished harvests and training stages are not redone).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Config file (TOML; keys are the long flag names with `_`), below flags.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Teacher GGUF.
    #[arg(long, env = "ISOTOPE_MODEL")]
    model: Option<PathBuf>,
    /// Watermark scheme of the teacher (default kgw with window h = 1).
    #[arg(long)]
    scheme: Option<String>,
    /// Harvest prompts file (JSONL: prompt / instruction / question).
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    /// Number of harvest prompts (at most: see --harvest-minutes).
    #[arg(long)]
    prompts: Option<usize>,
    /// Minutes each arm's harvest may take (default 6; 0: no limit): the control arm
    /// answers the prompts the watermarked arm got in that time.
    #[arg(long, value_parser = crate::limit_minutes)]
    harvest_minutes: Option<f64>,
    /// max_tokens of each harvest request.
    #[arg(long)]
    max_tokens: Option<u32>,
    /// Temperature the harvester asks for.
    #[arg(long)]
    temperature: Option<f32>,
    /// Harvest requests in flight.
    #[arg(long)]
    concurrency: Option<usize>,
    /// Accounts the attacker may burn when blocked.
    #[arg(long)]
    max_accounts: Option<usize>,
    /// Benign accounts sending human instructions alongside the harvest.
    #[arg(long)]
    benign_accounts: Option<usize>,
    /// Requests per benign account.
    #[arg(long)]
    benign_requests: Option<usize>,
    /// Held-out prompts file for the black-box audit.
    #[arg(long)]
    heldout_file: Option<PathBuf>,
    /// Held-out prompts the students answer in the black-box audit.
    #[arg(long)]
    heldout_prompts: Option<usize>,
    /// max_tokens of the students' black-box answers.
    #[arg(long)]
    heldout_max_tokens: Option<usize>,
    /// Temperature of the students' black-box answers (the auditor's choice; default
    /// 0.7: a small student at 1.0 answers mostly from its flat tail).
    #[arg(long)]
    audit_temperature: Option<f32>,
    /// Student: tiny, small, or a llama GGUF to initialise from.
    #[arg(long)]
    student: Option<String>,
    #[arg(long)]
    epochs: Option<usize>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    seq_len: Option<usize>,
    #[arg(long)]
    lr: Option<f64>,
    /// Training stages, each followed by a reading-mode audit (points of the curve).
    #[arg(long)]
    checkpoints: Option<usize>,
    /// Harvested texts the students read in reading mode (at most).
    #[arg(long)]
    audit_texts: Option<usize>,
    /// Run the watermarked teacher without the sentinel.
    #[arg(long)]
    no_sentinel: bool,
    /// Replace the sentinel's calibrated flag threshold (experiments only).
    #[arg(long)]
    flag_threshold: Option<f64>,
    /// Price of the teacher's API per million tokens, for the harvest's cost.
    #[arg(long)]
    price_per_million_tokens: Option<f64>,
    /// Sequences the teachers decode together.
    #[arg(long)]
    slots: Option<usize>,
    /// llama.cpp threads.
    #[arg(long, env = "ISOTOPE_THREADS")]
    threads: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    /// Also train students on mixtures with these shares of watermarked answers (the
    /// rest from the control teacher), e.g. `--mixes 0.25,0.05`: the audit's power vs
    /// the watermarked share of a training set.
    #[arg(long, value_delimiter = ',')]
    mixes: Option<Vec<f64>>,
    /// Print report.json to stdout.
    #[arg(long)]
    json: bool,
}

fn merge(a: &RedteamArgs) -> Result<RedteamConfig> {
    let mut c: RedteamConfig = match &a.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read config file {}", p.display()))?;
            toml::from_str(&text).with_context(|| format!("config file {}", p.display()))?
        }
        None => RedteamConfig::default(),
    };
    macro_rules! over {
        ($($f:ident),*) => { $( if let Some(v) = &a.$f { c.$f = v.clone(); } )* };
    }
    over!(
        out,
        model,
        scheme,
        prompt_file,
        prompts,
        harvest_minutes,
        max_tokens,
        temperature,
        concurrency,
        max_accounts,
        benign_accounts,
        benign_requests,
        heldout_file,
        heldout_prompts,
        heldout_max_tokens,
        audit_temperature,
        student,
        epochs,
        batch_size,
        seq_len,
        lr,
        checkpoints,
        audit_texts,
        price_per_million_tokens,
        slots,
        seed,
        mixes
    );
    if a.flag_threshold.is_some() {
        c.flag_threshold = a.flag_threshold;
    }
    if a.threads.is_some() {
        c.threads = a.threads;
    }
    if a.no_sentinel {
        c.sentinel = false;
    }
    Ok(c)
}

pub fn redteam(a: RedteamArgs) -> Result<()> {
    let cfg = merge(&a)?;
    let scheme = parse_scheme(&cfg.scheme)?;
    crate::generate::check_model_present(&crate::ModelArgs {
        model: cfg.model.clone(),
        threads: cfg.threads,
    })?;
    let model = Model::load(
        &cfg.model,
        &LoadOptions {
            vocab_only: true,
            ..LoadOptions::default()
        },
    )
    .with_context(|| format!("loading the tokenizer of {}", cfg.model.display()))?;
    let scoring = Scoring {
        reading: isotope_audit::ReadingStatistic::default_for(&scheme),
        scheme,
        excluded: excluded(&model),
        common: common_list(&model, None, false)?,
    };
    let bar = ProgressBar::new(0);
    if !std::io::stderr().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    let style = |t: &str| ProgressStyle::with_template(t).expect("static template");
    let mut on_event = |e: Event| match e {
        Event::Stage { name, total } => {
            bar.finish_and_clear();
            eprintln!("redteam: {name}");
            bar.reset();
            bar.set_length(total);
            bar.set_position(0);
            bar.set_style(style(
                "{bar:30} {pos}/{len} {elapsed_precise} eta {eta} {msg}",
            ));
        }
        Event::Harvest(p) => {
            bar.set_position((p.existing + p.written + p.failed) as u64);
            bar.set_message(format!(
                "{} tokens, {} rate-limited",
                p.completion_tokens, p.rate_limited
            ));
        }
        Event::Train(p) => {
            bar.set_position(p.step as u64);
            bar.set_message(format!("loss {:.3} {:.0} tok/s", p.loss, p.tokens_per_sec));
        }
        Event::Step(n) => bar.set_position(n),
        Event::Note(m) => bar.suspend(|| eprintln!("redteam: {m}")),
    };
    let report =
        isotope_redteam::run(&cfg, &model, &scoring, &mut on_event).context("red-team run")?;
    bar.finish_and_clear();
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!("report: {}", cfg.out.join("report.html").display());
    for arm in &report.arms {
        println!(
            "  {:<12} harvest {:>7} tokens · reading p = {:.3e} · black-box p = {:.3e} · final loss {:.3}",
            arm.arm.name(),
            arm.harvest.completion_tokens,
            arm.student.reading.p_value,
            arm.student.black_box.p_value,
            arm.student.final_loss
        );
    }
    for m in &report.mixes {
        println!(
            "  {:<12} {} of {} answers watermarked · reading p = {:.3e} (diluted by every served answer {}) · black-box p = {:.3e} · final loss {:.3}",
            m.name,
            m.watermarked_examples,
            m.examples,
            m.student.reading.p_value,
            m.diluted_reading
                .as_ref()
                .map_or_else(|| "–".into(), |d| format!("{:.3e}", d.p_value)),
            m.student.black_box.p_value,
            m.student.final_loss
        );
    }
    println!(
        "  sentinel: {} alert(s); harvest cost {:.4} at {} per million tokens; {:.1} min",
        report.sentinel.alerts.len(),
        report.cost.total,
        report.cost.price_per_million_tokens,
        report.wall_secs / 60.0
    );
    Ok(())
}
