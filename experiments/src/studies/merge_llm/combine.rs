//! `merge --model PATH --combine DIR,DIR,…`: one report of merge runs of
//! other groups (fine-tuning methods) of one base — a run split by
//! fine-tuning method so that each part (fine-tunes, then their merges)
//! fits a session, possibly run on other machines. Every part must be a
//! finished `merge --model` run with the same options but for what it
//! merged, of the same base (file size and base scores), and each group
//! must come from one part. The combined folder gets the tables, plots,
//! `report.md`, `merges.csv` and `metrics.json` a single run of all the
//! groups writes (rows in the parts' order), with the parts' run records;
//! only the parts' `metrics.json` are read, so a part whose fine-tunes or
//! best models are gone (a session's scratch folder) still combines.

use std::path::{Path, PathBuf};

use anyhow::{Context, ensure};
use serde::Serialize;
use serde_json::Value;

use super::{
    BaseScores, METHODS, MergeArgs, Metrics, Plan, Rows, merges_csv, own_scores, plots,
    refuse_character_options, report,
};
use crate::report::{
    InputFile, RunRecord, input_files, parts_table, plan_differences, relative_path, resized_input,
    same_folder, saved_inputs, within_one_example,
};
use s2ft_core::Pretrained;

/// What a combined report needs of a part's `metrics.json`.
type PartMetrics = crate::report::PartMetrics<Rows>;

/// A part as the combined `metrics.json` names it.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct MergePart {
    /// Its report folder, as given to `--combine`.
    pub dir: PathBuf,
    /// The groups it merged.
    pub groups: Vec<String>,
    /// Its run record (command, commit, backend, wall time).
    pub run: RunRecord,
}

/// The plan's entries in which parts differ: what each merged (its
/// fine-tunes, groups and methods), how those were trained (the multi-task
/// baseline's settings) and whether its scratch inputs were kept.
const PER_PART: [&str; 5] = ["sources", "groups", "methods", "training", "keep_inputs"];

/// Reads and checks the parts `--combine` names, then writes the combined
/// report into `--out`; returns its folder.
pub(super) fn combine(args: &MergeArgs) -> anyhow::Result<PathBuf> {
    let (o, run_args) = (&args.llm, &args.lm.run);
    let dirs = &o.combine;
    ensure!(
        !run_args.resume,
        "--combine writes a new report from finished runs: it does not take --resume"
    );
    super::super::refuse_given(
        &o.merge_options(),
        "does not apply with --combine: the parts' options and fine-tunes are used",
    )?;
    refuse_character_options(args)?;
    let out = run_args
        .out
        .as_deref()
        .context("--combine needs --out DIR, the folder of the combined report")?;
    let model = o.model.as_deref().context("--model is required here")?;
    let base = Pretrained::load(model).with_context(|| format!("--model {}", model.display()))?;
    let model_files = input_files(&[model])?;

    let mut parts: Vec<(MergePart, PartMetrics, Plan)> = Vec::new();
    for dir in dirs {
        ensure!(
            !same_folder(dir, out),
            "--combine: --out {} is one of the parts; give a new folder",
            out.display()
        );
        let (part, pm, plan) = read_merge_part(dir, model, &model_files)?;
        if let Some((first, fm, fplan)) = parts.first() {
            let (there, here) = (
                format!("in {}", first.dir.display()),
                format!("in {}", dir.display()),
            );
            let differ = plan_differences(&shared(&fm.plan), &shared(&pm.plan), (&there, &here))?;
            ensure!(
                differ.is_empty(),
                "--combine: {} and {} were run with other options ({}); combine runs of one plan",
                first.dir.display(),
                dir.display(),
                differ.join("; ")
            );
            same_base(&fm.rows.base, &pm.rows.base, fplan.eval_examples).with_context(|| {
                format!(
                    "--combine: the base model scored differently in {} and {}",
                    first.dir.display(),
                    dir.display()
                )
            })?;
        }
        for g in &part.groups {
            if let Some((other, _, _)) = parts.iter().find(|(p, _, _)| p.groups.contains(g)) {
                anyhow::bail!(
                    "--combine: both {} and {} merged group '{g}'; give each group's run once",
                    other.dir.display(),
                    dir.display()
                );
            }
        }
        parts.push((part, pm, plan));
    }
    ensure!(
        !parts.is_empty(),
        "--combine: give the report folders of the runs to combine"
    );

    // The combined plan: the first part's, with every part's fine-tunes,
    // groups and methods (in the study's table order).
    let mut plan = parts[0].2.clone();
    plan.keep_inputs = false;
    for (part, _, p) in &parts[1..] {
        plan.sources.extend(p.sources.iter().cloned());
        plan.groups.extend(p.groups.iter().cloned());
        plan.methods.extend(p.methods.iter().cloned());
        plan.training = match (plan.training.take(), p.training.clone()) {
            (Some(mut t), Some(mut u)) => {
                // The same fine-tuning run read by two parts lists its rates twice.
                u.lrs.retain(|m, lr| t.lrs.get(m) != Some(lr));
                t.absorb(u, "--combine", &parts[0].0.dir, &part.dir)?;
                Some(t)
            }
            (t, u) => t.or(u),
        };
    }
    plan.methods = METHODS
        .iter()
        .filter(|m| plan.methods.iter().any(|x| x == *m))
        .map(|m| m.to_string())
        .collect();
    let mut inputs: Vec<InputFile> = Vec::new();
    for (_, pm, _) in &parts {
        for f in saved_inputs(&pm.inputs)?.unwrap_or_default() {
            if !inputs.iter().any(|g| g.path == f.path) {
                inputs.push(f);
            }
        }
    }

    let run = run_args.open("merge")?;
    let mut rows = Rows {
        base: parts[0].1.rows.base.clone(),
        individual: Vec::new(),
        merges: Vec::new(),
        task_vectors: Vec::new(),
        best: Vec::new(),
        memory_measured: parts.iter().all(|(_, pm, _)| pm.rows.memory_measured),
    };
    let mut records = Vec::new();
    for (part, pm, _) in parts {
        let r = pm.rows;
        // Best models and YAML configs stay in the part's folder: their
        // paths from the new one.
        let rebase = |p: &str| {
            relative_path(&part.dir.join(p), &run.dir)
                .to_string_lossy()
                .into_owned()
        };
        rows.individual.extend(r.individual);
        rows.merges.extend(r.merges.into_iter().map(|mut m| {
            m.yaml = m.yaml.as_deref().map(rebase);
            m
        }));
        rows.task_vectors.extend(r.task_vectors);
        rows.best.extend(r.best.into_iter().map(|mut b| {
            b.path = rebase(&b.path);
            b
        }));
        records.push(part);
    }

    run.write("merges.csv", merges_csv(&rows.merges).as_bytes())?;
    plots(&run, &plan, &rows.merges, &rows.task_vectors)?;
    let c = &base.config;
    let mut md = report(
        &plan,
        c,
        base.weights.numel(),
        &rows.base,
        &own_scores(&rows.individual),
        &rows.merges,
        &rows.task_vectors,
        &rows.best,
    );
    md.push_str(
        "\n## Parts\n\nThis report combines merge runs of other groups (`merge --combine`); \
         the base model's scores are the first part's (the parts' agree to one example per \
         split), and the best models stay in the parts' folders. Merge times and memory \
         compare within a part: parts run on other machines or beside other work differ in \
         speed.\n\n",
    );
    parts_table(
        &mut md,
        "groups",
        records
            .iter()
            .map(|p| (p.dir.as_path(), p.groups.join(", "), &p.run)),
    );
    let metrics = Metrics {
        model: &plan.model,
        config: c,
        plan: &plan,
        inputs: &inputs,
        parts: &records,
        rows,
    };
    run.finish(&metrics, &md)?;
    Ok(run.dir.clone())
}

/// A plan's entries that every part must share.
fn shared(plan: &Value) -> Value {
    let mut v = plan.clone();
    if let Some(m) = v.as_object_mut() {
        for k in PER_PART {
            m.remove(k);
        }
    }
    v
}

/// One part's `metrics.json`: a finished merge run of `model` (same path,
/// same file sizes: a model fetched again in another session has other
/// modification times but the same bytes).
fn read_merge_part(
    dir: &Path,
    model: &Path,
    model_files: &[InputFile],
) -> anyhow::Result<(MergePart, PartMetrics, Plan)> {
    let recorded = crate::report::read_part::<Rows>(dir, "merge")?;
    let pm = recorded.metrics;
    let plan: Plan = serde_json::from_value(pm.plan.clone())
        .with_context(|| format!("--combine: reading the plan in {}", dir.display()))?;
    ensure!(
        plan.model == model,
        "--combine: {} merged fine-tunes of {}, not of --model {}",
        dir.display(),
        plan.model.display(),
        model.display()
    );
    let recorded_inputs = saved_inputs(&pm.inputs)
        .with_context(|| format!("--combine: reading the inputs in {}", dir.display()))?
        .unwrap_or_default();
    // The base's files as the part read them (its fine-tunes aside), by size.
    let base_then: Vec<InputFile> = recorded_inputs
        .into_iter()
        .filter(|f| f.path.starts_with(model))
        .collect();
    if let Some((path, then, now)) = resized_input(&base_then, model_files) {
        anyhow::bail!(
            "--combine: {} read {} at {then}; it has {now} now: its scores are of another model",
            dir.display(),
            path.display()
        );
    }
    Ok((
        MergePart {
            dir: dir.to_path_buf(),
            groups: plan.groups.clone(),
            run: recorded.run,
        },
        pm,
        plan,
    ))
}

/// Errors naming the first score on which two parts' base models differ by
/// more than one of `n` examples (the same model scored by two builds or
/// machines: a greedy answer that rounding flipped).
fn same_base(a: &BaseScores, b: &BaseScores, n: usize) -> anyhow::Result<()> {
    for (split, x, y) in [("test", &a.test, &b.test), ("ood", &a.ood, &b.ood)] {
        ensure!(
            x.tasks.keys().eq(y.tasks.keys()),
            "tasks {:?} vs {:?}",
            x.tasks.keys().collect::<Vec<_>>(),
            y.tasks.keys().collect::<Vec<_>>()
        );
        for (task, p) in &x.tasks {
            within_one_example(task, split, *p, y.tasks[task], n)?;
        }
    }
    Ok(())
}
