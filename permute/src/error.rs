//! Typed errors of the `permute` crate.

/// The result type of this crate.
pub type Result<T, E = PermuteError> = std::result::Result<T, E>;

/// What can go wrong while building, checking or solving permutations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PermuteError {
    /// A weight the spec names is missing from a checkpoint.
    #[error("{model}: weight '{weight}' named by the permutation spec is missing")]
    MissingWeight { model: String, weight: String },
    /// A weight's dimension disagrees with its permutation group.
    #[error(
        "weight '{weight}' axis {axis} has size {actual}, but group '{group}' needs {expected}"
    )]
    GroupSize {
        weight: String,
        axis: usize,
        group: String,
        expected: usize,
        actual: usize,
    },
    /// Two models disagree on a weight's shape.
    #[error("weight '{weight}': shapes differ between models: {a:?} vs {b:?}")]
    ShapeMismatch {
        weight: String,
        a: Vec<usize>,
        b: Vec<usize>,
    },
    /// The spec itself is inconsistent.
    #[error("invalid permutation spec: {0}")]
    InvalidSpec(String),
    /// A matrix or cost has the wrong shape.
    #[error("{what}: {msg}")]
    Shape { what: String, msg: String },
    /// NaN or infinite values where finite ones are required.
    #[error("{what}: non-finite value ({msg})")]
    NonFinite { what: String, msg: String },
    /// A permutation is not a bijection of `0..n`.
    #[error("group '{group}': {msg}")]
    BadPermutation { group: String, msg: String },
}
