//! Helpers shared by the integration tests of the `weights` crate.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use ndarray::{ArrayD, IxDyn};

/// The committed fixtures folder.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A fetched model file (see [`weights::testing`]): tests calling this are
/// `#[ignore]`d and fail when it is absent.
pub fn model(rel: &str) -> PathBuf {
    weights::testing::fetched_model(rel)
}

/// Deterministic pseudo-random values in [-1, 1).
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 23) as f32) - 1.0
        })
        .collect()
}

pub fn array(shape: &[usize], seed: u64) -> ArrayD<f32> {
    let n = shape.iter().product();
    ArrayD::from_shape_vec(IxDyn(shape), values(n, seed)).unwrap()
}

/// Builds safetensors bytes from a header JSON string and a data section.
pub fn safetensors_bytes(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// A minimal GGUF writer for tests (little-endian, versions 2/3).
pub struct GgufBuilder {
    pub version: u32,
    pub alignment: u64,
    kv: Vec<u8>,
    n_kv: u64,
    tensors: Vec<PlannedTensor>,
}

/// (name, GGUF dims, GGML type, bytes, forced offset)
type PlannedTensor = (String, Vec<u64>, u32, Vec<u8>, Option<u64>);

fn gguf_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

impl Default for GgufBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufBuilder {
    pub fn new() -> Self {
        GgufBuilder {
            version: 3,
            alignment: 32,
            kv: Vec::new(),
            n_kv: 0,
            tensors: Vec::new(),
        }
    }

    pub fn kv_u32(&mut self, key: &str, v: u32) -> &mut Self {
        gguf_string(&mut self.kv, key);
        self.kv.extend_from_slice(&4u32.to_le_bytes());
        self.kv.extend_from_slice(&v.to_le_bytes());
        self.n_kv += 1;
        self
    }

    pub fn kv_f32(&mut self, key: &str, v: f32) -> &mut Self {
        gguf_string(&mut self.kv, key);
        self.kv.extend_from_slice(&6u32.to_le_bytes());
        self.kv.extend_from_slice(&v.to_le_bytes());
        self.n_kv += 1;
        self
    }

    pub fn kv_str(&mut self, key: &str, v: &str) -> &mut Self {
        gguf_string(&mut self.kv, key);
        self.kv.extend_from_slice(&8u32.to_le_bytes());
        gguf_string(&mut self.kv, v);
        self.n_kv += 1;
        self
    }

    pub fn kv_str_array(&mut self, key: &str, v: &[&str]) -> &mut Self {
        gguf_string(&mut self.kv, key);
        self.kv.extend_from_slice(&9u32.to_le_bytes());
        self.kv.extend_from_slice(&8u32.to_le_bytes());
        self.kv.extend_from_slice(&(v.len() as u64).to_le_bytes());
        for s in v {
            gguf_string(&mut self.kv, s);
        }
        self.n_kv += 1;
        self
    }

    /// A tensor with GGUF dims (innermost first), GGML type and raw bytes.
    pub fn tensor(
        &mut self,
        name: &str,
        dims: &[u64],
        ggml_type: u32,
        bytes: Vec<u8>,
    ) -> &mut Self {
        self.tensors
            .push((name.into(), dims.to_vec(), ggml_type, bytes, None));
        self
    }

    /// Like [`GgufBuilder::tensor`] but with a forced data offset.
    pub fn tensor_at(
        &mut self,
        name: &str,
        dims: &[u64],
        ggml_type: u32,
        bytes: Vec<u8>,
        offset: u64,
    ) -> &mut Self {
        self.tensors
            .push((name.into(), dims.to_vec(), ggml_type, bytes, Some(offset)));
        self
    }

    pub fn f32_tensor(&mut self, name: &str, dims: &[u64], v: &[f32]) -> &mut Self {
        let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.tensor(name, dims, 0, bytes)
    }

    pub fn build(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.n_kv.to_le_bytes());
        out.extend_from_slice(&self.kv);
        let mut offsets = Vec::new();
        let mut cursor = 0u64;
        for (name, dims, ty, bytes, forced) in &self.tensors {
            let off = forced.unwrap_or(cursor);
            offsets.push(off);
            cursor = (off + bytes.len() as u64).div_ceil(self.alignment) * self.alignment;
            gguf_string(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&off.to_le_bytes());
        }
        let start = (out.len() as u64).div_ceil(self.alignment) * self.alignment;
        out.resize(start as usize, 0);
        for ((_, _, _, bytes, _), off) in self.tensors.iter().zip(offsets) {
            let at = (start + off) as usize;
            if out.len() < at + bytes.len() {
                out.resize(at + bytes.len(), 0);
            }
            out[at..at + bytes.len()].copy_from_slice(bytes);
        }
        out
    }

    pub fn write(&self, path: &Path) {
        std::fs::write(path, self.build()).unwrap();
    }
}
