//! Errors of the merge crate: every variant names the tensor, model, option or
//! file it is about.

use std::path::PathBuf;

/// What can go wrong while configuring or running a merge.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// Reading or writing a checkpoint failed.
    #[error(transparent)]
    Weights(#[from] weights::WeightsError),
    /// Aligning models by permutation failed.
    #[error(transparent)]
    Permute(#[from] permute::PermuteError),
    /// A linear-algebra routine failed (non-finite input, no convergence).
    #[error(transparent)]
    Linalg(#[from] spectra::SpectraError),
    /// An operating-system error on `path`.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory being read, written or created.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The merge config is malformed or asks for something unsupported.
    #[error("config {}: {msg}", path.display())]
    Config {
        /// The config file at fault, or the option, output or model
        /// directory the problem is about.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// A `merge_method` this crate does not implement.
    #[error("unknown merge method '{name}' (known: {known})")]
    UnknownMethod {
        /// The method name as given.
        name: String,
        /// The supported method names, comma-separated.
        known: String,
    },
    /// A parameter is missing, has the wrong type or is out of range.
    #[error("tensor '{tensor}': parameter '{param}': {msg}")]
    Parameter {
        /// The tensor the parameter was resolved for (or the command, such
        /// as `extract-lora`, for options that are not per tensor).
        tensor: String,
        /// The parameter's name (`weight`, `density`, ...).
        param: String,
        /// What is wrong with its value.
        msg: String,
    },
    /// Two inputs of one tensor disagree in shape.
    #[error("tensor '{tensor}': model '{model}' has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The tensor's name.
        tensor: String,
        /// The model (or adapter, task) whose tensor has the wrong shape.
        model: String,
        /// The shape of the reference (base or first) input.
        expected: Vec<usize>,
        /// The shape `model` has.
        got: Vec<usize>,
    },
    /// Embedding-like tensors whose vocabulary sizes differ.
    #[error(
        "tensor '{tensor}': model '{model}' has {rows} vocabulary rows, the base has {base_rows}; \
         set `embed_slice: base_rows` (parameters) to take the base's rows for the tokens one model lacks \
         and truncate the extra ones"
    )]
    VocabMismatch {
        /// The embedding-like tensor's name.
        tensor: String,
        /// The model whose vocabulary size differs from the base's.
        model: String,
        /// The number of vocabulary rows (dimension 0) `model` has.
        rows: usize,
        /// The number of vocabulary rows the base model has.
        base_rows: usize,
    },
    /// A tensor one model has and another lacks.
    #[error("tensor '{tensor}' is missing from model '{model}'")]
    MissingTensor {
        /// The name of the missing tensor.
        tensor: String,
        /// The model (or adapter, task) that lacks it.
        model: String,
    },
    /// A NaN or infinite input value.
    #[error("tensor '{tensor}' of model '{model}' holds a non-finite value ({value})")]
    NonFinite {
        /// The tensor holding the value.
        tensor: String,
        /// The model (or Gram-matrix file) the tensor comes from.
        model: String,
        /// The first non-finite value found (NaN or ±∞).
        value: f32,
    },
    /// The method cannot take these inputs (count, base, ...).
    #[error("method '{method}': {msg}")]
    Inputs {
        /// The merge method's name.
        method: String,
        /// Why the inputs do not suit it (often naming the tensor).
        msg: String,
    },
    /// A low-rank / LoRA operation got inconsistent factors.
    #[error("{what}: {msg}")]
    LowRank {
        /// The tensor at fault, or the operation (`rmm`, `shared_basis`,
        /// `lora_lego`, ...) that got the bad input.
        what: String,
        /// What is inconsistent.
        msg: String,
    },
    /// A mixture-of-experts assembly or compression got inconsistent input
    /// (`what` names the config field, layer, expert or option).
    #[error("{what}: {msg}")]
    Moe {
        /// The config field, layer, expert or option at fault.
        what: String,
        /// What is inconsistent.
        msg: String,
    },
    /// A weight patch (robust weight signature) that does not fit its model
    /// or option (`what` names the signature, tensor or option).
    #[error("{what}: {msg}")]
    Patch {
        /// The signature, tensor or option at fault.
        what: String,
        /// Why it does not fit.
        msg: String,
    },
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, MergeError>;

impl MergeError {
    /// [`MergeError::NonFinite`] for the first NaN/Inf in `data`, if any.
    pub(crate) fn check_finite<'a>(
        tensor: &str,
        model: &str,
        data: impl IntoIterator<Item = &'a f32>,
    ) -> Result<()> {
        match data.into_iter().find(|v| !v.is_finite()) {
            Some(v) => Err(MergeError::NonFinite {
                tensor: tensor.to_string(),
                model: model.to_string(),
                value: *v,
            }),
            None => Ok(()),
        }
    }

    /// [`MergeError::check_finite`] of a slice, checked in blocks without
    /// a branch per element (a tenth of a merge's time when done one by one).
    pub(crate) fn check_finite_slice(tensor: &str, model: &str, data: &[f32]) -> Result<()> {
        for block in data.chunks(1024) {
            if !block.iter().fold(true, |ok, v| ok & v.is_finite()) {
                return Self::check_finite(tensor, model, block);
            }
        }
        Ok(())
    }

    pub(crate) fn param(tensor: &str, param: &str, msg: impl Into<String>) -> Self {
        MergeError::Parameter {
            tensor: tensor.to_string(),
            param: param.to_string(),
            msg: msg.into(),
        }
    }
}
