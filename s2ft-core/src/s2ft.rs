//! S²FT's coupled structures, selection strategies and the LoRA / full
//! fine-tuning baselines, all as ways of marking parts of a [`Llama`] trainable.
//!
//! S²FT (Yang et al., NeurIPS 2024) trains, per block, the **columns of
//! `o_proj`** that read a few selected attention heads (optionally the rows of
//! `v_proj` that write them) and the **columns of `down_proj`** that read a
//! few selected FFN channels (optionally the rows of `up_proj`); Q, K, gate
//! and everything else stay frozen. The trainable part is a dense delta of
//! the selected sub-block (`[hidden, |S|·head_dim]` for heads), applied by
//! index selection: the forward keeps only the selected input features for
//! the delta's gradient, frozen weights get no gradient, and the optimizer
//! holds state for the deltas alone. With GQA, heads are selected among the
//! query heads (o_proj's input blocks); `v_proj` rows are trained for the
//! key/value heads that serve a selected query head, so KV sharing is kept.

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::TensorData;

use crate::config::LlamaConfig;
use crate::error::{Result, S2ftError};
use crate::model::{DeltaAxis, DropoutStream, Llama};
use weights::rng::SplitMix64;

/// Mixed into a LoRA run's seed to seed its dropout stream (apart from `A`'s init).
const DROPOUT_SALT: u64 = 0x6c6f_7261_6472_6f70; // "loradrop"

/// How heads and channels are scored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Strategy {
    /// Uniformly at random (the paper's default).
    Random,
    /// Frobenius norm of the trained weight block (o_proj / down_proj columns).
    WeightNorm,
    /// Norm of the block's input activations on a calibration batch.
    ActivationNorm,
    /// Product of the two.
    WeightActivation,
    /// Norm of the loss gradient of the block on a calibration batch.
    GradientMagnitude,
}

/// Which end of the score order is selected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Order {
    /// Highest scores.
    Largest,
    /// Lowest scores (the paper finds smallest activations best).
    Smallest,
}

/// How the budget is spread over blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Allocation {
    /// The same number of heads/channels in every block.
    Uniform,
    /// The whole budget drawn across all blocks at once (random strategy) or
    /// by global score order (other strategies).
    Global,
}

/// An S²FT configuration.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct S2ftConfig {
    /// Fraction of query heads whose o_proj columns train (paper: 0.052 on LLaMA2-7B).
    pub heads_ratio: f64,
    /// Fraction of FFN channels whose down_proj columns train (paper: 0.02).
    pub channels_ratio: f64,
    /// Also train the v_proj rows of the selected heads' key/value heads.
    pub train_v: bool,
    /// Also train the up_proj rows of the selected channels.
    pub train_up: bool,
    /// Scoring.
    pub strategy: Strategy,
    /// Order.
    pub order: Order,
    /// Spread.
    pub allocation: Allocation,
    /// Seed of random selection.
    pub seed: u64,
}

impl Default for S2ftConfig {
    fn default() -> Self {
        S2ftConfig {
            heads_ratio: 0.052,
            channels_ratio: 0.02,
            train_v: false,
            train_up: false,
            strategy: Strategy::Random,
            order: Order::Smallest,
            allocation: Allocation::Uniform,
            seed: 0,
        }
    }
}

/// The selected query heads and FFN channels of every block.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Selection {
    /// Per block, sorted query-head indices.
    pub heads: Vec<Vec<usize>>,
    /// Per block, sorted channel indices.
    pub channels: Vec<Vec<usize>>,
}

/// Per-block scores of heads and channels (any strategy but random).
#[derive(Clone, Debug)]
pub struct Scores {
    /// `[layer][head]`.
    pub heads: Vec<Vec<f64>>,
    /// `[layer][channel]`.
    pub channels: Vec<Vec<f64>>,
}

fn count(ratio: f64, n: usize, what: &str) -> Result<usize> {
    if !(0.0..=1.0).contains(&ratio) || !ratio.is_finite() {
        return Err(S2ftError::Selection(format!(
            "{what} ratio {ratio} is outside [0, 1]"
        )));
    }
    let k = (ratio * n as f64).round() as usize;
    Ok(if ratio > 0.0 { k.max(1) } else { 0 })
}

fn pick(
    scores: Option<&[Vec<f64>]>,
    per_layer: usize,
    layers: usize,
    k_total: usize,
    cfg: &S2ftConfig,
    rng: &mut SplitMix64,
) -> Vec<Vec<usize>> {
    // (layer, unit, key): random keys when no scores.
    let mut all: Vec<(usize, usize, f64)> = Vec::with_capacity(layers * per_layer);
    for l in 0..layers {
        for u in 0..per_layer {
            let key = match scores {
                Some(s) => match cfg.order {
                    Order::Largest => -s[l][u],
                    Order::Smallest => s[l][u],
                },
                None => rng.uniform(),
            };
            all.push((l, u, key));
        }
    }
    let mut out = vec![Vec::new(); layers];
    match cfg.allocation {
        Allocation::Uniform => {
            let k = k_total / layers.max(1);
            for (l, o) in out.iter_mut().enumerate() {
                let mut row: Vec<&(usize, usize, f64)> = all.iter().filter(|x| x.0 == l).collect();
                row.sort_by(|a, b| a.2.total_cmp(&b.2).then(a.1.cmp(&b.1)));
                *o = row.iter().take(k).map(|x| x.1).collect();
            }
        }
        Allocation::Global => {
            all.sort_by(|a, b| a.2.total_cmp(&b.2).then(a.0.cmp(&b.0)).then(a.1.cmp(&b.1)));
            for x in all.iter().take(k_total) {
                out[x.0].push(x.1);
            }
        }
    }
    out.iter_mut().for_each(|v| v.sort_unstable());
    out
}

/// Selects heads and channels under `cfg` (`scores` is required for every
/// strategy but [`Strategy::Random`]; see [`weight_scores`], [`activation_scores`]).
pub fn select(c: &LlamaConfig, cfg: &S2ftConfig, scores: Option<&Scores>) -> Result<Selection> {
    crate::model::dense_only(c, "S²FT selection")?;
    let (l, h, f) = (
        c.num_hidden_layers,
        c.num_attention_heads,
        c.intermediate_size,
    );
    let kh = count(cfg.heads_ratio, h, "heads")?;
    let kc = count(cfg.channels_ratio, f, "channels")?;
    if kh > h || kc > f {
        return Err(S2ftError::Selection(format!(
            "budget of {kh} heads / {kc} channels per block exceeds the {h} heads / {f} channels available"
        )));
    }
    let scores = match (cfg.strategy, scores) {
        (Strategy::Random, _) => None,
        (_, Some(s)) => {
            if s.heads.len() != l
                || s.channels.len() != l
                || s.heads.iter().any(|x| x.len() != h)
                || s.channels.iter().any(|x| x.len() != f)
            {
                return Err(S2ftError::Selection(
                    "scores do not have the model's layer/head/channel counts".into(),
                ));
            }
            Some(s)
        }
        (s, None) => {
            return Err(S2ftError::Selection(format!(
                "strategy {s:?} needs scores from a calibration batch"
            )));
        }
    };
    let mut rng = SplitMix64::new(cfg.seed);
    Ok(Selection {
        heads: pick(
            scores.map(|s| s.heads.as_slice()),
            h,
            l,
            kh * l,
            cfg,
            &mut rng,
        ),
        channels: pick(
            scores.map(|s| s.channels.as_slice()),
            f,
            l,
            kc * l,
            cfg,
            &mut rng,
        ),
    })
}

fn col_norms<B: Backend>(w: Tensor<B, 2>) -> Vec<f64> {
    let v: Vec<f32> = w
        .powi_scalar(2)
        .sum_dim(0)
        .into_data()
        .convert::<f32>()
        .into_vec()
        .expect("f32");
    v.into_iter().map(|x| x as f64).collect()
}

fn group(v: &[f64], size: usize) -> Vec<f64> {
    v.chunks(size)
        .map(|c| c.iter().sum::<f64>().sqrt())
        .collect()
}

/// Weight-norm scores: per head, ‖o_proj[:, head]‖_F; per channel, ‖down_proj[:, c]‖.
pub fn weight_scores<B: Backend>(model: &Llama<B>) -> Scores {
    let d = model.config.head_dim;
    let mut s = Scores {
        heads: Vec::new(),
        channels: Vec::new(),
    };
    for blk in &model.layers {
        s.heads
            .push(group(&col_norms(blk.self_attn.o_proj.weight()), d));
        s.channels
            .push(group(&col_norms(blk.mlp.dense().down_proj.weight()), 1));
    }
    s
}

/// Activation-norm scores on `tokens`: per head, the norm of its attention
/// output (o_proj's input block); per channel, the norm of `silu(gate)·up`.
pub fn activation_scores<B: Backend>(model: &Llama<B>, tokens: Tensor<B, 2, Int>) -> Scores {
    let d = model.config.head_dim;
    let acts = model.block_inputs(tokens);
    Scores {
        heads: acts
            .iter()
            .map(|(o, _)| group(&col_norms(o.clone()), d))
            .collect(),
        channels: acts
            .iter()
            .map(|(_, dn)| group(&col_norms(dn.clone()), 1))
            .collect(),
    }
}

/// Weight × activation scores.
pub fn weight_activation_scores<B: Backend>(model: &Llama<B>, tokens: Tensor<B, 2, Int>) -> Scores {
    let (w, a) = (weight_scores(model), activation_scores(model, tokens));
    let mul = |x: &[Vec<f64>], y: &[Vec<f64>]| {
        x.iter()
            .zip(y)
            .map(|(p, q)| p.iter().zip(q).map(|(a, b)| a * b).collect())
            .collect()
    };
    Scores {
        heads: mul(&w.heads, &a.heads),
        channels: mul(&w.channels, &a.channels),
    }
}

/// Gradient-magnitude scores: the norm of the next-token loss gradient of each
/// head's o_proj columns and each channel's down_proj column on `tokens`.
pub fn gradient_scores<B: burn::tensor::backend::AutodiffBackend>(
    model: &Llama<B>,
    tokens: Tensor<B, 2, Int>,
) -> Scores {
    let d = model.config.head_dim;
    let loss = crate::train::lm_loss(model, tokens);
    let grads = loss.backward();
    let grad_norms = |p: &Param<Tensor<B, 2>>, size: usize| -> Vec<f64> {
        // The gradient of Wᵀ, transposed back to W's [out, in].
        let g = p
            .val()
            .grad(&grads)
            .expect("scores need a model built with trainable weights");
        group(&col_norms(g.transpose()), size)
    };
    Scores {
        heads: model
            .layers
            .iter()
            .map(|b| grad_norms(&b.self_attn.o_proj.weight_t, d))
            .collect(),
        channels: model
            .layers
            .iter()
            .map(|b| grad_norms(&b.mlp.dense().down_proj.weight_t, 1))
            .collect(),
    }
}

fn zeros<B: Backend>(shape: [usize; 2], device: &B::Device) -> Param<Tensor<B, 2>> {
    Param::from_tensor(Tensor::zeros(shape, device)).set_require_grad(true)
}

/// Freezes every weight of `model` and attaches zero S²FT deltas for `sel`.
pub fn apply_s2ft<B: Backend>(
    mut model: Llama<B>,
    sel: &Selection,
    cfg: &S2ftConfig,
) -> Result<Llama<B>> {
    let c = model.config.clone();
    crate::model::dense_only(&c, "S²FT")?;
    if sel.heads.len() != c.num_hidden_layers || sel.channels.len() != c.num_hidden_layers {
        return Err(S2ftError::Selection(format!(
            "selection has {} layers, the model {}",
            sel.heads.len(),
            c.num_hidden_layers
        )));
    }
    model = freeze(model);
    let (d, g) = (c.head_dim, c.num_attention_heads / c.num_key_value_heads);
    let device = model.embed_tokens.val().device();
    for (l, blk) in model.layers.iter_mut().enumerate() {
        let (heads, chans) = (&sel.heads[l], &sel.channels[l]);
        if let Some(&x) = heads.iter().find(|&&x| x >= c.num_attention_heads) {
            return Err(S2ftError::Selection(format!(
                "layer {l}: head {x} out of range (0..{})",
                c.num_attention_heads
            )));
        }
        if let Some(&x) = chans.iter().find(|&&x| x >= c.intermediate_size) {
            return Err(S2ftError::Selection(format!(
                "layer {l}: channel {x} out of range (0..{})",
                c.intermediate_size
            )));
        }
        if !heads.is_empty() {
            let cols: Vec<usize> = heads.iter().flat_map(|&h| h * d..(h + 1) * d).collect();
            let o = &mut blk.self_attn.o_proj;
            o.delta = Some(zeros([c.hidden_size, cols.len()], &device));
            o.delta_axis = Some(DeltaAxis::Cols);
            o.delta_idx = cols;
            if cfg.train_v {
                let mut kv: Vec<usize> = heads.iter().map(|h| h / g).collect();
                kv.dedup();
                let rows: Vec<usize> = kv.iter().flat_map(|&k| k * d..(k + 1) * d).collect();
                let v = &mut blk.self_attn.v_proj;
                v.delta = Some(zeros([rows.len(), c.hidden_size], &device));
                v.delta_axis = Some(DeltaAxis::Rows);
                v.delta_idx = rows;
            }
        }
        if !chans.is_empty() {
            let dn = &mut blk.mlp.dense_mut().down_proj;
            dn.delta = Some(zeros([c.hidden_size, chans.len()], &device));
            dn.delta_axis = Some(DeltaAxis::Cols);
            dn.delta_idx = chans.clone();
            if cfg.train_up {
                let up = &mut blk.mlp.dense_mut().up_proj;
                up.delta = Some(zeros([chans.len(), c.hidden_size], &device));
                up.delta_axis = Some(DeltaAxis::Rows);
                up.delta_idx = chans.clone();
            }
        }
    }
    Ok(model)
}

/// Marks every weight of `model` frozen (no gradient, no optimizer state).
pub fn freeze<B: Backend>(mut model: Llama<B>) -> Llama<B> {
    let f = |p: Param<Tensor<B, 2>>| p.set_require_grad(false);
    let f1 = |p: Param<Tensor<B, 1>>| p.set_require_grad(false);
    model.embed_tokens = f(model.embed_tokens);
    model.norm.weight = f1(model.norm.weight);
    if let Some(h) = model.lm_head.as_mut() {
        h.weight_t = f(h.weight_t.clone());
    }
    for blk in model.layers.iter_mut() {
        blk.input_layernorm.weight = f1(blk.input_layernorm.weight.clone());
        blk.post_attention_layernorm.weight = f1(blk.post_attention_layernorm.weight.clone());
        for p in blk.named_projs_mut() {
            p.weight_t = f(p.weight_t.clone());
        }
    }
    model
}

/// LoRA (Hu et al. 2022) of rank `r` and scale `alpha / r` on the projections
/// named by `targets` (suffixes such as `q_proj`), PEFT's initialisation:
/// `A` Kaiming-uniform (bound `1/√in`), `B` zero. Everything else frozen.
pub fn apply_lora<B: Backend>(
    model: Llama<B>,
    r: usize,
    alpha: f64,
    targets: &[&str],
    seed: u64,
) -> Result<Llama<B>> {
    apply_lora_with_dropout(model, r, alpha, 0.0, targets, seed)
}

/// [`apply_lora`] with LoRA dropout `dropout` on the adapter's input (training only).
pub fn apply_lora_with_dropout<B: Backend>(
    model: Llama<B>,
    r: usize,
    alpha: f64,
    dropout: f64,
    targets: &[&str],
    seed: u64,
) -> Result<Llama<B>> {
    if !(0.0..1.0).contains(&dropout) {
        return Err(S2ftError::Selection(format!(
            "LoRA dropout {dropout} is outside [0, 1)"
        )));
    }
    crate::model::dense_only(&model.config, "LoRA")?;
    if r == 0 {
        return Err(S2ftError::Selection("LoRA rank must be at least 1".into()));
    }
    for t in targets {
        if !crate::model::PROJ_NAMES.iter().any(|n| n.ends_with(t)) {
            return Err(S2ftError::Selection(format!(
                "LoRA target '{t}' is not a projection of this model"
            )));
        }
    }
    let mut model = freeze(model);
    let device = model.embed_tokens.val().device();
    let mut rng = SplitMix64::new(seed);
    // The dropout masks' own stream, seeded from the run's seed.
    let stream = (dropout > 0.0)
        .then(|| DropoutStream::new(SplitMix64::new(seed ^ DROPOUT_SALT).next_u64()));
    for blk in model.layers.iter_mut() {
        for name in crate::model::PROJ_NAMES {
            if !targets.iter().any(|t| name.ends_with(t)) {
                continue;
            }
            let p = blk.proj_mut(name);
            let [out, inp] = p.dims();
            if r > out.min(inp) {
                return Err(S2ftError::Selection(format!(
                    "LoRA rank {r} exceeds {name}'s smaller side {}",
                    out.min(inp)
                )));
            }
            let bound = 1.0 / (inp as f64).sqrt();
            let a: Vec<f32> = (0..r * inp)
                .map(|_| ((2.0 * rng.uniform() - 1.0) * bound) as f32)
                .collect();
            p.lora_a = Some(
                Param::from_tensor(Tensor::from_data(TensorData::new(a, [r, inp]), &device))
                    .set_require_grad(true),
            );
            p.lora_b = Some(zeros([out, r], &device));
            p.lora_scale = (alpha / r as f64) as f32;
            p.lora_dropout = dropout;
            p.dropout_stream = stream.clone();
        }
    }
    Ok(model)
}

/// Trainable parameters of an S²FT selection: per block `hidden·|S|·head_dim`
/// (o_proj columns) `+ hidden·|C|` (down_proj columns), plus
/// `|KV(S)|·head_dim·hidden` with `train_v` and `|C|·hidden` with `train_up`.
pub fn s2ft_param_count(c: &LlamaConfig, sel: &Selection, cfg: &S2ftConfig) -> usize {
    let g = c.num_attention_heads / c.num_key_value_heads;
    sel.heads
        .iter()
        .zip(&sel.channels)
        .map(|(h, ch)| {
            let mut n = c.hidden_size * h.len() * c.head_dim + c.hidden_size * ch.len();
            if cfg.train_v {
                let mut kv: Vec<usize> = h.iter().map(|x| x / g).collect();
                kv.dedup();
                n += kv.len() * c.head_dim * c.hidden_size;
            }
            if cfg.train_up {
                n += ch.len() * c.hidden_size;
            }
            n
        })
        .sum()
}

/// LoRA on every projection of a block (PEFT's "all-linear" minus the head):
/// the targets of the real-model fine-tunes and their speed measurements.
pub const LORA_TARGETS_ALL: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Trainable parameters of LoRA: `r·(in + out)` per targeted projection per block.
pub fn lora_param_count(c: &LlamaConfig, r: usize, targets: &[&str]) -> usize {
    let (h, f) = (c.hidden_size, c.intermediate_size);
    let (q, kv) = (
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
    );
    let dims = |name: &str| match name {
        "self_attn.q_proj" => (h, q),
        "self_attn.k_proj" | "self_attn.v_proj" => (h, kv),
        "self_attn.o_proj" => (q, h),
        "mlp.gate_proj" | "mlp.up_proj" => (h, f),
        _ => (f, h),
    };
    crate::model::PROJ_NAMES
        .iter()
        .filter(|n| targets.iter().any(|t| n.ends_with(t)))
        .map(|n| {
            let (i, o) = dims(n);
            r * (i + o)
        })
        .sum::<usize>()
        * c.num_hidden_layers
}

/// The S²FT ratios whose trainable parameters match `params` (e.g. a LoRA's),
/// split between heads and channels in the proportion of `heads_share`
/// (fraction of the budget spent on o_proj columns), uniform allocation.
pub fn ratios_for_budget(c: &LlamaConfig, params: usize, heads_share: f64) -> (f64, f64) {
    let per_head = (c.hidden_size * c.head_dim * c.num_hidden_layers) as f64;
    let per_chan = (c.hidden_size * c.num_hidden_layers) as f64;
    let heads = (params as f64 * heads_share / per_head).floor();
    let chans = ((params as f64 - heads * per_head) / per_chan).floor();
    (
        (heads / c.num_attention_heads as f64).min(1.0),
        (chans / c.intermediate_size as f64).min(1.0),
    )
}

/// Trainable parameters of `model`: the weights marked trainable plus every
/// S²FT delta and LoRA factor (counted from the module, not from a formula).
pub fn trainable_params<B: Backend>(model: &Llama<B>) -> usize {
    let n2 = |p: &Param<Tensor<B, 2>>| {
        if p.val().is_require_grad() {
            p.val().shape().num_elements()
        } else {
            0
        }
    };
    let n1 = |p: &Param<Tensor<B, 1>>| {
        if p.val().is_require_grad() {
            p.val().shape().num_elements()
        } else {
            0
        }
    };
    let proj = |p: &crate::model::Proj<B>| {
        n2(&p.weight_t)
            + p.delta
                .as_ref()
                .map_or(0, |d| d.val().shape().num_elements())
            + p.lora_a
                .as_ref()
                .map_or(0, |a| a.val().shape().num_elements())
            + p.lora_b
                .as_ref()
                .map_or(0, |b| b.val().shape().num_elements())
    };
    let mut n =
        n2(&model.embed_tokens) + n1(&model.norm.weight) + model.lm_head.as_ref().map_or(0, proj);
    for blk in &model.layers {
        n += n1(&blk.input_layernorm.weight) + n1(&blk.post_attention_layernorm.weight);
        n += crate::model::PROJ_NAMES
            .iter()
            .map(|name| proj(blk.proj(name)))
            .sum::<usize>();
    }
    n
}

/// Co-permutation: physically reorders every block of a state dict so the
/// selected FFN channels come first (gate/up rows, down columns) and the
/// selected heads come first (q rows and o columns by query head, k/v rows by
/// key/value head), returning the permuted weights and the selection in the
/// new positions. The function is unchanged: the reordering is a value of
/// `permute`'s LLaMA spec ([`permute::builders::llama`]), applied by
/// [`permute::apply`]. With GQA a query head cannot leave its key/value
/// group, so key/value groups holding selected heads move first and selected
/// heads lead within each group: the selection is contiguous when it fills
/// whole groups (always with one query head per group).
pub fn co_permute(
    c: &LlamaConfig,
    sd: &weights::StateDict,
    sel: &Selection,
) -> Result<(weights::StateDict, Selection)> {
    let (h, kv, f) = (
        c.num_attention_heads,
        c.num_key_value_heads,
        c.intermediate_size,
    );
    let g = h / kv;
    if sel.heads.len() != c.num_hidden_layers || sel.channels.len() != c.num_hidden_layers {
        return Err(S2ftError::Selection(
            "selection and model have different layer counts".into(),
        ));
    }
    // A missing or misshapen weight is named by permute's error.
    let spec_err = |e: permute::PermuteError| match e {
        permute::PermuteError::MissingWeight { weight, .. } => S2ftError::Weight {
            name: weight,
            msg: "missing".into(),
        },
        permute::PermuteError::GroupSize { ref weight, .. }
        | permute::PermuteError::ShapeMismatch { ref weight, .. } => S2ftError::Weight {
            name: weight.clone(),
            msg: e.to_string(),
        },
        e => S2ftError::Selection(format!("co-permutation: {e}")),
    };
    let spec = permute::builders::llama(c, sd).map_err(spec_err)?;
    let mut perm = spec.identity();
    let mut new_sel = Selection {
        heads: Vec::new(),
        channels: Vec::new(),
    };
    for l in 0..c.num_hidden_layers {
        let (heads, chans) = (&sel.heads[l], &sel.channels[l]);
        if heads.iter().any(|&x| x >= h) || chans.iter().any(|&x| x >= f) {
            return Err(S2ftError::Selection(format!(
                "layer {l}: selection out of range"
            )));
        }
        let has = |k: usize| (k * g..(k + 1) * g).any(|q| heads.contains(&q));
        let kv_order: Vec<usize> = (0..kv)
            .filter(|&k| has(k))
            .chain((0..kv).filter(|&k| !has(k)))
            .collect();
        // Within each key/value group (in its new place), the selected query heads first.
        let copies: Vec<Vec<usize>> = kv_order
            .iter()
            .map(|&k| {
                let (s, u): (Vec<usize>, Vec<usize>) =
                    (0..g).partition(|&r| heads.contains(&(k * g + r)));
                s.into_iter().chain(u).collect()
            })
            .collect();
        let q_order: Vec<usize> = kv_order
            .iter()
            .zip(&copies)
            .flat_map(|(&k, order)| order.iter().map(move |&r| k * g + r))
            .collect();
        let heads_value = perm
            .get_mut(&permute::builders::llama_heads_group(l))
            .expect("the spec has every layer's heads");
        heads_value.outer = kv_order;
        if g > 1 {
            heads_value.copies = copies;
        }
        perm.get_mut(&permute::builders::llama_ffn_group(l))
            .expect("the spec has every layer's FFN")
            .outer = chans
            .iter()
            .copied()
            .chain((0..f).filter(|x| !chans.contains(x)))
            .collect();
        let mut nh: Vec<usize> = (0..h).filter(|&j| heads.contains(&q_order[j])).collect();
        nh.sort_unstable();
        new_sel.heads.push(nh);
        new_sel.channels.push((0..chans.len()).collect());
    }
    let out = permute::apply(&spec, &perm, sd).map_err(spec_err)?;
    Ok((out, new_sel))
}
