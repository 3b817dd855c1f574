//! REPAIR: on networks whose channel statistics are known in closed form
//! (linear layers on Gaussian inputs) the repaired interpolation has exactly
//! the interpolated statistics, layer after layer; on a ReLU MLP measured on
//! samples, the measured statistics after repair are the targets; bad
//! statistics are named errors.

mod common;

use ndarray::{Array1, Array2, ArrayD};
use permute::interp::lerp;
use permute::repair::{ChannelStats, RepairLayer, correct, repair};
use weights::rng::Rng;
use weights::{StateDict, Tensor};

fn random_layers(sizes: &[usize], seed: u64) -> StateDict {
    let mut rng = Rng::new(seed);
    let mut sd = StateDict::new();
    for (i, w) in sizes.windows(2).enumerate() {
        let s = 1.0 / (w[0] as f64).sqrt();
        sd.insert(
            format!("layers.{i}.weight"),
            Tensor::f32(ArrayD::from_shape_fn(vec![w[1], w[0]], |_| {
                (s * rng.normal()) as f32
            })),
        );
        sd.insert(
            format!("layers.{i}.bias"),
            Tensor::f32(ArrayD::from_shape_fn(vec![w[1]], |_| {
                (0.3 * rng.normal()) as f32
            })),
        );
    }
    sd
}

fn mat(sd: &StateDict, name: &str) -> Array2<f64> {
    common::matrix(sd, name).mapv(|v| v as f64)
}

fn vec1(sd: &StateDict, name: &str) -> Array1<f64> {
    common::vector(sd, name).mapv(|v| v as f64)
}

/// Exact output statistics of every layer of a purely linear network on
/// inputs `x ~ N(mu, diag(var))`: the mean and covariance propagate as
/// `m ↦ W m + b`, `C ↦ W C Wᵀ`.
fn linear_stats(
    sd: &StateDict,
    layers: usize,
    mu: &Array1<f64>,
    var: &Array1<f64>,
) -> Vec<ChannelStats> {
    let mut m = mu.clone();
    let mut c = Array2::from_diag(var);
    let mut out = Vec::new();
    for l in 0..layers {
        let w = mat(sd, &format!("layers.{l}.weight"));
        m = w.dot(&m) + vec1(sd, &format!("layers.{l}.bias"));
        c = w.dot(&c).dot(&w.t());
        out.push(ChannelStats {
            mean: m.to_vec(),
            std: c.diag().iter().map(|v| v.sqrt()).collect(),
        });
    }
    out
}

fn close(a: &[f64], b: &[f64], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * y.abs().max(1.0),
            "{what}[{i}]: {x} vs {y}"
        );
    }
}

#[test]
fn repaired_linear_network_has_the_interpolated_statistics_in_closed_form() {
    let sizes = [6, 9, 7, 5];
    let (a, b) = (random_layers(&sizes, 1), random_layers(&sizes, 2));
    let mu = Array1::from_vec(vec![0.5, -1.0, 0.2, 0.0, 1.5, -0.3]);
    let var = Array1::from_vec(vec![1.0, 0.5, 2.0, 0.1, 1.0, 3.0]);
    let layers: Vec<RepairLayer> = (0..3)
        .map(|l| RepairLayer::named(&format!("layers.{l}")))
        .collect();
    let (sa, sb) = (
        linear_stats(&a, 3, &mu, &var),
        linear_stats(&b, 3, &mu, &var),
    );
    for lambda in [0.25, 0.5, 0.8] {
        let m = lerp(&a, &b, lambda as f32).unwrap();
        let targets: Vec<ChannelStats> = sa
            .iter()
            .zip(&sb)
            .map(|(x, y)| ChannelStats::interpolate(x, y, lambda).unwrap())
            .collect();
        // Interpolation collapses the variance: before REPAIR the stds are below the targets.
        let before = linear_stats(&m, 3, &mu, &var);
        let shrunk = before[0]
            .std
            .iter()
            .zip(&targets[0].std)
            .filter(|(x, y)| x < y)
            .count();
        assert!(
            shrunk > sizes[1] / 2,
            "λ={lambda}: {shrunk} channels shrank"
        );
        let fixed = repair::<_, permute::PermuteError>(&m, &layers, &targets, |sd, i| {
            Ok(linear_stats(sd, i + 1, &mu, &var).pop().unwrap())
        })
        .unwrap();
        let after = linear_stats(&fixed, 3, &mu, &var);
        for l in 0..3 {
            close(
                &after[l].mean,
                &targets[l].mean,
                1e-5,
                &format!("λ={lambda} layer {l} mean"),
            );
            close(
                &after[l].std,
                &targets[l].std,
                1e-5,
                &format!("λ={lambda} layer {l} std"),
            );
        }
        // The input model is left as it was.
        assert_eq!(m, lerp(&a, &b, lambda as f32).unwrap());
    }
    // At the endpoints the interpolated statistics are the model's own: REPAIR changes nothing.
    let fixed = repair::<_, permute::PermuteError>(&a, &layers, &sa, |sd, i| {
        Ok(linear_stats(sd, i + 1, &mu, &var).pop().unwrap())
    })
    .unwrap();
    for (name, t) in a.iter() {
        let d = (&fixed.get(name).unwrap().data - &t.data)
            .iter()
            .fold(0f32, |m, v| m.max(v.abs()));
        assert!(d < 1e-5, "{name}: {d}");
    }
}

/// Pre-activation outputs of layer `upto` of a ReLU MLP on `x`.
fn pre_activation(sd: &StateDict, x: &Array2<f32>, upto: usize) -> Array2<f32> {
    let mut h = common::linear(x, sd, "layers.0");
    for l in 1..=upto {
        h = common::linear(&h.mapv(|v| v.max(0.0)), sd, &format!("layers.{l}"));
    }
    h
}

#[test]
fn repaired_relu_mlp_has_the_target_statistics_on_its_samples() {
    let sizes = [8, 16, 16, 3];
    let (a, b) = (random_layers(&sizes, 3), random_layers(&sizes, 4));
    let mut rng = Rng::new(9);
    let x = rng.normal_array((400, 8));
    let layers: Vec<RepairLayer> = (0..2)
        .map(|l| RepairLayer::named(&format!("layers.{l}")))
        .collect();
    let stats =
        |sd: &StateDict, l: usize| ChannelStats::of_columns(pre_activation(sd, &x, l).view());
    let m = lerp(&a, &b, 0.5).unwrap();
    let targets: Vec<ChannelStats> = (0..2)
        .map(|l| ChannelStats::interpolate(&stats(&a, l), &stats(&b, l), 0.5).unwrap())
        .collect();
    let fixed = repair::<_, permute::PermuteError>(&m, &layers, &targets, |sd, i| Ok(stats(sd, i)))
        .unwrap();
    for (l, target) in targets.iter().enumerate() {
        let got = stats(&fixed, l);
        close(&got.mean, &target.mean, 1e-4, &format!("layer {l} mean"));
        close(&got.std, &target.std, 1e-4, &format!("layer {l} std"));
    }
    // The output layer is not touched.
    assert_eq!(fixed.get("layers.2.weight"), m.get("layers.2.weight"));
}

#[test]
fn of_columns_is_the_population_mean_and_std() {
    let x = Array2::from_shape_vec((4, 2), vec![1.0, 0.0, 2.0, 0.0, 3.0, 0.0, 6.0, 4.0]).unwrap();
    let s = ChannelStats::of_columns(x.view());
    assert_eq!(s.mean, vec![3.0, 1.0]);
    close(&s.std, &[(14.0f64 / 4.0).sqrt(), 3f64.sqrt()], 1e-12, "std");
}

#[test]
fn bad_statistics_are_named_errors() {
    let mut sd = random_layers(&[3, 4], 5);
    let layer = RepairLayer::named("layers.0");
    let ok = ChannelStats {
        mean: vec![0.0; 4],
        std: vec![1.0; 4],
    };
    let err = |sd: &mut StateDict, cur: &ChannelStats, tgt: &ChannelStats| {
        correct(sd, &layer, cur, tgt).unwrap_err().to_string()
    };
    // Wrong number of channels.
    let three = ChannelStats {
        mean: vec![0.0; 3],
        std: vec![1.0; 3],
    };
    let e = err(&mut sd, &three, &ok);
    assert!(
        e.contains("layers.0.weight") && e.contains("4 output channels"),
        "{e}"
    );
    // Zero variance now, but the target varies.
    let mut dead = ok.clone();
    dead.std[2] = 0.0;
    let e = err(&mut sd, &dead, &ok);
    assert!(
        e.contains("channel 2") && e.contains("zero variance"),
        "{e}"
    );
    // Constant in both: only shifted, no error.
    correct(&mut sd.clone(), &layer, &dead, &dead).unwrap();
    // NaN and negative standard deviations.
    let mut nan = ok.clone();
    nan.mean[1] = f64::NAN;
    assert!(err(&mut sd, &nan, &ok).contains("channel 1"));
    let mut neg = ok.clone();
    neg.std[3] = -1.0;
    assert!(err(&mut sd, &ok, &neg).contains("channel 3"));
    // Mismatched lengths inside one record.
    let ragged = ChannelStats {
        mean: vec![0.0; 4],
        std: vec![1.0; 3],
    };
    assert!(ChannelStats::interpolate(&ragged, &ok, 0.5).is_err());
    assert!(
        ChannelStats::interpolate(&three, &ok, 0.5)
            .unwrap_err()
            .to_string()
            .contains("3 channels")
    );
    // Missing layer; layers and targets of different counts.
    let missing = RepairLayer::named("layers.7");
    assert!(
        correct(&mut sd, &missing, &ok, &ok)
            .unwrap_err()
            .to_string()
            .contains("layers.7.weight")
    );
    let e = repair::<_, permute::PermuteError>(&sd, std::slice::from_ref(&layer), &[], |_, _| {
        Ok(ok.clone())
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("1 layers but 0 target"), "{e}");
    // A bias of the wrong shape is named, and the layer is left as it was.
    let mut bad = sd.clone();
    bad.insert("layers.0.bias", Tensor::f32(ArrayD::zeros(vec![3])));
    let before = bad.clone();
    let e = correct(&mut bad, &layer, &ok, &dead)
        .unwrap_err()
        .to_string();
    assert!(e.contains("layers.0.bias") && e.contains("[3]"), "{e}");
    assert_eq!(bad, before);
    // A missing bias is created.
    sd.remove("layers.0.bias");
    correct(&mut sd, &layer, &ok, &ok).unwrap();
    assert_eq!(sd.get("layers.0.bias").unwrap().shape(), &[4]);
}

/// A bias-free layer (here a per-channel gain `y = g ⊙ x` followed by a
/// bias-free linear map, as a LLaMA's RMSNorm gain and `up_proj`) can only
/// be rescaled: after [`RepairLayer::scale_only`] each channel has the target
/// standard deviation exactly, its mean is scaled by the same factor, and
/// no bias appears. Closed form on `x ~ N(mu, diag(var))`.
#[test]
fn scale_only_repair_sets_the_standard_deviation_and_scales_the_mean() {
    let mut rng = Rng::new(11);
    let gains = |rng: &mut Rng| {
        Tensor::f32(ArrayD::from_shape_fn(vec![4], |_| {
            (1.0 + 0.5 * rng.normal()) as f32
        }))
    };
    let linear = |rng: &mut Rng| {
        Tensor::f32(ArrayD::from_shape_fn(vec![5, 4], |_| {
            (0.5 * rng.normal()) as f32
        }))
    };
    let (mut a, mut b) = (StateDict::new(), StateDict::new());
    for sd in [&mut a, &mut b] {
        sd.insert("norm.weight", gains(&mut rng));
        sd.insert("up.weight", linear(&mut rng));
    }
    let mu = Array1::from_vec(vec![0.3, -0.7, 1.0, 0.0]);
    let var = Array1::from_vec(vec![1.0, 2.0, 0.5, 1.5]);
    // Layer 0: the gain's output g ⊙ x; layer 1: W (g ⊙ x).
    let stats = |sd: &StateDict, l: usize| -> ChannelStats {
        let g = vec1(sd, "norm.weight");
        let m = &g * &mu;
        let c = Array2::from_diag(&(&g * &g * &var));
        if l == 0 {
            return ChannelStats {
                mean: m.to_vec(),
                std: c.diag().iter().map(|v| v.sqrt()).collect(),
            };
        }
        let w = mat(sd, "up.weight");
        let c = w.dot(&c).dot(&w.t());
        ChannelStats {
            mean: w.dot(&m).to_vec(),
            std: c.diag().iter().map(|v| v.sqrt()).collect(),
        }
    };
    let layers = [
        RepairLayer::scale_only("norm.weight"),
        RepairLayer::scale_only("up.weight"),
    ];
    let lambda = 0.4;
    let m = lerp(&a, &b, lambda as f32).unwrap();
    let targets: Vec<ChannelStats> = (0..2)
        .map(|l| ChannelStats::interpolate(&stats(&a, l), &stats(&b, l), lambda).unwrap())
        .collect();
    let mut before = Vec::new();
    let fixed = repair::<_, permute::PermuteError>(&m, &layers, &targets, |sd, i| {
        let s = stats(sd, i);
        before.push(s.clone());
        Ok(s)
    })
    .unwrap();
    for (l, target) in targets.iter().enumerate() {
        let got = stats(&fixed, l);
        close(&got.std, &target.std, 1e-5, &format!("layer {l} std"));
        let scaled: Vec<f64> = before[l]
            .mean
            .iter()
            .zip(&target.std)
            .zip(&before[l].std)
            .map(|((m, t), s)| m * t / s)
            .collect();
        close(&got.mean, &scaled, 1e-5, &format!("layer {l} mean"));
    }
    assert_eq!(fixed.len(), 2, "no bias is created");
}

/// [`RepairedInterpolation`] on a layer with a bias and a bias-free gain
/// after it (`y = g ⊙ relu(W x + b)`): the first gets the interpolated mean
/// and standard deviation, the gain the interpolated root mean square
/// (uncentered statistics), measured on the same samples; the endpoints are
/// left as they are; a forward pass that returns too few activation
/// matrices is a named error.
#[test]
fn repaired_interpolation_sets_moments_and_the_rms_of_bias_free_layers() {
    use permute::repair::RepairedInterpolation;
    let mut rng = Rng::new(21);
    let mut model = |seed: u64| {
        let mut sd = random_layers(&[5, 6], seed);
        sd.insert(
            "gain.weight",
            Tensor::f32(ArrayD::from_shape_fn(vec![6], |_| {
                (1.0 + 0.3 * rng.normal()) as f32
            })),
        );
        sd
    };
    let (a, b) = (model(1), model(2));
    let mut xr = Rng::new(4);
    let x = Array2::from_shape_fn((300, 5), |_| xr.normal() as f32);
    let taps = |sd: &StateDict| -> Result<Vec<Array2<f32>>, permute::PermuteError> {
        let h = common::linear(&x, sd, "layers.0");
        let g = common::vector(sd, "gain.weight");
        let y = h.mapv(|v| v.max(0.0)) * &g.insert_axis(ndarray::Axis(0));
        Ok(vec![h, y])
    };
    let layers = vec![
        RepairLayer::named("layers.0"),
        RepairLayer::scale_only("gain.weight"),
    ];
    let rep = RepairedInterpolation::new(&a, &b, layers.clone(), taps).unwrap();
    let lambda = 0.6;
    let m = rep.at(lambda).unwrap();
    let acts = taps(&m).unwrap();
    let [sa, sb] = rep.endpoint_stats();
    let t0 = ChannelStats::interpolate(&sa[0], &sb[0], lambda).unwrap();
    let got0 = ChannelStats::of_columns(acts[0].view());
    close(&got0.mean, &t0.mean, 1e-4, "layer 0 mean");
    close(&got0.std, &t0.std, 1e-4, "layer 0 std");
    let rms = |sd: &StateDict| ChannelStats::rms_of_columns(taps(sd).unwrap()[1].view()).std;
    let want: Vec<f64> = rms(&a)
        .iter()
        .zip(rms(&b))
        .map(|(p, q)| (1.0 - lambda) * p + lambda * q)
        .collect();
    close(&rms(&m), &want, 1e-4, "gain rms");
    assert_eq!(
        sa[1].mean,
        vec![0.0; 6],
        "bias-free layers are measured uncentered"
    );
    // λ = 0 is A itself.
    let m0 = rep.at(0.0).unwrap();
    for (name, t) in a.iter() {
        let d = (&m0.get(name).unwrap().data - &t.data)
            .iter()
            .fold(0f32, |mx, v| mx.max(v.abs()));
        assert!(d < 1e-5, "{name}: {d}");
    }
    let short = |_: &StateDict| -> Result<Vec<Array2<f32>>, permute::PermuteError> {
        Ok(vec![Array2::zeros((3, 6))])
    };
    let e = RepairedInterpolation::new(&a, &b, layers, short)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("1 activation matrices for 2 layers"), "{e}");
}
