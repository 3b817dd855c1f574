//! Typed errors of the `permute` crate.

/// The result type of this crate.
pub type Result<T, E = PermuteError> = std::result::Result<T, E>;

/// What can go wrong while building, checking or solving permutations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PermuteError {
    /// A weight the spec names is missing from a checkpoint.
    #[error("{model}: weight '{weight}' named by the permutation spec is missing")]
    MissingWeight {
        /// A label for the checkpoint it is missing from (e.g. `"model A"`, `"model B"`).
        model: String,
        /// The state-dict name of the missing weight.
        weight: String,
    },
    /// A weight's dimension disagrees with its permutation group.
    #[error(
        "weight '{weight}' axis {axis} has size {actual}, but group '{group}' needs {expected}"
    )]
    GroupSize {
        /// The state-dict name of the weight.
        weight: String,
        /// The axis of the weight that the group permutes.
        axis: usize,
        /// The name of the permutation group acting on that axis.
        group: String,
        /// The length the group needs: `blocks · repeat · block_size`.
        expected: usize,
        /// The axis length in the checkpoint (0 when the weight has no such axis).
        actual: usize,
    },
    /// Two models disagree on a weight's shape.
    #[error("weight '{weight}': shapes differ between models: {a:?} vs {b:?}")]
    ShapeMismatch {
        /// The state-dict name of the weight.
        weight: String,
        /// Its shape in the first model (model A).
        a: Vec<usize>,
        /// Its shape in the second model (model B).
        b: Vec<usize>,
    },
    /// The spec itself is inconsistent.
    #[error("invalid permutation spec: {0}")]
    InvalidSpec(String),
    /// A matrix or cost has the wrong shape.
    #[error("{what}: {msg}")]
    Shape {
        /// The operation, layer or input concerned (e.g. `"lerp"`, `"barrier"`).
        what: String,
        /// What is wrong, usually the sizes found against those expected.
        msg: String,
    },
    /// NaN or infinite values where finite ones are required.
    #[error("{what}: non-finite value ({msg})")]
    NonFinite {
        /// The input concerned (a model's weight, activations, a cost matrix, a loss curve).
        what: String,
        /// The offending value, with its position where known.
        msg: String,
    },
    /// A permutation is not a bijection of `0..n`.
    #[error("group '{group}': {msg}")]
    BadPermutation {
        /// The name of the group whose value is wrong.
        group: String,
        /// Which part is wrong (outer, inner, copy order, missing value).
        msg: String,
    },
}
