//! Reading GGUF files (llama.cpp's format, versions 2 and 3).
//!
//! Layout: magic `GGUF`, `u32` version, `u64` tensor count, `u64` key/value
//! count; the key/values (`u64`-length strings, a `u32` type tag, the value);
//! the tensor infos (name, `u32` number of dims, `u64` dims innermost first,
//! `u32` GGML type, `u64` offset into the data section); padding to
//! `general.alignment` (default 32); the data section.
//!
//! Tensors of type F32, F16, BF16, F64, I8–I64, Q4_0, Q4_1 and Q8_0 are
//! dequantised to `f32` (the block formulas are in the private `quant` module). Shapes
//! are reported outermost first, as PyTorch does (GGUF's `[ne0, ne1]` becomes
//! `[ne1, ne0]`, i.e. `weight` is `[out, in]`).
//!
//! For `general.architecture = "llama"` the tensor names are mapped to Hugging
//! Face names ([`hf_name`]) and the rows of `attn_q`/`attn_k` are put back from
//! llama.cpp's interleaved RoPE order into Hugging Face's rotate-half order
//! ([`unpermute_rope_rows`]), so that the loaded state dict equals the one the
//! model was converted from. Other architectures keep their GGUF names.

use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use memmap2::Mmap;

use crate::dtype::DType;
use crate::error::{Result, WeightsError};
use crate::llama::names;
use crate::safetensors_io::{decode_tensor, map_file};
use crate::tensor::{Tensor, TensorInfo, TensorSource};

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// Type tag 0: unsigned 8-bit integer.
    U8(u8),
    /// Type tag 1: signed 8-bit integer.
    I8(i8),
    /// Type tag 2: unsigned 16-bit integer.
    U16(u16),
    /// Type tag 3: signed 16-bit integer.
    I16(i16),
    /// Type tag 4: unsigned 32-bit integer.
    U32(u32),
    /// Type tag 5: signed 32-bit integer.
    I32(i32),
    /// Type tag 10: unsigned 64-bit integer.
    U64(u64),
    /// Type tag 11: signed 64-bit integer.
    I64(i64),
    /// Type tag 6: 32-bit float.
    F32(f32),
    /// Type tag 12: 64-bit float.
    F64(f64),
    /// Type tag 7: one byte, nonzero is `true`.
    Bool(bool),
    /// Type tag 8: UTF-8 string with a `u64` byte length.
    String(String),
    /// Type tag 9: `u32` element type, `u64` count, then the elements, all of
    /// that one type (arrays of arrays are rejected).
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// The value as a non-negative integer, if it is one.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v as u64),
            GgufValue::U16(v) => Some(v as u64),
            GgufValue::U32(v) => Some(v as u64),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v as f64),
            GgufValue::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// The value as a string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as an array, if it is one.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }

    fn scalar_string(&self) -> Option<String> {
        Some(match self {
            GgufValue::String(s) => s.clone(),
            GgufValue::Bool(b) => b.to_string(),
            GgufValue::F32(v) => v.to_string(),
            GgufValue::F64(v) => v.to_string(),
            GgufValue::Array(_) => return None,
            other => other
                .as_u64()
                .map(|v| v.to_string())
                .unwrap_or_else(|| format!("{other:?}")),
        })
    }
}

/// The model hyper-parameters a GGUF file records (`{arch}.block_count`, ...).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GgufModelConfig {
    /// `general.architecture`, e.g. `llama`.
    pub architecture: String,
    /// Number of transformer blocks.
    pub block_count: Option<usize>,
    /// Hidden size.
    pub embedding_length: Option<usize>,
    /// FFN inner size.
    pub feed_forward_length: Option<usize>,
    /// Attention heads.
    pub head_count: Option<usize>,
    /// Key/value heads (grouped-query attention); equals `head_count` when absent.
    pub head_count_kv: Option<usize>,
    /// Training context length.
    pub context_length: Option<usize>,
    /// RoPE base θ.
    pub rope_freq_base: Option<f64>,
    /// RMSNorm ε.
    pub rms_norm_eps: Option<f64>,
    /// Vocabulary size (`{arch}.vocab_size`, else the length of `tokenizer.ggml.tokens`).
    pub vocab_size: Option<usize>,
    /// Beginning-of-sequence token id.
    pub bos_token_id: Option<u64>,
    /// End-of-sequence token id.
    pub eos_token_id: Option<u64>,
    /// True when the file has no separate output (LM head) matrix.
    pub tie_word_embeddings: bool,
}

impl GgufModelConfig {
    /// The model description of a `llama` file ([`crate::LlamaConfig`], the one
    /// every crate uses), with GGUF's defaults (RMSNorm ε 1e-5, RoPE θ 10⁴);
    /// `None` for another architecture or a header missing a size.
    pub fn to_llama(&self) -> Option<crate::LlamaConfig> {
        if self.architecture != "llama" {
            return None;
        }
        let heads = self.head_count?;
        let hidden = self.embedding_length?;
        Some(crate::LlamaConfig {
            vocab_size: self.vocab_size?,
            hidden_size: hidden,
            intermediate_size: self.feed_forward_length?,
            num_hidden_layers: self.block_count?,
            num_attention_heads: heads,
            num_key_value_heads: self.head_count_kv.unwrap_or(heads),
            head_dim: hidden / heads.max(1),
            rope_theta: self.rope_freq_base.unwrap_or(10000.0),
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-5),
            tie_word_embeddings: self.tie_word_embeddings,
            max_position_embeddings: self.context_length,
            moe: None,
        })
    }

    /// A Hugging Face `config.json` for a `llama` model: [`LlamaConfig::to_hf`](crate::LlamaConfig::to_hf)
    /// of [`GgufModelConfig::to_llama`], with the file's BOS/EOS ids and the
    /// f32 dtype the converter writes.
    pub fn to_hf_config(&self) -> Option<serde_json::Value> {
        let mut v = self.to_llama()?.to_hf();
        v["bos_token_id"] = serde_json::json!(self.bos_token_id);
        v["eos_token_id"] = serde_json::json!(self.eos_token_id);
        v["torch_dtype"] = serde_json::json!("float32");
        Some(v)
    }
}

/// GGML type number → (name, storage type if this crate decodes it).
fn ggml_type(t: u32) -> Option<(&'static str, Option<DType>)> {
    Some(match t {
        0 => ("F32", Some(DType::F32)),
        1 => ("F16", Some(DType::F16)),
        2 => ("Q4_0", Some(DType::Q4_0)),
        3 => ("Q4_1", Some(DType::Q4_1)),
        6 => ("Q5_0", None),
        7 => ("Q5_1", None),
        8 => ("Q8_0", Some(DType::Q8_0)),
        9 => ("Q8_1", None),
        10 => ("Q2_K", None),
        11 => ("Q3_K", None),
        12 => ("Q4_K", None),
        13 => ("Q5_K", None),
        14 => ("Q6_K", None),
        15 => ("Q8_K", None),
        16 => ("IQ2_XXS", None),
        17 => ("IQ2_XS", None),
        18 => ("IQ3_XXS", None),
        19 => ("IQ1_S", None),
        20 => ("IQ4_NL", None),
        21 => ("IQ3_S", None),
        22 => ("IQ2_S", None),
        23 => ("IQ4_XS", None),
        24 => ("I8", Some(DType::I8)),
        25 => ("I16", Some(DType::I16)),
        26 => ("I32", Some(DType::I32)),
        27 => ("I64", Some(DType::I64)),
        28 => ("F64", Some(DType::F64)),
        29 => ("IQ1_M", None),
        30 => ("BF16", Some(DType::BF16)),
        34 => ("TQ1_0", None),
        35 => ("TQ2_0", None),
        39 => ("MXFP4", None),
        40 => ("NVFP4", None),
        41 => ("Q1_0", None),
        _ => return None,
    })
}

/// The GGML type number of a storage type (for writers and tests).
pub fn ggml_type_of(dtype: DType) -> Option<u32> {
    (0..42).find(|&t| matches!(ggml_type(t), Some((_, Some(d))) if d == dtype))
}

/// Maps a llama.cpp tensor name of the `llama` architecture to its Hugging
/// Face name (`blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight`).
/// Returns `None` for names without a Hugging Face counterpart.
pub fn hf_name(gguf_name: &str) -> Option<String> {
    let top = match gguf_name {
        "token_embd.weight" => Some(names::EMBED),
        "output_norm.weight" => Some(names::NORM),
        "output.weight" => Some(names::LM_HEAD),
        _ => None,
    };
    if let Some(t) = top {
        return Some(t.to_string());
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, param) = rest.rsplit_once('.')?;
    let hf = match module {
        "attn_norm" => names::INPUT_NORM,
        "ffn_norm" => names::POST_ATTENTION_NORM,
        "attn_q" => names::Q_PROJ,
        "attn_k" => names::K_PROJ,
        "attn_v" => names::V_PROJ,
        "attn_output" => names::O_PROJ,
        "ffn_gate" => names::GATE_PROJ,
        "ffn_up" => names::UP_PROJ,
        "ffn_down" => names::DOWN_PROJ,
        _ => return None,
    };
    Some(format!("{}.{hf}.{param}", names::layer(layer)))
}

/// Undoes llama.cpp's RoPE row permutation of a q or k projection.
///
/// `convert_hf_to_gguf.py` reshapes the `[n_head·d, …]` rows to
/// `(n_head, 2, d/2)`, swaps the last two axes and flattens, so GGUF row
/// `h·d + 2i + j` holds Hugging Face row `h·d + j·d/2 + i` (i < d/2, j ∈ {0,1}).
/// This puts every row back. `data` is row-major with `data.len() / rows`
/// columns; `rows` must be a multiple of `2·n_head`.
pub fn unpermute_rope_rows(data: &[f32], rows: usize, n_head: usize) -> Option<Vec<f32>> {
    if n_head == 0
        || !rows.is_multiple_of(n_head)
        || !(rows / n_head).is_multiple_of(2)
        || rows == 0
        || !data.len().is_multiple_of(rows)
    {
        return None;
    }
    let cols = data.len() / rows;
    let d = rows / n_head;
    let mut out = vec![0.0; data.len()];
    for h in 0..n_head {
        for i in 0..d / 2 {
            for j in 0..2 {
                let src = h * d + 2 * i + j;
                let dst = h * d + j * (d / 2) + i;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    Some(out)
}

#[derive(Debug, Clone)]
struct Entry {
    info: TensorInfo,
    gguf_name: String,
    start: usize,
    len: usize,
    /// Heads whose rows to un-permute (q/k of a llama model).
    rope_heads: Option<usize>,
}

/// A memory-mapped GGUF file whose tensors are dequantised on demand.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    mmap: Option<Mmap>,
    version: u32,
    alignment: u64,
    kv: IndexMap<String, GgufValue>,
    strings: IndexMap<String, String>,
    entries: IndexMap<String, Entry>,
    config: GgufModelConfig,
}

struct Cursor<'a> {
    path: &'a Path,
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        let left = (self.b.len() - self.pos) as u64;
        if n > left {
            return Err(WeightsError::Truncated {
                path: self.path.to_path_buf(),
                what: format!(
                    "{} needs {n} bytes at offset {} but only {left} remain",
                    what(),
                    self.pos
                ),
            });
        }
        let s = &self.b[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }
    fn u8(&mut self, what: &dyn Fn() -> String) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &dyn Fn() -> String) -> Result<u16> {
        Ok(u16::from_le_bytes(
            self.take(2, what)?.try_into().expect("2"),
        ))
    }
    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().expect("4"),
        ))
    }
    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().expect("8"),
        ))
    }
    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let n = self.u64(what)?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| WeightsError::InvalidHeader {
            path: self.path.to_path_buf(),
            msg: format!("{} is not valid UTF-8", what()),
        })
    }
    fn value(&mut self, ty: u32, what: &dyn Fn() -> String, depth: usize) -> Result<GgufValue> {
        Ok(match ty {
            0 => GgufValue::U8(self.u8(what)?),
            1 => GgufValue::I8(self.u8(what)? as i8),
            2 => GgufValue::U16(self.u16(what)?),
            3 => GgufValue::I16(self.u16(what)? as i16),
            4 => GgufValue::U32(self.u32(what)?),
            5 => GgufValue::I32(self.u32(what)? as i32),
            6 => GgufValue::F32(f32::from_bits(self.u32(what)?)),
            7 => GgufValue::Bool(self.u8(what)? != 0),
            8 => GgufValue::String(self.string(what)?),
            9 if depth == 0 => {
                let elem = self.u32(what)?;
                let n = self.u64(what)?;
                // Every element takes at least one byte: refuse counts the file cannot hold.
                if n > (self.b.len() - self.pos) as u64 {
                    return Err(WeightsError::Truncated {
                        path: self.path.to_path_buf(),
                        what: format!("{} announces {n} array elements", what()),
                    });
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(elem, what, depth + 1)?);
                }
                GgufValue::Array(v)
            }
            10 => GgufValue::U64(self.u64(what)?),
            11 => GgufValue::I64(self.u64(what)? as i64),
            12 => GgufValue::F64(f64::from_bits(self.u64(what)?)),
            _ => {
                return Err(WeightsError::InvalidHeader {
                    path: self.path.to_path_buf(),
                    msg: format!("{} has unknown value type {ty}", what()),
                });
            }
        })
    }
}

const GGUF_MAGIC: &[u8; 4] = b"GGUF";

impl GgufFile {
    /// Opens and validates a GGUF file. No tensor data is read.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let (_file, mmap) = map_file(&path)?;
        let bytes: &[u8] = mmap.as_deref().unwrap_or(&[]);
        let parsed = parse(&path, bytes)?;
        Ok(GgufFile { mmap, ..parsed })
    }

    /// The format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The data alignment (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Every metadata key/value, in file order.
    pub fn kv(&self) -> &IndexMap<String, GgufValue> {
        &self.kv
    }

    /// The typed model configuration.
    pub fn config(&self) -> &GgufModelConfig {
        &self.config
    }

    /// The original GGUF name of a tensor known by its (mapped) name.
    pub fn gguf_name(&self, name: &str) -> Option<&str> {
        self.entries.get(name).map(|e| e.gguf_name.as_str())
    }

    /// The stored bytes of a tensor.
    pub fn raw(&self, name: &str) -> Result<&[u8]> {
        let e = self.entry(name)?;
        Ok(&self.mmap.as_deref().unwrap_or(&[])[e.start..e.start + e.len])
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries
            .get(name)
            .ok_or_else(|| WeightsError::TensorNotFound {
                path: self.path.clone(),
                name: name.to_string(),
            })
    }
}

impl TensorSource for GgufFile {
    fn path(&self) -> &Path {
        &self.path
    }
    fn infos(&self) -> Vec<TensorInfo> {
        self.entries.values().map(|e| e.info.clone()).collect()
    }
    fn info(&self, name: &str) -> Option<TensorInfo> {
        self.entries.get(name).map(|e| e.info.clone())
    }
    fn load(&self, name: &str) -> Result<Tensor> {
        let e = self.entry(name)?;
        let mut t = decode_tensor(&self.path, &e.info, self.raw(name)?)?;
        if let Some(heads) = e.rope_heads {
            let rows = e.info.shape[0];
            let flat = t.data.as_slice().expect("fresh array is contiguous");
            let fixed = unpermute_rope_rows(flat, rows, heads).expect("checked at open");
            t.data = ndarray::ArrayD::from_shape_vec(t.data.raw_dim(), fixed).expect("same length");
        }
        Ok(t)
    }
    fn metadata(&self) -> &IndexMap<String, String> {
        &self.strings
    }
}

fn parse(path: &Path, bytes: &[u8]) -> Result<GgufFile> {
    let p = || path.to_path_buf();
    let invalid = |msg: String| WeightsError::InvalidHeader { path: p(), msg };
    let mut c = Cursor {
        path,
        b: bytes,
        pos: 0,
    };
    let magic = c.take(4, &|| "magic".into())?;
    if magic != GGUF_MAGIC {
        return Err(WeightsError::BadMagic {
            path: p(),
            format: "GGUF",
        });
    }
    let version = c.u32(&|| "version".into())?;
    if version != 2 && version != 3 {
        return Err(WeightsError::UnsupportedVersion {
            path: p(),
            format: "GGUF",
            version,
        });
    }
    let n_tensors = c.u64(&|| "tensor count".into())?;
    let n_kv = c.u64(&|| "key/value count".into())?;
    let mut kv = IndexMap::new();
    for i in 0..n_kv {
        let key = c.string(&|| format!("key #{i}"))?;
        let what = || format!("value of '{key}'");
        let ty = c.u32(&what)?;
        let value = c.value(ty, &what, 0)?;
        if kv.insert(key.clone(), value).is_some() {
            return Err(invalid(format!("metadata key '{key}' appears twice")));
        }
    }
    let alignment = match kv.get("general.alignment") {
        None => 32,
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() => a,
            _ => {
                return Err(invalid(format!(
                    "general.alignment {v:?} is not a power of two"
                )));
            }
        },
    };
    let arch = kv
        .get("general.architecture")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_string();
    let get = |k: &str| kv.get(&format!("{arch}.{k}"));
    let get_usize = |k: &str| get(k).and_then(|v| v.as_u64()).map(|v| v as usize);
    let mut config = GgufModelConfig {
        architecture: arch.clone(),
        block_count: get_usize("block_count"),
        embedding_length: get_usize("embedding_length"),
        feed_forward_length: get_usize("feed_forward_length"),
        head_count: get_usize("attention.head_count"),
        head_count_kv: get_usize("attention.head_count_kv"),
        context_length: get_usize("context_length"),
        rope_freq_base: get("rope.freq_base").and_then(|v| v.as_f64()),
        rms_norm_eps: get("attention.layer_norm_rms_epsilon").and_then(|v| v.as_f64()),
        vocab_size: get_usize("vocab_size").or_else(|| {
            kv.get("tokenizer.ggml.tokens")
                .and_then(|v| v.as_array())
                .map(|a| a.len())
        }),
        bos_token_id: kv
            .get("tokenizer.ggml.bos_token_id")
            .and_then(|v| v.as_u64()),
        eos_token_id: kv
            .get("tokenizer.ggml.eos_token_id")
            .and_then(|v| v.as_u64()),
        tie_word_embeddings: false,
    };
    let is_llama = arch == "llama";

    let mut entries: IndexMap<String, Entry> = IndexMap::new();
    let mut raw_ranges: Vec<(u64, u64, String)> = Vec::new();
    let mut seen_gguf = std::collections::HashSet::new();
    for i in 0..n_tensors {
        let name = c.string(&|| format!("name of tensor #{i}"))?;
        let what = || format!("info of tensor '{name}'");
        let n_dims = c.u32(&what)?;
        if n_dims == 0 || n_dims > 4 {
            return Err(invalid(format!(
                "tensor '{name}' has {n_dims} dimensions (1 to 4 allowed)"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(c.u64(&what)?);
        }
        let ty = c.u32(&what)?;
        let offset = c.u64(&what)?;
        if !seen_gguf.insert(name.clone()) {
            return Err(WeightsError::DuplicateTensor { path: p(), name });
        }
        let (type_name, dtype) = ggml_type(ty).ok_or_else(|| WeightsError::UnknownGgmlType {
            path: p(),
            name: name.clone(),
            ggml_type: ty,
        })?;
        let dtype = dtype.ok_or_else(|| WeightsError::UnsupportedDtype {
            path: p(),
            name: name.clone(),
            dtype: type_name.to_string(),
            op: "reading (supported: F32, F16, BF16, F64, I8-I64, Q4_0, Q4_1, Q8_0)",
        })?;
        let shape: Vec<usize> = dims.iter().rev().map(|&d| d as usize).collect();
        let numel = dims
            .iter()
            .try_fold(1u128, |a, &d| a.checked_mul(d as u128));
        let (per, _) = dtype.block();
        if dims[0] % per as u64 != 0 {
            return Err(invalid(format!(
                "tensor '{name}': row length {} is not a multiple of the {type_name} block size {per}",
                dims[0]
            )));
        }
        let nbytes = numel
            .and_then(|n| dtype.bytes_for(n))
            .filter(|&n| n <= bytes.len() as u128)
            .ok_or_else(|| WeightsError::Truncated {
                path: p(),
                what: format!(
                    "tensor '{name}' of shape {shape:?} ({type_name}) is larger than the file"
                ),
            })?;
        if offset % alignment != 0 {
            return Err(invalid(format!(
                "tensor '{name}' offset {offset} is not a multiple of the alignment {alignment}"
            )));
        }
        let hf = if is_llama { hf_name(&name) } else { None };
        let module = name.rsplit_once('.').map(|(m, _)| m).unwrap_or("");
        let rope_heads = if is_llama && module.ends_with("attn_q") {
            Some(
                config
                    .head_count
                    .ok_or_else(|| invalid("llama model without attention.head_count".into()))?,
            )
        } else if is_llama && module.ends_with("attn_k") {
            Some(
                config
                    .head_count_kv
                    .or(config.head_count)
                    .ok_or_else(|| invalid("llama model without attention.head_count".into()))?,
            )
        } else {
            None
        };
        if let Some(h) = rope_heads {
            let rows = shape[0];
            if h == 0 || !rows.is_multiple_of(h) || !(rows / h).is_multiple_of(2) {
                return Err(invalid(format!(
                    "tensor '{name}': {rows} rows cannot be split into {h} heads of even size"
                )));
            }
        }
        let key = hf.unwrap_or_else(|| name.clone());
        raw_ranges.push((offset, offset + nbytes as u64, name.clone()));
        let entry = Entry {
            info: TensorInfo {
                name: key.clone(),
                dtype,
                shape,
            },
            gguf_name: name,
            start: offset as usize,
            len: nbytes as usize,
            rope_heads,
        };
        if entries.insert(key.clone(), entry).is_some() {
            return Err(WeightsError::DuplicateTensor {
                path: p(),
                name: key,
            });
        }
    }
    config.tie_word_embeddings = !entries.values().any(|e| e.gguf_name == "output.weight");
    let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
    let data_len = (bytes.len() as u64).saturating_sub(data_start);
    if data_start > bytes.len() as u64 && n_tensors > 0 {
        return Err(WeightsError::Truncated {
            path: p(),
            what: format!("data section would start at {data_start}, past the end of the file"),
        });
    }
    for (start, end, name) in &raw_ranges {
        if *end > data_len {
            return Err(WeightsError::OffsetOutOfRange {
                path: p(),
                name: name.clone(),
                start: *start,
                end: *end,
                len: data_len,
            });
        }
    }
    raw_ranges.sort();
    for w in raw_ranges.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(WeightsError::OverlappingTensors {
                path: p(),
                first: w[0].2.clone(),
                second: w[1].2.clone(),
            });
        }
    }
    for e in entries.values_mut() {
        e.start += data_start as usize;
    }
    let strings = kv
        .iter()
        .filter_map(|(k, v)| v.scalar_string().map(|s| (k.clone(), s)))
        .collect();
    Ok(GgufFile {
        path: p(),
        mmap: None,
        version,
        alignment,
        kv,
        strings,
        entries,
        config,
    })
}
