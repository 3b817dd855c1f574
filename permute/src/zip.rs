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

/// The output axis of a tensor in a zip: none for a scalar, the last for a
/// lookup table, else axis 0.
fn output_axis(opts: &ZipOptions, name: &str, ndim: usize) -> Option<usize> {
    match ndim {
        0 => None,
        _ if opts.lookups.iter().any(|l| l == name) => Some(ndim - 1),
        _ => Some(0),
    }
}

/// The `[A's, B's]` weights of each of `n` outputs of tensor `name`
/// ([`ZipOptions::output_mix`], default the mean).
fn mix_of(opts: &ZipOptions, name: &str, n: usize) -> Result<Vec<[f64; 2]>> {
    match opts.output_mix.get(name) {
        None => Ok(vec![[0.5, 0.5]; n]),
        Some(m) if m.len() == n => Ok(m.clone()),
        Some(m) => Err(PermuteError::Shape {
            what: format!("output mix of '{name}'"),
            msg: format!("{} rows for an output axis of {n}", m.len()),
        }),
    }
}

/// Per axis of tensor `name` (of `shape`), where each position of the merged
/// tensor reads A and B and with what weights: the plan's blocks on the axes
/// a group permutes, the output mix on an output axis no group permutes.
fn axis_maps(
    spec: &PermutationSpec,
    by_weight: &IndexMap<&str, Vec<(usize, usize)>>,
    plan: &IndexMap<String, GroupPlan>,
    opts: &ZipOptions,
    name: &str,
    shape: &[usize],
) -> Result<Vec<AxisMap>> {
    let ndim = shape.len();
    let output_axis = output_axis(opts, name, ndim);
    let mut axes: Vec<AxisMap> = (0..ndim)
        .map(|k| AxisMap::fixed(shape[k], [1.0, 1.0]))
        .collect();
    if let Some(o) = output_axis {
        let m = mix_of(opts, name, shape[o])?;
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
    Ok(axes)
}

/// Checks `plan` against `spec`: one entry per group, covering its blocks.
fn check_plan(spec: &PermutationSpec, plan: &IndexMap<String, GroupPlan>) -> Result<()> {
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
    Ok(())
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
    check_plan(spec, plan)?;
    let by_weight = spec.by_weight();
    let mut out = StateDict::new();
    out.metadata = a.metadata.clone();
    for (name, ta, tb) in crate::interp::paired(a, b)? {
        let ndim = ta.shape().len();
        let axes = axis_maps(spec, &by_weight, plan, opts, name, ta.shape())?;
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
        let [sa, sb] = if ndim == 0 {
            mix_of(opts, name, 1)?[0]
        } else {
            [1.0, 1.0]
        };
        let merged =
            term(&ta.data, |ax| (&ax.a, &ax.wa)) * sa + term(&tb.data, |ax| (&ax.b, &ax.wb)) * sb;
        out.insert(name, Tensor::new(merged.mapv(|v| v as f32), ta.dtype));
    }
    Ok(out)
}

/// Which model a [`Probe`] is asked about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// Model A (unchanged through a solve: its inputs may be cached).
    A,
    /// Model B (unchanged through a solve: its inputs may be cached).
    B,
    /// The merged model, as solved so far.
    Merged,
}

/// The error a [`Probe`] returns (its forward pass failing).
pub type ProbeError = Box<dyn std::error::Error + Send + Sync>;

/// The forward pass that [`least_squares`] needs: the input features of a
/// linear weight of a model on the same unlabelled samples, every time.
pub trait Probe {
    /// The inputs of weight `weight` of `model` (`sd`) as `[samples, in]`,
    /// where `in` is the product of the weight's axes after the first (a
    /// convolution's im2col patches in its `[in, kh, kw]` order). Every call
    /// must use the same samples in the same order.
    fn inputs(
        &mut self,
        source: Source,
        sd: &StateDict,
        weight: &str,
    ) -> std::result::Result<Array2<f64>, ProbeError>;
}

/// Options of [`least_squares`].
#[derive(Clone, Debug)]
pub struct LeastSquaresOptions {
    /// The linear weights to solve, in forward order, in steps: the weights
    /// of one step share their input (a LLaMA's q, k and v) and are solved
    /// from one call of the probe on the merged model. A weight's bias is
    /// `….bias` beside `….weight` when the model has one. Weights not named
    /// keep their zipped values.
    pub steps: Vec<Vec<String>>,
    /// Ridge relative to the inputs: `λ = ridge · ‖[X 1]‖²_F / columns`.
    pub ridge: f64,
}

/// PLeaS's per-layer least squares (Nasery et al., 2024) over any spec: the
/// merged model is first zipped by `plan` ([`zip`]); then each step's weights
/// are solved in turn by ridge least squares,
/// `[W b] = argmin ‖[X 1] [W b]ᵀ − T‖² + λ‖[W b]‖²`, where `X` is the merged
/// model's *own* input to the weight (so each solve corrects the error of
/// the layers solved before it) and `T` is the zip of both models' outputs
/// `Z_A = X_A W_Aᵀ + b_A` and `Z_B` by the plan's rule for the weight's output
/// axis: a merged pair's output is the mean of A's and B's, a block kept
/// apart its own model's, an output no group permutes the
/// [`ZipOptions::output_mix`] of both. To solve several plans of the same
/// two models, [`LeastSquares`] keeps A's and B's outputs between them.
pub fn least_squares(
    spec: &PermutationSpec,
    a: &StateDict,
    b: &StateDict,
    plan: &IndexMap<String, GroupPlan>,
    zip_opts: &ZipOptions,
    opts: &LeastSquaresOptions,
    probe: &mut dyn Probe,
) -> Result<StateDict> {
    LeastSquares::new(spec, a, b).merge(plan, zip_opts, opts, probe)
}

/// [`least_squares`] of two models under several plans: A's and B's outputs
/// of each solved weight are computed once and kept.
pub struct LeastSquares<'m> {
    spec: PermutationSpec,
    a: &'m StateDict,
    b: &'m StateDict,
    /// A's and B's outputs of each weight solved so far.
    outputs: IndexMap<String, [Array2<f64>; 2]>,
}

impl<'m> LeastSquares<'m> {
    /// The solver of merges of `a` and `b` (the models of `spec`).
    pub fn new(spec: &PermutationSpec, a: &'m StateDict, b: &'m StateDict) -> Self {
        LeastSquares {
            spec: spec.clone(),
            a,
            b,
            outputs: IndexMap::new(),
        }
    }

    /// [`least_squares`] of the two models by `plan`.
    pub fn merge(
        &mut self,
        plan: &IndexMap<String, GroupPlan>,
        zip_opts: &ZipOptions,
        opts: &LeastSquaresOptions,
        probe: &mut dyn Probe,
    ) -> Result<StateDict> {
        if !(opts.ridge.is_finite() && opts.ridge >= 0.0) {
            return Err(PermuteError::InvalidSpec(format!(
                "least-squares ridge {} (must be finite and ≥ 0)",
                opts.ridge
            )));
        }
        let (spec, a, b) = (&self.spec, self.a, self.b);
        let mut merged = zip(spec, a, b, plan, zip_opts)?;
        let by_weight = spec.by_weight();
        for step in &opts.steps {
            let Some(first) = step.first() else { continue };
            for w in step {
                let t = tensor(&merged, w)?;
                if t.shape().len() < 2 || zip_opts.lookups.contains(w) {
                    return Err(PermuteError::Shape {
                        what: format!("least squares of '{w}'"),
                        msg: "not a linear weight (a matrix or convolution with outputs on axis 0)"
                            .into(),
                    });
                }
                let (d, d0) = (w_in(&merged, w)?, w_in(&merged, first)?);
                if d != d0 {
                    return Err(PermuteError::Shape {
                        what: format!("least squares of '{w}'"),
                        msg: format!(
                            "it takes {d} inputs and '{first}' {d0}: one step's weights share their input"
                        ),
                    });
                }
            }
            let x = ask(probe, Source::Merged, &merged, first)?;
            outputs_of(&mut self.outputs, (a, b), step, probe)?;
            // Solve weights with a bias and weights without apart (at most two solves).
            let biased: Vec<bool> = step
                .iter()
                .map(|w| merged.contains(&bias_name(w)))
                .collect();
            for bias in [true, false] {
                let ws: Vec<&String> = step
                    .iter()
                    .zip(&biased)
                    .filter(|&(_, &has)| has == bias)
                    .map(|(w, _)| w)
                    .collect();
                if ws.is_empty() {
                    continue;
                }
                let mut targets = Vec::with_capacity(ws.len());
                for w in &ws {
                    let [za, zb] = &self.outputs[w.as_str()];
                    let shape = tensor(&merged, w)?.shape();
                    let axes = axis_maps(spec, &by_weight, plan, zip_opts, w, shape)?;
                    targets.push(zipped_outputs(&axes[0], za, zb, w)?);
                }
                let views: Vec<_> = targets.iter().map(|t| t.view()).collect();
                let target =
                    ndarray::concatenate(Axis(1), &views).map_err(|e| PermuteError::Shape {
                        what: format!("least squares of '{first}'"),
                        msg: e.to_string(),
                    })?;
                let d = w_in(&merged, ws[0])?;
                let theta = solve(&x, &target, bias, opts.ridge, d, first)?;
                let mut col = 0;
                for w in ws {
                    let (shape, dtype) = {
                        let t = tensor(&merged, w)?;
                        (t.shape().to_vec(), t.dtype)
                    };
                    let out = shape[0];
                    let block = theta.slice(ndarray::s![.., col..col + out]);
                    let weight = block
                        .slice(ndarray::s![..d, ..])
                        .t()
                        .mapv(|v| v as f32)
                        .into_shape_clone(ndarray::IxDyn(&shape))
                        .expect("the solved weight has the merged weight's size");
                    merged.insert(w.as_str(), Tensor::new(weight, dtype));
                    if bias {
                        let name = bias_name(w);
                        let dtype = tensor(&merged, &name)?.dtype;
                        let row = block.row(d).mapv(|v| v as f32).into_dyn();
                        merged.insert(name.as_str(), Tensor::new(row, dtype));
                    }
                    col += out;
                }
            }
        }
        Ok(merged)
    }
}

/// A's and B's outputs of every weight of `step` (from one probe of each
/// model, the step's weights sharing their input), unless already kept.
fn outputs_of(
    kept: &mut IndexMap<String, [Array2<f64>; 2]>,
    (a, b): (&StateDict, &StateDict),
    step: &[String],
    probe: &mut dyn Probe,
) -> Result<()> {
    if step.iter().all(|w| kept.contains_key(w)) {
        return Ok(());
    }
    let first = &step[0];
    let xa = ask(probe, Source::A, a, first)?;
    let xb = ask(probe, Source::B, b, first)?;
    for w in step {
        let za = outputs(a, w, &xa, "A")?;
        let zb = outputs(b, w, &xb, "B")?;
        kept.insert(w.clone(), [za, zb]);
    }
    Ok(())
}

/// The probe's inputs of `weight` in `source`, its failure named.
fn ask(probe: &mut dyn Probe, source: Source, sd: &StateDict, weight: &str) -> Result<Array2<f64>> {
    probe
        .inputs(source, sd, weight)
        .map_err(|e| PermuteError::Shape {
            what: format!("probe of '{weight}' in {source:?}"),
            msg: e.to_string(),
        })
}

/// `….weight` → `….bias`.
fn bias_name(weight: &str) -> String {
    format!("{}.bias", weight.strip_suffix(".weight").unwrap_or(weight))
}

/// The input width of a linear weight: the product of its axes after the first.
fn w_in(sd: &StateDict, weight: &str) -> Result<usize> {
    Ok(tensor(sd, weight)?.shape()[1..].iter().product())
}

/// Tensor `name` of `sd`, or an error naming it.
fn tensor<'s>(sd: &'s StateDict, name: &str) -> Result<&'s Tensor> {
    sd.get(name).ok_or_else(|| PermuteError::MissingWeight {
        model: "least squares".into(),
        weight: name.to_string(),
    })
}

/// A weight of `sd` as `[out, in]` in f64.
fn flat(sd: &StateDict, weight: &str) -> Result<Array2<f64>> {
    let t = tensor(sd, weight)?;
    let out = t.shape()[0];
    let d = w_in(sd, weight)?;
    Ok(t.data
        .mapv(f64::from)
        .into_shape_clone((out, d))
        .expect("a linear weight flattens to [out, in]"))
}

/// Checks a probe's inputs of `weight`: `[samples, in]` with finite values.
fn check_inputs(x: &Array2<f64>, d: usize, weight: &str, model: &str) -> Result<()> {
    if x.ncols() != d || x.nrows() == 0 {
        return Err(PermuteError::Shape {
            what: format!("probe inputs of '{weight}' in {model}"),
            msg: format!(
                "{:?}, the weight takes {d} features (and ≥ 1 sample)",
                x.dim()
            ),
        });
    }
    if let Some(v) = x.iter().find(|v| !v.is_finite()) {
        return Err(PermuteError::NonFinite {
            what: format!("probe inputs of '{weight}' in {model}"),
            msg: v.to_string(),
        });
    }
    Ok(())
}

/// A model's outputs of linear weight `weight` on its inputs `x`: `x Wᵀ + b`.
fn outputs(sd: &StateDict, weight: &str, x: &Array2<f64>, model: &str) -> Result<Array2<f64>> {
    check_inputs(x, w_in(sd, weight)?, weight, model)?;
    let mut z = x.dot(&flat(sd, weight)?.t());
    if let Some(b) = sd.get(&bias_name(weight)) {
        if b.data.len() != z.ncols() {
            return Err(PermuteError::Shape {
                what: bias_name(weight),
                msg: format!("{} values for {} outputs", b.data.len(), z.ncols()),
            });
        }
        for mut row in z.rows_mut() {
            row.iter_mut()
                .zip(b.data.iter())
                .for_each(|(v, &bi)| *v += f64::from(bi));
        }
    }
    Ok(z)
}

/// The zip of both models' outputs along the merged output axis `ax`.
fn zipped_outputs(
    ax: &AxisMap,
    za: &Array2<f64>,
    zb: &Array2<f64>,
    weight: &str,
) -> Result<Array2<f64>> {
    if za.nrows() != zb.nrows() {
        return Err(PermuteError::Shape {
            what: format!("probe inputs of '{weight}'"),
            msg: format!("{} samples in A, {} in B", za.nrows(), zb.nrows()),
        });
    }
    let mut t = Array2::zeros((za.nrows(), ax.a.len()));
    for (u, mut col) in t.columns_mut().into_iter().enumerate() {
        let (ia, ib, wa, wb) = (ax.a[u], ax.b[u], ax.wa[u], ax.wb[u]);
        for (r, v) in col.iter_mut().enumerate() {
            *v = wa * za[[r, ia]] + wb * zb[[r, ib]];
        }
    }
    Ok(t)
}

/// Ridge least squares of `[x 1]` (or `x` without a bias) onto `target`;
/// `θ` is `[in (+1), outputs]`.
fn solve(
    x: &Array2<f64>,
    target: &Array2<f64>,
    bias: bool,
    ridge: f64,
    d: usize,
    weight: &str,
) -> Result<Array2<f64>> {
    check_inputs(x, d, weight, "the merged model")?;
    if x.nrows() != target.nrows() {
        return Err(PermuteError::Shape {
            what: format!("probe inputs of '{weight}'"),
            msg: format!(
                "{} samples in the merged model, {} in A and B",
                x.nrows(),
                target.nrows()
            ),
        });
    }
    let x1 = if bias {
        ndarray::concatenate![Axis(1), *x, Array2::<f64>::ones((x.nrows(), 1))]
    } else {
        x.clone()
    };
    let lambda = ridge * x1.iter().map(|v| v * v).sum::<f64>() / x1.ncols() as f64;
    spectra::linalg::ridge_least_squares(x1.view(), target.view(), lambda, weight).map_err(|e| {
        PermuteError::Shape {
            what: format!("least squares of '{weight}'"),
            msg: e.to_string(),
        }
    })
}

/// The [`Probe`] of a ReLU MLP ([`crate::builders::mlp_layers`]'s names) on
/// samples `x`: each layer's input is the previous layer's output through a
/// ReLU (the first layer's is `x`). The inputs of the last model asked are
/// kept: a later ask whose layers before the weight hold the same values
/// (a least-squares solve moving forward) goes on from them.
pub struct MlpProbe {
    /// Inputs of layers 0, 1, … computed so far (the first is the samples).
    inputs: Vec<Array2<f64>>,
    /// The weight and bias of each layer those inputs went through (one
    /// fewer than `inputs`).
    through: Vec<(Tensor, Option<Tensor>)>,
}

impl MlpProbe {
    /// The probe on samples `x` (`[samples, inputs]`).
    pub fn new(x: Array2<f64>) -> MlpProbe {
        MlpProbe {
            inputs: vec![x],
            through: Vec::new(),
        }
    }
}

impl Probe for MlpProbe {
    fn inputs(
        &mut self,
        _: Source,
        sd: &StateDict,
        weight: &str,
    ) -> std::result::Result<Array2<f64>, ProbeError> {
        let layers = crate::builders::mlp_layers(sd)?;
        let stop = layers
            .iter()
            .position(|stem| format!("{stem}.weight") == weight)
            .ok_or_else(|| format!("'{weight}' is not a layer of the MLP"))?;
        // Layer j's kept input holds while layers 0..j are unchanged.
        let unchanged = |j: usize, (w, b): &(Tensor, Option<Tensor>)| {
            let same = |name: String, t: Option<&Tensor>| {
                sd.get(&name).map(|x| &x.data) == t.map(|t| &t.data)
            };
            same(format!("{}.weight", layers[j]), Some(w))
                && same(format!("{}.bias", layers[j]), b.as_ref())
        };
        let valid = self
            .through
            .iter()
            .take(stop)
            .enumerate()
            .take_while(|(j, p)| unchanged(*j, p))
            .count();
        self.through.truncate(valid);
        self.inputs.truncate(valid + 1);
        while self.inputs.len() <= stop {
            let j = self.inputs.len() - 1;
            let name = format!("{}.weight", layers[j]);
            let mut h = outputs(sd, &name, &self.inputs[j], "the MLP probe")?;
            h.mapv_inplace(|v| v.max(0.0));
            let bias = sd.get(&bias_name(&name)).cloned();
            self.through.push((tensor(sd, &name)?.clone(), bias));
            self.inputs.push(h);
        }
        Ok(self.inputs[stop].clone())
    }
}
