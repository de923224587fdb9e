//! `isotope eval watermark`, `eval common-tuples` and `eval defences`: flags and output only;
//! the work is in `isotope-eval`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use isotope_engine::{LoadOptions, Model};
use isotope_eval::{build_common_tuples, default_data_dir, evaluate, load_human_texts, render};
use isotope_eval::{PowerOptions, COMMON_MIN_TEXTS};
use isotope_watermark::WatermarkKey;

use crate::ModelArgs;

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    #[command(subcommand)]
    command: EvalCommand,
}

#[derive(clap::Subcommand, Debug)]
enum EvalCommand {
    /// Detection power by length, quality cost and robustness of each scheme on the
    /// model's own answers to prompts from the data directory.
    Watermark(WatermarkArgs),
    /// Build the list of (window, token) tuples common in human text, which detection
    /// leaves out (from the reference split of the data directory).
    CommonTuples(CommonTuplesArgs),
    /// The trade-off of antidistillation sampling over λ: teacher quality next to the
    /// quality of a student distilled from the defended answers.
    Defences(DefencesArgs),
}

#[derive(clap::Args, Debug)]
struct DefencesArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Proxy student (student directory or GGUF); also the students' starting weights
    /// unless --student-init names others.
    #[arg(long)]
    antidistill_proxy: PathBuf,
    /// Where the distilled students start (student directory or GGUF, same vocabulary
    /// as the teacher). A defence measured against its own proxy is its best case; an
    /// attacker brings their own student.
    #[arg(long)]
    student_init: Option<PathBuf>,
    /// The proxy's held-out gradient (`isotope defence gradient`).
    #[arg(long)]
    antidistill_grad: PathBuf,
    /// λ values (comma-separated); 0 is the undefended baseline.
    #[arg(long, value_delimiter = ',', default_value = "0,1,4")]
    lambdas: Vec<f32>,
    #[arg(long, default_value_t = 1e-2)]
    antidistill_eps: f64,
    #[arg(long, default_value_t = 32)]
    antidistill_top_k: usize,
    /// Plausibility α of the defence (see `isotope generate --help`).
    #[arg(long, default_value_t = isotope_defence::DEFAULT_MIN_P)]
    antidistill_min_p: f32,
    /// n of the defence's no-boosted-repeats guard (0: off).
    #[arg(long, default_value_t = 3)]
    antidistill_no_repeat_ngram: usize,
    /// Prompts answered (and trained on) per λ.
    #[arg(long, default_value_t = 16)]
    train_prompts: usize,
    /// Held-out prompts whose undefended answers measure the students.
    #[arg(long, default_value_t = 8)]
    heldout_prompts: usize,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 48)]
    max_tokens: usize,
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Student fine-tuning epochs (the same budget for every λ).
    #[arg(long, default_value_t = 2)]
    epochs: usize,
    /// Student learning rate.
    #[arg(long, default_value_t = 3e-4)]
    lr: f64,
    #[arg(long, default_value_t = 0x150_7095)]
    seed: u64,
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Data directory (prompts from self-instruct).
    #[arg(long, env = "ISOTOPE_DATA")]
    data: Option<PathBuf>,
    /// Trade-off plot (PNG): teacher and student perplexity against λ.
    #[arg(long, default_value = "defences.png")]
    png: PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

fn defences(a: DefencesArgs) -> Result<()> {
    use isotope_defence::eval::{evaluate_defences, DefenceEvalConfig};
    if a.lambdas.is_empty() || a.train_prompts == 0 || a.heldout_prompts == 0 {
        anyhow::bail!("--lambdas, --train-prompts and --heldout-prompts must not be empty/0");
    }
    let data = a.data.clone().unwrap_or_else(default_data_dir);
    let file = data.join("self-instruct/user_oriented_instructions.jsonl");
    let (prompts, _) = isotope_distill::read_prompts(&file)
        .with_context(|| format!("reading prompts from {}", file.display()))?;
    let need = a.train_prompts + a.heldout_prompts;
    if prompts.len() < need {
        anyhow::bail!(
            "{} has {} prompts, {need} needed",
            file.display(),
            prompts.len()
        );
    }
    let texts: Vec<String> = prompts.into_iter().map(|p| p.text).collect();
    let model = crate::generate::load_model(&a.model)?;
    let ad = crate::defence::AntidistillArgs {
        antidistill_proxy: Some(a.antidistill_proxy.clone()),
        antidistill_grad: Some(a.antidistill_grad.clone()),
        antidistill_lambda: 1.0,
        antidistill_eps: a.antidistill_eps,
        antidistill_top_k: a.antidistill_top_k,
        antidistill_min_p: a.antidistill_min_p,
        antidistill_no_repeat_ngram: a.antidistill_no_repeat_ngram,
    };
    let defence = ad.build(&model)?.expect("proxy given");
    let (init_path, init_name) = match &a.student_init {
        Some(p) => (p.clone(), p.display().to_string()),
        None => (a.antidistill_proxy.clone(), "proxy".to_owned()),
    };
    let (student_init, tok) = isotope_defence::load_proxy(&init_path)
        .with_context(|| format!("loading the students' start {}", init_path.display()))?;
    let cfg = DefenceEvalConfig {
        lambdas: a.lambdas.clone(),
        max_tokens: a.max_tokens,
        temperature: a.temperature,
        seed: a.seed,
        concurrency: a.concurrency,
        threads: a.model.threads,
        train: isotope_distill::TrainConfig {
            epochs: a.epochs,
            lr: a.lr,
            seed: a.seed,
            checkpoint_every: 0,
            ..Default::default()
        },
    };
    let work = tempfile::tempdir()?;
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template("{spinner} {elapsed} {msg}").expect("static"));
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    let report = evaluate_defences(
        &model,
        &student_init,
        &init_name,
        &tok,
        &defence,
        &texts[..a.train_prompts],
        &texts[a.train_prompts..need],
        &cfg,
        work.path(),
        &mut |m| bar.set_message(m.to_owned()),
    )?;
    bar.finish_and_clear();
    isotope_defence::eval::tradeoff_png(&a.png, &report)?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!("note: {}", report.note);
    println!(
        "{} train prompts, {} held-out prompts ({} teacher tokens); students start from {}: \
         before fine-tuning ppl {:.2}, KL {:.3}",
        report.train_prompts,
        report.heldout_prompts,
        report.heldout_tokens,
        report.student_init,
        report.student_ppl_before,
        report.student_kl_before
    );
    println!(
        "{:>7} | {:>9} {:>7} {:>6} {:>8} {:>9} | {:>9} {:>7} {:>6} {:>8} {:>9} {:>8}",
        "lambda",
        "teach ppl",
        "top1",
        "dist2",
        "tokens",
        "teacher Δ",
        "stud ppl",
        "KL",
        "top1",
        "loss",
        "ppl Δ",
        "KL Δ"
    );
    for p in &report.points {
        println!(
            "{:>7} | {:>9.3} {:>7.3} {:>6.3} {:>8} {:>+8.1}% | {:>9.2} {:>7.3} {:>6.3} {:>8.3} {:>+8.1}% {:>+7.1}%",
            p.lambda,
            p.teacher_ppl,
            p.teacher_top1_agreement,
            p.teacher_distinct2,
            p.teacher_tokens,
            100.0 * p.teacher_ppl_increase,
            p.student_ppl,
            p.student_kl,
            p.student_top1_agreement,
            p.student_train_loss,
            100.0 * p.student_ppl_increase,
            100.0 * p.student_kl_increase
        );
    }
    println!("plot: {}", a.png.display());
    Ok(())
}

#[derive(clap::Args, Debug)]
struct WatermarkArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Schemes (comma-separated, each with optional parameters as for `generate
    /// --scheme`).
    #[arg(long, default_value = "kgw,unigram,gumbel,synthid")]
    schemes: String,
    /// Responses per scheme (and unwatermarked, same prompts and seeds).
    #[arg(long, default_value_t = 100)]
    n: usize,
    /// Most tokens per response.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Lengths at which the first L tokens are tested (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "32,64,128,256")]
    buckets: Vec<usize>,
    /// Sampling temperature.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Seed of the prompt sample, sampling and attacks.
    #[arg(long, default_value_t = 0x150_7095)]
    seed: u64,
    /// Sequences decoded at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Watermark key file (default: a fresh random key).
    #[arg(long)]
    watermark_key: Option<PathBuf>,
    /// Tokens of each response attacked in the robustness tests.
    #[arg(long, default_value_t = 128)]
    robust_tokens: usize,
    /// Score every tuple, even those common in human text.
    #[arg(long)]
    no_common_filter: bool,
    /// Skip the perplexity measurement (one scoring pass per response).
    #[arg(long)]
    no_quality: bool,
    /// Also show entropy-aware detection (SWEET) beside the plain detector: the model
    /// re-reads every response and only tokens at which it was uncertain are scored.
    #[arg(long)]
    entropy_aware: bool,
    /// Entropy rules shown with --entropy-aware (comma-separated, `shannon:NATS`,
    /// `spike:S` or `weighted`; default: isotope's fixed rule). Several rules are for tuning only:
    /// pick one on prompts the evaluation does not use (--prompt-skip).
    #[arg(long, value_delimiter = ',')]
    entropy_rules: Vec<String>,
    /// Skip the first N prompts of the seeded sample (half of each kind), e.g. to tune
    /// on prompts disjoint from an evaluation run with the same seed.
    #[arg(long, default_value_t = 0)]
    prompt_skip: usize,
    /// Data directory (prompts and human text).
    #[arg(long, env = "ISOTOPE_DATA")]
    data: Option<PathBuf>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Also write the JSON object to this file (the table still goes to stdout
    /// unless --json), so one long run gives both.
    #[arg(long)]
    json_out: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct CommonTuplesArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Output file.
    #[arg(long)]
    out: PathBuf,
    /// Data directory.
    #[arg(long, env = "ISOTOPE_DATA")]
    data: Option<PathBuf>,
}

pub fn eval(a: EvalArgs) -> Result<()> {
    match a.command {
        EvalCommand::Watermark(a) => watermark(a),
        EvalCommand::CommonTuples(a) => common_tuples(a),
        EvalCommand::Defences(a) => defences(a),
    }
}

fn watermark(a: WatermarkArgs) -> Result<()> {
    let schemes = a
        .schemes
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| crate::watermark::parse_scheme(s.trim()))
        .collect::<Result<Vec<_>>>()?;
    anyhow::ensure!(!schemes.is_empty(), "--schemes is empty");
    anyhow::ensure!(
        a.n > 0 && a.max_tokens > 0,
        "--n and --max-tokens must be ≥ 1"
    );
    let key = match &a.watermark_key {
        Some(p) => crate::watermark::load_key(p)?,
        None => Arc::new(WatermarkKey::generate()?),
    };
    let entropy_rules = if a.entropy_aware || !a.entropy_rules.is_empty() {
        crate::watermark::parse_entropy_rules(&a.entropy_rules)?
    } else {
        Vec::new()
    };
    let model = crate::generate::load_model(&a.model)?;
    let texts = load_human_texts(a.data.clone().unwrap_or_else(default_data_dir))?;
    let common = crate::watermark::common_list(&model, None, a.no_common_filter)?;
    let opts = PowerOptions {
        schemes,
        n: a.n,
        max_tokens: a.max_tokens,
        buckets: a.buckets.clone(),
        temperature: a.temperature,
        seed: a.seed,
        concurrency: a.concurrency,
        threads: a.model.threads,
        robust_tokens: a.robust_tokens,
        common,
        quality: !a.no_quality,
        entropy_rules,
        prompt_skip: a.prompt_skip,
        ..PowerOptions::default()
    };
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>14} [{bar:40}] {pos}/{len} {elapsed_precise} (eta {eta})",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let report = evaluate(&model, &texts, key, &opts, &mut |phase, done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        bar.set_message(phase.to_owned());
    })?;
    bar.finish_and_clear();
    let json = serde_json::to_string(&report)?;
    if let Some(path) = &a.json_out {
        std::fs::write(path, format!("{json}\n"))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if a.json {
        println!("{json}");
    } else {
        print!("{}", render(&report));
    }
    Ok(())
}

fn common_tuples(a: CommonTuplesArgs) -> Result<()> {
    crate::generate::check_model_present(&a.model)?;
    let model = Model::load(
        &a.model.model,
        &LoadOptions {
            vocab_only: true,
            ..LoadOptions::default()
        },
    )?;
    let texts = load_human_texts(a.data.unwrap_or_else(default_data_dir))?;
    let list = build_common_tuples(&model, &texts);
    let bytes = list.to_bytes();
    std::fs::write(&a.out, &bytes).with_context(|| format!("cannot write {}", a.out.display()))?;
    eprintln!(
        "wrote {} tuples common to ≥ {COMMON_MIN_TEXTS} of {} reference texts ({} bytes, \
         tokenizer {}) to {}",
        list.len(),
        list.meta().reference_texts,
        bytes.len(),
        list.meta().tokenizer,
        a.out.display()
    );
    Ok(())
}
