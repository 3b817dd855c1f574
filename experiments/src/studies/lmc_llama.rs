//! `lmc --arch llama`: linear mode connectivity of two character-level
//! LLaMA-style decoders (RoPE, RMSNorm, SwiGLU; the `s2ft` study's model)
//! trained from different seeds on the vendored corpus.
//!
//! Rows: naive interpolation; weight matching over the head-aware spec
//! ([`permute::builders::llama`]: residual stream, FFN channels, whole heads
//! with their query groups, v/o units inside a head — GQA-safe and
//! RoPE-safe, so B's function is kept exactly); activation matching over
//! the same groups (residual stream entering every block, the down_proj
//! inputs, the attention context per head, matched with the same nested
//! head structure); and, as an ablation, weight matching over Git Re-Basin's
//! unit-wise spec ([`permute::builders::llama_units`]), which moves q/k and
//! v/o units across heads and splits rotary pairs: not a symmetry, so the
//! permuted B is a different (worse) function, and the table says by how much.
//! Two more rows work on the models with their RMSNorm gains folded into the
//! next weights (same functions): weight matching alone, and weight matching
//! alternated with an orthogonal (Procrustes) map of the residual stream
//! ([`permute::orthogonal`]), the wider symmetry class of "Generalized Linear
//! Mode Connectivity for Transformers" (2025).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, ensure};
use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::TensorData;
use burn::tensor::backend::AutodiffBackend;
use indexmap::IndexMap;
use ndarray::Array2;
use permute::builders::{llama_ffn_group, llama_heads_group};
use permute::spec::{Group, Member};
use permute::{MatchOptions, Permutation, PermutationSpec, apply, weight_matching};
use s2ft_core::{Llama, LlamaConfig};
use serde::Serialize;
use weights::{StateDict, Tensor as WTensor};

use crate::lm::{Corpus, Sample, VOCAB, default_text_dir, evaluate, held_out, moby_dick};
use crate::plot::{Series, line_chart};
use crate::report::Run;
use crate::studies::lmc::{Curve, LmcArgs, WidthRow, curve_scored, repaired_curve};
use crate::studies::s2ft::{Sizes, pretrain};

/// Every head of the study's models is this wide (heads = hidden / 16).
pub const HEAD_DIM: usize = 16;

/// Pretraining's learning rate (the `s2ft` study's).
const LR: f64 = 3e-3;

/// The sizes of one run after `--quick` and the options.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Shape {
    /// Residual width.
    pub hidden: usize,
    /// Decoder blocks.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// FFN width (4 × hidden).
    pub ffn: usize,
    /// Training steps per model.
    pub steps: usize,
    /// Sequences per batch.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Held-out batches per split for the losses.
    pub eval_batches: usize,
}

impl Shape {
    /// The sizes `args` ask for (`width` overrides `--width`: the sweep).
    pub fn of(args: &LmcArgs, width: Option<usize>) -> anyhow::Result<Shape> {
        ensure!(
            args.epochs.is_none(),
            "--epochs applies to the image networks; --arch llama trains for --steps"
        );
        ensure!(
            args.ste_steps == 0,
            "--ste-steps applies to --arch mlp (STE is implemented for the MLP only)"
        );
        let (hidden, layers, steps, batch, seq, eval_batches) = if args.quick {
            (32, 2, 150, 8, 32, 4)
        } else {
            (128, 2, 1500, 16, 64, 8)
        };
        let hidden = width.or(args.width).unwrap_or(hidden);
        let layers = args.depth.unwrap_or(layers);
        let steps = args.steps.unwrap_or(steps);
        ensure!(
            hidden > 0 && hidden.is_multiple_of(HEAD_DIM),
            "--width {hidden}: the residual width of --arch llama must be a positive multiple of the head size {HEAD_DIM}"
        );
        ensure!(
            layers > 0 && steps > 0,
            "--depth and --steps must be positive"
        );
        let heads = hidden / HEAD_DIM;
        let kv_heads = args.kv_heads.unwrap_or(heads);
        ensure!(
            kv_heads > 0 && heads.is_multiple_of(kv_heads),
            "--kv-heads {kv_heads} must divide the {heads} query heads of width {hidden}"
        );
        Ok(Shape {
            hidden,
            layers,
            heads,
            kv_heads,
            ffn: 4 * hidden,
            steps,
            batch,
            seq,
            eval_batches,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> LlamaConfig {
        LlamaConfig::tiny(
            VOCAB,
            self.hidden,
            self.layers,
            self.heads,
            self.kv_heads,
            self.ffn,
        )
    }
}

/// Two decoders trained from different seeds, with their data.
pub struct TrainedPair {
    /// The sizes.
    pub shape: Shape,
    /// Their configuration.
    pub config: LlamaConfig,
    /// Model A (seed `2·seed`).
    pub a: StateDict,
    /// Model B (seed `2·seed + 1`).
    pub b: StateDict,
    /// Final training losses (median of the last 20 steps) of A and B.
    pub final_loss: [f64; 2],
}

/// Trains the pair of `shape`, A on `corpora[0]` and B on `corpora[1]`
/// (AdamW, lr 3e-3, seeds `2·seed` and `2·seed + 1` for the initialisation
/// and the batch order).
pub fn train_pair(
    shape: Shape,
    seed: u64,
    corpora: [&Corpus; 2],
    run: &mut Run,
) -> anyhow::Result<TrainedPair> {
    let sizes = Sizes {
        config: shape.config(),
        seq: shape.seq,
        batch: shape.batch,
        pretrain_steps: shape.steps,
        steps: 1,
        eval_batches: shape.eval_batches,
    };
    let bar = run.progress(2 * shape.steps as u64);
    let dev = run.device;
    let mut models = run.phase(&format!("train width {}", shape.hidden), || {
        (0..2u64)
            .map(|k| {
                let corpus = corpora[k as usize];
                crate::device::on_device!(dev, train_one(&sizes, corpus, 2 * seed + k, &bar))
            })
            .collect::<anyhow::Result<Vec<_>>>()
    })?;
    bar.finish_and_clear();
    let (b, a) = (models.pop().expect("two"), models.pop().expect("two"));
    Ok(TrainedPair {
        config: sizes.config,
        shape,
        a: a.0,
        b: b.0,
        final_loss: [a.1, b.1],
    })
}

fn train_one<B: AutodiffBackend>(
    sizes: &Sizes,
    corpus: &Corpus,
    seed: u64,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<(StateDict, f64)>
where
    Llama<B>: AutodiffModule<B>,
{
    let (sd, _, losses) = pretrain::<B>(None, sizes, corpus, LR, seed, &Default::default(), bar)?;
    let tail: Vec<f64> = losses[losses.len().saturating_sub(20)..]
        .iter()
        .map(|&l| l as f64)
        .collect();
    Ok((sd, weights::stats::median(&tail)))
}

/// Held-out windows of the training text and of the test text.
pub struct EvalSets {
    train: Vec<Sample>,
    test: Vec<Sample>,
}

impl EvalSets {
    /// `shape.eval_batches` fixed batches of each split.
    pub fn new(corpus: &Corpus, shape: &Shape) -> EvalSets {
        let draw = |text: &[u8], seed| {
            held_out(shape.eval_batches, seed, |r| {
                Sample::text(text, shape.batch, shape.seq, r)
            })
        };
        EvalSets {
            train: draw(&corpus.train, 0xE7A1),
            test: draw(&corpus.test, 0xE7A2),
        }
    }

    /// `[(train loss, train token accuracy), (test loss, test token accuracy)]`
    /// of `sd` (CPU).
    pub fn score(&self, c: &LlamaConfig, sd: &StateDict) -> anyhow::Result<[(f64, f64); 2]> {
        let model = cpu_model(c, sd)?;
        let [a, b] = [&self.train, &self.test].map(|s| evaluate(&model, s));
        Ok([(a.loss, a.acc), (b.loss, b.acc)])
    }

    /// Loss and token accuracy of `model` on the test text alone.
    pub fn test(&self, model: &Llama<s2ft_core::Cpu>) -> crate::lm::Eval {
        evaluate(model, &self.test)
    }
}

/// `sd` as a CPU model of configuration `c` (every weight checked).
pub fn cpu_model(c: &LlamaConfig, sd: &StateDict) -> anyhow::Result<Llama<s2ft_core::Cpu>> {
    Ok(Llama::from_state_dict(c, sd, false, &Default::default())?)
}

/// Activation matching over `spec`'s groups: the residual stream entering
/// every block (one permutation for all depths), each block's down_proj input
/// (its FFN channels) and its attention context (`heads·head_dim`, matched
/// with the head group's nested structure: key/value heads outside, query
/// heads of a group as copies, free units inside a head). Uncentered
/// correlations over the `probe` tokens, maximised by weight matching on the
/// activation matrices (groups share no activation, so one pass solves each
/// exactly).
pub fn activation_matching(
    c: &LlamaConfig,
    spec: &PermutationSpec,
    (a, b): (&StateDict, &StateDict),
    probe: &Sample,
) -> anyhow::Result<Permutation> {
    let acts_a = activations(c, a, probe)?;
    let acts_b = activations(c, b, probe)?;
    let n_rep = c.num_attention_heads / c.num_key_value_heads;
    let head_groups: std::collections::HashSet<String> =
        (0..c.num_hidden_layers).map(llama_heads_group).collect();
    let groups = spec
        .groups
        .iter()
        .map(|g| {
            let (repeat, family) = if head_groups.contains(&g.name) {
                (n_rep, 1)
            } else {
                (1, 0)
            };
            ensure!(
                acts_a.contains(&g.name),
                "activation matching: no activations for group '{}'",
                g.name
            );
            Ok(Group {
                members: vec![Member {
                    weight: g.name.clone(),
                    axis: 0,
                    repeat,
                    family,
                }],
                ..g.clone()
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let act_spec = PermutationSpec { groups };
    Ok(weight_matching(&act_spec, &acts_a, &acts_b, &MatchOptions::default())?.perm)
}

/// Per group of [`permute::builders::llama`]'s spec, the activations it
/// permutes as `[units, positions]`.
fn activations(c: &LlamaConfig, sd: &StateDict, probe: &Sample) -> anyhow::Result<StateDict> {
    let model = cpu_model(c, sd)?;
    let mut out = StateDict::new();
    let mut residual = Vec::new();
    for (l, x) in model
        .linear_inputs(probe_tokens(probe))
        .into_iter()
        .enumerate()
    {
        residual.push(to_array(x.residual));
        let down = x
            .down_proj
            .ok_or_else(|| anyhow::anyhow!("block {l} has no dense FFN"))?;
        out.insert(llama_ffn_group(l), units_first(to_array(down)));
        out.insert(llama_heads_group(l), units_first(to_array(x.o_proj)));
    }
    let views: Vec<_> = residual.iter().map(|r| r.view()).collect();
    let stacked = ndarray::concatenate(ndarray::Axis(0), &views)?;
    out.insert("residual", units_first(stacked));
    Ok(out)
}

pub(crate) fn to_array(t: Tensor<s2ft_core::Cpu, 2>) -> Array2<f32> {
    let [n, d] = t.dims();
    let v: Vec<f32> = t.into_data().convert::<f32>().into_vec().expect("f32");
    Array2::from_shape_vec((n, d), v).expect("shape")
}

/// The probe's tokens (inputs only) as a CPU tensor.
pub(crate) fn probe_tokens(probe: &Sample) -> Tensor<s2ft_core::Cpu, 2, Int> {
    let t: Tensor<s2ft_core::Cpu, 2, Int> = Tensor::from_data(
        TensorData::new(probe.tokens.clone(), [probe.b, probe.t + 1]),
        &Default::default(),
    );
    t.narrow(1, 0, probe.t)
}

/// REPAIR of the interpolations of two aligned decoders on the `probe`
/// tokens ([`permute::repair::RepairedInterpolation`]), by scale only (the
/// LLaMA has no biases to take a shift, so each channel gets the
/// interpolated root mean square): per block the outputs of input_layernorm
/// and post_attention_layernorm (through their gains) and the FFN channels
/// `silu(gate)·up` (through up_proj's rows), then the final norm.
pub fn repaired<'a>(
    c: &'a LlamaConfig,
    a: &'a StateDict,
    b: &'a StateDict,
    probe: &'a Sample,
) -> anyhow::Result<permute::repair::RepairedInterpolation<'a, crate::studies::lmc::Taps<'a>>> {
    use permute::repair::{RepairLayer, RepairedInterpolation};
    use weights::llama::names;
    let mut layers = Vec::new();
    for l in 0..c.num_hidden_layers {
        for part in [
            names::INPUT_NORM,
            names::POST_ATTENTION_NORM,
            names::UP_PROJ,
        ] {
            layers.push(RepairLayer::scale_only(&names::weight(l, part)));
        }
    }
    layers.push(RepairLayer::scale_only(names::NORM));

    let taps = move |sd: &StateDict| -> anyhow::Result<Vec<Array2<f32>>> {
        let model = cpu_model(c, sd)?;
        let tokens = probe_tokens(probe);
        let mut out = Vec::new();
        for (l, x) in model.linear_inputs(tokens.clone()).into_iter().enumerate() {
            let down = x
                .down_proj
                .ok_or_else(|| anyhow::anyhow!("block {l} has no dense FFN"))?;
            out.extend([to_array(x.attn), to_array(x.mlp), to_array(down)]);
        }
        let h = model.hidden(tokens);
        let [bb, t, d] = h.dims();
        out.push(to_array(h.reshape([bb * t, d])));
        Ok(out)
    };
    RepairedInterpolation::new(
        a,
        b,
        layers,
        Box::new(taps) as crate::studies::lmc::Taps<'a>,
    )
}

fn units_first(x: Array2<f32>) -> WTensor {
    WTensor::f32(x.reversed_axes().as_standard_layout().to_owned().into_dyn())
}

/// One row of the table: [`crate::studies::lmc::MethodRow`]'s fields (the
/// barriers along the training text, L2, seconds to align, the curves) and
/// how much the permutation alone changes B.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct MethodRow {
    /// Barriers, distance, seconds and curves.
    #[serde(flatten)]
    pub curve: crate::studies::lmc::MethodRow,
    /// Test loss of P·B minus B's: 0 when P is a symmetry.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub b_loss_change: f64,
}

impl MethodRow {
    fn new(c: Curve, l2: f64, seconds: f64, b_test_loss: f64) -> MethodRow {
        let b_loss_change = c.test.last().map_or(f64::NAN, |x| x.1) - b_test_loss;
        MethodRow {
            curve: crate::studies::lmc::MethodRow::new(c, l2, seconds),
            b_loss_change,
        }
    }
}

/// What `metrics.json` holds: the methods by name at the top level
/// (`naive`, `wm`, `am`, `wm_units`), as for the image networks.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Metrics {
    /// `llama`.
    pub arch: String,
    /// The sizes.
    pub shape: Shape,
    /// Test loss and token accuracy of A and B.
    pub endpoints: [(f64, f64); 2],
    /// Weight-matching passes (head-aware spec).
    pub wm_passes: usize,
    /// The rows.
    #[serde(flatten)]
    pub methods: IndexMap<String, MethodRow>,
    /// `--widths`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub width_sweep: Vec<WidthRow>,
}

/// A method's aligned B, whether its endpoints are the norm-folded models,
/// and the seconds it took.
struct Aligned {
    name: &'static str,
    folded: bool,
    b: StateDict,
    seconds: f64,
}

/// Rounds of alternating weight matching and residual Procrustes.
const ORTHOGONAL_ROUNDS: usize = 3;

/// B aligned by each method: identity, head-aware WM, AM, unit-wise WM
/// (multi-head attention only), and on the norm-folded models ([`fold`]) WM
/// alone and WM alternated with an orthogonal map of the residual stream;
/// also the head-aware WM's passes.
fn align(
    pair: &TrainedPair,
    folded_a: &StateDict,
    probe: &Sample,
    seed: u64,
    run: &mut Run,
) -> anyhow::Result<(Vec<Aligned>, usize)> {
    let (a, b, c) = (&pair.a, &pair.b, &pair.config);
    let spec = permute::builders::llama(c, a)?;
    let opts = MatchOptions {
        seed,
        ..Default::default()
    };
    let mut out = vec![Aligned {
        name: "naive",
        folded: false,
        b: b.clone(),
        seconds: 0.0,
    }];
    let mut passes = 0;
    let mut timed = |name: &'static str,
                     folded: bool,
                     run: &mut Run,
                     f: &mut dyn FnMut() -> anyhow::Result<StateDict>|
     -> anyhow::Result<()> {
        let t = Instant::now();
        let bp = run.phase(name, &mut *f)?;
        out.push(Aligned {
            name,
            folded,
            b: bp,
            seconds: t.elapsed().as_secs_f64(),
        });
        Ok(())
    };
    timed("wm", false, run, &mut || {
        let wm = weight_matching(&spec, a, b, &opts)?;
        passes = wm.passes;
        Ok(apply(&spec, &wm.perm, b)?)
    })?;
    timed("am", false, run, &mut || {
        let p = activation_matching(c, &spec, (a, b), probe)?;
        Ok(apply(&spec, &p, b)?)
    })?;
    if c.num_key_value_heads == c.num_attention_heads {
        timed("wm_units", false, run, &mut || {
            let units = permute::builders::llama_units(c, a)?;
            let wm = weight_matching(&units, a, b, &opts)?;
            Ok(apply(&units, &wm.perm, b)?)
        })?;
    }
    timed("wm_folded", true, run, &mut || {
        let fb = permute::orthogonal::fold_rms_norms(c, b)?;
        let wm = weight_matching(&spec, folded_a, &fb, &opts)?;
        Ok(apply(&spec, &wm.perm, &fb)?)
    })?;
    timed("wm_orthogonal", true, run, &mut || {
        wm_orthogonal(c, &spec, folded_a, b, &opts)
    })?;
    Ok((out, passes))
}

/// Weight matching alternated with residual Procrustes on the norm-folded
/// models, for [`ORTHOGONAL_ROUNDS`] rounds or until ‖A − B‖ stops falling:
/// B folded, permuted and rotated.
fn wm_orthogonal(
    c: &LlamaConfig,
    spec: &PermutationSpec,
    folded_a: &StateDict,
    b: &StateDict,
    opts: &MatchOptions,
) -> anyhow::Result<StateDict> {
    use permute::orthogonal::{fold_rms_norms, residual_procrustes, rotate_residual};
    let mut cur = fold_rms_norms(c, b)?;
    let mut dist = f64::INFINITY;
    for _ in 0..ORTHOGONAL_ROUNDS {
        let wm = weight_matching(spec, folded_a, &cur, opts)?;
        let permuted = apply(spec, &wm.perm, &cur)?;
        let q = residual_procrustes(c, folded_a, &permuted)?;
        let next = rotate_residual(c, &permuted, q.view())?;
        let d = permute::matching::l2_distance(folded_a, &next);
        if d >= dist - 1e-9 * dist {
            break;
        }
        (cur, dist) = (next, d);
    }
    Ok(cur)
}

/// Runs `lmc --arch llama`; returns the report folder.
pub fn run(args: &LmcArgs) -> anyhow::Result<PathBuf> {
    let shape = Shape::of(args, None)?;
    for &w in &args.widths {
        Shape::of(args, Some(w))?;
    }
    let mut run = args.run.open("lmc")?;
    let dir = args.data_dir.clone().unwrap_or_else(default_text_dir);
    let corpus = run.phase("load data", || moby_dick(&dir))?;
    let pair = train_pair(shape, args.seed, [&corpus; 2], &mut run)?;
    let c = pair.config.clone();
    let sets = EvalSets::new(&corpus, &pair.shape);
    let test_of = |m: &StateDict| -> anyhow::Result<(f64, f64)> {
        let e = sets.test(&cpu_model(&c, m)?);
        Ok((e.loss, e.acc))
    };
    let endpoints = [test_of(&pair.a)?, test_of(&pair.b)?];
    let folded_a = permute::orthogonal::fold_rms_norms(&c, &pair.a)?;
    // Activation matching's and REPAIR's tokens: windows of the training text.
    let probe = held_out(1, args.seed ^ 0xAC7, |r| {
        Sample::text(&corpus.train, 2 * pair.shape.batch, pair.shape.seq, r)
    })
    .pop()
    .expect("one batch");
    let (aligned, wm_passes) = align(&pair, &folded_a, &probe, args.seed, &mut run)?;
    let mut metrics = Metrics {
        arch: "llama".to_string(),
        shape: pair.shape.clone(),
        endpoints,
        wm_passes,
        methods: IndexMap::new(),
        width_sweep: Vec::new(),
    };
    for m in &aligned {
        let a = if m.folded { &folded_a } else { &pair.a };
        // With --repair, weight matching's row is followed by its repaired twin.
        let repairs: &[bool] = match (m.name, args.repair) {
            ("wm", true) => &[false, true],
            _ => &[false],
        };
        for &repair in repairs {
            let row = method_row(
                (m, repair),
                (a, endpoints[1].0),
                (&c, &sets, &probe),
                args.grid,
                &mut run,
            )?;
            let name = if repair { "wm_repair" } else { m.name };
            metrics.methods.insert(name.into(), row);
            run.partial(&metrics)?;
        }
    }
    plots(&run, &metrics)?;
    if !args.widths.is_empty() {
        metrics.width_sweep = width_sweep(args, &corpus, &mut run)?;
    }
    let md = report(&metrics, &pair, args);
    run.finish(&metrics, &md)?;
    Ok(run.dir.clone())
}

/// One method's curve from `a` to its aligned B (repaired at every λ when
/// `repair`: the `wm_repair` row, whose statistics and corrections add to
/// WM's seconds), scored
/// on the training and test windows, with the change of B's held-out loss
/// (`b_test_loss`, unaligned) that the alignment alone makes.
fn method_row(
    (m, repair): (&Aligned, bool),
    (a, b_test_loss): (&StateDict, f64),
    (c, sets, probe): (&LlamaConfig, &EvalSets, &Sample),
    grid: usize,
    run: &mut Run,
) -> anyhow::Result<MethodRow> {
    let name = if repair { "wm_repair" } else { m.name };
    let (curve, secs) = run.phase(&format!("curve {name}"), || {
        let score = |sd: &StateDict| sets.score(c, sd);
        if !repair {
            let lerp = |l: f64| Ok(permute::interp::lerp(a, &m.b, l as f32)?);
            return Ok((curve_scored(grid, lerp, score)?, 0.0));
        }
        repaired_curve(grid, || repaired(c, a, &m.b, probe), score)
    })?;
    let l2 = permute::matching::l2_distance(a, &m.b);
    Ok(MethodRow::new(curve, l2, m.seconds + secs, b_test_loss))
}

/// `--widths`: a pair trained at each residual width, naive and head-aware
/// weight-matching barriers, the `barrier_vs_width` plot.
fn width_sweep(args: &LmcArgs, corpus: &Corpus, run: &mut Run) -> anyhow::Result<Vec<WidthRow>> {
    let mut rows = Vec::new();
    for &w in &args.widths {
        let p = train_pair(Shape::of(args, Some(w))?, args.seed, [corpus; 2], run)?;
        let sets = EvalSets::new(corpus, &p.shape);
        let spec = permute::builders::llama(&p.config, &p.a)?;
        let wm = run.phase(&format!("WM width {w}"), || {
            weight_matching(&spec, &p.a, &p.b, &args.matching())
        })?;
        let bp = apply(&spec, &wm.perm, &p.b)?;
        let barrier = |x: &StateDict| -> anyhow::Result<f64> {
            Ok(curve_scored(
                args.grid,
                |l| Ok(permute::interp::lerp(&p.a, x, l as f32)?),
                |sd| sets.score(&p.config, sd),
            )?
            .loss_barrier)
        };
        rows.push(WidthRow {
            width: w,
            naive_loss_barrier: barrier(&p.b)?,
            wm_loss_barrier: barrier(&bp)?,
        });
    }
    let pts = |f: fn(&WidthRow) -> f64| rows.iter().map(|r| (r.width as f64, f(r))).collect();
    line_chart(
        &run.dir.join("barrier_vs_width"),
        "Loss barrier vs residual width",
        "residual width",
        "loss barrier (nats/token)",
        &[
            Series::line("naive", pts(|r| r.naive_loss_barrier)),
            Series::line("wm", pts(|r| r.wm_loss_barrier)),
        ],
    )?;
    Ok(rows)
}

fn plots(run: &Run, m: &Metrics) -> anyhow::Result<()> {
    crate::studies::lmc::loss_plots(
        &run.dir,
        m.methods.iter().map(|(name, r)| (name.as_str(), &r.curve)),
        [
            "Training-text loss along the interpolation",
            "Held-out-text loss along the interpolation",
        ],
        "loss (nats/token)",
    )
}

/// Whether a barrier counts as closed: below 0.01 nats/token.
const CLOSED: f64 = 0.01;

/// Whether an alignment that takes the barrier from `before` to `after`
/// closes it, shrinks it, or does not lower it.
fn verdict(before: f64, after: f64) -> String {
    if after < CLOSED {
        format!("the barrier closes (below {CLOSED} nats/token)")
    } else if after < before {
        format!("the barrier shrinks but does not close (not below {CLOSED} nats/token)")
    } else {
        "it does not lower the barrier at all".to_string()
    }
}

fn report(m: &Metrics, pair: &TrainedPair, args: &LmcArgs) -> String {
    let s = &m.shape;
    let mut md = format!(
        "# Linear mode connectivity of two LLaMA-style decoders\n\n\
         Two character-level decoders (RoPE, RMSNorm, SwiGLU; width {}, {} blocks, {} query / {} key-value heads of {HEAD_DIM}, FFN {}) \
         trained {} steps each (AdamW, lr {LR}, batches {}×{}) on the vendored Moby-Dick text from seeds {} and {}; \
         final training loss {:.3} and {:.3}, held-out loss {:.3} and {:.3} nats/token (token accuracy {:.3} and {:.3}).\n\n\
         Barriers are of the training-text loss (nats/token) along (1 − λ)·A + λ·P·B; \
         `Δ loss of P·B` is how much the permutation alone changes B's held-out loss (0 for a symmetry).\n\n\
         | method | loss barrier | loss barrier (vs mean) | accuracy barrier | L2 to A | Δ loss of P·B | seconds |\n|---|---|---|---|---|---|---|\n",
        s.hidden,
        s.layers,
        s.heads,
        s.kv_heads,
        s.ffn,
        s.steps,
        s.batch,
        s.seq,
        2 * args.seed,
        2 * args.seed + 1,
        pair.final_loss[0],
        pair.final_loss[1],
        m.endpoints[0].0,
        m.endpoints[1].0,
        m.endpoints[0].1,
        m.endpoints[1].1,
    );
    for (name, r) in &m.methods {
        md.push_str(&format!(
            "| {name} | {:.4} | {:.4} | {:.4} | {:.3} | {:+.2e} | {:.2} |\n",
            r.curve.loss_barrier,
            r.curve.loss_barrier_mean,
            r.curve.acc_barrier,
            r.curve.l2,
            r.b_loss_change,
            r.curve.seconds
        ));
    }
    md.push_str(&findings(m));
    md.push_str("\n![train loss](loss_train.png)\n\n![test loss](loss_test.png)\n");
    if !m.width_sweep.is_empty() {
        md.push_str("\n| width | naive barrier | WM barrier |\n|---|---|---|\n");
        for r in &m.width_sweep {
            md.push_str(&format!(
                "| {} | {:.4} | {:.4} |\n",
                r.width, r.naive_loss_barrier, r.wm_loss_barrier
            ));
        }
        md.push_str("\n![barrier vs width](barrier_vs_width.png)\n");
    }
    md
}

/// What the table says, in sentences: does WM close the barrier, what
/// REPAIR, the unit-wise ablation and the orthogonal map do.
fn findings(m: &Metrics) -> String {
    let mut md = String::new();
    let (naive, wm) = (&m.methods["naive"], &m.methods["wm"]);
    // "x to y, z % of it: verdict" for a barrier before and after a method.
    let from_to = |before: f64, after: f64| {
        format!(
            "{before:.4} to {after:.4} nats/token, {:.0} % of it: {}",
            100.0 * after / before,
            verdict(before, after)
        )
    };
    md.push_str(&format!(
        "\nWeight matching over the head-aware spec takes the barrier from {}.\n",
        from_to(naive.curve.loss_barrier, wm.curve.loss_barrier)
    ));
    md.push_str(
        "Published work finds that permutations shrink the barrier of text transformers without closing it, and that wider symmetry classes (orthogonal maps of the residual stream) go further.\n",
    );
    if let Some(r) = m.methods.get("wm_repair") {
        md.push_str(&format!(
            "REPAIR on top of weight matching, by scale only (every RMSNorm output and FFN channel gets the endpoints' interpolated root mean square through the norm gains and up_proj's rows; a LLaMA has no biases to take REPAIR's shift), takes the WM barrier from {}.\n",
            from_to(wm.curve.loss_barrier, r.curve.loss_barrier)
        ));
    }
    if let Some(u) = m.methods.get("wm_units") {
        md.push_str(&format!(
            "The unit-wise spec moves units across heads and splits rotary pairs: it is not a symmetry, and the permutation alone changes B's held-out loss by {:+.3} nats/token (head-aware: {:+.1e}).\n",
            u.b_loss_change, wm.b_loss_change
        ));
    } else {
        md.push_str(
            "No unit-wise row: its spec needs multi-head attention (q and k rows differ in count under grouped-query attention).\n",
        );
    }
    let (folded, orth) = (&m.methods["wm_folded"], &m.methods["wm_orthogonal"]);
    md.push_str(&format!(
        "With the RMSNorm gains folded into the next weights (the same functions, other weights: `wm_folded` and `wm_orthogonal` interpolate the folded models, so their L2 is not comparable with the rows above), \
         weight matching leaves a barrier of {:.4}; alternating it with an orthogonal map of the residual stream (Procrustes, a wider symmetry class than permutations) brings it to {:.4} ({:.0} % of the folded WM barrier): {}.\n",
        folded.curve.loss_barrier,
        orth.curve.loss_barrier,
        100.0 * orth.curve.loss_barrier / folded.curve.loss_barrier,
        verdict(folded.curve.loss_barrier, orth.curve.loss_barrier)
    ));
    md
}

/// The configuration of a state dict this study trained: heads of
/// [`HEAD_DIM`], key/value heads from k_proj's rows.
pub fn config_of(sd: &StateDict) -> anyhow::Result<LlamaConfig> {
    let hidden = sd
        .get(weights::llama::names::EMBED)
        .map(|t| t.shape()[1])
        .ok_or_else(|| anyhow::anyhow!("not a LLaMA state dict: no embeddings"))?;
    if !hidden.is_multiple_of(HEAD_DIM) {
        bail!("width {hidden} is not a multiple of the head size {HEAD_DIM}");
    }
    let mut c = LlamaConfig::from_state_dict(sd, hidden / HEAD_DIM)?;
    let k = format!(
        "{}.self_attn.k_proj.weight",
        weights::llama::names::layer(0)
    );
    c.num_key_value_heads = sd
        .get(&k)
        .map_or(c.num_attention_heads, |t| t.shape()[0] / HEAD_DIM);
    c.check()?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Activation matching recovers a planted permutation of every symmetry
    /// of the head-aware spec (residual, FFN channels, key/value heads, query
    /// heads inside a group, v/o units inside a head): B's activations are
    /// A's, permuted, so the assignment is exact.
    #[test]
    fn activation_matching_recovers_planted_permutations_with_gqa() {
        for (heads, kv) in [(4, 2), (4, 4)] {
            let c = LlamaConfig::tiny(VOCAB, heads * HEAD_DIM, 2, heads, kv, 96);
            let a = s2ft_core::model::random_state_dict(&c, 3);
            let spec = permute::builders::llama(&c, &a).unwrap();
            let planted = spec.random(11);
            let b = apply(&spec, &planted, &a).unwrap();
            assert!(permute::matching::l2_distance(&a, &b) > 1.0);
            let text: Vec<u8> = (0..4000u32).map(|i| b'a' + (i * 7 % 26) as u8).collect();
            let probe = held_out(1, 5, |r| Sample::text(&text, 4, 32, r))
                .pop()
                .unwrap();
            let p = activation_matching(&c, &spec, (&a, &b), &probe).unwrap();
            let back = apply(&spec, &p, &b).unwrap();
            let d = permute::matching::l2_distance(&a, &back);
            assert!(d < 1e-5, "heads {heads} / kv {kv}: ‖A − P·B‖ = {d}");
        }
    }

    /// REPAIR of a LLaMA interpolation through the taps: after `at(λ)` every
    /// repaired channel (both norms' outputs and the FFN channels of each
    /// block, then the final norm) has the endpoints' interpolated root mean
    /// square on the probe — which holds only if the taps come in the order
    /// of the named layers — and no tensor is added (no biases).
    #[test]
    fn repair_gives_every_channel_the_interpolated_rms() {
        let c = LlamaConfig::tiny(VOCAB, 32, 2, 2, 2, 48);
        let a = s2ft_core::model::random_state_dict(&c, 1);
        let mut b = s2ft_core::model::random_state_dict(&c, 2);
        // Gains away from 1, so that the norms' outputs differ between models.
        let g = weights::llama::names::weight(1, weights::llama::names::INPUT_NORM);
        b.get_mut(&g).unwrap().data.mapv_inplace(|v| 1.7 * v);
        let text: Vec<u8> = (0..4000u32).map(|i| b'a' + (i * 7 % 26) as u8).collect();
        let probe = held_out(1, 5, |r| Sample::text(&text, 4, 32, r))
            .pop()
            .unwrap();
        let rep = repaired(&c, &a, &b, &probe).unwrap();
        let lambda = 0.4;
        let m = rep.at(lambda).unwrap();
        assert_eq!(m.len(), a.len(), "no tensor added");
        let [sa, sb] = rep.endpoint_stats();
        assert_eq!(sa.len(), 3 * 2 + 1);
        let got = repaired(&c, &m, &m, &probe).unwrap();
        for (l, now) in got.endpoint_stats()[0].iter().enumerate() {
            for ch in 0..now.len() {
                let want = (1.0 - lambda) * sa[l].std[ch] + lambda * sb[l].std[ch];
                assert!(
                    (now.std[ch] - want).abs() < 1e-3 * want.max(1.0),
                    "layer {l} channel {ch}: rms {} vs {want}",
                    now.std[ch]
                );
            }
        }
    }

    /// The configuration read back from a state dict is the one it was made with.
    #[test]
    fn config_of_reads_heads_of_sixteen_and_the_key_value_heads() {
        let c = LlamaConfig::tiny(VOCAB, 64, 2, 4, 2, 96);
        let sd = s2ft_core::model::random_state_dict(&c, 0);
        let got = config_of(&sd).unwrap();
        assert_eq!(
            (
                got.num_attention_heads,
                got.num_key_value_heads,
                got.head_dim
            ),
            (4, 2, 16)
        );
        let odd = s2ft_core::model::random_state_dict(&LlamaConfig::tiny(VOCAB, 40, 1, 5, 5, 8), 0);
        assert!(
            config_of(&odd)
                .unwrap_err()
                .to_string()
                .contains("head size 16")
        );
    }
}
