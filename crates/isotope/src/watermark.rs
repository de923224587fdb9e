//! `isotope keygen`, `isotope detect`, and loading watermark keys for other commands.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use isotope_engine::{LoadOptions, Model};
use isotope_watermark::{
    detect_multi_key_weighted, CommonTuples, Detector, EntropyRule, ExcludedTokens, Scheme,
    WatermarkKey,
};
use serde_json::json;

use crate::ModelArgs;

/// Read a key file, warning when other users may read it (the server's reader: one
/// place for the permission check and the error texts).
pub fn load_key(path: &Path) -> Result<Arc<WatermarkKey>> {
    isotope_server::read_key(path)
}

/// Parse `--scheme`.
pub fn parse_scheme(spec: &str) -> Result<Scheme> {
    Ok(spec.parse::<Scheme>()?)
}

/// The common-tuples list detection leaves out: `path`, else the one built into
/// isotope (for SmolLM2's tokenizer); none with `off`. A list built for another
/// tokenizer is an error that says how to proceed.
pub fn common_list(
    model: &Model,
    path: Option<&Path>,
    off: bool,
) -> Result<Option<Arc<CommonTuples>>> {
    if off {
        return Ok(None);
    }
    let list = match path {
        Some(p) => isotope_eval::load_common_tuples(p, model)?,
        None => isotope_eval::shipped_common_tuples(model)
            .context("pass --common-tuples FILE built for this model, or --no-common-filter")?,
    };
    Ok(Some(Arc::new(list)))
}

/// Parse entropy rules (`shannon:0.6`, `spike:0.8`); none given is isotope's default.
pub fn parse_entropy_rules(specs: &[String]) -> Result<Vec<EntropyRule>> {
    if specs.iter().all(|s| s.trim().is_empty()) {
        return Ok(vec![EntropyRule::DEFAULT]);
    }
    specs
        .iter()
        .filter(|s| !s.trim().is_empty())
        .map(|s| Ok(s.parse::<EntropyRule>()?))
        .collect()
}

/// The control-token mask of a model, shared by hooks and detectors.
pub fn excluded(model: &Model) -> ExcludedTokens {
    model.control_mask().into()
}

#[derive(clap::Args, Debug)]
pub struct KeygenArgs {
    /// Write the key to this file (created with mode 0600; refuses to overwrite)
    /// instead of stdout.
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn keygen(a: KeygenArgs) -> Result<()> {
    let key = WatermarkKey::generate()?;
    let text = key.to_file_string();
    match a.out {
        Some(path) => {
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
            let mut f = opts.open(&path).with_context(|| {
                format!(
                    "cannot create {} (it must not exist already)",
                    path.display()
                )
            })?;
            f.write_all(text.as_bytes())?;
            eprintln!("wrote watermark key {} to {}", key.id(), path.display());
        }
        None => {
            let mut out = std::io::stdout().lock();
            restrict_stdout_file();
            out.write_all(text.as_bytes())?;
            out.flush()?;
        }
    }
    Ok(())
}

/// `isotope keygen > wm.key`: when stdout is a regular file, make it 0600 so the
/// secret is not world-readable by the shell's umask.
fn restrict_stdout_file() {
    #[cfg(unix)]
    {
        use std::os::fd::AsFd;
        use std::os::unix::fs::PermissionsExt;
        let stdout = std::io::stdout();
        if let Ok(owned) = stdout.as_fd().try_clone_to_owned() {
            let file = std::fs::File::from(owned);
            if file.metadata().is_ok_and(|m| m.is_file()) {
                let _ = file.set_permissions(std::fs::Permissions::from_mode(0o600));
            }
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct DetectArgs {
    /// Watermark key file (repeat to test several keys; the p-value is then corrected
    /// for testing them all).
    #[arg(long = "watermark-key", env = "ISOTOPE_WATERMARK_KEY", required = true)]
    keys: Vec<PathBuf>,
    /// Scheme: kgw, unigram, gumbel, synthid, optionally with parameters
    /// (e.g. `kgw:gamma=0.25,delta=2,h=4,seeding=left`).
    #[arg(long, default_value = "kgw")]
    scheme: String,
    /// Also find the most significant span (watermarked text inside other text).
    #[arg(long)]
    windowed: bool,
    /// Shortest span, in scored tokens, for --windowed.
    #[arg(long, default_value_t = 16)]
    min_span: usize,
    /// List of (window, token) tuples common in human text, never scored (default:
    /// the list built into isotope for SmolLM2's tokenizer; see `isotope eval
    /// common-tuples`).
    #[arg(long)]
    common_tuples: Option<PathBuf>,
    /// Score every tuple, even those common in human text (the p-value stays valid
    /// over random keys, but for one fixed key formulaic human text is flagged more
    /// often than the p-value says).
    #[arg(long)]
    no_common_filter: bool,
    #[command(flatten)]
    model: ModelArgs,
    /// Entropy-aware detection (SWEET): load the model's weights (--model), let it
    /// re-read the text and score only tokens at which it was uncertain (next-token
    /// entropy at or above --entropy-rule). Low-entropy tokens cannot carry the
    /// watermark and only dilute the test; the p-value stays exact because which tokens
    /// are scored depends on the text and the model, never on the key.
    #[arg(long)]
    entropy_aware: bool,
    /// The rule of --entropy-aware: `shannon:NATS` or `spike:S` (score tokens at or
    /// above the threshold), or `weighted` (score every token with a weight from its
    /// spike entropy — the log-odds the bias could add there — and test the weighted
    /// green count with its exact tail). Default: `weighted`. Fix
    /// it before looking at the text.
    #[arg(long, requires = "entropy_aware")]
    entropy_rule: Option<String>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn detect(a: DetectArgs) -> Result<()> {
    let scheme = parse_scheme(&a.scheme)?;
    let keys = a
        .keys
        .iter()
        .map(|p| load_key(p))
        .collect::<Result<Vec<_>>>()?;
    let mut text = String::new();
    let mut stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprintln!("reading the text to test from stdin (end with Ctrl-D)");
    }
    stdin
        .read_to_string(&mut text)
        .context("stdin is not valid UTF-8 text")?;
    if text.trim().is_empty() {
        bail!("no text on stdin: pipe the text to test into `isotope detect`");
    }
    let rule = match (&a.entropy_rule, a.entropy_aware) {
        (Some(r), _) => Some(r.parse::<EntropyRule>()?),
        (None, true) => Some(EntropyRule::DEFAULT),
        (None, false) => None,
    };
    crate::generate::check_model_present(&a.model)?;
    let model = Model::load(
        &a.model.model,
        &LoadOptions {
            // The entropy pass needs the weights; plain detection only the tokenizer.
            vocab_only: rule.is_none(),
            ..LoadOptions::default()
        },
    )
    .with_context(|| format!("cannot load the model {}", a.model.model.display()))?;
    let tokens = model.tokenize(&text, false, false);
    let excluded = excluded(&model);
    let common = common_list(&model, a.common_tuples.as_deref(), a.no_common_filter)?;
    let started = std::time::Instant::now();
    let weights = match &rule {
        Some(r) => Some(
            isotope_eval::entropy_weights(&model, &tokens, r, &scheme, a.model.threads)
                .context("entropy-aware detection: the model pass over the text failed")?,
        ),
        None => None,
    };
    let model_seconds = started.elapsed().as_secs_f64();
    let multi = detect_multi_key_weighted(
        &keys,
        &scheme,
        &excluded,
        common.as_ref(),
        &tokens,
        weights.as_deref(),
    );
    let mut report = json!({
        "scheme": scheme.to_string(),
        "p_value": multi.p_value,
        "log10_p_value": multi.log10_p_value,
        "scored_tokens": multi.per_key.iter().map(|d| d.scored_tokens).max().unwrap_or(0),
        "tokens": tokens.len(),
        "key_id": multi.best_key_id,
        "common_filter": common.is_some(),
        "common_excluded": multi.per_key.iter().map(|d| d.common_excluded).max().unwrap_or(0),
    });
    if let (Some(r), Some(w)) = (&rule, &weights) {
        let h = scheme.context().min(w.len());
        report["entropy_aware"] = json!(true);
        report["entropy_rule"] = json!(r.to_string());
        report["entropy_kept"] = json!(w[h..].iter().filter(|&&k| k > 0).count());
        report["entropy_model_seconds"] = json!(model_seconds);
    }
    if keys.len() == 1 {
        report["statistic"] = json!(multi.per_key[0].statistic);
    } else {
        report["per_key"] = json!(multi.per_key);
    }
    let windowed = a.windowed.then(|| {
        let best_key = keys
            .iter()
            .find(|k| k.id() == multi.best_key_id)
            .unwrap_or(&keys[0]);
        let d = Detector::new(best_key.clone(), scheme.clone(), excluded);
        let d = match &common {
            Some(c) => d.with_common(c.clone()),
            None => d,
        };
        // The span search counts tuples unweighted: a weighted rule acts as the
        // mask of its non-zero weights there.
        let mask: Option<Vec<bool>> = weights.as_ref().map(|w| w.iter().map(|&x| x > 0).collect());
        match &mask {
            Some(m) => d.detect_windowed_masked(&tokens, m, a.min_span),
            None => d.detect_windowed(&tokens, a.min_span),
        }
    });
    if let Some(w) = &windowed {
        report["windowed"] = json!({
            "p_value": w.detection.p_value,
            "log10_p_value": w.detection.log10_p_value,
            "scored_tokens": w.detection.scored_tokens,
            "span_tokens": [w.span_tokens.0, w.span_tokens.1],
            "span_text": model.detokenize(&tokens[w.span_tokens.0..w.span_tokens.1]),
            "spans_tested": w.spans_tested,
        });
    }
    if a.json {
        println!("{report}");
    } else {
        let verdict = if multi.p_value < 1e-3 {
            "WATERMARKED"
        } else {
            "not detected"
        };
        println!(
            "{verdict}: p = {:.3e} (log10 {:.1}) over {} scored tokens ({} left out as \
             common in human text), scheme {}",
            multi.p_value,
            multi.log10_p_value,
            report["scored_tokens"],
            report["common_excluded"],
            scheme
        );
        if let Some(r) = &rule {
            println!(
                "entropy-aware ({r}): {} of {} tokens at or above the threshold were \
                 candidates (model pass {:.2} s)",
                report["entropy_kept"],
                tokens.len().saturating_sub(scheme.context()),
                model_seconds
            );
        }
        if let Some(w) = &windowed {
            println!(
                "best span: tokens {}..{}, p = {:.3e} after testing {} spans",
                w.span_tokens.0, w.span_tokens.1, w.detection.p_value, w.spans_tested
            );
        }
    }
    Ok(())
}
