//! `many`: merging three or more independently trained MLPs — MergeMany
//! (every model aligned to the mean of the others, repeatedly) vs aligning
//! every model to one anchor by weight matching or STE, vs plain averaging:
//! the merged model's loss and accuracy against the individual models (Git
//! Re-Basin, Table 3 analogue) and the barriers between permuted non-anchor
//! models (Ito et al.: pairwise-to-anchor alignment leaves them far apart).

use std::path::PathBuf;
use std::time::Instant;

use weights::StateDict;

use crate::plot::{Series, line_chart};
use crate::report::Run;
use crate::studies::lmc::{Arch, LmcArgs, TrainedSet, curve, ste, train_models};
use permute::{MatchOptions, apply, weight_matching};

/// Options (the `lmc` options choose the models).
#[derive(Clone, Debug, clap::Args)]
pub struct ManyArgs {
    /// The models' shape, training and matching options.
    #[command(flatten)]
    pub lmc: LmcArgs,
    /// Number of models (3–5 in the papers).
    #[arg(long, default_value_t = 3)]
    pub models: usize,
}

impl Default for ManyArgs {
    fn default() -> Self {
        ManyArgs {
            lmc: LmcArgs::default(),
            models: 3,
        }
    }
}

/// Runs the study; returns the report folder.
pub fn run(args: &ManyArgs) -> anyhow::Result<PathBuf> {
    anyhow::ensure!(
        args.lmc.arch != Arch::Llama,
        "--arch llama: this study merges image networks (mlp, resnet, vgg); `lmc --arch llama` aligns the text model"
    );
    anyhow::ensure!(
        !args.lmc.repair,
        "--repair applies to `lmc` (REPAIR of the interpolation curves); `many` has no such curve"
    );
    anyhow::ensure!(
        args.models >= 3,
        "--models {}: this study needs at least 3 models",
        args.models
    );
    let mut run = args.lmc.run.open("many")?;
    let set = train_models(&args.lmc, args.models, &mut run)?;
    let individual: Vec<(f64, f64)> = set
        .models
        .iter()
        .map(|m| set.arch.evaluate(m, &set.test))
        .collect::<anyhow::Result<_>>()?;
    let (aligned, rounds) = align(args, &set, &mut run)?;
    let mut metrics = ManyMetrics {
        individual: individual
            .iter()
            .map(|&(test_loss, test_acc)| Individual {
                test_loss,
                test_acc,
            })
            .collect(),
        ..Default::default()
    };
    let mut md = format!(
        "# Merging {} models\n\nMLPs {:?}, {} epoch(s) each. Individual test accuracy: {}.\n\n| method | merged test loss | merged test accuracy | mean barrier between non-anchor models | seconds |\n|---|---|---|---|---|\n",
        set.models.len(),
        set.sizes,
        set.epochs,
        individual
            .iter()
            .map(|x| format!("{:.3}", x.1))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut series = Vec::new();
    for (name, ms, secs) in &aligned {
        let (row, pair_1_2) = score(args, &set, ms, *secs)?;
        md.push_str(&format!(
            "| {name} | {:.4} | {:.4} | {:.4} | {secs:.2} |\n",
            row.test_loss, row.test_acc, row.pairwise_barrier,
        ));
        series.push(Series::line(*name, pair_1_2));
        metrics.methods.insert(name.to_string(), row);
        run.partial(&metrics)?;
    }
    line_chart(
        &run.dir.join("pair_1_2_test_loss"),
        "Test loss between models 1 and 2 after alignment",
        "λ",
        "loss",
        &series,
    )?;
    md.push_str("\n![between models 1 and 2](pair_1_2_test_loss.png)\n");
    metrics.merge_many_rounds = Some(rounds);
    run.finish(&metrics, &md)?;
    Ok(run.dir.clone())
}

/// `metrics.json`: the individual models, then every method's row at the
/// top level under its name, then MergeMany's rounds (the partial files hold
/// the rows so far).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ManyMetrics {
    /// Each model alone on the test split.
    pub individual: Vec<Individual>,
    /// Per method, in the order they ran.
    #[serde(flatten)]
    pub methods: indexmap::IndexMap<String, MethodRow>,
    /// Rounds MergeMany took.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merge_many_rounds: Option<usize>,
}

/// One model alone.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Individual {
    /// Its test loss.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub test_loss: f64,
    /// Its test accuracy.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub test_acc: f64,
}

/// A method's name, the models it aligned and its seconds.
type Aligned = (&'static str, Vec<StateDict>, f64);

/// The models aligned by each method: none, weight matching and STE (MLP
/// only) to model 0, MergeMany; also MergeMany's rounds.
fn align(
    args: &ManyArgs,
    set: &TrainedSet,
    run: &mut Run,
) -> anyhow::Result<(Vec<Aligned>, usize)> {
    let (models, dev) = (&set.models, run.device);
    let spec = set.arch.spec(&models[0])?;
    let opts = MatchOptions {
        seed: args.lmc.seed,
        ..Default::default()
    };
    // Every other model aligned to model 0 by `perm_of`.
    let to_anchor = |perm_of: &dyn Fn(&StateDict) -> anyhow::Result<permute::Permutation>| {
        let mut out = vec![models[0].clone()];
        for m in &models[1..] {
            out.push(apply(&spec, &perm_of(m)?, m)?);
        }
        anyhow::Ok(out)
    };
    let mut aligned: Vec<Aligned> = vec![("naive", models.clone(), 0.0)];
    let t = Instant::now();
    let wm = run.phase("anchor WM", || {
        to_anchor(&|m| Ok(weight_matching(&spec, &models[0], m, &opts)?.perm))
    })?;
    aligned.push(("wm_anchor", wm, t.elapsed().as_secs_f64()));
    // STE is implemented for the MLP only.
    if set.arch == Arch::Mlp {
        let t = Instant::now();
        let ste_opts = args.lmc.ste(set.steps_per_epoch)?;
        let st = run.phase("anchor STE", || {
            to_anchor(&|m| ste(&models[0], m, &set.train, ste_opts, dev))
        })?;
        aligned.push(("ste_anchor", st, t.elapsed().as_secs_f64()));
    }
    let t = Instant::now();
    let mm = run.phase("MergeMany", || {
        permute::many::merge_many(&spec, models, &opts, 50)
    })?;
    let mm_models = models
        .iter()
        .zip(&mm.perms)
        .map(|(m, p)| apply(&spec, p, m))
        .collect::<permute::Result<Vec<_>>>()?;
    aligned.push(("merge_many", mm_models, t.elapsed().as_secs_f64()));
    Ok((aligned, mm.rounds))
}

/// One method's entry of `metrics.json`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct MethodRow {
    /// Test loss of the merged (averaged) model.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub test_loss: f64,
    /// Its test accuracy.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub test_acc: f64,
    /// Mean loss barrier between the non-anchor models.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub pairwise_barrier: f64,
    /// Every such barrier.
    pub pairwise_barriers: Vec<f64>,
    /// Seconds to align.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub seconds: f64,
}

/// The merged (averaged) model's test loss and accuracy and the barriers
/// between every pair of non-anchor models; also the test-loss curve between
/// models 1 and 2.
fn score(
    args: &ManyArgs,
    set: &TrainedSet,
    ms: &[StateDict],
    secs: f64,
) -> anyhow::Result<(MethodRow, Vec<(f64, f64)>)> {
    let arch = set.arch;
    let eval_train = set.train.take(2000);
    let merged = permute::many::mean(ms)?;
    let (loss, acc) = arch.evaluate(&merged, &set.test)?;
    let (mut barriers, mut pair_1_2) = (Vec::new(), Vec::new());
    for i in 1..ms.len() {
        for j in i + 1..ms.len() {
            let c = curve(arch, &ms[i], &ms[j], args.lmc.grid, &eval_train, &set.test)?;
            if i == 1 && j == 2 {
                pair_1_2 = c.test.clone();
            }
            barriers.push(c.loss_barrier);
        }
    }
    let mean_barrier = barriers.iter().sum::<f64>() / barriers.len() as f64;
    Ok((
        MethodRow {
            test_loss: loss,
            test_acc: acc,
            pairwise_barrier: mean_barrier,
            pairwise_barriers: barriers,
            seconds: secs,
        },
        pair_1_2,
    ))
}
