//! The sampler chain shared by every model runner in isotope.
//!
//! Each decoding step hands the sampler the model's full logits and the context token
//! ids; the sampler returns the next token. The chain order is fixed and documented on
//! [`SamplingHook`]: penalties → temperature → adjust stages ([`LogitAdjust`], e.g.
//! antidistillation sampling) → hook bias (the watermark) → top-k / top-p / min-p →
//! draw (or the hook's own draw).
//!
//! This crate knows nothing about llama.cpp or candle, so that the serving engine and a
//! candle student sample — and watermark — identically.

mod params;
mod rng;
mod sampler;

pub use params::{ParamError, SamplingParams};
pub use rng::RequestRng;
pub use sampler::{
    exp_nonpositive, log_sum_exp, top_n, Distribution, LogitAdjust, Sampled, Sampler, SamplingHook,
    StepContext,
};

/// A token id in the model's vocabulary.
pub type TokenId = u32;
