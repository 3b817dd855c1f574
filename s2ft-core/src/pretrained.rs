//! Pretrained LLaMA-family decoders in and out: a Hugging Face folder
//! (`config.json`, single or sharded safetensors, `tokenizer.json`) or a GGUF
//! file (hyper-parameters, tensors and tokenizer from the one file), and the
//! Hugging Face folder a fine-tune is saved as, which `transformers` loads.

use std::path::{Path, PathBuf};

use serde_json::Value;
use weights::{Checkpoint, GgufFile, StateDict, TensorSource};

use crate::config::LlamaConfig;
use crate::error::{Result, S2ftError};
use crate::tokenizer::Tokenizer;

/// A pretrained model: its shape, weights (Hugging Face names, `f32`) and tokenizer.
#[derive(Debug)]
pub struct Pretrained {
    /// Where it was read from.
    pub path: PathBuf,
    /// Its shape.
    pub config: LlamaConfig,
    /// Its weights.
    pub weights: StateDict,
    /// Its tokenizer and chat template.
    pub tokenizer: Tokenizer,
}

/// Architectures whose Hugging Face checkpoints are plain LLaMA decoders
/// (RMSNorm, rotate-half RoPE, SwiGLU, no biases), which [`crate::Llama`]
/// runs; Mixtral is the same decoder with a mixture of SwiGLU experts.
const LLAMA_FAMILY: [&str; 3] = [
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "MixtralForCausalLM",
];

fn config_error(path: &Path, msg: impl std::fmt::Display) -> S2ftError {
    S2ftError::Config(format!("{}: {msg}", path.display()))
}

/// Reads a Hugging Face `config.json` and checks it describes a LLaMA-family decoder.
pub fn read_hf_config(path: &Path) -> Result<LlamaConfig> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| S2ftError::Weights(weights::WeightsError::io(path, e)))?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| config_error(path, format!("not JSON: {e}")))?;
    let archs: Vec<&str> = v
        .get("architectures")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
    let known = archs.iter().any(|a| LLAMA_FAMILY.contains(a))
        || (archs.is_empty() && matches!(model_type, "llama" | "mistral" | "mixtral"));
    if !known {
        return Err(config_error(
            path,
            format!(
                "not a LLaMA-family decoder (architectures {archs:?}, model_type '{model_type}'; \
                 supported: {LLAMA_FAMILY:?})"
            ),
        ));
    }
    if v.get("sliding_window").and_then(Value::as_u64).is_some()
        && matches!(model_type, "mistral" | "mixtral")
    {
        return Err(config_error(
            path,
            "sliding-window attention is not supported",
        ));
    }
    LlamaConfig::from_hf(&v).map_err(|e| config_error(path, e))
}

impl Pretrained {
    /// Loads a Hugging Face folder or a GGUF file. Errors name the file:
    /// not a LLaMA-family decoder, a missing or unreadable tokenizer, a
    /// weight missing or of the wrong shape.
    pub fn load(path: &Path) -> Result<Self> {
        let (config, weights, tokenizer) = if path.is_dir() {
            let config = read_hf_config(&path.join("config.json"))?;
            let tokenizer = Tokenizer::from_hf_dir(path)?;
            let mut weights = Checkpoint::open(path)?.load_all()?;
            // transformers 5's fused expert tensors (mergekit-moe 0.1.5 writes them).
            weights::llama::unfuse_experts(&mut weights, &config)?;
            (config, weights, tokenizer)
        } else if path.is_file() {
            let g = GgufFile::open(path)?;
            let config = LlamaConfig::from_gguf(&g)?;
            let tokenizer = Tokenizer::from_gguf(&g)?;
            (config, g.load_all()?, tokenizer)
        } else {
            return Err(S2ftError::Weights(weights::WeightsError::io(
                path,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such model folder or GGUF file",
                ),
            )));
        };
        if tokenizer.vocab_size() > config.vocab_size {
            return Err(config_error(
                path,
                format!(
                    "the tokenizer has {} tokens but the model's vocabulary only {}",
                    tokenizer.vocab_size(),
                    config.vocab_size
                ),
            ));
        }
        Ok(Pretrained {
            path: path.to_path_buf(),
            config,
            weights,
            tokenizer,
        })
    }
}

/// A model's `config.json` for transformers: [`LlamaConfig::to_hf`] with the
/// tokenizer's beginning-of-sequence and first stop token as
/// `bos_token_id` / `eos_token_id` (where it has them).
pub fn hf_config_with_special_tokens(config: &LlamaConfig, tokenizer: &Tokenizer) -> Value {
    let mut cfg = config.to_hf();
    if let Some(bos) = tokenizer.bos_token().and_then(|b| tokenizer.token_id(&b)) {
        cfg["bos_token_id"] = bos.into();
    }
    if let Some(&eos) = tokenizer.stop_ids().first() {
        cfg["eos_token_id"] = eos.into();
    }
    cfg
}

/// Writes `weights` as a Hugging Face model folder `dir` that `transformers`
/// loads with `AutoModelForCausalLM` and `AutoTokenizer`: `config.json`,
/// `generation_config.json`, sharded safetensors (`max_shard_bytes` each,
/// with `model.safetensors.index.json`), `tokenizer.json`,
/// `tokenizer_config.json` (`weights` gains the `format: pt` metadata
/// transformers asks of safetensors files). The folder is assembled under a temporary name
/// beside `dir` and renamed into place, so an interrupted save leaves no
/// half-written model; an existing `dir` is refused.
pub fn save_hf_folder(
    dir: &Path,
    config: &LlamaConfig,
    weights: &mut StateDict,
    tokenizer: &Tokenizer,
    max_shard_bytes: u64,
) -> Result<()> {
    if dir.exists() {
        return Err(config_error(
            dir,
            "exists already; not overwriting a model folder",
        ));
    }
    // Assembled under a temporary name (removed on error or interrupt) and
    // renamed into place.
    let tmp = weights::atomic::TemporaryDir::create(dir)?;
    let mut cfg = config.to_hf();
    cfg["torch_dtype"] = Value::from("float32");
    let stops = tokenizer.stop_ids();
    if let Some(&eos) = stops.first() {
        cfg["eos_token_id"] = Value::from(eos);
    }
    let generation = serde_json::json!({
        "eos_token_id": stops,
        "do_sample": false,
    });
    let json = |v: &Value| serde_json::to_vec_pretty(v).expect("JSON values serialise");
    weights::atomic::write_atomic(tmp.path().join("config.json"), &json(&cfg))?;
    weights::atomic::write_atomic(
        tmp.path().join("generation_config.json"),
        &json(&generation),
    )?;
    // transformers refuses safetensors files without `format: pt`.
    weights.metadata.insert("format".into(), "pt".into());
    weights.save_sharded(tmp.path(), max_shard_bytes)?;
    tokenizer.save(tmp.path())?;
    tmp.persist()?;
    Ok(())
}
