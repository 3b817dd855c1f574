//! PEFT adapters, RMM, LoRA-LEGO and shared-basis merging.

use indexmap::IndexMap;
use merge::lora::{LoraAdapter, LoraConfig, LoraPair, kmeans, lora_lego, rmm_fit, shared_basis};
use ndarray::{Array2, array};
use weights::{StateDict, Tensor};

fn gauss(r: usize, c: usize, seed: u64) -> Array2<f32> {
    let mut g = weights::rng::Rng::new(seed);
    Array2::from_shape_fn((r, c), |_| g.normal() as f32)
}

const W: [&str; 2] = [
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
];

fn adapter(rank: usize, alpha: f64, seed: u64) -> LoraAdapter {
    let mut modules = IndexMap::new();
    modules.insert(
        W[0].to_string(),
        LoraPair {
            a: gauss(rank, 8, seed),
            b: gauss(8, rank, seed + 1),
        },
    );
    modules.insert(
        W[1].to_string(),
        LoraPair {
            a: gauss(rank, 12, seed + 2),
            b: gauss(8, rank, seed + 3),
        },
    );
    LoraAdapter {
        config: LoraConfig::new(rank, alpha, &["q_proj", "down_proj"]),
        modules,
        full: Default::default(),
    }
}

fn close(a: &Array2<f32>, b: &Array2<f32>, tol: f32) -> bool {
    a.shape() == b.shape()
        && a.iter()
            .zip(b.iter())
            .all(|(x, y)| (x - y).abs() <= tol * (1.0 + y.abs()))
}

#[test]
fn peft_round_trip_delta_and_fuse_unfuse() {
    let dir = tempfile::tempdir().unwrap();
    let ad = adapter(4, 16.0, 1);
    ad.save(dir.path()).unwrap();
    // The PEFT layout on disk.
    let raw = weights::SafetensorsFile::open(dir.path().join("adapter_model.safetensors")).unwrap();
    use weights::TensorSource;
    assert!(
        raw.info("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
            .is_some()
    );
    let back = LoraAdapter::load(dir.path()).unwrap();
    assert_eq!(back.config.r, 4);
    assert_eq!(back.modules, ad.modules);
    // ΔW = (α/r)·B·A, written out for one entry.
    let p = &ad.modules[W[0]];
    let d = ad.delta(W[0]).unwrap();
    let want: f32 = (0..4).map(|k| p.b[[2, k]] * p.a[[k, 5]]).sum::<f32>() * 4.0;
    assert!((d[[2, 5]] - want).abs() < 1e-5);
    // Fuse then unfuse returns the base (to rounding); a missing module is an error.
    let mut base = StateDict::new();
    base.insert(W[0], Tensor::f32(gauss(8, 8, 9).into_dyn()));
    base.insert(W[1], Tensor::f32(gauss(8, 12, 10).into_dyn()));
    let fused = ad.fuse(&base, 1.0).unwrap();
    let unfused = ad.fuse(&fused, -1.0).unwrap();
    for w in W {
        let (x, y) = (&unfused.get(w).unwrap().data, &base.get(w).unwrap().data);
        assert!(x.iter().zip(y.iter()).all(|(a, b)| (a - b).abs() < 1e-5));
    }
    base.remove(W[1]);
    assert!(ad.fuse(&base, 1.0).unwrap_err().to_string().contains(W[1]));
    // Malformed adapters: mismatched rank between config and factors.
    std::fs::write(
        dir.path().join("adapter_config.json"),
        r#"{"r": 3, "lora_alpha": 8, "target_modules": ["q_proj"]}"#,
    )
    .unwrap();
    let e = LoraAdapter::load(dir.path()).unwrap_err().to_string();
    assert!(e.contains("r = 3"), "{e}");
}

#[test]
fn rmm_is_exact_at_full_rank_and_its_error_falls_with_p() {
    let n = 5;
    let tasks: Vec<IndexMap<String, Array2<f32>>> = (0..n)
        .map(|i| adapter(3, 6.0, 10 * i as u64 + 1).deltas())
        .collect();
    let mut last = f64::INFINITY;
    for p in 1..=n {
        let rmm = rmm_fit(&tasks, p).unwrap();
        let err = rmm
            .errors(&tasks)
            .unwrap()
            .iter()
            .cloned()
            .fold(0.0, f64::max);
        assert!(err <= last + 1e-9, "p = {p}: error {err} after {last}");
        if p >= n - 1 {
            assert!(err < 1e-5, "p = {p}: error {err}");
        }
        if p < n - 1 {
            assert!(err > 1e-3, "p = {p} should lose something, error {err}");
            assert!(rmm.storage_ratio() < 1.0);
        }
        last = err;
    }
    assert!(rmm_fit(&tasks, 0).is_err());
}

#[test]
fn lora_lego_with_k_equal_to_the_total_rank_is_the_summed_delta() {
    let (a, b) = (adapter(3, 6.0, 1), adapter(2, 4.0, 50));
    let merged = lora_lego(&[a.clone(), b.clone()], 5, 7, true).unwrap();
    assert_eq!(merged.config.r, 5);
    for w in W {
        let sum = a.delta(w).unwrap() + b.delta(w).unwrap();
        assert!(close(&merged.delta(w).unwrap(), &sum, 1e-4), "{w}");
    }
    // Fewer clusters: rank k, and the norm calibration keeps unit norms at their members' mean.
    let small = lora_lego(&[a.clone(), b.clone()], 2, 7, true).unwrap();
    assert_eq!(small.modules[W[0]].a.nrows(), 2);
    assert!(
        lora_lego(&[a, b], 6, 7, true)
            .unwrap_err()
            .to_string()
            .contains("k = 6")
    );
}

#[test]
fn kmeans_separates_obvious_clusters_deterministically() {
    let x = array![
        [0.0f32, 0.0],
        [0.1, 0.0],
        [10.0, 10.0],
        [10.1, 9.9],
        [0.0, 0.2],
        [9.9, 10.0]
    ];
    let (c, assign) = kmeans(x.view(), 2, 3).unwrap();
    assert_eq!(assign[0], assign[1]);
    assert_eq!(assign[0], assign[4]);
    assert_eq!(assign[2], assign[3]);
    assert_ne!(assign[0], assign[2]);
    let lo = assign[0];
    assert!((c[[lo, 0]] - 0.0333).abs() < 1e-3 && (c[[lo, 1]] - 0.0667).abs() < 1e-3);
    assert_eq!(kmeans(x.view(), 2, 3).unwrap().1, assign);
}

#[test]
fn shared_basis_is_exact_at_full_rank_and_merges_linearly() {
    let mats = [gauss(6, 10, 1), gauss(6, 10, 2), gauss(6, 10, 3)];
    let views: Vec<_> = mats.iter().map(|m| m.view()).collect();
    let full = shared_basis(&views, 6).unwrap();
    for (i, m) in mats.iter().enumerate() {
        assert!(close(&full.reconstruct(i), m, 1e-4));
    }
    let w = [0.5f32, 0.3, 0.2];
    let want = &mats[0] * 0.5 + &mats[1] * 0.3 + &mats[2] * 0.2;
    assert!(close(&full.merge(&w).unwrap(), &want, 1e-4));
    // Lower rank: the error grows as the rank falls.
    let err = |r: usize| {
        let sb = shared_basis(&views, r).unwrap();
        (0..3)
            .map(|i| (&sb.reconstruct(i) - &mats[i]).mapv(|v| v * v).sum())
            .sum::<f32>()
    };
    assert!(err(2) > err(4) && err(4) > err(6));
    let bad = gauss(5, 10, 4);
    assert!(
        shared_basis(&[mats[0].view(), bad.view()], 3)
            .unwrap_err()
            .to_string()
            .contains("5 rows")
    );
}

/// LoRA-LEGO below full rank, by hand: two adapters of rank 2 whose four
/// rank-one units `[B[:, i]; A[i, :]]` form two far-apart clusters,
/// {(2,0 | 2,0), (2,0 | 0,2)} and {(0,−50 | 0,−50), (0,−50 | −50,0)}. With
/// k = 2 the centroids are (2,0 | 1,1) and (0,−50 | −25,−25), so the merged
/// ΔW = Σ b aᵀ = [[2, 2], [1250, 1250]]; the norm calibration scales each
/// centroid to its members' mean norm (√8 over √6, √5000 over √3750: both
/// √(4/3)), so with it ΔW is 4/3 of that and the merged units have norms √8
/// and √5000.
#[test]
fn lora_lego_two_clusters_by_hand() {
    let w = "model.layers.0.self_attn.q_proj.weight";
    let adapter = |b: Array2<f32>, a: Array2<f32>| {
        let mut modules = IndexMap::new();
        modules.insert(w.to_string(), LoraPair { a, b });
        LoraAdapter {
            // r = α = 2: scale 1, so units are the factors' columns and rows.
            config: LoraConfig::new(2, 2.0, &["q_proj"]),
            modules,
            full: Default::default(),
        }
    };
    let x = adapter(
        array![[2.0, 0.0], [0.0, -50.0]],
        array![[2.0, 0.0], [0.0, -50.0]],
    );
    let y = adapter(
        array![[2.0, 0.0], [0.0, -50.0]],
        array![[0.0, 2.0], [-50.0, 0.0]],
    );
    for seed in 0..4 {
        let plain = lora_lego(&[x.clone(), y.clone()], 2, seed, false).unwrap();
        let want = array![[2.0f32, 2.0], [1250.0, 1250.0]];
        assert!(
            close(&plain.delta(w).unwrap(), &want, 1e-5),
            "seed {seed}: {:?}",
            plain.delta(w)
        );
        let cal = lora_lego(&[x.clone(), y.clone()], 2, seed, true).unwrap();
        assert!(
            close(&cal.delta(w).unwrap(), &(want * (4.0 / 3.0)), 1e-5),
            "seed {seed}: {:?}",
            cal.delta(w)
        );
        let p = &cal.modules[w];
        let mut norms: Vec<f32> = (0..2)
            .map(|j| (p.b.column(j).dot(&p.b.column(j)) + p.a.row(j).dot(&p.a.row(j))).sqrt())
            .collect();
        norms.sort_by(f32::total_cmp);
        assert!(
            (norms[0] - 8f32.sqrt()).abs() < 1e-5 && (norms[1] - 5000f32.sqrt()).abs() < 1e-3,
            "{norms:?}"
        );
        assert_eq!((cal.config.r, cal.config.scale()), (2, 1.0));
    }
}
