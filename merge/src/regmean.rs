//! RegMean (Jin et al., ICLR 2023, "Dataless knowledge fusion by merging
//! weights of language models"): per linear layer, the weight whose outputs on
//! every model's inputs are closest to that model's own,
//!
//! `W* = argmin Σᵢ ‖Xᵢ Wᵀ − Xᵢ Wᵢᵀ‖² ⇒ W*ᵀ = (Σᵢ G̃ᵢ)⁻¹ Σᵢ G̃ᵢ Wᵢᵀ`,
//!
//! with `Gᵢ = XᵢᵀXᵢ` the Gram matrix of layer inputs seen by model `i` and
//! `G̃ᵢ` its off-diagonal entries scaled by `alpha` (the paper's α; FusionBench's
//! `reduce_non_diagonal_ratio`; `alpha = 0` is a diagonal-weighted average,
//! `1` the exact solution). Tensors without Gram matrices (norms, embeddings)
//! are averaged. The Gram matrices come from the caller (computed with any
//! framework: this crate stays free of Burn) or, in configs, from one
//! `.safetensors` file per model holding `XᵀX` under each weight's name.

use ndarray::{Array2, ArrayView2};

use crate::{MergeError, Result};

/// Options of [`regmean`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RegMeanOptions {
    /// Scale of the Gram matrices' off-diagonal entries, in `[0, 1]`.
    pub alpha: f64,
    /// Ridge added to the summed Gram matrix's diagonal (0: none; a singular
    /// sum is then an error).
    pub ridge: f64,
}

impl Default for RegMeanOptions {
    fn default() -> Self {
        RegMeanOptions {
            alpha: 1.0,
            ridge: 0.0,
        }
    }
}

/// The RegMean merge of one linear weight: `weights[i]` is model `i`'s
/// `out × in` weight (PyTorch's layout, flat), `grams[i]` its `in × in` Gram
/// matrix. `tensor` names errors.
pub fn regmean(
    weights: &[&[f32]],
    shape: [usize; 2],
    grams: &[ArrayView2<f64>],
    opts: &RegMeanOptions,
    tensor: &str,
) -> Result<Vec<f32>> {
    let [out, inp] = shape;
    if weights.is_empty() || weights.len() != grams.len() {
        return Err(MergeError::Inputs {
            method: "regmean".into(),
            msg: format!(
                "tensor '{tensor}': {} weights and {} Gram matrices",
                weights.len(),
                grams.len()
            ),
        });
    }
    if !(0.0..=1.0).contains(&opts.alpha) {
        return Err(MergeError::param(
            tensor,
            "alpha",
            format!("{} is outside [0, 1]", opts.alpha),
        ));
    }
    for (i, g) in grams.iter().enumerate() {
        if g.dim() != (inp, inp) {
            return Err(MergeError::param(
                tensor,
                "gram",
                format!(
                    "model {}'s Gram matrix is {:?}, the weight {out} × {inp} needs {inp} × {inp}",
                    i + 1,
                    g.shape()
                ),
            ));
        }
    }
    let scaled = |g: &ArrayView2<f64>| {
        let mut s = g.to_owned() * opts.alpha;
        for j in 0..inp {
            s[(j, j)] = g[(j, j)];
        }
        s
    };
    let mut sum = Array2::<f64>::zeros((inp, inp));
    let mut rhs = Array2::<f64>::zeros((inp, out));
    for (w, g) in weights.iter().zip(grams) {
        let g = scaled(g);
        let wt = ArrayView2::from_shape((out, inp), w)
            .map_err(|_| {
                MergeError::param(
                    tensor,
                    "gram",
                    format!("a weight of {} values is not {out} × {inp}", w.len()),
                )
            })?
            .t()
            .mapv(|v| v as f64);
        rhs += &g.dot(&wt);
        sum += &g;
    }
    let merged_t = spectra::linalg::solve_spd(sum.view(), rhs.view(), opts.ridge, tensor)?;
    // Back to out × in.
    Ok(merged_t.t().iter().map(|&v| v as f32).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn equal_grams_give_the_average_and_diagonal_ones_a_weighted_average() {
        let (a, b) = ([1.0f32, 2.0, 3.0, 4.0], [3.0f32, 0.0, -1.0, 2.0]);
        let g = array![[2.0, 0.5], [0.5, 1.0]];
        let r = regmean(
            &[&a, &b],
            [2, 2],
            &[g.view(), g.view()],
            &RegMeanOptions::default(),
            "w",
        )
        .unwrap();
        for (x, y) in r.iter().zip([2.0f32, 1.0, 1.0, 3.0]) {
            assert!((x - y).abs() < 1e-6, "{r:?}");
        }
        // alpha = 0: per input column j, (Σᵢ gᵢⱼ wᵢ[:, j]) / Σᵢ gᵢⱼ.
        let ga = array![[3.0, 9.0], [9.0, 1.0]];
        let gb = array![[1.0, -4.0], [-4.0, 1.0]];
        let opts = RegMeanOptions {
            alpha: 0.0,
            ridge: 0.0,
        };
        let r = regmean(&[&a, &b], [2, 2], &[ga.view(), gb.view()], &opts, "w").unwrap();
        // column 0: (3·1 + 1·3)/4 = 1.5, (3·3 + 1·(−1))/4 = 2; column 1: (2 + 0)/2 = 1, (4 + 2)/2 = 3.
        for (x, y) in r.iter().zip([1.5f32, 1.0, 2.0, 3.0]) {
            assert!((x - y).abs() < 1e-6, "{r:?}");
        }
    }

    #[test]
    fn singular_grams_need_a_ridge_and_bad_shapes_are_named() {
        let a = [1.0f32, 2.0, 3.0, 4.0];
        let g = array![[1.0, 1.0], [1.0, 1.0]];
        let e = regmean(
            &[&a],
            [2, 2],
            &[g.view()],
            &RegMeanOptions::default(),
            "q_proj",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("q_proj") && e.contains("ridge"), "{e}");
        let opts = RegMeanOptions {
            alpha: 1.0,
            ridge: 1e-3,
        };
        assert!(regmean(&[&a], [2, 2], &[g.view()], &opts, "q_proj").is_ok());
        let g3 = Array2::<f64>::eye(3);
        let e = regmean(&[&a], [2, 2], &[g3.view()], &opts, "q_proj")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("q_proj") && e.contains("[3, 3]") && e.contains("gram"),
            "{e}"
        );
    }
}
