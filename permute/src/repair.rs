//! REPAIR (Jordan, Sedghi, Saukh, Entezari & Neyshabur, "REPAIR:
//! REnormalizing Permuted Activations for Interpolation Repair", ICLR 2023).
//!
//! Interpolating two aligned networks shrinks the variance of their hidden
//! channels ("variance collapse"), which accounts for much of the barrier left
//! after permutation. REPAIR gives every channel of the interpolated model
//! `θ(λ)` the statistics interpolated from the endpoints' statistics at the
//! same channel, `μ_λ = (1 − λ)μ_A + λμ_B` and `σ_λ = (1 − λ)σ_A + λσ_B`: it
//! measures the channel's current mean and standard deviation on data, then
//! folds the affine correction `y ↦ (σ_λ/σ)(y − μ) + μ_λ` into the layer that
//! produces the channel (its weight rows and bias), so the repaired model is
//! a plain checkpoint of the same architecture. Layers are corrected in
//! order, each measured after the ones before it were corrected.
//!
//! The statistics come from the caller's forward pass (this crate has no
//! model code): [`ChannelStats::of_columns`] computes them from a matrix of
//! activations, and [`repair`] asks a callback for the current statistics of
//! each layer. For BatchNorm networks the same effect is the "reset" of the
//! running statistics, which needs no folding. Where the layer has a
//! per-channel bias or shift (linear and convolution biases, a LayerNorm's
//! affine `bias`) the correction is exact; a bias-free channel (a LLaMA's
//! RMSNorm gain, `up_proj`'s rows) can only be rescaled
//! ([`RepairLayer::scale_only`]): [`RepairedInterpolation`] then measures it
//! by its root mean square ([`ChannelStats::rms_of_columns`]) and gives it
//! the interpolated one, since one factor cannot set both a mean and a
//! standard deviation.

use ndarray::{ArrayD, ArrayView2, Axis};
use serde::{Deserialize, Serialize};
use weights::{StateDict, Tensor};

use crate::error::{PermuteError, Result};

/// Per-channel mean and (population) standard deviation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChannelStats {
    /// The mean of each channel (0 for uncentered statistics).
    pub mean: Vec<f64>,
    /// The standard deviation of each channel (the root mean square for
    /// uncentered statistics).
    pub std: Vec<f64>,
}

impl ChannelStats {
    /// The statistics of each column of `x` (rows are samples, columns channels).
    pub fn of_columns(x: ArrayView2<'_, f32>) -> ChannelStats {
        let n = x.nrows().max(1) as f64;
        let mut mean = vec![0f64; x.ncols()];
        for row in x.axis_iter(Axis(0)) {
            mean.iter_mut().zip(row).for_each(|(m, &v)| *m += v as f64);
        }
        mean.iter_mut().for_each(|m| *m /= n);
        let mut var = vec![0f64; x.ncols()];
        for row in x.axis_iter(Axis(0)) {
            var.iter_mut()
                .zip(row)
                .zip(&mean)
                .for_each(|((s, &v), m)| *s += (v as f64 - m).powi(2));
        }
        ChannelStats {
            mean,
            std: var.into_iter().map(|s| (s / n).sqrt()).collect(),
        }
    }

    /// The uncentered statistics of each column of `x`: mean 0 and, as
    /// "standard deviation", the root mean square `√E[x²]` (what a scale
    /// alone can set; [`RepairedInterpolation`] measures bias-free layers so).
    pub fn rms_of_columns(x: ArrayView2<'_, f32>) -> ChannelStats {
        let n = x.nrows().max(1) as f64;
        let mut sq = vec![0f64; x.ncols()];
        for row in x.axis_iter(Axis(0)) {
            sq.iter_mut()
                .zip(row)
                .for_each(|(s, &v)| *s += (v as f64).powi(2));
        }
        ChannelStats {
            mean: vec![0.0; x.ncols()],
            std: sq.into_iter().map(|s| (s / n).sqrt()).collect(),
        }
    }

    /// Channels.
    pub fn len(&self) -> usize {
        self.mean.len()
    }

    /// No channels.
    pub fn is_empty(&self) -> bool {
        self.mean.is_empty()
    }

    /// Checks lengths agree and values are finite, standard deviations ≥ 0.
    pub fn check(&self, what: &str) -> Result<()> {
        if self.mean.len() != self.std.len() {
            return Err(PermuteError::Shape {
                what: what.to_string(),
                msg: format!(
                    "{} means but {} standard deviations",
                    self.mean.len(),
                    self.std.len()
                ),
            });
        }
        if let Some(c) = (0..self.len())
            .find(|&c| !self.mean[c].is_finite() || !self.std[c].is_finite() || self.std[c] < 0.0)
        {
            return Err(PermuteError::NonFinite {
                what: format!("{what}, channel {c}"),
                msg: format!("mean {} / std {}", self.mean[c], self.std[c]),
            });
        }
        Ok(())
    }

    /// `(1 − λ)·a + λ·b`, channel by channel: REPAIR's target statistics.
    pub fn interpolate(a: &ChannelStats, b: &ChannelStats, lambda: f64) -> Result<ChannelStats> {
        a.check("statistics of model A")?;
        b.check("statistics of model B")?;
        if a.len() != b.len() {
            return Err(PermuteError::Shape {
                what: "REPAIR statistics".into(),
                msg: format!("model A has {} channels, model B {}", a.len(), b.len()),
            });
        }
        let mix = |x: &[f64], y: &[f64]| -> Vec<f64> {
            x.iter()
                .zip(y)
                .map(|(p, q)| (1.0 - lambda) * p + lambda * q)
                .collect()
        };
        Ok(ChannelStats {
            mean: mix(&a.mean, &b.mean),
            std: mix(&a.std, &b.std),
        })
    }
}

/// A layer whose output channels REPAIR corrects: `weight` has the channels
/// on axis 0 (`[out, in]` linear, `[out, in, kh, kw]` convolution, `[out]`
/// a normalisation's per-channel scale); `bias` (`[out]`) is created (zeros)
/// when the model has none. Without a bias (`None`) only the scale is
/// corrected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairLayer {
    /// The state-dict name of the weight whose axis 0 holds the output channels.
    pub weight: String,
    /// The state-dict name of the bias (created if the model lacks it);
    /// `None` corrects by scale only.
    pub bias: Option<String>,
}

impl RepairLayer {
    /// The layer `{prefix}.weight` / `{prefix}.bias`.
    pub fn named(prefix: &str) -> RepairLayer {
        RepairLayer {
            weight: format!("{prefix}.weight"),
            bias: Some(format!("{prefix}.bias")),
        }
    }

    /// A channel-producing weight of an architecture without biases (a
    /// LLaMA's RMSNorm gains or `up_proj`): corrected by scale only
    /// (`target.std / current.std`; with the uncentered statistics
    /// [`RepairedInterpolation`] gives such layers, the ratio of root mean squares).
    pub fn scale_only(weight: &str) -> RepairLayer {
        RepairLayer {
            weight: weight.to_string(),
            bias: None,
        }
    }
}

/// Standard deviations below this are treated as zero (a constant channel).
const TINY_STD: f64 = 1e-12;

/// Folds `y ↦ (target.std/current.std)(y − current.mean) + target.mean` into
/// the rows of `layer` in `sd` (with no bias, `y ↦ (target.std/current.std)·y`).
/// A channel that is constant now but should vary cannot be rescaled: that
/// is an error naming the layer and channel; a channel constant in both is
/// only shifted.
pub fn correct(
    sd: &mut StateDict,
    layer: &RepairLayer,
    current: &ChannelStats,
    target: &ChannelStats,
) -> Result<()> {
    let what = |s: &str| format!("REPAIR '{}': {s}", layer.weight);
    current.check(&what("current statistics"))?;
    target.check(&what("target statistics"))?;
    let w = sd
        .get(&layer.weight)
        .ok_or_else(|| PermuteError::MissingWeight {
            model: "model".into(),
            weight: layer.weight.clone(),
        })?;
    let rows = w.shape().first().copied().unwrap_or(0);
    if current.len() != rows || target.len() != rows {
        return Err(PermuteError::Shape {
            what: what("statistics"),
            msg: format!(
                "the layer has {rows} output channels, the statistics {} (current) and {} (target)",
                current.len(),
                target.len()
            ),
        });
    }
    let scale = current
        .std
        .iter()
        .zip(&target.std)
        .enumerate()
        .map(|(c, (&sc, &st))| {
            if sc > TINY_STD {
                Ok(st / sc)
            } else if st > TINY_STD {
                Err(PermuteError::Shape {
                    what: what(&format!("channel {c}")),
                    msg: format!(
                        "has zero variance in the interpolated model but should have standard deviation {st}"
                    ),
                })
            } else {
                Ok(1.0)
            }
        })
        .collect::<Result<Vec<f64>>>()?;
    let mut wd = w.data.clone();
    let dtype = w.dtype;
    for (c, mut row) in wd.axis_iter_mut(Axis(0)).enumerate() {
        row.mapv_inplace(|v| (v as f64 * scale[c]) as f32);
    }
    // The new bias is computed (and its shape checked) before anything is
    // written, so an error leaves `sd` as it was.
    let new_bias = match &layer.bias {
        None => None,
        Some(name) => {
            let bias = match sd.get(name) {
                Some(b) if b.shape() == [rows] => b.data.iter().map(|&v| v as f64).collect(),
                Some(b) => {
                    return Err(PermuteError::Shape {
                        what: what(&format!("bias '{name}'")),
                        msg: format!("shape {:?}, expected [{rows}]", b.shape()),
                    });
                }
                None => vec![0f64; rows],
            };
            let nb: Vec<f32> = (0..rows)
                .map(|c| (scale[c] * (bias[c] - current.mean[c]) + target.mean[c]) as f32)
                .collect();
            let bias_dtype = sd.get(name).map_or(dtype, |b| b.dtype);
            let t = ArrayD::from_shape_vec(vec![rows], nb).expect("rows");
            Some((name.clone(), Tensor::new(t, bias_dtype)))
        }
    };
    sd.insert(layer.weight.clone(), Tensor::new(wd, dtype));
    if let Some((name, t)) = new_bias {
        sd.insert(name, t);
    }
    Ok(())
}

/// Repairs `model` (typically `lerp(A, P·B, λ)`): for each layer in order,
/// `measure(&model_so_far, i)` gives the current statistics of layer `i`'s
/// output channels (the caller's forward pass on a few hundred inputs), and
/// the layer is corrected to `targets[i]`
/// ([`ChannelStats::interpolate`] of the endpoints' statistics). The input is
/// not modified. `measure`'s own error type passes through (it only needs to
/// hold this crate's errors too).
pub fn repair<F, E>(
    model: &StateDict,
    layers: &[RepairLayer],
    targets: &[ChannelStats],
    mut measure: F,
) -> std::result::Result<StateDict, E>
where
    F: FnMut(&StateDict, usize) -> std::result::Result<ChannelStats, E>,
    E: From<PermuteError>,
{
    if layers.len() != targets.len() {
        return Err(PermuteError::Shape {
            what: "REPAIR".into(),
            msg: format!(
                "{} layers but {} target statistics",
                layers.len(),
                targets.len()
            ),
        }
        .into());
    }
    let mut sd = model.clone();
    for (i, (layer, target)) in layers.iter().zip(targets).enumerate() {
        let current = measure(&sd, i)?;
        correct(&mut sd, layer, &current, target)?;
    }
    Ok(sd)
}

/// A layer's statistics: centered, or uncentered when it has no bias.
fn stats_of(layer: &RepairLayer, x: &ndarray::Array2<f32>) -> ChannelStats {
    match layer.bias {
        Some(_) => ChannelStats::of_columns(x.view()),
        None => ChannelStats::rms_of_columns(x.view()),
    }
}

/// REPAIR along the line between two aligned models: the endpoints'
/// statistics at every layer in `layers` are measured once, and
/// [`RepairedInterpolation::at`] gives `(1 − λ)·A + λ·B` repaired to their
/// interpolation (mean and standard deviation; for a
/// [`scale_only`](RepairLayer::scale_only) layer the root mean square). `taps(model)` is the caller's forward pass: for every
/// layer, in order, its output channels' activations as `[samples,
/// channels]` on the same probe inputs each time. It is called once per
/// layer per λ (each layer is measured after the ones before it were
/// corrected), so a probe of a few hundred samples keeps it cheap.
pub struct RepairedInterpolation<'a, F> {
    a: &'a StateDict,
    b: &'a StateDict,
    layers: Vec<RepairLayer>,
    stats: [Vec<ChannelStats>; 2],
    taps: F,
}

impl<'a, F, E> RepairedInterpolation<'a, F>
where
    F: Fn(&StateDict) -> std::result::Result<Vec<ndarray::Array2<f32>>, E>,
    E: From<PermuteError>,
{
    /// Measures `a` and `b`; an error when `taps` gives another number of
    /// activation matrices than there are layers.
    pub fn new(
        a: &'a StateDict,
        b: &'a StateDict,
        layers: Vec<RepairLayer>,
        taps: F,
    ) -> std::result::Result<Self, E> {
        let measure = |sd: &StateDict, name: &str| -> std::result::Result<Vec<ChannelStats>, E> {
            let acts = taps(sd)?;
            if acts.len() != layers.len() {
                return Err(PermuteError::Shape {
                    what: format!("REPAIR taps of model {name}"),
                    msg: format!(
                        "{} activation matrices for {} layers",
                        acts.len(),
                        layers.len()
                    ),
                }
                .into());
            }
            Ok(acts
                .iter()
                .zip(&layers)
                .map(|(x, l)| stats_of(l, x))
                .collect())
        };
        let stats = [measure(a, "A")?, measure(b, "B")?];
        Ok(RepairedInterpolation {
            a,
            b,
            layers,
            stats,
            taps,
        })
    }

    /// The endpoints' statistics, per layer.
    pub fn endpoint_stats(&self) -> &[Vec<ChannelStats>; 2] {
        &self.stats
    }

    /// `(1 − λ)·A + λ·B`, repaired.
    pub fn at(&self, lambda: f64) -> std::result::Result<StateDict, E> {
        let [sa, sb] = &self.stats;
        let targets = sa
            .iter()
            .zip(sb)
            .map(|(x, y)| ChannelStats::interpolate(x, y, lambda))
            .collect::<Result<Vec<_>>>()?;
        let m = crate::interp::lerp(self.a, self.b, lambda as f32)?;
        repair(&m, &self.layers, &targets, |sd, i| {
            let acts = (self.taps)(sd)?;
            match acts.get(i) {
                Some(x) => Ok(stats_of(&self.layers[i], x)),
                None => Err(PermuteError::Shape {
                    what: "REPAIR taps".into(),
                    msg: format!("{} activation matrices, layer {i} asked for", acts.len()),
                }
                .into()),
            }
        })
    }
}
