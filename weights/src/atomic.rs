//! Atomic file output: write to a temporary file in the target folder, fsync,
//! rename over the target, fsync the folder. A reader never sees a
//! half-written file, and an interrupted write leaves the old file (if any)
//! untouched; the temporary file is removed when the writer is dropped.
//!
//! Files get the mode any other tool would give them (`0666 & !umask`, not
//! tempfile's `0600`, which is meant for secrets), so a model folder one user
//! writes can be read by another.
//!
//! Interrupts: a process journals its live temporary files (and, for model
//! outputs, the files and folders it created). [`on_interrupt`] installs a
//! SIGINT/SIGTERM/SIGHUP handler that undoes them and exits with status 130.
//! A run killed with SIGKILL cannot clean up; the next write of the same
//! target removes the temporaries it left (`.NAME.XXXXXX.tmp`) and says so.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, Once};

use crate::error::{Result, WeightsError};

/// What an interrupt undoes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnInterrupt {
    /// Remove the temporary files being written; outputs already in place
    /// stay (studies, whose tables record the runs that finished).
    RemoveTemporaries,
    /// Also remove every file and folder this process created, so the output
    /// folder is left as it was before the run (model outputs: a half-merged
    /// folder is worse than none).
    RestoreOutputs,
}

/// What this process wrote so far, for undoing on interrupt.
struct Journal {
    temps: BTreeMap<u64, PathBuf>,
    temp_dirs: BTreeMap<u64, PathBuf>,
    created_files: Vec<PathBuf>,
    created_dirs: Vec<PathBuf>,
    next: u64,
    policy: Option<OnInterrupt>,
}

static JOURNAL: Mutex<Journal> = Mutex::new(Journal {
    temps: BTreeMap::new(),
    temp_dirs: BTreeMap::new(),
    created_files: Vec::new(),
    created_dirs: Vec::new(),
    next: 0,
    policy: None,
});

fn journal() -> MutexGuard<'static, Journal> {
    JOURNAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// What [`undo`] removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Undone {
    /// Temporary files removed.
    pub temporaries: usize,
    /// Finished outputs (files and empty folders) removed.
    pub outputs: usize,
}

impl Journal {
    fn undo(&mut self, policy: OnInterrupt) -> Undone {
        let mut done = Undone::default();
        for p in std::mem::take(&mut self.temps).into_values() {
            if std::fs::remove_file(&p).is_ok() {
                done.temporaries += 1;
            }
        }
        for d in std::mem::take(&mut self.temp_dirs).into_values() {
            if std::fs::remove_dir_all(&d).is_ok() {
                done.temporaries += 1;
            }
        }
        if policy == OnInterrupt::RestoreOutputs {
            for p in std::mem::take(&mut self.created_files).into_iter().rev() {
                if std::fs::remove_file(&p).is_ok() {
                    done.outputs += 1;
                }
            }
            // Deepest first; a folder that holds anything else stays.
            for d in std::mem::take(&mut self.created_dirs).into_iter().rev() {
                if std::fs::remove_dir(&d).is_ok() {
                    done.outputs += 1;
                }
            }
        }
        done
    }
}

/// Undoes what this process wrote, as an interrupt does under `policy`;
/// returns what was removed. The journal is empty afterwards.
pub fn undo(policy: OnInterrupt) -> Undone {
    journal().undo(policy)
}

/// Forgets the outputs this process created so far (they are finished and
/// must survive a later interrupt); live temporaries stay journalled.
pub fn keep_outputs() {
    let mut j = journal();
    j.created_files.clear();
    j.created_dirs.clear();
}

/// Installs (once per process) the handler of SIGINT, SIGTERM and SIGHUP:
/// it undoes this process's writes under `policy`, says what it removed on
/// stderr and exits with status 130. A later call changes the policy.
pub fn on_interrupt(policy: OnInterrupt) {
    journal().policy = Some(policy);
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // Fails only when another handler is installed; then that one rules.
        let _ = ctrlc::set_handler(|| {
            // Held until exit, so no writer commits or registers meanwhile.
            let mut j = journal();
            let policy = j.policy.unwrap_or(OnInterrupt::RemoveTemporaries);
            let done = j.undo(policy);
            eprintln!(
                "interrupted: removed {} temporary file(s){}",
                done.temporaries,
                if policy == OnInterrupt::RestoreOutputs {
                    format!(" and {} output(s) of this run", done.outputs)
                } else {
                    String::new()
                }
            );
            std::process::exit(130);
        });
    });
}

/// `std::fs::create_dir_all`, journalling the folders it creates (an
/// interrupt under [`OnInterrupt::RestoreOutputs`] removes them when empty).
pub fn create_dir_all(dir: impl AsRef<Path>) -> Result<()> {
    let dir = dir.as_ref();
    let mut missing = Vec::new();
    let mut p = Some(dir);
    while let Some(d) = p {
        if d.as_os_str().is_empty() || d.exists() {
            break;
        }
        missing.push(d.to_path_buf());
        p = d.parent();
    }
    std::fs::create_dir_all(dir).map_err(|e| WeightsError::io(dir, e))?;
    let mut j = journal();
    j.created_dirs.extend(missing.into_iter().rev());
    Ok(())
}

/// Whether `file_name` is a temporary [`AtomicFile`] writes for a target
/// whose name `target` accepts: `.NAME.XXXXXX.tmp`.
fn temporary_for(file_name: &str, target: &dyn Fn(&str) -> bool) -> bool {
    let Some(rest) = file_name
        .strip_prefix('.')
        .and_then(|r| r.strip_suffix(".tmp"))
    else {
        return false;
    };
    match rest.rsplit_once('.') {
        Some((name, rand)) => {
            rand.len() == RAND_CHARS
                && rand.chars().all(|c| c.is_ascii_alphanumeric())
                && target(name)
        }
        None => false,
    }
}

const RAND_CHARS: usize = 6;

/// Removes the temporary files an earlier, killed run left in `dir` for
/// targets whose names `target` accepts (not those this process is writing),
/// noting each on stderr; returns the paths removed.
pub fn remove_stale_temporaries(dir: &Path, target: &dyn Fn(&str) -> bool) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let j = journal();
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        let stale = e
            .file_name()
            .to_str()
            .is_some_and(|n| temporary_for(n, target))
            && !j.temps.values().any(|t| *t == path)
            && e.file_type().is_ok_and(|t| t.is_file());
        if stale && std::fs::remove_file(&path).is_ok() {
            eprintln!(
                "note: removed {}, a temporary file an interrupted run left",
                path.display()
            );
            removed.push(path);
        }
    }
    removed
}

/// A file that appears at its target path only when [`AtomicFile::commit`] succeeds.
#[derive(Debug)]
pub struct AtomicFile {
    tmp: Option<tempfile::NamedTempFile>,
    target: PathBuf,
    id: u64,
}

impl AtomicFile {
    /// Starts writing `target`. Its folder must exist. Temporaries an earlier,
    /// killed write of the same target left are removed first.
    pub fn create(target: impl AsRef<Path>) -> Result<Self> {
        let target = target.as_ref().to_path_buf();
        let dir = parent_dir(&target);
        let stem = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "out".into());
        remove_stale_temporaries(&dir, &|n| n == stem);
        let prefix = format!(".{stem}.");
        let mut b = tempfile::Builder::new();
        b.prefix(&prefix).suffix(".tmp").rand_bytes(RAND_CHARS);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            // The kernel applies the umask: 0644 under the usual 022.
            b.permissions(std::fs::Permissions::from_mode(0o666));
        }
        // Registered under the journal's lock, so an interrupt sees every
        // temporary that exists.
        let mut j = journal();
        let tmp = b
            .tempfile_in(&dir)
            .map_err(|e| WeightsError::io(&target, e))?;
        let id = j.next;
        j.next += 1;
        j.temps.insert(id, tmp.path().to_path_buf());
        Ok(AtomicFile {
            tmp: Some(tmp),
            target,
            id,
        })
    }

    /// The final path.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// The open temporary file.
    pub fn file(&mut self) -> &mut File {
        self.tmp.as_mut().expect("live until commit").as_file_mut()
    }

    /// Flushes, fsyncs and renames the file into place, then fsyncs the folder.
    pub fn commit(mut self) -> Result<()> {
        let target = self.target.clone();
        let io = |e| WeightsError::io(&target, e);
        let mut tmp = self.tmp.take().expect("live until commit");
        tmp.as_file_mut().flush().map_err(io)?;
        tmp.as_file().sync_all().map_err(io)?;
        {
            let mut j = journal();
            let existed = target.exists();
            let persisted = tmp.persist(&target);
            j.temps.remove(&self.id);
            persisted.map_err(|e| WeightsError::io(&target, e.error))?;
            if !existed {
                j.created_files.push(target.clone());
            }
        }
        sync_dir(&parent_dir(&target));
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            let mut j = journal();
            j.temps.remove(&self.id);
            drop(tmp); // removes the file
        }
    }
}

/// A folder assembled under a temporary name beside its target and renamed
/// into place by [`TemporaryDir::persist`] (a model folder appears whole or
/// not at all). Dropped unpersisted, or on interrupt, it is removed with its
/// contents. Its name is `.NAME.PID.partial`; one an earlier, killed run left
/// for the same target is removed when the next one is created.
#[derive(Debug)]
pub struct TemporaryDir {
    path: PathBuf,
    target: PathBuf,
    id: Option<u64>,
}

impl TemporaryDir {
    /// Creates the temporary folder for `target` (whose parent is created
    /// if missing). `target` itself must not exist.
    pub fn create(target: impl AsRef<Path>) -> Result<Self> {
        let target = target.as_ref().to_path_buf();
        let parent = parent_dir(&target);
        create_dir_all(&parent)?;
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "out".into());
        let partial = |n: &str| -> bool {
            n.strip_prefix(&format!(".{name}."))
                .and_then(|r| r.strip_suffix(".partial"))
                .is_some_and(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
        };
        let mut j = journal();
        if let Ok(entries) = std::fs::read_dir(&parent) {
            for e in entries.flatten() {
                let stale = e.file_name().to_str().is_some_and(partial)
                    && !j.temp_dirs.values().any(|d| *d == e.path());
                if stale && std::fs::remove_dir_all(e.path()).is_ok() {
                    eprintln!(
                        "note: removed {}, a partial folder an interrupted run left",
                        e.path().display()
                    );
                }
            }
        }
        let path = parent.join(format!(".{name}.{}.partial", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path).map_err(|e| WeightsError::io(&path, e))?;
        let id = j.next;
        j.next += 1;
        j.temp_dirs.insert(id, path.clone());
        Ok(TemporaryDir {
            path,
            target,
            id: Some(id),
        })
    }

    /// The temporary folder to write into.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the folder to its target.
    pub fn persist(mut self) -> Result<()> {
        let mut j = journal();
        std::fs::rename(&self.path, &self.target).map_err(|e| WeightsError::io(&self.target, e))?;
        if let Some(id) = self.id.take() {
            j.temp_dirs.remove(&id);
        }
        drop(j);
        sync_dir(&parent_dir(&self.target));
        Ok(())
    }
}

impl Drop for TemporaryDir {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            let mut j = journal();
            j.temp_dirs.remove(&id);
            let _ = std::fs::remove_dir_all(&self.path);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporaries_are_recognised_by_name() {
        let t = |n: &str| n == "model.safetensors";
        assert!(temporary_for(".model.safetensors.a1B2c3.tmp", &t));
        assert!(!temporary_for(".model.safetensors.a1B2c.tmp", &t));
        assert!(!temporary_for(".model.safetensors.a1B2c3.tmpx", &t));
        assert!(!temporary_for("model.safetensors.a1B2c3.tmp", &t));
        assert!(!temporary_for(".other.safetensors.a1B2c3.tmp", &t));
        assert!(!temporary_for(".model.safetensors.a1-2c3.tmp", &t));
    }

    #[test]
    fn a_temporary_dir_appears_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("model");
        let stale = dir.path().join(".model.99999999.partial");
        std::fs::create_dir(&stale).unwrap();
        std::fs::write(stale.join("x"), b"half").unwrap();
        let t = TemporaryDir::create(&target).unwrap();
        assert!(!stale.exists(), "a killed run's partial folder is removed");
        std::fs::write(t.path().join("config.json"), b"{}").unwrap();
        assert!(!target.exists());
        t.persist().unwrap();
        assert!(target.join("config.json").is_file());
        let dropped = TemporaryDir::create(dir.path().join("other")).unwrap();
        let p = dropped.path().to_path_buf();
        std::fs::write(p.join("a"), b"1").unwrap();
        drop(dropped);
        assert!(!p.exists() && !dir.path().join("other").exists());
    }

    #[test]
    fn stale_temporaries_of_a_killed_run_are_removed_by_the_next_write() {
        let dir = tempfile::tempdir().unwrap();
        let stale = dir.path().join(".config.json.Xy12ab.tmp");
        let other = dir.path().join(".notes.txt.Xy12ab.tmp");
        std::fs::write(&stale, b"half").unwrap();
        std::fs::write(&other, b"someone else's").unwrap();
        write_atomic(dir.path().join("config.json"), b"{}").unwrap();
        assert!(!stale.exists());
        assert!(other.exists(), "only temporaries of the written target go");
    }
}
