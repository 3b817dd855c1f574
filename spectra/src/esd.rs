//! Empirical spectral densities of layer weights.
//!
//! For a weight `W` with `N ≥ M` (the larger and smaller dimension), the ESD
//! is the set of `M` eigenvalues `λᵢ = σᵢ²` of `WᵀW` (σ the singular values of
//! `W`), optionally divided by `N` (`normalize`, i.e. the ESD of the
//! correlation matrix `WᵀW/N`). WeightWatcher's default is **not** to
//! normalise (its `normalize=False`), and so is ours; normalising divides
//! every eigenvalue, `xmin`, norm and spectral norm by `N`, leaves α, the KS
//! distance, stable rank and spike counts unchanged, and shifts the log
//! metrics by `−log10 N`.
//!
//! Convolution kernels `(out, in, kh, kw)` are analysed either as `kh·kw`
//! matrices `out × in`, one per kernel position, whose eigenvalues are pooled
//! into one ESD (WeightWatcher's default), or flattened to
//! `out × (in·kh·kw)`. 1-D convolutions `(out, in, k)` are treated the same way
//! with `kw = 1`.

use ndarray::{Array2, ArrayViewD, Axis, Ix2};
use rayon::prelude::*;

use crate::error::{Result, SpectraError};
use crate::linalg::singular_values;

/// How convolution kernels become matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConvMode {
    /// One `out × in` matrix per kernel position, eigenvalues pooled.
    #[default]
    PerPosition,
    /// One `out × (in·kh·kw)` matrix.
    Flatten,
}

/// The matrices a tensor contributes, or `None` if it is not a weight matrix
/// (fewer than 2 dimensions, more than 4, or a dimension below 2).
pub fn layer_matrices(data: ArrayViewD<'_, f32>, conv: ConvMode) -> Option<Vec<Array2<f32>>> {
    let shape = data.shape().to_vec();
    match shape.len() {
        2 if shape[0] >= 2 && shape[1] >= 2 => {
            Some(vec![data.into_dimensionality::<Ix2>().ok()?.to_owned()])
        }
        3 | 4 if shape[0] >= 2 && shape[1] >= 2 => {
            let (out, inp) = (shape[0], shape[1]);
            let positions: usize = shape[2..].iter().product();
            let flat = data
                .as_standard_layout()
                .into_owned()
                .into_shape_with_order((out, inp, positions))
                .ok()?;
            match conv {
                ConvMode::Flatten => Some(vec![
                    flat.into_shape_with_order((out, inp * positions)).ok()?,
                ]),
                ConvMode::PerPosition => Some(
                    (0..positions)
                        .map(|p| flat.index_axis(Axis(2), p).to_owned())
                        .collect(),
                ),
            }
        }
        _ => None,
    }
}

/// An empirical spectral density.
#[derive(Debug, Clone, PartialEq)]
pub struct Esd {
    /// Eigenvalues `σ²` (÷ N when normalised), ascending.
    pub evals: Vec<f64>,
    /// The larger matrix dimension.
    pub n: usize,
    /// The smaller matrix dimension (eigenvalues per matrix).
    pub m: usize,
    /// How many matrices were pooled.
    pub num_matrices: usize,
    /// The largest singular value over the pooled matrices.
    pub sv_max: f64,
}

impl Esd {
    /// `N / M ≥ 1`.
    pub fn aspect_ratio(&self) -> f64 {
        self.n as f64 / self.m as f64
    }
}

/// The pooled ESD of `mats` (all of one shape), computed in parallel.
pub fn esd(mats: &[Array2<f32>], normalize: bool, name: &str) -> Result<Esd> {
    let first = mats.first().ok_or_else(|| SpectraError::Empty {
        name: name.to_string(),
        shape: vec![],
    })?;
    let (r, c) = first.dim();
    if mats.iter().any(|m| m.dim() != (r, c)) {
        return Err(SpectraError::Shape {
            name: name.to_string(),
            msg: "matrices of an ESD must share one shape".into(),
        });
    }
    let (n, m) = (r.max(c), r.min(c));
    let svs: Vec<Vec<f32>> = mats
        .par_iter()
        .map(|w| singular_values(w.view(), name))
        .collect::<Result<_>>()?;
    let scale = if normalize { 1.0 / n as f64 } else { 1.0 };
    let sv_max = svs.iter().flatten().fold(0f64, |a, &s| a.max(s as f64));
    let mut evals: Vec<f64> = svs
        .into_iter()
        .flatten()
        .map(|s| (s as f64) * (s as f64) * scale)
        .collect();
    evals.sort_by(|a, b| a.total_cmp(b));
    Ok(Esd {
        evals,
        n,
        m,
        num_matrices: mats.len(),
        sv_max,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{ArrayD, IxDyn};

    #[test]
    fn conv_kernels_become_per_position_or_flat_matrices() {
        let k = ArrayD::from_shape_fn(IxDyn(&[4, 3, 2, 2]), |i| {
            (i[0] * 100 + i[1] * 10 + i[2] * 2 + i[3]) as f32
        });
        let per = layer_matrices(k.view(), ConvMode::PerPosition).unwrap();
        assert_eq!(per.len(), 4);
        assert_eq!(per[0].dim(), (4, 3));
        assert_eq!(per[3][[2, 1]], (200 + 10 + 3) as f32); // position (1,1) = 3
        let flat = layer_matrices(k.view(), ConvMode::Flatten).unwrap();
        assert_eq!(flat[0].dim(), (4, 12));
        assert_eq!(flat[0][[1, 5]], (100 + 10 + 1) as f32); // in 1, position 1
        assert!(layer_matrices(ArrayD::zeros(IxDyn(&[5])).view(), ConvMode::Flatten).is_none());
        assert!(layer_matrices(ArrayD::zeros(IxDyn(&[1, 5])).view(), ConvMode::Flatten).is_none());
    }

    #[test]
    fn esd_is_squared_singular_values_optionally_over_n() {
        let w = Array2::from_shape_vec((3, 2), vec![3.0f32, 0.0, 0.0, 4.0, 0.0, 0.0]).unwrap();
        let e = esd(std::slice::from_ref(&w), false, "w").unwrap();
        assert_eq!(e.evals, vec![9.0, 16.0]);
        assert_eq!((e.n, e.m), (3, 2));
        let e = esd(&[w], true, "w").unwrap();
        assert_eq!(e.evals, vec![3.0, 16.0 / 3.0]);
    }
}
