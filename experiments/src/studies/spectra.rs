//! `spectra`: a per-layer ESD report of a checkpoint — WeightWatcher's α,
//! weighted α, stable rank, MP spikes, FARMS α — with ESD log–log plots and
//! their power-law fits, and a WeLore low-rank plan.

use std::path::{Path, PathBuf};

use anyhow::Context;
use ndarray::{ArrayD, IxDyn};
use rayon::prelude::*;
use serde::Serialize;
use spectra::farms::FarmsOptions;
use spectra::report::{LayerAnalysis, ReportOptions, analyze_tensor, to_csv};
use weights::{Checkpoint, StateDict, Tensor, TensorSource};

use crate::plot::{Series, line_chart};
use crate::report::Run;

/// Options of the study.
#[derive(Clone, Debug, clap::Args)]
pub struct SpectraArgs {
    /// Checkpoint: safetensors file, sharded folder or GGUF (default:
    /// models/all-MiniLM-L6-v2 when fetched, else a synthetic heavy-tailed checkpoint).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Tiny size for tests: the synthetic checkpoint unless --model is given.
    #[arg(long)]
    pub quick: bool,
    /// Report folder (default `results/spectra/<timestamp>`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Skip FARMS (faster).
    #[arg(long)]
    pub no_farms: bool,
    /// WeLore target reduction of the rank plan.
    #[arg(long, default_value_t = 0.5)]
    pub welore_reduction: f64,
    /// Seed of the synthetic checkpoint.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// No progress output.
    #[arg(long)]
    pub quiet: bool,
}

/// A seeded checkpoint whose weights are Student-t (ν = 3): heavy-tailed ESDs like trained layers.
pub fn synthetic(seed: u64, quick: bool) -> StateDict {
    let mut rng = weights::rng::Rng::new(seed);
    let dims: &[(usize, usize)] = if quick {
        &[(96, 64), (128, 96), (64, 128)]
    } else {
        &[(512, 256), (768, 512), (512, 768), (256, 512)]
    };
    let mut sd = StateDict::new();
    for (i, &(o, n)) in dims.iter().enumerate() {
        let data = ArrayD::from_shape_fn(IxDyn(&[o, n]), |_| {
            let z = rng.normal();
            let chi2: f64 = (0..3).map(|_| rng.normal().powi(2)).sum();
            (z / (chi2 / 3.0).sqrt() / (n as f64).sqrt()) as f32
        });
        sd.insert(format!("layers.{i}.weight"), Tensor::f32(data));
    }
    sd
}

/// The fitted power law drawn over the CCDF of `n` eigenvalues: from
/// `(log10 xmin, log10 P(λ ≥ xmin))` with slope `1 − α`, over the fitted
/// tail only (up to the fit's `xmax`, below clipped fingers).
fn fit_line(fit: &spectra::powerlaw::PowerLawFit, n: usize) -> Vec<(f64, f64)> {
    let frac = fit.num_pl_spikes as f64 / n as f64;
    let (lo, hi) = (fit.xmin.log10(), fit.xmax.log10());
    (0..=20)
        .map(|k| {
            let lx = lo + (hi - lo) * k as f64 / 20.0;
            (lx, frac.log10() - (fit.alpha - 1.0) * (lx - lo))
        })
        .collect()
}

fn ccdf(evals: &[f64]) -> Vec<(f64, f64)> {
    let n = evals.len();
    let mut v: Vec<f64> = evals.iter().copied().filter(|x| *x > 0.0).collect();
    v.sort_by(f64::total_cmp);
    v.iter()
        .enumerate()
        .map(|(i, &x)| (x.log10(), ((n - i) as f64 / n as f64).log10()))
        .collect()
}

/// Runs the study; returns the report folder.
pub fn run(args: &SpectraArgs) -> anyhow::Result<PathBuf> {
    let mut run = Run::create(
        "spectra",
        args.out.as_deref(),
        crate::device::Device::Cpu,
        args.quiet,
    )?;
    let (label, sd) = load(args, &mut run)?;
    let opts = ReportOptions {
        farms: (!args.no_farms).then(FarmsOptions::default),
        ..Default::default()
    };
    let analyses = analyze(&sd, &opts, &mut run)?;
    anyhow::ensure!(
        !analyses.is_empty(),
        "{label}: no weight matrices to analyse"
    );
    let rows: Vec<_> = analyses.iter().map(|a| a.report.clone()).collect();
    run.write("layers.csv", to_csv(&rows).as_bytes())?;
    // WeLore plan from the singular values (σ = √λ of the unnormalised ESD).
    let layers: Vec<(String, Vec<usize>, Vec<f64>)> = analyses
        .iter()
        .filter(|a| a.esd.num_matrices == 1)
        .map(|a| {
            let mut sv: Vec<f64> = a.esd.evals.iter().map(|l| l.max(0.0).sqrt()).collect();
            sv.sort_by(|x, y| y.total_cmp(x));
            (a.report.name.clone(), a.report.shape.clone(), sv)
        })
        .collect();
    let plan = spectra::welore::welore_plan(&layers, args.welore_reduction, 0.1)?;
    let dir = run.dir.clone();
    run.phase("plots", || plots(&dir, &analyses, !args.no_farms))?;
    let (metrics, md) = report(&label, rows, plan)?;
    run.finish(&metrics, &md)?;
    Ok(run.dir.clone())
}

/// The checkpoint to analyse and its label: `--model`, else the fetched
/// MiniLM, else (and with `--quick`) a synthetic heavy-tailed one.
fn load(args: &SpectraArgs, run: &mut Run) -> anyhow::Result<(String, StateDict)> {
    let minilm = Path::new("models/all-MiniLM-L6-v2/model.safetensors");
    Ok(match (&args.model, args.quick) {
        (Some(p), _) => {
            let src = Checkpoint::open(p).with_context(|| format!("opening {}", p.display()))?;
            (
                p.display().to_string(),
                run.phase("load", || src.load_all())?,
            )
        }
        (None, false) if minilm.is_file() => (
            minilm.display().to_string(),
            run.phase("load", || Checkpoint::open(minilm)?.load_all())?,
        ),
        (None, quick) => (
            format!("synthetic Student-t (ν = 3) checkpoint, seed {}", args.seed),
            synthetic(args.seed, quick),
        ),
    })
}

/// Every weight matrix of `sd` analysed, in parallel (others skipped).
fn analyze(
    sd: &StateDict,
    opts: &ReportOptions,
    run: &mut Run,
) -> anyhow::Result<Vec<LayerAnalysis>> {
    let names: Vec<&str> = sd.keys().collect();
    let bar = run.progress(names.len() as u64);
    let analyses = run.phase("analyze", || -> anyhow::Result<Vec<LayerAnalysis>> {
        let rows: Vec<Option<LayerAnalysis>> = names
            .par_iter()
            .map(|&n| {
                let t = sd
                    .get(n)
                    .ok_or_else(|| anyhow::anyhow!("no tensor '{n}'"))?;
                let r = analyze_tensor(n, t.data.view(), opts);
                bar.inc(1);
                r.with_context(|| format!("analysing {n}"))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(rows.into_iter().flatten().collect())
    })?;
    bar.finish_and_clear();
    Ok(analyses)
}

/// α per layer (and FARMS α), and the ESD tails of up to four layers with their fits.
fn plots(dir: &Path, analyses: &[LayerAnalysis], farms: bool) -> anyhow::Result<()> {
    let idx = |f: &dyn Fn(&spectra::report::LayerReport) -> Option<f64>| -> Vec<(f64, f64)> {
        analyses
            .iter()
            .enumerate()
            .filter_map(|(i, a)| f(&a.report).map(|v| (i as f64, v)))
            .collect()
    };
    let mut series = vec![Series::line("alpha (CSN)", idx(&|r| r.alpha))];
    if farms {
        series.push(Series::line(
            "FARMS alpha",
            idx(&|r| r.farms_alpha.flatten()),
        ));
    }
    line_chart(
        &dir.join("alpha_per_layer"),
        "Power-law exponent per layer",
        "layer index",
        "alpha",
        &series,
    )?;
    let mut esd_series = Vec::new();
    let fitted = analyses.iter().filter_map(|a| Some((a, a.fit.as_ref()?)));
    for (k, (a, fit)) in fitted.take(4).enumerate() {
        let pts = ccdf(&a.esd.evals);
        esd_series.push(Series::dots(a.report.name.clone(), pts).colored(k));
        let line = fit_line(fit, a.esd.evals.len());
        esd_series.push(Series::line(format!("fit α = {:.2}", fit.alpha), line).colored(k));
    }
    line_chart(
        &dir.join("esd_tails"),
        "ESD tails (CCDF) and power-law fits",
        "log10 eigenvalue",
        "log10 P(λ ≥ x)",
        &esd_series,
    )
}

/// What `metrics.json` holds (read back by [`crate::report::read_metrics`]).
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Metrics {
    /// The checkpoint analysed (its path, or the synthetic one's label).
    pub source: String,
    /// One row per weight matrix, in checkpoint order.
    pub layers: Vec<spectra::report::LayerReport>,
    /// Mean α over the fitted layers (`None`: none fitted).
    pub mean_alpha: Option<f64>,
    /// Mean weighted α over the layers that have one.
    pub mean_alpha_weighted: Option<f64>,
    /// The WeLore rank plan.
    pub welore: Vec<spectra::welore::WeloreLayer>,
}

/// `metrics.json` and `report.md` from the layers' rows and the WeLore plan.
fn report(
    label: &str,
    rows: Vec<spectra::report::LayerReport>,
    plan: Vec<spectra::welore::WeloreLayer>,
) -> anyhow::Result<(Metrics, String)> {
    let fitted: Vec<f64> = rows.iter().filter_map(|r| r.alpha).collect();
    let mean = |v: &[f64]| {
        if v.is_empty() {
            None
        } else {
            Some(v.iter().sum::<f64>() / v.len() as f64)
        }
    };
    let weighted: Vec<f64> = rows.iter().filter_map(|r| r.alpha_weighted).collect();
    let mut md = format!(
        "# Spectra of {label}\n\n{} weight matrices analysed; mean α {}, mean weighted α {}.\n\n",
        rows.len(),
        mean(&fitted).map_or("–".into(), |v| format!("{v:.3}")),
        mean(&weighted).map_or("–".into(), |v| format!("{v:.3}"))
    );
    md.push_str("| layer | shape | α | weighted α | stable rank | MP spikes | FARMS α | WeLore rank |\n|---|---|---|---|---|---|---|---|\n");
    let f = |v: Option<f64>| v.map_or("–".to_string(), |x| format!("{x:.3}"));
    for r in &rows {
        let wl = plan
            .iter()
            .find(|p| p.name == r.name)
            .map_or("–".to_string(), |p| format!("{}/{}", p.rank, p.full_rank));
        md.push_str(&format!(
            "| {} | {:?} | {} | {} | {} | {} | {} | {} |\n",
            r.name,
            r.shape,
            f(r.alpha),
            f(r.alpha_weighted),
            f(r.stable_rank),
            r.num_spikes.map_or("–".into(), |v| v.to_string()),
            f(r.farms_alpha.flatten()),
            wl
        ));
    }
    md.push_str("\n![alpha per layer](alpha_per_layer.png)\n\n![ESD tails](esd_tails.png)\n");
    let metrics = Metrics {
        source: label.to_string(),
        mean_alpha: mean(&fitted),
        mean_alpha_weighted: mean(&weighted),
        layers: rows,
        welore: plan,
    };
    Ok((metrics, md))
}

#[cfg(test)]
mod tests {
    use super::*;
    use spectra::powerlaw::{FixFingers, fit_power_law};

    /// The fit line spans the fitted tail: from xmin to the largest
    /// eigenvalue fitted, never past the data, stopping below clipped fingers.
    #[test]
    fn the_fit_line_spans_the_fitted_tail_only() {
        let mut rng = weights::rng::Rng::new(4);
        let mut evals: Vec<f64> = (0..500)
            .map(|_| 0.5 * (1.0 - rng.uniform()).powf(-1.0 / 1.5))
            .collect();
        evals.sort_by(|a, b| a.total_cmp(b));
        let top = evals[evals.len() - 1].log10();
        let fit = fit_power_law(&evals, FixFingers::None, 8).unwrap();
        let line = fit_line(&fit, evals.len());
        let (first, last) = (line[0], line[line.len() - 1]);
        assert_eq!(first.0, fit.xmin.log10());
        assert_eq!(last.0, top, "ends at the largest eigenvalue");
        // Starts on the CCDF at xmin.
        let at_xmin = evals.iter().filter(|&&e| e >= fit.xmin).count() as f64 / 500.0;
        assert!((first.1 - at_xmin.log10()).abs() < 1e-12);
        // With fingers clipped (MiniLM's fingered spectrum, spectra's
        // WeightWatcher fixture), the line stops at the largest value kept.
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../spectra/tests/fixtures/ww_finger.json"
        );
        let f: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let fingered: Vec<f64> = f["evals"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_f64())
            .collect();
        let clip = FixFingers::ClipXmax {
            max_fingers: 10,
            finger_thresh: 1.0,
        };
        let fit = fit_power_law(&fingered, clip, 8).unwrap();
        let line = fit_line(&fit, fingered.len());
        let end = line[line.len() - 1].0;
        let data_top = fingered.iter().copied().fold(0.0, f64::max).log10();
        assert!(fit.num_fingers > 0, "{fit:?}");
        assert_eq!(end, fit.xmax.log10());
        assert!(
            end < data_top,
            "stops below the fingers: {end} vs {data_top}"
        );
    }
}
