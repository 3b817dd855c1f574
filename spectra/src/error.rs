//! Typed errors of the `spectra` crate.

/// The result type of this crate.
pub type Result<T, E = SpectraError> = std::result::Result<T, E>;

/// What can go wrong in a spectral analysis.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpectraError {
    /// The matrix has NaN or infinite entries.
    #[error("{name}: matrix has {count} non-finite entries (NaN or Inf)")]
    NonFinite {
        /// Name of the matrix (tensor) that was checked.
        name: String,
        /// How many entries are NaN or ±Inf.
        count: usize,
    },
    /// The matrix has a zero dimension.
    #[error("{name}: matrix of shape {shape:?} is empty")]
    Empty {
        /// Name of the matrix (tensor), or of the layer whose ESD had no matrices.
        name: String,
        /// The offending shape (empty when there was no matrix at all).
        shape: Vec<usize>,
    },
    /// The input has a shape the operation cannot use.
    #[error("{name}: {msg}")]
    Shape {
        /// Name of the matrix (tensor) or layer.
        name: String,
        /// What is wrong with the shape(s).
        msg: String,
    },
    /// The decomposition did not converge.
    #[error("{name}: {what} did not converge")]
    NoConvergence {
        /// Name of the matrix (tensor) being decomposed.
        name: String,
        /// Which computation failed: `SVD`, `symmetric eigendecomposition` or `symmetric solve`.
        what: &'static str,
    },
    /// An option is out of its range.
    #[error("invalid option {option}: {msg}")]
    Option {
        /// Name of the option (`ridge`, `farms`, `target_reduction`, `rank`, …).
        option: &'static str,
        /// The rejected value and the allowed range.
        msg: String,
    },
    /// Reading the checkpoint failed.
    #[error(transparent)]
    Weights(#[from] weights::WeightsError),
    /// Writing a report failed.
    #[error("{path}: {source}")]
    Io {
        /// The file that could not be written.
        path: String,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
}
