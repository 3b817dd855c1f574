//! A LLaMA-style decoder in Burn, loaded from and saved to a
//! [`weights::StateDict`] with Hugging Face names and layouts.
//!
//! Every linear map is a [`Proj`]: a weight `W` (PyTorch's `[out, in]`, so
//! `y = x·Wᵀ`) kept transposed in memory, frozen or trainable, plus optional trainable parts that
//! fine-tuning attaches — a LoRA pair, or an S²FT dense delta on a subset of
//! the weight's columns (input features) or rows (output features), applied
//! by index selection without permuting the frozen weight.

use burn::module::{Module, Param};
use burn::prelude::*;
use burn::tensor::activation::{silu, softmax};
use burn::tensor::{IndexingUpdateOp, TensorData};
use std::sync::{Arc, Mutex};
use weights::llama::names;

use weights::rng::{Rng, SplitMix64};
use weights::{StateDict, Tensor as WTensor};

use crate::config::LlamaConfig;
use crate::error::{Result, S2ftError};

/// Which axis of a weight an S²FT delta covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DeltaAxis {
    /// Input features (columns of `[out, in]`): o_proj by head, down_proj by channel.
    Cols,
    /// Output features (rows): v_proj by head, up_proj by channel.
    Rows,
}

/// A linear map `y = x·Wᵀ (+ S²FT delta) (+ LoRA)`.
///
/// `W` is stored transposed, `[in, out]` (Burn's `Linear` layout): Burn's
/// CPU backend copies a transposed matmul operand to a contiguous array on
/// every call, which for `x·Wᵀ` meant copying every weight at every forward
/// (a third of decoding time on SmolLM2-135M). [`Proj::weight`] gives `W`.
#[derive(Module, Debug)]
pub struct Proj<B: Backend> {
    /// `Wᵀ`, `[in, out]`, contiguous.
    pub weight_t: Param<Tensor<B, 2>>,
    /// LoRA `A`, `[r, in]`.
    pub lora_a: Option<Param<Tensor<B, 2>>>,
    /// LoRA `B`, `[out, r]`.
    pub lora_b: Option<Param<Tensor<B, 2>>>,
    /// LoRA scale `α/r`.
    #[module(skip)]
    pub lora_scale: f32,
    /// LoRA dropout on the adapter's input, active only when training (autodiff backends).
    #[module(skip)]
    pub lora_dropout: f64,
    /// Where the dropout masks come from: one seeded stream per fine-tune,
    /// shared by all of a model's projections (see [`DropoutStream`]).
    #[module(skip)]
    pub dropout_stream: Option<DropoutStream>,
    /// S²FT delta: `[out, |S|]` for columns, `[|S|, in]` for rows.
    pub delta: Option<Param<Tensor<B, 2>>>,
    /// The axis the delta covers.
    #[module(skip)]
    pub delta_axis: Option<DeltaAxis>,
    /// The selected indices `S` on that axis.
    #[module(skip)]
    pub delta_idx: Vec<usize>,
}

/// The random stream LoRA dropout draws its masks from.
///
/// One stream per fine-tune, seeded by it and shared (by reference) by every
/// projection of the model, so the masks depend only on the run's seed and on
/// the order of the forward passes — not on Burn's process-global generator,
/// which fine-tunes running side by side in one process would interleave.
#[derive(Clone, Debug)]
pub struct DropoutStream(Arc<Mutex<Rng>>);

impl DropoutStream {
    /// A stream seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        DropoutStream(Arc::new(Mutex::new(Rng::new(seed))))
    }

    /// Which entries of `shape` dropout keeps: each with probability `1-p`
    /// (one 32-bit uniform per entry, kept when below `(1-p)·2³²`).
    pub fn kept<const D: usize>(&self, shape: [usize; D], p: f64) -> TensorData {
        let n: usize = shape.iter().product();
        let threshold = ((1.0 - p) * 4_294_967_296.0).round() as u64;
        let mut rng = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let r = rng.next_u64();
            for half in [r & 0xffff_ffff, r >> 32] {
                if out.len() < n {
                    out.push(half < threshold);
                }
            }
        }
        TensorData::new(out, shape)
    }
}

fn index_tensor<B: Backend>(idx: &[usize], device: &B::Device) -> Tensor<B, 1, Int> {
    let v: Vec<i64> = idx.iter().map(|&i| i as i64).collect();
    Tensor::from_data(TensorData::new(v, [idx.len()]), device)
}

/// `t` copied into a contiguous tensor of the same shape.
fn contiguous<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, D> {
    let device = t.device();
    Tensor::from_data(t.into_data(), &device)
}

impl<B: Backend> Proj<B> {
    /// A frozen (or trainable) projection with weight `w` (`[out, in]`).
    pub fn new(w: Tensor<B, 2>, trainable: bool) -> Self {
        Self::from_transposed(contiguous(w.transpose()), trainable)
    }

    /// A projection from `Wᵀ` (`[in, out]`, contiguous).
    pub fn from_transposed(weight_t: Tensor<B, 2>, trainable: bool) -> Self {
        Proj {
            weight_t: Param::from_tensor(weight_t).set_require_grad(trainable),
            lora_a: None,
            lora_b: None,
            lora_scale: 0.0,
            lora_dropout: 0.0,
            dropout_stream: None,
            delta: None,
            delta_axis: None,
            delta_idx: Vec::new(),
        }
    }

    /// `[out, in]`.
    pub fn dims(&self) -> [usize; 2] {
        let [i, o] = self.weight_t.val().dims();
        [o, i]
    }

    /// The frozen weight `W`, `[out, in]` (a transposed view of [`Proj::weight_t`]).
    pub fn weight(&self) -> Tensor<B, 2> {
        self.weight_t.val().transpose()
    }

    /// Applies the map to `x` (`[n, in]` → `[n, out]`).
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let mut y = x.clone().matmul(self.weight_t.val());
        if let (Some(d), Some(axis)) = (&self.delta, self.delta_axis) {
            let idx = index_tensor::<B>(&self.delta_idx, &x.device());
            match axis {
                // Only the selected input features are kept for the delta's gradient.
                DeltaAxis::Cols => y = y + x.clone().select(1, idx).matmul(d.val().transpose()),
                DeltaAxis::Rows => {
                    let part = x.clone().matmul(d.val().transpose());
                    y = y.select_assign(1, idx, part, IndexingUpdateOp::Add);
                }
            }
        }
        if let (Some(a), Some(b)) = (&self.lora_a, &self.lora_b) {
            // PEFT's LoRA dropout: on the adapter path only, while training (as burn's Dropout).
            let p = self.lora_dropout;
            let xin = if p > 0.0 && B::ad_enabled(&x.device()) {
                let keep = 1.0 - p;
                // Kept entries as bools (a quarter of the bytes of a float
                // mask to carry to the device), then 1/(1-p) where kept.
                let kept: Tensor<B, 2, Bool> = match &self.dropout_stream {
                    Some(stream) => Tensor::from_data(stream.kept(x.dims(), p), &x.device()),
                    // Set by hand without a stream: Burn's own (process-global) generator.
                    None => x
                        .random_like(burn::tensor::Distribution::Bernoulli(keep))
                        .equal_elem(1.0),
                };
                x * kept.float().mul_scalar((1.0 / keep) as f32)
            } else {
                x
            };
            y = y + xin
                .matmul(a.val().transpose())
                .matmul(b.val().transpose())
                .mul_scalar(self.lora_scale);
        }
        y
    }

    /// `W` with the S²FT delta and LoRA folded in (what a fused checkpoint stores).
    pub fn merged_weight(&self) -> Tensor<B, 2> {
        let mut w = self.weight();
        let device = w.device();
        if let (Some(d), Some(axis)) = (&self.delta, self.delta_axis) {
            let idx = index_tensor::<B>(&self.delta_idx, &device);
            w = match axis {
                DeltaAxis::Cols => w.select_assign(1, idx, d.val(), IndexingUpdateOp::Add),
                DeltaAxis::Rows => w.select_assign(0, idx, d.val(), IndexingUpdateOp::Add),
            };
        }
        if let (Some(a), Some(b)) = (&self.lora_a, &self.lora_b) {
            w = w + b.val().matmul(a.val()).mul_scalar(self.lora_scale);
        }
        w
    }
}

/// RMSNorm with a learned scale.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// `[hidden]`.
    pub weight: Param<Tensor<B, 1>>,
    /// ε.
    #[module(skip)]
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    /// `x / √(mean(x²) + ε) · w` over the last axis.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let rms = x
            .clone()
            .powi_scalar(2)
            .mean_dim(D - 1)
            .add_scalar(self.eps)
            .sqrt();
        let w = self.weight.val().unsqueeze::<D>();
        x.div(rms).mul(w)
    }
}

/// Grouped-query self-attention with rotary embeddings.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// Query map.
    pub q_proj: Proj<B>,
    /// Key map.
    pub k_proj: Proj<B>,
    /// Value map.
    pub v_proj: Proj<B>,
    /// Output map.
    pub o_proj: Proj<B>,
}

/// The SwiGLU feed-forward network.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// Gate map.
    pub gate_proj: Proj<B>,
    /// Up map.
    pub up_proj: Proj<B>,
    /// Down map.
    pub down_proj: Proj<B>,
}

/// A sparse mixture of SwiGLU experts behind a top-k router (Mixtral,
/// Jiang et al. 2024; Hugging Face's `MixtralSparseMoeBlock`): for a token
/// `x`, `p = softmax(G·x)` over the experts, the `k` largest `p_e` are
/// renormalised to sum to one, and the output is `Σ_e p̂_e · expert_e(x)`
/// over those `k`. Expert `e` is an [`Mlp`] whose `gate_proj`, `up_proj` and
/// `down_proj` are Mixtral's `w1`, `w3` and `w2`.
#[derive(Module, Debug)]
pub struct SparseMoe<B: Backend> {
    /// The router `G`, `[experts, hidden]` (`block_sparse_moe.gate`).
    pub gate: Proj<B>,
    /// The experts.
    pub experts: Vec<Mlp<B>>,
    /// Experts per token.
    #[module(skip)]
    pub top_k: usize,
}

/// A block's feed-forward: the dense SwiGLU of LLaMA, or Mixtral's experts.
// One per block: the dense variant's three projections inline cost nothing
// worth a Box (which Burn's Module derive would also have to see through).
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum FeedForward<B: Backend> {
    /// `down(silu(gate(x)) · up(x))`.
    Dense(Mlp<B>),
    /// A top-k mixture of SwiGLU experts.
    Sparse(SparseMoe<B>),
}

impl<B: Backend> FeedForward<B> {
    /// The dense SwiGLU. Panics on a mixture-of-experts block: fine-tuning
    /// and selection, which need it, refuse MoE models before they get here
    /// ([`dense_only`]).
    pub fn dense(&self) -> &Mlp<B> {
        match self {
            FeedForward::Dense(m) => m,
            FeedForward::Sparse(_) => panic!("a mixture-of-experts block has no dense mlp"),
        }
    }

    /// Mutable [`FeedForward::dense`].
    pub fn dense_mut(&mut self) -> &mut Mlp<B> {
        match self {
            FeedForward::Dense(m) => m,
            FeedForward::Sparse(_) => panic!("a mixture-of-experts block has no dense mlp"),
        }
    }
}

/// One decoder block.
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    /// Pre-attention norm.
    pub input_layernorm: RmsNorm<B>,
    /// Attention.
    pub self_attn: Attention<B>,
    /// Pre-FFN norm.
    pub post_attention_layernorm: RmsNorm<B>,
    /// FFN.
    pub mlp: FeedForward<B>,
}

/// The decoder.
#[derive(Module, Debug)]
pub struct Llama<B: Backend> {
    /// `[vocab, hidden]`.
    pub embed_tokens: Param<Tensor<B, 2>>,
    /// Blocks.
    pub layers: Vec<Block<B>>,
    /// Final norm.
    pub norm: RmsNorm<B>,
    /// Untied LM head (`[vocab, hidden]`); `None` when tied to the embedding.
    pub lm_head: Option<Proj<B>>,
    /// Shape.
    #[module(skip)]
    pub config: LlamaConfig,
}

/// One block's linear-layer inputs, `[b·t, ·]` each.
pub struct LinearInputs<B: Backend> {
    /// The residual stream entering the block (before its first norm):
    /// transformers' `hidden_states[l]` for block `l`.
    pub residual: Tensor<B, 2>,
    /// Input of q, k and v (the normed residual stream).
    pub attn: Tensor<B, 2>,
    /// Input of o_proj (the attention context, `heads·head_dim` wide).
    pub o_proj: Tensor<B, 2>,
    /// Input of gate and up, or of the router and every expert (the normed
    /// residual stream after attention).
    pub mlp: Tensor<B, 2>,
    /// Input of down_proj (`silu(gate)·up`, `ffn` wide); `None` in a
    /// mixture-of-experts block, whose experts each have their own.
    pub down_proj: Option<Tensor<B, 2>>,
}

/// The HF name prefix of block `l`.
pub fn layer_prefix(l: usize) -> String {
    names::layer(l)
}

/// Every projection of a block with its HF suffix.
pub const PROJ_NAMES: [&str; 7] = names::PROJS;

impl<B: Backend> Block<B> {
    /// The projection called `name` (one of [`PROJ_NAMES`]; the `mlp.*`
    /// ones exist in dense blocks only).
    pub fn proj(&self, name: &str) -> &Proj<B> {
        match name {
            names::Q_PROJ => &self.self_attn.q_proj,
            names::K_PROJ => &self.self_attn.k_proj,
            names::V_PROJ => &self.self_attn.v_proj,
            names::O_PROJ => &self.self_attn.o_proj,
            names::GATE_PROJ => &self.mlp.dense().gate_proj,
            names::UP_PROJ => &self.mlp.dense().up_proj,
            names::DOWN_PROJ => &self.mlp.dense().down_proj,
            _ => panic!("unknown projection {name}"),
        }
    }

    /// Mutable access to the projection called `name`.
    pub fn proj_mut(&mut self, name: &str) -> &mut Proj<B> {
        match name {
            names::Q_PROJ => &mut self.self_attn.q_proj,
            names::K_PROJ => &mut self.self_attn.k_proj,
            names::V_PROJ => &mut self.self_attn.v_proj,
            names::O_PROJ => &mut self.self_attn.o_proj,
            names::GATE_PROJ => &mut self.mlp.dense_mut().gate_proj,
            names::UP_PROJ => &mut self.mlp.dense_mut().up_proj,
            names::DOWN_PROJ => &mut self.mlp.dense_mut().down_proj,
            _ => panic!("unknown projection {name}"),
        }
    }

    /// Every weight-bearing projection of the block with its Hugging Face
    /// name relative to the block (`self_attn.q_proj`, …, or for a
    /// mixture-of-experts block `block_sparse_moe.gate` and
    /// `block_sparse_moe.experts.{e}.w1/w2/w3`).
    pub fn named_projs(&self) -> Vec<(String, &Proj<B>)> {
        let mut out: Vec<(String, &Proj<B>)> = ATTN_NAMES
            .iter()
            .map(|n| (n.to_string(), self.proj(n)))
            .collect();
        match &self.mlp {
            FeedForward::Dense(m) => {
                out.push(("mlp.gate_proj".into(), &m.gate_proj));
                out.push(("mlp.up_proj".into(), &m.up_proj));
                out.push(("mlp.down_proj".into(), &m.down_proj));
            }
            FeedForward::Sparse(moe) => {
                out.push(("block_sparse_moe.gate".into(), &moe.gate));
                for (e, m) in moe.experts.iter().enumerate() {
                    let p = format!("block_sparse_moe.experts.{e}");
                    out.push((format!("{p}.w1"), &m.gate_proj));
                    out.push((format!("{p}.w2"), &m.down_proj));
                    out.push((format!("{p}.w3"), &m.up_proj));
                }
            }
        }
        out
    }

    /// [`Block::named_projs`], mutable.
    pub fn named_projs_mut(&mut self) -> Vec<&mut Proj<B>> {
        let Attention {
            q_proj,
            k_proj,
            v_proj,
            o_proj,
        } = &mut self.self_attn;
        let mut out = vec![q_proj, k_proj, v_proj, o_proj];
        match &mut self.mlp {
            FeedForward::Dense(m) => {
                out.extend([&mut m.gate_proj, &mut m.up_proj, &mut m.down_proj])
            }
            FeedForward::Sparse(moe) => {
                out.push(&mut moe.gate);
                for m in moe.experts.iter_mut() {
                    out.extend([&mut m.gate_proj, &mut m.down_proj, &mut m.up_proj]);
                }
            }
        }
        out
    }
}

/// The attention projections of a block, by Hugging Face name.
pub const ATTN_NAMES: [&str; 4] = [names::Q_PROJ, names::K_PROJ, names::V_PROJ, names::O_PROJ];

/// A 2-D `weights` tensor, transposed, as a contiguous Burn tensor.
fn to_burn_t<B: Backend>(t: &WTensor, device: &B::Device) -> Tensor<B, 2> {
    let sh = t.shape();
    let m = t
        .data
        .view()
        .into_dimensionality::<ndarray::Ix2>()
        .expect("2-D weight");
    let data: Vec<f32> = m.t().iter().copied().collect();
    Tensor::from_data(TensorData::new(data, [sh[1], sh[0]]), device)
}

fn to_burn<B: Backend, const D: usize>(t: &WTensor, device: &B::Device) -> Tensor<B, D> {
    let data = t
        .data
        .as_standard_layout()
        .iter()
        .copied()
        .collect::<Vec<f32>>();
    Tensor::from_data(TensorData::new(data, t.shape().to_vec()), device)
}

/// A Burn tensor's values as a `weights` tensor (f32).
pub fn to_weights<B: Backend, const D: usize>(t: Tensor<B, D>) -> WTensor {
    let shape = t.dims().to_vec();
    let data: Vec<f32> = t.into_data().convert::<f32>().into_vec().expect("f32 data");
    WTensor::f32(ndarray::ArrayD::from_shape_vec(shape, data).expect("shape"))
}

/// The rotary embedding of one forward pass, laid out as the projections
/// write their outputs: `cos`/`sin` per query row and head (`[b, t, heads, d]`,
/// materialised once and shared by every block) and the rotate-half map as a
/// `[d, d]` signed permutation. Every product of [`Rope::rotate`] then runs on
/// contiguous tensors of one shape: Burn's CPU backend walks a broadcast or
/// permuted operand element by element (its strided iterator was a quarter of
/// a training step's serial time), while a matmul by the permutation is a
/// small GEMM and exact (one non-zero term per output).
struct Rope<B: Backend> {
    /// Query heads' tables.
    q: (Tensor<B, 4>, Tensor<B, 4>),
    /// Key heads' tables.
    k: (Tensor<B, 4>, Tensor<B, 4>),
    /// `rotate_half` as a matrix: `x·R = cat(−x₂, x₁)`.
    half_turn: Tensor<B, 2>,
}

impl<B: Backend> Rope<B> {
    /// The tables for rows `b` at positions `pos(row, q)`, `q < t`.
    fn new(
        cfg: &LlamaConfig,
        b: usize,
        t: usize,
        pos: impl Fn(usize, usize) -> usize,
        device: &B::Device,
    ) -> Self {
        let d = cfg.head_dim;
        let half = d / 2;
        let freqs: Vec<f64> = (0..d)
            .map(|j| cfg.rope_theta.powf(-2.0 * (j % half) as f64 / d as f64))
            .collect();
        let table = |heads: usize| {
            let mut cos = Vec::with_capacity(b * t * heads * d);
            let mut sin = Vec::with_capacity(b * t * heads * d);
            for row in 0..b {
                for q in 0..t {
                    let p = pos(row, q) as f64;
                    let (c, s): (Vec<f32>, Vec<f32>) = freqs
                        .iter()
                        .map(|f| {
                            let a = p * f;
                            (a.cos() as f32, a.sin() as f32)
                        })
                        .unzip();
                    for _ in 0..heads {
                        cos.extend_from_slice(&c);
                        sin.extend_from_slice(&s);
                    }
                }
            }
            let shape = [b, t, heads, d];
            (
                Tensor::from_data(TensorData::new(cos, shape), device),
                Tensor::from_data(TensorData::new(sin, shape), device),
            )
        };
        let mut r = vec![0f32; d * d];
        for j in 0..half {
            r[(j + half) * d + j] = -1.0;
            r[j * d + j + half] = 1.0;
        }
        Rope {
            q: table(cfg.num_attention_heads),
            k: table(cfg.num_key_value_heads),
            half_turn: Tensor::from_data(TensorData::new(r, [d, d]), device),
        }
    }

    /// The rotated heads `[b, t, heads, d]` of a projection's output
    /// `y` (`[b·t, heads·d]`), with `tables` = `self.q` or `self.k`.
    fn rotate(&self, y: Tensor<B, 2>, tables: &(Tensor<B, 4>, Tensor<B, 4>)) -> Tensor<B, 4> {
        let [b, t, heads, d] = tables.0.dims();
        let rot = y
            .clone()
            .reshape([b * t * heads, d])
            .matmul(self.half_turn.clone())
            .reshape([b, t, heads, d]);
        y.reshape([b, t, heads, d]) * tables.0.clone() + rot * tables.1.clone()
    }
}

/// The keys and values of the positions a model has seen, per block
/// (`[b, kv_heads, 1, t, head_dim]`, after RoPE), so that decoding one more token
/// costs one position instead of the whole sequence.
///
/// Rows of different lengths decode together when their tokens are padded
/// on the left ([`Llama::forward_cached_padded`]): the cache then remembers,
/// per row, the cache slots holding padding, which no query attends to, and
/// shifts each row's positions so its real tokens sit where they would alone.
#[derive(Clone, Debug)]
pub struct KvCache<B: Backend> {
    layers: Vec<Option<(Tensor<B, 5>, Tensor<B, 5>)>>,
    len: usize,
    /// Per row, the padding slots `pad_at..pad_at + pads[i]` (empty: none).
    pads: Vec<usize>,
    pad_at: usize,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for a model of `layers` blocks.
    pub fn new(layers: usize) -> Self {
        KvCache {
            layers: vec![None; layers],
            len: 0,
            pads: Vec::new(),
            pad_at: 0,
        }
    }

    /// The position of cache slot `slot` in row `row`.
    fn position(&self, row: usize, slot: usize) -> usize {
        match self.pads.get(row) {
            Some(&p) if slot >= self.pad_at => slot.saturating_sub(p).max(self.pad_at),
            _ => slot,
        }
    }

    /// Whether slot `slot` of row `row` is padding.
    fn is_pad(&self, row: usize, slot: usize) -> bool {
        self.pads
            .get(row)
            .is_some_and(|&p| slot >= self.pad_at && slot < self.pad_at + p)
    }

    /// Positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The cache of a batch of one repeated `n` times (a shared prompt prefix).
    pub fn repeat(&self, n: usize) -> Self {
        KvCache {
            layers: self
                .layers
                .iter()
                .map(|kv| {
                    kv.as_ref()
                        .map(|(k, v)| (k.clone().repeat_dim(0, n), v.clone().repeat_dim(0, n)))
                })
                .collect(),
            len: self.len,
            pads: if self.pads.is_empty() {
                Vec::new()
            } else {
                self.pads.repeat(n)
            },
            pad_at: self.pad_at,
        }
    }
}

impl<B: Backend> Attention<B> {
    /// The heads' outputs concatenated, `[b·t, heads·head_dim]` (o_proj's input),
    /// for `x` at positions `start..start + t`; with a cache, the new keys and
    /// values are appended to it and the queries attend to all of them.
    fn context(
        &self,
        x: Tensor<B, 3>,
        cfg: &LlamaConfig,
        rope: &Rope<B>,
        mask: Option<&Tensor<B, 4, Bool>>,
        cache: Option<&mut Option<(Tensor<B, 5>, Tensor<B, 5>)>>,
    ) -> Tensor<B, 2> {
        let [b, t, hidden] = x.dims();
        let (h, kv, d) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        // GQA: query head j reads key/value head j / g. The queries are viewed
        // as [b, kv, g, t, d] and the keys and values as [b, kv, 1, t, d], so
        // the matmuls broadcast each key/value head over its g query heads
        // (no copies) and their outputs are [b, h, t, ·] in memory.
        let g = h / kv;
        let flat = x.reshape([b * t, hidden]);
        let q = rope
            .rotate(self.q_proj.forward(flat.clone()), &rope.q)
            .reshape([b, t, kv, g, d])
            .permute([0, 2, 3, 1, 4]);
        let per_kv_head = |y: Tensor<B, 4>| y.reshape([b, t, kv, 1, d]).permute([0, 2, 3, 1, 4]);
        let mut k = per_kv_head(rope.rotate(self.k_proj.forward(flat.clone()), &rope.k));
        let mut v = per_kv_head(self.v_proj.forward(flat).reshape([b, t, kv, d]));
        if let Some(slot) = cache {
            if let Some((pk, pv)) = slot.take() {
                k = Tensor::cat(vec![pk, k], 3);
                v = Tensor::cat(vec![pv, v], 3);
            }
            *slot = Some((k.clone(), v.clone()));
        }
        let total = k.dims()[3];
        let start = total - t;
        let scores = q
            .matmul(k.swap_dims(3, 4))
            .reshape([b, h, t, total])
            .div_scalar((d as f64).sqrt());
        let p = if let Some(m) = mask {
            // Padding slots and the future, per row (`[b, 1, t, total]`).
            softmax(
                scores.mask_fill(m.clone().expand([b, h, t, total]), -1.0e9),
                3,
            )
        } else if t == 1 {
            // One new position sees every cached one: nothing to mask.
            softmax(scores, 3)
        } else {
            // Burn's tril_mask is true *outside* the lower triangle: key j is in
            // the future of query i (at position start + i) when j > start + i.
            let mask = Tensor::<B, 2, Bool>::tril_mask([t, total], start as i64, &scores.device())
                .reshape([1, 1, t, total])
                .expand([b, h, t, total]);
            softmax(scores.mask_fill(mask, -1.0e9), 3)
        };
        p.reshape([b, kv, g, t, total])
            .matmul(v)
            .reshape([b, h, t, d])
            .swap_dims(1, 2)
            .reshape([b * t, h * d])
    }
}

impl<B: Backend> Mlp<B> {
    /// `silu(gate(x)) · up(x)`, `[n, ffn]` (down_proj's input), for `x` `[n, hidden]`.
    fn inner(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        silu(self.gate_proj.forward(x.clone())) * self.up_proj.forward(x)
    }

    /// `down(silu(gate(x)) · up(x))`, `[n, hidden]`.
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.down_proj.forward(self.inner(x))
    }
}

/// Per token, the experts a top-`k` router picks and their renormalised
/// weights: row `i` of `probs` (`[n, experts]`, each row a softmax) gives
/// the `k` experts of largest probability (ties to the lower index, as
/// `torch.topk` on CPU), in decreasing order: entry `i·k + j` of the result
/// is the `j`-th pick of token `i`.
pub fn top_k_experts(probs: &[f32], experts: usize, k: usize) -> Vec<usize> {
    let n = probs.len() / experts.max(1);
    let mut picks = Vec::with_capacity(n * k);
    let mut order: Vec<usize> = Vec::with_capacity(experts);
    for row in probs.chunks(experts) {
        order.clear();
        order.extend(0..experts);
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        picks.extend_from_slice(&order[..k]);
    }
    debug_assert_eq!(picks.len(), n * k);
    picks
}

impl<B: Backend> SparseMoe<B> {
    /// The router's probabilities `softmax(G·x)`, `[n, experts]`.
    pub fn router_probs(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        softmax(self.gate.forward(x), 1)
    }

    /// The mixture's output for `x` (`[n, hidden]` → `[n, hidden]`): each
    /// expert runs only on the tokens routed to it (chosen on the host, so
    /// the routing is exact and deterministic), weighted by its renormalised
    /// router probability (differentiable in the router).
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let [n, _] = x.dims();
        let (e_count, k) = (self.experts.len(), self.top_k);
        let device = x.device();
        let probs = self.router_probs(x.clone());
        let host: Vec<f32> = probs
            .clone()
            .into_data()
            .convert::<f32>()
            .into_vec()
            .expect("f32 router probabilities");
        let picks = top_k_experts(&host, e_count, k);
        // The picked probabilities, [n, k], and their per-token sums.
        let flat: Vec<usize> = picks
            .iter()
            .enumerate()
            .map(|(slot, &e)| (slot / k) * e_count + e)
            .collect();
        let picked = probs
            .reshape([n * e_count])
            .select(0, index_tensor::<B>(&flat, &device))
            .reshape([n, k]);
        let weights = picked.clone().div(picked.sum_dim(1)).reshape([n * k]);
        let mut out = x.zeros_like();
        for (e, expert) in self.experts.iter().enumerate() {
            let slots: Vec<usize> = (0..n * k).filter(|&s| picks[s] == e).collect();
            if slots.is_empty() {
                continue;
            }
            let rows: Vec<usize> = slots.iter().map(|s| s / k).collect();
            let rows_t = index_tensor::<B>(&rows, &device);
            let w = weights
                .clone()
                .select(0, index_tensor::<B>(&slots, &device))
                .reshape([rows.len(), 1]);
            let y = expert.forward(x.clone().select(0, rows_t.clone())) * w;
            out = out.select_assign(0, rows_t, y, IndexingUpdateOp::Add);
        }
        out
    }
}

impl<B: Backend> FeedForward<B> {
    /// The feed-forward's output and, for a dense block, down_proj's input
    /// (`x` `[n, hidden]`).
    fn forward_with_inner(&self, x: Tensor<B, 2>) -> (Tensor<B, 2>, Option<Tensor<B, 2>>) {
        match self {
            FeedForward::Dense(m) => {
                let inner = m.inner(x);
                (m.down_proj.forward(inner.clone()), Some(inner))
            }
            FeedForward::Sparse(moe) => (moe.forward(x), None),
        }
    }
}

impl<B: Backend> Llama<B> {
    /// Builds the model from a state dict with Hugging Face names; every weight
    /// is frozen unless `trainable`. Errors name a missing or misshapen weight.
    pub fn from_state_dict(
        config: &LlamaConfig,
        sd: &StateDict,
        trainable: bool,
        device: &B::Device,
    ) -> Result<Self> {
        config.check()?;
        let c = config;
        let (h, f, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
        let (q_out, kv_out) = (
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        let root = sd.scope("");
        let proj = |scope: &weights::Scope, name: &str, shape: [usize; 2]| -> Result<Proj<B>> {
            Ok(Proj::from_transposed(
                to_burn_t(scope.get_finite(name, &shape)?, device),
                trainable,
            ))
        };
        let norm = |scope: &weights::Scope, name: &str| -> Result<RmsNorm<B>> {
            Ok(RmsNorm {
                weight: Param::from_tensor(to_burn(scope.get_finite(name, &[h])?, device))
                    .set_require_grad(trainable),
                eps: c.rms_norm_eps,
            })
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let layer = sd.scope(&layer_prefix(l));
            let attn = layer.scope("self_attn");
            layers.push(Block {
                input_layernorm: norm(&layer, "input_layernorm.weight")?,
                self_attn: Attention {
                    q_proj: proj(&attn, "q_proj.weight", [q_out, h])?,
                    k_proj: proj(&attn, "k_proj.weight", [kv_out, h])?,
                    v_proj: proj(&attn, "v_proj.weight", [kv_out, h])?,
                    o_proj: proj(&attn, "o_proj.weight", [h, q_out])?,
                },
                post_attention_layernorm: norm(&layer, "post_attention_layernorm.weight")?,
                mlp: match c.moe {
                    None => {
                        let mlp = layer.scope("mlp");
                        FeedForward::Dense(Mlp {
                            gate_proj: proj(&mlp, "gate_proj.weight", [f, h])?,
                            up_proj: proj(&mlp, "up_proj.weight", [f, h])?,
                            down_proj: proj(&mlp, "down_proj.weight", [h, f])?,
                        })
                    }
                    Some(m) => FeedForward::Sparse(SparseMoe {
                        gate: proj(&root, &names::router(l), [m.num_local_experts, h])?,
                        experts: (0..m.num_local_experts)
                            .map(|e| {
                                Ok(Mlp {
                                    gate_proj: proj(&root, &names::expert(l, e, "w1"), [f, h])?,
                                    up_proj: proj(&root, &names::expert(l, e, "w3"), [f, h])?,
                                    down_proj: proj(&root, &names::expert(l, e, "w2"), [h, f])?,
                                })
                            })
                            .collect::<Result<Vec<_>>>()?,
                        top_k: m.num_experts_per_tok,
                    }),
                },
            });
        }
        // A tied head may still be stored (SmolLM2's GGUF has none, HF files sometimes do).
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(proj(&root, names::LM_HEAD, [v, h])?)
        };
        Ok(Llama {
            embed_tokens: Param::from_tensor(to_burn(
                root.get_finite(names::EMBED, &[v, h])?,
                device,
            ))
            .set_require_grad(trainable),
            layers,
            norm: norm(&root, names::NORM)?,
            lm_head,
            config: c.clone(),
        })
    }

    /// A randomly initialised model (N(0, 0.02²) weights, unit norms), seeded.
    pub fn random(config: &LlamaConfig, seed: u64, device: &B::Device) -> Result<Self> {
        Self::from_state_dict(config, &random_state_dict(config, seed), true, device)
    }

    /// The weights under Hugging Face names, with every S²FT delta and LoRA folded in.
    pub fn to_state_dict(&self) -> StateDict {
        let mut sd = StateDict::new();
        sd.insert(names::EMBED, to_weights(self.embed_tokens.val()));
        for (l, blk) in self.layers.iter().enumerate() {
            let p = layer_prefix(l);
            sd.insert(
                format!("{p}.input_layernorm.weight"),
                to_weights(blk.input_layernorm.weight.val()),
            );
            for (name, proj) in blk.named_projs() {
                sd.insert(
                    format!("{p}.{name}.weight"),
                    to_weights(proj.merged_weight()),
                );
            }
            sd.insert(
                format!("{p}.post_attention_layernorm.weight"),
                to_weights(blk.post_attention_layernorm.weight.val()),
            );
        }
        sd.insert(names::NORM, to_weights(self.norm.weight.val()));
        if let Some(head) = &self.lm_head {
            sd.insert(names::LM_HEAD, to_weights(head.merged_weight()));
        }
        sd
    }

    /// Hidden states after the final norm, `[b, t, hidden]`, for tokens `[b, t]`.
    pub fn hidden(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.norm.forward(self.residual_stream(tokens, None, None))
    }

    /// Per block, the inputs of o_proj (`[b·t, heads·head_dim]`) and of
    /// down_proj (`[b·t, ffn]`) on `tokens`: what activation-based selection
    /// scores. Panics on a mixture-of-experts model (no single down_proj;
    /// selection refuses such models first: [`dense_only`]).
    pub fn block_inputs(&self, tokens: Tensor<B, 2, Int>) -> Vec<(Tensor<B, 2>, Tensor<B, 2>)> {
        self.linear_inputs(tokens)
            .into_iter()
            .map(|l| {
                let down = l
                    .down_proj
                    .expect("a mixture-of-experts block has no single down_proj");
                (l.o_proj, down)
            })
            .collect()
    }

    /// Per block, the router probabilities of a mixture-of-experts model on
    /// `tokens`, `[b·t, experts]` (empty for a dense model): what routing
    /// statistics count.
    pub fn router_probs(&self, tokens: Tensor<B, 2, Int>) -> Vec<Tensor<B, 2>> {
        self.linear_inputs(tokens)
            .into_iter()
            .zip(&self.layers)
            .filter_map(|(inputs, blk)| match &blk.mlp {
                FeedForward::Sparse(moe) => Some(moe.router_probs(inputs.mlp)),
                FeedForward::Dense(_) => None,
            })
            .collect()
    }

    /// Per block, the inputs of every linear layer on `tokens`, `[b·t, ·]`.
    pub fn linear_inputs(&self, tokens: Tensor<B, 2, Int>) -> Vec<LinearInputs<B>> {
        let mut out = Vec::with_capacity(self.layers.len());
        self.residual_stream(tokens, Some(&mut out), None);
        out
    }

    /// Per linear weight (`model.layers.{l}.self_attn.q_proj.weight`, …), the
    /// Gram matrix `XᵀX` (`in × in`) of its inputs over every position of
    /// `sequences`, each run alone so that no padding is counted: what
    /// RegMean weighs a model's weights by. The LM head and embeddings get none.
    pub fn input_grams(&self, sequences: &[Vec<u32>]) -> StateDict {
        let device = self.embed_tokens.val().device();
        let mut acc: Vec<[Option<Tensor<B, 2>>; 4]> =
            (0..self.layers.len()).map(|_| Default::default()).collect();
        for seq in sequences.iter().filter(|s| !s.is_empty()) {
            let ids: Vec<i64> = seq.iter().map(|&i| i as i64).collect();
            let tokens =
                Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, seq.len()]), &device);
            for (l, inputs) in self.linear_inputs(tokens).into_iter().enumerate() {
                let xs = [
                    Some(inputs.attn),
                    Some(inputs.o_proj),
                    Some(inputs.mlp),
                    inputs.down_proj,
                ];
                for (slot, x) in acc[l].iter_mut().zip(xs) {
                    let Some(x) = x else { continue };
                    let g = x.clone().transpose().matmul(x);
                    *slot = Some(match slot.take() {
                        Some(s) => s + g,
                        None => g,
                    });
                }
            }
        }
        let mut sd = StateDict::new();
        for (l, grams) in acc.into_iter().enumerate() {
            let p = layer_prefix(l);
            let [attn, o, mlp, down] = grams;
            let named: [(&[&str], Option<Tensor<B, 2>>); 4] = [
                (
                    &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                    attn,
                ),
                (&["self_attn.o_proj"], o),
                (&["mlp.gate_proj", "mlp.up_proj"], mlp),
                (&["mlp.down_proj"], down),
            ];
            for (names, g) in named {
                let Some(g) = g else { continue };
                let w = to_weights(g);
                for n in names {
                    sd.insert(format!("{p}.{n}.weight"), w.clone());
                }
            }
        }
        sd
    }

    /// The residual stream after the last block (before the final norm) for
    /// tokens at positions `cache.len()..` (0 without a cache); when `collect`
    /// is given, each block's o_proj and down_proj inputs are pushed to it.
    fn residual_stream(
        &self,
        tokens: Tensor<B, 2, Int>,
        mut collect: Option<&mut Vec<LinearInputs<B>>>,
        mut cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        let [b, t] = tokens.dims();
        let h = self.config.hidden_size;
        let device = tokens.device();
        let mut x = self
            .embed_tokens
            .val()
            .select(0, tokens.reshape([b * t]))
            .reshape([b, t, h]);
        let start = cache.as_ref().map_or(0, |c| c.len);
        let padded = cache.as_ref().filter(|c| !c.pads.is_empty());
        let (rope, mask) = match padded {
            None => (
                Rope::new(&self.config, b, t, |_, q| start + q, &device),
                None,
            ),
            Some(c) => {
                // Per-row positions, and a mask of the padding slots and the future.
                let total = start + t;
                let mut m = Vec::with_capacity(b * t * total);
                for row in 0..b {
                    for q in 0..t {
                        m.extend((0..total).map(|k| k > start + q || c.is_pad(row, k)));
                    }
                }
                let mask =
                    Tensor::<B, 3, Bool>::from_data(TensorData::new(m, [b, t, total]), &device)
                        .reshape([b, 1, t, total]);
                (
                    Rope::new(
                        &self.config,
                        b,
                        t,
                        |row, q| c.position(row, start + q),
                        &device,
                    ),
                    Some(mask),
                )
            }
        };
        for (l, blk) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[l]);
            let residual_in = x.clone();
            let attn_in = blk.input_layernorm.forward(x.clone());
            let ctx =
                blk.self_attn
                    .context(attn_in.clone(), &self.config, &rope, mask.as_ref(), slot);
            x = x + blk.self_attn.o_proj.forward(ctx.clone()).reshape([b, t, h]);
            let mlp_in = blk
                .post_attention_layernorm
                .forward(x.clone())
                .reshape([b * t, h]);
            let (ffn, inner) = blk.mlp.forward_with_inner(mlp_in.clone());
            if let Some(out) = collect.as_deref_mut() {
                out.push(LinearInputs {
                    residual: residual_in.reshape([b * t, h]),
                    attn: attn_in.reshape([b * t, h]),
                    o_proj: ctx,
                    mlp: mlp_in,
                    down_proj: inner,
                });
            }
            x = x + ffn.reshape([b, t, h]);
        }
        if let Some(c) = cache {
            c.len += t;
        }
        x
    }

    /// The LM head on final hidden states `[n, hidden]` → logits `[n, vocab]`.
    pub fn head(&self, hidden: Tensor<B, 2>) -> Tensor<B, 2> {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            // Tied: (E·hᵀ)ᵀ, so only the small hidden states are transposed
            // (Burn's CPU matmul would copy a transposed [vocab, hidden] E).
            None => self
                .embed_tokens
                .val()
                .matmul(hidden.transpose())
                .transpose(),
        }
    }

    /// Next-token logits `[b, t, vocab]`.
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let x = self.hidden(tokens);
        let [b, t, h] = x.dims();
        self.head(x.reshape([b * t, h]))
            .reshape([b, t, self.config.vocab_size])
    }

    /// Feeds `tokens` (`[b, t]`, the positions after those `cache` holds),
    /// appends their keys and values to `cache`, and returns the logits of
    /// the last position, `[b, vocab]` (the head runs on that position only).
    pub fn forward_cached(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut KvCache<B>,
    ) -> Tensor<B, 2> {
        let [b, t] = tokens.dims();
        let x = self.residual_stream(tokens, None, Some(cache));
        let last = x.narrow(1, t - 1, 1).reshape([b, self.config.hidden_size]);
        self.head(self.norm.forward(last))
    }

    /// [`Llama::forward_cached`] returning the logits of every fed position,
    /// `[b, t, vocab]` (teacher forcing after a cached prompt).
    pub fn forward_cached_all(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut KvCache<B>,
    ) -> Tensor<B, 3> {
        let [b, t] = tokens.dims();
        let h = self.config.hidden_size;
        let x = self.residual_stream(tokens, None, Some(cache));
        self.head(self.norm.forward(x).reshape([b * t, h]))
            .reshape([b, t, self.config.vocab_size])
    }

    /// [`Llama::forward_cached`] for rows of different lengths, each padded
    /// on the left with `pads[row]` tokens (any ids): the padding is recorded
    /// in `cache`, never attended to, and each row's positions are shifted
    /// so that its logits are those of the row alone. Later calls on the same
    /// cache (one token per row) keep the rows apart the same way.
    pub fn forward_cached_padded(
        &self,
        tokens: Tensor<B, 2, Int>,
        pads: &[usize],
        cache: &mut KvCache<B>,
    ) -> Tensor<B, 2> {
        let [b, t] = tokens.dims();
        assert_eq!(pads.len(), b, "one pad count per row");
        assert!(
            pads.iter().all(|&p| p < t),
            "every row keeps at least one real token"
        );
        assert!(cache.pads.is_empty(), "a cache is padded once");
        if pads.iter().any(|&p| p > 0) {
            cache.pads = pads.to_vec();
            cache.pad_at = cache.len;
        }
        self.forward_cached(tokens, cache)
    }
}

/// `Ok` for a dense model; a named error for a mixture of experts, which
/// `what` (S²FT, LoRA, a selection strategy) does not support.
pub fn dense_only(config: &LlamaConfig, what: &str) -> Result<()> {
    match config.moe {
        None => Ok(()),
        Some(m) => Err(S2ftError::Config(format!(
            "{what} needs a dense model; this one is a mixture of {} experts per block",
            m.num_local_experts
        ))),
    }
}

/// A seeded random state dict of `config`'s shape (N(0, 0.02²) weights, unit
/// norms), the weights in [`LlamaConfig::weight_shapes`]'s order.
pub fn random_state_dict(config: &LlamaConfig, seed: u64) -> StateDict {
    let mut rng = SplitMix64::new(seed);
    let mut sd = StateDict::new();
    for (name, shape) in config.weight_shapes() {
        let data = if shape.len() == 1 {
            ndarray::ArrayD::ones(shape)
        } else {
            let n = shape.iter().product();
            let values: Vec<f32> = (0..n).map(|_| 0.02 * rng.normal() as f32).collect();
            ndarray::ArrayD::from_shape_vec(shape, values).expect("shape")
        };
        sd.insert(name, WTensor::f32(data));
    }
    sd
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Cpu;

    /// `Rope::rotate` (contiguous tables, rotate-half as a matmul) equals
    /// the textbook `x·cos + cat(−x₂, x₁)·sin` bit for bit, per row and head,
    /// with per-row positions as left-padded decoding has them.
    #[test]
    fn rope_rotate_is_rotate_half_exactly() {
        let c = LlamaConfig::tiny(40, 32, 2, 4, 2, 48);
        let (b, t, d) = (3, 5, c.head_dim);
        let heads = c.num_attention_heads;
        let pos = |row: usize, q: usize| 7 * row + 3 * q;
        let device = Default::default();
        let rope = Rope::<Cpu>::new(&c, b, t, pos, &device);
        let mut rng = SplitMix64::new(11);
        let x: Vec<f32> = (0..b * t * heads * d)
            .map(|_| (rng.uniform() * 8.0 - 4.0) as f32)
            .collect();
        let y =
            Tensor::<Cpu, 2>::from_data(TensorData::new(x.clone(), [b * t, heads * d]), &device);
        let got: Vec<f32> = rope.rotate(y, &rope.q).into_data().into_vec().unwrap();
        let half = d / 2;
        for row in 0..b {
            for q in 0..t {
                for h in 0..heads {
                    let at = ((row * t + q) * heads + h) * d;
                    for j in 0..d {
                        let freq = c.rope_theta.powf(-2.0 * (j % half) as f64 / d as f64);
                        let a = pos(row, q) as f64 * freq;
                        let rot = if j < half {
                            -x[at + j + half]
                        } else {
                            x[at + j - half]
                        };
                        let want = x[at + j] * a.cos() as f32 + rot * a.sin() as f32;
                        assert_eq!(
                            got[at + j].to_bits(),
                            want.to_bits(),
                            "row {row} pos {q} head {h} dim {j}"
                        );
                    }
                }
            }
        }
        assert_eq!(rope.k.0.dims(), [b, t, c.num_key_value_heads, d]);
    }
}
