//! `moe`: a mixture of experts built from per-task fine-tunes of a real LLM
//! (mergekit-moe's assembly), then compressed by Sub-MoE, expert pruning and
//! averaging within clusters.
//!
//! Phases:
//! 1. **prepare** (before the report folder exists) — the base, one fine-tune
//!    per task of one group (`s2ft --model` run's `finetunes/manifest.json`,
//!    or `--expert TASK=PATH`), each checked against the base; every task's
//!    test and out-of-domain sets; each expert's positive prompts (training
//!    prompts of its task, as a mergekit-moe user would write them) and the
//!    calibration prompts (other training prompts, in the chat template).
//! 2. **baselines** — the base and each fine-tune on every task.
//! 3. **assemble** — per gate mode, the mergekit-moe config (written to
//!    `configs/`), its gates (hidden states of the base, embeddings, or a
//!    random draw) and the mixture, scored on every task; which experts each
//!    task's tokens are routed to.
//! 4. **compress** — the first gate mode's mixture cut to each `--keep`
//!    fraction of its experts by Sub-MoE (clusters of experts by output
//!    similarity on the calibration tokens, merged in a shared subspace),
//!    by pruning the least-routed experts, and by averaging each cluster.
//! 5. **report** — `metrics.json`, `models.csv`, `report.md`, plots; the
//!    first mixture as a Hugging Face folder (`moe/`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use burn::prelude::*;
use burn::tensor::TensorData;
use burn::tensor::backend::AutodiffBackend;
use merge::moe::{ExpertSpec, GateMode, MoeConfig, MoeJob};
use merge::submoe::{SubMoeOptions, SubMoeReport};
use ndarray::Array2;
use serde::{Deserialize, Serialize};
use serde_json::json;
use weights::{StateDict, TensorSource};

use crate::llm::{EncodedSet, Prompter, score_set};
use crate::plot::{Series, heatmap, line_chart};
use crate::report::{Run, RunArgs};
use crate::studies::merge_llm::{Source, normalised, parse_finetune, read_manifest};
use crate::studies::s2ft_llm::EVAL_SEED;
use crate::tasks::{InstructTask, Split, Stream, Words, examples};
use s2ft_core::{Llama, LlamaConfig, Pretrained};
use weights::stats::mean;

/// Options of the `moe` study.
#[derive(Clone, Debug, clap::Args)]
pub struct MoeArgs {
    /// The pretrained decoder the experts were fine-tuned from (Hugging Face folder or GGUF).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A `s2ft --model` report folder: its fine-tunes of `--group` are the experts.
    #[arg(long)]
    pub finetunes: Option<PathBuf>,
    /// One expert, `TASK=PATH` (repeatable): a Hugging Face folder, PEFT LoRA or S²FT adapter.
    #[arg(long = "expert", value_name = "TASK=PATH")]
    pub expert: Vec<String>,
    /// Which fine-tuning group of `--finetunes` gives the experts (`full`, `lora r8`, …).
    #[arg(long, default_value = "full")]
    pub group: String,
    /// Small sizes for a CPU.
    #[arg(long)]
    pub quick: bool,
    /// Gate modes, each a mixture (hidden, hidden_avg, cheap_embed, random, uniform_random;
    /// default hidden,cheap_embed,random). The first is compressed.
    #[arg(long, value_delimiter = ',')]
    pub gate_modes: Option<Vec<String>>,
    /// Experts each token is routed to.
    #[arg(long, default_value_t = 2)]
    pub experts_per_token: usize,
    /// Positive prompts per expert (default 8; quick 4).
    #[arg(long)]
    pub prompts: Option<usize>,
    /// Fractions of the experts compression keeps (default 0.75,0.5).
    #[arg(long, value_delimiter = ',')]
    pub keep: Option<Vec<f64>>,
    /// Compression methods: submoe, prune, average (default all).
    #[arg(long, value_delimiter = ',')]
    pub compress: Option<Vec<String>>,
    /// Sub-MoE's intra-expert rank (Sub-MoE†; default: full rank).
    #[arg(long)]
    pub rank: Option<usize>,
    /// Calibration prompts per task for expert similarity and routing frequency (default 16; quick 4).
    #[arg(long)]
    pub calibration: Option<usize>,
    /// Test and out-of-domain examples per task (default 100; quick 16).
    #[arg(long)]
    pub eval_examples: Option<usize>,
    /// A `merge --model` report folder: its merges of the same group join the table.
    #[arg(long)]
    pub merge_run: Option<PathBuf>,
    /// Seed of random gates and of clustering.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The vendored text corpora (default `data/text`).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Do not write the mixture as a Hugging Face folder.
    #[arg(long)]
    pub no_save: bool,
    /// Device, report folder, quiet.
    #[command(flatten)]
    pub run: RunArgs,
}

impl Default for MoeArgs {
    fn default() -> Self {
        MoeArgs {
            model: None,
            finetunes: None,
            expert: Vec::new(),
            group: "full".into(),
            quick: false,
            gate_modes: None,
            experts_per_token: 2,
            prompts: None,
            keep: None,
            compress: None,
            rank: None,
            calibration: None,
            eval_examples: None,
            merge_run: None,
            seed: 0,
            data_dir: None,
            no_save: false,
            run: RunArgs::default(),
        }
    }
}

/// A compression method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Sub-MoE: clusters merged in a shared subspace.
    Submoe,
    /// The least-routed experts dropped.
    Prune,
    /// Each cluster's experts averaged.
    Average,
}

impl Compression {
    fn parse(s: &str) -> anyhow::Result<Self> {
        Ok(match s.trim() {
            "submoe" => Compression::Submoe,
            "prune" => Compression::Prune,
            "average" => Compression::Average,
            other => bail!("--compress: unknown method '{other}' (known: submoe, prune, average)"),
        })
    }
    fn name(self) -> &'static str {
        match self {
            Compression::Submoe => "submoe",
            Compression::Prune => "prune",
            Compression::Average => "average",
        }
    }
}

/// Everything a run does, resolved and checked.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    /// The base model.
    pub model: PathBuf,
    /// The experts, in router order (one per task).
    pub experts: Vec<Source>,
    /// Their tasks.
    pub tasks: Vec<InstructTask>,
    /// Gate modes (one mixture each).
    pub gate_modes: Vec<GateMode>,
    /// Top-k.
    pub experts_per_token: usize,
    /// Positive prompts per expert.
    pub prompts: usize,
    /// Experts kept by each compression, largest first.
    pub keep: Vec<usize>,
    /// Compression methods.
    pub compress: Vec<Compression>,
    /// Sub-MoE's rank.
    pub rank: Option<usize>,
    /// Calibration prompts per task.
    pub calibration: usize,
    /// Test / OOD examples per task.
    pub eval_examples: usize,
    /// Prompts decoded together.
    pub eval_batch: usize,
    /// Seed.
    pub seed: u64,
    /// A merge study's folder.
    pub merge_run: Option<PathBuf>,
    /// `--quick`.
    pub quick: bool,
}

/// The experts: a `s2ft --model` run's fine-tunes of `--group`, then every `--expert`.
fn experts_of(a: &MoeArgs) -> anyhow::Result<Vec<Source>> {
    let mut experts: Vec<Source> = match &a.finetunes {
        Some(dir) => {
            let all = read_manifest(dir)?;
            let groups: Vec<&str> = all.iter().map(|s| s.group.as_str()).collect();
            let mine: Vec<Source> = all.iter().filter(|s| s.group == a.group).cloned().collect();
            ensure!(
                !mine.is_empty(),
                "--group '{}': {} has no fine-tunes of that group (it has {:?})",
                a.group,
                dir.display(),
                groups
            );
            mine
        }
        None => Vec::new(),
    };
    for e in &a.expert {
        experts.push(parse_finetune(e)?);
    }
    ensure!(
        experts.len() >= 2,
        "a mixture needs two experts or more: give --finetunes RUN_DIR or --expert TASK=PATH (got {})",
        experts.len()
    );
    Ok(experts)
}

/// Each expert's task, one expert per task.
fn tasks_of(experts: &[Source]) -> anyhow::Result<Vec<InstructTask>> {
    let mut tasks = Vec::new();
    for s in experts {
        let t = InstructTask::parse_list(std::slice::from_ref(&s.task))
            .with_context(|| format!("expert {}", s.path.display()))?[0];
        ensure!(
            !tasks.contains(&t),
            "two experts of task '{}': give one per task",
            t.name()
        );
        tasks.push(t);
    }
    Ok(tasks)
}

/// `--gate-modes`, parsed.
fn gate_modes_of(a: &MoeArgs) -> anyhow::Result<Vec<GateMode>> {
    let gate_modes: Vec<GateMode> = a
        .gate_modes
        .clone()
        .unwrap_or_else(|| vec!["hidden".into(), "cheap_embed".into(), "random".into()])
        .iter()
        .map(|m| {
            serde_json::from_value(json!(m.trim())).map_err(|_| {
                anyhow::anyhow!(
                    "--gate-modes: unknown mode '{m}' (hidden, hidden_last, hidden_avg, cheap_embed, random, uniform_random)"
                )
            })
        })
        .collect::<anyhow::Result<_>>()?;
    ensure!(!gate_modes.is_empty(), "--gate-modes: give at least one");
    Ok(gate_modes)
}

/// `--keep` fractions as expert counts below `n`, largest first, each once.
fn keep_counts(a: &MoeArgs, n: usize) -> anyhow::Result<Vec<usize>> {
    let fractions = a.keep.clone().unwrap_or_else(|| vec![0.75, 0.5]);
    let mut keep = Vec::new();
    for f in &fractions {
        ensure!(
            f.is_finite() && *f > 0.0 && *f < 1.0,
            "--keep {f}: a fraction of the experts in (0, 1)"
        );
        let k = (f * n as f64).round() as usize;
        ensure!(
            k >= 1,
            "--keep {f}: keeps {k} of {n} experts; a compressed mixture needs one at least"
        );
        if k < n && !keep.contains(&k) {
            keep.push(k);
        }
    }
    keep.sort_unstable_by(|a, b| b.cmp(a));
    Ok(keep)
}

impl Plan {
    /// Resolves and checks the options (reads only manifests and listings).
    pub fn new(a: &MoeArgs) -> anyhow::Result<Plan> {
        let model = a
            .model
            .clone()
            .context("--model PATH is required: the base the experts were fine-tuned from")?;
        let experts = experts_of(a)?;
        let tasks = tasks_of(&experts)?;
        let gate_modes = gate_modes_of(a)?;
        let n = experts.len();
        ensure!(
            (1..=n).contains(&a.experts_per_token),
            "--experts-per-token {} must be in 1..={n} (the number of experts)",
            a.experts_per_token
        );
        let keep = keep_counts(a, n)?;
        let compress = a
            .compress
            .clone()
            .unwrap_or_else(|| vec!["submoe".into(), "prune".into(), "average".into()])
            .iter()
            .map(|s| Compression::parse(s))
            .collect::<anyhow::Result<Vec<_>>>()?;
        if let Some(r) = a.rank {
            ensure!(r > 0, "--rank 0: Sub-MoE's rank must be positive");
        }
        let pick =
            |v: Option<usize>, full: usize, q: usize| v.unwrap_or(if a.quick { q } else { full });
        let plan = Plan {
            model,
            experts,
            tasks,
            gate_modes,
            experts_per_token: a.experts_per_token,
            prompts: pick(a.prompts, 8, 4),
            keep,
            compress,
            rank: a.rank,
            calibration: pick(a.calibration, 16, 4),
            eval_examples: pick(a.eval_examples, 100, 16),
            eval_batch: 32,
            seed: a.seed,
            merge_run: a.merge_run.clone(),
            quick: a.quick,
        };
        ensure!(
            plan.prompts > 0 && plan.calibration > 0 && plan.eval_examples > 0,
            "--prompts, --calibration and --eval-examples must be positive"
        );
        Ok(plan)
    }
}

/// One task's evaluation sets and prompts.
struct TaskData {
    task: InstructTask,
    test: EncodedSet,
    ood: EncodedSet,
    /// Positive prompts of its expert (raw text, as in a mergekit-moe config).
    positive: Vec<String>,
    /// Calibration prompts (chat template applied, as the model sees them).
    calibration: Vec<Vec<u32>>,
}

struct Prepared {
    base: Pretrained,
    /// Each expert's fused weights.
    experts: Vec<StateDict>,
    data: Vec<TaskData>,
}

fn prepare(plan: &Plan, data_dir: &Path) -> anyhow::Result<Prepared> {
    let base = Pretrained::load(&plan.model)
        .with_context(|| format!("--model {}", plan.model.display()))?;
    ensure!(
        base.config.moe.is_none(),
        "--model {}: already a mixture of experts; give the dense base",
        plan.model.display()
    );
    let experts = plan
        .experts
        .iter()
        .map(|s| crate::studies::merge_llm::load_finetune(&base, s).map(|(_, sd)| sd))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let words = Words::load(data_dir)?;
    let prompter = Prompter::new(&base.tokenizer)?;
    let context = base.config.max_position_embeddings.unwrap_or(usize::MAX);
    let mut data = Vec::new();
    for &task in &plan.tasks {
        let enc = |split: Split| {
            prompter.encode(examples(
                task,
                split,
                plan.eval_examples,
                &words,
                EVAL_SEED,
            )?)
        };
        let (test, ood) = (enc(Split::Test)?, enc(Split::Ood)?);
        for s in [&test, &ood] {
            ensure!(
                s.max_len() + 4 <= context,
                "task {}: a prompt with its answer takes {} tokens, more than the model's context of {context}",
                task.name(),
                s.max_len() + 4
            );
        }
        let mut train = Stream::new(task, Split::Train, &words, plan.seed);
        let positive: Vec<String> = train
            .by_ref()
            .take(plan.prompts)
            .map(|e| e.prompt)
            .collect();
        let calibration = train
            .take(plan.calibration)
            .map(|e| prompter.prompt(&e))
            .collect::<anyhow::Result<_>>()?;
        data.push(TaskData {
            task,
            test,
            ood,
            positive,
            calibration,
        });
    }
    Ok(Prepared {
        base,
        experts,
        data,
    })
}

/// One model of the table.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelRow {
    /// `base`, `expert`, `moe`, `submoe`, `prune`, `average`, or `dense merge`.
    pub kind: String,
    /// What it is (`expert date`, `moe hidden`, `submoe 3/4`, …).
    pub label: String,
    /// Experts per block (mixtures only).
    pub experts: Option<usize>,
    /// Experts per token (mixtures only).
    pub top_k: Option<usize>,
    /// Parameters stored.
    pub params: usize,
    /// Parameters a token passes through.
    pub active_params: usize,
    /// In-domain test accuracy per task.
    pub test: BTreeMap<String, f64>,
    /// Out-of-domain accuracy per task.
    pub ood: BTreeMap<String, f64>,
    /// Mean test accuracy.
    pub test_mean: f64,
    /// Mean OOD accuracy.
    pub ood_mean: f64,
    /// Test accuracy ÷ each task's own expert, averaged (FusionBench's normalised accuracy).
    pub normalised: Option<f64>,
    /// Seconds to build it (assembly or compression).
    pub build_seconds: Option<f64>,
    /// The first few test prompts of each task: (task, prompt, reference, greedy answer).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub samples: Vec<(String, String, String, String)>,
}

/// Where one task's tokens go in a mixture.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Routing {
    /// The mixture (`moe hidden`, …).
    pub model: String,
    /// Per task, the share of its prompt tokens' top-k slots that went to
    /// each expert, averaged over blocks (`[tasks][experts]`, rows sum to 1).
    pub shares: Vec<Vec<f64>>,
    /// Per task, the fraction of (token, block) pairs whose top-k holds the task's own expert.
    pub own_expert: Vec<f64>,
    /// Per block, the share of each expert over every task's tokens.
    pub per_layer: Vec<Vec<f64>>,
    /// Per block, the largest cosine between two experts' router rows (1:
    /// two experts get the same logit for every token, and tie-breaking
    /// decides between them).
    pub gate_max_cosine: Vec<f64>,
}

/// A compression's record.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CompressionRow {
    /// The method.
    pub method: Compression,
    /// Experts kept per block.
    pub experts: usize,
    /// Per block, the expert clusters (`assignment[l][e]` = the cluster of expert `e`).
    pub assignment: Vec<Vec<usize>>,
    /// Per block, each expert's routing frequency on the calibration tokens.
    pub frequencies: Vec<Vec<f64>>,
    /// Sub-MoE's per-block report (energies, reconstruction errors).
    pub submoe: Option<Vec<SubMoeReport>>,
}

/// `metrics.json` without the run record.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Metrics {
    /// Every model scored, in table order.
    pub models: Vec<ModelRow>,
    /// Routing of each mixture.
    pub routing: Vec<Routing>,
    /// The compressions.
    pub compressions: Vec<CompressionRow>,
    /// Per block, the cosine similarity of the experts' outputs on the calibration tokens.
    pub expert_similarity: Vec<Vec<Vec<f64>>>,
}

/// `metrics.json` read back ([`crate::report::read_metrics`]): the
/// study's metrics; the plan is written for the reader.
#[derive(Clone, Debug, Deserialize)]
pub struct Rows {
    /// The models, routing and compressions.
    pub metrics: Metrics,
}

/// Runs the study; returns the report folder.
pub fn run(a: &MoeArgs) -> anyhow::Result<PathBuf> {
    let plan = Plan::new(a)?;
    let data_dir = a
        .data_dir
        .clone()
        .unwrap_or_else(crate::lm::default_text_dir);
    let prep = prepare(&plan, &data_dir)?;
    let dense_merges = match &plan.merge_run {
        Some(d) => read_merges(d, &a.group, &plan.tasks)?,
        None => Vec::new(),
    };
    let run = a.run.open("moe")?;
    let dev = run.device;
    crate::device::on_device!(
        dev,
        run_on(
            &plan,
            prep,
            dense_merges,
            a.no_save,
            run,
            &Default::default()
        )
    )
}

/// The merges of `group` in a `merge --model` run, as table rows.
fn read_merges(dir: &Path, group: &str, tasks: &[InstructTask]) -> anyhow::Result<Vec<ModelRow>> {
    let path = dir.join("metrics.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("--merge-run: reading {}", path.display()))?;
    /// The merge rows of a `merge --model` run's `metrics.json`.
    #[derive(serde::Deserialize)]
    struct MergeRun {
        merges: Vec<crate::studies::merge_llm::MergeRow>,
    }
    let m: MergeRun =
        serde_json::from_str(&text).with_context(|| format!("--merge-run: {}", path.display()))?;
    let mut rows = Vec::new();
    for r in m.merges.into_iter().filter(|r| r.group == group) {
        let accs = |a: &crate::studies::merge_llm::Accs| -> BTreeMap<String, f64> {
            tasks
                .iter()
                .filter_map(|t| a.tasks.get(t.name()).map(|&v| (t.name().to_string(), v)))
                .collect()
        };
        let (test, ood) = (accs(&r.test), accs(&r.ood));
        if test.len() != tasks.len() {
            continue;
        }
        rows.push(ModelRow {
            kind: "dense merge".into(),
            label: format!("merge {}", r.method),
            experts: None,
            top_k: None,
            params: 0,
            active_params: 0,
            test_mean: mean(test.values().copied()),
            ood_mean: mean(ood.values().copied()),
            test,
            ood,
            normalised: r.normalised.mean,
            build_seconds: Some(r.merge_seconds),
            samples: Vec::new(),
        });
    }
    ensure!(
        !rows.is_empty(),
        "--merge-run {}: no merges of group '{group}' scored on the tasks {:?}",
        dir.display(),
        tasks.iter().map(|t| t.name()).collect::<Vec<_>>()
    );
    Ok(rows)
}

fn params_of(c: &LlamaConfig) -> (usize, usize) {
    let (h, f, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let attn =
        2 * h * c.num_attention_heads * c.head_dim + 2 * h * c.num_key_value_heads * c.head_dim;
    let mlp = 3 * h * f;
    let norms = 2 * h;
    let head = if c.tie_word_embeddings { 0 } else { v * h };
    let shared = v * h + head + h + c.num_hidden_layers * (attn + norms);
    match c.moe {
        None => (
            shared + c.num_hidden_layers * mlp,
            shared + c.num_hidden_layers * mlp,
        ),
        Some(m) => {
            let router = m.num_local_experts * h;
            (
                shared + c.num_hidden_layers * (router + m.num_local_experts * mlp),
                shared + c.num_hidden_layers * (router + m.num_experts_per_tok * mlp),
            )
        }
    }
}

struct Scorer<'a> {
    data: &'a [TaskData],
    prompter: Prompter<'a>,
    batch: usize,
    /// Each task's own expert's test accuracy (for normalised accuracy).
    own: BTreeMap<String, f64>,
}

impl Scorer<'_> {
    fn row<B: Backend>(
        &self,
        kind: &str,
        label: String,
        model: &Llama<B>,
        build_seconds: Option<f64>,
    ) -> anyhow::Result<ModelRow> {
        let (mut test, mut ood) = (BTreeMap::new(), BTreeMap::new());
        let mut samples = Vec::new();
        for d in self.data {
            let name = d.task.name().to_string();
            let t = score_set(model, &d.test, &self.prompter, self.batch)?;
            samples.extend(
                t.samples
                    .into_iter()
                    .map(|(p, r, a)| (name.clone(), p, r, a)),
            );
            test.insert(name.clone(), t.acc);
            ood.insert(
                name,
                score_set(model, &d.ood, &self.prompter, self.batch)?.acc,
            );
        }
        let (params, active) = params_of(&model.config);
        Ok(ModelRow {
            kind: kind.into(),
            label,
            experts: model.config.moe.map(|m| m.num_local_experts),
            top_k: model.config.moe.map(|m| m.num_experts_per_tok),
            params,
            active_params: active,
            test_mean: mean(test.values().copied()),
            ood_mean: mean(ood.values().copied()),
            normalised: (!self.own.is_empty())
                .then(|| normalised(&test, &self.own).mean)
                .flatten(),
            test,
            ood,
            build_seconds,
            samples,
        })
    }
}

/// Per block, the router's top-k picks of every token of `prompts`.
fn routing_counts<B: Backend>(model: &Llama<B>, prompts: &[Vec<u32>]) -> Vec<Vec<f64>> {
    let m = model.config.moe.expect("a mixture");
    let (e, k) = (m.num_local_experts, m.num_experts_per_tok);
    let device = model.embed_tokens.val().device();
    let mut counts = vec![vec![0f64; e]; model.config.num_hidden_layers];
    for p in prompts {
        let ids: Vec<i64> = p.iter().map(|&i| i as i64).collect();
        let t = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, p.len()]), &device);
        for (l, probs) in model.router_probs(t).into_iter().enumerate() {
            let v: Vec<f32> = probs.into_data().convert::<f32>().into_vec().expect("f32");
            for x in s2ft_core::model::top_k_experts(&v, e, k) {
                counts[l][x] += 1.0;
            }
        }
    }
    counts
}

fn routing<B: Backend>(
    label: &str,
    model: &Llama<B>,
    data: &[TaskData],
    gates: &ndarray::Array3<f32>,
) -> Routing {
    let e = model.config.moe.expect("a mixture").num_local_experts;
    let layers = model.config.num_hidden_layers;
    let mut shares = Vec::new();
    let mut own = Vec::new();
    let mut per_layer = vec![vec![0f64; e]; layers];
    for (t, d) in data.iter().enumerate() {
        let counts = routing_counts(model, &d.test.prompts);
        let mut share = vec![0f64; e];
        let mut own_hits = 0f64;
        let mut slots = 0f64;
        for (l, c) in counts.iter().enumerate() {
            let total: f64 = c.iter().sum();
            for x in 0..e {
                share[x] += c[x] / total.max(1.0) / layers as f64;
                per_layer[l][x] += c[x];
            }
            // Each token has k slots; its own expert is in its top-k at most once.
            if t < e {
                own_hits += c[t];
            }
            slots += total / model.config.moe.expect("a mixture").num_experts_per_tok as f64;
        }
        shares.push(share);
        own.push(own_hits / slots.max(1.0));
    }
    for row in per_layer.iter_mut() {
        let total: f64 = row.iter().sum();
        row.iter_mut().for_each(|x| *x /= total.max(1.0));
    }
    let gate_max_cosine = merge::moe::gate_cosines(gates.view())
        .iter()
        .map(|c| {
            let e = c.nrows();
            (0..e)
                .flat_map(|i| (i + 1..e).map(move |j| (i, j)))
                .map(|ij| c[ij])
                .fold(f64::NEG_INFINITY, f64::max)
        })
        .collect();
    Routing {
        model: label.into(),
        shares,
        own_expert: own,
        per_layer,
        gate_max_cosine,
    }
}

/// The mergekit-moe config of a gate mode over the study's experts.
fn moe_config(plan: &Plan, data: &[TaskData], mode: GateMode) -> MoeConfig {
    let abs = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    MoeConfig {
        base_model: abs(&plan.model).display().to_string(),
        experts: plan
            .experts
            .iter()
            .zip(data)
            .map(|(s, d)| ExpertSpec {
                source_model: abs(&s.path).display().to_string(),
                positive_prompts: d.positive.clone(),
                negative_prompts: Vec::new(),
                noise_scale: None,
                residual_scale: None,
            })
            .collect(),
        gate_mode: mode,
        dtype: Some("float32".into()),
        experts_per_token: plan.experts_per_token,
        shared_experts: None,
        architecture: None,
    }
}

fn mode_name(m: GateMode) -> String {
    serde_json::to_value(m)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

/// Per block, the mixture's input on the calibration tokens, `[tokens, hidden]`.
fn calibration_inputs<B: Backend>(model: &Llama<B>, data: &[TaskData]) -> Vec<Array2<f32>> {
    let device = model.embed_tokens.val().device();
    let mut per_layer: Vec<Vec<Array2<f32>>> = vec![Vec::new(); model.config.num_hidden_layers];
    for d in data {
        for p in &d.calibration {
            let ids: Vec<i64> = p.iter().map(|&i| i as i64).collect();
            let t = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, p.len()]), &device);
            for (l, inp) in model.linear_inputs(t).into_iter().enumerate() {
                let x = s2ft_core::model::to_weights(inp.mlp)
                    .data
                    .into_dimensionality::<ndarray::Ix2>()
                    .expect("2-D");
                per_layer[l].push(x);
            }
        }
    }
    per_layer
        .into_iter()
        .map(|xs| {
            let views: Vec<_> = xs.iter().map(|x| x.view()).collect();
            ndarray::concatenate(ndarray::Axis(0), &views).expect("same width")
        })
        .collect()
}

fn run_on<B: AutodiffBackend>(
    plan: &Plan,
    prep: Prepared,
    dense_merges: Vec<ModelRow>,
    no_save: bool,
    run: Run,
    device: &B::Device,
) -> anyhow::Result<PathBuf> {
    let Prepared {
        base,
        experts,
        data,
    } = prep;
    let n_models =
        1 + experts.len() + plan.gate_modes.len() + plan.keep.len() * plan.compress.len();
    let mut study = Mixing::<B::InnerBackend> {
        plan,
        base: &base,
        experts: &experts,
        data: &data,
        scorer: Scorer {
            data: &data,
            prompter: Prompter::new(&base.tokenizer)?,
            batch: plan.eval_batch,
            own: BTreeMap::new(),
        },
        bar: run.progress(n_models as u64),
        run,
        m: Metrics {
            models: Vec::new(),
            routing: Vec::new(),
            compressions: Vec::new(),
            expert_similarity: Vec::new(),
        },
        device: device.clone(),
    };
    let base_model = study.load(&base.config, &base.weights)?;
    study.score_baselines(&base_model)?;
    let (moe_sd, moe_cfg, first_mode) = study.mixtures(&base_model)?;
    drop(base_model);
    if !plan.keep.is_empty() && !plan.compress.is_empty() {
        study.compressions(&moe_sd, &moe_cfg)?;
    }
    study.bar.finish_and_clear();
    study.m.models.extend(dense_merges);
    study.run.write(
        "models.csv",
        models_csv(&study.m.models, &plan.tasks).as_bytes(),
    )?;
    plots(&study.run, plan, &study.m)?;
    if !no_save {
        study.save_mixture(moe_sd, moe_cfg, first_mode)?;
    }
    let md = report(plan, &study.m);
    study.run.finish(
        Output {
            plan,
            metrics: &study.m,
        },
        &md,
    )?;
    Ok(study.run.dir.clone())
}

/// What `metrics.json` (and, while the study runs, `metrics.partial.json`) holds.
#[derive(Serialize)]
struct Output<'a> {
    plan: &'a Plan,
    metrics: &'a Metrics,
}

/// The running study: its inputs, the scorer, and the metrics so far.
struct Mixing<'a, B: Backend> {
    plan: &'a Plan,
    base: &'a Pretrained,
    experts: &'a [StateDict],
    data: &'a [TaskData],
    scorer: Scorer<'a>,
    run: Run,
    bar: indicatif::ProgressBar,
    m: Metrics,
    device: B::Device,
}

/// One block's experts compressed: the new layers and Sub-MoE's reports.
type Compressed = (
    Vec<merge::submoe::MoeLayer>,
    Vec<merge::submoe::SubMoeReport>,
);

impl<B: Backend> Mixing<'_, B> {
    fn load(&self, c: &LlamaConfig, sd: &StateDict) -> anyhow::Result<Llama<B>> {
        Ok(Llama::<B>::from_state_dict(c, sd, false, &self.device)?)
    }

    fn partial(&self) -> anyhow::Result<()> {
        self.run.partial(&Output {
            plan: self.plan,
            metrics: &self.m,
        })
    }

    /// The base and every expert on every task; each expert's own-task
    /// accuracy becomes the normaliser of every row.
    fn score_baselines(&mut self, base_model: &Llama<B>) -> anyhow::Result<()> {
        self.bar.set_message("scoring the base and the experts");
        let scorer = &self.scorer;
        let row = self.run.phase("score base", || {
            scorer.row("base", "base".into(), base_model, None)
        })?;
        self.m.models.push(row);
        self.bar.inc(1);
        for (sd, d) in self.experts.iter().zip(self.data) {
            let label = format!("expert {}", d.task.name());
            let model = self.load(&self.base.config, sd)?;
            let scorer = &self.scorer;
            let row = self.run.phase(&format!("score {label}"), || {
                scorer.row("expert", label.clone(), &model, None)
            })?;
            self.scorer
                .own
                .insert(d.task.name().into(), row.test[d.task.name()]);
            self.m.models.push(row);
            self.bar.inc(1);
            self.partial()?;
        }
        let own = &self.scorer.own;
        for row in self.m.models.iter_mut().filter(|r| r.kind == "expert") {
            row.normalised = normalised(&row.test, own).mean;
        }
        self.m.models[0].normalised = normalised(&self.m.models[0].test, own).mean;
        Ok(())
    }

    /// One mixture per gate mode (its YAML config written, its gates, the
    /// assembled model scored and its routing measured); returns the first.
    fn mixtures(
        &mut self,
        base_model: &Llama<B>,
    ) -> anyhow::Result<(StateDict, LlamaConfig, GateMode)> {
        let (plan, base) = (self.plan, self.base);
        let c = &base.config;
        let sources: Vec<&dyn TensorSource> = self
            .experts
            .iter()
            .map(|s| s as &dyn TensorSource)
            .collect();
        let mut first: Option<(StateDict, LlamaConfig, GateMode)> = None;
        for &mode in &plan.gate_modes {
            let name = mode_name(mode);
            self.bar.set_message(format!("mixture with {name} gates"));
            let cfg = moe_config(plan, self.data, mode);
            let yaml = cfg.to_yaml();
            std::fs::create_dir_all(self.run.dir.join("configs"))?;
            self.run
                .write(&format!("configs/moe_{name}.yml"), yaml.as_bytes())?;
            let t = Instant::now();
            let job = MoeJob {
                config: cfg.clone(),
                yaml,
                base_dir: plan.model.clone(),
                expert_dirs: plan.experts.iter().map(|s| s.path.clone()).collect(),
                base_config: c.clone(),
            };
            let gates = self.run.phase(&format!("gates {name}"), || {
                crate::moe::gates(&job, base_model, &base.tokenizer, plan.seed)
            })?;
            let moe =
                merge::moe::assemble(&cfg, &base.weights, c, &sources, gates.view(), plan.seed)?;
            let secs = t.elapsed().as_secs_f64();
            let model = self.load(&moe.config, &moe.weights)?;
            let label = format!("moe {name}");
            let (scorer, data) = (&self.scorer, self.data);
            let row = self.run.phase(&format!("score {label}"), || {
                scorer.row("moe", label.clone(), &model, Some(secs))
            })?;
            self.m.models.push(row);
            let routed = self.run.phase(&format!("routing {label}"), || {
                routing(&label, &model, data, &gates)
            });
            self.m.routing.push(routed);
            self.bar.inc(1);
            self.partial()?;
            if first.is_none() {
                first = Some((moe.weights, moe.config, mode));
            }
        }
        Ok(first.expect("at least one gate mode"))
    }

    /// The mixture's blocks as layers, each block's router frequencies and
    /// its experts' output similarities on the calibration tokens.
    #[allow(clippy::type_complexity)]
    fn calibrate(
        &mut self,
        moe_sd: &StateDict,
        moe_cfg: &LlamaConfig,
    ) -> anyhow::Result<(
        Vec<merge::submoe::MoeLayer>,
        Vec<Vec<f64>>,
        Vec<Array2<f64>>,
    )> {
        self.bar.set_message("calibrating for compression");
        let moe_model = self.load(moe_cfg, moe_sd)?;
        let (k, data) = (self.plan.experts_per_token, self.data);
        self.run.phase("calibration", || -> anyhow::Result<_> {
            let xs = calibration_inputs(&moe_model, data);
            let mut layers = Vec::new();
            let mut freqs = Vec::new();
            let mut sims = Vec::new();
            for (l, x) in xs.iter().enumerate() {
                let layer = crate::moe::moe_layer(moe_sd, moe_cfg, l)?;
                freqs.push(merge::submoe::router_frequencies(
                    layer.gate.view(),
                    x.view(),
                    k,
                )?);
                let outs: Vec<Array2<f32>> =
                    layer.experts.iter().map(|e| e.forward(x.view())).collect();
                let views: Vec<_> = outs.iter().map(|o| o.view()).collect();
                sims.push(merge::submoe::expert_similarity(&views)?);
                layers.push(layer);
            }
            Ok((layers, freqs, sims))
        })
    }

    /// The first mixture compressed to every `--keep` count by every
    /// `--compress` method, each scored.
    fn compressions(&mut self, moe_sd: &StateDict, moe_cfg: &LlamaConfig) -> anyhow::Result<()> {
        let (layers, freqs, sims) = self.calibrate(moe_sd, moe_cfg)?;
        self.m.expert_similarity = sims
            .iter()
            .map(|s| s.outer_iter().map(|r| r.to_vec()).collect())
            .collect();
        let plan = self.plan;
        for &keep in &plan.keep {
            let assignment: Vec<Vec<usize>> = sims
                .iter()
                .map(|s| merge::submoe::cluster_experts(s.view(), keep, plan.seed))
                .collect::<Result<_, _>>()?;
            for &method in &plan.compress {
                self.bar
                    .set_message(format!("{} to {keep} experts", method.name()));
                let t = Instant::now();
                let (new_layers, reports) =
                    self.compress(method, keep, &layers, &assignment, &freqs)?;
                let (sd, cfg) =
                    crate::moe::with_layers(moe_sd, moe_cfg, &new_layers, plan.experts_per_token)?;
                let secs = t.elapsed().as_secs_f64();
                let model = self.load(&cfg, &sd)?;
                let label = format!("{} {keep}/{}", method.name(), self.experts.len());
                let scorer = &self.scorer;
                let row = self.run.phase(&format!("score {label}"), || {
                    scorer.row(method.name(), label.clone(), &model, Some(secs))
                })?;
                self.m.models.push(row);
                self.m.compressions.push(CompressionRow {
                    method,
                    experts: keep,
                    assignment: if method == Compression::Prune {
                        Vec::new()
                    } else {
                        assignment.clone()
                    },
                    frequencies: freqs.clone(),
                    submoe: (method == Compression::Submoe).then_some(reports),
                });
                self.bar.inc(1);
                self.partial()?;
            }
        }
        Ok(())
    }

    /// Every block compressed to `keep` experts by `method`.
    fn compress(
        &self,
        method: Compression,
        keep: usize,
        layers: &[merge::submoe::MoeLayer],
        assignment: &[Vec<usize>],
        freqs: &[Vec<f64>],
    ) -> anyhow::Result<Compressed> {
        let mut reports = Vec::new();
        let new_layers = layers
            .iter()
            .enumerate()
            .map(|(l, layer)| -> anyhow::Result<_> {
                Ok(match method {
                    Compression::Submoe => {
                        let opts = SubMoeOptions {
                            rank: self.plan.rank,
                            ..Default::default()
                        };
                        let (out, rep) =
                            merge::submoe::submoe_merge(layer, &assignment[l], &freqs[l], &opts)?;
                        reports.push(rep);
                        out
                    }
                    Compression::Prune => merge::submoe::prune_experts(layer, &freqs[l], keep)?,
                    Compression::Average => {
                        merge::submoe::average_clusters(layer, &assignment[l], None)?
                    }
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok((new_layers, reports))
    }

    /// The first mixture as a Hugging Face folder transformers loads (config
    /// and tokenizer files written from the base's description and
    /// tokenizer, so a GGUF base, which carries them in its header, works too).
    fn save_mixture(
        &mut self,
        weights: StateDict,
        config: LlamaConfig,
        mode: GateMode,
    ) -> anyhow::Result<()> {
        let job_cfg = moe_config(self.plan, self.data, mode);
        let mut moe = merge::moe::Assembled { weights, config };
        let scratch = self.run.dir.join(".tokenizer");
        std::fs::create_dir_all(&scratch)
            .with_context(|| format!("creating {}", scratch.display()))?;
        let tokenizer = &self.base.tokenizer;
        tokenizer.save(&scratch)?;
        let cfg =
            s2ft_core::pretrained::hf_config_with_special_tokens(&self.base.config, tokenizer);
        self.run.write(
            ".tokenizer/config.json",
            serde_json::to_string_pretty(&cfg)?.as_bytes(),
        )?;
        let out = self.run.dir.join("moe");
        let saved = self.run.phase("save mixture", || {
            merge::moe::write_folder(&out, &mut moe, &scratch, &job_cfg.to_yaml(), 2 << 30)
        });
        let _ = std::fs::remove_dir_all(&scratch);
        saved?;
        Ok(())
    }
}

fn models_csv(rows: &[ModelRow], tasks: &[InstructTask]) -> String {
    let mut s = String::from("kind,label,experts,top_k,params,active_params");
    for t in tasks {
        s.push_str(&format!(",test_{0},ood_{0}", t.name()));
    }
    s.push_str(",test_mean,ood_mean,normalised,build_seconds\n");
    let opt = |v: Option<f64>| v.map_or(String::new(), |x| format!("{x:.4}"));
    for r in rows {
        s.push_str(&format!(
            "{},{},{},{},{},{}",
            r.kind,
            r.label,
            r.experts.map_or(String::new(), |x| x.to_string()),
            r.top_k.map_or(String::new(), |x| x.to_string()),
            r.params,
            r.active_params
        ));
        for t in tasks {
            s.push_str(&format!(
                ",{},{}",
                opt(r.test.get(t.name()).copied()),
                opt(r.ood.get(t.name()).copied())
            ));
        }
        s.push_str(&format!(
            ",{:.4},{:.4},{},{}\n",
            r.test_mean,
            r.ood_mean,
            opt(r.normalised),
            opt(r.build_seconds)
        ));
    }
    s
}

fn plots(run: &Run, plan: &Plan, m: &Metrics) -> anyhow::Result<()> {
    let n = plan.experts.len() as f64;
    let lo = plan
        .keep
        .iter()
        .copied()
        .min()
        .unwrap_or(plan.experts.len()) as f64;
    let full = m
        .models
        .iter()
        .find(|r| r.kind == "moe")
        .map(|r| (n, r.test_mean));
    let mut series = Vec::new();
    for (i, method) in plan.compress.iter().enumerate() {
        let mut pts: Vec<(f64, f64)> = full.into_iter().collect();
        pts.extend(
            m.models
                .iter()
                .filter(|r| r.kind == method.name())
                .map(|r| (r.experts.unwrap_or(0) as f64, r.test_mean)),
        );
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        series.push(Series::line(method.name(), pts.clone()).colored(i));
        series.push(Series::dots("", pts).colored(i));
    }
    // References: each expert on its own task, and the best dense merge (one model's size).
    let own = mean(plan.tasks.iter().filter_map(|t| {
        m.models
            .iter()
            .find(|r| r.label == format!("expert {}", t.name()))
            .and_then(|r| r.test.get(t.name()).copied())
    }));
    series.push(Series::line("each expert on its own task", vec![(lo, own), (n, own)]).colored(4));
    if let Some(best) = m
        .models
        .iter()
        .filter(|r| r.kind == "dense merge")
        .max_by(|a, b| a.test_mean.total_cmp(&b.test_mean))
    {
        series.push(
            Series::line(
                format!("best dense {}", best.label),
                vec![(lo, best.test_mean), (n, best.test_mean)],
            )
            .colored(5),
        );
    }
    line_chart(
        &run.dir.join("accuracy_vs_experts"),
        &format!(
            "Mixture of {} fine-tunes ({} gates) as experts are removed",
            plan.experts.len(),
            mode_name(plan.gate_modes[0])
        ),
        "experts per block",
        "mean test accuracy over tasks",
        &series,
    )?;
    for r in &m.routing {
        if r.shares.len() == r.shares.first().map_or(0, Vec::len) {
            heatmap(
                &run.dir
                    .join(format!("routing_{}", r.model.replace(' ', "_"))),
                &format!("{}: share of each task's tokens per expert", r.model),
                "expert",
                "task",
                &r.shares,
            )?;
        }
    }
    Ok(())
}

fn report(plan: &Plan, m: &Metrics) -> String {
    let mut md = format!(
        "# Mixture of experts from fine-tunes (`moe`)\n\nExperts (router order): {}. Top-{} routing; \
         {} positive prompts per expert; {} test + {} OOD examples per task; compression on the \
         `{}` mixture with {} calibration prompts per task.\n\n",
        plan.experts
            .iter()
            .map(|s| format!("{} ({})", s.task, s.path.display()))
            .collect::<Vec<_>>()
            .join(", "),
        plan.experts_per_token,
        plan.prompts,
        plan.eval_examples,
        plan.eval_examples,
        mode_name(plan.gate_modes[0]),
        plan.calibration
    );
    models_table(&mut md, plan, m);
    routing_and_compression(&mut md, plan, m);
    md
}

/// The report's table of every model on every task.
fn models_table(md: &mut String, plan: &Plan, m: &Metrics) {
    let tasks: Vec<&str> = plan.tasks.iter().map(|t| t.name()).collect();
    md.push_str("| model | experts | params (M) | active (M) |");
    for t in &tasks {
        md.push_str(&format!(" {t} |"));
    }
    md.push_str(" mean test | mean OOD | normalised |\n|---|---|---|---|");
    md.push_str(&"---|".repeat(tasks.len() + 3));
    md.push('\n');
    for r in &m.models {
        let mb = |p: usize| {
            if p == 0 {
                "–".to_string()
            } else {
                format!("{:.1}", p as f64 / 1e6)
            }
        };
        md.push_str(&format!(
            "| {} | {} | {} | {} |",
            r.label,
            r.experts.map_or("–".into(), |e| format!(
                "{e} (top-{})",
                r.top_k.unwrap_or(0)
            )),
            mb(r.params),
            mb(r.active_params)
        ));
        for t in &tasks {
            md.push_str(&format!(
                " {:.2} / {:.2} |",
                r.test.get(*t).copied().unwrap_or(f64::NAN),
                r.ood.get(*t).copied().unwrap_or(f64::NAN)
            ));
        }
        md.push_str(&format!(
            " {:.3} | {:.3} | {} |\n",
            r.test_mean,
            r.ood_mean,
            r.normalised.map_or("–".into(), |v| format!("{v:.3}"))
        ));
    }
}

/// The report's routing tables and what compression found.
fn routing_and_compression(md: &mut String, plan: &Plan, m: &Metrics) {
    let tasks: Vec<&str> = plan.tasks.iter().map(|t| t.name()).collect();
    md.push_str("\nPer task: test / OOD accuracy. Normalised: test accuracy ÷ the task's own expert, averaged.\n\n## Routing\n\n");
    for r in &m.routing {
        md.push_str(&format!(
            "**{}** — share of each task's tokens per expert (averaged over blocks):\n\n| task |",
            r.model
        ));
        for t in &tasks {
            md.push_str(&format!(" → {t} |"));
        }
        md.push_str(" own expert in top-k |\n|---|");
        md.push_str(&"---|".repeat(tasks.len() + 1));
        md.push('\n');
        for (i, t) in tasks.iter().enumerate() {
            md.push_str(&format!("| {t} |"));
            for s in &r.shares[i] {
                md.push_str(&format!(" {s:.2} |"));
            }
            md.push_str(&format!(" {:.2} |\n", r.own_expert[i]));
        }
        let g = &r.gate_max_cosine;
        let tied = g.iter().filter(|c| **c > 0.9999).count();
        md.push_str(&format!(
            "\nLargest cosine between two experts' router rows per block: min {:.3}, max {:.3}; \
             {tied} of {} blocks have two identical rows (tie-breaking picks between them).\n",
            g.iter().copied().fold(f64::INFINITY, f64::min),
            g.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            g.len()
        ));
        md.push('\n');
    }
    if let Some(first) = m
        .compressions
        .iter()
        .find(|c| c.method == Compression::Submoe)
        && let Some(reps) = &first.submoe
    {
        let err = mean(reps.iter().flat_map(|r| {
            r.clusters.iter().flat_map(|c| {
                c.weights
                    .iter()
                    .flat_map(|w| w.merge_errors.iter().copied())
            })
        }));
        md.push_str(&format!(
            "Sub-MoE to {} experts: mean relative error of a member expert's weights after merging {:.3}.\n",
            first.experts, err
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::studies::merge_llm::{Accs, MergeRow, normalised};

    fn row(group: &str, method: &str, date: f64) -> MergeRow {
        let accs = |v: f64| Accs {
            tasks: [("date".to_string(), v), ("reverse".to_string(), 0.5)].into(),
            ..Default::default()
        };
        let ind: BTreeMap<String, f64> =
            [("date".to_string(), 0.8), ("reverse".to_string(), 1.0)].into();
        MergeRow {
            group: group.into(),
            method: method.into(),
            hyper: BTreeMap::new(),
            grid: Vec::new(),
            test: accs(date),
            ood: accs(date / 2.0),
            normalised: normalised(&accs(date).tasks, &ind),
            normalised_ood: normalised(&accs(date / 2.0).tasks, &ind),
            merge_seconds: 1.5,
            peak_mb: None,
            yaml: None,
            yaml_identical: None,
            note: None,
        }
    }

    #[test]
    fn merge_runs_are_read_back_through_the_merge_study_s_own_rows() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = serde_json::json!({
            "merges": [row("full", "ties", 0.4), row("lora", "ties", 0.9), row("full", "tsv_m", 0.6)],
            "other": "ignored",
        });
        std::fs::write(dir.path().join("metrics.json"), metrics.to_string()).unwrap();
        let tasks = [InstructTask::Date, InstructTask::Reverse];
        let rows = read_merges(dir.path(), "full", &tasks).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].label, "merge ties");
        assert_eq!(rows[0].test["date"], 0.4);
        assert_eq!(rows[0].ood["date"], 0.2);
        assert!((rows[0].test_mean - 0.45).abs() < 1e-12);
        // (0.4 / 0.8 + 0.5 / 1) / 2
        assert!((rows[0].normalised.unwrap() - 0.5).abs() < 1e-12);
        assert_eq!(rows[1].build_seconds, Some(1.5));
        // A group the run does not have, and a file that is not a merge run, are named.
        let e = read_merges(dir.path(), "s2ft", &tasks)
            .unwrap_err()
            .to_string();
        assert!(e.contains("'s2ft'"), "{e}");
        std::fs::write(dir.path().join("metrics.json"), r#"{"runs": []}"#).unwrap();
        let e = format!("{:#}", read_merges(dir.path(), "full", &tasks).unwrap_err());
        assert!(e.contains("--merge-run") && e.contains("merges"), "{e}");
    }
}
