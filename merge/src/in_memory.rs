//! In-memory merging of whole state dicts with any method of the registry:
//! the same per-tensor code ([`crate::merge_tensor`]) and checks as the
//! streaming config runner, for models already loaded.

use rayon::prelude::*;
use weights::{StateDict, Tensor};

use crate::error::{MergeError, Result};
use crate::{Method, Params, TensorInputs, merge_tensor};

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
        match t.data.as_slice_memory_order() {
            Some(data) => MergeError::check_finite_slice(name, &model, data),
            None => MergeError::check_finite(name, &model, t.data.iter()),
        }
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
