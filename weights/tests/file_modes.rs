//! Files the atomic writer creates get `0666 & !umask`, as any other tool's
//! (tempfile's default 0600 would hide a model folder from other users).
//! Its own test binary: the umask is process-wide.
#![cfg(target_os = "linux")]

use std::os::unix::fs::PermissionsExt;

use weights::{StateDict, Tensor};

#[test]
fn written_files_follow_the_umask() {
    let dir = tempfile::tempdir().unwrap();
    let mut sd = StateDict::new();
    sd.insert("w", Tensor::f32(ndarray::ArrayD::zeros(vec![2, 2])));
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    for (umask, want) in [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)] {
        let old = unsafe { libc::umask(umask) };
        let file = dir.path().join(format!("m{umask:o}.safetensors"));
        sd.save_safetensors(&file).unwrap();
        let folder = dir.path().join(format!("sharded{umask:o}"));
        sd.save_sharded(&folder, 1).unwrap();
        unsafe { libc::umask(old) };
        assert_eq!(mode(&file), want, "umask {umask:o}: {}", file.display());
        for e in std::fs::read_dir(&folder).unwrap().flatten() {
            assert_eq!(
                mode(&e.path()),
                want,
                "umask {umask:o}: {}",
                e.path().display()
            );
        }
    }
}
