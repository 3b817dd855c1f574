//! A small ResNet with LayerNorm in Burn, under torchvision's names
//! (`conv1`, `bn1`, `layerS.0.{conv1,bn1,conv2,bn2}`, `layerS.0.downsample.{0,1}`,
//! `fc`), so `permute::builders::resnet`, `merge` and `spectra` work on its
//! state dict directly.
//!
//! As in Git Re-Basin's ResNet experiments, the normalisation is a LayerNorm
//! over channels at every pixel instead of BatchNorm: it has no running
//! statistics, so interpolated and merged models need no re-estimation
//! ("REPAIR") to be evaluated, and it commutes with channel permutations
//! (per-channel weight and bias move with their channels).
//!
//! Shape: a 3×3 stem of width `w`, then one basic block per stage with widths
//! `w, 2w, 4w` (stride 2 and a 1×1 projection shortcut from stage 2 on),
//! global average pooling and a linear classifier.

use burn::module::{AutodiffModule, Param};
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::TensorData;
use burn::tensor::activation::relu;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ops::PadMode;
use s2ft_core::model::to_weights;
use weights::{StateDict, Tensor as WTensor};

use crate::data::Split;
use crate::mlp::cross_entropy;

/// LayerNorm over the channel axis, ε = 1e-5. Activations are kept
/// channels-last (`[n, h, w, c]`) inside the network, so this reduction and
/// the convolutions' GEMMs run over contiguous memory.
#[derive(Module, Debug)]
pub struct ChannelNorm<B: Backend> {
    /// Per-channel scale.
    pub weight: Param<Tensor<B, 1>>,
    /// Per-channel shift.
    pub bias: Param<Tensor<B, 1>>,
}

impl<B: Backend> ChannelNorm<B> {
    /// Normalises every pixel's channel vector of `[n, h, w, c]`, then scales and shifts.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let c = x.dims()[3];
        let mean = x.clone().mean_dim(3);
        let centred = x - mean;
        let var = centred.clone().powi_scalar(2).mean_dim(3);
        let y = centred / (var + 1e-5).sqrt();
        y * self.weight.val().reshape([1, 1, 1, c]) + self.bias.val().reshape([1, 1, 1, c])
    }
}

/// A basic residual block.
#[derive(Module, Debug)]
pub struct BasicBlock<B: Backend> {
    /// 3×3, `[out, in, 3, 3]`, stride `stride`.
    pub conv1: Param<Tensor<B, 4>>,
    /// After `conv1`.
    pub bn1: ChannelNorm<B>,
    /// 3×3, `[out, out, 3, 3]`.
    pub conv2: Param<Tensor<B, 4>>,
    /// After `conv2`.
    pub bn2: ChannelNorm<B>,
    /// 1×1 projection shortcut, when the shape changes.
    pub down_conv: Option<Param<Tensor<B, 4>>>,
    /// Its norm.
    pub down_norm: Option<ChannelNorm<B>>,
    /// Stride of `conv1` and the shortcut.
    #[module(skip)]
    pub stride: usize,
}

/// The network.
#[derive(Module, Debug)]
pub struct ResNet<B: Backend> {
    /// Stem, `[w, in_channels, 3, 3]`.
    pub conv1: Param<Tensor<B, 4>>,
    /// Stem norm.
    pub bn1: ChannelNorm<B>,
    /// One block per stage (`layer1.0`, `layer2.0`, …).
    pub blocks: Vec<BasicBlock<B>>,
    /// Classifier `[classes, 4w]`.
    pub fc_weight: Param<Tensor<B, 2>>,
    /// Classifier bias.
    pub fc_bias: Param<Tensor<B, 1>>,
}

/// Convolution of channels-last `[n, h, w, c]` with a PyTorch-layout weight
/// `[o, c, k, k]`, "same" padding, as one GEMM over im2col patches (Burn's
/// ndarray `conv2d` is several times slower on these shapes); stride 2 keeps
/// every other row and column of the stride-1 output.
fn conv<B: Backend>(x: Tensor<B, 4>, w: &Param<Tensor<B, 4>>, stride: usize) -> Tensor<B, 4> {
    let w = w.val();
    let [o, c, k, _] = w.dims();
    let [n, h, wd, _] = x.dims();
    let p = k / 2;
    let xp = if p > 0 {
        x.pad([(p, p), (p, p), (0, 0)], PadMode::Constant(0.0))
    } else {
        x
    };
    // Σ over the k·k kernel taps of (shifted input) · W[:, :, di, dj]ᵀ: one
    // GEMM per tap (concatenating the taps first is slower in Burn's ndarray).
    let wt = w.permute([2, 3, 1, 0]); // [k, k, c, o]
    let mut out: Option<Tensor<B, 2>> = None;
    for di in 0..k {
        for dj in 0..k {
            let tap = xp
                .clone()
                .slice([0..n, di..di + h, dj..dj + wd, 0..c])
                .reshape([n * h * wd, c]);
            let wk = wt
                .clone()
                .slice([di..di + 1, dj..dj + 1, 0..c, 0..o])
                .reshape([c, o]);
            let y = tap.matmul(wk);
            out = Some(match out {
                Some(acc) => acc + y,
                None => y,
            });
        }
    }
    let out = out.expect("k ≥ 1").reshape([n, h, wd, o]);
    if stride == 2 && h % 2 == 0 && wd % 2 == 0 {
        out.reshape([n, h / 2, 2, wd / 2, 2, o])
            .narrow(2, 0, 1)
            .narrow(4, 0, 1)
            .reshape([n, h / 2, wd / 2, o])
    } else if stride > 1 {
        // Odd sides: the strided positions one by one.
        let rows: Vec<usize> = (0..h).step_by(stride).collect();
        let cols: Vec<usize> = (0..wd).step_by(stride).collect();
        let device = out.device();
        let ri = Tensor::<B, 1, Int>::from_data(
            TensorData::new(
                rows.iter().map(|&r| r as i64).collect::<Vec<_>>(),
                [rows.len()],
            ),
            &device,
        );
        let ci = Tensor::<B, 1, Int>::from_data(
            TensorData::new(
                cols.iter().map(|&r| r as i64).collect::<Vec<_>>(),
                [cols.len()],
            ),
            &device,
        );
        out.select(1, ri).select(2, ci)
    } else {
        out
    }
}

impl<B: Backend> BasicBlock<B> {
    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let h = relu(self.bn1.forward(conv(x.clone(), &self.conv1, self.stride)));
        let h = self.bn2.forward(conv(h, &self.conv2, 1));
        let short = match (&self.down_conv, &self.down_norm) {
            (Some(c), Some(n)) => n.forward(conv(x, c, self.stride)),
            _ => x,
        };
        relu(h + short)
    }
}

fn burn_tensor<B: Backend, const D: usize>(
    sd: &StateDict,
    name: &str,
    shape: Option<&[usize]>,
    device: &B::Device,
) -> anyhow::Result<Param<Tensor<B, D>>> {
    let t = sd
        .get(name)
        .ok_or_else(|| anyhow::anyhow!("'{name}' is missing from the ResNet state dict"))?;
    anyhow::ensure!(
        t.shape().len() == D && shape.is_none_or(|s| s == t.shape()),
        "'{name}' has shape {:?}, expected {}",
        t.shape(),
        shape.map_or(format!("{D} axes"), |s| format!("{s:?}"))
    );
    if let Some(x) = t.data.iter().find(|x| !x.is_finite()) {
        anyhow::bail!("'{name}' holds a non-finite value {x}");
    }
    Ok(Param::from_tensor(Tensor::from_data(
        TensorData::new(
            t.data.iter().copied().collect::<Vec<f32>>(),
            t.shape().to_vec(),
        ),
        device,
    )))
}

fn norm_from<B: Backend>(
    sd: &StateDict,
    prefix: &str,
    c: usize,
    device: &B::Device,
) -> anyhow::Result<ChannelNorm<B>> {
    Ok(ChannelNorm {
        weight: burn_tensor(sd, &format!("{prefix}.weight"), Some(&[c]), device)?,
        bias: burn_tensor(sd, &format!("{prefix}.bias"), Some(&[c]), device)?,
    })
}

impl<B: Backend> ResNet<B> {
    /// From torchvision-style names; every tensor is checked (present,
    /// shaped consistently, finite).
    pub fn from_state_dict(sd: &StateDict, device: &B::Device) -> anyhow::Result<Self> {
        let conv1: Param<Tensor<B, 4>> = burn_tensor(sd, "conv1.weight", None, device)?;
        let [w, _, _, _] = conv1.val().dims();
        let bn1 = norm_from(sd, "bn1", w, device)?;
        let mut blocks = Vec::new();
        let mut c = w;
        for s in 1.. {
            let p = format!("layer{s}.0");
            if !sd.contains(&format!("{p}.conv1.weight")) {
                break;
            }
            let c1: Param<Tensor<B, 4>> =
                burn_tensor(sd, &format!("{p}.conv1.weight"), None, device)?;
            let [out, inp, _, _] = c1.val().dims();
            anyhow::ensure!(
                inp == c,
                "'{p}.conv1.weight' reads {inp} channels, the previous stage writes {c}"
            );
            let has_down = sd.contains(&format!("{p}.downsample.0.weight"));
            blocks.push(BasicBlock {
                conv1: c1,
                bn1: norm_from(sd, &format!("{p}.bn1"), out, device)?,
                conv2: burn_tensor(
                    sd,
                    &format!("{p}.conv2.weight"),
                    Some(&[out, out, 3, 3]),
                    device,
                )?,
                bn2: norm_from(sd, &format!("{p}.bn2"), out, device)?,
                down_conv: if has_down {
                    Some(burn_tensor(
                        sd,
                        &format!("{p}.downsample.0.weight"),
                        Some(&[out, c, 1, 1]),
                        device,
                    )?)
                } else {
                    None
                },
                down_norm: if has_down {
                    Some(norm_from(sd, &format!("{p}.downsample.1"), out, device)?)
                } else {
                    None
                },
                stride: if has_down { 2 } else { 1 },
            });
            anyhow::ensure!(
                has_down || out == c,
                "'{p}' changes width {c} → {out} without a downsample shortcut"
            );
            c = out;
        }
        let fc_weight: Param<Tensor<B, 2>> = burn_tensor(sd, "fc.weight", None, device)?;
        let [classes, fin] = fc_weight.val().dims();
        anyhow::ensure!(
            fin == c,
            "'fc.weight' reads {fin} features, the last stage writes {c}"
        );
        let fc_bias = burn_tensor(sd, "fc.bias", Some(&[classes]), device)?;
        Ok(ResNet {
            conv1,
            bn1,
            blocks,
            fc_weight,
            fc_bias,
        })
    }

    /// To torchvision-style names.
    pub fn to_state_dict(&self) -> StateDict {
        let mut sd = StateDict::new();
        let norm = |sd: &mut StateDict, p: &str, n: &ChannelNorm<B>| {
            sd.insert(format!("{p}.weight"), to_weights(n.weight.val()));
            sd.insert(format!("{p}.bias"), to_weights(n.bias.val()));
        };
        sd.insert("conv1.weight", to_weights(self.conv1.val()));
        norm(&mut sd, "bn1", &self.bn1);
        for (i, b) in self.blocks.iter().enumerate() {
            let p = format!("layer{}.0", i + 1);
            sd.insert(format!("{p}.conv1.weight"), to_weights(b.conv1.val()));
            norm(&mut sd, &format!("{p}.bn1"), &b.bn1);
            sd.insert(format!("{p}.conv2.weight"), to_weights(b.conv2.val()));
            norm(&mut sd, &format!("{p}.bn2"), &b.bn2);
            if let (Some(c), Some(n)) = (&b.down_conv, &b.down_norm) {
                sd.insert(format!("{p}.downsample.0.weight"), to_weights(c.val()));
                norm(&mut sd, &format!("{p}.downsample.1"), n);
            }
        }
        sd.insert("fc.weight", to_weights(self.fc_weight.val()));
        sd.insert("fc.bias", to_weights(self.fc_bias.val()));
        sd
    }

    /// Logits for images as rows `[n, channels · side²]`.
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let [n, d] = x.dims();
        let cin = self.conv1.val().dims()[1];
        let side = ((d / cin) as f64).sqrt() as usize;
        // Rows are channel-major (PyTorch's NCHW flattened) → channels-last.
        let x = x.reshape([n, cin, side, side]).permute([0, 2, 3, 1]);
        let mut h = relu(self.bn1.forward(conv(x, &self.conv1, 1)));
        for b in &self.blocks {
            h = b.forward(h);
        }
        let [n, hh, ww, c] = h.dims();
        let pooled = h.reshape([n, hh * ww, c]).mean_dim(1).reshape([n, c]);
        pooled.matmul(self.fc_weight.val().transpose()) + self.fc_bias.val().unsqueeze()
    }
}

/// A seeded initial state dict: Kaiming-normal convolutions, unit norms,
/// PyTorch's default uniform classifier. `width` is the stem's channels.
pub fn init_state_dict(in_channels: usize, width: usize, classes: usize, seed: u64) -> StateDict {
    let mut rng = spectra::rng::Rng::new(seed);
    let mut sd = StateDict::new();
    let mut conv = |sd: &mut StateDict, name: String, o: usize, i: usize, k: usize| {
        let std = (2.0 / (i * k * k) as f64).sqrt();
        let v: Vec<f32> = (0..o * i * k * k)
            .map(|_| (std * rng.normal()) as f32)
            .collect();
        sd.insert(
            name,
            WTensor::f32(ndarray::ArrayD::from_shape_vec(vec![o, i, k, k], v).expect("shape")),
        );
    };
    let norm = |sd: &mut StateDict, p: &str, c: usize| {
        sd.insert(
            format!("{p}.weight"),
            WTensor::f32(ndarray::ArrayD::ones(vec![c])),
        );
        sd.insert(
            format!("{p}.bias"),
            WTensor::f32(ndarray::ArrayD::zeros(vec![c])),
        );
    };
    conv(&mut sd, "conv1.weight".into(), width, in_channels, 3);
    norm(&mut sd, "bn1", width);
    let widths = [width, 2 * width, 4 * width];
    let mut c = width;
    for (s, &w) in widths.iter().enumerate() {
        let p = format!("layer{}.0", s + 1);
        conv(&mut sd, format!("{p}.conv1.weight"), w, c, 3);
        norm(&mut sd, &format!("{p}.bn1"), w);
        conv(&mut sd, format!("{p}.conv2.weight"), w, w, 3);
        norm(&mut sd, &format!("{p}.bn2"), w);
        if w != c {
            conv(&mut sd, format!("{p}.downsample.0.weight"), w, c, 1);
            norm(&mut sd, &format!("{p}.downsample.1"), w);
        }
        c = w;
    }
    let bound = 1.0 / (c as f64).sqrt();
    let mut rng = spectra::rng::Rng::new(seed ^ 0xFC);
    let fc: Vec<f32> = (0..classes * c)
        .map(|_| ((2.0 * rng.uniform() - 1.0) * bound) as f32)
        .collect();
    let fb: Vec<f32> = (0..classes)
        .map(|_| ((2.0 * rng.uniform() - 1.0) * bound) as f32)
        .collect();
    sd.insert(
        "fc.weight",
        WTensor::f32(ndarray::ArrayD::from_shape_vec(vec![classes, c], fc).expect("shape")),
    );
    sd.insert(
        "fc.bias",
        WTensor::f32(ndarray::ArrayD::from_shape_vec(vec![classes], fb).expect("shape")),
    );
    sd
}

/// Trains with Adam (mini-batches in a seeded order).
pub fn train<B: AutodiffBackend>(
    mut model: ResNet<B>,
    data: &Split,
    epochs: usize,
    batch_size: usize,
    lr: f64,
    seed: u64,
    bar: &indicatif::ProgressBar,
) -> ResNet<B>
where
    ResNet<B>: AutodiffModule<B>,
{
    let device = model.conv1.val().device();
    let mut optim = AdamConfig::new().init::<B, ResNet<B>>();
    let mut order: Vec<usize> = (0..data.y.len()).collect();
    let mut rng = spectra::rng::Rng::new(seed ^ 0xA5A5);
    for _ in 0..epochs {
        rng.shuffle(&mut order);
        for chunk in order.chunks(batch_size) {
            let b = data.rows(chunk);
            let loss = cross_entropy(model.forward(crate::mlp::batch::<B>(&b.x, &device)), &b.y);
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(lr, model, grads);
            bar.inc(1);
        }
    }
    model
}

/// Mean cross-entropy and accuracy of a state dict on `data` (CPU backend).
pub fn evaluate(sd: &StateDict, data: &Split) -> anyhow::Result<(f64, f64)> {
    type C = s2ft_core::Cpu;
    let device = Default::default();
    let model = ResNet::<C>::from_state_dict(sd, &device)?;
    let (mut loss, mut hits) = (0f64, 0usize);
    let n = data.y.len();
    for start in (0..n).step_by(500) {
        let idx: Vec<usize> = (start..(start + 500).min(n)).collect();
        let b = data.rows(&idx);
        let logits = model.forward(crate::mlp::batch::<C>(&b.x, &device));
        let l: f32 = cross_entropy(logits.clone(), &b.y).into_scalar().elem();
        loss += l as f64 * idx.len() as f64;
        let pred: Vec<i64> = logits
            .argmax(1)
            .into_data()
            .convert::<i64>()
            .into_vec()
            .expect("int");
        hits += pred
            .iter()
            .zip(&b.y)
            .filter(|(p, y)| **p as usize == **y)
            .count();
    }
    Ok((loss / n.max(1) as f64, hits as f64 / n.max(1) as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    type C = s2ft_core::Cpu;

    fn images(n: usize, seed: u64) -> ndarray::Array2<f32> {
        let mut rng = spectra::rng::Rng::new(seed);
        ndarray::Array2::from_shape_fn((n, 784), |_| rng.uniform() as f32)
    }

    fn logits(sd: &StateDict, x: &ndarray::Array2<f32>) -> Vec<f32> {
        let device = Default::default();
        let m = ResNet::<C>::from_state_dict(sd, &device).unwrap();
        m.forward(crate::mlp::batch::<C>(x, &device))
            .into_data()
            .convert::<f32>()
            .into_vec()
            .unwrap()
    }

    #[test]
    fn state_dict_round_trips_with_torchvision_names() {
        let sd = init_state_dict(1, 8, 10, 3);
        assert!(sd.contains("layer2.0.downsample.1.weight"));
        assert!(!sd.contains("layer1.0.downsample.0.weight"));
        let m = ResNet::<C>::from_state_dict(&sd, &Default::default()).unwrap();
        let back = m.to_state_dict();
        assert_eq!(
            back.keys().collect::<Vec<_>>(),
            sd.keys().collect::<Vec<_>>()
        );
        for (k, t) in sd.iter() {
            assert_eq!(back.get(k).unwrap().data, t.data, "{k}");
        }
    }

    #[test]
    fn channel_permutations_from_the_resnet_spec_keep_the_function() {
        // The permute crate's torchvision ResNet spec, applied to this model's
        // state dict, must leave its logits unchanged: names, shortcut streams
        // and the channel LayerNorm all agree.
        let sd = init_state_dict(1, 8, 10, 5);
        let spec = permute::builders::resnet(&sd).unwrap();
        let perm = spec.random(11);
        let permuted = permute::apply(&spec, &perm, &sd).unwrap();
        assert_ne!(
            permuted.get("layer1.0.conv1.weight").unwrap().data,
            sd.get("layer1.0.conv1.weight").unwrap().data
        );
        let x = images(4, 1);
        let (a, b) = (logits(&sd, &x), logits(&permuted, &x));
        let diff = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(diff < 1e-4, "max |Δlogit| = {diff}");
    }

    #[test]
    fn channel_norm_matches_a_hand_computed_pixel() {
        let device = Default::default();
        let n = ChannelNorm::<C> {
            weight: Param::from_tensor(Tensor::from_data(
                TensorData::new(vec![2.0f32, 1.0], [2]),
                &device,
            )),
            bias: Param::from_tensor(Tensor::from_data(
                TensorData::new(vec![0.5f32, -1.0], [2]),
                &device,
            )),
        };
        // One pixel with channels (1, 3): mean 2, variance 1.
        let x =
            Tensor::<C, 4>::from_data(TensorData::new(vec![1.0f32, 3.0], [1, 1, 1, 2]), &device);
        let y: Vec<f32> = n
            .forward(x)
            .into_data()
            .convert::<f32>()
            .into_vec()
            .unwrap();
        let s = 1.0 / (1.0f32 + 1e-5).sqrt();
        assert!(
            (y[0] - (-2.0 * s + 0.5)).abs() < 1e-6 && (y[1] - (s - 1.0)).abs() < 1e-6,
            "{y:?}"
        );
    }

    #[test]
    fn im2col_convolution_matches_burns_conv2d() {
        use burn::tensor::module::conv2d;
        use burn::tensor::ops::ConvOptions;
        let device = Default::default();
        let mut rng = spectra::rng::Rng::new(9);
        let mut t = |shape: [usize; 4]| {
            let v: Vec<f32> = (0..shape.iter().product::<usize>())
                .map(|_| rng.normal() as f32)
                .collect();
            Tensor::<C, 4>::from_data(TensorData::new(v, shape), &device)
        };
        for (k, stride, side) in [(3, 1, 6), (3, 2, 6), (1, 2, 6), (3, 2, 7), (1, 1, 5)] {
            let x = t([2, 3, side, side]);
            let w = Param::from_tensor(t([4, 3, k, k]));
            let got: Vec<f32> = conv(x.clone().permute([0, 2, 3, 1]), &w, stride)
                .permute([0, 3, 1, 2])
                .into_data()
                .convert::<f32>()
                .into_vec()
                .unwrap();
            let want: Vec<f32> = conv2d(
                x,
                w.val(),
                None,
                ConvOptions::new([stride, stride], [k / 2, k / 2], [1, 1], 1),
            )
            .into_data()
            .convert::<f32>()
            .into_vec()
            .unwrap();
            assert_eq!(got.len(), want.len(), "k {k} stride {stride} side {side}");
            let diff = got
                .iter()
                .zip(&want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(diff < 1e-4, "k {k} stride {stride} side {side}: {diff}");
        }
    }

    #[test]
    fn bad_state_dicts_get_named_errors() {
        let mut sd = init_state_dict(1, 8, 10, 5);
        sd.remove("layer2.0.bn2.bias");
        let e = ResNet::<C>::from_state_dict(&sd, &Default::default()).unwrap_err();
        assert!(e.to_string().contains("layer2.0.bn2.bias"), "{e}");
        let mut sd = init_state_dict(1, 8, 10, 5);
        sd.get_mut("fc.weight").unwrap().data[[0, 0]] = f32::NAN;
        let e = ResNet::<C>::from_state_dict(&sd, &Default::default()).unwrap_err();
        assert!(
            e.to_string().contains("fc.weight") && e.to_string().contains("non-finite"),
            "{e}"
        );
    }
}
