//! MergeMany, activation matching and per-unit pair similarities.

use indexmap::IndexMap;
use ndarray::{Array2, IxDyn};
use permute::builders::{mlp, mlp_group};
use permute::many::{Correlation, activation_matching, mean, merge_many, pair_similarities};
use permute::matching::l2_distance;
use permute::spec::apply;
use permute::{MatchOptions, PermuteError};
use weights::rng::Rng;
use weights::{StateDict, Tensor};

fn random_mlp(sizes: &[usize], seed: u64, noise_of: Option<(&StateDict, f64)>) -> StateDict {
    let mut rng = Rng::new(seed);
    let mut sd = StateDict::new();
    for (i, w) in sizes.windows(2).enumerate() {
        for (name, shape) in [
            (format!("layers.{i}.weight"), vec![w[1], w[0]]),
            (format!("layers.{i}.bias"), vec![w[1]]),
        ] {
            let data = match noise_of {
                Some((base, eps)) => base
                    .get(&name)
                    .unwrap()
                    .data
                    .mapv(|v| v + (eps * rng.normal()) as f32),
                None => rng.normal_array(IxDyn(&shape)),
            };
            sd.insert(name, Tensor::f32(data));
        }
    }
    sd
}

#[test]
fn merge_many_aligns_permuted_noisy_copies() {
    let sizes = [12, 24, 24, 5];
    let base = random_mlp(&sizes, 1, None);
    let spec = mlp(&base).unwrap();
    let models: Vec<StateDict> = (0..4)
        .map(|k| {
            let noisy = random_mlp(&sizes, 10 + k, Some((&base, 0.05)));
            apply(&spec, &spec.random(20 + k), &noisy).unwrap()
        })
        .collect();
    let res = merge_many(&spec, &models, &MatchOptions::default(), 20).unwrap();
    assert_eq!(res.perms.len(), 4);
    let (first, last) = (res.distance[0], *res.distance.last().unwrap());
    assert!(last < first / 5.0, "distance {first} -> {last}");
    // The merged model is close to the shared base up to one permutation:
    // align it to the base and compare with the noise level.
    let aligned =
        permute::weight_matching(&spec, &base, &res.merged, &MatchOptions::default()).unwrap();
    let per_param = aligned.l2_after / (base.numel() as f64).sqrt();
    assert!(
        per_param < 0.05,
        "merged model is {per_param} per parameter from the base"
    );
    assert!(merge_many(&spec, &models[..1], &MatchOptions::default(), 5).is_err());
    assert!(l2_distance(&mean(&models).unwrap(), &res.merged) > 0.0);
}

#[test]
fn activation_matching_recovers_a_unit_permutation() {
    let mut rng = Rng::new(3);
    let a = rng.normal_array((500, 16));
    let mut p: Vec<usize> = (0..16).collect();
    rng.shuffle(&mut p);
    // B's unit p[i] is A's unit i (plus noise); unit 5 of A is constant.
    let mut a = a;
    a.column_mut(5).fill(1.0);
    let mut b = Array2::zeros((500, 16));
    for i in 0..16 {
        for s in 0..500 {
            b[[s, p[i]]] = a[[s, i]] + 0.1 * rng.normal() as f32;
        }
    }
    for kind in [Correlation::Uncentered, Correlation::Pearson] {
        let acts_a: IndexMap<String, Array2<f32>> =
            [(mlp_group(0), a.clone())].into_iter().collect();
        let acts_b: IndexMap<String, Array2<f32>> =
            [(mlp_group(0), b.clone())].into_iter().collect();
        let (perm, pairs) = activation_matching(&acts_a, &acts_b, kind).unwrap();
        let got = &perm[&mlp_group(0)].outer;
        for i in (0..16).filter(|&i| i != 5 || kind == Correlation::Uncentered) {
            assert_eq!(got[i], p[i], "{kind:?} unit {i}");
        }
        assert!(pairs[&mlp_group(0)].iter().all(|c| c.is_finite()));
    }
    let mut bad = b.clone();
    bad[[0, 0]] = f32::NAN;
    let acts_a: IndexMap<String, Array2<f32>> =
        [("g".to_string(), a.clone())].into_iter().collect();
    let acts_b: IndexMap<String, Array2<f32>> = [("g".to_string(), bad)].into_iter().collect();
    assert!(matches!(
        activation_matching(&acts_a, &acts_b, Correlation::Pearson),
        Err(PermuteError::NonFinite { .. })
    ));
}

#[test]
fn pair_similarities_rank_units_for_partial_matching() {
    let a = random_mlp(&[8, 10, 3], 4, None);
    let spec = mlp(&a).unwrap();
    let p = spec.random(5);
    let b = apply(&spec, &p, &a).unwrap();
    let res = permute::weight_matching(&spec, &a, &b, &MatchOptions::default()).unwrap();
    let sims = pair_similarities(&spec, &res.perm, &a, &b).unwrap();
    // Matched with itself, each unit's similarity is its squared norm over the group's members.
    let (w0, b0, w1) = (
        &a.get("layers.0.weight").unwrap().data,
        &a.get("layers.0.bias").unwrap().data,
        &a.get("layers.1.weight").unwrap().data,
    );
    for (u, s) in sims[&mlp_group(0)].iter().enumerate() {
        let expect: f64 = (0..8).map(|j| (w0[[u, j]] as f64).powi(2)).sum::<f64>()
            + (b0[[u]] as f64).powi(2)
            + (0..3).map(|o| (w1[[o, u]] as f64).powi(2)).sum::<f64>();
        assert!((s - expect).abs() < 1e-4, "unit {u}: {s} vs {expect}");
    }
}
