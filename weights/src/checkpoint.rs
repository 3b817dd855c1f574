//! [`Checkpoint`]: one entry point for every on-disk format.

use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use ndarray::ArrayViewD;

use crate::error::{Result, WeightsError};
use crate::gguf::GgufFile;
use crate::safetensors_io::{SafetensorsFile, SafetensorsWriter};
use crate::sharded::{INDEX_FILE, ShardedCheckpoint, ShardedWriter};
use crate::tensor::{Tensor, TensorInfo, TensorSource};

/// A checkpoint opened lazily from any supported format.
#[derive(Debug)]
pub enum Checkpoint {
    /// One `.safetensors` file.
    Safetensors(SafetensorsFile),
    /// A folder with `model.safetensors.index.json` and shards.
    Sharded(ShardedCheckpoint),
    /// A GGUF file (tensors dequantised, llama names mapped to Hugging Face).
    Gguf(Box<GgufFile>),
}

impl Checkpoint {
    /// Opens `path`, recognising the format:
    /// - a folder: its `model.safetensors.index.json` (sharded) or else its
    ///   single `model.safetensors` (or its only `*.safetensors` file);
    /// - a file named `*.index.json`: a sharded index;
    /// - a file starting with the bytes `GGUF`: GGUF;
    /// - any other file: safetensors.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if path.is_dir() {
            if path.join(INDEX_FILE).is_file() {
                return Ok(Checkpoint::Sharded(ShardedCheckpoint::open(path)?));
            }
            return Ok(Checkpoint::Safetensors(SafetensorsFile::open(
                single_file_in(path)?,
            )?));
        }
        if path.to_string_lossy().ends_with(".index.json") {
            return Ok(Checkpoint::Sharded(ShardedCheckpoint::open(path)?));
        }
        let mut magic = [0u8; 4];
        let is_gguf = {
            use std::io::Read;
            let mut f = std::fs::File::open(path).map_err(|e| WeightsError::io(path, e))?;
            f.read_exact(&mut magic).is_ok() && &magic == b"GGUF"
        };
        if is_gguf {
            Ok(Checkpoint::Gguf(Box::new(GgufFile::open(path)?)))
        } else {
            Ok(Checkpoint::Safetensors(SafetensorsFile::open(path)?))
        }
    }

    /// A short name of the format: `safetensors`, `sharded` or `gguf`.
    pub fn format(&self) -> &'static str {
        match self {
            Checkpoint::Safetensors(_) => "safetensors",
            Checkpoint::Sharded(_) => "sharded",
            Checkpoint::Gguf(_) => "gguf",
        }
    }

    fn inner(&self) -> &dyn TensorSource {
        match self {
            Checkpoint::Safetensors(s) => s,
            Checkpoint::Sharded(s) => s,
            Checkpoint::Gguf(s) => s.as_ref(),
        }
    }
}

fn single_file_in(dir: &Path) -> Result<PathBuf> {
    let model = dir.join("model.safetensors");
    if model.is_file() {
        return Ok(model);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| WeightsError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(WeightsError::UnknownFormat {
            path: dir.to_path_buf(),
            msg: format!("folder has neither {INDEX_FILE} nor a .safetensors file"),
        }),
        n => Err(WeightsError::UnknownFormat {
            path: dir.to_path_buf(),
            msg: format!(
                "folder has {n} .safetensors files but no {INDEX_FILE} to say how they fit together"
            ),
        }),
    }
}

impl TensorSource for Checkpoint {
    fn path(&self) -> &Path {
        self.inner().path()
    }
    fn infos(&self) -> Vec<TensorInfo> {
        self.inner().infos()
    }
    fn info(&self, name: &str) -> Option<TensorInfo> {
        self.inner().info(name)
    }
    fn load(&self, name: &str) -> Result<Tensor> {
        self.inner().load(name)
    }
    fn release(&self, name: &str) {
        self.inner().release(name)
    }
    fn f32_view(&self, name: &str) -> Option<&[f32]> {
        self.inner().f32_view(name)
    }
    fn metadata(&self) -> &IndexMap<String, String> {
        self.inner().metadata()
    }
}

/// A streaming writer for either output layout, chosen from the path: a path
/// ending in `.safetensors` is one file, anything else a sharded folder.
pub enum CheckpointWriter {
    /// One safetensors file.
    Single(SafetensorsWriter),
    /// A sharded folder with an index.
    Sharded(ShardedWriter),
}

impl CheckpointWriter {
    /// Plans the output for `plan` (see [`SafetensorsWriter::create`] and
    /// [`ShardedWriter::create`]; `max_shard_bytes` applies to folders).
    pub fn create(
        out: impl AsRef<Path>,
        plan: &[TensorInfo],
        metadata: &IndexMap<String, String>,
        max_shard_bytes: u64,
    ) -> Result<Self> {
        let out = out.as_ref();
        Ok(if Self::is_single_file(out) {
            CheckpointWriter::Single(SafetensorsWriter::create(out, plan, metadata)?)
        } else {
            CheckpointWriter::Sharded(ShardedWriter::create(out, plan, metadata, max_shard_bytes)?)
        })
    }

    /// Whether `out` names a single safetensors file (else a folder).
    pub fn is_single_file(out: &Path) -> bool {
        out.extension().is_some_and(|e| e == "safetensors")
    }

    /// Converts `data` to the planned dtype and writes it.
    pub fn write(&mut self, name: &str, data: ArrayViewD<'_, f32>) -> Result<()> {
        match self {
            CheckpointWriter::Single(w) => w.write(name, data),
            CheckpointWriter::Sharded(w) => w.write(name, data),
        }
    }

    /// Checks completeness and moves the output into place.
    pub fn finish(self) -> Result<()> {
        match self {
            CheckpointWriter::Single(w) => w.finish(),
            CheckpointWriter::Sharded(w) => w.finish(),
        }
    }
}
