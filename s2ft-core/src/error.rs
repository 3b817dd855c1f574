//! Errors of the S²FT crate, each naming the weight, option or file concerned.

/// What can go wrong building, loading, selecting or training.
#[derive(Debug, thiserror::Error)]
pub enum S2ftError {
    /// Reading or writing a checkpoint failed.
    #[error(transparent)]
    Weights(#[from] weights::WeightsError),
    /// The model config is missing a field or inconsistent.
    #[error("model config: {0}")]
    Config(String),
    /// A weight the architecture needs is missing or has the wrong shape.
    #[error("weight '{name}': {msg}")]
    Weight {
        /// The Hugging Face name of the weight.
        name: String,
        /// What is wrong with it (missing, or the shapes found and expected).
        msg: String,
    },
    /// A selection or budget that cannot be satisfied.
    #[error("selection: {0}")]
    Selection(String),
    /// An adapter that does not fit this model.
    #[error("adapter: {0}")]
    Adapter(String),
    /// A tokenizer file that is missing or not understood, or text it cannot encode.
    #[error("tokenizer {}: {msg}", path.display())]
    Tokenizer {
        /// The tokenizer file, or the model folder or GGUF file it came from.
        path: std::path::PathBuf,
        /// What went wrong reading it or encoding with it.
        msg: String,
    },
    /// A prompt that cannot be decoded (empty, too long for the context).
    #[error("generation: {0}")]
    Generation(String),
    /// Training diverged.
    #[error("training stopped at step {step}: {msg}")]
    Training {
        /// The step (counted from 0) whose loss was not finite.
        step: usize,
        /// The loss value and which model is returned instead.
        msg: String,
    },
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, S2ftError>;
