//! Radioactivity audits (Sander et al. 2024, "Watermarking makes language models
//! radioactive"): was a suspect corpus written with our watermark, and was a suspect
//! *model* trained on our watermarked outputs?
//!
//! Everything an audit computes derives from an [`Evidence`] — the texts scored, the
//! prompts whose windows are left out, and in reading mode the suspect's
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
//! Reading mode scores either the suspect's top-1 prediction (Sander et al.) or —
//! isotope's default where the scheme allows it — its **green probability mass**
//! ([`ReadingStatistic::Mass`], [`isotope_watermark::Detector::tally_reading_mass`]):
//! every candidate the suspect gives at least 1/128 counts, weighted by its
//! probability, under the same one-reading-per-window rule and an exact null.
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
    /// A suspect model's predictions on texts fed to it (weights in hand, or an API
    /// that echoes prompt log-probs).
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
    /// Reading mode, mass statistic: the suspect's candidates after `tokens[..=i]`
    /// (top-1 first, then every other with probability ≥
    /// [`isotope_watermark::MASS_MIN_PROB`], at most the reader's limit) with their
    /// natural-log probabilities, one list per token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top: Option<Vec<Vec<(u32, f32)>>>,
}

/// Candidates per position a mass reading keeps by default (what vLLM returns at
/// most through its API by default).
pub const READING_TOP: usize = 20;

/// How reading mode scores a suspect's predictions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReadingStatistic {
    /// The top-1 prediction's keyed value, one tuple per window (Sander et al. 2024).
    /// What bundles written before the mass statistic used.
    #[default]
    Top1,
    /// The suspect's probability mass on green candidates, each weighted by
    /// round(64 q) ([`isotope_watermark::Detector::tally_reading_mass`]): needs a KGW
    /// scheme with a window seed; much more powerful against a student that learned
    /// the watermark only faintly.
    Mass,
}

impl ReadingStatistic {
    /// The statistic a reading of `scheme` uses unless told otherwise: the mass where
    /// the scheme has one.
    pub fn default_for(scheme: &Scheme) -> Self {
        if scheme.supports_mass_reading() {
            ReadingStatistic::Mass
        } else {
            ReadingStatistic::Top1
        }
    }
}

impl std::str::FromStr for ReadingStatistic {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "top1" => Ok(ReadingStatistic::Top1),
            "mass" => Ok(ReadingStatistic::Mass),
            _ => Err(format!(
                "unknown reading statistic `{s}`: use `mass` or `top1`"
            )),
        }
    }
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
    /// Reading mode: how the predictions were scored (absent in bundles written
    /// before the mass statistic: top-1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reading_statistic: Option<ReadingStatistic>,
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
    /// The token scored: the text's own (text, black-box), the suspect's top-1
    /// (reading, top-1 statistic) or one of its candidates (mass statistic).
    pub token: u32,
    /// Its keyed value (green 0/1, Gumbel score, SynthID bits).
    pub value: f64,
    /// Mass reading: the candidate's integer weight (round(64 q)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u8>,
}

/// How tuples are scored: scheme, control tokens, common-tuples list.
#[derive(Clone)]
pub struct Scoring {
    pub scheme: Scheme,
    pub excluded: ExcludedTokens,
    pub common: Option<Arc<CommonTuples>>,
    /// Reading mode's statistic.
    pub reading: ReadingStatistic,
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
                            weight: None,
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
            let mass = scoring.reading == ReadingStatistic::Mass;
            if mass && !scoring.scheme.supports_mass_reading() {
                return Err(AuditError::Input {
                    origin: scoring.scheme.to_string(),
                    message: "the mass reading statistic needs a KGW scheme with a window \
                              seed (seeding=left or min): use the top-1 statistic"
                        .into(),
                });
            }
            for (name, texts) in sets {
                for (i, t) in texts.iter().enumerate() {
                    let complete = if mass {
                        t.top.as_ref().map(Vec::len)
                    } else {
                        t.predictions.as_ref().map(Vec::len)
                    } == Some(t.tokens.len());
                    if !complete {
                        return Err(AuditError::Bundle(format!(
                            "{name} text {i} ({}) has no {} per token",
                            t.source,
                            if mass { "candidate list" } else { "prediction" }
                        )));
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
                        let mut scored = |pos: usize, w: &[u32], c, weight, o| {
                            if let PairOutcome::Scored(value) = o {
                                emit(ScoredTuple {
                                    key_id: String::new(),
                                    variant: String::new(),
                                    text: i,
                                    position: pos,
                                    window: w.to_vec(),
                                    token: c,
                                    value,
                                    weight,
                                });
                            }
                        };
                        if mass {
                            let top = text.top.as_deref().unwrap_or_default();
                            d.tally_reading_mass(t, &text.tokens, top, |pos, w, c, weight, o| {
                                scored(pos, w, c, Some(weight), o)
                            });
                        } else {
                            let preds = text.predictions.as_deref().unwrap_or_default();
                            d.tally_reading(t, &text.tokens, preds, |pos, w, c, o| {
                                scored(pos, w, c, None, o)
                            });
                        }
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
        reading_statistic: (mode == Mode::Reading).then_some(scoring.reading),
        variants,
    })
}

/// Length of the pieces a reading-mode suspect with context `context` reads a text in
/// (each from a fresh context). Every reader (candle here, llama.cpp in the CLI) uses
/// this, so a model reads the same pieces whichever way it is loaded.
pub fn reading_piece(context: usize) -> usize {
    context.clamp(16, 1024)
}

/// The student's candidates after every prefix of `tokens` for the mass statistic
/// (entry `i`: after `tokens[..=i]`): the top-1 and every other token with probability
/// ≥ [`isotope_watermark::MASS_MIN_PROB`], most likely first (ties: lowest id), at
/// most `limit`, with natural-log probabilities. Read in the pieces
/// [`top1_predictions`] uses.
pub fn top_predictions(
    student: &Student,
    tokens: &[u32],
    limit: usize,
) -> Result<Vec<Vec<(u32, f32)>>> {
    read_rows(student, tokens, |row| candidates(row, limit))
}

/// `f` of the student's logits after every prefix of `tokens`, read in pieces of
/// [`reading_piece`].
fn read_rows<T>(student: &Student, tokens: &[u32], f: impl Fn(&[f32]) -> T) -> Result<Vec<T>> {
    let chunk = reading_piece(student.config().max_seq_len);
    let mut out = Vec::with_capacity(tokens.len());
    for part in tokens.chunks(chunk) {
        for row in student.logits(part)? {
            out.push(f(&row));
        }
    }
    Ok(out)
}
/// The candidates of one row of logits (see [`top_predictions`]); every reader uses
/// this, so a GGUF and a student directory list the same way.
pub fn candidates(logits: &[f32], limit: usize) -> Vec<(u32, f32)> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // The normaliser the engine's scorer (and so `isotope serve`'s echoed log-probs)
    // uses, so an API reading lists exactly what reading the file lists.
    let z = isotope_sampling::log_sum_exp(logits);
    let floor = z + (isotope_watermark::MASS_MIN_PROB as f32).ln();
    select_candidates(
        (logits.iter().enumerate())
            .filter(|&(_, &x)| x >= floor || x == max)
            .map(|(t, &x)| (t as u32, x - z))
            .collect(),
        limit,
    )
}

/// The mass reading's candidates out of `(token, log-probability)` pairs (e.g. an
/// API's `top_logprobs`): most likely first (ties: lowest id), the top-1 and every
/// other at or above [`isotope_watermark::MASS_MIN_PROB`], at most `limit`.
pub fn select_candidates(mut list: Vec<(u32, f32)>, limit: usize) -> Vec<(u32, f32)> {
    list.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    // An id listed twice (an API's entries are free text) keeps its likeliest entry.
    let mut seen = std::collections::HashSet::new();
    list.retain(|c| seen.insert(c.0));
    let floor = (isotope_watermark::MASS_MIN_PROB as f32).ln();
    let keep = list.iter().skip(1).take_while(|c| c.1 >= floor).count() + 1;
    list.truncate(keep.min(limit.max(1)));
    list
}

/// The student's top-1 prediction after every prefix of `tokens` (entry `i`: after
/// `tokens[..=i]`). Texts longer than the student's context are read in consecutive
/// chunks of [`reading_piece`] (a prediction then sees only its chunk — still a
/// function of the text read so far, which is all the reading-mode null needs).
pub fn top1_predictions(student: &Student, tokens: &[u32]) -> Result<Vec<u32>> {
    read_rows(student, tokens, isotope_distill::argmax)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_are_ordered_capped_floored_and_listed_once() {
        let floor = (isotope_watermark::MASS_MIN_PROB as f32).ln();
        let list = vec![
            (7, -2.0),
            (3, -0.5),
            (7, -1.0), // the same id again, not next to its other entry after sorting
            (9, -2.0),
            (4, floor - 1.0),
            (5, -3.0),
        ];
        let got = select_candidates(list.clone(), 10);
        // likeliest first, ties by lowest id, each id once at its likeliest, nothing
        // below the floor
        assert_eq!(got, vec![(3, -0.5), (7, -1.0), (9, -2.0), (5, -3.0)]);
        assert_eq!(select_candidates(list, 2), vec![(3, -0.5), (7, -1.0)]);
        // the top-1 stays whatever its probability
        assert_eq!(
            select_candidates(vec![(1, -9.0), (2, -9.5)], 20),
            vec![(1, -9.0)]
        );
        assert_eq!(select_candidates(vec![(1, -0.1)], 0), vec![(1, -0.1)]);
    }
}
