//! Greedy decoding with a KV cache.
//!
//! Prompts are sorted by length and decoded in batches, each row padded on
//! the left to the batch's longest prompt; the padding is masked out of
//! attention and each row keeps its own positions
//! ([`Llama::forward_cached_padded`]), so every row computes what it would
//! alone. A prefix shared by every prompt (a chat template's system turn) is
//! run once and its cache repeated. [`greedy_scored`] also scores a
//! reference completion per prompt by teacher forcing on the prompt's cache,
//! so a test set's greedy answers and reference loss cost one prefill.

use burn::prelude::*;
use burn::tensor::TensorData;
use burn::tensor::activation::log_softmax;

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

/// A greedy answer and the teacher-forced score of the reference completion.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Scored {
    /// What greedy decoding produced.
    pub generated: Generated,
    /// `−Σ log p(reference token | prompt, reference before it)` (nats).
    pub reference_nll: f64,
    /// Tokens in the reference.
    pub reference_tokens: usize,
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
    Ok(decode(model, prompts, None, cfg)?
        .into_iter()
        .map(|s| s.generated)
        .collect())
}

/// [`greedy`], and for each prompt the negative log-likelihood of
/// `references[i]` after it (teacher forcing on the prompt's KV cache: the
/// prefill is shared with decoding). Errors name an empty reference or one
/// that does not fit the context after its prompt.
pub fn greedy_scored<B: Backend>(
    model: &Llama<B>,
    prompts: &[Vec<u32>],
    references: &[Vec<u32>],
    cfg: &GenerationConfig,
) -> Result<Vec<Scored>> {
    if references.len() != prompts.len() {
        return Err(S2ftError::Generation(format!(
            "{} references for {} prompts",
            references.len(),
            prompts.len()
        )));
    }
    decode(model, prompts, Some(references), cfg)
}

fn decode<B: Backend>(
    model: &Llama<B>,
    prompts: &[Vec<u32>],
    references: Option<&[Vec<u32>]>,
    cfg: &GenerationConfig,
) -> Result<Vec<Scored>> {
    for (i, r) in references.unwrap_or(&[]).iter().enumerate() {
        if r.is_empty() {
            return Err(S2ftError::Generation(format!("reference {i} is empty")));
        }
        if prompts[i].len() + r.len() > cfg.max_positions {
            return Err(S2ftError::Generation(format!(
                "prompt {i} with its reference takes {} tokens, more than the model's context of {}",
                prompts[i].len() + r.len(),
                cfg.max_positions
            )));
        }
        if let Some(&bad) = r.iter().find(|&&t| t as usize >= model.config.vocab_size) {
            return Err(S2ftError::Generation(format!(
                "reference {i} holds token id {bad}, outside the vocabulary of {}",
                model.config.vocab_size
            )));
        }
    }
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
    let mut out: Vec<Option<Scored>> = vec![None; prompts.len()];
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
        let first = model.forward_cached_padded(ids_tensor::<B>(&rows, &device), &pads, &mut cache);
        let nll: Vec<(f64, usize)> = match references {
            Some(refs) => {
                let refs: Vec<&[u32]> = group.iter().map(|&i| &refs[i][..]).collect();
                reference_nll(model, first.clone(), &cache, &refs)
            }
            None => vec![(0.0, 0); group.len()],
        };
        let mut next = argmax_rows(first);
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
        for ((&i, g), (nll, n)) in group.iter().zip(rows_out).zip(nll) {
            out[i] = Some(Scored {
                generated: g,
                reference_nll: nll,
                reference_tokens: n,
            });
        }
    }
    Ok(out
        .into_iter()
        .map(|g| g.expect("every prompt decoded"))
        .collect())
}

/// Per row, `(−Σ log p(ref_j | prompt, ref_<j), len)`: the first token from
/// the prompt's last logits `first` (`[b, vocab]`), the others from one
/// teacher-forced pass over the reference on a copy of the prompt's cache
/// (rows right-padded to the longest reference; padded positions dropped).
fn reference_nll<B: Backend>(
    model: &Llama<B>,
    first: Tensor<B, 2>,
    cache: &KvCache<B>,
    refs: &[&[u32]],
) -> Vec<(f64, usize)> {
    let device = first.device();
    let b = refs.len();
    let ids = |v: Vec<i64>, shape: [usize; 2]| {
        Tensor::<B, 2, Int>::from_data(TensorData::new(v, shape), &device)
    };
    let to_f64 = |t: Tensor<B, 2>| -> Vec<f64> {
        t.into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .expect("f32 data")
            .into_iter()
            .map(f64::from)
            .collect()
    };
    let r0: Vec<i64> = refs.iter().map(|r| r[0] as i64).collect();
    let lp0 = to_f64(log_softmax(first, 1).gather(1, ids(r0, [b, 1])));
    let mut out: Vec<(f64, usize)> = lp0.iter().zip(refs).map(|(l, r)| (-l, r.len())).collect();
    let longest = refs.iter().map(|r| r.len()).max().unwrap_or(1);
    if longest < 2 {
        return out;
    }
    let t = longest - 1;
    let mut fed = Vec::with_capacity(b * t);
    let mut target = Vec::with_capacity(b * t);
    for r in refs {
        for j in 0..t {
            fed.push(*r.get(j).unwrap_or(&r[0]) as i64);
            target.push(*r.get(j + 1).unwrap_or(&r[0]) as i64);
        }
    }
    let mut fork = cache.clone();
    let logits = model.forward_cached_all(ids(fed, [b, t]), &mut fork);
    let lp = log_softmax(logits, 2)
        .gather(2, ids(target, [b, t]).reshape([b, t, 1]))
        .reshape([b, t]);
    let lp = to_f64(lp);
    for (row, r) in refs.iter().enumerate() {
        out[row].0 -= lp[row * t..row * t + r.len() - 1].iter().sum::<f64>();
    }
    out
}
