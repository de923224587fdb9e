//! Radioactivity audits (Sander et al. 2024, "Watermarking makes language models
//! radioactive"): was a suspect corpus written with our watermark, and was a suspect
//! *model* trained on our watermarked outputs?
//!
//! Everything an audit computes derives from an [`Evidence`] — the texts scored, the
//! prompts whose windows are left out, and in reading mode the suspect's top-1
//! predictions — through one function, [`score`]. An evidence bundle
//! ([`bundle`]) stores the evidence, so `verify` re-runs exactly the same
//! computation from the files and a third party given the key later gets the same
//! p-value.
//!
//! - **text**: one test over a whole corpus, (window, token) tuples deduplicated
//!   across all texts ([`isotope_watermark::Detector::tally`]).
//! - **black-box**: the suspect's outputs to our prompts, scored as one corpus after
//!   the prompts' *windows* seed the deduplication set
//!   ([`isotope_watermark::Tally::exclude_windows`]) — else a clean model that merely
//!   continues a watermarked prompt looks radioactive.
//! - **reading** (white-box): texts teacher-forced through the suspect, its top-1
//!   prediction scored against the window of the fed text, one tuple per distinct
//!   window over the whole run ([`isotope_watermark::Detector::tally_reading`], whose
//!   doc comment says why that null is exact). Two variants, reported separately:
//!   *supervised* reads our own outputs that the suspect may have trained on (the
//!   harvest served to an account), *unsupervised* reads other texts — new outputs
//!   of ours, or any text — so it needs no guess about the training data. Reading the
//!   training texts themselves is the stronger test (their windows are exactly the
//!   ones the suspect saw watermarked); the unsupervised one is what is left when the
//!   training data is unknown.
//!
//! Several keys: each variant's p-value is Bonferroni-corrected over keys, and the
//! headline p-value over variants. No HTTP and no llama.cpp here: the caller
//! tokenizes and, for black-box audits, harvests (`isotope_distill::harvest`).

pub mod bundle;
pub mod corpus;
pub mod trace;

use std::path::PathBuf;
use std::sync::Arc;

use isotope_distill::Student;
use isotope_watermark::{
    stats, CommonTuples, Detection, Detector, ExcludedTokens, MultiKeyDetection, PairOutcome,
    Scheme, Tally, WatermarkKey,
};
use serde::{Deserialize, Serialize};

/// Errors of an audit.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: {message}")]
    Input { origin: String, message: String },
    #[error("invalid evidence bundle: {0}")]
    Bundle(String),
    #[error("nothing to audit: {0}")]
    Empty(String),
    #[error(transparent)]
    Student(#[from] isotope_distill::DistillError),
}

pub type Result<T, E = AuditError> = std::result::Result<T, E>;

/// What was audited.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// A corpus of texts found in the wild.
    Text,
    /// A suspect model's outputs to our prompts, through its API.
    BlackBox,
    /// A suspect model's top-1 predictions on texts fed to it (weights in hand).
    Reading,
}

/// One text of the evidence.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvidenceText {
    /// Where it came from (`FILE:LINE`, a harvest record id, …).
    pub source: String,
    pub text: String,
    /// Token ids (the watermark's tokenizer).
    pub tokens: Vec<u32>,
    /// Reading mode: the suspect's top-1 after `tokens[..=i]`, one per token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predictions: Option<Vec<u32>>,
}

/// Everything a result is computed from.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    /// Prompts given to the suspect: their windows are never scored.
    pub prompts: Vec<EvidenceText>,
    /// The texts scored (corpus, suspect outputs, or — reading mode, *unsupervised*
    /// variant — texts read by the suspect that it is not known to have trained on).
    pub texts: Vec<EvidenceText>,
    /// Reading mode, *supervised* variant: our own outputs that the suspect may have
    /// trained on, read by the suspect (with its predictions).
    pub supervised: Vec<EvidenceText>,
}

/// One variant of a test (several keys combined).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Variant {
    /// `corpus`, `unsupervised` or `supervised`.
    pub name: String,
    /// Smallest per-key p-value × number of keys.
    pub p_value: f64,
    pub log10_p_value: f64,
    pub best_key_id: String,
    /// Each key's own result.
    pub per_key: Vec<Detection>,
}

/// The result of an audit.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AuditResult {
    pub mode: Mode,
    pub scheme: String,
    /// Headline p-value: the best variant's, Bonferroni-corrected over variants.
    pub p_value: f64,
    pub log10_p_value: f64,
    /// Distinct tuples scored by the best variant (largest over keys).
    pub scored_tokens: u64,
    /// Tuples left out as common in human text (best variant, largest over keys).
    pub common_excluded: u64,
    pub variants: Vec<Variant>,
    /// Texts scored (reading mode: of both variants).
    pub texts: usize,
    pub prompts: usize,
    /// Tokens in the scored texts.
    pub tokens: usize,
}

/// One scored tuple, as a bundle lists them.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ScoredTuple {
    pub key_id: String,
    pub variant: String,
    /// Index into the variant's texts: [`Evidence::supervised`] for the supervised
    /// variant, else [`Evidence::texts`].
    pub text: usize,
    /// Position in the text of the token after the window.
    pub position: usize,
    pub window: Vec<u32>,
    /// The token scored: the text's own (text, black-box) or the suspect's top-1
    /// (reading).
    pub token: u32,
    /// Its keyed value (green 0/1, Gumbel score, SynthID bits).
    pub value: f64,
}

/// How tuples are scored: scheme, control tokens, common-tuples list.
#[derive(Clone)]
pub struct Scoring {
    pub scheme: Scheme,
    pub excluded: ExcludedTokens,
    pub common: Option<Arc<CommonTuples>>,
}

impl Scoring {
    fn detector(&self, key: &Arc<WatermarkKey>) -> Detector {
        let d = Detector::new(key.clone(), self.scheme.clone(), self.excluded.clone());
        match &self.common {
            Some(c) => d.with_common(c.clone()),
            None => d,
        }
    }
}

/// Fills one key's tally, emitting scored tuples.
type TallyFn<'a> = dyn FnMut(&Detector, &mut Tally, &mut dyn FnMut(ScoredTuple)) + 'a;

/// Compute the audit result of `evidence` under `keys`, calling `on_tuple` for every
/// scored tuple. Reading mode needs predictions on every text.
pub fn score(
    mode: Mode,
    evidence: &Evidence,
    keys: &[Arc<WatermarkKey>],
    scoring: &Scoring,
    mut on_tuple: impl FnMut(ScoredTuple),
) -> Result<AuditResult> {
    if keys.is_empty() {
        return Err(AuditError::Empty("no watermark key given".into()));
    }
    let h = scoring.scheme.context();
    let mut variants = Vec::new();
    let mut run = |name: &str, per_key_tally: &mut TallyFn| {
        let per_key: Vec<Detection> = keys
            .iter()
            .map(|k| {
                let d = scoring.detector(k);
                let mut t = Tally::default();
                let mut emit = |mut tuple: ScoredTuple| {
                    tuple.key_id = k.id().to_owned();
                    tuple.variant = name.to_owned();
                    on_tuple(tuple);
                };
                per_key_tally(&d, &mut t, &mut emit);
                d.finish(&t)
            })
            .collect();
        let m = MultiKeyDetection::from_per_key(per_key);
        variants.push(Variant {
            name: name.to_owned(),
            p_value: m.p_value,
            log10_p_value: m.log10_p_value,
            best_key_id: m.best_key_id,
            per_key: m.per_key,
        });
    };
    match mode {
        Mode::Text | Mode::BlackBox => {
            run("corpus", &mut |d, t, emit| {
                for p in &evidence.prompts {
                    t.exclude_windows(d, &p.tokens);
                }
                for (i, text) in evidence.texts.iter().enumerate() {
                    let tokens = &text.tokens;
                    d.tally_with(t, tokens, |pos, value| {
                        emit(ScoredTuple {
                            key_id: String::new(),
                            variant: String::new(),
                            text: i,
                            position: pos,
                            window: tokens[pos - h..pos].to_vec(),
                            token: tokens[pos],
                            value,
                        })
                    });
                }
            });
        }
        Mode::Reading => {
            let sets = [
                ("unsupervised", &evidence.texts),
                ("supervised", &evidence.supervised),
            ];
            for (name, texts) in sets {
                for (i, t) in texts.iter().enumerate() {
                    match &t.predictions {
                        Some(p) if p.len() == t.tokens.len() => {}
                        _ => {
                            return Err(AuditError::Bundle(format!(
                                "{name} text {i} ({}) has no prediction per token",
                                t.source
                            )))
                        }
                    }
                }
            }
            if sets.iter().all(|(_, t)| t.is_empty()) {
                return Err(AuditError::Empty(
                    "reading mode needs texts read by the suspect".into(),
                ));
            }
            for (name, texts) in sets.into_iter().filter(|(_, t)| !t.is_empty()) {
                run(name, &mut |d, t, emit| {
                    for (i, text) in texts.iter().enumerate() {
                        let preds = text.predictions.as_deref().unwrap_or_default();
                        d.tally_reading(t, &text.tokens, preds, |pos, w, c, o| {
                            if let PairOutcome::Scored(value) = o {
                                emit(ScoredTuple {
                                    key_id: String::new(),
                                    variant: String::new(),
                                    text: i,
                                    position: pos,
                                    window: w.to_vec(),
                                    token: c,
                                    value,
                                });
                            }
                        });
                    }
                });
            }
        }
    }
    let best = variants
        .iter()
        .min_by(|a, b| a.log10_p_value.total_cmp(&b.log10_p_value))
        .expect("at least one variant");
    let ln = stats::ln_bonferroni(
        best.log10_p_value * std::f64::consts::LN_10,
        variants.len() as u64,
    );
    let largest = |f: fn(&Detection) -> u64| best.per_key.iter().map(f).max().unwrap_or(0);
    Ok(AuditResult {
        mode,
        scheme: scoring.scheme.to_string(),
        p_value: ln.exp(),
        log10_p_value: stats::ln_to_log10(ln),
        scored_tokens: largest(|d| d.scored_tokens),
        common_excluded: largest(|d| d.common_excluded),
        texts: evidence.texts.len() + evidence.supervised.len(),
        prompts: evidence.prompts.len(),
        tokens: (evidence.texts.iter())
            .chain(&evidence.supervised)
            .map(|t| t.tokens.len())
            .sum(),
        variants,
    })
}

/// Length of the pieces a reading-mode suspect with context `context` reads a text in
/// (each from a fresh context). Every reader (candle here, llama.cpp in the CLI) uses
/// this, so a model reads the same pieces whichever way it is loaded.
pub fn reading_piece(context: usize) -> usize {
    context.clamp(16, 1024)
}

/// The student's top-1 prediction after every prefix of `tokens` (entry `i`: after
/// `tokens[..=i]`). Texts longer than the student's context are read in consecutive
/// chunks of [`reading_piece`] (a prediction then sees only its chunk — still a
/// function of the text read so far, which is all the reading-mode null needs).
pub fn top1_predictions(student: &Student, tokens: &[u32]) -> Result<Vec<u32>> {
    let chunk = reading_piece(student.config().max_seq_len);
    let mut out = Vec::with_capacity(tokens.len());
    for part in tokens.chunks(chunk) {
        for row in student.logits(part)? {
            out.push(isotope_distill::argmax(&row));
        }
    }
    Ok(out)
}
