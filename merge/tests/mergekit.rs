//! The same configs through mergekit 0.1.5 (`fixtures/mergekit_reference.py`
//! wrote `fixtures/expected/`) and through this crate give the same tensors;
//! so do the merges mergekit lacks (TSV-M, Iso-C, Iso-CTS) and their authors'
//! algorithms re-run in torch (`fixtures/svd_reference.py` wrote
//! `fixtures/svd/expected/`), and RegMean and a numpy reference
//! (`fixtures/regmean_reference.py` wrote `fixtures/regmean/`).

use std::path::Path;

use merge::run::{RunOptions, run_file};
use weights::{Checkpoint, TensorSource};

fn fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Runs `DIR/configs/<name>.yml` and returns the largest deviation from
/// `DIR/expected/<name>.safetensors`, relative to each tensor's max |value|.
fn compare_in(dir: &Path, name: &str, opts: &RunOptions) -> f64 {
    let fixtures = dir;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let cfg = fixtures.join("configs").join(format!("{name}.yml"));
    run_file(&cfg, &out, opts).unwrap_or_else(|e| panic!("{name}: {e}"));
    let ours = Checkpoint::open(&out).unwrap();
    let theirs = Checkpoint::open(
        fixtures
            .join("expected")
            .join(format!("{name}.safetensors")),
    )
    .unwrap();
    let mut names: Vec<String> = ours.names();
    let mut want: Vec<String> = theirs.names();
    names.sort();
    want.sort();
    assert_eq!(names, want, "{name}: tensor names differ");
    let mut worst = 0f64;
    for n in &names {
        let (a, b) = (ours.load(n).unwrap(), theirs.load(n).unwrap());
        assert_eq!(a.shape(), b.shape(), "{name}: {n}");
        let scale = b.data.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6) as f64;
        for (x, y) in a.data.iter().zip(b.data.iter()) {
            worst = worst.max(((x - y).abs() as f64) / scale);
        }
    }
    worst
}

/// One test per config: `DIR/configs/NAME.yml` run with `OPTS` gives the
/// tensors of `DIR/expected/NAME.safetensors` to `TOL` of each tensor's max.
macro_rules! same_tensors {
    ($dir:literal, $opts:expr; $($test:ident: $name:literal, $tol:expr;)*) => {$(
        #[test]
        fn $test() {
            let dev = compare_in(&fixtures().join($dir), $name, &$opts);
            eprintln!("{}: max deviation {dev:e}", $name);
            assert!(dev <= $tol, "{}: max deviation {dev:e} relative to the tensor's max |value|", $name);
        }
    )*};
}

// mergekit-yaml 0.1.5 (`fixtures/mergekit_reference.py`).
same_tensors! {
    "", RunOptions::default();
    linear_with_filters_and_gradients: "linear", 1e-6;
    slerp_with_filtered_gradients: "slerp", 1e-6;
    nuslerp_row_vectors: "nuslerp", 1e-6;
    task_arithmetic_with_lambda: "task_arithmetic", 1e-6;
    ties: "ties", 1e-6;
    ties_rescaled: "ties_rescale", 1e-6;
    breadcrumbs: "breadcrumbs", 1e-6;
    breadcrumbs_ties: "breadcrumbs_ties", 1e-6;
    model_stock: "model_stock", 1e-6;
    model_stock_filter_wise: "model_stock_filter", 1e-6;
    karcher: "karcher", 1e-6;
    passthrough_slices_renumber_layers: "passthrough_slices", 0.0;
    slerp_over_a_slice: "slerp_slices", 1e-6;
    sce_with_variance_selection: "sce", 1e-6;
    sce_without_selection: "sce_all", 1e-6;
    multislerp_of_task_vectors: "multislerp", 1e-6;
    multislerp_without_base: "multislerp_nobase", 1e-6;
    nearswap: "nearswap", 1e-6;
    arcee_fusion: "arcee_fusion", 1e-6;
    ram: "ram", 1e-6;
    ramplus_tensor_local: "ramplus_tl", 1e-6;
}

// The TSV-M and Iso authors' algorithms in torch (`fixtures/svd_reference.py`).
same_tensors! {
    "svd", RunOptions::default();
    tsv_m_full_rank: "tsv_m", 1e-5;
    tsv_m_rank_budget_and_lambda: "tsv_m_rank", 1e-5;
    iso_c: "iso_c", 1e-5;
    iso_cts: "iso_cts", 1e-5;
    iso_cts_two_tasks_half_common: "iso_cts_half", 1e-5;
}

// RegMean in numpy (`fixtures/regmean_reference.py`).
same_tensors! {
    "regmean", RunOptions::default();
    regmean_scaled_off_diagonal: "regmean", 1e-5;
    regmean_diagonal_with_ridge: "regmean_diagonal_ridge", 1e-5;
}

/// `merge extract-lora`'s library call against `mergekit-extract-lora`'s
/// adapters (`fixtures/extract_lora_reference.py`): the same modules at the
/// same ranks (singular values kept), the same full-rank tensors, the same
/// ΔW = s·B·A per module.
fn same_extraction_as_mergekit(case: &str, opts: merge::extract::ExtractOptions) {
    use merge::lora::LoraAdapter;
    let tiny = fixtures().join("tiny");
    let base = Checkpoint::open(tiny.join("base")).unwrap();
    let ft = Checkpoint::open(tiny.join("a")).unwrap();
    let ours = merge::extract::extract_lora(&base, &ft, &opts).unwrap();
    // Through a save and load, as a user gets it.
    let dir = tempfile::tempdir().unwrap();
    merge::extract::save_extraction(&ours, dir.path()).unwrap();
    let ours = LoraAdapter::load(dir.path()).unwrap();
    let theirs = LoraAdapter::load(fixtures().join("extract").join(case)).unwrap();
    let sorted = |v: &[String]| {
        let mut v = v.to_vec();
        v.sort();
        v
    };
    assert_eq!(ours.config.r, theirs.config.r, "{case}: r");
    assert_eq!(
        sorted(&ours.config.target_modules),
        sorted(&theirs.config.target_modules),
        "{case}"
    );
    let mut mods: Vec<&String> = ours.modules.keys().collect();
    let mut want: Vec<&String> = theirs.modules.keys().collect();
    mods.sort();
    want.sort();
    assert_eq!(mods, want, "{case}: extracted modules");
    let mut worst = 0f32;
    for w in theirs.modules.keys() {
        let m = w.strip_suffix(".weight").unwrap();
        assert_eq!(
            ours.config.rank_of(m),
            theirs.config.rank_of(m),
            "{case}: {w} rank"
        );
        let (a, b) = (ours.delta(w).unwrap(), theirs.delta(w).unwrap());
        let scale = b.iter().fold(0f32, |s, v| s.max(v.abs())).max(1e-6);
        worst = worst.max(
            a.iter()
                .zip(b.iter())
                .fold(0f32, |s, (x, y)| s.max((x - y).abs() / scale)),
        );
    }
    eprintln!("{case}: max ΔW deviation {worst:e}");
    // Both SVDs are f32 (torch, faer): ΔW agrees to a few ulps of its largest entry.
    assert!(worst < 3e-5, "{case}: ΔW deviates by {worst}");
    let mut full: Vec<&String> = ours.full.keys().collect();
    let mut want: Vec<&String> = theirs.full.keys().collect();
    full.sort();
    want.sort();
    assert_eq!(full, want, "{case}: full-rank tensors");
    for (n, t) in &theirs.full {
        assert_eq!(ours.full[n].data, t.data, "{case}: {n}");
    }
}

#[test]
fn extract_lora_rank_4() {
    same_extraction_as_mergekit(
        "rank4",
        merge::extract::ExtractOptions {
            max_rank: 4,
            ..Default::default()
        },
    );
}

#[test]
fn extract_lora_sv_epsilon_without_distributed_scale() {
    same_extraction_as_mergekit(
        "epsilon_no_distribute",
        merge::extract::ExtractOptions {
            max_rank: 6,
            sv_epsilon: 0.06,
            distribute_scale: false,
            ..Default::default()
        },
    );
}

#[test]
fn extract_lora_full_rank_excluding_the_mlp() {
    same_extraction_as_mergekit(
        "full_rank_exclude_mlp",
        merge::extract::ExtractOptions {
            max_rank: 16,
            exclude: vec!["mlp".into()],
            ..Default::default()
        },
    );
}

// DARE and DELLA with mergekit's `torch.bernoulli` fed this crate's
// value-hash draws (`fixtures/draws_reference.py`): the full pipelines agree.
same_tensors! {
    "draws", RunOptions { draws: merge::sparsify::Draws::ValueHash, ..Default::default() };
    dare_ties_with_drawn_masks: "dare_ties", 1e-6;
    dare_linear_without_rescale_with_drawn_masks: "dare_linear_norescale", 1e-6;
    della_with_drawn_masks: "della", 1e-6;
    della_linear_with_drawn_masks: "della_linear", 1e-6;
}
