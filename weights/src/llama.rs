//! The one description of a LLaMA-family decoder's shape, read from a
//! Hugging Face `config.json`, a GGUF header or a checkpoint's tensors, and
//! used by every crate (the Burn model in `s2ft-core`, the permutation specs
//! of `permute`, the studies).

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
        }
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
            rope_theta: v
                .get("rope_theta")
                .and_then(Value::as_f64)
                .unwrap_or(10000.0),
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
    /// `config.json` tells of its shape.
    pub fn from_state_dict(sd: &StateDict, heads: usize) -> Result<Self> {
        let shape = |name: &str| {
            sd.get(name)
                .map(|t| t.shape().to_vec())
                .filter(|s| s.len() == 2)
                .ok_or_else(|| WeightsError::Config(format!("no 2-D weight '{name}'")))
        };
        let embed = shape("model.embed_tokens.weight")?;
        let layers = (0..)
            .take_while(|l| sd.contains(&format!("model.layers.{l}.input_layernorm.weight")))
            .count();
        let ffn = shape("model.layers.0.mlp.gate_proj.weight")?[0];
        if heads == 0 {
            return Err(WeightsError::Config("head counts must be positive".into()));
        }
        let mut c = LlamaConfig::tiny(embed[0], embed[1], layers, heads, heads, ffn);
        c.tie_word_embeddings = !sd.contains("lm_head.weight");
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
        Ok(())
    }

    /// The Hugging Face `config.json` for this shape.
    pub fn to_hf(&self) -> Value {
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
