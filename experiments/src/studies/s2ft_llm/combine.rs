//! `s2ft --model PATH --combine DIR,DIR,…`: one report of a run split into
//! parts by `--methods` (the default run's two parts, each hours long on a
//! CPU, possibly on two machines). Every part must be a finished run of
//! the same plan but for its methods and on the same input files; each
//! method comes from exactly one part. The combined folder gets the tables,
//! plots, `report.md` and `metrics.json` a single run of all the methods
//! writes, with `finetunes/manifest.json` pointing into the parts (so
//! `merge --finetunes` takes it too) and the parts' run records.

use std::path::{Path, PathBuf};

use anyhow::{Context, ensure};
use serde::Serialize;
use serde_json::Value;

use super::{
    BaseScores, Metrics, Plan, Prepared, Results, Rows, label, plots, report, runs_csv, summarize,
    summary_csv, sweep_csv,
};
use crate::report::{
    RunArgs, RunRecord, parts_table, plan_differences, relative_path, resized_input, same_folder,
    saved_inputs, within_one_example,
};

/// What a combined report needs of a part's `metrics.json`.
type PartMetrics = crate::report::PartMetrics<Rows>;

/// A part as the combined `metrics.json` names it.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Part {
    /// Its report folder, as given to `--combine`.
    pub dir: PathBuf,
    /// The methods it trained (labels as in its plan).
    pub methods: Vec<String>,
    /// Its run record (command, commit, backend, wall time).
    pub run: RunRecord,
    /// The fine-tunes it lists and no longer holds (paths in its folder).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<String>,
}

/// How far the base model's held-out losses may differ between two parts
/// (the same model scored by two builds or machines: floats summed in
/// another order); accuracies may differ by one example of a split, a
/// greedy answer that rounding flipped.
const BASE_LOSS_TOLERANCE: f64 = 1e-3;

/// Reads and checks the parts in `dirs`, then writes the combined report
/// into `--out`; returns its folder.
pub(super) fn combine(
    plan: &Plan,
    prep: &Prepared,
    dirs: &[PathBuf],
    run_args: &RunArgs,
) -> anyhow::Result<PathBuf> {
    ensure!(
        !run_args.resume,
        "--combine writes a new report from finished parts: it does not take --resume"
    );
    ensure!(
        !dirs.is_empty(),
        "--combine: give the report folders of the parts"
    );
    let out = run_args
        .out
        .as_deref()
        .context("--combine needs --out DIR, the folder of the combined report")?;
    let plan_json = serde_json::to_value(plan)?;
    let mut parts: Vec<(Part, PartMetrics)> = Vec::new();
    for dir in dirs {
        ensure!(
            !same_folder(dir, out),
            "--combine: --out {} is one of the parts; give a new folder",
            out.display()
        );
        let part = read_part(dir, &plan_json, prep)?;
        for m in &part.0.methods {
            if let Some((other, _)) = parts.iter().find(|(p, _)| p.methods.contains(m)) {
                anyhow::bail!(
                    "--combine: both {} and {} trained '{m}'; give each method's part once",
                    other.dir.display(),
                    dir.display()
                );
            }
        }
        if let Some((first, fm)) = parts.first() {
            same_base(&fm.rows.base, &part.1.rows.base, plan.eval_examples).with_context(|| {
                format!(
                    "--combine: the base model scored differently in {} and {}",
                    first.dir.display(),
                    dir.display()
                )
            })?;
        }
        parts.push(part);
    }
    // The part (its index) each method of the plan comes from.
    let owners = plan
        .methods
        .iter()
        .map(|m| {
            parts
                .iter()
                .position(|(p, _)| p.methods.contains(&label(*m)))
                .with_context(|| {
                    format!(
                        "--combine: no part trained '{}'; give its part, or --methods the methods the parts trained",
                        label(*m)
                    )
                })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;

    // The fine-tunes a part lists and no longer holds (a run kept without
    // its models by scripts/keep-run.sh, its machine gone): reported, and
    // left out of the combined manifest.
    for (part, pm) in &mut parts {
        part.missing = pm
            .rows
            .finetunes
            .iter()
            .filter(|e| !part.dir.join(&e.path).is_dir())
            .map(|e| e.path.clone())
            .collect();
    }
    let memory_measured = parts.iter().all(|(_, m)| m.rows.memory_measured);
    // Both sides of a rebased path canonical (they exist): it climbs only as far as needed.
    let part_dirs = parts
        .iter()
        .map(|(p, _)| {
            std::fs::canonicalize(&p.dir).with_context(|| format!("reading {}", p.dir.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;

    // Rows in the plan's method order, saved paths relative to the new folder.
    let run = run_args.open("s2ft")?;
    let finetunes = run.dir.join("finetunes");
    std::fs::create_dir_all(&finetunes)
        .with_context(|| format!("creating {}", finetunes.display()))?;
    let mut res = Results::default();
    for (m, owner) in plan.methods.iter().zip(owners) {
        let name = m.label();
        let pm = &parts[owner].1;
        let rebase = |p: &str| -> String {
            relative_path(&part_dirs[owner].join(p), &run.dir)
                .to_string_lossy()
                .into_owned()
        };
        let rows = &pm.rows;
        res.sweep
            .extend(rows.sweep.iter().filter(|r| r.method == name).cloned());
        res.rows
            .extend(rows.runs.iter().filter(|r| r.method == name).map(|r| {
                let mut r = r.clone();
                r.saved = r.saved.as_deref().map(rebase);
                r
            }));
        let missing = &parts[owner].0.missing;
        res.manifest.extend(
            rows.finetunes
                .iter()
                .filter(|e| e.method == name && !missing.contains(&e.path))
                .map(|e| {
                    let mut e = e.clone();
                    e.path = rebase(&e.path);
                    e
                }),
        );
    }
    let base = parts[0].1.rows.base.clone();
    let parts: Vec<Part> = parts.into_iter().map(|(p, _)| p).collect();

    let summary = summarize(&plan.methods, &res.rows);
    run.write("sweep.csv", sweep_csv(&res.sweep).as_bytes())?;
    run.write("runs.csv", runs_csv(&res.rows).as_bytes())?;
    run.write("summary.csv", summary_csv(&summary).as_bytes())?;
    run.write(
        "finetunes/manifest.json",
        serde_json::to_string_pretty(&res.manifest)?.as_bytes(),
    )?;
    plots(&run, plan, &summary, &res.rows, &res.sweep)?;
    let c = &prep.base.config;
    let mut md = report(plan, c, prep, &base, &summary, &res.rows, &res.sweep);
    parts_section(&mut md, &parts);
    let metrics = Metrics {
        model: &plan.model,
        config: c,
        plan,
        inputs: &prep.inputs,
        parts: &parts,
        rows: Rows {
            base,
            sweep: res.sweep,
            runs: res.rows,
            summary,
            finetunes: res.manifest,
            memory_measured,
        },
    };
    run.finish(&metrics, &md)?;
    Ok(run.dir.clone())
}

/// One part's `metrics.json`, checked against the plan (all but its
/// methods) and the input files read now.
fn read_part(
    dir: &Path,
    plan_json: &Value,
    prep: &Prepared,
) -> anyhow::Result<(Part, PartMetrics)> {
    let recorded = crate::report::read_part::<Rows>(dir, "s2ft")?;
    let pm = recorded.metrics;
    let methods: Vec<String> = serde_json::from_value(pm.plan["methods"].clone())
        .with_context(|| format!("--combine: reading the plan's methods in {}", dir.display()))?;
    // The plan as this part ran it: its methods (and the ranks they use).
    let mut here = plan_json.clone();
    for key in ["methods", "ranks"] {
        here[key] = pm.plan[key].clone();
    }
    let there = format!("in {}", dir.display());
    let differ = plan_differences(&pm.plan, &here, (&there, "here"))
        .with_context(|| format!("--combine: reading the plan in {}", dir.display()))?;
    ensure!(
        differ.is_empty(),
        "--combine: {} was run with other options ({}); give the options its parts were run with",
        dir.display(),
        differ.join("; ")
    );
    let inputs = saved_inputs(&pm.inputs)
        .with_context(|| format!("--combine: reading the inputs in {}", dir.display()))?;
    // By size: a part run in another session read a model fetched again.
    if let Some((path, then, now)) = inputs
        .as_deref()
        .and_then(|inputs| resized_input(inputs, &prep.inputs))
    {
        anyhow::bail!(
            "--combine: {} changed since {} read it ({then} then, {now} now); its scores are of another model",
            path.display(),
            dir.display()
        );
    }
    Ok((
        Part {
            dir: dir.to_path_buf(),
            missing: Vec::new(),
            methods,
            run: recorded.run,
        },
        pm,
    ))
}

/// Errors naming the first score on which two parts' base models differ by
/// more than rounding does (`n` examples per split).
fn same_base(a: &BaseScores, b: &BaseScores, n: usize) -> anyhow::Result<()> {
    ensure!(
        a.tasks.keys().eq(b.tasks.keys()) && a.text_loss.keys().eq(b.text_loss.keys()),
        "tasks {:?} and corpora {:?} vs {:?} and {:?}",
        a.tasks.keys().collect::<Vec<_>>(),
        a.text_loss.keys().collect::<Vec<_>>(),
        b.tasks.keys().collect::<Vec<_>>(),
        b.text_loss.keys().collect::<Vec<_>>()
    );
    for (task, x) in &a.tasks {
        let y = &b.tasks[task];
        for (split, p, q) in [("test", &x.test, &y.test), ("ood", &x.ood, &y.ood)] {
            within_one_example(task, split, p.acc, q.acc, n)?;
        }
    }
    for (corpus, x) in &a.text_loss {
        let y = b.text_loss[corpus];
        ensure!(
            (x - y).abs() <= BASE_LOSS_TOLERANCE || (x.is_nan() && y.is_nan()),
            "held-out loss on {corpus} {x} vs {y}"
        );
    }
    Ok(())
}

/// The report's list of parts.
fn parts_section(md: &mut String, parts: &[Part]) {
    md.push_str(
        "\n## Parts\n\nThis report combines runs split by `--methods` (`s2ft --combine`); \
         the base model's scores are the first part's (the parts' agree to one example per \
         split and 0.001 nats/token), and the fine-tunes stay in the parts' folders \
         (`finetunes/manifest.json` here lists them). Step times and memory compare \
         within a part: parts run on other machines or beside other work differ in speed.\n\n",
    );
    parts_table(
        md,
        "methods",
        parts
            .iter()
            .map(|p| (p.dir.as_path(), p.methods.join(", "), &p.run)),
    );
    for p in parts.iter().filter(|p| !p.missing.is_empty()) {
        md.push_str(&format!(
            "\n{} fine-tune(s) of `{}` are no longer in its folder (kept without its models?) and are left out of `finetunes/manifest.json`: {}.\n",
            p.missing.len(),
            p.dir.display(),
            p.missing.join(", ")
        ));
    }
}
