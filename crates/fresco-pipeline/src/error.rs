use std::path::{Path, PathBuf};

/// Everything that can go wrong between a model folder and an image. Each variant names the file or the
/// parameter at fault, because the people reading these errors are dataset builders, not candle experts.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Weights { path: PathBuf, message: String },
    #[error("{path}: tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("invalid parameter {field}: {message}")]
    InvalidParam { field: String, message: String },
    #[error("tensor computation failed: {0}")]
    Tensor(#[from] candle_core::Error),
    #[error("image encoding failed: {0}")]
    Encode(String),
    #[error("generation was cancelled")]
    Cancelled,
}

impl PipelineError {
    pub fn config(path: &Path, message: impl Into<String>) -> Self {
        Self::Config { path: path.to_path_buf(), message: message.into() }
    }

    pub fn weights(path: &Path, message: impl std::fmt::Display) -> Self {
        Self::Weights { path: path.to_path_buf(), message: message.to_string() }
    }

    pub fn param(field: &str, message: impl Into<String>) -> Self {
        Self::InvalidParam { field: field.to_string(), message: message.into() }
    }

    /// True when retrying the same input can never succeed (bad parameters, broken or unsupported model
    /// files), so a worker reports the failure as permanent instead of burning retries. Tensor errors
    /// (e.g. device out of memory) and I/O may pass on another attempt or another worker.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            Self::Config { .. }
                | Self::Weights { .. }
                | Self::Tokenizer { .. }
                | Self::Unsupported(_)
                | Self::InvalidParam { .. }
                | Self::Encode(_)
        )
    }
}

pub type Result<T, E = PipelineError> = std::result::Result<T, E>;
