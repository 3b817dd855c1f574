//! The comparison behind `scripts/gpu-check.sh`: the quick `lmc` and `s2ft`
//! runs (and, where SmolLM2 was fetched, the quick real-model `s2ft --model`
//! runs `s2ft-llm-*`) on the CPU and on CUDA must tell the same story. Kernels and
//! summation orders differ, so numbers are compared within tolerances, and
//! each backend's run must keep the study's own conclusion.

use std::path::Path;

use anyhow::{Context, bail};

use crate::report::read_metrics;
use crate::studies::{lmc::LmcMetrics, s2ft::S2ftMetrics, s2ft_llm};

fn load<T: serde::de::DeserializeOwned>(dir: &Path, name: &str) -> anyhow::Result<T> {
    Ok(read_metrics::<T>(&dir.join(name))?.metrics)
}

fn barrier(m: &LmcMetrics, method: &str, dev: &str) -> anyhow::Result<f64> {
    m.methods
        .get(method)
        .map(|r| r.loss_barrier)
        .with_context(|| format!("lmc on {dev}: no '{method}' row"))
}

fn family<'a, R>(
    rows: &'a [R],
    of: impl Fn(&R) -> &str,
    fam: &str,
    what: &str,
) -> anyhow::Result<&'a R> {
    rows.iter()
        .find(|r| of(r) == fam)
        .with_context(|| format!("{what}: no '{fam}' row in summary"))
}

/// Compares `<dir>/{lmc,s2ft}-{cpu,cuda}/metrics.json` (and
/// `s2ft-llm-{cpu,cuda}` where present), each read as its study's metrics;
/// returns the report lines, or an error listing every disagreement.
pub fn compare(dir: &Path) -> anyhow::Result<String> {
    let mut lines = Vec::new();
    let mut bad = Vec::new();
    let mut check = |what: String, cpu: f64, cuda: f64, tol: f64| {
        let ok = (cpu - cuda).abs() <= tol;
        lines.push(format!(
            "{what:<40} cpu {cpu:>9.4}  cuda {cuda:>9.4}  |diff| {:>7.4} (tol {tol}) {}",
            (cpu - cuda).abs(),
            if ok { "ok" } else { "DIFFERS" }
        ));
        if !ok {
            bad.push(what);
        }
    };
    let (lc, lg): (LmcMetrics, LmcMetrics) = (load(dir, "lmc-cpu")?, load(dir, "lmc-cuda")?);
    let endpoints = |m: &LmcMetrics| {
        m.endpoint_test_accuracy
            .context("lmc: no endpoint_test_accuracy")
    };
    let (ec, eg) = (endpoints(&lc)?, endpoints(&lg)?);
    for (i, label) in ["lmc model A test accuracy", "lmc model B test accuracy"]
        .iter()
        .enumerate()
    {
        check(label.to_string(), ec[i], eg[i], 0.03);
    }
    let mut story = Vec::new();
    for (m, dev) in [(&lc, "cpu"), (&lg, "cuda")] {
        let (naive, wm) = (barrier(m, "naive", dev)?, barrier(m, "wm", dev)?);
        if wm >= naive {
            story.push(format!(
                "lmc on {dev}: WM barrier {wm:.3} is not below naive {naive:.3}"
            ));
        }
    }
    let (sc, sg): (S2ftMetrics, S2ftMetrics) = (load(dir, "s2ft-cpu")?, load(dir, "s2ft-cuda")?);
    let row = |m: &'_ S2ftMetrics, fam: &str, dev: &str| {
        family(
            &m.summary,
            |r| r.family.as_str(),
            fam,
            &format!("s2ft {dev}"),
        )
        .cloned()
    };
    check(
        "s2ft base task-A loss".into(),
        sc.base.task_a.loss,
        sg.base.task_a.loss,
        0.1,
    );
    check(
        "s2ft full fine-tuning task-B accuracy".into(),
        row(&sc, "full", "cpu")?.task_b_acc,
        row(&sg, "full", "cuda")?.task_b_acc,
        0.1,
    );
    for (m, dev) in [(&sc, "cpu"), (&sg, "cuda")] {
        let full = row(m, "full", dev)?.forgetting;
        let act = row(m, "s2ft-act", dev)?.forgetting;
        if act >= full {
            story.push(format!(
                "s2ft on {dev}: S²FT forgetting {act:.3} is not below full fine-tuning's {full:.3}"
            ));
        }
    }
    // The real-model runs (scripts/gpu-check.sh with SmolLM2 fetched).
    if dir.join("s2ft-llm-cpu").is_dir() || dir.join("s2ft-llm-cuda").is_dir() {
        let (lc, lg): (s2ft_llm::Rows, s2ft_llm::Rows) =
            (load(dir, "s2ft-llm-cpu")?, load(dir, "s2ft-llm-cuda")?);
        for (k, &cpu) in &lc.base.text_loss {
            let cuda = *lg
                .base
                .text_loss
                .get(k)
                .with_context(|| format!("s2ft-llm cuda: no held-out loss on {k}"))?;
            check(
                format!("real model base held-out loss, {k}"),
                cpu,
                cuda,
                0.01,
            );
        }
        let acc = |m: &s2ft_llm::Rows, fam: &str, dev: &str| {
            family(
                &m.summary,
                |r| r.family.as_str(),
                fam,
                &format!("s2ft-llm {dev}"),
            )
            .map(|r| r.test_acc)
        };
        for fam in ["full", "lora", "s2ft-random"] {
            check(
                format!("real model {fam} in-domain accuracy"),
                acc(&lc, fam, "cpu")?,
                acc(&lg, fam, "cuda")?,
                0.25,
            );
        }
        for (m, dev) in [(&lc, "cpu"), (&lg, "cuda")] {
            let base: Vec<f64> = m.base.tasks.values().map(|t| t.test.acc).collect();
            let base = base.iter().sum::<f64>() / base.len().max(1) as f64;
            let full = acc(m, "full", dev)?;
            if full <= base {
                story.push(format!(
                    "s2ft-llm on {dev}: full fine-tuning's accuracy {full:.3} is not above the base model's {base:.3}"
                ));
            }
        }
    }
    bad.extend(story);
    let report = lines.join("\n");
    if bad.is_empty() {
        Ok(report)
    } else {
        bail!("{report}\n\nCPU and CUDA disagree:\n  {}", bad.join("\n  "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::SetScore;
    use crate::lm::Eval;
    use crate::report::{RunRecord, Versions};
    use crate::studies::{lmc::MethodRow, s2ft};
    use serde::Serialize;

    /// Writes `metrics` with a run record, as a study's `Run::finish` does.
    fn write<T: Serialize>(dir: &Path, name: &str, metrics: T) {
        #[derive(Serialize)]
        struct Written<T> {
            run: RunRecord,
            #[serde(flatten)]
            metrics: T,
        }
        let run = RunRecord {
            study: name.into(),
            command: "test".into(),
            git_commit: "unknown".into(),
            backend: "cpu".into(),
            versions: Versions {
                experiments: "0".into(),
                burn: "0.21".into(),
                rustc_target: "x86_64".into(),
            },
            threads: 1,
            phases_seconds: vec![],
            wall_seconds: 0.0,
            resumes: 0,
        };
        std::fs::create_dir_all(dir.join(name)).unwrap();
        let text = serde_json::to_string(&Written { run, metrics }).unwrap();
        std::fs::write(dir.join(name).join("metrics.json"), text).unwrap();
    }

    fn lmc(acc: f64, wm: f64) -> LmcMetrics {
        let row = |barrier: f64| MethodRow {
            loss_barrier: barrier,
            loss_barrier_mean: barrier,
            acc_barrier: 0.0,
            l2: 1.0,
            seconds: 0.1,
            train_loss: vec![(0.0, 0.1), (1.0, 0.1)],
            test_loss: vec![(0.0, 0.1), (1.0, 0.1)],
        };
        let mut m = LmcMetrics {
            endpoint_test_accuracy: Some([acc, acc]),
            ..Default::default()
        };
        m.methods.insert("naive".into(), row(1.0));
        m.methods.insert("wm".into(), row(wm));
        m
    }

    fn s2ft(loss: f64, act_forgetting: f64) -> S2ftMetrics {
        let row = |family: &str, task_b_acc: f64, forgetting: f64| s2ft::SummaryRow {
            method: family.into(),
            family: family.into(),
            lora_rank_budget: None,
            trainable_params: 10,
            task_b_acc,
            task_b_loss: 1.0,
            forgetting,
            step_ms: 1.0,
            peak_mb: 1.0,
        };
        let eval = |loss: f64| Eval { loss, acc: 0.5 };
        S2ftMetrics {
            config: weights::LlamaConfig::tiny(128, 16, 1, 2, 2, 32),
            task_a: "text".into(),
            task_b: "shift".into(),
            task_c: "mirror".into(),
            pretrain: s2ft::Pretrain {
                steps: 1,
                losses: vec![3.0],
            },
            base: s2ft::BaseScores {
                task_a: eval(loss),
                task_b: eval(3.0),
            },
            runs: vec![],
            summary: vec![row("full", 1.0, 0.8), row("s2ft-act", 0.5, act_forgetting)],
            fusion: vec![],
            switch: vec![],
            memory_measured: false,
        }
    }

    /// The real-model rows: one corpus, one task, three families.
    fn llm(loss: f64, full: f64) -> s2ft_llm::Rows {
        let row = |family: &str, test_acc: f64| s2ft_llm::SummaryRow {
            method: family.into(),
            family: family.into(),
            rank: None,
            trainable_params: 10,
            lr: 1e-3,
            tasks: 1,
            test_acc,
            ood_acc: test_acc,
            other_tasks_delta: 0.0,
            forgetting: 0.0,
            step_ms: 1.0,
            peak_mb: None,
        };
        let zero = || SetScore::default();
        s2ft_llm::Rows {
            base: s2ft_llm::BaseScores {
                tasks: [(
                    "date".to_string(),
                    s2ft_llm::TaskAcc {
                        test: zero(),
                        ood: zero(),
                    },
                )]
                .into(),
                text_loss: [("moby-dick".to_string(), loss)].into(),
            },
            sweep: vec![],
            runs: vec![],
            summary: vec![row("full", full), row("lora", 0.5), row("s2ft-random", 0.5)],
            finetunes: vec![],
            memory_measured: false,
        }
    }

    #[test]
    fn agreeing_runs_pass_and_each_disagreement_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        write(dir, "lmc-cpu", lmc(0.90, 0.1));
        write(dir, "lmc-cuda", lmc(0.91, 0.1));
        write(dir, "s2ft-cpu", s2ft(2.40, 0.2));
        write(dir, "s2ft-cuda", s2ft(2.45, 0.3));
        let ok = compare(dir).unwrap();
        assert!(ok.contains("lmc model A test accuracy") && !ok.contains("DIFFERS"));
        // A CUDA run that lost the study's conclusion and drifted in accuracy.
        write(dir, "lmc-cuda", lmc(0.80, 1.5));
        write(dir, "s2ft-cuda", s2ft(2.45, 0.9));
        let err = compare(dir).unwrap_err().to_string();
        assert!(err.contains("lmc model A test accuracy"), "{err}");
        assert!(err.contains("lmc on cuda: WM barrier"), "{err}");
        assert!(err.contains("s2ft on cuda: S²FT forgetting"), "{err}");
        // The real-model pair, when present, is compared too.
        write(dir, "lmc-cuda", lmc(0.91, 0.1));
        write(dir, "s2ft-cuda", s2ft(2.45, 0.3));
        write(dir, "s2ft-llm-cpu", llm(3.10, 0.9));
        write(dir, "s2ft-llm-cuda", llm(3.105, 0.85));
        let ok = compare(dir).unwrap();
        assert!(
            ok.contains("real model full in-domain accuracy") && !ok.contains("DIFFERS"),
            "{ok}"
        );
        write(dir, "s2ft-llm-cuda", llm(3.5, 0.0));
        let err = compare(dir).unwrap_err().to_string();
        assert!(
            err.contains("real model base held-out loss, moby-dick"),
            "{err}"
        );
        assert!(err.contains("s2ft-llm on cuda: full fine-tuning"), "{err}");
        // A metrics file of another shape names the file and the field.
        std::fs::write(
            dir.join("s2ft-cpu").join("metrics.json"),
            serde_json::to_string(&serde_json::json!({"run": {}})).unwrap(),
        )
        .unwrap();
        let err = format!("{:#}", compare(dir).unwrap_err());
        assert!(err.contains("s2ft-cpu") && err.contains("run"), "{err}");
        // A missing run is a clear error.
        std::fs::remove_dir_all(dir.join("s2ft-cpu")).unwrap();
        let err = format!("{:#}", compare(dir).unwrap_err());
        assert!(err.contains("s2ft-cpu"), "{err}");
    }
}
