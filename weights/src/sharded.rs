//! Sharded Hugging Face checkpoints: a folder with
//! `model.safetensors.index.json` (`{"metadata": {"total_size": N},
//! "weight_map": {tensor: shard file}}`) and shard files
//! `model-0000i-of-0000N.safetensors`.
//!
//! The index's `weight_map` is the authority on which tensors the checkpoint
//! has (as in `transformers`); tensors a shard holds but the index does not
//! name are ignored.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use ndarray::ArrayViewD;

use crate::dtype::DType;
use crate::error::{Result, WeightsError};
use crate::safetensors_io::{SafetensorsFile, SafetensorsWriter, parse_object_no_dups, plan};
use crate::tensor::{StateDict, Tensor, TensorInfo, TensorSource};

/// File name of the index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// A sharded checkpoint; every shard memory-mapped, tensors read on demand.
#[derive(Debug)]
pub struct ShardedCheckpoint {
    index_path: PathBuf,
    shards: Vec<SafetensorsFile>,
    /// Tensor name → shard number, in shard then file order.
    location: IndexMap<String, usize>,
    metadata: IndexMap<String, String>,
}

impl ShardedCheckpoint {
    /// Opens a sharded checkpoint from its folder or its index file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let index_path = if path.is_dir() {
            path.join(INDEX_FILE)
        } else {
            path.to_path_buf()
        };
        let dir = crate::atomic::parent_dir(&index_path);
        let text = std::fs::read(&index_path).map_err(|e| WeightsError::io(&index_path, e))?;
        let invalid = |msg: String| WeightsError::InvalidHeader {
            path: index_path.clone(),
            msg,
        };
        #[derive(serde::Deserialize)]
        struct RawIndex<'a> {
            #[serde(borrow)]
            weight_map: Option<&'a serde_json::value::RawValue>,
            #[serde(default)]
            metadata: serde_json::Map<String, serde_json::Value>,
        }
        let raw: RawIndex =
            serde_json::from_slice(&text).map_err(|e| invalid(format!("index JSON: {e}")))?;
        let metadata: IndexMap<String, String> = raw
            .metadata
            .into_iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect();
        let weight_map_raw = raw
            .weight_map
            .ok_or_else(|| invalid("no \"weight_map\" object".into()))?;
        // Parsed as ordered pairs so that a tensor listed twice is reported.
        let weight_map =
            parse_object_no_dups(&index_path, weight_map_raw.get().as_bytes(), "weight_map")?;

        let mut shard_of: HashMap<String, usize> = HashMap::new();
        let mut shard_names: Vec<String> = Vec::new();
        let mut wanted: Vec<(String, usize)> = Vec::with_capacity(weight_map.len());
        for (tensor, file) in weight_map {
            let file = file
                .as_str()
                .ok_or_else(|| {
                    invalid(format!(
                        "weight_map entry for '{tensor}' is not a file name"
                    ))
                })?
                .to_string();
            if file.contains('/') || file.contains('\\') || file == ".." {
                return Err(invalid(format!(
                    "shard name '{file}' for '{tensor}' must be a plain file name"
                )));
            }
            let idx = *shard_of.entry(file.clone()).or_insert_with(|| {
                shard_names.push(file.clone());
                shard_names.len() - 1
            });
            if !dir.join(&file).is_file() {
                return Err(WeightsError::MissingShard {
                    index: index_path.clone(),
                    shard: file,
                    tensor,
                });
            }
            wanted.push((tensor, idx));
        }
        // Open shards in file-name order so iteration follows the files.
        let mut order: Vec<usize> = (0..shard_names.len()).collect();
        order.sort_by(|&a, &b| shard_names[a].cmp(&shard_names[b]));
        let mut remap = vec![0; order.len()];
        let mut shards = Vec::with_capacity(order.len());
        for (new, &old) in order.iter().enumerate() {
            remap[old] = new;
            shards.push(SafetensorsFile::open(dir.join(&shard_names[old]))?);
        }
        let mut wanted_in: Vec<HashMap<String, ()>> = vec![HashMap::new(); shards.len()];
        for (tensor, old) in wanted {
            let s = remap[old];
            if shards[s].info(&tensor).is_none() {
                return Err(WeightsError::TensorNotFound {
                    path: shards[s].path().to_path_buf(),
                    name: tensor,
                });
            }
            wanted_in[s].insert(tensor, ());
        }
        let mut location = IndexMap::new();
        for (s, shard) in shards.iter().enumerate() {
            for info in shard.infos() {
                if wanted_in[s].contains_key(&info.name) {
                    location.insert(info.name, s);
                }
            }
        }
        Ok(ShardedCheckpoint {
            index_path,
            shards,
            location,
            metadata,
        })
    }

    /// The shard files, in order.
    pub fn shards(&self) -> &[SafetensorsFile] {
        &self.shards
    }

    /// The shard holding `name`.
    pub fn shard_of(&self, name: &str) -> Option<&SafetensorsFile> {
        self.location.get(name).map(|&s| &self.shards[s])
    }
}

impl TensorSource for ShardedCheckpoint {
    fn path(&self) -> &Path {
        &self.index_path
    }
    fn infos(&self) -> Vec<TensorInfo> {
        self.location
            .iter()
            .filter_map(|(name, &s)| self.shards[s].info(name))
            .collect()
    }
    fn info(&self, name: &str) -> Option<TensorInfo> {
        self.shard_of(name)?.info(name)
    }
    fn load(&self, name: &str) -> Result<Tensor> {
        self.shard_of(name)
            .ok_or_else(|| WeightsError::TensorNotFound {
                path: self.index_path.clone(),
                name: name.to_string(),
            })?
            .load(name)
    }
    fn metadata(&self) -> &IndexMap<String, String> {
        &self.metadata
    }
    fn release(&self, name: &str) {
        if let Some(s) = self.shard_of(name) {
            s.release(name);
        }
    }
    fn f32_view(&self, name: &str) -> Option<&[f32]> {
        self.shard_of(name)?.f32_view(name)
    }
}

/// Name of shard `i` (0-based) of `n`, as `transformers` writes it.
pub fn shard_file_name(i: usize, n: usize) -> String {
    format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
}

/// Streams a planned set of tensors into a sharded checkpoint.
///
/// Tensors are assigned to shards greedily in plan order: a new shard starts
/// when adding a tensor would exceed `max_shard_bytes` (a tensor larger than
/// that gets a shard of its own). Every shard and the index are written
/// atomically; the index is written last, after every shard is in place, so
/// a reader that follows the index never sees a partial checkpoint.
pub struct ShardedWriter {
    dir: PathBuf,
    shards: Vec<Option<SafetensorsWriter>>,
    shard_of: IndexMap<String, usize>,
    total_size: u64,
}

impl ShardedWriter {
    /// Plans the shards and creates their temporary files in `dir` (created if missing).
    pub fn create(
        dir: impl AsRef<Path>,
        plan: &[TensorInfo],
        metadata: &IndexMap<String, String>,
        max_shard_bytes: u64,
    ) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        crate::atomic::create_dir_all(&dir)?;
        // Temporaries of shards or the index that a killed run left, whatever
        // its shard count.
        crate::atomic::remove_stale_temporaries(&dir, &|n| {
            n == INDEX_FILE || parse_shard_file_name(n).is_some()
        });
        let mut groups: Vec<Vec<TensorInfo>> = Vec::new();
        let mut current = 0u64;
        let mut total_size = 0u64;
        for info in plan {
            let n = info.dtype.bytes_for(info.numel() as u128).unwrap_or(0) as u64;
            if groups.is_empty() || (current > 0 && current + n > max_shard_bytes) {
                groups.push(Vec::new());
                current = 0;
            }
            groups.last_mut().expect("non-empty").push(info.clone());
            current += n;
            total_size += n;
        }
        if groups.is_empty() {
            groups.push(Vec::new());
        }
        let n = groups.len();
        let mut shards = Vec::with_capacity(n);
        let mut shard_of = IndexMap::new();
        for (i, group) in groups.iter().enumerate() {
            for info in group {
                if shard_of.insert(info.name.clone(), i).is_some() {
                    return Err(WeightsError::DuplicateTensor {
                        path: dir.clone(),
                        name: info.name.clone(),
                    });
                }
            }
            shards.push(Some(SafetensorsWriter::create(
                dir.join(shard_file_name(i, n)),
                group,
                metadata,
            )?));
        }
        Ok(ShardedWriter {
            dir,
            shards,
            shard_of,
            total_size,
        })
    }

    fn shard(&mut self, name: &str) -> Result<&mut SafetensorsWriter> {
        let i = *self
            .shard_of
            .get(name)
            .ok_or_else(|| WeightsError::Writer {
                path: self.dir.clone(),
                msg: format!("tensor '{name}' is not in the plan"),
            })?;
        Ok(self.shards[i].as_mut().expect("shards live until finish"))
    }

    /// Converts `data` to the planned dtype and writes it into its shard.
    pub fn write(&mut self, name: &str, data: ArrayViewD<'_, f32>) -> Result<()> {
        self.shard(name)?.write(name, data)
    }

    /// Writes already-encoded bytes.
    pub fn write_raw(&mut self, name: &str, shape: &[usize], bytes: &[u8]) -> Result<()> {
        self.shard(name)?.write_raw(name, shape, bytes)
    }

    /// Moves every shard into place, then writes the index.
    pub fn finish(mut self) -> Result<()> {
        // Check completeness of all shards before renaming any of them.
        for w in self.shards.iter().flatten() {
            if let Some(missing) = w.pending().next() {
                return Err(WeightsError::Writer {
                    path: self.dir.clone(),
                    msg: format!("tensor '{}' was planned but never written", missing.name),
                });
            }
        }
        for w in self.shards.iter_mut() {
            w.take().expect("once").finish()?;
        }
        let n = self.shards.len();
        let weight_map: serde_json::Map<String, serde_json::Value> = self
            .shard_of
            .iter()
            .map(|(name, &i)| {
                (
                    name.clone(),
                    serde_json::Value::String(shard_file_name(i, n)),
                )
            })
            .collect();
        let index = serde_json::json!({
            "metadata": {"total_size": self.total_size},
            "weight_map": weight_map,
        });
        let text = serde_json::to_string_pretty(&index).expect("index JSON");
        crate::atomic::write_atomic(self.dir.join(INDEX_FILE), text.as_bytes())?;
        remove_stale_shards(&self.dir, n);
        Ok(())
    }
}

/// `(i, n)` (1-based shard `i` of `n`) of a name [`shard_file_name`] writes.
pub fn parse_shard_file_name(name: &str) -> Option<(usize, usize)> {
    let rest = name.strip_prefix("model-")?.strip_suffix(".safetensors")?;
    let (i, n) = rest.split_once("-of-")?;
    let digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !(digits(i) && digits(n)) {
        return None;
    }
    Some((i.parse().ok()?, n.parse().ok()?))
}

/// Removes the shards of an earlier output with another shard count, which
/// the new index does not name (they would double the folder's size and
/// confuse a reader that globs shards), noting each on stderr.
fn remove_stale_shards(dir: &Path, n: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let stale = e
            .file_name()
            .to_str()
            .and_then(parse_shard_file_name)
            .is_some_and(|(_, of)| of != n);
        if stale && std::fs::remove_file(e.path()).is_ok() {
            eprintln!(
                "note: removed {}, a shard of an earlier output that the new index does not name",
                e.path().display()
            );
        }
    }
}

pub(crate) fn save(
    sd: &StateDict,
    dir: &Path,
    max_shard_bytes: u64,
    float_dtype: Option<DType>,
) -> Result<()> {
    let mut w = ShardedWriter::create(dir, &plan(sd, float_dtype), &sd.metadata, max_shard_bytes)?;
    for (name, t) in sd.iter() {
        w.write(name, t.data.view())?;
    }
    w.finish()
}
