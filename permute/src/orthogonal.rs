//! Orthogonal alignment of a LLaMA's residual stream (the wider symmetry
//! class of "Generalized Linear Mode Connectivity for Transformers", 2025,
//! and SliceGPT's computational invariance).
//!
//! RMSNorm divides by the root mean square, which an orthogonal map `Q`
//! keeps: `rms(Q·x) = rms(x)`. Its elementwise gain does not commute with
//! `Q`, so the gains are first folded into the linear layers that read the
//! normalised stream ([`fold_rms_norms`]: q/k/v, gate/up, lm_head columns
//! scaled, gains set to one). Then every weight that writes the residual
//! stream (embeddings, o_proj, down_proj) maps its outputs by `Q` and every
//! weight that reads it (q/k/v, gate/up, lm_head) its inputs by `Qᵀ`
//! ([`rotate_residual`]): the function is unchanged for any orthogonal `Q`,
//! a permutation being one case. [`residual_procrustes`] finds the `Q` that
//! brings one model's residual weights closest to another's (orthogonal
//! Procrustes, `Q = U·Vᵀ` from the SVD of `Σ A·Bᵀ`).

use ndarray::{Array2, ArrayView2, Axis};
use weights::llama::names;
use weights::{LlamaConfig, StateDict, Tensor};

use crate::error::{PermuteError, Result};

/// The residual-stream weights of a LLaMA and the axis that indexes the
/// stream in each: 1 for the readers (embeddings' columns, q/k/v, gate/up,
/// lm_head), 0 for the writers (o_proj, down_proj).
fn residual_weights(c: &LlamaConfig, sd: &StateDict) -> Vec<(String, usize)> {
    let mut out = vec![(names::EMBED.to_string(), 1)];
    for l in 0..c.num_hidden_layers {
        for part in names::PROJS {
            let writes = part == names::O_PROJ || part == names::DOWN_PROJ;
            out.push((names::weight(l, part), usize::from(!writes)));
        }
    }
    if sd.contains(names::LM_HEAD) {
        out.push((names::LM_HEAD.to_string(), 1));
    }
    out
}

/// The RMSNorm gains of a LLaMA, each with the weights that read its output.
fn norms(c: &LlamaConfig) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for l in 0..c.num_hidden_layers {
        let readers = |parts: &[&str]| parts.iter().map(|p| names::weight(l, p)).collect();
        out.push((
            names::weight(l, names::INPUT_NORM),
            readers(&[names::Q_PROJ, names::K_PROJ, names::V_PROJ]),
        ));
        out.push((
            names::weight(l, names::POST_ATTENTION_NORM),
            readers(&[names::GATE_PROJ, names::UP_PROJ]),
        ));
    }
    out.push((names::NORM.to_string(), vec![names::LM_HEAD.to_string()]));
    out
}

fn matrix(sd: &StateDict, name: &str, hidden: usize, axis: usize) -> Result<Array2<f32>> {
    let t = sd.get(name).ok_or_else(|| PermuteError::MissingWeight {
        model: "llama".into(),
        weight: name.into(),
    })?;
    let shape = t.shape();
    if shape.len() != 2 || shape[axis] != hidden {
        return Err(PermuteError::GroupSize {
            weight: name.into(),
            axis,
            group: "residual".into(),
            expected: hidden,
            actual: shape.get(axis).copied().unwrap_or(0),
        });
    }
    let data = t.data.clone().into_dimensionality().expect("2-D");
    Ok(data)
}

/// A copy of `sd` with every RMSNorm gain folded into the weights that read
/// the normalised stream (their input columns scaled by it) and set to one:
/// the same function, ready for [`rotate_residual`]. Tied embeddings are
/// refused: the final norm's gain would have to change the embeddings too.
pub fn fold_rms_norms(c: &LlamaConfig, sd: &StateDict) -> Result<StateDict> {
    if !sd.contains(names::LM_HEAD) {
        return Err(PermuteError::InvalidSpec(
            "folding RMSNorm gains needs an untied lm_head (this checkpoint ties it to the embeddings)".into(),
        ));
    }
    let mut out = sd.clone();
    let hidden = c.hidden_size;
    for (norm, readers) in norms(c) {
        let g = sd.get(&norm).ok_or_else(|| PermuteError::MissingWeight {
            model: "llama".into(),
            weight: norm.clone(),
        })?;
        if g.shape() != [hidden] {
            return Err(PermuteError::GroupSize {
                weight: norm,
                axis: 0,
                group: "residual".into(),
                expected: hidden,
                actual: g.shape().first().copied().unwrap_or(0),
            });
        }
        let gain: Vec<f32> = g.data.iter().copied().collect();
        for r in readers {
            let mut w = matrix(sd, &r, hidden, 1)?;
            for mut row in w.rows_mut() {
                row.iter_mut().zip(&gain).for_each(|(v, g)| *v *= g);
            }
            out.insert(r, Tensor::f32(w.into_dyn()));
        }
        out.insert(
            norm,
            Tensor::f32(ndarray::Array1::<f32>::ones(hidden).into_dyn()),
        );
    }
    Ok(out)
}

/// `q` checked as a `hidden × hidden` orthogonal matrix (to 1e-6).
fn check_orthogonal(q: ArrayView2<'_, f64>, hidden: usize) -> Result<()> {
    let what = || "residual rotation".to_string();
    if q.dim() != (hidden, hidden) {
        return Err(PermuteError::Shape {
            what: what(),
            msg: format!("{:?}, expected {hidden} × {hidden}", q.dim()),
        });
    }
    if q.iter().any(|v| !v.is_finite()) {
        return Err(PermuteError::NonFinite {
            what: what(),
            msg: "NaN or Inf".into(),
        });
    }
    let qtq = q.t().dot(&q);
    let off = qtq
        .indexed_iter()
        .map(|((i, j), v)| (v - f64::from(u8::from(i == j))).abs())
        .fold(0f64, f64::max);
    if off > 1e-6 {
        return Err(PermuteError::Shape {
            what: what(),
            msg: format!("not orthogonal: max |QᵀQ − I| = {off:.2e}"),
        });
    }
    Ok(())
}

/// `sd` with its residual stream mapped by the orthogonal `q` (`hidden ×
/// hidden`): writers' outputs by `Q`, readers' inputs by `Qᵀ`. The same
/// function when the RMSNorm gains are all one ([`fold_rms_norms`]); a
/// model with other gains is refused by name.
pub fn rotate_residual(
    c: &LlamaConfig,
    sd: &StateDict,
    q: ArrayView2<'_, f64>,
) -> Result<StateDict> {
    let hidden = c.hidden_size;
    check_orthogonal(q, hidden)?;
    for (norm, _) in norms(c) {
        if let Some(g) = sd.get(&norm)
            && g.data.iter().any(|&v| v != 1.0)
        {
            return Err(PermuteError::InvalidSpec(format!(
                "'{norm}' has gains other than one: fold the RMSNorm gains first (fold_rms_norms)"
            )));
        }
    }
    let mut out = sd.clone();
    for (name, axis) in residual_weights(c, sd) {
        let w = matrix(sd, &name, hidden, axis)?.mapv(f64::from);
        let r = if axis == 0 { q.dot(&w) } else { w.dot(&q.t()) };
        out.insert(name, Tensor::f32(r.mapv(|v| v as f32).into_dyn()));
    }
    Ok(out)
}

/// The orthogonal `Q` maximising `Σ ⟨A_W, Q·B_W⟩` over the residual-stream
/// weights (Q applied to B's residual index as [`rotate_residual`] does):
/// `Q = U·Vᵀ` for `Σ A_W·B_Wᵀ = U·S·Vᵀ` with the stream's index first.
pub fn residual_procrustes(c: &LlamaConfig, a: &StateDict, b: &StateDict) -> Result<Array2<f64>> {
    let hidden = c.hidden_size;
    let mut cross = Array2::<f64>::zeros((hidden, hidden));
    for (name, axis) in residual_weights(c, a) {
        let first = |sd: &StateDict| -> Result<Array2<f64>> {
            let m = matrix(sd, &name, hidden, axis)?.mapv(f64::from);
            Ok(if axis == 0 { m } else { m.reversed_axes() })
        };
        let (wa, wb) = (first(a)?, first(b)?);
        if wa.dim() != wb.dim() {
            return Err(PermuteError::ShapeMismatch {
                weight: name,
                a: wa.shape().to_vec(),
                b: wb.shape().to_vec(),
            });
        }
        cross += &wa.dot(&wb.t());
    }
    let svd =
        spectra::linalg::full_svd(cross.view(), "residual cross-covariance").map_err(|e| {
            PermuteError::NonFinite {
                what: "residual Procrustes".into(),
                msg: e.to_string(),
            }
        })?;
    let q = svd.u.dot(&svd.vt);
    debug_assert_eq!(q.len_of(Axis(0)), hidden);
    Ok(q)
}
