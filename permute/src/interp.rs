//! Linear interpolation between checkpoints and loss barriers.
//!
//! `θ(λ) = (1 − λ)·θ_A + λ·θ_B`. For a loss curve `L(λ)` on a grid of `λ`
//! (default 25 points from 0 to 1), two barrier definitions are in use:
//!
//! - Frankle et al. / Entezari et al.: `max_λ L(λ) − ((1 − λ)L(0) + λL(1))`
//!   (height above the straight line between the endpoints);
//! - Git Re-Basin: `max_λ L(λ) − ½(L(0) + L(1))`.

use serde::Serialize;
use weights::{StateDict, Tensor};

use crate::error::{PermuteError, Result};

/// Every tensor of `a` with B's tensor of the same name, which must exist
/// with the same shape (errors name the tensor).
pub(crate) fn paired<'a>(
    a: &'a StateDict,
    b: &'a StateDict,
) -> Result<Vec<(&'a str, &'a Tensor, &'a Tensor)>> {
    a.iter()
        .map(|(name, ta)| {
            let tb = b.get(name).ok_or_else(|| PermuteError::MissingWeight {
                model: "model B".into(),
                weight: name.to_string(),
            })?;
            if ta.shape() != tb.shape() {
                return Err(PermuteError::ShapeMismatch {
                    weight: name.to_string(),
                    a: ta.shape().to_vec(),
                    b: tb.shape().to_vec(),
                });
            }
            Ok((name, ta, tb))
        })
        .collect()
}

/// `(1 − λ)·a + λ·b` over every tensor; both models must have the same names
/// and shapes. Tensors stored as integers (counters, ids) must be equal and are copied.
pub fn lerp(a: &StateDict, b: &StateDict, lambda: f32) -> Result<StateDict> {
    if a.len() != b.len() {
        return Err(PermuteError::Shape {
            what: "lerp".into(),
            msg: format!("models have {} and {} tensors", a.len(), b.len()),
        });
    }
    let mut out = StateDict::new();
    out.metadata = a.metadata.clone();
    for (name, ta, tb) in paired(a, b)? {
        let data = if ta.dtype.is_float() {
            &ta.data * (1.0 - lambda) + &tb.data * lambda
        } else if ta.data == tb.data {
            ta.data.clone()
        } else {
            return Err(PermuteError::Shape {
                what: format!("lerp '{name}'"),
                msg: format!("integer tensor ({}) differs between the models", ta.dtype),
            });
        };
        out.insert(name, Tensor::new(data, ta.dtype));
    }
    Ok(out)
}

/// `n ≥ 2` evenly spaced values from 0 to 1.
pub fn lambda_grid(n: usize) -> Vec<f64> {
    let n = n.max(2);
    (0..n).map(|i| i as f64 / (n - 1) as f64).collect()
}

/// A loss curve along the interpolation path and its barriers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Barrier {
    /// The interpolation weights `λ`, ascending from 0 (model A) to 1 (model B).
    pub lambdas: Vec<f64>,
    /// The loss `L(λ)` at each of `lambdas`.
    pub losses: Vec<f64>,
    /// `max_λ L(λ) − ((1 − λ)L(0) + λL(1))`.
    pub barrier_linear: f64,
    /// `max_λ L(λ) − ½(L(0) + L(1))`.
    pub barrier_mean: f64,
    /// The `λ` of the linear-barrier maximum.
    pub argmax: f64,
}

/// Barriers of a given curve (`lambdas` ascending from 0 to 1).
pub fn barrier_of_curve(lambdas: &[f64], losses: &[f64]) -> Result<Barrier> {
    if lambdas.len() != losses.len() || lambdas.len() < 2 {
        return Err(PermuteError::Shape {
            what: "barrier".into(),
            msg: format!(
                "{} lambdas for {} losses (need ≥ 2)",
                lambdas.len(),
                losses.len()
            ),
        });
    }
    if let Some(l) = losses.iter().find(|l| !l.is_finite()) {
        return Err(PermuteError::NonFinite {
            what: "barrier".into(),
            msg: format!("loss {l}"),
        });
    }
    let (l0, l1) = (losses[0], losses[losses.len() - 1]);
    let mut best = (f64::NEG_INFINITY, 0.0);
    for (&lam, &l) in lambdas.iter().zip(losses) {
        let h = l - ((1.0 - lam) * l0 + lam * l1);
        if h > best.0 {
            best = (h, lam);
        }
    }
    let max = losses.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Ok(Barrier {
        lambdas: lambdas.to_vec(),
        losses: losses.to_vec(),
        barrier_linear: best.0,
        barrier_mean: max - 0.5 * (l0 + l1),
        argmax: best.1,
    })
}

/// Evaluates `loss` on `lerp(a, b, λ)` over a `grid`-point λ grid and returns the barriers.
pub fn barrier(
    a: &StateDict,
    b: &StateDict,
    grid: usize,
    mut loss: impl FnMut(&StateDict) -> f64,
) -> Result<Barrier> {
    let lambdas = lambda_grid(grid);
    let mut losses = Vec::with_capacity(lambdas.len());
    for &lam in &lambdas {
        losses.push(loss(&lerp(a, b, lam as f32)?));
    }
    barrier_of_curve(&lambdas, &losses)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{ArrayD, IxDyn};
    use weights::DType;

    #[test]
    fn barriers_by_hand() {
        // L = 1, 3, 2 at λ = 0, ½, 1: line at ½ is 1.5 -> 1.5; mean 1.5 -> 1.5.
        let b = barrier_of_curve(&[0.0, 0.5, 1.0], &[1.0, 3.0, 2.0]).unwrap();
        assert_eq!(
            (b.barrier_linear, b.barrier_mean, b.argmax),
            (1.5, 1.5, 0.5)
        );
        // Convex curve: no barrier (the endpoints give 0).
        let b = barrier_of_curve(&[0.0, 0.5, 1.0], &[2.0, 0.5, 1.0]).unwrap();
        assert_eq!(b.barrier_linear, 0.0);
        assert_eq!(b.barrier_mean, 2.0 - 1.5);
        assert!(barrier_of_curve(&[0.0, 1.0], &[1.0, f64::NAN]).is_err());
        assert_eq!(lambda_grid(25).len(), 25);
        assert_eq!(lambda_grid(5), vec![0.0, 0.25, 0.5, 0.75, 1.0]);
    }

    #[test]
    fn lerp_and_quadratic_loss() {
        let mut a = StateDict::new();
        let mut b = StateDict::new();
        a.insert("w", Tensor::f32(ArrayD::from_elem(IxDyn(&[2]), 0.0)));
        b.insert("w", Tensor::f32(ArrayD::from_elem(IxDyn(&[2]), 2.0)));
        a.insert(
            "step",
            Tensor::new(ArrayD::from_elem(IxDyn(&[1]), 3.0), DType::I64),
        );
        b.insert(
            "step",
            Tensor::new(ArrayD::from_elem(IxDyn(&[1]), 3.0), DType::I64),
        );
        let mid = lerp(&a, &b, 0.25).unwrap();
        assert_eq!(mid.get("w").unwrap().data[[0]], 0.5);
        // L(w) = (w0 - 1)^2 * -1 + 1: peaks at the midpoint with height 1.
        let res = barrier(&a, &b, 25, |m| {
            1.0 - (m.get("w").unwrap().data[[0]] as f64 - 1.0).powi(2)
        })
        .unwrap();
        assert!((res.barrier_linear - 1.0).abs() < 1e-12 && (res.argmax - 0.5).abs() < 1e-12);
        b.get_mut("step").unwrap().data[[0]] = 4.0;
        assert!(lerp(&a, &b, 0.5).is_err());
    }
}
