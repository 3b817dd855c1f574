//! Data-free merges in the singular subspaces of the task matrices (2025):
//! Task Singular Vectors merging (TSV-M, Gargiulo et al., CVPR 2025) and
//! isotropic merging in the common subspace (Iso-C) or the common and
//! task-specific subspaces (Iso-CTS) (Marczak et al., ICML 2025).
//!
//! Each function takes the task matrices `Δᵢ = θᵢ − base` of one 2-D weight
//! and returns the merged task matrix (the caller adds `λ ·` it to the base).
//! Tensors of other ranks (norms, biases) are merged by the papers as the mean
//! task vector; [`merge_task_vectors`] does that dispatch. The arithmetic is
//! `f64` (SVDs by [`spectra::linalg::thin_svd`]); the authors' code was
//! followed for every index rule (see `tests/fixtures/svd_reference.py`, which
//! re-runs their algorithms in torch for the equality test).

use ndarray::{Array2, ArrayView2, s};
use spectra::linalg::thin_svd;

use crate::{MergeError, Result};

/// Which subspace merge.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SubspaceMethod {
    /// TSV-M: each task's top `⌊rank/T⌋` singular triplets, the stacked left
    /// and right bases orthogonalised (polar factors), the singular values kept.
    /// `rank: None` is the full rank `min(m, n)`.
    TsvM {
        /// The total rank `k` kept across all tasks, in `1..=min(m, n)`
        /// (each task gets `⌊k/T⌋` triplets); `None` for `min(m, n)`.
        rank: Option<usize>,
    },
    /// Iso-C: the SVD of the summed task matrix with every singular value
    /// replaced by their mean.
    IsoC,
    /// Iso-CTS: the top `common_space_fraction` of the summed matrix's
    /// directions plus each task's top directions orthogonal to them, the
    /// spectrum made isotropic.
    IsoCts {
        /// The share of the `min(m, n)` directions given to the common
        /// subspace, in `[0, 1]`; the rest is split evenly among the tasks.
        common_space_fraction: f64,
    },
}

/// The merged task vector of one tensor: the subspace merge of the task
/// matrices for 2-D tensors, their mean for others. `tasks` are flat, of
/// `shape`; `tensor` names errors.
pub fn merge_task_vectors(
    method: SubspaceMethod,
    shape: &[usize],
    tasks: &[Vec<f64>],
    tensor: &str,
) -> Result<Vec<f64>> {
    let t = tasks.len();
    if t == 0 {
        return Err(MergeError::Inputs {
            method: method.name().to_string(),
            msg: format!("tensor '{tensor}': needs at least one model besides the base"),
        });
    }
    if shape.len() != 2 {
        let n = tasks[0].len();
        // The running mean of the authors' code.
        let mut mean = tasks[0].clone();
        for (i, task) in tasks.iter().enumerate().skip(1) {
            for e in 0..n {
                mean[e] += (task[e] - mean[e]) / (i + 1) as f64;
            }
        }
        return Ok(mean);
    }
    let (m, n) = (shape[0], shape[1]);
    let mats: Vec<ArrayView2<f64>> = tasks
        .iter()
        .map(|v| ArrayView2::from_shape((m, n), v).expect("flat tensors of `shape`"))
        .collect();
    let out = match method {
        SubspaceMethod::TsvM { rank } => tsv_m(&mats, rank, tensor)?,
        SubspaceMethod::IsoC => iso_c(&mats, tensor)?,
        SubspaceMethod::IsoCts {
            common_space_fraction,
        } => iso_cts(&mats, common_space_fraction, tensor)?,
    };
    Ok(out.into_raw_vec_and_offset().0)
}

impl SubspaceMethod {
    /// Its `merge_method` name.
    pub fn name(&self) -> &'static str {
        match self {
            SubspaceMethod::TsvM { .. } => "tsv_m",
            SubspaceMethod::IsoC => "iso_c",
            SubspaceMethod::IsoCts { .. } => "iso_cts",
        }
    }
}

fn sum(mats: &[ArrayView2<f64>]) -> Array2<f64> {
    let mut acc = mats[0].to_owned();
    for m in &mats[1..] {
        acc += m;
    }
    acc
}

/// The orthogonal polar factor `U Vᵀ` of `a` (the nearest matrix with
/// orthonormal columns or rows).
fn polar(a: ArrayView2<f64>, tensor: &str) -> Result<Array2<f64>> {
    let svd = thin_svd(a, tensor)?;
    Ok(svd.u.dot(&svd.vt))
}

/// Iso-C: `mean(σ) · U Vᵀ` of the SVD `Σᵢ Δᵢ = U diag(σ) Vᵀ`.
pub fn iso_c(tasks: &[ArrayView2<f64>], tensor: &str) -> Result<Array2<f64>> {
    let total = sum(tasks);
    let svd = thin_svd(total.view(), tensor)?;
    let mean = svd.s.mean().unwrap_or(0.0);
    Ok(svd.u.dot(&svd.vt) * mean)
}

/// Python's `round` (half to even), which the authors' index rule uses.
fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - x.signum()
    } else {
        r
    }
}

/// Iso-CTS. With `r = min(m, n)` and `T` tasks: `c = ⌊r·fraction⌋` common
/// directions, moved so that `r − c` is a multiple of `T` (`r − c =
/// round((r − c)/T)·T`); the common part is the top `c` singular triplets of
/// `Σᵢ Δᵢ`, each task contributes the top `(r − c)/T` triplets of
/// `Δᵢ − U_c U_cᵀ Δᵢ`; the stacked bases are orthogonalised and every singular
/// value replaced by the mean of the kept ones.
pub fn iso_cts(
    tasks: &[ArrayView2<f64>],
    common_space_fraction: f64,
    tensor: &str,
) -> Result<Array2<f64>> {
    if !(0.0..=1.0).contains(&common_space_fraction) {
        return Err(MergeError::param(
            tensor,
            "common_space_fraction",
            format!("{common_space_fraction} is outside [0, 1]"),
        ));
    }
    let (m, n) = tasks[0].dim();
    let r = m.min(n);
    let t = tasks.len();
    let c0 = (r as f64 * common_space_fraction) as usize;
    let specific = round_half_even((r - c0) as f64 / t as f64) as usize * t;
    if specific > r {
        return Err(MergeError::param(
            tensor,
            "common_space_fraction",
            format!(
                "{common_space_fraction} leaves {} directions for {t} tasks of a rank-{r} matrix, \
                 which rounds to more than the rank; use a larger fraction",
                r - c0
            ),
        ));
    }
    let common = r - specific;
    let per_task = specific / t;
    let total = sum(tasks);
    let svd = thin_svd(total.view(), tensor)?;
    let uc = svd.u.slice(s![.., ..common]);
    let mut bu = Array2::<f64>::zeros((m, r));
    let mut bs = vec![0f64; r];
    let mut bv = Array2::<f64>::zeros((r, n));
    for (i, task) in tasks.iter().enumerate() {
        let own = task - &uc.dot(&uc.t().dot(task));
        let ts = thin_svd(own.view(), tensor)?;
        let cols = i * per_task..(i + 1) * per_task;
        bu.slice_mut(s![.., cols.clone()])
            .assign(&ts.u.slice(s![.., ..per_task]));
        bs[cols.clone()].copy_from_slice(&ts.s.as_slice().expect("contiguous")[..per_task]);
        bv.slice_mut(s![cols, ..])
            .assign(&ts.vt.slice(s![..per_task, ..]));
    }
    let at = t * per_task..t * per_task + common;
    bu.slice_mut(s![.., at.clone()]).assign(&uc);
    bs[at.clone()].copy_from_slice(&svd.s.as_slice().expect("contiguous")[..common]);
    bv.slice_mut(s![at, ..])
        .assign(&svd.vt.slice(s![..common, ..]));
    let mean = bs.iter().sum::<f64>() / r as f64;
    Ok(polar(bu.view(), tensor)?.dot(&polar(bv.view(), tensor)?) * mean)
}

/// TSV-M: with `k = ⌊rank/T⌋` (`rank` defaults to `min(m, n)`), task `i`'s top
/// `k` singular triplets fill columns `ik..(i+1)k` of `U`, entries of `σ` and
/// rows of `Vᵀ`; the result is `polar(U) · diag(σ) · polar(Vᵀ)`.
pub fn tsv_m(tasks: &[ArrayView2<f64>], rank: Option<usize>, tensor: &str) -> Result<Array2<f64>> {
    let (m, n) = tasks[0].dim();
    let r = m.min(n);
    let rank = rank.unwrap_or(r);
    if rank == 0 || rank > r {
        return Err(MergeError::param(
            tensor,
            "rank",
            format!("{rank} is outside 1..={r}, the rank of this {m} × {n} tensor"),
        ));
    }
    let t = tasks.len();
    // The authors' `int(r * (1 / T))`, in the same floating-point steps.
    let k = (rank as f64 * (1.0 / t as f64)) as usize;
    let mut bu = Array2::<f64>::zeros((m, r));
    let mut bs = ndarray::Array1::<f64>::zeros(r);
    let mut bv = Array2::<f64>::zeros((r, n));
    for (i, task) in tasks.iter().enumerate() {
        let svd = thin_svd(*task, tensor)?;
        let cols = i * k..(i + 1) * k;
        bu.slice_mut(s![.., cols.clone()])
            .assign(&svd.u.slice(s![.., ..k]));
        bs.slice_mut(s![cols.clone()]).assign(&svd.s.slice(s![..k]));
        bv.slice_mut(s![cols, ..])
            .assign(&svd.vt.slice(s![..k, ..]));
    }
    // polar(U) · diag(σ) as a column scaling, not an r × r product.
    let pu = polar(bu.view(), tensor)? * &bs;
    let pv = polar(bv.view(), tensor)?;
    Ok(pu.dot(&pv))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    fn rand(m: usize, n: usize, seed: u64) -> Array2<f64> {
        let mut r = weights::rng::Rng::new(seed);
        Array2::from_shape_fn((m, n), |_| r.normal())
    }

    #[test]
    fn iso_c_flattens_the_spectrum_of_the_sum() {
        // diag(3, 1) + diag(1, 1) = diag(4, 2): mean 3 → 3·I.
        let a = array![[3.0, 0.0], [0.0, 1.0]];
        let b = array![[1.0, 0.0], [0.0, 1.0]];
        let r = iso_c(&[a.view(), b.view()], "w").unwrap();
        assert!(
            (&r - &(Array2::<f64>::eye(2) * 3.0))
                .iter()
                .all(|v| v.abs() < 1e-12)
        );
        // In general: the singular values of the result are all the mean.
        let (x, y) = (rand(7, 5, 1), rand(7, 5, 2));
        let r = iso_c(&[x.view(), y.view()], "w").unwrap();
        let s = spectra::linalg::thin_svd((&x + &y).view(), "w").unwrap().s;
        let want = s.mean().unwrap();
        for v in spectra::linalg::thin_svd(r.view(), "w").unwrap().s {
            assert!((v - want).abs() < 1e-10, "{v} vs {want}");
        }
    }

    #[test]
    fn tsv_m_of_orthogonal_tasks_is_their_sum() {
        // Tasks living in orthogonal row and column spaces: the stacked bases
        // are already orthonormal, so TSV-M at full rank is task arithmetic.
        let mut a = Array2::<f64>::zeros((4, 4));
        let mut b = Array2::<f64>::zeros((4, 4));
        a[(0, 0)] = 2.0;
        a[(1, 1)] = -1.0;
        b[(2, 3)] = 5.0;
        b[(3, 2)] = 0.5;
        let r = tsv_m(&[a.view(), b.view()], None, "w").unwrap();
        assert!((&r - &(&a + &b)).iter().all(|v| v.abs() < 1e-12), "{r}");
        // Half the rank keeps each task's top singular triplet only.
        let r = tsv_m(&[a.view(), b.view()], Some(2), "w").unwrap();
        let mut want = Array2::<f64>::zeros((4, 4));
        want[(0, 0)] = 2.0;
        want[(2, 3)] = 5.0;
        assert!((&r - &want).iter().all(|v| v.abs() < 1e-12), "{r}");
        assert!(tsv_m(&[a.view(), b.view()], Some(5), "w").is_err());
    }

    #[test]
    fn iso_cts_bases_are_orthonormal_and_the_spectrum_flat() {
        let tasks: Vec<Array2<f64>> = (0..3).map(|i| rand(9, 12, 10 + i)).collect();
        let views: Vec<_> = tasks.iter().map(|t| t.view()).collect();
        let r = iso_cts(&views, 0.8, "w").unwrap();
        let s = spectra::linalg::thin_svd(r.view(), "w").unwrap().s;
        for v in s.iter() {
            assert!((v - s[0]).abs() < 1e-9, "{s}");
        }
        // Full rank 9 (c = 7, (9 − 7)/3 rounds to 1 → 3 task directions, c = 6).
        assert_eq!(s.len(), 9);
        assert!(s[8] > 1e-6);
        assert_eq!(round_half_even(0.5), 0.0);
        assert_eq!(round_half_even(1.5), 2.0);
        assert_eq!(round_half_even(2.5), 2.0);
        assert_eq!(round_half_even(0.67), 1.0);
    }
}
