//! The report over a checkpoint and the `spectra` command line.

use std::process::Command;

use ndarray::{ArrayD, IxDyn};
use spectra::report::{ReportOptions, analyze_source, to_csv};
use weights::rng::Rng;
use weights::{DType, StateDict, Tensor};

fn gaussian(shape: &[usize], seed: u64) -> ArrayD<f32> {
    let mut rng = Rng::new(seed);
    rng.normal_array(IxDyn(shape))
}

fn model() -> StateDict {
    let mut sd = StateDict::new();
    sd.insert("fc1.weight", Tensor::f32(gaussian(&[300, 120], 1)));
    sd.insert("fc1.bias", Tensor::f32(gaussian(&[300], 2)));
    sd.insert(
        "conv.weight",
        Tensor::new(gaussian(&[32, 16, 3, 3], 3), DType::BF16),
    );
    let mut nan = gaussian(&[50, 40], 4);
    nan[[3, 3]] = f32::NAN;
    sd.insert("broken.weight", Tensor::f32(nan));
    sd.insert("zero.weight", Tensor::f32(ArrayD::zeros(IxDyn(&[20, 30]))));
    sd.insert("tiny.weight", Tensor::f32(gaussian(&[3, 50], 5)));
    sd.insert(
        "ids",
        Tensor::new(ArrayD::from_elem(IxDyn(&[4, 4]), 1.0), DType::I64),
    );
    sd
}

#[test]
fn every_matrix_gets_a_row_with_a_status_and_no_nan() {
    let sd = model();
    let rows = analyze_source(&sd, &ReportOptions::default(), &|_, _, _| {}).unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "fc1.weight",
            "conv.weight",
            "broken.weight",
            "zero.weight",
            "tiny.weight"
        ],
        "1-D and integer tensors are not matrices"
    );
    let fc1 = &rows[0];
    assert_eq!(fc1.status, "fitted");
    assert_eq!((fc1.n, fc1.m, fc1.num_evals), (300, 120, 120));
    assert_eq!(fc1.num_spikes, Some(0), "Gaussian weights have no spikes");
    let conv = &rows[1];
    assert_eq!((conv.num_matrices, conv.num_evals), (9, 9 * 16));
    assert!(
        rows[2].status.starts_with("error:") && rows[2].status.contains("non-finite"),
        "{}",
        rows[2].status
    );
    assert!(
        rows[3].status.starts_with("not fitted"),
        "{}",
        rows[3].status
    );
    assert_eq!(
        rows[3].log_norm, None,
        "log10(0) is reported as missing, not -inf"
    );
    assert!(
        rows[4].status.contains("fewer than 8"),
        "{}",
        rows[4].status
    );
    for r in &rows {
        let values = [
            r.alpha,
            r.xmin,
            r.xmax,
            r.ks_distance,
            r.sigma,
            r.alpha_weighted,
            r.log_alpha_norm,
            r.log_norm,
            r.log_spectral_norm,
            r.stable_rank,
            r.entropy,
            r.effective_rank,
            r.mp_bulk_max,
            r.mp_softrank,
        ];
        assert!(
            values.iter().flatten().all(|v| v.is_finite()),
            "{}: {values:?}",
            r.name
        );
    }
    let csv = to_csv(&rows);
    assert_eq!(csv.lines().count(), 6);
    assert!(
        csv.lines()
            .nth(2)
            .unwrap()
            .starts_with("conv.weight,32x16x3x3,")
    );
}

#[test]
fn min_evals_controls_what_is_fitted() {
    let sd = model();
    let opts = ReportOptions {
        min_evals: 200,
        ..Default::default()
    };
    let rows = analyze_source(&sd, &opts, &|_, _, _| {}).unwrap();
    assert!(rows[0].status.contains("fewer than 200"));
    assert!(rows[0].alpha.is_none() && rows[0].stable_rank.is_some());
}

#[test]
fn cli_json_and_csv_are_the_library_report() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    model().save_safetensors(&path).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_spectra"))
        .args([
            "report",
            path.to_str().unwrap(),
            "--json",
            "--farms",
            "--min-evals",
            "8",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.len(), 5);
    for key in [
        "name",
        "shape",
        "alpha",
        "xmin",
        "ks_distance",
        "num_pl_spikes",
        "alpha_weighted",
        "log_norm",
        "log_spectral_norm",
        "stable_rank",
        "num_spikes",
        "mp_softrank",
        "farms_alpha",
    ] {
        assert!(rows[0].get(key).is_some(), "missing {key}");
    }
    assert!(rows[0]["farms_alpha"].as_f64().is_some());
    // And the values are the library's on the same file (to 1e-12: parallel
    // sums may round their last bit differently from run to run).
    let ckpt = weights::Checkpoint::open(&path).unwrap();
    let lib_opts = ReportOptions {
        farms: Some(spectra::farms::FarmsOptions::default()),
        min_evals: 8,
        ..ReportOptions::default()
    };
    let lib = analyze_source(&ckpt, &lib_opts, &|_, _, _| {}).unwrap();
    same_json(
        &serde_json::Value::Array(rows.clone()),
        &serde_json::to_value(&lib).unwrap(),
        "rows",
    );
    assert!(lib.iter().any(|r| r.alpha.is_some_and(|a| a > 1.0)));
    // Without --farms the key is absent.
    let csv_path = dir.path().join("r.csv");
    let st = Command::new(env!("CARGO_BIN_EXE_spectra"))
        .args([
            "report",
            path.to_str().unwrap(),
            "--csv",
            "--out",
            csv_path.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let lib = analyze_source(&ckpt, &ReportOptions::default(), &|_, _, _| {}).unwrap();
    let (ours, want) = (std::fs::read_to_string(&csv_path).unwrap(), to_csv(&lib));
    assert_eq!(ours.lines().count(), want.lines().count());
    for (a, b) in ours.lines().zip(want.lines()) {
        for (x, y) in a.split(',').zip(b.split(',')) {
            match (x.parse::<f64>(), y.parse::<f64>()) {
                (Ok(p), Ok(q)) => assert!((p - q).abs() <= 1e-12 * q.abs().max(1.0), "{a}\n{b}"),
                _ => assert_eq!(x, y, "{a}\n{b}"),
            }
        }
    }
    let bad = Command::new(env!("CARGO_BIN_EXE_spectra"))
        .args(["report", "/nonexistent.safetensors"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("/nonexistent.safetensors"));
}

/// Equal JSON, numbers to 1e-12 relative.
fn same_json(a: &serde_json::Value, b: &serde_json::Value, at: &str) {
    use serde_json::Value::*;
    match (a, b) {
        (Number(x), Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!(
                (x - y).abs() <= 1e-12 * y.abs().max(1.0),
                "{at}: {x} vs {y}"
            );
        }
        (Array(x), Array(y)) => {
            assert_eq!(x.len(), y.len(), "{at}");
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                same_json(p, q, &format!("{at}[{i}]"));
            }
        }
        (Object(x), Object(y)) => {
            assert_eq!(
                x.keys().collect::<Vec<_>>(),
                y.keys().collect::<Vec<_>>(),
                "{at}"
            );
            for (k, v) in x {
                same_json(v, &y[k], &format!("{at}.{k}"));
            }
        }
        _ => assert_eq!(a, b, "{at}"),
    }
}
