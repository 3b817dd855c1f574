//! A real LLM on the instruction tasks of [`crate::tasks`]: prompts through
//! the model's chat template, supervised fine-tuning batches (loss on the
//! answer and the end-of-turn tokens only), scoring by exact match of greedy
//! decoding, and held-out language-modelling loss on vendored text.

use anyhow::{Context, ensure};
use burn::prelude::*;
use burn::tensor::TensorData;
use s2ft_core::generate::{GenerationConfig, greedy_scored};
use s2ft_core::tokenizer::{ChatMessage, Tokenizer};
use s2ft_core::train::{Batch, lm_loss};
use s2ft_core::{Llama, LlamaConfig};

use crate::tasks::{Example, exact_match};

/// How examples become token ids for one model.
pub struct Prompter<'a> {
    /// The model's tokenizer.
    pub tok: &'a Tokenizer,
    /// What ends an assistant turn (`<|im_end|>\n` for ChatML), as ids.
    pub end_of_turn: Vec<u32>,
    /// The id padding fills batches with (never counted).
    pub pad: u32,
}

impl<'a> Prompter<'a> {
    /// For `tok`; errors when the template drops the answer or no stop token exists.
    pub fn new(tok: &'a Tokenizer) -> anyhow::Result<Self> {
        let eot = tok.end_of_turn()?;
        let end_of_turn = tok.encode(&eot)?;
        ensure!(
            end_of_turn
                .first()
                .is_some_and(|t| tok.stop_ids().contains(t)),
            "the chat template ends a turn with {eot:?}, which does not start with a stop token ({:?})",
            tok.stop_ids()
        );
        Ok(Prompter {
            tok,
            pad: end_of_turn[0],
            end_of_turn,
        })
    }

    /// The prompt's ids: the user turn in the chat template, with the assistant header.
    pub fn prompt(&self, ex: &Example) -> anyhow::Result<Vec<u32>> {
        let text = self.tok.chat_prompt(&[ChatMessage::user(&ex.prompt)])?;
        Ok(self.tok.encode(&text)?)
    }

    /// The completion the model is trained to write: the answer, then the end of turn.
    pub fn completion(&self, ex: &Example) -> anyhow::Result<Vec<u32>> {
        let mut ids = self.tok.encode(&ex.answer)?;
        ids.extend(&self.end_of_turn);
        Ok(ids)
    }

    /// Encodes a set of examples.
    pub fn encode(&self, examples: Vec<Example>) -> anyhow::Result<EncodedSet> {
        let mut prompts = Vec::with_capacity(examples.len());
        let mut completions = Vec::with_capacity(examples.len());
        for ex in &examples {
            prompts.push(self.prompt(ex)?);
            completions.push(self.completion(ex)?);
        }
        Ok(EncodedSet {
            examples,
            prompts,
            completions,
        })
    }
}

/// Examples with their prompt and completion ids.
#[derive(Clone, Debug)]
pub struct EncodedSet {
    /// The examples.
    pub examples: Vec<Example>,
    /// Prompt ids per example.
    pub prompts: Vec<Vec<u32>>,
    /// Completion ids (answer + end of turn) per example.
    pub completions: Vec<Vec<u32>>,
}

impl EncodedSet {
    /// The longest prompt + completion, in tokens.
    pub fn max_len(&self) -> usize {
        self.prompts
            .iter()
            .zip(&self.completions)
            .map(|(p, c)| p.len() + c.len())
            .max()
            .unwrap_or(0)
    }
}

/// A supervised fine-tuning batch: each row is prompt + completion, padded
/// on the right with `pad`; only the completion's tokens are predicted
/// (mask 1), so the right padding never reaches a counted position.
pub fn sft_batch<B: Backend>(pairs: &[(&[u32], &[u32])], pad: u32, device: &B::Device) -> Batch<B> {
    let t = pairs
        .iter()
        .map(|(p, c)| p.len() + c.len())
        .max()
        .unwrap_or(1);
    let b = pairs.len();
    let mut tokens = vec![pad as i64; b * t];
    let mut mask = vec![0f32; b * (t - 1)];
    for (row, (p, c)) in pairs.iter().enumerate() {
        for (j, &id) in p.iter().chain(c.iter()).enumerate() {
            tokens[row * t + j] = id as i64;
        }
        // Position j predicts token j + 1: the completion's tokens sit at p.len()…
        for j in p.len()..p.len() + c.len() {
            mask[row * (t - 1) + j - 1] = 1.0;
        }
    }
    Batch {
        tokens: Tensor::from_data(TensorData::new(tokens, [b, t]), device),
        mask: Some(Tensor::from_data(TensorData::new(mask, [b, t - 1]), device)),
    }
}

/// A model's score on one evaluation set.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct SetScore {
    /// Exact-match accuracy of greedy decoding.
    pub acc: f64,
    /// Teacher-forced cross-entropy of the reference completion (nats/token).
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub answer_loss: f64,
    /// Examples scored.
    pub n: usize,
    /// A few (prompt, reference, greedy answer) triples for the report.
    pub samples: Vec<(String, String, String)>,
}

/// Decoding settings for a set: room for its longest completion plus slack.
pub fn generation_config(
    set: &EncodedSet,
    tok: &Tokenizer,
    config: &LlamaConfig,
    batch: usize,
) -> GenerationConfig {
    let longest = set.completions.iter().map(Vec::len).max().unwrap_or(1);
    GenerationConfig {
        max_new_tokens: longest + 4,
        stop_ids: tok.stop_ids().to_vec(),
        batch_size: batch,
        max_positions: config.max_position_embeddings.unwrap_or(usize::MAX),
    }
}

/// Scores `model` on `set`: greedy answers by exact match, and the
/// teacher-forced loss of the references (on the same prompt caches).
pub fn score_set<B: Backend>(
    model: &Llama<B>,
    set: &EncodedSet,
    prompter: &Prompter<'_>,
    batch: usize,
) -> anyhow::Result<SetScore> {
    let cfg = generation_config(set, prompter.tok, &model.config, batch);
    let outs = greedy_scored(model, &set.prompts, &set.completions, &cfg)?;
    let mut hits = 0usize;
    let mut samples = Vec::new();
    let (mut nll, mut count) = (0f64, 0usize);
    for (ex, s) in set.examples.iter().zip(&outs) {
        let text = prompter.tok.decode(&s.generated.ids, false)?;
        hits += usize::from(exact_match(&text, s.generated.stopped, &ex.answer));
        if samples.len() < 3 {
            samples.push((ex.prompt.clone(), ex.answer.clone(), text));
        }
        nll += s.reference_nll;
        count += s.reference_tokens;
    }
    let n = set.examples.len();
    Ok(SetScore {
        acc: hits as f64 / n.max(1) as f64,
        answer_loss: nll / count.max(1) as f64,
        n,
        samples,
    })
}

/// Fixed windows of `len` tokens from `text`, `count` of them evenly spaced.
pub fn text_windows(
    tok: &Tokenizer,
    text: &str,
    count: usize,
    len: usize,
    what: &str,
) -> anyhow::Result<Vec<Vec<u32>>> {
    let ids = tok
        .encode(text)
        .with_context(|| format!("tokenizing {what}"))?;
    ensure!(
        ids.len() >= count * len,
        "{what}: {} tokens, fewer than {count} windows of {len}",
        ids.len()
    );
    let stride = ids.len() / count;
    Ok((0..count)
        .map(|k| ids[k * stride..k * stride + len].to_vec())
        .collect())
}

/// Mean next-token cross-entropy (nats/token) of `model` over `windows`.
pub fn text_loss<B: Backend>(model: &Llama<B>, windows: &[Vec<u32>], batch: usize) -> f64 {
    let device = model.embed_tokens.val().device();
    let (mut total, mut count) = (0f64, 0usize);
    for chunk in windows.chunks(batch.max(1)) {
        let t = chunk[0].len();
        let data: Vec<i64> = chunk.iter().flatten().map(|&i| i as i64).collect();
        let tokens =
            Tensor::<B, 2, Int>::from_data(TensorData::new(data, [chunk.len(), t]), &device);
        let loss: f32 = lm_loss(model, tokens).into_scalar().elem();
        let n = chunk.len() * (t - 1);
        total += loss as f64 * n as f64;
        count += n;
    }
    total / count.max(1) as f64
}
