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

use crate::sparsify::{Sparsification, SparsifyParams, sparsify};

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
    if method.sparsification.is_none() && method.consensus.is_none() {
        return Ok(dense_task_vector_merge(base, inputs, opts));
    }
    let n = base.len();
    // Weighted (sparsified) deltas.
    let mut deltas: Vec<Vec<f32>> = Vec::with_capacity(inputs.len());
    for inp in inputs {
        let mut d: Vec<f32> = inp.tensor.iter().zip(base).map(|(x, b)| x - b).collect();
        if let Some(s) = method.sparsification {
            sparsify(
                tensor,
                &mut d,
                shape,
                s,
                &inp.sparsify,
                &mut Rng::new(inp.seed),
            )?;
        }
        let w = inp.weight as f32;
        d.iter_mut().for_each(|v| *v *= w);
        deltas.push(d);
    }
    let weights: Vec<f32> = inputs.iter().map(|i| i.weight as f32).collect();
    let lambda = opts.lambda as f32;
    let total: f32 = weights.iter().sum();
    let mut out = Vec::new();
    weights::mem::reserve_huge(&mut out, n);
    // Block by block, each delta streams once per pass; per element the
    // same f32 operations in the same order as the definition above.
    let (mut mixed, mut div, mut elect) = ([0f32; BLOCK], [0f32; BLOCK], [0f32; BLOCK]);
    for start in (0..n).step_by(BLOCK) {
        let len = BLOCK.min(n - start);
        let (mixed, div, elect) = (&mut mixed[..len], &mut div[..len], &mut elect[..len]);
        let range = start..start + len;
        match method.consensus {
            None => {
                // `Sum` of f32 folds from −0.0.
                mixed.fill(-0.0);
                for d in &deltas {
                    mixed
                        .iter_mut()
                        .zip(&d[range.clone()])
                        .for_each(|(m, &v)| *m += v);
                }
                div.fill(if total.abs() < 1e-8 { 1.0 } else { total });
            }
            Some(c) => {
                elect.fill(-0.0);
                for d in &deltas {
                    for (s, &v) in elect.iter_mut().zip(&d[range.clone()]) {
                        *s += match c {
                            Consensus::Sum => v,
                            Consensus::Count => sign(v),
                        };
                    }
                }
                mixed.fill(0.0);
                div.fill(0.0);
                for (d, &w) in deltas.iter().zip(&weights) {
                    for (e, &v) in d[range.clone()].iter().enumerate() {
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
            let mut m = if opts.normalize {
                mixed[e] / div[e]
            } else {
                mixed[e]
            };
            if lambda != 1.0 {
                m *= lambda;
            }
            base[start + e] + m
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
    opts: &TaskVectorOptions,
) -> Vec<f32> {
    let weights: Vec<f32> = inputs.iter().map(|i| i.weight as f32).collect();
    let div: f32 = weights.iter().sum();
    let div = if div.abs() < 1e-8 { 1.0 } else { div };
    let lambda = opts.lambda as f32;
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
            let mut m = if opts.normalize { mixed / div } else { mixed };
            if lambda != 1.0 {
                m *= lambda;
            }
            bv + m
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

fn norm(x: &[f32]) -> f64 {
    x.iter()
        .map(|&v| (v as f64) * (v as f64))
        .sum::<f64>()
        .sqrt()
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
    let dot = v0
        .iter()
        .zip(v1)
        .map(|(&a, &b)| (a as f64 / n0) * (b as f64 / n1))
        .sum::<f64>()
        .clamp(-1.0, 1.0);
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
    let (v0, v1): (Vec<f32>, Vec<f32>) = match base {
        Some(b) => (
            x0.iter().zip(b).map(|(x, b)| x - b).collect(),
            x1.iter().zip(b).map(|(x, b)| x - b).collect(),
        ),
        None => (x0.to_vec(), x1.to_vec()),
    };
    let n = v0.len();
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
        let (mut n0, mut n1, mut dot) = (0f64, 0f64, 0f64);
        for j in 0..len {
            let (a, b) = (v0[idx(j)] as f64, v1[idx(j)] as f64);
            n0 += a * a;
            n1 += b * b;
            dot += a * b;
        }
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
        for j in 0..len {
            let i = idx(j);
            out[i] = ca * v0[i] + cb * v1[i];
        }
    }
    if let Some(b) = base {
        out.iter_mut().zip(b).for_each(|(o, b)| *o += b);
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
    };
    let count = models.len();
    let mut out = vec![0f32; n];
    for r in 0..n / len.max(1) {
        let range = r * len..(r + 1) * len;
        let offs: Vec<Vec<f32>> = models
            .iter()
            .map(|m| {
                m[range.clone()]
                    .iter()
                    .zip(&base[range.clone()])
                    .map(|(x, b)| x - b)
                    .collect()
            })
            .collect();
        let mut cos_sum = 0f64;
        let mut pairs = 0usize;
        for i in 0..count {
            for j in i + 1..count {
                let denom = (norm(&offs[i]) * norm(&offs[j])).max(1e-6);
                let dot: f64 = offs[i]
                    .iter()
                    .zip(&offs[j])
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum();
                cos_sum += (dot / denom).clamp(-1.0, 1.0);
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
        for (k, e) in range.enumerate() {
            let avg = models.iter().map(|m| m[e]).sum::<f32>() / count as f32;
            out[e] = t * avg + (1.0 - t) * base[r * len + k];
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
    let norms: Vec<f64> = tensors.iter().map(|t| norm(t)).collect();
    let units: Vec<Vec<f64>> = tensors
        .iter()
        .zip(&norms)
        .map(|(t, &nm)| {
            t.iter()
                .map(|&v| if nm == 0.0 { 0.0 } else { v as f64 / nm })
                .collect()
        })
        .collect();
    let valid: Vec<usize> = (0..k).filter(|&i| norms[i] > tol).collect();
    let n = tensors[0].len();
    if valid.is_empty() {
        return vec![0.0; n];
    }
    let asum: f64 = valid.iter().map(|&i| alphas[i]).sum();
    let na: Vec<f64> = valid.iter().map(|&i| alphas[i] / asum).collect();
    let mut mean = vec![0f64; n];
    for (a, &i) in na.iter().zip(&valid) {
        mean.iter_mut()
            .zip(&units[i])
            .for_each(|(m, u)| *m += a * u);
    }
    let l2 = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let mn = l2(&mean);
    if mn < tol {
        mean = units[valid[0]].clone();
    } else {
        mean.iter_mut().for_each(|m| *m /= mn);
    }
    for _ in 0..max_iter {
        let mut tangent = vec![0f64; n];
        for (a, &i) in na.iter().zip(&valid) {
            let dot = mean
                .iter()
                .zip(&units[i])
                .map(|(m, u)| m * u)
                .sum::<f64>()
                .clamp(-1.0, 1.0);
            let theta = dot.acos();
            if theta < tol {
                continue;
            }
            let c = a * theta / theta.sin();
            tangent
                .iter_mut()
                .zip(&units[i])
                .zip(&mean)
                .for_each(|((t, u), m)| *t += c * (u - dot * m));
        }
        let tn = l2(&tangent);
        if tn < tol {
            break;
        }
        let (c, s) = (tn.cos(), tn.sin());
        mean.iter_mut()
            .zip(&tangent)
            .for_each(|(m, t)| *m = c * *m + s * t / tn);
        let un = l2(&mean);
        if un > tol {
            mean.iter_mut().for_each(|m| *m /= un);
        }
    }
    let scale: f64 = alphas.iter().zip(&norms).map(|(a, nm)| a * nm).sum();
    mean.iter().map(|&m| (scale * m) as f32).collect()
}

/// SCE (Wan et al. 2024, FuseChat: "select, calculate, erase"), mergekit's
/// `sce`: with task vectors `δᵢ = θᵢ − base`, (S) where `select_topk < 1`
/// keep only the `⌊select_topk · nnz(var)⌋` elements of largest variance across
/// the inputs; (C) weight each input by its mean squared (selected) delta over
/// their sum (uniform when that sum is below 1e-6); (E) drop entries whose sign
/// disagrees with the sign of `Σᵢ δᵢ` (TIES' election, zeros dropped) and
/// average the rest by those weights (divisor clamped to ≥ 1e-6).
pub fn sce(base: &[f32], models: &[&[f32]], select_topk: f64) -> Vec<f32> {
    if models.is_empty() {
        return base.to_vec();
    }
    let n = base.len();
    let k = models.len();
    let mut tvs: Vec<Vec<f32>> = models
        .iter()
        .map(|m| m.iter().zip(base).map(|(x, b)| x - b).collect())
        .collect();
    if select_topk < 1.0 {
        let mut keep = vec![false; n];
        if select_topk > 0.0 {
            // Population variance across inputs, per element.
            let var: Vec<f32> = (0..n)
                .map(|e| {
                    let mean = tvs.iter().map(|t| t[e]).sum::<f32>() / k as f32;
                    tvs.iter().map(|t| (t[e] - mean).powi(2)).sum::<f32>() / k as f32
                })
                .collect();
            let nonzero = var.iter().filter(|v| **v != 0.0).count();
            let top = (nonzero as f64 * select_topk) as usize;
            if top > 0 {
                let mut idx: Vec<usize> = (0..n).collect();
                idx.select_nth_unstable_by(top - 1, |&a, &b| var[b].total_cmp(&var[a]));
                idx[..top].iter().for_each(|&e| keep[e] = true);
            }
        }
        for t in &mut tvs {
            t.iter_mut()
                .zip(&keep)
                .for_each(|(v, &kp)| *v = if kp { *v } else { 0.0 });
        }
    }
    // Per-input weights: mean squared delta, normalised.
    let mut w: Vec<f32> = tvs
        .iter()
        .map(|t| (t.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / n.max(1) as f64) as f32)
        .collect();
    let total: f32 = w.iter().sum();
    if total.abs() < 1e-6 {
        w.iter_mut().for_each(|v| *v = 1.0 / k as f32);
    } else {
        w.iter_mut().for_each(|v| *v /= total);
    }
    (0..n)
        .map(|e| {
            let majority = if tvs.iter().map(|t| t[e]).sum::<f32>() >= 0.0 {
                1.0
            } else {
                -1.0
            };
            let (mut mixed, mut div) = (0f32, 0f32);
            for (t, &wi) in tvs.iter().zip(&w) {
                if sign(t[e]) == majority {
                    mixed += t[e] * wi;
                    div += wi;
                }
            }
            base[e] + mixed / div.max(1e-6)
        })
        .collect()
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
    let xs: Vec<Vec<f32>> = models
        .iter()
        .map(|m| match base {
            Some(b) => m.iter().zip(b).map(|(x, b)| x - b).collect(),
            None => m.to_vec(),
        })
        .collect();
    let total: f64 = weights.iter().sum();
    let w: Vec<f64> = weights
        .iter()
        .map(|&v| if normalize_weights { v / total } else { v })
        .collect();
    let n = xs[0].len();
    let norms: Vec<f64> = xs.iter().map(|x| norm(x)).collect();
    let units: Vec<Vec<f64>> = xs
        .iter()
        .zip(&norms)
        .map(|(x, &nm)| x.iter().map(|&v| v as f64 / (nm + eps)).collect())
        .collect();
    let mut mean = vec![0f64; n];
    for (u, &wi) in units.iter().zip(&w) {
        mean.iter_mut().zip(u).for_each(|(m, v)| *m += wi * v);
    }
    let l2 = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let mean_norm = l2(&mean);
    let add_base = |mut r: Vec<f32>| {
        if let Some(b) = base {
            r.iter_mut().zip(b).for_each(|(o, b)| *o += b);
        }
        r
    };
    if mean_norm < eps {
        if xs.len() == 2 {
            let r = (0..n)
                .map(|e| (xs[0][e] as f64 * w[0] + xs[1][e] as f64 * w[1]) as f32)
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
    mean.iter_mut().for_each(|m| *m /= mean_norm);
    let mut tangent = vec![0f64; n];
    for (u, &wi) in units.iter().zip(&w) {
        let dot: f64 = u.iter().zip(&mean).map(|(a, b)| a * b).sum();
        tangent
            .iter_mut()
            .zip(u.iter().zip(&mean))
            .for_each(|(t, (a, m))| *t += wi * (a - dot * m));
    }
    let tn = l2(&tangent) + eps;
    let (c, s) = (tn.cos(), tn.sin() / tn);
    let scale: f64 = norms.iter().zip(&w).map(|(nm, wi)| nm * wi).sum();
    let r = mean
        .iter()
        .zip(&tangent)
        .map(|(m, t)| ((m * c + t * s) * scale) as f32)
        .collect();
    Ok(add_base(r))
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
    let len = shape.last().copied().unwrap_or(n).max(1);
    let softmax = |x: &[f32]| -> Vec<f32> {
        let mx = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let ex: Vec<f32> = x.iter().map(|&v| (v - mx).exp()).collect();
        let s: f32 = ex.iter().map(|&v| v as f64).sum::<f64>() as f32;
        ex.iter().map(|&v| v / s + 1e-8).collect()
    };
    let mut importance = Vec::with_capacity(n);
    for (rb, rm) in base.chunks(len).zip(model.chunks(len)) {
        let (p, q) = (softmax(rm), softmax(rb));
        let kl = p
            .iter()
            .zip(&q)
            .map(|(&p, &q)| p as f64 * (p / q).ln() as f64)
            .sum::<f64>() as f32;
        importance.extend(rm.iter().zip(rb).map(|(m, b)| (m - b).abs() * kl));
    }
    let mut sorted: Vec<f32> = if n > ARCEE_FUSION_QUANTILE_SAMPLE {
        (0..ARCEE_FUSION_QUANTILE_SAMPLE)
            .map(|_| importance[rng.below(n)])
            .collect()
    } else {
        importance.clone()
    };
    sorted.sort_unstable_by(f32::total_cmp);
    let at = |q: f64| sorted[(q * (sorted.len() - 1) as f64) as usize];
    let (q1, median, q3) = (at(0.25), at(0.5), at(0.75));
    let threshold = median + 1.5 * (q3 - q1);
    base.iter()
        .zip(model)
        .zip(&importance)
        .map(|((&b, &m), &imp)| if imp >= threshold { b + (m - b) } else { b })
        .collect()
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
    let changed = |m: &[f32], e: usize| (m[e] - base[e]).abs() > eps;
    let counts: Vec<u32> = (0..n)
        .map(|e| models.iter().filter(|m| changed(m, e)).count() as u32)
        .collect();
    let lambdas: Vec<f32> = models
        .iter()
        .map(|m| match plus {
            None => 1.0,
            Some((r, alpha)) => {
                let (mut shared, mut unique) = (0u64, 0u64);
                for (e, &c) in counts.iter().enumerate() {
                    if changed(m, e) {
                        match c {
                            1 => unique += 1,
                            _ => shared += 1,
                        }
                    }
                }
                let rho = shared as f32 / (unique as f32).max(eps);
                1.0 + r as f32 * rho.clamp(0.0, alpha as f32)
            }
        })
        .collect();
    (0..n)
        .map(|e| {
            let c = counts[e];
            let mut acc = 0f32;
            for (m, &lam) in models.iter().zip(&lambdas) {
                if changed(m, e) {
                    let d = m[e] - base[e];
                    acc += if c == 1 { d * lam } else { d / c as f32 };
                }
            }
            base[e] + acc
        })
        .collect()
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
                let opts = TaskVectorOptions { normalize, lambda };
                let got = dense_task_vector_merge(&base, &inputs, &opts);
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

    #[test]
    fn karcher_of_two_is_the_scaled_midpoint_direction() {
        // Unit directions 0° and 90° (norms 1 and 3): mean direction 45°, scale 2.
        let r = karcher(&[&[1.0, 0.0], &[0.0, 3.0]], 50, 1e-9);
        let h = std::f32::consts::FRAC_1_SQRT_2 * 2.0;
        close(&r, &[h, h], 1e-5);
        close(&karcher(&[&[1.0, 2.0]], 10, 1e-5), &[1.0, 2.0], 0.0);
    }
}
