//! Atomic file output: write to a temporary file in the target folder, fsync,
//! rename over the target, fsync the folder. A reader never sees a
//! half-written file, and an interrupted write leaves the old file (if any)
//! untouched; the temporary file is removed when the writer is dropped.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Result, WeightsError};

/// A file that appears at its target path only when [`AtomicFile::commit`] succeeds.
#[derive(Debug)]
pub struct AtomicFile {
    tmp: tempfile::NamedTempFile,
    target: PathBuf,
}

impl AtomicFile {
    /// Starts writing `target`. Its folder must exist.
    pub fn create(target: impl AsRef<Path>) -> Result<Self> {
        let target = target.as_ref().to_path_buf();
        let dir = parent_dir(&target);
        let stem = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "out".into());
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{stem}."))
            .suffix(".tmp")
            .tempfile_in(&dir)
            .map_err(|e| WeightsError::io(&target, e))?;
        Ok(AtomicFile { tmp, target })
    }

    /// The final path.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// The open temporary file.
    pub fn file(&mut self) -> &mut File {
        self.tmp.as_file_mut()
    }

    /// Flushes, fsyncs and renames the file into place, then fsyncs the folder.
    pub fn commit(mut self) -> Result<()> {
        let target = self.target.clone();
        let io = |e| WeightsError::io(&target, e);
        self.tmp.as_file_mut().flush().map_err(io)?;
        self.tmp.as_file().sync_all().map_err(io)?;
        self.tmp
            .persist(&target)
            .map_err(|e| WeightsError::io(&target, e.error))?;
        sync_dir(&parent_dir(&target));
        Ok(())
    }
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    let mut f = AtomicFile::create(path)?;
    let target = f.target().to_path_buf();
    f.file()
        .write_all(bytes)
        .map_err(|e| WeightsError::io(&target, e))?;
    f.commit()
}

pub(crate) fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Best effort: makes a rename durable on file systems that need it.
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}
