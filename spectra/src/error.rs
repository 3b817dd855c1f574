//! Typed errors of the `spectra` crate.

/// The result type of this crate.
pub type Result<T, E = SpectraError> = std::result::Result<T, E>;

/// What can go wrong in a spectral analysis.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpectraError {
    /// The matrix has NaN or infinite entries.
    #[error("{name}: matrix has {count} non-finite entries (NaN or Inf)")]
    NonFinite { name: String, count: usize },
    /// The matrix has a zero dimension.
    #[error("{name}: matrix of shape {shape:?} is empty")]
    Empty { name: String, shape: Vec<usize> },
    /// The input has a shape the operation cannot use.
    #[error("{name}: {msg}")]
    Shape { name: String, msg: String },
    /// The decomposition did not converge.
    #[error("{name}: {what} did not converge")]
    NoConvergence { name: String, what: &'static str },
    /// An option is out of its range.
    #[error("invalid option {option}: {msg}")]
    Option { option: &'static str, msg: String },
    /// Reading the checkpoint failed.
    #[error(transparent)]
    Weights(#[from] weights::WeightsError),
    /// Writing a report failed.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}
