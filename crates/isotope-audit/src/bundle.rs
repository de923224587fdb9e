//! Evidence bundles: a directory a third party can re-check.
//!
//! ```text
//! DIR/bundle.json     format, tool version, mode, scheme, parameters, keys (id and
//!                     commitment — never the key), common-tuples list, result
//! DIR/prompts.jsonl   prompts given to the suspect (their windows are not scored)
//! DIR/texts.jsonl     the texts scored: corpus / suspect outputs / texts the suspect
//!                     read (reading mode, unsupervised variant), with token ids and
//!                     (reading mode) its top-1 predictions and, for the mass
//!                     statistic, its candidates with log-probabilities
//! DIR/supervised.jsonl  our outputs the suspect read (reading mode, supervised
//!                     variant), with its predictions likewise
//! DIR/tuples.jsonl    every scored tuple: key id, variant, text, position, window,
//!                     token, keyed value
//! ```
//!
//! [`verify`] checks a revealed key against the commitment and recomputes the result
//! *from the evidence files* with the same [`crate::score`], so the p-value, the scored
//! tuples and their values must all agree. What it cannot check without the suspect
//! is that the texts really are the suspect's outputs or predictions: for that the
//! bundle is the record of what was asked and answered.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use isotope_watermark::WatermarkKey;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    score, AuditError, AuditResult, Evidence, EvidenceText, Mode, Result, ScoredTuple, Scoring,
};

/// `bundle.json`'s `format`. Version 2: the supervised variant of reading mode reads
/// `supervised.jsonl` itself (version 1 filtered `texts.jsonl` to its windows).
pub const FORMAT: &str = "isotope-audit-bundle/2";

/// The previous format, still read for text and black-box bundles (unchanged there).
const FORMAT_1: &str = "isotope-audit-bundle/1";

/// A watermark key as a bundle names it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct KeyCommitment {
    pub key_id: String,
    /// [`WatermarkKey::commitment`]: checks a key revealed later, reveals nothing.
    pub commitment: String,
}

/// `bundle.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: String,
    pub tool_version: String,
    pub mode: Mode,
    pub scheme: String,
    pub keys: Vec<KeyCommitment>,
    /// Size and tokenizer of the common-tuples list used (`None`: no filter).
    pub common_filter: Option<Value>,
    /// The command's parameters (suspect, budget, files, …) for the record.
    pub parameters: Value,
    pub result: AuditResult,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_jsonl<T: Serialize>(path: &Path, rows: &[T]) -> Result<()> {
    let mut w = BufWriter::new(File::create(path).map_err(io(path))?);
    for r in rows {
        serde_json::to_writer(&mut w, r).expect("serialisable");
        w.write_all(b"\n").map_err(io(path))?;
    }
    w.flush().map_err(io(path))
}

fn read_jsonl<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>> {
    let f = File::open(path).map_err(io(path))?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line = line.map_err(io(path))?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(
            serde_json::from_str(&line)
                .map_err(|e| AuditError::Bundle(format!("{}:{}: {e}", path.display(), i + 1)))?,
        );
    }
    Ok(out)
}

/// Write a bundle into `dir` (created; files in it are replaced).
pub fn write(
    dir: &Path,
    manifest: &Manifest,
    evidence: &Evidence,
    tuples: &[ScoredTuple],
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let path = dir.join("bundle.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(manifest).expect("serialisable"),
    )
    .map_err(io(&path))?;
    write_jsonl(&dir.join("prompts.jsonl"), &evidence.prompts)?;
    write_jsonl(&dir.join("texts.jsonl"), &evidence.texts)?;
    write_jsonl(&dir.join("supervised.jsonl"), &evidence.supervised)?;
    write_jsonl(&dir.join("tuples.jsonl"), tuples)
}

/// A bundle read back.
pub struct Bundle {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub evidence: Evidence,
    pub tuples: Vec<ScoredTuple>,
}

/// Read a bundle.
pub fn read(dir: &Path) -> Result<Bundle> {
    let path = dir.join("bundle.json");
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    let manifest: Manifest = serde_json::from_str(&text)
        .map_err(|e| AuditError::Bundle(format!("{}: {e}", path.display())))?;
    let readable = manifest.format == FORMAT
        || (manifest.format == FORMAT_1 && manifest.mode != Mode::Reading);
    if !readable {
        return Err(AuditError::Bundle(format!(
            "format `{}` ({} mode), this isotope reads `{FORMAT}`{}",
            manifest.format,
            serde_json::to_value(manifest.mode).expect("serialisable"),
            if manifest.format == FORMAT_1 {
                ": re-run the reading-mode audit to re-check it"
            } else {
                ""
            }
        )));
    }
    let evidence = Evidence {
        prompts: read_jsonl::<EvidenceText>(&dir.join("prompts.jsonl"))?,
        texts: read_jsonl(&dir.join("texts.jsonl"))?,
        supervised: read_jsonl(&dir.join("supervised.jsonl"))?,
    };
    Ok(Bundle {
        dir: dir.to_path_buf(),
        manifest,
        evidence,
        tuples: read_jsonl(&dir.join("tuples.jsonl"))?,
    })
}

/// The outcome of [`verify`].
#[derive(Clone, Debug, Serialize)]
pub struct Verification {
    /// Everything agrees.
    pub ok: bool,
    /// What did not agree, in words.
    pub problems: Vec<String>,
    /// Keys checked (ids), each against its commitment.
    pub keys_checked: Vec<String>,
    /// The recomputed result (over the keys given).
    pub recomputed: AuditResult,
    /// Tuples in the bundle for the keys given, and how many the recomputation gave.
    pub tuples_recorded: usize,
    pub tuples_recomputed: usize,
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

/// Check `keys` against the bundle's commitments and recompute everything from the
/// evidence. With a subset of the bundle's keys, per-key results and tuples are
/// compared for those keys, and the headline p-value only when all keys are given.
pub fn verify(
    bundle: &Bundle,
    keys: &[Arc<WatermarkKey>],
    scoring: &Scoring,
) -> Result<Verification> {
    let m = &bundle.manifest;
    let mut problems = Vec::new();
    if scoring.scheme.to_string() != m.scheme {
        problems.push(format!(
            "scheme {} given, the bundle was scored with {}",
            scoring.scheme, m.scheme
        ));
    }
    for k in keys {
        match m.keys.iter().find(|c| c.key_id == k.id()) {
            None => problems.push(format!("key {} is not one of the bundle's keys", k.id())),
            Some(c) if c.commitment != k.commitment() => problems.push(format!(
                "key {} does not match the bundle's commitment",
                k.id()
            )),
            Some(_) => {}
        }
    }
    // The bundle says how its readings were scored (absent: top-1, the only
    // statistic before the mass one).
    let scoring = &Scoring {
        reading: m.result.reading_statistic.unwrap_or_default(),
        ..scoring.clone()
    };
    let mut recomputed_tuples = Vec::new();
    let recomputed = score(m.mode, &bundle.evidence, keys, scoring, |t| {
        recomputed_tuples.push(t)
    })?;
    let ids: Vec<&str> = keys.iter().map(|k| k.id()).collect();
    let recorded_tuples: Vec<&ScoredTuple> = bundle
        .tuples
        .iter()
        .filter(|t| ids.contains(&t.key_id.as_str()))
        .collect();
    let same_tuples = recorded_tuples.len() == recomputed_tuples.len()
        && recorded_tuples
            .iter()
            .zip(&recomputed_tuples)
            .all(|(a, b)| {
                **a == *b
                    || (a.window == b.window
                        && a.token == b.token
                        && a.key_id == b.key_id
                        && a.variant == b.variant
                        && a.text == b.text
                        && a.position == b.position
                        && a.weight == b.weight
                        && close(a.value, b.value))
            });
    if !same_tuples {
        problems.push(format!(
            "tuples.jsonl does not match the evidence: {} recorded, {} recomputed{}",
            recorded_tuples.len(),
            recomputed_tuples.len(),
            first_difference(&recorded_tuples, &recomputed_tuples)
        ));
    }
    for v in &recomputed.variants {
        let Some(rv) = m.result.variants.iter().find(|r| r.name == v.name) else {
            problems.push(format!("variant {} is not in the recorded result", v.name));
            continue;
        };
        for d in &v.per_key {
            match rv.per_key.iter().find(|r| r.key_id == d.key_id) {
                Some(r) if r.scored_tokens == d.scored_tokens && close(r.log10_p_value, d.log10_p_value) => {}
                Some(r) => problems.push(format!(
                    "{} / key {}: recorded p = {:.3e} over {} tuples, recomputed p = {:.3e} over {}",
                    v.name, d.key_id, r.p_value, r.scored_tokens, d.p_value, d.scored_tokens
                )),
                None => problems.push(format!("{} / key {}: no recorded result", v.name, d.key_id)),
            }
        }
    }
    if keys.len() == m.keys.len()
        && problems.is_empty()
        && !close(recomputed.log10_p_value, m.result.log10_p_value)
    {
        problems.push(format!(
            "headline p-value: recorded {:.3e}, recomputed {:.3e}",
            m.result.p_value, recomputed.p_value
        ));
    }
    Ok(Verification {
        ok: problems.is_empty(),
        problems,
        keys_checked: ids.iter().map(|s| s.to_string()).collect(),
        tuples_recorded: recorded_tuples.len(),
        tuples_recomputed: recomputed_tuples.len(),
        recomputed,
    })
}

fn first_difference(a: &[&ScoredTuple], b: &[ScoredTuple]) -> String {
    a.iter()
        .zip(b)
        .position(|(x, y)| *x != y)
        .map(|i| format!(" (first difference at tuple {})", i + 1))
        .unwrap_or_default()
}
