//! `svd-align`: the singular-vector analysis of Ito, Yamada & Kumagai (2024)
//! on the `lmc` study's two trained MLPs — singular values are unchanged by
//! permutation, and weight matching aligns the singular vectors with large
//! singular values while STE, random permutations and no permutation do not.

use std::path::PathBuf;

use spectra::alignment::{Alignment, singular_vector_alignment};
use weights::StateDict;

use crate::plot::{Series, heatmap, line_chart};
use crate::studies::lmc::{LmcArgs, TrainedPair, align_all, train_pair};

/// Options (the `lmc` options choose the models).
#[derive(Clone, Debug, clap::Args)]
pub struct SvdAlignArgs {
    /// The models and matching methods.
    #[command(flatten)]
    pub lmc: LmcArgs,
    /// Top singular vectors compared.
    #[arg(long, default_value_t = 32)]
    pub top: usize,
}

impl Default for SvdAlignArgs {
    fn default() -> Self {
        SvdAlignArgs {
            lmc: LmcArgs::default(),
            top: 32,
        }
    }
}

/// Runs the study; returns the report folder.
pub fn run(args: &SvdAlignArgs) -> anyhow::Result<PathBuf> {
    anyhow::ensure!(
        args.lmc.arch == crate::studies::lmc::Arch::Mlp,
        "--arch {}: svd-align analyses the MLP's hidden-to-hidden matrices; use --arch mlp",
        args.lmc.arch.name()
    );
    anyhow::ensure!(
        !args.lmc.repair,
        "--repair applies to `lmc` (REPAIR of the interpolation curves); `svd-align` has no such curve"
    );
    let mut run = args.lmc.run.open("svd-align")?;
    let pair = train_pair(&args.lmc, &mut run)?;
    let (mut methods, _) = align_all(&pair, &args.lmc, &mut run)?;
    // A random permutation of every group, as a control.
    let spec = permute::builders::mlp(&pair.a)?;
    methods.push(("random", spec.random(args.lmc.seed + 77), 0.0));
    let layers: Vec<String> = (1..pair.sizes.len() - 2)
        .map(|i| format!("layers.{i}.weight"))
        .collect();
    // `metrics.json`: per method, its rows per layer.
    let mut metrics = Metrics::new();
    let mut md = String::from(
        "# Singular-vector alignment after permutation\n\n| method | layer | max rel. σ change | score S (top k) | R(γ=0) | R(γ=0.3) |\n|---|---|---|---|---|---|\n",
    );
    let mut series = Vec::new();
    for (name, perm, _) in &methods {
        let mut per_layer = Vec::new();
        for (li, w) in layers.iter().enumerate() {
            let al = run.phase(&format!("{name} {w}"), || {
                align_layer(&pair, perm, li + 1, args.top)
            })?;
            md.push_str(&format!(
                "| {name} | {w} | {:.1e} | {:.3} | {:.3} | {:.3} |\n",
                al.sv_max_rel_diff, al.score, al.thresholded[0].1, al.thresholded[1].1
            ));
            let diagonal_top: Vec<f64> = al.diagonal.iter().take(args.top).copied().collect();
            if li == 0 {
                series.push(Series::line(
                    *name,
                    diagonal_top
                        .iter()
                        .enumerate()
                        .map(|(k, &v)| (k as f64, v))
                        .collect(),
                ));
                if *name == "wm" || *name == "naive" {
                    heatmap(
                        &run.dir.join(format!("overlap_{name}")),
                        &format!("|u_i(A) · u_j(PB)|, {name}, {w}"),
                        "j (model B)",
                        "i (model A)",
                        &al.u_overlap,
                    )?;
                }
            }
            per_layer.push(LayerRow {
                layer: w.clone(),
                sv_max_rel_diff: al.sv_max_rel_diff,
                score: al.score,
                r_gamma_0: al.thresholded[0].1,
                r_gamma_0_3: al.thresholded[1].1,
                diagonal_top,
            });
        }
        metrics.insert(name.to_string(), per_layer);
        run.partial(&metrics)?;
    }
    line_chart(
        &run.dir.join("alignment_vs_rank"),
        &format!("Alignment a_i = |u_i·u'_i|·|v_i·v'_i|, {}", layers[0]),
        "component i (by σ of A)",
        "a_i",
        &series,
    )?;
    md.push_str("\n![alignment vs rank](alignment_vs_rank.png)\n\n![WM overlaps](overlap_wm.png) ![no permutation](overlap_naive.png)\n");
    run.finish(&metrics, &md)?;
    Ok(run.dir.clone())
}

/// `metrics.json`: per method, in the order they ran, its rows per layer.
pub type Metrics = indexmap::IndexMap<String, Vec<LayerRow>>;

/// One layer of one method in `metrics.json`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct LayerRow {
    /// The weight's name.
    pub layer: String,
    /// Largest change of B's singular values under the permutation, relative to σ₁.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub sv_max_rel_diff: f64,
    /// Score S over the top singular vectors.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub score: f64,
    /// R at threshold γ = 0.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub r_gamma_0: f64,
    /// R at threshold γ = 0.3.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub r_gamma_0_3: f64,
    /// Alignment of each of the top components.
    pub diagonal_top: Vec<f64>,
}

/// Singular-vector alignment of hidden-to-hidden layer `i` of A and of B
/// under `perm` (its rows by group `i`, its columns by group `i − 1`).
fn align_layer(
    pair: &TrainedPair,
    perm: &permute::Permutation,
    i: usize,
    top: usize,
) -> anyhow::Result<Alignment> {
    let w = format!("layers.{i}.weight");
    let matrix = |sd: &StateDict| -> anyhow::Result<ndarray::Array2<f32>> {
        let t = sd
            .get(&w)
            .ok_or_else(|| anyhow::anyhow!("the MLP has no '{w}'"))?;
        Ok(t.data
            .view()
            .into_dimensionality::<ndarray::Ix2>()?
            .to_owned())
    };
    let (a, b) = (matrix(&pair.a)?, matrix(&pair.b)?);
    let p = &perm[&permute::builders::mlp_group(i)].outer;
    let q = &perm[&permute::builders::mlp_group(i - 1)].outer;
    Ok(singular_vector_alignment(
        a.view(),
        b.view(),
        Some(p),
        Some(q),
        top,
        &[0.0, 0.3],
    )?)
}
