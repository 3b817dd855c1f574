//! Permutation specs of common architectures, built as data.

use weights::StateDict;

use crate::error::{PermuteError, Result};
use crate::spec::{Group, PermutationSpec};

/// The layer index of an MLP parameter stem: the trailing integer of
/// `layers.3`, `fc2`, `Dense_1`, `net.4`.
fn layer_index(stem: &str) -> Option<usize> {
    let digits: String = stem
        .chars()
        .rev()
        .take_while(|c| c.is_ascii_digit())
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    if digits.is_empty() {
        return None;
    }
    digits.parse().ok()
}

/// The spec of a multilayer perceptron, inferred from parameter names.
///
/// Accepted names: `<stem>.weight` (2-D, `[out, in]`) with an optional
/// `<stem>.bias`, where the stem ends in the layer's integer index —
/// `layers.0`, `layers.1`, … (PyTorch `nn.Sequential` style), `fc1`, `fc2`, …,
/// `Dense_0`, `Dense_1`, … (Flax naming, with `[out, in]` weights). Layers are
/// ordered by that index; consecutive layers must chain
/// (`out` of one = `in` of the next). Hidden group `P_i` permutes the rows of
/// layer `i`'s weight and bias and the columns of layer `i+1`'s weight; the
/// last layer's outputs stay fixed.
pub fn mlp(sd: &StateDict) -> Result<PermutationSpec> {
    let mut layers: Vec<(usize, String)> = Vec::new();
    for (name, t) in sd.iter() {
        if let Some(stem) = name.strip_suffix(".weight")
            && t.shape().len() == 2
        {
            let idx = layer_index(stem).ok_or_else(|| {
                PermuteError::InvalidSpec(format!("MLP weight '{name}' has no layer index (expected e.g. layers.0.weight, fc1.weight)"))
            })?;
            layers.push((idx, stem.to_string()));
        }
    }
    layers.sort();
    if layers.windows(2).any(|w| w[0].0 == w[1].0) {
        return Err(PermuteError::InvalidSpec(
            "two MLP layers share one index".into(),
        ));
    }
    if layers.len() < 2 {
        return Err(PermuteError::InvalidSpec(format!(
            "an MLP needs at least 2 layers, found {}",
            layers.len()
        )));
    }
    let mut groups = Vec::new();
    for (k, w) in layers.windows(2).enumerate() {
        let (cur, next) = (&w[0].1, &w[1].1);
        let out = sd.get(&format!("{cur}.weight")).expect("listed").shape()[0];
        let next_in = sd.get(&format!("{next}.weight")).expect("listed").shape()[1];
        if out != next_in {
            return Err(PermuteError::InvalidSpec(format!(
                "{cur}.weight has {out} outputs but {next}.weight takes {next_in} inputs"
            )));
        }
        let (wc, bc, wn) = (
            format!("{cur}.weight"),
            format!("{cur}.bias"),
            format!("{next}.weight"),
        );
        let mut members = vec![(wc.as_str(), 0usize)];
        if sd.contains(&bc) {
            members.push((bc.as_str(), 0));
        }
        members.push((wn.as_str(), 1));
        groups.push(Group::units(format!("P_{k}"), out, &members));
    }
    Ok(PermutationSpec { groups })
}
