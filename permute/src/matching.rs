//! Weight matching (Ainsworth, Hayase & Srinivasa, "Git Re-Basin", ICLR 2023).
//!
//! Starting from the identity (or a given permutation), each pass visits the
//! groups in a seeded random order. For group `P` it forms, for every member
//! `(weight, axis)`, the similarity `W_A[axis→0] · (W_B with every other group
//! applied)[axis→0]ᵀ`, sums the members, and solves the linear assignment that
//! maximises `⟨W_A, P W_B⟩` ([`crate::lap`]). For block groups (attention
//! heads) the score of putting B's block `b` at A's block `a` is the best
//! inner assignment of their units (a `block_size` LAP per pair and family,
//! or the trace for fixed families), and the block assignment is solved on
//! those scores. Passes stop when none of the groups improves the objective
//! by more than `tol`, or after `max_iter`.

use ndarray::{Array2, ArrayD, ArrayViewMut2, Ix2};
use rayon::prelude::*;
use serde::Serialize;
use weights::StateDict;

use crate::error::{PermuteError, Result};
use crate::lap::{Duals, Objective, solve, solve_warm};
use crate::spec::{Group, GroupPerm, Inner, Permutation, PermutationSpec, apply, permute_tensor};

/// Options of [`weight_matching`].
#[derive(Debug, Clone)]
pub struct MatchOptions {
    /// Most passes over all groups.
    pub max_iter: usize,
    /// Seed of the group visiting order.
    pub seed: u64,
    /// Starting permutation (identity when `None`).
    pub init: Option<Permutation>,
    /// Least objective gain that counts as progress.
    pub tol: f64,
}

impl Default for MatchOptions {
    fn default() -> Self {
        MatchOptions {
            max_iter: 100,
            seed: 0,
            init: None,
            tol: 1e-12,
        }
    }
}

/// The result of [`weight_matching`].
#[derive(Debug, Clone, Serialize)]
pub struct MatchResult {
    /// The permutation that maps B onto A (apply it to B).
    pub perm: Permutation,
    /// `Σ ⟨W_A, P W_B⟩` over the spec's weights after each pass.
    pub objective: Vec<f64>,
    /// Passes run.
    pub passes: usize,
    /// `‖A − B‖` over the tensors both models share.
    pub l2_before: f64,
    /// `‖A − P B‖`.
    pub l2_after: f64,
}

/// `‖A − B‖₂` over the tensors with equal names and shapes.
pub fn l2_distance(a: &StateDict, b: &StateDict) -> f64 {
    let mut s = 0f64;
    for (name, ta) in a.iter() {
        if let Some(tb) = b.get(name).filter(|tb| tb.shape() == ta.shape()) {
            s += ta
                .data
                .iter()
                .zip(tb.data.iter())
                .map(|(x, y)| ((x - y) as f64).powi(2))
                .sum::<f64>();
        }
    }
    s.sqrt()
}

/// Checks that both models fit the spec, share shapes, and are finite.
pub(crate) fn check_models(spec: &PermutationSpec, a: &StateDict, b: &StateDict) -> Result<()> {
    spec.validate(a, "model A")?;
    spec.validate(b, "model B")?;
    for (name, _) in spec.by_weight() {
        let (ta, tb) = (
            a.get(name).expect("validated"),
            b.get(name).expect("validated"),
        );
        if ta.shape() != tb.shape() {
            return Err(PermuteError::ShapeMismatch {
                weight: name.to_string(),
                a: ta.shape().to_vec(),
                b: tb.shape().to_vec(),
            });
        }
        for (model, t) in [("A", ta), ("B", tb)] {
            if let Some(v) = t.data.iter().find(|v| !v.is_finite()) {
                return Err(PermuteError::NonFinite {
                    what: format!("model {model} weight '{name}'"),
                    msg: v.to_string(),
                });
            }
        }
    }
    Ok(())
}

/// A tensor with `axis` moved first and the rest flattened: `(len, rest)`.
pub(crate) fn unfold(data: &ArrayD<f32>, axis: usize) -> Array2<f32> {
    let len = data.shape()[axis];
    let rest = data.len() / len.max(1);
    let mut order: Vec<usize> = (0..data.ndim()).collect();
    order.remove(axis);
    order.insert(0, axis);
    data.view()
        .permuted_axes(order)
        .as_standard_layout()
        .into_owned()
        .into_shape_with_order((len, rest))
        .expect("contiguous")
        .into_dimensionality::<Ix2>()
        .expect("2-D")
}

/// Summed similarities of a group, per family: `sim[f][((a·B + b)·bs + i)·bs + i']`.
pub(crate) struct GroupSimilarity {
    blocks: usize,
    bs: usize,
    sim: Vec<Vec<f64>>,
}

impl GroupSimilarity {
    pub(crate) fn new(g: &Group) -> Self {
        let n = g.blocks * g.blocks * g.block_size * g.block_size;
        GroupSimilarity {
            blocks: g.blocks,
            bs: g.block_size,
            sim: (0..g.families.len())
                .map(|_| weights::mem::filled(n, 0.0))
                .collect(),
        }
    }

    /// Adds `A_mat · B_matᵀ` of one member (both `(axis_len, rest)`), using
    /// `prod` as room for the product.
    pub(crate) fn add(
        &mut self,
        family: usize,
        repeat: usize,
        a: &Array2<f32>,
        b: &Array2<f32>,
        prod: &mut Vec<f32>,
    ) {
        let n = a.nrows();
        if prod.len() != n * n {
            *prod = weights::mem::filled(n * n, 0.0);
        }
        let mut s = ArrayViewMut2::from_shape((n, n), prod).expect("n·n buffer");
        ndarray::linalg::general_mat_mul(1.0, a, &b.t(), 0.0, &mut s);
        let s: &[f32] = prod;
        let (nb, bs) = (self.blocks, self.bs);
        let fam = &mut self.sim[family];
        if bs == 1 && repeat == 1 {
            // One unit per block: the product is the similarity itself.
            fam.iter_mut().zip(s).for_each(|(d, &v)| *d += v as f64);
            return;
        }
        // Row `(ab·repeat + r)·bs + i` of the product holds, for every block
        // `bb`, the `bs` contiguous entries of row `i` of block `(ab, bb)`.
        for ab in 0..nb {
            for r in 0..repeat {
                for i in 0..bs {
                    let row = &s[((ab * repeat + r) * bs + i) * n..][..n];
                    for bb in 0..nb {
                        let src = &row[(bb * repeat + r) * bs..][..bs];
                        let dst = &mut fam[((ab * nb + bb) * bs + i) * bs..][..bs];
                        dst.iter_mut().zip(src).for_each(|(d, &v)| *d += v as f64);
                    }
                }
            }
        }
    }

    fn block(&self, f: usize, a: usize, b: usize) -> &[f64] {
        let n = self.bs * self.bs;
        let start = (a * self.blocks + b) * n;
        &self.sim[f][start..start + n]
    }

    /// The score of a value (current or candidate).
    pub(crate) fn score(&self, g: &Group, p: &GroupPerm) -> f64 {
        (0..self.blocks).map(|a| self.block_score(g, p, a)).sum()
    }

    /// The score of block `a` of A paired with block `p.outer[a]` of B.
    pub(crate) fn block_score(&self, g: &Group, p: &GroupPerm, a: usize) -> f64 {
        let mut total = 0.0;
        for (f, kind) in g.families.iter().enumerate() {
            let blk = self.block(f, a, p.outer[a]);
            total += match kind {
                Inner::Identity => (0..self.bs).map(|i| blk[i * self.bs + i]).sum::<f64>(),
                Inner::Free => (0..self.bs)
                    .map(|i| blk[i * self.bs + p.inner[f][a][i]])
                    .sum::<f64>(),
            };
        }
        total
    }

    /// The best value for this similarity.
    pub(crate) fn solve(&self, g: &Group, warm: Option<&Duals>) -> Result<(GroupPerm, Duals)> {
        let (nb, bs) = (self.blocks, self.bs);
        let mut outer_cost = vec![0.0; nb * nb];
        // Inner solutions per (family, a, b), kept to avoid solving twice.
        let mut inner_best: Vec<Vec<Vec<usize>>> = vec![vec![]; g.families.len()];
        for (f, kind) in g.families.iter().enumerate() {
            if *kind == Inner::Free {
                inner_best[f] = vec![vec![]; nb * nb];
            }
            for a in 0..nb {
                for b in 0..nb {
                    let blk = self.block(f, a, b);
                    outer_cost[a * nb + b] += match kind {
                        Inner::Identity => (0..bs).map(|i| blk[i * bs + i]).sum::<f64>(),
                        Inner::Free => {
                            let p = solve(blk, bs, Objective::Maximize, &g.name)?;
                            let v = (0..bs).map(|i| blk[i * bs + p[i]]).sum::<f64>();
                            inner_best[f][a * nb + b] = p;
                            v
                        }
                    };
                }
            }
        }
        let (outer, duals) = solve_warm(&outer_cost, nb, Objective::Maximize, warm, &g.name)?;
        let inner = g
            .families
            .iter()
            .enumerate()
            .map(|(f, kind)| match kind {
                Inner::Identity => vec![],
                Inner::Free => (0..nb)
                    .map(|a| std::mem::take(&mut inner_best[f][a * nb + outer[a]]))
                    .collect(),
            })
            .collect();
        Ok((GroupPerm { outer, inner }, duals))
    }
}

/// The similarity of group `gi` between A and B with the other groups of `perm` applied to B.
pub(crate) fn group_similarity(
    spec: &PermutationSpec,
    gi: usize,
    perm: &Permutation,
    a: &StateDict,
    b: &StateDict,
    by_weight: &indexmap::IndexMap<&str, Vec<(usize, usize)>>,
) -> GroupSimilarity {
    let g = &spec.groups[gi];
    let member = |m: &crate::spec::Member| {
        let wa = &a.get(&m.weight).expect("validated").data;
        let wb = permute_tensor(
            spec,
            perm,
            &by_weight[m.weight.as_str()],
            &b.get(&m.weight).expect("validated").data,
            Some(gi),
        );
        (unfold(wa, m.axis), unfold(&wb, m.axis))
    };
    let units = g.blocks * g.block_size;
    if units * units >= LARGE_GROUP {
        // Large products: one member at a time, each GEMM using every core,
        // into one accumulator and one reused product buffer (fresh buffers
        // per thread cost more in page faults than the sums themselves).
        let mut acc = GroupSimilarity::new(g);
        let mut prod = Vec::new();
        for m in &g.members {
            let (ua, ub) = member(m);
            acc.add(m.family, m.repeat, &ua, &ub, &mut prod);
        }
        return acc;
    }
    // Small products: members in parallel, each thread summing into its own accumulator.
    g.members
        .par_iter()
        .fold(
            || (GroupSimilarity::new(g), Vec::new()),
            |(mut acc, mut prod), m| {
                let (ua, ub) = member(m);
                acc.add(m.family, m.repeat, &ua, &ub, &mut prod);
                (acc, prod)
            },
        )
        .map(|(acc, _)| acc)
        .reduce(
            || GroupSimilarity::new(g),
            |mut x, y| {
                for (fx, fy) in x.sim.iter_mut().zip(y.sim) {
                    fx.iter_mut().zip(fy).for_each(|(p, q)| *p += q);
                }
                x
            },
        )
}

/// Similarity size (units²) from which a group's members are multiplied one
/// after the other with multi-threaded GEMMs instead of in parallel.
const LARGE_GROUP: usize = 1 << 18;

/// Aligns model `b` to model `a` (see the module docs).
pub fn weight_matching(
    spec: &PermutationSpec,
    a: &StateDict,
    b: &StateDict,
    opts: &MatchOptions,
) -> Result<MatchResult> {
    check_models(spec, a, b)?;
    let mut perm = match &opts.init {
        Some(p) => {
            spec.check_value(p)?;
            p.clone()
        }
        None => spec.identity(),
    };
    let by_weight = spec.by_weight();
    let mut rng = spectra::rng::Rng::new(opts.seed);
    let mut objective = Vec::new();
    let mut passes = 0;
    // Each group's block-assignment duals, reused by its next solve.
    let mut duals: Vec<Option<Duals>> = vec![None; spec.groups.len()];
    // The groups sharing a weight with each group (whose values enter its similarity).
    let neighbours: Vec<Vec<usize>> = spec
        .groups
        .iter()
        .enumerate()
        .map(|(gi, g)| {
            let mut n: Vec<usize> = g
                .members
                .iter()
                .flat_map(|m| by_weight[m.weight.as_str()].iter().map(|&(o, _)| o))
                .filter(|&o| o != gi)
                .collect();
            n.sort_unstable();
            n.dedup();
            n
        })
        .collect();
    let (mut step, mut changed_at, mut solved_at) = (
        0usize,
        vec![0usize; spec.groups.len()],
        vec![None::<usize>; spec.groups.len()],
    );
    for _ in 0..opts.max_iter {
        passes += 1;
        let mut order: Vec<usize> = (0..spec.groups.len()).collect();
        rng.shuffle(&mut order);
        let mut progress = false;
        for gi in order {
            let g = &spec.groups[gi];
            // A group's similarity depends only on its neighbours' values. If
            // none changed since it was last solved, solving again would
            // reproduce its current (already optimal) value: skip it.
            if solved_at[gi].is_some_and(|t| neighbours[gi].iter().all(|&n| changed_at[n] < t)) {
                continue;
            }
            step += 1;
            solved_at[gi] = Some(step);
            let sim = group_similarity(spec, gi, &perm, a, b, &by_weight);
            let old = sim.score(g, &perm[&g.name]);
            let (candidate, d) = sim.solve(g, duals[gi].as_ref())?;
            duals[gi] = Some(d);
            let new = sim.score(g, &candidate);
            if new > old + opts.tol {
                progress = true;
                perm.insert(g.name.clone(), candidate);
                changed_at[gi] = step;
            }
        }
        objective.push(total_objective(spec, &perm, a, b, &by_weight));
        if !progress {
            break;
        }
    }
    let l2_before = l2_distance(a, b);
    let l2_after = l2_distance(a, &apply(spec, &perm, b)?);
    Ok(MatchResult {
        perm,
        objective,
        passes,
        l2_before,
        l2_after,
    })
}

/// `Σ ⟨W_A, P W_B⟩` over the weights the spec names.
pub fn total_objective(
    spec: &PermutationSpec,
    perm: &Permutation,
    a: &StateDict,
    b: &StateDict,
    by_weight: &indexmap::IndexMap<&str, Vec<(usize, usize)>>,
) -> f64 {
    let weights: Vec<_> = by_weight.iter().collect();
    weights
        .par_iter()
        .map(|(name, entries)| {
            let wa = &a.get(name).expect("validated").data;
            let wb = permute_tensor(
                spec,
                perm,
                entries,
                &b.get(name).expect("validated").data,
                None,
            );
            wa.iter()
                .zip(wb.iter())
                .map(|(x, y)| (*x as f64) * (*y as f64))
                .sum::<f64>()
        })
        .sum()
}
