//! The one description of a LLaMA-family decoder's shape, read from a
//! Hugging Face `config.json`, a GGUF header or a checkpoint's tensors, and
//! used by every crate (the Burn model in `s2ft-core`, the permutation specs
//! of `permute`, the studies). A Mixtral-style sparse mixture of experts is
//! the same decoder with [`LlamaConfig::moe`] set: every block's SwiGLU
//! feed-forward becomes `num_local_experts` SwiGLU experts behind a top-k router.

use serde_json::Value;

use crate::error::{Result, WeightsError};
use crate::{StateDict, TensorSource};

/// A LLaMA-style decoder's shape.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LlamaConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Residual width.
    pub hidden_size: usize,
    /// FFN width.
    pub intermediate_size: usize,
    /// Decoder blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA when fewer than the query heads).
    pub num_key_value_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// RoPE base θ.
    pub rope_theta: f64,
    /// RMSNorm ε.
    pub rms_norm_eps: f64,
    /// The LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Context length the model was trained for (`max_position_embeddings`;
    /// GGUF `context_length`), when known.
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    /// The sparse mixture-of-experts feed-forward of a Mixtral-style model
    /// (`num_local_experts`, `num_experts_per_tok` in `config.json`); `None`
    /// for a dense LLaMA.
    #[serde(default)]
    pub moe: Option<MoeShape>,
}

/// The feed-forward of a Mixtral-style decoder: `num_local_experts` SwiGLU
/// experts of width `intermediate_size`, of which each token uses the
/// `num_experts_per_tok` its router scores highest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MoeShape {
    /// Experts per block.
    pub num_local_experts: usize,
    /// Experts each token is routed to (top-k).
    pub num_experts_per_tok: usize,
}

/// RoPE's θ from a `config.json`: `rope_theta` (transformers 4) or
/// `rope_parameters.rope_theta` (transformers 5), 10⁴ when neither is given.
/// Scaled RoPE (`rope_type` other than `default`: linear, dynamic, YaRN,
/// llama3) is refused, since the model applies plain rotate-half RoPE.
fn rope_theta(v: &Value) -> Result<f64> {
    for key in ["rope_scaling", "rope_parameters"] {
        if let Some(t) = v
            .get(key)
            .and_then(|r| r.get("rope_type").or_else(|| r.get("type")))
            .and_then(Value::as_str)
            .filter(|t| *t != "default")
        {
            return Err(WeightsError::Config(format!(
                "'{key}' asks for '{t}' RoPE scaling, which is not supported (plain RoPE only)"
            )));
        }
    }
    let theta = v
        .get("rope_theta")
        .or_else(|| v.get("rope_parameters").and_then(|r| r.get("rope_theta")));
    match theta {
        None | Some(Value::Null) => Ok(10000.0),
        Some(t) => t
            .as_f64()
            .filter(|t| t.is_finite() && *t > 0.0)
            .ok_or_else(|| {
                WeightsError::Config(format!("rope_theta {t} is not a positive number"))
            }),
    }
}

/// Rewrites transformers 5's fused Mixtral layout, which mergekit 0.1.5
/// writes (`model.layers.{l}.mlp.gate.weight` `[E, H]`,
/// `mlp.experts.gate_up_proj` `[E, 2I, H]` with each expert's gate rows
/// before its up rows, `mlp.experts.down_proj` `[E, H, I]`), into the
/// per-expert names every Mixtral checkpoint on the Hub uses and
/// transformers 4 and 5 both load ([`names::router`], [`names::expert`]).
/// A dense checkpoint, or one already in per-expert names, is left as it is.
pub fn unfuse_experts(sd: &mut StateDict, cfg: &LlamaConfig) -> Result<()> {
    let Some(moe) = cfg.moe else { return Ok(()) };
    let (e_count, f, h) = (
        moe.num_local_experts,
        cfg.intermediate_size,
        cfg.hidden_size,
    );
    for l in 0..cfg.num_hidden_layers {
        let p = names::layer(l);
        if let Some(g) = sd.remove(&format!("{p}.mlp.gate.weight")) {
            sd.insert(names::router(l), g);
        }
        let bad = |name: &str, shape: &[usize], want: [usize; 3]| {
            WeightsError::Config(format!(
                "'{name}' has shape {shape:?}, a mixture of {e_count} experts of width {f} needs {want:?}"
            ))
        };
        let gu_name = format!("{p}.mlp.experts.gate_up_proj");
        if let Some(gu) = sd.remove(&gu_name) {
            let want = [e_count, 2 * f, h];
            if gu.shape() != want {
                return Err(bad(&gu_name, gu.shape(), want));
            }
            for e in 0..e_count {
                for (w, rows) in [("w1", 0..f), ("w3", f..2 * f)] {
                    let part = gu
                        .data
                        .slice(ndarray::s![e, rows, ..])
                        .to_owned()
                        .into_dyn();
                    sd.insert(names::expert(l, e, w), crate::Tensor::new(part, gu.dtype));
                }
            }
        }
        let down_name = format!("{p}.mlp.experts.down_proj");
        if let Some(down) = sd.remove(&down_name) {
            let want = [e_count, h, f];
            if down.shape() != want {
                return Err(bad(&down_name, down.shape(), want));
            }
            for e in 0..e_count {
                let part = down
                    .data
                    .slice(ndarray::s![e, .., ..])
                    .to_owned()
                    .into_dyn();
                sd.insert(
                    names::expert(l, e, "w2"),
                    crate::Tensor::new(part, down.dtype),
                );
            }
        }
    }
    Ok(())
}

/// The Hugging Face names of a decoder's weights: one place that spells them,
/// for every crate that reads or writes a LLaMA or Mixtral checkpoint.
pub mod names {
    /// The token embedding.
    pub const EMBED: &str = "model.embed_tokens.weight";
    /// The final norm.
    pub const NORM: &str = "model.norm.weight";
    /// The (untied) LM head.
    pub const LM_HEAD: &str = "lm_head.weight";

    /// The prefix of block `l`'s weights, `model.layers.{l}`.
    pub fn layer(l: usize) -> String {
        format!("model.layers.{l}")
    }

    /// The query projection inside a block.
    pub const Q_PROJ: &str = "self_attn.q_proj";
    /// The key projection inside a block.
    pub const K_PROJ: &str = "self_attn.k_proj";
    /// The value projection inside a block.
    pub const V_PROJ: &str = "self_attn.v_proj";
    /// The attention output projection inside a block.
    pub const O_PROJ: &str = "self_attn.o_proj";
    /// The FFN gate projection inside a block.
    pub const GATE_PROJ: &str = "mlp.gate_proj";
    /// The FFN up projection inside a block.
    pub const UP_PROJ: &str = "mlp.up_proj";
    /// The FFN down projection inside a block.
    pub const DOWN_PROJ: &str = "mlp.down_proj";
    /// Every projection of a block, attention first.
    pub const PROJS: [&str; 7] = [
        Q_PROJ, K_PROJ, V_PROJ, O_PROJ, GATE_PROJ, UP_PROJ, DOWN_PROJ,
    ];
    /// The norm before attention inside a block.
    pub const INPUT_NORM: &str = "input_layernorm";
    /// The norm before the FFN inside a block.
    pub const POST_ATTENTION_NORM: &str = "post_attention_layernorm";

    /// The weight of projection or norm `part` (one of the constants above)
    /// of block `l`: `model.layers.{l}.{part}.weight`.
    pub fn weight(l: usize, part: &str) -> String {
        format!("{}.{part}.weight", layer(l))
    }

    /// The bias of projection `part` of block `l` (q/k/v biases of Qwen-style models).
    pub fn bias(l: usize, part: &str) -> String {
        format!("{}.{part}.bias", layer(l))
    }

    /// The router of block `l` of a Mixtral model, `[experts, hidden]`.
    pub fn router(l: usize) -> String {
        format!("{}.block_sparse_moe.gate.weight", layer(l))
    }

    /// Expert `e`'s weight `w` of block `l` of a Mixtral model: `w1` is the
    /// gate projection (LLaMA's `gate_proj`), `w2` the down projection
    /// (`down_proj`), `w3` the up projection (`up_proj`).
    pub fn expert(l: usize, e: usize, w: &str) -> String {
        format!("{}.block_sparse_moe.experts.{e}.{w}.weight", layer(l))
    }

    /// Mixtral's expert weight for a LLaMA MLP projection (`gate_proj` →
    /// `w1`, `down_proj` → `w2`, `up_proj` → `w3`).
    pub fn expert_weight_of(mlp_proj: &str) -> Option<&'static str> {
        match mlp_proj {
            "gate_proj" => Some("w1"),
            "down_proj" => Some("w2"),
            "up_proj" => Some("w3"),
            _ => None,
        }
    }
}

impl LlamaConfig {
    /// A small config for tests and toy tasks.
    pub fn tiny(
        vocab_size: usize,
        hidden: usize,
        layers: usize,
        heads: usize,
        kv_heads: usize,
        ffn: usize,
    ) -> Self {
        LlamaConfig {
            vocab_size,
            hidden_size: hidden,
            intermediate_size: ffn,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim: hidden / heads,
            rope_theta: 10000.0,
            rms_norm_eps: 1e-6,
            tie_word_embeddings: false,
            max_position_embeddings: None,
            moe: None,
        }
    }

    /// This shape with a sparse mixture-of-experts feed-forward of `experts`
    /// experts, `per_token` of them per token (checked by [`LlamaConfig::check`]).
    pub fn with_experts(mut self, experts: usize, per_token: usize) -> Self {
        self.moe = Some(MoeShape {
            num_local_experts: experts,
            num_experts_per_tok: per_token,
        });
        self
    }

    /// Reads the fields of a Hugging Face `config.json` value.
    pub fn from_hf(v: &Value) -> Result<Self> {
        let int = |k: &str| {
            v.get(k)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .ok_or_else(|| {
                    WeightsError::Config(format!("'{k}' is missing or not a non-negative integer"))
                })
        };
        let heads = int("num_attention_heads")?;
        let hidden = int("hidden_size")?;
        let cfg = LlamaConfig {
            vocab_size: int("vocab_size")?,
            hidden_size: hidden,
            intermediate_size: int("intermediate_size")?,
            num_hidden_layers: int("num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: v
                .get("num_key_value_heads")
                .and_then(Value::as_u64)
                .map_or(heads, |x| x as usize),
            head_dim: v
                .get("head_dim")
                .and_then(Value::as_u64)
                .map_or(hidden / heads.max(1), |x| x as usize),
            rope_theta: rope_theta(v)?,
            rms_norm_eps: v
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            max_position_embeddings: v
                .get("max_position_embeddings")
                .and_then(Value::as_u64)
                .map(|x| x as usize),
            moe: match v.get("num_local_experts") {
                None | Some(Value::Null) => None,
                Some(_) => Some(MoeShape {
                    num_local_experts: int("num_local_experts")?,
                    num_experts_per_tok: v
                        .get("num_experts_per_tok")
                        .and_then(Value::as_u64)
                        .map_or(2, |x| x as usize),
                }),
            },
        };
        cfg.check()?;
        Ok(cfg)
    }

    /// From a GGUF file's metadata ([`crate::GgufModelConfig::to_llama`], checked).
    pub fn from_gguf(g: &crate::GgufFile) -> Result<Self> {
        let c = g.config().to_llama().ok_or_else(|| {
            WeightsError::Config(format!("{}: not a LLaMA-family GGUF", g.path().display()))
        })?;
        c.check()?;
        Ok(c)
    }

    /// The sizes of a checkpoint in Hugging Face LLaMA names with `heads`
    /// query heads (as many key/value heads, `hidden / heads` per head), the
    /// rest at [`LlamaConfig::tiny`]'s defaults: what a checkpoint without a
    /// `config.json` tells of its shape. A Mixtral checkpoint's experts are
    /// counted from their names (top-2 routing assumed: the shapes do not say).
    pub fn from_state_dict(sd: &StateDict, heads: usize) -> Result<Self> {
        let shape = |name: &str| {
            sd.get(name)
                .map(|t| t.shape().to_vec())
                .filter(|s| s.len() == 2)
                .ok_or_else(|| WeightsError::Config(format!("no 2-D weight '{name}'")))
        };
        let embed = shape(names::EMBED)?;
        let layers = (0..)
            .take_while(|&l| sd.contains(&format!("{}.input_layernorm.weight", names::layer(l))))
            .count();
        // A Mixtral checkpoint: experts counted by name, top-2 routing (Mixtral's default).
        let experts = (0..)
            .take_while(|&e| sd.contains(&names::expert(0, e, "w1")))
            .count();
        let ffn = if experts > 0 {
            shape(&names::expert(0, 0, "w1"))?[0]
        } else {
            shape("model.layers.0.mlp.gate_proj.weight")?[0]
        };
        if heads == 0 {
            return Err(WeightsError::Config("head counts must be positive".into()));
        }
        let mut c = LlamaConfig::tiny(embed[0], embed[1], layers, heads, heads, ffn);
        if experts > 0 {
            c = c.with_experts(experts, experts.min(2));
        }
        c.tie_word_embeddings = !sd.contains(names::LM_HEAD);
        c.check()?;
        Ok(c)
    }

    /// Checks the shape is consistent.
    pub fn check(&self) -> Result<()> {
        let e = |m: String| Err(WeightsError::Config(m));
        if self.num_attention_heads == 0 || self.num_key_value_heads == 0 {
            return e("head counts must be positive".into());
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return e(format!(
                "{} query heads are not a multiple of {} key/value heads",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return e(format!(
                "head_dim {} must be positive and even for rotary embeddings",
                self.head_dim
            ));
        }
        if self.vocab_size == 0 || self.hidden_size == 0 || self.intermediate_size == 0 {
            return e("vocab_size, hidden_size and intermediate_size must be positive".into());
        }
        if let Some(m) = self.moe {
            if m.num_local_experts == 0 {
                return e("num_local_experts must be positive".into());
            }
            if m.num_experts_per_tok == 0 || m.num_experts_per_tok > m.num_local_experts {
                return e(format!(
                    "num_experts_per_tok {} must be in 1..={} (num_local_experts)",
                    m.num_experts_per_tok, m.num_local_experts
                ));
            }
        }
        Ok(())
    }

    /// Every weight of a checkpoint of this shape with its `[out, in]` shape,
    /// in checkpoint order: the embedding; per block the input norm, q, k,
    /// v, o, the post-attention norm and the FFN (gate, up, down, or with
    /// [`LlamaConfig::moe`] the router and each expert's `w1`, `w2`, `w3`);
    /// the final norm; the LM head unless tied.
    pub fn weight_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, f) = (self.hidden_size, self.intermediate_size);
        let (q, kv) = (
            self.num_attention_heads * self.head_dim,
            self.num_key_value_heads * self.head_dim,
        );
        let mut v = vec![(names::EMBED.to_string(), vec![self.vocab_size, h])];
        for l in 0..self.num_hidden_layers {
            v.push((names::weight(l, names::INPUT_NORM), vec![h]));
            for (part, shape) in [
                (names::Q_PROJ, vec![q, h]),
                (names::K_PROJ, vec![kv, h]),
                (names::V_PROJ, vec![kv, h]),
                (names::O_PROJ, vec![h, q]),
            ] {
                v.push((names::weight(l, part), shape));
            }
            v.push((names::weight(l, names::POST_ATTENTION_NORM), vec![h]));
            match &self.moe {
                None => {
                    v.push((names::weight(l, names::GATE_PROJ), vec![f, h]));
                    v.push((names::weight(l, names::UP_PROJ), vec![f, h]));
                    v.push((names::weight(l, names::DOWN_PROJ), vec![h, f]));
                }
                Some(moe) => {
                    v.push((names::router(l), vec![moe.num_local_experts, h]));
                    for e in 0..moe.num_local_experts {
                        v.push((names::expert(l, e, "w1"), vec![f, h]));
                        v.push((names::expert(l, e, "w2"), vec![h, f]));
                        v.push((names::expert(l, e, "w3"), vec![f, h]));
                    }
                }
            }
        }
        v.push((names::NORM.to_string(), vec![h]));
        if !self.tie_word_embeddings {
            v.push((names::LM_HEAD.to_string(), vec![self.vocab_size, h]));
        }
        v
    }

    /// The Hugging Face `config.json` for this shape: `LlamaForCausalLM`, or
    /// `MixtralForCausalLM` with [`LlamaConfig::moe`] (no sliding window,
    /// router logits not output, transformers' default auxiliary-loss weight).
    pub fn to_hf(&self) -> Value {
        let mut v = self.to_hf_dense();
        if let Some(m) = self.moe {
            v["architectures"] = serde_json::json!(["MixtralForCausalLM"]);
            v["model_type"] = "mixtral".into();
            v["num_local_experts"] = m.num_local_experts.into();
            v["num_experts_per_tok"] = m.num_experts_per_tok.into();
            v["sliding_window"] = Value::Null;
            v["output_router_logits"] = false.into();
            v["router_aux_loss_coef"] = 0.001.into();
            v["router_jitter_noise"] = 0.0.into();
        }
        v
    }

    fn to_hf_dense(&self) -> Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A checkpoint laid out by `weight_shapes` reads back as the same shape
    /// (`from_state_dict`, which infers from names and shapes), dense and
    /// Mixtral, tied and untied; GQA shrinks k/v to the key/value heads.
    #[test]
    fn weight_shapes_read_back_as_the_same_config() {
        let dense = LlamaConfig::tiny(50, 24, 3, 4, 4, 40);
        let mut tied = dense.clone();
        tied.tie_word_embeddings = true;
        let mixtral = dense.clone().with_experts(4, 2);
        for c in [dense, tied, mixtral] {
            let mut sd = StateDict::new();
            for (name, shape) in c.weight_shapes() {
                sd.insert(name, crate::Tensor::f32(ndarray::ArrayD::zeros(shape)));
            }
            assert_eq!(LlamaConfig::from_state_dict(&sd, 4).unwrap(), c);
        }
        let gqa = LlamaConfig::tiny(50, 24, 2, 4, 2, 40).weight_shapes();
        let k = gqa
            .iter()
            .find(|(n, _)| n == &names::weight(1, names::K_PROJ));
        assert_eq!(k.unwrap().1, vec![12, 24]);
        assert_eq!(gqa.len(), 1 + 2 * 9 + 2);
    }

    #[test]
    fn a_mixtral_config_round_trips_and_is_checked() {
        let c = LlamaConfig::tiny(64, 16, 2, 4, 2, 32).with_experts(3, 2);
        let hf = c.to_hf();
        assert_eq!(hf["architectures"][0], "MixtralForCausalLM");
        assert_eq!(hf["model_type"], "mixtral");
        assert_eq!(hf["num_local_experts"], 3);
        assert_eq!(hf["num_experts_per_tok"], 2);
        assert_eq!(LlamaConfig::from_hf(&hf).unwrap(), c);
        // A dense config has no MoE fields and reads back dense.
        let d = LlamaConfig::tiny(64, 16, 2, 4, 2, 32);
        assert!(d.to_hf().get("num_local_experts").is_none());
        assert_eq!(LlamaConfig::from_hf(&d.to_hf()).unwrap().moe, None);
        // Routing to more experts than there are, or to none, is refused by name.
        for k in [0, 4] {
            let mut bad = c.to_hf();
            bad["num_experts_per_tok"] = k.into();
            let e = LlamaConfig::from_hf(&bad).unwrap_err().to_string();
            assert!(e.contains(&format!("num_experts_per_tok {k}")), "{e}");
        }
        let mut bad = c.to_hf();
        bad["num_local_experts"] = "four".into();
        let e = LlamaConfig::from_hf(&bad).unwrap_err().to_string();
        assert!(e.contains("num_local_experts"), "{e}");
    }

    #[test]
    fn names_spell_mixtral_experts_as_transformers_does() {
        assert_eq!(
            names::expert(3, 1, "w2"),
            "model.layers.3.block_sparse_moe.experts.1.w2.weight"
        );
        assert_eq!(
            names::router(0),
            "model.layers.0.block_sparse_moe.gate.weight"
        );
        assert_eq!(names::expert_weight_of("up_proj"), Some("w3"));
        assert_eq!(names::expert_weight_of("q_proj"), None);
    }
}
