//! Partial merging over any [`PermutationSpec`]: ZipIt! (Stoica et al., ICLR
//! 2024) and the zip step of PLeaS (Nasery et al., 2024).
//!
//! Each group gets a [`GroupPlan`]: which of A's blocks (units, or whole
//! attention heads) are merged with which of B's, and which of each model's
//! blocks stay apart. The merged model's group has the merged pairs first,
//! then A's blocks kept apart, then B's: between one model's width (every
//! block merged) and two (none). [`zip`] builds every tensor from the plan:
//! a tensor's *output* axis (axis 0, or the last axis of a lookup table such
//! as an embedding) takes a merged block as the mean of A's and B's rows and a
//! block kept apart from its own model alone; an *input* axis reads a merged
//! block from both models' columns and a block kept apart from its own
//! model's only (the other model's weights there are zero). Outputs that no
//! group permutes (logits, a fixed output layer) are the mean of both models,
//! or any per-row mix given in [`ZipOptions::output_mix`].
//!
//! So ratio 1 with B aligned is the average of A and the aligned B, and ratio
//! 0 (every block apart) of an MLP is the ensemble whose logits are the mean
//! of A's and B's. The inner order of a merged pair's units (inside a head,
//! the query heads of a key/value group) is taken as it is: align B first
//! ([`crate::apply`] with the matching's value), so the pairs are `(i, i)`.
//! Normalisations over a group (LayerNorm, RMSNorm) see the wider group when
//! its blocks stay apart: keep such groups (a transformer's residual stream)
//! fully merged for an ensemble-like merge.

use indexmap::IndexMap;
use ndarray::{Array2, ArrayD, Axis};
use weights::{StateDict, Tensor};

use crate::error::{PermuteError, Result};
use crate::matching::check_models;
use crate::spec::{PermutationSpec, gather};

/// How one group of the merged model is made from A's and B's blocks: merged
/// `pairs` (A's block, B's block), then A's blocks `only_a`, then B's `only_b`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupPlan {
    /// Merged pairs `(A's block, B's block)`.
    pub pairs: Vec<(usize, usize)>,
    /// A's blocks kept apart.
    pub only_a: Vec<usize>,
    /// B's blocks kept apart.
    pub only_b: Vec<usize>,
}

impl GroupPlan {
    /// Every block `i` of A merged with block `i` of B (of `n`).
    pub fn merged(n: usize) -> GroupPlan {
        GroupPlan {
            pairs: (0..n).map(|i| (i, i)).collect(),
            only_a: vec![],
            only_b: vec![],
        }
    }

    /// Blocks of the merged group.
    pub fn width(&self) -> usize {
        self.pairs.len() + self.only_a.len() + self.only_b.len()
    }

    /// Blocks of each source group.
    pub fn source_width(&self) -> usize {
        self.pairs.len() + self.only_a.len()
    }

    /// The merge matrix `M` (`width × 2n`): merged features from `[f_A; f_B]`.
    pub fn merge_matrix(&self) -> Array2<f64> {
        let n = self.source_width();
        let mut m = Array2::zeros((self.width(), 2 * n));
        for (u, (a, b)) in self.sources().into_iter().enumerate() {
            let w = if a.is_some() && b.is_some() { 0.5 } else { 1.0 };
            if let Some(i) = a {
                m[[u, i]] = w;
            }
            if let Some(j) = b {
                m[[u, n + j]] = w;
            }
        }
        m
    }

    /// The unmerge matrices `(U_A, U_B)` (`n × width`): the merged block that
    /// stands for each of A's (B's) blocks.
    pub fn unmerge_matrices(&self) -> (Array2<f64>, Array2<f64>) {
        let (n, w) = (self.source_width(), self.width());
        let (mut ua, mut ub) = (Array2::zeros((n, w)), Array2::zeros((n, w)));
        for (u, (a, b)) in self.sources().into_iter().enumerate() {
            if let Some(i) = a {
                ua[[i, u]] = 1.0;
            }
            if let Some(j) = b {
                ub[[j, u]] = 1.0;
            }
        }
        (ua, ub)
    }

    /// Per block of the merged group, its A block and its B block.
    pub fn sources(&self) -> Vec<(Option<usize>, Option<usize>)> {
        let pairs = self.pairs.iter().map(|&(i, j)| (Some(i), Some(j)));
        let a = self.only_a.iter().map(|&i| (Some(i), None));
        let b = self.only_b.iter().map(|&j| (None, Some(j)));
        pairs.chain(a).chain(b).collect()
    }

    /// Checks that the plan covers each model's `n` blocks exactly once.
    pub fn check(&self, n: usize, group: &str) -> Result<()> {
        let bad = |msg: String| PermuteError::BadPermutation {
            group: group.to_string(),
            msg,
        };
        if self.only_a.len() != self.only_b.len() || self.source_width() != n {
            return Err(bad(format!(
                "the plan covers {} of A's and {} of B's blocks, the group has {n}",
                self.source_width(),
                self.pairs.len() + self.only_b.len()
            )));
        }
        let a = self
            .pairs
            .iter()
            .map(|p| p.0)
            .chain(self.only_a.iter().copied());
        let b = self
            .pairs
            .iter()
            .map(|p| p.1)
            .chain(self.only_b.iter().copied());
        for (model, blocks) in [("A", a.collect::<Vec<_>>()), ("B", b.collect())] {
            let mut seen = vec![false; n];
            if blocks
                .iter()
                .any(|&i| i >= n || std::mem::replace(&mut seen[i], true))
            {
                return Err(bad(format!(
                    "the plan's blocks of {model} are not a permutation of 0..{n}"
                )));
            }
        }
        Ok(())
    }
}

/// Checks a merge ratio is a fraction in `[0, 1]`.
pub fn check_ratio(ratio: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&ratio) {
        return Err(PermuteError::InvalidSpec(format!(
            "merge ratio {ratio} is not a fraction in [0, 1]"
        )));
    }
    Ok(())
}

/// Partial matching of one group: A's block `i` is matched with B's block
/// `perm[i]` with similarity `score[i]`; the `merged` most similar pairs
/// (at most all) are merged and both blocks of every other pair kept apart.
pub fn plan_group(perm: &[usize], score: &[f64], merged: usize, group: &str) -> Result<GroupPlan> {
    let n = perm.len();
    let bad = |msg: String| PermuteError::BadPermutation {
        group: group.to_string(),
        msg,
    };
    if score.len() != n {
        return Err(bad(format!("{} scores for {n} blocks", score.len())));
    }
    let mut seen = vec![false; n];
    if perm
        .iter()
        .any(|&j| j >= n || std::mem::replace(&mut seen[j], true))
    {
        return Err(bad(format!("{perm:?} is not a permutation of 0..{n}")));
    }
    if let Some(v) = score.iter().find(|v| !v.is_finite()) {
        return Err(PermuteError::NonFinite {
            what: format!("group '{group}' similarities"),
            msg: v.to_string(),
        });
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&x, &y| score[y].total_cmp(&score[x]).then(x.cmp(&y)));
    let merged = merged.min(n);
    let mut plan = GroupPlan {
        pairs: order[..merged].iter().map(|&i| (i, perm[i])).collect(),
        only_a: order[merged..].to_vec(),
        only_b: order[merged..].iter().map(|&i| perm[i]).collect(),
    };
    plan.pairs.sort_unstable();
    plan.only_a.sort_unstable();
    plan.only_b.sort_unstable();
    Ok(plan)
}

/// How a merge ratio is spread over the groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum Allocation {
    /// Every group merges the same fraction of its blocks.
    Uniform,
    /// The same total number of merged pairs, taken where the matched blocks
    /// are most alike: the pairs of all groups ranked by similarity, and the
    /// best `round(ratio · Σ blocks)` merged.
    Global,
}

impl Allocation {
    /// The name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Allocation::Uniform => "uniform",
            Allocation::Global => "global",
        }
    }
}

/// Plans every group from its matched blocks (`(group, perm, score)`) at one
/// merge ratio spread by `allocation`. Both allocations merge the same total
/// number of pairs up to rounding; at ratio 0 and 1 they agree.
pub fn plan_groups(
    units: &[(String, Vec<usize>, Vec<f64>)],
    ratio: f64,
    allocation: Allocation,
) -> Result<IndexMap<String, GroupPlan>> {
    check_ratio(ratio)?;
    let counts: Vec<usize> = match allocation {
        Allocation::Uniform => units
            .iter()
            .map(|(_, p, _)| (ratio * p.len() as f64).round() as usize)
            .collect(),
        Allocation::Global => {
            let total: usize = units.iter().map(|(_, p, _)| p.len()).sum();
            let mut all: Vec<(f64, usize, usize)> = Vec::with_capacity(total);
            // Bad scores (wrong length, NaN) are refused per group below.
            for (l, (_, _, sc)) in units.iter().enumerate() {
                all.extend(sc.iter().enumerate().map(|(i, &v)| (v, l, i)));
            }
            all.sort_by(|x, y| y.0.total_cmp(&x.0).then((x.1, x.2).cmp(&(y.1, y.2))));
            let merged = ((ratio * total as f64).round() as usize).min(all.len());
            let mut counts = vec![0; units.len()];
            for &(_, l, _) in &all[..merged] {
                counts[l] += 1;
            }
            counts
        }
    };
    units
        .iter()
        .zip(counts)
        .map(|((name, p, sc), k)| Ok((name.clone(), plan_group(p, sc, k, name)?)))
        .collect()
}

/// Options of [`zip`].
#[derive(Clone, Debug, Default)]
pub struct ZipOptions {
    /// Tensors whose *last* axis is their output (lookup tables: a token's
    /// row is its feature vector); [`lookup_tables`] names the usual ones.
    pub lookups: Vec<String>,
    /// For tensors whose output axis no group permutes: per output index,
    /// the weights `[A's, B's]` of the two models (default `[0.5, 0.5]`).
    pub output_mix: IndexMap<String, Vec<[f64; 2]>>,
}

/// The embedding tables of a checkpoint (`*embed_tokens.weight`,
/// `*_embeddings.weight`): their last axis is the features they output.
pub fn lookup_tables(sd: &StateDict) -> Vec<String> {
    sd.keys()
        .filter(|k| k.ends_with("embed_tokens.weight") || k.ends_with("_embeddings.weight"))
        .map(str::to_string)
        .collect()
}

/// One axis of a merged tensor: per position, A's and B's source index and
/// the weights of the two models' terms along this axis.
struct AxisMap {
    a: Vec<usize>,
    b: Vec<usize>,
    wa: Vec<f64>,
    wb: Vec<f64>,
}

impl AxisMap {
    fn fixed(n: usize, w: [f64; 2]) -> AxisMap {
        AxisMap {
            a: (0..n).collect(),
            b: (0..n).collect(),
            wa: vec![w[0]; n],
            wb: vec![w[1]; n],
        }
    }
}

/// The merged model of `a` and `b` by `plan` (one [`GroupPlan`] per group of
/// `spec`); see the module docs. Tensors no group touches are averaged (or
/// mixed by `output_mix`).
pub fn zip(
    spec: &PermutationSpec,
    a: &StateDict,
    b: &StateDict,
    plan: &IndexMap<String, GroupPlan>,
    opts: &ZipOptions,
) -> Result<StateDict> {
    check_models(spec, a, b)?;
    for g in &spec.groups {
        let p = plan
            .get(&g.name)
            .ok_or_else(|| PermuteError::BadPermutation {
                group: g.name.clone(),
                msg: "the zip plan has no entry for this group".into(),
            })?;
        p.check(g.blocks, &g.name)?;
    }
    if let Some(extra) = plan.keys().find(|k| spec.group(k).is_none()) {
        return Err(PermuteError::InvalidSpec(format!(
            "the zip plan names group '{extra}', which the spec does not have"
        )));
    }
    let by_weight = spec.by_weight();
    let mut out = StateDict::new();
    out.metadata = a.metadata.clone();
    for (name, ta, tb) in crate::interp::paired(a, b)? {
        let ndim = ta.shape().len();
        let output_axis = match ndim {
            0 => None,
            _ if opts.lookups.iter().any(|l| l == name) => Some(ndim - 1),
            _ => Some(0),
        };
        let mix = |n: usize| -> Result<Vec<[f64; 2]>> {
            match opts.output_mix.get(name) {
                None => Ok(vec![[0.5, 0.5]; n]),
                Some(m) if m.len() == n => Ok(m.clone()),
                Some(m) => Err(PermuteError::Shape {
                    what: format!("output mix of '{name}'"),
                    msg: format!("{} rows for an output axis of {n}", m.len()),
                }),
            }
        };
        let mut axes: Vec<AxisMap> = (0..ndim)
            .map(|k| AxisMap::fixed(ta.shape()[k], [1.0, 1.0]))
            .collect();
        if let Some(o) = output_axis {
            let m = mix(ta.shape()[o])?;
            axes[o].wa = m.iter().map(|x| x[0]).collect();
            axes[o].wb = m.iter().map(|x| x[1]).collect();
        }
        for &(gi, mi) in by_weight.get(name).map_or(&[][..], Vec::as_slice) {
            let g = &spec.groups[gi];
            let m = &g.members[mi];
            let unit = m.repeat * g.block_size;
            let output = Some(m.axis) == output_axis;
            let mut ax = AxisMap {
                a: vec![],
                b: vec![],
                wa: vec![],
                wb: vec![],
            };
            for (sa, sb) in plan[&g.name].sources() {
                let both = sa.is_some() && sb.is_some();
                let w = |present: bool| match (present, output && both) {
                    (false, _) => 0.0,
                    (true, true) => 0.5,
                    (true, false) => 1.0,
                };
                for off in 0..unit {
                    ax.a.push(sa.map_or(0, |i| i * unit + off));
                    ax.b.push(sb.map_or(0, |j| j * unit + off));
                    ax.wa.push(w(sa.is_some()));
                    ax.wb.push(w(sb.is_some()));
                }
            }
            axes[m.axis] = ax;
        }
        let term = |data: &ArrayD<f32>, pick: fn(&AxisMap) -> (&Vec<usize>, &Vec<f64>)| {
            let index: Vec<Option<Vec<usize>>> =
                axes.iter().map(|ax| Some(pick(ax).0.clone())).collect();
            let mut t = gather(data, &index).mapv(f64::from);
            for (k, ax) in axes.iter().enumerate() {
                let w = pick(ax).1;
                for (mut lane, &wk) in t.axis_iter_mut(Axis(k)).zip(w) {
                    lane.mapv_inplace(|v| v * wk);
                }
            }
            t
        };
        // A scalar (a step counter) has no axis to carry the mix: mean of both.
        let [sa, sb] = if ndim == 0 { mix(1)?[0] } else { [1.0, 1.0] };
        let merged =
            term(&ta.data, |ax| (&ax.a, &ax.wa)) * sa + term(&tb.data, |ax| (&ax.b, &ax.wb)) * sb;
        out.insert(name, Tensor::new(merged.mapv(|v| v as f32), ta.dtype));
    }
    Ok(out)
}
