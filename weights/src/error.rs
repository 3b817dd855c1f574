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
        /// The file or folder the operation was on.
        path: PathBuf,
        /// The underlying operating-system error.
        #[source]
        source: std::io::Error,
    },
    /// The file ends before a structure it announces.
    #[error("{}: file is truncated: {what}", path.display())]
    Truncated {
        /// The truncated file.
        path: PathBuf,
        /// What was being read and how many bytes it lacked.
        what: String,
    },
    /// The safetensors header length points past the end of the file.
    #[error("{}: header length {header_len} exceeds the {available} bytes after the length prefix", path.display())]
    HeaderTooLong {
        /// The safetensors file.
        path: PathBuf,
        /// The header length the 8-byte prefix announces, in bytes.
        header_len: u64,
        /// The bytes the file holds after the prefix.
        available: u64,
    },
    /// The header (JSON of safetensors, an index file, GGUF key/values) is malformed.
    #[error("{}: invalid header: {msg}", path.display())]
    InvalidHeader {
        /// The file whose header is malformed.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// A tensor name occurs twice in one file or index.
    #[error("{}: tensor '{name}' is listed more than once", path.display())]
    DuplicateTensor {
        /// The file, or the output folder of a sharded writer's plan.
        path: PathBuf,
        /// The repeated tensor name.
        name: String,
    },
    /// A safetensors dtype string this crate does not know.
    #[error("{}: tensor '{name}': unknown dtype '{dtype}'", path.display())]
    UnknownDtype {
        /// The safetensors file.
        path: PathBuf,
        /// The tensor whose header entry has the dtype.
        name: String,
        /// The dtype string as written in the header.
        dtype: String,
    },
    /// A GGUF/GGML tensor type number this crate does not know.
    #[error("{}: tensor '{name}': unknown GGML tensor type {ggml_type}", path.display())]
    UnknownGgmlType {
        /// The GGUF file.
        path: PathBuf,
        /// The tensor's name as stored in the file.
        name: String,
        /// The unknown GGML type number.
        ggml_type: u32,
    },
    /// A known storage type that cannot be decoded (or encoded) here.
    #[error("{}: tensor '{name}': dtype {dtype} is not supported for {op}", path.display())]
    UnsupportedDtype {
        /// The file read or written.
        path: PathBuf,
        /// The tensor of that type.
        name: String,
        /// The storage type's name (`Q4_0`, `Q6_K`, ...).
        dtype: String,
        /// The operation that cannot handle it, e.g. `"safetensors output"`.
        op: &'static str,
    },
    /// The bytes a tensor occupies disagree with its dtype and shape.
    #[error("{}: tensor '{name}': shape {shape:?} of dtype {dtype} needs {expected} bytes but its data spans {actual}", path.display())]
    ByteCountMismatch {
        /// The file read or written.
        path: PathBuf,
        /// The tensor concerned.
        name: String,
        /// The tensor's storage type.
        dtype: String,
        /// The tensor's shape.
        shape: Vec<usize>,
        /// The bytes that `dtype` and `shape` need;
        /// `u64::MAX` when the size overflows.
        expected: u64,
        /// The bytes the tensor's data actually spans (or were given).
        actual: u64,
    },
    /// A tensor's data lies (partly) outside the data section.
    #[error("{}: tensor '{name}': data range [{start}, {end}) is outside the data section of {len} bytes", path.display())]
    OffsetOutOfRange {
        /// The file.
        path: PathBuf,
        /// The tensor whose range is bad.
        name: String,
        /// Start of the tensor's data, in bytes from the start of the data section.
        start: u64,
        /// End (exclusive) of the tensor's data, in bytes from the start of the data section.
        end: u64,
        /// Length of the data section in bytes.
        len: u64,
    },
    /// Two tensors share bytes.
    #[error("{}: tensors '{first}' and '{second}' overlap in the data section", path.display())]
    OverlappingTensors {
        /// The file.
        path: PathBuf,
        /// The tensor whose data starts first.
        first: String,
        /// The tensor whose data starts inside `first`'s.
        second: String,
    },
    /// The data section has bytes that no tensor owns (safetensors forbids holes).
    #[error("{}: data section is not contiguous: {msg}", path.display())]
    NonContiguous {
        /// The safetensors file.
        path: PathBuf,
        /// Where the gap is.
        msg: String,
    },
    /// A sharded checkpoint's index names a shard file that does not exist.
    #[error("{}: shard '{shard}' (holding tensor '{tensor}') is missing", index.display())]
    MissingShard {
        /// The index file (`model.safetensors.index.json`).
        index: PathBuf,
        /// The shard file name as the index writes it.
        shard: String,
        /// A tensor the index places in that shard.
        tensor: String,
    },
    /// A tensor was asked for that the checkpoint does not have.
    #[error("{}: no tensor named '{name}'", path.display())]
    TensorNotFound {
        /// The file or index searched (`<state dict>` for an in-memory [`crate::StateDict`]).
        path: PathBuf,
        /// The requested tensor name.
        name: String,
    },
    /// Data of the wrong shape was given for a tensor.
    #[error("{}: tensor '{name}': expected shape {expected:?}, got {actual:?}", path.display())]
    ShapeMismatch {
        /// The file being written.
        path: PathBuf,
        /// The tensor concerned.
        name: String,
        /// The shape the tensor was planned with.
        expected: Vec<usize>,
        /// The shape of the data given.
        actual: Vec<usize>,
    },
    /// An integer tensor holds a value that f32 cannot represent exactly,
    /// or a value to be written is not an integer in the target type's range.
    #[error("{}: tensor '{name}': value {value} cannot be converted to {dtype} exactly", path.display())]
    InexactConversion {
        /// The file read or written.
        path: PathBuf,
        /// The tensor holding the value.
        name: String,
        /// The offending value, as text.
        value: String,
        /// The tensor's storage type, read from or written to.
        dtype: String,
    },
    /// The file does not start with the format's magic bytes.
    #[error("{}: not a {format} file (bad magic)", path.display())]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// The format expected, e.g. `"GGUF"`.
        format: &'static str,
    },
    /// A format version this crate does not read.
    #[error("{}: unsupported {format} version {version}", path.display())]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The format, e.g. `"GGUF"`.
        format: &'static str,
        /// The version number the file declares.
        version: u32,
    },
    /// A writer was misused (tensor written twice, missing at finish, ...).
    #[error("{}: {msg}", path.display())]
    Writer {
        /// The output file, or the output folder of a sharded writer.
        path: PathBuf,
        /// What was done wrong.
        msg: String,
    },
    /// A model configuration is missing a field or inconsistent.
    #[error("model config: {0}")]
    Config(String),
    /// A tensor of an in-memory state dict is missing, misshapen or not
    /// finite ([`crate::tensor::Scope`]), named by its full path.
    #[error("weight '{name}': {msg}")]
    Tensor {
        /// The tensor's full name in the state dict.
        name: String,
        /// What is wrong with it.
        msg: String,
    },
    /// The path is not a checkpoint this crate recognises.
    #[error("{}: {msg}", path.display())]
    UnknownFormat {
        /// The path given.
        path: PathBuf,
        /// Why it was not recognised.
        msg: String,
    },
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
