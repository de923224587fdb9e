//! `isotope generate` and `isotope bench`.

use std::io::Write;

use anyhow::{bail, Context, Result};
use isotope_engine::bench::{BenchConfig, BenchRow};
use isotope_engine::{generate as run, BatchConfig, ChatMessage, GenerationRequest, Model};
use isotope_sampling::{Sampler, SamplingParams};
use serde::Serialize;

use std::path::PathBuf;

use isotope_watermark::WatermarkHook;

use crate::ModelArgs;

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The user's message (or, with --raw, the literal prompt).
    #[arg(long)]
    prompt: String,
    /// System message (default: the chat template's own).
    #[arg(long)]
    system: Option<String>,
    /// Feed the prompt as plain text, without the chat template.
    #[arg(long)]
    raw: bool,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Seed of the sampler's random stream (default: random, printed with --json).
    #[arg(long)]
    seed: Option<u64>,
    /// Softmax temperature; 0 is greedy.
    #[arg(long, allow_negative_numbers = true, default_value_t = 0.7)]
    temperature: f32,
    /// Nucleus sampling mass (1 disables).
    #[arg(long, allow_negative_numbers = true, default_value_t = 1.0)]
    top_p: f32,
    /// Keep only the k most likely tokens (0 disables).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Drop tokens less likely than min-p × the most likely one (0 disables).
    #[arg(long, allow_negative_numbers = true, default_value_t = 0.0)]
    min_p: f32,
    /// Repetition penalty over the last 64 tokens (1 disables).
    #[arg(long, allow_negative_numbers = true, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Stop string (repeatable); generation ends before it.
    #[arg(long)]
    stop: Vec<String>,
    /// Context size (prompt + generated tokens).
    #[arg(long, default_value_t = 2048)]
    ctx: u32,
    /// Watermark every sampled token with this key file.
    #[arg(long, env = "ISOTOPE_WATERMARK_KEY")]
    watermark_key: Option<PathBuf>,
    /// Watermark scheme (with --watermark-key): kgw, unigram, gumbel, synthid, with
    /// optional parameters, e.g. `kgw:gamma=0.25,delta=2,h=4,seeding=left`.
    #[arg(long, default_value = "kgw")]
    scheme: String,
    #[command(flatten)]
    antidistill: crate::defence::AntidistillArgs,
    /// Print one JSON object (text, token ids, timings) instead of streaming text.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct WatermarkReport {
    /// The scheme applied (greedy turns gumbel/synthid into kgw).
    scheme: String,
    key_id: String,
}

#[derive(Serialize)]
struct AntidistillReport {
    lambda: f32,
    eps: f64,
    top_k: usize,
    /// Mean time inside the antidistillation stage per token.
    stage_us_per_token: f64,
}

#[derive(Serialize)]
struct GenerateReport {
    text: String,
    tokens: Vec<u32>,
    finish_reason: isotope_engine::FinishReason,
    prompt_tokens: usize,
    completion_tokens: usize,
    prompt_tokens_per_sec: f64,
    gen_tokens_per_sec: f64,
    seed: u64,
    model: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    watermark: Option<WatermarkReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    antidistill: Option<AntidistillReport>,
}

fn sampling_params(a: &GenerateArgs, seed: u64) -> Result<SamplingParams> {
    let params = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repetition_penalty: a.repetition_penalty,
        seed,
        ..SamplingParams::default()
    };
    if let Err(e) = params.validate() {
        bail!("{e} (flag --{})", e.param.replace('_', "-"));
    }
    Ok(params)
}

/// A friendlier error than "file not found" when the default model was never fetched.
pub fn check_model_present(args: &ModelArgs) -> Result<()> {
    if !args.model.exists() && args.model.as_os_str() == crate::DEFAULT_MODEL {
        bail!(
            "model {} not found: run `scripts/setup.sh` to fetch it, or pass --model",
            args.model.display()
        );
    }
    Ok(())
}

pub fn load_model(args: &ModelArgs) -> Result<Model> {
    check_model_present(args)?;
    Ok(Model::load(&args.model, &Default::default())?)
}

pub fn generate(a: GenerateArgs) -> Result<()> {
    let seed = a.seed.unwrap_or_else(rand_seed);
    let params = sampling_params(&a, seed)?;
    if a.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    if a.model.model.is_dir() {
        if a.watermark_key.is_some() {
            bail!("--watermark-key is not supported with a student directory");
        }
        if a.antidistill.antidistill_proxy.is_some() {
            bail!("--antidistill-proxy is not supported with a student directory");
        }
        return crate::distill::generate_student(crate::distill::StudentGenerate {
            dir: &a.model.model,
            prompt: &a.prompt,
            system: a.system.as_deref(),
            raw: a.raw,
            max_tokens: a.max_tokens,
            params,
            stop: &a.stop,
            json: a.json,
        });
    }
    let scheme = crate::watermark::parse_scheme(&a.scheme)?;
    let key = a
        .watermark_key
        .as_deref()
        .map(crate::watermark::load_key)
        .transpose()?;
    let model = load_model(&a.model)?;
    let prompt = if a.raw {
        model.tokenize(&a.prompt, true, false)
    } else {
        let mut messages = Vec::new();
        if let Some(system) = &a.system {
            messages.push(ChatMessage::new("system", system.clone()));
        }
        messages.push(ChatMessage::new("user", a.prompt.clone()));
        model
            .chat_tokens(&messages)
            .context("rendering the chat prompt (pass --raw to skip the template)")?
    };
    let defence = a.antidistill.build(&model)?;
    let greedy = params.is_greedy();
    let mut sampler = Sampler::new(params, 0);
    if let Some(d) = &defence {
        // Runs before the watermark hook whatever the call order (see LogitAdjust).
        sampler = sampler.with_adjust(Box::new(d.stage()));
    }
    let mut watermark = None;
    if let Some(key) = &key {
        let hook = WatermarkHook::new(
            key.clone(),
            &scheme,
            crate::watermark::excluded(&model),
            greedy,
        );
        if hook.scheme() != &scheme {
            eprintln!(
                "note: temperature 0 cannot carry a {} watermark; using {} instead",
                scheme.name(),
                hook.scheme()
            );
        }
        watermark = Some(WatermarkReport {
            scheme: hook.scheme().to_string(),
            key_id: key.id().to_owned(),
        });
        sampler = sampler.with_hook(Box::new(hook));
    }
    let req = GenerationRequest {
        prompt,
        sampler,
        max_tokens: Some(a.max_tokens),
        stop: a.stop.clone(),
        top_logprobs: 0,
    };
    let cfg = BatchConfig {
        slots: 1,
        ctx_per_slot: a.ctx.min(model.n_ctx_train()),
        threads: a.model.threads,
        ..BatchConfig::default()
    };
    let stdout = std::io::stdout();
    let json = a.json;
    let gen = run(&model, req, cfg, |text| {
        if !json {
            let mut out = stdout.lock();
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
        }
    })?;
    let s = &gen.stats;
    let prompt_tps = s.prompt_tokens as f64 / s.prefill_secs.max(1e-9);
    let gen_tps = s.completion_tokens.saturating_sub(1) as f64 / s.decode_secs.max(1e-9);
    if json {
        let report = GenerateReport {
            text: gen.text,
            tokens: gen.tokens,
            finish_reason: gen.finish_reason,
            prompt_tokens: s.prompt_tokens,
            completion_tokens: s.completion_tokens,
            prompt_tokens_per_sec: prompt_tps,
            gen_tokens_per_sec: gen_tps,
            seed,
            model: model.path().display().to_string(),
            watermark,
            antidistill: defence.as_ref().map(|d| AntidistillReport {
                lambda: d.config().lambda,
                eps: d.config().eps,
                top_k: d.config().top_k,
                stage_us_per_token: d.stats().micros_per_step(),
            }),
        };
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!();
        eprintln!(
            "[{} prompt tokens at {prompt_tps:.0} tok/s, {} generated at {gen_tps:.0} tok/s, seed {seed}]",
            s.prompt_tokens, s.completion_tokens
        );
    }
    Ok(())
}

fn rand_seed() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Concurrent sequences to measure (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    concurrency: Vec<usize>,
    /// Prompt length per sequence, in tokens.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens generated per sequence.
    #[arg(long, default_value_t = 64)]
    gen_tokens: usize,
    /// Watermark schemes to compare with the plain sampler (comma-separated, each
    /// with optional parameters as for `generate --scheme`, e.g.
    /// `kgw,kgw:gamma=0.5,delta=1,unigram`); empty: no comparison.
    #[arg(long, default_value = "kgw,unigram,gumbel,synthid")]
    schemes: String,
    /// Watermark key file for the comparison (default: a fresh random key; speed does
    /// not depend on the key).
    #[arg(long)]
    watermark_key: Option<PathBuf>,
    /// Runs of each scheme and of the plain sampler, interleaved; the best counts.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// `--schemes` split into specs: a comma starts a new scheme unless what follows is
/// a `param=value` of the previous one (`kgw:gamma=0.5,delta=1,unigram`).
fn split_schemes(list: &str) -> Vec<String> {
    let mut specs: Vec<String> = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match specs.last_mut() {
            Some(last) if part.contains('=') && !part.contains(':') => {
                last.push(',');
                last.push_str(part);
            }
            _ => specs.push(part.to_owned()),
        }
    }
    specs
}

/// `isotope bench`: the throughput table, then each watermark scheme against the
/// plain sampler on the same prompts, seeds and concurrency (interleaved runs, best
/// of `--rounds`; see `isotope_engine::bench`).
pub fn bench(a: BenchArgs) -> Result<()> {
    use isotope_engine::bench::{BenchVariant, VariantRun};
    use isotope_sampling::SamplingHook;
    use isotope_watermark::WatermarkKey;
    use std::sync::Arc;

    if a.concurrency.contains(&0) || a.gen_tokens == 0 || a.prompt_tokens == 0 {
        bail!("--concurrency, --prompt-tokens and --gen-tokens must be at least 1");
    }
    if a.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let schemes = split_schemes(&a.schemes)
        .into_iter()
        .map(|spec| Ok((crate::watermark::parse_scheme(&spec)?, spec)))
        .collect::<Result<Vec<_>>>()?;
    let key = match &a.watermark_key {
        Some(path) => crate::watermark::load_key(path)?,
        None => Arc::new(WatermarkKey::generate()?),
    };
    let model = load_model(&a.model)?;
    let excluded = crate::watermark::excluded(&model);
    let variants = schemes
        .into_iter()
        .map(|(scheme, spec)| {
            let (key, excluded) = (key.clone(), excluded.clone());
            BenchVariant {
                name: spec,
                hook: Arc::new(move |greedy| {
                    let hook = WatermarkHook::new(key.clone(), &scheme, excluded.clone(), greedy);
                    Some(Box::new(hook) as Box<dyn SamplingHook>)
                }),
            }
        })
        .collect();
    let cfg = BenchConfig {
        concurrency: a.concurrency.clone(),
        prompt_tokens: a.prompt_tokens,
        gen_tokens: a.gen_tokens,
        threads: a.model.threads,
        variants,
        variant_rounds: a.rounds,
    };
    let bar =
        indicatif::ProgressBar::new((cfg.concurrency.len() * 2 + 2 + cfg.variant_runs()) as u64)
            .with_style(
                indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} runs {msg}")
                    .expect("static template"),
            );
    if !a.json {
        eprintln!(
            "{:<10} {:<8} {:>4} {:>14} {:>14} {:>14}",
            "engine", "sampler", "seqs", "prompt tok/s", "gen tok/s", "gen tok/s/seq"
        );
    }
    let print_row = |r: &BenchRow| {
        bar.inc(1);
        if !a.json {
            bar.suspend(|| {
                println!(
                    "{:<10} {:<8} {:>4} {:>14.1} {:>14.1} {:>14.1}",
                    r.engine,
                    r.sampler,
                    r.concurrency,
                    r.prompt_tokens_per_sec,
                    r.gen_tokens_per_sec,
                    r.gen_tokens_per_sec_per_seq
                )
            });
        }
    };
    let on_run = |r: &VariantRun| {
        bar.inc(1);
        bar.set_message(format!(
            "{} x{}: {:.1} gen tok/s",
            r.variant, r.concurrency, r.gen_tokens_per_sec
        ));
    };
    let report = isotope_engine::bench::run(&model, &cfg, print_row, on_run)?;
    bar.finish_and_clear();
    if a.json {
        #[derive(Serialize)]
        struct Json<'a> {
            #[serde(flatten)]
            report: &'a isotope_engine::bench::BenchReport,
            watermark_key_id: &'a str,
        }
        let json = Json {
            report: &report,
            watermark_key_id: key.id(),
        };
        println!("{}", serde_json::to_string(&json)?);
        return Ok(());
    }
    println!(
        "teacher-forced scoring: {:.1} tok/s (top-20 alternatives)",
        report.score_tokens_per_sec
    );
    if !report.variants.is_empty() {
        println!(
            "\nwatermark cost: sampled (T=0.8, top-p 0.95), same prompts and seeds; best of {} \
             interleaved runs; key {}",
            report.variant_rounds,
            key.id()
        );
        println!(
            "{:<24} {:>4} {:>6} {:>10} {:>9} {:>10} {:>12} {:>7}  runs (gen tok/s)",
            "scheme", "seqs", "tokens", "gen tok/s", "vs_plain", "+µs/tok", "hook µs/tok", "hook %"
        );
        for v in &report.variants {
            let runs: Vec<String> = v
                .runs_gen_tokens_per_sec
                .iter()
                .map(|r| format!("{r:.1}"))
                .collect();
            let (extra, hook, share) = if v.variant == "none" {
                ("-".to_owned(), "-".to_owned(), "-".to_owned())
            } else {
                (
                    format!("{:+.0}", v.extra_us_per_token),
                    format!("{:.1}", v.hook_us_per_token),
                    format!("{:.2}", v.hook_share * 100.0),
                )
            };
            println!(
                "{:<24} {:>4} {:>6} {:>10.1} {:>9.3} {:>10} {:>12} {:>7}  {}",
                v.variant,
                v.concurrency,
                v.gen_tokens,
                v.gen_tokens_per_sec,
                v.vs_plain,
                extra,
                hook,
                share,
                runs.join(" ")
            );
        }
        println!(
            "vs_plain and +µs/tok compare wall-clock decoding (runs vary by several %); \
             hook µs/tok is timed inside the hook, hook % is that share of a plain token's time"
        );
    }
    Ok(())
}
