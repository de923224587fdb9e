//! `isotope defence gradient|bench` and the antidistillation flags of `isotope
//! generate`: flags, loading and output only; the work is in `isotope-defence`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use isotope_defence::{
    antidistill_for_teacher, load_proxy, proxy_gradient, Antidistill, AntidistillConfig,
};
use isotope_distill::{load_jsonl, DataOptions};
use isotope_engine::{BatchConfig, ChatMessage, GenerationRequest, Model};
use isotope_sampling::{Sampler, SamplingParams};
use serde::Serialize;

use crate::ModelArgs;

#[derive(clap::Args, Debug)]
pub struct DefenceArgs {
    #[command(subcommand)]
    command: DefenceCommand,
}

#[derive(clap::Subcommand, Debug)]
enum DefenceCommand {
    /// Compute (once) the proxy student's gradient on a held-out task set, for
    /// antidistillation sampling.
    Gradient(GradientArgs),
    /// Generation speed with antidistillation sampling off vs on, side by side.
    Bench(BenchArgs),
}

/// The antidistillation flags shared by `generate` and `defence bench`.
#[derive(clap::Args, Clone, Debug)]
pub struct AntidistillArgs {
    /// Proxy student for antidistillation sampling: an `isotope distill` student
    /// directory or a llama GGUF (dequantized); must share the teacher's tokenizer.
    #[arg(long)]
    pub antidistill_proxy: Option<PathBuf>,
    /// The proxy's held-out gradient (`isotope defence gradient --out`).
    #[arg(long)]
    pub antidistill_grad: Option<PathBuf>,
    /// Strength λ (0: proxies run, sampling unchanged).
    #[arg(long, default_value_t = 1.0)]
    pub antidistill_lambda: f32,
    /// Finite-difference step ε (distance in weight space along the unit gradient).
    #[arg(long, default_value_t = 1e-2)]
    pub antidistill_eps: f64,
    /// Teacher candidates adjusted per step (the others are removed when λ > 0).
    #[arg(long, default_value_t = 32)]
    pub antidistill_top_k: usize,
    /// Plausibility α: candidates below α × the most likely one's probability are
    /// removed too when λ > 0 (0 keeps the whole top-k).
    #[arg(long, default_value_t = isotope_defence::DEFAULT_MIN_P)]
    pub antidistill_min_p: f32,
    /// Never make a token more likely that would repeat an n-gram of this length
    /// already in the answer (0: off).
    #[arg(long, default_value_t = 3)]
    pub antidistill_no_repeat_ngram: usize,
}

impl AntidistillArgs {
    pub fn config(&self) -> AntidistillConfig {
        AntidistillConfig {
            lambda: self.antidistill_lambda,
            eps: self.antidistill_eps,
            top_k: self.antidistill_top_k,
            min_p: self.antidistill_min_p,
            no_repeat_ngram: self.antidistill_no_repeat_ngram,
        }
    }

    /// The defence for `teacher`, if `--antidistill-proxy` was given.
    pub fn build(&self, teacher: &Model) -> Result<Option<Arc<Antidistill>>> {
        let (proxy_path, grad) = match (&self.antidistill_proxy, &self.antidistill_grad) {
            (None, None) => return Ok(None),
            (Some(p), Some(g)) => (p, g),
            _ => bail!("--antidistill-proxy and --antidistill-grad go together"),
        };
        Ok(Some(antidistill_for_teacher(
            teacher,
            proxy_path,
            grad,
            self.config(),
        )?))
    }
}

#[derive(clap::Args, Debug)]
struct GradientArgs {
    /// Proxy student: an `isotope distill` student directory or a llama GGUF.
    #[arg(long)]
    proxy: PathBuf,
    /// Held-out task set: JSONL of prompt/response lines (as `distill train` reads,
    /// e.g. teacher outputs from `distill harvest`).
    #[arg(long)]
    tasks: PathBuf,
    /// Output safetensors file.
    #[arg(long)]
    out: PathBuf,
    /// Use at most this many lines of the task set.
    #[arg(long)]
    max_examples: Option<usize>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

fn progress_bar(len: usize, what: &str) -> indicatif::ProgressBar {
    indicatif::ProgressBar::new(len as u64).with_style(
        indicatif::ProgressStyle::with_template(&format!("{{bar:30}} {{pos}}/{{len}} {what}"))
            .expect("static template"),
    )
}

fn gradient(a: GradientArgs) -> Result<()> {
    let (proxy, tok) = load_proxy(&a.proxy)?;
    let opts = DataOptions {
        vocab_size: proxy.config().vocab_size,
        ..DataOptions::default()
    };
    let mut data = load_jsonl(&a.tasks, Some(&tok), &opts)
        .with_context(|| format!("reading the task set {}", a.tasks.display()))?;
    for w in &data.warnings {
        eprintln!("{}:{}: {}", a.tasks.display(), w.line, w.message);
    }
    if let Some(n) = a.max_examples {
        data.examples.truncate(n);
    }
    if data.examples.is_empty() {
        bail!(
            "{} holds no usable prompt/response lines",
            a.tasks.display()
        );
    }
    let bar = progress_bar(data.examples.len(), "examples");
    let g = proxy_gradient(&proxy, &data, &mut |done, _| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    g.save(&a.out)?;
    let report = g.report.expect("computed here");
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "gradient of {} ({} params) on {} examples / {} response tokens: held-out loss \
             {:.3} nats/token, |g| = {:.3e} → {}",
            a.proxy.display(),
            report.params,
            report.examples,
            report.positions,
            report.loss,
            report.norm,
            a.out.display()
        );
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    antidistill: AntidistillArgs,
    /// Prompts (from the data directory's self-instruct set), each generated off and on.
    #[arg(long, default_value_t = 4)]
    prompts: usize,
    /// Tokens generated per prompt.
    #[arg(long, default_value_t = 64)]
    gen_tokens: usize,
    /// Interleaved off/on rounds; the best of each counts.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Sampling temperature.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct BenchSide {
    tokens: usize,
    decode_secs: f64,
    tokens_per_sec: f64,
    us_per_token: f64,
}

#[derive(Serialize)]
struct BenchReport {
    prompts: usize,
    gen_tokens: usize,
    rounds: usize,
    lambda: f32,
    top_k: usize,
    off: BenchSide,
    on: BenchSide,
    extra_us_per_token: f64,
    /// Mean time inside the antidistillation stage per token (both proxies' forward
    /// passes and the adjustment).
    stage_us_per_token: f64,
    slowdown: f64,
}

const BENCH_PROMPTS: [&str; 8] = [
    "Write a short poem about the sea.",
    "Explain how a bicycle stays upright.",
    "Give three tips for learning a new language.",
    "What is the difference between weather and climate?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "How do I make a cup of green tea?",
    "Why is the sky blue?",
    "List some uses of a paperclip.",
];

fn bench(a: BenchArgs) -> Result<()> {
    if a.prompts == 0 || a.gen_tokens == 0 || a.rounds == 0 {
        bail!("--prompts, --gen-tokens and --rounds must be at least 1");
    }
    if a.antidistill.antidistill_proxy.is_none() {
        bail!("pass --antidistill-proxy and --antidistill-grad (what to measure)");
    }
    crate::generate::check_model_present(&a.model)?;
    let model = crate::generate::load_model(&a.model)?;
    let defence = a.antidistill.build(&model)?.expect("checked above");
    let prompts: Vec<Vec<u32>> = (0..a.prompts)
        .map(|i| {
            let text = BENCH_PROMPTS[i % BENCH_PROMPTS.len()];
            model.chat_tokens(&[ChatMessage::new("user", text)])
        })
        .collect::<std::result::Result<_, _>>()?;
    let cfg = BatchConfig {
        slots: 1,
        ctx_per_slot: 1024,
        threads: a.model.threads,
        ..BatchConfig::default()
    };
    let bar = progress_bar(a.rounds * 2 * a.prompts, "generations");
    // Best (fastest) of the rounds, per side: noise on a shared machine only slows.
    let mut best: [Option<(usize, f64)>; 2] = [None, None];
    for _ in 0..a.rounds {
        for (side, on) in [(0, false), (1, true)] {
            let (mut tokens, mut secs) = (0usize, 0f64);
            for (i, p) in prompts.iter().enumerate() {
                let params = SamplingParams {
                    temperature: a.temperature,
                    seed: i as u64,
                    ..SamplingParams::default()
                };
                let mut sampler = Sampler::new(params, 0);
                if on {
                    sampler = sampler.with_adjust(Box::new(defence.stage()));
                }
                let req = GenerationRequest {
                    prompt: p.clone(),
                    sampler,
                    max_tokens: Some(a.gen_tokens),
                    stop: Vec::new(),
                    top_logprobs: 0,
                };
                let g = isotope_engine::generate(&model, req, cfg.clone(), |_| {})?;
                // The first token comes from the prefill; decode time covers the rest.
                tokens += g.stats.completion_tokens.saturating_sub(1);
                secs += g.stats.decode_secs;
                bar.inc(1);
            }
            let rate = tokens as f64 / secs.max(1e-9);
            if best[side].is_none_or(|(t, s)| rate > t as f64 / s.max(1e-9)) {
                best[side] = Some((tokens, secs));
            }
        }
    }
    bar.finish_and_clear();
    let side = |b: Option<(usize, f64)>| {
        let (tokens, secs) = b.expect("at least one round");
        BenchSide {
            tokens,
            decode_secs: secs,
            tokens_per_sec: tokens as f64 / secs.max(1e-9),
            us_per_token: secs * 1e6 / tokens.max(1) as f64,
        }
    };
    let (off, on) = (side(best[0]), side(best[1]));
    let stats = defence.stats();
    let report = BenchReport {
        prompts: a.prompts,
        gen_tokens: a.gen_tokens,
        rounds: a.rounds,
        lambda: defence.config().lambda,
        top_k: defence.config().top_k,
        extra_us_per_token: on.us_per_token - off.us_per_token,
        stage_us_per_token: stats.micros_per_step(),
        slowdown: on.us_per_token / off.us_per_token.max(1e-9),
        off,
        on,
    };
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!(
        "antidistillation sampling cost: {} prompts × {} tokens, T={}, best of {} interleaved rounds",
        a.prompts, a.gen_tokens, a.temperature, a.rounds
    );
    println!("{:<6} {:>8} {:>10} {:>10}", "", "tokens", "tok/s", "µs/tok");
    for (name, s) in [("off", &report.off), ("on", &report.on)] {
        println!(
            "{name:<6} {:>8} {:>10.1} {:>10.0}",
            s.tokens, s.tokens_per_sec, s.us_per_token
        );
    }
    println!(
        "extra {:+.0} µs/token ({:.2}× slower); {:.0} µs/token inside the stage (λ={}, top-k={}); {} stage failures",
        report.extra_us_per_token,
        report.slowdown,
        report.stage_us_per_token,
        report.lambda,
        report.top_k,
        stats.failures()
    );
    Ok(())
}

pub fn defence(a: DefenceArgs) -> Result<()> {
    match a.command {
        DefenceCommand::Gradient(a) => gradient(a),
        DefenceCommand::Bench(a) => bench(a),
    }
}
