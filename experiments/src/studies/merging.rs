//! `merge`: merging fine-tuned copies of one base (a FusionBench-style table).
//!
//! One character-level LLaMA-style base (pretrained as in the `s2ft` study,
//! or `--base`) is fine-tuned on each task of `--tasks` by three families —
//! full fine-tuning, LoRA and S²FT at LoRA's budget — and every family's
//! task models are merged with the `merge` crate: averaging, task
//! arithmetic, TIES, DARE (linear and TIES), Model Stock, TIES after weight
//! matching to the base (permutation-aware), Reversible Model Merging (one
//! shared store, each task rebuilt) and, for LoRA, LoRA-LEGO. Each merge is
//! scored on every task (answer accuracy) and on task A (held-out LM loss);
//! the task vectors' spectra and pairwise cosines show why merges interfere.

use std::path::PathBuf;

use anyhow::bail;
use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use indexmap::IndexMap;
use ndarray::Array2;
use serde_json::{Value, json};
use weights::StateDict;

use crate::lm::{Corpus, Task};
use crate::plot::{Series, bar_chart, line_chart};
use crate::report::Run;
use crate::studies::s2ft::{EvalSets, LmArgs, Method, Sizes, finetune, prepare_base};
use merge::{Params, Value as P};
use s2ft_core::s2ft::Strategy;
use s2ft_core::{Llama, LlamaConfig};

/// Options.
#[derive(Clone, Debug, clap::Args)]
pub struct MergeArgs {
    /// Model, data and training (as the `s2ft` study).
    #[command(flatten)]
    pub lm: LmArgs,
    /// The tasks (one fine-tuned model per task and family; quick: shift, mirror).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Task::Shift, Task::Mirror, Task::Upper])]
    pub tasks: Vec<Task>,
    /// LoRA rank (S²FT gets the same parameter budget).
    #[arg(long, default_value_t = 4)]
    pub rank: usize,
    /// Density of TIES / DARE sparsification.
    #[arg(long, default_value_t = 0.5)]
    pub density: f64,
    /// Scale λ of the summed task vectors in task arithmetic and DARE (FusionBench's default 0.3).
    #[arg(long, default_value_t = 0.3)]
    pub lambda: f64,
    /// The real-model study's options (`--model`, `--finetunes`, …).
    #[command(flatten)]
    pub llm: crate::studies::merge_llm::MergeLlmArgs,
}

crate::studies::cli_defaults!(MergeArgs);

impl MergeArgs {
    fn tasks(&self) -> anyhow::Result<Vec<Task>> {
        let tasks = if self.lm.quick {
            vec![Task::Shift, Task::Mirror]
        } else {
            self.tasks.clone()
        };
        if let Some(t) = tasks
            .iter()
            .find(|t| tasks.iter().filter(|u| u == t).count() > 1)
        {
            bail!("--tasks lists '{}' twice", t.name());
        }
        if tasks.len() < 2 {
            bail!("--tasks: give at least two different tasks to merge");
        }
        if self.rank == 0 {
            bail!("--rank must be at least 1");
        }
        if !(self.density > 0.0 && self.density <= 1.0) {
            bail!("--density {} is outside (0, 1]", self.density);
        }
        if !self.lambda.is_finite() {
            bail!("--lambda must be finite");
        }
        Ok(tasks)
    }
}

/// Runs the study; returns the report folder.
pub fn run(args: &MergeArgs) -> anyhow::Result<PathBuf> {
    if args.llm.model.is_some() {
        return crate::studies::merge_llm::run(args);
    }
    args.llm.refuse_without_model()?;
    let (s, tasks) = (args.lm.sizes()?, args.tasks()?);
    let (run, corpus) = args.lm.open("merge")?;
    let dev = run.device;
    crate::device::on_device!(
        dev,
        run_on(args, s, &tasks, run, corpus, &Default::default())
    )
}

/// `θ − base` of every 2-D weight, in the base's order (zeros included).
pub(crate) fn task_matrices(ft: &StateDict, base: &StateDict) -> Vec<(String, Array2<f32>)> {
    base.iter()
        .filter(|(_, t)| t.shape().len() == 2)
        .filter_map(|(name, b)| {
            let f = ft.get(name)?;
            let d = (&f.data - &b.data)
                .into_dimensionality::<ndarray::Ix2>()
                .ok()?;
            Some((name.to_string(), d))
        })
        .collect()
}

/// `θ − base` for every 2-D weight that differs.
fn task_vector(ft: &StateDict, base: &StateDict) -> IndexMap<String, Array2<f32>> {
    task_matrices(ft, base)
        .into_iter()
        .filter(|(_, d)| d.iter().any(|v| *v != 0.0))
        .collect()
}

/// The fraction of units that permutations leave in place (1: the identity).
pub(crate) fn fixed_fraction<'a>(perms: impl IntoIterator<Item = &'a permute::Permutation>) -> f64 {
    let (mut fixed, mut units) = (0usize, 0usize);
    for p in perms {
        for g in p.values() {
            fixed += g.outer.iter().enumerate().filter(|(i, j)| i == *j).count();
            units += g.outer.len();
        }
    }
    fixed as f64 / units.max(1) as f64
}

/// `base + Σ deltas`.
pub(crate) fn add(base: &StateDict, deltas: &IndexMap<String, Array2<f32>>) -> StateDict {
    let mut out = base.clone();
    for (name, d) in deltas {
        if let Some(t) = out.get_mut(name) {
            t.data += &d.view().into_dyn();
        }
    }
    out
}

fn cosine(a: &IndexMap<String, Array2<f32>>, b: &IndexMap<String, Array2<f32>>) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (name, x) in a {
        aa += x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>();
        if let Some(y) = b.get(name) {
            ab += x
                .iter()
                .zip(y)
                .map(|(p, q)| *p as f64 * *q as f64)
                .sum::<f64>();
        }
    }
    for y in b.values() {
        bb += y.iter().map(|v| (*v as f64).powi(2)).sum::<f64>();
    }
    ab / (aa.sqrt() * bb.sqrt()).max(1e-30)
}

fn num(x: f64) -> P {
    P::Num(x)
}

fn run_on<B: AutodiffBackend>(
    args: &MergeArgs,
    mut s: Sizes,
    tasks: &[Task],
    mut run: Run,
    corpus: Corpus,
    device: &B::Device,
) -> anyhow::Result<PathBuf>
where
    Llama<B>: AutodiffModule<B>,
{
    let lm = &args.lm;
    let r = args.rank;
    let families = [
        Method::Full,
        Method::Lora(r),
        Method::S2ft(r, Strategy::Random),
    ];
    let total = lm.pretrain_steps(&s) + families.len() * tasks.len() * s.steps;
    let bar = run.progress(total as u64);
    let (base, _) = prepare_base::<B>(lm, &mut s, &corpus, &mut run, device, &bar)?;
    let c: LlamaConfig = s.config.clone();
    let evals = EvalSets::new(&corpus, tasks, &s);
    // A row of the table: task-A loss and every task's accuracy.
    let score = |sd: &StateDict| -> anyhow::Result<Value> {
        let (a, ts) = evals.score::<B>(&c, sd, device)?;
        let accs: Vec<f64> = ts.iter().map(|(_, e)| e.acc).collect();
        Ok(json!({
            "task_a_loss": a.loss,
            "acc": ts.iter().map(|(t, e)| (t.name().to_string(), json!(e.acc))).collect::<serde_json::Map<_, _>>(),
            "mean_acc": accs.iter().sum::<f64>() / accs.len() as f64,
        }))
    };
    let base_row = score(&base)?;

    // Fine-tune every family on every task.
    let mut finetuned: Vec<(Method, Vec<StateDict>)> = Vec::new();
    let mut individual = Vec::new();
    let mut csv = String::from("family,task,trainable_params,own_acc,mean_acc,task_a_loss\n");
    for &m in &families {
        let mut sds = Vec::new();
        for (k, &task) in tasks.iter().enumerate() {
            bar.set_message(format!("{} on {}", m.family(), task.name()));
            let adir = (m != Method::Full).then(|| {
                run.dir
                    .join("adapters")
                    .join(format!("{}_{}", m.family(), task.name()))
            });
            let seed = lm.seed * 1000 + k as u64;
            let ft = run.phase(&format!("{} on {}", m.family(), task.name()), || {
                finetune::<B>(
                    &base,
                    &s,
                    m,
                    task,
                    lm.lr(m),
                    seed,
                    adir.as_deref(),
                    device,
                    &bar,
                )
            })?;
            let row = score(&ft.weights)?;
            let own = row["acc"][task.name()].as_f64().unwrap_or(f64::NAN);
            csv.push_str(&format!(
                "{},{},{},{own:.5},{:.5},{:.5}\n",
                m.family(),
                task.name(),
                ft.trainable,
                row["mean_acc"].as_f64().unwrap_or(f64::NAN),
                row["task_a_loss"].as_f64().unwrap_or(f64::NAN)
            ));
            run.write("individual.csv", csv.as_bytes())?;
            individual.push(json!({"family": m.family(), "task": task.name(), "trainable_params": ft.trainable, "own_acc": own, "scores": row}));
            sds.push(ft.weights);
        }
        finetuned.push((m, sds));
    }
    bar.finish_and_clear();

    // Merge each family's task models.
    let n = tasks.len();
    let shared = |pairs: &[(&str, P)]| -> Params {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    };
    let ones = vec![shared(&[("weight", num(1.0))]); n];
    let plain: Vec<(&str, &str, Params)> = vec![
        ("average", "linear", shared(&[("weight", num(1.0))])),
        (
            "task_arithmetic",
            "task_arithmetic",
            shared(&[("weight", num(1.0)), ("lambda", num(args.lambda))]),
        ),
        (
            "ties",
            "ties",
            shared(&[("weight", num(1.0)), ("density", num(args.density))]),
        ),
        (
            "dare_linear",
            "dare_linear",
            shared(&[
                ("weight", num(1.0)),
                ("density", num(args.density)),
                ("lambda", num(args.lambda)),
            ]),
        ),
        (
            "dare_ties",
            "dare_ties",
            shared(&[
                ("weight", num(1.0)),
                ("density", num(args.density)),
                ("lambda", num(args.lambda)),
            ]),
        ),
        ("model_stock", "model_stock", Params::new()),
    ];
    let mut merges = Vec::new();
    let mut spectra_rows = Vec::new();
    let mut spectra_series = Vec::new();
    let dims = permute::builders::TransformerDims {
        layers: c.num_hidden_layers,
        hidden: c.hidden_size,
        heads: c.num_attention_heads,
        kv_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
        ffn: c.intermediate_size,
    };
    let spec = permute::builders::llama(dims, &base)?;
    let mut csv = String::from("family,method,mean_acc,task_a_loss");
    for t in tasks {
        csv.push_str(&format!(",{}_acc", t.name()));
    }
    csv.push('\n');
    let out_dir = run.dir.clone();
    let mut push = |merges: &mut Vec<Value>,
                    fam: &str,
                    method: &str,
                    row: Value,
                    extra: Value|
     -> anyhow::Result<()> {
        csv.push_str(&format!(
            "{fam},{method},{:.5},{:.5}",
            row["mean_acc"].as_f64().unwrap_or(f64::NAN),
            row["task_a_loss"].as_f64().unwrap_or(f64::NAN)
        ));
        for t in tasks {
            csv.push_str(&format!(
                ",{:.5}",
                row["acc"][t.name()].as_f64().unwrap_or(f64::NAN)
            ));
        }
        csv.push('\n');
        // Rewritten after every merge: an interrupted study keeps what finished.
        weights::atomic::write_atomic(out_dir.join("merges.csv"), csv.as_bytes())?;
        merges.push(json!({"family": fam, "method": method, "scores": row, "details": extra}));
        Ok(())
    };
    for (m, sds) in &finetuned {
        let fam = m.family();
        for (label, name, params) in &plain {
            let method = merge::Method::from_name(name)?;
            // Per-model weights only for methods that take them (model stock does not).
            let per = if method.parameters().contains(&("weight", true)) {
                ones.clone()
            } else {
                vec![Params::new(); sds.len()]
            };
            let merged = run.phase(&format!("{fam} {label}"), || {
                merge::merge_state_dicts(&method, Some(&base), sds, params, &per, lm.seed)
            })?;
            push(&mut merges, fam, label, score(&merged)?, json!(params))?;
        }
        // Permutation-aware: align each model to the base, then TIES.
        let (merged, aligned) = run.phase(&format!("{fam} wm+ties"), || {
            merge::aligned::permutation_aware_merge(
                &spec,
                &merge::Method::from_name("ties")?,
                Some(&base),
                sds,
                merge::aligned::Alignment::ToAnchor,
                &shared(&[("weight", num(1.0)), ("density", num(args.density))]),
                &ones,
                &permute::MatchOptions {
                    seed: lm.seed,
                    ..Default::default()
                },
            )
        })?;
        let fixed_fraction = fixed_fraction(&aligned.perms);
        push(
            &mut merges,
            fam,
            "wm_ties",
            score(&merged)?,
            json!({"fixed_fraction": fixed_fraction}),
        )?;
        // Reversible Model Merging: one store of rank p = n − 2 (at least 1);
        // each task scored with its own rebuilt weights.
        let tvs: Vec<IndexMap<String, Array2<f32>>> =
            sds.iter().map(|sd| task_vector(sd, &base)).collect();
        let names: Vec<String> = tvs
            .iter()
            .flat_map(|t| t.keys().cloned())
            .collect::<indexmap::IndexSet<_>>()
            .into_iter()
            .collect();
        // Same names in every task (zeros where a task did not touch a weight).
        let full_tvs: Vec<IndexMap<String, Array2<f32>>> = tvs
            .iter()
            .map(|t| {
                names
                    .iter()
                    .map(|nm| {
                        let sh = base.get(nm).expect("base weight").shape().to_vec();
                        (
                            nm.clone(),
                            t.get(nm)
                                .cloned()
                                .unwrap_or_else(|| Array2::zeros((sh[0], sh[1]))),
                        )
                    })
                    .collect()
            })
            .collect();
        let p = n.saturating_sub(2).max(1);
        let rmm = run.phase(&format!("{fam} rmm"), || merge::lora::rmm_fit(&full_tvs, p))?;
        let mut accs = serde_json::Map::new();
        let mut a_loss = 0.0;
        for (k, t) in tasks.iter().enumerate() {
            let row = score(&add(&base, &rmm.reconstruct(k)?))?;
            accs.insert(t.name().into(), row["acc"][t.name()].clone());
            a_loss += row["task_a_loss"].as_f64().unwrap_or(f64::NAN) / n as f64;
        }
        let mean_acc = accs.values().filter_map(|v| v.as_f64()).sum::<f64>() / n as f64;
        push(
            &mut merges,
            fam,
            "rmm",
            json!({"acc": accs, "mean_acc": mean_acc, "task_a_loss": a_loss}),
            json!({"rank": p, "storage_ratio": rmm.storage_ratio(), "note": "each task scored with its own reconstruction"}),
        )?;
        // LoRA-LEGO on the LoRA family's adapters.
        if matches!(m, Method::Lora(_)) {
            let adapters = tasks
                .iter()
                .map(|t| {
                    merge::lora::LoraAdapter::load(
                        run.dir.join("adapters").join(format!("lora_{}", t.name())),
                    )
                })
                .collect::<merge::Result<Vec<_>>>()?;
            let lego = run.phase("lora-lego", || {
                merge::lora::lora_lego(&adapters, r, lm.seed, true)
            })?;
            push(
                &mut merges,
                fam,
                "lora_lego",
                score(&lego.fuse(&base, 1.0)?)?,
                json!({"merged_rank": r}),
            )?;
        }
        // Task-vector spectra and pairwise cosines.
        let mut cos = Vec::new();
        for i in 0..n {
            for j in i + 1..n {
                cos.push(json!({"a": tasks[i].name(), "b": tasks[j].name(), "cosine": cosine(&tvs[i], &tvs[j])}));
            }
        }
        let mut layers = Vec::new();
        for (k, tv) in tvs.iter().enumerate() {
            for (name, d) in tv {
                let sv = spectra::linalg::singular_values(d.view(), name)?;
                let top = sv.first().copied().unwrap_or(0.0) as f64;
                let fro2: f64 = sv.iter().map(|x| (*x as f64).powi(2)).sum();
                let stable_rank = if top > 0.0 { fro2 / (top * top) } else { 0.0 };
                let numerical_rank = sv.iter().filter(|x| (**x as f64) > top * 1e-3).count();
                if k == 0 && name.ends_with("layers.0.mlp.down_proj.weight") {
                    spectra_series.push(Series::line(
                        fam,
                        sv.iter()
                            .enumerate()
                            .map(|(i, x)| {
                                (
                                    i as f64 + 1.0,
                                    ((*x as f64) / top.max(1e-30)).max(1e-8).log10(),
                                )
                            })
                            .collect(),
                    ));
                }
                layers.push(json!({"task": tasks[k].name(), "weight": name, "norm": fro2.sqrt(), "stable_rank": stable_rank, "numerical_rank": numerical_rank}));
            }
        }
        let mean_sr = layers
            .iter()
            .filter_map(|l| l["stable_rank"].as_f64())
            .sum::<f64>()
            / layers.len().max(1) as f64;
        spectra_rows.push(
            json!({"family": fam, "cosines": cos, "mean_stable_rank": mean_sr, "weights": layers}),
        );
    }

    // Plots: mean accuracy per method, one chart per family; task-vector spectra.
    for (m, _) in &finetuned {
        let fam = m.family();
        let mut bars: Vec<(String, f64)> = vec![(
            "base".into(),
            base_row["mean_acc"].as_f64().unwrap_or(f64::NAN),
        )];
        let indiv: Vec<f64> = individual
            .iter()
            .filter(|r| r["family"] == fam)
            .filter_map(|r| r["own_acc"].as_f64())
            .collect();
        bars.push((
            "individual".into(),
            indiv.iter().sum::<f64>() / indiv.len().max(1) as f64,
        ));
        bars.extend(merges.iter().filter(|r| r["family"] == fam).map(|r| {
            (
                r["method"].as_str().unwrap_or("?").replace('_', " "),
                r["scores"]["mean_acc"].as_f64().unwrap_or(f64::NAN),
            )
        }));
        bar_chart(
            &run.dir.join(format!("accuracy_{fam}")),
            &format!("Mean task accuracy of merged {fam} fine-tunes"),
            "mean accuracy over tasks",
            &bars,
        )?;
    }
    line_chart(
        &run.dir.join("task_vector_spectra"),
        &format!(
            "Singular values of the {} task vector, layers.0.mlp.down_proj",
            tasks[0].name()
        ),
        "index",
        "log10(σ / σ_max)",
        &spectra_series,
    )?;

    // Report.
    let mut md = format!(
        "# Merging fine-tuned copies of one base\n\nBase: LLaMA-style character decoder (hidden {}, {} blocks, {} parameters), {}. \
         Each family fine-tunes it on every task ({} steps): full fine-tuning, LoRA r{r} (q, k, v, up, down), S²FT at LoRA's budget (random selection, one seed per task). \
         Merges: `average` (linear), `task_arithmetic`, `dare_linear`, `dare_ties` (summed task vectors scaled by λ = {}), `ties` (disjoint mean; TIES and DARE at density {}), `model_stock`, `wm_ties` (TIES after weight matching each model to the base), \
         `rmm` (Reversible Model Merging, one store of rank {}; each task rebuilt and scored on itself), `lora_lego` (LoRA family, merged rank {r}).\n\n\
         Base model: mean accuracy {:.3}, task-A loss {:.3}.\n\n",
        c.hidden_size,
        c.num_hidden_layers,
        base.numel(),
        match &lm.base {
            Some(p) => format!("loaded from {}", p.display()),
            None => format!("pretrained {} steps on Moby-Dick", s.pretrain_steps),
        },
        s.steps,
        args.lambda,
        args.density,
        n.saturating_sub(2).max(1),
        base_row["mean_acc"].as_f64().unwrap_or(f64::NAN),
        base_row["task_a_loss"].as_f64().unwrap_or(f64::NAN),
    );
    let mut header = String::from("| family | method |");
    let mut rule = String::from("|---|---|");
    for t in tasks {
        header.push_str(&format!(" {} |", t.name()));
        rule.push_str("---|");
    }
    header.push_str(" mean | task-A loss |\n");
    rule.push_str("---|---|\n");
    md.push_str(&header);
    md.push_str(&rule);
    for (m, _) in &finetuned {
        let fam = m.family();
        let mut line = format!("| {fam} | individual (own task) |");
        let mut own = Vec::new();
        for t in tasks {
            let v = individual
                .iter()
                .find(|r| r["family"] == fam && r["task"] == t.name())
                .and_then(|r| r["own_acc"].as_f64())
                .unwrap_or(f64::NAN);
            own.push(v);
            line.push_str(&format!(" {v:.3} |"));
        }
        line.push_str(&format!(
            " {:.3} | – |\n",
            own.iter().sum::<f64>() / own.len() as f64
        ));
        md.push_str(&line);
        for r in merges.iter().filter(|r| r["family"] == fam) {
            let mut line = format!("| {fam} | {} |", r["method"].as_str().unwrap_or("?"));
            for t in tasks {
                line.push_str(&format!(
                    " {:.3} |",
                    r["scores"]["acc"][t.name()].as_f64().unwrap_or(f64::NAN)
                ));
            }
            line.push_str(&format!(
                " **{:.3}** | {:.3} |\n",
                r["scores"]["mean_acc"].as_f64().unwrap_or(f64::NAN),
                r["scores"]["task_a_loss"].as_f64().unwrap_or(f64::NAN)
            ));
            md.push_str(&line);
        }
    }
    md.push_str(
        "\n## Task vectors\n\n| family | mean stable rank | pairwise cosines |\n|---|---|---|\n",
    );
    for sr in &spectra_rows {
        let cs: Vec<String> = sr["cosines"]
            .as_array()
            .map(|v| {
                v.iter()
                    .map(|c| {
                        format!(
                            "{}·{} {:.3}",
                            c["a"].as_str().unwrap_or("?"),
                            c["b"].as_str().unwrap_or("?"),
                            c["cosine"].as_f64().unwrap_or(f64::NAN)
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        md.push_str(&format!(
            "| {} | {:.2} | {} |\n",
            sr["family"].as_str().unwrap_or("?"),
            sr["mean_stable_rank"].as_f64().unwrap_or(f64::NAN),
            cs.join(", ")
        ));
    }
    md.push_str("\n![full](accuracy_full.png)\n\n![lora](accuracy_lora.png)\n\n![s2ft](accuracy_s2ft-random.png)\n\n![spectra](task_vector_spectra.png)\n");
    let metrics = json!({
        "config": c,
        "tasks": tasks.iter().map(|t| t.name()).collect::<Vec<_>>(),
        "base": base_row,
        "individual": individual,
        "merges": merges,
        "task_vectors": spectra_rows,
        "options": {"rank": r, "density": args.density, "lambda": args.lambda, "steps": s.steps},
    });
    run.finish(metrics, &md)?;
    Ok(run.dir.clone())
}
