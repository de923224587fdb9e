//! Keyed watermarks for language-model output, and their detectors.
//!
//! - [`WatermarkKey`]: a 32-byte secret with a public id; keyed BLAKE3 is the PRF.
//! - [`Scheme`]: KGW (LeftHash / MinHash / SelfHash seeding), Unigram, Gumbel
//!   (Aaronson), SynthID tournament.
//! - [`WatermarkHook`]: embeds a scheme through `isotope_sampling`'s hook — the engine
//!   and a candle student watermark identically.
//! - [`Detector`]: exact p-values (binomial / Gamma tails in log space) over
//!   deduplicated (window, token) tuples; per text, per corpus, best span, several keys;
//!   optionally over a key-independent mask or integer weighting of positions
//!   ([`entropy`]: entropy-aware detection; [`weighted`]: the exact tail of a
//!   weighted test).
//!
//! Pure computation: no I/O, no HTTP, no llama.cpp. Reading key files is the caller's
//! job ([`WatermarkKey::parse_file`] takes their text).

pub mod common;
mod detect;
pub mod entropy;
mod hook;
mod key;
mod prf;
mod scheme;
pub mod stats;
pub mod weighted;

pub use common::{CommonMeta, CommonTuples, CommonTuplesBuilder, CommonTuplesError, TupleShape};
pub use detect::{
    detect_multi_key, detect_multi_key_weighted, mass_weight, Detection, Detector,
    MultiKeyDetection, PairOutcome, Tally, WeightedStatistic, WindowedDetection, MASS_LEVELS,
    MASS_MIN_PROB, NO_PREDICTION,
};
pub use entropy::{EntropyMeasure, EntropyRule, EntropyRuleError, WEIGHT_LEVELS};
pub use hook::{ExcludedTokens, WatermarkHook};
pub use key::{KeyError, WatermarkKey};
pub use prf::green_threshold;
pub use scheme::{Scheme, SchemeError, Seeding, SELF_HASH_CANDIDATES};
