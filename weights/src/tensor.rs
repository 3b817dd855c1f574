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

    /// The values of tensor `name` in place, without a copy, where the
    /// source holds them as `f32` already: a memory-mapped safetensors
    /// tensor stored as little-endian `F32` at an aligned offset, or an
    /// in-memory tensor in standard layout. `None` otherwise (then
    /// [`TensorSource::load`] converts). A streaming job that reads the view
    /// calls [`TensorSource::release`] when it is done with it.
    fn f32_view(&self, _name: &str) -> Option<&[f32]> {
        None
    }

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

    /// A shape-checked view of the tensors under `prefix` (in the spirit of
    /// candle's `VarBuilder`): `sd.scope("model.layers.3").get("mlp.up_proj.weight",
    /// &[1536, 576])` names the full path and both shapes when it fails.
    /// An empty prefix is the whole state dict.
    pub fn scope(&self, prefix: &str) -> Scope<'_> {
        Scope {
            sd: self,
            prefix: prefix.to_string(),
        }
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
    fn f32_view(&self, name: &str) -> Option<&[f32]> {
        self.tensors.get(name)?.data.as_slice()
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

/// A view of a [`StateDict`] under a name prefix ([`StateDict::scope`]).
#[derive(Clone, Debug)]
pub struct Scope<'a> {
    sd: &'a StateDict,
    prefix: String,
}

impl<'a> Scope<'a> {
    /// The view one level down: `scope("model").scope("layers.0")` is `model.layers.0`.
    pub fn scope(&self, sub: &str) -> Scope<'a> {
        Scope {
            sd: self.sd,
            prefix: self.path(sub),
        }
    }

    /// The full name of `name` in this scope.
    pub fn path(&self, name: &str) -> String {
        match (self.prefix.is_empty(), name.is_empty()) {
            (true, _) => name.to_string(),
            (false, true) => self.prefix.clone(),
            (false, false) => format!("{}.{name}", self.prefix),
        }
    }

    /// Whether the scope holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.sd.contains(&self.path(name))
    }

    /// The tensor `name`, which must exist with exactly `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<&'a Tensor> {
        let path = self.path(name);
        let err = |msg: String| WeightsError::Tensor {
            name: path.clone(),
            msg,
        };
        let t = self
            .sd
            .get(&path)
            .ok_or_else(|| err("missing from the checkpoint".into()))?;
        if t.shape() != shape {
            return Err(err(format!(
                "has shape {:?}, expected {shape:?}",
                t.shape()
            )));
        }
        Ok(t)
    }

    /// [`Scope::get`], and every value finite.
    pub fn get_finite(&self, name: &str, shape: &[usize]) -> Result<&'a Tensor> {
        let t = self.get(name, shape)?;
        if let Some(x) = t.data.iter().find(|x| !x.is_finite()) {
            return Err(WeightsError::Tensor {
                name: self.path(name),
                msg: format!("holds a non-finite value {x}"),
            });
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_name_the_full_path_and_both_shapes() {
        let mut sd = StateDict::new();
        sd.insert(
            "model.layers.3.mlp.up_proj.weight",
            Tensor::f32(ArrayD::zeros(vec![4, 2])),
        );
        sd.insert(
            "model.norm.weight",
            Tensor::f32(ArrayD::from_elem(vec![2], f32::NAN)),
        );
        let layer = sd.scope("model").scope("layers.3");
        assert_eq!(
            layer.path("mlp.up_proj.weight"),
            "model.layers.3.mlp.up_proj.weight"
        );
        assert!(layer.contains("mlp.up_proj.weight"));
        let mlp = layer.scope("mlp");
        assert_eq!(mlp.get("up_proj.weight", &[4, 2]).unwrap().shape(), &[4, 2]);
        let e = mlp.get("up_proj.weight", &[2, 4]).unwrap_err().to_string();
        assert!(
            e.contains("model.layers.3.mlp.up_proj.weight")
                && e.contains("[4, 2]")
                && e.contains("[2, 4]"),
            "{e}"
        );
        let e = mlp
            .get("down_proj.weight", &[2, 4])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model.layers.3.mlp.down_proj.weight") && e.contains("missing"),
            "{e}"
        );
        // The empty prefix is the whole state dict; get_finite refuses NaN.
        let root = sd.scope("");
        assert_eq!(root.path("model.norm.weight"), "model.norm.weight");
        assert!(root.get("model.norm.weight", &[2]).is_ok());
        let e = root
            .get_finite("model.norm.weight", &[2])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model.norm.weight") && e.contains("non-finite"),
            "{e}"
        );
    }
}
