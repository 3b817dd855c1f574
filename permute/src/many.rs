//! MergeMany (Git Re-Basin, Algorithm 3), activation matching and the
//! per-unit similarities that partial matching (PLeaS) needs.

use indexmap::IndexMap;
use ndarray::Array2;
use weights::{StateDict, Tensor};

use crate::error::{PermuteError, Result};
use crate::lap::{Objective, solve};
use crate::matching::{
    MatchOptions, Slot, check_models, group_similarity, l2_distance, weight_matching,
};
use crate::spec::{GroupPerm, Permutation, PermutationSpec, apply};

/// The element-wise mean of models (same names and shapes).
pub fn mean(models: &[StateDict]) -> Result<StateDict> {
    let first = models.first().ok_or_else(|| PermuteError::Shape {
        what: "mean".into(),
        msg: "no models".into(),
    })?;
    let mut out = StateDict::new();
    out.metadata = first.metadata.clone();
    for (name, t) in first.iter() {
        let mut acc = t.data.clone();
        for m in &models[1..] {
            let other = m.get(name).ok_or_else(|| PermuteError::MissingWeight {
                model: "model".into(),
                weight: name.to_string(),
            })?;
            if other.shape() != t.shape() {
                return Err(PermuteError::ShapeMismatch {
                    weight: name.to_string(),
                    a: t.shape().to_vec(),
                    b: other.shape().to_vec(),
                });
            }
            acc += &other.data;
        }
        acc /= models.len() as f32;
        out.insert(name, Tensor::new(acc, t.dtype));
    }
    Ok(out)
}

/// The result of [`merge_many`].
#[derive(Debug, Clone)]
pub struct MergeManyResult {
    /// One permutation per model (apply it to that model).
    pub perms: Vec<Permutation>,
    /// The mean of the aligned models.
    pub merged: StateDict,
    /// `Σᵢ ‖Pᵢ θᵢ − mean‖` after each round.
    pub distance: Vec<f64>,
    /// The rounds run (at most `max_rounds`), counting a last one that did
    /// not lower the distance.
    pub rounds: usize,
}

/// MergeMany: repeatedly align each model (seeded random order) to the mean
/// of the others, until a round no longer lowers the total distance to the
/// mean (or `max_rounds`).
pub fn merge_many(
    spec: &PermutationSpec,
    models: &[StateDict],
    opts: &MatchOptions,
    max_rounds: usize,
) -> Result<MergeManyResult> {
    if models.len() < 2 {
        return Err(PermuteError::Shape {
            what: "merge_many".into(),
            msg: format!("needs at least 2 models, got {}", models.len()),
        });
    }
    for m in &models[1..] {
        check_models(spec, &models[0], m)?;
    }
    let mut perms: Vec<Permutation> = vec![spec.identity(); models.len()];
    let mut aligned: Vec<StateDict> = models.to_vec();
    let total = |aligned: &[StateDict]| -> Result<f64> {
        let m = mean(aligned)?;
        Ok(aligned.iter().map(|a| l2_distance(a, &m)).sum())
    };
    let mut distance = vec![total(&aligned)?];
    let mut rng = weights::rng::Rng::new(opts.seed);
    let mut rounds = 0;
    for _ in 0..max_rounds {
        rounds += 1;
        let mut order: Vec<usize> = (0..models.len()).collect();
        rng.shuffle(&mut order);
        let before = (perms.clone(), aligned.clone());
        for i in order {
            let others: Vec<StateDict> = aligned
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, m)| m.clone())
                .collect();
            let target = mean(&others)?;
            let res = weight_matching(
                spec,
                &target,
                &models[i],
                &MatchOptions {
                    init: Some(perms[i].clone()),
                    seed: rng.next_u64(),
                    ..opts.clone()
                },
            )?;
            aligned[i] = apply(spec, &res.perm, &models[i])?;
            perms[i] = res.perm;
        }
        let d = total(&aligned)?;
        if d >= distance[distance.len() - 1] - 1e-9 {
            // No improvement: keep the previous round (it is at least as good).
            if d > distance[distance.len() - 1] {
                (perms, aligned) = before;
            }
            break;
        }
        distance.push(d);
    }
    Ok(MergeManyResult {
        merged: mean(&aligned)?,
        perms,
        distance,
        rounds,
    })
}

/// How activations are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Correlation {
    /// `E[a bᵀ]` over samples.
    Uncentered,
    /// Pearson correlation of each unit pair (constant units correlate 0).
    Pearson,
}

fn standardize(x: &Array2<f32>) -> Array2<f64> {
    let mut x = x.mapv(|v| v as f64);
    let n = x.nrows() as f64;
    for mut col in x.columns_mut() {
        let m = col.sum() / n;
        col.mapv_inplace(|v| v - m);
        let sd = (col.iter().map(|v| v * v).sum::<f64>() / n).sqrt();
        if sd > 0.0 {
            col.mapv_inplace(|v| v / sd);
        } else {
            col.fill(0.0);
        }
    }
    x
}

/// The unit correlation matrix `C[i][j]` between A's unit `i` and B's unit `j`.
pub fn correlation(a: &Array2<f32>, b: &Array2<f32>, kind: Correlation) -> Array2<f64> {
    let n = a.nrows() as f64;
    match kind {
        Correlation::Uncentered => a.mapv(|v| v as f64).t().dot(&b.mapv(|v| v as f64)) / n,
        Correlation::Pearson => standardize(a).t().dot(&standardize(b)) / n,
    }
}

/// Activation matching: for each group, activations (samples × units) of
/// both models; one assignment per group maximising the summed correlation.
/// Returns the permutations (to apply to B) and each matched pair's
/// correlation `C[i][perm[i]]` (for partial matching).
pub fn activation_matching(
    acts_a: &IndexMap<String, Array2<f32>>,
    acts_b: &IndexMap<String, Array2<f32>>,
    kind: Correlation,
) -> Result<(Permutation, IndexMap<String, Vec<f64>>)> {
    let mut perm = Permutation::new();
    let mut pairs = IndexMap::new();
    for (name, a) in acts_a {
        let b = acts_b.get(name).ok_or_else(|| PermuteError::Shape {
            what: format!("activations '{name}'"),
            msg: "missing for model B".into(),
        })?;
        if a.dim() != b.dim() || a.nrows() == 0 {
            return Err(PermuteError::Shape {
                what: format!("activations '{name}'"),
                msg: format!(
                    "shapes {:?} and {:?} (samples × units, equal and non-empty)",
                    a.dim(),
                    b.dim()
                ),
            });
        }
        if a.iter().chain(b.iter()).any(|v| !v.is_finite()) {
            return Err(PermuteError::NonFinite {
                what: format!("activations '{name}'"),
                msg: "NaN or Inf".into(),
            });
        }
        let c = correlation(a, b, kind);
        let n = c.nrows();
        let flat: Vec<f64> = c.iter().copied().collect();
        let p = solve(&flat, n, Objective::Maximize, name)?;
        pairs.insert(name.clone(), (0..n).map(|i| c[[i, p[i]]]).collect());
        perm.insert(
            name.clone(),
            GroupPerm {
                outer: p,
                inner: vec![vec![]],
                copies: vec![],
            },
        );
    }
    Ok((perm, pairs))
}

/// For each group, the similarity of every matched block pair
/// (`⟨A's block a, B's block perm[a]⟩` summed over the group's members, with
/// the other groups applied): PLeaS keeps the least similar fraction unmerged.
pub fn pair_similarities(
    spec: &PermutationSpec,
    perm: &Permutation,
    a: &StateDict,
    b: &StateDict,
) -> Result<IndexMap<String, Vec<f64>>> {
    check_models(spec, a, b)?;
    spec.check_value(perm)?;
    let by_weight = spec.by_weight();
    let mut out = IndexMap::new();
    for (gi, g) in spec.groups.iter().enumerate() {
        let p = &perm[&g.name];
        let mut slots = vec![Slot::default(); g.members.len()];
        let sim = group_similarity(spec, gi, perm, a, b, &by_weight, &mut slots);
        out.insert(
            g.name.clone(),
            (0..g.blocks)
                .map(|blk| sim.block_score(g, p, blk))
                .collect(),
        );
    }
    Ok(out)
}
