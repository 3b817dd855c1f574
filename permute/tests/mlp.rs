//! Weight matching and permutation specs on multilayer perceptrons.

mod common;

use common::linear;
use ndarray::{Array2, ArrayD, Ix2, IxDyn};
use permute::builders::{mlp, mlp_group};
use permute::lap::{Objective, solve, total};
use permute::spec::{apply, invert};
use permute::{MatchOptions, PermuteError, weight_matching};
use weights::rng::Rng;
use weights::{StateDict, Tensor};

fn random_mlp(sizes: &[usize], seed: u64) -> StateDict {
    let mut rng = Rng::new(seed);
    let mut sd = StateDict::new();
    for (i, w) in sizes.windows(2).enumerate() {
        let scale = (2.0 / w[0] as f64).sqrt();
        let weight = ArrayD::from_shape_fn(IxDyn(&[w[1], w[0]]), |_| (rng.normal() * scale) as f32);
        let bias = ArrayD::from_shape_fn(IxDyn(&[w[1]]), |_| (0.1 * rng.normal()) as f32);
        sd.insert(format!("layers.{i}.weight"), Tensor::f32(weight));
        sd.insert(format!("layers.{i}.bias"), Tensor::f32(bias));
    }
    sd
}

fn forward(sd: &StateDict, x: &Array2<f32>) -> Array2<f32> {
    let n = sd.len() / 2;
    let mut h = x.clone();
    for i in 0..n {
        h = linear(&h, sd, &format!("layers.{i}"));
        if i + 1 < n {
            h.mapv_inplace(|v| v.max(0.0));
        }
    }
    h
}

#[test]
fn spec_is_inferred_from_names() {
    let sd = random_mlp(&[784, 512, 512, 512, 10], 1);
    let spec = mlp(&sd).unwrap();
    assert_eq!(spec.groups.len(), 3);
    assert_eq!(spec.groups[0].blocks, 512);
    let names: Vec<_> = spec.groups[1]
        .members
        .iter()
        .map(|m| (m.weight.as_str(), m.axis))
        .collect();
    assert_eq!(
        names,
        [
            ("layers.1.weight", 0),
            ("layers.1.bias", 0),
            ("layers.2.weight", 1)
        ]
    );
    let mut fc = StateDict::new();
    for (name, t) in sd.iter() {
        let k: usize = name.split('.').nth(1).unwrap().parse().unwrap();
        fc.insert(
            format!("fc{}.{}", k + 1, name.rsplit('.').next().unwrap()),
            t.clone(),
        );
    }
    assert_eq!(mlp(&fc).unwrap().groups.len(), 3);
}

#[test]
fn permuting_preserves_the_function_and_singular_values() {
    let sd = random_mlp(&[20, 32, 32, 16, 5], 2);
    let spec = mlp(&sd).unwrap();
    let p = spec.random(3);
    let permuted = apply(&spec, &p, &sd).unwrap();
    let mut rng = Rng::new(4);
    let x = rng.normal_array((64, 20));
    let (y0, y1) = (forward(&sd, &x), forward(&permuted, &x));
    let diff = (&y0 - &y1).iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(diff < 1e-5, "max |Δ| = {diff}");
    assert!(permuted != sd, "the permutation must change the weights");
    for (name, t) in sd.iter() {
        if t.shape().len() == 2 {
            let a = spectra::linalg::singular_values(
                t.data.view().into_dimensionality::<Ix2>().unwrap(),
                name,
            )
            .unwrap();
            let b = permuted
                .get(name)
                .unwrap()
                .data
                .view()
                .into_dimensionality::<Ix2>()
                .unwrap()
                .to_owned();
            let b = spectra::linalg::singular_values(b.view(), name).unwrap();
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-6 * a[0], "{name}: {x} vs {y}");
            }
        }
    }
    // Inverting undoes it exactly.
    assert_eq!(apply(&spec, &invert(&p), &permuted).unwrap(), sd);
}

#[test]
fn weight_matching_recovers_a_planted_permutation() {
    let a = random_mlp(&[30, 64, 64, 64, 10], 5);
    let spec = mlp(&a).unwrap();
    let planted = spec.random(6);
    let b = apply(&spec, &planted, &a).unwrap();
    let res = weight_matching(&spec, &a, &b, &MatchOptions::default()).unwrap();
    assert!(res.l2_before > 1.0);
    assert!(res.l2_after < 1e-5, "l2 after {}", res.l2_after);
    assert_eq!(res.perm, invert(&planted));
    assert!(res.passes <= 5, "{} passes", res.passes);
    assert!(
        res.objective.windows(2).all(|w| w[1] >= w[0] - 1e-9),
        "objective must not decrease: {:?}",
        res.objective
    );
}

#[test]
fn independent_models_get_closer_after_matching() {
    let a = random_mlp(&[30, 64, 64, 10], 7);
    let b = random_mlp(&[30, 64, 64, 10], 8);
    let spec = mlp(&a).unwrap();
    let res = weight_matching(
        &spec,
        &a,
        &b,
        &MatchOptions {
            seed: 3,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(
        res.l2_after < res.l2_before,
        "{} -> {}",
        res.l2_before,
        res.l2_after
    );
    // The aligned B computes the same function as B.
    let aligned = apply(&spec, &res.perm, &b).unwrap();
    let x = Array2::from_shape_fn((8, 30), |(i, j)| ((i * 31 + j) % 7) as f32 - 3.0);
    let d = (&forward(&b, &x) - &forward(&aligned, &x))
        .iter()
        .fold(0f32, |m, v| m.max(v.abs()));
    assert!(d < 1e-5);
}

#[test]
fn bad_inputs_are_clear_errors() {
    let a = random_mlp(&[10, 16, 4], 1);
    let spec = mlp(&a).unwrap();
    let other = random_mlp(&[10, 12, 4], 2);
    let e = weight_matching(&spec, &a, &other, &MatchOptions::default()).unwrap_err();
    assert!(
        matches!(e, PermuteError::GroupSize { ref weight, .. } if weight == "layers.0.weight"),
        "{e}"
    );
    let mut missing = a.clone();
    missing.remove("layers.1.weight");
    let e = weight_matching(&spec, &a, &missing, &MatchOptions::default()).unwrap_err();
    assert!(
        matches!(e, PermuteError::MissingWeight { ref weight, .. } if weight == "layers.1.weight"),
        "{e}"
    );
    let mut nan = a.clone();
    nan.get_mut("layers.0.bias").unwrap().data[[3]] = f32::NAN;
    let e = weight_matching(&spec, &a, &nan, &MatchOptions::default()).unwrap_err();
    assert!(matches!(e, PermuteError::NonFinite { .. }), "{e}");
    assert!(e.to_string().contains("layers.0.bias"));
    let mut bad = spec.identity();
    bad.get_mut(&mlp_group(0)).unwrap().outer[0] = 1;
    assert!(matches!(
        apply(&spec, &bad, &a),
        Err(PermuteError::BadPermutation { .. })
    ));
    let mut no_index = StateDict::new();
    no_index.insert("encoder.weight", Tensor::f32(ArrayD::zeros(IxDyn(&[2, 2]))));
    assert!(mlp(&no_index).is_err());
}

#[test]
fn lap_agrees_with_kuhn_munkres_on_n200() {
    let mut rng = Rng::new(11);
    let n = 200;
    let ints: Vec<i64> = (0..n * n).map(|_| rng.below(1000) as i64).collect();
    let weights = pathfinding::matrix::Matrix::from_vec(n, n, ints.clone()).unwrap();
    let (best, _) = pathfinding::kuhn_munkres::kuhn_munkres(&weights);
    let cost: Vec<f64> = ints.iter().map(|&v| v as f64).collect();
    let ours = solve(&cost, n, Objective::Maximize, "n200").unwrap();
    assert_eq!(total(&cost, n, &ours) as i64, best);
}

fn max_abs(x: &Array2<f32>) -> f32 {
    x.iter().fold(0f32, |m, v| m.max(v.abs()))
}

#[test]
fn zip_spans_the_ensemble_and_the_aligned_average() {
    use permute::zip::{GroupPlan, ZipOptions, plan_group, zip};
    let (a, b) = (random_mlp(&[6, 8, 8, 3], 1), random_mlp(&[6, 8, 8, 3], 2));
    let spec = mlp(&a).unwrap();
    let mut rng = Rng::new(3);
    let x = rng.normal_array((20, 6));
    let plan_at = |merged: usize| -> indexmap::IndexMap<String, GroupPlan> {
        spec.groups
            .iter()
            .map(|g| {
                let perm: Vec<usize> = (0..g.blocks).rev().collect();
                let score: Vec<f64> = (0..g.blocks).map(|i| i as f64).collect();
                (
                    g.name.clone(),
                    plan_group(&perm, &score, merged, &g.name).unwrap(),
                )
            })
            .collect()
    };
    // Nothing merged: both models side by side, logits averaged (the ensemble).
    let z = zip(&spec, &a, &b, &plan_at(0), &ZipOptions::default()).unwrap();
    assert_eq!(z.get("layers.1.weight").unwrap().shape(), &[16, 16]);
    let want = (forward(&a, &x) + forward(&b, &x)) * 0.5;
    assert!(max_abs(&(forward(&z, &x) - &want)) < 1e-5);
    // Everything merged with B's units reversed: the mean of A and the reversed B.
    let z = zip(&spec, &a, &b, &plan_at(8), &ZipOptions::default()).unwrap();
    let mut rev = spec.identity();
    for g in rev.values_mut() {
        g.outer.reverse();
    }
    let want = permute::many::mean(&[a.clone(), apply(&spec, &rev, &b).unwrap()]).unwrap();
    for (name, t) in want.iter() {
        let d = (&t.data - &z.get(name).unwrap().data)
            .iter()
            .fold(0f32, |m, v| m.max(v.abs()));
        assert!(d < 1e-6, "{name}: {d}");
    }
    // Half merged: 4 pairs and 4 + 4 units apart per layer.
    let mix = vec![[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]];
    let opts = ZipOptions {
        output_mix: [
            ("layers.2.weight".to_string(), mix.clone()),
            ("layers.2.bias".to_string(), mix),
        ]
        .into_iter()
        .collect(),
        ..Default::default()
    };
    let half = plan_at(4);
    assert_eq!(half[&mlp_group(0)].width(), 12);
    // Nothing merged, and a mix of the outputs that takes class 0 from A and
    // the others from B: each logit is its own model's.
    let z = zip(&spec, &a, &b, &plan_at(0), &opts).unwrap();
    let (ya, yb, yz) = (forward(&a, &x), forward(&b, &x), forward(&z, &x));
    assert!(
        max_abs(&(&yz.column(0).to_owned() - &ya.column(0)).insert_axis(ndarray::Axis(1))) < 1e-5
    );
    assert!(
        max_abs(&(&yz.column(2).to_owned() - &yb.column(2)).insert_axis(ndarray::Axis(1))) < 1e-5
    );
    // Bad plans are named by group.
    let mut bad = plan_at(4);
    bad[&mlp_group(1)].only_b[0] = 99;
    let e = zip(&spec, &a, &b, &bad, &ZipOptions::default()).unwrap_err();
    assert!(e.to_string().contains(&mlp_group(1)), "{e}");
    let mut missing = plan_at(4);
    missing.shift_remove(&mlp_group(0));
    let e = zip(&spec, &a, &b, &missing, &ZipOptions::default()).unwrap_err();
    assert!(e.to_string().contains("no entry"), "{e}");
    let e = plan_group(&[0, 0], &[0.1, 0.2], 1, "g").unwrap_err();
    assert!(e.to_string().contains("not a permutation"), "{e}");
    assert!(permute::zip::check_ratio(1.5).is_err());
}

/// A plan per hidden layer: A's unit `i` with B's `perm[i]` (B's units
/// reversed), the `merged` first units merged.
fn reversed_plan(
    spec: &permute::PermutationSpec,
    merged: usize,
) -> indexmap::IndexMap<String, permute::zip::GroupPlan> {
    spec.groups
        .iter()
        .map(|g| {
            let perm: Vec<usize> = (0..g.blocks).rev().collect();
            let score: Vec<f64> = (0..g.blocks).map(|i| -(i as f64)).collect();
            let p = permute::zip::plan_group(&perm, &score, merged, &g.name).unwrap();
            (g.name.clone(), p)
        })
        .collect()
}

fn every_layer(n: usize) -> Vec<Vec<String>> {
    (0..n).map(|l| vec![format!("layers.{l}.weight")]).collect()
}

#[test]
fn least_squares_of_an_mlp_equals_the_merge_matrix_solve() {
    use ndarray::{Axis, concatenate};
    use permute::zip::{LeastSquaresOptions, MlpProbe, ZipOptions, least_squares};
    let sizes = [5, 8, 8, 3];
    let (a, b) = (random_mlp(&sizes, 4), random_mlp(&sizes, 5));
    let spec = mlp(&a).unwrap();
    let plan = reversed_plan(&spec, 5);
    let mut rng = Rng::new(6);
    let x = Array2::from_shape_fn((40, 5), |_| rng.normal());
    let ridge = 1e-3;
    let opts = LeastSquaresOptions {
        steps: every_layer(3),
        ridge,
    };
    let mut probe = MlpProbe::new(x.clone());
    let got = least_squares(
        &spec,
        &a,
        &b,
        &plan,
        &ZipOptions::default(),
        &opts,
        &mut probe,
    )
    .unwrap();

    // The reference: PLeaS's matrix form, one layer after the other in f64,
    // `[Z_A Z_B] M_lᵀ` with the plan's merge matrix (the head's: the mean).
    let f64_of = |sd: &StateDict, n: &str| sd.get(n).unwrap().data.mapv(f64::from);
    let pre = |sd: &StateDict| {
        let mut h = x.clone();
        let mut zs = vec![];
        for l in 0..3 {
            let w = f64_of(sd, &format!("layers.{l}.weight"))
                .into_dimensionality::<Ix2>()
                .unwrap();
            let bias = f64_of(sd, &format!("layers.{l}.bias"))
                .into_dimensionality::<ndarray::Ix1>()
                .unwrap();
            let z = h.dot(&w.t()) + &bias;
            h = z.mapv(|v| v.max(0.0));
            zs.push(z);
        }
        zs
    };
    let (za, zb) = (pre(&a), pre(&b));
    let mut h = x.clone();
    for l in 0..3 {
        let m = match spec.groups.get(l) {
            Some(g) => plan[&g.name].merge_matrix(),
            None => concatenate![
                Axis(1),
                Array2::<f64>::eye(3) * 0.5,
                Array2::<f64>::eye(3) * 0.5
            ],
        };
        let target = concatenate![Axis(1), za[l], zb[l]].dot(&m.t());
        let x1 = concatenate![Axis(1), h, Array2::<f64>::ones((h.nrows(), 1))];
        let lambda = ridge * x1.iter().map(|v| v * v).sum::<f64>() / x1.ncols() as f64;
        let theta =
            spectra::linalg::ridge_least_squares(x1.view(), target.view(), lambda, "ref").unwrap();
        let d = h.ncols();
        let w = theta.slice(ndarray::s![..d, ..]).t().to_owned();
        let bias = theta.row(d).to_owned();
        let ours = f64_of(&got, &format!("layers.{l}.weight"))
            .into_dimensionality::<Ix2>()
            .unwrap();
        let ours_b = f64_of(&got, &format!("layers.{l}.bias"))
            .into_dimensionality::<ndarray::Ix1>()
            .unwrap();
        let scale = w.iter().fold(1f64, |m, v| m.max(v.abs()));
        let dw = (&ours - &w).iter().fold(0f64, |m, v| m.max(v.abs())) / scale;
        let db = (&ours_b - &bias).iter().fold(0f64, |m, v| m.max(v.abs())) / scale;
        assert!(dw < 1e-5 && db < 1e-5, "layer {l}: {dw} {db}");
        assert_eq!(ours.dim(), (m.nrows(), d));
        // The next layer's input: this solve's output (through the f32 weights
        // the merged model holds).
        let wf = ours.mapv(|v| v as f32 as f64);
        h = (h.dot(&wf.t()) + &ours_b).mapv(|v| v.max(0.0));
    }
}

#[test]
fn least_squares_at_ratio_0_is_the_ensemble_and_at_ratio_1_recovers_a_permuted_copy() {
    use permute::zip::{LeastSquaresOptions, MlpProbe, ZipOptions, least_squares};
    let sizes = [6, 8, 8, 3];
    let (a, b) = (random_mlp(&sizes, 7), random_mlp(&sizes, 8));
    let spec = mlp(&a).unwrap();
    let mut rng = Rng::new(9);
    let x = Array2::from_shape_fn((200, 6), |_| rng.normal());
    let xf = x.mapv(|v| v as f32);
    let opts = LeastSquaresOptions {
        steps: every_layer(3),
        ridge: 1e-12,
    };
    // Nothing merged: the wide model that fits every target exactly is the ensemble.
    let mut probe = MlpProbe::new(x.clone());
    let z = least_squares(
        &spec,
        &a,
        &b,
        &reversed_plan(&spec, 0),
        &ZipOptions::default(),
        &opts,
        &mut probe,
    )
    .unwrap();
    let want = (forward(&a, &xf) + forward(&b, &xf)) * 0.5;
    let err = max_abs(&(forward(&z, &xf) - &want)) / max_abs(&want);
    assert!(err < 1e-4, "{err}");
    // Everything merged with a permuted copy of A: A itself, whatever B's order.
    let mut perm = spec.identity();
    for g in perm.values_mut() {
        g.outer.reverse();
    }
    let b = apply(&spec, &perm, &a).unwrap();
    let mut probe = MlpProbe::new(x);
    let z = least_squares(
        &spec,
        &a,
        &b,
        &reversed_plan(&spec, 8),
        &ZipOptions::default(),
        &opts,
        &mut probe,
    )
    .unwrap();
    for (name, t) in a.iter() {
        let d = (&t.data - &z.get(name).unwrap().data)
            .iter()
            .fold(0f32, |m, v| m.max(v.abs()));
        assert!(d < 1e-3, "{name}: {d}");
    }
}

#[test]
fn least_squares_names_bad_input() {
    use permute::zip::{
        LeastSquaresOptions, MlpProbe, Probe, ProbeError, Source, ZipOptions, least_squares,
    };
    let sizes = [4, 6, 2];
    let (a, b) = (random_mlp(&sizes, 1), random_mlp(&sizes, 2));
    let spec = mlp(&a).unwrap();
    let plan = reversed_plan(&spec, 3);
    let x = Array2::from_shape_fn((10, 4), |(i, j)| (i * 4 + j) as f64 * 0.1);
    let run = |steps: Vec<Vec<String>>, ridge: f64, probe: &mut dyn Probe| {
        let opts = LeastSquaresOptions { steps, ridge };
        least_squares(&spec, &a, &b, &plan, &ZipOptions::default(), &opts, probe)
            .unwrap_err()
            .to_string()
    };
    let e = run(every_layer(2), -1.0, &mut MlpProbe::new(x.clone()));
    assert!(e.contains("ridge -1"), "{e}");
    let e = run(
        vec![vec!["layers.7.weight".into()]],
        0.1,
        &mut MlpProbe::new(x.clone()),
    );
    assert!(e.contains("layers.7.weight"), "{e}");
    let e = run(
        vec![vec!["layers.0.bias".into()]],
        0.1,
        &mut MlpProbe::new(x.clone()),
    );
    assert!(e.contains("not a linear weight"), "{e}");
    // One step of weights that do not share an input.
    let step = vec!["layers.0.weight".into(), "layers.1.weight".into()];
    let e = run(vec![step], 0.1, &mut MlpProbe::new(x.clone()));
    assert!(
        e.contains("layers.1.weight") && e.contains("share their input"),
        "{e}"
    );
    // Samples with the wrong number of features.
    let e = run(
        every_layer(2),
        0.1,
        &mut MlpProbe::new(Array2::zeros((10, 3))),
    );
    assert!(e.contains("layers.0.weight"), "{e}");
    // A probe that fails, and one that hands out NaN.
    struct Broken(f64);
    impl Probe for Broken {
        fn inputs(&mut self, _: Source, _: &StateDict, _: &str) -> Result<Array2<f64>, ProbeError> {
            if self.0.is_nan() {
                return Ok(Array2::from_elem((10, 4), self.0));
            }
            Err("the forward pass broke".into())
        }
    }
    let e = run(every_layer(2), 0.1, &mut Broken(0.0));
    assert!(
        e.contains("the forward pass broke") && e.contains("layers.0.weight"),
        "{e}"
    );
    let e = run(every_layer(2), 0.1, &mut Broken(f64::NAN));
    assert!(
        e.contains("non-finite") && e.contains("layers.0.weight"),
        "{e}"
    );
}
