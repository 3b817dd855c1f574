//! In-memory merging of whole state dicts, and permutation-aware merging:
//! align independently trained models with [`permute`] (weight matching to
//! an anchor, or MergeMany for three or more), then merge with any method.

use rayon::prelude::*;
use weights::{StateDict, Tensor};

use crate::error::{MergeError, Result};
use crate::{Method, Params, TensorInputs, merge_tensor};
use permute::{MatchOptions, Permutation, PermutationSpec, apply, weight_matching};

/// Merges every tensor of `models` (and `base`, for methods that use one)
/// with `method`; `shared` and `per_model` parameters apply to all tensors.
/// Tensors are checked like the streaming runner does (names, shapes, values).
pub fn merge_state_dicts(
    method: &Method,
    base: Option<&StateDict>,
    models: &[StateDict],
    shared: &Params,
    per_model: &[Params],
    seed: u64,
) -> Result<StateDict> {
    if per_model.len() != models.len() {
        return Err(MergeError::Inputs {
            method: method.name().into(),
            msg: format!(
                "{} models but {} parameter sets",
                models.len(),
                per_model.len()
            ),
        });
    }
    let reference = base.or(models.first()).ok_or_else(|| MergeError::Inputs {
        method: method.name().into(),
        msg: "no models".into(),
    })?;
    let names: Vec<&str> = reference.keys().collect();
    let label = |i: usize| format!("model {}", i + 1);
    let check = |name: &str, t: Option<&Tensor>, model: String, shape: &[usize]| -> Result<()> {
        let t = t.ok_or_else(|| MergeError::MissingTensor {
            tensor: name.into(),
            model: model.clone(),
        })?;
        if t.shape() != shape {
            return Err(MergeError::ShapeMismatch {
                tensor: name.into(),
                model,
                expected: shape.to_vec(),
                got: t.shape().to_vec(),
            });
        }
        MergeError::check_finite(name, &model, t.data.iter())
    };
    let merged: Vec<(String, Tensor)> = names
        .par_iter()
        .map(|&name| -> Result<(String, Tensor)> {
            let r = reference.get(name).expect("listed");
            let shape = r.shape().to_vec();
            if let Some(b) = base {
                check(name, b.get(name), "base".into(), &shape)?;
            }
            for (i, m) in models.iter().enumerate() {
                check(name, m.get(name), label(i), &shape)?;
            }
            let flat = |t: &Tensor| {
                t.data
                    .as_standard_layout()
                    .into_owned()
                    .into_raw_vec_and_offset()
                    .0
            };
            let base_v = base.map(|b| flat(b.get(name).expect("checked")));
            let inputs: Vec<Vec<f32>> = models
                .iter()
                .map(|m| flat(m.get(name).expect("checked")))
                .collect();
            let out = merge_tensor(
                method,
                &TensorInputs {
                    name,
                    shape: &shape,
                    base: base_v.as_deref(),
                    models: inputs.iter().map(|v| v.as_slice()).collect(),
                    shared,
                    per_model,
                    seed,
                    draws: Default::default(),
                },
            )?;
            let data = ndarray::ArrayD::from_shape_vec(shape, out)
                .expect("merged tensor has the input's size");
            Ok((name.to_string(), Tensor::new(data, r.dtype)))
        })
        .collect::<Result<_>>()?;
    let mut sd: StateDict = merged.into_iter().collect();
    sd.metadata = reference.metadata.clone();
    Ok(sd)
}

/// How models are aligned before merging.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alignment {
    /// No alignment (plain merging).
    None,
    /// Weight matching of every model to the first (the anchor).
    ToAnchor,
    /// MergeMany: every model to the mean of the others, repeatedly.
    MergeMany,
}

/// The aligned models and their permutations.
#[derive(Clone, Debug)]
pub struct Aligned {
    /// The models with their permutation applied (the first unchanged for `ToAnchor`).
    pub models: Vec<StateDict>,
    /// The permutation applied to each model.
    pub perms: Vec<Permutation>,
}

/// Aligns `models` under `spec` (see [`Alignment`]).
pub fn align(
    spec: &PermutationSpec,
    models: &[StateDict],
    how: Alignment,
    opts: &MatchOptions,
) -> Result<Aligned> {
    let perms = match how {
        Alignment::None => vec![spec.identity(); models.len()],
        Alignment::ToAnchor => {
            let anchor = models.first().ok_or_else(|| MergeError::Inputs {
                method: "align".into(),
                msg: "no models".into(),
            })?;
            let mut perms = vec![spec.identity()];
            for m in &models[1..] {
                perms.push(weight_matching(spec, anchor, m, opts)?.perm);
            }
            perms
        }
        Alignment::MergeMany => permute::many::merge_many(spec, models, opts, 50)?.perms,
    };
    let models = models
        .iter()
        .zip(&perms)
        .map(|(m, p)| apply(spec, p, m))
        .collect::<permute::Result<Vec<_>>>()?;
    Ok(Aligned { models, perms })
}

/// Permutation-aware merging: [`align`] then [`merge_state_dicts`]. With a
/// `base`, each model is aligned to the base (the anchor) instead.
#[allow(clippy::too_many_arguments)]
pub fn permutation_aware_merge(
    spec: &PermutationSpec,
    method: &Method,
    base: Option<&StateDict>,
    models: &[StateDict],
    how: Alignment,
    shared: &Params,
    per_model: &[Params],
    opts: &MatchOptions,
) -> Result<(StateDict, Aligned)> {
    let aligned = match base {
        Some(b) => {
            let mut all = vec![b.clone()];
            all.extend(models.iter().cloned());
            let mut a = align(
                spec,
                &all,
                if how == Alignment::None {
                    how
                } else {
                    Alignment::ToAnchor
                },
                opts,
            )?;
            a.models.remove(0);
            a.perms.remove(0);
            a
        }
        None => align(spec, models, how, opts)?,
    };
    let merged = merge_state_dicts(method, base, &aligned.models, shared, per_model, opts.seed)?;
    Ok((merged, aligned))
}
