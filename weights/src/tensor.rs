//! Named tensors: [`Tensor`], [`TensorInfo`], [`StateDict`] and the lazy
//! [`TensorSource`] trait every checkpoint reader implements.

use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use ndarray::ArrayD;

use crate::dtype::DType;
use crate::error::{Result, WeightsError};

/// One tensor in memory: `f32` values plus the dtype it was stored as.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// The values, in the layout of the file (PyTorch/Hugging Face: `weight` is `[out, in]`).
    pub data: ArrayD<f32>,
    /// The dtype the tensor had on disk (or should have when written).
    pub dtype: DType,
}

impl Tensor {
    /// A tensor that will be stored as `dtype`.
    pub fn new(data: ArrayD<f32>, dtype: DType) -> Self {
        Tensor { data, dtype }
    }

    /// An `F32` tensor.
    pub fn f32(data: ArrayD<f32>) -> Self {
        Tensor::new(data, DType::F32)
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        self.data.shape()
    }
}

/// What a checkpoint says about a tensor without reading its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name (Hugging Face naming for GGUF files after mapping).
    pub name: String,
    /// The stored dtype.
    pub dtype: DType,
    /// The shape, outermost axis first.
    pub shape: Vec<usize>,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Anything that lists tensors and loads them one at a time, on demand.
///
/// Checkpoint readers ([`crate::SafetensorsFile`], [`crate::ShardedCheckpoint`],
/// [`crate::GgufFile`], [`crate::Checkpoint`]) memory-map their files and
/// convert a tensor only when [`TensorSource::load`] asks for it, so a model
/// far larger than memory can be streamed tensor by tensor. A [`StateDict`] is
/// a source too (its `load` clones).
pub trait TensorSource: Sync {
    /// The file or folder this source reads (used in error messages).
    fn path(&self) -> &Path;
    /// Every tensor, in file order.
    fn infos(&self) -> Vec<TensorInfo>;
    /// The tensor named `name`, if any.
    fn info(&self, name: &str) -> Option<TensorInfo>;
    /// Reads and converts one tensor to `f32`.
    fn load(&self, name: &str) -> Result<Tensor>;
    /// String metadata (safetensors `__metadata__`).
    fn metadata(&self) -> &IndexMap<String, String>;

    /// Drops the resident pages of tensor `name`'s stored bytes, if the
    /// source maps a file: a streaming job that read a tensor once calls this
    /// so its resident memory stays bounded by what it holds, not by how much
    /// of the files it has read. Contents are unchanged (pages are re-read on
    /// the next access). The default does nothing.
    fn release(&self, _name: &str) {}

    /// Names of all tensors, in file order.
    fn names(&self) -> Vec<String> {
        self.infos().into_iter().map(|i| i.name).collect()
    }

    /// Loads every tensor into a [`StateDict`].
    fn load_all(&self) -> Result<StateDict> {
        let mut sd = StateDict::new();
        sd.metadata = self.metadata().clone();
        for info in self.infos() {
            let t = self.load(&info.name)?;
            sd.insert(info.name, t);
        }
        Ok(sd)
    }
}

/// An ordered map from tensor name to [`Tensor`], plus string metadata:
/// the currency every crate of the toolkit trades in.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StateDict {
    tensors: IndexMap<String, Tensor>,
    /// String metadata, written to safetensors' `__metadata__`.
    pub metadata: IndexMap<String, String>,
}

impl StateDict {
    /// An empty state dict.
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts (or replaces) a tensor, returning the previous one.
    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor) -> Option<Tensor> {
        self.tensors.insert(name.into(), tensor)
    }

    /// The tensor named `name`.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// The tensor named `name`, or an error naming it.
    pub fn require(&self, name: &str) -> Result<&Tensor> {
        self.tensors
            .get(name)
            .ok_or_else(|| WeightsError::TensorNotFound {
                path: PathBuf::from("<state dict>"),
                name: name.to_string(),
            })
    }

    /// Mutable access to the tensor `name`.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut Tensor> {
        self.tensors.get_mut(name)
    }

    /// Removes a tensor, keeping the order of the others.
    pub fn remove(&mut self, name: &str) -> Option<Tensor> {
        self.tensors.shift_remove(name)
    }

    /// Whether `name` is present.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// `(name, tensor)` pairs in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.tensors.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Mutable `(name, tensor)` pairs in order.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&str, &mut Tensor)> {
        self.tensors.iter_mut().map(|(k, v)| (k.as_str(), v))
    }

    /// Tensor names in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Total number of elements.
    pub fn numel(&self) -> usize {
        self.tensors.values().map(|t| t.data.len()).sum()
    }

    /// Reads a whole checkpoint (safetensors file, sharded folder or GGUF).
    pub fn load(path: impl AsRef<Path>) -> Result<StateDict> {
        crate::Checkpoint::open(path)?.load_all()
    }

    /// Writes one safetensors file atomically, each tensor in its own dtype.
    pub fn save_safetensors(&self, path: impl AsRef<Path>) -> Result<()> {
        crate::safetensors_io::save(self, path.as_ref(), None)
    }

    /// Writes a sharded Hugging Face checkpoint into `dir` (shards of at most
    /// `max_shard_bytes` unless a single tensor is larger, plus
    /// `model.safetensors.index.json`).
    pub fn save_sharded(&self, dir: impl AsRef<Path>, max_shard_bytes: u64) -> Result<()> {
        crate::sharded::save(self, dir.as_ref(), max_shard_bytes, None)
    }
}

impl TensorSource for StateDict {
    fn path(&self) -> &Path {
        Path::new("<state dict>")
    }
    fn infos(&self) -> Vec<TensorInfo> {
        self.tensors.keys().filter_map(|k| self.info(k)).collect()
    }
    fn info(&self, name: &str) -> Option<TensorInfo> {
        self.tensors.get(name).map(|t| TensorInfo {
            name: name.to_string(),
            dtype: t.dtype,
            shape: t.shape().to_vec(),
        })
    }
    fn load(&self, name: &str) -> Result<Tensor> {
        self.require(name).cloned()
    }
    fn metadata(&self) -> &IndexMap<String, String> {
        &self.metadata
    }
}

impl FromIterator<(String, Tensor)> for StateDict {
    fn from_iter<I: IntoIterator<Item = (String, Tensor)>>(iter: I) -> Self {
        let mut sd = StateDict::new();
        for (k, v) in iter {
            sd.insert(k, v);
        }
        sd
    }
}

impl IntoIterator for StateDict {
    type Item = (String, Tensor);
    type IntoIter = indexmap::map::IntoIter<String, Tensor>;
    fn into_iter(self) -> Self::IntoIter {
        self.tensors.into_iter()
    }
}
