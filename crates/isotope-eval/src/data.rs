//! Human-written text: the unwatermarked null corpus.
//!
//! Reads the JSONL files under a data directory (by default the workspace's `data/`,
//! a copy of the project's `shared/data`, or `$ISOTOPE_DATA`):
//!
//! | file | fields used |
//! |---|---|
//! | `gsm8k/train.jsonl`, `gsm8k/test.jsonl` | `question`, `answer` |
//! | `self-instruct/user_oriented_instructions.jsonl` | `instruction`, `instances[].input`, `instances[].output` |
//! | `self-instruct/seed_tasks.jsonl` | `instruction`, `instances[].input`, `instances[].output` |
//!
//! Every field becomes its own text; texts shorter than [`MIN_CHARS`] characters
//! (after trimming) and exact duplicates are skipped.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Texts shorter than this many characters (after trimming) are skipped: they have
/// too few tokens to test.
pub const MIN_CHARS: usize = 20;

/// One piece of human-written text.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HumanText {
    /// Where it came from, e.g. `gsm8k/train:answer`.
    pub source: String,
    /// The text itself.
    pub text: String,
    /// Index of the row (GSM8K problem, Self-Instruct task) it came from within its
    /// file: a question and its answer share one, and so share a split.
    pub item: usize,
}

/// One item in [`REFERENCE_OF`] belongs to the reference split.
pub const REFERENCE_OF: usize = 5;
/// Items `i` with `i % REFERENCE_OF < REFERENCE_SHARE` form the reference split (40%),
/// the rest the held-out split (60%).
pub const REFERENCE_SHARE: usize = 2;

impl HumanText {
    /// True if the text is in the *reference* split, used to build the common-tuples
    /// list; calibration uses only the held-out rest, so it never tests the detector
    /// on text its list was built from. The split is by item, so a GSM8K question and
    /// its answer (which share names and numbers) fall on the same side.
    pub fn is_reference(&self) -> bool {
        self.item % REFERENCE_OF < REFERENCE_SHARE
    }
}

/// A data file that is missing or malformed.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be read.
    #[error("cannot read {path}: {source} (set ISOTOPE_DATA to the data directory)")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A line is not the JSON object expected.
    #[error("{path}:{line}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// Why.
        source: serde_json::Error,
    },
}

/// The data directory: `$ISOTOPE_DATA` if set, else the workspace's `data/` (a copy of
/// the project's shared human-written corpora, licences beside each, so a clean clone
/// can run the calibration).
pub fn default_data_dir() -> PathBuf {
    std::env::var_os("ISOTOPE_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../data")))
}

#[derive(Deserialize)]
struct Gsm8k {
    question: String,
    answer: String,
}

#[derive(Deserialize)]
struct Task {
    instruction: String,
    #[serde(default)]
    instances: Vec<Instance>,
}

#[derive(Deserialize)]
struct Instance {
    #[serde(default)]
    input: String,
    #[serde(default)]
    output: String,
}

fn read_jsonl<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.to_owned(),
        source,
    })?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|source| DataError::Json {
                path: path.to_owned(),
                line: i + 1,
                source,
            })
        })
        .collect()
}

/// Collects texts, skipping short ones and exact duplicates.
#[derive(Default)]
struct Collector {
    seen: HashSet<String>,
    texts: Vec<HumanText>,
}

impl Collector {
    fn push(&mut self, source: &str, item: usize, text: &str) {
        if text.trim().chars().count() < MIN_CHARS || !self.seen.insert(text.to_owned()) {
            return;
        }
        self.texts.push(HumanText {
            source: source.to_owned(),
            text: text.to_owned(),
            item,
        });
    }
}

/// Questions and answers of one GSM8K split (`train` or `test`).
fn gsm8k(dir: &Path, split: &str, out: &mut Collector) -> Result<(), DataError> {
    let path = dir.join("gsm8k").join(format!("{split}.jsonl"));
    for (i, row) in read_jsonl::<Gsm8k>(&path)?.iter().enumerate() {
        out.push(&format!("gsm8k/{split}:question"), i, &row.question);
        out.push(&format!("gsm8k/{split}:answer"), i, &row.answer);
    }
    Ok(())
}

/// Instructions and instance inputs/outputs of one Self-Instruct file.
fn self_instruct(dir: &Path, file: &str, out: &mut Collector) -> Result<(), DataError> {
    let path = dir.join("self-instruct").join(format!("{file}.jsonl"));
    for (i, task) in read_jsonl::<Task>(&path)?.iter().enumerate() {
        out.push(
            &format!("self-instruct/{file}:instruction"),
            i,
            &task.instruction,
        );
        for inst in &task.instances {
            out.push(&format!("self-instruct/{file}:input"), i, &inst.input);
            out.push(&format!("self-instruct/{file}:output"), i, &inst.output);
        }
    }
    Ok(())
}

/// Every human text under `dir`, in file order (GSM8K train, GSM8K test,
/// Self-Instruct user-oriented, Self-Instruct seed tasks).
pub fn load_human_texts(dir: impl AsRef<Path>) -> Result<Vec<HumanText>, DataError> {
    let dir = dir.as_ref();
    let mut out = Collector::default();
    gsm8k(dir, "train", &mut out)?;
    gsm8k(dir, "test", &mut out)?;
    self_instruct(dir, "user_oriented_instructions", &mut out)?;
    self_instruct(dir, "seed_tasks", &mut out)?;
    Ok(out.texts)
}

/// `count` synthetic repetitive texts: distinct human sentences (40–200 characters,
/// taken evenly spread over `texts`) each repeated `repeats` times, separated by a
/// space. Still unwatermarked — but every (window, token) tuple occurs `repeats`
/// times, which is what deduplication exists for.
pub fn repetitive_texts(texts: &[HumanText], count: usize, repeats: usize) -> Vec<HumanText> {
    let mut seen = HashSet::new();
    let mut sentences: Vec<&str> = Vec::new();
    for t in texts {
        for s in t.text.split_inclusive(['.', '?', '!', '\n']) {
            let s = s.trim();
            let n = s.chars().count();
            if (40..=200).contains(&n) && seen.insert(s) {
                sentences.push(s);
            }
        }
    }
    if sentences.is_empty() || count == 0 {
        return Vec::new();
    }
    let step = (sentences.len() / count).max(1);
    sentences
        .iter()
        .step_by(step)
        .take(count)
        .enumerate()
        .map(|(item, s)| HumanText {
            source: format!("synthetic/repeat{repeats}"),
            text: vec![*s; repeats].join(" "),
            item,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> HumanText {
        HumanText {
            source: "t".into(),
            text: s.into(),
            item: 0,
        }
    }

    #[test]
    fn short_and_duplicate_texts_are_skipped() {
        let mut c = Collector::default();
        c.push("a", 0, "too short");
        c.push("a", 1, "long enough to be kept as a text");
        c.push("b", 2, "long enough to be kept as a text");
        c.push("a", 3, "                 x                  ");
        assert_eq!(c.texts.len(), 1);
        assert_eq!(c.texts[0].source, "a");
    }

    #[test]
    fn repetitive_texts_repeat_one_sentence() {
        let texts = [
            text("First sentence that is long enough to be used here. Short one."),
            text("Another sentence that is long enough to be used, too!"),
        ];
        let r = repetitive_texts(&texts, 5, 3);
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[0].text,
            "First sentence that is long enough to be used here. \
             First sentence that is long enough to be used here. \
             First sentence that is long enough to be used here."
        );
        assert_eq!(r[1].source, "synthetic/repeat3");
    }

    #[test]
    fn missing_directory_names_the_file() {
        let e = load_human_texts("/nonexistent/isotope-data").unwrap_err();
        assert!(e.to_string().contains("gsm8k/train.jsonl"), "{e}");
    }
}
