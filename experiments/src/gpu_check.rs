//! The comparison behind `scripts/gpu-check.sh`: the quick `lmc` and `s2ft`
//! runs (and, where SmolLM2 was fetched, the quick real-model `s2ft --model`
//! runs `s2ft-llm-*`) on the CPU and on CUDA must tell the same story. Kernels and
//! summation orders differ, so numbers are compared within tolerances, and
//! each backend's run must keep the study's own conclusion.

use std::path::Path;

use anyhow::{Context, bail};
use serde_json::Value;

fn load(dir: &Path, name: &str) -> anyhow::Result<Value> {
    let p = dir.join(name).join("metrics.json");
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not JSON", p.display()))
}

fn get(v: &Value, path: &[&str], what: &str) -> anyhow::Result<f64> {
    let mut x = v;
    for k in path {
        x = &x[*k];
    }
    x.as_f64()
        .with_context(|| format!("{what}: no number at {}", path.join(".")))
}

fn family<'a>(m: &'a Value, fam: &str, what: &str) -> anyhow::Result<&'a Value> {
    m["summary"]
        .as_array()
        .and_then(|a| a.iter().find(|r| r["family"] == fam))
        .with_context(|| format!("{what}: no '{fam}' row in summary"))
}

/// Compares `<dir>/{lmc,s2ft}-{cpu,cuda}/metrics.json`; returns the report
/// lines, or an error listing every disagreement.
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
    let (lc, lg) = (load(dir, "lmc-cpu")?, load(dir, "lmc-cuda")?);
    for (i, label) in ["lmc model A test accuracy", "lmc model B test accuracy"]
        .iter()
        .enumerate()
    {
        let f = |m: &Value| {
            m["endpoint_test_accuracy"][i]
                .as_f64()
                .context("lmc: endpoint_test_accuracy")
        };
        check(label.to_string(), f(&lc)?, f(&lg)?, 0.03);
    }
    let mut story = Vec::new();
    for (m, dev) in [(&lc, "cpu"), (&lg, "cuda")] {
        let naive = get(m, &["naive", "loss_barrier"], "lmc")?;
        let wm = get(m, &["wm", "loss_barrier"], "lmc")?;
        if wm >= naive {
            story.push(format!(
                "lmc on {dev}: WM barrier {wm:.3} is not below naive {naive:.3}"
            ));
        }
    }
    let (sc, sg) = (load(dir, "s2ft-cpu")?, load(dir, "s2ft-cuda")?);
    check(
        "s2ft base task-A loss".into(),
        get(&sc, &["base", "task_a", "loss"], "s2ft")?,
        get(&sg, &["base", "task_a", "loss"], "s2ft")?,
        0.1,
    );
    check(
        "s2ft full fine-tuning task-B accuracy".into(),
        get(family(&sc, "full", "s2ft cpu")?, &["task_b_acc"], "s2ft")?,
        get(family(&sg, "full", "s2ft cuda")?, &["task_b_acc"], "s2ft")?,
        0.1,
    );
    for (m, dev) in [(&sc, "cpu"), (&sg, "cuda")] {
        let full = get(family(m, "full", dev)?, &["forgetting"], "s2ft")?;
        let act = get(family(m, "s2ft-act", dev)?, &["forgetting"], "s2ft")?;
        if act >= full {
            story.push(format!(
                "s2ft on {dev}: S²FT forgetting {act:.3} is not below full fine-tuning's {full:.3}"
            ));
        }
    }
    // The real-model runs (scripts/gpu-check.sh with SmolLM2 fetched).
    if dir.join("s2ft-llm-cpu").is_dir() || dir.join("s2ft-llm-cuda").is_dir() {
        let (lc, lg) = (load(dir, "s2ft-llm-cpu")?, load(dir, "s2ft-llm-cuda")?);
        let corpora: Vec<String> = lc["base"]["text_loss"]
            .as_object()
            .context("s2ft-llm: base.text_loss")?
            .keys()
            .cloned()
            .collect();
        for k in &corpora {
            check(
                format!("real model base held-out loss, {k}"),
                get(&lc, &["base", "text_loss", k], "s2ft-llm")?,
                get(&lg, &["base", "text_loss", k], "s2ft-llm")?,
                0.01,
            );
        }
        for fam in ["full", "lora", "s2ft-random"] {
            let f = |m: &Value, dev: &str| -> anyhow::Result<f64> {
                get(
                    family(m, fam, &format!("s2ft-llm {dev}"))?,
                    &["test_acc"],
                    "s2ft-llm",
                )
            };
            check(
                format!("real model {fam} in-domain accuracy"),
                f(&lc, "cpu")?,
                f(&lg, "cuda")?,
                0.25,
            );
        }
        for (m, dev) in [(&lc, "cpu"), (&lg, "cuda")] {
            let base: Vec<f64> = m["base"]["tasks"]
                .as_object()
                .context("s2ft-llm: base.tasks")?
                .values()
                .filter_map(|t| t["test"]["acc"].as_f64())
                .collect();
            let base = base.iter().sum::<f64>() / base.len().max(1) as f64;
            let full = get(family(m, "full", dev)?, &["test_acc"], "s2ft-llm")?;
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
    use serde_json::json;

    fn write(dir: &Path, name: &str, v: Value) {
        std::fs::create_dir_all(dir.join(name)).unwrap();
        std::fs::write(dir.join(name).join("metrics.json"), v.to_string()).unwrap();
    }

    fn lmc(acc: f64, wm: f64) -> Value {
        json!({"endpoint_test_accuracy": [acc, acc], "naive": {"loss_barrier": 1.0}, "wm": {"loss_barrier": wm}})
    }

    fn s2ft(loss: f64, act_forgetting: f64) -> Value {
        json!({"base": {"task_a": {"loss": loss}}, "summary": [
            {"family": "full", "task_b_acc": 1.0, "forgetting": 0.8},
            {"family": "s2ft-act", "task_b_acc": 0.5, "forgetting": act_forgetting}]})
    }

    #[test]
    fn agreeing_runs_pass_and_each_disagreement_is_named() {
        let dir = std::env::temp_dir().join(format!("gpu-check-{}", std::process::id()));
        write(&dir, "lmc-cpu", lmc(0.90, 0.1));
        write(&dir, "lmc-cuda", lmc(0.91, 0.1));
        write(&dir, "s2ft-cpu", s2ft(2.40, 0.2));
        write(&dir, "s2ft-cuda", s2ft(2.45, 0.3));
        let ok = compare(&dir).unwrap();
        assert!(ok.contains("lmc model A test accuracy") && !ok.contains("DIFFERS"));
        // A CUDA run that lost the study's conclusion and drifted in accuracy.
        write(&dir, "lmc-cuda", lmc(0.80, 1.5));
        write(&dir, "s2ft-cuda", s2ft(2.45, 0.9));
        let err = compare(&dir).unwrap_err().to_string();
        assert!(err.contains("lmc model A test accuracy"), "{err}");
        assert!(err.contains("lmc on cuda: WM barrier"), "{err}");
        assert!(err.contains("s2ft on cuda: S²FT forgetting"), "{err}");
        // The real-model pair, when present, is compared too.
        let llm = |loss: f64, full: f64| {
            json!({"base": {"text_loss": {"moby-dick": loss}, "tasks": {"date": {"test": {"acc": 0.0}}}},
                   "summary": [{"family": "full", "test_acc": full}, {"family": "lora", "test_acc": 0.5},
                               {"family": "s2ft-random", "test_acc": 0.5}]})
        };
        write(&dir, "lmc-cuda", lmc(0.91, 0.1));
        write(&dir, "s2ft-cuda", s2ft(2.45, 0.3));
        write(&dir, "s2ft-llm-cpu", llm(3.10, 0.9));
        write(&dir, "s2ft-llm-cuda", llm(3.105, 0.85));
        let ok = compare(&dir).unwrap();
        assert!(
            ok.contains("real model full in-domain accuracy") && !ok.contains("DIFFERS"),
            "{ok}"
        );
        write(&dir, "s2ft-llm-cuda", llm(3.5, 0.0));
        let err = compare(&dir).unwrap_err().to_string();
        assert!(
            err.contains("real model base held-out loss, moby-dick"),
            "{err}"
        );
        assert!(err.contains("s2ft-llm on cuda: full fine-tuning"), "{err}");
        // A missing run is a clear error.
        std::fs::remove_dir_all(dir.join("s2ft-cpu")).unwrap();
        let err = format!("{:#}", compare(&dir).unwrap_err());
        assert!(err.contains("s2ft-cpu"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
