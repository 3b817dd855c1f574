//! WeLore rank selection (Jaiswal et al., "From GaLore to WeLore: how
//! low-rank weights non-uniformly emerge from low-rank gradients", 2024).
//!
//! Each layer's singular values are min–max normalised,
//! `s̃ᵢ = (sᵢ − s_min)/(s_max − s_min)`; one global threshold `t`, chosen from
//! the target overall rank reduction by WeLore's table
//! (10 % → 0.0225, 20 % → 0.084, 30 % → 0.115, 40 % → 0.145, 50 % → 0.175,
//! 60 % → 0.215, 70 % → 0.26; linear in between), keeps in every layer the
//! `k = #{i : s̃ᵢ ≥ t}` largest components. Layers whose rank reduction
//! `1 − k/min(m, n)` exceeds `min_reduction` become low-rank components
//! (stored as factors `A = U_k √S_k`, `B = √S_k V_kᵀ`, `W ≈ A·B`); the
//! others stay dense.

use ndarray::{Array2, ArrayView2, Axis};
use serde::{Deserialize, Serialize};

use crate::error::{Result, SpectraError};
use crate::linalg::{Scalar, thin_svd};

/// WeLore's table: target rank reduction → threshold on normalised singular values.
pub const WELORE_THRESHOLDS: [(f64, f64); 7] = [
    (0.10, 0.0225),
    (0.20, 0.084),
    (0.30, 0.115),
    (0.40, 0.145),
    (0.50, 0.175),
    (0.60, 0.215),
    (0.70, 0.26),
];

/// The threshold for a target reduction in `[0.1, 0.7]` (table entries
/// exactly, linear interpolation between them).
pub fn welore_threshold(target_reduction: f64) -> Result<f64> {
    let (first, last) = (WELORE_THRESHOLDS[0], WELORE_THRESHOLDS[6]);
    if !(first.0 - 1e-12..=last.0 + 1e-12).contains(&target_reduction) {
        return Err(SpectraError::Option {
            option: "target_reduction",
            msg: format!("{target_reduction} is outside WeLore's table [0.1, 0.7]"),
        });
    }
    for w in WELORE_THRESHOLDS.windows(2) {
        let ((r0, t0), (r1, t1)) = (w[0], w[1]);
        if target_reduction <= r1 + 1e-12 {
            let f = ((target_reduction - r0) / (r1 - r0)).clamp(0.0, 1.0);
            return Ok(t0 + f * (t1 - t0));
        }
    }
    Ok(last.1)
}

/// How many singular values (any order) reach `threshold` after min–max normalisation.
/// All-equal singular values keep full rank.
pub fn welore_rank(singular_values: &[f64], threshold: f64) -> usize {
    let lo = singular_values
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min);
    let hi = singular_values
        .iter()
        .copied()
        .fold(f64::NEG_INFINITY, f64::max);
    if hi.partial_cmp(&lo) != Some(std::cmp::Ordering::Greater) {
        return singular_values.len();
    }
    singular_values
        .iter()
        .filter(|&&s| (s - lo) / (hi - lo) >= threshold)
        .count()
}

/// One layer of a WeLore plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeloreLayer {
    /// Layer (tensor) name, as given to [`welore_plan`].
    pub name: String,
    /// Tensor shape, as given to [`welore_plan`].
    pub shape: Vec<usize>,
    /// `min(m, n)`.
    pub full_rank: usize,
    /// Components kept.
    pub rank: usize,
    /// `1 − rank/full_rank`.
    pub reduction: f64,
    /// Whether the layer becomes a low-rank component (factors) rather than staying dense.
    pub low_rank: bool,
}

/// A WeLore plan for layers given as `(name, shape, singular values)`.
pub fn welore_plan(
    layers: &[(String, Vec<usize>, Vec<f64>)],
    target_reduction: f64,
    min_reduction: f64,
) -> Result<Vec<WeloreLayer>> {
    let t = welore_threshold(target_reduction)?;
    Ok(layers
        .iter()
        .map(|(name, shape, sv)| {
            let full = sv.len();
            let rank = welore_rank(sv, t).max(1);
            let reduction = 1.0 - rank as f64 / full as f64;
            WeloreLayer {
                name: name.clone(),
                shape: shape.clone(),
                full_rank: full,
                rank,
                reduction,
                low_rank: reduction > min_reduction,
            }
        })
        .collect())
}

/// Low-rank factors of a layer.
#[derive(Debug, Clone)]
pub struct LowRankFactors<T> {
    /// `U_k √S_k`, shape `m × k`.
    pub a: Array2<T>,
    /// `√S_k V_kᵀ`, shape `k × n`.
    pub b: Array2<T>,
    /// `‖W − A·B‖_F / ‖W‖_F`.
    pub relative_error: f64,
}

/// The rank-`k` factors `A = U_k √S_k`, `B = √S_k V_kᵀ` of `w` and their error.
pub fn low_rank_factors<T: Scalar + ndarray::LinalgScalar>(
    w: ArrayView2<'_, T>,
    k: usize,
    name: &str,
) -> Result<LowRankFactors<T>> {
    let svd = thin_svd(w, name)?;
    if k == 0 || k > svd.s.len() {
        return Err(SpectraError::Option {
            option: "rank",
            msg: format!("{name}: rank {k} not in 1..={}", svd.s.len()),
        });
    }
    let root: Vec<T> = svd
        .s
        .iter()
        .take(k)
        .map(|s| T::of_f64(s.as_f64().sqrt()))
        .collect();
    let mut a = svd.u.slice_axis(Axis(1), (0..k).into()).to_owned();
    for (mut col, r) in a.columns_mut().into_iter().zip(&root) {
        col.mapv_inplace(|x| x * *r);
    }
    let mut b = svd.vt.slice_axis(Axis(0), (0..k).into()).to_owned();
    for (mut row, r) in b.rows_mut().into_iter().zip(&root) {
        row.mapv_inplace(|x| x * *r);
    }
    let rec = a.dot(&b);
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in w.iter().zip(rec.iter()) {
        num += (x.as_f64() - y.as_f64()).powi(2);
        den += x.as_f64().powi(2);
    }
    Ok(LowRankFactors {
        a,
        b,
        relative_error: if den > 0.0 { (num / den).sqrt() } else { 0.0 },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use weights::rng::Rng;

    #[test]
    fn thresholds_from_the_table() {
        assert_eq!(welore_threshold(0.5).unwrap(), 0.175);
        assert_eq!(welore_threshold(0.1).unwrap(), 0.0225);
        assert!((welore_threshold(0.25).unwrap() - 0.0995).abs() < 1e-12);
        assert!(welore_threshold(0.8).is_err());
        assert!(welore_threshold(f64::NAN).is_err());
    }

    #[test]
    fn ranks_count_normalised_values_above_threshold() {
        // normalised: 1, 0.5, 0.2, 0.1, 0
        let sv = [11.0, 6.0, 3.0, 2.0, 1.0];
        assert_eq!(welore_rank(&sv, 0.175), 3);
        assert_eq!(welore_rank(&sv, 0.6), 1);
        assert_eq!(welore_rank(&[2.0, 2.0], 0.5), 2);
        let plan = welore_plan(
            &[
                ("a".into(), vec![5, 5], sv.to_vec()),
                ("b".into(), vec![5, 5], vec![5.0, 4.9, 4.8, 4.7, 1.0]),
            ],
            0.5,
            0.5,
        )
        .unwrap();
        assert_eq!((plan[0].rank, plan[0].low_rank), (3, false));
        assert!((plan[0].reduction - 0.4).abs() < 1e-12);
        assert_eq!((plan[1].rank, plan[1].low_rank), (4, false));
        let plan = welore_plan(&[("a".into(), vec![5, 5], sv.to_vec())], 0.7, 0.3).unwrap();
        assert!(plan[0].low_rank && plan[0].rank == 2);
    }

    #[test]
    fn factors_reconstruct_low_rank_matrices_exactly() {
        let mut rng = Rng::new(2);
        let u = Array2::from_shape_fn((30, 3), |_| rng.normal());
        let v = Array2::from_shape_fn((3, 20), |_| rng.normal());
        let w = u.dot(&v);
        let f = low_rank_factors(w.view(), 3, "w").unwrap();
        assert_eq!((f.a.dim(), f.b.dim()), ((30, 3), (3, 20)));
        assert!(f.relative_error < 1e-12, "{}", f.relative_error);
        let f2 = low_rank_factors(w.view(), 2, "w").unwrap();
        assert!(f2.relative_error > 0.01);
        assert!(low_rank_factors(w.view(), 21, "w").is_err());
    }
}
