//! Singular-vector alignment between two models' weights (the analysis of
//! Ito, Yamada & Kumagai, "Analysis of linear mode connectivity via
//! permutation-based weight matching", 2024).
//!
//! For matrices `A` and `B` (`m × n`) and optional permutations `p` of rows and
//! `q` of columns, `B' = P B Qᵀ` with `B'[i, j] = B[p[i], q[j]]` (the way
//! weight matching maps model B onto model A). With thin SVDs
//! `A = Σ σᵢ uᵢ vᵢᵀ` and `B' = Σ σ'ᵢ u'ᵢ v'ᵢᵀ` (descending):
//!
//! - (a) `sv_max_rel_diff = maxᵢ |σᵢ(B) − σᵢ(B')| / σ₁(B)`: permutations are
//!   orthogonal, so this is zero up to rounding;
//! - (b) `u_overlap[i][j] = |uᵢ · u'ⱼ|`, `v_overlap[i][j] = |vᵢ · v'ⱼ|` for the
//!   top `k` vectors (absolute values: singular vectors have arbitrary signs);
//! - (c) the diagonal alignment `aᵢ = |uᵢ · u'ᵢ| · |vᵢ · v'ᵢ|` and the score
//!   `S = Σ_{i<k} σᵢ aᵢ / Σ_{i<k} σᵢ` (weighted by A's singular values; 1 when
//!   `B' = A` with distinct singular values, about `1/√(mn)` per term for
//!   independent matrices);
//! - the thresholded score `R(γ) = Σ_{i∈I} σᵢ aᵢ / Σ_{i∈I} σᵢ` over
//!   `I = {i : σᵢ ≥ γ·σ₁}` (all components when `γ = 0`).

use ndarray::{Array2, ArrayView2};
use serde::Serialize;

use crate::error::{Result, SpectraError};
use crate::linalg::{Svd, thin_svd};

/// The result of [`singular_vector_alignment`].
#[derive(Debug, Clone, Serialize)]
pub struct Alignment {
    /// (a) largest change of B's singular values under the permutation, relative to σ₁(B).
    pub sv_max_rel_diff: f64,
    /// (b) `|uᵢ · u'ⱼ|` for `i, j < k`.
    pub u_overlap: Vec<Vec<f64>>,
    /// (b) `|vᵢ · v'ⱼ|` for `i, j < k`.
    pub v_overlap: Vec<Vec<f64>>,
    /// (c) `aᵢ = |uᵢ · u'ᵢ| · |vᵢ · v'ᵢ|` for every component.
    pub diagonal: Vec<f64>,
    /// A's singular values.
    pub singular_values: Vec<f64>,
    /// (c) `S` over the top `k`.
    pub score: f64,
    /// `(γ, R(γ))` for each requested γ.
    pub thresholded: Vec<(f64, f64)>,
}

fn check_perm(p: &[usize], n: usize, what: &str) -> Result<()> {
    let mut seen = vec![false; n];
    if p.len() != n
        || p.iter()
            .any(|&i| i >= n || std::mem::replace(&mut seen[i], true))
    {
        return Err(SpectraError::Shape {
            name: what.to_string(),
            msg: format!("not a permutation of 0..{n}"),
        });
    }
    Ok(())
}

/// Applies row permutation `p` and column permutation `q`: `out[i, j] = b[p[i], q[j]]`.
pub fn permute_matrix(
    b: ArrayView2<'_, f32>,
    p: Option<&[usize]>,
    q: Option<&[usize]>,
) -> Result<Array2<f32>> {
    let (m, n) = b.dim();
    if let Some(p) = p {
        check_perm(p, m, "row permutation")?;
    }
    if let Some(q) = q {
        check_perm(q, n, "column permutation")?;
    }
    Ok(Array2::from_shape_fn((m, n), |(i, j)| {
        b[[p.map_or(i, |p| p[i]), q.map_or(j, |q| q[j])]]
    }))
}

/// Compares the singular vectors of `a` and of `b` permuted by `p`, `q`.
pub fn singular_vector_alignment(
    a: ArrayView2<'_, f32>,
    b: ArrayView2<'_, f32>,
    p: Option<&[usize]>,
    q: Option<&[usize]>,
    k: usize,
    gammas: &[f64],
) -> Result<Alignment> {
    if a.dim() != b.dim() {
        return Err(SpectraError::Shape {
            name: "alignment".into(),
            msg: format!("shapes differ: {:?} vs {:?}", a.shape(), b.shape()),
        });
    }
    let to64 = |x: ArrayView2<'_, f32>| x.mapv(|v| v as f64);
    let bp = permute_matrix(b, p, q)?;
    let sa = thin_svd(to64(a).view(), "A")?;
    let sb = thin_svd(to64(bp.view()).view(), "B permuted")?;
    let s_orig = crate::linalg::singular_values(to64(b).view(), "B")?;
    let top = s_orig[0].max(f64::MIN_POSITIVE);
    let sv_max_rel_diff = s_orig
        .iter()
        .zip(sb.s.iter())
        .map(|(x, y)| (x - y).abs() / top)
        .fold(0.0, f64::max);
    let r = sa.s.len();
    let k = k.min(r);
    let dot_u = |i: usize, j: usize| sa.u.column(i).dot(&sb.u.column(j)).abs();
    let dot_v = |i: usize, j: usize| sa.vt.row(i).dot(&sb.vt.row(j)).abs();
    let u_overlap = (0..k)
        .map(|i| (0..k).map(|j| dot_u(i, j)).collect())
        .collect();
    let v_overlap = (0..k)
        .map(|i| (0..k).map(|j| dot_v(i, j)).collect())
        .collect();
    let diagonal: Vec<f64> = (0..r).map(|i| dot_u(i, i) * dot_v(i, i)).collect();
    let weighted = |idx: &mut dyn Iterator<Item = usize>| {
        let (mut num, mut den) = (0.0, 0.0);
        for i in idx {
            num += sa.s[i] * diagonal[i];
            den += sa.s[i];
        }
        if den > 0.0 { num / den } else { 0.0 }
    };
    let score = weighted(&mut (0..k));
    let smax = sa.s[0];
    let thresholded = gammas
        .iter()
        .map(|&g| (g, weighted(&mut (0..r).filter(|&i| sa.s[i] >= g * smax))))
        .collect();
    Ok(Alignment {
        sv_max_rel_diff,
        u_overlap,
        v_overlap,
        diagonal,
        singular_values: sa.s.to_vec(),
        score,
        thresholded,
    })
}

/// Overlap of the top-`k` singular subspaces of two matrices of one shape,
/// from their thin SVDs: the mean of `‖U_aᵀ U_b‖²_F / k` (left) and
/// `‖V_aᵀ V_b‖²_F / k` (right), with `U_a` the first `k` left singular vectors
/// of `a`. 1 when the two spans coincide, 0 when they are orthogonal, about
/// `k / m` (left) and `k / n` (right) for independent random matrices; sign
/// and rotation within a span do not change it. `k` is capped by both ranks
/// (at least 1). The alignment measure of Ito et al. applied to the spans,
/// so that it compares task vectors whose singular values are not distinct.
pub fn subspace_overlap(a: &Svd<f64>, b: &Svd<f64>, k: usize) -> Result<f64> {
    if a.u.nrows() != b.u.nrows() || a.vt.ncols() != b.vt.ncols() {
        return Err(SpectraError::Shape {
            name: "subspace overlap".into(),
            msg: format!(
                "shapes differ: {}×{} vs {}×{}",
                a.u.nrows(),
                a.vt.ncols(),
                b.u.nrows(),
                b.vt.ncols()
            ),
        });
    }
    let k = k.min(a.s.len()).min(b.s.len()).max(1);
    let (ua, ub) = (
        a.u.slice(ndarray::s![.., ..k]),
        b.u.slice(ndarray::s![.., ..k]),
    );
    let (va, vb) = (
        a.vt.slice(ndarray::s![..k, ..]),
        b.vt.slice(ndarray::s![..k, ..]),
    );
    let fro2 = |m: Array2<f64>| m.iter().map(|x| x * x).sum::<f64>();
    let left = fro2(ua.t().dot(&ub)) / k as f64;
    let right = fro2(va.dot(&vb.t())) / k as f64;
    Ok((left + right) / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use weights::rng::Rng;

    fn random_perm(n: usize, seed: u64) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        Rng::new(seed).shuffle(&mut p);
        p
    }

    #[test]
    fn a_matrix_aligns_perfectly_with_its_own_permutation() {
        let a = Rng::new(1).normal_array((60, 40));
        let (p, q) = (random_perm(60, 2), random_perm(40, 3));
        // b is a with rows/columns scrambled; passing the inverse maps it back.
        let mut b = Array2::zeros((60, 40));
        for i in 0..60 {
            for j in 0..40 {
                b[[p[i], q[j]]] = a[[i, j]];
            }
        }
        let al = singular_vector_alignment(a.view(), b.view(), Some(&p), Some(&q), 10, &[0.0, 0.3])
            .unwrap();
        assert!(al.sv_max_rel_diff < 1e-6, "{}", al.sv_max_rel_diff);
        assert!((al.score - 1.0).abs() < 1e-6, "{}", al.score);
        for (g, r) in &al.thresholded {
            assert!((r - 1.0).abs() < 1e-6, "R({g}) = {r}");
        }
        assert!((al.u_overlap[3][3] - 1.0).abs() < 1e-6 && al.u_overlap[3][4] < 1e-4);
        // Without the permutation, the vectors do not align.
        let none = singular_vector_alignment(a.view(), b.view(), None, None, 10, &[0.0]).unwrap();
        assert!(
            none.sv_max_rel_diff < 1e-6,
            "singular values are permutation invariant"
        );
        assert!(none.score < 0.1, "{}", none.score);
    }

    #[test]
    fn independent_matrices_score_near_zero() {
        let a = Rng::new(4).normal_array((100, 80));
        let b = Rng::new(5).normal_array((100, 80));
        let al =
            singular_vector_alignment(a.view(), b.view(), None, None, 20, &[0.0, 0.3]).unwrap();
        assert!(al.score < 0.05, "{}", al.score);
        assert!(al.thresholded.iter().all(|(_, r)| *r < 0.05));
    }

    #[test]
    fn bad_permutations_and_shapes_are_errors() {
        let a = Rng::new(1).normal_array((4, 3));
        assert!(
            singular_vector_alignment(a.view(), a.view(), Some(&[0, 1, 1, 2]), None, 2, &[])
                .is_err()
        );
        assert!(
            singular_vector_alignment(a.view(), a.view(), None, Some(&[0, 1]), 2, &[]).is_err()
        );
        let b = Rng::new(1).normal_array((3, 4));
        assert!(singular_vector_alignment(a.view(), b.view(), None, None, 2, &[]).is_err());
    }

    #[test]
    fn subspace_overlap_is_one_for_one_span_zero_for_orthogonal_and_cos2_for_a_rotation() {
        let svd = |m: &Array2<f64>| thin_svd(m.view(), "m").unwrap();
        // Rank-1 matrices u vᵀ in 2-D: rotating u by θ (v kept) gives a left
        // overlap of cos²θ and a right overlap of 1.
        let theta = 0.3f64;
        let a = ndarray::array![[1.0, 0.0], [0.0, 0.0]];
        let b = ndarray::array![[theta.cos(), 0.0], [theta.sin(), 0.0]] * 5.0;
        let want = (theta.cos().powi(2) + 1.0) / 2.0;
        let got = subspace_overlap(&svd(&a), &svd(&b), 1).unwrap();
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        // Orthogonal spans on both sides.
        let c = ndarray::array![[0.0, 0.0], [0.0, 2.0]];
        assert!(subspace_overlap(&svd(&a), &svd(&c), 1).unwrap() < 1e-12);
        // A matrix and a scaled, sign-flipped copy share every top-k span.
        let g = Rng::new(7).normal_array((30, 20)).mapv(f64::from);
        let h = &g * -3.0;
        assert!((subspace_overlap(&svd(&g), &svd(&h), 5).unwrap() - 1.0).abs() < 1e-9);
        // Independent matrices: about k/m and k/n.
        let r = Rng::new(8).normal_array((30, 20)).mapv(f64::from);
        let o = subspace_overlap(&svd(&g), &svd(&r), 5).unwrap();
        assert!(o < 0.5, "{o}");
        // Different shapes are an error.
        assert!(subspace_overlap(&svd(&a), &svd(&g), 1).is_err());
    }
}
