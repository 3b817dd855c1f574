//! `s2ft`: structured sparse fine-tuning vs LoRA vs full fine-tuning on a
//! small LLaMA-style model (S²FT, Yang et al. NeurIPS 2024, Figure 5 and
//! Tables 5 analogues).
//!
//! 1. Pretrain a character-level decoder on task A (language modelling on
//!    the vendored Moby-Dick text), or load one with `--base`.
//! 2. Fine-tune it on task B (a string transduction, answers scored token by
//!    token) with full fine-tuning, LoRA of each rank in `--ranks`, and S²FT
//!    with random and smallest-activation selection at the same trainable
//!    parameter budget as each LoRA rank, over several seeds: task-B accuracy,
//!    task-A forgetting (increase of its held-out loss), trainable parameters,
//!    peak heap and step time.
//! 3. Adapter fusion: adapters trained on task B and on task C added to the
//!    base together, vs each alone.
//! 4. Adapter switch time vs width: S²FT swaps a few columns, LoRA re-adds
//!    `B·A` to every adapted matrix.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use serde::Serialize;
use serde_json::Value;
use weights::StateDict;

use crate::lm::{
    Corpus, Eval, Sample, Task, VOCAB, default_text_dir, evaluate, held_out, moby_dick,
};
use crate::plot::{Series, bar_chart, line_chart};
use crate::report::{Run, RunArgs};
use s2ft_core::s2ft::{
    Order, S2ftConfig, Strategy, activation_scores, apply_lora, apply_s2ft, lora_param_count,
    ratios_for_budget, select, trainable_params,
};
use s2ft_core::train::{TrainConfig, train};
use s2ft_core::{Llama, LlamaConfig};
use weights::rng::Rng;
use weights::stats::mean;

/// LoRA's target projections (the S²FT paper's LoRA baseline: q, k, v, up, down).
pub const LORA_TARGETS: [&str; 5] = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"];

/// The model, data and training options the LLaMA-style studies (`s2ft`,
/// `merge`) share.
#[derive(Clone, Debug, clap::Args)]
pub struct LmArgs {
    /// Tiny size for tests (width 48, 2 blocks, 200 + 150 steps).
    #[arg(long)]
    pub quick: bool,
    /// Residual width.
    #[arg(long, default_value_t = 64)]
    pub hidden: usize,
    /// Decoder blocks.
    #[arg(long, default_value_t = 2)]
    pub layers: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    /// FFN width.
    #[arg(long, default_value_t = 256)]
    pub ffn: usize,
    /// Tokens per training sequence.
    #[arg(long, default_value_t = 32)]
    pub seq: usize,
    /// Sequences per batch (default 8; with --model 8, quick 4).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Pretraining steps on task A.
    #[arg(long, default_value_t = 400)]
    pub pretrain_steps: usize,
    /// Fine-tuning steps per task (default 300, quick 150; with --model 150, quick 16).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Base seed (model init, data order, selections).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Pretraining learning rate.
    #[arg(long, default_value_t = 3e-3)]
    pub lr_pretrain: f64,
    /// Full fine-tuning learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr_full: f64,
    /// LoRA and S²FT learning rate.
    #[arg(long, default_value_t = 1e-2)]
    pub lr_peft: f64,
    /// A pretrained base (a folder with model.safetensors and config.json, as
    /// the `s2ft` and `merge` studies write to `<out>/base`) instead of pretraining.
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// Folder with moby-dick.txt(.gz) (default: the vendored data/text).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Device, report folder, progress.
    #[command(flatten)]
    pub run: RunArgs,
}

/// Options.
#[derive(Clone, Debug, clap::Args)]
pub struct S2ftArgs {
    /// Model, data and training.
    #[command(flatten)]
    pub lm: LmArgs,
    /// LoRA ranks; each defines a budget S²FT is matched to (default 1,2,4,
    /// quick 2; with --model 4,16, quick 8).
    #[arg(long, value_delimiter = ',')]
    pub ranks: Option<Vec<usize>>,
    /// Fine-tuning seeds per method (default 2, quick 1; character model only).
    #[arg(long)]
    pub seeds: Option<usize>,
    /// Task B.
    #[arg(long, value_enum, default_value_t = Task::Shift)]
    pub task: Task,
    /// Task C (adapter fusion).
    #[arg(long, value_enum, default_value_t = Task::Mirror)]
    pub fusion_task: Task,
    /// Widths of the adapter switch-time sweep (quick: 64, 128).
    #[arg(long, value_delimiter = ',', default_values_t = [256usize, 512, 1024, 2048])]
    pub switch_widths: Vec<usize>,
    /// A real pretrained model (`--model`) and its instruction tasks.
    #[command(flatten)]
    pub llm: crate::studies::s2ft_llm::LlmArgs,
}

impl Default for LmArgs {
    fn default() -> Self {
        LmArgs {
            quick: false,
            hidden: 64,
            layers: 2,
            heads: 4,
            ffn: 256,
            seq: 32,
            batch: None,
            pretrain_steps: 400,
            steps: None,
            seed: 0,
            lr_pretrain: 3e-3,
            lr_full: 1e-3,
            lr_peft: 1e-2,
            base: None,
            data_dir: None,
            run: RunArgs::default(),
        }
    }
}

impl Default for S2ftArgs {
    fn default() -> Self {
        S2ftArgs {
            lm: LmArgs::default(),
            ranks: None,
            seeds: None,
            task: Task::Shift,
            fusion_task: Task::Mirror,
            switch_widths: vec![256, 512, 1024, 2048],
            llm: Default::default(),
        }
    }
}

/// The sizes a run uses after `--quick`.
#[derive(Clone, Debug)]
pub(crate) struct Sizes {
    pub(crate) config: LlamaConfig,
    pub(crate) seq: usize,
    pub(crate) batch: usize,
    pub(crate) pretrain_steps: usize,
    pub(crate) steps: usize,
    pub(crate) eval_batches: usize,
}

impl LmArgs {
    /// The sizes after `--quick`, checked.
    pub(crate) fn sizes(&self) -> anyhow::Result<Sizes> {
        let s = if self.quick {
            Sizes {
                config: LlamaConfig::tiny(VOCAB, 48, 2, 4, 4, 128),
                seq: 32,
                batch: self.batch.unwrap_or(8),
                pretrain_steps: 200,
                steps: self.steps.unwrap_or(150),
                eval_batches: 4,
            }
        } else {
            if self.heads == 0 || !self.hidden.is_multiple_of(self.heads) {
                bail!(
                    "--hidden {} must be a multiple of --heads {}",
                    self.hidden,
                    self.heads
                );
            }
            Sizes {
                config: LlamaConfig::tiny(
                    VOCAB,
                    self.hidden,
                    self.layers,
                    self.heads,
                    self.heads,
                    self.ffn,
                ),
                seq: self.seq,
                batch: self.batch.unwrap_or(8),
                pretrain_steps: self.pretrain_steps,
                steps: self.steps.unwrap_or(300),
                eval_batches: 8,
            }
        };
        s.config.check()?;
        if s.seq < 8 || s.batch == 0 || s.steps == 0 {
            bail!(
                "--seq {} (at least 8), --batch {} and --steps {} must be positive",
                s.seq,
                s.batch,
                s.steps
            );
        }
        for lr in [self.lr_pretrain, self.lr_full, self.lr_peft] {
            if !(lr.is_finite() && lr > 0.0) {
                bail!("learning rates must be positive and finite, got {lr}");
            }
        }
        Ok(s)
    }

    /// Opens the report folder and loads the task-A corpus.
    pub(crate) fn open(&self, study: &str) -> anyhow::Result<(Run, Corpus)> {
        let mut run = self.run.open(study)?;
        let dir = self.data_dir.clone().unwrap_or_else(default_text_dir);
        let corpus = run.phase("load data", || moby_dick(&dir))?;
        Ok((run, corpus))
    }

    /// Pretraining steps still to run: none with `--base`.
    pub(crate) fn pretrain_steps(&self, s: &Sizes) -> usize {
        if self.base.is_some() {
            0
        } else {
            s.pretrain_steps
        }
    }

    /// Full fine-tuning's learning rate for `Method::Full`, the PEFT one otherwise.
    pub(crate) fn lr(&self, m: Method) -> f64 {
        if m == Method::Full {
            self.lr_full
        } else {
            self.lr_peft
        }
    }
}

/// The study-specific sizes after `--quick`: ranks, seeds, switch widths.
struct Sweep {
    ranks: Vec<usize>,
    seeds: usize,
    switch_widths: Vec<usize>,
}

impl S2ftArgs {
    fn sweep(&self) -> anyhow::Result<Sweep> {
        let s = if self.lm.quick {
            Sweep {
                ranks: self.ranks.clone().unwrap_or_else(|| vec![2]),
                seeds: self.seeds.unwrap_or(1),
                switch_widths: vec![64, 128],
            }
        } else {
            Sweep {
                ranks: self.ranks.clone().unwrap_or_else(|| vec![1, 2, 4]),
                seeds: self.seeds.unwrap_or(2),
                switch_widths: self.switch_widths.clone(),
            }
        };
        if s.seeds == 0 {
            bail!("--seeds must be positive");
        }
        if s.ranks.is_empty() || s.ranks.contains(&0) {
            bail!("--ranks {:?}: give at least one positive rank", s.ranks);
        }
        if self.task == self.fusion_task {
            bail!(
                "--task and --fusion-task are both '{}'; fusion needs two different tasks",
                self.task.name()
            );
        }
        Ok(s)
    }
}

/// A fine-tuning method.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Method {
    /// Every weight trains.
    Full,
    /// LoRA of this rank.
    Lora(usize),
    /// S²FT at this LoRA rank's parameter budget, with this selection.
    S2ft(usize, Strategy),
}

impl Method {
    /// `full`, `lora`, `s2ft-random` or `s2ft-act`.
    pub fn family(self) -> &'static str {
        match self {
            Method::Full => "full",
            Method::Lora(_) => "lora",
            Method::S2ft(_, Strategy::Random) => "s2ft-random",
            Method::S2ft(..) => "s2ft-act",
        }
    }
    /// The LoRA rank (or the rank whose budget S²FT matches).
    pub fn rank(self) -> Option<usize> {
        match self {
            Method::Full => None,
            Method::Lora(r) | Method::S2ft(r, _) => Some(r),
        }
    }
    /// `full`, `lora r4`, `s2ft-random r4`, …
    pub fn label(self) -> String {
        match self.rank() {
            None => self.family().into(),
            Some(r) => format!("{} r{r}", self.family()),
        }
    }
}

/// One fine-tuning run's outcome.
pub(crate) struct Finetuned {
    pub(crate) weights: StateDict,
    pub(crate) trainable: usize,
    pub(crate) step_ms: f64,
    pub(crate) peak_bytes: Option<usize>,
    pub(crate) losses: Vec<f32>,
}

/// The held-out sets every model is scored on.
pub(crate) struct EvalSets {
    pub(crate) text: Vec<Sample>,
    pub(crate) tasks: Vec<(Task, Vec<Sample>)>,
}

impl EvalSets {
    pub(crate) fn new(corpus: &Corpus, tasks: &[Task], s: &Sizes) -> Self {
        let (b, t) = (s.batch, s.seq);
        EvalSets {
            text: held_out(s.eval_batches, 1001, |r| {
                Sample::text(&corpus.test, b, t, r)
            }),
            tasks: tasks
                .iter()
                .map(|&task| {
                    let seed = 2000 + task as u64;
                    let set = held_out(s.eval_batches, seed, |r| Sample::task(task, b, t, r));
                    (task, set)
                })
                .collect(),
        }
    }

    /// Task-A loss/accuracy and every task's accuracy of a state dict.
    pub(crate) fn score<B: AutodiffBackend>(
        &self,
        c: &LlamaConfig,
        sd: &StateDict,
        device: &B::Device,
    ) -> anyhow::Result<(Eval, Vec<(Task, Eval)>)> {
        let m = Llama::<B::InnerBackend>::from_state_dict(c, sd, false, device)?;
        Ok((
            evaluate(&m, &self.text),
            self.tasks
                .iter()
                .map(|(t, s)| (*t, evaluate(&m, s)))
                .collect(),
        ))
    }
}

/// Trains `model` on batches from `draw`, timing steps and measuring heap.
fn fit<B: AutodiffBackend>(
    model: Llama<B>,
    lr: f64,
    steps: usize,
    mut draw: impl FnMut() -> Sample,
    device: &B::Device,
    bar: &indicatif::ProgressBar,
    what: &str,
) -> anyhow::Result<(Llama<B>, Vec<f32>, f64)>
where
    Llama<B>: AutodiffModule<B>,
{
    let out = train(
        model,
        |_| {
            bar.inc(1);
            draw().to_batch::<B>(device)
        },
        &TrainConfig {
            lr,
            steps,
            weight_decay: 0.0,
            schedule: s2ft_core::train::LrSchedule::Constant,
        },
    );
    if let Some(e) = out.stopped {
        bail!("{what}: {e} (lower the learning rate)");
    }
    let median = out.median_step_ms();
    Ok((out.model, out.losses, median))
}

/// Fine-tunes `base` on `tasks` with `method` for `s.steps` steps per task
/// (one task: a task fine-tune; several: multi-task fine-tuning, the rows of
/// every batch taken from the tasks in turn).
#[allow(clippy::too_many_arguments)]
pub(crate) fn finetune<B: AutodiffBackend>(
    base: &StateDict,
    s: &Sizes,
    method: Method,
    tasks: &[Task],
    lr: f64,
    seed: u64,
    adapter_dir: Option<&std::path::Path>,
    device: &B::Device,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<Finetuned>
where
    Llama<B>: AutodiffModule<B>,
{
    let c = &s.config;
    let window = crate::alloc::PeakWindow::open();
    let model = Llama::<B>::from_state_dict(c, base, method == Method::Full, device)?;
    anyhow::ensure!(!tasks.is_empty(), "fine-tuning needs at least one task");
    let mut rng = Rng::new(seed.wrapping_mul(7919).wrapping_add(tasks[0] as u64));
    let model = match method {
        Method::Full => model,
        Method::Lora(r) => apply_lora(model, r, 2.0 * r as f64, &LORA_TARGETS, seed)?,
        Method::S2ft(r, strategy) => {
            let (hr, cr) = ratios_for_budget(c, lora_param_count(c, r, &LORA_TARGETS), 0.5);
            let sc = S2ftConfig {
                heads_ratio: hr,
                channels_ratio: cr,
                strategy,
                order: Order::Smallest,
                seed,
                ..Default::default()
            };
            let scores = match strategy {
                Strategy::Random => None,
                _ => {
                    let calib = Sample::tasks(tasks, s.batch, s.seq, &mut rng);
                    Some(activation_scores(
                        &model,
                        calib.to_batch::<B>(device).tokens,
                    ))
                }
            };
            let sel = select(c, &sc, scores.as_ref())?;
            apply_s2ft(model, &sel, &sc)?
        }
    };
    let trainable = trainable_params(&model);
    let names: Vec<&str> = tasks.iter().map(|t| t.name()).collect();
    let what = format!("{} on {}", method.label(), names.join("+"));
    let (model, losses, step_ms) = fit(
        model,
        lr,
        s.steps * tasks.len(),
        || Sample::tasks(tasks, s.batch, s.seq, &mut rng),
        device,
        bar,
        &what,
    )?;
    let peak_bytes = window.growth();
    if let Some(dir) = adapter_dir {
        match method {
            Method::Full => {}
            Method::Lora(_) => s2ft_core::adapter::save_lora_peft(&model, dir)?,
            Method::S2ft(..) => s2ft_core::adapter::S2ftAdapter::extract(&model)?.save(dir)?,
        }
    }
    Ok(Finetuned {
        weights: model.to_state_dict(),
        trainable,
        step_ms,
        peak_bytes,
        losses,
    })
}

/// Pretrains the base on task A (or loads `--base`), returning it and its losses.
pub(crate) fn pretrain<B: AutodiffBackend>(
    args_base: Option<&std::path::Path>,
    s: &Sizes,
    corpus: &Corpus,
    lr: f64,
    seed: u64,
    device: &B::Device,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<(StateDict, LlamaConfig, Vec<f32>)>
where
    Llama<B>: AutodiffModule<B>,
{
    if let Some(dir) = args_base {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path)
            .with_context(|| format!("--base: reading {}", cfg_path.display()))?;
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("--base: {} is not JSON", cfg_path.display()))?;
        let c =
            LlamaConfig::from_hf(&v).with_context(|| format!("--base: {}", cfg_path.display()))?;
        if c.vocab_size != VOCAB {
            bail!(
                "--base: {} has vocabulary {}, this study's character models have {VOCAB}",
                cfg_path.display(),
                c.vocab_size
            );
        }
        let sd = StateDict::load(dir.join("model.safetensors"))
            .with_context(|| format!("--base: {}", dir.display()))?;
        // Checks every weight's presence, shape and finiteness.
        Llama::<B::InnerBackend>::from_state_dict(&c, &sd, false, device)
            .with_context(|| format!("--base: {}", dir.display()))?;
        return Ok((sd, c, Vec::new()));
    }
    let c = &s.config;
    let model = Llama::<B>::random(c, seed, device)?;
    let mut rng = Rng::new(seed ^ 0xA5A5);
    let (model, losses, _) = fit(
        model,
        lr,
        s.pretrain_steps,
        || Sample::text(&corpus.train, s.batch, s.seq, &mut rng),
        device,
        bar,
        "pretraining",
    )?;
    Ok((model.to_state_dict(), c.clone(), losses))
}

/// One LoRA adapter: per target, (weight name, B `[out, r]`, A `[r, in]`).
type LoraMods = Vec<(String, ndarray::Array2<f32>, ndarray::Array2<f32>)>;

/// Median milliseconds of switching adapters at width `w` (one block): LoRA
/// of rank `r` on [`LORA_TARGETS`] vs S²FT at the same parameter count.
fn switch_time(w: usize, r: usize, reps: usize) -> anyhow::Result<SwitchRow> {
    let heads = (w / 64).max(1);
    let ffn = (8 * w / 3).div_ceil(64) * 64;
    let c = LlamaConfig::tiny(VOCAB, w, 1, heads, heads, ffn);
    let mut sd = s2ft_core::model::random_state_dict(&c, 0);
    let mut rng = Rng::new(w as u64);
    let mut rand = |r: usize, k: usize| {
        ndarray::Array2::from_shape_fn((r, k), |_| (0.01 * rng.normal()) as f32)
    };
    let lora_params = lora_param_count(&c, r, &LORA_TARGETS);
    let mut loras = Vec::new();
    for _ in 0..2 {
        let mut mods = Vec::new();
        for name in s2ft_core::model::PROJ_NAMES {
            if !LORA_TARGETS.iter().any(|t| name.ends_with(t)) {
                continue;
            }
            let key = format!("{}.{name}.weight", s2ft_core::model::layer_prefix(0));
            let sh = sd.get(&key).expect("weight").shape().to_vec();
            mods.push((key, rand(sh[0], r), rand(r, sh[1])));
        }
        loras.push(mods);
    }
    // Two S²FT adapters at the same budget, different random selections.
    let (hr, cr) = ratios_for_budget(&c, lora_params, 0.5);
    let mut adapters = Vec::new();
    for seed in 0..2u64 {
        let sc = S2ftConfig {
            heads_ratio: hr,
            channels_ratio: cr,
            seed,
            ..Default::default()
        };
        let sel = select(&c, &sc, None)?;
        let m = Llama::<s2ft_core::Cpu>::from_state_dict(&c, &sd, false, &Default::default())?;
        let mut a = s2ft_core::adapter::S2ftAdapter::extract(&apply_s2ft(m, &sel, &sc)?)?;
        for d in a.deltas.values_mut() {
            let fresh = rand(d.nrows(), d.ncols());
            d.assign(&fresh);
        }
        adapters.push(a);
    }
    Ok(SwitchRow {
        width: w,
        ffn,
        lora_rank: r,
        lora_params,
        s2ft_params: adapters[0].num_params(),
        lora_ms: lora_switch_ms(&mut sd, &loras, reps),
        s2ft_ms: s2ft_switch_ms(&mut sd, &adapters, reps)?,
    })
}

/// Median milliseconds of a LoRA switch (unmerge the current adapter, merge
/// the next: `W ∓= 2·B·A`) between two adapters, over `reps`.
fn lora_switch_ms(sd: &mut StateDict, loras: &[LoraMods], reps: usize) -> f64 {
    let apply = |sd: &mut StateDict, mods: &LoraMods, sign: f32| {
        for (key, b, a) in mods {
            let w = sd.get_mut(key).expect("weight");
            let mut w2 = w
                .data
                .view_mut()
                .into_dimensionality::<ndarray::Ix2>()
                .expect("2-D");
            ndarray::linalg::general_mat_mul(sign * 2.0, b, a, 1.0, &mut w2);
        }
    };
    apply(sd, &loras[0], 1.0);
    let mut ms = Vec::new();
    for k in 0..reps {
        let (cur, next) = (&loras[k % 2], &loras[(k + 1) % 2]);
        let t = Instant::now();
        apply(sd, cur, -1.0);
        apply(sd, next, 1.0);
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    apply(sd, &loras[reps % 2], -1.0);
    weights::stats::median(&ms)
}

/// Median milliseconds of an S²FT switch (restore the current adapter's
/// columns, add the next one's) between two adapters, over `reps`.
fn s2ft_switch_ms(
    sd: &mut StateDict,
    adapters: &[s2ft_core::adapter::S2ftAdapter],
    reps: usize,
) -> anyhow::Result<f64> {
    let mut undo = adapters[0].fuse(sd)?;
    let mut ms = Vec::new();
    for k in 0..reps {
        let next = &adapters[(k + 1) % 2];
        let t = Instant::now();
        s2ft_core::adapter::unfuse(sd, undo)?;
        undo = next.fuse(sd)?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(weights::stats::median(&ms))
}

/// One adapter-switch timing: LoRA (unmerge + merge) vs S²FT (restore +
/// add columns) at the same parameter count, one block of width `width`.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct SwitchRow {
    /// Hidden width.
    pub width: usize,
    /// FFN width.
    pub ffn: usize,
    /// LoRA rank.
    pub lora_rank: usize,
    /// LoRA's parameters.
    pub lora_params: usize,
    /// S²FT's parameters (matched to LoRA's).
    pub s2ft_params: usize,
    /// Median ms per LoRA switch.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub lora_ms: f64,
    /// Median ms per S²FT switch.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub s2ft_ms: f64,
}

/// One fine-tune of the sweep.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct RunRow {
    /// `full`, `lora r4`, `s2ft-random r4`, …
    pub method: String,
    /// `full`, `lora`, `s2ft-random` or `s2ft-act`.
    pub family: String,
    /// The LoRA rank whose parameter count the method matches.
    pub lora_rank_budget: Option<usize>,
    /// Seed.
    pub seed: u64,
    /// Trainable parameters.
    pub trainable_params: usize,
    /// Learning rate.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub lr: f64,
    /// Optimiser steps.
    pub steps: usize,
    /// Task B after fine-tuning.
    pub task_b: Eval,
    /// Task A (the pretraining text) after fine-tuning.
    pub task_a: Eval,
    /// Increase of task-A loss over the base.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub forgetting: f64,
    /// Median ms per step.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub step_ms: f64,
    /// Peak heap while fine-tuning (when the counting allocator is installed).
    pub peak_bytes: Option<usize>,
    /// Last training loss.
    pub final_train_loss: Option<f32>,
}

/// A method's means over seeds.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct SummaryRow {
    /// Method label.
    pub method: String,
    /// Its family.
    pub family: String,
    /// LoRA rank budget.
    pub lora_rank_budget: Option<usize>,
    /// Trainable parameters.
    pub trainable_params: usize,
    /// Mean task-B accuracy.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub task_b_acc: f64,
    /// Mean task-B loss.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub task_b_loss: f64,
    /// Mean forgetting.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub forgetting: f64,
    /// Mean step time.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub step_ms: f64,
    /// Mean peak heap in MB (NaN, written as null, when not measured).
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub peak_mb: f64,
}

/// Task scores of one model of the fusion experiment.
#[derive(Clone, Copy, Debug, Serialize, serde::Deserialize)]
pub struct FusionScore {
    /// Task-A loss.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub task_a_loss: f64,
    /// Task-B accuracy.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub task_b_acc: f64,
    /// Task-C accuracy.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub task_c_acc: f64,
}

/// Adapters for tasks B and C alone and fused.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct FusionRow {
    /// Method label.
    pub method: String,
    /// Trained on B only.
    pub only_b: FusionScore,
    /// Trained on C only.
    pub only_c: FusionScore,
    /// Both task vectors added to the base.
    pub fused: FusionScore,
}

/// Pretraining of the base.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Pretrain {
    /// Steps run (0 when the base was loaded).
    pub steps: usize,
    /// Loss per step.
    pub losses: Vec<f32>,
}

/// The base before fine-tuning.
#[derive(Clone, Copy, Debug, Serialize, serde::Deserialize)]
pub struct BaseScores {
    /// On the pretraining text.
    pub task_a: Eval,
    /// On task B.
    pub task_b: Eval,
}

/// What `metrics.partial.json` holds while the fine-tunes run.
#[derive(Serialize)]
struct S2ftPartial<'a> {
    base: &'a BaseScores,
    runs: &'a [RunRow],
}

/// The study's `metrics.json`.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct S2ftMetrics {
    /// The model.
    pub config: LlamaConfig,
    /// What task A is.
    pub task_a: String,
    /// Task B's name.
    pub task_b: String,
    /// Task C's name.
    pub task_c: String,
    /// Pretraining.
    pub pretrain: Pretrain,
    /// The base's scores.
    pub base: BaseScores,
    /// Every fine-tune.
    pub runs: Vec<RunRow>,
    /// Means over seeds.
    pub summary: Vec<SummaryRow>,
    /// Adapter fusion.
    pub fusion: Vec<FusionRow>,
    /// Adapter switch times.
    pub switch: Vec<SwitchRow>,
    /// Whether peak heap was measured.
    pub memory_measured: bool,
}

/// The base every fine-tune starts from: `--base`, or pretrained on task A
/// and written to `<out>/base` (model.safetensors + config.json) for reuse.
/// Sets `s.config` to the base's shape; returns it and the pretraining losses.
pub(crate) fn prepare_base<B: AutodiffBackend>(
    lm: &LmArgs,
    s: &mut Sizes,
    corpus: &Corpus,
    run: &mut Run,
    device: &B::Device,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<(StateDict, Vec<f32>)>
where
    Llama<B>: AutodiffModule<B>,
{
    bar.set_message("pretraining");
    let (base, config, losses) = run.phase("pretrain", || {
        pretrain::<B>(
            lm.base.as_deref(),
            s,
            corpus,
            lm.lr_pretrain,
            lm.seed,
            device,
            bar,
        )
    })?;
    s.config = config;
    if lm.base.is_none() {
        let bdir = run.dir.join("base");
        std::fs::create_dir_all(&bdir)?;
        base.save_safetensors(bdir.join("model.safetensors"))?;
        weights::atomic::write_atomic(
            bdir.join("config.json"),
            serde_json::to_string_pretty(&s.config.to_hf())?.as_bytes(),
        )?;
    }
    Ok((base, losses))
}

/// Runs the study; returns the report folder. With `--model` it fine-tunes
/// that pretrained model on instruction tasks ([`crate::studies::s2ft_llm`]).
pub fn run(args: &S2ftArgs) -> anyhow::Result<PathBuf> {
    if args.llm.model.is_some() {
        return crate::studies::s2ft_llm::run(args);
    }
    args.llm.refuse_without_model()?;
    let s = args.lm.sizes()?;
    let sw = args.sweep()?;
    let (run, corpus) = args.lm.open("s2ft")?;
    let dev = run.device;
    crate::device::on_device!(dev, run_on(args, s, sw, run, corpus, &Default::default()))
}

/// The first seed's fine-tune of each method (fused and plotted later).
type Kept = Vec<(Method, Finetuned)>;

/// What every phase of the character study shares: the sizes, the base and
/// its scores, the held-out sets, the device and the progress bar.
struct Ctx<'a, B: AutodiffBackend> {
    args: &'a S2ftArgs,
    s: Sizes,
    base: StateDict,
    c: LlamaConfig,
    evals: EvalSets,
    base_scores: BaseScores,
    device: &'a B::Device,
    bar: indicatif::ProgressBar,
}

impl<B: AutodiffBackend> Ctx<'_, B>
where
    Llama<B>: AutodiffModule<B>,
{
    /// Fine-tunes the base with `m` on `task`.
    fn finetune(&self, m: Method, task: Task, seed: u64) -> anyhow::Result<Finetuned> {
        let lr = self.args.lm.lr(m);
        finetune::<B>(
            &self.base,
            &self.s,
            m,
            &[task],
            lr,
            seed,
            None,
            self.device,
            &self.bar,
        )
    }

    /// Every method × seed on task B; the first seed's fine-tunes are kept.
    fn sweep(
        &self,
        run: &mut Run,
        methods: &[Method],
        seeds: usize,
    ) -> anyhow::Result<(Vec<RunRow>, Kept)> {
        let (lm, task_b) = (&self.args.lm, self.args.task);
        let mut rows: Vec<RunRow> = Vec::new();
        let mut csv = String::from(
            "method,family,lora_rank_budget,seed,trainable_params,task_b_acc,task_b_loss,task_a_loss,forgetting,step_ms,peak_bytes\n",
        );
        let mut kept = Vec::new();
        for seed_k in 0..seeds as u64 {
            let seed = lm.seed * 1000 + seed_k;
            for &m in methods {
                self.bar.set_message(format!("{} seed {seed}", m.label()));
                let ft = run.phase(&format!("{} seed {seed}", m.label()), || {
                    self.finetune(m, task_b, seed)
                })?;
                let (a, tasks) = self.evals.score::<B>(&self.c, &ft.weights, self.device)?;
                let b = tasks[0].1;
                let row = RunRow {
                    method: m.label(),
                    family: m.family().to_string(),
                    lora_rank_budget: m.rank(),
                    seed,
                    trainable_params: ft.trainable,
                    lr: lm.lr(m),
                    steps: self.s.steps,
                    task_b: b,
                    task_a: a,
                    forgetting: a.loss - self.base_scores.task_a.loss,
                    step_ms: ft.step_ms,
                    peak_bytes: ft.peak_bytes,
                    final_train_loss: ft.losses.last().copied(),
                };
                csv.push_str(&format!(
                    "{},{},{},{seed},{},{:.5},{:.5},{:.5},{:.5},{:.3},{}\n",
                    row.method,
                    row.family,
                    m.rank().map_or(String::new(), |r| r.to_string()),
                    row.trainable_params,
                    b.acc,
                    b.loss,
                    a.loss,
                    row.forgetting,
                    row.step_ms,
                    row.peak_bytes.map_or(String::new(), |p| p.to_string())
                ));
                // Written after every run: an interrupted study keeps what finished.
                run.write("runs.csv", csv.as_bytes())?;
                rows.push(row);
                run.partial(&S2ftPartial {
                    base: &self.base_scores,
                    runs: &rows,
                })?;
                if seed_k == 0 {
                    kept.push((m, ft));
                }
            }
        }
        Ok((rows, kept))
    }

    /// Adapter fusion: τ_B + τ_C on the base, vs each alone.
    fn fusion(
        &self,
        run: &mut Run,
        methods: &[Method],
        kept: &[(Method, Finetuned)],
    ) -> anyhow::Result<Vec<FusionRow>> {
        let task_c = self.args.fusion_task;
        let mut fusion = Vec::new();
        for &m in methods {
            self.bar.set_message(format!("fusion {}", m.label()));
            let on_b = &kept.iter().find(|(k, _)| *k == m).expect("swept").1;
            let on_c = run.phase(&format!("{} on {}", m.label(), task_c.name()), || {
                self.finetune(m, task_c, self.args.lm.seed * 1000 + 1)
            })?;
            let fused = run.phase(&format!("fuse {}", m.label()), || {
                merge::merge_state_dicts(
                    &merge::Method::from_name("task_arithmetic")?,
                    Some(&self.base),
                    &[on_b.weights.clone(), on_c.weights.clone()],
                    &[("weight".to_string(), merge::Value::Num(1.0))]
                        .into_iter()
                        .collect(),
                    &[merge::Params::new(), merge::Params::new()],
                    0,
                )
            })?;
            let score = |sd: &StateDict| -> anyhow::Result<FusionScore> {
                let (a, t) = self.evals.score::<B>(&self.c, sd, self.device)?;
                Ok(FusionScore {
                    task_a_loss: a.loss,
                    task_b_acc: t[0].1.acc,
                    task_c_acc: t[1].1.acc,
                })
            };
            fusion.push(FusionRow {
                method: m.label(),
                only_b: score(&on_b.weights)?,
                only_c: score(&on_c.weights)?,
                fused: score(&fused)?,
            });
        }
        Ok(fusion)
    }
}

/// Means over seeds, per method.
fn summarise(methods: &[Method], rows: &[RunRow]) -> Vec<SummaryRow> {
    methods
        .iter()
        .map(|m| {
            let rs: Vec<&RunRow> = rows.iter().filter(|r| r.method == m.label()).collect();
            let f = |key: &dyn Fn(&RunRow) -> f64| mean(rs.iter().map(|r| key(r)));
            SummaryRow {
                method: m.label(),
                family: m.family().to_string(),
                lora_rank_budget: m.rank(),
                trainable_params: rs[0].trainable_params,
                task_b_acc: f(&|r| r.task_b.acc),
                task_b_loss: f(&|r| r.task_b.loss),
                forgetting: f(&|r| r.forgetting),
                step_ms: f(&|r| r.step_ms),
                peak_mb: f(&|r| r.peak_bytes.map_or(f64::NAN, |b| b as f64 / 1e6)),
            }
        })
        .collect()
}

fn run_on<B: AutodiffBackend>(
    args: &S2ftArgs,
    mut s: Sizes,
    sw: Sweep,
    mut run: Run,
    corpus: Corpus,
    device: &B::Device,
) -> anyhow::Result<PathBuf>
where
    Llama<B>: AutodiffModule<B>,
{
    let lm = &args.lm;
    let (task_b, task_c) = (args.task, args.fusion_task);
    let mut methods = vec![Method::Full];
    for &r in &sw.ranks {
        methods.push(Method::Lora(r));
        methods.push(Method::S2ft(r, Strategy::Random));
        methods.push(Method::S2ft(r, Strategy::ActivationNorm));
    }
    let mid = sw.ranks[sw.ranks.len() / 2];
    let fusion_methods = [
        Method::Full,
        Method::Lora(mid),
        Method::S2ft(mid, Strategy::Random),
    ];
    let total = lm.pretrain_steps(&s) + (methods.len() * sw.seeds + fusion_methods.len()) * s.steps;
    let bar = run.progress(total as u64);
    let (base, pre_losses) = prepare_base::<B>(lm, &mut s, &corpus, &mut run, device, &bar)?;
    let c = s.config.clone();
    let evals = EvalSets::new(&corpus, &[task_b, task_c], &s);
    let (base_a, base_tasks) = evals.score::<B>(&c, &base, device)?;
    let base_scores = BaseScores {
        task_a: base_a,
        task_b: base_tasks[0].1,
    };
    let ctx = Ctx::<B> {
        args,
        s,
        base,
        c,
        evals,
        base_scores,
        device,
        bar,
    };
    let (rows, kept) = ctx.sweep(&mut run, &methods, sw.seeds)?;
    let summary = summarise(&methods, &rows);
    let fusion = ctx.fusion(&mut run, &fusion_methods, &kept)?;
    ctx.bar.finish_and_clear();
    let switch = sw
        .switch_widths
        .iter()
        .map(|&w| run.phase(&format!("switch width {w}"), || switch_time(w, 8, 7)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let Ctx { s, base, c, .. } = ctx;
    let metrics = S2ftMetrics {
        config: c,
        task_a: "moby-dick character LM".to_string(),
        task_b: task_b.name().to_string(),
        task_c: task_c.name().to_string(),
        pretrain: Pretrain {
            steps: pre_losses.len(),
            losses: pre_losses,
        },
        base: base_scores,
        runs: rows,
        summary,
        fusion,
        switch,
        memory_measured: crate::alloc::installed(),
    };
    plots(&metrics, &kept, mid, &run)?;
    let md = report(&metrics, args, &s, base.numel(), sw.seeds);
    run.finish(&metrics, &md)?;
    Ok(run.dir.clone())
}

/// Trade-off, step time, memory, fine-tuning loss and switch-time plots.
fn plots(
    m: &S2ftMetrics,
    kept: &[(Method, Finetuned)],
    mid: usize,
    run: &Run,
) -> anyhow::Result<()> {
    let (rows, summary, switch) = (&m.runs, &m.summary, &m.switch);
    let task_b = &m.task_b;
    let memory_measured = m.memory_measured;
    // Plots.
    let palette = ["full", "lora", "s2ft-random", "s2ft-act"];
    let tradeoff: Vec<Series> = palette
        .iter()
        .enumerate()
        .map(|(i, fam)| {
            let pts = rows
                .iter()
                .filter(|r| r.family == *fam)
                .map(|r| (r.forgetting, r.task_b.acc))
                .collect();
            Series::dots(*fam, pts).colored(i)
        })
        .collect();
    line_chart(
        &run.dir.join("tradeoff"),
        &format!("Task {} accuracy vs forgetting of task A", task_b),
        "forgetting: increase of task-A loss (nats/char)",
        &format!("task {} accuracy", task_b),
        &tradeoff,
    )?;
    let at_mid: Vec<&SummaryRow> = summary
        .iter()
        .filter(|r| r.lora_rank_budget.is_none_or(|r| r == mid))
        .collect();
    let bars = |key: fn(&SummaryRow) -> f64| -> Vec<(String, f64)> {
        at_mid
            .iter()
            .map(|r| (r.family.to_string(), key(r)))
            .collect()
    };
    bar_chart(
        &run.dir.join("step_time"),
        &format!("Step time (LoRA rank {mid} budget)"),
        "median ms per step",
        &bars(|r| r.step_ms),
    )?;
    if memory_measured {
        bar_chart(
            &run.dir.join("memory"),
            &format!("Peak heap during fine-tuning (LoRA rank {mid} budget)"),
            "MB",
            &bars(|r| r.peak_mb),
        )?;
    }
    finetune_loss_plot(kept, mid, task_b, run)?;
    switch_plot(switch, run)
}

/// The fine-tuning loss of the first seed of each method at the mid budget.
fn finetune_loss_plot(
    kept: &[(Method, Finetuned)],
    mid: usize,
    task_b: &str,
    run: &Run,
) -> anyhow::Result<()> {
    let curves: Vec<Series> = kept
        .iter()
        .filter(|(m, _)| m.rank().is_none_or(|r| r == mid))
        .map(|(m, ft)| {
            Series::line(
                m.family(),
                ft.losses
                    .iter()
                    .enumerate()
                    .map(|(i, &l)| (i as f64, l as f64))
                    .collect(),
            )
        })
        .collect();
    line_chart(
        &run.dir.join("finetune_loss"),
        &format!("Fine-tuning loss on task {}", task_b),
        "step",
        "answer-token loss",
        &curves,
    )
}

/// Adapter switch time against the width (when measured).
fn switch_plot(switch: &[SwitchRow], run: &Run) -> anyhow::Result<()> {
    if !switch.is_empty() {
        let pts = |k: fn(&SwitchRow) -> f64| -> Vec<(f64, f64)> {
            switch.iter().map(|r| (r.width as f64, k(r))).collect()
        };
        line_chart(
            &run.dir.join("switch_time"),
            "Adapter switch time (one block)",
            "hidden width",
            "ms",
            &[
                Series::line("LoRA r8 (unmerge + merge)", pts(|r| r.lora_ms)),
                Series::line(
                    "S²FT, same budget (restore + add columns)",
                    pts(|r| r.s2ft_ms),
                ),
            ],
        )?;
    }
    Ok(())
}

/// The adapter-fusion rows of `report.md`.
fn fusion_table(md: &mut String, fusion: &[FusionRow]) {
    for f in fusion {
        md.push_str(&format!(
            "| {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |\n",
            f.method,
            f.only_b.task_b_acc,
            f.only_c.task_c_acc,
            f.fused.task_b_acc,
            f.fused.task_c_acc,
            f.fused.task_a_loss,
        ));
    }
}

/// The adapter switch-time section of `report.md` (when measured).
fn switch_table(md: &mut String, switch: &[SwitchRow]) {
    if switch.is_empty() {
        return;
    }
    md.push_str("\n## Adapter switch time (one block, CPU)\n\n| width | LoRA r8 params | LoRA ms | S²FT params | S²FT ms | ratio |\n|---|---|---|---|---|---|\n");
    for r in switch {
        let (l, x) = (r.lora_ms, r.s2ft_ms);
        md.push_str(&format!(
            "| {} | {} | {l:.3} | {} | {x:.3} | {:.1}× |\n",
            r.width,
            r.lora_params,
            r.s2ft_params,
            l / x
        ));
    }
    md.push_str("\n![switch time](switch_time.png)\n");
}

/// `report.md`.
fn report(m: &S2ftMetrics, args: &S2ftArgs, s: &Sizes, base_params: usize, seeds: usize) -> String {
    let (lm, c, summary, fusion, switch) = (&args.lm, &m.config, &m.summary, &m.fusion, &m.switch);
    let (task_b, task_c) = (args.task, args.fusion_task);
    let (base_a, base_b) = (m.base.task_a, m.base.task_b);
    let memory_measured = m.memory_measured;
    // Report.
    let mut md = format!(
        "# S²FT vs LoRA vs full fine-tuning\n\n\
         Base: LLaMA-style decoder, hidden {}, {} blocks, {} heads, FFN {}, vocabulary {} (ASCII), {} parameters; \
         {} on Moby-Dick text (task A). Held-out task-A loss {:.3} nats/char, accuracy {:.3}; task {} accuracy before fine-tuning {:.3}.\n\n\
         Fine-tuning on task **{}** ({} steps, batch {}×{}, AdamW; lr {} full, {} LoRA/S²FT), {} seed(s). \
         S²FT budgets match LoRA's trainable parameters at each rank (LoRA on {}); S²FT trains o_proj/down_proj columns of random or smallest-activation heads/channels.\n\n\
         | method | trainable params | task-B acc | task-B loss | forgetting (Δ task-A loss) | step ms | peak heap MB |\n|---|---|---|---|---|---|---|\n",
        c.hidden_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.intermediate_size,
        c.vocab_size,
        base_params,
        match &lm.base {
            Some(p) => format!("loaded from {}", p.display()),
            None => format!("pretrained {} steps", s.pretrain_steps),
        },
        base_a.loss,
        base_a.acc,
        task_b.name(),
        base_b.acc,
        task_b.name(),
        s.steps,
        s.batch,
        s.seq,
        lm.lr_full,
        lm.lr_peft,
        seeds,
        LORA_TARGETS.join(", "),
    );
    for r in summary {
        md.push_str(&format!(
            "| {} | {} | {:.3} | {:.3} | {:+.4} | {:.1} | {} |\n",
            r.method,
            r.trainable_params,
            r.task_b_acc,
            r.task_b_loss,
            r.forgetting,
            r.step_ms,
            Some(r.peak_mb)
                .filter(|v| v.is_finite())
                .map_or("not measured".into(), |v| format!("{v:.1}")),
        ));
    }
    md.push_str(&format!(
        "\n![trade-off](tradeoff.png)\n\n![step time](step_time.png)\n{}\n![fine-tuning loss](finetune_loss.png)\n\n\
         ## Adapter fusion (task {} + task {})\n\nEach adapter is trained alone; the fused model adds both task vectors to the base.\n\n\
         | method | {b} acc (only {b}) | {cc} acc (only {cc}) | {b} acc (fused) | {cc} acc (fused) | task-A loss (fused) |\n|---|---|---|---|---|---|\n",
        if memory_measured { "\n![memory](memory.png)\n" } else { "" },
        task_b.name(),
        task_c.name(),
        b = task_b.name(),
        cc = task_c.name(),
    ));
    fusion_table(&mut md, fusion);
    switch_table(&mut md, switch);
    md
}
