//! `many`: merging three or more independently trained MLPs — MergeMany
//! (every model aligned to the mean of the others, repeatedly) vs aligning
//! every model to one anchor by weight matching or STE, vs plain averaging:
//! the merged model's loss and accuracy against the individual models (Git
//! Re-Basin, Table 3 analogue) and the barriers between permuted non-anchor
//! models (Ito et al.: pairwise-to-anchor alignment leaves them far apart).

use std::path::PathBuf;
use std::time::Instant;

use serde_json::json;
use weights::StateDict;

use crate::plot::{Series, line_chart};
use crate::studies::lmc::{Arch, LmcArgs, curve, ste, train_models};
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

/// Runs the study; returns the report folder.
pub fn run(args: &ManyArgs) -> anyhow::Result<PathBuf> {
    anyhow::ensure!(
        args.lmc.arch != Arch::Llama,
        "--arch llama: this study merges image networks (mlp, resnet, vgg); `lmc --arch llama` aligns the text model"
    );
    anyhow::ensure!(
        args.models >= 3,
        "--models {}: this study needs at least 3 models",
        args.models
    );
    let mut run = args.lmc.run.open("many")?;
    let dev = run.device;
    let set = train_models(&args.lmc, args.models, &mut run)?;
    let models = &set.models;
    let arch = set.arch;
    let spec = arch.spec(&models[0])?;
    let individual: Vec<(f64, f64)> = models
        .iter()
        .map(|m| arch.evaluate(m, &set.test))
        .collect::<anyhow::Result<_>>()?;
    // Aligned copies per method (anchor = model 0).
    let mut aligned: Vec<(&str, Vec<StateDict>, f64)> = vec![("naive", models.clone(), 0.0)];
    let t = Instant::now();
    let wm: Vec<StateDict> = run.phase("anchor WM", || -> anyhow::Result<Vec<StateDict>> {
        let mut out = vec![models[0].clone()];
        for m in &models[1..] {
            let p = weight_matching(
                &spec,
                &models[0],
                m,
                &MatchOptions {
                    seed: args.lmc.seed,
                    ..Default::default()
                },
            )?
            .perm;
            out.push(apply(&spec, &p, m)?);
        }
        Ok(out)
    })?;
    aligned.push(("wm_anchor", wm, t.elapsed().as_secs_f64()));
    let t = Instant::now();
    let ste_opts = args.lmc.ste(set.steps_per_epoch)?;
    // STE is implemented for the MLP only.
    let st: Vec<StateDict> = run.phase("anchor STE", || -> anyhow::Result<Vec<StateDict>> {
        if arch != Arch::Mlp {
            return Ok(Vec::new());
        }
        let mut out = vec![models[0].clone()];
        for m in &models[1..] {
            let p = ste(&models[0], m, &set.train, ste_opts, dev)?;
            out.push(apply(&spec, &p, m)?);
        }
        Ok(out)
    })?;
    if !st.is_empty() {
        aligned.push(("ste_anchor", st, t.elapsed().as_secs_f64()));
    }
    let t = Instant::now();
    let mm = run.phase("MergeMany", || {
        permute::many::merge_many(
            &spec,
            models,
            &MatchOptions {
                seed: args.lmc.seed,
                ..Default::default()
            },
            50,
        )
    })?;
    let mm_models = models
        .iter()
        .zip(&mm.perms)
        .map(|(m, p)| apply(&spec, p, m))
        .collect::<permute::Result<Vec<_>>>()?;
    aligned.push(("merge_many", mm_models, t.elapsed().as_secs_f64()));
    let eval_train = set.train.take(2000);
    let mut metrics = serde_json::Map::new();
    metrics.insert(
        "individual".into(),
        json!(
            individual
                .iter()
                .map(|(l, a)| json!({"test_loss": l, "test_acc": a}))
                .collect::<Vec<_>>()
        ),
    );
    let mut md = format!(
        "# Merging {} models\n\nMLPs {:?}, {} epoch(s) each. Individual test accuracy: {}.\n\n| method | merged test loss | merged test accuracy | mean barrier between non-anchor models | seconds |\n|---|---|---|---|---|\n",
        models.len(),
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
        let merged = permute::many::mean(ms)?;
        let (loss, acc) = arch.evaluate(&merged, &set.test)?;
        // Barriers between every pair of non-anchor models after alignment.
        let mut barriers = Vec::new();
        for i in 1..ms.len() {
            for j in i + 1..ms.len() {
                let c = curve(arch, &ms[i], &ms[j], args.lmc.grid, &eval_train, &set.test)?;
                if i == 1 && j == 2 {
                    series.push(Series::line(*name, c.test.clone()));
                }
                barriers.push(c.loss_barrier);
            }
        }
        let mean_barrier = barriers.iter().sum::<f64>() / barriers.len() as f64;
        md.push_str(&format!(
            "| {name} | {loss:.4} | {acc:.4} | {mean_barrier:.4} | {secs:.2} |\n"
        ));
        metrics.insert(name.to_string(), json!({"test_loss": loss, "test_acc": acc, "pairwise_barrier": mean_barrier, "pairwise_barriers": barriers, "seconds": secs}));
        run.partial(&serde_json::Value::Object(metrics.clone()))?;
    }
    line_chart(
        &run.dir.join("pair_1_2_test_loss"),
        "Test loss between models 1 and 2 after alignment",
        "λ",
        "loss",
        &series,
    )?;
    md.push_str("\n![between models 1 and 2](pair_1_2_test_loss.png)\n");
    metrics.insert("merge_many_rounds".into(), json!(mm.rounds));
    run.finish(serde_json::Value::Object(metrics), &md)?;
    Ok(run.dir.clone())
}
