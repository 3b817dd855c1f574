//! all-MiniLM-L6-v2 against WeightWatcher's own fit (fixtures/ww_reference.py).
//! `#[ignore]`d (see `weights::testing`): `cargo test -- --ignored` runs it, as CI does.

use std::path::Path;

use spectra::report::{ReportOptions, analyze_source};
use weights::Checkpoint;

/// A JSON file of `tests/fixtures`.
fn fixture(name: &str) -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// `ours` within `tol` (relative, absolute below 1) of `reference[key]`.
fn assert_close(what: &str, key: &str, ours: Option<f64>, reference: &serde_json::Value, tol: f64) {
    let theirs = reference[key].as_f64().unwrap();
    let ours = ours.unwrap_or_else(|| panic!("{what}: {key} missing"));
    assert!(
        (ours - theirs).abs() <= tol * theirs.abs().max(1.0),
        "{what}: {key} {ours} vs WeightWatcher {theirs}"
    );
}

#[test]
#[ignore = "needs models/ from scripts/fetch-models.sh; run with --ignored"]
fn minilm_matches_weightwatcher() {
    let path = weights::testing::fetched_model("all-MiniLM-L6-v2/model.safetensors");
    let reference = fixture("ww_minilm.json");
    let layers = reference["layers"].as_object().unwrap();
    let ckpt = Checkpoint::open(&path).unwrap();
    let rows = analyze_source(&ckpt, &ReportOptions::default(), &|_, _, _| {}).unwrap();
    assert_eq!(rows.len(), layers.len());
    let mut worst = (0f64, String::new());
    let mut same_xmin = 0;
    let mut fitted = 0;
    for r in &rows {
        let w = &layers[&r.name];
        let close = |ours, key, tol| assert_close(&r.name, key, ours, w, tol);
        close(r.log_norm, "log_norm", 1e-5);
        close(r.log_spectral_norm, "log_spectral_norm", 1e-5);
        close(r.stable_rank, "stable_rank", 1e-4);
        if w.get("alpha").is_none() {
            assert!(r.alpha.is_none(), "{}", r.name);
            continue;
        }
        fitted += 1;
        let (a, wa) = (r.alpha.unwrap(), w["alpha"].as_f64().unwrap());
        if (r.xmin.unwrap() - w["xmin"].as_f64().unwrap()).abs()
            <= 1e-4 * w["xmin"].as_f64().unwrap()
        {
            same_xmin += 1;
            close(r.alpha, "alpha", 1e-3);
            close(r.ks_distance, "ks_distance", 1e-3);
            assert_eq!(
                r.num_pl_spikes.unwrap() as u64,
                w["num_pl_spikes"].as_u64().unwrap(),
                "{}",
                r.name
            );
            close(r.alpha_weighted, "alpha_weighted", 1e-3);
        }
        if (a - wa).abs() > worst.0 {
            worst = ((a - wa).abs(), r.name.clone());
        }
    }
    // f32 SVDs (ours: faer, theirs: LAPACK) differ in the last bits, which could
    // move xmin to a neighbouring eigenvalue of near-equal KS distance; on this
    // model it never does (measured: 39/39 fitted layers, |Δα| ≤ 2.7e-4).
    eprintln!(
        "same xmin on {same_xmin}/{fitted} fitted layers; largest alpha difference {worst:?}"
    );
    assert_eq!(fitted, 39);
    assert_eq!(same_xmin, fitted);
    assert!(worst.0 < 1e-3, "{worst:?}");
}

/// `fix_fingers = 'clip_xmax'` against WeightWatcher's own `fit_powerlaw`
/// (the fixture's `clip` rows): same α, xmin, D, xmax, fingers clipped and
/// tail size on every fitted layer, 11 of which WeightWatcher clips.
#[test]
#[ignore = "needs models/ from scripts/fetch-models.sh; run with --ignored"]
fn minilm_clip_xmax_matches_weightwatcher() {
    let path = weights::testing::fetched_model("all-MiniLM-L6-v2/model.safetensors");
    let reference = fixture("ww_minilm.json");
    let layers = reference["layers"].as_object().unwrap();
    let opts = ReportOptions {
        fix_fingers: spectra::powerlaw::FixFingers::ClipXmax {
            max_fingers: 10,
            finger_thresh: 1.0,
        },
        ..Default::default()
    };
    let ckpt = Checkpoint::open(&path).unwrap();
    let rows = analyze_source(&ckpt, &opts, &|_, _, _| {}).unwrap();
    let (mut compared, mut clipped, mut peak_failed) = (0, 0, 0);
    for r in &rows {
        let w = &layers[&r.name];
        let Some(clip) = w.get("clip") else {
            continue;
        };
        assert_eq!(clip["status"], "success", "{}", r.name);
        let what = format!("{} (clip_xmax)", r.name);
        let close = |ours, key, tol| assert_close(&what, key, ours, clip, tol);
        close(r.alpha, "alpha", 1e-3);
        close(r.xmin, "xmin", 1e-4);
        close(r.xmax, "xmax", 1e-4);
        close(r.ks_distance, "ks_distance", 1e-3);
        let fingers = clip["num_fingers"].as_u64().unwrap();
        assert_eq!(r.num_fingers.map(|f| f as u64), Some(fingers), "{}", r.name);
        assert_eq!(
            r.num_pl_spikes.map(|n| n as u64),
            clip["num_pl_spikes"].as_u64(),
            "{}: num_pl_spikes",
            r.name
        );
        compared += 1;
        clipped += usize::from(fingers > 0);
        // WeightWatcher 0.7.7's xmin_peak fails on every layer (see the fixture script).
        peak_failed += usize::from(w["peak"]["status"] == "failed");
    }
    assert_eq!(compared, 39);
    assert_eq!(clipped, 11, "layers WeightWatcher clips");
    assert_eq!(peak_failed, 39);
}

/// A fingered spectrum (MiniLM's `encoder.layer.4.attention.self.value`,
/// eigenvalues stored in the fixture, so no model is needed): plain α 8.4,
/// and WeightWatcher's `clip_xmax` drops the finger to α 2.5 — ours too.
#[test]
fn clip_xmax_on_a_fingered_spectrum_matches_weightwatcher() {
    use spectra::powerlaw::{FixFingers, fit_power_law};
    let f = fixture("ww_finger.json");
    let evals: Vec<f64> = f["evals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let plain = fit_power_law(&evals, FixFingers::None, 8).unwrap();
    assert!((plain.alpha - f["plain"].as_f64().unwrap()).abs() < 1e-9);
    let fit = fit_power_law(
        &evals,
        FixFingers::ClipXmax {
            max_fingers: 10,
            finger_thresh: 1.0,
        },
        8,
    )
    .unwrap();
    let c = &f["clip"];
    let close = |ours, key| assert_close("fingered spectrum", key, Some(ours), c, 1e-9);
    close(fit.alpha, "alpha");
    close(fit.xmin, "xmin");
    close(fit.xmax, "xmax");
    close(fit.ks_distance, "ks_distance");
    assert_eq!(fit.num_fingers as u64, c["num_fingers"].as_u64().unwrap());
    assert_eq!(
        fit.num_pl_spikes as u64,
        c["num_pl_spikes"].as_u64().unwrap()
    );
    assert!(fit.alpha + 1.0 < plain.alpha, "clipping lowers alpha");
}
