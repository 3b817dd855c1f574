//! Interrupted runs leave nothing behind: the journal's undo in-process, a
//! `weights convert` child stopped by SIGINT mid-write (no temporary, the
//! output folder as it was), and one killed by SIGKILL whose leftovers the
//! next run removes, saying so.
//!
//! One test function: the in-process undo removes every file this test
//! binary journalled, so nothing else may run beside it.
#![cfg(target_os = "linux")]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use weights::atomic::{self, AtomicFile, OnInterrupt};
use weights::{StateDict, Tensor};

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn temporaries(dir: &Path) -> Vec<String> {
    listing(dir)
        .into_iter()
        .filter(|n| n.ends_with(".tmp"))
        .collect()
}

/// A checkpoint big enough that converting it takes a while: 24 tensors of
/// 4 MB, written to 24 shards that are each fsynced.
fn big_checkpoint(path: &Path) {
    let mut sd = StateDict::new();
    for i in 0..24 {
        let data = ndarray::ArrayD::from_shape_fn(vec![1024, 1024], |ix| {
            (ix[0] * 31 + ix[1] * 7 + i) as f32 * 1e-3
        });
        sd.insert(format!("layers.{i}.weight"), Tensor::f32(data));
    }
    sd.save_safetensors(path).unwrap();
}

/// Starts `weights convert input out --dtype bf16` and waits until it is
/// writing (a temporary exists in `out`); `None` when it finished first.
fn convert_until_writing(input: &Path, out: &Path) -> Option<std::process::Child> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_weights"))
        .args(["convert", input.to_str().unwrap(), out.to_str().unwrap()])
        .args(["--dtype", "bf16", "--shard-size", "1MB"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        if !temporaries(out).is_empty() {
            return Some(child);
        }
        if child.try_wait().unwrap().is_some() {
            return None;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("no temporary appeared in {} within 60 s", out.display());
}

fn signal(child: &std::process::Child, sig: i32) {
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

#[test]
fn interrupted_and_killed_runs_leave_nothing_behind() {
    // In-process: undo removes the live temporary and what this process
    // created, and keeps what was there before (even if overwritten).
    let dir = tempfile::tempdir().unwrap();
    let mine = dir.path().join("mine.txt");
    std::fs::write(&mine, b"before").unwrap();
    let out = dir.path().join("new/deeper");
    atomic::create_dir_all(&out).unwrap();
    atomic::write_atomic(out.join("a.json"), b"{}").unwrap();
    atomic::write_atomic(&mine, b"overwritten").unwrap();
    let mut live = AtomicFile::create(out.join("b.bin")).unwrap();
    live.file().write_all(b"partial").unwrap();
    let undone = atomic::undo(OnInterrupt::RestoreOutputs);
    assert_eq!((undone.temporaries, undone.outputs), (1, 3), "{undone:?}");
    assert_eq!(listing(dir.path()), vec!["mine.txt".to_string()]);
    assert_eq!(std::fs::read(&mine).unwrap(), b"overwritten");
    drop(live);

    // A child stopped by SIGINT mid-write: status 130, no temporary, the
    // folder it wrote into holds what it held before, and nothing else.
    let input = dir.path().join("big.safetensors");
    big_checkpoint(&input);
    atomic::keep_outputs();
    let target = dir.path().join("converted");
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("notes.txt"), b"the user's").unwrap();
    let mut interrupted = false;
    for _ in 0..3 {
        let Some(child) = convert_until_writing(&input, &target) else {
            // Finished before we saw it writing: clean up and try again.
            for n in listing(&target) {
                if n != "notes.txt" {
                    std::fs::remove_file(target.join(n)).unwrap();
                }
            }
            continue;
        };
        signal(&child, libc::SIGINT);
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(130), "{stderr}");
        assert!(stderr.contains("interrupted: removed"), "{stderr}");
        assert_eq!(listing(&target), vec!["notes.txt".to_string()], "{stderr}");
        interrupted = true;
        break;
    }
    assert!(interrupted, "the conversion always finished before SIGINT");

    // SIGKILL cannot be handled: the temporary stays; the next run into the
    // same folder removes it, says so, and leaves a complete checkpoint.
    let killed: PathBuf = dir.path().join("killed");
    let child = (0..3)
        .find_map(|_| {
            let c = convert_until_writing(&input, &killed);
            if c.is_none() {
                // Finished before we saw it writing: start afresh.
                let _ = std::fs::remove_dir_all(&killed);
            }
            c
        })
        .expect("the conversion always finished before SIGKILL");
    signal(&child, libc::SIGKILL);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), None, "killed by a signal");
    let left = temporaries(&killed);
    assert!(
        !left.is_empty(),
        "SIGKILL left no temporary: {:?}",
        listing(&killed)
    );
    let again = Command::new(env!("CARGO_BIN_EXE_weights"))
        .args(["convert", input.to_str().unwrap(), killed.to_str().unwrap()])
        .args(["--dtype", "bf16", "--shard-size", "1MB"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{stderr}");
    assert!(temporaries(&killed).is_empty(), "{:?}", listing(&killed));
    for t in &left {
        assert!(
            stderr.contains(t.as_str()),
            "the run did not say it removed {t}: {stderr}"
        );
    }
    let ckpt = weights::Checkpoint::open(&killed).unwrap();
    assert_eq!(weights::TensorSource::infos(&ckpt).len(), 24);
}
