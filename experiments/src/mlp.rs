//! A ReLU MLP in Burn (PyTorch layout: `layers.i.weight` `[out, in]`,
//! `layers.i.bias`), converting to and from a `weights::StateDict`, plus a
//! plain-ndarray evaluator for the many interpolated models a study scores.

use anyhow::Context;
use burn::module::{AutodiffModule, Param};
use burn::prelude::*;
use burn::tensor::TensorData;
use burn::tensor::activation::{log_softmax, relu};
use burn::tensor::backend::AutodiffBackend;
use ndarray::{Array2, Axis};
use s2ft_core::model::to_weights;
use weights::rng::SplitMix64;
use weights::{StateDict, Tensor as WTensor};

use crate::data::Split;

/// The MLP.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// `[out, in]` per layer.
    pub weights: Vec<Param<Tensor<B, 2>>>,
    /// `[out]` per layer.
    pub biases: Vec<Param<Tensor<B, 1>>>,
}

/// Layer sizes of an MLP: `inputs`, `depth` hidden layers of `width`, `outputs`.
pub fn layer_sizes(inputs: usize, width: usize, depth: usize, outputs: usize) -> Vec<usize> {
    let mut s = vec![inputs];
    s.extend(std::iter::repeat_n(width, depth));
    s.push(outputs);
    s
}

/// PyTorch's default `nn.Linear` initialisation, seeded: `U(−1/√in, 1/√in)`.
pub fn init_state_dict(sizes: &[usize], seed: u64) -> StateDict {
    let mut rng = SplitMix64::new(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0x1234);
    let mut sd = StateDict::new();
    for (i, w) in sizes.windows(2).enumerate() {
        let bound = 1.0 / (w[0] as f64).sqrt();
        let mut u = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| ((2.0 * rng.uniform() - 1.0) * bound) as f32)
                .collect()
        };
        let wv = u(w[1] * w[0]);
        let bv = u(w[1]);
        sd.insert(
            format!("layers.{i}.weight"),
            WTensor::f32(ndarray::ArrayD::from_shape_vec(vec![w[1], w[0]], wv).expect("shape")),
        );
        sd.insert(
            format!("layers.{i}.bias"),
            WTensor::f32(ndarray::ArrayD::from_shape_vec(vec![w[1]], bv).expect("shape")),
        );
    }
    sd
}

/// The `(layers.i.weight, layers.i.bias)` pairs of an MLP state dict,
/// checked: each weight is `[out, in]` with an `[out]` bias, each layer takes
/// the previous one's outputs, and there is at least one layer.
pub fn layer_params(sd: &StateDict) -> anyhow::Result<Vec<(&WTensor, &WTensor)>> {
    let mut out: Vec<(&WTensor, &WTensor)> = Vec::new();
    for i in 0.. {
        let Some(w) = sd.get(&format!("layers.{i}.weight")) else {
            break;
        };
        let b = sd
            .get(&format!("layers.{i}.bias"))
            .with_context(|| format!("layers.{i}.bias is missing"))?;
        anyhow::ensure!(
            w.shape().len() == 2 && b.shape() == [w.shape()[0]],
            "layers.{i}.weight {:?} and layers.{i}.bias {:?} are not an [out, in] weight and its [out] bias",
            w.shape(),
            b.shape()
        );
        if let Some((prev, _)) = out.last() {
            anyhow::ensure!(
                w.shape()[1] == prev.shape()[0],
                "layers.{i} takes {} inputs but layers.{} gives {}",
                w.shape()[1],
                i - 1,
                prev.shape()[0]
            );
        }
        out.push((w, b));
    }
    anyhow::ensure!(
        !out.is_empty(),
        "no layers.0.weight (not an MLP state dict)"
    );
    Ok(out)
}

fn tensor<B: Backend, const D: usize>(t: &WTensor, device: &B::Device) -> Tensor<B, D> {
    Tensor::from_data(
        TensorData::new(
            t.data.iter().copied().collect::<Vec<f32>>(),
            t.shape().to_vec(),
        ),
        device,
    )
}

impl<B: Backend> Mlp<B> {
    /// From `layers.i.weight` / `layers.i.bias`.
    pub fn from_state_dict(sd: &StateDict, device: &B::Device) -> anyhow::Result<Self> {
        let (weights, biases) = layer_params(sd)?
            .into_iter()
            .map(|(w, b)| {
                (
                    Param::from_tensor(tensor::<B, 2>(w, device)),
                    Param::from_tensor(tensor::<B, 1>(b, device)),
                )
            })
            .unzip();
        Ok(Mlp { weights, biases })
    }

    /// To `layers.i.weight` / `layers.i.bias`.
    pub fn to_state_dict(&self) -> StateDict {
        let mut sd = StateDict::new();
        for (i, (w, b)) in self.weights.iter().zip(&self.biases).enumerate() {
            sd.insert(format!("layers.{i}.weight"), to_weights(w.val()));
            sd.insert(format!("layers.{i}.bias"), to_weights(b.val()));
        }
        sd
    }

    /// Logits for `x` (`[n, in]`).
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let ws: Vec<Tensor<B, 2>> = self.weights.iter().map(|w| w.val()).collect();
        let bs: Vec<Tensor<B, 1>> = self.biases.iter().map(|b| b.val()).collect();
        forward_with(&ws, &bs, x)
    }
}

/// The MLP forward with explicit weights (for straight-through training).
pub fn forward_with<B: Backend>(
    ws: &[Tensor<B, 2>],
    bs: &[Tensor<B, 1>],
    mut x: Tensor<B, 2>,
) -> Tensor<B, 2> {
    let last = ws.len() - 1;
    for (i, (w, b)) in ws.iter().zip(bs).enumerate() {
        x = x.matmul(w.clone().transpose()) + b.clone().unsqueeze::<2>();
        if i < last {
            x = relu(x);
        }
    }
    x
}

/// Mean cross-entropy of logits against labels.
pub fn cross_entropy<B: Backend>(logits: Tensor<B, 2>, y: &[usize]) -> Tensor<B, 1> {
    let n = y.len();
    let t = Tensor::<B, 2, Int>::from_data(
        TensorData::new(y.iter().map(|&v| v as i64).collect::<Vec<_>>(), [n, 1]),
        &logits.device(),
    );
    log_softmax(logits, 1).gather(1, t).mean().neg()
}

/// Burn tensor of a batch of rows.
pub fn batch<B: Backend>(x: &Array2<f32>, device: &B::Device) -> Tensor<B, 2> {
    let (n, d) = x.dim();
    Tensor::from_data(
        TensorData::new(
            x.as_standard_layout().iter().copied().collect::<Vec<f32>>(),
            [n, d],
        ),
        device,
    )
}

impl<B: Backend> crate::train::Classifier<B> for Mlp<B> {
    fn logits(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.forward(x)
    }
    fn device(&self) -> B::Device {
        self.weights[0].val().device()
    }
}

/// Trains an MLP with Adam (batches in an order shuffled each epoch by a
/// SplitMix64 stream from `seed ^ 0xA5A5`; see [`crate::train::train`]).
pub fn train<B: AutodiffBackend>(
    model: Mlp<B>,
    data: &Split,
    epochs: usize,
    batch_size: usize,
    lr: f64,
    seed: u64,
    bar: &indicatif::ProgressBar,
) -> Mlp<B>
where
    Mlp<B>: AutodiffModule<B>,
{
    let mut rng = SplitMix64::new(seed ^ 0xA5A5);
    crate::train::train(
        model,
        data,
        (epochs, batch_size, lr),
        |o| rng.shuffle(o),
        bar,
    )
}

/// Every layer's pre-activation output `h·Wᵀ + b` in plain ndarray (the
/// hidden layers before their ReLU, then the logits).
pub fn pre_activations(sd: &StateDict, x: &Array2<f32>) -> Vec<Array2<f32>> {
    let layers = layer_params(sd).expect("an MLP state dict");
    let mut outs: Vec<Array2<f32>> = Vec::new();
    for (w, b) in &layers {
        let w = w
            .data
            .view()
            .into_dimensionality::<ndarray::Ix2>()
            .expect("2-D");
        let b = b
            .data
            .view()
            .into_dimensionality::<ndarray::Ix1>()
            .expect("1-D");
        let h = match outs.last() {
            Some(prev) => prev.mapv(|v| v.max(0.0)).dot(&w.t()),
            None => x.dot(&w.t()),
        };
        outs.push(h + b.insert_axis(Axis(0)));
    }
    outs
}

/// Every layer's output in plain ndarray: the post-ReLU hidden layers, then the logits.
pub fn layer_outputs(sd: &StateDict, x: &Array2<f32>) -> Vec<Array2<f32>> {
    let mut outs = pre_activations(sd, x);
    let hidden = outs.len().saturating_sub(1);
    for h in &mut outs[..hidden] {
        h.mapv_inplace(|v| v.max(0.0));
    }
    outs
}

/// `(mean cross-entropy, accuracy)` of a state dict's MLP on `data`, in plain ndarray.
pub fn evaluate(sd: &StateDict, data: &Split) -> (f64, f64) {
    let x = layer_outputs(sd, &data.x)
        .pop()
        .expect("at least one layer");
    let (mut loss, mut correct) = (0f64, 0usize);
    for (row, &y) in x.rows().into_iter().zip(&data.y) {
        let m = row.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
        let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
        loss += lse - row[y] as f64;
        let arg = row
            .iter()
            .enumerate()
            .fold((0, f32::MIN), |a, (k, &v)| if v > a.1 { (k, v) } else { a })
            .0;
        correct += usize::from(arg == y);
    }
    let n = data.y.len().max(1) as f64;
    (loss / n, correct as f64 / n)
}

/// Hidden activations (post-ReLU) per hidden layer, keyed by the MLP spec's group names `P_i`.
pub fn hidden_activations(
    sd: &StateDict,
    x: &Array2<f32>,
) -> indexmap::IndexMap<String, Array2<f32>> {
    let mut outs = layer_outputs(sd, x);
    outs.pop();
    outs.into_iter()
        .enumerate()
        .map(|(i, h)| (permute::builders::mlp_group(i), h))
        .collect()
}
