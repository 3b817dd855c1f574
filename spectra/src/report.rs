//! A per-layer spectral report of a whole checkpoint.
//!
//! Every floating-point tensor that is a matrix (2-D, both dimensions ≥ 2) or
//! a convolution kernel (3-D/4-D) is analysed: ESD ([`crate::esd`]),
//! power-law fit ([`crate::powerlaw`]), norm metrics, Marchenko–Pastur fit
//! and warnings ([`crate::metrics`]), optionally FARMS ([`crate::farms`]) and
//! the randomisation control. Layers are processed in parallel with rayon;
//! each task loads its own tensor from the lazy [`TensorSource`], so at most
//! one tensor per thread is in memory. Rows come back in checkpoint order.

use ndarray::ArrayViewD;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use weights::TensorSource;

use crate::error::{Result, SpectraError};
use crate::esd::{ConvMode, Esd, esd, layer_matrices};
use crate::farms::{FarmsOptions, farms_esd};
use crate::metrics::{
    alpha_metrics, alpha_warning, mp_fit, norm_metrics, rand_distance, randomized_esd,
};
use crate::powerlaw::{FixFingers, PowerLawFit, fit_power_law};

/// Options of a report (defaults follow WeightWatcher's `analyze()`).
#[derive(Debug, Clone, PartialEq)]
pub struct ReportOptions {
    /// `xmin` selection.
    pub fix_fingers: FixFingers,
    /// Least eigenvalues (above 1e-5) for a fit (WeightWatcher: 8).
    pub min_evals: usize,
    /// Layers with more eigenvalues (`M`) are skipped (WeightWatcher: 15,000).
    pub max_evals: usize,
    /// Layers whose larger dimension exceeds this are skipped (WeightWatcher: 50,000).
    pub max_n: usize,
    /// Divide eigenvalues by `N`.
    pub normalize: bool,
    /// Convolution kernels per position or flattened.
    pub conv: ConvMode,
    /// Also compute FARMS α.
    pub farms: Option<FarmsOptions>,
    /// Also compute the randomisation control with this seed.
    pub randomize: Option<u64>,
}

impl Default for ReportOptions {
    fn default() -> Self {
        ReportOptions {
            fix_fingers: FixFingers::None,
            min_evals: 8,
            max_evals: 15_000,
            max_n: 50_000,
            normalize: false,
            conv: ConvMode::PerPosition,
            farms: None,
            randomize: None,
        }
    }
}

/// One row of the report. Metrics that could not be computed are `None`
/// (JSON `null`, empty in CSV), never NaN; `status` says why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerReport {
    /// Tensor name in the checkpoint.
    pub name: String,
    /// Tensor shape as stored (4-D for a convolution kernel).
    pub shape: Vec<usize>,
    /// Larger matrix dimension `N` (0 in `error` rows).
    pub n: usize,
    /// Smaller matrix dimension `M`, eigenvalues per matrix (0 in `error` rows).
    pub m: usize,
    /// Matrices pooled (kernel positions of a conv layer).
    pub num_matrices: usize,
    /// Eigenvalues in the pooled ESD (`num_matrices · m`; 0 when skipped).
    pub num_evals: usize,
    /// `fitted`, `not fitted: …`, `skipped: …` or `error: …`.
    pub status: String,
    /// Power-law exponent α of the ESD tail ([`PowerLawFit::alpha`]).
    pub alpha: Option<f64>,
    /// Lower bound of the fitted tail.
    pub xmin: Option<f64>,
    /// Largest eigenvalue used in the fit.
    pub xmax: Option<f64>,
    /// Kolmogorov–Smirnov distance `D` of the fit at `xmin`.
    pub ks_distance: Option<f64>,
    /// Standard error of α, `(α − 1)/√n` for `n` tail eigenvalues.
    pub sigma: Option<f64>,
    /// Eigenvalues `≥ xmin` (the power-law tail).
    pub num_pl_spikes: Option<usize>,
    /// Fingers clipped by `ClipXmax` (0: none).
    pub num_fingers: Option<usize>,
    /// `α · log10 λmax`.
    pub alpha_weighted: Option<f64>,
    /// `log10 Σ λ^α`.
    pub log_alpha_norm: Option<f64>,
    /// `log10 Σλ`, the log of the squared Frobenius norm.
    pub log_norm: Option<f64>,
    /// `log10 λmax`, the log of the squared spectral norm.
    pub log_spectral_norm: Option<f64>,
    /// Stable rank `Σλ / λmax`.
    pub stable_rank: Option<f64>,
    /// Normalised spectral entropy `−Σ pᵢ ln pᵢ / ln rank`, `pᵢ = λᵢ/Σλ`
    /// (`None` when rank ≤ 1).
    pub entropy: Option<f64>,
    /// Effective rank `exp(−Σ pᵢ ln pᵢ)`.
    pub effective_rank: Option<f64>,
    /// Numerical rank: singular values above `σmax · N · ε` (ε of `f32`).
    pub rank: Option<usize>,
    /// Upper edge `λ₊` of the fitted Marchenko–Pastur bulk.
    pub mp_bulk_max: Option<f64>,
    /// Eigenvalues above `λ₊` plus four Tracy–Widom scales.
    pub num_spikes: Option<usize>,
    /// `λ₊ / λmax`.
    pub mp_softrank: Option<f64>,
    /// FARMS α: outer `None` (field omitted) when FARMS was not requested or
    /// the row is `skipped`/`error`; inner `None` when it could not be computed
    /// (several pooled matrices, a matrix too small for the windows, no fit).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub farms_alpha: Option<Option<f64>>,
    /// KS distance of the FARMS fit; `None`s as for `farms_alpha`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub farms_ks_distance: Option<Option<f64>>,
    /// Jensen–Shannon divergence between the ESDs of `W` and of `W` with its
    /// entries shuffled ([`crate::metrics::rand_distance`]), in `[0, 1]`; outer
    /// `None` (field omitted) when the control was not requested or the row is
    /// `skipped`/`error`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub rand_distance: Option<Option<f64>>,
    /// `over-trained` (α < 2) or `under-trained` (α > 6).
    pub warning: Option<String>,
}

/// Reads a field that is present (`null` included) as `Some`: an omitted
/// field is `None` (by `default`), a written `null` is `Some(None)`.
fn present<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Option<f64>>, D::Error> {
    Option::<f64>::deserialize(d).map(Some)
}

impl LayerReport {
    fn empty(name: &str, shape: &[usize], status: String) -> Self {
        LayerReport {
            name: name.to_string(),
            shape: shape.to_vec(),
            n: 0,
            m: 0,
            num_matrices: 0,
            num_evals: 0,
            status,
            alpha: None,
            xmin: None,
            xmax: None,
            ks_distance: None,
            sigma: None,
            num_pl_spikes: None,
            num_fingers: None,
            alpha_weighted: None,
            log_alpha_norm: None,
            log_norm: None,
            log_spectral_norm: None,
            stable_rank: None,
            entropy: None,
            effective_rank: None,
            rank: None,
            mp_bulk_max: None,
            num_spikes: None,
            mp_softrank: None,
            farms_alpha: None,
            farms_ks_distance: None,
            rand_distance: None,
            warning: None,
        }
    }
}

/// Everything computed for one layer: the row, and the data an ESD plot needs.
#[derive(Debug, Clone)]
pub struct LayerAnalysis {
    /// The report row.
    pub report: LayerReport,
    /// The ESD (for the log–log histogram).
    pub esd: Esd,
    /// The fit (for the fitted line), if any.
    pub fit: Option<PowerLawFit>,
    /// The FARMS ESD, when requested and computable.
    pub farms_esd: Option<Esd>,
}

fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// Analyses one tensor. `Ok(None)` when it is not a weight matrix; an error
/// for non-finite entries or a failed decomposition; a row with a
/// `skipped`/`not fitted` status when it is too large or too degenerate.
pub fn analyze_tensor(
    name: &str,
    data: ArrayViewD<'_, f32>,
    opts: &ReportOptions,
) -> Result<Option<LayerAnalysis>> {
    let Some(mats) = layer_matrices(data.view(), opts.conv) else {
        return Ok(None);
    };
    let shape = data.shape().to_vec();
    let (r, c) = mats[0].dim();
    let (n, m) = (r.max(c), r.min(c));
    if m > opts.max_evals || n > opts.max_n {
        let mut rep = LayerReport::empty(
            name,
            &shape,
            format!(
                "skipped: {n}x{m} exceeds max_n {} / max_evals {}",
                opts.max_n, opts.max_evals
            ),
        );
        (rep.n, rep.m) = (n, m);
        return Ok(Some(LayerAnalysis {
            report: rep,
            esd: Esd {
                evals: vec![],
                n,
                m,
                num_matrices: mats.len(),
                sv_max: 0.0,
            },
            fit: None,
            farms_esd: None,
        }));
    }
    let e = esd(&mats, opts.normalize, name)?;
    let mut rep = LayerReport::empty(name, &shape, String::new());
    (rep.n, rep.m, rep.num_matrices, rep.num_evals) = (e.n, e.m, e.num_matrices, e.evals.len());
    if let Some(nm) = norm_metrics(&e, f32::EPSILON as f64) {
        rep.log_norm = finite(nm.log_norm);
        rep.log_spectral_norm = finite(nm.log_spectral_norm);
        rep.stable_rank = finite(nm.stable_rank);
        rep.entropy = nm.entropy.and_then(finite);
        rep.effective_rank = finite(nm.effective_rank);
        rep.rank = Some(nm.rank);
    }
    if let Some(mp) = mp_fit(&e, opts.normalize) {
        rep.mp_bulk_max = finite(mp.bulk_max);
        rep.num_spikes = Some(mp.num_spikes);
        rep.mp_softrank = finite(mp.mp_softrank);
    }
    let fit = match fit_power_law(&e.evals, opts.fix_fingers, opts.min_evals) {
        Ok(fit) => {
            let (aw, lan) = alpha_metrics(&e, &fit);
            rep.status = "fitted".into();
            rep.alpha = finite(fit.alpha);
            rep.xmin = finite(fit.xmin);
            rep.xmax = finite(fit.xmax);
            rep.ks_distance = finite(fit.ks_distance);
            rep.sigma = finite(fit.sigma);
            rep.num_pl_spikes = Some(fit.num_pl_spikes);
            rep.num_fingers = Some(fit.num_fingers);
            rep.alpha_weighted = finite(aw);
            rep.log_alpha_norm = finite(lan);
            rep.warning = alpha_warning(fit.alpha).map(String::from);
            Some(fit)
        }
        Err(why) => {
            rep.status = format!("not fitted: {why}");
            None
        }
    };
    let mut farms = None;
    if let Some(fo) = &opts.farms {
        let pooled = mats.len() == 1;
        let f = if pooled {
            farms_esd(mats[0].view(), fo, opts.normalize, name).ok()
        } else {
            None
        };
        let ff = f
            .as_ref()
            .and_then(|f| fit_power_law(&f.evals, opts.fix_fingers, opts.min_evals).ok());
        rep.farms_alpha = Some(ff.and_then(|x| finite(x.alpha)));
        rep.farms_ks_distance = Some(ff.and_then(|x| finite(x.ks_distance)));
        farms = f;
    }
    if let Some(seed) = opts.randomize {
        let rnd = randomized_esd(&mats, opts.normalize, seed, name)?;
        rep.rand_distance = Some(finite(rand_distance(&e.evals, &rnd.evals)));
    }
    Ok(Some(LayerAnalysis {
        report: rep,
        esd: e,
        fit,
        farms_esd: farms,
    }))
}

/// Analyses every weight matrix of `source` in parallel; `progress(done,
/// total, name)` is called after each layer. A layer whose analysis fails
/// (non-finite entries, …) gets an `error: …` row; reading errors abort.
pub fn analyze_source(
    source: &dyn TensorSource,
    opts: &ReportOptions,
    progress: &(dyn Fn(usize, usize, &str) + Sync),
) -> Result<Vec<LayerReport>> {
    let infos: Vec<_> = source
        .infos()
        .into_iter()
        .filter(|i| {
            i.dtype.is_float()
                && (2..=4).contains(&i.shape.len())
                && i.shape[..2].iter().all(|&d| d >= 2)
        })
        .collect();
    let total = infos.len();
    let done = std::sync::atomic::AtomicUsize::new(0);
    let rows: Vec<Option<LayerReport>> = infos
        .par_iter()
        .map(|info| -> Result<Option<LayerReport>> {
            let t = source.load(&info.name)?;
            let row = match analyze_tensor(&info.name, t.data.view(), opts) {
                Ok(a) => a.map(|a| a.report),
                Err(SpectraError::Weights(e)) => return Err(SpectraError::Weights(e)),
                Err(e) => Some(LayerReport::empty(
                    &info.name,
                    &info.shape,
                    format!("error: {e}"),
                )),
            };
            let k = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            progress(k, total, &info.name);
            Ok(row)
        })
        .collect::<Result<_>>()?;
    Ok(rows.into_iter().flatten().collect())
}

const CSV_COLUMNS: &[&str] = &[
    "name",
    "shape",
    "n",
    "m",
    "num_matrices",
    "num_evals",
    "status",
    "alpha",
    "xmin",
    "xmax",
    "ks_distance",
    "sigma",
    "num_pl_spikes",
    "num_fingers",
    "alpha_weighted",
    "log_alpha_norm",
    "log_norm",
    "log_spectral_norm",
    "stable_rank",
    "entropy",
    "effective_rank",
    "rank",
    "mp_bulk_max",
    "num_spikes",
    "mp_softrank",
    "farms_alpha",
    "farms_ks_distance",
    "rand_distance",
    "warning",
];

fn csv_field(v: &serde_json::Value) -> String {
    let s = match v {
        serde_json::Value::Null => String::new(),
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(a) => a
            .iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join("x"),
        other => other.to_string(),
    };
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// The report as CSV (RFC 4180 quoting; shapes written as `768x3072`).
pub fn to_csv(rows: &[LayerReport]) -> String {
    let mut out = CSV_COLUMNS.join(",");
    out.push('\n');
    for r in rows {
        let v = serde_json::to_value(r).expect("serialisable");
        let fields: Vec<String> = CSV_COLUMNS
            .iter()
            .map(|c| csv_field(v.get(*c).unwrap_or(&serde_json::Value::Null)))
            .collect();
        out.push_str(&fields.join(","));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_read_back_as_written_omitted_and_null_metrics_apart() {
        let mut row = LayerReport::empty("w", &[4, 3], "ok".into());
        row.farms_alpha = Some(None);
        row.rand_distance = Some(Some(0.25));
        let text = serde_json::to_string(&row).unwrap();
        assert!(text.contains("\"farms_alpha\":null") && !text.contains("farms_ks_distance"));
        let back: LayerReport = serde_json::from_str(&text).unwrap();
        assert_eq!(back, row);
    }
}
