//! `merge`: merging fine-tuned copies of one base (a FusionBench-style table).
//!
//! One character-level LLaMA-style base (pretrained as in the `s2ft` study,
//! or `--base`) is fine-tuned on each task of `--tasks` by three families —
//! full fine-tuning, LoRA and S²FT at LoRA's budget — and every family's
//! task models are merged with the `merge` crate: averaging, task
//! arithmetic, TIES, DARE (linear and TIES), Model Stock, TIES after weight
//! matching to the base (permutation-aware), Reversible Model Merging (one
//! shared store, each task rebuilt) and, for LoRA, LoRA-LEGO. Each merge is
//! scored on every task (answer accuracy) and on task A (held-out LM loss);
//! the task vectors' spectra and pairwise cosines show why merges interfere.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::bail;
use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use indexmap::IndexMap;
use ndarray::Array2;
use serde::{Deserialize, Serialize};
use weights::StateDict;
use weights::stats::mean;

use crate::lm::{Corpus, Task};
use crate::plot::{Series, bar_chart, line_chart};
use crate::report::Run;
use crate::studies::s2ft::{EvalSets, LmArgs, Method, Sizes, finetune, prepare_base};
use merge::typed::{Merge, TaskVectorOptions, TaskVectorPreset};
use s2ft_core::s2ft::Strategy;
use s2ft_core::{Llama, LlamaConfig};

/// Options.
#[derive(Clone, Debug, clap::Args)]
pub struct MergeArgs {
    /// Model, data and training (as the `s2ft` study).
    #[command(flatten)]
    pub lm: LmArgs,
    /// The tasks (one fine-tuned model per task and family; quick: shift, mirror).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Task::Shift, Task::Mirror, Task::Upper])]
    pub tasks: Vec<Task>,
    /// LoRA rank (S²FT gets the same parameter budget).
    #[arg(long, default_value_t = 4)]
    pub rank: usize,
    /// Density of TIES / DARE sparsification.
    #[arg(long, default_value_t = 0.5)]
    pub density: f64,
    /// Scale λ of the summed task vectors in task arithmetic and DARE (FusionBench's default 0.3).
    #[arg(long, default_value_t = 0.3)]
    pub lambda: f64,
    /// The real-model study's options (`--model`, `--finetunes`, …).
    #[command(flatten)]
    pub llm: crate::studies::merge_llm::MergeLlmArgs,
}

impl Default for MergeArgs {
    fn default() -> Self {
        MergeArgs {
            lm: LmArgs::default(),
            tasks: vec![Task::Shift, Task::Mirror, Task::Upper],
            rank: 4,
            density: 0.5,
            lambda: 0.3,
            llm: Default::default(),
        }
    }
}

impl MergeArgs {
    fn tasks(&self) -> anyhow::Result<Vec<Task>> {
        let tasks = if self.lm.quick {
            vec![Task::Shift, Task::Mirror]
        } else {
            self.tasks.clone()
        };
        if let Some(t) = tasks
            .iter()
            .find(|t| tasks.iter().filter(|u| u == t).count() > 1)
        {
            bail!("--tasks lists '{}' twice", t.name());
        }
        if tasks.len() < 2 {
            bail!("--tasks: give at least two different tasks to merge");
        }
        if self.rank == 0 {
            bail!("--rank must be at least 1");
        }
        if !(self.density > 0.0 && self.density <= 1.0) {
            bail!("--density {} is outside (0, 1]", self.density);
        }
        if !self.lambda.is_finite() {
            bail!("--lambda must be finite");
        }
        Ok(tasks)
    }
}

/// Runs the study; returns the report folder.
pub fn run(args: &MergeArgs) -> anyhow::Result<PathBuf> {
    if args.llm.model.is_some() {
        return crate::studies::merge_llm::run(args);
    }
    args.llm.refuse_without_model()?;
    let (s, tasks) = (args.lm.sizes()?, args.tasks()?);
    let (run, corpus) = args.lm.open("merge")?;
    let dev = run.device;
    crate::device::on_device!(
        dev,
        run_on(args, s, &tasks, run, corpus, &Default::default())
    )
}

/// `θ − base` of every 2-D weight, in the base's order (zeros included).
pub(crate) fn task_matrices(ft: &StateDict, base: &StateDict) -> Vec<(String, Array2<f32>)> {
    base.iter()
        .filter(|(_, t)| t.shape().len() == 2)
        .filter_map(|(name, b)| {
            let f = ft.get(name)?;
            let d = (&f.data - &b.data)
                .into_dimensionality::<ndarray::Ix2>()
                .ok()?;
            Some((name.to_string(), d))
        })
        .collect()
}

/// `θ − base` for every 2-D weight that differs.
fn task_vector(ft: &StateDict, base: &StateDict) -> IndexMap<String, Array2<f32>> {
    task_matrices(ft, base)
        .into_iter()
        .filter(|(_, d)| d.iter().any(|v| *v != 0.0))
        .collect()
}

/// The fraction of units that permutations leave in place (1: the identity).
pub(crate) fn fixed_fraction<'a>(perms: impl IntoIterator<Item = &'a permute::Permutation>) -> f64 {
    let (mut fixed, mut units) = (0usize, 0usize);
    for p in perms {
        for g in p.values() {
            fixed += g.outer.iter().enumerate().filter(|(i, j)| i == *j).count();
            units += g.outer.len();
        }
    }
    fixed as f64 / units.max(1) as f64
}

/// `base + Σ deltas`.
pub(crate) fn add(base: &StateDict, deltas: &IndexMap<String, Array2<f32>>) -> StateDict {
    let mut out = base.clone();
    for (name, d) in deltas {
        if let Some(t) = out.get_mut(name) {
            t.data += &d.view().into_dyn();
        }
    }
    out
}

fn cosine(a: &IndexMap<String, Array2<f32>>, b: &IndexMap<String, Array2<f32>>) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (name, x) in a {
        aa += x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>();
        if let Some(y) = b.get(name) {
            ab += x
                .iter()
                .zip(y)
                .map(|(p, q)| *p as f64 * *q as f64)
                .sum::<f64>();
        }
    }
    for y in b.values() {
        bb += y.iter().map(|v| (*v as f64).powi(2)).sum::<f64>();
    }
    ab / (aa.sqrt() * bb.sqrt()).max(1e-30)
}

/// Task-A loss and every task's answer accuracy of one model.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Scores {
    /// Held-out language-modelling loss on task A (nats per token).
    pub task_a_loss: f64,
    /// Answer accuracy per task.
    pub acc: BTreeMap<String, f64>,
    /// Mean of `acc`.
    pub mean_acc: f64,
}

/// One fine-tune on its own task.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IndividualRow {
    /// Fine-tuning family (`full`, `lora`, `s2ft-random`).
    pub family: String,
    /// The task it was tuned on.
    pub task: String,
    /// Parameters that trained.
    pub trainable_params: usize,
    /// Accuracy on its own task.
    pub own_acc: f64,
    /// Scores on every task.
    pub scores: Scores,
}

/// One merge (or baseline) of one family's fine-tunes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MergeRow {
    /// Fine-tuning family.
    pub family: String,
    /// Method (`average`, `ties`, …, `rmm`, `lora_lego`, `mtl`).
    pub method: String,
    /// Scores on every task.
    pub scores: Scores,
    /// Method-specific facts.
    pub details: Details,
}

/// What a merge row records besides its scores (one JSON object each, as
/// the fields below).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Details {
    /// Weight matching to the base, then TIES: the fraction of units the
    /// permutations left in place.
    WmTies {
        /// Units left in place, over all groups and fine-tunes.
        fixed_fraction: f64,
    },
    /// Reversible model merging: one store of this rank, each task rebuilt.
    Rmm {
        /// The store's rank.
        rank: usize,
        /// The store's size ÷ the task vectors'.
        storage_ratio: f64,
        /// How it is scored.
        note: String,
    },
    /// LoRA-LEGO: the merged adapter's rank.
    LoraLego {
        /// Rank of the merged adapter.
        merged_rank: usize,
    },
    /// Multi-task fine-tuning.
    Mtl {
        /// Training steps (as many as the task fine-tunes together).
        steps: usize,
        /// How it is trained.
        note: String,
    },
    /// A registry method's parameters as the registry takes them (one
    /// model's and the shared).
    Params(merge::Params),
}

/// Cosine similarity of two task vectors.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Cosine {
    /// First task.
    pub a: String,
    /// Second task.
    pub b: String,
    /// Cosine of the whole task vectors.
    pub cosine: f64,
}

/// Task-vector statistics of one weight of one task.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WeightStats {
    /// Task.
    pub task: String,
    /// Weight.
    pub weight: String,
    /// Frobenius norm.
    pub norm: f64,
    /// `‖Δ‖²_F / σ₁²` (0 for a zero weight).
    pub stable_rank: f64,
    /// Singular values above `1e-3 σ₁`.
    pub numerical_rank: usize,
}

impl WeightStats {
    /// The statistics of a weight from its singular values (largest first).
    pub fn from_singular_values(task: &str, weight: &str, sv: &[f64]) -> WeightStats {
        let top = sv.first().copied().unwrap_or(0.0);
        let fro2: f64 = sv.iter().map(|x| x * x).sum();
        WeightStats {
            task: task.into(),
            weight: weight.into(),
            norm: fro2.sqrt(),
            stable_rank: if top > 0.0 { fro2 / (top * top) } else { 0.0 },
            numerical_rank: sv.iter().filter(|x| **x > top * 1e-3).count(),
        }
    }
}

/// One family's task vectors.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FamilyVectors {
    /// Fine-tuning family.
    pub family: String,
    /// Every pair of tasks.
    pub cosines: Vec<Cosine>,
    /// Mean stable rank over tasks and weights.
    pub mean_stable_rank: f64,
    /// Per task and weight.
    pub weights: Vec<WeightStats>,
}

/// The study's options as run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Options {
    /// LoRA rank (S²FT's budget).
    pub rank: usize,
    /// TIES / DARE density.
    pub density: f64,
    /// λ of task arithmetic and DARE.
    pub lambda: f64,
    /// Fine-tuning steps per task (the MTL fine-tune takes this × tasks).
    pub steps: usize,
}

/// `metrics.json` (besides the run record).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Metrics {
    /// The base's shape.
    pub config: LlamaConfig,
    /// Tasks, in order.
    pub tasks: Vec<String>,
    /// The base model's scores.
    pub base: Scores,
    /// Every family's fine-tune on every task.
    pub individual: Vec<IndividualRow>,
    /// Every family's merges and its multi-task baseline.
    pub merges: Vec<MergeRow>,
    /// Task-vector statistics per family.
    pub task_vectors: Vec<FamilyVectors>,
    /// Options.
    pub options: Options,
}

/// Everything one phase needs: the base, the tasks, a scorer and the report.
struct Study<'a, B: AutodiffBackend> {
    args: &'a MergeArgs,
    s: Sizes,
    tasks: &'a [Task],
    base: StateDict,
    evals: EvalSets,
    device: &'a B::Device,
}

impl<B: AutodiffBackend> Study<'_, B>
where
    Llama<B>: AutodiffModule<B>,
{
    fn score(&self, sd: &StateDict) -> anyhow::Result<Scores> {
        let (a, ts) = self.evals.score::<B>(&self.s.config, sd, self.device)?;
        Ok(Scores {
            task_a_loss: a.loss,
            acc: ts
                .iter()
                .map(|(t, e)| (t.name().to_string(), e.acc))
                .collect(),
            mean_acc: mean(ts.iter().map(|(_, e)| e.acc)),
        })
    }

    fn finetune(
        &self,
        m: Method,
        tasks: &[Task],
        seed: u64,
        adapter_dir: Option<&std::path::Path>,
        bar: &indicatif::ProgressBar,
    ) -> anyhow::Result<crate::studies::s2ft::Finetuned> {
        finetune::<B>(
            &self.base,
            &self.s,
            m,
            tasks,
            self.args.lm.lr(m),
            seed,
            adapter_dir,
            self.device,
            bar,
        )
    }
}

/// One family's task fine-tunes.
struct Family {
    method: Method,
    weights: Vec<StateDict>,
}

fn run_on<B: AutodiffBackend>(
    args: &MergeArgs,
    mut s: Sizes,
    tasks: &[Task],
    mut run: Run,
    corpus: Corpus,
    device: &B::Device,
) -> anyhow::Result<PathBuf>
where
    Llama<B>: AutodiffModule<B>,
{
    let lm = &args.lm;
    let r = args.rank;
    let families = [
        Method::Full,
        Method::Lora(r),
        Method::S2ft(r, Strategy::Random),
    ];
    // Task fine-tunes, then each family's multi-task fine-tune (as many steps).
    let total = lm.pretrain_steps(&s) + 2 * families.len() * tasks.len() * s.steps;
    let bar = run.progress(total as u64);
    let (base, _) = prepare_base::<B>(lm, &mut s, &corpus, &mut run, device, &bar)?;
    let evals = EvalSets::new(&corpus, tasks, &s);
    let st = Study::<B> {
        args,
        s,
        tasks,
        base,
        evals,
        device,
    };
    let base_scores = st.score(&st.base)?;
    let (finetuned, individual) = finetune_families(&st, &families, &mut run, &bar)?;
    let mut merges = Vec::new();
    let mut vectors = Vec::new();
    let mut spectra_series = Vec::new();
    for fam in &finetuned {
        let tvs: Vec<IndexMap<String, Array2<f32>>> = fam
            .weights
            .iter()
            .map(|sd| task_vector(sd, &st.base))
            .collect();
        merge_family(&st, fam, &tvs, &mut run, &mut merges, &bar)?;
        let (v, series) = task_vector_stats(fam, &tvs, tasks)?;
        vectors.push(v);
        spectra_series.extend(series);
    }
    bar.finish_and_clear();
    let metrics = Metrics {
        config: st.s.config.clone(),
        tasks: tasks.iter().map(|t| t.name().to_string()).collect(),
        base: base_scores,
        individual,
        merges,
        task_vectors: vectors,
        options: Options {
            rank: r,
            density: args.density,
            lambda: args.lambda,
            steps: st.s.steps,
        },
    };
    plots(&run, &metrics, &spectra_series)?;
    let md = report(&st, &metrics);
    run.finish(&metrics, &md)?;
    Ok(run.dir.clone())
}

/// Fine-tunes every family on every task (adapters saved under `adapters/`).
fn finetune_families<B: AutodiffBackend>(
    st: &Study<'_, B>,
    families: &[Method],
    run: &mut Run,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<(Vec<Family>, Vec<IndividualRow>)>
where
    Llama<B>: AutodiffModule<B>,
{
    let mut finetuned = Vec::new();
    let mut individual = Vec::new();
    for &m in families {
        let mut weights = Vec::new();
        for (k, &task) in st.tasks.iter().enumerate() {
            let what = format!("{} on {}", m.family(), task.name());
            bar.set_message(what.clone());
            let adir = (m != Method::Full).then(|| {
                run.dir
                    .join("adapters")
                    .join(format!("{}_{}", m.family(), task.name()))
            });
            let seed = st.args.lm.seed * 1000 + k as u64;
            let ft = run.phase(&what, || {
                st.finetune(m, &[task], seed, adir.as_deref(), bar)
            })?;
            let scores = st.score(&ft.weights)?;
            individual.push(IndividualRow {
                family: m.family().into(),
                task: task.name().into(),
                trainable_params: ft.trainable,
                own_acc: scores.acc[task.name()],
                scores,
            });
            run.write("individual.csv", individual_csv(&individual).as_bytes())?;
            weights.push(ft.weights);
        }
        finetuned.push(Family { method: m, weights });
    }
    Ok((finetuned, individual))
}

/// A task-vector merge with unit weights (and `density`, if any).
fn task_vectors(preset: TaskVectorPreset, lambda: f64, density: Option<f64>) -> Merge {
    Merge::TaskVectors(
        preset,
        TaskVectorOptions {
            weights: vec![1.0],
            densities: density.into_iter().collect(),
            lambda,
            ..Default::default()
        },
    )
}

/// TIES at `--density` (disjoint mean, λ = 1): a plain merge, and the merge
/// of the permutation-aware row.
fn ties(args: &MergeArgs) -> Merge {
    task_vectors(TaskVectorPreset::Ties, 1.0, Some(args.density))
}

/// The data-free merges of the `merge` crate, by row label.
fn plain_merges(args: &MergeArgs) -> Vec<(&'static str, Merge)> {
    let tv = |preset, density| task_vectors(preset, args.lambda, density);
    let d = Some(args.density);
    vec![
        (
            "average",
            Merge::Linear {
                weights: vec![1.0],
                normalize: true,
            },
        ),
        (
            "task_arithmetic",
            tv(TaskVectorPreset::TaskArithmetic, None),
        ),
        ("ties", ties(args)),
        ("dare_linear", tv(TaskVectorPreset::DareLinear, d)),
        ("dare_ties", tv(TaskVectorPreset::DareTies, d)),
        ("model_stock", Merge::ModelStock { filter_wise: false }),
    ]
}

/// Merges one family's fine-tunes (task vectors `tvs`) by every method, and
/// its multi-task baseline; `merges.csv` is rewritten after each row.
fn merge_family<B: AutodiffBackend>(
    st: &Study<'_, B>,
    fam: &Family,
    tvs: &[IndexMap<String, Array2<f32>>],
    run: &mut Run,
    merges: &mut Vec<MergeRow>,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<()>
where
    Llama<B>: AutodiffModule<B>,
{
    let name = fam.method.family();
    let seed = st.args.lm.seed;
    let push = |merges: &mut Vec<MergeRow>,
                run: &Run,
                method: &str,
                scores: Scores,
                details: Details|
     -> anyhow::Result<()> {
        merges.push(MergeRow {
            family: name.into(),
            method: method.into(),
            scores,
            details,
        });
        // Rewritten after every merge: an interrupted study keeps what finished.
        run.write("merges.csv", merges_csv(merges, st.tasks).as_bytes())?;
        Ok(())
    };
    for (label, merge) in plain_merges(st.args) {
        let merged = run.phase(&format!("{name} {label}"), || {
            merge.merge(Some(&st.base), &fam.weights, seed)
        })?;
        // Its parameters as the registry takes them (one model's and the shared).
        let (_, shared, per_model) = merge.lower(fam.weights.len())?;
        let mut params = per_model.into_iter().next().unwrap_or_default();
        params.extend(shared);
        push(
            merges,
            run,
            label,
            st.score(&merged)?,
            Details::Params(params),
        )?;
    }
    let (merged, details) = run.phase(&format!("{name} wm+ties"), || wm_ties(st, fam))?;
    push(merges, run, "wm_ties", st.score(&merged)?, details)?;
    let (scores, details) = run.phase(&format!("{name} rmm"), || rmm(st, tvs))?;
    push(merges, run, "rmm", scores, details)?;
    if let Method::Lora(r) = fam.method {
        let scores = lora_lego(st, run, r)?;
        let details = Details::LoraLego { merged_rank: r };
        push(merges, run, "lora_lego", scores, details)?;
    }
    // Multi-task fine-tuning (FusionBench's MTL row): the family's method on
    // every task at once, for as many steps as its task fine-tunes together.
    bar.set_message(format!("{name} on all tasks"));
    let ft = run.phase(&format!("{name} mtl"), || {
        st.finetune(fam.method, st.tasks, seed * 1000 + 900, None, bar)
    })?;
    let details = Details::Mtl {
        steps: st.s.steps * st.tasks.len(),
        note: "one fine-tune on all tasks (rows of each batch from the tasks in turn), as many steps as the task fine-tunes together".into(),
    };
    push(merges, run, "mtl", st.score(&ft.weights)?, details)
}

/// LoRA-LEGO of the family's task adapters (saved in `adapters/`) at rank
/// `r`, fused into the base and scored.
fn lora_lego<B: AutodiffBackend>(
    st: &Study<'_, B>,
    run: &mut Run,
    r: usize,
) -> anyhow::Result<Scores>
where
    Llama<B>: AutodiffModule<B>,
{
    let adapters = st
        .tasks
        .iter()
        .map(|t| {
            merge::lora::LoraAdapter::load(
                run.dir.join("adapters").join(format!("lora_{}", t.name())),
            )
        })
        .collect::<merge::Result<Vec<_>>>()?;
    let seed = st.args.lm.seed;
    let lego = run.phase("lora-lego", || {
        merge::lora::lora_lego(&adapters, r, seed, true)
    })?;
    st.score(&lego.fuse(&st.base, 1.0)?)
}

/// Permutation-aware merging: each fine-tune weight-matched to the base, then TIES.
fn wm_ties<B: AutodiffBackend>(
    st: &Study<'_, B>,
    fam: &Family,
) -> anyhow::Result<(StateDict, Details)> {
    let spec = permute::builders::llama(&st.s.config, &st.base)?;
    let (method, params, per_model) = ties(st.args).lower(fam.weights.len())?;
    let (merged, aligned) = merge::aligned::permutation_aware_merge(
        &spec,
        &method,
        Some(&st.base),
        &fam.weights,
        merge::aligned::Alignment::ToAnchor,
        &params,
        &per_model,
        &permute::MatchOptions {
            seed: st.args.lm.seed,
            ..Default::default()
        },
    )?;
    let details = Details::WmTies {
        fixed_fraction: fixed_fraction(&aligned.perms),
    };
    Ok((merged, details))
}

/// Task vectors `tvs`, every one over the same weights (zeros where a task
/// did not touch a weight).
fn aligned_task_vectors(
    base: &StateDict,
    tvs: &[IndexMap<String, Array2<f32>>],
) -> Vec<IndexMap<String, Array2<f32>>> {
    let names: indexmap::IndexSet<String> = tvs.iter().flat_map(|t| t.keys().cloned()).collect();
    tvs.iter()
        .map(|t| {
            names
                .iter()
                .map(|nm| {
                    // Every name is one of the base's 2-D weights (`task_vector`).
                    let d = t.get(nm).cloned().unwrap_or_else(|| {
                        let sh = base.get(nm).map_or(&[0, 0][..], |b| b.shape());
                        Array2::zeros((sh[0], sh[1]))
                    });
                    (nm.clone(), d)
                })
                .collect()
        })
        .collect()
}

/// Reversible Model Merging: one store of rank `p = n − 2` (at least 1);
/// each task scored with its own rebuilt weights.
fn rmm<B: AutodiffBackend>(
    st: &Study<'_, B>,
    tvs: &[IndexMap<String, Array2<f32>>],
) -> anyhow::Result<(Scores, Details)>
where
    Llama<B>: AutodiffModule<B>,
{
    let n = st.tasks.len();
    let p = n.saturating_sub(2).max(1);
    let store = merge::lora::rmm_fit(&aligned_task_vectors(&st.base, tvs), p)?;
    let mut acc = BTreeMap::new();
    let mut losses = Vec::new();
    for (k, t) in st.tasks.iter().enumerate() {
        let own = st.score(&add(&st.base, &store.reconstruct(k)?))?;
        acc.insert(t.name().to_string(), own.acc[t.name()]);
        losses.push(own.task_a_loss);
    }
    let scores = Scores {
        task_a_loss: mean(losses),
        mean_acc: mean(acc.values().copied()),
        acc,
    };
    let details = Details::Rmm {
        rank: p,
        storage_ratio: store.storage_ratio(),
        note: "each task scored with its own reconstruction".into(),
    };
    Ok((scores, details))
}

/// Norms, stable and numerical ranks of every task vector `tvs` of `fam`,
/// the pairwise cosines, and the spectrum of the first task's
/// `layers.0.mlp.down_proj`.
fn task_vector_stats(
    fam: &Family,
    tvs: &[IndexMap<String, Array2<f32>>],
    tasks: &[Task],
) -> anyhow::Result<(FamilyVectors, Option<Series>)> {
    let name = fam.method.family();
    let mut cosines = Vec::new();
    for i in 0..tvs.len() {
        for j in i + 1..tvs.len() {
            cosines.push(Cosine {
                a: tasks[i].name().into(),
                b: tasks[j].name().into(),
                cosine: cosine(&tvs[i], &tvs[j]),
            });
        }
    }
    let mut weights = Vec::new();
    let mut series = None;
    for (k, tv) in tvs.iter().enumerate() {
        for (w, d) in tv {
            let sv: Vec<f64> = spectra::linalg::singular_values(d.view(), w)?
                .iter()
                .map(|x| *x as f64)
                .collect();
            if k == 0 && w.ends_with("layers.0.mlp.down_proj.weight") {
                let top = sv.first().copied().unwrap_or(0.0).max(1e-30);
                let points = sv
                    .iter()
                    .enumerate()
                    .map(|(i, x)| (i as f64 + 1.0, (x / top).max(1e-8).log10()))
                    .collect();
                series = Some(Series::line(name, points));
            }
            weights.push(WeightStats::from_singular_values(tasks[k].name(), w, &sv));
        }
    }
    let vectors = FamilyVectors {
        family: name.into(),
        cosines,
        mean_stable_rank: weights.iter().map(|w| w.stable_rank).sum::<f64>()
            / weights.len().max(1) as f64,
        weights,
    };
    Ok((vectors, series))
}

fn individual_csv(rows: &[IndividualRow]) -> String {
    let mut csv = String::from("family,task,trainable_params,own_acc,mean_acc,task_a_loss\n");
    for r in rows {
        csv.push_str(&format!(
            "{},{},{},{:.5},{:.5},{:.5}\n",
            r.family,
            r.task,
            r.trainable_params,
            r.own_acc,
            r.scores.mean_acc,
            r.scores.task_a_loss
        ));
    }
    csv
}

fn merges_csv(rows: &[MergeRow], tasks: &[Task]) -> String {
    let mut csv = String::from("family,method,mean_acc,task_a_loss");
    for t in tasks {
        csv.push_str(&format!(",{}_acc", t.name()));
    }
    csv.push('\n');
    for r in rows {
        csv.push_str(&format!(
            "{},{},{:.5},{:.5}",
            r.family, r.method, r.scores.mean_acc, r.scores.task_a_loss
        ));
        for t in tasks {
            csv.push_str(&format!(",{:.5}", acc_of(&r.scores, t)));
        }
        csv.push('\n');
    }
    csv
}

fn acc_of(s: &Scores, t: &Task) -> f64 {
    s.acc.get(t.name()).copied().unwrap_or(f64::NAN)
}

/// Mean accuracy per method, one chart per family; task-vector spectra.
fn plots(run: &Run, m: &Metrics, spectra_series: &[Series]) -> anyhow::Result<()> {
    for fv in &m.task_vectors {
        let fam = fv.family.as_str();
        let own = m.individual.iter().filter(|r| r.family == fam);
        let mut bars: Vec<(String, f64)> = vec![
            ("base".into(), m.base.mean_acc),
            ("individual".into(), mean(own.map(|r| r.own_acc))),
        ];
        bars.extend(
            m.merges
                .iter()
                .filter(|r| r.family == fam)
                .map(|r| (r.method.replace('_', " "), r.scores.mean_acc)),
        );
        bar_chart(
            &run.dir.join(format!("accuracy_{fam}")),
            &format!("Mean task accuracy of merged {fam} fine-tunes"),
            "mean accuracy over tasks",
            &bars,
        )?;
    }
    line_chart(
        &run.dir.join("task_vector_spectra"),
        &format!(
            "Singular values of the {} task vector, layers.0.mlp.down_proj",
            m.tasks[0]
        ),
        "index",
        "log10(σ / σ_max)",
        spectra_series,
    )
}

fn report<B: AutodiffBackend>(st: &Study<'_, B>, m: &Metrics) -> String {
    let (c, o, lm) = (&m.config, &m.options, &st.args.lm);
    let r = o.rank;
    let mut md = format!(
        "# Merging fine-tuned copies of one base\n\nBase: LLaMA-style character decoder (hidden {}, {} blocks, {} parameters), {}. \
         Each family fine-tunes it on every task ({} steps): full fine-tuning, LoRA r{r} (q, k, v, up, down), S²FT at LoRA's budget (random selection, one seed per task). \
         Each task item carries its task's separator (`a>A` upper, `a=b` shift, `a<z` mirror), a one-character task tag, so one model can hold every task: \
         the `mtl` row (each family's method on all tasks at once, {} steps, rows of every batch from the tasks in turn) shows how well. \
         Merges: `average` (linear), `task_arithmetic`, `dare_linear`, `dare_ties` (summed task vectors scaled by λ = {}), `ties` (disjoint mean; TIES and DARE at density {}), `model_stock`, `wm_ties` (TIES after weight matching each model to the base), \
         `rmm` (Reversible Model Merging, one store of rank {}; each task rebuilt and scored on itself), `lora_lego` (LoRA family, merged rank {r}).\n\n\
         Base model: mean accuracy {:.3}, task-A loss {:.3}.\n\n",
        c.hidden_size,
        c.num_hidden_layers,
        st.base.numel(),
        match &lm.base {
            Some(p) => format!("loaded from {}", p.display()),
            None => format!("pretrained {} steps on Moby-Dick", st.s.pretrain_steps),
        },
        o.steps,
        o.steps * st.tasks.len(),
        o.lambda,
        o.density,
        st.tasks.len().saturating_sub(2).max(1),
        m.base.mean_acc,
        m.base.task_a_loss,
    );
    md.push_str("| family | method |");
    for t in st.tasks {
        md.push_str(&format!(" {} |", t.name()));
    }
    md.push_str(" mean | task-A loss |\n|---|---|");
    md.push_str(&"---|".repeat(st.tasks.len() + 2));
    md.push('\n');
    for fv in &m.task_vectors {
        let fam = fv.family.as_str();
        md.push_str(&format!("| {fam} | individual (own task) |"));
        let mut own = Vec::new();
        for t in st.tasks {
            let v = m
                .individual
                .iter()
                .find(|r| r.family == fam && r.task == t.name())
                .map_or(f64::NAN, |r| r.own_acc);
            own.push(v);
            md.push_str(&format!(" {v:.3} |"));
        }
        md.push_str(&format!(" {:.3} | – |\n", mean(own)));
        for r in m.merges.iter().filter(|r| r.family == fam) {
            md.push_str(&format!("| {fam} | {} |", r.method));
            for t in st.tasks {
                md.push_str(&format!(" {:.3} |", acc_of(&r.scores, t)));
            }
            md.push_str(&format!(
                " **{:.3}** | {:.3} |\n",
                r.scores.mean_acc, r.scores.task_a_loss
            ));
        }
    }
    md.push_str(
        "\n## Task vectors\n\n| family | mean stable rank | pairwise cosines |\n|---|---|---|\n",
    );
    for fv in &m.task_vectors {
        let cs: Vec<String> = fv
            .cosines
            .iter()
            .map(|c| format!("{}·{} {:.3}", c.a, c.b, c.cosine))
            .collect();
        md.push_str(&format!(
            "| {} | {:.2} | {} |\n",
            fv.family,
            fv.mean_stable_rank,
            cs.join(", ")
        ));
    }
    md.push_str("\n![full](accuracy_full.png)\n\n![lora](accuracy_lora.png)\n\n![s2ft](accuracy_s2ft-random.png)\n\n![spectra](task_vector_spectra.png)\n");
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each kind of details is written as the fields it names and read back
    /// as the same kind (`compare-runs` reads the rows back).
    #[test]
    fn details_are_written_as_their_fields_and_read_back_as_the_same_kind() {
        let params: merge::Params = [("density".to_string(), merge::Value::Num(0.5))]
            .into_iter()
            .collect();
        let cases = [
            (
                Details::WmTies {
                    fixed_fraction: 0.25,
                },
                r#"{"fixed_fraction":0.25}"#,
            ),
            (
                Details::Rmm {
                    rank: 2,
                    storage_ratio: 0.5,
                    note: "n".into(),
                },
                r#"{"rank":2,"storage_ratio":0.5,"note":"n"}"#,
            ),
            (Details::LoraLego { merged_rank: 8 }, r#"{"merged_rank":8}"#),
            (
                Details::Mtl {
                    steps: 6,
                    note: "n".into(),
                },
                r#"{"steps":6,"note":"n"}"#,
            ),
            (Details::Params(params), r#"{"density":0.5}"#),
        ];
        for (d, want) in cases {
            let text = serde_json::to_string(&d).unwrap();
            assert_eq!(text, want);
            let back: Details = serde_json::from_str(&text).unwrap();
            assert_eq!(
                std::mem::discriminant(&back),
                std::mem::discriminant(&d),
                "{text}"
            );
            assert_eq!(serde_json::to_string(&back).unwrap(), want);
        }
    }
}
