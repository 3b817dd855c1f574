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
use burn::prelude::*;
use burn::tensor::TensorData;
use burn::tensor::activation::relu;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ops::PadMode;
use s2ft_core::model::to_weights;
use weights::{StateDict, Tensor as WTensor};

use crate::data::Split;
use crate::mlp::cross_entropy;
pub use crate::train::Classifier;

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

/// Where a forward pass hands out the output channels REPAIR corrects, as
/// `[samples, channels]` (every pixel of every image a sample).
type Tap<'t, B> = &'t mut dyn FnMut(Tensor<B, 2>);

/// The input of one convolution or linear layer, for least squares: a
/// convolution's as its im2col patches (`[n·h'·w', c·k·k]`, [`patches`]).
pub struct LayerInput {
    /// The layer's weight (`layer2.0.conv1.weight`, `fc.weight`, …).
    pub weight: String,
    /// Its inputs, one row per sample (per output pixel of a convolution).
    pub x: ndarray::Array2<f32>,
}

/// Where a forward pass hands out its layers' inputs, when asked.
pub struct Inputs<B: Backend> {
    /// The inputs collected, in forward order; `None`: none asked.
    pub collected: Option<Vec<LayerInput>>,
    _backend: std::marker::PhantomData<B>,
}

impl<B: Backend> Inputs<B> {
    /// Collects every layer's input (or none).
    pub fn new(collect: bool) -> Self {
        Inputs {
            collected: collect.then(Vec::new),
            _backend: std::marker::PhantomData,
        }
    }

    /// Convolution `weight`'s input `x` (`[n, h, w, c]`), at `stride`.
    fn conv(&mut self, weight: &str, x: &Tensor<B, 4>, w: &Param<Tensor<B, 4>>, stride: usize) {
        if let Some(out) = &mut self.collected {
            let x = to_weights(x.clone())
                .data
                .into_dimensionality::<ndarray::Ix4>()
                .expect("4-D");
            out.push(LayerInput {
                weight: weight.to_string(),
                x: patches(&x, w.val().dims()[2], stride),
            });
        }
    }

    /// Linear layer `weight`'s input `x` (`[n, in]`).
    fn dense(&mut self, weight: &str, x: &Tensor<B, 2>) {
        if let Some(out) = &mut self.collected {
            out.push(LayerInput {
                weight: weight.to_string(),
                x: to_weights(x.clone())
                    .data
                    .into_dimensionality::<ndarray::Ix2>()
                    .expect("2-D"),
            });
        }
    }
}

/// An image network whose forward pass hands out what REPAIR and least
/// squares read ([`ResNet`], [`Vgg`]).
pub trait Tapped<B: Backend> {
    /// Logits, with the tapped outputs to `tap` and the layers' inputs to `inputs`.
    fn forward_with(
        &self,
        x: Tensor<B, 2>,
        tap: Tap<'_, B>,
        inputs: &mut Inputs<B>,
    ) -> Tensor<B, 2>;

    /// Logits, with the tapped outputs to `tap`.
    fn forward_tapped(&self, x: Tensor<B, 2>, tap: Tap<'_, B>) -> Tensor<B, 2> {
        self.forward_with(x, tap, &mut Inputs::new(false))
    }

    /// Every convolution's and classifier layer's input on `x`, in forward order.
    fn layer_inputs(&self, x: Tensor<B, 2>) -> Vec<LayerInput> {
        let mut inputs = Inputs::new(true);
        self.forward_with(x, &mut |_| {}, &mut inputs);
        inputs.collected.unwrap_or_default()
    }
}

/// Image rows `[n, cin·side·side]`, channel-major (PyTorch's NCHW
/// flattened, square images), as a channels-last batch `[n, side, side, cin]`.
fn channels_last<B: Backend>(x: Tensor<B, 2>, cin: usize) -> Tensor<B, 4> {
    let [n, d] = x.dims();
    let side = ((d / cin) as f64).sqrt() as usize;
    x.reshape([n, cin, side, side]).permute([0, 2, 3, 1])
}

impl<B: Backend> Tapped<B> for ResNet<B> {
    /// Logits, with every channel norm's output (as `[n·h·w, channels]`)
    /// handed to `tap` in the order of [`ResNet::norm_prefixes`], and every
    /// convolution's and the classifier's input to `inputs`.
    fn forward_with(
        &self,
        x: Tensor<B, 2>,
        tap: Tap<'_, B>,
        inputs: &mut Inputs<B>,
    ) -> Tensor<B, 2> {
        let x = channels_last(x, self.conv1.val().dims()[1]);
        inputs.conv("conv1.weight", &x, &self.conv1, 1);
        let stem = self.bn1.forward(conv(x, &self.conv1, 1));
        tap(pixels(&stem));
        let mut h = relu(stem);
        for (s, b) in self.blocks.iter().enumerate() {
            h = b.forward(h, tap, inputs, &format!("layer{}.0", s + 1));
        }
        let [n, hh, ww, c] = h.dims();
        let pooled = h.reshape([n, hh * ww, c]).mean_dim(1).reshape([n, c]);
        inputs.dense("fc.weight", &pooled);
        pooled.matmul(self.fc_weight.val().transpose()) + self.fc_bias.val().unsqueeze()
    }
}

impl<B: Backend> Tapped<B> for Vgg<B> {
    /// Logits, with the pre-activations of every convolution (as
    /// `[n·h·w, channels]`) and hidden classifier layer handed to `tap` in
    /// the order of [`Vgg::layer_prefixes`], and every convolution's and
    /// classifier layer's input to `inputs`.
    fn forward_with(
        &self,
        x: Tensor<B, 2>,
        tap: Tap<'_, B>,
        inputs: &mut Inputs<B>,
    ) -> Tensor<B, 2> {
        let mut h = channels_last(x, self.conv_weights[0].val().dims()[1]);
        let last = self.conv_weights.len() - 1;
        for (i, (w, b)) in self.conv_weights.iter().zip(&self.conv_biases).enumerate() {
            inputs.conv(&format!("features.{}.weight", 3 * i), &h, w, 1);
            let o = w.val().dims()[0];
            let pre = conv(h, w, 1) + b.val().reshape([1, 1, 1, o]);
            tap(pixels(&pre));
            h = relu(pre);
            if i < last {
                let [n, hh, ww, c] = h.dims();
                h = h
                    .reshape([n, hh / 2, 2, ww / 2, 2, c])
                    .max_dim(4)
                    .max_dim(2)
                    .reshape([n, hh / 2, ww / 2, c]);
            }
        }
        // Flatten channel-major (PyTorch's NCHW order).
        let [n, hh, ww, c] = h.dims();
        let mut x = h.permute([0, 3, 1, 2]).reshape([n, c * hh * ww]);
        let last = self.fc_weights.len() - 1;
        for (j, (w, b)) in self.fc_weights.iter().zip(&self.fc_biases).enumerate() {
            inputs.dense(&format!("classifier.{}.weight", 2 * j), &x);
            x = x.matmul(w.val().transpose()) + b.val().unsqueeze::<2>();
            if j < last {
                tap(x.clone());
                x = relu(x);
            }
        }
        x
    }
}

/// The im2col patches of channels-last `x` (`[n, h, w, c]`) for a `k × k`
/// "same"-padded convolution at `stride` (the positions the convolution keeps: every
/// `stride`-th row and column): `[n·h'·w', c·k·k]`, columns in the
/// `[c, kh, kw]` order of a PyTorch weight `[o, c, k, k]` flattened, so that
/// `patches · W_flatᵀ` is the convolution.
pub fn patches(x: &ndarray::Array4<f32>, k: usize, stride: usize) -> ndarray::Array2<f32> {
    let (n, h, w, c) = x.dim();
    let p = k / 2;
    let rows: Vec<usize> = (0..h).step_by(stride).collect();
    let cols: Vec<usize> = (0..w).step_by(stride).collect();
    let mut out = ndarray::Array2::zeros((n * rows.len() * cols.len(), c * k * k));
    let mut r = 0;
    for img in 0..n {
        for &i in &rows {
            for &j in &cols {
                let mut row = out.row_mut(r);
                for di in 0..k {
                    for dj in 0..k {
                        let (y, xx) = (
                            (i + di) as isize - p as isize,
                            (j + dj) as isize - p as isize,
                        );
                        if y < 0 || xx < 0 || y >= h as isize || xx >= w as isize {
                            continue;
                        }
                        for ch in 0..c {
                            row[ch * k * k + di * k + dj] = x[[img, y as usize, xx as usize, ch]];
                        }
                    }
                }
                r += 1;
            }
        }
    }
    out
}

/// `[n, h, w, c]` → `[n·h·w, c]`, for a tap.
fn pixels<B: Backend>(x: &Tensor<B, 4>) -> Tensor<B, 2> {
    let [n, h, w, c] = x.dims();
    x.clone().reshape([n * h * w, c])
}

impl<B: Backend> BasicBlock<B> {
    /// Block `p` (`layerS.0`), with its norms' outputs (bn1, bn2, then the
    /// shortcut's) to `tap` and its convolutions' inputs to `inputs`.
    fn forward(
        &self,
        x: Tensor<B, 4>,
        tap: Tap<'_, B>,
        inputs: &mut Inputs<B>,
        p: &str,
    ) -> Tensor<B, 4> {
        inputs.conv(&format!("{p}.conv1.weight"), &x, &self.conv1, self.stride);
        let h = self.bn1.forward(conv(x.clone(), &self.conv1, self.stride));
        tap(pixels(&h));
        let h = relu(h);
        inputs.conv(&format!("{p}.conv2.weight"), &h, &self.conv2, 1);
        let h = self.bn2.forward(conv(h, &self.conv2, 1));
        tap(pixels(&h));
        let short = match (&self.down_conv, &self.down_norm) {
            (Some(c), Some(n)) => {
                inputs.conv(&format!("{p}.downsample.0.weight"), &x, c, self.stride);
                let s = n.forward(conv(x, c, self.stride));
                tap(pixels(&s));
                s
            }
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
            // conv1's channels and the stage's stream are separate groups: a
            // partial (zip) merge can widen them differently.
            let inner = out;
            let c2: Param<Tensor<B, 4>> =
                burn_tensor(sd, &format!("{p}.conv2.weight"), None, device)?;
            let [out, c2_in, k, k2] = c2.val().dims();
            anyhow::ensure!(
                c2_in == inner && k == 3 && k2 == 3,
                "'{p}.conv2.weight' has shape {:?}, expected [·, {inner}, 3, 3]",
                c2.val().dims()
            );
            blocks.push(BasicBlock {
                conv1: c1,
                bn1: norm_from(sd, &format!("{p}.bn1"), inner, device)?,
                conv2: c2,
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
        self.forward_tapped(x, &mut |_| {})
    }

    /// The state-dict prefixes of the channel norms, in forward order:
    /// `bn1`, then per block `layerS.0.bn1`, `layerS.0.bn2` and, with a
    /// projection shortcut, `layerS.0.downsample.1`.
    pub fn norm_prefixes(&self) -> Vec<String> {
        let mut out = vec!["bn1".to_string()];
        for (s, b) in self.blocks.iter().enumerate() {
            let p = format!("layer{}.0", s + 1);
            out.push(format!("{p}.bn1"));
            out.push(format!("{p}.bn2"));
            if b.down_norm.is_some() {
                out.push(format!("{p}.downsample.1"));
            }
        }
        out
    }
}

/// The layers REPAIR corrects in an image network's state dict (a ResNet's
/// channel norms, whose per-channel affine takes the correction exactly; a
/// VGG's convolutions and hidden classifier layers, through their biases)
/// and a function giving their output channels on `probe` (CPU forward, as
/// [`RepairedInterpolation`](permute::repair::RepairedInterpolation) asks).
pub fn repair_taps<'p>(
    vgg: bool,
    sd: &StateDict,
    probe: &'p ndarray::Array2<f32>,
) -> anyhow::Result<(
    Vec<permute::repair::RepairLayer>,
    crate::studies::lmc::Taps<'p>,
)> {
    type Cpu = s2ft_core::Cpu;
    let dev = Default::default();
    let prefixes = if vgg {
        Vgg::<Cpu>::from_state_dict(sd, &dev)?.layer_prefixes()
    } else {
        ResNet::<Cpu>::from_state_dict(sd, &dev)?.norm_prefixes()
    };
    let layers = prefixes
        .iter()
        .map(|p| permute::repair::RepairLayer::named(p))
        .collect();
    let taps = move |sd: &StateDict| -> anyhow::Result<Vec<ndarray::Array2<f32>>> {
        let dev = Default::default();
        let x = crate::mlp::batch::<Cpu>(probe, &dev);
        let mut out = Vec::new();
        let mut tap = |t: Tensor<Cpu, 2>| {
            let [n, c] = t.dims();
            let v: Vec<f32> = t.into_data().convert::<f32>().into_vec().expect("f32");
            out.push(ndarray::Array2::from_shape_vec((n, c), v).expect("shape"));
        };
        if vgg {
            let model = Vgg::<Cpu>::from_state_dict(sd, &dev)?;
            model.check_input(probe.ncols())?;
            model.forward_tapped(x, &mut tap);
        } else {
            ResNet::<Cpu>::from_state_dict(sd, &dev)?.forward_tapped(x, &mut tap);
        }
        Ok(out)
    };
    Ok((layers, Box::new(taps)))
}

/// A seeded initial state dict: Kaiming-normal convolutions, unit norms,
/// PyTorch's default uniform classifier. `width` is the stem's channels.
pub fn init_state_dict(in_channels: usize, width: usize, classes: usize, seed: u64) -> StateDict {
    let mut rng = weights::rng::Rng::new(seed);
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
    let mut rng = weights::rng::Rng::new(seed ^ 0xFC);
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

impl<B: Backend> Classifier<B> for ResNet<B> {
    fn logits(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.forward(x)
    }
    fn device(&self) -> B::Device {
        self.conv1.val().device()
    }
}

/// Trains a ResNet or VGG with Adam (batches in an order shuffled each epoch
/// by `Rng::new(seed ^ 0xA5A5)`; see [`crate::train::train`]).
pub fn train<B: AutodiffBackend, M: AutodiffModule<B> + Classifier<B>>(
    model: M,
    data: &Split,
    epochs: usize,
    batch_size: usize,
    lr: f64,
    seed: u64,
    bar: &indicatif::ProgressBar,
) -> M {
    let mut rng = weights::rng::Rng::new(seed ^ 0xA5A5);
    crate::train::train(
        model,
        data,
        (epochs, batch_size, lr),
        |o| rng.shuffle(o),
        bar,
    )
}

/// Mean cross-entropy and accuracy of `model` on `data`, in batches of 500.
pub fn evaluate_model<B: Backend, M: Classifier<B>>(model: &M, data: &Split) -> (f64, f64) {
    let device = model.device();
    let (mut loss, mut hits) = (0f64, 0usize);
    let n = data.y.len();
    for start in (0..n).step_by(500) {
        let idx: Vec<usize> = (start..(start + 500).min(n)).collect();
        let b = data.rows(&idx);
        let logits = model.logits(crate::mlp::batch::<B>(&b.x, &device));
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
    (loss / n.max(1) as f64, hits as f64 / n.max(1) as f64)
}

/// Mean cross-entropy and accuracy of a ResNet state dict on `data` (CPU backend).
pub fn evaluate(sd: &StateDict, data: &Split) -> anyhow::Result<(f64, f64)> {
    let model = ResNet::<s2ft_core::Cpu>::from_state_dict(sd, &Default::default())?;
    Ok(evaluate_model(&model, data))
}

/// A VGG-style CNN under torchvision's names: 3×3 convolutions with bias
/// (`features.{3i}`), each followed by a ReLU and, all but the last, a 2×2
/// max-pool; the last one's `C × H × W` outputs flattened channel-major into
/// a ReLU MLP (`classifier.{2j}`). `permute::builders::vgg` aligns it.
#[derive(Module, Debug)]
pub struct Vgg<B: Backend> {
    /// `[out, in, 3, 3]` per convolution.
    pub conv_weights: Vec<Param<Tensor<B, 4>>>,
    /// `[out]` per convolution.
    pub conv_biases: Vec<Param<Tensor<B, 1>>>,
    /// `[out, in]` per classifier layer.
    pub fc_weights: Vec<Param<Tensor<B, 2>>>,
    /// `[out]` per classifier layer.
    pub fc_biases: Vec<Param<Tensor<B, 1>>>,
}

/// The shape of a [`Vgg`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VggShape {
    /// Input channels.
    pub in_channels: usize,
    /// Input side (square images).
    pub side: usize,
    /// Output channels of each convolution.
    pub convs: Vec<usize>,
    /// Hidden widths of the classifier.
    pub hidden: Vec<usize>,
    /// Classes.
    pub classes: usize,
}

impl VggShape {
    /// The side after the convolutions (`side` halved once per pool); an
    /// error when a pool meets an odd side.
    pub fn final_side(&self) -> anyhow::Result<usize> {
        anyhow::ensure!(
            !self.convs.is_empty(),
            "a VGG needs at least one convolution"
        );
        let mut s = self.side;
        for _ in 1..self.convs.len() {
            anyhow::ensure!(
                s.is_multiple_of(2),
                "{} convolutions pool {} times: the side {} meets an odd side {s}",
                self.convs.len(),
                self.convs.len() - 1,
                self.side
            );
            s /= 2;
        }
        Ok(s)
    }

    /// The layer names in depth order (`features.0`, `features.3`, …, `classifier.0`, …).
    pub fn layer_names(&self) -> Vec<String> {
        (0..self.convs.len())
            .map(|i| format!("features.{}", 3 * i))
            .chain((0..=self.hidden.len()).map(|j| format!("classifier.{}", 2 * j)))
            .collect()
    }
}

/// A seeded VGG state dict: PyTorch's default initialisation
/// (`U(−1/√fan_in, 1/√fan_in)` for weights and biases of convolutions and
/// linears alike).
pub fn init_vgg(shape: &VggShape, seed: u64) -> anyhow::Result<StateDict> {
    let last = shape.final_side()?;
    let mut rng = weights::rng::Rng::new(seed ^ 0x5647_4700);
    let mut sd = StateDict::new();
    let mut uniform = |sd: &mut StateDict, name: &str, dims: Vec<usize>, fan_in: usize| {
        let bound = 1.0 / (fan_in as f64).sqrt();
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| ((2.0 * rng.uniform() - 1.0) * bound) as f32)
            .collect();
        sd.insert(
            name,
            WTensor::f32(ndarray::ArrayD::from_shape_vec(dims, v).expect("shape")),
        );
    };
    let mut c = shape.in_channels;
    for (i, &o) in shape.convs.iter().enumerate() {
        let p = format!("features.{}", 3 * i);
        uniform(&mut sd, &format!("{p}.weight"), vec![o, c, 3, 3], c * 9);
        uniform(&mut sd, &format!("{p}.bias"), vec![o], c * 9);
        c = o;
    }
    let mut f = c * last * last;
    for (j, &o) in shape.hidden.iter().chain([&shape.classes]).enumerate() {
        let p = format!("classifier.{}", 2 * j);
        uniform(&mut sd, &format!("{p}.weight"), vec![o, f], f);
        uniform(&mut sd, &format!("{p}.bias"), vec![o], f);
        f = o;
    }
    Ok(sd)
}

impl<B: Backend> Vgg<B> {
    /// From `features.{3i}.{weight,bias}` and `classifier.{2j}.{weight,bias}`;
    /// every tensor is checked (present, shaped consistently, finite).
    pub fn from_state_dict(sd: &StateDict, device: &B::Device) -> anyhow::Result<Self> {
        let (mut conv_weights, mut conv_biases) = (Vec::new(), Vec::new());
        let mut c: Option<usize> = None;
        for i in 0.. {
            let p = format!("features.{}", 3 * i);
            if !sd.contains(&format!("{p}.weight")) {
                break;
            }
            let w: Param<Tensor<B, 4>> = burn_tensor(sd, &format!("{p}.weight"), None, device)?;
            let [o, inp, k, k2] = w.val().dims();
            anyhow::ensure!(
                k == 3 && k2 == 3,
                "'{p}.weight' is a {k}×{k2} kernel, expected 3×3"
            );
            anyhow::ensure!(
                c.is_none_or(|c| c == inp),
                "'{p}.weight' reads {inp} channels, the previous convolution writes {}",
                c.unwrap_or(0)
            );
            conv_biases.push(burn_tensor(sd, &format!("{p}.bias"), Some(&[o]), device)?);
            conv_weights.push(w);
            c = Some(o);
        }
        let c = c.ok_or_else(|| {
            anyhow::anyhow!("'features.0.weight' is missing from the VGG state dict")
        })?;
        let (mut fc_weights, mut fc_biases) = (Vec::new(), Vec::new());
        let mut prev: Option<usize> = None;
        for j in 0.. {
            let p = format!("classifier.{}", 2 * j);
            if !sd.contains(&format!("{p}.weight")) {
                break;
            }
            let w: Param<Tensor<B, 2>> = burn_tensor(sd, &format!("{p}.weight"), None, device)?;
            let [o, inp] = w.val().dims();
            match prev {
                Some(p0) => anyhow::ensure!(
                    inp == p0,
                    "'{p}.weight' reads {inp} features, the previous layer writes {p0}"
                ),
                None => anyhow::ensure!(
                    inp % c == 0 && ((inp / c) as f64).sqrt().fract() == 0.0,
                    "'{p}.weight' reads {inp} features, not {c} channels × a square side"
                ),
            }
            fc_biases.push(burn_tensor(sd, &format!("{p}.bias"), Some(&[o]), device)?);
            fc_weights.push(w);
            prev = Some(o);
        }
        anyhow::ensure!(
            !fc_weights.is_empty(),
            "'classifier.0.weight' is missing from the VGG state dict"
        );
        Ok(Vgg {
            conv_weights,
            conv_biases,
            fc_weights,
            fc_biases,
        })
    }

    /// To torchvision-style names.
    pub fn to_state_dict(&self) -> StateDict {
        let mut sd = StateDict::new();
        for (i, (w, b)) in self.conv_weights.iter().zip(&self.conv_biases).enumerate() {
            sd.insert(format!("features.{}.weight", 3 * i), to_weights(w.val()));
            sd.insert(format!("features.{}.bias", 3 * i), to_weights(b.val()));
        }
        for (j, (w, b)) in self.fc_weights.iter().zip(&self.fc_biases).enumerate() {
            sd.insert(format!("classifier.{}.weight", 2 * j), to_weights(w.val()));
            sd.insert(format!("classifier.{}.bias", 2 * j), to_weights(b.val()));
        }
        sd
    }

    /// Logits for images as rows `[n, channels · side²]`. The side must
    /// halve evenly at every pool ([`VggShape::final_side`]).
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.forward_tapped(x, &mut |_| {})
    }

    /// The state-dict prefixes of the convolutions and hidden classifier
    /// layers, in forward order: `features.{3i}`, `classifier.{2j}`.
    pub fn layer_prefixes(&self) -> Vec<String> {
        let convs = (0..self.conv_weights.len()).map(|i| format!("features.{}", 3 * i));
        let fcs = (0..self.fc_weights.len() - 1).map(|j| format!("classifier.{}", 2 * j));
        convs.chain(fcs).collect()
    }
}

impl<B: Backend> Vgg<B> {
    /// Whether images of `pixels` values fit: square, of the input
    /// channels, halving evenly at every pool, and flattening to what
    /// `classifier.0` reads.
    pub fn check_input(&self, pixels: usize) -> anyhow::Result<()> {
        let cin = self.conv_weights[0].val().dims()[1];
        let side = ((pixels / cin) as f64).sqrt().round() as usize;
        anyhow::ensure!(
            side * side * cin == pixels,
            "the VGG reads {cin}-channel square images; the data has {pixels} values per image"
        );
        let shape = VggShape {
            in_channels: cin,
            side,
            convs: self
                .conv_weights
                .iter()
                .map(|w| w.val().dims()[0])
                .collect(),
            hidden: vec![],
            classes: 0,
        };
        let s = shape.final_side()?;
        let c = *shape.convs.last().expect("one convolution");
        let reads = self.fc_weights[0].val().dims()[1];
        anyhow::ensure!(
            reads == c * s * s,
            "'classifier.0.weight' reads {reads} features; {side}×{side} images give {c}×{s}×{s}"
        );
        Ok(())
    }
}

impl<B: Backend> Classifier<B> for Vgg<B> {
    fn logits(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.forward(x)
    }
    fn device(&self) -> B::Device {
        self.conv_weights[0].val().device()
    }
}

/// Mean cross-entropy and accuracy of a VGG state dict on `data` (CPU backend).
pub fn evaluate_vgg(sd: &StateDict, data: &Split) -> anyhow::Result<(f64, f64)> {
    let model = Vgg::<s2ft_core::Cpu>::from_state_dict(sd, &Default::default())?;
    model.check_input(data.x.ncols())?;
    Ok(evaluate_model(&model, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    type C = s2ft_core::Cpu;

    fn images(n: usize, seed: u64) -> ndarray::Array2<f32> {
        let mut rng = weights::rng::Rng::new(seed);
        ndarray::Array2::from_shape_fn((n, 784), |_| rng.uniform() as f32)
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).fold(0f32, |m, (p, q)| m.max((p - q).abs()))
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
        let diff = max_abs_diff(&a, &b);
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

    /// The patches the least squares reads, times the flattened weight, are
    /// the convolution (every kernel size, stride and odd side the nets use).
    #[test]
    fn patches_times_the_flat_weight_are_the_convolution() {
        let device = Default::default();
        let mut rng = weights::rng::Rng::new(4);
        for (k, stride, side) in [(3, 1, 6), (3, 2, 6), (1, 2, 6), (3, 2, 7), (1, 1, 5)] {
            let xv: Vec<f32> = (0..2 * side * side * 3)
                .map(|_| rng.normal() as f32)
                .collect();
            let wv: Vec<f32> = (0..4 * 3 * k * k).map(|_| rng.normal() as f32).collect();
            let x =
                Tensor::<C, 4>::from_data(TensorData::new(xv.clone(), [2, side, side, 3]), &device);
            let w = Param::from_tensor(Tensor::<C, 4>::from_data(
                TensorData::new(wv.clone(), [4, 3, k, k]),
                &device,
            ));
            let want: Vec<f32> = conv(x, &w, stride)
                .into_data()
                .convert::<f32>()
                .into_vec()
                .unwrap();
            let xa = ndarray::Array4::from_shape_vec((2, side, side, 3), xv).unwrap();
            let wf = ndarray::Array2::from_shape_vec((4, 3 * k * k), wv).unwrap();
            let got = patches(&xa, k, stride).dot(&wf.t());
            let got: Vec<f32> = got.iter().copied().collect();
            assert_eq!(got.len(), want.len(), "k {k} stride {stride} side {side}");
            let diff = max_abs_diff(&got, &want);
            assert!(diff < 1e-4, "k {k} stride {stride} side {side}: {diff}");
        }
    }

    #[test]
    fn im2col_convolution_matches_burns_conv2d() {
        use burn::tensor::module::conv2d;
        use burn::tensor::ops::ConvOptions;
        let device = Default::default();
        let mut rng = weights::rng::Rng::new(9);
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
            let diff = max_abs_diff(&got, &want);
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

    /// REPAIR through the taps of both image networks: after `at(λ)` every
    /// tapped channel (a ResNet's channel norms, a VGG's convolutions and
    /// hidden classifier layer) has the endpoints' interpolated mean and
    /// standard deviation on the probe — which holds only if the taps come in
    /// the order of the named layers — and the classifier's output layer is
    /// untouched.
    #[test]
    fn repair_taps_restore_the_interpolated_statistics_of_every_layer() {
        use permute::repair::{ChannelStats, RepairedInterpolation};
        for vgg in [false, true] {
            let (a, b, out, count) = if vgg {
                let s = small_vgg();
                let (a, b) = (init_vgg(&s, 1).unwrap(), init_vgg(&s, 2).unwrap());
                (a, b, "classifier.2.weight", 4)
            } else {
                (
                    init_state_dict(1, 4, 10, 1),
                    init_state_dict(1, 4, 10, 2),
                    "fc.weight",
                    9,
                )
            };
            let x = images(24, 3);
            let (layers, taps) = repair_taps(vgg, &a, &x).unwrap();
            assert_eq!(layers.len(), count, "vgg {vgg}");
            for l in &layers {
                assert!(a.contains(&l.weight), "{}", l.weight);
            }
            let rep = RepairedInterpolation::new(&a, &b, layers, &taps).unwrap();
            let lambda = 0.3;
            let m = rep.at(lambda).unwrap();
            let [sa, sb] = rep.endpoint_stats();
            let got = taps(&m).unwrap();
            let (mut collapsed, mut channels) = (0, 0);
            let plain = taps(&permute::interp::lerp(&a, &b, lambda as f32).unwrap()).unwrap();
            for (l, h) in got.iter().enumerate() {
                let target = ChannelStats::interpolate(&sa[l], &sb[l], lambda).unwrap();
                let got = ChannelStats::of_columns(h.view());
                let before = ChannelStats::of_columns(plain[l].view());
                for c in 0..target.len() {
                    let tol = 1e-3 * target.std[c].max(1.0);
                    assert!(
                        (got.mean[c] - target.mean[c]).abs() < tol
                            && (got.std[c] - target.std[c]).abs() < tol,
                        "vgg {vgg} layer {l} channel {c}: {} / {} vs {} / {}",
                        got.mean[c],
                        got.std[c],
                        target.mean[c],
                        target.std[c]
                    );
                    collapsed += usize::from(before.std[c] < target.std[c]);
                    channels += 1;
                }
            }
            eprintln!(
                "vgg {vgg}: {collapsed} of {channels} channels narrower than the target before REPAIR"
            );
            assert_eq!(
                m.get(out),
                permute::interp::lerp(&a, &b, lambda as f32)
                    .unwrap()
                    .get(out)
            );
        }
    }

    fn small_vgg() -> VggShape {
        VggShape {
            in_channels: 1,
            side: 28,
            convs: vec![4, 6, 6],
            hidden: vec![16],
            classes: 10,
        }
    }

    #[test]
    fn vgg_round_trips_and_its_permutations_keep_the_function() {
        let shape = small_vgg();
        let sd = init_vgg(&shape, 2).unwrap();
        let names: Vec<&str> = sd.keys().collect();
        assert_eq!(
            names,
            [
                "features.0.weight",
                "features.0.bias",
                "features.3.weight",
                "features.3.bias",
                "features.6.weight",
                "features.6.bias",
                "classifier.0.weight",
                "classifier.0.bias",
                "classifier.2.weight",
                "classifier.2.bias"
            ]
        );
        assert_eq!(
            sd.get("classifier.0.weight").unwrap().shape(),
            [16, 6 * 7 * 7]
        );
        assert_eq!(
            shape.layer_names(),
            [
                "features.0",
                "features.3",
                "features.6",
                "classifier.0",
                "classifier.2"
            ]
        );
        let device = Default::default();
        let m = Vgg::<C>::from_state_dict(&sd, &device).unwrap();
        assert_eq!(m.to_state_dict(), sd);
        // torchvision's flatten order: permuting channels with the VGG spec
        // (blocks of H·W classifier columns) keeps the logits.
        let spec = permute::builders::vgg(&sd).unwrap();
        let permuted = permute::apply(&spec, &spec.random(4), &sd).unwrap();
        assert_ne!(permuted, sd);
        let x = images(3, 8);
        let logits = |sd: &StateDict| -> Vec<f32> {
            Vgg::<C>::from_state_dict(sd, &device)
                .unwrap()
                .forward(crate::mlp::batch::<C>(&x, &device))
                .into_data()
                .convert::<f32>()
                .into_vec()
                .unwrap()
        };
        let (a, b) = (logits(&sd), logits(&permuted));
        let diff = max_abs_diff(&a, &b);
        assert!(diff < 1e-4, "max |Δlogit| = {diff}");
    }

    #[test]
    fn vgg_max_pool_matches_a_hand_computed_forward() {
        // One 1→1 convolution with only the centre tap (identity) and bias 0,
        // then pooling, then a 2×2 conv output flattened into one linear.
        let mut sd = StateDict::new();
        let mut k = vec![0f32; 9];
        k[4] = 1.0;
        let t = |v: Vec<f32>, s: Vec<usize>| {
            WTensor::f32(ndarray::ArrayD::from_shape_vec(s, v).unwrap())
        };
        sd.insert("features.0.weight", t(k.clone(), vec![1, 1, 3, 3]));
        sd.insert("features.0.bias", t(vec![0.0], vec![1]));
        sd.insert("features.3.weight", t(k, vec![1, 1, 3, 3]));
        sd.insert("features.3.bias", t(vec![-0.5], vec![1]));
        sd.insert(
            "classifier.0.weight",
            t(vec![1.0, 2.0, 3.0, 4.0], vec![1, 4]),
        );
        sd.insert("classifier.0.bias", t(vec![0.25], vec![1]));
        // 4×4 image: pixel (y, x) = y·4 + x − 5 (negative ones die in the ReLU).
        let img: Vec<f32> = (0..16).map(|i| i as f32 - 5.0).collect();
        let x = ndarray::Array2::from_shape_vec((1, 16), img).unwrap();
        let device = Default::default();
        let m = Vgg::<C>::from_state_dict(&sd, &device).unwrap();
        m.check_input(16).unwrap();
        let y: Vec<f32> = m
            .forward(crate::mlp::batch::<C>(&x, &device))
            .into_data()
            .convert::<f32>()
            .into_vec()
            .unwrap();
        // Pooled maxima of relu(x): 0 (pixel 5 − 5), 2, 8, 10; minus 0.5 and
        // relu: 0, 1.5, 7.5, 9.5 → 1.5·2 + 7.5·3 + 9.5·4 + 0.25.
        let want = 1.5 * 2.0 + 7.5 * 3.0 + 9.5 * 4.0 + 0.25;
        assert!((y[0] - want).abs() < 1e-5, "{y:?} vs {want}");
    }

    #[test]
    fn bad_vgg_shapes_and_inputs_are_named() {
        let mut shape = small_vgg();
        shape.side = 30; // 30 → 15, then a pool meets 15
        let e = init_vgg(&shape, 0).unwrap_err().to_string();
        assert!(e.contains("odd side 15"), "{e}");
        let sd = init_vgg(&small_vgg(), 0).unwrap();
        let device = Default::default();
        let m = Vgg::<C>::from_state_dict(&sd, &device).unwrap();
        let e = m.check_input(27 * 27).unwrap_err().to_string();
        assert!(e.contains("odd side"), "{e}");
        let e = m.check_input(700).unwrap_err().to_string();
        assert!(e.contains("square"), "{e}");
        let mut bad = sd.clone();
        bad.remove("features.3.bias");
        let e = Vgg::<C>::from_state_dict(&bad, &device)
            .unwrap_err()
            .to_string();
        assert!(e.contains("features.3.bias"), "{e}");
    }
}
