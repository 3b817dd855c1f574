//! Mixtures of experts with a Burn forward pass: the gate vectors of
//! mergekit-moe's prompt-based modes (`merge::moe` computes the formulas,
//! this module the hidden states and token ids they need), the
//! `experiments merge-moe CONFIG OUT` command, and the bridge between a
//! mixture's state dict and `merge::submoe`'s per-layer view.

use std::path::Path;

use anyhow::{Context, ensure};
use burn::prelude::*;
use burn::tensor::TensorData;
use merge::moe::{GateMode, MoeJob, cheap_embed_gate, hidden_gate, random_gates, stack_gates};
use merge::submoe::{ExpertWeights, MoeLayer};
use ndarray::{Array2, Array3, Ix2};
use s2ft_core::tokenizer::Tokenizer;
use s2ft_core::{Llama, LlamaConfig};
use weights::llama::names;
use weights::{StateDict, Tensor as WTensor};

/// A prompt's token ids as mergekit-moe tokenizes it: the BOS token's text,
/// then the prompt, no chat template, no special tokens added.
pub fn prompt_ids(tok: &Tokenizer, prompt: &str) -> anyhow::Result<Vec<u32>> {
    let text = format!("{}{prompt}", tok.bos_token().unwrap_or_default());
    let ids = tok.encode(&text)?;
    ensure!(!ids.is_empty(), "prompt {prompt:?} has no tokens");
    Ok(ids)
}

/// Per block, the residual stream entering it (transformers'
/// `hidden_states[l]`) for one prompt, at its last token (`average: false`,
/// mergekit's `hidden`) or averaged over its positions (`hidden_avg`):
/// `[layers, hidden]`.
pub fn hidden_features<B: Backend>(
    model: &Llama<B>,
    ids: &[u32],
    average: bool,
) -> anyhow::Result<Array2<f32>> {
    let device = model.embed_tokens.val().device();
    let limit = model.config.max_position_embeddings.unwrap_or(usize::MAX);
    ensure!(
        ids.len() <= limit,
        "a gate prompt of {} tokens is longer than the model's context of {limit}",
        ids.len()
    );
    let data: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(data, [1, ids.len()]), &device);
    let h = model.config.hidden_size;
    let mut out = Array2::<f32>::zeros((model.layers.len(), h));
    for (l, inputs) in model.linear_inputs(tokens).into_iter().enumerate() {
        let r = inputs.residual;
        let v = if average {
            r.mean_dim(0)
        } else {
            r.narrow(0, ids.len() - 1, 1)
        };
        let v: Vec<f32> = v.into_data().convert::<f32>().into_vec().expect("f32");
        out.row_mut(l).assign(&ndarray::ArrayView1::from(&v));
    }
    Ok(out)
}

/// The gate vectors (`[layers, experts, hidden]`) of `job`'s mode, from the
/// dense base `model` and its tokenizer; `seed` draws the random modes.
pub fn gates<B: Backend>(
    job: &MoeJob,
    model: &Llama<B>,
    tok: &Tokenizer,
    seed: u64,
) -> anyhow::Result<Array3<f32>> {
    let c = &model.config;
    let mode = job.config.gate_mode;
    if !mode.uses_prompts() {
        return Ok(random_gates(
            mode,
            c.num_hidden_layers,
            job.config.experts.len(),
            c.hidden_size,
            seed,
        )?);
    }
    let mut per_expert = Vec::new();
    for (i, e) in job.config.experts.iter().enumerate() {
        let what = || format!("experts[{i}] ({})", e.source_model);
        let ids = |ps: &[String]| -> anyhow::Result<Vec<Vec<u32>>> {
            ps.iter().map(|p| prompt_ids(tok, p)).collect()
        };
        let (pos, neg) = (
            ids(&e.positive_prompts).with_context(what)?,
            ids(&e.negative_prompts).with_context(what)?,
        );
        let g = if mode == GateMode::CheapEmbed {
            let embed = model_tensor(model.embed_tokens.val());
            cheap_embed_gate(embed.view(), &pos, &neg, c.num_hidden_layers)?
        } else {
            let average = mode == GateMode::HiddenAvg;
            let feats = |all: &[Vec<u32>]| -> anyhow::Result<Vec<Array2<f32>>> {
                all.iter()
                    .map(|p| hidden_features(model, p, average))
                    .collect()
            };
            hidden_gate(&feats(&pos)?, &feats(&neg)?).with_context(what)?
        };
        per_expert.push(g);
    }
    Ok(stack_gates(&per_expert)?)
}

fn model_tensor<B: Backend>(t: Tensor<B, 2>) -> Array2<f32> {
    s2ft_core::model::to_weights(t)
        .data
        .into_dimensionality::<Ix2>()
        .expect("2-D")
}

/// `experiments merge-moe CONFIG OUT`: mergekit-moe with every gate mode
/// (the hidden-state modes run the base model on CPU).
pub fn merge_moe(config: &Path, out: &Path, seed: u64) -> anyhow::Result<()> {
    let job = MoeJob::load(config)?;
    let base = s2ft_core::Pretrained::load(&job.base_dir)
        .with_context(|| format!("base_model {}", job.base_dir.display()))?;
    let model = Llama::<s2ft_core::Cpu>::from_state_dict(
        &base.config,
        &base.weights,
        false,
        &Default::default(),
    )?;
    let g = gates(&job, &model, &base.tokenizer, seed)?;
    let moe = job.build(g.view(), seed, out, 5 << 30)?;
    eprintln!(
        "wrote a mixture of {} experts (top-{}, gate_mode {:?}) over {} blocks, {} tensors, to {}",
        job.config.experts.len(),
        job.config.experts_per_token,
        job.config.gate_mode,
        base.config.num_hidden_layers,
        moe.weights.len(),
        out.display()
    );
    Ok(())
}

fn matrix(sd: &StateDict, name: &str) -> anyhow::Result<Array2<f32>> {
    let t = sd
        .get(name)
        .with_context(|| format!("the mixture has no '{name}'"))?;
    t.data
        .clone()
        .into_dimensionality::<Ix2>()
        .with_context(|| format!("'{name}' is not 2-D"))
}

/// Block `l` of a Mixtral state dict as `merge::submoe`'s layer.
pub fn moe_layer(sd: &StateDict, c: &LlamaConfig, l: usize) -> anyhow::Result<MoeLayer> {
    let m = c.moe.context("not a mixture of experts")?;
    Ok(MoeLayer {
        gate: matrix(sd, &names::router(l))?,
        experts: (0..m.num_local_experts)
            .map(|e| {
                Ok(ExpertWeights {
                    w1: matrix(sd, &names::expert(l, e, "w1"))?,
                    w2: matrix(sd, &names::expert(l, e, "w2"))?,
                    w3: matrix(sd, &names::expert(l, e, "w3"))?,
                })
            })
            .collect::<anyhow::Result<_>>()?,
    })
}

/// A mixture with every block's experts replaced by `layers[l]` (all of one
/// size `E'`), routing to `min(top_k, E')` experts per token.
pub fn with_layers(
    sd: &StateDict,
    c: &LlamaConfig,
    layers: &[MoeLayer],
    top_k: usize,
) -> anyhow::Result<(StateDict, LlamaConfig)> {
    let e = layers.first().map_or(0, |l| l.experts.len());
    ensure!(e > 0, "a compressed mixture needs at least one expert");
    ensure!(
        layers.len() == c.num_hidden_layers && layers.iter().all(|l| l.experts.len() == e),
        "every block needs the same number of experts"
    );
    let mut out = StateDict::new();
    for (name, t) in sd.iter() {
        if !name.contains(".block_sparse_moe.") {
            out.insert(name, t.clone());
        }
    }
    for (l, layer) in layers.iter().enumerate() {
        out.insert(
            names::router(l),
            WTensor::f32(layer.gate.clone().into_dyn()),
        );
        for (i, x) in layer.experts.iter().enumerate() {
            for (w, m) in [("w1", &x.w1), ("w2", &x.w2), ("w3", &x.w3)] {
                out.insert(names::expert(l, i, w), WTensor::f32(m.clone().into_dyn()));
            }
        }
    }
    let cfg = c.clone().with_experts(e, top_k.min(e));
    Ok((out, cfg))
}
