//! The one Adam loop that trains the image classifiers (the MLP, the
//! LayerNorm ResNet and the VGG-style CNN): cross-entropy on mini-batches in
//! an order the caller's shuffle rearranges at the start of every epoch.

use burn::module::AutodiffModule;
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

use crate::data::Split;
use crate::mlp::{batch, cross_entropy};

/// A network that maps image rows `[n, pixels]` to logits: what [`train`]
/// and [`crate::cnn::evaluate_model`] need of a model.
pub trait Classifier<B: Backend> {
    /// Logits `[n, classes]`.
    fn logits(&self, x: Tensor<B, 2>) -> Tensor<B, 2>;
    /// The device its parameters live on.
    fn device(&self) -> B::Device;
}

/// Trains `model` with Adam (Burn's defaults, learning rate `lr`) for
/// `epochs` passes over `data` in batches of `batch_size`; `shuffle`
/// reorders the sample indices (kept from one epoch to the next) before
/// each epoch. One step per batch ticks `bar`.
pub fn train<B: AutodiffBackend, M: AutodiffModule<B> + Classifier<B>>(
    mut model: M,
    data: &Split,
    (epochs, batch_size, lr): (usize, usize, f64),
    mut shuffle: impl FnMut(&mut [usize]),
    bar: &indicatif::ProgressBar,
) -> M {
    let device = model.device();
    let mut optim = AdamConfig::new().init::<B, M>();
    let mut order: Vec<usize> = (0..data.y.len()).collect();
    for _ in 0..epochs {
        shuffle(&mut order);
        for chunk in order.chunks(batch_size) {
            let b = data.rows(chunk);
            let loss = cross_entropy(model.logits(batch::<B>(&b.x, &device)), &b.y);
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(lr, model, grads);
            bar.inc(1);
        }
    }
    model
}
