//! VGG-style CNN spec: the flatten into the classifier moves blocks of H·W columns.

mod common;

use common::{batch_norm, conv, linear, relu, vector};
use ndarray::{Array2, Array4, ArrayD, IxDyn};
use permute::builders::{infer_arch, vgg};
use permute::spec::apply;
use permute::{MatchOptions, weight_matching};
use weights::rng::Rng;
use weights::{StateDict, Tensor};

fn random_vgg(seed: u64) -> StateDict {
    let mut rng = Rng::new(seed);
    let mut sd = StateDict::new();
    let mut t = |sd: &mut StateDict, name: &str, shape: &[usize], scale: f64, offset: f64| {
        sd.insert(
            name,
            Tensor::f32(ArrayD::from_shape_fn(IxDyn(shape), |_| {
                (offset + scale * rng.normal()) as f32
            })),
        );
    };
    for (conv_i, cin, cout) in [(0usize, 3usize, 6usize), (3, 6, 8)] {
        t(
            &mut sd,
            &format!("features.{conv_i}.weight"),
            &[cout, cin, 3, 3],
            0.3,
            0.0,
        );
        t(
            &mut sd,
            &format!("features.{conv_i}.bias"),
            &[cout],
            0.1,
            0.0,
        );
        let bn = conv_i + 1;
        t(&mut sd, &format!("features.{bn}.weight"), &[cout], 0.1, 1.0);
        t(&mut sd, &format!("features.{bn}.bias"), &[cout], 0.1, 0.0);
        t(
            &mut sd,
            &format!("features.{bn}.running_mean"),
            &[cout],
            0.1,
            0.0,
        );
        t(
            &mut sd,
            &format!("features.{bn}.running_var"),
            &[cout],
            0.1,
            1.0,
        );
    }
    t(&mut sd, "classifier.0.weight", &[10, 8 * 4 * 4], 0.2, 0.0);
    t(&mut sd, "classifier.0.bias", &[10], 0.1, 0.0);
    t(&mut sd, "classifier.2.weight", &[3, 10], 0.3, 0.0);
    t(&mut sd, "classifier.2.bias", &[3], 0.1, 0.0);
    sd
}

fn add_bias(x: Array4<f32>, sd: &StateDict, name: &str) -> Array4<f32> {
    let b = vector(sd, name);
    Array4::from_shape_fn(x.dim(), |(n, c, i, j)| x[[n, c, i, j]] + b[c])
}

fn forward(sd: &StateDict, x: &Array4<f32>) -> Array2<f32> {
    let w = |n: &str| &sd.get(n).unwrap().data;
    let h = relu(batch_norm(
        &add_bias(conv(x, w("features.0.weight")), sd, "features.0.bias"),
        sd,
        "features.1",
    ));
    let h = relu(batch_norm(
        &add_bias(conv(&h, w("features.3.weight")), sd, "features.3.bias"),
        sd,
        "features.4",
    ));
    let n = h.dim().0;
    let flat = h.into_shape_with_order((n, 8 * 16)).unwrap();
    let h = linear(&flat, sd, "classifier.0").mapv(|v| v.max(0.0));
    linear(&h, sd, "classifier.2")
}

#[test]
fn vgg_spec_preserves_the_function_through_the_flatten() {
    let sd = random_vgg(1);
    assert_eq!(infer_arch(&sd), Some("vgg"));
    let spec = vgg(&sd).unwrap();
    spec.validate(&sd, "vgg").unwrap();
    let last = spec.groups.iter().find(|g| g.name == "features.3").unwrap();
    let flat = last
        .members
        .iter()
        .find(|m| m.weight == "classifier.0.weight")
        .unwrap();
    assert_eq!((flat.axis, flat.repeat), (1, 16));
    let mut rng = Rng::new(2);
    let perm = spec.random(2);
    let permuted = apply(&spec, &perm, &sd).unwrap();
    let x = rng.normal_array((2, 3, 4, 4));
    let (y0, y1) = (forward(&sd, &x), forward(&permuted, &x));
    let d = (&y0 - &y1).iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(
        d < 1e-5 * y0.iter().fold(1f32, |m, v| m.max(v.abs())),
        "{d}"
    );
    let res = weight_matching(&spec, &sd, &permuted, &MatchOptions::default()).unwrap();
    assert!(res.l2_after < 1e-4, "{}", res.l2_after);
}
