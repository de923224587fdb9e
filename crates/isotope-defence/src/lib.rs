//! Countermeasures that make distillation less profitable while ordinary users keep
//! the same quality (issue #8).
//!
//! Today: **antidistillation sampling** ([`antidistill`]): the teacher's candidates are
//! re-weighted by how much each would *help* a proxy student on a held-out task set,
//! estimated by finite differences of two perturbed copies of the proxy along its
//! held-out gradient ([`proxy_gradient`]). It plugs into the sampler as an
//! [`isotope_sampling::LogitAdjust`] stage, before the watermark hook.
//!
//! Flow: a proxy [`isotope_distill::Student`] (a trained student directory or a GGUF
//! dequantized) → [`proxy_gradient`] on held-out teacher outputs → [`ProxyGradient::save`]
//! → at serving time [`ProxyGradient::load`] → [`Antidistill::new`] (shared) →
//! [`Antidistill::stage`] per sequence → `Sampler::with_adjust`.
//!
//! The defence knows nothing of llama.cpp, HTTP or accounts: the teacher reaches it only
//! as logits through the sampler, and the decision *whom* to defend against is the
//! caller's. Only [`eval`] (`isotope eval defences`) drives the real teacher.

pub mod antidistill;
mod error;
pub mod eval;
mod gradient;
mod load;
mod vocab;

pub use antidistill::{
    Antidistill, AntidistillConfig, AntidistillStage, StageStats, DEFAULT_MIN_P,
};
pub use error::{DefenceError, Result};
pub use gradient::{proxy_gradient, GradientReport, ProxyGradient};
pub use load::{antidistill_for_teacher, load_proxy};
pub use vocab::check_same_tokenizer;
