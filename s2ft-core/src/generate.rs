//! Greedy decoding with a KV cache.
//!
//! Prompts are sorted by length and decoded in batches, each row padded on
//! the left to the batch's longest prompt; the padding is masked out of
//! attention and each row keeps its own positions
//! ([`Llama::forward_cached_padded`]), so every row computes what it would
//! alone. A prefix shared by every prompt (a chat template's system turn) is
//! run once and its cache repeated.

use burn::prelude::*;
use burn::tensor::TensorData;

use crate::error::{Result, S2ftError};
use crate::model::{KvCache, Llama};

/// Decoding settings.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct GenerationConfig {
    /// Most tokens generated per prompt (the stop token included).
    pub max_new_tokens: usize,
    /// Tokens that end a generation (EOS, end of turn).
    pub stop_ids: Vec<u32>,
    /// Prompts decoded together at most.
    pub batch_size: usize,
    /// The model's context length: a prompt that cannot fit with
    /// `max_new_tokens` more is refused.
    pub max_positions: usize,
}

/// What greedy decoding produced for one prompt.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Generated {
    /// The generated ids, without the stop token.
    pub ids: Vec<u32>,
    /// Whether a stop token ended it (otherwise `max_new_tokens` did).
    pub stopped: bool,
}

fn ids_tensor<B: Backend>(rows: &[&[u32]], device: &B::Device) -> Tensor<B, 2, Int> {
    let t = rows.first().map_or(0, |r| r.len());
    let data: Vec<i64> = rows
        .iter()
        .flat_map(|r| r.iter().map(|&i| i as i64))
        .collect();
    Tensor::from_data(TensorData::new(data, [rows.len(), t]), device)
}

fn argmax_rows<B: Backend>(logits: Tensor<B, 2>) -> Vec<u32> {
    logits
        .argmax(1)
        .into_data()
        .convert::<i64>()
        .into_vec::<i64>()
        .expect("int data")
        .into_iter()
        .map(|i| i as u32)
        .collect()
}

/// The longest prefix every prompt shares (none for a single prompt, whose
/// cache would not be reused).
fn common_prefix(prompts: &[Vec<u32>]) -> usize {
    let Some(first) = prompts.first() else {
        return 0;
    };
    if prompts.len() < 2 {
        return 0;
    }
    let mut n = first.len();
    for p in &prompts[1..] {
        n = n.min(first.iter().zip(p).take_while(|(a, b)| a == b).count());
    }
    n
}

/// Greedy continuation of every prompt (token ids), in prompt order.
/// Errors name the prompt that is empty or too long for the context.
pub fn greedy<B: Backend>(
    model: &Llama<B>,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
) -> Result<Vec<Generated>> {
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(S2ftError::Generation(format!("prompt {i} is empty")));
        }
        if p.len() + cfg.max_new_tokens > cfg.max_positions {
            return Err(S2ftError::Generation(format!(
                "prompt {i} has {} tokens; with {} new tokens it exceeds the model's context of {}",
                p.len(),
                cfg.max_new_tokens,
                cfg.max_positions
            )));
        }
        if let Some(&bad) = p.iter().find(|&&t| t as usize >= model.config.vocab_size) {
            return Err(S2ftError::Generation(format!(
                "prompt {i} holds token id {bad}, outside the vocabulary of {}",
                model.config.vocab_size
            )));
        }
    }
    let device = model.embed_tokens.val().device();
    // Leave at least one token of each prompt to feed after the shared prefix.
    let min_len = prompts.iter().map(Vec::len).min().unwrap_or(0);
    let shared = common_prefix(prompts).min(min_len.saturating_sub(1));
    let prefix_cache = (shared > 0).then(|| {
        let mut c = KvCache::new(model.layers.len());
        model.forward_cached(ids_tensor::<B>(&[&prompts[0][..shared]], &device), &mut c);
        c
    });
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&i| (prompts[i].len(), i));
    let mut out: Vec<Option<Generated>> = vec![None; prompts.len()];
    for group in order.chunks(cfg.batch_size.max(1)) {
        let longest = group.iter().map(|&i| prompts[i].len()).max().unwrap_or(0) - shared;
        let pad_id = prompts[group[0]][0];
        let pads: Vec<usize> = group
            .iter()
            .map(|&i| longest - (prompts[i].len() - shared))
            .collect();
        let rows: Vec<Vec<u32>> = group
            .iter()
            .zip(&pads)
            .map(|(&i, &p)| {
                let mut r = vec![pad_id; p];
                r.extend(&prompts[i][shared..]);
                r
            })
            .collect();
        let rows: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
        let mut cache = match &prefix_cache {
            Some(c) => c.repeat(group.len()),
            None => KvCache::new(model.layers.len()),
        };
        let mut next = argmax_rows(model.forward_cached_padded(
            ids_tensor::<B>(&rows, &device),
            &pads,
            &mut cache,
        ));
        let mut rows_out: Vec<Generated> = vec![
            Generated {
                ids: Vec::new(),
                stopped: false
            };
            group.len()
        ];
        for step in 0..cfg.max_new_tokens {
            for (g, &tok) in rows_out.iter_mut().zip(&next) {
                if g.stopped {
                    continue;
                }
                if cfg.stop_ids.contains(&tok) {
                    g.stopped = true;
                } else {
                    g.ids.push(tok);
                }
            }
            if step + 1 == cfg.max_new_tokens || rows_out.iter().all(|g| g.stopped) {
                break;
            }
            let col: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
            let col: Vec<&[u32]> = col.iter().map(|c| &c[..]).collect();
            next = argmax_rows(model.forward_cached(ids_tensor::<B>(&col, &device), &mut cache));
        }
        for (&i, g) in group.iter().zip(rows_out) {
            out[i] = Some(g);
        }
    }
    Ok(out
        .into_iter()
        .map(|g| g.expect("every prompt decoded"))
        .collect())
}
