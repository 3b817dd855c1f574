//! The workspace's real-model tests: one rule for the pretrained files that
//! `scripts/fetch-models.sh` puts under `models/`. Tests that need them are
//! `#[ignore = "needs models/ from scripts/fetch-models.sh; run with --ignored"]`d, so a plain `cargo test` reports them as ignored
//! (never as passed) whether or not the files are there; `cargo test --
//! --ignored` runs them, and then a missing file is a failure that names the
//! script. `.ci/run` fetches the models and runs both.

use std::path::{Path, PathBuf};

/// `models/REL` of this workspace. Panics, naming the fetch script, when the
/// file is absent (only `--ignored` runs reach here).
pub fn fetched_model(rel: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models")
        .join(rel);
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-models.sh first",
        p.display()
    );
    p
}
