//! Evaluations of isotope's watermark detectors on real text.
//!
//! - [`data`]: loaders for the human-written corpora under `data/` (GSM8K,
//!   Self-Instruct) — text no watermark key has ever touched.
//! - [`calibration`]: runs the detectors of every scheme under many *fixed* keys over
//!   that text and measures whether the p-values are valid: empirical false-positive
//!   rates against their nominal level (with exact Clopper–Pearson intervals) and
//!   Kolmogorov–Smirnov uniformity of the (randomised, where the test is discrete)
//!   p-values, per text, per corpus, and — as a negative control — without
//!   deduplication.
//!
//! - [`common`]: the list of tuples common in human text that detection leaves out,
//!   built from the reference split of the corpora (calibration uses the rest).
//!
//! - [`entropy`]: the model pass of entropy-aware detection — the unwatermarked
//!   model's next-token entropy at each position of a text, and the mask of positions
//!   the detector scores.
//!
//! - [`power`]: `isotope eval watermark` — detection power by length, quality cost
//!   (perplexity, length) and robustness (edits, crops, mixing into human text) of
//!   each scheme on the real model's answers.
//!
//! Depends on the engine for tokenization, generation and scoring; never on the CLI.

pub mod calibration;
pub mod common;
pub mod data;
pub mod entropy;
pub mod power;

pub use calibration::{
    calibrate, calibrate_with, fixed_keys, CalibrationOptions, CalibrationReport, FprAt,
    FreshKeyControl, KeySummary, Level, NoDedupControl, SchemeCalibration, TestSummary,
};
pub use common::{
    build_common_tuples, default_common_path, load_common_tuples, shipped_common_tuples,
    tokenizer_fingerprint, CommonError, COMMON_MIN_TEXTS, COMMON_SHAPES, SHIPPED_COMMON,
};
pub use data::{default_data_dir, load_human_texts, repetitive_texts, DataError, HumanText};
pub use entropy::{
    batch_entropies, entropy_prefix, entropy_weights, rule_weights, token_entropies, EntropyBatch,
    PositionEntropy,
};
pub use power::{
    evaluate, render, BucketRow, PowerOptions, PowerReport, Quality, RateAt, Rates, RobustRow,
    SchemePower,
};
