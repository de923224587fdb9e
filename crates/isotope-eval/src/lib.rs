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
//! Depends on the engine only for tokenization; never on the CLI.

pub mod calibration;
pub mod data;

pub use calibration::{
    calibrate, calibrate_with, fixed_keys, CalibrationOptions, CalibrationReport, FprAt,
    FreshKeyControl, KeySummary, Level, NoDedupControl, SchemeCalibration, TestSummary,
};
pub use data::{default_data_dir, load_human_texts, repetitive_texts, DataError, HumanText};
