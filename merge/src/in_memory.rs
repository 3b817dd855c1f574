//! In-memory merging of whole state dicts with any method of the registry:
//! the same per-tensor code ([`crate::merge_tensor`]) and checks as the
//! streaming config runner, for models already loaded.

use rayon::prelude::*;
use weights::{StateDict, Tensor};

use crate::error::{MergeError, Result};
use crate::{Method, Params, TensorInputs, Update, merge_tensor, merge_tensor_update};

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
    let reference = base.or(models.first());
    let merged = per_tensor(method, base, models, shared, per_model, seed, merge_tensor)?;
    let reference = reference.expect("checked by per_tensor");
    let mut sd: StateDict = merged
        .into_iter()
        .map(|(name, out)| {
            let r = reference.get(&name).expect("listed");
            (name, like(r, out))
        })
        .collect();
    sd.metadata = reference.metadata.clone();
    Ok(sd)
}

/// The λ-free [`Update`]s of a merge linear in λ (the task-vector family,
/// TSV-M, Iso-C, Iso-CTS), one per tensor, with [`merge_state_dicts`]'
/// checks; `None` for other methods. [`Updates::apply`] then gives
/// [`merge_state_dicts`]' result at any λ, bit for bit.
pub fn merge_state_dict_updates(
    method: &Method,
    base: &StateDict,
    models: &[StateDict],
    shared: &Params,
    per_model: &[Params],
    seed: u64,
) -> Result<Option<Updates>> {
    if !matches!(
        method,
        Method::TaskVector(..) | Method::TsvM | Method::IsoC | Method::IsoCts
    ) {
        return Ok(None);
    }
    let tensors = per_tensor(
        method,
        Some(base),
        models,
        shared,
        per_model,
        seed,
        |m, x| {
            let update = merge_tensor_update(m, x)?.expect("a method linear in λ");
            Ok((x.shape.to_vec(), update))
        },
    )?;
    Ok(Some(Updates { tensors }))
}

/// One [`Update`] per tensor of a merge linear in λ
/// ([`merge_state_dict_updates`]).
#[derive(Clone, Debug)]
pub struct Updates {
    /// Name, shape and update of each tensor.
    tensors: Vec<(String, (Vec<usize>, Update))>,
}

impl Updates {
    /// The merge at `lambda` on `base` (the base the updates were made on);
    /// a λ that is not a finite number, or a base without one of the
    /// tensors or with another shape, is an error naming it.
    pub fn apply(&self, base: &StateDict, lambda: f64) -> Result<StateDict> {
        if !lambda.is_finite() {
            return Err(MergeError::param(
                "(all tensors)",
                "lambda",
                format!("expected a number, got {lambda}"),
            ));
        }
        let merged: Vec<(String, Tensor)> = self
            .tensors
            .par_iter()
            .map(|(name, (shape, u))| -> Result<(String, Tensor)> {
                let b = present(name, base.get(name), "base", shape)?;
                Ok((name.clone(), like(b, u.apply(&flat(b), lambda))))
            })
            .collect::<Result<_>>()?;
        let mut sd: StateDict = merged.into_iter().collect();
        sd.metadata = base.metadata.clone();
        Ok(sd)
    }
}

/// A tensor of `r`'s shape and dtype holding `values` (of `r`'s size).
fn like(r: &Tensor, values: Vec<f32>) -> Tensor {
    let data = ndarray::ArrayD::from_shape_vec(r.shape().to_vec(), values)
        .expect("merged tensor has the input's size");
    Tensor::new(data, r.dtype)
}

/// `t`, the tensor `name` of `model`, when it is there with `shape`; else
/// the error naming both.
fn present<'a>(
    name: &str,
    t: Option<&'a Tensor>,
    model: &str,
    shape: &[usize],
) -> Result<&'a Tensor> {
    let t = t.ok_or_else(|| MergeError::MissingTensor {
        tensor: name.into(),
        model: model.into(),
    })?;
    if t.shape() != shape {
        return Err(MergeError::ShapeMismatch {
            tensor: name.into(),
            model: model.into(),
            expected: shape.to_vec(),
            got: t.shape().to_vec(),
        });
    }
    Ok(t)
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.data
        .as_standard_layout()
        .into_owned()
        .into_raw_vec_and_offset()
        .0
}

/// Checks every tensor of `base` (or the first model) in every input, then
/// runs `f` on each tensor's inputs, in parallel; the results in the
/// reference's tensor order.
fn per_tensor<T: Send>(
    method: &Method,
    base: Option<&StateDict>,
    models: &[StateDict],
    shared: &Params,
    per_model: &[Params],
    seed: u64,
    f: impl Fn(&Method, &TensorInputs) -> Result<T> + Sync,
) -> Result<Vec<(String, T)>> {
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
        let t = present(name, t, &model, shape)?;
        match t.data.as_slice_memory_order() {
            Some(data) => MergeError::check_finite_slice(name, &model, data),
            None => MergeError::check_finite(name, &model, t.data.iter()),
        }
    };
    names
        .par_iter()
        .map(|&name| -> Result<(String, T)> {
            let shape = reference.get(name).expect("listed").shape().to_vec();
            if let Some(b) = base {
                check(name, b.get(name), "base".into(), &shape)?;
            }
            for (i, m) in models.iter().enumerate() {
                check(name, m.get(name), label(i), &shape)?;
            }
            let base_v = base.map(|b| flat(b.get(name).expect("checked")));
            let inputs: Vec<Vec<f32>> = models
                .iter()
                .map(|m| flat(m.get(name).expect("checked")))
                .collect();
            let out = f(
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
            Ok((name.to_string(), out))
        })
        .collect()
}
