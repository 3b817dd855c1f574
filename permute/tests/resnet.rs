//! ResNet spec: function preservation with BatchNorm statistics and
//! shortcuts (a plain ndarray forward written here), planted permutations.

mod common;

use common::{batch_norm, conv, linear, relu};

use ndarray::{Array2, Array4, ArrayD, IxDyn};
use permute::builders::{infer_arch, resnet};
use permute::spec::apply;
use permute::{MatchOptions, weight_matching};
use weights::rng::Rng;
use weights::{DType, StateDict, Tensor};

fn add(sd: &mut StateDict, rng: &mut Rng, name: &str, shape: &[usize], scale: f64, offset: f64) {
    sd.insert(
        name,
        Tensor::f32(ArrayD::from_shape_fn(IxDyn(shape), |_| {
            (offset + scale * rng.normal()) as f32
        })),
    );
}

fn bn(sd: &mut StateDict, rng: &mut Rng, p: &str, c: usize) {
    add(sd, rng, &format!("{p}.weight"), &[c], 0.1, 1.0);
    add(sd, rng, &format!("{p}.bias"), &[c], 0.1, 0.0);
    add(sd, rng, &format!("{p}.running_mean"), &[c], 0.1, 0.0);
    sd.insert(
        format!("{p}.running_var"),
        Tensor::f32(ArrayD::from_shape_fn(IxDyn(&[c]), |_| {
            0.5 + rng.uniform() as f32
        })),
    );
    sd.insert(
        format!("{p}.num_batches_tracked"),
        Tensor::new(ArrayD::from_elem(IxDyn(&[]), 7.0), DType::I64),
    );
}

fn random_resnet(seed: u64) -> StateDict {
    let mut rng = Rng::new(seed);
    let mut sd = StateDict::new();
    add(&mut sd, &mut rng, "conv1.weight", &[8, 3, 3, 3], 0.3, 0.0);
    bn(&mut sd, &mut rng, "bn1", 8);
    for (s, b, cin, cout) in [(1, 0, 8, 8), (1, 1, 8, 8), (2, 0, 8, 12), (2, 1, 12, 12)] {
        let p = format!("layer{s}.{b}");
        add(
            &mut sd,
            &mut rng,
            &format!("{p}.conv1.weight"),
            &[cout, cin, 3, 3],
            0.3,
            0.0,
        );
        bn(&mut sd, &mut rng, &format!("{p}.bn1"), cout);
        add(
            &mut sd,
            &mut rng,
            &format!("{p}.conv2.weight"),
            &[cout, cout, 3, 3],
            0.3,
            0.0,
        );
        bn(&mut sd, &mut rng, &format!("{p}.bn2"), cout);
        if cin != cout {
            add(
                &mut sd,
                &mut rng,
                &format!("{p}.downsample.0.weight"),
                &[cout, cin, 1, 1],
                0.3,
                0.0,
            );
            bn(&mut sd, &mut rng, &format!("{p}.downsample.1"), cout);
        }
    }
    add(&mut sd, &mut rng, "fc.weight", &[5, 12], 0.3, 0.0);
    add(&mut sd, &mut rng, "fc.bias", &[5], 0.1, 0.0);
    sd
}

fn forward(sd: &StateDict, x: &Array4<f32>) -> Array2<f32> {
    let w = |n: &str| &sd.get(n).unwrap().data;
    let mut h = relu(batch_norm(&conv(x, w("conv1.weight")), sd, "bn1"));
    for (s, b) in [(1, 0), (1, 1), (2, 0), (2, 1)] {
        let p = format!("layer{s}.{b}");
        let y = relu(batch_norm(
            &conv(&h, w(&format!("{p}.conv1.weight"))),
            sd,
            &format!("{p}.bn1"),
        ));
        let y = batch_norm(
            &conv(&y, w(&format!("{p}.conv2.weight"))),
            sd,
            &format!("{p}.bn2"),
        );
        let short = if sd.contains(&format!("{p}.downsample.0.weight")) {
            batch_norm(
                &conv(&h, w(&format!("{p}.downsample.0.weight"))),
                sd,
                &format!("{p}.downsample.1"),
            )
        } else {
            h.clone()
        };
        h = relu(y + short);
    }
    let (n, c, hh, ww) = h.dim();
    let pooled = Array2::from_shape_fn((n, c), |(b, ch)| {
        (0..hh)
            .flat_map(|i| (0..ww).map(move |j| (i, j)))
            .map(|(i, j)| h[[b, ch, i, j]])
            .sum::<f32>()
            / (hh * ww) as f32
    });
    linear(&pooled, sd, "fc")
}

#[test]
fn resnet_spec_preserves_the_function() {
    let sd = random_resnet(1);
    assert_eq!(infer_arch(&sd), Some("resnet"));
    let spec = resnet(&sd).unwrap();
    spec.validate(&sd, "resnet").unwrap();
    // Streams: stem+layer1 (8), layer2 (12); inner groups: one per block.
    let sizes: Vec<(String, usize)> = spec
        .groups
        .iter()
        .map(|g| (g.name.clone(), g.blocks))
        .collect();
    assert_eq!(
        sizes
            .iter()
            .filter(|(n, _)| n.starts_with("stream"))
            .count(),
        2,
        "{sizes:?}"
    );
    assert_eq!(sizes.iter().filter(|(n, _)| n.contains("inner")).count(), 4);
    let mut rng = Rng::new(2);
    let x = rng.normal_array((2, 3, 6, 6));
    let y0 = forward(&sd, &x);
    let permuted = apply(&spec, &spec.random(3), &sd).unwrap();
    assert_ne!(permuted, sd);
    // Only the f32 summation order changes: relative 1e-5 of the output scale.
    let d = (&y0 - &forward(&permuted, &x))
        .iter()
        .fold(0f32, |m, v| m.max(v.abs()));
    let scale = y0.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(d < 1e-5 * scale, "max |Δ| {d} at output scale {scale}");
}

#[test]
fn weight_matching_recovers_planted_resnet_permutations() {
    let a = random_resnet(4);
    let spec = resnet(&a).unwrap();
    let b = apply(&spec, &spec.random(5), &a).unwrap();
    let res = weight_matching(&spec, &a, &b, &MatchOptions::default()).unwrap();
    assert!(res.l2_after < 1e-4, "{} -> {}", res.l2_before, res.l2_after);
}

#[test]
fn zip_of_resnets_spans_the_ensemble_and_the_aligned_average() {
    use permute::zip::{GroupPlan, ZipOptions, zip};
    let (a, b) = (random_resnet(6), random_resnet(7));
    let spec = resnet(&a).unwrap();
    let wm = weight_matching(&spec, &a, &b, &MatchOptions::default()).unwrap();
    let bp = apply(&spec, &wm.perm, &b).unwrap();
    let plan = |merged: bool| -> indexmap::IndexMap<String, GroupPlan> {
        spec.groups
            .iter()
            .map(|g| {
                let p = if merged {
                    GroupPlan::merged(g.blocks)
                } else {
                    GroupPlan {
                        pairs: vec![],
                        only_a: (0..g.blocks).collect(),
                        only_b: (0..g.blocks).collect(),
                    }
                };
                (g.name.clone(), p)
            })
            .collect()
    };
    let mut rng = Rng::new(8);
    let x = rng.normal_array((2, 3, 6, 6));
    let max_abs = |y: Array2<f32>| y.iter().fold(0f32, |m, v| m.max(v.abs()));
    // All channels apart (BatchNorm is per channel, shortcuts stay in their
    // stream): the ensemble, logits averaged.
    let z = zip(&spec, &a, &bp, &plan(false), &ZipOptions::default()).unwrap();
    assert_eq!(
        z.get("conv1.weight").unwrap().shape()[0],
        2 * a.get("conv1.weight").unwrap().shape()[0]
    );
    let want = (forward(&a, &x) + forward(&b, &x)) * 0.5;
    let d = max_abs(forward(&z, &x) - &want);
    assert!(d < 1e-4 * max_abs(want.clone()), "{d}");
    // All merged: the average of A and the aligned B, tensor for tensor.
    let z = zip(&spec, &a, &bp, &plan(true), &ZipOptions::default()).unwrap();
    let mean = permute::many::mean(&[a.clone(), bp.clone()]).unwrap();
    for (name, t) in mean.iter() {
        let d = (&t.data - &z.get(name).unwrap().data)
            .iter()
            .fold(0f32, |m, v| m.max(v.abs()));
        assert!(d < 1e-6, "{name}: {d}");
    }
}
