//! The training loop shared by full fine-tuning, LoRA and S²FT: next-token
//! cross-entropy, AdamW over whatever the model marks trainable (frozen
//! weights have no gradient and no optimizer state), a clear stop on a
//! non-finite loss that hands back the last good model.

use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::TensorData;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::AutodiffBackend;

use crate::error::S2ftError;
use crate::model::Llama;

/// Mean next-token cross-entropy of `tokens` (`[b, t]`, predicting `t − 1` positions).
pub fn lm_loss<B: Backend>(model: &Llama<B>, tokens: Tensor<B, 2, Int>) -> Tensor<B, 1> {
    token_nll(model, tokens).mean()
}

/// The negative log-likelihood of every predicted token, `[b, t − 1]`.
fn token_nll<B: Backend>(model: &Llama<B>, tokens: Tensor<B, 2, Int>) -> Tensor<B, 2> {
    let [b, t] = tokens.dims();
    let logits = model.forward(tokens.clone().narrow(1, 0, t - 1));
    let v = model.config.vocab_size;
    let logp = log_softmax(logits.reshape([b * (t - 1), v]), 1);
    let target = tokens.narrow(1, 1, t - 1).reshape([b * (t - 1), 1]);
    logp.gather(1, target).reshape([b, t - 1]).neg()
}

/// Mean cross-entropy over the predicted positions where `mask` (`[b, t − 1]`,
/// 1 = counted, 0 = ignored; other values weight the position) is non-zero:
/// supervised fine-tuning's loss, which ignores the prompt (Hugging Face's
/// label −100). The LM head runs on the counted positions only (for a short
/// answer after a long prompt, most of the head's cost is saved). An
/// all-zero mask gives 0.
pub fn lm_loss_masked<B: Backend>(
    model: &Llama<B>,
    tokens: Tensor<B, 2, Int>,
    mask: Tensor<B, 2>,
) -> Tensor<B, 1> {
    let [b, t] = tokens.dims();
    let device = tokens.device();
    let weights: Vec<f32> = mask
        .into_data()
        .convert::<f32>()
        .into_vec()
        .expect("f32 mask");
    let (idx, w): (Vec<i64>, Vec<f32>) = weights
        .iter()
        .enumerate()
        .filter(|(_, m)| **m != 0.0)
        .map(|(i, m)| (i as i64, *m))
        .unzip();
    if idx.is_empty() {
        return Tensor::zeros([1], &device);
    }
    let n = idx.len();
    let total: f32 = w.iter().sum();
    let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [n]), &device);
    let h = model.config.hidden_size;
    let hidden = model
        .hidden(tokens.clone().narrow(1, 0, t - 1))
        .reshape([b * (t - 1), h])
        .select(0, idx.clone());
    let logp = log_softmax(model.head(hidden), 1);
    let target = tokens
        .narrow(1, 1, t - 1)
        .reshape([b * (t - 1)])
        .select(0, idx)
        .reshape([n, 1]);
    let nll = logp.gather(1, target).reshape([n]).neg();
    let w = Tensor::<B, 1>::from_data(TensorData::new(w, [n]), &device);
    (nll * w).sum().div_scalar(total.max(1.0))
}

/// One training batch: tokens and, for supervised fine-tuning, the loss mask
/// of [`lm_loss_masked`].
pub struct Batch<B: Backend> {
    /// `[b, t]` token ids.
    pub tokens: Tensor<B, 2, Int>,
    /// `[b, t − 1]` loss mask; `None` counts every position.
    pub mask: Option<Tensor<B, 2>>,
}

impl<B: Backend> From<Tensor<B, 2, Int>> for Batch<B> {
    fn from(tokens: Tensor<B, 2, Int>) -> Self {
        Batch { tokens, mask: None }
    }
}

/// Optimiser settings.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    /// Learning rate.
    pub lr: f64,
    /// Steps.
    pub steps: usize,
    /// Decoupled weight decay (AdamW).
    pub weight_decay: f32,
    /// How the rate moves over the steps.
    #[serde(default)]
    pub schedule: LrSchedule,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            lr: 1e-3,
            steps: 100,
            weight_decay: 0.0,
            schedule: LrSchedule::Constant,
        }
    }
}

/// The learning rate over the steps, as a factor of [`TrainConfig::lr`].
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    /// The same rate at every step.
    #[default]
    Constant,
    /// A linear warm-up from 0 over `warmup` steps, then a linear decay
    /// towards 0 (the last step runs at `1 / (steps − warmup)` of the rate,
    /// 0 is reached after it): transformers' `get_linear_schedule_with_warmup`
    /// (the `Trainer`'s default `lr_scheduler_type="linear"`), step for step.
    Linear {
        /// Warm-up steps.
        warmup: usize,
    },
}

impl LrSchedule {
    /// The linear schedule with `ceil(ratio · steps)` warm-up steps
    /// (transformers' `warmup_ratio`).
    pub fn linear_with_warmup_ratio(ratio: f64, steps: usize) -> Self {
        LrSchedule::Linear {
            warmup: (ratio * steps as f64).ceil() as usize,
        }
    }

    /// The factor applied to the rate at `step` (0-based) of `steps`.
    pub fn factor(&self, step: usize, steps: usize) -> f64 {
        match *self {
            LrSchedule::Constant => 1.0,
            LrSchedule::Linear { warmup } if step < warmup => step as f64 / warmup.max(1) as f64,
            LrSchedule::Linear { warmup } => (steps.saturating_sub(step) as f64
                / steps.saturating_sub(warmup).max(1) as f64)
                .max(0.0),
        }
    }
}

/// What [`train`] returns: the model after the last good step and the losses.
pub struct TrainOutcome<B: AutodiffBackend> {
    /// The trained model; after a non-finite loss, the last model whose loss was finite.
    pub model: Llama<B>,
    /// Loss before each step.
    pub losses: Vec<f32>,
    /// Set when training stopped early (non-finite loss).
    pub stopped: Option<S2ftError>,
    /// Wall time of each completed step (drawing the batch, forward,
    /// backward, update), seconds.
    pub step_seconds: Vec<f64>,
}

impl<B: AutodiffBackend> TrainOutcome<B> {
    /// Median step time in milliseconds, leaving out the first (warm-up)
    /// step; NaN with fewer than two steps.
    pub fn median_step_ms(&self) -> f64 {
        let ms: Vec<f64> = self.step_seconds.iter().skip(1).map(|s| s * 1e3).collect();
        weights::stats::median(&ms)
    }
}

/// Trains `model` for `cfg.steps` AdamW steps (the rate following
/// `cfg.schedule`) on `batch(step)`: token ids
/// (every position counted) or a [`Batch`] with a loss mask.
pub fn train<B: AutodiffBackend, T: Into<Batch<B>>>(
    model: Llama<B>,
    mut batch: impl FnMut(usize) -> T,
    cfg: &TrainConfig,
) -> TrainOutcome<B>
where
    Llama<B>: AutodiffModule<B>,
{
    let mut optim = AdamWConfig::new()
        .with_weight_decay(cfg.weight_decay)
        .init::<B, Llama<B>>();
    let mut model = model;
    // The model before the last update (tensors are shared, so this costs no copy).
    let mut last_good: Option<Llama<B>> = None;
    let mut losses = Vec::with_capacity(cfg.steps);
    let mut step_seconds = Vec::with_capacity(cfg.steps);
    for step in 0..cfg.steps {
        let start = std::time::Instant::now();
        let Batch { tokens, mask } = batch(step).into();
        let loss = match mask {
            Some(m) => lm_loss_masked(&model, tokens, m),
            None => lm_loss(&model, tokens),
        };
        let value: f32 = loss.clone().into_scalar().elem();
        if !value.is_finite() {
            return TrainOutcome {
                model: last_good.unwrap_or(model),
                losses,
                stopped: Some(S2ftError::Training {
                    step,
                    msg: format!(
                        "loss is {value}; the returned model is the last one whose loss was finite"
                    ),
                }),
                step_seconds,
            };
        }
        last_good = Some(model.clone());
        losses.push(value);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let lr = cfg.lr * cfg.schedule.factor(step, cfg.steps);
        model = optim.step(lr, model, grads);
        step_seconds.push(start.elapsed().as_secs_f64());
    }
    TrainOutcome {
        model,
        losses,
        stopped: None,
        step_seconds,
    }
}

#[cfg(test)]
mod tests {
    use super::LrSchedule;

    /// transformers 4.x `get_linear_schedule_with_warmup(opt, 3, 10)`: the
    /// rate of each of the ten steps, read from `param_groups[0]["lr"]`
    /// before each `optimizer.step()` (base rate 1).
    #[test]
    fn the_linear_schedule_is_transformers_step_for_step() {
        let reference = [
            0.0,
            0.333_333_333_333_333_3,
            0.666_666_666_666_666_6,
            1.0,
            0.857_142_857_142_857_1,
            0.714_285_714_285_714_3,
            0.571_428_571_428_571_4,
            0.428_571_428_571_428_55,
            0.285_714_285_714_285_7,
            0.142_857_142_857_142_85,
        ];
        let s = LrSchedule::Linear { warmup: 3 };
        for (step, want) in reference.iter().enumerate() {
            let got = s.factor(step, 10);
            assert!((got - want).abs() < 1e-15, "step {step}: {got} vs {want}");
        }
        // Without warm-up the first step runs at the full rate.
        assert_eq!(LrSchedule::Linear { warmup: 0 }.factor(0, 10), 1.0);
        assert_eq!(LrSchedule::Constant.factor(7, 10), 1.0);
        // transformers' `warmup_ratio` rounds up.
        assert_eq!(
            LrSchedule::linear_with_warmup_ratio(0.1, 150),
            LrSchedule::Linear { warmup: 15 }
        );
        assert_eq!(
            LrSchedule::linear_with_warmup_ratio(0.1, 16),
            LrSchedule::Linear { warmup: 2 }
        );
    }
}
