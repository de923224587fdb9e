//! The inference engine: GGUF models on llama.cpp, driven by isotope's own sampler.
//!
//! - [`Model`]: load a GGUF, tokenize, render the model's own chat template.
//! - [`Batcher`]: continuous batching of independent sequences in one context; every
//!   token is chosen by an [`isotope_sampling::Sampler`] from the full logits.
//! - [`Model::score`]: teacher-forced log-probabilities of a given text.
//! - [`text`]: UTF-8-safe streaming and stop strings.
//!
//! The engine knows nothing about accounts, API keys or the HTTP API; watermarking
//! reaches it only through the sampler's hook.

mod batch;
pub mod bench;
mod chat;
mod model;
mod score;
pub mod text;

pub use batch::{
    generate, BatchConfig, Batcher, Event, FinishReason, Generation, GenerationRequest, SeqId,
    SeqStats,
};
pub use chat::{ChatMessage, ChatTemplate};
pub use isotope_sampling::TokenId;
pub use model::{LoadOptions, Model};
pub use score::TokenScore;

use std::path::PathBuf;

/// Everything that can go wrong in the engine, worded for the person who must fix it.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The model file is missing, unreadable or not a loadable GGUF.
    #[error("cannot load model {}: {reason}", path.display())]
    ModelFile {
        /// The path that was given.
        path: PathBuf,
        /// Why it failed and what to do.
        reason: String,
    },
    /// The chat template is missing, does not compile or failed while rendering.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// The prompt does not fit the context (one generated token must still fit).
    #[error(
        "prompt is {prompt_tokens} tokens but the context holds {context}; shorten the \
         prompt or raise the context size"
    )]
    PromptTooLong {
        /// Prompt length in tokens.
        prompt_tokens: usize,
        /// Context available to the sequence.
        context: usize,
    },
    /// An empty prompt gives the model nothing to condition on.
    #[error("prompt is empty")]
    EmptyPrompt,
    /// A token id outside the vocabulary.
    #[error("token id {0} is outside the model's vocabulary")]
    InvalidToken(TokenId),
    /// Every slot is busy; retry after a step.
    #[error("no free sequence slot")]
    NoFreeSlot,
    /// Unusable batch/context configuration.
    #[error("invalid engine configuration: {0}")]
    Config(String),
    /// llama.cpp refused to create a context (usually out of memory).
    #[error("cannot create a llama.cpp context: {0}")]
    Context(String),
    /// llama.cpp failed to decode a batch.
    #[error("llama.cpp decode failed: {0}")]
    Decode(String),
}
