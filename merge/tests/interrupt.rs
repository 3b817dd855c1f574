//! The `merge` binary interrupted mid-merge (SIGINT) leaves the output folder
//! as it was: no temporary shard, no copied config, no `mergekit_config.yml`;
//! and a user's mistake is one `error:` line, never a backtrace.
#![cfg(target_os = "linux")]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

/// Three 96 MB models (24 tensors of 4 MB) with a config.json, and a linear
/// config merging them into 1 MB shards (each fsynced: the merge takes a while).
fn setup(dir: &Path) -> std::path::PathBuf {
    for m in 0..3 {
        let d = dir.join(format!("m{m}"));
        std::fs::create_dir_all(&d).unwrap();
        let mut sd = StateDict::new();
        for i in 0..24 {
            let data = ndarray::ArrayD::from_shape_fn(vec![1024, 1024], |ix| {
                (ix[0] + ix[1] + i + m) as f32 * 1e-3
            });
            sd.insert(format!("layers.{i}.weight"), Tensor::f32(data));
        }
        sd.save_safetensors(d.join("model.safetensors")).unwrap();
        std::fs::write(d.join("config.json"), b"{\"model_type\": \"llama\"}").unwrap();
    }
    let cfg = dir.join("linear.yml");
    std::fs::write(
        &cfg,
        "merge_method: linear\nmodels:\n  - {model: m0, parameters: {weight: 1.0}}\n  - {model: m1, parameters: {weight: 1.0}}\n  - {model: m2, parameters: {weight: 1.0}}\n",
    )
    .unwrap();
    cfg
}

#[test]
fn sigint_mid_merge_leaves_the_output_folder_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path());
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("README.md"), b"the user's").unwrap();
    let mut done = false;
    for _ in 0..3 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_merge"))
            .args([cfg.to_str().unwrap(), out.to_str().unwrap(), "--quiet"])
            .args(["--shard-size", "1MB"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let start = Instant::now();
        let mut writing = false;
        while start.elapsed() < Duration::from_secs(120) {
            if listing(&out).iter().any(|n| n.ends_with(".tmp")) {
                writing = true;
                break;
            }
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        if !writing {
            // Finished before we saw a shard being written: reset, try again.
            child.wait().unwrap();
            for n in listing(&out) {
                if n != "README.md" {
                    std::fs::remove_file(out.join(n)).unwrap();
                }
            }
            continue;
        }
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
        let res = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&res.stderr);
        assert_eq!(res.status.code(), Some(130), "{stderr}");
        assert_eq!(listing(&out), vec!["README.md".to_string()], "{stderr}");
        done = true;
        break;
    }
    assert!(done, "the merge always finished before SIGINT");
}

#[test]
fn a_user_mistake_is_one_error_line_without_backtrace() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.yml");
    std::fs::write(
        &cfg,
        "merge_method: tie\nmodels:\n  - {model: a}\n  - {model: b}\n",
    )
    .unwrap();
    let res = Command::new(env!("CARGO_BIN_EXE_merge"))
        .args([
            cfg.to_str().unwrap(),
            dir.path().join("out").to_str().unwrap(),
        ])
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: ") && err.contains("tie"), "{err}");
    assert!(!err.to_lowercase().contains("backtrace"), "{err}");
    assert!(!dir.path().join("out").exists());
}
