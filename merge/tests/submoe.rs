//! Sub-MoE expert merging (`merge::submoe`): closed-form cases, hand-computed
//! baselines, brute-force routing, and an independent numpy reference
//! (`fixtures/submoe_reference.py` wrote `fixtures/submoe_reference.json`).

use std::path::Path;

use merge::MergeError;
use merge::submoe::{
    ExpertWeights, MoeLayer, RouterMerge, SharedBasis, SubMoeOptions, average_clusters,
    cluster_experts, expert_similarity, most_routed, prune_experts, router_frequencies,
    submoe_merge, union_merge,
};
use ndarray::{Array2, ArrayView2, array, s};
use serde::Deserialize;

const HIDDEN: usize = 6;
const FFN: usize = 4;

fn gauss(r: usize, c: usize, rng: &mut weights::rng::Rng) -> Array2<f32> {
    rng.normal_array((r, c))
}

fn expert(rng: &mut weights::rng::Rng) -> ExpertWeights {
    ExpertWeights {
        w1: gauss(FFN, HIDDEN, rng),
        w2: gauss(HIDDEN, FFN, rng),
        w3: gauss(FFN, HIDDEN, rng),
    }
}

fn layer(n: usize, seed: u64) -> MoeLayer {
    let mut rng = weights::rng::Rng::new(seed);
    MoeLayer {
        gate: gauss(n, HIDDEN, &mut rng),
        experts: (0..n).map(|_| expert(&mut rng)).collect(),
    }
}

fn max_diff(a: &Array2<f32>, b: &Array2<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.iter()
        .zip(b.iter())
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

fn assert_expert_close(a: &ExpertWeights, b: &ExpertWeights, tol: f32) {
    for (x, y, name) in [
        (&a.w1, &b.w1, "w1"),
        (&a.w2, &b.w2, "w2"),
        (&a.w3, &b.w3, "w3"),
    ] {
        let d = max_diff(x, y);
        assert!(d <= tol, "{name}: max |diff| {d} > {tol}");
    }
}

/// `a·wa + b·wb` for each weight.
fn blend(a: f32, ea: &ExpertWeights, b: f32, eb: &ExpertWeights) -> ExpertWeights {
    ExpertWeights {
        w1: &ea.w1 * a + &eb.w1 * b,
        w2: &ea.w2 * a + &eb.w2 * b,
        w3: &ea.w3 * a + &eb.w3 * b,
    }
}

fn what(e: MergeError) -> String {
    match e {
        MergeError::Moe { what, .. } => what,
        other => panic!("expected MergeError::Moe, got {other:?}"),
    }
}

#[test]
fn identical_experts_compress_losslessly() {
    let mut l = layer(4, 1);
    l.experts[1] = l.experts[0].clone();
    l.experts[2] = l.experts[0].clone();
    let freq = [0.7, 0.2, 0.4, 0.5];
    // Full rank, and rank min(ffn, hidden): the concatenation [W, W, W] has W's rank.
    for rank in [None, Some(FFN.min(HIDDEN))] {
        let opts = SubMoeOptions {
            rank,
            ..Default::default()
        };
        let (merged, report) = submoe_merge(&l, &[0, 0, 0, 1], &freq, &opts).unwrap();
        assert_eq!(merged.num_experts(), 2);
        assert_expert_close(&merged.experts[0], &l.experts[0], 1e-5);
        for w in &report.clusters[0].weights {
            assert!(w.discarded_energy <= 1e-9 * w.kept_energy, "{w:?}");
            assert!(w.subspace_errors.iter().all(|&e| e < 1e-5), "{w:?}");
            assert!(w.merge_errors.iter().all(|&e| e < 1e-5), "{w:?}");
        }
        // The merged router row of identical rows weighted by frequency.
        let expected = (&l.gate.row(0) * 0.7 + &l.gate.row(1) * 0.2 + &l.gate.row(2) * 0.4) / 1.3;
        let d = (&merged.gate.row(0) - &expected)
            .iter()
            .fold(0f32, |m, v| m.max(v.abs()));
        assert!(d < 1e-6, "router row off by {d}");
    }
}

/// The singular values of `[W_1, …, W_n]` (or of the transposes), f64, by an
/// independent routine (values only).
fn concat_singular_values(ws: &[ArrayView2<f32>], shared: SharedBasis) -> Vec<f64> {
    let ws: Vec<Array2<f64>> = ws
        .iter()
        .map(|w| match shared {
            SharedBasis::Output => w.mapv(f64::from),
            SharedBasis::Input => w.t().mapv(f64::from),
        })
        .collect();
    let views: Vec<_> = ws.iter().map(|w| w.view()).collect();
    let m = ndarray::concatenate(ndarray::Axis(1), &views).unwrap();
    spectra::linalg::singular_values(m.view(), "concat").unwrap()
}

#[test]
fn rank_r_reconstruction_error_is_the_discarded_energy() {
    let l = layer(3, 2);
    for shared in [SharedBasis::Output, SharedBasis::Input] {
        for kind in merge::submoe::WeightKind::ALL {
            let ws: Vec<ArrayView2<f32>> = l.experts.iter().map(|e| e.get(kind).view()).collect();
            let sv = concat_singular_values(&ws, shared);
            for r in [1, 2, 3] {
                let u = union_merge(&ws, &[1.0, 2.0, 0.5], Some(r), shared, "t").unwrap();
                let expected: f64 = sv[r..].iter().map(|s| s * s).sum();
                let total: f64 = sv.iter().map(|s| s * s).sum();
                let sum_err: f64 = u.subspace_sq_errors.iter().sum();
                assert!(
                    (u.discarded_energy - expected).abs() <= 1e-4 * expected,
                    "{kind:?} r={r}: {} vs {expected}",
                    u.discarded_energy
                );
                assert!(
                    (sum_err - expected).abs() <= 1e-4 * expected,
                    "{kind:?} r={r}: Σ‖W−W_r‖² = {sum_err}, discarded {expected}"
                );
                assert!((u.kept_energy + u.discarded_energy - total).abs() <= 1e-9 * total);
                // The stored factors: a·b is the merged weight, of rank r.
                assert_eq!(u.a.ncols(), r);
                assert_eq!(u.b.nrows(), r);
                assert!(max_diff(&u.a.dot(&u.b), &u.merged) < 1e-5);
            }
        }
    }
    // Through the layer merge: the report's relative errors give the same energy.
    let opts = SubMoeOptions {
        rank: Some(2),
        ..Default::default()
    };
    let (_, report) = submoe_merge(&l, &[0, 0, 0], &[1.0, 1.0, 1.0], &opts).unwrap();
    for w in &report.clusters[0].weights {
        let sq: f64 = w
            .subspace_errors
            .iter()
            .zip(&l.experts)
            .map(|(e, ex)| {
                let n2: f64 = ex.get(w.kind).iter().map(|&v| f64::from(v).powi(2)).sum();
                e * e * n2
            })
            .sum();
        assert!((sq - w.discarded_energy).abs() <= 1e-4 * w.discarded_energy);
        let (o, i) = l.experts[0].get(w.kind).dim();
        assert_eq!(w.stored_params, 2 * (o + i));
    }
    assert_eq!(report.params_before, 3 * HIDDEN + 3 * 3 * FFN * HIDDEN);
    assert_eq!(
        report.params_after,
        HIDDEN + 3 * 2 * (FFN + HIDDEN),
        "router row plus three rank-2 factor pairs"
    );
}

#[test]
fn frequency_weighting_by_hand_on_two_experts() {
    let l = layer(2, 3);
    let (a, b) = (&l.experts[0], &l.experts[1]);
    // Full rank: the V merge reproduces Σ f_i W_i / Σ f_i exactly.
    let (m, _) = submoe_merge(&l, &[0, 0], &[3.0, 1.0], &SubMoeOptions::default()).unwrap();
    assert_expert_close(&m.experts[0], &blend(0.75, a, 0.25, b), 1e-5);
    let row = &l.gate.row(0) * 0.75 + &l.gate.row(1) * 0.25;
    assert!(max_diff(&m.gate, &row.insert_axis(ndarray::Axis(0))) < 1e-6);
    // The plain-mean router keeps the frequency-weighted experts.
    let opts = SubMoeOptions {
        router: RouterMerge::Mean,
        ..Default::default()
    };
    let (m, _) = submoe_merge(&l, &[0, 0], &[3.0, 1.0], &opts).unwrap();
    assert_expert_close(&m.experts[0], &blend(0.75, a, 0.25, b), 1e-5);
    let row = (&l.gate.row(0) + &l.gate.row(1)) * 0.5;
    assert!(max_diff(&m.gate, &row.insert_axis(ndarray::Axis(0))) < 1e-6);
    // No routing at all: equal weights.
    let (m, report) = submoe_merge(&l, &[0, 0], &[0.0, 0.0], &SubMoeOptions::default()).unwrap();
    assert_expert_close(&m.experts[0], &blend(0.5, a, 0.5, b), 1e-5);
    assert_eq!(report.clusters[0].coefficients, vec![0.5, 0.5]);
    // Only one expert routed: the merged expert is that one.
    let (m, _) = submoe_merge(&l, &[0, 0], &[0.0, 2.0], &SubMoeOptions::default()).unwrap();
    assert_expert_close(&m.experts[0], b, 1e-5);
}

#[test]
fn full_rank_sub_moe_is_the_frequency_weighted_average() {
    let l = layer(5, 4);
    let assignment = [1, 0, 1, 2, 0];
    let freq = [0.3, 0.1, 0.6, 0.2, 0.8];
    let (m, report) = submoe_merge(&l, &assignment, &freq, &SubMoeOptions::default()).unwrap();
    let avg = average_clusters(&l, &assignment, Some(&freq)).unwrap();
    assert_eq!(m.num_experts(), 3);
    for (x, y) in m.experts.iter().zip(&avg.experts) {
        assert_expert_close(x, y, 1e-5);
    }
    assert!(max_diff(&m.gate, &avg.gate) < 1e-6);
    assert_eq!(report.clusters[0].members, vec![1, 4]);
    assert_eq!(report.clusters[1].members, vec![0, 2]);
    assert_eq!(report.clusters[2].members, vec![3]);
    assert_eq!(report.params_after, 3 * HIDDEN + 3 * 3 * FFN * HIDDEN);
}

#[test]
fn one_expert_per_cluster_at_full_rank_returns_the_layer() {
    let l = layer(4, 5);
    let (m, report) = submoe_merge(
        &l,
        &[0, 1, 2, 3],
        &[0.5, 0.0, 1.5, 0.25],
        &SubMoeOptions::default(),
    )
    .unwrap();
    assert_eq!(m, l);
    assert_eq!(report.params_before, report.params_after);
    assert!(
        report
            .clusters
            .iter()
            .all(|c| c.weights.iter().all(|w| w.discarded_energy == 0.0))
    );
}

#[test]
fn kmeans_on_output_similarity_recovers_expert_groups() {
    // Three groups of experts, each a base expert plus small noise, interleaved.
    let groups = [0, 1, 0, 2, 1, 2, 0];
    let mut rng = weights::rng::Rng::new(6);
    let bases: Vec<ExpertWeights> = (0..3).map(|_| expert(&mut rng)).collect();
    let experts: Vec<ExpertWeights> = groups
        .iter()
        .map(|&g| {
            let noise = expert(&mut rng);
            blend(1.0, &bases[g], 0.05, &noise)
        })
        .collect();
    let x = gauss(40, HIDDEN, &mut rng);
    let outputs: Vec<Array2<f32>> = experts.iter().map(|e| e.forward(x.view())).collect();
    let views: Vec<_> = outputs.iter().map(|o| o.view()).collect();
    let sim = expert_similarity(&views).unwrap();
    for i in 0..groups.len() {
        assert_eq!(sim[[i, i]], 1.0);
        for j in 0..groups.len() {
            assert_eq!(sim[[i, j]], sim[[j, i]]);
            if groups[i] == groups[j] {
                assert!(sim[[i, j]] > 0.9, "same group {i},{j}: {}", sim[[i, j]]);
            }
        }
    }
    for seed in [0, 1, 7] {
        let labels = cluster_experts(sim.view(), 3, seed).unwrap();
        // Labels are numbered by first appearance, so the groups come out as is.
        assert_eq!(labels, groups, "seed {seed}");
    }
    // k = n: every expert alone; k = 1: all together.
    let n = groups.len();
    assert_eq!(
        cluster_experts(sim.view(), n, 3).unwrap(),
        (0..n).collect::<Vec<_>>()
    );
    assert_eq!(cluster_experts(sim.view(), 1, 3).unwrap(), vec![0; n]);
}

#[test]
fn kmeans_gives_k_nonempty_clusters_even_with_duplicate_experts() {
    // Four identical rows and one other: k = 3 needs a duplicate split off.
    let sim = array![
        [1.0, 1.0, 1.0, 1.0, 0.0],
        [1.0, 1.0, 1.0, 1.0, 0.0],
        [1.0, 1.0, 1.0, 1.0, 0.0],
        [1.0, 1.0, 1.0, 1.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 1.0],
    ];
    let labels = cluster_experts(sim.view(), 3, 11).unwrap();
    let mut seen = [false; 3];
    labels.iter().for_each(|&l| seen[l] = true);
    assert_eq!(seen, [true; 3], "{labels:?}");
    assert_eq!(labels[0], 0);
}

#[test]
fn similarity_is_the_mean_per_token_cosine() {
    // Token 1: parallel (cos 1); token 2: orthogonal (0); token 3: a zero output (0).
    let a = array![[1.0f32, 0.0], [0.0, 2.0], [1.0, 1.0]];
    let b = array![[3.0f32, 0.0], [5.0, 0.0], [0.0, 0.0]];
    let sim = expert_similarity(&[a.view(), b.view()]).unwrap();
    assert_eq!(sim, array![[1.0, 1.0 / 3.0], [1.0 / 3.0, 1.0]]);
}

#[test]
fn prune_keeps_the_most_routed_experts() {
    let l = layer(5, 7);
    let p = prune_experts(&l, &[0.1, 0.5, 0.5, 0.0, 0.3], 3).unwrap();
    assert_eq!(p.num_experts(), 3);
    for (k, &i) in [1, 2, 4].iter().enumerate() {
        assert_eq!(p.experts[k], l.experts[i]);
        assert_eq!(p.gate.row(k), l.gate.row(i));
    }
    // Ties go to the lower index; the kept ones stay in their order.
    assert_eq!(most_routed(&[1.0, 2.0, 2.0, 2.0], 2).unwrap(), vec![1, 2]);
    assert_eq!(
        most_routed(&[5.0, 0.0, 0.0, 9.0], 3).unwrap(),
        vec![0, 1, 3]
    );
    assert_eq!(prune_experts(&l, &[1.0; 5], 5).unwrap(), l);
}

#[test]
fn average_clusters_by_hand() {
    let l = layer(3, 8);
    let (e0, e1, e2) = (&l.experts[0], &l.experts[1], &l.experts[2]);
    let plain = average_clusters(&l, &[0, 1, 0], None).unwrap();
    assert_eq!(plain.num_experts(), 2);
    assert_expert_close(&plain.experts[0], &blend(0.5, e0, 0.5, e2), 1e-6);
    assert_eq!(plain.experts[1], *e1);
    let row = (&l.gate.row(0) + &l.gate.row(2)) * 0.5;
    assert!(
        max_diff(
            &plain.gate.slice(s![0..1, ..]).to_owned(),
            &row.insert_axis(ndarray::Axis(0))
        ) < 1e-6
    );
    assert_eq!(plain.gate.row(1), l.gate.row(1));
    let weighted = average_clusters(&l, &[0, 1, 0], Some(&[1.0, 4.0, 3.0])).unwrap();
    assert_expert_close(&weighted.experts[0], &blend(0.25, e0, 0.75, e2), 1e-6);
    let row = &l.gate.row(0) * 0.25 + &l.gate.row(2) * 0.75;
    assert!(
        max_diff(
            &weighted.gate.slice(s![0..1, ..]).to_owned(),
            &row.insert_axis(ndarray::Axis(0))
        ) < 1e-6
    );
}

#[test]
fn router_frequencies_match_brute_force() {
    let mut rng = weights::rng::Rng::new(9);
    let (e, t) = (5, 50);
    let gate = gauss(e, HIDDEN, &mut rng);
    let hidden = gauss(t, HIDDEN, &mut rng);
    for k in 1..=e {
        let f = router_frequencies(gate.view(), hidden.view(), k).unwrap();
        // Brute force: expert i is in the top-k of softmax(G x) when fewer than
        // k experts have a larger probability.
        let mut expected = vec![0.0; e];
        for x in hidden.outer_iter() {
            let logits: Vec<f64> = gate.outer_iter().map(|g| f64::from(g.dot(&x))).collect();
            let z: f64 = logits.iter().map(|l| l.exp()).sum();
            let p: Vec<f64> = logits.iter().map(|l| l.exp() / z).collect();
            for i in 0..e {
                if (0..e).filter(|&j| p[j] > p[i]).count() < k {
                    expected[i] += 1.0 / t as f64;
                }
            }
        }
        for i in 0..e {
            assert!(
                (f[i] - expected[i]).abs() < 1e-12,
                "k={k} expert {i}: {} vs {}",
                f[i],
                expected[i]
            );
        }
        assert!((f.iter().sum::<f64>() - k as f64).abs() < 1e-9);
    }
}

#[derive(Deserialize)]
struct RefExpert {
    w1: Vec<Vec<f64>>,
    w2: Vec<Vec<f64>>,
    w3: Vec<Vec<f64>>,
}

#[derive(Deserialize)]
struct RefWeight {
    rank: usize,
    full_rank: usize,
    kept_energy: f64,
    discarded_energy: f64,
    subspace_sq_errors: Vec<f64>,
}

#[derive(Deserialize)]
struct RefCase {
    rank: Option<usize>,
    shared: String,
    experts: Vec<RefExpert>,
    gate: Vec<Vec<f64>>,
    clusters: Vec<std::collections::HashMap<String, RefWeight>>,
}

#[derive(Deserialize)]
struct Reference {
    assignment: Vec<usize>,
    frequencies: Vec<f64>,
    top_k: usize,
    gate: Vec<Vec<f64>>,
    experts: Vec<RefExpert>,
    x: Vec<Vec<f64>>,
    cases: Vec<RefCase>,
    expert_outputs: Vec<Vec<Vec<f64>>>,
    similarity: Vec<Vec<f64>>,
    router_frequencies: Vec<f64>,
    layer_output: Vec<Vec<f64>>,
}

fn mat(rows: &[Vec<f64>]) -> Array2<f32> {
    Array2::from_shape_fn((rows.len(), rows[0].len()), |(i, j)| rows[i][j] as f32)
}

fn ref_expert(e: &RefExpert) -> ExpertWeights {
    ExpertWeights {
        w1: mat(&e.w1),
        w2: mat(&e.w2),
        w3: mat(&e.w3),
    }
}

fn rel_close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * b.abs().max(1e-12)
}

#[test]
fn matches_the_numpy_reference() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/submoe_reference.json");
    let r: Reference = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let l = MoeLayer {
        gate: mat(&r.gate),
        experts: r.experts.iter().map(ref_expert).collect(),
    };
    for case in &r.cases {
        let opts = SubMoeOptions {
            rank: case.rank,
            shared: match case.shared.as_str() {
                "Output" => SharedBasis::Output,
                _ => SharedBasis::Input,
            },
            router: RouterMerge::FrequencyMean,
        };
        let label = format!("rank {:?} shared {}", case.rank, case.shared);
        let (m, report) = submoe_merge(&l, &r.assignment, &r.frequencies, &opts).unwrap();
        assert_eq!(m.num_experts(), case.experts.len());
        for (got, want) in m.experts.iter().zip(&case.experts) {
            assert_expert_close(got, &ref_expert(want), 1e-5);
        }
        assert!(max_diff(&m.gate, &mat(&case.gate)) < 1e-6, "{label}: gate");
        for (c, rc) in report.clusters.iter().zip(&case.clusters) {
            for w in &c.weights {
                let Some(want) = rc.get(w.kind.name()) else {
                    continue; // a copied singleton
                };
                assert_eq!(
                    (w.rank, w.full_rank),
                    (want.rank, want.full_rank),
                    "{label}"
                );
                assert!(rel_close(w.kept_energy, want.kept_energy, 1e-9), "{label}");
                assert!(
                    (w.discarded_energy - want.discarded_energy).abs() <= 1e-9 * want.kept_energy,
                    "{label}: {} vs {}",
                    w.discarded_energy,
                    want.discarded_energy
                );
                for ((&e, &i), &want_sq) in w
                    .subspace_errors
                    .iter()
                    .zip(&c.members)
                    .zip(&want.subspace_sq_errors)
                {
                    let n2: f64 = l.experts[i]
                        .get(w.kind)
                        .iter()
                        .map(|&v| f64::from(v).powi(2))
                        .sum();
                    assert!(
                        (e * e * n2 - want_sq).abs() <= 1e-8 * n2,
                        "{label}: member {i}"
                    );
                }
            }
        }
    }
    // Expert outputs, similarity, routing frequencies, the layer's output.
    let x = mat(&r.x);
    let outputs: Vec<Array2<f32>> = l.experts.iter().map(|e| e.forward(x.view())).collect();
    for (o, want) in outputs.iter().zip(&r.expert_outputs) {
        assert!(max_diff(o, &mat(want)) < 1e-5);
    }
    let views: Vec<_> = outputs.iter().map(|o| o.view()).collect();
    let sim = expert_similarity(&views).unwrap();
    for (i, row) in r.similarity.iter().enumerate() {
        for (j, &v) in row.iter().enumerate() {
            assert!((sim[[i, j]] - v).abs() < 1e-5, "similarity [{i}, {j}]");
        }
    }
    assert_eq!(
        router_frequencies(l.gate.view(), x.view(), r.top_k).unwrap(),
        r.router_frequencies
    );
    let y = l.forward(x.view(), r.top_k).unwrap();
    assert!(max_diff(&y, &mat(&r.layer_output)) < 1e-5);
}

#[test]
fn bad_inputs_name_the_field() {
    let l = layer(4, 10);
    let f = [1.0; 4];
    let o = SubMoeOptions::default();
    let a = [0, 0, 1, 1];

    let mut bad = l.clone();
    bad.experts[1].w2 = Array2::zeros((FFN, HIDDEN));
    assert_eq!(
        what(submoe_merge(&bad, &a, &f, &o).unwrap_err()),
        "layer.experts[1].w2"
    );
    let mut bad = l.clone();
    bad.experts[2].w1 = Array2::zeros((FFN + 1, HIDDEN));
    assert_eq!(
        what(average_clusters(&bad, &a, None).unwrap_err()),
        "layer.experts[2].w1"
    );
    let mut bad = l.clone();
    bad.experts[0].w3[[1, 2]] = f32::NAN;
    assert_eq!(
        what(prune_experts(&bad, &f, 2).unwrap_err()),
        "layer.experts[0].w3"
    );
    let mut bad = l.clone();
    bad.gate = Array2::zeros((3, HIDDEN));
    assert_eq!(
        what(submoe_merge(&bad, &a, &f, &o).unwrap_err()),
        "layer.gate"
    );
    let mut bad = l.clone();
    bad.gate[[0, 0]] = f32::INFINITY;
    assert_eq!(
        what(submoe_merge(&bad, &a, &f, &o).unwrap_err()),
        "layer.gate"
    );
    let empty = MoeLayer {
        gate: Array2::zeros((0, HIDDEN)),
        experts: vec![],
    };
    assert_eq!(
        what(submoe_merge(&empty, &[], &[], &o).unwrap_err()),
        "layer.experts"
    );

    // Assignments: wrong length, a gap (an empty cluster).
    assert_eq!(
        what(submoe_merge(&l, &[0, 0, 1], &f, &o).unwrap_err()),
        "assignment"
    );
    assert_eq!(
        what(submoe_merge(&l, &[0, 2, 2, 0], &f, &o).unwrap_err()),
        "assignment"
    );
    assert_eq!(
        what(average_clusters(&l, &[], None).unwrap_err()),
        "assignment"
    );
    // Frequencies: wrong length, negative, NaN.
    assert_eq!(
        what(submoe_merge(&l, &a, &[1.0; 3], &o).unwrap_err()),
        "frequencies"
    );
    assert_eq!(
        what(submoe_merge(&l, &a, &[1.0, -0.5, 1.0, 1.0], &o).unwrap_err()),
        "frequencies"
    );
    assert_eq!(
        what(average_clusters(&l, &a, Some(&[1.0, f64::NAN, 1.0, 1.0])).unwrap_err()),
        "frequencies"
    );
    assert_eq!(
        what(prune_experts(&l, &[1.0; 5], 2).unwrap_err()),
        "frequencies"
    );
    // Rank 0.
    let zero_rank = SubMoeOptions {
        rank: Some(0),
        ..Default::default()
    };
    assert_eq!(
        what(submoe_merge(&l, &a, &f, &zero_rank).unwrap_err()),
        "opts.rank"
    );
    // Compression targets of zero experts or more than there are.
    assert_eq!(what(prune_experts(&l, &f, 0).unwrap_err()), "keep");
    assert_eq!(what(prune_experts(&l, &f, 5).unwrap_err()), "keep");
    let sim = Array2::<f64>::eye(4);
    assert_eq!(what(cluster_experts(sim.view(), 0, 1).unwrap_err()), "k");
    assert_eq!(what(cluster_experts(sim.view(), 5, 1).unwrap_err()), "k");
    assert_eq!(
        what(cluster_experts(Array2::<f64>::zeros((3, 4)).view(), 2, 1).unwrap_err()),
        "similarity"
    );
    let mut nan_sim = sim.clone();
    nan_sim[[1, 2]] = f64::NAN;
    assert_eq!(
        what(cluster_experts(nan_sim.view(), 2, 1).unwrap_err()),
        "similarity"
    );
    // Similarity inputs.
    let out = Array2::<f32>::ones((3, HIDDEN));
    let short = Array2::<f32>::ones((2, HIDDEN));
    assert_eq!(what(expert_similarity(&[]).unwrap_err()), "outputs");
    assert_eq!(
        what(expert_similarity(&[out.view(), short.view()]).unwrap_err()),
        "outputs[1]"
    );
    let mut inf = out.clone();
    inf[[2, 0]] = f32::NEG_INFINITY;
    assert_eq!(
        what(expert_similarity(&[out.view(), inf.view()]).unwrap_err()),
        "outputs[1]"
    );
    // Routing inputs.
    let h = Array2::<f32>::ones((5, HIDDEN));
    assert_eq!(
        what(router_frequencies(l.gate.view(), h.view(), 0).unwrap_err()),
        "top_k"
    );
    assert_eq!(
        what(router_frequencies(l.gate.view(), h.view(), 5).unwrap_err()),
        "top_k"
    );
    let narrow = Array2::<f32>::ones((5, HIDDEN - 1));
    assert_eq!(
        what(router_frequencies(l.gate.view(), narrow.view(), 2).unwrap_err()),
        "hidden"
    );
    let none = Array2::<f32>::ones((0, HIDDEN));
    assert_eq!(
        what(router_frequencies(l.gate.view(), none.view(), 2).unwrap_err()),
        "hidden"
    );
    assert_eq!(what(l.forward(narrow.view(), 2).unwrap_err()), "x");
    assert_eq!(what(l.forward(h.view(), 9).unwrap_err()), "top_k");
    // union_merge on its own.
    let w = [l.experts[0].w1.view(), l.experts[1].w2.view()];
    assert_eq!(
        what(union_merge(&w, &[1.0, 1.0], None, SharedBasis::Output, "m").unwrap_err()),
        "m[1]"
    );
    let w = [l.experts[0].w1.view(), l.experts[1].w1.view()];
    assert_eq!(
        what(union_merge(&w, &[1.0, -1.0], None, SharedBasis::Output, "m").unwrap_err()),
        "m.coefficients"
    );
    assert_eq!(
        what(union_merge(&w, &[1.0], None, SharedBasis::Output, "m").unwrap_err()),
        "m.coefficients"
    );
    assert_eq!(
        what(union_merge(&[], &[], None, SharedBasis::Output, "m").unwrap_err()),
        "m"
    );
}
