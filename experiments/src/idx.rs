//! Reader for the idx format of MNIST-style data sets (optionally gzipped).
//!
//! Layout: two zero bytes, a type code (0x08 u8, 0x09 i8, 0x0B i16, 0x0C i32,
//! 0x0D f32, 0x0E f64), the number of dimensions, each dimension as a
//! big-endian `u32`, then the values, big-endian, row-major.

use std::io::Read;
use std::path::{Path, PathBuf};

use ndarray::{ArrayD, IxDyn};

/// Why an idx file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum IdxError {
    /// The file could not be read or decompressed.
    #[error("{path}: {source}")]
    Io {
        /// The idx file.
        path: PathBuf,
        /// The read or gzip-decoding error.
        source: std::io::Error,
    },
    /// Not an idx file: the first two bytes are not zero.
    #[error("{path}: not an idx file (the first two bytes must be zero)")]
    BadMagic {
        /// The file (or the name given to [`parse_idx`]).
        path: PathBuf,
    },
    /// A type code outside 0x08, 0x09, 0x0B–0x0E.
    #[error("{path}: unknown idx type code 0x{code:02x}")]
    UnknownType {
        /// The file (or the name given to [`parse_idx`]).
        path: PathBuf,
        /// The type code found in the header's third byte.
        code: u8,
    },
    /// Fewer (or more) bytes than the header declares.
    #[error("{path}: truncated: {what}")]
    Truncated {
        /// The file (or the name given to [`parse_idx`]).
        path: PathBuf,
        /// How many bytes the header or data needed and how many were found.
        what: String,
    },
}

type Result<T> = std::result::Result<T, IdxError>;

/// An idx array: `u8` data (images, labels) kept as bytes, anything else as `f32`.
#[derive(Debug, Clone, PartialEq)]
pub enum IdxArray {
    /// Type code 0x08.
    U8(ArrayD<u8>),
    /// Every other type code, converted to `f32`.
    F32(ArrayD<f32>),
}

impl IdxArray {
    /// The shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            IdxArray::U8(a) => a.shape(),
            IdxArray::F32(a) => a.shape(),
        }
    }

    /// The array as `u8`, if it is one.
    pub fn into_u8(self) -> Option<ArrayD<u8>> {
        match self {
            IdxArray::U8(a) => Some(a),
            IdxArray::F32(_) => None,
        }
    }
}

/// Reads an idx file; gzip compression is detected from the magic bytes.
pub fn read_idx(path: impl AsRef<Path>) -> Result<IdxArray> {
    let path = path.as_ref();
    let io = |source| IdxError::Io {
        path: path.to_path_buf(),
        source,
    };
    let raw = std::fs::read(path).map_err(io)?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(io)?;
        out
    } else {
        raw
    };
    parse_idx(path, &bytes)
}

/// Parses idx bytes (already decompressed); `path` is used in errors.
pub fn parse_idx(path: &Path, bytes: &[u8]) -> Result<IdxArray> {
    let truncated = |what: String| IdxError::Truncated {
        path: path.to_path_buf(),
        what,
    };
    if bytes.len() < 4 {
        return Err(truncated("idx header needs 4 bytes".into()));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(IdxError::BadMagic {
            path: path.to_path_buf(),
        });
    }
    let code = bytes[2];
    let ndim = bytes[3] as usize;
    let elem = match code {
        0x08 | 0x09 => 1,
        0x0B => 2,
        0x0C | 0x0D => 4,
        0x0E => 8,
        _ => {
            return Err(IdxError::UnknownType {
                path: path.to_path_buf(),
                code,
            });
        }
    };
    let head = 4 + 4 * ndim;
    if bytes.len() < head {
        return Err(truncated(format!(
            "{ndim} dimensions need {head} header bytes"
        )));
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().expect("4")) as usize)
        .collect();
    let n = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let body = &bytes[head..];
    if n.and_then(|n| n.checked_mul(elem)) != Some(body.len()) {
        return Err(truncated(format!(
            "dimensions {dims:?} of {elem}-byte values need {} bytes, found {}",
            n.map(|n| (n as u128 * elem as u128).to_string())
                .unwrap_or("too many".into()),
            body.len()
        )));
    }
    let shape = IxDyn(&dims);
    let f32s: Vec<f32> = match code {
        0x08 => {
            return Ok(IdxArray::U8(
                ArrayD::from_shape_vec(shape, body.to_vec()).expect("checked"),
            ));
        }
        0x09 => body.iter().map(|&b| b as i8 as f32).collect(),
        0x0B => body
            .chunks_exact(2)
            .map(|c| i16::from_be_bytes([c[0], c[1]]) as f32)
            .collect(),
        0x0C => body
            .chunks_exact(4)
            .map(|c| i32::from_be_bytes(c.try_into().expect("4")) as f32)
            .collect(),
        0x0D => body
            .chunks_exact(4)
            .map(|c| f32::from_be_bytes(c.try_into().expect("4")))
            .collect(),
        _ => body
            .chunks_exact(8)
            .map(|c| f64::from_be_bytes(c.try_into().expect("8")) as f32)
            .collect(),
    };
    Ok(IdxArray::F32(
        ArrayD::from_shape_vec(shape, f32s).expect("checked"),
    ))
}

#[cfg(test)]
#[path = "idx_tests.rs"]
mod tests;
