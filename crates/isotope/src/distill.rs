//! `isotope distill harvest|train|eval`, and `generate --model DIR` for a trained
//! student: flags, progress bars and output; the work is in `isotope-distill` (and,
//! for the teacher side of `eval` and on-policy `train`, `isotope-engine`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use isotope_distill::{
    load_jsonl, DType, DataOptions, Device, HarvestConfig, LossKind, OnPolicy, Student,
    StudentConfig, StudentTokenizer, TopK, TrainConfig, CHECKPOINT_DIR, TOKENIZER_FILE,
};
use isotope_sampling::{Sampler, SamplingParams};
use serde::Serialize;

#[derive(clap::Args, Debug)]
pub struct DistillArgs {
    #[command(subcommand)]
    command: DistillCommand,
}

#[derive(clap::Subcommand, Debug)]
enum DistillCommand {
    /// Ask an OpenAI-compatible endpoint to answer prompts; append the answers to a
    /// resumable JSONL file.
    Harvest(HarvestArgs),
    /// Train a student on harvested responses (or their top-k log-probabilities).
    Train(TrainArgs),
    /// Compare a student with its teacher on held-out harvested data.
    Eval(EvalArgs),
    /// Write a trained student as a llama GGUF, which `isotope serve`, `generate` and
    /// a white-box `audit model` load through llama.cpp, the form a model is shipped in.
    Export(ExportArgs),
}

pub fn distill(a: DistillArgs) -> Result<()> {
    match a.command {
        DistillCommand::Harvest(a) => harvest(a),
        DistillCommand::Train(a) => train(a),
        DistillCommand::Eval(a) => eval(a),
        DistillCommand::Export(a) => export(a),
    }
}

#[derive(clap::Args, Debug)]
struct HarvestArgs {
    /// Base URL of the API (`http://host:port`, `…/v1`, or the full
    /// `…/v1/chat/completions`).
    #[arg(long)]
    endpoint: String,
    /// API key (sent as a bearer token).
    #[arg(long, env = "ISOTOPE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// JSONL prompts: `{"prompt": …}`, self-instruct `instruction`(+`input`), or GSM8K
    /// `question` lines.
    #[arg(long)]
    prompts: PathBuf,
    /// Output JSONL (appended to; ids already there are skipped, so a rerun resumes).
    #[arg(long)]
    out: PathBuf,
    /// Model name (default: the first one `GET /v1/models` lists).
    #[arg(long)]
    model: Option<String>,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Most requests started per second (default: no limit).
    #[arg(long)]
    rps: Option<f64>,
    #[arg(long, default_value_t = 256)]
    max_tokens: u32,
    /// Ask for this many top log-probabilities per token (0: none).
    #[arg(long, default_value_t = 0)]
    top_logprobs: u32,
    #[arg(long, default_value_t = 1)]
    samples_per_prompt: usize,
    /// Sampling temperature (default: the server's).
    #[arg(long)]
    temperature: Option<f32>,
    /// Base seed: record (prompt p, sample s) asks for seed + p × samples + s.
    #[arg(long)]
    seed: Option<u64>,
    /// System message sent before every prompt.
    #[arg(long)]
    system: Option<String>,
    /// Only the first N prompts of the file.
    #[arg(long)]
    limit_prompts: Option<usize>,
    /// Retries per request before it counts as failed.
    #[arg(long, default_value_t = 8)]
    max_retries: u32,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Start no new request after this many minutes (requests in flight finish);
    /// the rest stay missing and the same command continues with them (0: no limit).
    #[arg(long, value_parser = crate::limit_minutes)]
    time_limit_minutes: Option<f64>,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
}

fn report_warnings(file: &Path, warnings: &[isotope_distill::LineWarning]) {
    for w in warnings.iter().take(20) {
        eprintln!("{}:{}: skipped: {}", file.display(), w.line, w.message);
    }
    if warnings.len() > 20 {
        eprintln!(
            "{}: {} more lines skipped",
            file.display(),
            warnings.len() - 20
        );
    }
}

fn harvest(a: HarvestArgs) -> Result<()> {
    let (mut prompts, warnings) = isotope_distill::read_prompts(&a.prompts)?;
    report_warnings(&a.prompts, &warnings);
    if let Some(n) = a.limit_prompts {
        prompts.truncate(n);
    }
    if prompts.is_empty() {
        bail!("no usable prompts in {}", a.prompts.display());
    }
    let cfg = HarvestConfig {
        endpoint: a.endpoint,
        api_key: a.api_key,
        model: a.model,
        concurrency: a.concurrency,
        rps: a.rps,
        max_tokens: a.max_tokens,
        top_logprobs: a.top_logprobs,
        samples_per_prompt: a.samples_per_prompt,
        temperature: a.temperature,
        seed: a.seed,
        system: a.system,
        max_retries: a.max_retries,
        timeout: Duration::from_secs(a.timeout.max(1)),
        time_limit: a
            .time_limit_minutes
            .filter(|&m| m > 0.0)
            .map(|m| Duration::from_secs_f64(m * 60.0)),
        ..HarvestConfig::default()
    };
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} records {per_sec} {elapsed_precise} (eta {eta}) {msg}",
        )
        .expect("static template"),
    );
    let mut progress = |p: &isotope_distill::HarvestProgress| {
        bar.set_length(p.total as u64);
        bar.set_position((p.existing + p.written + p.failed) as u64);
        bar.set_message(format!(
            "{} tok, {} retries, {} × 429, {} failed",
            p.completion_tokens, p.retries, p.rate_limited, p.failed
        ));
    };
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let result = rt.block_on(isotope_distill::harvest(
        &cfg,
        &prompts,
        &a.out,
        &mut progress,
    ));
    bar.finish_and_clear();
    let mut report = result?;
    report.prompt_lines_skipped = warnings.len();
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        eprintln!(
            "{}: {} new records ({} already there, {} failed, {} missing) from {} in {:.1} s; \
             {} requests, {} retries, {} × 429, {} × 5xx, {} connection errors; \
             {} prompt + {} completion tokens ({:.1} completion tok/s)",
            report.out.display(),
            report.written,
            report.existing,
            report.failed,
            report.missing,
            report.model,
            report.elapsed_secs,
            report.requests,
            report.retries,
            report.rate_limited,
            report.server_errors,
            report.connection_errors,
            report.prompt_tokens,
            report.completion_tokens,
            report.completion_tokens_per_sec,
        );
        if report.time_limited {
            eprintln!(
                "stopped at the time limit: {} records not started; run the same command \
                 again to continue",
                report.missing
            );
        }
    }
    if report.failed > 0 {
        bail!(
            "{} records failed (last error: {}); rerun the same command to retry them",
            report.failed,
            report.last_error.as_deref().unwrap_or("unknown")
        );
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
struct TrainArgs {
    /// Harvested JSONL (`{"prompt", "response"}` lines, optionally with log-probs).
    #[arg(long)]
    data: PathBuf,
    /// Output directory (model, config, tokenizer, log, loss curve, checkpoint).
    #[arg(long)]
    out: PathBuf,
    /// Student size preset: tiny (≈7M parameters) or small (≈15M).
    #[arg(long, default_value = "tiny")]
    student: String,
    /// Initialise the student by dequantizing this llama GGUF instead of a preset.
    #[arg(long)]
    init_from_gguf: Option<PathBuf>,
    /// The teacher's GGUF, for its tokenizer.
    #[arg(long, default_value = crate::DEFAULT_MODEL)]
    tokenizer_gguf: PathBuf,
    /// sft (cross-entropy on responses), kl, rkl or jsd (on harvested top-k).
    #[arg(long, default_value = "sft")]
    loss: String,
    /// Teacher top-k entries per position for kl/rkl/jsd.
    #[arg(long, default_value_t = 20)]
    top_k: usize,
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Longest example in tokens (longer ones are cut).
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Peak learning rate (warm-up, then cosine).
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Cap on optimizer steps.
    #[arg(long)]
    max_steps: Option<usize>,
    /// Global gradient-norm cap (0 disables).
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f64,
    /// Seed of initialisation and data order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Checkpoint every N steps (and at the end).
    #[arg(long, default_value_t = 200)]
    checkpoint_every: usize,
    /// Continue from OUT/checkpoint.
    #[arg(long)]
    resume: bool,
    /// System message for prompts rendered from text.
    #[arg(long)]
    system: Option<String>,
    /// A local teacher GGUF (scored with llama.cpp): with a token-level loss it scores
    /// harvest lines that came without top-k log-probs, and `--on-policy` needs it.
    #[arg(long)]
    teacher: Option<PathBuf>,
    /// On-policy distillation (GKD): this fraction of the steps trains on the student's
    /// own continuations of the batch's prompts, scored by `--teacher` (0–1; needs
    /// --loss kl, rkl or jsd).
    #[arg(long)]
    on_policy: Option<f64>,
    /// Most tokens the student samples per prompt on an on-policy step.
    #[arg(long, default_value_t = 64)]
    on_policy_max_tokens: usize,
    /// Temperature of the student's on-policy samples.
    #[arg(long, default_value_t = 1.0)]
    on_policy_temperature: f32,
    /// CPU threads for the teacher (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Print one JSON object (first_loss, final_loss, tokens_per_sec, params, …).
    #[arg(long)]
    json: bool,
}

/// A local GGUF as the trainer's teacher: llama.cpp's teacher-forced scores.
struct GgufTeacher {
    model: isotope_engine::Model,
    threads: Option<usize>,
}

impl isotope_distill::Teacher for GgufTeacher {
    fn top_k(
        &mut self,
        tokens: &[u32],
        k: usize,
    ) -> std::result::Result<Vec<TopK>, isotope_distill::TeacherError> {
        Ok(self
            .model
            .score(tokens, k, self.threads)?
            .into_iter()
            .map(|s| TopK {
                ids: s.top.iter().map(|t| t.0).collect(),
                logprobs: s.top.iter().map(|t| t.1).collect(),
            })
            .collect())
    }
}

fn load_tokenizer(path: &Path) -> Result<StudentTokenizer> {
    if !path.exists() && path.as_os_str() == crate::DEFAULT_MODEL {
        bail!(
            "{} not found (its tokenizer is the student's): run `scripts/setup.sh`, or pass \
             --tokenizer-gguf",
            path.display()
        );
    }
    Ok(StudentTokenizer::from_gguf(path)?)
}

fn train(a: TrainArgs) -> Result<()> {
    let loss: LossKind = a.loss.parse()?;
    if !a.resume && a.out.join(CHECKPOINT_DIR).exists() {
        bail!(
            "{} already holds a training run: pass --resume to continue it, or choose another --out",
            a.out.display()
        );
    }
    let tok = load_tokenizer(&a.tokenizer_gguf)?;
    let student = match &a.init_from_gguf {
        Some(path) => Student::from_gguf(path, &Device::Cpu)?,
        None => Student::new(
            StudentConfig::preset(&a.student)?,
            a.seed,
            &Device::Cpu,
            DType::F32,
        )?,
    };
    let opts = DataOptions {
        system: a.system.clone(),
        vocab_size: student.config().vocab_size,
    };
    let data = load_jsonl(&a.data, Some(&tok), &opts)?;
    report_warnings(&a.data, &data.warnings);
    if loss.needs_top_logprobs() && data.with_top_logprobs() == 0 && a.teacher.is_none() {
        bail!(
            "--loss {loss} needs top log-probabilities, and no line of {} has them \
             (harvest with --top-logprobs K, or give a local --teacher GGUF to score them)",
            a.data.display()
        );
    }
    if a.on_policy.is_some() && a.teacher.is_none() {
        bail!(
            "--on-policy needs --teacher GGUF: the teacher scores the student's own samples \
             (an API only returns log-probs of its own answers)"
        );
    }
    let mut teacher = match &a.teacher {
        Some(path) => {
            let model = crate::generate::load_model(&crate::ModelArgs {
                model: path.clone(),
                threads: a.threads,
            })?;
            if model.n_vocab() != student.config().vocab_size {
                bail!(
                    "the teacher {} has a vocabulary of {} tokens and the student {}: \
                     they must share the tokenizer",
                    path.display(),
                    model.n_vocab(),
                    student.config().vocab_size
                );
            }
            Some(GgufTeacher {
                model,
                threads: a.threads,
            })
        }
        None => None,
    };
    let cfg = TrainConfig {
        on_policy: a.on_policy.map(|fraction| OnPolicy {
            fraction,
            max_new_tokens: a.on_policy_max_tokens,
            temperature: a.on_policy_temperature,
        }),
        loss,
        top_k: a.top_k,
        epochs: a.epochs,
        batch_size: a.batch_size,
        seq_len: a.seq_len,
        lr: a.lr,
        grad_clip: a.grad_clip,
        seed: a.seed,
        max_steps: a.max_steps,
        checkpoint_every: a.checkpoint_every,
        resume: a.resume,
        ..TrainConfig::default()
    };
    if !a.json {
        eprintln!(
            "training a {}-parameter student on {} examples ({} tokens, {} with top log-probs), loss {loss}",
            student.param_count(),
            data.examples.len(),
            data.tokens(),
            data.with_top_logprobs()
        );
    }
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps {elapsed_precise} (eta {eta}) {msg}",
        )
        .expect("static template"),
    );
    let teacher_ref = teacher
        .as_mut()
        .map(|t| t as &mut dyn isotope_distill::Teacher);
    let report = isotope_distill::train_with_teacher(
        &student,
        &data,
        Some(&tok),
        &cfg,
        teacher_ref,
        &a.out,
        &mut |p| {
            bar.set_length(p.total_steps as u64);
            bar.set_position(p.step as u64);
            bar.set_message(format!(
                "loss {:.3} lr {:.2e} {:.0} tok/s",
                p.loss, p.lr, p.tokens_per_sec
            ));
        },
    )?;
    bar.finish_and_clear();
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        eprintln!(
            "{} steps: loss {:.3} → {:.3}, {:.0} tokens/s, {} parameters; saved to {}",
            report.steps,
            report.first_loss,
            report.final_loss,
            report.tokens_per_sec,
            report.params,
            report.out_dir.display()
        );
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
struct EvalArgs {
    /// Trained student directory (from `distill train`).
    #[arg(long)]
    student: PathBuf,
    /// The teacher's GGUF (scored locally with llama.cpp).
    #[arg(long, default_value = crate::DEFAULT_MODEL)]
    teacher: PathBuf,
    /// Held-out harvested JSONL.
    #[arg(long)]
    data: PathBuf,
    /// Evaluate a freshly initialised student of the same architecture instead of the
    /// trained weights (the baseline).
    #[arg(long)]
    untrained: bool,
    /// Most examples scored.
    #[arg(long, default_value_t = 200)]
    limit: usize,
    /// Most examples whose final answer is compared (each needs a student generation).
    #[arg(long, default_value_t = 20)]
    answers: usize,
    /// Most tokens the student generates per answer.
    #[arg(long, default_value_t = 256)]
    answer_max_tokens: usize,
    /// Teacher top-k for the KL (the tail holds the rest).
    #[arg(long, default_value_t = 20)]
    kl_top_k: usize,
    /// Longest sequence scored, in tokens (longer ones are cut).
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Prompts the student continues with its own samples, scored by the teacher (the
    /// on-policy KL that GKD minimises; 0 skips it).
    #[arg(long, default_value_t = 20)]
    on_policy_samples: usize,
    /// Most tokens the student samples per on-policy prompt.
    #[arg(long, default_value_t = 64)]
    on_policy_max_tokens: usize,
    /// Temperature of the student's on-policy samples.
    #[arg(long, default_value_t = 1.0)]
    on_policy_temperature: f32,
    /// Seed of the student's on-policy samples.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// CPU threads for the teacher (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long)]
    json: bool,
}

#[derive(Serialize, Default)]
struct EvalReport {
    student: PathBuf,
    untrained: bool,
    params: usize,
    examples: usize,
    /// Response tokens scored.
    tokens: usize,
    /// exp(mean NLL) of the student on the teacher's responses.
    student_perplexity: f64,
    /// The teacher's own perplexity on the same tokens (for scale).
    teacher_perplexity: f64,
    /// Fraction of response positions where the student's argmax is the teacher's.
    top1_agreement: f64,
    /// Mean KL(teacher ‖ student) per response position over the teacher's top-k +
    /// tail, nats.
    kl_teacher_student: f64,
    kl_top_k: usize,
    /// Examples whose teacher response has a final number, compared.
    answers_compared: usize,
    /// Fraction where the student's greedy answer ends in the same number.
    answer_agreement: f64,
    /// The student on its own samples of held-out prompts (KL to the teacher and top-1
    /// agreement there), absent with `--on-policy-samples 0`.
    on_policy: Option<isotope_distill::OwnSampleEval>,
    elapsed_secs: f64,
}

fn eval(a: EvalArgs) -> Result<()> {
    let start = std::time::Instant::now();
    let mut student = Student::load(&a.student, &Device::Cpu)
        .with_context(|| format!("loading the student from {}", a.student.display()))?;
    if a.untrained {
        student = Student::new(student.config().clone(), 0, &Device::Cpu, DType::F32)?;
    }
    let tok = student_tokenizer(&a.student, &a.teacher)?;
    let mut teacher = GgufTeacher {
        model: crate::generate::load_model(&crate::ModelArgs {
            model: a.teacher.clone(),
            threads: a.threads,
        })?,
        threads: a.threads,
    };
    let opts = DataOptions {
        system: None,
        vocab_size: student.config().vocab_size,
    };
    let data = load_jsonl(&a.data, Some(&tok), &opts)?;
    report_warnings(&a.data, &data.warnings);
    let examples: Vec<_> = data.examples.iter().take(a.limit).collect();
    let seq_len = a.seq_len.min(student.config().max_seq_len);
    let bar = ProgressBar::new(examples.len() as u64).with_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} scored {elapsed_precise} (eta {eta})")
            .expect("static template"),
    );
    let mut r = EvalReport {
        student: a.student.clone(),
        untrained: a.untrained,
        params: student.param_count(),
        kl_top_k: a.kl_top_k,
        ..EvalReport::default()
    };
    let (mut s_nll, mut t_nll, mut agree, mut kl) = (0.0f64, 0.0f64, 0usize, 0.0f64);
    for ex in &examples {
        bar.inc(1);
        let toks = &ex.tokens[..ex.tokens.len().min(seq_len)];
        if toks.len() <= ex.prompt_len {
            continue;
        }
        let t_scores = teacher.model.score(toks, a.kl_top_k.max(1), a.threads)?;
        let logits = student.logits(&toks[..toks.len() - 1])?;
        // Position i predicts toks[i + 1]; response targets start at prompt_len.
        for i in ex.prompt_len - 1..toks.len() - 1 {
            let target = toks[i + 1];
            let lp = isotope_distill::log_softmax_row(&logits[i]);
            s_nll -= lp[target as usize];
            let ts = &t_scores[i];
            t_nll -= ts.logprob as f64;
            if let Some(&(t1, _)) = ts.top.first() {
                agree += usize::from(isotope_distill::argmax(&logits[i]) == t1);
            }
            kl += isotope_distill::kl_top_tail(&ts.top, &lp);
            r.tokens += 1;
        }
        r.examples += 1;
    }
    bar.finish_and_clear();
    let n = r.tokens.max(1) as f64;
    r.student_perplexity = (s_nll / n).exp();
    r.teacher_perplexity = (t_nll / n).exp();
    r.top1_agreement = agree as f64 / n;
    r.kl_teacher_student = kl / n;

    // Final answers: greedy student generations on prompts whose teacher answer ends in
    // a number.
    let end = tok.token_id(isotope_distill::CHATML_END);
    let candidates: Vec<_> = examples
        .iter()
        .filter_map(|ex| {
            let resp = tok.decode(&ex.tokens[ex.prompt_len..]).ok()?;
            isotope_distill::final_answer(&resp).map(|ans| (ex, ans))
        })
        .take(a.answers)
        .collect();
    let bar = ProgressBar::new(candidates.len() as u64).with_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} answers {elapsed_precise} (eta {eta})")
            .expect("static template"),
    );
    let mut same = 0usize;
    for (ex, want) in &candidates {
        bar.inc(1);
        let mut sampler = Sampler::new(
            SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            },
            0,
        );
        let prompt = &ex.tokens[..ex.prompt_len];
        let stop: Vec<u32> = end.into_iter().collect();
        let out = student.generate(prompt, &mut sampler, a.answer_max_tokens, &stop)?;
        let text = tok.decode(&out)?;
        if isotope_distill::final_answer(&text).as_deref() == Some(want.as_str()) {
            same += 1;
        }
    }
    bar.finish_and_clear();
    r.answers_compared = candidates.len();
    r.answer_agreement = same as f64 / candidates.len().max(1) as f64;

    // The student on its own samples: what off-policy (harvest) training never shows it.
    if a.on_policy_samples > 0 {
        let cfg = isotope_distill::OnPolicy {
            fraction: 1.0,
            max_new_tokens: a.on_policy_max_tokens,
            temperature: a.on_policy_temperature,
        };
        let prompts: Vec<&[u32]> = examples
            .iter()
            .take(a.on_policy_samples)
            .map(|ex| &ex.tokens[..ex.prompt_len])
            .collect();
        let spinner = ProgressBar::new_spinner().with_message(format!(
            "student samples {} prompts, the teacher scores them",
            prompts.len()
        ));
        spinner.enable_steady_tick(std::time::Duration::from_millis(200));
        let stop: Vec<u32> = end.into_iter().collect();
        let own = isotope_distill::eval_own_samples(
            &student,
            &mut teacher,
            &prompts,
            &cfg,
            a.kl_top_k,
            &stop,
            a.seed,
        )
        .context("scoring the student's own samples (check --on-policy-max-tokens and --on-policy-temperature)")?;
        spinner.finish_and_clear();
        r.on_policy = Some(own);
    }
    r.elapsed_secs = start.elapsed().as_secs_f64();
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{}{}: {} examples, {} response tokens\n  student perplexity {:.2} (teacher {:.2})\n  \
             top-1 agreement {:.1}%\n  KL(teacher‖student) {:.3} nats/token (top-{} + tail)\n  \
             final-answer agreement {:.1}% of {}",
            r.student.display(),
            if r.untrained { " (untrained)" } else { "" },
            r.examples,
            r.tokens,
            r.student_perplexity,
            r.teacher_perplexity,
            100.0 * r.top1_agreement,
            r.kl_teacher_student,
            r.kl_top_k,
            100.0 * r.answer_agreement,
            r.answers_compared
        );
        if let Some(own) = &r.on_policy {
            println!(
                "  on its own samples ({} prompts, {} tokens): KL(teacher‖student) {:.3} \
                 nats/token, top-1 agreement {:.1}%",
                own.samples,
                own.tokens,
                own.kl,
                100.0 * own.top1_agreement
            );
        }
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
struct ExportArgs {
    /// Trained student directory (from `distill train`).
    #[arg(long)]
    student: PathBuf,
    /// GGUF file to write (replaced only once the new one is complete).
    #[arg(long)]
    out: PathBuf,
    /// Storage of the weight matrices: `q8_0` (8-bit, ~¼ the size) or `f32` (exact).
    #[arg(long, default_value = "q8_0")]
    dtype: isotope_distill::ExportDtype,
    /// The teacher's GGUF, whose tokenizer (vocabulary, merges, chat template) the
    /// student shares and the export copies.
    #[arg(long, default_value = crate::DEFAULT_MODEL)]
    tokenizer_gguf: PathBuf,
    /// `general.name` written into the file.
    #[arg(long, default_value = "isotope-student")]
    name: String,
    /// Print one JSON object (out, dtype, bytes, params).
    #[arg(long)]
    json: bool,
}

fn export(a: ExportArgs) -> Result<()> {
    let student = Student::load(&a.student, &Device::Cpu)
        .with_context(|| format!("loading the student from {}", a.student.display()))?;
    if !a.tokenizer_gguf.exists() {
        bail!(
            "{} not found (its tokenizer is copied into the export): run `scripts/setup.sh`, \
             or pass --tokenizer-gguf",
            a.tokenizer_gguf.display()
        );
    }
    isotope_distill::export_gguf(&student, &a.tokenizer_gguf, &a.out, a.dtype, &a.name)
        .with_context(|| format!("exporting {} to {}", a.student.display(), a.out.display()))?;
    let bytes = std::fs::metadata(&a.out).map(|m| m.len()).unwrap_or(0);
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "out": a.out,
                "dtype": a.dtype.to_string(),
                "bytes": bytes,
                "params": student.param_count(),
            })
        );
    } else {
        println!(
            "wrote {} ({}, {:.1} MB, {} parameters)",
            a.out.display(),
            a.dtype,
            bytes as f64 / 1e6,
            student.param_count()
        );
    }
    Ok(())
}

/// The tokenizer saved beside a student, else the teacher GGUF's.
fn student_tokenizer(dir: &Path, gguf: &Path) -> Result<StudentTokenizer> {
    let saved = dir.join(TOKENIZER_FILE);
    if saved.exists() {
        return Ok(StudentTokenizer::load(&saved)?);
    }
    load_tokenizer(gguf)
}

/// What `isotope generate` passes for a student directory.
pub struct StudentGenerate<'a> {
    pub dir: &'a Path,
    pub prompt: &'a str,
    pub system: Option<&'a str>,
    pub raw: bool,
    pub max_tokens: usize,
    pub params: SamplingParams,
    pub stop: &'a [String],
    pub json: bool,
}

#[derive(Serialize)]
struct StudentGenerateReport {
    text: String,
    tokens: Vec<u32>,
    finish_reason: &'static str,
    prompt_tokens: usize,
    completion_tokens: usize,
    gen_tokens_per_sec: f64,
    seed: u64,
    model: String,
}

/// `isotope generate --model DIR` for a student trained by `distill train`: the
/// student's own candle forward pass, sampled by the shared `Sampler`.
pub fn generate_student(g: StudentGenerate<'_>) -> Result<()> {
    let student = Student::load(g.dir, &Device::Cpu)
        .with_context(|| format!("loading the student from {}", g.dir.display()))?;
    let tok = student_tokenizer(g.dir, Path::new(crate::DEFAULT_MODEL))?;
    let text = if g.raw {
        g.prompt.to_owned()
    } else {
        isotope_distill::chatml_prompt(g.prompt, g.system)
    };
    let prompt = tok.encode(&text)?;
    let stop_ids: Vec<u32> = tok
        .token_id(isotope_distill::CHATML_END)
        .into_iter()
        .collect();
    let seed = g.params.seed;
    let mut sampler = Sampler::new(g.params, 0);
    let start = std::time::Instant::now();
    let mut out = student.generate(&prompt, &mut sampler, g.max_tokens, &stop_ids)?;
    let secs = start.elapsed().as_secs_f64();
    let mut finish = if out.last().is_some_and(|t| stop_ids.contains(t)) {
        out.pop();
        "stop"
    } else {
        "length"
    };
    let mut text = tok.decode(&out)?;
    if let Some(cut) = g.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
        text.truncate(cut);
        finish = "stop";
    }
    if g.json {
        let r = StudentGenerateReport {
            text,
            completion_tokens: out.len(),
            tokens: out,
            finish_reason: finish,
            prompt_tokens: prompt.len(),
            gen_tokens_per_sec: 0.0,
            seed,
            model: g.dir.display().to_string(),
        };
        let r = StudentGenerateReport {
            gen_tokens_per_sec: r.completion_tokens as f64 / secs.max(1e-9),
            ..r
        };
        println!("{}", serde_json::to_string(&r)?);
    } else {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{text}")?;
        eprintln!(
            "[student {}: {} prompt tokens, {} generated at {:.0} tok/s, seed {seed}]",
            g.dir.display(),
            prompt.len(),
            out.len(),
            out.len() as f64 / secs.max(1e-9)
        );
    }
    Ok(())
}
