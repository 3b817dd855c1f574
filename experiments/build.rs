//! Records the commit the studies are built from, for the `git_commit` of
//! every run record: `EXPERIMENTS_GIT_COMMIT` is `git rev-parse --short=12
//! HEAD` at build time, with `-dirty` when the workspace's sources (the
//! library crates' and this crate's `src`, their manifests, the lock file,
//! this script) differ from that commit, and `unknown` outside a git
//! checkout. Read at run time instead, a study running for hours would
//! record whatever was checked out when it finished.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The crates whose code a study runs.
const CRATES: [&str; 6] = [
    "weights",
    "spectra",
    "permute",
    "merge",
    "s2ft-core",
    "experiments",
];

fn git(root: &Path, args: &[&str]) -> Option<String> {
    // `--no-optional-locks`: `git status` would otherwise refresh the index
    // file, which this script watches, and so rerun at every build.
    let out = Command::new("git")
        .arg("--no-optional-locks")
        .arg("-C")
        .arg(root)
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest
        .parent()
        .expect("the crate is in the workspace")
        .to_path_buf();
    let mut sources: Vec<PathBuf> = vec![
        root.join("Cargo.toml"),
        root.join("Cargo.lock"),
        manifest.join("build.rs"),
    ];
    for c in CRATES {
        sources.push(root.join(c).join("src"));
        sources.push(root.join(c).join("Cargo.toml"));
    }
    // Rerun when a source changes (dirty or clean again) or the checkout
    // moves (a commit, a checkout); only paths that exist, since cargo
    // reruns at every build for a missing one.
    let mut watched = sources.clone();
    for (flag, names) in [
        ("--git-dir", &["HEAD", "index"][..]),
        ("--git-common-dir", &["refs/heads", "packed-refs"][..]),
    ] {
        if let Some(dir) = git(&root, &["rev-parse", flag]) {
            let dir = root.join(dir);
            watched.extend(names.iter().map(|n| dir.join(n)));
        }
    }
    for p in watched.iter().filter(|p| p.exists()) {
        println!("cargo::rerun-if-changed={}", p.display());
    }
    let commit = match git(&root, &["rev-parse", "--short=12", "HEAD"]) {
        Some(head) => {
            let mut status = vec!["status", "--porcelain", "--"];
            let paths: Vec<String> = sources.iter().map(|p| p.display().to_string()).collect();
            status.extend(paths.iter().map(String::as_str));
            match git(&root, &status) {
                Some(s) if s.is_empty() => head,
                _ => format!("{head}-dirty"),
            }
        }
        None => "unknown".into(),
    };
    println!("cargo::rustc-env=EXPERIMENTS_GIT_COMMIT={commit}");
}
