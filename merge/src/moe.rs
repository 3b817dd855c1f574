//! A Mixtral-style mixture of experts assembled from fine-tunes of one base,
//! as `mergekit-moe` (mergekit 0.1.5) builds it: attention, norms,
//! embeddings and head come from the base; each fine-tune's SwiGLU MLP
//! becomes one expert of every block (`w1` = `gate_proj`, `w2` = `down_proj`,
//! `w3` = `up_proj`, Hugging Face's `block_sparse_moe.experts.{e}` names);
//! block `l`'s router row for expert `e` is a *gate vector* computed from a
//! few prompts that should go to that expert.
//!
//! The config is mergekit-moe's YAML ([`MoeConfig`]), checked as mergekit
//! checks it (same order, same messages) and more strictly (an unknown key,
//! a shared expert or an architecture other than Mixtral is an error here,
//! where mergekit ignores the key or builds another architecture).
//!
//! Gate vectors, `[layers, experts, hidden]` (mergekit's `router.py`):
//! - `hidden`, `hidden_last`: per layer, the residual stream *entering* the
//!   block (transformers' `hidden_states[l]`) at each positive prompt's last
//!   token, averaged over the prompts; minus the same average over the
//!   negative prompts; scaled to unit length ([`hidden_gate`]).
//!   `hidden_avg` averages over every position instead of taking the last.
//!   These need a forward pass of the base, which this crate (no deep-learning
//!   framework) leaves to the caller: `experiments merge-moe` runs it, or
//!   `merge moe --gates FILE` takes vectors computed elsewhere. mergekit runs
//!   that forward pass in bfloat16; ours is f32, so gates differ from
//!   mergekit's by bfloat16 rounding (≤ 3.9e-3 on the fixture).
//! - `cheap_embed`: the sum of the token embeddings of every positive prompt
//!   (BOS included), unit length, minus the same for the negative prompts,
//!   unit length again; the same vector for every layer ([`cheap_embed_gate`]).
//! - `random` (N(0, 1)) and `uniform_random` (U(±1/√hidden)), not normalised
//!   ([`random_gates`]); seeded here, so they cannot equal torch's draws.
//!
//! Prompts are tokenized as mergekit does: the BOS token's text, then the
//! prompt, no chat template, no special tokens added.

use std::path::{Path, PathBuf};

use ndarray::{Array2, Array3, ArrayView2, ArrayView3, Axis};
use serde::Deserialize;
use weights::llama::names;
use weights::{DType, LlamaConfig, StateDict, Tensor, TensorSource};

use crate::error::{MergeError, Result};

fn moe_err(what: impl Into<String>, msg: impl Into<String>) -> MergeError {
    MergeError::Moe {
        what: what.into(),
        msg: msg.into(),
    }
}

/// How the router's gate vectors are initialised (mergekit's `gate_mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GateMode {
    /// The base model's hidden state at each prompt's last token (the default).
    #[default]
    Hidden,
    /// The same as `hidden` (mergekit treats them alike).
    HiddenLast,
    /// The base model's hidden states averaged over every position.
    HiddenAvg,
    /// Summed token embeddings of the prompts; no forward pass.
    CheapEmbed,
    /// Standard normal entries.
    Random,
    /// Uniform entries in ±1/√hidden.
    UniformRandom,
}

impl GateMode {
    /// Whether the gates need hidden states of the base model (a forward pass).
    pub fn needs_forward(self) -> bool {
        matches!(
            self,
            GateMode::Hidden | GateMode::HiddenLast | GateMode::HiddenAvg
        )
    }

    /// Whether the gates come from prompts (every mode but the random ones).
    pub fn uses_prompts(self) -> bool {
        !matches!(self, GateMode::Random | GateMode::UniformRandom)
    }
}

/// One expert of a [`MoeConfig`].
#[derive(Clone, Debug, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExpertSpec {
    /// The fine-tune whose MLPs become this expert (a Hugging Face folder).
    pub source_model: String,
    /// Prompts this expert should receive.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub positive_prompts: Vec<String>,
    /// Prompts it should not receive (their gate feature is subtracted).
    #[serde(
        default,
        deserialize_with = "null_as_empty",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub negative_prompts: Vec<String>,
    /// Standard deviation of Gaussian noise added to the expert's weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise_scale: Option<f32>,
    /// Factor on the expert's `down_proj` (its contribution to the residual).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub residual_scale: Option<f32>,
}

/// mergekit-moe's YAML config (`mergekit/moe/config.py`, `MoEMergeConfig`).
#[derive(Clone, Debug, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct MoeConfig {
    /// The model attention, norms, embeddings and head come from.
    pub base_model: String,
    /// The experts, in router order.
    pub experts: Vec<ExpertSpec>,
    /// How gate vectors are computed.
    #[serde(default)]
    pub gate_mode: GateMode,
    /// Output dtype (`float32`, `bfloat16`, `float16`); the base's when absent.
    #[serde(default)]
    pub dtype: Option<String>,
    /// Experts each token is routed to (top-k).
    #[serde(default = "two")]
    pub experts_per_token: usize,
    /// Always-active experts (Qwen-MoE / DeepSeek outputs): refused here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_experts: Option<serde_yaml_ng::Value>,
    /// Output architecture; only `mixtral` (case-insensitive prefix) is built.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
}

/// `null` (mergekit's `None`) as an empty list.
fn null_as_empty<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<String>, D::Error> {
    Ok(Option::<Vec<String>>::deserialize(d)?.unwrap_or_default())
}

fn two() -> usize {
    2
}

impl MoeConfig {
    /// Parses and checks YAML text (`path` names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let cfg: MoeConfig = serde_yaml_ng::from_str(text).map_err(|e| MergeError::Config {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        cfg.check(path)?;
        Ok(cfg)
    }

    /// The config as mergekit-moe YAML (what [`MoeConfig::parse`] reads back).
    pub fn to_yaml(&self) -> String {
        serde_yaml_ng::to_string(self).expect("a MoeConfig serialises")
    }

    /// Reads and checks a YAML file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| MergeError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        Self::parse(&text, path)
    }

    /// mergekit's checks (`is_bad_config`, in its order and words), then
    /// those of this crate: the output dtype, a Mixtral output.
    pub fn check(&self, path: &Path) -> Result<()> {
        let err = |msg: String| {
            Err(MergeError::Config {
                path: path.to_path_buf(),
                msg,
            })
        };
        if self.experts_per_token < 1 {
            return err("experts_per_token: Experts per token must be >= 1".into());
        }
        if self.experts.len() < self.experts_per_token {
            return err(format!(
                "experts_per_token {}: Must include at least as many experts as experts_per_token \
                 (there are {})",
                self.experts_per_token,
                self.experts.len()
            ));
        }
        if self.gate_mode != GateMode::Random {
            // mergekit exempts `random` only (not `uniform_random`) from prompts.
            if let Some(i) = self
                .experts
                .iter()
                .position(|e| e.positive_prompts.is_empty())
            {
                return err(format!(
                    "experts[{i}] ({}): Expert {i} has no positive prompts (gate_mode {:?} \
                     needs them)",
                    self.experts[i].source_model, self.gate_mode
                ));
            }
            let first = &self.experts[0];
            if self.experts.len() > 1
                && self.experts.iter().all(|e| {
                    e.positive_prompts == first.positive_prompts
                        && e.negative_prompts == first.negative_prompts
                })
            {
                return err(
                    "experts: Your positive and negative prompts are identical for all experts. \
                     This will not produce a functioning MoE."
                        .into(),
                );
            }
            if self.experts.len() > 1
                && self
                    .experts
                    .iter()
                    .all(|e| e.source_model == first.source_model)
            {
                return err(format!(
                    "experts: All of your expert models are the same ({}). This will produce a \
                     model that uses more resources but gives the exact same output.",
                    first.source_model
                ));
            }
        }
        if self.shared_experts.is_some() {
            return err(
                "shared_experts: only Mixtral outputs are built (no shared experts)".into(),
            );
        }
        if let Some(a) = &self.architecture
            && !"mixtral".starts_with(&a.to_ascii_lowercase())
        {
            return err(format!(
                "architecture '{a}': only Mixtral outputs are built"
            ));
        }
        if let Some(d) = &self.dtype {
            output_dtype(d).map_err(|msg| MergeError::Config {
                path: path.to_path_buf(),
                msg,
            })?;
        }
        for (i, e) in self.experts.iter().enumerate() {
            for (what, v) in [
                ("noise_scale", e.noise_scale),
                ("residual_scale", e.residual_scale),
            ] {
                if let Some(x) = v
                    && !x.is_finite()
                {
                    return err(format!("experts[{i}].{what} {x} is not finite"));
                }
            }
        }
        Ok(())
    }

    /// The base and expert paths, relative to the working directory or, when
    /// they do not exist there, to `config_dir` (as `merge` configs resolve).
    pub fn paths(&self, config_dir: &Path) -> (PathBuf, Vec<PathBuf>) {
        let p = |m: &str| crate::config::model_path(m, config_dir);
        (
            p(&self.base_model),
            self.experts.iter().map(|e| p(&e.source_model)).collect(),
        )
    }
}

fn output_dtype(d: &str) -> std::result::Result<DType, String> {
    let name = d.strip_prefix("torch.").unwrap_or(d);
    DType::parse_float(name)
        .filter(|t| matches!(t, DType::F32 | DType::F16 | DType::BF16))
        .ok_or_else(|| format!("dtype '{d}': not an output dtype (float32, bfloat16 or float16)"))
}

/// `v / max(‖v‖₂, 1e-8)`, per row.
fn unit_rows(mut m: Array2<f32>) -> Array2<f32> {
    for mut row in m.rows_mut() {
        let n = row.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let scale = 1.0 / n.max(1e-8);
        row.mapv_inplace(|x| (x as f64 * scale) as f32);
    }
    m
}

/// The mean of per-prompt feature matrices (`[layers, hidden]` each), in f64.
fn mean_features(feats: &[Array2<f32>], what: &str) -> Result<Array2<f64>> {
    let first = feats.first().ok_or_else(|| moe_err(what, "no prompts"))?;
    let mut acc = Array2::<f64>::zeros(first.dim());
    for (i, f) in feats.iter().enumerate() {
        if f.dim() != first.dim() {
            return Err(moe_err(
                what,
                format!(
                    "prompt {i} has features {:?}, prompt 0 {:?}",
                    f.dim(),
                    first.dim()
                ),
            ));
        }
        if let Some(x) = f.iter().find(|x| !x.is_finite()) {
            return Err(moe_err(
                what,
                format!("prompt {i} has a non-finite feature {x}"),
            ));
        }
        acc.zip_mut_with(f, |a, &b| *a += b as f64);
    }
    Ok(acc / feats.len() as f64)
}

/// mergekit's `hidden` gate of one expert: `unit(mean_p h(pos_p) − mean_p
/// h(neg_p))` per layer, where `h(p)` is one prompt's `[layers, hidden]`
/// feature (the hidden state entering each block, at the last token for
/// `hidden`, averaged over positions for `hidden_avg`); without negative
/// prompts, `unit(mean_p h(pos_p))`. Returns `[layers, hidden]`.
pub fn hidden_gate(positive: &[Array2<f32>], negative: &[Array2<f32>]) -> Result<Array2<f32>> {
    let mut v = mean_features(positive, "positive prompts")?;
    if !negative.is_empty() {
        let n = mean_features(negative, "negative prompts")?;
        if n.dim() != v.dim() {
            return Err(moe_err(
                "negative prompts",
                format!("features {:?}, the positive ones {:?}", n.dim(), v.dim()),
            ));
        }
        v -= &n;
    }
    Ok(unit_rows(v.mapv(|x| x as f32)))
}

/// mergekit's `cheap_embed` gate of one expert, `[layers, hidden]`: `s(P) =
/// Σ_{p∈P} Σ_{t∈p} E[t]` (every token id of every prompt, BOS included),
/// the gate `unit(s(pos))`, or with negative prompts `unit(unit(s(pos)) −
/// unit(s(neg)))`, repeated for each of `layers` blocks.
pub fn cheap_embed_gate(
    embed: ArrayView2<f32>,
    positive: &[Vec<u32>],
    negative: &[Vec<u32>],
    layers: usize,
) -> Result<Array2<f32>> {
    let sum = |prompts: &[Vec<u32>], what: &str| -> Result<Array2<f32>> {
        let mut s = vec![0f64; embed.ncols()];
        for ids in prompts {
            for &id in ids {
                let row = embed
                    .get((id as usize, 0))
                    .map(|_| embed.row(id as usize))
                    .ok_or_else(|| {
                        moe_err(
                            what,
                            format!(
                                "token id {id} is outside the embedding's {} rows",
                                embed.nrows()
                            ),
                        )
                    })?;
                s.iter_mut().zip(row).for_each(|(a, &b)| *a += b as f64);
            }
        }
        if prompts.iter().all(|p| p.is_empty()) {
            return Err(moe_err(what, "no tokens"));
        }
        Ok(unit_rows(
            Array2::from_shape_vec((1, s.len()), s.into_iter().map(|x| x as f32).collect())
                .expect("one row"),
        ))
    };
    let mut v = sum(positive, "positive prompts")?;
    if !negative.is_empty() {
        v = unit_rows(v - sum(negative, "negative prompts")?);
    }
    Ok(v.broadcast((layers, embed.ncols()))
        .expect("one row broadcasts")
        .to_owned())
}

/// Seeded `random` (N(0, 1)) or `uniform_random` (U(±1/√hidden)) gates,
/// `[layers, experts, hidden]`, not normalised (as mergekit's).
pub fn random_gates(
    mode: GateMode,
    layers: usize,
    experts: usize,
    hidden: usize,
    seed: u64,
) -> Result<Array3<f32>> {
    let mut rng = weights::rng::Rng::new(seed);
    let bound = 1.0 / (hidden as f64).sqrt();
    let mut g = Array3::<f32>::zeros((layers, experts, hidden));
    match mode {
        GateMode::Random => g.iter_mut().for_each(|x| *x = rng.normal() as f32),
        GateMode::UniformRandom => g
            .iter_mut()
            .for_each(|x| *x = ((2.0 * rng.uniform() - 1.0) * bound) as f32),
        other => {
            return Err(moe_err(
                "gate_mode",
                format!("{other:?} gates come from prompts, not from a random draw"),
            ));
        }
    }
    Ok(g)
}

/// Stacks per-expert gates (`[layers, hidden]` each) into `[layers, experts, hidden]`.
pub fn stack_gates(per_expert: &[Array2<f32>]) -> Result<Array3<f32>> {
    let views: Vec<_> = per_expert.iter().map(|g| g.view()).collect();
    let stacked = ndarray::stack(Axis(1), &views).map_err(|e| moe_err("gates", e.to_string()))?;
    Ok(stacked)
}

/// What [`assemble`] built: the mixture's weights and description.
#[derive(Debug)]
pub struct Assembled {
    /// Weights under Mixtral's Hugging Face names.
    pub weights: StateDict,
    /// The base's description with [`LlamaConfig::moe`] set.
    pub config: LlamaConfig,
}

/// Builds the mixture: every tensor but the MLPs from `base`, expert `e`'s
/// MLP of every block from `experts[e]` (with its `residual_scale` on
/// `down_proj` and its `noise_scale`, seeded by `seed`), block `l`'s router
/// from `gates[l]` (`[layers, experts, hidden]`). Errors name the expert
/// whose shapes or vocabulary differ from the base's (a fine-tune of another
/// base), or the gate shape that does not fit.
pub fn assemble(
    cfg: &MoeConfig,
    base: &dyn TensorSource,
    base_config: &LlamaConfig,
    experts: &[&dyn TensorSource],
    gates: ArrayView3<f32>,
    seed: u64,
) -> Result<Assembled> {
    if base_config.moe.is_some() {
        return Err(moe_err(
            format!("base_model {}", base.path().display()),
            "is a mixture of experts already; the base must be a dense LLaMA",
        ));
    }
    if experts.len() != cfg.experts.len() {
        return Err(moe_err(
            "experts",
            format!(
                "{} sources for {} experts",
                experts.len(),
                cfg.experts.len()
            ),
        ));
    }
    let (l_count, h) = (base_config.num_hidden_layers, base_config.hidden_size);
    let want = [l_count, experts.len(), h];
    if gates.shape() != want {
        return Err(moe_err(
            "gates",
            format!(
                "shape {:?}, a mixture of {} experts over {l_count} blocks of width {h} needs {want:?}",
                gates.shape(),
                experts.len()
            ),
        ));
    }
    if let Some(x) = gates.iter().find(|x| !x.is_finite()) {
        return Err(moe_err("gates", format!("non-finite value {x}")));
    }
    let out_dtype = cfg
        .dtype
        .as_deref()
        .map(output_dtype)
        .transpose()
        .map_err(|m| moe_err("dtype", m))?;
    let mut sd = StateDict::new();
    let put = |sd: &mut StateDict, name: String, mut t: Tensor| {
        if let Some(d) = out_dtype {
            t.dtype = d;
        }
        sd.insert(name, t);
    };
    // Everything but the MLPs comes from the base.
    for name in base.names() {
        if name.contains(".mlp.") {
            continue;
        }
        let t = base.load(&name)?;
        put(&mut sd, name, t);
    }
    let mut rng = weights::rng::Rng::new(seed);
    for (e, (src, spec)) in experts.iter().zip(&cfg.experts).enumerate() {
        let who = format!("experts[{e}] ({})", spec.source_model);
        // A fine-tune of the same base: same vocabulary and shapes.
        for name in [names::EMBED, "model.layers.0.self_attn.q_proj.weight"] {
            let (a, b) = (base.info(name), src.info(name));
            match (a, b) {
                (Some(a), Some(b)) if a.shape == b.shape => {}
                (Some(a), Some(b)) => {
                    return Err(moe_err(
                        who,
                        format!(
                            "'{name}' has shape {:?}, the base {:?}: a fine-tune of a different base",
                            b.shape, a.shape
                        ),
                    ));
                }
                (Some(_), None) => {
                    return Err(moe_err(
                        who,
                        format!("has no '{name}': not a fine-tune of the base"),
                    ));
                }
                (None, _) => {}
            }
        }
        for l in 0..l_count {
            for proj in ["gate_proj", "up_proj", "down_proj"] {
                let name = format!("{}.mlp.{proj}.weight", names::layer(l));
                let want = base
                    .info(&name)
                    .ok_or_else(|| {
                        moe_err(
                            format!("base_model {}", base.path().display()),
                            format!("has no '{name}'"),
                        )
                    })?
                    .shape;
                let mut t = src
                    .load(&name)
                    .map_err(|err| moe_err(who.clone(), format!("'{name}': {err}")))?;
                if t.shape() != want.as_slice() {
                    return Err(moe_err(
                        who,
                        format!(
                            "'{name}' has shape {:?}, the base {want:?}: a fine-tune of a different base",
                            t.shape()
                        ),
                    ));
                }
                if let Some(x) = t.data.iter().find(|x| !x.is_finite()) {
                    return Err(moe_err(
                        who,
                        format!("'{name}' holds a non-finite value {x}"),
                    ));
                }
                if let Some(s) = spec.noise_scale {
                    t.data.mapv_inplace(|x| x + s * rng.normal() as f32);
                }
                if proj == "down_proj"
                    && let Some(r) = spec.residual_scale
                {
                    t.data.mapv_inplace(|x| x * r);
                }
                let w = names::expert_weight_of(proj).expect("an MLP projection");
                put(&mut sd, names::expert(l, e, w), t);
            }
        }
    }
    for l in 0..l_count {
        let g = gates.index_axis(Axis(0), l).to_owned().into_dyn();
        put(&mut sd, names::router(l), Tensor::f32(g));
    }
    let config = base_config
        .clone()
        .with_experts(experts.len(), cfg.experts_per_token);
    config.check().map_err(MergeError::Weights)?;
    Ok(Assembled {
        weights: sd,
        config,
    })
}

/// The files of a Hugging Face model folder that carry its tokenizer and
/// chat template, copied into a mixture's folder when the base has them.
pub const TOKENIZER_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
];

/// Writes an [`Assembled`] mixture as a Hugging Face folder `out` that
/// transformers loads as `MixtralForCausalLM`: `config.json` (the base's
/// `config.json` object with the Mixtral fields of
/// [`LlamaConfig::to_hf`] over it, as mergekit does), safetensors shards of
/// at most `max_shard_bytes`, the base folder's tokenizer files, and the
/// YAML config as `mergekit_moe_config.yml`. The folder is assembled under
/// a temporary name and renamed into place (nothing half-written is left);
/// an existing `out` is refused.
pub fn write_folder(
    out: &Path,
    moe: &mut Assembled,
    base_dir: &Path,
    yaml: &str,
    max_shard_bytes: u64,
) -> Result<()> {
    if out.exists() {
        return Err(moe_err(
            format!("output {}", out.display()),
            "exists already; not overwriting a model folder",
        ));
    }
    let tmp = weights::atomic::TemporaryDir::create(out)?;
    let mut cfg: serde_json::Value = match std::fs::read_to_string(base_dir.join("config.json")) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| MergeError::Config {
            path: base_dir.join("config.json"),
            msg: format!("not JSON: {e}"),
        })?,
        Err(_) => serde_json::json!({}),
    };
    let ours = moe.config.to_hf();
    let obj = cfg.as_object_mut().ok_or_else(|| MergeError::Config {
        path: base_dir.join("config.json"),
        msg: "not a JSON object".into(),
    })?;
    for (k, v) in ours.as_object().expect("to_hf is an object") {
        obj.insert(k.clone(), v.clone());
    }
    // transformers 5's form of RoPE settings carries θ; keep one source of truth.
    if let Some(r) = obj
        .get_mut("rope_parameters")
        .and_then(|r| r.as_object_mut())
    {
        r.insert("rope_theta".into(), moe.config.rope_theta.into());
    }
    let dtype = moe
        .weights
        .iter()
        .next()
        .map(|(_, t)| t.dtype)
        .unwrap_or(DType::F32);
    let torch = match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    };
    // transformers 4 reads `torch_dtype`, 5 `dtype` (and still the old name).
    obj.insert("torch_dtype".into(), torch.into());
    if obj.contains_key("dtype") {
        obj.insert("dtype".into(), torch.into());
    }
    let json = serde_json::to_vec_pretty(&cfg).expect("JSON values serialise");
    weights::atomic::write_atomic(tmp.path().join("config.json"), &json)?;
    weights::atomic::write_atomic(tmp.path().join("mergekit_moe_config.yml"), yaml.as_bytes())?;
    for f in TOKENIZER_FILES {
        let src = base_dir.join(f);
        if src.is_file() {
            let bytes = std::fs::read(&src).map_err(|e| MergeError::Io {
                path: src.clone(),
                source: e,
            })?;
            weights::atomic::write_atomic(tmp.path().join(f), &bytes)?;
        }
    }
    moe.weights.metadata.insert("format".into(), "pt".into());
    moe.weights.save_sharded(tmp.path(), max_shard_bytes)?;
    tmp.persist()?;
    Ok(())
}

/// A mixture to build: a checked [`MoeConfig`] with its base and expert
/// folders resolved and the base's description read. What `merge moe` and
/// `experiments merge-moe` share; they differ only in where gates come from.
#[derive(Debug)]
pub struct MoeJob {
    /// The config.
    pub config: MoeConfig,
    /// Its YAML text (written into the output folder).
    pub yaml: String,
    /// The base model's folder.
    pub base_dir: PathBuf,
    /// Each expert's folder, in router order.
    pub expert_dirs: Vec<PathBuf>,
    /// The base's description (`config.json`).
    pub base_config: LlamaConfig,
}

/// The description of a dense LLaMA-family Hugging Face folder, as
/// mergekit-moe accepts it (`model_type` llama or mistral).
pub fn dense_llama_config(dir: &Path, what: &str) -> Result<LlamaConfig> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| MergeError::Io {
        path: path.clone(),
        source: e,
    })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| MergeError::Config {
        path: path.clone(),
        msg: format!("not JSON: {e}"),
    })?;
    let model_type = v.get("model_type").and_then(|t| t.as_str()).unwrap_or("");
    if !matches!(model_type, "llama" | "mistral") {
        return Err(moe_err(
            format!("{what} {}", dir.display()),
            format!(
                "model_type '{model_type}': a Mixtral mixture is built from dense llama or                  mistral models"
            ),
        ));
    }
    LlamaConfig::from_hf(&v).map_err(|e| MergeError::Config {
        path,
        msg: e.to_string(),
    })
}

impl MoeJob {
    /// Reads the YAML at `path`, checks it, resolves and checks the models
    /// it names (each expert a dense model of the base's shape).
    pub fn load(path: &Path) -> Result<Self> {
        let yaml = std::fs::read_to_string(path).map_err(|e| MergeError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        let config = MoeConfig::parse(&yaml, path)?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let (base_dir, expert_dirs) = config.paths(dir);
        let base_config = dense_llama_config(&base_dir, "base_model")?;
        for (i, d) in expert_dirs.iter().enumerate() {
            let what = format!("experts[{i}].source_model");
            let c = dense_llama_config(d, &what)?;
            let same = (
                c.vocab_size,
                c.hidden_size,
                c.intermediate_size,
                c.num_hidden_layers,
            ) == (
                base_config.vocab_size,
                base_config.hidden_size,
                base_config.intermediate_size,
                base_config.num_hidden_layers,
            );
            if !same {
                return Err(moe_err(
                    format!("{what} {}", d.display()),
                    format!(
                        "vocabulary {}, hidden {}, ffn {}, {} blocks; the base has {}, {}, {}, {}:                          a fine-tune of a different base",
                        c.vocab_size,
                        c.hidden_size,
                        c.intermediate_size,
                        c.num_hidden_layers,
                        base_config.vocab_size,
                        base_config.hidden_size,
                        base_config.intermediate_size,
                        base_config.num_hidden_layers
                    ),
                ));
            }
        }
        Ok(MoeJob {
            config,
            yaml,
            base_dir,
            expert_dirs,
            base_config,
        })
    }

    /// Builds the mixture with `gates` (`[layers, experts, hidden]`) and
    /// writes it to `out` ([`write_folder`]).
    pub fn build(
        &self,
        gates: ArrayView3<f32>,
        seed: u64,
        out: &Path,
        max_shard_bytes: u64,
    ) -> Result<Assembled> {
        let base = weights::Checkpoint::open(&self.base_dir)?;
        let experts = self
            .expert_dirs
            .iter()
            .map(weights::Checkpoint::open)
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let refs: Vec<&dyn TensorSource> = experts.iter().map(|c| c as &dyn TensorSource).collect();
        let mut moe = assemble(&self.config, &base, &self.base_config, &refs, gates, seed)?;
        write_folder(out, &mut moe, &self.base_dir, &self.yaml, max_shard_bytes)?;
        Ok(moe)
    }
}

/// Reads gates saved as one `[layers, experts, hidden]` tensor named
/// `gates` in a safetensors file (what `merge moe --gates` takes).
pub fn load_gates(path: &Path) -> Result<Array3<f32>> {
    let sd = StateDict::load(path)?;
    let t = sd.get("gates").ok_or_else(|| {
        moe_err(
            format!("gates file {}", path.display()),
            "has no tensor 'gates' ([layers, experts, hidden])",
        )
    })?;
    t.data
        .clone()
        .into_dimensionality::<ndarray::Ix3>()
        .map_err(|_| {
            moe_err(
                format!("gates file {}", path.display()),
                format!(
                    "'gates' has shape {:?}, not [layers, experts, hidden]",
                    t.shape()
                ),
            )
        })
}

/// Per block, the cosine similarity of each pair of experts' router rows
/// (`[experts, experts]`, ones on the diagonal; a zero row has cosine 0 with
/// every other). Rows that are (nearly) parallel leave the choice between
/// their experts to tie-breaking: mergekit warns about such degenerate gates.
pub fn gate_cosines(gates: ArrayView3<f32>) -> Vec<Array2<f64>> {
    gates
        .outer_iter()
        .map(|g| {
            let e = g.nrows();
            let norms: Vec<f64> = g
                .rows()
                .into_iter()
                .map(|r| r.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt())
                .collect();
            Array2::from_shape_fn((e, e), |(i, j)| {
                if i == j {
                    return 1.0;
                }
                let dot: f64 = g
                    .row(i)
                    .iter()
                    .zip(g.row(j))
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum();
                let d = norms[i] * norms[j];
                if d > 0.0 { dot / d } else { 0.0 }
            })
        })
        .collect()
}
