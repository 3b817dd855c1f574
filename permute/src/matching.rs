//! Weight matching (Ainsworth, Hayase & Srinivasa, "Git Re-Basin", ICLR 2023).
//!
//! Starting from the identity (or a given permutation), each pass visits the
//! groups in a seeded random order. For group `P` it forms, for every member
//! `(weight, axis)`, the similarity `W_A[axis→0] · (W_B with every other group
//! applied)[axis→0]ᵀ`, sums the members, and solves the linear assignment that
//! maximises `⟨W_A, P W_B⟩` ([`crate::lap`]). For block groups (attention
//! heads) the score of putting B's block `b` at A's block `a` is the best
//! inner assignment of their units (a `block_size` LAP per pair and family,
//! or the trace for fixed families) and, where the group reorders the copies
//! of a block (the query heads sharing one key/value head), of their copies:
//! every copy order for up to three copies, otherwise alternating LAPs
//! (units given copies, copies given units) until neither improves. The
//! block assignment is solved on those scores. Passes stop when none of the groups improves the objective
//! by more than `tol`, or after `max_iter`.

use ndarray::{ArrayD, ArrayView2, Axis, CowArray, Ix2};
use rayon::prelude::*;
use serde::Serialize;
use weights::StateDict;

use crate::error::{PermuteError, Result};
use crate::lap::{Duals, Objective, solve, solve_warm};
use crate::spec::{
    Group, GroupPerm, Inner, Permutation, PermutationSpec, gathered_rows, permute_index,
    permute_tensor,
};

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
    squared_distance(a, b, |_| true).sqrt()
}

/// `Σ ‖A − B‖²` over the tensors with equal names and shapes that `keep`
/// accepts, in parallel, summed in A's order (the same value as one loop).
fn squared_distance(a: &StateDict, b: &StateDict, keep: impl Fn(&str) -> bool + Sync) -> f64 {
    let tensors: Vec<_> = a.iter().collect();
    let per: Vec<f64> = tensors
        .par_iter()
        .map(|(name, ta)| {
            match b
                .get(name)
                .filter(|tb| tb.shape() == ta.shape() && keep(name))
            {
                Some(tb) => dot_and_squared(&ta.data, &tb.data).1,
                None => 0.0,
            }
        })
        .collect();
    per.iter().sum()
}

/// Partial sums of `(Σ x·y, Σ (x − y)²)` in f64, eight interleaved lanes.
#[derive(Default)]
struct DotSquared {
    dot: [f64; 8],
    sq: [f64; 8],
}

impl DotSquared {
    fn add(&mut self, xs: &[f32], ys: &[f32]) {
        let (cx, cy) = (xs.chunks_exact(8), ys.chunks_exact(8));
        for (&a, &b) in cx.remainder().iter().zip(cy.remainder()) {
            let (a, b) = (a as f64, b as f64);
            self.dot[0] += a * b;
            self.sq[0] += (a - b) * (a - b);
        }
        for (cx, cy) in cx.zip(cy) {
            for k in 0..8 {
                let (a, b) = (cx[k] as f64, cy[k] as f64);
                self.dot[k] += a * b;
                self.sq[k] += (a - b) * (a - b);
            }
        }
    }

    fn sums(&self) -> (f64, f64) {
        (self.dot.iter().sum(), self.sq.iter().sum())
    }
}

/// `(Σ x·y, Σ (x − y)²)` over two tensors of one shape.
fn dot_and_squared(x: &ArrayD<f32>, y: &ArrayD<f32>) -> (f64, f64) {
    let (x, y) = (x.as_standard_layout(), y.as_standard_layout());
    let mut acc = DotSquared::default();
    acc.add(
        x.as_slice().expect("standard"),
        y.as_slice().expect("standard"),
    );
    acc.sums()
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
/// A view where the layout allows (1-D tensors, and 2-D ones either way
/// round, as a transposed view), a copy otherwise.
pub(crate) fn unfold(data: &ArrayD<f32>, axis: usize) -> CowArray<'_, f32, Ix2> {
    let len = data.shape()[axis];
    let view = data.view();
    match data.ndim() {
        1 if data.is_standard_layout() => {
            return view
                .into_shape_with_order((len, 1))
                .expect("contiguous")
                .into();
        }
        2 => {
            let m = view.into_dimensionality::<Ix2>().expect("2-D");
            return if axis == 0 {
                m.into()
            } else {
                m.reversed_axes().into()
            };
        }
        _ => {}
    }
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
        .into()
}

/// Summed similarities of a group, per family: `sim[f][((a·B + b)·bs + i)·bs + i']`.
///
/// Members whose copies the group permutes (`copies` free, `repeat > 1`) are
/// kept per copy pair instead: `copy_sim[f][(((a·B + b)·R + r)·R + r')·bs² + i·bs + i']`
/// for free families, and only its trace per `(a, b, r, r')` for fixed ones.
pub(crate) struct GroupSimilarity {
    blocks: usize,
    bs: usize,
    /// Copies per block that the group permutes (1: none).
    copies: usize,
    sim: Vec<Vec<f64>>,
    copy_sim: Vec<Vec<f64>>,
}

/// What the best inner assignment of one block pair is.
struct PairBest {
    score: f64,
    /// Per family: the unit order (empty for fixed families).
    inner: Vec<Vec<usize>>,
    /// The copy order (empty when copies are fixed).
    copies: Vec<usize>,
}

/// Copy counts up to which every copy order of a block pair is tried.
const EXHAUSTIVE_COPIES: usize = 3;

impl GroupSimilarity {
    pub(crate) fn new(g: &Group) -> Self {
        let (nb, bs, r) = (g.blocks, g.block_size, g.copy_count());
        let n = nb * nb * bs * bs;
        GroupSimilarity {
            blocks: nb,
            bs,
            copies: r,
            sim: (0..g.families.len())
                .map(|_| weights::mem::filled(n, 0.0))
                .collect(),
            copy_sim: g
                .families
                .iter()
                .map(|f| match (r, f) {
                    (1, _) => vec![],
                    (_, Inner::Identity) => vec![0.0; nb * nb * r * r],
                    (_, Inner::Free) => weights::mem::filled(n * r * r, 0.0),
                })
                .collect(),
        }
    }

    /// Adds one member's product `A_mat · B_matᵀ` (`n × n`, row-major; see [`product`]).
    pub(crate) fn add(&mut self, family: usize, repeat: usize, s: &[f32]) {
        let n = s.len().isqrt();
        let (nb, bs) = (self.blocks, self.bs);
        if repeat > 1 && self.copies > 1 {
            // Every copy pair of every block pair, kept apart.
            let rc = self.copies;
            let cs = &mut self.copy_sim[family];
            let traces_only = cs.len() == nb * nb * rc * rc;
            for ab in 0..nb {
                for r in 0..rc {
                    for i in 0..bs {
                        let row = &s[((ab * rc + r) * bs + i) * n..][..n];
                        for bb in 0..nb {
                            for r2 in 0..rc {
                                let src = &row[(bb * rc + r2) * bs..][..bs];
                                let pair = ((ab * nb + bb) * rc + r) * rc + r2;
                                if traces_only {
                                    cs[pair] += src[i] as f64;
                                } else {
                                    let dst = &mut cs[(pair * bs + i) * bs..][..bs];
                                    dst.iter_mut().zip(src).for_each(|(d, &v)| *d += v as f64);
                                }
                            }
                        }
                    }
                }
            }
            return;
        }
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

    /// Family `f`'s `bs × bs` similarity of blocks `(a, b)` with B's copies in
    /// the order `copies` (A's copy `r` against B's copy `copies[r]`), or its
    /// trace alone for a fixed family.
    fn paired(
        &self,
        g: &Group,
        f: usize,
        a: usize,
        b: usize,
        copies: &[usize],
    ) -> std::borrow::Cow<'_, [f64]> {
        let (nb, bs, rc) = (self.blocks, self.bs, self.copies);
        let blk = self.block(f, a, b);
        if rc == 1 {
            return std::borrow::Cow::Borrowed(blk);
        }
        let mut m = blk.to_vec();
        let cs = &self.copy_sim[f];
        for (r, &r2) in copies.iter().enumerate() {
            let pair = ((a * nb + b) * rc + r) * rc + r2;
            match g.families[f] {
                // Only the diagonal counts: add the copies' traces to entry (0, 0).
                Inner::Identity => m[0] += cs[pair],
                Inner::Free => m
                    .iter_mut()
                    .zip(&cs[pair * bs * bs..][..bs * bs])
                    .for_each(|(d, &v)| *d += v),
            }
        }
        std::borrow::Cow::Owned(m)
    }

    /// The score of a value (current or candidate).
    pub(crate) fn score(&self, g: &Group, p: &GroupPerm) -> f64 {
        (0..self.blocks).map(|a| self.block_score(g, p, a)).sum()
    }

    /// The score of block `a` of A paired with block `p.outer[a]` of B.
    pub(crate) fn block_score(&self, g: &Group, p: &GroupPerm, a: usize) -> f64 {
        // Copy orders exist exactly when the group permutes copies.
        let copies = p.copies.get(a).map_or(&[][..], Vec::as_slice);
        (0..g.families.len())
            .map(|f| {
                let inner = p.inner[f].get(a).map(Vec::as_slice);
                self.inner_score(g, f, &self.paired(g, f, a, p.outer[a], copies), inner)
            })
            .sum()
    }

    /// `Σᵢ m[i, inner[i]]` (the trace when the family is fixed).
    fn inner_score(&self, g: &Group, f: usize, m: &[f64], inner: Option<&[usize]>) -> f64 {
        let bs = self.bs;
        match (g.families[f], inner) {
            (Inner::Free, Some(p)) => (0..bs).map(|i| m[i * bs + p[i]]).sum(),
            _ => (0..bs).map(|i| m[i * bs + i]).sum(),
        }
    }

    /// The best inner assignment of every family for blocks `(a, b)` with
    /// B's copies in the order `copies`.
    fn best_inner(&self, g: &Group, a: usize, b: usize, copies: &[usize]) -> Result<PairBest> {
        let bs = self.bs;
        let mut best = PairBest {
            score: 0.0,
            inner: vec![],
            copies: if self.copies > 1 {
                copies.to_vec()
            } else {
                vec![]
            },
        };
        for (f, kind) in g.families.iter().enumerate() {
            let m = self.paired(g, f, a, b, copies);
            let p = match kind {
                Inner::Identity => vec![],
                Inner::Free => solve(&m, bs, Objective::Maximize, &g.name)?,
            };
            best.score += self.inner_score(g, f, &m, Some(&p));
            best.inner.push(p);
        }
        Ok(best)
    }

    /// The best copy order given each family's unit order: a linear
    /// assignment of A's copies to B's.
    fn best_copies(
        &self,
        g: &Group,
        a: usize,
        b: usize,
        inner: &[Vec<usize>],
    ) -> Result<Vec<usize>> {
        let (nb, bs, rc) = (self.blocks, self.bs, self.copies);
        let mut cost = vec![0.0; rc * rc];
        for (f, kind) in g.families.iter().enumerate() {
            let cs = &self.copy_sim[f];
            for (rr, c) in cost.iter_mut().enumerate() {
                let pair = (a * nb + b) * rc * rc + rr;
                *c += match kind {
                    Inner::Identity => cs[pair],
                    Inner::Free => {
                        let blk = &cs[pair * bs * bs..][..bs * bs];
                        (0..bs).map(|i| blk[i * bs + inner[f][i]]).sum::<f64>()
                    }
                };
            }
        }
        solve(&cost, rc, Objective::Maximize, &g.name)
    }

    /// The best copy and unit orders for blocks `(a, b)`: every copy order
    /// when there are at most [`EXHAUSTIVE_COPIES`] copies, otherwise
    /// alternating assignments (units given copies, copies given units) from
    /// the identity until neither improves.
    fn best_pair(&self, g: &Group, a: usize, b: usize) -> Result<PairBest> {
        let identity: Vec<usize> = (0..self.copies).collect();
        if self.copies <= EXHAUSTIVE_COPIES {
            let mut best: Option<PairBest> = None;
            for order in permutations(self.copies) {
                let cand = self.best_inner(g, a, b, &order)?;
                if best.as_ref().is_none_or(|b| cand.score > b.score) {
                    best = Some(cand);
                }
            }
            return Ok(best.expect("at least one order"));
        }
        let mut best = self.best_inner(g, a, b, &identity)?;
        for _ in 0..100 {
            let copies = self.best_copies(g, a, b, &best.inner)?;
            let cand = self.best_inner(g, a, b, &copies)?;
            if cand.score <= best.score + 1e-12 * best.score.abs().max(1.0) {
                break;
            }
            best = cand;
        }
        Ok(best)
    }

    /// The best value for this similarity.
    pub(crate) fn solve(&self, g: &Group, warm: Option<&Duals>) -> Result<(GroupPerm, Duals)> {
        let (nb, bs) = (self.blocks, self.bs);
        // Units (one unit per block, one copy, fixed families): the cost
        // matrix is the families' similarities summed, and the similarity
        // itself, not a copy, when there is one family.
        let units = bs == 1 && self.copies == 1 && g.families.iter().all(|f| *f == Inner::Identity);
        // Inner solutions per (family, a·B + b) and copy orders per block
        // pair, kept to avoid solving twice.
        let mut inner_best: Vec<Vec<Vec<usize>>> = g
            .families
            .iter()
            .map(|kind| match kind {
                Inner::Identity => vec![],
                Inner::Free => vec![vec![]; nb * nb],
            })
            .collect();
        let mut copies_best: Vec<Vec<usize>> = match g.copies {
            Inner::Identity => vec![],
            Inner::Free => vec![(0..self.copies).collect(); nb * nb],
        };
        let outer_cost: std::borrow::Cow<'_, [f64]> = if units && self.sim.len() == 1 {
            std::borrow::Cow::Borrowed(&self.sim[0])
        } else {
            let mut outer_cost = vec![0.0; nb * nb];
            if units {
                for fam in &self.sim {
                    outer_cost.iter_mut().zip(fam).for_each(|(c, &s)| *c += s);
                }
            } else if self.copies == 1 {
                // Family by family over the similarity blocks, without per-pair
                // records (an MLP group of 512 units has 262,144 block pairs).
                for (f, kind) in g.families.iter().enumerate() {
                    for (ab, cost) in outer_cost.iter_mut().enumerate() {
                        let blk = self.block(f, ab / nb, ab % nb);
                        *cost += match kind {
                            Inner::Identity => (0..bs).map(|i| blk[i * bs + i]).sum::<f64>(),
                            Inner::Free => {
                                let p = solve(blk, bs, Objective::Maximize, &g.name)?;
                                let v = (0..bs).map(|i| blk[i * bs + p[i]]).sum::<f64>();
                                inner_best[f][ab] = p;
                                v
                            }
                        };
                    }
                }
            } else {
                for (ab, cost) in outer_cost.iter_mut().enumerate() {
                    let best = self.best_pair(g, ab / nb, ab % nb)?;
                    *cost = best.score;
                    for (f, p) in best.inner.into_iter().enumerate() {
                        if g.families[f] == Inner::Free {
                            inner_best[f][ab] = p;
                        }
                    }
                    copies_best[ab] = best.copies;
                }
            }
            std::borrow::Cow::Owned(outer_cost)
        };
        let (outer, duals) = solve_warm(&outer_cost, nb, Objective::Maximize, warm, &g.name)?;
        let chosen = |v: &mut Vec<Vec<usize>>| -> Vec<Vec<usize>> {
            (0..nb)
                .map(|a| std::mem::take(&mut v[a * nb + outer[a]]))
                .collect()
        };
        let inner = inner_best
            .iter_mut()
            .map(|v| if v.is_empty() { vec![] } else { chosen(v) })
            .collect();
        let copies = if copies_best.is_empty() {
            vec![]
        } else {
            chosen(&mut copies_best)
        };
        Ok((
            GroupPerm {
                outer,
                inner,
                copies,
            },
            duals,
        ))
    }
}

/// Every permutation of `0..n` (Heap's algorithm; `n` small).
fn permutations(n: usize) -> Vec<Vec<usize>> {
    fn heap(k: usize, p: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
        if k <= 1 {
            out.push(p.clone());
            return;
        }
        for i in 0..k {
            heap(k - 1, p, out);
            let j = if k.is_multiple_of(2) { i } else { 0 };
            if i + 1 < k {
                p.swap(j, k - 1);
            }
        }
    }
    let mut out = Vec::new();
    heap(n, &mut (0..n).collect(), &mut out);
    out
}

/// `A_mat · B_matᵀ` of one member (both `(axis_len, rest)`) into `prod`.
fn product(a: ArrayView2<'_, f32>, b: ArrayView2<'_, f32>, prod: &mut Vec<f32>) {
    let n = a.nrows();
    if prod.len() != n * n {
        *prod = weights::mem::filled(n * n, 0.0);
    }
    spectra::linalg::matmul_nt(a, b, prod, "similarity").expect("members share their shapes");
}

/// What [`group_similarity`] does with one member's product.
#[derive(Debug, Clone, Default)]
pub(crate) struct Slot {
    /// `prod` holds the product for the current values of the member's other groups: use it.
    pub(crate) reuse: bool,
    /// Keep the product in `prod` for a later solve.
    pub(crate) keep: bool,
    /// The member is a matrix whose other axis one other group permutes:
    /// a kept product can be brought up to date by the columns that moved.
    pub(crate) update: bool,
    pub(crate) prod: Vec<f32>,
    /// The other axis's order when `prod` was last brought up to date (empty: none yet).
    index: Vec<usize>,
    /// Columns added by updates since `prod` was last formed whole.
    since_whole: usize,
}

/// An update moving more than `1/UPDATE_SHARE` of a product's columns (or
/// more than its column count since the product was last formed whole, which
/// bounds the rounding that updates add) forms the product whole instead.
const UPDATE_SHARE: usize = 3;

/// Brings a kept product `A·(B[:, old])ᵀ` up to date with the order `new` of
/// B's columns: `+= A[:, C]·(B[:, new[C]] − B[:, old[C]])ᵀ` over the columns
/// `C` that moved (`a`, `b`: the member unfolded, B not permuted). `false`
/// (nothing done) when too many moved.
fn update_product(
    a: ArrayView2<'_, f32>,
    b: ArrayView2<'_, f32>,
    slot: &mut Slot,
    new: &[usize],
) -> bool {
    let moved: Vec<usize> = (0..new.len())
        .filter(|&c| new[c] != slot.index[c])
        .collect();
    let cols = new.len();
    if moved.len() * UPDATE_SHARE > cols || slot.since_whole + moved.len() > cols {
        return false;
    }
    if !moved.is_empty() {
        let to: Vec<usize> = moved.iter().map(|&c| new[c]).collect();
        let from: Vec<usize> = moved.iter().map(|&c| slot.index[c]).collect();
        let diff = &b.select(Axis(1), &to) - &b.select(Axis(1), &from);
        let a_moved = a.select(Axis(1), &moved);
        spectra::linalg::matmul_nt_add(a_moved.view(), diff.view(), &mut slot.prod, "update")
            .expect("members share their shapes");
    }
    slot.since_whole += moved.len();
    true
}

/// The similarity of group `gi` between A and B with the other groups of `perm` applied to B.
///
/// `slots` (one per member) say which members' products are already known
/// and which to keep; the products of the others are formed here.
pub(crate) fn group_similarity(
    spec: &PermutationSpec,
    gi: usize,
    perm: &Permutation,
    a: &StateDict,
    b: &StateDict,
    by_weight: &indexmap::IndexMap<&str, Vec<(usize, usize)>>,
    slots: &mut [Slot],
) -> GroupSimilarity {
    let g = &spec.groups[gi];
    // B's member with the other groups applied; A's is read in place.
    let add = |acc: &mut GroupSimilarity,
               prod: &mut Vec<f32>,
               m: &crate::spec::Member,
               slot: &mut Slot| {
        if !slot.reuse {
            let entries = &by_weight[m.weight.as_str()];
            let (wa, wb) = (
                &a.get(&m.weight).expect("validated").data,
                &b.get(&m.weight).expect("validated").data,
            );
            let ua = unfold(wa, m.axis);
            // The other axis's new order, for members a kept product can follow.
            let order = (slot.keep && slot.update).then(|| {
                let mut index = permute_index(spec, perm, entries, 2, Some(gi));
                index[1 - m.axis]
                    .take()
                    .expect("an updatable member has a group on its other axis")
            });
            let updated = match &order {
                Some(new) if !slot.index.is_empty() => {
                    update_product(ua.view(), unfold(wb, m.axis).view(), slot, new)
                }
                _ => false,
            };
            if !updated {
                let wb = permute_tensor(spec, perm, entries, wb, Some(gi));
                let room = if slot.keep {
                    &mut slot.prod
                } else {
                    &mut *prod
                };
                product(ua.view(), unfold(&wb, m.axis).view(), room);
                slot.since_whole = 0;
            }
            if let Some(new) = order {
                slot.index = new;
            }
        }
        let s = if slot.reuse || slot.keep {
            &slot.prod
        } else {
            &*prod
        };
        acc.add(m.family, m.repeat, s);
    };
    assert_eq!(slots.len(), g.members.len(), "one slot per member");
    let units = g.blocks * g.block_size;
    if units * units >= LARGE_GROUP {
        // Large products: one member at a time, each GEMM using every core,
        // into one accumulator and one reused product buffer (fresh buffers
        // per thread cost more in page faults than the sums themselves).
        let mut acc = GroupSimilarity::new(g);
        let mut prod = Vec::new();
        for (m, slot) in g.members.iter().zip(slots) {
            add(&mut acc, &mut prod, m, slot);
        }
        return acc;
    }
    // Small products: members in parallel, each thread summing into its own accumulator.
    g.members
        .par_iter()
        .zip(slots.par_iter_mut())
        .fold(
            || (GroupSimilarity::new(g), Vec::new()),
            |(mut acc, mut prod), (m, slot)| {
                add(&mut acc, &mut prod, m, slot);
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
                for (fx, fy) in x.copy_sim.iter_mut().zip(y.copy_sim) {
                    fx.iter_mut().zip(fy).for_each(|(p, q)| *p += q);
                }
                x
            },
        )
}

/// Similarity size (units²) from which a group's members are multiplied one
/// after the other with multi-threaded GEMMs instead of in parallel.
const LARGE_GROUP: usize = 1 << 18;

/// Which groups a pass solves, and when.
///
/// Groups that share no weight commute (neither enters the other's
/// similarity), so any schedule that keeps the order of each pair of
/// neighbours gives what visiting the pass's order one group at a time
/// gives. Each round takes the groups whose earlier neighbours are done,
/// largest first, one per core: [`weight_matching`] forms their
/// similarities one after the other (each GEMM uses every core) and solves
/// their assignments in parallel (each LAP uses one core).
struct Schedule {
    /// The groups sharing a weight with each group (whose values enter its similarity).
    neighbours: Vec<Vec<usize>>,
    /// Step at which each group's value last changed (0: never).
    changed_at: Vec<usize>,
    /// Step at which each group was last solved.
    solved_at: Vec<Option<usize>>,
    step: usize,
    /// Groups per round: one per core (and one similarity per core in memory).
    cap: usize,
}

impl Schedule {
    fn new(
        spec: &PermutationSpec,
        by_weight: &indexmap::IndexMap<&str, Vec<(usize, usize)>>,
    ) -> Self {
        let neighbours = spec
            .groups
            .iter()
            .enumerate()
            .map(|(gi, g)| {
                let mut n: Vec<usize> = g
                    .members
                    .iter()
                    .flat_map(|m| other_groups(by_weight, &m.weight, gi))
                    .collect();
                n.sort_unstable();
                n.dedup();
                n
            })
            .collect();
        Schedule {
            neighbours,
            changed_at: vec![0; spec.groups.len()],
            solved_at: vec![None; spec.groups.len()],
            step: 0,
            cap: rayon::current_num_threads().max(1),
        }
    }

    /// The next round of `pass` (empty when the pass is over), marked solved.
    fn round(&mut self, spec: &PermutationSpec, pass: &mut Pass) -> Vec<usize> {
        let mut batch: Vec<usize> = Vec::new();
        for p in 0..pass.order.len() {
            let gi = pass.order[p];
            let waits = |n: &usize| pass.pos[*n] < p && !pass.done[pass.pos[*n]];
            if pass.done[p] || self.neighbours[gi].iter().any(waits) {
                continue;
            }
            // A group's similarity depends only on its neighbours' values. If
            // none changed since it was last solved, solving again would
            // reproduce its current (already optimal) value: skip it.
            let unchanged = |t: usize| self.neighbours[gi].iter().all(|&n| self.changed_at[n] < t);
            if self.solved_at[gi].is_some_and(unchanged) {
                pass.done[p] = true;
                continue;
            }
            batch.push(gi);
        }
        batch.sort_by_key(|&gi| {
            std::cmp::Reverse(spec.groups[gi].blocks * spec.groups[gi].block_size)
        });
        batch.truncate(self.cap);
        for &gi in &batch {
            self.step += 1;
            self.solved_at[gi] = Some(self.step);
            pass.done[pass.pos[gi]] = true;
        }
        batch
    }

    /// Records that group `gi` took a new value when it was last solved.
    fn changed(&mut self, gi: usize) {
        self.changed_at[gi] = self.solved_at[gi].expect("solved before it changes");
    }
}

/// The groups other than `gi` on `weight`'s axes (sorted, each once): those
/// whose values enter the product of `gi`'s member on that weight.
fn other_groups(
    by_weight: &indexmap::IndexMap<&str, Vec<(usize, usize)>>,
    weight: &str,
    gi: usize,
) -> Vec<usize> {
    let mut d: Vec<usize> = by_weight[weight]
        .iter()
        .map(|&(o, _)| o)
        .filter(|&o| o != gi)
        .collect();
    d.sort_unstable();
    d.dedup();
    d
}

/// Member products kept from one solve of a group to the next.
///
/// A member's product depends only on the values of the other groups on its
/// weight. Where those are fewer than the group's neighbours, the group can be
/// solved again (another neighbour changed) while the product still holds; it
/// is then reused instead of formed again (an MLP's hidden group has two
/// members, each depending on one neighbour). Where the member is a matrix
/// whose other axis one group permutes, a changed order moves only some of
/// the product's columns, and the product is brought up to date by a
/// low-rank update ([`update_product`]): after the first passes a group's
/// new value moves 1–20 % of its units. Kept products take at most
/// [`KEPT_BYTES`], members taken in the spec's order.
struct Kept {
    /// Per group, per member.
    slots: Vec<Vec<Slot>>,
    /// Per group and member: the groups whose values the product depends on.
    deps: Vec<Vec<Vec<usize>>>,
    /// Per group and member: the step of the solve that formed the kept product.
    at: Vec<Vec<Option<usize>>>,
}

/// Most bytes of member products [`Kept`] holds.
const KEPT_BYTES: usize = 256 << 20;

impl Kept {
    fn new(
        spec: &PermutationSpec,
        b: &StateDict,
        by_weight: &indexmap::IndexMap<&str, Vec<(usize, usize)>>,
        schedule: &Schedule,
        mut room: usize,
    ) -> Self {
        let mut slots = Vec::new();
        let mut deps = Vec::new();
        for (gi, g) in spec.groups.iter().enumerate() {
            let mut group_slots = Vec::new();
            let mut group_deps = Vec::new();
            for m in &g.members {
                let d = other_groups(by_weight, &m.weight, gi);
                let shape = b.get(&m.weight).expect("validated").data.shape();
                let bytes = shape[m.axis].pow(2) * std::mem::size_of::<f32>();
                let update = shape.len() == 2
                    && by_weight[m.weight.as_str()]
                        .iter()
                        .any(|&(o, mi)| o != gi && spec.groups[o].members[mi].axis == 1 - m.axis);
                let keep = (d.len() < schedule.neighbours[gi].len() || update) && bytes <= room;
                if keep {
                    room -= bytes;
                }
                group_slots.push(Slot {
                    keep,
                    update,
                    ..Slot::default()
                });
                group_deps.push(d);
            }
            slots.push(group_slots);
            deps.push(group_deps);
        }
        let at = deps.iter().map(|d| vec![None; d.len()]).collect();
        Kept { slots, deps, at }
    }

    /// Group `gi`'s slots for its solve at `step`: kept products whose
    /// groups have not changed since they were formed are reused.
    fn slots(&mut self, gi: usize, schedule: &Schedule) -> &mut [Slot] {
        for ((slot, deps), at) in self.slots[gi]
            .iter_mut()
            .zip(&self.deps[gi])
            .zip(&self.at[gi])
        {
            slot.reuse =
                slot.keep && at.is_some_and(|t| deps.iter().all(|&n| schedule.changed_at[n] < t));
        }
        &mut self.slots[gi]
    }

    /// Records that group `gi`'s products formed at its last solve are kept.
    fn formed(&mut self, gi: usize, schedule: &Schedule) {
        let step = schedule.solved_at[gi];
        for (slot, at) in self.slots[gi].iter().zip(&mut self.at[gi]) {
            if slot.keep && !slot.reuse {
                *at = step;
            }
        }
    }
}

/// One pass's order and how far it has come.
struct Pass {
    order: Vec<usize>,
    /// Each group's place in `order`.
    pos: Vec<usize>,
    done: Vec<bool>,
}

impl Pass {
    /// A pass that visits the groups in `order`, none done yet.
    fn new(order: Vec<usize>) -> Pass {
        let mut pos = vec![0; order.len()];
        for (p, &gi) in order.iter().enumerate() {
            pos[gi] = p;
        }
        let done = vec![false; order.len()];
        Pass { order, pos, done }
    }
}

/// Aligns model `b` to model `a` (see the module docs).
pub fn weight_matching(
    spec: &PermutationSpec,
    a: &StateDict,
    b: &StateDict,
    opts: &MatchOptions,
) -> Result<MatchResult> {
    weight_matching_keeping(spec, a, b, opts, KEPT_BYTES)
}

/// [`weight_matching`] keeping at most `kept_bytes` of member products.
fn weight_matching_keeping(
    spec: &PermutationSpec,
    a: &StateDict,
    b: &StateDict,
    opts: &MatchOptions,
    kept_bytes: usize,
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
    let mut rng = weights::rng::Rng::new(opts.seed);
    let (mut objective, mut passes) = (Vec::new(), 0);
    // Each group's block-assignment duals, reused by its next solve.
    let mut duals: Vec<Option<Duals>> = vec![None; spec.groups.len()];
    let mut schedule = Schedule::new(spec, &by_weight);
    let mut kept = Kept::new(spec, b, &by_weight, &schedule, kept_bytes);
    // `Σ ‖W_A − P W_B‖²` over the spec's weights after the last pass.
    let mut spec_distance = None;
    for _ in 0..opts.max_iter {
        passes += 1;
        let mut order: Vec<usize> = (0..spec.groups.len()).collect();
        rng.shuffle(&mut order);
        let mut progress = false;
        let mut pass = Pass::new(order);
        loop {
            let batch = schedule.round(spec, &mut pass);
            if batch.is_empty() {
                break;
            }
            let sims: Vec<GroupSimilarity> = batch
                .iter()
                .map(|&gi| {
                    let slots = kept.slots(gi, &schedule);
                    let sim = group_similarity(spec, gi, &perm, a, b, &by_weight, slots);
                    kept.formed(gi, &schedule);
                    sim
                })
                .collect();
            let solved: Vec<(f64, GroupPerm, Duals, f64)> = batch
                .par_iter()
                .zip(sims.par_iter())
                .map(|(&gi, sim)| {
                    let g = &spec.groups[gi];
                    let (candidate, d) = sim.solve(g, duals[gi].as_ref())?;
                    let (old, new) = (sim.score(g, &perm[&g.name]), sim.score(g, &candidate));
                    Ok((old, candidate, d, new))
                })
                .collect::<Result<_>>()?;
            for (&gi, (old, candidate, d, new)) in batch.iter().zip(solved) {
                duals[gi] = Some(d);
                if new > old + opts.tol {
                    progress = true;
                    perm.insert(spec.groups[gi].name.clone(), candidate);
                    schedule.changed(gi);
                }
            }
        }
        let (value, distance) = objective_and_distance(spec, &perm, a, b, &by_weight);
        objective.push(value);
        spec_distance = Some(distance);
        if !progress {
            break;
        }
    }
    // The weights the spec names before and as the last pass left them; the
    // others, which no permutation moves, once for both.
    let spec_before = squared_distance(a, b, |name| by_weight.contains_key(name));
    let spec_after =
        spec_distance.unwrap_or_else(|| objective_and_distance(spec, &perm, a, b, &by_weight).1);
    let rest = squared_distance(a, b, |name| !by_weight.contains_key(name));
    Ok(MatchResult {
        perm,
        objective,
        passes,
        l2_before: (spec_before + rest).sqrt(),
        l2_after: (spec_after + rest).sqrt(),
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
    objective_and_distance(spec, perm, a, b, by_weight).0
}

/// `Σ ⟨W_A, P W_B⟩` and `Σ ‖W_A − P W_B‖²` over the weights the spec names,
/// from one permuted copy of each weight (in parallel, summed in the spec's order).
fn objective_and_distance(
    spec: &PermutationSpec,
    perm: &Permutation,
    a: &StateDict,
    b: &StateDict,
    by_weight: &indexmap::IndexMap<&str, Vec<(usize, usize)>>,
) -> (f64, f64) {
    let weights: Vec<_> = by_weight.iter().collect();
    let per: Vec<(f64, f64)> = weights
        .par_iter()
        .map(|(name, entries)| {
            // B's rows permuted one at a time against A's, without a permuted copy.
            let wa = a.get(name).expect("validated").data.as_standard_layout();
            let wb = &b.get(name).expect("validated").data;
            // (A weight the spec names has an axis a group permutes.)
            let index = permute_index(spec, perm, entries, wb.ndim(), None);
            let mut rows_a = wa
                .as_slice()
                .expect("standard")
                .chunks(wb.shape()[wb.ndim() - 1]);
            let (mut acc, mut buf) = (DotSquared::default(), Vec::new());
            gathered_rows(wb, &index, |row, last| {
                let row = match last {
                    None => row,
                    Some(p) => {
                        buf.clear();
                        buf.extend(p.iter().map(|&j| row[j]));
                        &buf
                    }
                };
                acc.add(rows_a.next().expect("same shape"), row)
            });
            acc.sums()
        })
        .collect();
    per.iter()
        .fold((0.0, 0.0), |(dot, sq), (d, q)| (dot + d, sq + q))
}

#[cfg(test)]
mod tests {
    use super::permutations;
    use crate::spec::{Group, Inner, PermutationSpec, apply};
    use ndarray::IxDyn;
    use weights::{StateDict, Tensor};

    /// A unit group whose copies are declared free while no member repeats
    /// (one copy per block) is solved by the general path, whose value carries
    /// the one-copy orders that `apply` checks for.
    #[test]
    fn free_copies_of_single_copy_units_give_an_applicable_value() {
        let mut rng = weights::rng::Rng::new(5);
        let model = |rng: &mut weights::rng::Rng| {
            let mut sd = StateDict::new();
            for (name, shape) in [("l0.weight", vec![6, 4]), ("l1.weight", vec![3, 6])] {
                let data = rng.normal_array(IxDyn(&shape));
                sd.insert(name, Tensor::f32(data));
            }
            sd
        };
        let (a, b) = (model(&mut rng), model(&mut rng));
        let mut g = Group::units("h", 6, &[("l0.weight", 0), ("l1.weight", 1)]);
        g.copies = Inner::Free;
        let spec = PermutationSpec { groups: vec![g] };
        let res = super::weight_matching(&spec, &a, &b, &Default::default()).unwrap();
        let aligned = apply(&spec, &res.perm, &b).unwrap();
        assert!((super::l2_distance(&a, &aligned) - res.l2_after).abs() < 1e-9);
    }

    /// A kept product brought up to date by the columns that moved equals
    /// the product formed whole; too many moved columns are refused.
    #[test]
    fn updated_products_equal_products_formed_whole() {
        let mut rng = weights::rng::Rng::new(11);
        let (n, cols) = (40, 60);
        let a = rng.normal_array((n, cols));
        let b = rng.normal_array((n, cols));
        let whole = |order: &[usize]| {
            let mut prod = Vec::new();
            super::product(
                a.view(),
                b.select(ndarray::Axis(1), order).view(),
                &mut prod,
            );
            prod
        };
        let mut old: Vec<usize> = (0..cols).collect();
        rng.shuffle(&mut old);
        let mut slot = super::Slot {
            keep: true,
            update: true,
            prod: whole(&old),
            index: old.clone(),
            ..Default::default()
        };
        // Two rounds of a few swaps, then one that moves too many columns.
        let mut new = old.clone();
        for round in 0..2 {
            for k in 0..4 {
                new.swap(7 * k + round, 50 - 3 * k);
            }
            assert!(super::update_product(a.view(), b.view(), &mut slot, &new));
            slot.index = new.clone();
            let expected = whole(&new);
            for (x, y) in slot.prod.iter().zip(&expected) {
                assert!((x - y).abs() < 1e-4 * (1.0 + y.abs()), "{x} vs {y}");
            }
        }
        new.reverse();
        assert!(!super::update_product(a.view(), b.view(), &mut slot, &new));
    }

    /// Kept and updated products change nothing: the same permutations,
    /// passes and objectives as forming every product whole, on MLPs wide
    /// enough for the sparse LAP.
    #[test]
    fn kept_products_give_the_results_of_products_formed_whole() {
        let mut rng = weights::rng::Rng::new(3);
        let widths = [20, 160, 160, 160, 10];
        let mut model = || {
            let mut sd = StateDict::new();
            for (i, w) in widths.windows(2).enumerate() {
                let shape = [vec![w[1], w[0]], vec![w[1]]];
                for (suffix, shape) in ["weight", "bias"].iter().zip(shape) {
                    let data = rng.normal_array(IxDyn(&shape));
                    sd.insert(format!("layers.{i}.{suffix}"), Tensor::f32(data));
                }
            }
            sd
        };
        let (a, b) = (model(), model());
        let spec = crate::builders::mlp(&a).unwrap();
        for seed in 0..4 {
            let opts = super::MatchOptions {
                seed,
                ..Default::default()
            };
            let kept = super::weight_matching(&spec, &a, &b, &opts).unwrap();
            let whole = super::weight_matching_keeping(&spec, &a, &b, &opts, 0).unwrap();
            assert!(kept.passes > 2, "seed {seed}: {} passes", kept.passes);
            assert_eq!(kept.perm, whole.perm, "seed {seed}");
            assert_eq!(kept.passes, whole.passes);
            for (x, y) in kept.objective.iter().zip(&whole.objective) {
                assert!((x - y).abs() < 1e-9 * y.abs(), "{x} vs {y}");
            }
        }
    }

    #[test]
    fn permutations_lists_each_order_once() {
        for (n, count) in [(1, 1), (2, 2), (3, 6), (4, 24)] {
            let mut all = permutations(n);
            assert_eq!(all.len(), count);
            for p in &all {
                let mut s = p.clone();
                s.sort_unstable();
                assert_eq!(s, (0..n).collect::<Vec<_>>());
            }
            all.sort();
            all.dedup();
            assert_eq!(all.len(), count);
        }
    }
}
