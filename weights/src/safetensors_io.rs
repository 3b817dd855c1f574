//! Reading and writing single safetensors files.
//!
//! Layout (<https://github.com/huggingface/safetensors>): an 8-byte
//! little-endian header length `N`, `N` bytes of JSON mapping each tensor name
//! to `{dtype, shape, data_offsets: [begin, end]}` (plus an optional
//! `__metadata__` string map), then the data section. Offsets are relative to
//! the data section, and the tensors must tile it exactly: no overlaps, no
//! holes, nothing after the last tensor.
//!
//! [`SafetensorsFile`] memory-maps the file, validates the whole header with
//! precise errors (then lets the `safetensors` crate, the reference parser,
//! check it too) and converts a tensor only when asked. [`SafetensorsWriter`]
//! writes a planned set of tensors one at a time, in any order, into a
//! temporary file that is renamed into place only when every tensor has been
//! written.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use memmap2::Mmap;
use ndarray::{ArrayD, ArrayViewD, IxDyn};
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};

use crate::atomic::AtomicFile;
use crate::dtype::{self, ConvertError, DType};
use crate::error::{Result, WeightsError};
use crate::tensor::{StateDict, Tensor, TensorInfo, TensorSource};

/// Largest header accepted (the reference implementation's limit).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Memory-maps `path` read-only. Returns `None` for an empty file.
pub(crate) fn map_file(path: &Path) -> Result<(File, Option<Mmap>)> {
    let file = File::open(path).map_err(|e| WeightsError::io(path, e))?;
    let len = file
        .metadata()
        .map_err(|e| WeightsError::io(path, e))?
        .len();
    if len == 0 {
        return Ok((file, None));
    }
    // SAFETY: the map is read-only. Like every mmap-based reader (safetensors,
    // candle, llama.cpp) we assume no other process truncates the file while
    // it is mapped.
    let mmap = unsafe { Mmap::map(&file) }.map_err(|e| WeightsError::io(path, e))?;
    Ok((file, Some(mmap)))
}

/// Converts stored bytes to a [`Tensor`], naming file and tensor on failure.
pub(crate) fn decode_tensor(path: &Path, info: &TensorInfo, bytes: &[u8]) -> Result<Tensor> {
    let mut values = Vec::new();
    dtype::decode(info.dtype, bytes, &mut values)
        .map_err(|e| convert_error(path, &info.name, info.dtype, e, "reading"))?;
    let data = ArrayD::from_shape_vec(IxDyn(&info.shape), values).map_err(|_| {
        WeightsError::ByteCountMismatch {
            path: path.to_path_buf(),
            name: info.name.clone(),
            dtype: info.dtype.to_string(),
            shape: info.shape.clone(),
            expected: info
                .dtype
                .bytes_for(info.numel() as u128)
                .map_or(u64::MAX, |n| n as u64),
            actual: bytes.len() as u64,
        }
    })?;
    Ok(Tensor::new(data, info.dtype))
}

pub(crate) fn convert_error(
    path: &Path,
    name: &str,
    dtype: DType,
    e: ConvertError,
    op: &'static str,
) -> WeightsError {
    match e {
        ConvertError::Inexact(value) => WeightsError::InexactConversion {
            path: path.to_path_buf(),
            name: name.to_string(),
            value,
            dtype: dtype.to_string(),
        },
        ConvertError::Unsupported => WeightsError::UnsupportedDtype {
            path: path.to_path_buf(),
            name: name.to_string(),
            dtype: dtype.to_string(),
            op,
        },
    }
}

#[derive(Debug, Clone)]
struct Entry {
    info: TensorInfo,
    start: usize,
    end: usize,
}

/// A memory-mapped safetensors file whose tensors are converted on demand.
#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Option<Mmap>,
    data_start: usize,
    entries: IndexMap<String, Entry>,
    metadata: IndexMap<String, String>,
}

/// The JSON object of a header as a list of pairs, keeping duplicates so they
/// can be reported (a plain map would silently keep the last one).
struct Pairs(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for Pairs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Pairs;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Pairs, A::Error> {
                let mut v = Vec::new();
                while let Some(pair) = map.next_entry::<String, serde_json::Value>()? {
                    v.push(pair);
                }
                Ok(Pairs(v))
            }
        }
        d.deserialize_map(V)
    }
}

/// Parses a JSON object into ordered pairs, rejecting duplicate keys.
pub(crate) fn parse_object_no_dups(
    path: &Path,
    text: &[u8],
    what: &str,
) -> Result<Vec<(String, serde_json::Value)>> {
    let Pairs(pairs) = serde_json::from_slice(text).map_err(|e| WeightsError::InvalidHeader {
        path: path.to_path_buf(),
        msg: format!("{what}: {e}"),
    })?;
    let mut seen = std::collections::HashSet::with_capacity(pairs.len());
    for (k, _) in &pairs {
        if !seen.insert(k.as_str()) {
            return Err(WeightsError::DuplicateTensor {
                path: path.to_path_buf(),
                name: k.clone(),
            });
        }
    }
    Ok(pairs)
}

#[derive(serde::Deserialize)]
struct RawInfo {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

impl SafetensorsFile {
    /// Opens and validates `path`. No tensor data is read.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let (_file, mmap) = map_file(&path)?;
        let bytes: &[u8] = mmap.as_deref().unwrap_or(&[]);
        let (entries, metadata, data_start) = parse(&path, bytes)?;
        Ok(SafetensorsFile {
            path,
            mmap,
            data_start,
            entries,
            metadata,
        })
    }

    /// The stored bytes of tensor `name` (no conversion, no copy).
    pub fn raw(&self, name: &str) -> Result<&[u8]> {
        let e = self.entry(name)?;
        let bytes = self.mmap.as_deref().unwrap_or(&[]);
        Ok(&bytes[self.data_start + e.start..self.data_start + e.end])
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

impl TensorSource for SafetensorsFile {
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
        let info = &self.entry(name)?.info;
        decode_tensor(&self.path, info, self.raw(name)?)
    }
    fn metadata(&self) -> &IndexMap<String, String> {
        &self.metadata
    }
    fn release(&self, name: &str) {
        if let Ok(bytes) = self.raw(name) {
            crate::mem::release_pages(bytes);
        }
    }
    fn f32_view(&self, name: &str) -> Option<&[f32]> {
        let e = self.entries.get(name)?;
        if e.info.dtype != DType::F32 || cfg!(target_endian = "big") {
            return None;
        }
        let bytes = self.raw(name).ok()?;
        // SAFETY: every bit pattern is a valid f32; `align_to` hands back
        // only the aligned middle, which is used when it is the whole slice.
        let (head, values, tail) = unsafe { bytes.align_to::<f32>() };
        (head.is_empty() && tail.is_empty()).then_some(values)
    }
}

type Parsed = (IndexMap<String, Entry>, IndexMap<String, String>, usize);

fn parse(path: &Path, bytes: &[u8]) -> Result<Parsed> {
    let p = || path.to_path_buf();
    if bytes.len() < 8 {
        return Err(WeightsError::Truncated {
            path: p(),
            what: format!(
                "{} bytes, shorter than the 8-byte header length",
                bytes.len()
            ),
        });
    }
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    let available = bytes.len() as u64 - 8;
    if header_len > available {
        return Err(WeightsError::HeaderTooLong {
            path: p(),
            header_len,
            available,
        });
    }
    if header_len > MAX_HEADER_BYTES {
        return Err(WeightsError::InvalidHeader {
            path: p(),
            msg: format!("header of {header_len} bytes exceeds the {MAX_HEADER_BYTES}-byte limit"),
        });
    }
    let data_start = 8 + header_len as usize;
    let header = &bytes[8..data_start];
    let data_len = (bytes.len() - data_start) as u64;
    let pairs = parse_object_no_dups(path, header, "header JSON")?;

    let mut metadata = IndexMap::new();
    let mut entries: IndexMap<String, Entry> = IndexMap::with_capacity(pairs.len());
    for (name, value) in pairs {
        if name == "__metadata__" {
            let map: IndexMap<String, String> =
                serde_json::from_value(value).map_err(|e| WeightsError::InvalidHeader {
                    path: p(),
                    msg: format!("__metadata__ must map strings to strings: {e}"),
                })?;
            metadata = map;
            continue;
        }
        let raw: RawInfo =
            serde_json::from_value(value).map_err(|e| WeightsError::InvalidHeader {
                path: p(),
                msg: format!("tensor '{name}': {e}"),
            })?;
        let dtype =
            DType::from_safetensors(&raw.dtype).ok_or_else(|| WeightsError::UnknownDtype {
                path: p(),
                name: name.clone(),
                dtype: raw.dtype.clone(),
            })?;
        let (start, end) = raw.data_offsets;
        if end < start || end > data_len {
            return Err(WeightsError::OffsetOutOfRange {
                path: p(),
                name,
                start,
                end,
                len: data_len,
            });
        }
        let numel = raw
            .shape
            .iter()
            .try_fold(1u128, |acc, &d| acc.checked_mul(d as u128));
        let expected = numel.and_then(|n| dtype.bytes_for(n));
        let actual = (end - start) as u128;
        if expected != Some(actual) {
            return Err(WeightsError::ByteCountMismatch {
                path: p(),
                name,
                dtype: raw.dtype,
                shape: raw.shape,
                expected: expected.map_or(u64::MAX, |n| u64::try_from(n).unwrap_or(u64::MAX)),
                actual: actual as u64,
            });
        }
        let info = TensorInfo {
            name: name.clone(),
            dtype,
            shape: raw.shape,
        };
        entries.insert(
            name,
            Entry {
                info,
                start: start as usize,
                end: end as usize,
            },
        );
    }

    // The tensors must tile the data section: sorted by offset, each starts
    // where the previous ended, and the last ends at the end of the file.
    entries.sort_by(|_, a, _, b| (a.start, a.end).cmp(&(b.start, b.end)));
    let mut cursor = 0usize;
    let mut prev: Option<&str> = None;
    for e in entries.values() {
        if e.start < cursor {
            return Err(WeightsError::OverlappingTensors {
                path: p(),
                first: prev.unwrap_or_default().to_string(),
                second: e.info.name.clone(),
            });
        }
        if e.start > cursor {
            return Err(WeightsError::NonContiguous {
                path: p(),
                msg: format!(
                    "bytes [{cursor}, {}) before tensor '{}' belong to no tensor",
                    e.start, e.info.name
                ),
            });
        }
        cursor = e.end;
        prev = Some(&e.info.name);
    }
    if cursor as u64 != data_len {
        return Err(WeightsError::NonContiguous {
            path: p(),
            msg: format!(
                "{} bytes after the last tensor belong to no tensor",
                data_len - cursor as u64
            ),
        });
    }
    // Second opinion from the reference parser (header start, padding, limits).
    safetensors::SafeTensors::read_metadata(bytes).map_err(|e| WeightsError::InvalidHeader {
        path: p(),
        msg: format!("rejected by the reference safetensors parser: {e}"),
    })?;
    Ok((entries, metadata, data_start))
}

/// The dtype a tensor stored as `stored` is written as: floats take
/// `float_dtype` when given, types safetensors cannot hold (GGML blocks) and
/// FP8 (which this crate does not encode) become F32, integers keep theirs.
pub fn output_dtype(stored: DType, float_dtype: Option<DType>) -> DType {
    match (stored.is_float(), float_dtype) {
        (true, Some(d)) => d,
        (true, None) if matches!(stored, DType::F64 | DType::F32 | DType::F16 | DType::BF16) => {
            stored
        }
        (true, None) => DType::F32,
        (false, _) => stored,
    }
}

struct Slot {
    info: TensorInfo,
    start: u64,
    end: u64,
    written: bool,
}

/// Streams a planned set of tensors into one safetensors file.
///
/// The plan (names, dtypes, shapes) fixes the header up front; tensors may
/// then be written in any order, each exactly once. The file appears at its
/// path only when [`SafetensorsWriter::finish`] succeeds. Tensors are laid out
/// by decreasing element size (stable), as the reference serializer does, so
/// every tensor is aligned to its element size.
pub struct SafetensorsWriter {
    out: AtomicFile,
    data_start: u64,
    slots: IndexMap<String, Slot>,
    buf: Vec<u8>,
}

impl SafetensorsWriter {
    /// Creates the temporary file and writes the header for `plan`.
    pub fn create(
        path: impl AsRef<Path>,
        plan: &[TensorInfo],
        metadata: &IndexMap<String, String>,
    ) -> Result<Self> {
        let path = path.as_ref();
        let mut order: Vec<&TensorInfo> = plan.iter().collect();
        order.sort_by_key(|i| std::cmp::Reverse(i.dtype.block().1));
        let mut slots = IndexMap::with_capacity(plan.len());
        let mut header = serde_json::Map::new();
        if !metadata.is_empty() {
            header.insert(
                "__metadata__".into(),
                serde_json::to_value(metadata).expect("string map"),
            );
        }
        let mut offset = 0u64;
        for info in order {
            if !info.dtype.is_safetensors() {
                return Err(WeightsError::UnsupportedDtype {
                    path: path.to_path_buf(),
                    name: info.name.clone(),
                    dtype: info.dtype.to_string(),
                    op: "safetensors output",
                });
            }
            if info.name == "__metadata__" || slots.contains_key(&info.name) {
                return Err(WeightsError::DuplicateTensor {
                    path: path.to_path_buf(),
                    name: info.name.clone(),
                });
            }
            let n = info
                .dtype
                .bytes_for(info.numel() as u128)
                .expect("plain dtype") as u64;
            header.insert(
                info.name.clone(),
                serde_json::json!({"dtype": info.dtype.name(), "shape": info.shape, "data_offsets": [offset, offset + n]}),
            );
            slots.insert(
                info.name.clone(),
                Slot {
                    info: info.clone(),
                    start: offset,
                    end: offset + n,
                    written: false,
                },
            );
            offset += n;
        }
        let mut json = serde_json::to_vec(&header).expect("header JSON");
        // Pad with spaces so the data section starts 8-byte aligned.
        while !json.len().is_multiple_of(8) {
            json.push(b' ');
        }
        let mut out = AtomicFile::create(path)?;
        let io = |e| WeightsError::io(path, e);
        let f = out.file();
        f.write_all(&(json.len() as u64).to_le_bytes())
            .map_err(io)?;
        f.write_all(&json).map_err(io)?;
        let data_start = 8 + json.len() as u64;
        f.set_len(data_start + offset).map_err(io)?;
        Ok(SafetensorsWriter {
            out,
            data_start,
            slots,
            buf: Vec::new(),
        })
    }

    /// The tensors still to be written.
    pub fn pending(&self) -> impl Iterator<Item = &TensorInfo> {
        self.slots.values().filter(|s| !s.written).map(|s| &s.info)
    }

    fn slot(&mut self, name: &str, shape: &[usize]) -> Result<(u64, DType)> {
        let path = self.out.target().to_path_buf();
        let slot = self.slots.get(name).ok_or_else(|| WeightsError::Writer {
            path: path.clone(),
            msg: format!("tensor '{name}' is not in the plan"),
        })?;
        if slot.written {
            return Err(WeightsError::Writer {
                path,
                msg: format!("tensor '{name}' written twice"),
            });
        }
        if slot.info.shape != shape {
            return Err(WeightsError::ShapeMismatch {
                path,
                name: name.to_string(),
                expected: slot.info.shape.clone(),
                actual: shape.to_vec(),
            });
        }
        Ok((self.data_start + slot.start, slot.info.dtype))
    }

    /// Converts `data` to the planned dtype and writes it.
    pub fn write(&mut self, name: &str, data: ArrayViewD<'_, f32>) -> Result<()> {
        const CHUNK: usize = 1 << 20;
        let (pos, dtype) = self.slot(name, data.shape())?;
        let path = self.out.target().to_path_buf();
        let contiguous = data.as_standard_layout();
        let values = contiguous.as_slice().expect("standard layout");
        let file = self.out.file();
        file.seek(SeekFrom::Start(pos))
            .map_err(|e| WeightsError::io(&path, e))?;
        if dtype == DType::F32 && cfg!(target_endian = "little") {
            // Already the file's encoding: written from the values in place.
            // SAFETY: an f32 slice is `4·len` initialised bytes with no
            // padding, and u8 needs no alignment.
            let bytes = unsafe {
                std::slice::from_raw_parts(
                    values.as_ptr().cast::<u8>(),
                    std::mem::size_of_val(values),
                )
            };
            file.write_all(bytes)
                .map_err(|e| WeightsError::io(&path, e))?;
        } else {
            for chunk in values.chunks(CHUNK) {
                self.buf.clear();
                dtype::encode_plain(dtype, chunk.iter().copied(), &mut self.buf)
                    .map_err(|e| convert_error(&path, name, dtype, e, "writing"))?;
                file.write_all(&self.buf)
                    .map_err(|e| WeightsError::io(&path, e))?;
            }
        }
        start_writeback(file, pos, self.slots[name].end - self.slots[name].start);
        self.slots[name].written = true;
        Ok(())
    }

    /// Writes bytes already encoded in the planned dtype (e.g. copied from another file).
    pub fn write_raw(&mut self, name: &str, shape: &[usize], bytes: &[u8]) -> Result<()> {
        let (pos, _) = self.slot(name, shape)?;
        let path = self.out.target().to_path_buf();
        let slot = &self.slots[name];
        if bytes.len() as u64 != slot.end - slot.start {
            return Err(WeightsError::ByteCountMismatch {
                path,
                name: name.to_string(),
                dtype: slot.info.dtype.to_string(),
                shape: shape.to_vec(),
                expected: slot.end - slot.start,
                actual: bytes.len() as u64,
            });
        }
        let file = self.out.file();
        file.seek(SeekFrom::Start(pos))
            .map_err(|e| WeightsError::io(&path, e))?;
        file.write_all(bytes)
            .map_err(|e| WeightsError::io(&path, e))?;
        start_writeback(file, pos, bytes.len() as u64);
        self.slots[name].written = true;
        Ok(())
    }

    /// Checks that every planned tensor was written, then moves the file into place.
    pub fn finish(self) -> Result<()> {
        if let Some(missing) = self.slots.values().find(|s| !s.written) {
            return Err(WeightsError::Writer {
                path: self.out.target().to_path_buf(),
                msg: format!(
                    "tensor '{}' was planned but never written",
                    missing.info.name
                ),
            });
        }
        self.out.commit()
    }
}

/// The write plan of a state dict: each tensor with its output dtype.
pub(crate) fn plan(sd: &StateDict, float_dtype: Option<DType>) -> Vec<TensorInfo> {
    sd.iter()
        .map(|(name, t)| TensorInfo {
            name: name.to_string(),
            dtype: output_dtype(t.dtype, float_dtype),
            shape: t.shape().to_vec(),
        })
        .collect()
}

pub(crate) fn save(sd: &StateDict, path: &Path, float_dtype: Option<DType>) -> Result<()> {
    let mut w = SafetensorsWriter::create(path, &plan(sd, float_dtype), &sd.metadata)?;
    for (name, t) in sd.iter() {
        w.write(name, t.data.view())?;
    }
    w.finish()
}

/// Asks the kernel to start writing `len` bytes at `pos` of `file` to disk
/// now (Linux's `sync_file_range(SYNC_FILE_RANGE_WRITE)`, which does not wait
/// for the writes, though it may wait for room in the device's queue), so
/// that the fsync which commits the finished file finds most of it written
/// while later tensors were being computed. A hint: failure is ignored, and
/// elsewhere it does nothing.
fn start_writeback(file: &std::fs::File, pos: u64, len: u64) {
    // (A zero length would mean "to the end of the file".)
    #[cfg(target_os = "linux")]
    if len > 0 {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain syscall on an open descriptor; no memory is passed.
        unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                pos as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, pos, len);
}
