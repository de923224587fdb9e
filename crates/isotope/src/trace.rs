//! `isotope trace`: did we serve this text, to whom, when? Wiring only: the lookups are
//! `isotope_audit::trace` (exact hash, MinHash/LSH index in the store, verification),
//! the watermark test is `isotope_watermark::detect_multi_key`.

use std::collections::HashMap;
use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use isotope_audit::corpus::{parse_jsonl, read_corpus, SourceText};
use isotope_audit::trace::{self, MatchOptions, TraceMatch};
use isotope_engine::{LoadOptions, Model};
use isotope_watermark::{detect_multi_key, WatermarkKey};
use serde_json::json;

use crate::serve::ConfigArgs;
use crate::watermark::{common_list, excluded, load_key, parse_scheme};
use crate::ModelArgs;

#[derive(Args, Debug)]
pub struct TraceArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Watermark key file (repeat for rotated keys; the p-value is corrected for testing
    /// them all). Default: the server's — `watermark_key` and `detection_keys` of the
    /// config file, else DATA_DIR/watermark.key.
    #[arg(long = "watermark-key", env = "ISOTOPE_WATERMARK_KEY")]
    keys: Vec<PathBuf>,
    /// Watermark scheme (default: the config file's `scheme`, else kgw).
    #[arg(long)]
    scheme: Option<String>,
    /// Common-tuples list (default: the one built into isotope for SmolLM2).
    #[arg(long)]
    common_tuples: Option<PathBuf>,
    /// Score every tuple, even those common in human text.
    #[arg(long)]
    no_common_filter: bool,
    /// The watermarking model (its tokenizer defines the tuples).
    #[command(flatten)]
    model: ModelArgs,
    /// Smallest Jaccard similarity (word 4-shingles) reported as a match.
    #[arg(long, default_value_t = trace::DEFAULT_MIN_SIMILARITY)]
    min_similarity: f64,
    /// Smallest share of the text's shingles inside one served completion reported as
    /// a partial match (a fragment of what we served).
    #[arg(long, default_value_t = trace::DEFAULT_MIN_CONTAINMENT)]
    min_containment: f64,
    /// Matches listed per text, best first.
    #[arg(long, default_value_t = 20)]
    top: usize,
    /// Do not bring the near-duplicate index up to date first (read it as it is).
    #[arg(long)]
    no_index_update: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Text files (each one text) or JSONL (one text per line: `text`, `completion`,
    /// `response`, …); none or `-`: stdin.
    files: Vec<PathBuf>,
}

/// Texts from the files, or stdin.
fn read_inputs(files: &[PathBuf]) -> Result<Vec<SourceText>> {
    let mut out = Vec::new();
    let report = |skipped: Vec<isotope_audit::corpus::Skipped>| {
        for s in skipped.iter().take(20) {
            eprintln!("{}: skipped: {}", s.source, s.message);
        }
    };
    let stdin_only = files.is_empty() || (files.len() == 1 && files[0] == Path::new("-"));
    if stdin_only {
        let mut text = String::new();
        if std::io::stdin().is_terminal() {
            eprintln!("reading the text to trace from stdin (end with Ctrl-D)");
        }
        std::io::stdin()
            .read_to_string(&mut text)
            .context("stdin is not valid UTF-8 text")?;
        let first = text.lines().find(|l| !l.trim().is_empty());
        let jsonl = first.is_some_and(|l| {
            l.trim_start().starts_with('{') && serde_json::from_str::<serde_json::Value>(l).is_ok()
        });
        if jsonl {
            let (texts, skipped) = parse_jsonl("stdin", &text);
            report(skipped);
            out.extend(texts);
        } else if !text.trim().is_empty() {
            out.push(SourceText {
                source: "stdin".into(),
                prompt: None,
                text,
            });
        }
    } else {
        for f in files {
            let (texts, skipped) =
                read_corpus(f).with_context(|| format!("reading {}", f.display()))?;
            report(skipped);
            out.extend(texts);
        }
    }
    if out.is_empty() {
        bail!("no text to trace: pass files (text or JSONL) or pipe the text into stdin");
    }
    Ok(out)
}

/// The keys: flags/env, else the server configuration's.
fn keys(a: &TraceArgs, cfg: &isotope_server::ServerConfig) -> Result<Vec<Arc<WatermarkKey>>> {
    let mut paths = a.keys.clone();
    if paths.is_empty() {
        if let Some(k) = &cfg.watermark_key {
            paths.push(k.clone());
        } else {
            let generated = cfg.data_dir.join("watermark.key");
            if generated.exists() {
                paths.push(generated);
            }
        }
        paths.extend(cfg.detection_keys.iter().cloned());
    }
    if paths.is_empty() {
        bail!(
            "no watermark key: pass --watermark-key FILE (the server's key; repeat for rotated \
             keys), or point --config/--data-dir at the server's configuration"
        );
    }
    paths.iter().map(|p| load_key(p)).collect()
}

pub fn trace(a: TraceArgs) -> Result<()> {
    let cfg = a.config.file()?;
    let url = cfg.database_url();
    // Opening SQLite creates a missing file; tracing against an empty new store would
    // quietly say "never served". Refuse instead.
    if let Some(path) = url.strip_prefix("sqlite://") {
        if !path.starts_with(':') && !Path::new(path).exists() {
            bail!(
                "no isotope store at {path}: pass --database-url (or --data-dir / --config) of \
                 the server whose usage log to search"
            );
        }
    }
    let keys = keys(&a, &cfg)?;
    let scheme = parse_scheme(a.scheme.as_deref().unwrap_or(&cfg.scheme))?;
    let texts = read_inputs(&a.files)?;
    crate::generate::check_model_present(&a.model)?;
    let model = Model::load(
        &a.model.model,
        &LoadOptions {
            vocab_only: true,
            ..LoadOptions::default()
        },
    )
    .with_context(|| format!("loading the tokenizer of {}", a.model.model.display()))?;
    let common = common_list(&model, a.common_tuples.as_deref(), a.no_common_filter)?;
    let excluded = excluded(&model);
    let opts = MatchOptions {
        min_similarity: a.min_similarity,
        min_containment: a.min_containment,
        top: a.top,
    };

    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let (index, results, accounts) = rt.block_on(async {
        let store = isotope_store::open(&url).await.with_context(|| {
            format!("opening the store at {}", isotope_server::redact_url(&url))
        })?;
        let index = if a.no_index_update {
            trace::check_parameters(store.as_ref()).await?;
            None
        } else {
            let bar = ProgressBar::new(0).with_style(
                ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} usage events indexed {per_sec} {eta} {msg}",
                )
                .expect("static template"),
            );
            if a.json || !std::io::stderr().is_terminal() {
                bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
            }
            let mut progress = |p: &trace::IndexProgress| {
                bar.set_length(p.events);
                bar.set_position(p.total_indexed);
            };
            let p = trace::index_pending(store.as_ref(), 500, &mut progress)
                .await
                .context("updating the near-duplicate index")?;
            bar.finish_and_clear();
            Some(p)
        };
        let mut results = Vec::with_capacity(texts.len());
        for t in &texts {
            results.push(
                trace::find(store.as_ref(), &t.text, &opts)
                    .await
                    .with_context(|| format!("looking up {}", t.source))?,
            );
        }
        let accounts: HashMap<i64, String> = store
            .list_accounts()
            .await?
            .into_iter()
            .map(|a| (a.id, a.name))
            .collect();
        store.close().await;
        anyhow::Ok((index, results, accounts))
    })?;

    let mut out = Vec::new();
    for (t, mut matches) in texts.iter().zip(results) {
        for m in &mut matches {
            m.account = accounts.get(&m.account_id).cloned();
        }
        let tokens = model.tokenize(&t.text, false, false);
        let wm = detect_multi_key(&keys, &scheme, &excluded, common.as_ref(), &tokens);
        out.push(json!({
            "source": t.source,
            "words": trace::words(&t.text).len(),
            "tokens": tokens.len(),
            "served": !matches.is_empty(),
            "matches": matches.iter().map(|m| {
                let mut v = serde_json::to_value(m).unwrap_or_default();
                v["created_at"] = json!(utc(m.created_at_ms));
                v
            }).collect::<Vec<_>>(),
            "watermark": {
                "p_value": wm.p_value,
                "log10_p_value": wm.log10_p_value,
                "scored_tokens": wm.per_key.iter().map(|d| d.scored_tokens).max().unwrap_or(0),
                "key_id": wm.best_key_id,
                "keys": keys.len(),
            },
        }));
        if !a.json {
            print_text(&out[out.len() - 1], &matches);
        }
    }
    if a.json {
        println!(
            "{}",
            json!({
                "scheme": scheme.to_string(),
                "common_filter": common.is_some(),
                "index": index.map(|p| json!({
                    "indexed_now": p.indexed,
                    "indexed_events": p.total_indexed,
                    "usage_events": p.events,
                })),
                "parameters": {
                    "index": trace::parameters(),
                    "min_similarity": a.min_similarity,
                    "min_containment": a.min_containment,
                },
                "texts": out,
            })
        );
    }
    Ok(())
}

fn print_text(v: &serde_json::Value, matches: &[TraceMatch]) {
    let wm = &v["watermark"];
    let p = wm["p_value"].as_f64().unwrap_or(1.0);
    println!(
        "{}: {} — watermark p = {:.3e} over {} scored tuples{} ({} words)",
        v["source"].as_str().unwrap_or(""),
        if matches.is_empty() {
            "no served completion matches".to_owned()
        } else {
            format!("SERVED ({} match(es))", matches.len())
        },
        p,
        wm["scored_tokens"],
        if p < 1e-3 { ", WATERMARKED" } else { "" },
        v["words"],
    );
    for m in matches {
        println!(
            "  event {} {} account {} ({}) key {} {} similarity {:.3} containment {:.3}{}{}{}{}",
            m.event_id,
            utc(m.created_at_ms),
            m.account.as_deref().unwrap_or("?"),
            m.account_id,
            m.api_key_id,
            m.endpoint,
            m.similarity,
            m.containment,
            if m.exact { " exact" } else { "" },
            if m.partial { " partial" } else { "" },
            if m.estimated {
                " (estimated: text not stored)"
            } else {
                ""
            },
            if m.event_partial {
                " (response cut short)"
            } else {
                ""
            },
        );
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` from Unix milliseconds (proleptic Gregorian, UTC).
pub fn utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms.rem_euclid(1000)
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(super::utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(super::utc(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(super::utc(1_767_225_599_000), "2025-12-31T23:59:59.000Z");
    }
}
