//! `pleas`: merging two MLPs trained on disjoint label sets (by default
//! digits 0–4 and 5–9) with PLeaS (Nasery et al., "PLeaS: Merging Models with
//! Permutations and Least Squares", arXiv 2407.02447).
//!
//! 1. **Partial matching.** The hidden units of B are matched to A's (no
//!    matching, weight matching, or activation matching on unlabelled data).
//!    In every hidden layer only the fraction `ratio` of best-correlated pairs
//!    is merged (or, with [`Allocation::Global`], the same number of pairs in
//!    all, taken from whichever layers correlate best); the other units of
//!    both models stay side by side, so the merged network is between one
//!    (`ratio = 1`) and two (`ratio = 0`, an ensemble) models wide.
//! 2. **Merging.** Either the weights of each merged pair are averaged (the
//!    ZipIt!-style zip: `W = M · [W_A U_A; W_B U_B]` with merge matrix `M` and
//!    unmerge matrices `U`), or — PLeaS — each layer is solved in turn by
//!    ridge least squares for the weights whose outputs, fed the merged
//!    model's own inputs, best reproduce the merged targets `M · [Z_A; Z_B]`
//!    of both models' pre-activations.
//!
//! The merged logits take each task's classes from the head of the model
//! trained on them (`--head task`, default) or average both heads
//! (`--head average`). The merged models are scored on all ten classes (joint
//! accuracy) and per task (the argmax over that task's classes only).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, ensure};
use ndarray::{Array2, Axis, concatenate};
use serde::Serialize;
use weights::StateDict;

use crate::data::{Split, default_mnist_dir, mnist};
use crate::mlp;
use crate::plot::{Series, line_chart};
use crate::report::{Run, RunArgs};
use crate::studies::lmc::{Arch, train_on};
use permute::many::{Correlation, activation_matching, correlation};
use permute::zip::{LeastSquares, LeastSquaresOptions, MlpProbe};
use permute::{MatchOptions, weight_matching};

/// How B's hidden units are paired with A's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Matching {
    /// Unit `i` of A with unit `i` of B (plain averaging at ratio 1).
    None,
    /// Weight matching (Git Re-Basin).
    Wm,
    /// Activation matching on the Pearson correlation of hidden units (PLeaS, ZipIt!).
    Am,
}

impl Matching {
    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Matching::None => "none",
            Matching::Wm => "wm",
            Matching::Am => "am",
        }
    }
}

/// The `--head` option: see [`Head`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum HeadArg {
    /// Each task's classes from the model trained on them.
    Task,
    /// The mean of both models' logits.
    Average,
}

/// How a merge ratio is spread over the hidden layers (the `--allocation` option).
pub use permute::zip::Allocation;

/// The networks the `pleas` study merges.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PleasArch {
    /// ReLU MLPs on MNIST digit subsets (zip and least squares).
    Mlp,
    /// Character-level LLaMA decoders on two texts (zip over the head-aware
    /// spec, [`crate::studies::pleas_llama`]).
    Llama,
    /// Small ResNets with channel LayerNorm on MNIST digit subsets (zip over
    /// the ResNet spec, [`crate::studies::pleas_cnn`]).
    Resnet,
    /// VGG-style CNNs on MNIST digit subsets (zip over the VGG spec).
    Vgg,
}

/// Options.
#[derive(Clone, Debug, clap::Args)]
pub struct PleasArgs {
    /// Tiny size for tests (width 64 × 2 layers, 2000 training samples, 3 epochs, 500 unlabelled samples).
    #[arg(long)]
    pub quick: bool,
    /// The networks: MLPs, ResNets or VGG-style CNNs on digit subsets (the
    /// CNNs take --width, --epochs, --head, --ratios, --allocation,
    /// --matchings none,wm, --split, --samples, --ridge, --seed), or LLaMA
    /// decoders on two texts (which take --width, --depth, --steps, --ratios,
    /// --matchings, --ridge, --seed and --data-dir as the text folder).
    #[arg(long, value_enum, default_value_t = PleasArch::Mlp)]
    pub arch: PleasArch,
    /// Training steps of each LLaMA (--arch llama; default 1500, quick 150).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Hidden width (default 512; 64 with `--quick`); the CNNs' stem width
    /// (default 8; 4 with `--quick`).
    #[arg(long)]
    pub width: Option<usize>,
    /// Hidden layers (default 3; 2 with `--quick`).
    #[arg(long)]
    pub depth: Option<usize>,
    /// Training epochs per model (default 5, CNNs 3; quick 3, CNNs 2).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Model A learns the labels below this one, model B the others.
    #[arg(long, default_value_t = 5)]
    pub split: usize,
    /// The merged logits: each task's classes from its model's head, or both heads averaged.
    #[arg(long, value_enum, default_value_t = HeadArg::Task)]
    pub head: HeadArg,
    /// Fractions of each hidden layer's units that are merged, comma-separated
    /// (1: one model's size; 0: both models side by side).
    #[arg(long, value_delimiter = ',', default_values_t = [1.0, 0.75, 0.5, 0.25, 0.0])]
    pub ratios: Vec<f64>,
    /// How each ratio is spread over the hidden layers: the same fraction in
    /// every layer, or the most correlated pairs of all layers.
    #[arg(long, value_enum, default_value_t = Allocation::Uniform)]
    pub allocation: Allocation,
    /// How units are matched, comma-separated (default none,wm,am; none,wm
    /// for the CNNs, which have no activation matching).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub matchings: Vec<Matching>,
    /// Unlabelled training samples (both tasks) for activation matching, the
    /// partial-matching correlations and the least-squares solves (default
    /// 2000; 500 with `--quick`; the CNNs' least squares: 256 images, 128
    /// with `--quick`).
    #[arg(long)]
    pub samples: Option<usize>,
    /// Ridge of the least-squares solves, relative to the mean squared input
    /// (`λ = ridge · ‖X‖²_F / d`).
    #[arg(long, default_value_t = 1e-3)]
    pub ridge: f64,
    /// Seeds of the two models (`2·seed`, `2·seed + 1`).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// idx folder (default: the vendored MNIST-10k).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Device (for training), report folder, progress.
    #[command(flatten)]
    pub run: RunArgs,
}

impl Default for PleasArgs {
    fn default() -> Self {
        PleasArgs {
            quick: false,
            arch: PleasArch::Mlp,
            steps: None,
            width: None,
            depth: None,
            epochs: None,
            split: 5,
            head: HeadArg::Task,
            ratios: vec![1.0, 0.75, 0.5, 0.25, 0.0],
            allocation: Allocation::Uniform,
            matchings: Vec::new(),
            samples: None,
            ridge: 1e-3,
            seed: 0,
            data_dir: None,
            run: RunArgs::default(),
        }
    }
}

impl PleasArgs {
    /// The matchings asked for, or the architecture's default.
    pub fn matchings(&self) -> Vec<Matching> {
        match (self.matchings.is_empty(), self.arch) {
            (false, _) => self.matchings.clone(),
            (true, PleasArch::Resnet | PleasArch::Vgg) => vec![Matching::None, Matching::Wm],
            (true, _) => vec![Matching::None, Matching::Wm, Matching::Am],
        }
    }
}

/// How one hidden layer of the merged model is made from A's and B's units
/// (the library's plan of one permutation group: merged pairs, then A's
/// units kept apart, then B's).
pub use permute::zip::GroupPlan as LayerPlan;

/// Partial matching of one layer: A's unit `i` is matched with B's unit
/// `perm[i]` with similarity `score[i]`; the `round(ratio · n)` most similar
/// pairs are merged and both units of every other pair are kept apart.
pub fn plan_layer(perm: &[usize], score: &[f64], ratio: f64) -> anyhow::Result<LayerPlan> {
    check_ratio(ratio)?;
    let merged = (ratio * perm.len() as f64).round() as usize;
    Ok(permute::zip::plan_group(
        perm,
        score,
        merged,
        "hidden layer",
    )?)
}

fn check_ratio(ratio: f64) -> anyhow::Result<()> {
    permute::zip::check_ratio(ratio).map_err(|e| anyhow::anyhow!("--ratios: {e}"))
}

/// Plans every hidden layer from its matched units (`(perm, score)` per layer,
/// as [`match_units`] returns them) at one merge ratio, spread over the layers
/// by `allocation` ([`permute::zip::plan_groups`] over the MLP's groups).
pub fn plan_layers(
    units: &[(Vec<usize>, Vec<f64>)],
    ratio: f64,
    allocation: Allocation,
) -> anyhow::Result<Vec<LayerPlan>> {
    check_ratio(ratio)?;
    let named: Vec<(String, Vec<usize>, Vec<f64>)> = units
        .iter()
        .enumerate()
        .map(|(l, (p, s))| (permute::builders::mlp_group(l), p.clone(), s.clone()))
        .collect();
    Ok(permute::zip::plan_groups(&named, ratio, allocation)?
        .into_values()
        .collect())
}

/// An MLP's weight shapes `[out, in]`, layer by layer.
type Layers = Vec<(usize, usize)>;

fn layers_of(sd: &StateDict, model: &str) -> anyhow::Result<Layers> {
    let layers = mlp::layer_params(sd).map_err(|e| anyhow::anyhow!("model {model}: {e}"))?;
    layers
        .into_iter()
        .map(|(w, _)| match w.shape() {
            &[out, inp] => Ok((out, inp)),
            s => bail!("model {model}: a weight of shape {s:?} is not a matrix"),
        })
        .collect()
}

/// Both models' layers, checked to have the same shapes.
fn check_models(a: &StateDict, b: &StateDict) -> anyhow::Result<(Layers, Layers)> {
    let (la, lb) = (layers_of(a, "A")?, layers_of(b, "B")?);
    ensure!(
        la.len() == lb.len(),
        "models A and B have {} and {} layers",
        la.len(),
        lb.len()
    );
    for (i, (x, y)) in la.iter().zip(&lb).enumerate() {
        ensure!(x == y, "layers.{i}.weight is {x:?} in A but {y:?} in B",);
    }
    Ok((la, lb))
}

/// Checks one plan per hidden layer of `la`, each covering the layer's units.
fn check_plans(la: &Layers, plans: &[LayerPlan]) -> anyhow::Result<()> {
    ensure!(
        plans.len() + 1 == la.len(),
        "{} layer plans for {} hidden layers",
        plans.len(),
        la.len() - 1
    );
    for (i, p) in plans.iter().enumerate() {
        ensure!(
            p.source_width() == la[i].0 && p.only_b.len() == p.only_a.len(),
            "the plan of hidden layer {i} covers {} units, the layer has {}",
            p.source_width(),
            la[i].0
        );
    }
    Ok(())
}

/// How the merged model's logits are made from the two models' logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Head {
    /// Classes below the value from A's head, the others from B's: each task
    /// keeps the output rows trained on it (as multi-task merging does).
    Split(usize),
    /// The mean of both models' logits (plain averaging of the last layer, as
    /// Git Re-Basin merges models trained on different label subsets).
    Average,
}

impl Head {
    /// The merge matrix of the logits (`classes × 2·classes`).
    pub fn merge_matrix(self, classes: usize) -> anyhow::Result<Array2<f64>> {
        if let Head::Split(k) = self {
            ensure!(
                k <= classes,
                "head split {k}: the models have only {classes} classes"
            );
        }
        let mut m = Array2::zeros((classes, 2 * classes));
        for c in 0..classes {
            match self {
                Head::Split(k) => m[[c, if c < k { c } else { classes + c }]] = 1.0,
                Head::Average => {
                    m[[c, c]] = 0.5;
                    m[[c, classes + c]] = 0.5;
                }
            }
        }
        Ok(m)
    }

    /// The ensemble's logits: this head applied to both models' logits.
    pub fn combine(self, a: &Array2<f32>, b: &Array2<f32>) -> anyhow::Result<Array2<f32>> {
        let m = self.merge_matrix(a.ncols())?.mapv(|v| v as f32);
        Ok(concatenate![Axis(1), *a, *b].dot(&m.t()))
    }
}

/// The library's view of an MLP merge: the MLP's spec, the plans by group
/// name, and the head as the output mix of the last layer.
type ZipParts = (
    permute::PermutationSpec,
    indexmap::IndexMap<String, LayerPlan>,
    permute::zip::ZipOptions,
);

/// Checks A, B and the plans (one per hidden layer) and gives them as [`ZipParts`].
fn zip_parts(
    a: &StateDict,
    b: &StateDict,
    plans: &[LayerPlan],
    head: Head,
) -> anyhow::Result<ZipParts> {
    let (la, _) = check_models(a, b)?;
    check_plans(&la, plans)?;
    let spec = permute::builders::mlp(a)?;
    let plan = plans
        .iter()
        .enumerate()
        .map(|(l, p)| (permute::builders::mlp_group(l), p.clone()))
        .collect();
    let classes = la[la.len() - 1].0;
    let m = head.merge_matrix(classes)?;
    let mix: Vec<[f64; 2]> = (0..classes)
        .map(|c| [m[[c, c]], m[[c, classes + c]]])
        .collect();
    let last = la.len() - 1;
    let opts = permute::zip::ZipOptions {
        lookups: vec![],
        output_mix: [
            (format!("layers.{last}.weight"), mix.clone()),
            (format!("layers.{last}.bias"), mix),
        ]
        .into_iter()
        .collect(),
    };
    Ok((spec, plan, opts))
}

/// Zips A and B by `plans` (one per hidden layer), averaging each merged
/// pair ([`permute::zip::zip`] over the MLP's spec), with the logits merged
/// by `head`. Ratio 0 everywhere is the ensemble, ratio 1 with
/// [`Head::Average`] the average of A and the permuted B.
pub fn zip_merge(
    a: &StateDict,
    b: &StateDict,
    plans: &[LayerPlan],
    head: Head,
) -> anyhow::Result<StateDict> {
    let (spec, plan, opts) = zip_parts(a, b, plans, head)?;
    Ok(permute::zip::zip(&spec, a, b, &plan, &opts)?)
}

/// PLeaS's least squares of two MLPs on unlabelled samples: A's and B's
/// pre-activations are computed on the first solve and kept for every plan.
pub struct MlpSolver<'m> {
    a: &'m StateDict,
    b: &'m StateDict,
    solver: LeastSquares<'m>,
    probe: MlpProbe,
}

impl<'m> MlpSolver<'m> {
    /// Checks A and B (same MLP shape) and takes the samples `x` (`[n, inputs]`).
    pub fn new(a: &'m StateDict, b: &'m StateDict, x: &Array2<f32>) -> anyhow::Result<Self> {
        check_models(a, b)?;
        let spec = permute::builders::mlp(a)?;
        Ok(MlpSolver {
            a,
            b,
            solver: LeastSquares::new(&spec, a, b),
            probe: MlpProbe::new(x.mapv(f64::from)),
        })
    }

    /// PLeaS: the merged model's layers, one after the other, by ridge least
    /// squares ([`permute::zip::least_squares`] over the MLP's spec) —
    /// `[W_l b_l] = argmin ‖[X_l 1] [W_l b_l]ᵀ − [Z_A Z_B] M_lᵀ‖² + λ‖·‖²`,
    /// where `X_l` is the merged model's own input to layer `l` on the
    /// samples (so each solve corrects the error of the layers before it)
    /// and `Z_A`, `Z_B` are the two models' pre-activations. `ridge` is
    /// relative: `λ = ridge · ‖[X_l 1]‖²_F / d`. Layers before `first` are
    /// zipped ([`zip_merge`]) instead: `first = 0` is PLeaS, the last layer's
    /// index refits only the head on the averaged body (an ablation).
    pub fn merge(
        &mut self,
        plans: &[LayerPlan],
        head: Head,
        ridge: f64,
        first: usize,
    ) -> anyhow::Result<StateDict> {
        let (_, plan, opts) = zip_parts(self.a, self.b, plans, head)?;
        let layers = permute::builders::mlp_layers(self.a)?;
        ensure!(
            first < layers.len(),
            "least squares from layer {first}: the models have {} layers",
            layers.len()
        );
        check_ridge(ridge)?;
        let ls = LeastSquaresOptions {
            steps: layers[first..]
                .iter()
                .map(|stem| vec![format!("{stem}.weight")])
                .collect(),
            ridge,
        };
        Ok(self.solver.merge(&plan, &opts, &ls, &mut self.probe)?)
    }
}

/// Checks the `--ridge` of the least-squares solves: finite and ≥ 0.
pub fn check_ridge(ridge: f64) -> anyhow::Result<()> {
    ensure!(
        ridge.is_finite() && ridge >= 0.0,
        "--ridge: {ridge} (must be finite and ≥ 0)"
    );
    Ok(())
}

/// [`MlpSolver::merge`] for one plan (builds the solver of `a`, `b`, `x`).
pub fn least_squares_merge(
    a: &StateDict,
    b: &StateDict,
    plans: &[LayerPlan],
    head: Head,
    x: &Array2<f32>,
    ridge: f64,
    first: usize,
) -> anyhow::Result<StateDict> {
    MlpSolver::new(a, b, x)?.merge(plans, head, ridge, first)
}

/// For each hidden layer, B's unit matched to each of A's units and the
/// Pearson correlation of the pair's activations on `x`.
pub fn match_units(
    matching: Matching,
    a: &StateDict,
    b: &StateDict,
    x: &Array2<f32>,
    seed: u64,
) -> anyhow::Result<Vec<(Vec<usize>, Vec<f64>)>> {
    let acts_a = mlp::hidden_activations(a, x);
    let acts_b = mlp::hidden_activations(b, x);
    let perm = match matching {
        Matching::None => None,
        Matching::Am => Some(activation_matching(&acts_a, &acts_b, Correlation::Pearson)?.0),
        Matching::Wm => {
            let spec = permute::builders::mlp(a)?;
            let opts = MatchOptions {
                seed,
                ..Default::default()
            };
            Some(weight_matching(&spec, a, b, &opts)?.perm)
        }
    };
    acts_a
        .iter()
        .map(|(name, xa)| {
            let c = correlation(xa, &acts_b[name], Correlation::Pearson);
            let p = match &perm {
                Some(p) => p[name].outer.clone(),
                None => (0..c.nrows()).collect(),
            };
            let score = p.iter().enumerate().map(|(i, &j)| c[[i, j]]).collect();
            Ok((p, score))
        })
        .collect()
}

/// The units of [`match_units`] as a permutation of B over the MLP spec of `a`.
pub fn permutation_of(
    units: &[(Vec<usize>, Vec<f64>)],
    a: &StateDict,
) -> anyhow::Result<permute::Permutation> {
    let spec = permute::builders::mlp(a)?;
    let mut perm = spec.identity();
    ensure!(
        perm.len() == units.len(),
        "{} matched layers for {} hidden layers",
        units.len(),
        perm.len()
    );
    for (i, (p, _)) in units.iter().enumerate() {
        perm[&permute::builders::mlp_group(i)].outer = p.clone();
    }
    spec.check_value(&perm)?;
    Ok(perm)
}

/// Joint and per-task quality of a (merged) MLP (read back without the
/// `task_mean_acc` it is written with).
#[derive(Clone, Copy, Debug, PartialEq, serde::Deserialize)]
pub struct Scores {
    /// Cross-entropy over all classes.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub joint_loss: f64,
    /// Accuracy over all classes.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub joint_acc: f64,
    /// Task A's samples, argmax over its classes (`< split`).
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub task_a_acc: f64,
    /// Task B's samples, argmax over its classes (`≥ split`).
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub task_b_acc: f64,
}

impl Scores {
    /// Mean of the two per-task accuracies.
    pub fn task_mean(&self) -> f64 {
        (self.task_a_acc + self.task_b_acc) / 2.0
    }
}

impl Serialize for Scores {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Scores", 5)?;
        st.serialize_field("joint_loss", &self.joint_loss)?;
        st.serialize_field("joint_acc", &self.joint_acc)?;
        st.serialize_field("task_a_acc", &self.task_a_acc)?;
        st.serialize_field("task_b_acc", &self.task_b_acc)?;
        st.serialize_field("task_mean_acc", &self.task_mean())?;
        st.end()
    }
}

fn argmax(row: ndarray::ArrayView1<'_, f32>, from: usize, to: usize) -> usize {
    (from..to).fold(from, |best, k| if row[k] > row[best] { k } else { best })
}

/// Scores logits (`[n, classes]`) against labels, task A being the labels below `split`.
pub fn score_logits(logits: &Array2<f32>, y: &[usize], split: usize) -> Scores {
    let classes = logits.ncols();
    let (mut loss, mut joint) = (0f64, 0usize);
    let (mut hits, mut counts) = ([0usize; 2], [0usize; 2]);
    for (row, &label) in logits.rows().into_iter().zip(y) {
        let m = row.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
        let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
        loss += lse - row[label] as f64;
        joint += usize::from(argmax(row, 0, classes) == label);
        let t = usize::from(label >= split);
        let (from, to) = if t == 0 { (0, split) } else { (split, classes) };
        counts[t] += 1;
        hits[t] += usize::from(argmax(row, from, to) == label);
    }
    let n = y.len().max(1) as f64;
    Scores {
        joint_loss: loss / n,
        joint_acc: joint as f64 / n,
        task_a_acc: hits[0] as f64 / counts[0].max(1) as f64,
        task_b_acc: hits[1] as f64 / counts[1].max(1) as f64,
    }
}

fn logits(sd: &StateDict, x: &Array2<f32>) -> Array2<f32> {
    mlp::layer_outputs(sd, x).pop().expect("at least one layer")
}

/// The samples of `data` whose label is in `range`.
pub(crate) fn labels_in(data: &Split, range: std::ops::Range<usize>) -> Split {
    let idx: Vec<usize> = (0..data.y.len())
        .filter(|&i| range.contains(&data.y[i]))
        .collect();
    data.rows(&idx)
}

/// Runs the study; returns the report folder.
/// The two source models, their ensemble, and every merge: `metrics.json`.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct PleasMetrics {
    /// MLP layer sizes.
    pub sizes: Vec<usize>,
    /// Task A's labels are below this.
    pub split: usize,
    /// `uniform` or `global`.
    pub allocation: String,
    /// A, B and their ensemble.
    pub models: Models,
    /// One row per matching and ratio.
    pub merges: Vec<MergeRow>,
    /// Seconds each matching took.
    pub matching_seconds: indexmap::IndexMap<String, f64>,
    /// Per matching: L2 of the aligned B to A, mean matched correlation per layer.
    pub matching: indexmap::IndexMap<String, MatchingStats>,
}

/// The unmerged models' scores.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Models {
    /// Model A (task A's labels).
    pub a: Scores,
    /// Model B.
    pub b: Scores,
    /// Both side by side, each head on its task (or averaged).
    pub ensemble: Scores,
}

/// One matching's alignment quality.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct MatchingStats {
    /// ‖A − P·B‖.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub l2: f64,
    /// Mean correlation of the matched pairs, per hidden layer.
    pub mean_correlation: Vec<f64>,
}

/// One merge plan merged three ways.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct MergeRow {
    /// `none`, `wm` or `am`.
    pub matching: String,
    /// Fraction of unit pairs merged.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub ratio: f64,
    /// Merged hidden units per hidden unit of one model (1 to 2).
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub width: f64,
    /// Pairs merged per hidden layer.
    pub merged_pairs: Vec<usize>,
    /// Parameters of the merged MLP.
    pub params: usize,
    /// … per parameter of one model.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub params_ratio: f64,
    /// Zip merge, averaging each merged pair.
    pub average: Scores,
    /// PLeaS: every layer solved by least squares.
    pub least_squares: Scores,
    /// Only the last layer solved.
    pub least_squares_head: Scores,
    /// Seconds the least-squares merge took.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub least_squares_seconds: f64,
}

/// The sizes `run` works with after `--quick` and the options.
struct Sizes {
    width: usize,
    depth: usize,
    epochs: usize,
    n_train: usize,
    samples: usize,
}

/// Checks the options (named errors) and fixes the sizes.
fn sizes_of(args: &PleasArgs) -> anyhow::Result<Sizes> {
    // `--quick` changes the defaults; options given explicitly still apply.
    let (width, depth, epochs, n_train, samples) = if args.quick {
        (64, 2, 3, 2000, 500)
    } else {
        (512, 3, 5, usize::MAX, 2000)
    };
    let z = Sizes {
        width: args.width.unwrap_or(width),
        depth: args.depth.unwrap_or(depth),
        epochs: args.epochs.unwrap_or(epochs),
        n_train,
        samples: args.samples.unwrap_or(samples),
    };
    ensure!(
        z.width > 0 && z.depth > 0 && z.epochs > 0 && z.samples > 0,
        "--width, --depth, --epochs and --samples must be positive"
    );
    ensure!(
        !args.ratios.is_empty(),
        "--ratios: give at least one fraction"
    );
    for &r in &args.ratios {
        ensure!(
            (0.0..=1.0).contains(&r),
            "--ratios: {r} is not a fraction in [0, 1]"
        );
    }
    check_ridge(args.ridge)?;
    ensure!(
        (1..CLASSES).contains(&args.split),
        "--split {}: must be between 1 and {} so both tasks have labels",
        args.split,
        CLASSES - 1
    );
    Ok(z)
}

/// Digit classes.
pub(crate) const CLASSES: usize = 10;

/// The data: the two tasks' training sets, the probe and the test set.
struct Data {
    task_a: Split,
    task_b: Split,
    probe: Split,
    test: Split,
}

fn load_data(args: &PleasArgs, z: &Sizes, run: &mut Run) -> anyhow::Result<Data> {
    let dir = args.data_dir.clone().unwrap_or_else(default_mnist_dir);
    let (train, test) = run.phase("load data", || mnist(&dir))?;
    let train = train.take(z.n_train);
    if let Some(&bad) = train.y.iter().chain(&test.y).find(|&&y| y >= CLASSES) {
        bail!(
            "{}: label {bad}; this study expects 10 classes",
            dir.display()
        );
    }
    let task_a = labels_in(&train, 0..args.split);
    let task_b = labels_in(&train, args.split..CLASSES);
    ensure!(
        !task_a.y.is_empty() && !task_b.y.is_empty(),
        "--split {}: one task has no training samples",
        args.split
    );
    Ok(Data {
        task_a,
        task_b,
        probe: train.take(z.samples),
        test,
    })
}

/// Models A and B (seeds `2·seed` and `2·seed + 1`), each on its task.
fn train_models(
    args: &PleasArgs,
    z: &Sizes,
    d: &Data,
    sizes: &[usize],
    run: &mut Run,
) -> anyhow::Result<(StateDict, StateDict)> {
    let dev = run.device;
    let steps = (d.task_a.y.len().div_ceil(128) + d.task_b.y.len().div_ceil(128)) * z.epochs;
    let bar = run.progress(steps as u64);
    let out = run.phase("train", || -> anyhow::Result<(StateDict, StateDict)> {
        let seeds = (2 * args.seed, 2 * args.seed + 1);
        let a = mlp::init_state_dict(sizes, seeds.0);
        let b = mlp::init_state_dict(sizes, seeds.1);
        Ok((
            train_on(dev, Arch::Mlp, &a, &d.task_a, z.epochs, seeds.0, &bar)?,
            train_on(dev, Arch::Mlp, &b, &d.task_b, z.epochs, seeds.1, &bar)?,
        ))
    })?;
    bar.finish_and_clear();
    Ok(out)
}

/// What every merge needs: the models, the least-squares probe, the head.
struct MergeInputs<'a> {
    args: &'a PleasArgs,
    a: &'a StateDict,
    b: &'a StateDict,
    probe: &'a Split,
    solver: std::cell::RefCell<MlpSolver<'a>>,
    head: Head,
    test: &'a Split,
    depth: usize,
}

impl MergeInputs<'_> {
    fn score(&self, sd: &StateDict) -> Scores {
        score_logits(&logits(sd, &self.test.x), &self.test.y, self.args.split)
    }

    /// One matching: its stats, then a merge row per ratio (and their CSV lines).
    fn matching(
        &self,
        matching: Matching,
        run: &mut Run,
        m: &mut PleasMetrics,
        csv: &mut String,
        bar: &indicatif::ProgressBar,
    ) -> anyhow::Result<()> {
        let t = Instant::now();
        let units = run.phase(&format!("match {}", matching.name()), || {
            match_units(matching, self.a, self.b, &self.probe.x, self.args.seed)
        })?;
        m.matching_seconds
            .insert(matching.name().to_string(), t.elapsed().as_secs_f64());
        let spec = permute::builders::mlp(self.a)?;
        let b_aligned = permute::apply(&spec, &permutation_of(&units, self.a)?, self.b)?;
        m.matching.insert(
            matching.name().to_string(),
            MatchingStats {
                l2: permute::matching::l2_distance(self.a, &b_aligned),
                mean_correlation: units
                    .iter()
                    .map(|(_, sc)| sc.iter().sum::<f64>() / sc.len() as f64)
                    .collect(),
            },
        );
        for &ratio in &self.args.ratios {
            let row = self.merge(matching, &units, ratio, run)?;
            for (method, s) in [
                ("average", row.average),
                ("least_squares", row.least_squares),
                ("least_squares_head", row.least_squares_head),
            ] {
                csv.push_str(&format!(
                    "{},{ratio},{:.4},{:.4},{method},{:.6},{:.6},{:.6},{:.6},{:.6}\n",
                    matching.name(),
                    row.width,
                    row.params_ratio,
                    s.joint_loss,
                    s.joint_acc,
                    s.task_a_acc,
                    s.task_b_acc,
                    s.task_mean()
                ));
            }
            m.merges.push(row);
            bar.inc(1);
        }
        Ok(())
    }

    /// [`MlpSolver::merge`] of A and B by `plans`, from layer `first`.
    fn least_squares(&self, plans: &[LayerPlan], first: usize) -> anyhow::Result<StateDict> {
        self.solver
            .borrow_mut()
            .merge(plans, self.head, self.args.ridge, first)
    }

    /// The plan at `ratio`, merged by averaging, least squares and least squares of the head.
    fn merge(
        &self,
        matching: Matching,
        units: &[(Vec<usize>, Vec<f64>)],
        ratio: f64,
        run: &mut Run,
    ) -> anyhow::Result<MergeRow> {
        let plans = plan_layers(units, ratio, self.args.allocation)?;
        let avg = zip_merge(self.a, self.b, &plans, self.head)?;
        let t = Instant::now();
        let ls = run.phase(
            &format!("least squares {} {ratio}", matching.name()),
            || self.least_squares(&plans, 0),
        )?;
        let least_squares_seconds = t.elapsed().as_secs_f64();
        let ls_head = self.least_squares(&plans, self.depth)?;
        Ok(MergeRow {
            matching: matching.name().to_string(),
            ratio,
            width: plans.iter().map(LayerPlan::width).sum::<usize>() as f64
                / plans.iter().map(LayerPlan::source_width).sum::<usize>() as f64,
            merged_pairs: plans.iter().map(|p| p.pairs.len()).collect(),
            params: avg.numel(),
            params_ratio: avg.numel() as f64 / self.a.numel() as f64,
            average: self.score(&avg),
            least_squares: self.score(&ls),
            least_squares_head: self.score(&ls_head),
            least_squares_seconds,
        })
    }
}

/// Runs the study; returns the report folder.
pub fn run(args: &PleasArgs) -> anyhow::Result<PathBuf> {
    match args.arch {
        PleasArch::Llama => return crate::studies::pleas_llama::run(args),
        PleasArch::Resnet | PleasArch::Vgg => return crate::studies::pleas_cnn::run(args),
        PleasArch::Mlp => {}
    }
    ensure!(
        args.steps.is_none(),
        "--steps applies to --arch llama; the MLPs train for --epochs"
    );
    let z = sizes_of(args)?;
    let mut run = args.run.open("pleas")?;
    let d = load_data(args, &z, &mut run)?;
    let head = match args.head {
        HeadArg::Task => Head::Split(args.split),
        HeadArg::Average => Head::Average,
    };
    let sizes = mlp::layer_sizes(d.probe.x.ncols(), z.width, z.depth, CLASSES);
    let (a, b) = train_models(args, &z, &d, &sizes, &mut run)?;
    let solver = run.phase("least-squares probe", || MlpSolver::new(&a, &b, &d.probe.x))?;
    let (logits_a, logits_b) = (logits(&a, &d.test.x), logits(&b, &d.test.x));
    let score = |l: &Array2<f32>| score_logits(l, &d.test.y, args.split);
    let mut m = PleasMetrics {
        sizes,
        split: args.split,
        allocation: args.allocation.name().to_string(),
        models: Models {
            a: score(&logits_a),
            b: score(&logits_b),
            ensemble: score(&head.combine(&logits_a, &logits_b)?),
        },
        merges: Vec::new(),
        matching_seconds: Default::default(),
        matching: Default::default(),
    };
    run.partial(&m)?;
    let inputs = MergeInputs {
        args,
        a: &a,
        b: &b,
        probe: &d.probe,
        solver: std::cell::RefCell::new(solver),
        head,
        test: &d.test,
        depth: z.depth,
    };
    let bar = run.progress((args.matchings().len() * args.ratios.len()) as u64);
    let mut csv = String::from(
        "matching,ratio,width,params_ratio,method,joint_loss,joint_acc,task_a_acc,task_b_acc,task_mean_acc\n",
    );
    for matching in args.matchings() {
        inputs.matching(matching, &mut run, &mut m, &mut csv, &bar)?;
        run.write("merges.csv", csv.as_bytes())?;
        run.partial(&m)?;
    }
    bar.finish_and_clear();
    plot_merges(&m, args, &run)?;
    let md = report(&m, args, &z, &d);
    run.finish(&m, &md)?;
    Ok(run.dir.clone())
}

/// Accuracy against merged width, one line per matching × method.
fn plot_merges(m: &PleasMetrics, args: &PleasArgs, run: &Run) -> anyhow::Result<()> {
    let joint: fn(&Scores) -> f64 = |s| s.joint_acc;
    let task: fn(&Scores) -> f64 = |s| s.task_mean();
    for (value, stem, title) in [
        (
            joint,
            "joint_accuracy_vs_size",
            "Accuracy on all 10 classes vs merged width",
        ),
        (
            task,
            "task_accuracy_vs_size",
            "Mean per-task accuracy vs merged width",
        ),
    ] {
        let mut series = Vec::new();
        for matching in args.matchings() {
            for (label, method) in [
                ("avg", (|r: &MergeRow| r.average) as fn(&MergeRow) -> Scores),
                ("LS", |r: &MergeRow| r.least_squares),
            ] {
                let mut pts: Vec<(f64, f64)> = m
                    .merges
                    .iter()
                    .filter(|r| r.matching == matching.name())
                    .map(|r| (r.width, value(&method(r))))
                    .collect();
                pts.sort_by(|x, y| x.0.total_cmp(&y.0));
                series.push(Series::line(format!("{} {label}", matching.name()), pts));
            }
        }
        let ms = &m.models;
        series.push(Series::dots(
            "A, B alone",
            vec![(1.0, value(&ms.a)), (1.0, value(&ms.b))],
        ));
        series.push(Series::dots("ensemble", vec![(2.0, value(&ms.ensemble))]));
        line_chart(
            &run.dir.join(stem),
            title,
            "merged hidden width (× one model's)",
            "accuracy",
            &series,
        )?;
    }
    Ok(())
}

/// `report.md`.
fn report(m: &PleasMetrics, args: &PleasArgs, z: &Sizes, d: &Data) -> String {
    let mut md = format!(
        "# PLeaS: partial matching and least squares\n\nMLP {:?}; model A trained on labels 0–{} ({} samples), model B on {}–9 ({} samples), {} epoch(s) each; {} unlabelled samples for matching and least squares (ridge {}); merge ratios spread over the layers: {}.\n\n| model | joint acc | task A acc | task B acc | joint loss |\n|---|---|---|---|---|\n",
        m.sizes,
        args.split - 1,
        d.task_a.y.len(),
        args.split,
        d.task_b.y.len(),
        z.epochs,
        d.probe.y.len(),
        args.ridge,
        m.allocation
    );
    for (name, s) in [
        ("A", m.models.a),
        ("B", m.models.b),
        ("ensemble (2×)", m.models.ensemble),
    ] {
        md.push_str(&format!(
            "| {name} | {:.4} | {:.4} | {:.4} | {:.4} |\n",
            s.joint_acc, s.task_a_acc, s.task_b_acc, s.joint_loss
        ));
    }
    md.push_str("\n| matching | merged fraction | width | parameters | average: joint acc | average: per-task acc | least squares: joint acc | least squares: per-task acc | LS of the head only: per-task acc |\n|---|---|---|---|---|---|---|---|---|\n");
    for r in &m.merges {
        md.push_str(&format!(
            "| {} | {} | {:.2}× | {:.2}× | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} |\n",
            r.matching,
            serde_json::json!(r.ratio),
            r.width,
            r.params_ratio,
            r.average.joint_acc,
            r.average.task_mean(),
            r.least_squares.joint_acc,
            r.least_squares.task_mean(),
            r.least_squares_head.task_mean(),
        ));
    }
    md.push_str("\n![joint accuracy](joint_accuracy_vs_size.png)\n\n![per-task accuracy](task_accuracy_vs_size.png)\n");
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(sizes: &[usize], seed: u64) -> StateDict {
        mlp::init_state_dict(sizes, seed)
    }

    fn inputs(n: usize, d: usize, seed: u64) -> Array2<f32> {
        let mut rng = weights::rng::Rng::new(seed);
        rng.normal_array((n, d))
    }

    fn max_diff(x: &Array2<f32>, y: &Array2<f32>) -> f32 {
        (x - y).iter().fold(0f32, |m, v| m.max(v.abs()))
    }

    const SIZES: [usize; 4] = [6, 8, 8, 3];

    #[test]
    fn plan_merges_the_most_similar_pairs_and_keeps_the_rest_apart() {
        let perm = [2, 0, 3, 1];
        let score = [0.9, 0.1, 0.5, 0.7];
        let p = plan_layer(&perm, &score, 0.5).unwrap();
        assert_eq!(p.pairs, vec![(0, 2), (3, 1)]);
        assert_eq!(p.only_a, vec![1, 2]);
        assert_eq!(p.only_b, vec![0, 3]);
        assert_eq!(p.width(), 6);
        assert_eq!(plan_layer(&perm, &score, 1.0).unwrap().width(), 4);
        assert_eq!(plan_layer(&perm, &score, 0.0).unwrap().width(), 8);
        // Merge then unmerge gives each unit back its pair's average.
        let (ua, ub) = p.unmerge_matrices();
        let m = p.merge_matrix();
        assert_eq!(m.dim(), (6, 8));
        assert_eq!(ua.dim(), (4, 6));
        let f = ndarray::Array1::from(vec![1.0, 2.0, 3.0, 4.0, 10.0, 20.0, 30.0, 40.0]);
        let merged = m.dot(&f);
        // Pair (A0, B2) averages 1 and 30; A1 alone is 2; B0 alone is 10.
        assert_eq!(ua.dot(&merged)[0], 15.5);
        assert_eq!(ua.dot(&merged)[1], 2.0);
        assert_eq!(ub.dot(&merged)[0], 10.0);
    }

    #[test]
    fn plan_names_bad_input() {
        let e = plan_layer(&[0, 1], &[0.1, 0.2], 1.5).unwrap_err();
        assert!(e.to_string().contains("--ratios"), "{e}");
        let e = plan_layer(&[0, 0], &[0.1, 0.2], 0.5).unwrap_err();
        assert!(e.to_string().contains("not a permutation"), "{e}");
        assert!(plan_layer(&[0, 1], &[0.1, f64::NAN], 0.5).is_err());
        assert!(plan_layer(&[0, 1], &[0.1], 0.5).is_err());
    }

    fn plans(
        a: &StateDict,
        b: &StateDict,
        m: Matching,
        ratio: f64,
        x: &Array2<f32>,
    ) -> Vec<LayerPlan> {
        plan_layers(
            &match_units(m, a, b, x, 0).unwrap(),
            ratio,
            Allocation::Uniform,
        )
        .unwrap()
    }

    #[test]
    fn global_allocation_merges_the_most_correlated_pairs_of_all_layers() {
        // Layer 0 (4 units) is alike across the models, layer 1 (6 units) is not.
        let units = vec![
            (vec![1, 0, 3, 2], vec![0.9, 0.8, 0.7, 0.0]),
            (
                vec![0, 1, 2, 3, 4, 5],
                vec![0.5, 0.1, 0.2, -0.3, 0.05, 0.75],
            ),
        ];
        // Ratio 0.5: 5 of the 10 pairs. Ranked: 0.9, 0.8, 0.75 (layer 1),
        // 0.7, 0.5 (layer 1): three pairs in layer 0, two in layer 1.
        let g = plan_layers(&units, 0.5, Allocation::Global).unwrap();
        assert_eq!(g[0].pairs, vec![(0, 1), (1, 0), (2, 3)]);
        assert_eq!(
            (g[0].only_a.clone(), g[0].only_b.clone()),
            (vec![3], vec![2])
        );
        assert_eq!(g[1].pairs, vec![(0, 0), (5, 5)]);
        assert_eq!(g[1].only_a, vec![1, 2, 3, 4]);
        // Uniform: round(0.5 · 4) = 2 and round(0.5 · 6) = 3 pairs; both merge 5.
        let u = plan_layers(&units, 0.5, Allocation::Uniform).unwrap();
        assert_eq!(u[0].pairs, vec![(0, 1), (1, 0)]);
        assert_eq!(u[1].pairs, vec![(0, 0), (2, 2), (5, 5)]);
        let merged = |p: &[LayerPlan]| p.iter().map(|l| l.pairs.len()).sum::<usize>();
        assert_eq!((merged(&g), merged(&u)), (5, 5));
        // At the ends both allocations are the same plans.
        for r in [0.0, 1.0] {
            assert_eq!(
                plan_layers(&units, r, Allocation::Global).unwrap(),
                plan_layers(&units, r, Allocation::Uniform).unwrap()
            );
        }
        // Bad input is refused under either allocation.
        for alloc in [Allocation::Uniform, Allocation::Global] {
            let e = plan_layers(&units, 1.5, alloc).unwrap_err();
            assert!(e.to_string().contains("--ratios"), "{e}");
            let bad = vec![(vec![0, 1], vec![0.1, f64::NAN])];
            assert!(plan_layers(&bad, 0.5, alloc).is_err());
            let short = vec![(vec![0, 1], vec![0.1])];
            assert!(plan_layers(&short, 0.5, alloc).is_err());
        }
    }

    #[test]
    fn heads_pick_each_task_s_logits_or_average_them() {
        let a = ndarray::array![[1.0, 2.0, 3.0]];
        let b = ndarray::array![[10.0, 20.0, 30.0]];
        assert_eq!(
            Head::Split(1).combine(&a, &b).unwrap(),
            ndarray::array![[1.0, 20.0, 30.0]]
        );
        assert_eq!(
            Head::Average.combine(&a, &b).unwrap(),
            ndarray::array![[5.5, 11.0, 16.5]]
        );
        let e = Head::Split(4).combine(&a, &b).unwrap_err();
        assert!(e.to_string().contains("split 4"), "{e}");
    }

    #[test]
    fn zip_at_ratio_zero_is_the_ensemble() {
        let (a, b) = (model(&SIZES, 1), model(&SIZES, 2));
        let x = inputs(40, 6, 3);
        let p = plans(&a, &b, Matching::Am, 0.0, &x);
        for head in [Head::Split(2), Head::Average] {
            let z = zip_merge(&a, &b, &p, head).unwrap();
            assert_eq!(z.get("layers.0.weight").unwrap().shape(), &[16, 6]);
            let want = head.combine(&logits(&a, &x), &logits(&b, &x)).unwrap();
            assert!(max_diff(&logits(&z, &x), &want) < 1e-5, "{head:?}");
        }
        let z = zip_merge(&a, &b, &p, Head::Average).unwrap();
        // A dense MLP 6-16-16-3.
        assert_eq!(z.numel(), 16 * 6 + 16 + 16 * 16 + 16 + 3 * 16 + 3);
    }

    #[test]
    fn zip_at_ratio_one_averages_a_with_the_permuted_b() {
        let (a, b) = (model(&SIZES, 4), model(&SIZES, 5));
        let x = inputs(40, 6, 6);
        let spec = permute::builders::mlp(&a).unwrap();
        for m in [Matching::Wm, Matching::Am] {
            let units = match_units(m, &a, &b, &x, 0).unwrap();
            assert!(
                units
                    .iter()
                    .any(|(p, _)| p.iter().enumerate().any(|(i, &j)| i != j)),
                "{m:?} found the identity: the test would not check the convention"
            );
            let p = plan_layers(&units, 1.0, Allocation::Uniform).unwrap();
            let perm = permutation_of(&units, &a).unwrap();
            let want = permute::many::mean(&[a.clone(), permute::apply(&spec, &perm, &b).unwrap()])
                .unwrap();
            let got = zip_merge(&a, &b, &p, Head::Average).unwrap();
            assert!(
                max_diff(&logits(&got, &x), &logits(&want, &x)) < 1e-5,
                "{m:?}"
            );
            assert_eq!(got.numel(), a.numel());
        }
        // No matching at ratio 1 is plain averaging.
        let p = plans(&a, &b, Matching::None, 1.0, &x);
        let want = permute::many::mean(&[a.clone(), b.clone()]).unwrap();
        let got = zip_merge(&a, &b, &p, Head::Average).unwrap();
        assert!(max_diff(&logits(&got, &x), &logits(&want, &x)) < 1e-5);
    }

    #[test]
    fn least_squares_reproduces_an_exactly_representable_merge() {
        // At ratio 0 the ensemble is a merged network of the same shape: the
        // per-layer solves find it again (up to the small ridge).
        let (a, b) = (model(&SIZES, 7), model(&SIZES, 8));
        let x = inputs(400, 6, 9);
        let p = plans(&a, &b, Matching::Am, 0.0, &x);
        let head = Head::Split(1);
        let ls = least_squares_merge(&a, &b, &p, head, &x, 1e-9, 0).unwrap();
        let want = head.combine(&logits(&a, &x), &logits(&b, &x)).unwrap();
        assert!(max_diff(&logits(&ls, &x), &want) < 1e-3);
        // At ratio 1 the solve fits the merged targets at least as well as averaging.
        let p = plans(&a, &b, Matching::Am, 1.0, &x);
        let ls = least_squares_merge(&a, &b, &p, head, &x, 1e-9, 0).unwrap();
        let avg = zip_merge(&a, &b, &p, head).unwrap();
        let err = |m: &StateDict| {
            let d = logits(m, &x) - &want;
            d.iter().map(|v| v * v).sum::<f32>()
        };
        assert!(err(&ls) < err(&avg), "{} vs {}", err(&ls), err(&avg));
        // Refitting only the head keeps the zipped body and fits in between.
        let ls_head = least_squares_merge(&a, &b, &p, head, &x, 1e-9, 2).unwrap();
        for name in ["layers.0.weight", "layers.1.bias"] {
            assert_eq!(ls_head.get(name).unwrap().data, avg.get(name).unwrap().data);
        }
        assert!(err(&ls_head) < err(&avg));
    }

    #[test]
    fn merges_name_bad_input() {
        let a = model(&SIZES, 1);
        let b = model(&[6, 8, 5, 3], 2);
        let x = inputs(10, 6, 3);
        let p = plans(&a, &a, Matching::None, 1.0, &x);
        let e = zip_merge(&a, &b, &p, Head::Average).unwrap_err();
        assert!(e.to_string().contains("layers.1.weight"), "{e}");
        let e = least_squares_merge(&a, &a, &p[..1], Head::Average, &x, 0.0, 0).unwrap_err();
        assert!(e.to_string().contains("plans"), "{e}");
        let e =
            least_squares_merge(&a, &a, &p, Head::Average, &inputs(10, 5, 1), 0.0, 0).unwrap_err();
        assert!(e.to_string().contains("features"), "{e}");
        let e = least_squares_merge(&a, &a, &p, Head::Average, &x, -1.0, 0).unwrap_err();
        assert!(e.to_string().contains("--ridge"), "{e}");
        let e = least_squares_merge(&a, &a, &p, Head::Average, &x, 0.0, 3).unwrap_err();
        assert!(e.to_string().contains("layer 3"), "{e}");
        let mut c = a.clone();
        c.remove("layers.1.bias");
        let e = zip_merge(&a, &c, &p, Head::Average).unwrap_err();
        assert!(e.to_string().contains("layers.1.bias"), "{e}");
        let e = zip_merge(&StateDict::new(), &a, &[], Head::Average).unwrap_err();
        assert!(e.to_string().contains("not an MLP"), "{e}");
    }

    #[test]
    fn scores_count_joint_and_per_task_argmax() {
        // Sample 0 (task A, label 1): joint argmax 3 (wrong), task-A argmax 1 (right).
        // Sample 1 (task B, label 2): right in both.
        let l = ndarray::array![[0.0, 2.0, 0.0, 5.0], [0.0, 0.0, 3.0, 1.0]];
        let s = score_logits(&l, &[1, 2], 2);
        assert_eq!((s.joint_acc, s.task_a_acc, s.task_b_acc), (0.5, 1.0, 1.0));
        let lse0 = (2f64 + 2f64.exp() + 5f64.exp()).ln();
        let lse1 = (2f64 + 3f64.exp() + 1f64.exp()).ln();
        assert!((s.joint_loss - ((lse0 - 2.0) + (lse1 - 3.0)) / 2.0).abs() < 1e-6);
    }
}
