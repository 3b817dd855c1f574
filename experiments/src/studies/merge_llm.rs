//! `merge --model PATH`: merging per-task fine-tunes of a real pretrained
//! LLaMA-family decoder, FusionBench-style.
//!
//! Phases:
//! 1. **prepare** — read the base (Hugging Face folder or GGUF), the list of
//!    fine-tunes (a `s2ft --model` run's `finetunes/manifest.json`, or
//!    `--finetune TASK=PATH`), fuse each onto the base and check it against
//!    the base (tensor names, shapes, vocabulary), draw every task's
//!    validation, test and out-of-domain sets. Every check runs before the
//!    report folder is created; the fused weights are then dropped.
//! 2. **base** — the base model scored on every task.
//! 3. **per group** of fine-tunes (one fine-tuning method), its fine-tunes
//!    read and fused again (one group in memory at a time):
//!    - **baselines** — each fine-tune scored on every task;
//!    - **merge** — every merge method; hyper-parameter grids scored on the
//!      validation split, the best scored on test and OOD; the same merge
//!      written as a mergekit YAML config, run through `merge::run`, and
//!      compared bit for bit;
//!    - **task vectors** — norms, stable and numerical ranks, cosines and
//!      top-k subspace overlaps, against how each pair merges;
//!    - **best** — the merge of highest normalised accuracy rebuilt and
//!      saved as a Hugging Face folder.
//! 4. **report** — `metrics.json`, CSV, `report.md`, plots.
//!
//! Every result is written to `metrics.partial.json` as it comes, and
//! `--resume` continues an interrupted run from it: what it has is kept,
//! the rest runs, and each group's best merge is rebuilt from its row.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use burn::tensor::backend::{AutodiffBackend, Backend};
use ndarray::{Array2, ArrayView2};
use serde::Serialize;
use weights::StateDict;

use crate::llm::{EncodedSet, Prompter, score_set};
use crate::plot::{Series, grouped_bar_chart, heatmap, line_chart};
use crate::report::{InputFile, Run, input_files, relative_path};
use crate::studies::merging::{MergeArgs, WeightStats, add, fixed_fraction, task_matrices};
use crate::studies::s2ft_llm::{EVAL_SEED, ManifestEntry, ScheduleKind};
use crate::tasks::{InstructTask, Split, Stream, Words, examples};
use merge::regmean::RegMeanOptions;
use merge::subspace::SubspaceMethod;
use merge::typed::{Merge, TaskVectorOptions, TaskVectorPreset};
use s2ft_core::{Llama, LlamaConfig, Pretrained};
use weights::stats::mean;

mod combine;
pub use combine::MergePart;

/// The real-model options of `merge` (only with `--model`).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct MergeLlmArgs {
    /// The pretrained decoder the fine-tunes were tuned from (Hugging Face
    /// folder or GGUF). Without it the study merges its character model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// `s2ft --model` report folders: merge the fine-tunes their
    /// `finetunes/manifest.json` list, grouped by fine-tuning method (several
    /// folders, comma-separated: the parts of one run split by `--methods`,
    /// trained with the same settings).
    #[arg(long, value_delimiter = ',')]
    pub finetunes: Vec<PathBuf>,
    /// One fine-tune, `TASK=PATH` (repeatable): a Hugging Face folder (group
    /// `full`), a PEFT LoRA adapter (`lora`) or an S²FT adapter folder (`s2ft`).
    #[arg(long = "finetune", value_name = "TASK=PATH")]
    pub finetune: Vec<String>,
    /// λ grid of the task-vector merges (task arithmetic, TIES, DARE, …;
    /// default 0.3,0.5,0.7,1.0; quick 0.3,0.6,1.0).
    #[arg(long, value_delimiter = ',')]
    pub lambdas: Option<Vec<f64>>,
    /// λ grid of the SVD merges TSV-M, Iso-C, Iso-CTS (default 0.5,1.0,1.5; quick 0.5,1.0).
    #[arg(long, value_delimiter = ',')]
    pub svd_lambdas: Option<Vec<f64>>,
    /// Density grid of TIES, DARE, breadcrumbs, DELLA and SCE (default 0.2,0.5; quick 0.5).
    #[arg(long, value_delimiter = ',')]
    pub densities: Option<Vec<f64>>,
    /// Merge methods (default: all that apply; quick: average, task_arithmetic, ties, dare_ties, model_stock, tsv_m, iso_c, regmean, lora_lego).
    #[arg(long, value_delimiter = ',')]
    pub methods: Option<Vec<String>>,
    /// Test and out-of-domain examples per task (default 100; quick 16).
    #[arg(long)]
    pub eval_examples: Option<usize>,
    /// Validation examples per task, for the grids (default 32; quick 8).
    #[arg(long)]
    pub val_examples: Option<usize>,
    /// Unlabelled training prompts per task for RegMean's Gram matrices (default 32; quick 8).
    #[arg(long)]
    pub regmean_prompts: Option<usize>,
    /// Blocks whose task vectors get SVD statistics (default all; quick: first, middle, last).
    #[arg(long, value_delimiter = ',')]
    pub analysis_layers: Option<Vec<usize>>,
    /// Keep the fused inputs and Gram matrices the YAML configs read (`inputs/`), so the configs stay runnable.
    #[arg(long)]
    pub keep_inputs: bool,
    /// Report folders of finished merge runs of other groups (fine-tuning
    /// methods) of one base, with the same options: writes one report of
    /// all their groups into `--out` (no merging; the parts may have run in
    /// other sessions or on other machines, and need only their
    /// `metrics.json`).
    #[arg(long, value_delimiter = ',')]
    pub combine: Vec<PathBuf>,
}

impl MergeLlmArgs {
    /// Errors when a real-model option is given without `--model`.
    pub fn refuse_without_model(&self) -> anyhow::Result<()> {
        let mut given = self.merge_options().to_vec();
        given.push(("--combine", !self.combine.is_empty()));
        super::refuse_given(&given, "applies to a real model: give --model PATH")
    }

    /// The options that choose what a run merges and how, and whether each was given.
    fn merge_options(&self) -> [(&'static str, bool); 11] {
        [
            ("--finetunes", !self.finetunes.is_empty()),
            ("--finetune", !self.finetune.is_empty()),
            ("--lambdas", self.lambdas.is_some()),
            ("--svd-lambdas", self.svd_lambdas.is_some()),
            ("--densities", self.densities.is_some()),
            ("--methods", self.methods.is_some()),
            ("--eval-examples", self.eval_examples.is_some()),
            ("--val-examples", self.val_examples.is_some()),
            ("--regmean-prompts", self.regmean_prompts.is_some()),
            ("--analysis-layers", self.analysis_layers.is_some()),
            ("--keep-inputs", self.keep_inputs),
        ]
    }
}

/// Every merge method the study knows, in table order.
pub const METHODS: [&str; 17] = [
    "average",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "della",
    "model_stock",
    "sce",
    "tsv_m",
    "iso_c",
    "iso_cts",
    "regmean",
    "lora_lego",
    "rmm",
    "wm_check",
    "mtl",
];

const QUICK_METHODS: [&str; 10] = [
    "average",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "model_stock",
    "tsv_m",
    "iso_c",
    "regmean",
    "lora_lego",
    "mtl",
];

/// How a fine-tune is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// A Hugging Face model folder (full fine-tune).
    Hf,
    /// A PEFT LoRA adapter.
    Peft,
    /// This toolkit's S²FT adapter.
    S2ft,
}

impl Format {
    /// Recognises a folder by its files.
    pub fn detect(path: &Path) -> anyhow::Result<Format> {
        ensure!(
            path.is_dir(),
            "fine-tune {}: not a folder (expected a Hugging Face model folder, a PEFT adapter or an S²FT adapter)",
            path.display()
        );
        if path.join("adapter_config.json").is_file() {
            let text = std::fs::read_to_string(path.join("adapter_config.json"))
                .with_context(|| format!("fine-tune {}", path.display()))?;
            /// What tells an adapter's kind in its `adapter_config.json`.
            #[derive(serde::Deserialize)]
            struct Kind {
                peft_type: Option<String>,
                adapter_type: Option<String>,
            }
            let v: Kind = serde_json::from_str(&text)
                .with_context(|| format!("fine-tune {}: adapter_config.json", path.display()))?;
            return match v.peft_type.as_deref() {
                Some("LORA") => Ok(Format::Peft),
                _ if v.adapter_type.as_deref() == Some("s2ft") => Ok(Format::S2ft),
                other => bail!(
                    "fine-tune {}: adapter_config.json has peft_type {other:?}; only LoRA adapters are merged",
                    path.display()
                ),
            };
        }
        if path.join("config.json").is_file() {
            return Ok(Format::Hf);
        }
        bail!(
            "fine-tune {}: neither config.json (Hugging Face folder) nor adapter_config.json (adapter) is there",
            path.display()
        )
    }

    fn group(self) -> &'static str {
        match self {
            Format::Hf => "full",
            Format::Peft => "lora",
            Format::S2ft => "s2ft",
        }
    }
}

/// One fine-tune to merge.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Source {
    /// Its task.
    pub task: String,
    /// The group it is merged in (its fine-tuning method: `full`, `lora r8`, …).
    pub group: String,
    /// Its format.
    pub format: Format,
    /// Where it is.
    pub path: PathBuf,
}

/// The fine-tunes a `s2ft --model` run saved.
pub fn read_manifest(run_dir: &Path) -> anyhow::Result<Vec<Source>> {
    let path = run_dir.join("finetunes").join("manifest.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("--finetunes: reading {}", path.display()))?;
    let entries: Vec<ManifestEntry> =
        serde_json::from_str(&text).with_context(|| format!("--finetunes: {}", path.display()))?;
    Ok(entries
        .into_iter()
        .map(|e| Source {
            task: e.task,
            group: e.method,
            format: e.format,
            path: run_dir.join(e.path),
        })
        .collect())
}

/// Parses `--finetune TASK=PATH`.
pub fn parse_finetune(arg: &str) -> anyhow::Result<Source> {
    let (task, path) = arg
        .split_once('=')
        .with_context(|| format!("--finetune {arg}: expected TASK=PATH"))?;
    let path = PathBuf::from(path);
    let format = Format::detect(&path).with_context(|| format!("--finetune {arg}"))?;
    Ok(Source {
        task: task.to_string(),
        group: format.group().to_string(),
        format,
        path,
    })
}

/// Everything a run does, resolved from the options.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Plan {
    /// The base model.
    pub model: PathBuf,
    /// The fine-tunes.
    pub sources: Vec<Source>,
    /// Every task of the fine-tunes, in order of appearance.
    pub tasks: Vec<InstructTask>,
    /// The groups, in order of appearance.
    pub groups: Vec<String>,
    /// Methods run (those that apply to a group).
    pub methods: Vec<String>,
    /// λ grid of the task-vector merges.
    pub lambdas: Vec<f64>,
    /// λ grid of the SVD merges.
    pub svd_lambdas: Vec<f64>,
    /// Density grid.
    pub densities: Vec<f64>,
    /// Test / OOD examples per task.
    pub eval_examples: usize,
    /// Validation examples per task.
    pub val_examples: usize,
    /// RegMean prompts per task.
    pub regmean_prompts: usize,
    /// Blocks with SVD statistics (`None`: all).
    pub analysis_layers: Option<Vec<usize>>,
    /// Seed of DARE's and DELLA's draws and of LoRA-LEGO's clustering.
    pub seed: u64,
    /// Prompts decoded together.
    pub eval_batch: usize,
    /// Top singular directions compared between task vectors.
    pub overlap_k: usize,
    /// RegMean's off-diagonal scale (FusionBench's `reduce_non_diagonal_ratio`).
    pub regmean_alpha: f64,
    /// Whether `inputs/` is kept.
    pub keep_inputs: bool,
    /// `--quick`.
    pub quick: bool,
    /// The `s2ft --model` run's training settings, for the multi-task
    /// baseline (only with `--finetunes`).
    pub training: Option<Training>,
}

/// How the fine-tunes were trained (read from the `s2ft --model` run's
/// `metrics.json`): what the multi-task baseline trains with.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Training {
    /// Steps of one fine-tune.
    pub steps: usize,
    /// Examples per step.
    pub batch: usize,
    /// Seed of data order, LoRA init and S²FT selection.
    pub seed: u64,
    /// LoRA dropout.
    pub lora_dropout: f64,
    /// The learning-rate schedule (constant in runs recorded before it was
    /// an option; left out of the plan's JSON when constant, so that merge
    /// runs recorded before it resume).
    #[serde(default, skip_serializing_if = "ScheduleKind::is_constant")]
    pub lr_schedule: ScheduleKind,
    /// Its warm-up, as a fraction of the steps (left out when 0).
    #[serde(default, skip_serializing_if = "ScheduleKind::is_zero")]
    pub warmup_ratio: f64,
    /// Learning rate per method label (the rate the run chose).
    pub lrs: BTreeMap<String, f64>,
}

/// Reads the training settings of a `s2ft --model` run.
pub fn read_training(run_dir: &Path) -> anyhow::Result<Training> {
    let path = run_dir.join("metrics.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "--finetunes: reading {} (a finished s2ft --model run)",
            path.display()
        )
    })?;
    /// What a merge run needs of a `s2ft --model` run's `metrics.json`
    /// (fields of its `Plan` and `RunRow`; the others are ignored).
    #[derive(serde::Deserialize)]
    struct RunMetrics {
        plan: PlanFields,
        runs: Vec<RunFields>,
    }
    #[derive(serde::Deserialize)]
    struct PlanFields {
        steps: usize,
        batch: usize,
        seed: u64,
        lora_dropout: f64,
        #[serde(default)]
        lr_schedule: ScheduleKind,
        #[serde(default)]
        warmup_ratio: f64,
    }
    #[derive(serde::Deserialize)]
    struct RunFields {
        method: String,
        lr: f64,
        diverged: Option<String>,
    }
    let m: RunMetrics =
        serde_json::from_str(&text).with_context(|| format!("--finetunes: {}", path.display()))?;
    let mut lrs = BTreeMap::new();
    for r in m.runs.into_iter().filter(|r| r.diverged.is_none()) {
        lrs.entry(r.method).or_insert(r.lr);
    }
    Ok(Training {
        steps: m.plan.steps,
        batch: m.plan.batch,
        seed: m.plan.seed,
        lora_dropout: m.plan.lora_dropout,
        lr_schedule: m.plan.lr_schedule,
        warmup_ratio: m.plan.warmup_ratio,
        lrs,
    })
}

/// The training settings of the `--finetunes` runs (none without them): the
/// parts of one run must agree on every setting, and a method's rate comes
/// from the part that trained it.
pub fn read_trainings(run_dirs: &[PathBuf]) -> anyhow::Result<Option<Training>> {
    let mut merged: Option<(Training, &Path)> = None;
    for dir in run_dirs {
        let t = read_training(dir)?;
        match merged.as_mut() {
            None => merged = Some((t, dir)),
            Some((m, first)) => m.absorb(t, "--finetunes", first, dir)?,
        }
    }
    Ok(merged.map(|(t, _)| t))
}

impl Training {
    /// Adds the rates of `t` (another part of one run, read from `there`)
    /// to these (read from `here`): the settings must agree and each method
    /// come from one part; errors name `option` and both places.
    fn absorb(
        &mut self,
        t: Training,
        option: &str,
        here: &Path,
        there: &Path,
    ) -> anyhow::Result<()> {
        let settings = |t: &Training| {
            format!(
                "steps {}, batch {}, seed {}, LoRA dropout {}, schedule {:?} (warm-up {})",
                t.steps, t.batch, t.seed, t.lora_dropout, t.lr_schedule, t.warmup_ratio
            )
        };
        ensure!(
            settings(self) == settings(&t),
            "{option}: {} and {} were trained with other settings ({} vs {}); merge the parts of one run",
            here.display(),
            there.display(),
            settings(self),
            settings(&t)
        );
        for (method, lr) in t.lrs {
            ensure!(
                !self.lrs.contains_key(&method),
                "{option}: both {} and {} trained '{method}'; give each method's fine-tunes once",
                here.display(),
                there.display()
            );
            self.lrs.insert(method, lr);
        }
        Ok(())
    }
}

/// Options of the character-model study make no sense here: refused by name.
fn refuse_character_options(args: &MergeArgs) -> anyhow::Result<()> {
    let lm = &args.lm;
    let d = MergeArgs::default();
    let ignored = [
        ("--tasks", args.tasks != d.tasks),
        ("--rank", args.rank != d.rank),
        ("--density", args.density != d.density),
        ("--lambda", args.lambda != d.lambda),
        ("--base", lm.base.is_some()),
        ("--steps", lm.steps.is_some()),
        ("--hidden", lm.hidden != d.lm.hidden),
        ("--layers", lm.layers != d.lm.layers),
    ];
    super::refuse_given(
        &ignored,
        "applies to the character-model study; with --model the fine-tunes come \
         from --finetunes/--finetune (grids: --lambdas, --svd-lambdas, --densities)",
    )
}

/// The fine-tunes: a `s2ft --model` run's, then every `--finetune`.
fn sources_of(o: &MergeLlmArgs) -> anyhow::Result<Vec<Source>> {
    let mut sources = Vec::new();
    for dir in &o.finetunes {
        sources.extend(read_manifest(dir)?);
    }
    for f in &o.finetune {
        sources.push(parse_finetune(f)?);
    }
    ensure!(
        !sources.is_empty(),
        "no fine-tunes: give --finetunes RUN_DIR (a `s2ft --model` report folder) or --finetune TASK=PATH"
    );
    Ok(sources)
}

/// The tasks and groups in order of appearance; each group needs two tasks
/// or more, one fine-tune each.
fn tasks_and_groups(sources: &[Source]) -> anyhow::Result<(Vec<InstructTask>, Vec<String>)> {
    let mut tasks: Vec<InstructTask> = Vec::new();
    let mut groups: Vec<String> = Vec::new();
    for s in sources {
        let t = InstructTask::parse_list(std::slice::from_ref(&s.task))
            .with_context(|| format!("fine-tune {}", s.path.display()))?[0];
        if !tasks.contains(&t) {
            tasks.push(t);
        }
        if !groups.contains(&s.group) {
            groups.push(s.group.clone());
        }
    }
    for g in &groups {
        let ts: Vec<&str> = sources
            .iter()
            .filter(|s| &s.group == g)
            .map(|s| s.task.as_str())
            .collect();
        if let Some(t) = ts.iter().find(|t| ts.iter().filter(|u| u == t).count() > 1) {
            bail!("group '{g}' has two fine-tunes of task '{t}': give one per task");
        }
        ensure!(
            ts.len() >= 2,
            "group '{g}' has one fine-tune ({}): merging needs two tasks or more",
            ts[0]
        );
    }
    Ok((tasks, groups))
}

/// `--methods` (or the defaults), each a known method.
fn methods_of(o: &MergeLlmArgs, quick: bool) -> anyhow::Result<Vec<String>> {
    let methods: Vec<String> = match &o.methods {
        Some(m) => m.clone(),
        None if quick => QUICK_METHODS.iter().map(|s| s.to_string()).collect(),
        None => METHODS.iter().map(|s| s.to_string()).collect(),
    };
    for m in &methods {
        ensure!(
            METHODS.contains(&m.as_str()),
            "--methods: unknown method '{m}' (known: {})",
            METHODS.join(", ")
        );
    }
    Ok(methods)
}

impl Plan {
    /// Resolves and checks the options; reads only the manifest and folder listings.
    pub fn new(args: &MergeArgs) -> anyhow::Result<Plan> {
        let (lm, o) = (&args.lm, &args.llm);
        let model = o.model.clone().context("--model is required here")?;
        refuse_character_options(args)?;
        let sources = sources_of(o)?;
        let (tasks, groups) = tasks_and_groups(&sources)?;
        let quick = lm.quick;
        let methods = methods_of(o, quick)?;
        let grid = |given: &Option<Vec<f64>>, full: &[f64], q: &[f64], flag: &str| {
            let v = given
                .clone()
                .unwrap_or_else(|| if quick { q.to_vec() } else { full.to_vec() });
            ensure!(!v.is_empty(), "{flag}: give at least one value");
            ensure!(
                v.iter().all(|x| x.is_finite() && *x > 0.0),
                "{flag} {v:?}: values must be positive and finite"
            );
            Ok(v)
        };
        let densities = grid(&o.densities, &[0.2, 0.5], &[0.5], "--densities")?;
        ensure!(
            densities.iter().all(|d| *d <= 1.0),
            "--densities {densities:?}: a density is a fraction in (0, 1]"
        );
        let pick =
            |v: Option<usize>, full: usize, q: usize| v.unwrap_or(if quick { q } else { full });
        let plan = Plan {
            model,
            sources,
            tasks,
            groups,
            methods,
            lambdas: grid(
                &o.lambdas,
                &[0.3, 0.5, 0.7, 1.0],
                &[0.3, 0.6, 1.0],
                "--lambdas",
            )?,
            svd_lambdas: grid(
                &o.svd_lambdas,
                &[0.5, 1.0, 1.5],
                &[0.5, 1.0],
                "--svd-lambdas",
            )?,
            densities,
            eval_examples: pick(o.eval_examples, 100, 16),
            val_examples: pick(o.val_examples, 32, 8),
            regmean_prompts: pick(o.regmean_prompts, 32, 8),
            analysis_layers: o.analysis_layers.clone(),
            seed: lm.seed,
            eval_batch: 32,
            overlap_k: 8,
            regmean_alpha: 0.95,
            keep_inputs: o.keep_inputs,
            quick,
            training: read_trainings(&o.finetunes)?,
        };
        ensure!(
            plan.eval_examples > 0 && plan.val_examples > 0 && plan.regmean_prompts > 0,
            "--eval-examples, --val-examples and --regmean-prompts must be positive"
        );
        Ok(plan)
    }
}

/// A fine-tune, read and checked (its fused weights are read again per group, see [`load_group`]).
pub(crate) struct Finetune {
    source: Source,
    task: InstructTask,
    lora: Option<merge::lora::LoraAdapter>,
}

/// Checks that `ft` has the base's tensors with the base's shapes.
fn same_shapes(ft: &StateDict, base: &StateDict, what: &str) -> anyhow::Result<()> {
    for (name, b) in base.iter() {
        let t = ft.get(name).with_context(|| {
            format!(
                "{what}: tensor '{name}' of the base is missing: a fine-tune of a different base?"
            )
        })?;
        ensure!(
            t.shape() == b.shape(),
            "{what}: tensor '{name}' has shape {:?}, the base {:?}: a fine-tune of a different base",
            t.shape(),
            b.shape()
        );
    }
    if let Some(extra) = ft.keys().find(|n| !base.contains(n)) {
        bail!(
            "{what}: tensor '{extra}' is not in the base: a fine-tune of a different architecture"
        );
    }
    Ok(())
}

/// Reads a fine-tune and fuses it onto the base.
pub(crate) fn load_finetune(
    base: &Pretrained,
    s: &Source,
) -> anyhow::Result<(Finetune, StateDict)> {
    let what = format!("fine-tune {} ({} on {})", s.path.display(), s.group, s.task);
    let task = InstructTask::parse_list(std::slice::from_ref(&s.task)).context(what.clone())?[0];
    let (weights, lora) = match s.format {
        Format::Hf => {
            let ft = Pretrained::load(&s.path).with_context(|| what.clone())?;
            ensure!(
                ft.config.vocab_size == base.config.vocab_size,
                "{what}: vocabulary of {} tokens, the base has {}: a fine-tune of a different base",
                ft.config.vocab_size,
                base.config.vocab_size
            );
            (ft.weights, None)
        }
        Format::Peft => {
            let a = merge::lora::LoraAdapter::load(&s.path).with_context(|| what.clone())?;
            let fused = a
                .fuse(&base.weights, 1.0)
                .with_context(|| format!("{what}: the adapter does not fit the base model"))?;
            (fused, Some(a))
        }
        Format::S2ft => {
            let a = s2ft_core::adapter::S2ftAdapter::load(&s.path).with_context(|| what.clone())?;
            let mut sd = base.weights.clone();
            a.fuse(&mut sd)
                .with_context(|| format!("{what}: the adapter does not fit the base model"))?;
            (sd, None)
        }
    };
    same_shapes(&weights, &base.weights, &what)?;
    Ok((
        Finetune {
            source: s.clone(),
            task,
            lora,
        },
        weights,
    ))
}

/// The evaluation sets of one task.
struct TaskSets {
    task: InstructTask,
    validation: EncodedSet,
    test: EncodedSet,
    ood: EncodedSet,
    /// Training prompts (no answers) for RegMean.
    unlabelled: Vec<Vec<u32>>,
}

struct Prepared {
    base: Pretrained,
    words: Words,
    finetunes: Vec<Finetune>,
    sets: Vec<TaskSets>,
    /// The base's and the fine-tunes' files, as a resumed run checks them.
    inputs: Vec<InputFile>,
}

fn prepare(plan: &Plan, data_dir: &Path) -> anyhow::Result<Prepared> {
    let base = Pretrained::load(&plan.model)
        .with_context(|| format!("--model {}", plan.model.display()))?;
    // Every fine-tune is read, fused and checked here, before the report
    // folder exists, then its fused weights are dropped: a group's are read
    // again when the group is merged (a default run's 28 fused
    // 135M-parameter fine-tunes would take 15 GB together).
    let finetunes = plan
        .sources
        .iter()
        .map(|s| load_finetune(&base, s).map(|(f, _)| f))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if let Some(ls) = &plan.analysis_layers {
        let n = base.config.num_hidden_layers;
        ensure!(
            ls.iter().all(|l| *l < n),
            "--analysis-layers {ls:?}: the model has blocks 0..{n}"
        );
    }
    let words = Words::load(data_dir)?;
    let prompter = Prompter::new(&base.tokenizer)?;
    let context = base.config.max_position_embeddings.unwrap_or(usize::MAX);
    let mut sets = Vec::new();
    for &task in &plan.tasks {
        let enc =
            |split: Split, n: usize| prompter.encode(examples(task, split, n, &words, EVAL_SEED)?);
        let ts = TaskSets {
            task,
            validation: enc(Split::Validation, plan.val_examples)?,
            test: enc(Split::Test, plan.eval_examples)?,
            ood: enc(Split::Ood, plan.eval_examples)?,
            unlabelled: Stream::new(task, Split::Train, &words, plan.seed)
                .take(plan.regmean_prompts)
                .map(|ex| prompter.prompt(&ex))
                .collect::<anyhow::Result<_>>()?,
        };
        for s in [&ts.validation, &ts.test, &ts.ood] {
            ensure!(
                s.max_len() + 4 <= context,
                "task {}: a prompt with its answer takes {} tokens, more than the model's context of {context}",
                task.name(),
                s.max_len() + 4
            );
        }
        sets.push(ts);
    }
    let paths: Vec<&Path> = std::iter::once(plan.model.as_path())
        .chain(plan.sources.iter().map(|s| s.path.as_path()))
        .collect();
    Ok(Prepared {
        base,
        words,
        finetunes,
        sets,
        inputs: input_files(&paths)?,
    })
}

/// Accuracy per task, and the mean.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct Accs {
    /// Exact-match accuracy per task.
    pub tasks: BTreeMap<String, f64>,
    /// Teacher-forced answer loss per task.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub loss: BTreeMap<String, f64>,
    /// The first few (task, prompt, reference, greedy answer) of each task.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub samples: Vec<(String, String, String, String)>,
}

impl Accs {
    /// Mean accuracy over the tasks.
    pub fn mean(&self) -> f64 {
        mean(self.tasks.values().copied())
    }
    fn mean_loss(&self) -> f64 {
        mean(self.loss.values().copied())
    }
}

/// Normalised accuracy (FusionBench's convention): per task, the merged
/// model's accuracy ÷ the individual fine-tune's on its own task, and the
/// mean over the tasks where it is defined (an individual accuracy of 0
/// leaves the task out).
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct Normalised {
    /// Per task (`None` where the individual scored 0).
    pub tasks: BTreeMap<String, Option<f64>>,
    /// Mean over the defined tasks.
    pub mean: Option<f64>,
}

/// [`Normalised`] of `merged` against `individual`, over `individual`'s tasks.
pub fn normalised(
    merged: &BTreeMap<String, f64>,
    individual: &BTreeMap<String, f64>,
) -> Normalised {
    normalised_from(merged, individual, 0.0)
}

/// The least out-of-domain accuracy of an individual fine-tune that
/// [`normalised_ood`] divides by: under it a ratio is a few examples' noise
/// (an individual scoring 0.01 on 100 examples would turn a merge's 0.18
/// into 18).
pub const OOD_REFERENCE_FLOOR: f64 = 0.1;

/// [`Normalised`] on the out-of-domain splits: as [`normalised`], leaving
/// out the tasks whose individual fine-tune scores under
/// [`OOD_REFERENCE_FLOOR`] out of domain.
pub fn normalised_ood(
    merged: &BTreeMap<String, f64>,
    individual: &BTreeMap<String, f64>,
) -> Normalised {
    normalised_from(merged, individual, OOD_REFERENCE_FLOOR)
}

/// The ratios against the individual accuracies that are above 0 and at
/// least `floor`.
fn normalised_from(
    merged: &BTreeMap<String, f64>,
    individual: &BTreeMap<String, f64>,
    floor: f64,
) -> Normalised {
    let tasks: BTreeMap<String, Option<f64>> = individual
        .iter()
        .map(|(t, ind)| {
            let m = merged.get(t).copied().unwrap_or(f64::NAN);
            (
                t.clone(),
                (*ind > 0.0 && *ind >= floor && m.is_finite()).then(|| m / ind),
            )
        })
        .collect();
    let defined: Vec<f64> = tasks.values().flatten().copied().collect();
    Normalised {
        mean: (!defined.is_empty()).then(|| mean(defined.iter().copied())),
        tasks,
    }
}

/// One grid point of a method.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct GridPoint {
    /// Its hyper-parameters.
    pub hyper: BTreeMap<String, f64>,
    /// Mean validation accuracy (null for a grid of one point: nothing to choose).
    pub val_acc: Option<f64>,
    /// Mean validation answer loss.
    pub val_loss: Option<f64>,
}

/// The best merge of a group, saved as a Hugging Face folder.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct BestModel {
    /// The group (fine-tuning method).
    pub group: String,
    /// Its best merge method.
    pub method: String,
    /// The folder, relative to the report folder.
    pub path: String,
}

/// A method's row of the table (one group).
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct MergeRow {
    /// The group (fine-tuning method).
    pub group: String,
    /// The merge method.
    pub method: String,
    /// Hyper-parameters chosen.
    pub hyper: BTreeMap<String, f64>,
    /// The grid scored.
    pub grid: Vec<GridPoint>,
    /// In-domain test accuracy per task.
    pub test: Accs,
    /// Out-of-domain accuracy per task.
    pub ood: Accs,
    /// Normalised in-domain accuracy.
    pub normalised: Normalised,
    /// Normalised OOD accuracy.
    pub normalised_ood: Normalised,
    /// Wall seconds of the chosen merge.
    pub merge_seconds: f64,
    /// Peak heap growth of the chosen merge (MB), where the binary counts it.
    pub peak_mb: Option<f64>,
    /// The mergekit YAML written for it (relative to the report folder).
    pub yaml: Option<String>,
    /// Whether running that YAML gave the same tensors, bit for bit.
    pub yaml_identical: Option<bool>,
    /// What else to know.
    pub note: Option<String>,
}

/// A candidate merge: a typed method, or one of the study's own.
#[derive(Clone, Debug)]
enum Candidate {
    Typed(Merge),
    RegMean,
    LoraLego,
    Rmm,
    WmCheck,
    Mtl,
}

fn tv(preset: TaskVectorPreset, lambda: f64, density: Option<f64>) -> Merge {
    Merge::TaskVectors(
        preset,
        TaskVectorOptions {
            weights: vec![1.0],
            densities: density.map(|d| vec![d]).unwrap_or_default(),
            lambda,
            // FusionBench's convention: the (sparsified, elected) task vectors
            // are summed and scaled by λ, so one λ grid serves every method.
            normalize: Some(false),
            ..Default::default()
        },
    )
}

/// The grid of `method` (hyper-parameters and candidate), or none when it
/// does not apply to `group`.
fn grid(plan: &Plan, method: &str, lora_group: bool) -> Vec<(BTreeMap<String, f64>, Candidate)> {
    let h = |kv: &[(&str, f64)]| -> BTreeMap<String, f64> {
        kv.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    };
    let mut out = Vec::new();
    let sparse = |preset: TaskVectorPreset, out: &mut Vec<_>| {
        for &l in &plan.lambdas {
            for &d in &plan.densities {
                out.push((
                    h(&[("lambda", l), ("density", d)]),
                    Candidate::Typed(tv(preset, l, Some(d))),
                ));
            }
        }
    };
    match method {
        "average" => out.push((
            h(&[]),
            Candidate::Typed(Merge::Linear {
                weights: vec![1.0],
                normalize: true,
            }),
        )),
        "task_arithmetic" => {
            for &l in &plan.lambdas {
                out.push((
                    h(&[("lambda", l)]),
                    Candidate::Typed(tv(TaskVectorPreset::TaskArithmetic, l, None)),
                ));
            }
        }
        "ties" => sparse(TaskVectorPreset::Ties, &mut out),
        "dare_ties" => sparse(TaskVectorPreset::DareTies, &mut out),
        "dare_linear" => sparse(TaskVectorPreset::DareLinear, &mut out),
        "breadcrumbs" => sparse(TaskVectorPreset::Breadcrumbs, &mut out),
        "della" => sparse(TaskVectorPreset::Della, &mut out),
        "model_stock" => out.push((
            h(&[]),
            Candidate::Typed(Merge::ModelStock { filter_wise: false }),
        )),
        "sce" => {
            for &d in &plan.densities {
                out.push((
                    h(&[("select_topk", d)]),
                    Candidate::Typed(Merge::Sce { select_topk: d }),
                ));
            }
        }
        "tsv_m" | "iso_c" | "iso_cts" => {
            let m = match method {
                "tsv_m" => SubspaceMethod::TsvM { rank: None },
                "iso_c" => SubspaceMethod::IsoC,
                _ => SubspaceMethod::IsoCts {
                    common_space_fraction: 0.8,
                },
            };
            for &l in &plan.svd_lambdas {
                out.push((
                    h(&[("lambda", l)]),
                    Candidate::Typed(Merge::Subspace {
                        method: m,
                        lambda: l,
                    }),
                ));
            }
        }
        "regmean" => out.push((h(&[("alpha", plan.regmean_alpha)]), Candidate::RegMean)),
        "lora_lego" if lora_group => out.push((h(&[]), Candidate::LoraLego)),
        "rmm" => out.push((h(&[]), Candidate::Rmm)),
        "wm_check" => out.push((h(&[]), Candidate::WmCheck)),
        "mtl" if plan.training.is_some() => out.push((h(&[]), Candidate::Mtl)),
        _ => {}
    }
    out
}

/// The grid's points in batches of merges that differ only in λ (in grid
/// order of their first point; a batch of one for every other candidate).
fn lambda_batches(cands: &[(BTreeMap<String, f64>, Candidate)]) -> Vec<Vec<usize>> {
    let mut batches: Vec<(Option<Merge>, Vec<usize>)> = Vec::new();
    for (k, (_, c)) in cands.iter().enumerate() {
        let key = match c {
            Candidate::Typed(m) if m.lambda().is_some() => Some(m.with_lambda(1.0)),
            _ => None,
        };
        match batches.iter_mut().find(|(b, _)| key.is_some() && *b == key) {
            Some((_, ks)) => ks.push(k),
            None => batches.push((key, vec![k])),
        }
    }
    batches.into_iter().map(|(_, ks)| ks).collect()
}

/// Scores `sd` on `split` of every task.
struct Scorer<'a, B: Backend> {
    config: &'a LlamaConfig,
    prompter: Prompter<'a>,
    sets: &'a [TaskSets],
    batch: usize,
    device: B::Device,
}

#[derive(Clone, Copy)]
enum Which {
    Validation,
    Test,
    Ood,
}

impl<B: Backend> Scorer<'_, B> {
    /// Test and out-of-domain accuracy of `sd` on every task.
    fn both(&self, sd: &StateDict) -> anyhow::Result<(Accs, Accs)> {
        let m = self.model(sd)?;
        Ok((
            self.score(&m, Which::Test, None)?,
            self.score(&m, Which::Ood, None)?,
        ))
    }

    fn model(&self, sd: &StateDict) -> anyhow::Result<Llama<B>> {
        Ok(Llama::<B>::from_state_dict(
            self.config,
            sd,
            false,
            &self.device,
        )?)
    }

    fn score(
        &self,
        m: &Llama<B>,
        which: Which,
        only: Option<&[InstructTask]>,
    ) -> anyhow::Result<Accs> {
        let mut a = Accs::default();
        for ts in self
            .sets
            .iter()
            .filter(|s| only.is_none_or(|o| o.contains(&s.task)))
        {
            let set = match which {
                Which::Validation => &ts.validation,
                Which::Test => &ts.test,
                Which::Ood => &ts.ood,
            };
            let s = score_set(m, set, &self.prompter, self.batch)?;
            a.tasks.insert(ts.task.name().into(), s.acc);
            a.loss.insert(ts.task.name().into(), s.answer_loss);
            if matches!(which, Which::Test) {
                a.samples.extend(
                    s.samples
                        .into_iter()
                        .map(|(p, r, g)| (ts.task.name().to_string(), p, r, g)),
                );
            }
        }
        Ok(a)
    }
}

/// Runs the real-model merge study; returns the report folder. With
/// `--resume` it continues the interrupted run in `--out`.
pub fn run(args: &MergeArgs) -> anyhow::Result<PathBuf> {
    if !args.llm.combine.is_empty() {
        return combine::combine(args);
    }
    let plan = Plan::new(args)?;
    let data_dir = args
        .lm
        .data_dir
        .clone()
        .unwrap_or_else(crate::lm::default_text_dir);
    let prep = prepare(&plan, &data_dir)?;
    let (run, partial) = args.lm.run.open_resumable("merge")?;
    let resumed = partial
        .map(|p| Resumed::read(&plan, &p, &run.dir, &prep.inputs))
        .transpose()?;
    let dev = run.device;
    crate::device::on_device!(dev, run_on(&plan, prep, run, resumed, &Default::default()))
}

/// Per group, each task's fine-tune on its own task: (test, OOD) accuracy by task.
type OwnScores = BTreeMap<String, (BTreeMap<String, f64>, BTreeMap<String, f64>)>;

/// The normalisers: each fine-tune's accuracy on its own task, by group.
fn own_scores(individual: &[Individual]) -> OwnScores {
    let mut own = OwnScores::new();
    for i in individual {
        let e = own.entry(i.group.clone()).or_default();
        e.0.insert(i.task.clone(), i.test.tasks[&i.task]);
        e.1.insert(i.task.clone(), i.ood.tasks[&i.task]);
    }
    own
}

/// Recomputes every row's normalised OOD accuracy from its OOD scores and
/// its group's individual fine-tunes, so rows that an earlier build of a
/// resumed run recorded (when a ratio against any OOD accuracy above 0
/// counted) follow [`normalised_ood`]. Rows without per-task ratios (the
/// permutation check) and rows of a group without individual scores are kept.
fn renormalise(rows: &mut [MergeRow], individual: &[Individual]) {
    let own = own_scores(individual);
    for r in rows {
        if let Some((_, ood)) = own.get(&r.group)
            && !r.normalised_ood.tasks.is_empty()
        {
            r.normalised_ood = normalised_ood(&r.ood.tasks, ood);
        }
    }
}

/// One group's fine-tunes and their fused weights (owned: the merges take
/// a slice of state dicts).
struct Group<'a> {
    name: String,
    members: Vec<&'a Finetune>,
    weights: Vec<StateDict>,
}

impl Group<'_> {
    fn tasks(&self) -> Vec<InstructTask> {
        self.members.iter().map(|f| f.task).collect()
    }
    fn file_name(&self) -> String {
        file_name(&self.name)
    }
}

/// A group's name as it appears in file names (`lora r8` → `lora-r8`).
fn file_name(group: &str) -> String {
    group.replace(' ', "-")
}

/// Where a group's best merge is saved, relative to the report folder.
fn best_path(group: &str) -> String {
    format!("best/{}", file_name(group))
}

/// Reads group `name`'s fine-tunes again and fuses them onto the base
/// ([`prepare`] checked them).
fn load_group<'p>(prep: &'p Prepared, name: &str) -> anyhow::Result<Group<'p>> {
    let members: Vec<&Finetune> = prep
        .finetunes
        .iter()
        .filter(|f| f.source.group == name)
        .collect();
    let weights = members
        .iter()
        .map(|f| load_finetune(&prep.base, &f.source).map(|(_, sd)| sd))
        .collect::<anyhow::Result<_>>()?;
    Ok(Group {
        name: name.to_string(),
        members,
        weights,
    })
}

fn run_on<B: AutodiffBackend>(
    plan: &Plan,
    prep: Prepared,
    mut run: Run,
    resumed: Option<Resumed>,
    device: &B::Device,
) -> anyhow::Result<PathBuf>
where
    Llama<B>: burn::module::AutodiffModule<B, InnerModule = Llama<B::InnerBackend>>,
{
    let c = prep.base.config.clone();
    let scorer = Scorer::<B::InnerBackend> {
        config: &c,
        prompter: Prompter::new(&prep.base.tokenizer)?,
        sets: &prep.sets,
        batch: plan.eval_batch,
        device: device.clone(),
    };
    let bar = run.progress((plan.groups.len() * plan.methods.len()) as u64);
    let (base, individual, results) = match resumed {
        Some(r) => (r.base, r.individual, r.results),
        None => {
            bar.set_message("scoring the base");
            let (test, ood) = run.phase("score base", || scorer.both(&prep.base.weights))?;
            (BaseScores { test, ood }, Vec::new(), Results::default())
        }
    };
    let mut study = Study {
        plan,
        prep: &prep,
        scorer: &scorer,
        base,
        individual,
        inputs: run.dir.join("inputs"),
        run,
        bar,
        results,
    };
    study.partial()?;
    let (base_path, config_dir) = study.inputs_and_configs()?;
    for g in &plan.groups {
        study.group::<B>(g, &base_path, &config_dir, device)?;
    }
    study.finish(&c)
}

/// What an interrupted run (`--resume`) finished: the base's scores, the
/// fine-tunes scored, every merge row, task-vector analysis and best model
/// saved. A group runs what it has no result for (a method without a row,
/// the analysis, the best model); its best merge is rebuilt from the chosen
/// row's hyper-parameters (merges are deterministic per seed, so the
/// result is the uninterrupted run's).
struct Resumed {
    base: BaseScores,
    individual: Vec<Individual>,
    results: Results,
}

impl Resumed {
    fn read(
        plan: &Plan,
        partial: &serde_json::Value,
        dir: &Path,
        inputs: &[InputFile],
    ) -> anyhow::Result<Self> {
        crate::report::same_run(partial, plan, inputs)?;
        let mut results = Results {
            rows: crate::report::partial_field(partial, "merges", dir)?,
            analyses: crate::report::partial_field(partial, "task_vectors", dir)?,
            best: crate::report::partial_field(partial, "best", dir)?,
        };
        // A best model saved but not yet recorded is saved again.
        for g in &plan.groups {
            let rel = best_path(g);
            if !results.best.iter().any(|b| b.path == rel) && dir.join(&rel).exists() {
                std::fs::remove_dir_all(dir.join(&rel))
                    .with_context(|| format!("--resume: removing {}", dir.join(&rel).display()))?;
            }
        }
        let individual: Vec<Individual> = crate::report::partial_field(partial, "individual", dir)?;
        renormalise(&mut results.rows, &individual);
        Ok(Resumed {
            base: crate::report::partial_field(partial, "base", dir)?,
            individual,
            results,
        })
    }
}

/// The base model's scores (test, OOD) on every task.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct BaseScores {
    /// In-domain test accuracy per task.
    pub test: Accs,
    /// Out-of-domain accuracy per task.
    pub ood: Accs,
}

/// One fine-tune scored on every task.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Individual {
    /// The group (fine-tuning method).
    pub group: String,
    /// The task it was tuned on.
    pub task: String,
    /// How it is stored.
    pub format: Format,
    /// Where it is stored.
    pub path: PathBuf,
    /// In-domain test accuracy per task.
    pub test: Accs,
    /// Out-of-domain accuracy per task.
    pub ood: Accs,
}

/// What `metrics.partial.json` holds while the study runs (what
/// `--resume` reads back).
#[derive(Serialize)]
struct Partial<'a> {
    plan: &'a Plan,
    inputs: &'a [InputFile],
    base: &'a BaseScores,
    individual: &'a [Individual],
    merges: &'a [MergeRow],
    task_vectors: &'a [Analysis],
    best: &'a [BestModel],
}

/// The rows of `metrics.json`, which is these beside the model's path, its
/// config and the plan (the study's `Metrics`); read back with
/// [`crate::report::read_metrics`].
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Rows {
    /// The base model's scores.
    pub base: BaseScores,
    /// Every fine-tune on every task.
    pub individual: Vec<Individual>,
    /// Every group's merges.
    pub merges: Vec<MergeRow>,
    /// Every group's task-vector analysis.
    pub task_vectors: Vec<Analysis>,
    /// The best merge of each group, saved.
    pub best: Vec<BestModel>,
    /// Whether peak heap was measured.
    pub memory_measured: bool,
}

/// What `metrics.json` holds.
#[derive(Serialize)]
struct Metrics<'a> {
    model: &'a Path,
    config: &'a LlamaConfig,
    plan: &'a Plan,
    /// The files read (size, modification time).
    inputs: &'a [InputFile],
    /// The runs a combined report (`--combine`) was made of.
    #[serde(skip_serializing_if = "<[MergePart]>::is_empty")]
    parts: &'a [MergePart],
    #[serde(flatten)]
    rows: Rows,
}

/// What the groups' merges add up to.
#[derive(Default)]
struct Results {
    rows: Vec<MergeRow>,
    analyses: Vec<Analysis>,
    best: Vec<BestModel>,
}

/// Methods with a row of their own that is not one merged model: RMM (one
/// store, each task rebuilt), the permutation check and multi-task training.
const NOT_MERGES: [&str; 3] = ["rmm", "wm_check", "mtl"];

/// The running study: what every group's merges read, and the results so far.
struct Study<'s, B: Backend> {
    plan: &'s Plan,
    prep: &'s Prepared,
    scorer: &'s Scorer<'s, B>,
    /// The base model's scores.
    base: BaseScores,
    /// The fine-tunes scored so far, on every task.
    individual: Vec<Individual>,
    /// Scratch inputs of the YAML configs (fine-tunes as safetensors, Gram matrices).
    inputs: PathBuf,
    run: Run,
    bar: indicatif::ProgressBar,
    results: Results,
}

/// A merge built from a candidate: the model, the typed method (for its
/// YAML), and a note.
type Built = (StateDict, Option<Merge>, Option<String>);

impl<B: Backend> Study<'_, B> {
    /// Writes the partial metrics (everything so far: what `--resume` reads).
    fn partial(&self) -> anyhow::Result<()> {
        self.run.partial(&Partial {
            plan: self.plan,
            inputs: &self.prep.inputs,
            base: &self.base,
            individual: &self.individual,
            merges: &self.results.rows,
            task_vectors: &self.results.analyses,
            best: &self.results.best,
        })
    }

    /// Group `group`'s row of `method`, if it has one.
    fn row(&self, group: &str, method: &str) -> Option<&MergeRow> {
        self.results
            .rows
            .iter()
            .find(|r| r.group == group && r.method == method)
    }

    /// Whether the fine-tune of `group` on `task` has its scores.
    fn scored(&self, group: &str, task: InstructTask) -> bool {
        self.individual
            .iter()
            .any(|i| i.group == group && i.task == task.name())
    }

    /// Whether every fine-tune of `group` is a LoRA adapter.
    fn lora_group(&self, group: &str) -> bool {
        self.prep
            .finetunes
            .iter()
            .filter(|f| f.source.group == group)
            .all(|f| f.lora.is_some())
    }

    /// The methods that apply to `group` and have no row yet.
    fn methods_left(&self, group: &str) -> Vec<String> {
        let lora = self.lora_group(group);
        self.plan
            .methods
            .iter()
            .filter(|m| !grid(self.plan, m, lora).is_empty() && self.row(group, m).is_none())
            .cloned()
            .collect()
    }

    /// The group's best merge: the merge row (not [`NOT_MERGES`]) of the
    /// highest mean normalised accuracy, the first in method order on ties.
    fn best_row(&self, group: &str) -> Option<&MergeRow> {
        let score = |r: &MergeRow| r.normalised.mean.unwrap_or(f64::NEG_INFINITY);
        let mut best: Option<&MergeRow> = None;
        for m in self
            .plan
            .methods
            .iter()
            .filter(|m| !NOT_MERGES.contains(&m.as_str()))
        {
            if let Some(r) = self.row(group, m)
                && best.is_none_or(|b| score(r) > score(b))
            {
                best = Some(r);
            }
        }
        best
    }

    /// The base path the YAML configs read (a Hugging Face folder as it is,
    /// else written as HF-named safetensors) and the configs' folder.
    fn inputs_and_configs(&self) -> anyhow::Result<(PathBuf, PathBuf)> {
        let base_path = if self.plan.model.is_dir() {
            self.plan.model.clone()
        } else {
            let p = self.inputs.join("base.safetensors");
            std::fs::create_dir_all(&self.inputs)?;
            self.prep.base.weights.save_safetensors(&p)?;
            p
        };
        let config_dir = self.run.dir.join("configs");
        std::fs::create_dir_all(&config_dir)?;
        Ok((base_path, config_dir))
    }

    /// The YAML configs' paths of the group's fine-tunes: Hugging Face
    /// folders as they are, the others written as safetensors.
    fn model_paths(&self, g: &Group<'_>) -> anyhow::Result<Vec<PathBuf>> {
        g.members
            .iter()
            .zip(&g.weights)
            .map(|(f, w)| -> anyhow::Result<PathBuf> {
                Ok(match f.source.format {
                    Format::Hf => f.source.path.clone(),
                    _ => {
                        let p = self
                            .inputs
                            .join(g.file_name())
                            .join(format!("{}.safetensors", f.task.name()));
                        std::fs::create_dir_all(p.parent().expect("folder"))?;
                        w.save_safetensors(&p)?;
                        p
                    }
                })
            })
            .collect()
    }

    /// Group `name`: its fine-tunes scored on every task, every method (a
    /// row each), its task vectors, its best merge saved as a Hugging Face
    /// folder. What a resumed run has already is skipped; a group with
    /// nothing left is not read at all.
    fn group<A: AutodiffBackend<InnerBackend = B>>(
        &mut self,
        name: &str,
        base_path: &Path,
        config_dir: &Path,
        device: &A::Device,
    ) -> anyhow::Result<()>
    where
        Llama<A>: burn::module::AutodiffModule<A, InnerModule = Llama<B>>,
    {
        let unscored = self
            .prep
            .finetunes
            .iter()
            .filter(|f| f.source.group == name)
            .any(|f| !self.scored(name, f.task));
        let analysed = self.results.analyses.iter().any(|a| a.group == name);
        let saved = self.results.best.iter().any(|b| b.group == name);
        let nothing_left = !unscored
            && self.methods_left(name).is_empty()
            && analysed
            && (saved || self.best_row(name).is_none());
        if nothing_left {
            self.bar.inc(self.plan.methods.len() as u64);
            return Ok(());
        }
        self.bar.set_message(format!("reading {name}"));
        let prep = self.prep;
        let g = self
            .run
            .phase(&format!("{name} read"), || load_group(prep, name))?;
        for (f, sd) in g.members.iter().zip(&g.weights) {
            let t = f.task.name();
            if self.scored(name, f.task) {
                continue;
            }
            self.bar.set_message(format!("scoring {name} {t}"));
            let scorer = self.scorer;
            let (test, ood) = self
                .run
                .phase(&format!("score {name} {t}"), || scorer.both(sd))?;
            self.individual.push(Individual {
                group: name.to_string(),
                task: t.into(),
                format: f.source.format,
                path: f.source.path.clone(),
                test,
                ood,
            });
            self.partial()?;
        }
        let mut grams = self.merge_group::<A>(&g, base_path, config_dir, device)?;
        if !analysed {
            let (ind_test, _) = &own_scores(&self.individual)[name];
            self.analyse(&g, ind_test)?;
            self.partial()?;
        }
        if !saved {
            self.save_best(&g, &mut grams)?;
        }
        Ok(())
    }

    /// Writes the group's Gram matrices (RegMean's inputs) unless written.
    fn grams<'g>(
        &mut self,
        g: &Group<'_>,
        grams: &'g mut Option<Vec<PathBuf>>,
    ) -> anyhow::Result<&'g [PathBuf]> {
        if grams.is_none() {
            let (scorer, prep, inputs) = (self.scorer, self.prep, &self.inputs);
            *grams = Some(self.run.phase(&format!("{} grams", g.name), || {
                write_grams(scorer, g, &prep.sets, inputs)
            })?);
        }
        Ok(grams.as_deref().expect("written"))
    }

    /// Every method of group `g` that has no row yet (a row each); returns
    /// the Gram matrices' paths if it wrote them.
    fn merge_group<A: AutodiffBackend<InnerBackend = B>>(
        &mut self,
        g: &Group<'_>,
        base_path: &Path,
        config_dir: &Path,
        device: &A::Device,
    ) -> anyhow::Result<Option<Vec<PathBuf>>>
    where
        Llama<A>: burn::module::AutodiffModule<A, InnerModule = Llama<B>>,
    {
        let (ind_test, ind_ood) = own_scores(&self.individual)[&g.name].clone();
        let left = self.methods_left(&g.name);
        let mut grams: Option<Vec<PathBuf>> = None;
        let mut model_paths: Option<Vec<PathBuf>> = None;
        for method in &self.plan.methods {
            self.bar.inc(1);
            if !left.contains(method) {
                continue;
            }
            let cands = grid(self.plan, method, self.lora_group(&g.name));
            let first = cands[0].1.clone();
            self.bar.set_message(format!("{} {method}", g.name));
            let grams = match first {
                Candidate::RegMean => Some(self.grams(g, &mut grams)?),
                _ => None,
            };
            let (plan, prep, scorer) = (self.plan, self.prep, self.scorer);
            let own_row = match first {
                Candidate::Rmm => Some(self.run.phase(&format!("{} rmm", g.name), || {
                    rmm_row(scorer, &prep.base.weights, g, &ind_test, &ind_ood)
                })?),
                Candidate::Mtl => Some(self.run.phase(&format!("{} mtl", g.name), || {
                    mtl_row::<A>(plan, prep, scorer, g, &ind_test, &ind_ood, device)
                })?),
                Candidate::WmCheck => Some(self.run.phase(&format!("{} wm", g.name), || {
                    wm_row(&prep.base.config, &prep.base.weights, g, plan.seed)
                })?),
                _ => None,
            };
            let row = match own_row {
                Some(row) => row,
                None => {
                    let (row, built) =
                        self.grid_row(g, method, &cands, grams, (&ind_test, &ind_ood))?;
                    if model_paths.is_none() {
                        model_paths = Some(self.model_paths(g)?);
                    }
                    let paths = model_paths.as_deref().expect("written");
                    self.with_yaml(row, &built, g, method, base_path, paths, config_dir)?
                }
            };
            self.results.rows.push(row);
            self.partial()?;
        }
        Ok(grams)
    }

    /// Builds the merge of one candidate on the group's weights.
    fn build(
        (plan, base): (&Plan, &StateDict),
        g: &Group<'_>,
        cand: &Candidate,
        grams: Option<&[PathBuf]>,
    ) -> anyhow::Result<Built> {
        let typed = |m: Merge| -> anyhow::Result<Built> {
            Ok((m.merge(Some(base), &g.weights, plan.seed)?, Some(m), None))
        };
        match cand {
            Candidate::Typed(m) => typed(m.clone()),
            Candidate::RegMean => typed(Merge::RegMean {
                grams: grams.expect("grams written").to_vec(),
                options: RegMeanOptions {
                    alpha: plan.regmean_alpha,
                    ridge: 1e-6,
                },
            }),
            Candidate::LoraLego => {
                let adapters: Vec<_> = g
                    .members
                    .iter()
                    .map(|f| f.lora.clone().expect("lora group"))
                    .collect();
                let r = adapters[0].config.r;
                let lego = merge::lora::lora_lego(&adapters, r, plan.seed, true)?;
                Ok((
                    lego.fuse(base, 1.0)?,
                    None,
                    Some(format!("merged rank {r}")),
                ))
            }
            Candidate::Rmm => bail!("rmm is scored per task"),
            Candidate::WmCheck => bail!("wm_check is no merge"),
            Candidate::Mtl => bail!("mtl is trained"),
        }
    }

    /// A method's grid on the validation split (a grid of one is not
    /// scored); the chosen point's merge is kept, with its time and peak
    /// heap growth, and scored on the test and OOD splits. The row's YAML
    /// fields are left empty ([`Study::with_yaml`] fills them).
    fn grid_row(
        &mut self,
        g: &Group<'_>,
        method: &str,
        cands: &[(BTreeMap<String, f64>, Candidate)],
        grams: Option<&[PathBuf]>,
        (ind_test, ind_ood): (&BTreeMap<String, f64>, &BTreeMap<String, f64>),
    ) -> anyhow::Result<(MergeRow, Built)> {
        let (scorer, plan, base) = (self.scorer, self.plan, &self.prep.base.weights);
        let tasks = g.tasks();
        let timed = |cand: &Candidate| {
            let window = crate::alloc::PeakWindow::open();
            let t0 = Instant::now();
            let out = Self::build((plan, base), g, cand, grams)?;
            let peak = window.growth().map(|b| b as f64 / 1e6);
            anyhow::Ok((out, t0.elapsed().as_secs_f64(), peak))
        };
        let mut points: Vec<Option<GridPoint>> = vec![None; cands.len()];
        let mut kept = None;
        // The best point: highest validation accuracy, then lowest loss, then
        // first in grid order (what scoring the points in order kept).
        let mut best_key = (f64::NEG_INFINITY, f64::NEG_INFINITY, 0isize);
        let mut consider = |k: usize, built: (Built, f64, Option<f64>)| -> anyhow::Result<()> {
            let hyper = cands[k].0.clone();
            if cands.len() == 1 {
                points[k] = Some(GridPoint {
                    hyper,
                    val_acc: None,
                    val_loss: None,
                });
                kept = Some((k, built));
                return Ok(());
            }
            let v = scorer.score(&scorer.model(&built.0.0)?, Which::Validation, Some(&tasks))?;
            let (acc, loss) = (v.mean(), v.mean_loss());
            points[k] = Some(GridPoint {
                hyper,
                val_acc: Some(acc),
                val_loss: Some(loss),
            });
            // A NaN loss ranks below every loss, so the choice does not
            // depend on the order the batches are scored in.
            let ranked_loss = if loss.is_nan() { f64::INFINITY } else { loss };
            let key = (acc, -ranked_loss, -(k as isize));
            if key.partial_cmp(&best_key) == Some(std::cmp::Ordering::Greater) {
                best_key = key;
                kept = Some((k, built));
            }
            Ok(())
        };
        for batch in lambda_batches(cands) {
            let first = &cands[batch[0]];
            match &first.1 {
                // Points that differ only in λ: merged once, scaled per λ
                // (bit for bit each λ's merge: `merge::typed::Merge::updates`).
                Candidate::Typed(m) if batch.len() > 1 => {
                    let window = crate::alloc::PeakWindow::open();
                    let t0 = Instant::now();
                    let updates = self
                        .run
                        .phase(&format!("{} {method} {:?} update", g.name, first.0), || {
                            m.updates(base, &g.weights, plan.seed)
                        })?
                        .context("a merge with a λ has updates")?;
                    let (update_seconds, update_peak) = (
                        t0.elapsed().as_secs_f64(),
                        window.growth().map(|b| b as f64 / 1e6),
                    );
                    drop(window);
                    for &k in &batch {
                        let (hyper, cand) = &cands[k];
                        let Candidate::Typed(mk) = cand else {
                            unreachable!("a λ batch holds typed merges")
                        };
                        let lambda = mk.lambda().expect("a λ batch");
                        let window = crate::alloc::PeakWindow::open();
                        let t = Instant::now();
                        let sd = self
                            .run
                            .phase(&format!("{} {method} {hyper:?}", g.name), || {
                                updates.apply(base, lambda)
                            })?;
                        // What this point alone costs: the update and one application.
                        let seconds = update_seconds + t.elapsed().as_secs_f64();
                        let peak = match (update_peak, window.growth()) {
                            (Some(u), Some(a)) => Some(u + a as f64 / 1e6),
                            _ => None,
                        };
                        drop(window);
                        consider(k, ((sd, Some(mk.clone()), None), seconds, peak))?;
                    }
                }
                _ => {
                    for &k in &batch {
                        let (hyper, cand) = &cands[k];
                        let built = self
                            .run
                            .phase(&format!("{} {method} {hyper:?}", g.name), || timed(cand))?;
                        consider(k, built)?;
                    }
                }
            }
        }
        let points: Vec<GridPoint> = points
            .into_iter()
            .map(|p| p.expect("every point scored"))
            .collect();
        let (chosen, (built, merge_seconds, peak_mb)) = kept.expect("a grid of at least one point");
        let m = scorer.model(&built.0)?;
        let test = scorer.score(&m, Which::Test, Some(&tasks))?;
        let ood = scorer.score(&m, Which::Ood, Some(&tasks))?;
        let row = MergeRow {
            group: g.name.clone(),
            method: method.to_string(),
            hyper: cands[chosen].0.clone(),
            grid: points,
            normalised: normalised(&test.tasks, ind_test),
            normalised_ood: normalised_ood(&ood.tasks, ind_ood),
            test,
            ood,
            merge_seconds,
            peak_mb,
            yaml: None,
            yaml_identical: None,
            note: built.2.clone(),
        };
        Ok((row, built))
    }

    /// The same merge from a mergekit YAML config ([`yaml_check`]), for
    /// the typed methods: its path and whether its tensors are identical.
    #[allow(clippy::too_many_arguments)]
    fn with_yaml(
        &mut self,
        mut row: MergeRow,
        built: &Built,
        g: &Group<'_>,
        method: &str,
        base_path: &Path,
        model_paths: &[PathBuf],
        config_dir: &Path,
    ) -> anyhow::Result<MergeRow> {
        if let Some(t) = &built.1 {
            let seed = self.plan.seed;
            let (rel, same) = self.run.phase(&format!("{} {method} yaml", g.name), || {
                yaml_check(
                    t,
                    &built.0,
                    base_path,
                    model_paths,
                    config_dir,
                    &g.file_name(),
                    method,
                    seed,
                )
            })?;
            (row.yaml, row.yaml_identical) = (Some(rel), Some(same));
        }
        Ok(row)
    }

    /// The group's task vectors, and how each pair of tasks merges (at
    /// task arithmetic's chosen λ).
    fn analyse(&mut self, g: &Group<'_>, ind_test: &BTreeMap<String, f64>) -> anyhow::Result<()> {
        let ta_lambda = self
            .results
            .rows
            .iter()
            .find(|r| r.group == g.name && r.method == "task_arithmetic")
            .and_then(|r| r.hyper.get("lambda").copied())
            .unwrap_or(self.plan.lambdas[0]);
        let (plan, scorer, base) = (self.plan, self.scorer, &self.prep.base.weights);
        let analysis = self.run.phase(&format!("{} task vectors", g.name), || {
            task_vectors(plan, scorer, base, g, ta_lambda, ind_test)
        })?;
        self.results.analyses.push(analysis);
        Ok(())
    }

    /// Saves the group's best merge as a Hugging Face folder under `best/`,
    /// rebuilt from its row's hyper-parameters (the merges are
    /// deterministic per seed; a resumed run's best may be an earlier
    /// part's row).
    fn save_best(&mut self, g: &Group<'_>, grams: &mut Option<Vec<PathBuf>>) -> anyhow::Result<()> {
        let Some(row) = self.best_row(&g.name).cloned() else {
            return Ok(());
        };
        let cand = grid(self.plan, &row.method, self.lora_group(&g.name))
            .into_iter()
            .find(|(h, _)| *h == row.hyper)
            .map(|(_, c)| c)
            .with_context(|| {
                format!(
                    "{}: the chosen {} {:?} is not in its grid",
                    g.name, row.method, row.hyper
                )
            })?;
        let grams = match cand {
            Candidate::RegMean => Some(self.grams(g, grams)?),
            _ => None,
        };
        let rel = best_path(&g.name);
        let dir = self.run.dir.join(&rel);
        let (plan, prep) = (self.plan, self.prep);
        self.run.phase(&format!("{} save best", g.name), || {
            let (mut sd, _, _) = Self::build((plan, &prep.base.weights), g, &cand, grams)?;
            s2ft_core::pretrained::save_hf_folder(
                &dir,
                &prep.base.config,
                &mut sd,
                &prep.base.tokenizer,
                weights::DEFAULT_SHARD_BYTES,
            )?;
            anyhow::Ok(())
        })?;
        self.results.best.push(BestModel {
            group: g.name.clone(),
            method: row.method,
            path: rel,
        });
        self.partial()
    }

    /// Removes the scratch inputs (unless kept), writes the CSV, the plots,
    /// the report and the metrics; returns the report folder.
    fn finish(self, c: &LlamaConfig) -> anyhow::Result<PathBuf> {
        self.bar.finish_and_clear();
        if !self.plan.keep_inputs {
            let _ = std::fs::remove_dir_all(&self.inputs);
        }
        let (plan, r) = (self.plan, self.results);
        self.run
            .write("merges.csv", merges_csv(&r.rows).as_bytes())?;
        plots(&self.run, plan, &r.rows, &r.analyses)?;
        let md = report(
            plan,
            c,
            self.prep.base.weights.numel(),
            &self.base,
            &own_scores(&self.individual),
            &r.rows,
            &r.analyses,
            &r.best,
        );
        let metrics = Metrics {
            model: &plan.model,
            config: c,
            plan,
            inputs: &self.prep.inputs,
            parts: &[],
            rows: Rows {
                base: self.base,
                individual: self.individual,
                merges: r.rows,
                task_vectors: r.analyses,
                best: r.best,
                memory_measured: crate::alloc::installed(),
            },
        };
        self.run.finish(&metrics, &md)?;
        Ok(self.run.dir.clone())
    }
}

/// The Gram matrices of every fine-tune on its own task's unlabelled
/// prompts, one file per fine-tune; returns their paths.
fn write_grams<B: Backend>(
    scorer: &Scorer<'_, B>,
    g: &Group<'_>,
    sets: &[TaskSets],
    inputs: &Path,
) -> anyhow::Result<Vec<PathBuf>> {
    let dir = inputs.join("grams").join(g.file_name());
    std::fs::create_dir_all(&dir)?;
    g.members
        .iter()
        .zip(&g.weights)
        .map(|(f, w)| {
            let prompts = &sets
                .iter()
                .find(|s| s.task == f.task)
                .expect("task set")
                .unlabelled;
            let grams = scorer.model(w)?.input_grams(prompts);
            let p = dir.join(format!("{}.safetensors", f.task.name()));
            grams.save_safetensors(&p)?;
            Ok(p)
        })
        .collect()
}

/// Writes `merge`'s YAML config (inputs relative to the config), runs it
/// through `merge::run`, compares the result with `merged` bit for bit and
/// removes the output. Returns the config's path relative to the report
/// folder and whether the tensors were identical.
#[allow(clippy::too_many_arguments)]
fn yaml_check(
    merge: &Merge,
    merged: &StateDict,
    base: &Path,
    models: &[PathBuf],
    config_dir: &Path,
    group: &str,
    method: &str,
    seed: u64,
) -> anyhow::Result<(String, bool)> {
    // RegMean's Gram files are parameters: relative to the config too.
    let merge = match merge {
        Merge::RegMean { grams, options } => Merge::RegMean {
            grams: grams.iter().map(|p| relative_path(p, config_dir)).collect(),
            options: *options,
        },
        m => m.clone(),
    };
    let rel = |p: &Path| relative_path(p, config_dir).to_string_lossy().into_owned();
    let names: Vec<String> = models.iter().map(|p| rel(p)).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let text = merge.to_yaml(Some(&rel(base)), &refs)?;
    let name = format!("{group}_{method}.yml");
    let path = config_dir.join(&name);
    weights::atomic::write_atomic(&path, text.as_bytes())?;
    let out = config_dir.join(format!(".{group}_{method}.out"));
    let _ = std::fs::remove_dir_all(&out);
    let opts = merge::run::RunOptions {
        seed,
        ..Default::default()
    };
    merge::run::run_file(&path, &out, &opts)
        .with_context(|| format!("running {}", path.display()))?;
    let back = StateDict::load(&out)?;
    std::fs::remove_dir_all(&out)?;
    let same = back.len() == merged.len()
        && merged.iter().all(|(n, t)| {
            back.get(n).is_some_and(|b| {
                b.shape() == t.shape()
                    && b.data
                        .iter()
                        .zip(t.data.iter())
                        .all(|(x, y)| x.to_bits() == y.to_bits())
            })
        });
    Ok((format!("configs/{name}"), same))
}

/// The group's fine-tuning method as the `s2ft` study names it.
fn group_method(group: &str) -> Option<crate::studies::s2ft::Method> {
    use crate::studies::s2ft::Method;
    use s2ft_core::s2ft::Strategy;
    let r: Option<usize> = group.rsplit_once(" r").and_then(|(_, r)| r.parse().ok());
    [Method::Full]
        .into_iter()
        .chain(r.into_iter().flat_map(|r| {
            [
                Method::Lora(r),
                Method::S2ft(r, Strategy::Random),
                Method::S2ft(r, Strategy::ActivationNorm),
            ]
        }))
        .find(|m| m.label() == group)
}

/// The group's fine-tuning method, the learning rate the `s2ft` run chose
/// for it, and the `s2ft` plan of one fine-tune on all the group's tasks
/// for as many steps as its task fine-tunes together.
fn mtl_plan(
    plan: &Plan,
    tr: &Training,
    g: &Group<'_>,
    tasks: &[InstructTask],
) -> anyhow::Result<(
    crate::studies::s2ft::Method,
    f64,
    crate::studies::s2ft_llm::Plan,
)> {
    let method = group_method(&g.name).with_context(|| {
        format!(
            "mtl: group '{}' is no fine-tuning method of the s2ft study",
            g.name
        )
    })?;
    let lr = *tr
        .lrs
        .get(&g.name)
        .with_context(|| format!("mtl: the s2ft run chose no learning rate for '{}'", g.name))?;
    let mut args = crate::studies::s2ft::S2ftArgs::default();
    args.lm.steps = Some(tr.steps * tasks.len());
    args.lm.batch = Some(tr.batch);
    args.lm.seed = tr.seed;
    args.llm.model = Some(plan.model.clone());
    args.llm.tasks = Some(tasks.iter().map(|t| t.name().to_string()).collect());
    args.llm.lora_dropout = Some(tr.lora_dropout);
    args.llm.lr_schedule = Some(tr.lr_schedule);
    args.llm.warmup_ratio = (tr.lr_schedule == ScheduleKind::Linear).then_some(tr.warmup_ratio);
    args.ranks = method.rank().map(|r| vec![r]);
    let s2ft_plan = crate::studies::s2ft_llm::Plan::new(&args)?;
    Ok((method, lr, s2ft_plan))
}

/// Multi-task fine-tuning (FusionBench's MTL row): the group's method
/// trained on all its tasks in turn, for as many examples as its
/// individual fine-tunes saw together, at the learning rate the `s2ft` run chose.
#[allow(clippy::too_many_arguments)]
fn mtl_row<B: AutodiffBackend>(
    plan: &Plan,
    prep: &Prepared,
    scorer: &Scorer<'_, B::InnerBackend>,
    g: &Group<'_>,
    ind_test: &BTreeMap<String, f64>,
    ind_ood: &BTreeMap<String, f64>,
    device: &B::Device,
) -> anyhow::Result<MergeRow>
where
    Llama<B>: burn::module::AutodiffModule<B, InnerModule = Llama<B::InnerBackend>>,
{
    use burn::module::AutodiffModule;
    let tr = plan
        .training
        .as_ref()
        .expect("mtl needs the run's training settings");
    let tasks = g.tasks();
    let (method, lr, s2ft_plan) = mtl_plan(plan, tr, g, &tasks)?;
    let steps = tr.steps * tasks.len();
    let prompter = Prompter::new(&prep.base.tokenizer)?;
    let t = crate::studies::s2ft_llm::finetune::<B>(
        &prep.base,
        &prep.words,
        &prompter,
        &s2ft_plan,
        method,
        &tasks,
        lr,
        device,
        &indicatif::ProgressBar::hidden(),
    )?;
    let note = format!(
        "multi-task fine-tuning: {} on {} in turn, {steps} steps of {} examples (the individual fine-tunes' examples together), lr {lr:e}, {} trainable parameters{}",
        g.name,
        tasks
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>()
            .join(", "),
        tr.batch,
        t.trainable,
        t.diverged
            .as_ref()
            .map_or(String::new(), |d| format!("; diverged: {d}"))
    );
    let (test, ood) = if t.diverged.is_some() {
        (Accs::default(), Accs::default())
    } else {
        let m = t.model.valid();
        (
            scorer.score(&m, Which::Test, Some(&tasks))?,
            scorer.score(&m, Which::Ood, Some(&tasks))?,
        )
    };
    Ok(MergeRow {
        group: g.name.clone(),
        method: "mtl".into(),
        hyper: [("lr".to_string(), lr), ("steps".to_string(), steps as f64)]
            .into_iter()
            .collect(),
        grid: Vec::new(),
        normalised: normalised(&test.tasks, ind_test),
        normalised_ood: normalised_ood(&ood.tasks, ind_ood),
        test,
        ood,
        merge_seconds: t.seconds,
        peak_mb: None,
        yaml: None,
        yaml_identical: None,
        note: Some(note),
    })
}

/// Reversible Model Merging: one shared store of rank `max(1, n − 2)`, each
/// task's weights rebuilt and scored on that task only.
fn rmm_row<B: Backend>(
    scorer: &Scorer<'_, B>,
    base: &StateDict,
    g: &Group<'_>,
    ind_test: &BTreeMap<String, f64>,
    ind_ood: &BTreeMap<String, f64>,
) -> anyhow::Result<MergeRow> {
    let tvs: Vec<indexmap::IndexMap<String, Array2<f32>>> = g
        .weights
        .iter()
        .map(|w| task_matrices(w, base).into_iter().collect())
        .collect();
    let n = tvs.len();
    let p = n.saturating_sub(2).max(1);
    let t0 = Instant::now();
    let rmm = merge::lora::rmm_fit(&tvs, p)?;
    let merge_seconds = t0.elapsed().as_secs_f64();
    let (mut test, mut ood) = (Accs::default(), Accs::default());
    for (k, f) in g.members.iter().enumerate() {
        let m = scorer.model(&add(base, &rmm.reconstruct(k)?))?;
        let only = [f.task];
        let (a, b) = (
            scorer.score(&m, Which::Test, Some(&only))?,
            scorer.score(&m, Which::Ood, Some(&only))?,
        );
        test.tasks.extend(a.tasks);
        test.loss.extend(a.loss);
        ood.tasks.extend(b.tasks);
        ood.loss.extend(b.loss);
    }
    Ok(MergeRow {
        group: g.name.clone(),
        method: "rmm".into(),
        hyper: [("rank".to_string(), p as f64)].into_iter().collect(),
        grid: Vec::new(),
        normalised: normalised(&test.tasks, ind_test),
        normalised_ood: normalised_ood(&ood.tasks, ind_ood),
        test,
        ood,
        merge_seconds,
        peak_mb: None,
        yaml: None,
        yaml_identical: None,
        note: Some(format!(
            "one store of rank {p} ({:.2}× one model's task vectors); each task scored with its own rebuilt weights, so not one merged model",
            rmm.storage_ratio()
        )),
    })
}

/// Weight matching of each fine-tune to the base: for fine-tunes of one
/// base it should find the identity (the fraction of units left in place).
fn wm_row(c: &LlamaConfig, base: &StateDict, g: &Group<'_>, seed: u64) -> anyhow::Result<MergeRow> {
    let spec = permute::builders::llama(c, base)?;
    let t0 = Instant::now();
    let mut fractions = BTreeMap::new();
    for (f, w) in g.members.iter().zip(&g.weights) {
        let r = permute::weight_matching(
            &spec,
            base,
            w,
            &permute::MatchOptions {
                seed,
                ..Default::default()
            },
        )?;
        fractions.insert(f.task.name().to_string(), fixed_fraction([&r.perm]));
    }
    let min = fractions.values().copied().fold(1.0, f64::min);
    Ok(MergeRow {
        group: g.name.clone(),
        method: "wm_check".into(),
        hyper: BTreeMap::new(),
        grid: Vec::new(),
        test: Accs::default(),
        ood: Accs::default(),
        normalised: normalised(&BTreeMap::new(), &BTreeMap::new()),
        normalised_ood: normalised_ood(&BTreeMap::new(), &BTreeMap::new()),
        merge_seconds: t0.elapsed().as_secs_f64(),
        peak_mb: None,
        yaml: None,
        yaml_identical: None,
        note: Some(format!(
            "weight matching to the base leaves {:.4} of the units in place (lowest over tasks; per task {fractions:?}): {}",
            min,
            if min == 1.0 {
                "the identity, so permutation-aware merging is the plain merge"
            } else {
                "not the identity"
            }
        )),
    })
}

/// One pair of tasks of a group.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct PairStats {
    /// The two tasks.
    pub a: String,
    /// Second task.
    pub b: String,
    /// Cosine of the whole task vectors.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub cosine: f64,
    /// Mean top-k subspace overlap over the analysed weights.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub overlap: f64,
    /// Normalised accuracy of the pair merged alone by task arithmetic (λ of the group's choice).
    pub pair_normalised: Option<f64>,
}

/// A group's task-vector analysis.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Analysis {
    /// The group.
    pub group: String,
    /// Tasks, in matrix order.
    pub tasks: Vec<String>,
    /// Whole task-vector norm per task.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub norms: Vec<f64>,
    /// Mean stable rank per task (analysed weights).
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub mean_stable_rank: Vec<f64>,
    /// Mean numerical rank per task (analysed weights).
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub mean_numerical_rank: Vec<f64>,
    /// Cosine matrix.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub cosines: Vec<Vec<f64>>,
    /// Overlap matrix (1 on the diagonal).
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub overlaps: Vec<Vec<f64>>,
    /// Pairs.
    pub pairs: Vec<PairStats>,
    /// Pearson correlation of overlap and pair normalised accuracy, over the pairs (3 pairs or more).
    pub overlap_vs_pair_accuracy: Option<f64>,
    /// λ of the pair merges.
    pub pair_lambda: f64,
    /// Per weight and task.
    pub weights: Vec<WeightStats>,
}

/// Pearson correlation, `None` under 3 points or zero variance.
pub fn pearson(x: &[f64], y: &[f64]) -> Option<f64> {
    if x.len() < 3 || x.len() != y.len() {
        return None;
    }
    let (mx, my) = (mean(x.iter().copied()), mean(y.iter().copied()));
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx).powi(2);
        syy += (b - my).powi(2);
    }
    (sxx > 0.0 && syy > 0.0).then(|| sxy / (sxx * syy).sqrt())
}

fn task_vectors<B: Backend>(
    plan: &Plan,
    scorer: &Scorer<'_, B>,
    base: &StateDict,
    g: &Group<'_>,
    pair_lambda: f64,
    ind_test: &BTreeMap<String, f64>,
) -> anyhow::Result<Analysis> {
    let tvs: Vec<Vec<(String, Array2<f32>)>> =
        g.weights.iter().map(|w| task_matrices(w, base)).collect();
    let dot = |a: &[(String, Array2<f32>)], b: &[(String, Array2<f32>)]| -> f64 {
        a.iter()
            .zip(b)
            .map(|((_, x), (_, y))| {
                x.iter()
                    .zip(y)
                    .map(|(p, q)| *p as f64 * *q as f64)
                    .sum::<f64>()
            })
            .sum()
    };
    let norms: Vec<f64> = tvs.iter().map(|t| dot(t, t).sqrt()).collect();
    let cosines = symmetric(tvs.len(), |i, j| {
        Ok(dot(&tvs[i], &tvs[j]) / (norms[i] * norms[j]).max(1e-30))
    })?;
    let analysed = analysed_layers(plan, scorer.config.num_hidden_layers);
    let (weights, overlaps) = spectra_of(plan, g, &tvs, &analysed)?;
    drop(tvs);
    let pairs = pair_merges(
        plan,
        scorer,
        base,
        g,
        pair_lambda,
        ind_test,
        (&cosines, &overlaps),
    )?;
    let ok: Vec<&PairStats> = pairs
        .iter()
        .filter(|p| p.pair_normalised.is_some())
        .collect();
    let overlap_vs_pair_accuracy = pearson(
        &ok.iter().map(|p| p.overlap).collect::<Vec<_>>(),
        &ok.iter()
            .filter_map(|p| p.pair_normalised)
            .collect::<Vec<_>>(),
    );
    let per_task = |f: &dyn Fn(&WeightStats) -> f64| -> Vec<f64> {
        g.members
            .iter()
            .map(|m| mean(weights.iter().filter(|w| w.task == m.task.name()).map(f)))
            .collect()
    };
    Ok(Analysis {
        group: g.name.clone(),
        tasks: g
            .members
            .iter()
            .map(|f| f.task.name().to_string())
            .collect(),
        mean_stable_rank: per_task(&|w| w.stable_rank),
        mean_numerical_rank: per_task(&|w| w.numerical_rank as f64),
        norms,
        cosines,
        overlaps,
        pairs,
        overlap_vs_pair_accuracy,
        pair_lambda,
        weights,
    })
}

/// An `n × n` symmetric matrix with 1 on the diagonal and `f(i, j)` above it.
#[allow(clippy::needless_range_loop)] // i and j name the pair as well as index the matrix
fn symmetric(
    n: usize,
    mut f: impl FnMut(usize, usize) -> anyhow::Result<f64>,
) -> anyhow::Result<Vec<Vec<f64>>> {
    let mut m = vec![vec![1.0; n]; n];
    for i in 0..n {
        for j in i + 1..n {
            let v = f(i, j)?;
            m[i][j] = v;
            m[j][i] = v;
        }
    }
    Ok(m)
}

/// The blocks whose weights are analysed: `--analysis-layers`, else the
/// first, middle and last with `--quick`, else all.
fn analysed_layers(plan: &Plan, layers: usize) -> Vec<usize> {
    match &plan.analysis_layers {
        Some(l) => l.clone(),
        None if plan.quick => {
            let mut v = vec![0, layers / 2, layers - 1];
            v.dedup();
            v
        }
        None => (0..layers).collect(),
    }
}

/// Singular-value statistics of every task's analysed weights, and per pair
/// of tasks the mean top-k subspace overlap over the weights both touched.
fn spectra_of(
    plan: &Plan,
    g: &Group<'_>,
    tvs: &[Vec<(String, Array2<f32>)>],
    analysed: &[usize],
) -> anyhow::Result<(Vec<WeightStats>, Vec<Vec<f64>>)> {
    let in_analysis =
        |name: &str| merge::run::layer_of(name).is_some_and(|(l, _)| analysed.contains(&l));
    let mut weights = Vec::new();
    let mut svds: Vec<Vec<Option<spectra::linalg::Svd<f64>>>> = vec![Vec::new(); tvs.len()];
    for (k, tv) in tvs.iter().enumerate() {
        for (name, d) in tv.iter() {
            if !in_analysis(name) {
                continue;
            }
            let d64: Array2<f64> = d.mapv(f64::from);
            let top = d64.iter().fold(0f64, |a, b| a.max(b.abs()));
            if top == 0.0 {
                // An untouched weight (S²FT trains only o_proj and down_proj).
                svds[k].push(None);
                continue;
            }
            let svd = spectra::linalg::thin_svd(ArrayView2::from(&d64), name)?;
            weights.push(WeightStats::from_singular_values(
                g.members[k].task.name(),
                name,
                &svd.s.to_vec(),
            ));
            svds[k].push(Some(svd));
        }
    }
    let overlaps = symmetric(tvs.len(), |i, j| {
        let mut v = Vec::new();
        for (a, b) in svds[i].iter().zip(&svds[j]) {
            if let (Some(a), Some(b)) = (a, b) {
                v.push(spectra::alignment::subspace_overlap(a, b, plan.overlap_k)?);
            }
        }
        Ok(mean(v))
    })?;
    Ok((weights, overlaps))
}

/// Each pair of the group's tasks merged alone by task arithmetic at
/// `pair_lambda`, scored (normalised) on its two tasks.
fn pair_merges<B: Backend>(
    plan: &Plan,
    scorer: &Scorer<'_, B>,
    base: &StateDict,
    g: &Group<'_>,
    pair_lambda: f64,
    ind_test: &BTreeMap<String, f64>,
    (cosines, overlaps): (&[Vec<f64>], &[Vec<f64>]),
) -> anyhow::Result<Vec<PairStats>> {
    let n = g.members.len();
    let mut pairs = Vec::new();
    for i in 0..n {
        for j in i + 1..n {
            let pair = [g.weights[i].clone(), g.weights[j].clone()];
            let merged = tv(TaskVectorPreset::TaskArithmetic, pair_lambda, None).merge(
                Some(base),
                &pair,
                plan.seed,
            )?;
            let only = [g.members[i].task, g.members[j].task];
            let acc = scorer.score(&scorer.model(&merged)?, Which::Test, Some(&only))?;
            let ind: BTreeMap<String, f64> = only
                .iter()
                .map(|t| (t.name().to_string(), ind_test[t.name()]))
                .collect();
            pairs.push(PairStats {
                a: only[0].name().into(),
                b: only[1].name().into(),
                cosine: cosines[i][j],
                overlap: overlaps[i][j],
                pair_normalised: normalised(&acc.tasks, &ind).mean,
            });
        }
    }
    Ok(pairs)
}

fn fmt(v: Option<f64>) -> String {
    v.filter(|x| x.is_finite())
        .map_or("–".into(), |x| format!("{x:.3}"))
}

fn merges_csv(rows: &[MergeRow]) -> String {
    let mut s = String::from(
        "group,method,hyper,test_mean,ood_mean,normalised,normalised_ood,merge_seconds,peak_mb,yaml_identical\n",
    );
    for r in rows {
        s.push_str(&format!(
            "{},{},{},{},{},{},{},{:.2},{},{}\n",
            r.group,
            r.method,
            r.hyper
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" "),
            fmt(Some(r.test.mean())),
            fmt(Some(r.ood.mean())),
            fmt(r.normalised.mean),
            fmt(r.normalised_ood.mean),
            r.merge_seconds,
            r.peak_mb.map_or(String::new(), |v| format!("{v:.0}")),
            r.yaml_identical.map_or(String::new(), |v| v.to_string())
        ));
    }
    s
}

fn plots(run: &Run, plan: &Plan, rows: &[MergeRow], analyses: &[Analysis]) -> anyhow::Result<()> {
    let methods: Vec<String> = plan
        .methods
        .iter()
        .filter(|m| {
            rows.iter()
                .any(|r| &r.method == *m && r.normalised.mean.is_some())
        })
        .cloned()
        .collect();
    let series: Vec<(String, Vec<f64>)> = plan
        .groups
        .iter()
        .map(|g| {
            (
                g.clone(),
                methods
                    .iter()
                    .map(|m| {
                        rows.iter()
                            .find(|r| &r.group == g && &r.method == m)
                            .and_then(|r| r.normalised.mean)
                            .unwrap_or(f64::NAN)
                    })
                    .collect(),
            )
        })
        .collect();
    grouped_bar_chart(
        &run.dir.join("normalised_accuracy"),
        "Normalised accuracy of merged fine-tunes (merged ÷ individual, mean over tasks)",
        "normalised accuracy",
        &methods
            .iter()
            .map(|m| m.replace('_', " "))
            .collect::<Vec<_>>(),
        &series,
    )?;
    lambda_plot(run, &plan.groups, rows)?;
    for a in analyses {
        heatmap(
            &run.dir.join(format!("cosine_{}", file_name(&a.group))),
            &format!("Task-vector cosines, {} ({})", a.group, a.tasks.join(", ")),
            "task",
            "task",
            &a.cosines,
        )?;
    }
    Ok(())
}

/// Validation accuracy against λ for task arithmetic (solid) and TIES (at
/// its chosen density, dashed), one colour per group.
fn lambda_plot(run: &Run, groups: &[String], rows: &[MergeRow]) -> anyhow::Result<()> {
    let mut lines = Vec::new();
    for (i, g) in groups.iter().enumerate() {
        for (method, label, dashed) in [("task_arithmetic", "TA", false), ("ties", "TIES", true)] {
            if let Some(r) = rows.iter().find(|r| &r.group == g && r.method == method) {
                // TIES at its chosen density.
                let d = r.hyper.get("density").copied();
                let pts: Vec<(f64, f64)> = r
                    .grid
                    .iter()
                    .filter(|p| p.hyper.get("density").copied() == d)
                    .filter_map(|p| Some((p.hyper.get("lambda").copied()?, p.val_acc?)))
                    .collect();
                if !pts.is_empty() {
                    let line = Series::line(format!("{g} {label}"), pts).colored(i);
                    lines.push(if dashed { line.dashed() } else { line });
                }
            }
        }
    }
    if !lines.is_empty() {
        line_chart(
            &run.dir.join("accuracy_vs_lambda"),
            "Validation accuracy vs λ (task arithmetic solid, TIES dashed, at its chosen density)",
            "λ",
            "mean validation accuracy",
            &lines,
        )?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn report(
    plan: &Plan,
    c: &LlamaConfig,
    params: usize,
    base: &BaseScores,
    own: &OwnScores,
    rows: &[MergeRow],
    analyses: &[Analysis],
    best: &[BestModel],
) -> String {
    let mut md = format!(
        "# Merging real fine-tunes of {}\n\nBase `{}` ({} layers, hidden {}, vocabulary {}, {} parameters); {} fine-tunes in {} groups: {}. \
         Every merged model is scored by exact match of greedy decoding on {} test and {} out-of-domain examples of each of its tasks; \
         hyper-parameters are chosen on {} validation examples per task (grids: λ {:?} for the task-vector merges, λ {:?} for TSV-M / Iso-C / Iso-CTS, density {:?}). \
         Task-vector merges sum the (sparsified, sign-elected) task vectors and scale them by λ (FusionBench's convention; mergekit `normalize: false`). \
         RegMean uses each fine-tune's Gram matrices on {} unlabelled training prompts of its task (off-diagonal scale {}). \
         **Normalised accuracy** = merged ÷ the group's individual fine-tune on that task (FusionBench), averaged over tasks; \
         normalised OOD is the same on the out-of-domain splits, leaving out the tasks where the individual fine-tune scores under {} there.\n\n",
        plan.model.file_name().map_or_else(
            || plan.model.display().to_string(),
            |n| n.to_string_lossy().into_owned()
        ),
        plan.model.display(),
        c.num_hidden_layers,
        c.hidden_size,
        c.vocab_size,
        params,
        plan.sources.len(),
        plan.groups.len(),
        plan.groups.join(", "),
        plan.eval_examples,
        plan.eval_examples,
        plan.val_examples,
        plan.lambdas,
        plan.svd_lambdas,
        plan.densities,
        plan.regmean_prompts,
        plan.regmean_alpha,
        OOD_REFERENCE_FLOOR,
    );
    normalised_table(&mut md, plan, rows);
    task_table(&mut md, plan, base, own, rows);
    grids_and_vectors(&mut md, plan, rows, analyses);
    outputs(&mut md, plan, best);
    md
}

/// The report's table of normalised accuracy (in-domain / OOD), method by group.
fn normalised_table(md: &mut String, plan: &Plan, rows: &[MergeRow]) {
    md.push_str(
        "## Normalised accuracy (in-domain test / out-of-domain, mean over tasks)\n\n| method |",
    );
    for g in &plan.groups {
        md.push_str(&format!(" {g} |"));
    }
    md.push_str("\n|---|");
    for _ in &plan.groups {
        md.push_str("---|");
    }
    md.push('\n');
    for m in &plan.methods {
        if !rows.iter().any(|r| {
            &r.method == m && (r.normalised.mean.is_some() || r.normalised_ood.mean.is_some())
        }) {
            continue;
        }
        md.push_str(&format!("| {m} |"));
        for g in &plan.groups {
            let r = rows.iter().find(|r| &r.group == g && &r.method == m);
            md.push_str(&match r {
                Some(r) => format!(
                    " {} / {} |",
                    fmt(r.normalised.mean),
                    fmt(r.normalised_ood.mean)
                ),
                None => " – |".into(),
            });
        }
        md.push('\n');
    }
}

/// The report's table of every model's accuracy per task, and the rows' notes.
fn task_table(md: &mut String, plan: &Plan, base: &BaseScores, own: &OwnScores, rows: &[MergeRow]) {
    let tasks: Vec<&str> = plan.tasks.iter().map(|t| t.name()).collect();
    md.push_str("\n![normalised accuracy](normalised_accuracy.png)\n\n## Accuracy per task (test / OOD)\n\n| group | model | ");
    md.push_str(
        &tasks
            .iter()
            .map(|t| format!("{t} |"))
            .collect::<Vec<_>>()
            .join(" "),
    );
    md.push_str(" mean test | normalised | normalised OOD | hyper-parameters | merge s | peak MB | YAML = in-memory |\n|---|---|");
    md.push_str(&"---|".repeat(tasks.len() + 7));
    md.push('\n');
    let cell = |t: &Accs, o: &Accs, task: &str| match (t.tasks.get(task), o.tasks.get(task)) {
        (Some(a), Some(b)) => format!("{a:.2} / {b:.2}"),
        _ => "–".into(),
    };
    md.push_str("| – | base |");
    for t in &tasks {
        md.push_str(&format!(" {} |", cell(&base.test, &base.ood, t)));
    }
    md.push_str(&format!(" {:.3} | | | | | | |\n", base.test.mean()));
    for g in &plan.groups {
        let (it, io) = &own[g];
        let (t, o) = (
            Accs {
                tasks: it.clone(),
                ..Default::default()
            },
            Accs {
                tasks: io.clone(),
                ..Default::default()
            },
        );
        md.push_str(&format!("| {g} | individual (own task) |"));
        for task in &tasks {
            md.push_str(&format!(" {} |", cell(&t, &o, task)));
        }
        md.push_str(&format!(" {:.3} | 1 | 1 | | | | |\n", t.mean()));
        for r in rows.iter().filter(|r| &r.group == g) {
            if r.method == "wm_check" {
                continue;
            }
            md.push_str(&format!("| {g} | {} |", r.method));
            for task in &tasks {
                md.push_str(&format!(" {} |", cell(&r.test, &r.ood, task)));
            }
            md.push_str(&row_tail(r));
        }
    }
    let notes: Vec<String> = rows
        .iter()
        .filter_map(|r| {
            r.note
                .as_ref()
                .map(|n| format!("- {} {}: {n}", r.group, r.method))
        })
        .collect();
    if !notes.is_empty() {
        md.push_str(&format!("\n{}\n", notes.join("\n")));
    }
}

/// A merge row's cells after its per-task ones: mean, normalised (test and
/// OOD), hyper-parameters, seconds, peak MB, YAML check.
fn row_tail(r: &MergeRow) -> String {
    format!(
        " {:.3} | {} | {} | {} | {:.1} | {} | {} |\n",
        r.test.mean(),
        fmt(r.normalised.mean),
        fmt(r.normalised_ood.mean),
        r.hyper
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", "),
        r.merge_seconds,
        r.peak_mb.map_or("–".into(), |v| format!("{v:.0}")),
        r.yaml_identical.map_or("–".into(), |v| if v {
            "identical".into()
        } else {
            "DIFFERS".to_string()
        }),
    )
}

/// The report's validation grids and task-vector analysis.
fn grids_and_vectors(md: &mut String, plan: &Plan, rows: &[MergeRow], analyses: &[Analysis]) {
    md.push_str("\n## Grids (validation, mean accuracy over tasks)\n\n| group | method | grid point | val acc | val answer loss |\n|---|---|---|---|---|\n");
    for r in rows.iter().filter(|r| r.grid.len() > 1) {
        for p in &r.grid {
            let chosen = p.hyper == r.hyper;
            md.push_str(&format!(
                "| {} | {} | {}{} | {} | {} |\n",
                r.group,
                r.method,
                p.hyper
                    .iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                if chosen { " ✓" } else { "" },
                fmt(p.val_acc),
                fmt(p.val_loss)
            ));
        }
    }
    md.push_str("\n![accuracy vs λ](accuracy_vs_lambda.png)\n\n## Task vectors\n\n| group | task | ‖τ‖ | mean stable rank | mean numerical rank |\n|---|---|---|---|---|\n");
    for a in analyses {
        for (k, t) in a.tasks.iter().enumerate() {
            md.push_str(&format!(
                "| {} | {t} | {:.3} | {:.2} | {:.1} |\n",
                a.group, a.norms[k], a.mean_stable_rank[k], a.mean_numerical_rank[k]
            ));
        }
    }
    md.push_str(&format!(
        "\nPairs: cosine of the whole task vectors, mean top-{} subspace overlap over the analysed weights (1: same span; about k/dim for unrelated matrices), and the pair merged alone by task arithmetic:\n\n| group | pair | cosine | subspace overlap | pair normalised acc |\n|---|---|---|---|---|\n",
        plan.overlap_k
    ));
    for a in analyses {
        for p in &a.pairs {
            md.push_str(&format!(
                "| {} | {}·{} | {:.4} | {:.4} | {} |\n",
                a.group,
                p.a,
                p.b,
                p.cosine,
                p.overlap,
                fmt(p.pair_normalised)
            ));
        }
        md.push_str(&format!(
            "| {} | correlation of overlap and pair accuracy (λ {}) | | | {} |\n",
            a.group,
            a.pair_lambda,
            fmt(a.overlap_vs_pair_accuracy)
        ));
    }
    for a in analyses {
        md.push_str(&format!(
            "\n![cosines {}](cosine_{}.png)\n",
            a.group,
            file_name(&a.group)
        ));
    }
}

/// The report's list of outputs.
fn outputs(md: &mut String, plan: &Plan, best: &[BestModel]) {
    md.push_str("\n## Outputs\n\n");
    for b in best {
        md.push_str(&format!(
            "- best merge of `{}` ({}): Hugging Face folder `{}`\n",
            b.group, b.method, b.path
        ));
    }
    md.push_str(&format!(
        "- mergekit YAML configs of every merge in `configs/`, each run through `merge::run` during the study and compared with the in-memory merge bit for bit (column *YAML = in-memory*); their inputs (fused adapters, the base as safetensors, RegMean's Gram matrices) {}.\n",
        if plan.keep_inputs { "are kept in `inputs/`" } else { "were written to `inputs/` and removed after the check (`--keep-inputs` keeps them)" }
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plan of the given groups and methods (and the grids below), for
    /// the report's and the grids' bookkeeping.
    fn test_plan(groups: &[&str], methods: &[&str]) -> Plan {
        Plan {
            model: PathBuf::new(),
            sources: vec![],
            tasks: vec![],
            groups: groups.iter().map(|g| g.to_string()).collect(),
            methods: methods.iter().map(|m| m.to_string()).collect(),
            lambdas: vec![0.3, 0.7, 1.0],
            svd_lambdas: vec![0.5, 1.5],
            densities: vec![0.2, 0.5],
            eval_examples: 1,
            val_examples: 1,
            regmean_prompts: 1,
            analysis_layers: None,
            seed: 0,
            eval_batch: 1,
            overlap_k: 1,
            regmean_alpha: 0.95,
            keep_inputs: false,
            quick: false,
            training: None,
        }
    }

    /// A row of `group`'s `method` with these scores and ratios (the rest
    /// empty), for the bookkeeping tests.
    fn test_row(
        group: &str,
        method: &str,
        (test, ood): (Accs, Accs),
        (normalised, normalised_ood): (Normalised, Normalised),
    ) -> MergeRow {
        MergeRow {
            group: group.into(),
            method: method.into(),
            hyper: BTreeMap::new(),
            grid: Vec::new(),
            normalised,
            normalised_ood,
            test,
            ood,
            merge_seconds: 1.0,
            peak_mb: None,
            yaml: None,
            yaml_identical: None,
            note: None,
        }
    }

    /// The grid's merges that differ only in λ are merged once: the sparse
    /// methods' λ × density grid falls into one batch per density (in grid
    /// order), the SVD merges into one, and merges without a λ stay alone.
    #[test]
    fn grid_points_differing_only_in_lambda_are_batched() {
        let plan = test_plan(&[], &[]);
        let ties = grid(&plan, "ties", false);
        assert_eq!(
            lambda_batches(&ties),
            vec![vec![0, 2, 4], vec![1, 3, 5]],
            "{:?}",
            ties.iter().map(|(h, _)| h).collect::<Vec<_>>()
        );
        for k in [0, 2, 4] {
            assert_eq!(ties[k].0["density"], 0.2);
        }
        assert_eq!(
            lambda_batches(&grid(&plan, "tsv_m", false)),
            vec![vec![0, 1]]
        );
        assert_eq!(
            lambda_batches(&grid(&plan, "task_arithmetic", false)),
            vec![vec![0, 1, 2]]
        );
        assert_eq!(
            lambda_batches(&grid(&plan, "sce", false)),
            vec![vec![0], vec![1]]
        );
        assert_eq!(
            lambda_batches(&grid(&plan, "average", false)),
            vec![vec![0]]
        );
    }

    /// The manifest a `s2ft --model` run writes is read back into typed
    /// entries; an unknown format or a missing field is an error naming the file.
    #[test]
    fn manifests_are_read_back_and_bad_ones_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("finetunes")).unwrap();
        let entry = |format: &str| {
            serde_json::json!({"task": "date", "method": "lora r8", "family": "lora",
                "rank": 8, "format": format, "path": "finetunes/date/lora-r8"})
        };
        let write = |v: serde_json::Value| {
            std::fs::write(dir.path().join("finetunes/manifest.json"), v.to_string()).unwrap()
        };
        write(serde_json::json!([entry("peft"), entry("hf")]));
        let sources = read_manifest(dir.path()).unwrap();
        assert_eq!(sources.len(), 2);
        assert_eq!(
            (sources[0].format, sources[1].format),
            (Format::Peft, Format::Hf)
        );
        assert_eq!(sources[0].group, "lora r8");
        assert_eq!(sources[0].path, dir.path().join("finetunes/date/lora-r8"));
        write(serde_json::json!([entry("gguf")]));
        let e = format!("{:#}", read_manifest(dir.path()).unwrap_err());
        assert!(e.contains("manifest.json") && e.contains("gguf"), "{e}");
        write(serde_json::json!([{"task": "date"}]));
        let e = format!("{:#}", read_manifest(dir.path()).unwrap_err());
        assert!(e.contains("manifest.json") && e.contains("method"), "{e}");
    }

    #[test]
    fn training_settings_are_read_from_a_s2ft_run() {
        let dir = tempfile::tempdir().unwrap();
        let m = serde_json::json!({
            "plan": {"steps": 150, "batch": 8, "seed": 3, "lora_dropout": 0.05, "model": "x"},
            "runs": [
                {"method": "full", "lr": 1e-4, "diverged": null, "task": "date"},
                {"method": "lora r4", "lr": 3e-3, "diverged": "loss NaN at step 9"},
                {"method": "lora r4", "lr": 1e-3, "diverged": null},
                {"method": "full", "lr": 3e-4, "diverged": null}
            ]
        });
        std::fs::write(dir.path().join("metrics.json"), m.to_string()).unwrap();
        let t = read_training(dir.path()).unwrap();
        assert_eq!(
            (t.steps, t.batch, t.seed, t.lora_dropout),
            (150, 8, 3, 0.05)
        );
        // The first run of each method that did not diverge.
        assert_eq!(t.lrs["full"], 1e-4);
        assert_eq!(t.lrs["lora r4"], 1e-3);
        // A run recorded before the schedule was an option trained at a constant rate.
        assert_eq!(
            (t.lr_schedule, t.warmup_ratio),
            (ScheduleKind::Constant, 0.0)
        );
        let mut m = m;
        m["plan"]["lr_schedule"] = "linear".into();
        m["plan"]["warmup_ratio"] = 0.1.into();
        std::fs::write(dir.path().join("metrics.json"), m.to_string()).unwrap();
        let t = read_training(dir.path()).unwrap();
        assert_eq!((t.lr_schedule, t.warmup_ratio), (ScheduleKind::Linear, 0.1));
        std::fs::write(dir.path().join("metrics.json"), r#"{"plan": {"steps": 1}}"#).unwrap();
        let e = format!("{:#}", read_training(dir.path()).unwrap_err());
        assert!(e.contains("--finetunes") && e.contains("batch"), "{e}");
    }

    /// A run split by `--methods` merges as one: its parts' rates are
    /// joined; parts trained otherwise, or training one method twice, are
    /// refused by name.
    #[test]
    fn the_parts_of_a_split_run_join_their_training_settings() {
        let part = |runs: serde_json::Value, steps: usize| {
            let dir = tempfile::tempdir().unwrap();
            let m = serde_json::json!({
                "plan": {"steps": steps, "batch": 8, "seed": 0, "lora_dropout": 0.05},
                "runs": runs,
            });
            std::fs::write(dir.path().join("metrics.json"), m.to_string()).unwrap();
            dir
        };
        let a = part(
            serde_json::json!([{"method": "full", "lr": 1e-4, "diverged": null}]),
            150,
        );
        let b = part(
            serde_json::json!([{"method": "lora r16", "lr": 3e-4, "diverged": null}]),
            150,
        );
        assert!(read_trainings(&[]).unwrap().is_none());
        let dirs = [a.path().to_path_buf(), b.path().to_path_buf()];
        let t = read_trainings(&dirs).unwrap().unwrap();
        assert_eq!(t.lrs, map(&[("full", 1e-4), ("lora r16", 3e-4)]));
        assert_eq!(t.steps, 150);
        let e = format!(
            "{:#}",
            read_trainings(&[dirs[0].clone(), dirs[0].clone()]).unwrap_err()
        );
        assert!(e.contains("both") && e.contains("'full'"), "{e}");
        let c = part(
            serde_json::json!([{"method": "s2ft-act r4", "lr": 1e-3, "diverged": null}]),
            32,
        );
        let e = format!(
            "{:#}",
            read_trainings(&[dirs[0].clone(), c.path().to_path_buf()]).unwrap_err()
        );
        assert!(
            e.contains("other settings") && e.contains("steps 150") && e.contains("steps 32"),
            "{e}"
        );
    }

    fn map(kv: &[(&str, f64)]) -> BTreeMap<String, f64> {
        kv.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn normalised_accuracy_by_hand() {
        let ind = map(&[("date", 0.8), ("lookup", 1.0), ("reverse", 0.0)]);
        let merged = map(&[("date", 0.4), ("lookup", 0.9), ("reverse", 0.25)]);
        let n = normalised(&merged, &ind);
        assert_eq!(n.tasks["date"], Some(0.5));
        assert_eq!(n.tasks["lookup"], Some(0.9));
        // An individual accuracy of 0 leaves the task out of the mean.
        assert_eq!(n.tasks["reverse"], None);
        assert!((n.mean.unwrap() - 0.7).abs() < 1e-12);
        // Above 1 when the merge beats the individual; none when nothing is defined.
        assert_eq!(
            normalised(&map(&[("a", 0.6)]), &map(&[("a", 0.5)])).mean,
            Some(1.2)
        );
        assert_eq!(
            normalised(&map(&[("a", 0.6)]), &map(&[("a", 0.0)])).mean,
            None
        );
        // Out of domain, an individual under the floor (1 of 100 examples)
        // is left out: the default run's full MTL row, whose acronym 0.18
        // against 0.01 made the mean 6.66.
        let ind = map(&[
            ("acronym", 0.01),
            ("date", 0.97),
            ("reverse", 0.0),
            ("lookup", 0.99),
        ]);
        let merged = map(&[
            ("acronym", 0.18),
            ("date", 0.99),
            ("reverse", 0.0),
            ("lookup", 0.96),
        ]);
        let n = normalised_ood(&merged, &ind);
        assert_eq!((n.tasks["acronym"], n.tasks["reverse"]), (None, None));
        assert!((n.mean.unwrap() - (0.99 / 0.97 + 0.96 / 0.99) / 2.0).abs() < 1e-12);
        assert_eq!(normalised(&merged, &ind).tasks["acronym"], Some(18.0));
        // At the floor it divides.
        let at = normalised_ood(&map(&[("a", 0.05)]), &map(&[("a", OOD_REFERENCE_FLOOR)]));
        assert!((at.mean.unwrap() - 0.5).abs() < 1e-12);
    }

    /// A resumed run's rows recorded by an earlier build get this build's
    /// normalised OOD accuracy; the permutation check's empty row stays empty.
    #[test]
    fn resumed_rows_are_renormalised() {
        let accs = |kv: &[(&str, f64)]| Accs {
            tasks: map(kv),
            ..Default::default()
        };
        let individual: Vec<Individual> = [("a", 0.9, 0.01), ("b", 0.8, 0.5)]
            .iter()
            .map(|&(t, test, ood)| Individual {
                group: "full".into(),
                task: t.into(),
                format: Format::Hf,
                path: PathBuf::from(t),
                test: accs(&[(t, test)]),
                ood: accs(&[(t, ood)]),
            })
            .collect();
        let own = own_scores(&individual);
        let row = |method: &str, test: Accs, ood: Accs| {
            // What the earlier build recorded: every ratio with a divisor above 0.
            let ratios = (
                normalised(&test.tasks, &own["full"].0),
                normalised(&ood.tasks, &own["full"].1),
            );
            test_row("full", method, (test, ood), ratios)
        };
        let mut rows = vec![
            row(
                "ties",
                accs(&[("a", 0.45), ("b", 0.8)]),
                accs(&[("a", 0.02), ("b", 0.25)]),
            ),
            row("wm_check", Accs::default(), Accs::default()),
        ];
        rows[1].normalised_ood = normalised_ood(&BTreeMap::new(), &BTreeMap::new());
        assert!((rows[0].normalised_ood.mean.unwrap() - 1.25).abs() < 1e-12);
        renormalise(&mut rows, &individual);
        assert_eq!(rows[0].normalised_ood.tasks["a"], None);
        assert!((rows[0].normalised_ood.mean.unwrap() - 0.5).abs() < 1e-12);
        assert!((rows[0].normalised.mean.unwrap() - 0.75).abs() < 1e-12);
        assert!(rows[1].normalised_ood.tasks.is_empty() && rows[1].normalised_ood.mean.is_none());
    }

    /// The report's summary table: in-domain / OOD normalised accuracy of
    /// each method per group, a dash for a group without the method, and no
    /// line for a method with nothing defined.
    #[test]
    fn normalised_table_shows_in_domain_and_ood_per_group() {
        let plan = test_plan(&["full", "lora r4"], &["average", "ties", "regmean"]);
        let norm = |mean: Option<f64>| Normalised {
            tasks: BTreeMap::new(),
            mean,
        };
        let row = |group: &str, method: &str, n: Option<f64>, o: Option<f64>| {
            test_row(group, method, Default::default(), (norm(n), norm(o)))
        };
        let rows = [
            row("full", "average", None, None),
            row("full", "ties", Some(0.75), Some(0.5)),
            row("full", "regmean", Some(0.915), None),
            row("lora r4", "regmean", Some(0.5854), Some(0.8516)),
        ];
        let mut md = String::new();
        normalised_table(&mut md, &plan, &rows);
        assert!(
            md.contains("| method | full | lora r4 |\n|---|---|---|\n"),
            "{md}"
        );
        assert!(md.contains("\n| ties | 0.750 / 0.500 | – |\n"), "{md}");
        assert!(
            md.contains("\n| regmean | 0.915 / – | 0.585 / 0.852 |\n"),
            "{md}"
        );
        assert!(!md.contains("| average |"), "{md}");
    }

    #[test]
    fn pearson_by_hand() {
        assert!((pearson(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.0]).unwrap() - 1.0).abs() < 1e-12);
        assert!((pearson(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]).unwrap() + 1.0).abs() < 1e-12);
        // x = 1,2,3,4 and y = 1,3,2,4: cov 2.5/… = 0.8.
        assert!(
            (pearson(&[1.0, 2.0, 3.0, 4.0], &[1.0, 3.0, 2.0, 4.0]).unwrap() - 0.8).abs() < 1e-12
        );
        assert_eq!(pearson(&[1.0, 2.0], &[1.0, 2.0]), None);
        assert_eq!(pearson(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]), None);
    }
}
