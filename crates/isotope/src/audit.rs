//! `isotope audit text|model|verify`: turn a suspect corpus or model into a p-value,
//! and re-check an evidence bundle. The logic is in `isotope-audit`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use isotope_audit::bundle::{self, KeyCommitment, Manifest};
use isotope_audit::corpus::read_corpus;
use isotope_audit::{
    candidates, reading_piece, score, select_candidates, top1_predictions, top_predictions,
    AuditResult, Evidence, EvidenceText, Mode, ReadingStatistic, ScoredTuple, Scoring,
};
use isotope_distill::{Device, HarvestConfig, Student};
use isotope_engine::{LoadOptions, Model};
use isotope_watermark::{CommonTuples, Scheme, WatermarkKey};
use serde_json::json;

use crate::watermark::{common_list, excluded, load_key, parse_scheme};
use crate::ModelArgs;

#[derive(Args, Debug)]
pub struct AuditArgs {
    #[command(subcommand)]
    command: AuditCommand,
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// One watermark test over a whole corpus (text files or JSONL), deduplicated
    /// across all its texts.
    Text(TextArgs),
    /// Was a suspect model trained on our outputs? Black-box through its API (an
    /// http(s) URL), or white-box reading mode (a GGUF file or a student directory).
    Model(ModelAuditArgs),
    /// Re-check an evidence bundle with the revealed key(s).
    Verify(VerifyArgs),
}

/// Options shared by every audit.
#[derive(Args, Debug)]
struct KeyArgs {
    /// Watermark key file (repeat to test several keys; p-values are then corrected
    /// for testing them all).
    #[arg(long = "watermark-key", env = "ISOTOPE_WATERMARK_KEY", required = true)]
    keys: Vec<PathBuf>,
    /// Scheme the outputs were watermarked with (as for `isotope detect`).
    #[arg(long, default_value = "kgw")]
    scheme: String,
    /// Common-tuples list (default: the one built into isotope for SmolLM2).
    #[arg(long)]
    common_tuples: Option<PathBuf>,
    /// Score every tuple, even those common in human text.
    #[arg(long)]
    no_common_filter: bool,
    /// The watermarking model (its tokenizer defines the tuples).
    #[command(flatten)]
    model: ModelArgs,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct TextArgs {
    #[command(flatten)]
    common: KeyArgs,
    /// Write an evidence bundle (texts, scored tuples, key commitments) into DIR.
    #[arg(long)]
    bundle: Option<PathBuf>,
    /// Text files (each one text) or JSONL (`text`, `completion`, `response`, …,
    /// OpenAI responses; harvest output as is).
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

#[derive(Args, Debug)]
struct ModelAuditArgs {
    #[command(flatten)]
    common: KeyArgs,
    /// The suspect: an http(s) URL of an OpenAI-compatible API (black-box with
    /// --prompts; reading mode through its prompt log-probs with --texts /
    /// --supervised-with), or for white-box reading mode a GGUF file (read through
    /// llama.cpp) or a student directory from `distill train` (read through candle).
    #[arg(long)]
    suspect: String,
    /// API key for a black-box suspect.
    #[arg(long, env = "ISOTOPE_SUSPECT_API_KEY")]
    api_key: Option<String>,
    /// Model name to ask a black-box suspect for (default: the first it lists).
    #[arg(long)]
    suspect_model: Option<String>,
    /// Prompts for a black-box audit (JSONL: `prompt`, `instruction`, `question`):
    /// use prompts the suspect was not trained on.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Stop asking a black-box suspect after about this many completion tokens.
    #[arg(long, default_value_t = 20_000)]
    budget_tokens: u64,
    /// Tokens per black-box completion.
    #[arg(long, default_value_t = 256)]
    max_tokens: u32,
    /// Requests to an API suspect in flight.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Reading mode, *unsupervised* variant: texts the suspect is not known to have
    /// trained on (new outputs of ours, or any text) for it to read.
    #[arg(long)]
    texts: Vec<PathBuf>,
    /// Reading mode, *supervised* variant: our own outputs that the suspect may have
    /// trained on (e.g. the harvest served to an account), for it to read — the
    /// stronger test when the training data is known.
    #[arg(long)]
    supervised_with: Vec<PathBuf>,
    /// Reading through an API: tokens per request (each piece is read from a fresh
    /// context; default 1024, what the white-box readers use for a model whose
    /// context is at least that). Lower it for a suspect with a shorter context.
    #[arg(long, value_parser = clap::value_parser!(u32).range(16..))]
    reading_piece: Option<u32>,
    /// Reading mode's statistic: `mass` (the suspect's probability on green
    /// candidates, each weighted by its probability — far more powerful against a
    /// student that learned the watermark faintly; KGW with seeding=left or min) or
    /// `top1` (its top-1 prediction only, Sander et al. 2024). Default: mass where
    /// the scheme allows it, else top1.
    #[arg(long)]
    reading_statistic: Option<ReadingStatistic>,
    /// Mass reading: at most this many candidates per position (those the suspect
    /// gives at least 1/128); through an API, the `logprobs` asked for (OpenAI's own
    /// completions endpoint allows 5, vLLM 20 by default).
    #[arg(long, default_value_t = isotope_audit::READING_TOP as u32, value_parser = clap::value_parser!(u32).range(1..=32))]
    reading_top: u32,
    /// Write an evidence bundle into DIR (an API suspect's outputs or predictions are
    /// written there as they arrive, so an interrupted audit resumes).
    #[arg(long)]
    bundle: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct VerifyArgs {
    /// The bundle directory.
    dir: PathBuf,
    #[command(flatten)]
    common: KeyArgs,
}

pub fn audit(a: AuditArgs) -> Result<()> {
    match a.command {
        AuditCommand::Text(a) => text(a),
        AuditCommand::Model(a) => model(a),
        AuditCommand::Verify(a) => verify(a),
    }
}

/// Keys, tokenizer model, scoring setup.
struct Setup {
    keys: Vec<Arc<WatermarkKey>>,
    model: Model,
    scoring: Scoring,
}

fn setup(k: &KeyArgs) -> Result<Setup> {
    let scheme = parse_scheme(&k.scheme)?;
    let keys = k
        .keys
        .iter()
        .map(|p| load_key(p))
        .collect::<Result<Vec<_>>>()?;
    crate::generate::check_model_present(&k.model)?;
    let model = Model::load(
        &k.model.model,
        &LoadOptions {
            vocab_only: true,
            ..LoadOptions::default()
        },
    )
    .with_context(|| format!("loading the tokenizer of {}", k.model.model.display()))?;
    let common = common_list(&model, k.common_tuples.as_deref(), k.no_common_filter)?;
    let scoring = Scoring {
        reading: ReadingStatistic::default_for(&scheme),
        scheme,
        excluded: excluded(&model),
        common,
    };
    Ok(Setup {
        keys,
        model,
        scoring,
    })
}

fn evidence_text(model: &Model, source: String, text: String) -> EvidenceText {
    EvidenceText {
        tokens: model.tokenize(&text, false, false),
        source,
        text,
        predictions: None,
        top: None,
    }
}

/// Texts of several corpus files, skipped lines reported on stderr.
fn read_texts(model: &Model, files: &[PathBuf]) -> Result<Vec<EvidenceText>> {
    let mut out = Vec::new();
    for f in files {
        let (texts, skipped) = read_corpus(f)?;
        for s in skipped.iter().take(20) {
            eprintln!("{}: skipped: {}", s.source, s.message);
        }
        if skipped.len() > 20 {
            eprintln!("{}: {} more lines skipped", f.display(), skipped.len() - 20);
        }
        out.extend(
            texts
                .into_iter()
                .map(|t| evidence_text(model, t.source, t.text)),
        );
    }
    Ok(out)
}

fn common_meta(common: &Option<Arc<CommonTuples>>) -> Option<serde_json::Value> {
    common.as_ref().map(|c| {
        json!({
            "tuples": c.len(),
            "tokenizer": c.meta().tokenizer,
            "source": c.meta().source,
        })
    })
}

fn run_and_report(
    s: &Setup,
    mode: Mode,
    evidence: &Evidence,
    bundle_dir: Option<&Path>,
    parameters: serde_json::Value,
    json_out: bool,
) -> Result<()> {
    if evidence.texts.is_empty() && evidence.supervised.is_empty() {
        bail!("no texts to score: check the files (see the skipped lines above)");
    }
    let mut tuples: Vec<ScoredTuple> = Vec::new();
    let keep = bundle_dir.is_some();
    let result = score(mode, evidence, &s.keys, &s.scoring, |t| {
        if keep {
            tuples.push(t)
        }
    })?;
    if let Some(dir) = bundle_dir {
        let manifest = Manifest {
            format: bundle::FORMAT.into(),
            tool_version: env!("CARGO_PKG_VERSION").into(),
            mode,
            scheme: s.scoring.scheme.to_string(),
            keys: s
                .keys
                .iter()
                .map(|k| KeyCommitment {
                    key_id: k.id().to_owned(),
                    commitment: k.commitment(),
                })
                .collect(),
            common_filter: common_meta(&s.scoring.common),
            parameters,
            result: result.clone(),
        };
        bundle::write(dir, &manifest, evidence, &tuples)
            .with_context(|| format!("writing the evidence bundle {}", dir.display()))?;
        eprintln!("evidence bundle written to {}", dir.display());
    }
    print_result(&result, s.scoring.common.is_some(), json_out)
}

fn print_result(r: &AuditResult, common_filter: bool, json_out: bool) -> Result<()> {
    if json_out {
        let mut v = serde_json::to_value(r)?;
        v["common_filter"] = json!(common_filter);
        println!("{v}");
        return Ok(());
    }
    let verdict = if r.p_value < 1e-3 {
        "WATERMARK FOUND"
    } else {
        "no evidence"
    };
    println!(
        "{verdict}: p = {:.3e} (log10 {:.1}), {} mode, {} scored tuples over {} texts ({} tokens), scheme {}",
        r.p_value,
        r.log10_p_value,
        serde_json::to_value(r.mode)?.as_str().unwrap_or(""),
        r.scored_tokens,
        r.texts,
        r.tokens,
        r.scheme
    );
    for v in &r.variants {
        println!(
            "  {:<13} p = {:.3e} (corrected over {} key(s)), best key {}",
            v.name,
            v.p_value,
            v.per_key.len(),
            v.best_key_id
        );
        for d in &v.per_key {
            let weighted = d
                .weighted
                .as_ref()
                .map(|w| format!(", weighted share {:.4}", w.share()))
                .unwrap_or_default();
            println!(
                "    {} p = {:.3e} over {} tuples, statistic {:.4}{weighted}",
                d.key_id, d.p_value, d.scored_tokens, d.statistic
            );
        }
    }
    Ok(())
}

fn text(a: TextArgs) -> Result<()> {
    let s = setup(&a.common)?;
    let texts = read_texts(&s.model, &a.files)?;
    let evidence = Evidence {
        texts,
        ..Evidence::default()
    };
    let parameters = json!({ "files": a.files });
    run_and_report(
        &s,
        Mode::Text,
        &evidence,
        a.bundle.as_deref(),
        parameters,
        a.common.json,
    )
}

fn model(a: ModelAuditArgs) -> Result<()> {
    let s = setup(&a.common)?;
    if matches!(s.scoring.scheme, Scheme::Unigram { .. }) {
        // Unigram has one green list for every position, i.e. one window seed: reading
        // mode could score a single tuple and the prompts' windows would exclude all of
        // it. The result would be valid but could never be significant.
        bail!(
            "`audit model` cannot test the unigram scheme (one fixed green list: every \
             position shares the same window seed, so at most one tuple could be scored); \
             use `audit text` on the suspect's outputs, or a context scheme such as kgw"
        );
    }
    let is_url = a.suspect.starts_with("http://") || a.suspect.starts_with("https://");
    let reads = !a.texts.is_empty() || !a.supervised_with.is_empty();
    let statistic = match a.reading_statistic {
        Some(ReadingStatistic::Mass) if !s.scoring.scheme.supports_mass_reading() => bail!(
            "--reading-statistic mass needs a KGW scheme with a window seed (seeding=left or \
             min), not {}: use --reading-statistic top1",
            s.scoring.scheme
        ),
        Some(r) => r,
        None => ReadingStatistic::default_for(&s.scoring.scheme),
    };
    let s = Setup {
        scoring: Scoring {
            reading: statistic,
            ..s.scoring
        },
        ..s
    };
    let mass = reads && statistic == ReadingStatistic::Mass;
    let parameters = json!({
        "reader": if !reads { None } else if is_url { Some("api-echo") } else { Some("weights") },
        "suspect": a.suspect,
        "prompts": a.prompts,
        "budget_tokens": a.budget_tokens,
        "max_tokens": a.max_tokens,
        "texts": a.texts,
        "supervised_with": a.supervised_with,
        "suspect_model": a.suspect_model,
        "reading_piece": (is_url && reads).then(|| api_piece(&a)),
        "reading_statistic": reads.then_some(statistic),
        "reading_top": mass.then_some(a.reading_top),
    });
    let (mode, evidence) = if is_url && reads {
        if a.prompts.is_some() {
            bail!(
                "give an API suspect either --prompts (black-box: score its answers) or \
                 --texts / --supervised-with (reading mode through its prompt log-probs), \
                 not both; run the audit twice for both"
            );
        }
        (Mode::Reading, reading_via_api(&s, &a)?)
    } else if is_url {
        (Mode::BlackBox, black_box(&s, &a)?)
    } else {
        (Mode::Reading, reading(&s, &a)?)
    };
    run_and_report(
        &s,
        mode,
        &evidence,
        a.bundle.as_deref(),
        parameters,
        a.common.json,
    )
}

fn black_box(s: &Setup, a: &ModelAuditArgs) -> Result<Evidence> {
    let Some(prompts_file) = &a.prompts else {
        bail!("a black-box audit needs --prompts FILE (prompts the suspect was not trained on)");
    };
    let (mut prompts, warnings) = isotope_distill::read_prompts(prompts_file)?;
    for w in warnings.iter().take(20) {
        eprintln!(
            "{}:{}: skipped: {}",
            prompts_file.display(),
            w.line,
            w.message
        );
    }
    let wanted = a.budget_tokens.div_ceil(u64::from(a.max_tokens.max(1))) as usize;
    prompts.truncate(wanted.max(1));
    if prompts.is_empty() {
        bail!("no usable prompts in {}", prompts_file.display());
    }
    // The outputs file: in the bundle (kept, so a rerun resumes), else temporary.
    let tmp;
    let out = match &a.bundle {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            dir.join("harvest.jsonl")
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().join("harvest.jsonl")
        }
    };
    let cfg = HarvestConfig {
        endpoint: a.suspect.clone(),
        api_key: a.api_key.clone(),
        model: a.suspect_model.clone(),
        concurrency: a.concurrency.max(1),
        max_tokens: a.max_tokens,
        seed: Some(0),
        timeout: Duration::from_secs(300),
        ..HarvestConfig::default()
    };
    let bar = ProgressBar::new(prompts.len() as u64).with_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} suspect answers {elapsed_precise} {msg}",
        )
        .expect("static template"),
    );
    let mut progress = |p: &isotope_distill::HarvestProgress| {
        bar.set_position((p.existing + p.written + p.failed) as u64);
        bar.set_message(format!("{} tokens", p.completion_tokens));
    };
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let report = rt
        .block_on(isotope_distill::harvest(
            &cfg,
            &prompts,
            &out,
            &mut progress,
        ))
        .with_context(|| format!("querying the suspect at {}", a.suspect))?;
    bar.finish_and_clear();
    if report.missing > 0 {
        eprintln!(
            "{} of {} answers missing ({}); scoring what arrived{}",
            report.missing,
            report.total,
            report.last_error.as_deref().unwrap_or("see the log"),
            if a.bundle.is_some() {
                " — rerun the same command to fill them in"
            } else {
                ""
            }
        );
    }
    let text = std::fs::read_to_string(&out)?;
    let mut evidence = Evidence::default();
    for p in &prompts {
        evidence.prompts.push(evidence_text(
            &s.model,
            format!("prompt:{}", p.line),
            p.text.clone(),
        ));
    }
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let r: isotope_distill::HarvestRecord =
            serde_json::from_str(line).context("reading the suspect's answers")?;
        evidence
            .texts
            .push(evidence_text(&s.model, r.id.clone(), r.response));
    }
    Ok(evidence)
}

/// A white-box suspect and how its top-1 predictions are read.
enum Reader {
    /// A GGUF, through llama.cpp: the form a model is shipped in, in its own quantization.
    Engine(Model),
    /// A student directory (from `distill train`), through candle.
    Candle(Student),
}

impl Reader {
    fn load(suspect: &str) -> Result<Self> {
        let path = Path::new(suspect);
        let r = if path.is_dir() {
            Student::load(path, &Device::Cpu).map(Reader::Candle)?
        } else if path.is_file() {
            Model::load(path, &LoadOptions::default()).map(Reader::Engine)?
        } else {
            bail!(
                "suspect {suspect} is neither an http(s) URL nor an existing GGUF file or student \
                 directory"
            );
        };
        Ok(r)
    }

    fn vocab(&self) -> usize {
        match self {
            Reader::Engine(m) => m.n_vocab(),
            Reader::Candle(s) => s.config().vocab_size,
        }
    }

    fn top1(&self, tokens: &[u32], threads: Option<usize>) -> Result<Vec<u32>> {
        Ok(match self {
            Reader::Engine(m) => {
                m.top1_predictions(tokens, reading_piece(m.n_ctx_train() as usize), threads)?
            }
            Reader::Candle(s) => top1_predictions(s, tokens)?,
        })
    }

    /// The mass reading's candidates at every position (at most `limit` each).
    fn top(
        &self,
        tokens: &[u32],
        limit: usize,
        threads: Option<usize>,
    ) -> Result<Vec<Vec<(u32, f32)>>> {
        Ok(match self {
            Reader::Engine(m) => {
                let mut out = Vec::with_capacity(tokens.len());
                let piece = reading_piece(m.n_ctx_train() as usize);
                m.read_pieces(tokens, piece, threads, |l| out.push(candidates(l, limit)))?;
                out
            }
            Reader::Candle(s) => top_predictions(s, tokens, limit)?,
        })
    }
}

/// Reading mode's texts, by either reader: (unsupervised, supervised).
fn reading_texts(s: &Setup, a: &ModelAuditArgs) -> Result<(Vec<EvidenceText>, Vec<EvidenceText>)> {
    let texts = read_texts(&s.model, &a.texts)?;
    let supervised = read_texts(&s.model, &a.supervised_with)?;
    if texts.is_empty() && supervised.is_empty() {
        if a.texts.is_empty() && a.supervised_with.is_empty() {
            bail!("reading mode needs texts: pass --supervised-with FILE and/or --texts FILE");
        }
        bail!("no texts to read: check the files (see the skipped lines above)");
    }
    Ok((texts, supervised))
}

fn reading(s: &Setup, a: &ModelAuditArgs) -> Result<Evidence> {
    let reader =
        Reader::load(&a.suspect).with_context(|| format!("loading the suspect {}", a.suspect))?;
    let vocab = reader.vocab();
    if vocab != s.model.n_vocab() {
        bail!(
            "the suspect's vocabulary has {vocab} entries but {}'s tokenizer has {}: reading \
             mode needs a suspect with the watermarking model's tokenizer",
            s.model.path().display(),
            s.model.n_vocab()
        );
    }
    let (mut texts, mut supervised) = reading_texts(s, a)?;
    let bar = ProgressBar::new((texts.len() + supervised.len()) as u64).with_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} texts read by the suspect {elapsed_precise}",
        )
        .expect("static template"),
    );
    let threads = a.common.model.threads;
    for t in texts.iter_mut().chain(&mut supervised) {
        if s.scoring.reading == ReadingStatistic::Mass {
            let top = reader.top(&t.tokens, a.reading_top as usize, threads)?;
            t.predictions = Some(top.iter().map(|c| c[0].0).collect());
            t.top = Some(top);
        } else {
            t.predictions = Some(reader.top1(&t.tokens, threads)?);
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(Evidence {
        prompts: Vec::new(),
        texts,
        supervised,
    })
}

/// Tokens per request when reading through an API. The suspect's context is unknown
/// there: by default the longest pieces a white-box reader uses, so a suspect whose
/// context is at least that reads exactly as its file would.
fn api_piece(a: &ModelAuditArgs) -> usize {
    a.reading_piece
        .map_or(reading_piece(usize::MAX), |n| n as usize)
}

/// Reading mode through an API: every text is sent as token ids with `echo` and
/// `logprobs`, and the suspect's top-1 at each position comes out of its prompt
/// log-probs (`isotope_distill::echo`). Texts are read in the pieces the white-box
/// readers use, so a served GGUF reads exactly as the file does. With --bundle every
/// piece's predictions are kept in `readings.jsonl` as they arrive: a rerun resumes.
fn reading_via_api(s: &Setup, a: &ModelAuditArgs) -> Result<Evidence> {
    use isotope_distill::echo::{EchoClient, EchoConfig, PieceMap};
    let (mut texts, mut supervised) = reading_texts(s, a)?;
    let piece_len = api_piece(a);
    let map = Arc::new(PieceMap::new(
        (0..s.model.n_vocab() as u32)
            .map(|id| s.model.token_text(id))
            .collect(),
    ));
    let cfg = EchoConfig {
        endpoint: a.suspect.clone(),
        api_key: a.api_key.clone(),
        model: a.suspect_model.clone(),
        ..EchoConfig::default()
    };
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let client = rt
        .block_on(EchoClient::connect(&cfg))
        .with_context(|| format!("querying the suspect at {}", a.suspect))?;
    let mass = s.scoring.reading == ReadingStatistic::Mass;
    let logprobs = if mass { a.reading_top } else { 1 };
    let mut cache = ReadingCache::open(a.bundle.as_deref(), &a.suspect, client.model(), logprobs)?;
    let mut wanted: Vec<Vec<u32>> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for t in texts.iter().chain(&supervised) {
        for piece in t.tokens.chunks(piece_len) {
            if !cache.readings.contains_key(piece) && seen.insert(piece.to_vec()) {
                wanted.push(piece.to_vec());
            }
        }
    }
    if !cache.readings.is_empty() && !wanted.is_empty() {
        eprintln!(
            "resuming: {} pieces read before, {} to read",
            cache.readings.len(),
            wanted.len()
        );
    }
    let bar = ProgressBar::new(wanted.len() as u64).with_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} pieces read through the suspect's API {elapsed_precise}",
        )
        .expect("static template"),
    );
    let client = Arc::new(client);
    let failed = rt.block_on(async {
        let sem = Arc::new(tokio::sync::Semaphore::new(a.concurrency.max(1)));
        let mut set = tokio::task::JoinSet::new();
        for piece in wanted {
            let (client, map, sem) = (client.clone(), map.clone(), sem.clone());
            set.spawn(async move {
                let _permit = sem.acquire_owned().await.expect("semaphore open");
                let r = client.read(&piece, &map, logprobs).await;
                (piece, r)
            });
        }
        let mut failed: Option<anyhow::Error> = None;
        while let Some(done) = set.join_next().await {
            let (piece, r) = match done {
                Ok(d) => d,
                Err(e) if e.is_cancelled() => continue,
                Err(e) => return Err(anyhow::Error::new(e).context("a reading task failed")),
            };
            match r {
                Ok(r) => {
                    cache.insert(piece, r.predictions, r.top)?;
                    bar.inc(1);
                }
                Err(e) => {
                    if failed.is_none() {
                        // Stop asking: what is read is kept, a rerun continues.
                        set.abort_all();
                        failed = Some(e.into());
                    }
                }
            }
        }
        anyhow::Ok(failed)
    })?;
    bar.finish_and_clear();
    if let Some(e) = failed {
        let kept = if a.bundle.is_some() {
            format!(
                "; {} pieces read are kept in the bundle, rerun the same command to continue",
                cache.readings.len()
            )
        } else {
            String::new()
        };
        return Err(e.context(format!(
            "reading through the suspect at {}{kept}",
            a.suspect
        )));
    }
    let mut unknown = 0usize;
    let mut positions = 0usize;
    for t in texts.iter_mut().chain(&mut supervised) {
        let mut preds = Vec::with_capacity(t.tokens.len());
        let mut top = Vec::with_capacity(t.tokens.len());
        for piece in t.tokens.chunks(piece_len) {
            let read = &cache.readings[piece];
            for p in &read.predictions {
                unknown += usize::from(p.is_none());
                preds.push(p.unwrap_or(isotope_watermark::NO_PREDICTION));
            }
            if mass {
                top.extend(
                    read.top
                        .iter()
                        .map(|c| select_candidates(c.clone(), logprobs as usize)),
                );
            }
        }
        positions += preds.len();
        t.predictions = Some(preds);
        if mass {
            t.top = Some(top);
        }
    }
    if unknown > 0 {
        eprintln!(
            "{unknown} of {positions} predictions name no single token (a printed piece that \
             several tokens share): those windows are spent, not scored"
        );
    }
    Ok(Evidence {
        prompts: Vec::new(),
        texts,
        supervised,
    })
}

/// Predictions of an API suspect per piece read, kept in a bundle as they arrive.
struct ReadingCache {
    readings: std::collections::HashMap<Vec<u32>, CachedReading>,
    file: Option<(PathBuf, std::fs::File)>,
}

impl ReadingCache {
    const FILE: &'static str = "readings.jsonl";

    fn open(bundle: Option<&Path>, suspect: &str, model: &str, logprobs: u32) -> Result<Self> {
        use std::io::Write;
        let mut readings = std::collections::HashMap::new();
        let Some(dir) = bundle else {
            return Ok(Self {
                readings,
                file: None,
            });
        };
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(Self::FILE);
        let header = json!({"suspect": suspect, "model": model, "logprobs": logprobs});
        if path.exists() {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let mut lines = text.lines();
            let first: serde_json::Value = lines
                .next()
                .and_then(|l| serde_json::from_str(l).ok())
                .unwrap_or_default();
            if first != header {
                bail!(
                    "{} holds readings of another suspect or with other settings ({first}); use \
                     another --bundle directory for {suspect} (model {model}, {logprobs} \
                     log-probs per position)",
                    path.display()
                );
            }
            for line in lines {
                // A line cut short by an interruption is read again.
                if let Ok(r) = serde_json::from_str::<CachedReading>(line) {
                    let complete = r.predictions.len() == r.piece.len()
                        && (logprobs == 1 || r.top.len() == r.piece.len());
                    if complete {
                        readings.insert(r.piece.clone(), r);
                    }
                }
            }
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        if f.metadata()?.len() == 0 {
            writeln!(f, "{header}")?;
        }
        Ok(Self {
            readings,
            file: Some((path, f)),
        })
    }

    fn insert(
        &mut self,
        piece: Vec<u32>,
        predictions: Vec<Option<u32>>,
        top: Vec<Vec<(u32, f32)>>,
    ) -> Result<()> {
        use std::io::Write;
        let r = CachedReading {
            piece,
            predictions,
            top,
        };
        if let Some((path, f)) = &mut self.file {
            let line = serde_json::to_string(&r)?;
            writeln!(f, "{line}").with_context(|| format!("writing {}", path.display()))?;
        }
        self.readings.insert(r.piece.clone(), r);
        Ok(())
    }
}

/// One piece read through the API: its top-1 per position and every listed
/// candidate with its log-prob.
#[derive(serde::Serialize, serde::Deserialize)]
struct CachedReading {
    piece: Vec<u32>,
    predictions: Vec<Option<u32>>,
    #[serde(default)]
    top: Vec<Vec<(u32, f32)>>,
}

fn verify(a: VerifyArgs) -> Result<()> {
    let s = setup(&a.common)?;
    let b = bundle::read(&a.dir)
        .with_context(|| format!("reading the evidence bundle {}", a.dir.display()))?;
    let v = bundle::verify(&b, &s.keys, &s.scoring)?;
    if a.common.json {
        println!("{}", serde_json::to_string(&v)?);
    } else if v.ok {
        println!(
            "OK: key(s) {} match the commitment; recomputed p = {:.3e} over {} tuples, as recorded",
            v.keys_checked.join(", "),
            v.recomputed.p_value,
            v.recomputed.scored_tokens
        );
    } else {
        println!("MISMATCH:");
        for p in &v.problems {
            println!("  {p}");
        }
    }
    if !v.ok {
        bail!(
            "the bundle does not verify ({} problem(s))",
            v.problems.len()
        );
    }
    Ok(())
}
