//! Merge methods over one tensor at a time, with mergekit's definitions
//! (v0.1.5, `mergekit/merge_methods/*.py`) so the same config gives the same
//! numbers. Inputs are flat `f32` slices of one shape; arithmetic is `f32`
//! where mergekit's is (elementwise), scalars (norms, dots, angles) are `f64`.
//!
//! The task-vector family — task arithmetic, TIES, DARE, breadcrumbs, DELLA —
//! is one function, [`task_vector_merge`], and the named methods are rows of
//! [`TASK_VECTOR_PRESETS`].

use serde::Serialize;
use weights::rng::Rng;

use crate::sparsify::{SparseDelta, Sparsification, SparsifyParams, weighted_sparse_delta};

/// How the signs of the task vectors are reconciled (TIES' "elect").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Consensus {
    /// Majority sign of the weighted sum (the TIES paper).
    Sum,
    /// Majority by count of signs.
    Count,
}

/// One generalised task-arithmetic method: sparsify → weight → optional sign
/// consensus → sum → optional normalise → ×λ → add to the base.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct TaskVectorMethod {
    /// Sparsification of each task vector, if any.
    pub sparsification: Option<Sparsification>,
    /// Sign election, if any.
    pub consensus: Option<Consensus>,
    /// Default of the `normalize` parameter.
    pub normalize: bool,
    /// Default of the `rescale` parameter.
    pub rescale: bool,
}

const fn tv(
    sparsification: Option<Sparsification>,
    consensus: Option<Consensus>,
    normalize: bool,
    rescale: bool,
) -> TaskVectorMethod {
    TaskVectorMethod {
        sparsification,
        consensus,
        normalize,
        rescale,
    }
}

/// mergekit's task-vector methods as presets of [`task_vector_merge`].
pub const TASK_VECTOR_PRESETS: &[(&str, TaskVectorMethod)] = {
    use Consensus::Sum;
    use Sparsification::*;
    &[
        ("task_arithmetic", tv(None, None, false, false)),
        ("ties", tv(Some(Magnitude), Some(Sum), true, false)),
        ("dare_ties", tv(Some(Random), Some(Sum), false, true)),
        ("dare_linear", tv(Some(Random), None, false, true)),
        (
            "breadcrumbs",
            tv(Some(MagnitudeOutliers), None, false, false),
        ),
        (
            "breadcrumbs_ties",
            tv(Some(MagnitudeOutliers), Some(Sum), false, false),
        ),
        ("della", tv(Some(DellaMagprune), Some(Sum), true, true)),
        ("della_linear", tv(Some(DellaMagprune), None, false, true)),
    ]
};

/// One fine-tuned input of a task-vector merge.
#[derive(Clone, Copy, Debug)]
pub struct TaskInput<'a> {
    /// The fine-tuned tensor (same shape as the base).
    pub tensor: &'a [f32],
    /// Its weight.
    pub weight: f64,
    /// Sparsification parameters (density 1 keeps everything).
    pub sparsify: SparsifyParams,
    /// Seed of its random sparsification (DARE, DELLA).
    pub seed: u64,
}

/// Shared options of a task-vector merge.
#[derive(Clone, Copy, Debug)]
pub struct TaskVectorOptions {
    /// Divide by the (masked) sum of weights.
    pub normalize: bool,
    /// Final scale λ of the merged task vector.
    pub lambda: f64,
}

/// `base + λ · Σᵢ mᵢ wᵢ sparsify(θᵢ − base) / (normalize ? Σᵢ mᵢ wᵢ : 1)`, with
/// `mᵢ` the sign-consensus mask (`sign(wᵢδᵢ) = sign(Σⱼ wⱼδⱼ)`, zero entries
/// excluded; all ones without consensus). A zero divisor becomes 1 (with
/// consensus), as does one below 1e-8 in magnitude (without).
/// Task arithmetic: Ilharco et al. 2023; TIES: Yadav et al. 2023; DARE: Yu et
/// al. 2024; Model Breadcrumbs: Davari & Belilovsky 2023; DELLA: Deep et al. 2024.
pub fn task_vector_merge(
    tensor: &str,
    base: &[f32],
    shape: &[usize],
    inputs: &[TaskInput],
    method: &TaskVectorMethod,
    opts: &TaskVectorOptions,
) -> crate::Result<Vec<f32>> {
    if inputs.is_empty() {
        return Ok(base.to_vec());
    }
    let lambda = opts.lambda as f32;
    task_vector_pass(
        tensor,
        base,
        shape,
        inputs,
        method,
        opts.normalize,
        |b, m| add_scaled(b, m, lambda),
    )
}

/// `base + λ · m` as [`task_vector_merge`] finishes each element: the same
/// f32 operations in the same order (no product at λ = 1).
#[inline]
pub fn add_scaled(base: f32, m: f32, lambda: f32) -> f32 {
    base + if lambda != 1.0 { m * lambda } else { m }
}

/// The merged task vector `m` of [`task_vector_merge`] before λ and the base:
/// `task_vector_merge` is `add_scaled(base, m, λ)` element by element, bit for
/// bit, so one update serves a whole λ grid. Empty `inputs` give `None`
/// (the merge is the base).
pub fn task_vector_update(
    tensor: &str,
    base: &[f32],
    shape: &[usize],
    inputs: &[TaskInput],
    method: &TaskVectorMethod,
    normalize: bool,
) -> crate::Result<Option<Vec<f32>>> {
    if inputs.is_empty() {
        return Ok(None);
    }
    task_vector_pass(tensor, base, shape, inputs, method, normalize, |_, m| m).map(Some)
}

/// One pass of a task-vector merge; `finish(base, m)` makes each output
/// element from the base's and the merged task vector's.
fn task_vector_pass(
    tensor: &str,
    base: &[f32],
    shape: &[usize],
    inputs: &[TaskInput],
    method: &TaskVectorMethod,
    normalize: bool,
    finish: impl Fn(f32, f32) -> f32,
) -> crate::Result<Vec<f32>> {
    if method.sparsification.is_none() && method.consensus.is_none() {
        return Ok(dense_task_vector_merge(base, inputs, normalize, finish));
    }
    let n = base.len();
    // Weighted (sparsified) deltas.
    let mut deltas: Vec<SparseDelta> = Vec::with_capacity(inputs.len());
    for inp in inputs {
        deltas.push(weighted_sparse_delta(
            tensor,
            inp.tensor,
            base,
            shape,
            method.sparsification,
            &inp.sparsify,
            inp.weight as f32,
            &mut Rng::new(inp.seed),
        )?);
    }
    let weights: Vec<f32> = inputs.iter().map(|i| i.weight as f32).collect();
    let total: f32 = weights.iter().sum();
    let mut out = Vec::new();
    weights::mem::reserve_huge(&mut out, n);
    // Block by block, each delta streams once per pass; per element the
    // same f32 operations in the same order as the definition above.
    let (mut mixed, mut div, mut elect) = ([0f32; BLOCK], [0f32; BLOCK], [0f32; BLOCK]);
    let mut block = vec![0f32; deltas.len() * BLOCK];
    for start in (0..n).step_by(BLOCK) {
        let len = BLOCK.min(n - start);
        let (mixed, div, elect) = (&mut mixed[..len], &mut div[..len], &mut elect[..len]);
        // This block of every delta, delta i at block[i·BLOCK..].
        for (d, rows) in deltas.iter().zip(block.chunks_mut(BLOCK)) {
            d.fill(start, &mut rows[..len]);
        }
        let rows = || block.chunks(BLOCK).map(|r| &r[..len]);
        match method.consensus {
            None => {
                // `Sum` of f32 folds from −0.0.
                mixed.fill(-0.0);
                for d in rows() {
                    mixed.iter_mut().zip(d).for_each(|(m, &v)| *m += v);
                }
                div.fill(if total.abs() < 1e-8 { 1.0 } else { total });
            }
            Some(c) => {
                elect.fill(-0.0);
                for d in rows() {
                    for (s, &v) in elect.iter_mut().zip(d) {
                        *s += match c {
                            Consensus::Sum => v,
                            Consensus::Count => sign(v),
                        };
                    }
                }
                mixed.fill(0.0);
                div.fill(0.0);
                for (d, &w) in rows().zip(&weights) {
                    for (e, &v) in d.iter().enumerate() {
                        let majority = if elect[e] >= 0.0 { 1.0 } else { -1.0 };
                        // Adding +0.0 leaves these sums (never −0.0) as they are.
                        let agrees = sign(v) == majority;
                        mixed[e] += if agrees { v } else { 0.0 };
                        div[e] += if agrees { w } else { 0.0 };
                    }
                }
                div.iter_mut().for_each(|x| {
                    if *x == 0.0 {
                        *x = 1.0
                    }
                });
            }
        }
        out.extend((0..len).map(|e| {
            let m = if normalize {
                mixed[e] / div[e]
            } else {
                mixed[e]
            };
            finish(base[start + e], m)
        }));
    }
    Ok(out)
}

/// Elements per block of the fused loops: the block's accumulators stay in
/// L1 while each input streams through once.
const BLOCK: usize = 2048;

/// [`task_vector_merge`] without sparsification or consensus (task
/// arithmetic) in one pass over the inputs, block by block, with no delta
/// buffers: the same f32 operations in the same order, so the same bits.
fn dense_task_vector_merge(
    base: &[f32],
    inputs: &[TaskInput],
    normalize: bool,
    finish: impl Fn(f32, f32) -> f32,
) -> Vec<f32> {
    let weights: Vec<f32> = inputs.iter().map(|i| i.weight as f32).collect();
    let div: f32 = weights.iter().sum();
    let div = if div.abs() < 1e-8 { 1.0 } else { div };
    let mut out = Vec::new();
    weights::mem::reserve_huge(&mut out, base.len());
    let mut acc = [0f32; BLOCK];
    for (k, b) in base.chunks(BLOCK).enumerate() {
        let acc = &mut acc[..b.len()];
        // `Sum` of f32 folds from −0.0.
        acc.fill(-0.0);
        for (inp, &w) in inputs.iter().zip(&weights) {
            let x = &inp.tensor[k * BLOCK..k * BLOCK + b.len()];
            for ((a, &x), &bv) in acc.iter_mut().zip(x).zip(b) {
                *a += (x - bv) * w;
            }
        }
        out.extend(acc.iter().zip(b).map(|(&mixed, &bv)| {
            let m = if normalize { mixed / div } else { mixed };
            finish(bv, m)
        }));
    }
    out
}

fn sign(v: f32) -> f32 {
    if v > 0.0 {
        1.0
    } else if v < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// `Σᵢ wᵢ xᵢ / (normalize ? Σᵢ wᵢ : 1)` (Wortsman et al. 2022, model soups).
/// One pass over the inputs, block by block.
pub fn linear(tensors: &[&[f32]], weights: &[f64], normalize: bool) -> Vec<f32> {
    let n = tensors.first().map_or(0, |t| t.len());
    let s: f32 = weights.iter().map(|&w| w as f32).sum();
    let mut out = Vec::new();
    weights::mem::reserve_huge(&mut out, n);
    let mut acc = [0f32; BLOCK];
    for start in (0..n).step_by(BLOCK) {
        let acc = &mut acc[..BLOCK.min(n - start)];
        acc.fill(0.0);
        for (t, &w) in tensors.iter().zip(weights) {
            let w = w as f32;
            let x = &t[start..start + acc.len()];
            acc.iter_mut().zip(x).for_each(|(o, &x)| *o += x * w);
        }
        if normalize {
            acc.iter_mut().for_each(|o| *o /= s);
        }
        out.extend_from_slice(acc);
    }
    out
}

/// Partial sums per reduction: eight independent f64 chains, so a reduction
/// runs at the adder's throughput instead of its latency (and vectorises).
pub(crate) const LANES: usize = 8;

/// `Σᵢ f(aᵢ, bᵢ)` in f64 over [`LANES`] interleaved partial sums, added
/// pairwise at the end. Not the sequential sum's bits, but no less accurate.
#[inline(always)]
fn sum_pairs<A: Copy, B: Copy>(a: &[A], b: &[B], f: impl Fn(A, B) -> f64) -> f64 {
    debug_assert_eq!(a.len(), b.len());
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(&x, &y)| f(x, y))
        .sum();
    let mut acc = [0f64; LANES];
    for (x, y) in ca.zip(cb) {
        for j in 0..LANES {
            acc[j] += f(x[j], y[j]);
        }
    }
    lanes_total(&acc, tail)
}

/// `Σᵢ f(aᵢ)` in f64, summed as [`sum_pairs`] sums.
#[inline(always)]
pub(crate) fn sum_of<A: Copy>(a: &[A], f: impl Fn(A) -> f64) -> f64 {
    sum_pairs(a, a, |x, _| f(x))
}

/// The partial sums of [`sum_pairs`] (entry `i` of the whole chunks of
/// [`LANES`] in `acc[i % LANES]`, the rest summed in order into `tail`) added
/// up as it adds them, for loops that sum while doing something else.
#[inline(always)]
pub(crate) fn lanes_total(acc: &[f64; LANES], tail: f64) -> f64 {
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// `Σᵢ aᵢ bᵢ` in f64.
fn dot<T: Copy + Into<f64>>(a: &[T], b: &[T]) -> f64 {
    sum_pairs(a, b, |x, y| x.into() * y.into())
}

/// Entries per block of [`delta_gram`]: its f64 rows stay in L1.
const GRAM_BLOCK: usize = 512;

/// The Gram matrix `Gᵢⱼ = Σₑ (xᵢₑ − bₑ)(xⱼₑ − bₑ)` of the inputs' task
/// vectors (of the inputs themselves without a base), row-major `k × k`:
/// differences in f32, products and sums in f64, all pairs in one pass.
fn delta_gram(xs: &[&[f32]], base: Option<&[f32]>) -> Vec<f64> {
    let k = xs.len();
    let n = xs.first().map_or(0, |x| x.len());
    let mut g = vec![0f64; k * k];
    let mut d = vec![0f64; k * GRAM_BLOCK];
    for s in (0..n).step_by(GRAM_BLOCK) {
        let len = GRAM_BLOCK.min(n - s);
        for (x, row) in xs.iter().zip(d.chunks_mut(GRAM_BLOCK)) {
            let (x, row) = (&x[s..s + len], &mut row[..len]);
            match base {
                Some(b) => row
                    .iter_mut()
                    .zip(x)
                    .zip(&b[s..s + len])
                    .for_each(|((d, &x), &b)| *d = (x - b) as f64),
                None => row.iter_mut().zip(x).for_each(|(d, &x)| *d = x as f64),
            }
        }
        for i in 0..k {
            for j in i..k {
                let (di, dj) = (&d[i * GRAM_BLOCK..][..len], &d[j * GRAM_BLOCK..][..len]);
                g[i * k + j] += dot(di, dj);
            }
        }
    }
    for i in 0..k {
        for j in 0..i {
            g[i * k + j] = g[j * k + i];
        }
    }
    g
}

fn norm(x: &[f32]) -> f64 {
    dot(x, x).sqrt()
}

/// Spherical interpolation of whole tensors, `t = 0` giving `v0`:
/// `sin((1−t)θ)/sin θ · v0 + sin(tθ)/sin θ · v1` with `cos θ = v̂0·v̂1`, and
/// plain `(1−t)v0 + t v1` when `|cos θ| > 0.9995` (nearly colinear).
/// Norms below 1e-8 count as 1.
pub fn slerp(t: f64, v0: &[f32], v1: &[f32]) -> Vec<f32> {
    let (n0, n1) = (norm(v0), norm(v1));
    let (n0, n1) = (
        if n0 > 1e-8 { n0 } else { 1.0 },
        if n1 > 1e-8 { n1 } else { 1.0 },
    );
    let dot = sum_pairs(v0, v1, |a, b| (a as f64 / n0) * (b as f64 / n1)).clamp(-1.0, 1.0);
    let (ca, cb) = if dot.abs() > 0.9995 {
        (1.0 - t, t)
    } else {
        let theta = dot.acos();
        let s = theta.sin();
        (((1.0 - t) * theta).sin() / s, (t * theta).sin() / s)
    };
    let (ca, cb) = (ca as f32, cb as f32);
    v0.iter().zip(v1).map(|(&a, &b)| ca * a + cb * b).collect()
}

/// Which vectors NuSLERP interpolates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NuslerpMode {
    /// The whole tensor as one vector (mergekit's default `nuslerp_flatten`).
    Flatten,
    /// Each vector along the last axis (rows of a 2-D weight).
    LastAxis,
    /// Each vector along axis 0 (`nuslerp_row_wise: true`; columns of a 2-D weight).
    FirstAxis,
}

/// NuSLERP of two tensors (of the task vectors when `base` is given):
/// `t = w₁/(w₀ + w₁)` (0.5 when the sum is below 1e-6 in magnitude), each
/// vector pair interpolated on the sphere without normalising the result,
/// linearly where `1 − cos²θ ≤ 1e-16`.
pub fn nuslerp(
    shape: &[usize],
    base: Option<&[f32]>,
    x0: &[f32],
    x1: &[f32],
    weights: [f64; 2],
    mode: NuslerpMode,
) -> Vec<f32> {
    let total = weights[0] + weights[1];
    let t = if total.abs() < 1e-6 {
        0.5
    } else {
        weights[1] / total
    };
    let n = x0.len();
    // Task vectors are taken entry by entry (`x − base` in f32), never stored.
    let delta = |x: &[f32], e: usize| match base {
        Some(b) => x[e] - b[e],
        None => x[e],
    };
    // Vectors as (count, len, stride) index sets.
    let (len, stride) = match (mode, shape.len()) {
        (NuslerpMode::Flatten, _) | (_, 0) => (n, 1),
        (NuslerpMode::LastAxis, _) => (*shape.last().unwrap(), 1),
        (NuslerpMode::FirstAxis, _) => (shape[0], n / shape[0].max(1)),
    };
    let mut out = vec![0f32; n];
    let count = n / len.max(1);
    for c in 0..count {
        // Vector c: for LastAxis, contiguous block c; for FirstAxis, column c.
        let idx = |j: usize| {
            if stride == 1 {
                c * len + j
            } else {
                j * stride + c
            }
        };
        let (n0, n1, dot) = if stride == 1 {
            let r = c * len..(c + 1) * len;
            let g = delta_gram(&[&x0[r.clone()], &x1[r.clone()]], base.map(|b| &b[r]));
            (g[0], g[3], g[1])
        } else {
            let (mut n0, mut n1, mut dot) = (0f64, 0f64, 0f64);
            for j in 0..len {
                let (a, b) = (delta(x0, idx(j)) as f64, delta(x1, idx(j)) as f64);
                n0 += a * a;
                n1 += b * b;
                dot += a * b;
            }
            (n0, n1, dot)
        };
        let (n0, n1) = (n0.sqrt().max(1e-7), n1.sqrt().max(1e-7));
        let cos = (dot / (n0 * n1)).clamp(-1.0, 1.0);
        let (ca, cb) = if 1.0 - cos * cos <= 1e-16 {
            (1.0 - t, t)
        } else {
            let theta = cos.acos();
            let s = theta.sin();
            (((1.0 - t) * theta).sin() / s, (t * theta).sin() / s)
        };
        let (ca, cb) = (ca as f32, cb as f32);
        if stride == 1 {
            let r = c * len..(c + 1) * len;
            let (o, a, b) = (&mut out[r.clone()], &x0[r.clone()], &x1[r.clone()]);
            match base {
                Some(w) => o
                    .iter_mut()
                    .zip(a.iter().zip(b))
                    .zip(&w[r])
                    .for_each(|((o, (&a, &b)), &w)| *o = (ca * (a - w) + cb * (b - w)) + w),
                None => o
                    .iter_mut()
                    .zip(a.iter().zip(b))
                    .for_each(|(o, (&a, &b))| *o = ca * a + cb * b),
            }
        } else {
            for j in 0..len {
                let i = idx(j);
                out[i] = ca * delta(x0, i) + cb * delta(x1, i);
                if let Some(b) = base {
                    out[i] += b[i];
                }
            }
        }
    }
    out
}

/// Model Stock (Jang et al. 2024): with task vectors `δᵢ = wᵢ − w₀` and `cos θ`
/// the mean pairwise cosine, `t = N cos θ / (1 + (N−1) cos θ)` and the result
/// `t · mean(wᵢ) + (1 − t) · w₀`; `t = 0` where the denominator is below 1e-6.
/// `filter_wise` computes one `t` per vector along the last axis.
pub fn model_stock(
    shape: &[usize],
    base: &[f32],
    models: &[&[f32]],
    filter_wise: bool,
) -> Vec<f32> {
    let n = base.len();
    let len = if filter_wise && shape.len() >= 2 {
        *shape.last().unwrap()
    } else {
        n
    }
    .max(1);
    let count = models.len();
    let mut out = Vec::new();
    weights::mem::reserve_huge(&mut out, n);
    let mut acc = [0f32; BLOCK];
    for start in (0..n).step_by(len) {
        let range = start..(start + len).min(n);
        let b = &base[range.clone()];
        let rows: Vec<&[f32]> = models.iter().map(|m| &m[range.clone()]).collect();
        // The task vectors' norms and pairwise dots in one pass, then the cosines.
        let g = delta_gram(&rows, Some(b));
        let norms: Vec<f64> = (0..count).map(|i| g[i * count + i].sqrt()).collect();
        let mut cos_sum = 0f64;
        let mut pairs = 0usize;
        for i in 0..count {
            for j in i + 1..count {
                let denom = (norms[i] * norms[j]).max(1e-6);
                cos_sum += (g[i * count + j] / denom).clamp(-1.0, 1.0);
                pairs += 1;
            }
        }
        let cos = cos_sum / pairs.max(1) as f64;
        let denom = 1.0 + (count as f64 - 1.0) * cos;
        let t = if denom.abs() < 1e-6 {
            0.0
        } else {
            count as f64 * cos / denom
        } as f32;
        // t · mean(wᵢ) + (1 − t) · w₀, block by block (the mean summed from −0.0 as `Sum`).
        for s0 in (0..b.len()).step_by(BLOCK) {
            let bb = &b[s0..(s0 + BLOCK).min(b.len())];
            let acc = &mut acc[..bb.len()];
            acc.fill(-0.0);
            for r in &rows {
                acc.iter_mut()
                    .zip(&r[s0..s0 + bb.len()])
                    .for_each(|(a, &x)| *a += x);
            }
            out.extend(
                acc.iter()
                    .zip(bb)
                    .map(|(&sum, &bv)| t * (sum / count as f32) + (1.0 - t) * bv),
            );
        }
    }
    out
}

/// Weighted Karcher (Riemannian) mean of the directions on the unit sphere,
/// scaled by the weighted mean norm (mergekit's `karcher`, equal weights):
/// fixed-point iterations `m ← cos‖τ‖ m + sin‖τ‖ τ/‖τ‖` with tangent
/// `τ = Σ αᵢ θᵢ/sin θᵢ (uᵢ − cos θᵢ m)`, until `‖τ‖ < tol` or `max_iter`.
pub fn karcher(tensors: &[&[f32]], max_iter: usize, tol: f64) -> Vec<f32> {
    let k = tensors.len();
    if k == 1 {
        return tensors[0].to_vec();
    }
    let alphas = vec![1.0 / k as f64; k];
    let g = delta_gram(tensors, None);
    let norms: Vec<f64> = (0..k).map(|i| g[i * k + i].sqrt()).collect();
    let valid: Vec<usize> = (0..k).filter(|&i| norms[i] > tol).collect();
    let n = tensors[0].len();
    if valid.is_empty() {
        return vec![0.0; n];
    }
    let asum: f64 = valid.iter().map(|&i| alphas[i]).sum();
    let na: Vec<f64> = valid.iter().map(|&i| alphas[i] / asum).collect();
    let dirs = Directions::new(
        valid.iter().map(|&i| tensors[i]).collect(),
        None,
        valid
            .iter()
            .map(|&i| if norms[i] == 0.0 { 0.0 } else { 1.0 / norms[i] })
            .collect(),
    );
    let mut u = dirs.scratch();
    // The directions' Gram matrix uₐ·u_b, from the inputs'.
    let kv = valid.len();
    let gu: Vec<f64> = (0..kv * kv)
        .map(|ab| {
            let (a, b) = (ab / kv, ab % kv);
            g[valid[a] * k + valid[b]] * dirs.inv[a] * dirs.inv[b]
        })
        .collect();
    // The mean direction is held unnormalised: it is `mean · mscale`, of
    // squared norm `msq` (1 once normalised), so no pass only rescales it.
    let mut mean = Vec::new();
    weights::mem::reserve_huge(&mut mean, n);
    for s in (0..n).step_by(BLOCK) {
        let len = BLOCK.min(n - s);
        dirs.fill(s, len, &mut u);
        mean.extend((0..len).map(|j| {
            let mut m = 0f64;
            for (i, a) in na.iter().enumerate() {
                m += a * u[i * BLOCK + j];
            }
            m
        }));
    }
    let mn = dot(&mean, &mean).sqrt();
    let (mut mscale, mut msq) = (1.0 / mn, 1.0);
    if mn < tol {
        // The weighted mean vanishes: start from the first direction.
        for s in (0..n).step_by(BLOCK) {
            let len = BLOCK.min(n - s);
            dirs.fill(s, len, &mut u);
            mean[s..s + len].copy_from_slice(&u[..len]);
        }
        (mscale, msq) = (1.0, gu[0]);
    }
    let mut dots = vec![0f64; kv];
    let (mut tangent, mut m) = ([0f64; BLOCK], [0f64; BLOCK]);
    for _ in 0..max_iter {
        // cos θᵢ = uᵢ·m in one pass.
        dots.fill(0.0);
        for s in (0..n).step_by(BLOCK) {
            let len = BLOCK.min(n - s);
            dirs.fill(s, len, &mut u);
            for (i, d) in dots.iter_mut().enumerate() {
                *d += dot(&u[i * BLOCK..i * BLOCK + len], &mean[s..s + len]);
            }
        }
        let terms: Vec<(usize, f64, f64)> = dots
            .iter()
            .enumerate()
            .filter_map(|(i, &d)| {
                let d = (d * mscale).clamp(-1.0, 1.0);
                let theta = d.acos();
                (theta >= tol).then(|| (i, na[i] * theta / theta.sin(), d))
            })
            .collect();
        // The tangent τ = Σ cᵢ (uᵢ − cos θᵢ m) of a block.
        let block_tangent = |u: &[f64], m: &[f64], t: &mut [f64]| {
            t.fill(0.0);
            for &(i, c, d) in &terms {
                t.iter_mut()
                    .zip(&u[i * BLOCK..])
                    .zip(m)
                    .for_each(|((t, u), m)| *t += c * (u - d * m));
            }
        };
        let scaled = |src: &[f64], m: &mut [f64]| {
            m.iter_mut().zip(src).for_each(|(m, v)| *m = v * mscale);
        };
        // ‖τ‖² = Σₐ_b cₐc_b (uₐ·u_b − 2 cos θₐ cos θ_b + cos θₐ cos θ_b ‖m‖²)
        // from the Gram matrix; where that is small enough for its
        // cancellation to matter, τ is summed entry by entry instead.
        let pairs = || terms.iter().flat_map(|a| terms.iter().map(move |b| (a, b)));
        let mut tn2: f64 = pairs()
            .map(|(&(a, ca, da), &(b, cb, db))| {
                ca * cb * (gu[a * kv + b] - 2.0 * da * db + da * db * msq)
            })
            .sum();
        // The size of the terms that cancel: large cᵢ (inputs nearly opposite
        // the mean, θ/sin θ) make a small difference of large numbers.
        let magnitude: f64 = pairs()
            .map(|(&(a, ca, da), &(b, cb, db))| {
                (ca * cb).abs() * (gu[a * kv + b].abs() + (2.0 + msq) * (da * db).abs())
            })
            .sum();
        if tn2 < 1e-10 || tn2 < 1e-8 * magnitude {
            tn2 = 0.0;
            for s in (0..n).step_by(BLOCK) {
                let len = BLOCK.min(n - s);
                dirs.fill(s, len, &mut u);
                scaled(&mean[s..s + len], &mut m[..len]);
                block_tangent(&u, &m[..len], &mut tangent[..len]);
                tn2 += dot(&tangent[..len], &tangent[..len]);
            }
        }
        let tn = tn2.max(0.0).sqrt();
        if tn < tol {
            break;
        }
        // m ← cos‖τ‖ m + sin‖τ‖ τ/‖τ‖, then its norm.
        let (c, sn) = (tn.cos(), tn.sin());
        let mut un2 = 0f64;
        for s in (0..n).step_by(BLOCK) {
            let len = BLOCK.min(n - s);
            dirs.fill(s, len, &mut u);
            scaled(&mean[s..s + len], &mut m[..len]);
            block_tangent(&u, &m[..len], &mut tangent[..len]);
            let out = &mut mean[s..s + len];
            out.iter_mut()
                .zip(&m[..len])
                .zip(&tangent[..len])
                .for_each(|((o, m), t)| *o = c * m + sn * t / tn);
            un2 += dot(out, out);
        }
        let un = un2.sqrt();
        (mscale, msq) = if un > tol {
            (1.0 / un, 1.0)
        } else {
            (1.0, un2)
        };
    }
    let scale: f64 = alphas.iter().zip(&norms).map(|(a, nm)| a * nm).sum::<f64>() * mscale;
    mean.iter().map(|&m| (scale * m) as f32).collect()
}

/// Unit directions `uᵢ = (xᵢ − base)·invᵢ` of some inputs, made in f64
/// [`BLOCK`] entries at a time into a scratch buffer (one row per input)
/// rather than held whole: the spherical means read them several times.
struct Directions<'a> {
    inputs: Vec<&'a [f32]>,
    base: Option<&'a [f32]>,
    inv: Vec<f64>,
}

impl<'a> Directions<'a> {
    fn new(inputs: Vec<&'a [f32]>, base: Option<&'a [f32]>, inv: Vec<f64>) -> Self {
        Directions { inputs, base, inv }
    }

    /// A buffer for [`Directions::fill`].
    fn scratch(&self) -> Vec<f64> {
        vec![0f64; self.inputs.len() * BLOCK]
    }

    /// Entries `s..s + len` of every direction, input `i` at `u[i·BLOCK..]`.
    fn fill(&self, s: usize, len: usize, u: &mut [f64]) {
        for ((x, &inv), row) in self.inputs.iter().zip(&self.inv).zip(u.chunks_mut(BLOCK)) {
            let (x, row) = (&x[s..s + len], &mut row[..len]);
            match self.base {
                Some(b) => row
                    .iter_mut()
                    .zip(x)
                    .zip(&b[s..s + len])
                    .for_each(|((u, &x), &b)| *u = (x - b) as f64 * inv),
                None => row
                    .iter_mut()
                    .zip(x)
                    .for_each(|(u, &x)| *u = x as f64 * inv),
            }
        }
    }
}

/// SCE (Wan et al. 2024, FuseChat: "select, calculate, erase"), mergekit's
/// `sce`: with task vectors `δᵢ = θᵢ − base`, (S) where `select_topk < 1`
/// keep only the `⌊select_topk · nnz(var)⌋` elements of largest variance across
/// the inputs; (C) weight each input by its mean squared (selected) delta over
/// their sum (uniform when that sum is below 1e-6); (E) drop entries whose sign
/// disagrees with the sign of `Σᵢ δᵢ` (TIES' election, zeros dropped) and
/// average the rest by those weights (divisor clamped to ≥ 1e-6). Among
/// entries of equal variance at the selection's edge the lowest positions are
/// kept (torch's `topk` leaves the choice open).
///
/// The task vectors are never held: each pass forms them block by block from
/// the inputs; what is held is the variance (and a copy to select on) and the
/// kept mask.
pub fn sce(base: &[f32], models: &[&[f32]], select_topk: f64) -> Vec<f32> {
    if models.is_empty() {
        return base.to_vec();
    }
    let n = base.len();
    let k = models.len();
    let mut deltas = vec![0f32; k * BLOCK];
    // δᵢ of the block at `s`, input i at deltas[i·BLOCK..].
    let fill = |s: usize, len: usize, deltas: &mut [f32]| {
        let b = &base[s..s + len];
        for (m, row) in models.iter().zip(deltas.chunks_mut(BLOCK)) {
            row[..len]
                .iter_mut()
                .zip(&m[s..s + len])
                .zip(b)
                .for_each(|((d, &x), &b)| *d = x - b);
        }
    };
    // (S) The kept entries, as a mask; None keeps all.
    let keep: Option<Vec<bool>> = (select_topk < 1.0).then(|| {
        let mut keep = vec![false; n];
        if select_topk <= 0.0 {
            return keep;
        }
        // Population variance across inputs, per entry (each sum in input order from −0.0, as `Sum`).
        let mut var: Vec<f32> = Vec::new();
        weights::mem::reserve_huge(&mut var, n);
        let (mut mean, mut sq) = ([0f32; BLOCK], [0f32; BLOCK]);
        for s in (0..n).step_by(BLOCK) {
            let len = BLOCK.min(n - s);
            fill(s, len, &mut deltas);
            let (mean, sq) = (&mut mean[..len], &mut sq[..len]);
            mean.fill(-0.0);
            for row in deltas.chunks(BLOCK) {
                mean.iter_mut().zip(row).for_each(|(m, &d)| *m += d);
            }
            mean.iter_mut().for_each(|m| *m /= k as f32);
            sq.fill(-0.0);
            for row in deltas.chunks(BLOCK) {
                sq.iter_mut()
                    .zip(row)
                    .zip(mean.iter())
                    .for_each(|((q, &d), &m)| *q += (d - m) * (d - m));
            }
            var.extend(sq.iter().map(|&q| q / k as f32));
        }
        let nonzero = var.iter().filter(|v| **v != 0.0).count();
        let top = (nonzero as f64 * select_topk) as usize;
        if top == 0 {
            return keep;
        }
        // The top-th largest variance, then everything above it and the
        // first entries equal to it.
        let mut sorted = var.clone();
        let (_, &mut edge, _) = sorted.select_nth_unstable_by(top - 1, |a, b| b.total_cmp(a));
        drop(sorted);
        // (Compared as the selection ordered them, `total_cmp`, NaN included.)
        let mut at_edge = top - var.iter().filter(|v| v.total_cmp(&edge).is_gt()).count();
        for (kp, v) in keep.iter_mut().zip(&var) {
            *kp = v.total_cmp(&edge).is_gt()
                || (v.total_cmp(&edge).is_eq() && at_edge > 0 && {
                    at_edge -= 1;
                    true
                });
        }
        keep
    });
    let kept = |s: usize, len: usize, deltas: &mut [f32]| {
        fill(s, len, deltas);
        if let Some(keep) = &keep {
            for row in deltas.chunks_mut(BLOCK) {
                row[..len]
                    .iter_mut()
                    .zip(&keep[s..s + len])
                    .for_each(|(d, &kp)| *d = if kp { *d } else { 0.0 });
            }
        }
    };
    // (C) Per-input weights: mean squared (kept) delta, normalised.
    let mut sums = vec![0f64; k];
    for s in (0..n).step_by(BLOCK) {
        let len = BLOCK.min(n - s);
        kept(s, len, &mut deltas);
        for (sum, row) in sums.iter_mut().zip(deltas.chunks(BLOCK)) {
            *sum += dot(&row[..len], &row[..len]);
        }
    }
    let mut w: Vec<f32> = sums.iter().map(|&q| (q / n.max(1) as f64) as f32).collect();
    let total: f32 = w.iter().sum();
    if total.abs() < 1e-6 {
        w.iter_mut().for_each(|v| *v = 1.0 / k as f32);
    } else {
        w.iter_mut().for_each(|v| *v /= total);
    }
    // (E) Sign election and the weighted average of the agreeing entries.
    let mut out = Vec::new();
    weights::mem::reserve_huge(&mut out, n);
    let (mut elect, mut mixed, mut div) = ([0f32; BLOCK], [0f32; BLOCK], [0f32; BLOCK]);
    for s in (0..n).step_by(BLOCK) {
        let len = BLOCK.min(n - s);
        kept(s, len, &mut deltas);
        let (elect, mixed, div) = (&mut elect[..len], &mut mixed[..len], &mut div[..len]);
        elect.fill(-0.0);
        for row in deltas.chunks(BLOCK) {
            elect.iter_mut().zip(row).for_each(|(e, &d)| *e += d);
        }
        mixed.fill(0.0);
        div.fill(0.0);
        for (row, &wi) in deltas.chunks(BLOCK).zip(&w) {
            for (((m, dv), &e), &d) in mixed
                .iter_mut()
                .zip(div.iter_mut())
                .zip(elect.iter())
                .zip(row)
            {
                let majority = if e >= 0.0 { 1.0 } else { -1.0 };
                // Adding +0.0 leaves these sums (never −0.0) as they are.
                let agrees = sign(d) == majority;
                *m += if agrees { d * wi } else { 0.0 };
                *dv += if agrees { wi } else { 0.0 };
            }
        }
        out.extend(
            mixed
                .iter()
                .zip(div.iter())
                .zip(&base[s..s + len])
                .map(|((&m, &dv), &b)| b + m / dv.max(1e-6)),
        );
    }
    out
}

/// Multi-SLERP (Goddard 2024), mergekit's `multislerp`: barycentric
/// interpolation on the sphere of the inputs (of their task vectors when a base
/// is given). Directions `uᵢ = xᵢ/(‖xᵢ‖ + ε)` are projected onto the tangent
/// space at their normalised weighted mean `m`, averaged there (`τ = Σ wᵢ (uᵢ −
/// (uᵢ·m) m)`), mapped back by the exponential map `m cos‖τ‖ + τ sin‖τ‖/‖τ‖`
/// (with `‖τ‖ + ε`), and scaled by the weighted mean norm. Weights are divided
/// by their sum when `normalize_weights`. One input is returned unchanged.
/// Errors when the weighted mean direction vanishes (antipodal inputs) for more
/// than two inputs; two such inputs are mixed linearly, as mergekit does.
///
/// With `M = Σ wᵢ uᵢ = ‖M‖ m` the tangent is `τ = M − (Σ wᵢ uᵢ·m) m = (‖M‖ −
/// D) m` with `D = Σ wᵢ uᵢ·m`: parallel to `m` (and zero but for rounding), so
/// it is computed as that scalar multiple of `m`, with the same `cos`/`sin`
/// factors: one pass for the inputs' Gram matrix, one for the output (and a
/// third to measure `‖M‖` directly where the Gram terms cancel).
pub fn multislerp(
    base: Option<&[f32]>,
    models: &[&[f32]],
    weights: &[f64],
    normalize_weights: bool,
    eps: f64,
) -> crate::Result<Vec<f32>> {
    if models.len() == 1 {
        return Ok(models[0].to_vec());
    }
    let total: f64 = weights.iter().sum();
    let w: Vec<f64> = weights
        .iter()
        .map(|&v| if normalize_weights { v / total } else { v })
        .collect();
    let n = models[0].len();
    let k = models.len();
    let g = delta_gram(models, base);
    let norms: Vec<f64> = (0..k).map(|i| g[i * k + i].sqrt()).collect();
    let dirs = Directions::new(
        models.to_vec(),
        base,
        norms.iter().map(|nm| 1.0 / (nm + eps)).collect(),
    );
    let mut u = dirs.scratch();
    // Nothing of size n but the output is held: each pass rebuilds the
    // directions of a block and the weighted mean m = Σ wᵢ uᵢ from them.
    let mut m = [0f64; BLOCK];
    let mean_block = |u: &[f64], m: &mut [f64]| {
        m.fill(0.0);
        for (i, &wi) in w.iter().enumerate() {
            m.iter_mut()
                .zip(&u[i * BLOCK..])
                .for_each(|(m, v)| *m += wi * v);
        }
    };
    // ‖M‖² of the unnormalised mean M = Σ cᵢ δᵢ (cᵢ = wᵢ/(‖δᵢ‖ + ε)) and
    // uᵢ·M from the Gram matrix; measured directly where the terms cancel
    // (near-antipodal inputs), so that a vanishing mean is seen as zero.
    let cs: Vec<f64> = w.iter().zip(&dirs.inv).map(|(wi, inv)| wi * inv).collect();
    let gc: Vec<f64> = (0..k)
        .map(|i| (0..k).map(|j| g[i * k + j] * cs[j]).sum())
        .collect();
    let dots: Vec<f64> = (0..k).map(|i| dirs.inv[i] * gc[i]).collect();
    let mut mean_sq: f64 = cs.iter().zip(&gc).map(|(c, g)| c * g).sum();
    let magnitude: f64 = (0..k)
        .flat_map(|i| (0..k).map(move |j| (i, j)))
        .map(|(i, j)| (cs[i] * cs[j] * g[i * k + j]).abs())
        .sum();
    if mean_sq <= 1e-6 * magnitude {
        mean_sq = 0.0;
        for s in (0..n).step_by(BLOCK) {
            let len = BLOCK.min(n - s);
            dirs.fill(s, len, &mut u);
            mean_block(&u, &mut m[..len]);
            mean_sq += dot(&m[..len], &m[..len]);
        }
    }
    let mean_norm = mean_sq.sqrt();
    let add_base = |mut r: Vec<f32>| {
        if let Some(b) = base {
            r.iter_mut().zip(b).for_each(|(o, b)| *o += b);
        }
        r
    };
    if mean_norm < eps {
        if models.len() == 2 {
            let x = |i: usize, e: usize| match base {
                Some(b) => models[i][e] - b[e],
                None => models[i][e],
            };
            let r = (0..n)
                .map(|e| (x(0, e) as f64 * w[0] + x(1, e) as f64 * w[1]) as f32)
                .collect();
            return Ok(add_base(r));
        }
        return Err(crate::MergeError::Inputs {
            method: "multislerp".into(),
            msg: "the weighted mean direction of the inputs is zero (antipodal inputs whose \
                  weights balance out); use other weights"
                .into(),
        });
    }
    // D = Σ wᵢ uᵢ·m, and τ = (‖M‖ − D) m.
    let d: f64 = w.iter().zip(&dots).map(|(wi, d)| wi * d / mean_norm).sum();
    let along = mean_norm - d;
    let tn = along.abs() + eps;
    // sin‖τ‖/‖τ‖ → 1 as ‖τ‖ → 0 (reached exactly with eps = 0).
    let (c, sn) = (tn.cos(), if tn == 0.0 { 1.0 } else { tn.sin() / tn });
    let scale: f64 = norms.iter().zip(&w).map(|(nm, wi)| nm * wi).sum();
    // The result m cos‖τ‖ + τ sin‖τ‖/‖τ‖, scaled: m · (cos + along·sin/‖τ‖) · scale.
    let factor = (c + along * sn) * scale / mean_norm;
    let mut r = Vec::new();
    weights::mem::reserve_huge(&mut r, n);
    for s in (0..n).step_by(BLOCK) {
        let len = BLOCK.min(n - s);
        dirs.fill(s, len, &mut u);
        mean_block(&u, &mut m[..len]);
        let merged = m[..len].iter().map(|&m| (m * factor) as f32);
        match base {
            Some(b) => r.extend(merged.zip(&b[s..s + len]).map(|(x, b)| x + b)),
            None => r.extend(merged),
        }
    }
    Ok(r)
}

/// NearSwap (alchemonaut 2024), mergekit's `nearswap`: take the other model's
/// value where it is near the base's, `w = clamp(t / max(|a − b|, 1e-6), 0, 1)`,
/// result `w·b + (1 − w)·a` with `a` the base.
pub fn nearswap(t: f64, base: &[f32], model: &[f32]) -> Vec<f32> {
    let t = t as f32;
    base.iter()
        .zip(model)
        .map(|(&a, &b)| {
            let w = (t / (a - b).abs().max(1e-6)).clamp(0.0, 1.0);
            w * b + (1.0 - w) * a
        })
        .collect()
}

/// Elements beyond which Arcee Fusion's quartiles come from a sample (drawn
/// with replacement, as mergekit's `_QUANTILE_SAMPLE_SIZE`).
pub const ARCEE_FUSION_QUANTILE_SAMPLE: usize = 1_000_000;

/// Arcee Fusion (Arcee AI 2024), mergekit's `arcee_fusion`: importance
/// `|θ − base| · KL(softmax θ ‖ softmax base)` (softmax and KL per vector along
/// the last axis, each probability + 1e-8), and the fine-tune's change kept only
/// where the importance reaches `median + 1.5·(q₃ − q₁)` (quartiles at sorted
/// positions `⌊q·(n−1)⌋`, of a with-replacement sample of
/// [`ARCEE_FUSION_QUANTILE_SAMPLE`] elements for larger tensors, drawn from `rng`).
pub fn arcee_fusion(shape: &[usize], base: &[f32], model: &[f32], rng: &mut Rng) -> Vec<f32> {
    let n = base.len();
    if n == 0 {
        return Vec::new();
    }
    let len = shape.last().copied().unwrap_or(n).max(1);
    // Loops over slices with branch-free exp and ln, so that they vectorise.
    let softmax = |x: &[f32], out: &mut Vec<f32>| {
        let mx = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        out.clear();
        out.extend(x.iter().map(|&v| crate::vmath::exp(v - mx)));
        let s = sum_of(out, |v| v as f64) as f32;
        out.iter_mut().for_each(|v| *v = *v / s + 1e-8);
    };
    // KL per row; an entry's importance |θ − base|·KL is formed where needed.
    let (mut p, mut q) = (Vec::with_capacity(len), Vec::with_capacity(len));
    let kls: Vec<f32> = base
        .chunks(len)
        .zip(model.chunks(len))
        .map(|(rb, rm)| {
            softmax(rm, &mut p);
            softmax(rb, &mut q);
            sum_pairs(&p, &q, |p, q| p as f64 * crate::vmath::ln(p / q) as f64) as f32
        })
        .collect();
    let importance = |i: usize| (model[i] - base[i]).abs() * kls[i / len];
    let sample: Vec<f32> = if n > ARCEE_FUSION_QUANTILE_SAMPLE {
        (0..ARCEE_FUSION_QUANTILE_SAMPLE)
            .map(|_| importance(rng.below(n)))
            .collect()
    } else {
        (0..n).map(importance).collect()
    };
    let [q1, median, q3] = order_statistics(&sample, [0.25, 0.5, 0.75]);
    drop(sample);
    let threshold = median + 1.5 * (q3 - q1);
    let mut out = Vec::new();
    weights::mem::reserve_huge(&mut out, n);
    for ((rb, rm), &kl) in base.chunks(len).zip(model.chunks(len)).zip(&kls) {
        out.extend(rb.iter().zip(rm).map(|(&b, &m)| {
            if (m - b).abs() * kl >= threshold {
                b + (m - b)
            } else {
                b
            }
        }));
    }
    out
}

/// The values at sorted positions `⌊qⱼ·(n − 1)⌋` of `v` (ascending `qⱼ`, by
/// `total_cmp`): exactly what sorting would put there. A radix selection: one
/// pass counts the values per bucket of their order key's top 16 bits, which
/// places each position in one bucket, and a second gathers those buckets'
/// values, where a selection finds each one (a bucket holds a small share of
/// `v` unless its values are nearly all alike). `v` must not be empty.
fn order_statistics<const K: usize>(v: &[f32], qs: [f64; K]) -> [f32; K] {
    let key = crate::vmath::total_order_key;
    let mut counts = vec![0u32; 1 << 16];
    for &x in v {
        counts[(key(x) >> 16) as usize] += 1;
    }
    // Each position's bucket, and its rank among that bucket's values.
    let positions = qs.map(|q| (q * (v.len() - 1) as f64) as usize);
    let mut targets = [(0usize, 0usize); K];
    let (mut bucket, mut below) = (0usize, 0usize);
    for (t, &at) in targets.iter_mut().zip(&positions) {
        while below + counts[bucket] as usize <= at {
            below += counts[bucket] as usize;
            bucket += 1;
        }
        *t = (bucket, at - below);
    }
    let first_of = |b: usize| targets.iter().position(|&(t, _)| t == b);
    let mut members: Vec<Vec<f32>> = (0..K)
        .map(|j| match first_of(targets[j].0) == Some(j) {
            true => Vec::with_capacity(counts[targets[j].0] as usize),
            false => Vec::new(),
        })
        .collect();
    for &x in v {
        let b = (key(x) >> 16) as usize;
        // Positions in one bucket share the first one's list.
        if let Some(j) = first_of(b) {
            members[j].push(x);
        }
    }
    let mut out = [0f32; K];
    for (j, &(b, rank)) in targets.iter().enumerate() {
        let m = &mut members[first_of(b).unwrap_or(j)];
        out[j] = *m.select_nth_unstable_by(rank, f32::total_cmp).1;
    }
    out
}

/// RAM, Reinforced Agent Merging (arXiv 2601.13572), mergekit's `ram` and
/// `ramplus_tl`: an element changed by exactly one input (`|δᵢ| > ε`) takes that
/// input's change; one changed by several takes their mean; RAM+ (tensor-local)
/// scales each input's unique changes by `1 + r · clamp(ρᵢ, 0, α)` with `ρᵢ` its
/// shared-to-unique count ratio in this tensor. `plus = None` is plain RAM.
pub fn ram(base: &[f32], models: &[&[f32]], epsilon: f64, plus: Option<(f64, f64)>) -> Vec<f32> {
    if models.is_empty() {
        return base.to_vec();
    }
    let eps = epsilon as f32;
    let n = base.len();
    // How many inputs changed each entry of the block starting at `s`.
    let count_block = |s: usize, counts: &mut [u32]| {
        counts.fill(0);
        let b = &base[s..s + counts.len()];
        for m in models {
            counts
                .iter_mut()
                .zip(&m[s..s + b.len()])
                .zip(b)
                .for_each(|((c, &x), &b)| *c += u32::from((x - b).abs() > eps));
        }
    };
    let mut counts = [0u32; BLOCK];
    let lambdas: Vec<f32> = match plus {
        None => vec![1.0; models.len()],
        Some((r, alpha)) => {
            // Each input's changes shared with another input and its own.
            let mut tally = vec![(0u64, 0u64); models.len()];
            for s in (0..n).step_by(BLOCK) {
                let counts = &mut counts[..BLOCK.min(n - s)];
                count_block(s, counts);
                let b = &base[s..s + counts.len()];
                for (m, (shared, unique)) in models.iter().zip(&mut tally) {
                    for ((&x, &b), &c) in m[s..s + b.len()].iter().zip(b).zip(counts.iter()) {
                        let changed = u64::from((x - b).abs() > eps);
                        *unique += changed & u64::from(c == 1);
                        *shared += changed & u64::from(c > 1);
                    }
                }
            }
            tally
                .iter()
                .map(|&(shared, unique)| {
                    let rho = shared as f32 / (unique as f32).max(eps);
                    1.0 + r as f32 * rho.clamp(0.0, alpha as f32)
                })
                .collect()
        }
    };
    // Input by input over each block, adding in input order as the
    // per-entry definition does (an unchanged entry adds +0.0, which leaves
    // the sum's bits alone: it starts at +0.0 and never reaches −0.0).
    let mut out = Vec::new();
    weights::mem::reserve_huge(&mut out, n);
    let mut acc = [0f32; BLOCK];
    for s in (0..n).step_by(BLOCK) {
        let len = BLOCK.min(n - s);
        let (counts, acc) = (&mut counts[..len], &mut acc[..len]);
        count_block(s, counts);
        acc.fill(0.0);
        let b = &base[s..s + len];
        for (m, &lam) in models.iter().zip(&lambdas) {
            for (((a, &x), &b), &c) in acc.iter_mut().zip(&m[s..s + len]).zip(b).zip(counts.iter())
            {
                let d = x - b;
                let add = if c == 1 { d * lam } else { d / c as f32 };
                *a += if d.abs() > eps { add } else { 0.0 };
            }
        }
        out.extend(acc.iter().zip(b).map(|(&a, &b)| b + a));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{a:?} vs {b:?}");
        }
    }

    /// The fused, blocked loops against the per-element definitions they
    /// replaced, bit for bit, over lengths that end inside and on block edges.
    #[test]
    fn fused_loops_give_the_bits_of_the_per_element_definitions() {
        let mut rng = weights::rng::Rng::new(3);
        for n in [1, BLOCK - 1, BLOCK, 2 * BLOCK + 17] {
            let mut draw =
                |scale: f32| -> Vec<f32> { (0..n).map(|_| rng.normal() as f32 * scale).collect() };
            let base = draw(1.0);
            let models = [draw(1.0), draw(1e-3), draw(0.0)];
            let weights = [0.5, -0.3, 0.2];
            let inputs: Vec<TaskInput> = models
                .iter()
                .zip(weights)
                .map(|(t, weight)| TaskInput {
                    tensor: t,
                    weight,
                    sparsify: SparsifyParams {
                        density: 1.0,
                        gamma: 0.0,
                        epsilon: 0.0,
                        rescale: false,
                        draws: Default::default(),
                    },
                    seed: 0,
                })
                .collect();
            for (normalize, lambda) in [(true, 1.0), (false, 0.7)] {
                let l = lambda as f32;
                let got =
                    dense_task_vector_merge(&base, &inputs, normalize, |b, m| add_scaled(b, m, l));
                let div: f32 = weights.iter().map(|&w| w as f32).sum();
                let want: Vec<f32> = (0..n)
                    .map(|e| {
                        let mixed: f32 = models
                            .iter()
                            .zip(weights)
                            .map(|(t, w)| (t[e] - base[e]) * w as f32)
                            .sum();
                        let mut m = if normalize { mixed / div } else { mixed };
                        if lambda != 1.0 {
                            m *= lambda as f32;
                        }
                        base[e] + m
                    })
                    .collect();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "n {n}");
                let tensors: Vec<&[f32]> = models.iter().map(|m| m.as_slice()).collect();
                let got = linear(&tensors, &weights, normalize);
                let want: Vec<f32> = (0..n)
                    .map(|e| {
                        let mut o = 0f32;
                        for (t, w) in models.iter().zip(weights) {
                            o += t[e] * w as f32;
                        }
                        if normalize { o / div } else { o }
                    })
                    .collect();
                assert_eq!(bits(&got), bits(&want), "n {n}");
            }
        }
    }

    #[test]
    fn linear_golden() {
        let (a, b) = ([1.0f32, 2.0, 3.0], [3.0f32, 0.0, -1.0]);
        // (1·a + 3·b)/4
        close(
            &linear(&[&a, &b], &[1.0, 3.0], true),
            &[2.5, 0.5, 0.0],
            1e-7,
        );
        close(
            &linear(&[&a, &b], &[1.0, 3.0], false),
            &[10.0, 2.0, 0.0],
            1e-7,
        );
        close(&linear(&[&a, &a], &[0.3, 0.7], true), &a, 1e-7);
    }

    #[test]
    fn slerp_golden_and_endpoints() {
        // Orthogonal unit vectors: θ = π/2, at t = 1/2 both coefficients are sin(π/4)/1.
        let (a, b) = ([1.0f32, 0.0], [0.0f32, 2.0]);
        let h = std::f32::consts::FRAC_1_SQRT_2;
        close(&slerp(0.5, &a, &b), &[h, 2.0 * h], 1e-6);
        close(&slerp(0.0, &a, &b), &a, 1e-7);
        close(&slerp(1.0, &a, &b), &b, 1e-6);
        // Colinear: plain lerp.
        close(&slerp(0.25, &[1.0, 1.0], &[2.0, 2.0]), &[1.25, 1.25], 1e-7);
    }

    #[test]
    fn nuslerp_rows_and_base() {
        // Rows [1,0] and [0,1] (θ = π/2) at weights 1:1, and a colinear second row.
        let x0 = [1.0f32, 0.0, 1.0, 1.0];
        let x1 = [0.0f32, 1.0, 3.0, 3.0];
        let h = std::f32::consts::FRAC_1_SQRT_2;
        let r = nuslerp(&[2, 2], None, &x0, &x1, [1.0, 1.0], NuslerpMode::LastAxis);
        close(&r, &[h, h, 2.0, 2.0], 1e-6);
        // With a base the task vectors are interpolated and the base added back.
        let base = [1.0f32; 4];
        let y0: Vec<f32> = x0.iter().map(|v| v + 1.0).collect();
        let y1: Vec<f32> = x1.iter().map(|v| v + 1.0).collect();
        let r = nuslerp(
            &[2, 2],
            Some(&base),
            &y0,
            &y1,
            [1.0, 1.0],
            NuslerpMode::LastAxis,
        );
        close(&r, &[1.0 + h, 1.0 + h, 3.0, 3.0], 1e-6);
        // Weight 0 on the second model returns the first.
        let r = nuslerp(&[2, 2], None, &x0, &x1, [1.0, 0.0], NuslerpMode::Flatten);
        close(&r, &x0, 1e-6);
    }

    #[test]
    fn task_arithmetic_ties_golden() {
        let base = [0.0f32; 4];
        let a = [1.0f32, -2.0, 0.5, 0.0];
        let b = [-3.0f32, 1.0, 0.5, 2.0];
        let inp = |t: &'static [f32; 4], w: f64, d: f64| TaskInput {
            tensor: t,
            weight: w,
            sparsify: SparsifyParams {
                density: d,
                gamma: 0.0,
                epsilon: 0.0,
                rescale: false,
                draws: Default::default(),
            },
            seed: 0,
        };
        let ta = TASK_VECTOR_PRESETS[0].1;
        let opts = TaskVectorOptions {
            normalize: false,
            lambda: 1.0,
        };
        const A: [f32; 4] = [1.0, -2.0, 0.5, 0.0];
        const B: [f32; 4] = [-3.0, 1.0, 0.5, 2.0];
        let r = task_vector_merge(
            "t",
            &base,
            &[4],
            &[inp(&A, 1.0, 1.0), inp(&B, 0.5, 1.0)],
            &ta,
            &opts,
        )
        .unwrap();
        close(&r, &[1.0 - 1.5, -2.0 + 0.5, 0.75, 1.0], 1e-7);
        // TIES, density 0.5: a keeps {-2, 1}, b keeps {-3, 2}; weights 1, 1.
        // Sums: [1-3, -2, 0, 2] → signs [-, -, +(0), +]; elected entries:
        // e0: b (-3) → -3/1; e1: a (-2) → -2/1; e2: none → 0; e3: b (2) → 2.
        let ties = TASK_VECTOR_PRESETS[1].1;
        let opts = TaskVectorOptions {
            normalize: true,
            lambda: 1.0,
        };
        let r = task_vector_merge(
            "t",
            &base,
            &[4],
            &[inp(&A, 1.0, 0.5), inp(&B, 1.0, 0.5)],
            &ties,
            &opts,
        )
        .unwrap();
        close(&r, &[-3.0, -2.0, 0.0, 2.0], 1e-7);
        let _ = (a, b);
    }

    #[test]
    fn model_stock_golden() {
        // Two task vectors at 90°: cos = 0, t = 0 → the base.
        let base = [1.0f32, 1.0];
        let r = model_stock(&[2], &base, &[&[2.0, 1.0], &[1.0, 2.0]], false);
        close(&r, &base, 1e-7);
        // Identical task vectors: cos = 1, t = 2/2 = 1 → their mean.
        let r = model_stock(&[2], &base, &[&[2.0, 3.0], &[2.0, 3.0]], false);
        close(&r, &[2.0, 3.0], 1e-7);
        // cos = 1/2 (60°): t = 2·0.5/1.5 = 2/3.
        let c = (60f32).to_radians();
        let m1 = [1.0 + 1.0, 1.0];
        let m2 = [1.0 + c.cos(), 1.0 + c.sin()];
        let r = model_stock(&[2], &base, &[&m1, &m2], false);
        let t = 2.0 / 3.0;
        let avg = [(m1[0] + m2[0]) / 2.0, (m1[1] + m2[1]) / 2.0];
        close(&r, &[t * avg[0] + (1.0 - t), t * avg[1] + (1.0 - t)], 1e-6);
    }

    /// RAM's blocked loops give the bits of its per-entry definition, with
    /// entries changed by none, one and several inputs, across block edges.
    #[test]
    fn ram_blocked_equals_its_per_entry_definition() {
        let mut rng = weights::rng::Rng::new(8);
        let n = 2 * BLOCK + 31;
        let base: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        let models: Vec<Vec<f32>> = (0..3)
            .map(|_| {
                base.iter()
                    .map(|&b| {
                        if rng.uniform() < 0.5 {
                            b
                        } else {
                            b + rng.normal() as f32 * 0.01
                        }
                    })
                    .collect()
            })
            .collect();
        let refs: Vec<&[f32]> = models.iter().map(|m| m.as_slice()).collect();
        for plus in [None, Some((0.5, 2.0))] {
            let eps = 1e-5f32;
            let changed = |m: &[f32], e: usize| (m[e] - base[e]).abs() > eps;
            let counts: Vec<u32> = (0..n)
                .map(|e| refs.iter().filter(|m| changed(m, e)).count() as u32)
                .collect();
            let lambdas: Vec<f32> = refs
                .iter()
                .map(|m| match plus {
                    None => 1.0,
                    Some((r, alpha)) => {
                        let unique = (0..n).filter(|&e| changed(m, e) && counts[e] == 1).count();
                        let shared = (0..n).filter(|&e| changed(m, e) && counts[e] > 1).count();
                        let rho = shared as f32 / (unique as f32).max(eps);
                        1.0 + r as f32 * rho.clamp(0.0, alpha as f32)
                    }
                })
                .collect();
            let want: Vec<u32> = (0..n)
                .map(|e| {
                    let mut acc = 0f32;
                    for (m, &lam) in refs.iter().zip(&lambdas) {
                        if changed(m, e) {
                            let d = m[e] - base[e];
                            acc += if counts[e] == 1 {
                                d * lam
                            } else {
                                d / counts[e] as f32
                            };
                        }
                    }
                    (base[e] + acc).to_bits()
                })
                .collect();
            let got: Vec<u32> = ram(&base, &refs, eps as f64, plus)
                .iter()
                .map(|v| v.to_bits())
                .collect();
            assert_eq!(got, want, "{plus:?}");
            assert!(counts.contains(&0) && counts.contains(&1));
            assert!(counts.iter().any(|&c| c > 1));
        }
    }

    #[test]
    fn sce_keeps_the_first_of_equal_variances_at_the_selection_edge() {
        // Variance 1 at entries 0–2, 0 at 3: ⌊0.5 · 3⌋ = 1 entry kept, the first.
        // There the election is a tie (sum 0 → +), so only the positive input
        // counts: 1·½ / ½ = 1. Elsewhere nothing is left.
        let base = [0.0f32; 4];
        let (a, b) = ([1.0f32, 1.0, 1.0, 0.0], [-1.0f32, -1.0, -1.0, 0.0]);
        close(&sce(&base, &[&a, &b], 0.5), &[1.0, 0.0, 0.0, 0.0], 0.0);
        // Keeping everything: the election is + everywhere, the same result
        // on all three entries.
        close(&sce(&base, &[&a, &b], 1.0), &[1.0, 1.0, 1.0, 0.0], 0.0);
        close(&sce(&base, &[&a, &b], 0.0), &[0.0; 4], 0.0);
    }

    /// A row with an infinite or NaN entry has no finite KL (as with libm's
    /// `expf`/`logf`): its importances are NaN, never above the threshold, so
    /// the row stays the base's; the other rows are unaffected.
    #[test]
    fn arcee_fusion_keeps_the_base_on_rows_without_a_finite_kl() {
        let mut g = weights::rng::Rng::new(3);
        let (rows, cols) = (6, 16);
        let base: Vec<f32> = (0..rows * cols).map(|_| g.normal() as f32).collect();
        let model: Vec<f32> = base.iter().map(|b| b + g.normal() as f32).collect();
        let clean = arcee_fusion(&[rows, cols], &base, &model, &mut weights::rng::Rng::new(1));
        for bad in [f32::INFINITY, f32::NAN] {
            let mut m = model.clone();
            m[2 * cols + 5] = bad;
            let got = arcee_fusion(&[rows, cols], &base, &m, &mut weights::rng::Rng::new(1));
            assert_eq!(&got[2 * cols..3 * cols], &base[2 * cols..3 * cols], "{bad}");
            // One row fewer among the importances moves the quartiles a
            // little; elsewhere every kept entry is the model's, every other the base's.
            for (e, ((&o, &b), &x)) in got.iter().zip(&base).zip(&model).enumerate() {
                assert!(o == b || o == x, "entry {e}");
            }
            assert!(got.iter().all(|v| v.is_finite()), "{bad}");
        }
        // The clean merge keeps some of the model's changes.
        assert!(clean.iter().zip(&base).any(|(o, b)| o != b));
    }

    /// The radix selection gives the sorted order's values at the quartile
    /// (and other) positions: with ties, at every small length, across buckets.
    #[test]
    fn order_statistics_equal_sorting() {
        let mut rng = weights::rng::Rng::new(5);
        let bits = |v: [f32; 3]| v.map(f32::to_bits);
        for n in (1..40).chain([1000, 1001, 70_000]) {
            for spread in [false, true] {
                let v: Vec<f32> = (0..n)
                    .map(|_| match spread {
                        // Few distinct values (signed zeros among them), so
                        // ties are common and the positions share buckets.
                        false => [-3.0, -1.0, -0.0, 0.0, 0.5, 2.0, 3.0][rng.below(7)],
                        // Either sign over many decades, bucket by bucket.
                        true => (rng.normal() * 10f64.powf(rng.uniform() * 20.0 - 10.0)) as f32,
                    })
                    .collect();
                let mut sorted = v.clone();
                sorted.sort_unstable_by(f32::total_cmp);
                let at = |q: f64| sorted[(q * (n - 1) as f64) as usize];
                for qs in [[0.25, 0.5, 0.75], [0.0, 0.5, 1.0], [0.5, 0.5, 0.5]] {
                    let got = order_statistics(&v, qs);
                    assert_eq!(bits(got), bits(qs.map(at)), "n {n} {qs:?}");
                }
            }
        }
    }

    #[test]
    fn karcher_of_two_is_the_scaled_midpoint_direction() {
        // Unit directions 0° and 90° (norms 1 and 3): mean direction 45°, scale 2.
        let r = karcher(&[&[1.0, 0.0], &[0.0, 3.0]], 50, 1e-9);
        let h = std::f32::consts::FRAC_1_SQRT_2 * 2.0;
        close(&r, &[h, h], 1e-5);
        close(&karcher(&[&[1.0, 2.0]], 10, 1e-5), &[1.0, 2.0], 0.0);
    }

    /// mergekit's `multislerp` transcribed literally (every vector held, the
    /// tangent summed entry by entry), in f64.
    fn multislerp_reference(
        base: &[f32],
        xs: &[Vec<f32>],
        w: &[f64],
        eps: f64,
    ) -> Option<Vec<f32>> {
        let d: Vec<Vec<f64>> = xs
            .iter()
            .map(|x| x.iter().zip(base).map(|(&x, &b)| (x - b) as f64).collect())
            .collect();
        let l2 = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let norms: Vec<f64> = d.iter().map(|v| l2(v)).collect();
        let u: Vec<Vec<f64>> = d
            .iter()
            .zip(&norms)
            .map(|(v, nm)| v.iter().map(|x| x / (nm + eps)).collect())
            .collect();
        let n = base.len();
        let mean: Vec<f64> = (0..n)
            .map(|e| u.iter().zip(w).map(|(u, w)| w * u[e]).sum())
            .collect();
        let mn = l2(&mean);
        if mn < eps {
            return None;
        }
        let m: Vec<f64> = mean.iter().map(|x| x / mn).collect();
        let dots: Vec<f64> = u
            .iter()
            .map(|u| u.iter().zip(&m).map(|(a, b)| a * b).sum())
            .collect();
        let t: Vec<f64> = (0..n)
            .map(|e| {
                (0..xs.len())
                    .map(|i| w[i] * (u[i][e] - dots[i] * m[e]))
                    .sum()
            })
            .collect();
        let tn = l2(&t) + eps;
        let scale: f64 = norms.iter().zip(w).map(|(a, b)| a * b).sum();
        Some(
            (0..n)
                .map(|e| ((m[e] * tn.cos() + t[e] * tn.sin() / tn) * scale) as f32 + base[e])
                .collect(),
        )
    }

    #[test]
    fn multislerp_equals_mergekits_formula_and_refuses_a_vanishing_mean() {
        let mut rng = weights::rng::Rng::new(9);
        let n = 3 * BLOCK + 5;
        let mut draw = |s: f32| -> Vec<f32> { (0..n).map(|_| rng.normal() as f32 * s).collect() };
        let base = draw(1.0);
        let offset = |d: &[f32], k: f32| -> Vec<f32> {
            base.iter().zip(d).map(|(b, d)| b + k * d).collect()
        };
        let (d0, d1, d2) = (draw(0.1), draw(0.2), draw(1e-4));
        // Generic inputs; and two nearly antipodal ones of equal weight (the
        // mean is 0.05% of the vectors, where the Gram shortcut cancels and a
        // direct pass measures it).
        let near: Vec<f32> = d0.iter().zip(&d2).map(|(a, b)| -a + b).collect();
        let cases = [
            (
                vec![offset(&d0, 1.0), offset(&d1, 1.0), offset(&d2, 1.0)],
                [0.5, 0.3, 0.2],
            ),
            (
                vec![offset(&d0, 1.0), offset(&near, 1.0), offset(&d1, 1.0)],
                [0.5, 0.5, 0.0],
            ),
        ];
        for (xs, w) in &cases {
            let refs: Vec<&[f32]> = xs.iter().map(|x| x.as_slice()).collect();
            let got = multislerp(Some(&base), &refs, w, true, 1e-8).unwrap();
            let want = multislerp_reference(&base, xs, w, 1e-8).unwrap();
            close(&got, &want, 1e-6);
        }
        // Exactly antipodal task vectors whose weights balance: refused for
        // three inputs, mixed linearly for two (as mergekit does).
        // (A zero base, so that the two task vectors are exactly opposite.)
        let zero = vec![0f32; n];
        let (a, b) = (d0.clone(), d0.iter().map(|v| -v).collect::<Vec<_>>());
        let e = multislerp(Some(&zero), &[&a, &b, &a], &[0.25, 0.5, 0.25], false, 1e-8);
        assert!(
            matches!(e, Err(crate::MergeError::Inputs { .. })),
            "{:?}",
            e.map(|_| ())
        );
        let abc = [a.clone(), b.clone(), a.clone()];
        assert!(multislerp_reference(&zero, &abc, &[0.25, 0.5, 0.25], 1e-8).is_none());
        let two = multislerp(Some(&zero), &[&a, &b], &[0.5, 0.5], false, 1e-8).unwrap();
        close(&two, &zero, 0.0);
    }

    /// Karcher's mean against a literal transcription of mergekit's loop
    /// (every direction held in f64), on three random tensors.
    #[test]
    fn karcher_equals_the_literal_fixed_point_iteration() {
        let mut rng = weights::rng::Rng::new(4);
        let n = 2 * BLOCK + 9;
        let xs: Vec<Vec<f32>> = (0..3)
            .map(|i| {
                (0..n)
                    .map(|_| rng.normal() as f32 * (1.0 + i as f32) + 0.3)
                    .collect()
            })
            .collect();
        let refs: Vec<&[f32]> = xs.iter().map(|x| x.as_slice()).collect();
        for tol in [1e-5, 1e-12] {
            let got = karcher(&refs, 10, tol);
            let l2 = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
            let norms: Vec<f64> = xs
                .iter()
                .map(|x| l2(&x.iter().map(|&v| v as f64).collect::<Vec<_>>()))
                .collect();
            let u: Vec<Vec<f64>> = xs
                .iter()
                .zip(&norms)
                .map(|(x, nm)| x.iter().map(|&v| v as f64 / nm).collect())
                .collect();
            let a = 1.0 / 3.0;
            let mut m: Vec<f64> = (0..n).map(|e| u.iter().map(|u| a * u[e]).sum()).collect();
            let mn = l2(&m);
            m.iter_mut().for_each(|x| *x /= mn);
            for _ in 0..10 {
                let mut t = vec![0f64; n];
                for ui in &u {
                    let d: f64 = ui
                        .iter()
                        .zip(&m)
                        .map(|(a, b)| a * b)
                        .sum::<f64>()
                        .clamp(-1.0, 1.0);
                    let th = d.acos();
                    if th < tol {
                        continue;
                    }
                    for e in 0..n {
                        t[e] += a * th / th.sin() * (ui[e] - d * m[e]);
                    }
                }
                let tn = l2(&t);
                if tn < tol {
                    break;
                }
                for e in 0..n {
                    m[e] = tn.cos() * m[e] + tn.sin() * t[e] / tn;
                }
                let un = l2(&m);
                m.iter_mut().for_each(|x| *x /= un);
            }
            let scale: f64 = norms.iter().map(|nm| a * nm).sum();
            let want: Vec<f32> = m.iter().map(|&x| (scale * x) as f32).collect();
            close(&got, &want, 1e-6);
        }
    }
}
