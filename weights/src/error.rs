//! Typed errors of the `weights` crate.
//!
//! Every variant names the file it concerns and, where one is involved, the
//! tensor, so that a message read in a log is enough to find the fault.

use std::path::PathBuf;

/// The result type of this crate.
pub type Result<T, E = WeightsError> = std::result::Result<T, E>;

/// Everything that can go wrong while reading or writing checkpoints.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WeightsError {
    /// An operating-system error on `path`.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file ends before a structure it announces.
    #[error("{}: file is truncated: {what}", path.display())]
    Truncated { path: PathBuf, what: String },
    /// The safetensors header length points past the end of the file.
    #[error("{}: header length {header_len} exceeds the {available} bytes after the length prefix", path.display())]
    HeaderTooLong {
        path: PathBuf,
        header_len: u64,
        available: u64,
    },
    /// The header (JSON of safetensors, an index file, GGUF key/values) is malformed.
    #[error("{}: invalid header: {msg}", path.display())]
    InvalidHeader { path: PathBuf, msg: String },
    /// A tensor name occurs twice in one file or index.
    #[error("{}: tensor '{name}' is listed more than once", path.display())]
    DuplicateTensor { path: PathBuf, name: String },
    /// A safetensors dtype string this crate does not know.
    #[error("{}: tensor '{name}': unknown dtype '{dtype}'", path.display())]
    UnknownDtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    /// A GGUF/GGML tensor type number this crate does not know.
    #[error("{}: tensor '{name}': unknown GGML tensor type {ggml_type}", path.display())]
    UnknownGgmlType {
        path: PathBuf,
        name: String,
        ggml_type: u32,
    },
    /// A known storage type that cannot be decoded (or encoded) here.
    #[error("{}: tensor '{name}': dtype {dtype} is not supported for {op}", path.display())]
    UnsupportedDtype {
        path: PathBuf,
        name: String,
        dtype: String,
        op: &'static str,
    },
    /// The bytes a tensor occupies disagree with its dtype and shape.
    #[error("{}: tensor '{name}': shape {shape:?} of dtype {dtype} needs {expected} bytes but its data spans {actual}", path.display())]
    ByteCountMismatch {
        path: PathBuf,
        name: String,
        dtype: String,
        shape: Vec<usize>,
        /// `u64::MAX` when the size overflows.
        expected: u64,
        actual: u64,
    },
    /// A tensor's data lies (partly) outside the data section.
    #[error("{}: tensor '{name}': data range [{start}, {end}) is outside the data section of {len} bytes", path.display())]
    OffsetOutOfRange {
        path: PathBuf,
        name: String,
        start: u64,
        end: u64,
        len: u64,
    },
    /// Two tensors share bytes.
    #[error("{}: tensors '{first}' and '{second}' overlap in the data section", path.display())]
    OverlappingTensors {
        path: PathBuf,
        first: String,
        second: String,
    },
    /// The data section has bytes that no tensor owns (safetensors forbids holes).
    #[error("{}: data section is not contiguous: {msg}", path.display())]
    NonContiguous { path: PathBuf, msg: String },
    /// A sharded checkpoint's index names a shard file that does not exist.
    #[error("{}: shard '{shard}' (holding tensor '{tensor}') is missing", index.display())]
    MissingShard {
        index: PathBuf,
        shard: String,
        tensor: String,
    },
    /// A tensor was asked for that the checkpoint does not have.
    #[error("{}: no tensor named '{name}'", path.display())]
    TensorNotFound { path: PathBuf, name: String },
    /// Data of the wrong shape was given for a tensor.
    #[error("{}: tensor '{name}': expected shape {expected:?}, got {actual:?}", path.display())]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    /// An integer tensor holds a value that f32 cannot represent exactly,
    /// or a value to be written is not an integer in the target type's range.
    #[error("{}: tensor '{name}': value {value} cannot be converted to {dtype} exactly", path.display())]
    InexactConversion {
        path: PathBuf,
        name: String,
        value: String,
        dtype: String,
    },
    /// The file does not start with the format's magic bytes.
    #[error("{}: not a {format} file (bad magic)", path.display())]
    BadMagic { path: PathBuf, format: &'static str },
    /// A format version this crate does not read.
    #[error("{}: unsupported {format} version {version}", path.display())]
    UnsupportedVersion {
        path: PathBuf,
        format: &'static str,
        version: u32,
    },
    /// A writer was misused (tensor written twice, missing at finish, ...).
    #[error("{}: {msg}", path.display())]
    Writer { path: PathBuf, msg: String },
    /// A model configuration is missing a field or inconsistent.
    #[error("model config: {0}")]
    Config(String),
    /// A tensor of an in-memory state dict is missing, misshapen or not
    /// finite ([`crate::tensor::Scope`]), named by its full path.
    #[error("weight '{name}': {msg}")]
    Tensor { name: String, msg: String },
    /// The path is not a checkpoint this crate recognises.
    #[error("{}: {msg}", path.display())]
    UnknownFormat { path: PathBuf, msg: String },
}

impl WeightsError {
    /// An I/O error on `path` (for crates that read and write next to checkpoints).
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        WeightsError::Io {
            path: path.into(),
            source,
        }
    }
}
