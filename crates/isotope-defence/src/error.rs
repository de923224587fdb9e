//! Errors of the defence crate.

use std::path::PathBuf;

/// What can go wrong building or running a defence.
#[derive(Debug, thiserror::Error)]
pub enum DefenceError {
    /// The proxy student (its loading, forward pass or training data).
    #[error(transparent)]
    Distill(#[from] isotope_distill::DistillError),
    /// A tensor operation.
    #[error("{context}: {source}")]
    Candle {
        context: String,
        #[source]
        source: candle_core::Error,
    },
    /// The proxy cannot serve this teacher: another vocabulary or tokenizer.
    #[error("the proxy student does not share the teacher's tokenizer: {0}")]
    Vocabulary(String),
    /// A gradient file that does not fit the proxy.
    #[error("gradient file {path}: {message}")]
    Gradient { path: PathBuf, message: String },
    /// Invalid settings.
    #[error("{0}")]
    Config(String),
}

/// Result with [`DefenceError`].
pub type Result<T> = std::result::Result<T, DefenceError>;

pub(crate) trait Ctx<T> {
    fn ctx(self, context: impl Into<String>) -> Result<T>;
}

impl<T> Ctx<T> for candle_core::Result<T> {
    fn ctx(self, context: impl Into<String>) -> Result<T> {
        self.map_err(|source| DefenceError::Candle {
            context: context.into(),
            source,
        })
    }
}
