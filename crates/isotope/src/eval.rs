//! `isotope eval watermark` and `isotope eval common-tuples`: flags and output only;
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
