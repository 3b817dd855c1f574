//! The `permute match` command line.

use std::process::Command;

use ndarray::{ArrayD, IxDyn};
use permute::builders::mlp;
use permute::spec::apply;
use weights::rng::Rng;
use weights::{StateDict, Tensor};

#[test]
fn match_writes_the_aligned_model_and_reports_json() {
    let mut rng = Rng::new(1);
    let mut a = StateDict::new();
    for (i, (o, n)) in [(32usize, 10usize), (32, 32), (4, 32)]
        .into_iter()
        .enumerate()
    {
        a.insert(
            format!("fc{}.weight", i + 1),
            Tensor::f32(ArrayD::from_shape_fn(IxDyn(&[o, n]), |_| {
                rng.normal() as f32
            })),
        );
        a.insert(
            format!("fc{}.bias", i + 1),
            Tensor::f32(rng.normal_array(IxDyn(&[o]))),
        );
    }
    let spec = mlp(&a).unwrap();
    let perm = spec.random(2);
    let b = apply(&spec, &perm, &a).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (pa, pb, out) = (
        dir.path().join("a.safetensors"),
        dir.path().join("b.safetensors"),
        dir.path().join("b_aligned.safetensors"),
    );
    a.save_safetensors(&pa).unwrap();
    b.save_safetensors(&pb).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_permute"))
        .args([
            "match",
            pa.to_str().unwrap(),
            pb.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--json",
            "--seed",
            "3",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for k in ["l2_before", "l2_after", "passes", "objective", "seconds"] {
        assert!(v.get(k).is_some(), "missing {k}");
    }
    assert_eq!(v["arch"], "mlp");
    assert!(v["l2_after"].as_f64().unwrap() < 1e-5);
    let aligned = StateDict::load(&out).unwrap();
    assert_eq!(aligned, a);

    let refuse = Command::new(env!("CARGO_BIN_EXE_permute"))
        .args([
            "match",
            pa.to_str().unwrap(),
            pb.to_str().unwrap(),
            "--out",
            pb.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!refuse.status.success());
    let mut wrong = StateDict::new();
    wrong.insert("fc1.weight", Tensor::f32(ArrayD::zeros(IxDyn(&[3, 10]))));
    wrong.insert("fc2.weight", Tensor::f32(ArrayD::zeros(IxDyn(&[4, 3]))));
    let pw = dir.path().join("w.safetensors");
    wrong.save_safetensors(&pw).unwrap();
    let bad = Command::new(env!("CARGO_BIN_EXE_permute"))
        .args(["match", pa.to_str().unwrap(), pw.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("fc1.weight"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}
