//! Permutation-aware merging: a model and a unit-permuted copy of it merge
//! back into the model once aligned, and into something else when not; the
//! in-memory path equals the streaming runner.

mod common;
use common::max_diff;

use merge::aligned::{Alignment, permutation_aware_merge};
use merge::merge_state_dicts;
use merge::{Method, Params, Value};
use ndarray::{ArrayD, IxDyn};
use permute::{MatchOptions, apply, builders::mlp};
use weights::{StateDict, Tensor};

fn mlp_model(seed: u64) -> StateDict {
    let mut r = weights::rng::Rng::new(seed);
    let sizes = [32, 64, 64, 8];
    let mut sd = StateDict::new();
    for (i, w) in sizes.windows(2).enumerate() {
        sd.insert(
            format!("layers.{i}.weight"),
            Tensor::f32(ArrayD::from_shape_fn(IxDyn(&[w[1], w[0]]), |_| {
                r.normal() as f32
            })),
        );
        sd.insert(
            format!("layers.{i}.bias"),
            Tensor::f32(ArrayD::from_shape_fn(IxDyn(&[w[1]]), |_| r.normal() as f32)),
        );
    }
    sd
}

fn weights(ws: &[f64]) -> Vec<Params> {
    ws.iter()
        .map(|&w| {
            [("weight".to_string(), Value::Num(w))]
                .into_iter()
                .collect()
        })
        .collect()
}

#[test]
fn aligned_linear_merge_of_a_permuted_copy_is_the_model() {
    let a = mlp_model(1);
    let spec = mlp(&a).unwrap();
    let b = apply(&spec, &spec.random(7), &a).unwrap();
    let linear = Method::from_name("linear").unwrap();
    let shared = Params::new();
    let models = [a.clone(), b.clone()];
    let naive =
        merge_state_dicts(&linear, None, &models, &shared, &weights(&[0.5, 0.5]), 0).unwrap();
    assert!(
        max_diff(&naive, &a) > 0.1,
        "the naive average should differ"
    );
    for how in [Alignment::ToAnchor, Alignment::MergeMany] {
        let (merged, aligned) = permutation_aware_merge(
            &spec,
            &linear,
            None,
            &models,
            how,
            &shared,
            &weights(&[0.5, 0.5]),
            &MatchOptions::default(),
        )
        .unwrap();
        // MergeMany may permute both models; the merge is then a permuted a.
        let back = apply(&spec, &permute::invert(&aligned.perms[0]), &merged).unwrap();
        assert!(max_diff(&back, &a) < 1e-5, "{how:?}");
    }
}

#[test]
fn three_models_merge_many_then_ties_with_a_base() {
    // Fine-tunes of a base, each then unit-permuted: aligning to the base
    // undoes the permutations, and TIES then sees the plain task vectors.
    let base = mlp_model(2);
    let spec = mlp(&base).unwrap();
    let tuned: Vec<StateDict> = (0..3)
        .map(|i| {
            let mut m = base.clone();
            let mut r = weights::rng::Rng::new(100 + i);
            for (_, t) in m.iter_mut() {
                t.data.mapv_inplace(|v| v + 0.01 * r.normal() as f32);
            }
            m
        })
        .collect();
    let permuted: Vec<StateDict> = tuned
        .iter()
        .enumerate()
        .map(|(i, m)| apply(&spec, &spec.random(i as u64 + 1), m).unwrap())
        .collect();
    let ties = Method::from_name("ties").unwrap();
    let mut shared = Params::new();
    shared.insert("density".into(), Value::Num(0.5));
    let per = weights(&[1.0, 1.0, 1.0]);
    let want = merge_state_dicts(&ties, Some(&base), &tuned, &shared, &per, 0).unwrap();
    let (got, aligned) = permutation_aware_merge(
        &spec,
        &ties,
        Some(&base),
        &permuted,
        Alignment::MergeMany,
        &shared,
        &per,
        &MatchOptions::default(),
    )
    .unwrap();
    for (i, m) in aligned.models.iter().enumerate() {
        assert_eq!(
            max_diff(m, &tuned[i]),
            0.0,
            "model {i} is its unpermuted self"
        );
    }
    let d = max_diff(&got, &want);
    assert!(d < 1e-6, "{d}");
}
