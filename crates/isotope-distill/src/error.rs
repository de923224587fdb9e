//! The crate's error type: every variant says what was being done and with which file,
//! so a CLI user knows what to fix without a backtrace.

use std::path::PathBuf;

/// Anything that can go wrong while loading data, building, training, saving or
/// exporting a student.
#[derive(Debug, thiserror::Error)]
pub enum DistillError {
    /// Reading or writing a file failed.
    #[error("{action} `{path}`: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A tensor operation failed (shape mismatch, bad dtype, …), with what we were doing.
    #[error("{context}: {source}")]
    Candle {
        context: String,
        #[source]
        source: candle_core::Error,
    },
    /// A JSON file of ours (config, training state) is malformed.
    #[error("parsing `{path}`: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// The GGUF file is not a llama model we can read, or lacks a key.
    #[error("GGUF `{path}`: {message}")]
    Gguf { path: PathBuf, message: String },
    /// Tokenizer construction, loading or encoding failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A configuration value is out of range (the message names it).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The training data has nothing to train on.
    #[error("no usable training examples in `{path}` ({warnings} lines skipped)")]
    NoData { path: PathBuf, warnings: usize },
    /// A checkpoint does not match the run that tries to resume from it.
    #[error("cannot resume from `{path}`: {message}")]
    Resume { path: PathBuf, message: String },
    /// A token id outside the student's vocabulary.
    #[error("token id {token} is outside the vocabulary of {vocab}")]
    InvalidToken { token: u32, vocab: usize },
    /// Training diverged: the loss is no longer a finite number.
    #[error(
        "the loss became {loss} at step {step}; try a lower learning rate or tighter clipping"
    )]
    Diverged { step: usize, loss: f64 },
    /// Harvesting stopped: the endpoint refused us (bad key, no quota, unknown model)
    /// or the output file belongs to other prompts.
    #[error("harvest: {0}")]
    Harvest(String),
    /// The local teacher (on-policy distillation) failed to score a sequence.
    #[error("teacher: {0}")]
    Teacher(String),
    /// Drawing the loss curve failed.
    #[error("drawing `{path}`: {message}")]
    Plot { path: PathBuf, message: String },
}

/// Result alias of this crate.
pub type Result<T, E = DistillError> = std::result::Result<T, E>;

/// Attach context to candle errors (`.ctx("forward pass")?`).
pub(crate) trait CandleContext<T> {
    fn ctx(self, context: impl Into<String>) -> Result<T>;
}

impl<T> CandleContext<T> for candle_core::Result<T> {
    fn ctx(self, context: impl Into<String>) -> Result<T> {
        self.map_err(|source| DistillError::Candle {
            context: context.into(),
            source,
        })
    }
}

pub(crate) fn io_err(
    action: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(std::io::Error) -> DistillError {
    let path = path.into();
    move |source| DistillError::Io {
        action,
        path,
        source,
    }
}
