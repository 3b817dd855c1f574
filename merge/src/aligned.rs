//! Permutation-aware merging: align independently trained models with
//! [`permute`] (weight matching to an anchor, or MergeMany for three or
//! more), then merge with any method ([`crate::merge_state_dicts`]).

use weights::StateDict;

use crate::error::{MergeError, Result};
use crate::{Method, Params, merge_state_dicts};
use permute::{MatchOptions, Permutation, PermutationSpec, apply, weight_matching};

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
