//! isotope's sentinel: tells harvesting from ordinary use, per account and across
//! accounts that work together, from the store's usage events.
//!
//! - [`Sentinel`]: `observe(&UsageEvent)` folds an event into the account's bounded
//!   sketches ([`features`]) and the Sybil linker ([`cluster`]), and re-scores the
//!   account on a schedule; `assess(now)` re-scores everyone; `level(account)` is what
//!   the server enforces. The sentinel decides, it never blocks anything itself.
//! - [`Model`]: additive logistic model (one boosted shape per feature) + calibrated
//!   thresholds → [`Level`].
//! - [`simulate`] / [`Scenario`]: labelled benign and harvesting traffic.
//! - [`evaluate`] / [`train`] / [`leave_one_out`]: honest numbers on held-out seeds
//!   and prompt splits.
//! - [`bench()`]: events per second per core and bytes per account.

pub mod cluster;
pub mod embed;
pub mod eval;
pub mod features;
pub mod minilm;
pub mod model;
pub mod sentinel;
pub mod sim;
pub mod sketch;
pub mod stats;
pub mod text;

pub use embed::{Embedder, HashedEmbedder};
pub use eval::{
    bench, default_model, evaluate, evaluate_with, leave_one_out, prepare_embeddings, train,
    BenchReport, EvalReport, LooReport, StrategyReport, TrainConfig, TrainError,
};
pub use minilm::{embedder_for, EmbedderKind, MiniLmEmbedder, MiniLmError};
pub use model::{logit, Level, Model, Reason, Thresholds, STEP_DOWN_LOGIT};
pub use sentinel::{Assessment, Sentinel, SentinelConfig};
pub use sim::{simulate, LabelledEvent, Scenario, SimError, Simulated, Strategy};
