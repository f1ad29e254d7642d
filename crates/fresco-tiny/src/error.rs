use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TinyError {
    #[error(transparent)]
    Pipeline(#[from] fresco_pipeline::PipelineError),
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Invalid(String),
    /// A training option out of its range, named by its field in `TrainOptions` (`denoiser.batch`,
    /// `beta_end`, `arch.unet_channels`…) so that a front end can name its own flag for it.
    #[error("{field}: {problem}")]
    Option { field: &'static str, problem: String },
}

impl TinyError {
    pub fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io { path: path.to_path_buf(), source }
    }

    pub fn option(field: &'static str, problem: impl Into<String>) -> Self {
        Self::Option { field, problem: problem.into() }
    }
}

pub type Result<T> = std::result::Result<T, TinyError>;
