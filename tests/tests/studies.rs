//! The studies at tiny size: their numbers make sense and their report files
//! exist, with PNGs that decode.

use std::path::{Path, PathBuf};

use weights::TensorSource;

use experiments::report::RunArgs;

// The experiments binary's allocator, so the s2ft study measures peak heap here too.
#[global_allocator]
static ALLOC: experiments::alloc::Counting = experiments::alloc::Counting;

/// A study's `metrics.json` read back as `$t`, the metrics type the study
/// serialised ([`experiments::report::read_metrics`]), with its run record;
/// panics naming the file and the field that does not fit. (A macro: this
/// crate does not depend on serde, to name `DeserializeOwned`.)
/// A study's `metrics.json`, read as the study's metrics type `T`.
fn metrics<T: serde::de::DeserializeOwned>(out: &Path) -> experiments::report::Recorded<T> {
    experiments::report::read_metrics::<T>(out).unwrap_or_else(|e| panic!("{e:#}"))
}

fn check_png(p: &Path) {
    let img = image::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert!(img.width() >= 400 && img.height() >= 300, "{}", p.display());
}

/// [`check_png`] of `<stem>.png` in `dir` for every stem.
fn check_pngs(dir: &Path, stems: &[&str]) {
    for stem in stems {
        check_png(&dir.join(format!("{stem}.png")));
    }
}

/// The plots of the real-model merge study of the tiny test runs (groups
/// `full`, `lora r2`, `s2ft-random r2`).
const MERGE_LLM_PLOTS: [&str; 4] = [
    "normalised_accuracy",
    "accuracy_vs_lambda",
    "cosine_full",
    "cosine_lora-r2",
];

/// Runs the merge study and checks that it refuses with an error holding
/// every string of `want`, before a report folder exists at `out`.
fn merge_refused(args: experiments::studies::merging::MergeArgs, out: &Path, want: &[&str]) {
    let e = format!(
        "{:#}",
        experiments::studies::merging::run(&args).unwrap_err()
    );
    for w in want {
        assert!(e.contains(w), "{w:?} not in: {e}");
    }
    assert!(!out.exists(), "no report folder after: {e}");
}

#[test]
fn spectra_study_reports_heavy_tailed_layers() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("spectra");
    let args = experiments::studies::spectra::SpectraArgs {
        model: None,
        quick: true,
        out: Some(out.clone()),
        no_farms: false,
        welore_reduction: 0.5,
        seed: 0,
        quiet: true,
    };
    let got = experiments::studies::spectra::run(&args).unwrap();
    assert_eq!(got, out);
    for f in [
        "report.md",
        "metrics.json",
        "layers.csv",
        "alpha_per_layer.svg",
        "esd_tails.svg",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    check_png(&out.join("alpha_per_layer.png"));
    check_png(&out.join("esd_tails.png"));
    let m = metrics::<experiments::studies::spectra::Metrics>(&out);
    let layers = &m.metrics.layers;
    assert_eq!(layers.len(), 3);
    // Student-t (ν = 3) weights: heavy-tailed ESDs, every layer fitted with 2 < α < 6.
    for l in layers {
        let a = l.alpha.expect("fitted");
        assert!((2.0..6.0).contains(&a), "{l:?}");
    }
    // The WeLore plan keeps fewer components than the full rank somewhere.
    assert!(m.metrics.welore.iter().any(|w| w.rank < w.full_rank));
    assert!(m.run.phases_seconds.len() >= 2);
    assert!(!m.run.command.is_empty() && !m.run.git_commit.is_empty());
}

#[test]
fn lmc_study_weight_matching_lowers_the_barrier() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lmc");
    let args = experiments::studies::lmc::LmcArgs {
        quick: true,
        grid: 11,
        repair: true,
        run: RunArgs::quiet_to(&out),
        ..Default::default()
    };
    experiments::studies::lmc::run(&args).unwrap();
    check_png(&out.join("loss_train.png"));
    check_png(&out.join("loss_test.png"));
    assert!(out.join("report.md").is_file() && out.join("loss_test.svg").is_file());
    let m = metrics::<experiments::studies::lmc::LmcMetrics>(&out).metrics;
    let row = |k: &str| {
        m.methods
            .get(k)
            .unwrap_or_else(|| panic!("{k} missing: {:?}", m.methods.keys()))
    };
    for method in ["naive", "wm", "am", "ste", "wm_repair"] {
        let r = row(method);
        for (key, v) in [
            ("loss_barrier", r.loss_barrier),
            ("acc_barrier", r.acc_barrier),
            ("l2", r.l2),
            ("seconds", r.seconds),
        ] {
            assert!(v.is_finite(), "{method}.{key}");
        }
    }
    let b = |k: &str| row(k).loss_barrier;
    assert!(
        b("naive") > 0.05,
        "trained MLPs have a naive barrier: {}",
        b("naive")
    );
    assert!(
        b("wm") < b("naive"),
        "WM {} < naive {}",
        b("wm"),
        b("naive")
    );
    assert!(
        b("am") < b("naive"),
        "AM {} < naive {}",
        b("am"),
        b("naive")
    );
    // REPAIR renormalises WM's interpolations: a lower barrier, the same B.
    assert!(
        b("wm_repair") < b("wm"),
        "WM + REPAIR {} < WM {}",
        b("wm_repair"),
        b("wm")
    );
    assert_eq!(row("wm_repair").l2, row("wm").l2);
    // Permuting B moves it closer to A.
    assert!(row("wm").l2 < row("naive").l2);
    // Both endpoints learned something (10 classes: chance is 0.1).
    for acc in m.endpoint_test_accuracy.expect("endpoint_test_accuracy") {
        assert!(acc > 0.5);
    }
    // `--quick` sets defaults; an option given with it applies (0 epochs
    // is refused, not dropped).
    let zero = experiments::studies::lmc::LmcArgs {
        quick: true,
        epochs: Some(0),
        run: RunArgs::quiet_to(dir.path().join("lmc0")),
        ..Default::default()
    };
    let err = experiments::studies::lmc::run(&zero)
        .unwrap_err()
        .to_string();
    assert!(err.contains("--epochs"), "{err}");
}

#[test]
fn svd_align_study_weight_matching_aligns_top_singular_vectors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("svd");
    let lmc = experiments::studies::lmc::LmcArgs {
        width: Some(128),
        depth: Some(2),
        epochs: Some(3),
        grid: 5,
        ste_steps: 20,
        run: RunArgs::quiet_to(&out),
        ..Default::default()
    };
    experiments::studies::svd_align::run(&experiments::studies::svd_align::SvdAlignArgs {
        lmc,
        top: 32,
    })
    .unwrap();
    check_png(&out.join("alignment_vs_rank.png"));
    check_png(&out.join("overlap_wm.png"));
    assert!(out.join("overlap_wm.svg").is_file() && out.join("alignment_vs_rank.svg").is_file());
    let m = metrics::<experiments::studies::svd_align::Metrics>(&out).metrics;
    let layer = |method: &str| {
        &m.get(method)
            .unwrap_or_else(|| panic!("{method} missing: {:?}", m.keys()))[0]
    };
    for method in ["naive", "wm", "am", "ste", "random"] {
        // Permutations are orthogonal: singular values unchanged.
        assert!(layer(method).sv_max_rel_diff < 1e-10, "{method}");
    }
    let r = |method: &str| layer(method).r_gamma_0_3;
    // `lmc`'s --repair has no curve to act on here: a named error, nothing written.
    let bad = dir.path().join("svd-repair");
    let e = experiments::studies::svd_align::run(&experiments::studies::svd_align::SvdAlignArgs {
        lmc: experiments::studies::lmc::LmcArgs {
            repair: true,
            run: RunArgs::quiet_to(&bad),
            ..Default::default()
        },
        top: 32,
    })
    .unwrap_err();
    assert!(e.to_string().contains("--repair"), "{e}");
    assert!(!bad.exists());
    // WM aligns the large-σ vectors; random and no permutation do not.
    assert!(
        r("wm") > 5.0 * r("random") && r("wm") > 5.0 * r("naive"),
        "wm {} random {} naive {}",
        r("wm"),
        r("random"),
        r("naive")
    );
}

#[test]
fn many_study_aligned_merges_beat_plain_averaging() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("many");
    let lmc = experiments::studies::lmc::LmcArgs {
        width: Some(128),
        depth: Some(2),
        epochs: Some(2),
        grid: 5,
        ste_steps: 10,
        run: RunArgs::quiet_to(&out),
        ..Default::default()
    };
    experiments::studies::many::run(&experiments::studies::many::ManyArgs { lmc, models: 3 })
        .unwrap();
    check_png(&out.join("pair_1_2_test_loss.png"));
    let m = metrics::<experiments::studies::many::ManyMetrics>(&out).metrics;
    let row = |k: &str| {
        m.methods
            .get(k)
            .unwrap_or_else(|| panic!("{k} missing: {:?}", m.methods.keys()))
    };
    let acc = |k: &str| row(k).test_acc;
    let bar = |k: &str| row(k).pairwise_barrier;
    assert!(
        acc("merge_many") > 0.5,
        "merged model better than chance: {}",
        acc("merge_many")
    );
    assert!(
        acc("merge_many") > acc("naive") && acc("wm_anchor") > acc("naive"),
        "{m:?}"
    );
    assert!(
        bar("merge_many") < bar("naive"),
        "{} vs {}",
        bar("merge_many"),
        bar("naive")
    );
    assert_eq!(m.individual.len(), 3);
    let bad = dir.path().join("many-repair");
    let e = experiments::studies::many::run(&experiments::studies::many::ManyArgs {
        lmc: experiments::studies::lmc::LmcArgs {
            repair: true,
            run: RunArgs::quiet_to(&bad),
            ..Default::default()
        },
        models: 3,
    })
    .unwrap_err();
    assert!(e.to_string().contains("--repair"), "{e}");
    assert!(!bad.exists());
}

#[test]
fn lmc_width_sweep_plots_barriers_per_width() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lmcw");
    let args = experiments::studies::lmc::LmcArgs {
        quick: true,
        epochs: Some(1),
        seed: 1,
        grid: 5,
        ste_steps: 5,
        widths: vec![16, 48],
        run: RunArgs::quiet_to(&out),
        ..Default::default()
    };
    experiments::studies::lmc::run(&args).unwrap();
    check_png(&out.join("barrier_vs_width.png"));
    let m = metrics::<experiments::studies::lmc::LmcMetrics>(&out).metrics;
    let sweep = m.width_sweep.expect("width_sweep");
    assert_eq!(sweep.len(), 2);
    for row in &sweep {
        assert!(row.wm_loss_barrier < row.naive_loss_barrier, "{row:?}");
    }
}

#[test]
fn s2ft_study_trains_fewer_parameters_and_forgets_less_than_full_fine_tuning() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("s2ft");
    let args = experiments::studies::s2ft::S2ftArgs {
        lm: experiments::studies::s2ft::LmArgs {
            quick: true,
            run: RunArgs::quiet_to(&out),
            ..Default::default()
        },
        ..Default::default()
    };
    experiments::studies::s2ft::run(&args).unwrap();
    for f in [
        "tradeoff",
        "step_time",
        "memory",
        "finetune_loss",
        "switch_time",
    ] {
        check_png(&out.join(format!("{f}.png")));
        assert!(out.join(format!("{f}.svg")).is_file(), "{f}");
    }
    for f in [
        "report.md",
        "runs.csv",
        "base/model.safetensors",
        "base/config.json",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let m = metrics::<experiments::studies::s2ft::S2ftMetrics>(&out).metrics;
    let row = |family: &str| {
        m.summary
            .iter()
            .find(|r| r.family == family)
            .unwrap_or_else(|| panic!("{family} missing"))
    };
    let (full, lora, rand, act) = (
        row("full"),
        row("lora"),
        row("s2ft-random"),
        row("s2ft-act"),
    );
    // Same budget: S²FT's structured blocks never exceed LoRA's count, far below full.
    for s in [rand, act] {
        assert!(s.trainable_params <= lora.trainable_params, "{s:?}");
        assert!(s.trainable_params * 10 < full.trainable_params);
    }
    // Full fine-tuning solves the task; LoRA learns most of it; S²FT at a
    // budget of 2 048 parameters learns it above twice chance (1/26).
    // Measured at quick size, seeds 0–3: full 1.0; LoRA 0.67–0.81; S²FT
    // random 0.18–0.72, smallest-activation 0.08–0.36 (seed 0, this test:
    // 0.18 and 0.14).
    assert!(full.task_b_acc > 0.9, "{full:?}");
    assert!(lora.task_b_acc > 0.5, "{lora:?}");
    for r in [rand, act] {
        assert!(r.task_b_acc > 2.0 / 26.0, "{r:?}");
    }
    // S²FT forgets task A less than full fine-tuning (smallest-activation
    // selection, and the mean of both selections).
    let f_full = full.forgetting;
    assert!(f_full > 0.0);
    assert!(act.forgetting < f_full, "{act:?} vs {full:?}");
    assert!(
        (act.forgetting + rand.forgetting) / 2.0 < f_full,
        "{rand:?} {act:?} vs {full:?}"
    );
    // Heap was measured. (The counter is process-wide and the other study
    // tests run in parallel threads, so the methods are not compared here;
    // s2ft-core/tests/memory.rs compares full FT and S²FT in a process of
    // its own.)
    // Full fine-tuning holds at least its weights, gradients and two Adam
    // moments: 4 × 147 776 f32 = 2.36 MB (measured alone: 4.5 MB).
    assert!(full.peak_mb > 2.3, "{full:?}");
    for r in [lora, rand, act] {
        assert!(r.peak_mb > 0.0, "{r:?}");
    }
    // Fusing the task-B and task-C adapters interferes: every method's fused
    // model scores task B below its task-B adapter alone, and full
    // fine-tuning's still holds both tasks above twice chance (seeds 0–3:
    // 0.13–0.36 and 0.14–0.43).
    let fusion = &m.fusion;
    assert_eq!(fusion.len(), 3);
    for f in fusion {
        assert!(f.fused.task_b_acc < f.only_b.task_b_acc, "{f:?}");
    }
    let full_fused = &fusion[0].fused;
    assert_eq!(fusion[0].method, "full");
    assert!(full_fused.task_b_acc > 2.0 / 26.0 && full_fused.task_c_acc > 2.0 / 26.0);
    let sw = &m.switch;
    assert_eq!(sw.len(), 2);
    for r in sw {
        assert!(r.lora_ms > 0.0 && r.s2ft_ms > 0.0);
        assert!(r.s2ft_params <= r.lora_params);
    }
}

#[test]
fn merge_study_merges_beat_chance_rmm_rebuilds_each_task_and_one_model_holds_all_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merge");
    let args = experiments::studies::merging::MergeArgs {
        lm: experiments::studies::s2ft::LmArgs {
            quick: true,
            run: RunArgs::quiet_to(&out),
            ..Default::default()
        },
        ..Default::default()
    };
    experiments::studies::merging::run(&args).unwrap();
    check_pngs(
        &out,
        &[
            "accuracy_full",
            "accuracy_lora",
            "accuracy_s2ft-random",
            "task_vector_spectra",
        ],
    );
    for f in [
        "report.md",
        "merges.csv",
        "individual.csv",
        "adapters/lora_shift/adapter_model.safetensors",
        "adapters/s2ft-random_mirror/adapter.safetensors",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    // Read back through the study's own result type.
    let m = metrics::<experiments::studies::merging::Metrics>(&out).metrics;
    let chance = 1.0 / 26.0;
    assert!(m.base.mean_acc < 2.0 * chance);
    for fam in ["full", "lora", "s2ft-random"] {
        let acc = |method: &str| {
            m.merges
                .iter()
                .find(|r| r.family == fam && r.method == method)
                .unwrap_or_else(|| panic!("{fam} {method}"))
                .scores
                .mean_acc
        };
        // One merged model holds both tasks above chance.
        let best = [
            "average",
            "task_arithmetic",
            "ties",
            "dare_linear",
            "dare_ties",
        ]
        .iter()
        .map(|x| acc(x))
        .fold(0.0, f64::max);
        assert!(best > 2.0 * chance, "{fam}: best merge {best}");
        // RMM with p = n − 1 components rebuilds each task exactly.
        let own: Vec<f64> = m
            .individual
            .iter()
            .filter(|r| r.family == fam)
            .map(|r| r.own_acc)
            .collect();
        let own_mean = own.iter().sum::<f64>() / own.len() as f64;
        assert!((acc("rmm") - own_mean).abs() < 0.01, "{fam}: rmm vs own");
        // The tasks do not conflict: one model tuned on both at once (the
        // task fine-tunes' steps together) beats every data-free merge.
        assert!(
            acc("mtl") > best,
            "{fam}: MTL {} vs best merge {best}",
            acc("mtl")
        );
    }
    assert!(m.merges.iter().any(|r| r.method == "lora_lego"));
    // Full MTL holds both tasks as well as the task fine-tunes each hold one.
    let full_mtl = m
        .merges
        .iter()
        .find(|r| r.family == "full" && r.method == "mtl")
        .unwrap();
    assert!(full_mtl.scores.mean_acc > 0.9, "{:?}", full_mtl.scores);
    // LoRA task vectors have rank at most r = 4.
    let lora = m.task_vectors.iter().find(|t| t.family == "lora").unwrap();
    for w in &lora.weights {
        assert!(w.numerical_rank <= 4, "{w:?}");
    }
}

#[test]
fn lmc_study_runs_on_the_vgg_and_weight_matching_brings_it_closer() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lmc-vgg");
    let args = experiments::studies::lmc::LmcArgs {
        quick: true,
        repair: true,
        arch: experiments::studies::lmc::Arch::Vgg,
        grid: 5,
        run: RunArgs::quiet_to(&out),
        ..Default::default()
    };
    experiments::studies::lmc::run(&args).unwrap();
    check_png(&out.join("loss_test.png"));
    let m = metrics::<experiments::studies::lmc::LmcMetrics>(&out).metrics;
    assert_eq!(m.arch.as_deref(), Some("vgg"));
    assert_eq!(m.sizes.as_deref(), Some(&[4, 8, 8][..]));
    let row = |k: &str| {
        m.methods
            .get(k)
            .unwrap_or_else(|| panic!("{k} missing: {:?}", m.methods.keys()))
    };
    // Weight matching over torchvision's VGG spec (the flatten moves blocks
    // of H·W classifier columns) brings B closer to A.
    let l2 = |k: &str| row(k).l2;
    assert!(l2("wm") < l2("naive"), "{} vs {}", l2("wm"), l2("naive"));
    assert!(!m.methods.contains_key("am") && !m.methods.contains_key("ste"));
    // REPAIR through the convolution and classifier biases, over the same aligned B.
    assert_eq!(row("wm_repair").l2, row("wm").l2);
    assert!(row("wm_repair").loss_barrier.is_finite());
    // Options of the MLP are refused by name.
    let e = experiments::studies::lmc::run(&experiments::studies::lmc::LmcArgs {
        depth: Some(2),
        run: RunArgs::quiet_to(dir.path().join("lmc-vgg-depth")),
        ..args.clone()
    })
    .unwrap_err();
    assert!(e.to_string().contains("--depth"), "{e}");
}

#[test]
fn lmc_study_aligns_two_llama_decoders_head_by_head() {
    use experiments::studies::lmc::{Arch, LmcArgs, run};
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lmc-llama");
    let args = LmcArgs {
        quick: true,
        arch: Arch::Llama,
        repair: true,
        grid: 7,
        widths: vec![32, 48],
        run: RunArgs::quiet_to(&out),
        ..Default::default()
    };
    run(&args).unwrap();
    for png in ["loss_train.png", "loss_test.png", "barrier_vs_width.png"] {
        check_png(&out.join(png));
    }
    let m = metrics::<experiments::studies::lmc_llama::Metrics>(&out).metrics;
    assert_eq!(m.arch, "llama");
    let row = |k: &str| {
        m.methods
            .get(k)
            .unwrap_or_else(|| panic!("{k} missing: {:?}", m.methods.keys()))
    };
    // Barriers, distance and seconds of a method.
    let c = |k: &str| &row(k).curve;
    let change = |k: &str| row(k).b_loss_change;
    // Head-aware weight and activation matching are symmetries: B's function
    // is kept (its held-out loss to rounding) and B comes closer to A, with
    // a lower barrier than naive interpolation.
    for k in ["wm", "am"] {
        assert!(change(k).abs() < 1e-4, "{k}: {}", change(k));
        assert!(c(k).l2 < c("naive").l2, "{k}");
        assert!(
            c(k).loss_barrier < 0.7 * c("naive").loss_barrier,
            "{k}: {} vs naive {}",
            c(k).loss_barrier,
            c("naive").loss_barrier
        );
    }
    // Folding the RMSNorm gains and rotating the residual stream keep B's
    // function too; the orthogonal map (a superset of permutations) brings B
    // closer than weight matching alone on the same folded models, and
    // lowers the barrier (measured at this size: 0.066 vs 0.141).
    for k in ["wm_folded", "wm_orthogonal"] {
        assert!(change(k).abs() < 1e-4, "{k}: {}", change(k));
    }
    assert!(c("wm_orthogonal").l2 < c("wm_folded").l2);
    // REPAIR (scale only) renormalises WM's interpolations of the same B:
    // its endpoints and distance are WM's; its barrier is reported, not
    // promised (at this size it is within a third of WM's either way).
    assert_eq!(c("wm_repair").l2, c("wm").l2);
    assert_eq!(change("wm_repair"), change("wm"));
    assert!(
        (c("wm_repair").loss_barrier - c("wm").loss_barrier).abs() < c("wm").loss_barrier / 3.0,
        "{} vs {}",
        c("wm_repair").loss_barrier,
        c("wm").loss_barrier
    );
    assert!(c("wm_repair").seconds > c("wm").seconds);
    assert!(c("wm_orthogonal").loss_barrier < c("wm_folded").loss_barrier);
    // The unit-wise spec is not a symmetry: the permutation alone changes B.
    assert!(change("wm_units").abs() > 1e-2, "{:?}", row("wm_units"));
    let sweep = &m.width_sweep;
    assert_eq!(sweep.len(), 2);
    assert!(
        sweep
            .iter()
            .all(|r| r.wm_loss_barrier < r.naive_loss_barrier),
        "{sweep:?}"
    );
    // Grouped-query attention: the head-aware spec still keeps B's function;
    // the unit-wise ablation is left out (its spec needs multi-head attention).
    let gqa = dir.path().join("lmc-llama-gqa");
    run(&LmcArgs {
        kv_heads: Some(1),
        widths: vec![],
        run: RunArgs::quiet_to(&gqa),
        ..args.clone()
    })
    .unwrap();
    let g = metrics::<experiments::studies::lmc_llama::Metrics>(&gqa).metrics;
    assert_eq!(g.shape.kv_heads, 1);
    assert!(!g.methods.contains_key("wm_units"));
    assert!(g.methods["wm"].b_loss_change.abs() < 1e-4);
    // Options that do not apply, and shapes the model cannot have, are refused by name.
    for (bad, flag) in [
        (
            LmcArgs {
                epochs: Some(2),
                ..args.clone()
            },
            "--epochs",
        ),
        (
            LmcArgs {
                width: Some(40),
                ..args.clone()
            },
            "--width 40",
        ),
        (
            LmcArgs {
                kv_heads: Some(3),
                width: Some(64),
                ..args.clone()
            },
            "--kv-heads 3",
        ),
        (
            LmcArgs {
                widths: vec![32, 20],
                ..args.clone()
            },
            "--width 20",
        ),
    ] {
        let e = run(&LmcArgs {
            run: RunArgs::quiet_to(dir.path().join("refused")),
            ..bad
        })
        .unwrap_err();
        assert!(e.to_string().contains(flag), "{flag}: {e}");
    }
    assert!(
        !dir.path().join("refused").exists(),
        "a refused run wrote a report folder"
    );
    // The image-network studies built on lmc's options refuse the text model.
    let e = experiments::studies::many::run(&experiments::studies::many::ManyArgs {
        lmc: LmcArgs {
            run: RunArgs::quiet_to(dir.path().join("many")),
            ..args.clone()
        },
        models: 3,
    })
    .unwrap_err();
    assert!(e.to_string().contains("--arch llama"), "{e}");
    assert!(!dir.path().join("many").exists());
}

#[test]
fn lmc_study_runs_on_the_layernorm_resnet() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lmc-resnet");
    let mut args = experiments::studies::lmc::LmcArgs {
        quick: true,
        repair: true,
        arch: experiments::studies::lmc::Arch::Resnet,
        grid: 5,
        run: RunArgs::quiet_to(&out),
        ..Default::default()
    };
    experiments::studies::lmc::run(&args).unwrap();
    check_png(&out.join("loss_test.png"));
    let m = metrics::<experiments::studies::lmc::LmcMetrics>(&out).metrics;
    assert_eq!(m.arch.as_deref(), Some("resnet"));
    assert!(!out.join("metrics.partial.json").exists());
    let row = |k: &str| {
        m.methods
            .get(k)
            .unwrap_or_else(|| panic!("{k} missing: {:?}", m.methods.keys()))
    };
    // REPAIR through the channel norms' affine: a row over the same aligned B.
    assert_eq!(row("wm_repair").l2, row("wm").l2);
    assert!(row("wm_repair").loss_barrier.is_finite());
    // Weight matching over the torchvision-named spec (streams through the
    // shortcuts, LayerNorm channels) brings B closer to A.
    let l2 = |k: &str| row(k).l2;
    assert!(l2("wm") < l2("naive"), "{} vs {}", l2("wm"), l2("naive"));
    // Activation matching and STE are MLP-only; svd-align refuses the ResNet.
    assert!(!m.methods.contains_key("am") && !m.methods.contains_key("ste"));
    args.run.out = Some(dir.path().join("svd"));
    let e = experiments::studies::svd_align::run(&experiments::studies::svd_align::SvdAlignArgs {
        lmc: args,
        top: 8,
    })
    .unwrap_err();
    assert!(e.to_string().contains("--arch resnet"), "{e}");
}

#[test]
fn pleas_study_zips_two_llama_decoders_head_by_head() {
    use experiments::studies::pleas::{Allocation, PleasArch, PleasArgs, run};
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pleas-llama");
    let args = PleasArgs {
        quick: true,
        arch: PleasArch::Llama,
        ratios: vec![1.0, 0.5, 0.0],
        run: RunArgs::quiet_to(&out),
        ..Default::default()
    };
    run(&args).unwrap();
    check_png(&out.join("loss_vs_ratio.png"));
    let m = metrics::<experiments::studies::pleas_llama::Metrics>(&out).metrics;
    assert_eq!(m.arch, "llama");
    let rows = &m.merges;
    assert_eq!(rows.len(), 9, "three matchings × three ratios");
    let row = |mt: &str, r: f64| {
        rows.iter()
            .find(|x| x.matching == mt && x.ratio == r)
            .unwrap_or_else(|| panic!("{mt} {r}"))
    };
    let kv = m.shape.kv_heads;
    for mt in ["none", "wm", "am"] {
        // Ratio 1 is one model's size; 0 keeps every head and channel of both.
        let (full, half, apart) = (row(mt, 1.0), row(mt, 0.5), row(mt, 0.0));
        assert!((full.params_ratio - 1.0).abs() < 1e-9);
        assert_eq!(full.kv_heads, kv);
        assert_eq!(apart.kv_heads, 2 * kv);
        assert!(full.params_ratio < half.params_ratio && half.params_ratio < apart.params_ratio);
        for r in [full, half, apart] {
            assert!(r.loss.mean.is_finite(), "{r:?}");
        }
    }
    // Aligning before merging matters: averaging unaligned decoders is worse
    // than averaging aligned ones (measured at this size: 2.97 vs 2.61 nats).
    for mt in ["wm", "am"] {
        assert!(
            row(mt, 1.0).loss.mean < row("none", 1.0).loss.mean - 0.1,
            "{mt}"
        );
    }
    // PLeaS's least squares improves on the zip it starts from, for every
    // matching and ratio (measured at this size: by 0.003 to 0.19 nats).
    for r in rows {
        assert!(r.least_squares.mean < r.loss.mean, "{r:?}");
    }
    // Options a LLaMA cannot take are refused before anything is written.
    for (bad, flag) in [
        (
            PleasArgs {
                allocation: Allocation::Global,
                ..args.clone()
            },
            "--allocation",
        ),
        (
            PleasArgs {
                epochs: Some(2),
                ..args.clone()
            },
            "--epochs",
        ),
        (
            PleasArgs {
                ratios: vec![1.5],
                ..args.clone()
            },
            "--ratios",
        ),
        (
            PleasArgs {
                ridge: -1.0,
                ..args.clone()
            },
            "--ridge",
        ),
    ] {
        let e = run(&PleasArgs {
            run: RunArgs::quiet_to(dir.path().join("refused")),
            ..bad
        })
        .unwrap_err();
        assert!(e.to_string().contains(flag), "{flag}: {e}");
    }
    assert!(!dir.path().join("refused").exists());
}

#[test]
fn pleas_study_least_squares_beats_averaging_and_partial_matching_trades_width_for_accuracy() {
    use experiments::studies::pleas::{PleasArgs, run};
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pleas");
    let args = PleasArgs {
        quick: true,
        ratios: vec![1.0, 0.5, 0.0],
        run: RunArgs::quiet_to(&out),
        ..Default::default()
    };
    run(&args).unwrap();
    for f in ["joint_accuracy_vs_size", "task_accuracy_vs_size"] {
        check_png(&out.join(format!("{f}.png")));
        assert!(out.join(format!("{f}.svg")).is_file());
    }
    assert!(out.join("merges.csv").is_file() && out.join("report.md").is_file());
    assert!(!out.join("metrics.partial.json").exists());
    let m = metrics::<experiments::studies::pleas::PleasMetrics>(&out).metrics;
    let models = &m.models;
    // Each task keeps its own head: the ensemble is each model on its own task.
    assert_eq!(models.ensemble.task_a_acc, models.a.task_a_acc);
    assert_eq!(models.ensemble.task_b_acc, models.b.task_b_acc);
    let merges = &m.merges;
    assert_eq!(merges.len(), 9);
    let find = |matching: &str, ratio: f64| {
        merges
            .iter()
            .find(|x| x.matching == matching && x.ratio == ratio)
            .unwrap_or_else(|| panic!("{matching} {ratio}"))
    };
    // The mean of the two per-task accuracies (`task_mean_acc` in the file).
    let task = |s: &experiments::studies::pleas::Scores| s.task_mean();
    let ensemble_task = task(&models.ensemble);
    for matching in ["none", "wm", "am"] {
        let (full, half, apart) = (
            find(matching, 1.0),
            find(matching, 0.5),
            find(matching, 0.0),
        );
        assert_eq!(full.width, 1.0);
        assert_eq!(half.width, 1.5);
        assert_eq!(apart.width, 2.0);
        // Nothing merged is the ensemble.
        assert!(
            (task(&apart.average) - ensemble_task).abs() < 0.005,
            "{apart:?}"
        );
        // PLeaS: least squares beats averaging at one model's size, by a margin
        // (0.06–0.4 over seeds 0–3).
        assert!(
            task(&full.least_squares) > task(&full.average) + 0.03,
            "{full:?}"
        );
        assert!(task(&half.least_squares) > task(&half.average), "{half:?}");
    }
    // Keeping the worst-matched units apart helps averaging (by 0.14–0.16 with
    // activation matching over seeds 0–3; not for every matching and seed).
    assert!(task(&find("am", 0.5).average) > task(&find("am", 1.0).average) + 0.05);
    // Activation matching pairs units that correlate better than unit i with unit i.
    let corr = |k: &str| &m.matching[k].mean_correlation;
    for (am, none) in corr("am").iter().zip(corr("none")) {
        assert!(*am > none + 0.1, "{am} vs {none}");
    }
    // Refitting only the head recovers most of what least squares gains.
    let f = find("am", 1.0);
    assert!(task(&f.least_squares_head) > task(&f.average), "{f:?}");
    // The merged model of one model's size is far better than chance (0.2 per task).
    assert!(task(&find("am", 1.0).least_squares) > 0.6);
    assert_eq!(m.allocation, "uniform");
    assert_eq!(find("am", 0.5).merged_pairs, [32, 32]);

    // The global allocation merges as many pairs in all, where they correlate best.
    let out = dir.path().join("pleas-global");
    let args = PleasArgs {
        quick: true,
        ratios: vec![0.5],
        matchings: vec![experiments::studies::pleas::Matching::Am],
        allocation: experiments::studies::pleas::Allocation::Global,
        run: RunArgs::quiet_to(&out),
        ..Default::default()
    };
    run(&args).unwrap();
    let m = metrics::<experiments::studies::pleas::PleasMetrics>(&out).metrics;
    assert_eq!(m.allocation, "global");
    let g = &m.merges[0];
    assert_eq!(g.merged_pairs.iter().sum::<usize>(), 64, "{g:?}");
    assert_eq!(g.width, 1.5);
    assert!(task(&g.least_squares) > task(&g.average), "{g:?}");
}

/// A tiny random LLaMA (GQA, untied head) with a byte-level ChatML tokenizer,
/// written as a Hugging Face folder: what `s2ft --model` reads in CI.
fn tiny_hf_model(dir: &Path, context: usize) -> std::path::PathBuf {
    let tok = s2ft_core::tokenizer::Tokenizer::byte_level_chatml().unwrap();
    let mut c = s2ft_core::LlamaConfig::tiny(tok.vocab_size(), 32, 2, 4, 2, 64);
    c.max_position_embeddings = Some(context);
    let mut sd = s2ft_core::model::random_state_dict(&c, 3);
    let out = dir.join("tiny-llama");
    s2ft_core::pretrained::save_hf_folder(&out, &c, &mut sd, &tok, u64::MAX).unwrap();
    out
}

fn llm_args(model: &Path, out: &Path) -> experiments::studies::s2ft::S2ftArgs {
    use experiments::studies::s2ft::{LmArgs, S2ftArgs};
    use experiments::studies::s2ft_llm::LlmArgs;
    S2ftArgs {
        lm: LmArgs {
            quick: true,
            steps: Some(4),
            batch: Some(2),
            run: RunArgs::quiet_to(out),
            ..Default::default()
        },
        llm: LlmArgs {
            model: Some(model.to_path_buf()),
            eval_examples: Some(4),
            val_examples: Some(3),
            text_windows: Some(2),
            lrs_lora: Some(vec![1e-3, 1e-2]),
            ..Default::default()
        },
        ranks: Some(vec![2]),
        ..Default::default()
    }
}

/// The teacher-forced answer loss of `sd` on `task`'s test split, as the study scores it.
fn test_answer_loss(
    c: &s2ft_core::LlamaConfig,
    sd: &weights::StateDict,
    tok: &s2ft_core::tokenizer::Tokenizer,
    task: experiments::tasks::InstructTask,
    n: usize,
) -> f64 {
    use experiments::tasks::{Split, Words, examples};
    let m = s2ft_core::Llama::<s2ft_core::Cpu>::from_state_dict(c, sd, false, &Default::default())
        .unwrap();
    let words = Words::load(&experiments::lm::default_text_dir()).unwrap();
    let prompter = experiments::llm::Prompter::new(tok).unwrap();
    let set = prompter
        .encode(
            examples(
                task,
                Split::Test,
                n,
                &words,
                experiments::studies::s2ft_llm::EVAL_SEED,
            )
            .unwrap(),
        )
        .unwrap();
    experiments::llm::score_set(&m, &set, &prompter, 4)
        .unwrap()
        .answer_loss
}

#[test]
fn s2ft_study_fine_tunes_a_hugging_face_model_and_saves_what_others_load() {
    use experiments::tasks::InstructTask;
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_hf_model(dir.path(), 512);
    let out = dir.path().join("run");
    experiments::studies::s2ft::run(&llm_args(&model, &out)).unwrap();
    check_pngs(
        &out,
        &[
            "accuracy_vs_params",
            "in_vs_out_of_domain",
            "accuracy_vs_forgetting",
            "step_time",
            "memory",
            "lr_sweep",
        ],
    );
    for f in [
        "report.md",
        "runs.csv",
        "sweep.csv",
        "summary.csv",
        "finetunes/manifest.json",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    assert!(!out.join("metrics.partial.json").exists());
    let m = metrics::<experiments::studies::s2ft_llm::Rows>(&out).metrics;
    // Base scores on both quick tasks, both splits, and both held-out corpora.
    for t in ["date", "reverse"] {
        let ta = &m.base.tasks[t];
        for (s, score) in [("test", &ta.test), ("ood", &ta.ood)] {
            assert!((0.0..=1.0).contains(&score.acc), "{t} {s}");
            assert_eq!(score.n, 4);
        }
    }
    let base_loss = &m.base.text_loss;
    assert!(base_loss["moby-dick"] > 0.0 && base_loss["sotu"] > 0.0);
    // The sweep: one rate each for full and S²FT (quick), the two given for LoRA, one chosen per method.
    let sweep = &m.sweep;
    assert_eq!(sweep.len(), 4);
    for method in ["full", "lora r2", "s2ft-random r2"] {
        let rows: Vec<_> = sweep.iter().filter(|r| r.method == method).collect();
        assert_eq!(rows.iter().filter(|r| r.chosen).count(), 1, "{method}");
    }
    // Every method on both tasks; trainable counts: S²FT ≤ LoRA ≪ full = every parameter.
    let runs = &m.runs;
    assert_eq!(runs.len(), 6);
    let params = |fam: &str| {
        runs.iter()
            .find(|r| r.family == fam)
            .unwrap_or_else(|| panic!("{fam} missing"))
            .trainable_params as u64
    };
    let total = s2ft_core::model::random_state_dict(
        &s2ft_core::Pretrained::load(&model).unwrap().config,
        0,
    )
    .numel() as u64;
    assert_eq!(params("full"), total);
    assert!(params("s2ft-random") <= params("lora") && params("lora") * 4 < total);
    for r in runs {
        assert!(r.diverged.is_none(), "{r:?}");
        assert_eq!(r.losses.len(), 4);
        assert!(r.step_ms > 0.0);
        let other = if r.task == "date" { "reverse" } else { "date" };
        assert!(
            r.other_tasks.get(other).is_some_and(|x| x.is_finite()),
            "{r:?}"
        );
        assert!(r.forgetting.is_finite());
    }
    // The saved fine-tunes reload (HF folder, PEFT adapter through merge::lora,
    // S²FT adapter with its dense ΔW) to the model the study scored: same
    // teacher-forced test loss as the study reported.
    let base = s2ft_core::Pretrained::load(&model).unwrap();
    let manifest: Vec<experiments::studies::s2ft_llm::ManifestEntry> = serde_json::from_str(
        &std::fs::read_to_string(out.join("finetunes/manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest.len(), 6);
    for e in &manifest {
        use experiments::studies::merge_llm::Format;
        let path = out.join(&e.path);
        let task = InstructTask::parse_list(std::slice::from_ref(&e.task)).unwrap()[0];
        let row = runs
            .iter()
            .find(|r| r.method == e.method && r.task == e.task)
            .unwrap_or_else(|| panic!("no run of {e:?}"));
        let weights = match e.format {
            Format::Hf => {
                let ft = s2ft_core::Pretrained::load(&path).unwrap();
                assert_eq!(ft.tokenizer.stop_ids(), base.tokenizer.stop_ids());
                ft.weights
            }
            Format::Peft => merge::lora::LoraAdapter::load(&path)
                .unwrap()
                .fuse(&base.weights, 1.0)
                .unwrap(),
            Format::S2ft => {
                let mut sd = base.weights.clone();
                let adapter = s2ft_core::adapter::S2ftAdapter::load(&path).unwrap();
                adapter.fuse(&mut sd).unwrap();
                // delta.safetensors holds the same dense ΔW.
                let dense = weights::Checkpoint::open(path.join("delta.safetensors"))
                    .unwrap()
                    .load_all()
                    .unwrap();
                let mut by_hand = base.weights.clone();
                for (name, d) in dense.iter() {
                    let t = by_hand.get_mut(name).unwrap();
                    t.data.zip_mut_with(&d.data, |x, y| *x += y);
                }
                for (name, t) in sd.iter() {
                    let o = by_hand.get(name).unwrap();
                    let dev = t
                        .data
                        .iter()
                        .zip(o.data.iter())
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    assert!(dev < 1e-6, "{name}: {dev}");
                }
                sd
            }
        };
        let got = test_answer_loss(&base.config, &weights, &base.tokenizer, task, 4);
        let want = row.test_answer_loss;
        assert!(
            (got - want).abs() < 1e-4 * want.max(1.0),
            "{e:?}: {got} vs {want}"
        );
        assert!(
            got != test_answer_loss(&base.config, &base.weights, &base.tokenizer, task, 4),
            "{e:?}: trained"
        );
    }
    // A rerun saves the same fine-tunes byte for byte: LoRA's dropout masks
    // come from a seeded generator (they did not before, and the LoRA rows of
    // two runs differed).
    let again = dir.path().join("again");
    experiments::studies::s2ft::run(&llm_args(&model, &again)).unwrap();
    let files: Vec<PathBuf> = files_under(&out.join("finetunes"))
        .into_iter()
        .filter(|f| f.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    assert!(
        files.iter().any(|f| f.to_string_lossy().contains("lora")),
        "{files:?}"
    );
    for f in files {
        assert!(
            std::fs::read(out.join("finetunes").join(&f)).unwrap()
                == std::fs::read(again.join("finetunes").join(&f)).unwrap(),
            "{}",
            f.display()
        );
    }
}

/// Every file under `dir`, relative to it.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    out.sort();
    out
}

/// Copies every file under `from` to the same place under `to`.
fn copy_tree(from: &Path, to: &Path) {
    for f in files_under(from) {
        let dst = to.join(&f);
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(from.join(&f), dst).unwrap();
    }
}

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// The finished `metrics.json` of the run resumed in `cut`: the mark set on
/// a kept row (at JSON pointer `mark`) is still there — the row was reused,
/// not redone — and, the mark put back, every field of `keys` equals the
/// uninterrupted run's (`done`) but for timings.
fn resumed_metrics(
    done: &serde_json::Value,
    cut: &Path,
    (mark, marked): (&str, serde_json::Value),
    keys: &[&str],
) -> serde_json::Value {
    assert!(!cut.join("metrics.partial.json").exists());
    let again = read_json(&cut.join("metrics.json"));
    assert_eq!(again.pointer(mark), Some(&marked), "{mark}");
    let mut unmarked = again.clone();
    *unmarked.pointer_mut(mark).unwrap() = done.pointer(mark).unwrap().clone();
    for k in keys {
        assert_eq!(
            without_timings(&unmarked[k]),
            without_timings(&done[k]),
            "{k}"
        );
    }
    again
}

/// The phases a resumed run (`again`) added to the interrupted one's (`done`).
fn phases_added(done: &serde_json::Value, again: &serde_json::Value) -> Vec<String> {
    let phases = |m: &serde_json::Value| -> Vec<String> {
        m["run"]["phases_seconds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["phase"].as_str().unwrap().to_string())
            .collect()
    };
    phases(again)[phases(done).len()..].to_vec()
}

/// `a` and `b` hold the same files, and those `compared` are byte-identical.
fn assert_same_files(a: &Path, b: &Path, compared: impl Fn(&Path) -> bool) {
    let files = files_under(a);
    assert_eq!(files_under(b), files);
    for f in files.iter().filter(|f| compared(f)) {
        assert!(
            std::fs::read(a.join(f)).unwrap() == std::fs::read(b.join(f)).unwrap(),
            "{}",
            f.display()
        );
    }
}

/// `v` without the fields that time or weigh a run (they differ run to run).
fn without_timings(v: &serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(m) => m
            .iter()
            .filter(|(k, _)| {
                !["step_ms", "peak_mb", "train_seconds", "merge_seconds"].contains(&k.as_str())
            })
            .map(|(k, v)| (k.clone(), without_timings(v)))
            .collect(),
        serde_json::Value::Array(a) => a.iter().map(without_timings).collect(),
        other => other.clone(),
    }
}

/// A run cut short — full fine-tuning done, LoRA stopped after its sweep and
/// first task, S²FT's sweep run but not scored — resumes to the
/// uninterrupted run's scores and fine-tunes, byte for byte; `--resume`
/// refuses a finished run, other options, a missing folder, and studies
/// that cannot resume.
#[test]
fn s2ft_study_resumes_an_interrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_hf_model(dir.path(), 512);
    let out = dir.path().join("run");
    experiments::studies::s2ft::run(&llm_args(&model, &out)).unwrap();
    let done = read_json(&out.join("metrics.json"));

    // The interrupted run's folder, as the study leaves it.
    let cut = dir.path().join("cut");
    copy_tree(&out, &cut);
    std::fs::remove_file(cut.join("metrics.json")).unwrap();
    std::fs::remove_file(cut.join("report.md")).unwrap();
    let keep_run = |r: &serde_json::Value| {
        r["method"] == "full" || (r["method"] == "lora r2" && r["task"] == "date")
    };
    let mut runs: Vec<_> = done["runs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| keep_run(r))
        .cloned()
        .collect();
    assert_eq!(runs.len(), 3);
    // A mark on a kept row: a resumed run reuses the rows, it does not redo them.
    runs[0]["test_answer_loss"] = serde_json::json!(123.0);
    let partial = serde_json::json!({
        "plan": done["plan"],
        "inputs": done["inputs"],
        "base": done["base"],
        "sweep": done["sweep"],
        "runs": runs,
        "run": done["run"],
        "complete": false,
    });
    std::fs::write(cut.join("metrics.partial.json"), partial.to_string()).unwrap();
    for e in done["finetunes"].as_array().unwrap() {
        if !keep_run(e) {
            std::fs::remove_dir_all(cut.join(e["path"].as_str().unwrap())).unwrap();
        }
    }
    // The manifest still lists them (a fine-tune saved, then cut before scoring).

    let resume = |out: &Path| {
        let mut a = llm_args(&model, out);
        a.lm.run.resume = true;
        a
    };
    experiments::studies::s2ft::run(&resume(&cut)).unwrap();
    let again = resumed_metrics(
        &done,
        &cut,
        ("/runs/0/test_answer_loss", serde_json::json!(123.0)),
        &["base", "sweep", "runs", "finetunes"],
    );
    // The resumed part ran only what was missing: LoRA on reverse, S²FT's sweep and reverse.
    let new = phases_added(&done, &again);
    let ran = |s: &str| new.iter().any(|p| p.contains(s));
    assert!(
        ran("lora-r2 reverse") && ran("s2ft-random-r2 date lr") && ran("s2ft-random-r2 reverse"),
        "{new:?}"
    );
    assert!(
        !ran("full") && !ran("base") && !ran("lora-r2 date"),
        "{new:?}"
    );
    assert_eq!(again["run"]["resumes"], 1);
    assert!(
        again["run"]["wall_seconds"].as_f64().unwrap()
            > done["run"]["wall_seconds"].as_f64().unwrap()
    );
    assert_same_files(&out.join("finetunes"), &cut.join("finetunes"), |f| {
        f.extension().is_some_and(|x| x == "safetensors")
    });

    // Refusals, each naming what is wrong.
    let fails = |a: experiments::studies::s2ft::S2ftArgs, want: &str| {
        let e = format!("{:#}", experiments::studies::s2ft::run(&a).unwrap_err());
        assert!(e.contains(want), "{want:?} not in: {e}");
    };
    fails(resume(&out), "finished run");
    fails(resume(&dir.path().join("nowhere")), "metrics.partial.json");
    std::fs::remove_file(cut.join("metrics.json")).unwrap();
    std::fs::write(cut.join("metrics.partial.json"), partial.to_string()).unwrap();
    let mut other = resume(&cut);
    other.lm.steps = Some(3);
    fails(other, "steps: 4 then, 3 now");
    let mut no_out = resume(&cut);
    no_out.lm.run.out = None;
    fails(no_out, "--resume needs --out");
    let mut character = experiments::studies::s2ft::S2ftArgs::default();
    character.lm.run = RunArgs::quiet_to(dir.path().join("char"));
    character.lm.run.resume = true;
    fails(character, "cannot resume");
}

/// `s2ft` refuses `args` with an error holding every piece of `want`, and
/// leaves no report folder at `out`.
fn s2ft_refused(args: experiments::studies::s2ft::S2ftArgs, out: &Path, want: &[&str]) {
    let e = format!("{:#}", experiments::studies::s2ft::run(&args).unwrap_err());
    for w in want {
        assert!(e.contains(w), "{w:?} not in: {e}");
    }
    assert!(!out.exists(), "a report folder after: {e}");
}

#[test]
fn s2ft_study_names_bad_real_model_input_before_writing_a_report() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_hf_model(dir.path(), 512);
    let out = dir.path().join("run");
    let fails = |args, want: &[&str]| s2ft_refused(args, &out, want);
    // An unknown task.
    let mut a = llm_args(&model, &out);
    a.llm.tasks = Some(vec!["date".into(), "sums".into()]);
    fails(a, &["unknown task 'sums'", "reverse"]);
    // A budget larger than the model allows.
    let mut a = llm_args(&model, &out);
    a.ranks = Some(vec![64]);
    fails(a, &["--ranks 64"]);
    // A prompt longer than the model's context.
    let short = tiny_hf_model(&dir.path().join("short"), 48);
    fails(llm_args(&short, &out), &["context of 48"]);
    // Not a LLaMA decoder.
    let bert = dir.path().join("bert");
    std::fs::create_dir(&bert).unwrap();
    std::fs::write(
        bert.join("config.json"),
        r#"{"architectures": ["BertModel"], "model_type": "bert"}"#,
    )
    .unwrap();
    fails(
        llm_args(&bert, &out),
        &["not a LLaMA-family decoder", "config.json"],
    );
    // A missing tokenizer.
    std::fs::remove_file(model.join("tokenizer.json")).unwrap();
    fails(llm_args(&model, &out), &["tokenizer.json", "no tokenizer"]);
    // A character-model flag with --model, a real-model flag without it.
    let mut a = llm_args(&model, &out);
    a.lm.hidden = 99;
    fails(a, &["--hidden"]);
    let mut a = llm_args(&model, &out);
    a.llm.model = None;
    fails(a, &["applies to a real model", "--model"]);
}

/// A run split into two parts by `--methods` and combined (`--combine`)
/// reports what the run of all its methods reports — the same sweep, rows
/// and means, timings aside — with the fine-tunes listed where the parts
/// saved them (so `merge --finetunes` reads the combined folder); parts
/// that cannot be combined are refused by name before anything is written.
#[test]
fn s2ft_study_combines_the_parts_of_a_split_run() {
    use experiments::studies::merge_llm::{read_manifest, read_trainings};
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_hf_model(dir.path(), 512);
    let (whole, a, b) = (
        dir.path().join("whole"),
        dir.path().join("a"),
        dir.path().join("b"),
    );
    experiments::studies::s2ft::run(&llm_args(&model, &whole)).unwrap();
    let part = |out: &Path, methods: &[&str]| {
        let mut args = llm_args(&model, out);
        args.llm.methods = Some(methods.iter().map(|m| m.to_string()).collect());
        experiments::studies::s2ft::run(&args).unwrap();
    };
    part(&a, &["s2ft-random", "full"]);
    part(&b, &["lora"]);
    let combined = |parts: &[&Path], out: &Path| {
        let mut args = llm_args(&model, out);
        args.llm.combine = Some(parts.iter().map(|p| p.to_path_buf()).collect());
        args
    };
    let all = dir.path().join("all");
    experiments::studies::s2ft::run(&combined(&[&b, &a], &all)).unwrap();

    let (done, got) = (
        read_json(&whole.join("metrics.json")),
        read_json(&all.join("metrics.json")),
    );
    let unsaved = |v: &serde_json::Value| {
        let mut v = without_timings(v);
        for r in v.as_array_mut().unwrap() {
            r.as_object_mut().unwrap().remove("saved");
        }
        v
    };
    assert_eq!(unsaved(&got["runs"]), unsaved(&done["runs"]));
    for k in ["plan", "base", "sweep", "summary"] {
        assert_eq!(without_timings(&got[k]), without_timings(&done[k]), "{k}");
    }
    assert_eq!(
        got["plan"]["methods"],
        serde_json::json!(["full", "lora-r2", "s2ft-random-r2"])
    );
    let parts = got["parts"].as_array().unwrap();
    assert_eq!(parts[0]["methods"], serde_json::json!(["lora-r2"]));
    assert_eq!(
        parts[1]["methods"],
        serde_json::json!(["full", "s2ft-random-r2"])
    );
    assert!(done.get("parts").is_none());
    // Every fine-tune is the part's, found from the combined folder.
    let sources = read_manifest(&all).unwrap();
    assert_eq!(sources.len(), 6);
    for s in &sources {
        let from = if s.group.starts_with("lora") { &b } else { &a };
        assert_eq!(
            std::fs::canonicalize(&s.path).unwrap(),
            std::fs::canonicalize(
                from.join("finetunes")
                    .join(&s.task)
                    .join(s.group.replace(' ', "-"))
            )
            .unwrap(),
            "{s:?}"
        );
    }
    for r in got["runs"].as_array().unwrap() {
        assert!(all.join(r["saved"].as_str().unwrap()).is_dir(), "{r}");
    }
    let t = read_trainings(std::slice::from_ref(&all)).unwrap().unwrap();
    assert_eq!(t.lrs.len(), 3, "{t:?}");
    for f in [
        "summary.csv",
        "runs.csv",
        "sweep.csv",
        "accuracy_vs_params.png",
        "lr_sweep.png",
    ] {
        assert!(all.join(f).is_file(), "{f}");
    }
    let md = std::fs::read_to_string(all.join("report.md")).unwrap();
    assert!(
        md.contains("## Parts") && md.contains("| lora-r2 |"),
        "{md}"
    );
    // The parts' wall time in all, under the table of parts.
    let wall: f64 = parts
        .iter()
        .map(|p| p["run"]["wall_seconds"].as_f64().unwrap())
        .sum();
    assert!(
        md.contains(&format!("| all parts | | | | | {wall:.0} s = ")),
        "{md}"
    );

    // Refusals, each naming what is wrong, with no folder written.
    let out = dir.path().join("refused");
    let fails = |args, want: &[&str]| s2ft_refused(args, &out, want);
    fails(combined(&[&a], &out), &["no part trained 'lora-r2'"]);
    fails(combined(&[&a, &b, &a], &out), &["both", "trained 'full'"]);
    let mut steps = combined(&[&a, &b], &out);
    steps.lm.steps = Some(3);
    fails(steps, &["other options", "steps: 4 in", "3 here"]);
    let mut resume = combined(&[&a, &b], &out);
    resume.lm.run.resume = true;
    fails(resume, &["does not take --resume"]);
    let cut = dir.path().join("cut");
    copy_tree(&b, &cut);
    std::fs::rename(cut.join("metrics.json"), cut.join("metrics.partial.json")).unwrap();
    fails(combined(&[&a, &cut], &out), &["unfinished run", "--resume"]);
    fails(combined(&[&a, &whole], &out), &["both", "trained 'full'"]);
    let e = format!(
        "{:#}",
        experiments::studies::s2ft::run(&combined(&[&a, &b], &a)).unwrap_err()
    );
    assert!(e.contains("is one of the parts"), "{e}");
    assert!(a.join("metrics.json").is_file());
    // A character-model run is no part either.
    let mut args = experiments::studies::s2ft::S2ftArgs::default();
    args.lm.run = RunArgs::quiet_to(&out);
    args.llm.combine = Some(vec![a.clone()]);
    fails(args, &["--combine applies to a real model"]);

    // The base model's scores may differ by one example per split (a greedy
    // answer rounding flipped on another machine), not by two.
    let shifted = |by: f64| {
        let c = dir.path().join(format!("b-shifted-{by}"));
        copy_tree(&b, &c);
        let mut m = read_json(&c.join("metrics.json"));
        let acc = &mut m["base"]["tasks"]["reverse"]["ood"]["acc"];
        *acc = serde_json::json!(acc.as_f64().unwrap() + by);
        std::fs::write(c.join("metrics.json"), m.to_string()).unwrap();
        c
    };
    let one = dir.path().join("one-off");
    experiments::studies::s2ft::run(&combined(&[&a, &shifted(0.25)], &one)).unwrap();
    fails(
        combined(&[&a, &shifted(0.5)], &out),
        &[
            "base model scored differently",
            "reverse ood accuracy",
            "more than one example of 4",
        ],
    );
    // A fine-tune a part lists and no longer holds (a part kept without its
    // models): named in the report, left out of the manifest.
    let gone = dir.path().join("b-gone");
    copy_tree(&b, &gone);
    std::fs::remove_dir_all(gone.join("finetunes/date/lora-r2")).unwrap();
    let without = dir.path().join("without");
    experiments::studies::s2ft::run(&combined(&[&a, &gone], &without)).unwrap();
    let manifest = std::fs::read_to_string(without.join("finetunes/manifest.json")).unwrap();
    assert!(!manifest.contains("date/lora-r2"), "{manifest}");
    assert!(manifest.contains("reverse/lora-r2"), "{manifest}");
    let md = std::fs::read_to_string(without.join("report.md")).unwrap();
    assert!(
        md.contains("1 fine-tune(s) of") && md.contains("finetunes/date/lora-r2"),
        "{md}"
    );
    // The model fetched again (a new modification time, the same bytes)
    // combines; rewritten to another size, it does not.
    let config = model.join("config.json");
    std::fs::File::options()
        .write(true)
        .open(&config)
        .unwrap()
        .set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(86_400))
        .unwrap();
    experiments::studies::s2ft::run(&combined(&[&a, &b], &dir.path().join("refetched"))).unwrap();
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push('\n');
    std::fs::write(&config, text).unwrap();
    fails(
        combined(&[&a, &b], &out),
        &["config.json changed since", "read it", "bytes then"],
    );
}

/// SmolLM2-135M-Instruct's GGUF (see `weights::testing`).
fn smollm2() -> std::path::PathBuf {
    weights::testing::fetched_model("SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
}

#[test]
#[ignore = "needs models/ from scripts/fetch-models.sh; run with --ignored"]
fn smollm2_greedy_answers_match_transformers() {
    use experiments::tasks::{InstructTask, Split, Words, examples};
    let path = smollm2();
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../experiments/tests/fixtures/smollm2_greedy.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let answers = fixture["answers"].as_array().unwrap();
    assert_eq!(answers.len(), InstructTask::ALL.len());
    let p = s2ft_core::Pretrained::load(&path).unwrap();
    let model = s2ft_core::Llama::<s2ft_core::Cpu>::from_state_dict(
        &p.config,
        &p.weights,
        false,
        &Default::default(),
    )
    .unwrap();
    let words = Words::load(&experiments::lm::default_text_dir()).unwrap();
    let prompter = experiments::llm::Prompter::new(&p.tokenizer).unwrap();
    let ids_of = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let mut prompts = Vec::new();
    for a in answers {
        let task = InstructTask::parse_list(&[a["task"].as_str().unwrap().to_string()]).unwrap()[0];
        let ex = examples(
            task,
            Split::Test,
            1,
            &words,
            experiments::studies::s2ft_llm::EVAL_SEED,
        )
        .unwrap()
        .remove(0);
        // The fixture's prompt is still the generator's first test example.
        assert_eq!(ex.prompt, a["prompt"].as_str().unwrap(), "{task:?}");
        // Chat template and tokenizer: transformers' apply_chat_template ids.
        let ids = prompter.prompt(&ex).unwrap();
        assert_eq!(ids, ids_of(&a["prompt_ids"]), "{task:?} prompt ids");
        prompts.push(ids);
    }
    // All four decoded together (left padding, shared system-turn prefix).
    let cfg = s2ft_core::generate::GenerationConfig {
        max_new_tokens: 40,
        stop_ids: p.tokenizer.stop_ids().to_vec(),
        batch_size: 4,
        max_positions: p.config.max_position_embeddings.unwrap(),
    };
    let got = s2ft_core::generate::greedy(&model, &prompts, &cfg).unwrap();
    for (a, g) in answers.iter().zip(&got) {
        let text = p.tokenizer.decode(&g.ids, false).unwrap();
        eprintln!("{}: {text:?}", a["task"]);
        assert_eq!(
            g.ids,
            ids_of(&a["generated_ids"]),
            "{}: {text:?} vs {}",
            a["task"],
            a["text"]
        );
        assert_eq!(g.stopped, a["stopped"].as_bool().unwrap(), "{}", a["task"]);
        assert_eq!(text, a["text"].as_str().unwrap());
    }
}

fn merge_llm_args(
    model: &Path,
    finetunes: Option<&Path>,
    out: &Path,
) -> experiments::studies::merging::MergeArgs {
    use experiments::studies::merge_llm::{METHODS, MergeLlmArgs};
    let mut a = experiments::studies::merging::MergeArgs::default();
    a.lm.quick = true;
    a.lm.run = RunArgs::quiet_to(out);
    a.llm = MergeLlmArgs {
        model: Some(model.to_path_buf()),
        finetunes: finetunes.map(Path::to_path_buf).into_iter().collect(),
        eval_examples: Some(3),
        val_examples: Some(2),
        regmean_prompts: Some(2),
        lambdas: Some(vec![0.5, 1.0]),
        methods: Some(METHODS.iter().map(|s| s.to_string()).collect()),
        ..Default::default()
    };
    a
}

/// The real-model merge study end to end at tiny size on the fine-tunes the
/// real-model s2ft study saved: every method of every group, the YAML configs
/// equal to the in-memory merges bit for bit, the table's bookkeeping.
#[test]
fn merge_study_merges_real_model_fine_tunes_and_its_yaml_configs_are_mergekits() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_hf_model(dir.path(), 512);
    let ft = dir.path().join("s2ft");
    experiments::studies::s2ft::run(&llm_args(&model, &ft)).unwrap();
    // --finetune TASK=PATH recognises each saved format by its files.
    use experiments::studies::merge_llm::{Format, read_manifest};
    for s in read_manifest(&ft).unwrap() {
        assert_eq!(
            Format::detect(&s.path).unwrap(),
            s.format,
            "{}",
            s.path.display()
        );
    }
    let out = dir.path().join("merge");
    experiments::studies::merging::run(&merge_llm_args(&model, Some(&ft), &out)).unwrap();
    check_pngs(&out, &MERGE_LLM_PLOTS);
    assert!(out.join("merges.csv").is_file() && out.join("report.md").is_file());
    assert!(!out.join("inputs").exists(), "scratch inputs removed");
    assert!(!out.join("metrics.partial.json").exists());
    let m = metrics::<experiments::studies::merge_llm::Rows>(&out).metrics;
    let groups = ["full", "lora r2", "s2ft-random r2"];
    // Individual fine-tunes on their own task's test split: the normaliser.
    let own = |g: &str, t: &str| -> f64 {
        m.individual
            .iter()
            .find(|r| r.group == g && r.task == t)
            .unwrap_or_else(|| panic!("{g} {t} missing"))
            .test
            .tasks[t]
    };
    let rows = &m.merges;
    for g in groups {
        let of_group: Vec<_> = rows.iter().filter(|r| r.group == g).collect();
        let methods: Vec<&str> = of_group.iter().map(|r| r.method.as_str()).collect();
        // LoRA-LEGO only where the inputs are LoRA adapters.
        let want = experiments::studies::merge_llm::METHODS.len() - usize::from(g != "lora r2");
        assert_eq!(methods.len(), want, "{g}: {methods:?}");
        assert_eq!(methods.contains(&"lora_lego"), g == "lora r2");
        for r in &of_group {
            let method = r.method.as_str();
            if method == "wm_check" {
                // Fine-tunes of one base: weight matching finds the identity.
                assert!(
                    r.note.as_deref().unwrap_or("").contains("leaves 1.0000"),
                    "{r:?}"
                );
                continue;
            }
            // Normalised accuracy recomputed from the table's own numbers.
            let mut ratios = Vec::new();
            for t in ["date", "reverse"] {
                let acc = r.test.tasks[t];
                assert!((0.0..=1.0).contains(&acc));
                let ind = own(g, t);
                match r.normalised.tasks.get(t).copied().flatten() {
                    Some(v) => {
                        assert!((v - acc / ind).abs() < 1e-12, "{g} {method} {t}");
                        ratios.push(v);
                    }
                    None => assert_eq!(
                        ind, 0.0,
                        "{g} {method} {t}: undefined only when the individual scored 0"
                    ),
                }
            }
            if !ratios.is_empty() {
                let mean = ratios.iter().sum::<f64>() / ratios.len() as f64;
                let got = r.normalised.mean.expect("a mean of the defined ratios");
                assert!((got - mean).abs() < 1e-12);
            }
            // Grids of several points are scored on validation and one is chosen.
            let grid = &r.grid;
            if grid.len() > 1 {
                assert!(grid.iter().all(|p| p.val_acc.is_some()), "{r:?}");
                assert!(grid.iter().any(|p| p.hyper == r.hyper), "{r:?}");
            }
            // Every mergekit method's YAML ran to the same tensors, bit for bit.
            if method == "mtl" {
                // Multi-task fine-tuning: both tasks, the two fine-tunes' 2 × 4 steps.
                assert_eq!(r.hyper.get("steps"), Some(&8.0), "{r:?}");
                assert!(
                    r.note.as_deref().unwrap_or("").contains("date, reverse"),
                    "{r:?}"
                );
            }
            let typed = !["lora_lego", "rmm", "mtl"].contains(&method);
            assert_eq!(r.yaml_identical, typed.then_some(true), "{g} {method}");
            if typed {
                let yaml = out.join(r.yaml.as_deref().expect("a YAML config"));
                let text = std::fs::read_to_string(&yaml).unwrap();
                assert!(
                    text.contains(&format!("merge_method: {method}")) || method == "average",
                    "{text}"
                );
            }
        }
        // Task arithmetic and TIES grids cover the λ given.
        let ta = of_group
            .iter()
            .find(|r| r.method == "task_arithmetic")
            .unwrap();
        assert_eq!(ta.grid.len(), 2);
        // The best merge of the group is a model folder that loads.
        let best = m.best.iter().find(|b| b.group == g).unwrap();
        let loaded = s2ft_core::Pretrained::load(&out.join(&best.path)).unwrap();
        assert_eq!(
            loaded.config.vocab_size,
            s2ft_core::Pretrained::load(&model)
                .unwrap()
                .config
                .vocab_size
        );
    }
    // Task-vector analysis: symmetric matrices with a unit diagonal, and one pair.
    for a in &m.task_vectors {
        let cos = &a.cosines;
        assert_eq!(cos.len(), 2);
        assert_eq!(cos[0][1], cos[1][0]);
        let o = a.overlaps[0][1];
        assert!((0.0..=1.0 + 1e-9).contains(&o), "{a:?}");
        assert_eq!(a.pairs.len(), 1);
        assert!(a.norms[0] > 0.0);
    }
}

/// A merge run cut short — group `full` merged and analysed, its best model
/// saved but not recorded; `lora r2` cut after four methods, its best saved
/// but not recorded; one fine-tune of `s2ft-random r2` scored — resumes to
/// the uninterrupted run's rows, task-vector analyses and best models (byte
/// for byte), running only what was missing; each saved best model is the
/// merge its mergekit YAML config gives. Then the finished run, split by
/// group, combines back into itself (`merge --combine`).
#[test]
fn merge_study_resumes_an_interrupted_run_and_combines_runs_of_other_groups() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_hf_model(dir.path(), 512);
    let ft = dir.path().join("s2ft");
    experiments::studies::s2ft::run(&llm_args(&model, &ft)).unwrap();
    let out = dir.path().join("merge");
    // Inputs kept, so that every YAML config can be run again below.
    let args = |out: &Path| {
        let mut a = merge_llm_args(&model, Some(&ft), out);
        a.llm.keep_inputs = true;
        a
    };
    experiments::studies::merging::run(&args(&out)).unwrap();
    let done = read_json(&out.join("metrics.json"));

    // An interrupted run's folder: one state per group, each one a cut can
    // leave (a real cut leaves one group part done, the later ones untouched).
    let cut = dir.path().join("cut");
    copy_tree(&out, &cut);
    std::fs::remove_file(cut.join("metrics.json")).unwrap();
    std::fs::remove_file(cut.join("report.md")).unwrap();
    let lora_kept = ["average", "task_arithmetic", "ties", "dare_ties"];
    let kept = |key: &str, keep: &dyn Fn(&serde_json::Value) -> bool| -> Vec<serde_json::Value> {
        done[key]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| keep(r))
            .cloned()
            .collect()
    };
    let full = |r: &serde_json::Value| r["group"] == "full";
    let mut merges = kept("merges", &|r| {
        full(r) || (r["group"] == "lora r2" && lora_kept.contains(&r["method"].as_str().unwrap()))
    });
    assert_eq!(merges.len(), 16 + 4);
    // A mark on a kept row: a resumed run reuses the rows, it does not redo them.
    merges[0]["note"] = serde_json::json!("kept, not redone");
    let partial = serde_json::json!({
        "plan": done["plan"],
        "inputs": done["inputs"],
        "base": done["base"],
        "individual": kept("individual", &|r| r["group"] != "s2ft-random r2" || r["task"] == "date"),
        "merges": merges,
        "task_vectors": kept("task_vectors", &full),
        "best": [],
        "run": done["run"],
        "complete": false,
    });
    std::fs::write(cut.join("metrics.partial.json"), partial.to_string()).unwrap();
    std::fs::remove_dir_all(cut.join("best/s2ft-random-r2")).unwrap();
    // best/full and best/lora-r2 stay: saved, then cut before they were recorded.

    let resume = |out: &Path| {
        let mut a = args(out);
        a.lm.run.resume = true;
        a
    };
    experiments::studies::merging::run(&resume(&cut)).unwrap();
    let again = resumed_metrics(
        &done,
        &cut,
        ("/merges/0/note", serde_json::json!("kept, not redone")),
        &["base", "individual", "merges", "task_vectors", "best"],
    );
    // Only what was missing ran.
    let new = phases_added(&done, &again);
    let ran = |s: &str| new.iter().any(|p| p.contains(s));
    for want in [
        "full read",
        "full save best",
        "lora r2 dare_linear",
        "lora r2 task vectors",
        "lora r2 save best",
        "score s2ft-random r2 reverse",
        "s2ft-random r2 save best",
    ] {
        assert!(ran(want), "{want} not in {new:?}");
    }
    for not in [
        "score base",
        "score full",
        "full average",
        "full regmean",
        "full task vectors",
        "lora r2 ties",
        "score lora r2",
        "score s2ft-random r2 date",
    ] {
        assert!(!ran(not), "{not} in {new:?}");
    }
    assert_eq!(again["run"]["resumes"], 1);
    // The best models, rebuilt from their rows, byte for byte.
    assert_same_files(&out.join("best"), &cut.join("best"), |_| true);
    // Each is the merge its row's YAML config gives (which the run found
    // equal to the merge it scored).
    let m = metrics::<experiments::studies::merge_llm::Rows>(&cut).metrics;
    let mut checked = 0;
    for b in &m.best {
        let row = m
            .merges
            .iter()
            .find(|r| r.group == b.group && r.method == b.method)
            .unwrap();
        let Some(yaml) = &row.yaml else { continue };
        let rerun = dir.path().join(format!("yaml-{}", b.group));
        let opts = merge::run::RunOptions {
            seed: again["plan"]["seed"].as_u64().unwrap(),
            ..Default::default()
        };
        merge::run::run_file(&cut.join(yaml), &rerun, &opts).unwrap();
        let (want, got) = (
            weights::StateDict::load(&rerun).unwrap(),
            weights::StateDict::load(cut.join(&b.path)).unwrap(),
        );
        assert_eq!(want.len(), got.len());
        for (name, t) in want.iter() {
            assert_eq!(got.get(name).unwrap().data, t.data, "{} {name}", b.group);
        }
        checked += 1;
    }
    assert!(checked >= 2, "{:?}", m.best);

    // Refusals, each naming what is wrong.
    let fails = |a: experiments::studies::merging::MergeArgs, want: &str| {
        let e = format!("{:#}", experiments::studies::merging::run(&a).unwrap_err());
        assert!(e.contains(want), "{want:?} not in: {e}");
    };
    fails(resume(&out), "finished run");
    std::fs::remove_file(cut.join("metrics.json")).unwrap();
    std::fs::write(cut.join("metrics.partial.json"), partial.to_string()).unwrap();
    let mut other = resume(&cut);
    other.llm.lambdas = Some(vec![0.5]);
    fails(other, "lambdas: [0.5,1.0] then, [0.5] now");
    let mut on_gpu = partial.clone();
    on_gpu["run"]["backend"] = serde_json::json!("cuda (burn cubecl)");
    std::fs::write(cut.join("metrics.partial.json"), on_gpu.to_string()).unwrap();
    fails(
        resume(&cut),
        "ran on cuda (burn cubecl), this one would on cpu",
    );
    // A fine-tune redone in place since: its file's time differs.
    std::fs::write(cut.join("metrics.partial.json"), partial.to_string()).unwrap();
    let inputs: Vec<PathBuf> = partial["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| PathBuf::from(f["path"].as_str().unwrap()))
        .collect();
    assert!(inputs.iter().any(|p| p.starts_with(&model)), "{inputs:?}");
    let redone = inputs.iter().find(|p| p.starts_with(&ft)).unwrap();
    std::fs::File::options()
        .write(true)
        .open(redone)
        .unwrap()
        .set_modified(std::time::SystemTime::UNIX_EPOCH)
        .unwrap();
    fails(
        resume(&cut),
        &format!(
            "{} changed since the interrupted run read it",
            redone.display()
        ),
    );
    let mut character = experiments::studies::merging::MergeArgs::default();
    character.lm.run = RunArgs::quiet_to(dir.path().join("char"));
    character.lm.run.resume = true;
    fails(character, "cannot resume");

    combines_runs_of_other_groups(dir.path(), &model, &out, &done);
}

/// `merge --combine`: the finished run `out` (metrics `done`) split by
/// group into two runs that keep only their `metrics.json` (a session's
/// scratch folder lost: no fine-tunes, no best models) combines into the
/// one run's rows, plan and report tables; bad parts are refused by name.
fn combines_runs_of_other_groups(dir: &Path, model: &Path, out: &Path, done: &serde_json::Value) {
    use serde_json::json;
    // A part: `done` restricted to groups `keep`, only its metrics.json.
    let part = |name: &str, keep: &[&str]| -> PathBuf {
        let mut m = done.clone();
        let only_kept = |rows: &serde_json::Value| -> serde_json::Value {
            let kept = rows
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| keep.contains(&r["group"].as_str().unwrap()));
            json!(kept.cloned().collect::<Vec<_>>())
        };
        for key in ["individual", "merges", "task_vectors", "best"] {
            m[key] = only_kept(&m[key]);
        }
        m["plan"]["sources"] = only_kept(&m["plan"]["sources"]);
        m["plan"]["groups"] = json!(keep);
        let p = dir.join(name);
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("metrics.json"), m.to_string()).unwrap();
        p
    };
    let a = part("part-full", &["full"]);
    let b = part("part-rest", &["lora r2", "s2ft-random r2"]);
    let combine = |parts: &[&Path], to: &Path| {
        let mut args = experiments::studies::merging::MergeArgs::default();
        args.lm.run = RunArgs::quiet_to(to);
        args.llm.model = Some(model.to_path_buf());
        args.llm.combine = parts.iter().map(|p| p.to_path_buf()).collect();
        args
    };
    let both = dir.join("combined");
    experiments::studies::merging::run(&combine(&[&a, &b], &both)).unwrap();
    let got = read_json(&both.join("metrics.json"));
    for key in ["base", "individual", "task_vectors"] {
        assert_eq!(got[key], done[key], "{key}");
    }
    // Rows equal but for their YAML configs' paths, which lead into the parts.
    let merges = got["merges"].as_array().unwrap();
    assert_eq!(merges.len(), done["merges"].as_array().unwrap().len());
    for (g, d) in merges.iter().zip(done["merges"].as_array().unwrap()) {
        let (mut g, mut d) = (g.clone(), d.clone());
        if let Some(y) = d["yaml"].as_str() {
            let part = if d["group"] == "full" {
                "part-full"
            } else {
                "part-rest"
            };
            assert_eq!(g["yaml"], json!(format!("../{part}/{y}")));
            g["yaml"] = json!(null);
            d["yaml"] = json!(null);
        }
        assert_eq!(g, d);
    }
    let best: Vec<&str> = got["best"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        best,
        [
            "../part-full/best/full",
            "../part-rest/best/lora-r2",
            "../part-rest/best/s2ft-random-r2"
        ]
    );
    // The plan of one run of all groups (its scratch inputs not kept).
    let (mut want_plan, mut got_plan) = (done["plan"].clone(), got["plan"].clone());
    want_plan["keep_inputs"] = json!(false);
    got_plan["keep_inputs"] = json!(false);
    assert_eq!(got_plan, want_plan);
    let parts: Vec<_> = got["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["groups"].clone())
        .collect();
    assert_eq!(
        parts,
        [json!(["full"]), json!(["lora r2", "s2ft-random r2"])]
    );
    // The report's tables are the one run's, and every plot is drawn.
    let table = |p: &Path| {
        let md = std::fs::read_to_string(p.join("report.md")).unwrap();
        md[..md.find("## Outputs").unwrap()].to_string()
    };
    assert_eq!(
        table(&both)
            .replace("../part-full/", "")
            .replace("../part-rest/", ""),
        table(out)
    );
    assert!(
        std::fs::read_to_string(both.join("report.md"))
            .unwrap()
            .contains("## Parts")
    );
    check_pngs(&both, &MERGE_LLM_PLOTS);

    // Refusals, each naming what is wrong, before any report folder exists.
    let bad = dir.join("bad");
    let fails = |args, want: &str| merge_refused(args, &bad, &[want]);
    fails(combine(&[&a, &a], &bad), "merged group 'full'");
    let edit = |name: &str, f: &dyn Fn(&mut serde_json::Value)| -> PathBuf {
        let p = dir.join(name);
        copy_tree(&b, &p);
        let mut m = read_json(&p.join("metrics.json"));
        f(&mut m);
        std::fs::write(p.join("metrics.json"), m.to_string()).unwrap();
        p
    };
    let other_grid = edit("other-grid", &|m| m["plan"]["lambdas"] = json!([0.3]));
    fails(
        combine(&[&a, &other_grid], &bad),
        "were run with other options (lambdas",
    );
    let other_base = edit("other-base", &|m| {
        let acc = m["base"]["test"]["tasks"]["date"].as_f64().unwrap();
        m["base"]["test"]["tasks"]["date"] = json!(if acc > 0.5 { 0.0 } else { 1.0 });
    });
    fails(
        combine(&[&a, &other_base], &bad),
        "the base model scored differently",
    );
    let other_model = edit("other-model", &|m| {
        for f in m["inputs"].as_array_mut().unwrap() {
            f["bytes"] = json!(f["bytes"].as_u64().unwrap() + 1);
        }
    });
    fails(
        combine(&[&a, &other_model], &bad),
        "its scores are of another model",
    );
    let unfinished = dir.join("unfinished");
    std::fs::create_dir_all(&unfinished).unwrap();
    std::fs::write(unfinished.join("metrics.partial.json"), "{}").unwrap();
    fails(combine(&[&a, &unfinished], &bad), "unfinished run");
    let mut with_finetunes = combine(&[&a, &b], &bad);
    with_finetunes.llm.finetunes = vec![a.clone()];
    fails(with_finetunes, "--finetunes does not apply with --combine");
    let e = experiments::studies::merging::run(&combine(&[&a, &b], &a)).unwrap_err();
    assert!(format!("{e:#}").contains("is one of the parts"), "{e:#}");
}

#[test]
fn merge_study_names_bad_real_model_input_before_writing_a_report() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_hf_model(dir.path(), 512);
    let out = dir.path().join("run");
    let fails = |args, want: &[&str]| merge_refused(args, &out, want);
    // Fine-tunes: two copies of the base under task names, saved as HF folders.
    let base = s2ft_core::Pretrained::load(&model).unwrap();
    let save = |name: &str, c: &s2ft_core::LlamaConfig, seed: u64| {
        let mut sd = s2ft_core::model::random_state_dict(c, seed);
        let p = dir.path().join(name);
        s2ft_core::pretrained::save_hf_folder(&p, c, &mut sd, &base.tokenizer, u64::MAX).unwrap();
        p
    };
    let date = save("date", &base.config, 4);
    let reverse = save("reverse", &base.config, 5);
    let mut other = base.config.clone();
    other.intermediate_size = 48;
    let wrong = save("wrong", &other, 6);
    let with = |fts: &[String]| {
        let mut a = merge_llm_args(&model, None, &out);
        a.llm.finetune = fts.to_vec();
        a
    };
    let arg = |t: &str, p: &Path| format!("{t}={}", p.display());
    // A fine-tune of a different base (another FFN width): named with its tensor.
    fails(
        with(&[arg("date", &date), arg("reverse", &wrong)]),
        &["wrong", "mlp.gate_proj.weight", "different base"],
    );
    // An unknown task.
    fails(
        with(&[arg("date", &date), arg("sums", &reverse)]),
        &["sums"],
    );
    // One fine-tune per group is nothing to merge.
    fails(with(&[arg("date", &date)]), &["merging needs two tasks"]);
    // A folder that is no fine-tune.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    fails(
        with(&[arg("date", &date), arg("reverse", &empty)]),
        &["empty", "config.json"],
    );
    // A LoRA adapter of another base: does not fit.
    let big = {
        let c = other.clone();
        let m = s2ft_core::Llama::<s2ft_core::CpuTrain>::from_state_dict(
            &c,
            &s2ft_core::model::random_state_dict(&c, 1),
            false,
            &Default::default(),
        )
        .unwrap();
        let m = s2ft_core::s2ft::apply_lora_with_dropout(
            m,
            2,
            4.0,
            0.0,
            &s2ft_core::s2ft::LORA_TARGETS_ALL,
            0,
        )
        .unwrap();
        let p = dir.path().join("lora-other");
        s2ft_core::adapter::save_lora_peft(&m, &p).unwrap();
        p
    };
    fails(
        with(&[arg("date", &big), arg("reverse", &big)]),
        &["lora-other", "does not fit the base"],
    );
    // Character-study flags with --model, real-model flags without it.
    let mut a = with(&[arg("date", &date), arg("reverse", &reverse)]);
    a.rank = 7;
    fails(a, &["--rank", "character-model"]);
    let mut a = experiments::studies::merging::MergeArgs::default();
    a.lm.run = RunArgs::quiet_to(&out);
    a.llm.finetunes = vec![dir.path().to_path_buf()];
    fails(a, &["--finetunes", "--model"]);
    // An unknown method and a density above 1.
    let mut a = with(&[arg("date", &date), arg("reverse", &reverse)]);
    a.llm.methods = Some(vec!["tiez".into()]);
    fails(a, &["tiez", "known"]);
    let mut a = with(&[arg("date", &date), arg("reverse", &reverse)]);
    a.llm.densities = Some(vec![1.5]);
    fails(a, &["--densities"]);
}

fn moe_args(model: &Path, finetunes: &Path, out: &Path) -> experiments::studies::moe::MoeArgs {
    experiments::studies::moe::MoeArgs {
        model: Some(model.to_path_buf()),
        finetunes: Some(finetunes.to_path_buf()),
        quick: true,
        experts_per_token: 1,
        prompts: Some(2),
        calibration: Some(2),
        eval_examples: Some(3),
        keep: Some(vec![0.5]),
        run: RunArgs::quiet_to(out),
        ..Default::default()
    }
}

/// The MoE study end to end at tiny size on the full fine-tunes the
/// real-model s2ft study saved: three gate modes, three compressions, the
/// table's bookkeeping, and the mixture it saves equal to what its own
/// mergekit-moe config builds through `experiments merge-moe`.
#[test]
fn moe_study_builds_a_mixture_from_fine_tunes_and_compresses_it() {
    use experiments::studies::moe::Metrics;
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_hf_model(dir.path(), 512);
    let ft = dir.path().join("s2ft");
    experiments::studies::s2ft::run(&llm_args(&model, &ft)).unwrap();
    let out = dir.path().join("moe");
    experiments::studies::moe::run(&moe_args(&model, &ft, &out)).unwrap();
    assert!(!out.join("metrics.partial.json").exists());
    check_png(&out.join("accuracy_vs_experts.png"));
    check_png(&out.join("routing_moe_hidden.png"));
    let m: Metrics = metrics::<experiments::studies::moe::Rows>(&out)
        .metrics
        .metrics;
    let labels: Vec<&str> = m.models.iter().map(|r| r.label.as_str()).collect();
    assert_eq!(
        labels,
        [
            "base",
            "expert date",
            "expert reverse",
            "moe hidden",
            "moe cheap_embed",
            "moe random",
            "submoe 1/2",
            "prune 1/2",
            "average 1/2"
        ]
    );
    // Parameter counts: two experts' MLPs and a router per block on top of
    // the dense model; top-1 routing passes a token through one MLP.
    let c = s2ft_core::Pretrained::load(&model).unwrap().config;
    let mlp = 3 * c.hidden_size * c.intermediate_size;
    let router = 2 * c.hidden_size;
    let dense = m.models[0].params;
    let moe = &m.models[3];
    assert_eq!(moe.params, dense + c.num_hidden_layers * (mlp + router));
    assert_eq!(moe.active_params, dense + c.num_hidden_layers * router);
    assert_eq!((moe.experts, moe.top_k), (Some(2), Some(1)));
    // Sample answers (what check_moe.py compares with transformers'), three per task.
    assert_eq!(moe.samples.len(), 6);
    let pruned = &m.models[7];
    assert_eq!((pruned.experts, pruned.top_k), (Some(1), Some(1)));
    assert_eq!(pruned.params, dense + c.num_hidden_layers * c.hidden_size);
    // Normalised accuracy recomputed from the table.
    let own: Vec<f64> = ["date", "reverse"]
        .iter()
        .map(|t| {
            m.models
                .iter()
                .find(|r| r.label == format!("expert {t}"))
                .unwrap()
                .test[*t]
        })
        .collect();
    for r in &m.models {
        let ratios: Vec<f64> = ["date", "reverse"]
            .iter()
            .zip(&own)
            .filter(|(_, o)| **o > 0.0)
            .map(|(t, o)| r.test[*t] / o)
            .collect();
        match r.normalised {
            Some(v) => {
                assert!((v - ratios.iter().sum::<f64>() / ratios.len() as f64).abs() < 1e-12)
            }
            None => assert!(ratios.is_empty()),
        }
        let mean = (r.test["date"] + r.test["reverse"]) / 2.0;
        assert!((r.test_mean - mean).abs() < 1e-12, "{}", r.label);
    }
    // Routing: each row a distribution; three mixtures.
    assert_eq!(m.routing.len(), 3);
    for r in &m.routing {
        for row in r.shares.iter().chain(&r.per_layer) {
            assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-9, "{}", r.model);
        }
        assert!(r.own_expert.iter().all(|x| (0.0..=1.0).contains(x)));
        assert_eq!(r.gate_max_cosine.len(), c.num_hidden_layers);
        assert!(
            r.gate_max_cosine
                .iter()
                .all(|x| (-1.0 - 1e-9..=1.0 + 1e-9).contains(x))
        );
    }
    // Compressions: to one expert every cluster holds both experts.
    assert_eq!(m.compressions.len(), 3);
    for cr in &m.compressions {
        assert_eq!(cr.experts, 1);
        assert!(cr.assignment.iter().all(|a| a.iter().all(|&x| x == 0)));
        for f in &cr.frequencies {
            assert!((f.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        }
    }
    assert_eq!(m.expert_similarity.len(), c.num_hidden_layers);
    // The saved mixture loads as a Mixtral model, and its own mergekit-moe
    // config run through `experiments merge-moe` gives it bit for bit.
    let saved = s2ft_core::Pretrained::load(&out.join("moe")).unwrap();
    assert_eq!(saved.config.moe.unwrap().num_local_experts, 2);
    let again = dir.path().join("again");
    experiments::moe::merge_moe(&out.join("configs/moe_hidden.yml"), &again, 0).unwrap();
    let rebuilt = weights::Checkpoint::open(&again)
        .unwrap()
        .load_all()
        .unwrap();
    assert_eq!(rebuilt.len(), saved.weights.len());
    for (name, t) in saved.weights.iter() {
        assert_eq!(rebuilt.get(name).unwrap().data, t.data, "{name}");
    }
}

#[test]
fn moe_study_names_bad_input_before_writing_a_report() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_hf_model(dir.path(), 512);
    let ft = dir.path().join("s2ft");
    experiments::studies::s2ft::run(&llm_args(&model, &ft)).unwrap();
    let out = dir.path().join("moe");
    type Change = Box<dyn Fn(&mut experiments::studies::moe::MoeArgs)>;
    let cases: Vec<(Change, &str)> = vec![
        (
            Box::new(|a| a.group = "lora r9".into()),
            "--group 'lora r9'",
        ),
        (
            Box::new(|a| a.experts_per_token = 3),
            "--experts-per-token 3",
        ),
        (
            Box::new(|a| a.keep = Some(vec![0.1])),
            "keeps 0 of 2 experts",
        ),
        (Box::new(|a| a.keep = Some(vec![1.5])), "--keep 1.5"),
        (
            Box::new(|a| a.gate_modes = Some(vec!["hiden".into()])),
            "unknown mode 'hiden'",
        ),
        (
            Box::new(|a| a.compress = Some(vec!["zip".into()])),
            "unknown method 'zip'",
        ),
        (Box::new(|a| a.rank = Some(0)), "--rank 0"),
        (Box::new(|a| a.model = None), "--model PATH is required"),
        (
            Box::new(|a| a.expert = vec!["sort=/nonexistent".into()]),
            "/nonexistent",
        ),
    ];
    for (change, want) in cases {
        let mut a = moe_args(&model, &ft, &out);
        change(&mut a);
        let e = format!("{:#}", experiments::studies::moe::run(&a).unwrap_err());
        assert!(e.contains(want), "{want}: {e}");
        assert!(!out.exists(), "{want}: a report folder was written");
    }
}

/// `experiments merge-moe` on mergekit-moe's own `hidden` fixture: our f32
/// forward pass gives mergekit's (bfloat16) gates to its rounding, and every
/// other tensor bit for bit.
#[test]
fn merge_moe_hidden_gates_match_mergekit_moe() {
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("../merge/tests/fixtures/moe");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("moe");
    experiments::moe::merge_moe(&fx.join("hidden.yml"), &out, 0).unwrap();
    let ours = weights::Checkpoint::open(&out).unwrap().load_all().unwrap();
    let theirs_dir = fx.join("out_hidden");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(theirs_dir.join("config.json")).unwrap())
            .unwrap();
    let cfg = weights::LlamaConfig::from_hf(&v).unwrap();
    let mut theirs = weights::Checkpoint::open(&theirs_dir)
        .unwrap()
        .load_all()
        .unwrap();
    weights::llama::unfuse_experts(&mut theirs, &cfg).unwrap();
    assert_eq!(ours.len(), theirs.len());
    // The f32 gates of the fixture (mergekit's formula on transformers' f32 hidden states).
    let fxj: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("hidden_states.json")).unwrap())
            .unwrap();
    for (name, t) in theirs.iter() {
        let o = ours.get(name).unwrap();
        if name.contains("block_sparse_moe.gate") {
            let l: usize = name.split('.').nth(2).unwrap().parse().unwrap();
            let dev = o
                .data
                .iter()
                .zip(t.data.iter())
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(dev < 1e-2, "{name}: {dev} from mergekit's bfloat16 gates");
            for (e, ex) in fxj["experts"].as_array().unwrap().iter().enumerate() {
                let want = ex["gate_f32"][l].as_array().unwrap();
                for (j, w) in want.iter().enumerate() {
                    let got = o.data[[e, j]];
                    assert!(
                        (got - w.as_f64().unwrap() as f32).abs() < 1e-5,
                        "{name}[{e},{j}]"
                    );
                }
            }
        } else {
            assert_eq!(o.data, t.data, "{name}");
        }
    }
    // transformers reads our folder as we do: its logits on it (written by
    // moe_ours_reference.py) equal our forward pass.
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("logits_ours_hidden.json")).unwrap())
            .unwrap();
    let p = s2ft_core::Pretrained::load(&out).unwrap();
    let m = s2ft_core::Llama::<s2ft_core::Cpu>::from_state_dict(
        &p.config,
        &p.weights,
        false,
        &Default::default(),
    )
    .unwrap();
    for pr in want["prompts"].as_array().unwrap() {
        let ids: Vec<i64> = pr["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect();
        let n = ids.len();
        let t = burn::tensor::Tensor::<s2ft_core::Cpu, 2, burn::tensor::Int>::from_data(
            burn::tensor::TensorData::new(ids, [1, n]),
            &Default::default(),
        );
        let got: Vec<f32> = m.forward(t).into_data().into_vec().unwrap();
        let rows = pr["logits"].as_array().unwrap();
        let mut worst = 0f32;
        for (i, row) in rows.iter().enumerate() {
            for (j, x) in row.as_array().unwrap().iter().enumerate() {
                worst = worst.max((got[i * 384 + j] - x.as_f64().unwrap() as f32).abs());
            }
        }
        assert!(
            worst < 1e-4,
            "{}: {worst} from transformers' logits",
            pr["name"]
        );
    }
}

#[test]
fn rws_study_patches_unpatches_and_stores_signatures_consistently() {
    use experiments::corrupt::Corruption;
    use experiments::studies::rws::{Net, RwsArgs, run};
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("rws");
    let args = RwsArgs {
        quick: true,
        alphas: vec![0.0, 0.5, 1.0],
        run: RunArgs::quiet_to(&out),
        ..Default::default()
    };
    run(&args).unwrap();
    assert!(!out.join("metrics.partial.json").exists());
    let m = metrics::<experiments::studies::rws::RwsMetrics>(&out).metrics;
    let nets = &m.nets;
    assert_eq!(nets.len(), 2);
    for r in nets {
        let n = match r.net {
            Net::Cnn => "cnn",
            Net::Mlp => "mlp",
        };
        for stem in [
            "layer_norms",
            "accuracy_vs_alpha",
            "accuracy_vs_k",
            "cosine",
            "storage",
        ] {
            check_png(&out.join(format!("{n}_{stem}.png")));
        }
        for csv in ["accuracy", "layer_norms", "sweeps", "cosine", "storage"] {
            assert!(out.join(format!("{n}_{csv}.csv")).is_file(), "{n}_{csv}");
        }
        let nl = r.layers.len();
        assert_eq!(nl, if n == "cnn" { 5 } else { 3 });
        // Removal is exact.
        let (exact, total) = r.removal_exact;
        assert_eq!(exact, total, "{n}");
        assert_eq!(total, r.params);
        for c in [Corruption::GaussianNoise, Corruption::Contrast] {
            let cn = c.name();
            let row = r
                .accuracy
                .iter()
                .find(|a| a.model == "mnist0" && a.corruption == c)
                .unwrap_or_else(|| panic!("{n} mnist0 {cn}"));
            let sweep = |alpha: f64, k: usize| {
                r.alpha_sweep
                    .iter()
                    .chain(&r.k_sweep)
                    .find(|x| x.corruption == c && x.alpha == alpha && x.k == k)
                    .unwrap_or_else(|| panic!("{n} {cn} α {alpha} k {k}"))
            };
            // α = 0 is the clean model; α = 1 on every layer is the
            // fine-tune (to one rounding of each weight: at most one test image).
            let s0 = sweep(0.0, nl);
            assert_eq!(s0.corrupted_acc, row.clean_on_corrupted, "{n} {cn}");
            assert_eq!(s0.clean_acc, row.clean_on_clean, "{n} {cn}");
            let s1 = sweep(1.0, nl);
            assert!(
                (s1.corrupted_acc - row.robust_on_corrupted).abs() <= 1.0 / 300.0 + 1e-9,
                "{n} {cn}"
            );
            assert!(
                (s1.clean_acc - row.robust_on_clean).abs() <= 1.0 / 300.0 + 1e-9,
                "{n} {cn}"
            );
            // The mnist0 → mnist0 "own" transfer is the same patch.
            let own = r
                .transfer
                .iter()
                .find(|t| t.target == "mnist0" && t.corruption == c)
                .unwrap_or_else(|| panic!("{n} {cn}: no mnist0 transfer"));
            assert_eq!(own.own_acc, Some(s1.corrupted_acc), "{n} {cn}");
            assert_eq!(own.target_acc, row.clean_on_corrupted, "{n} {cn}");
        }
        // Storage: all layers at f32 is the model's size; 8 bits is a bit
        // under 4× smaller (the scales); fewer layers, smaller.
        let st = |k: usize, bits: u8| {
            r.storage
                .iter()
                .find(|s| s.k == k && s.bits == bits)
                .unwrap_or_else(|| panic!("{n}: no storage row k {k} bits {bits}"))
                .compression
        };
        assert_eq!(st(nl, 32), 1.0);
        let c8 = st(nl, 8);
        assert!(c8 > 3.5 && c8 < 4.0, "{n}: {c8}");
        assert!(st(nl, 4) > 1.8 * c8);
        assert!(st(1, 4) > st(nl, 4));
        // Cosine matrix: symmetric with a unit diagonal, 3 sources × 2 corruptions.
        let cos = &r.cosine;
        assert_eq!(cos.len(), 6);
        for (i, row) in cos.iter().enumerate() {
            assert!((row[i] - 1.0).abs() < 1e-9);
            for (j, v) in row.iter().enumerate() {
                assert!((v - cos[j][i]).abs() < 1e-12);
            }
        }
        // Composition of the two: one pair, each accuracy alone equals the α = 1 row.
        assert_eq!(r.compose.len(), 1);
        // Layer norms: relative norms positive for every fine-tune layer.
        for row in &r.layer_rows {
            assert_eq!(row.relative.len(), nl);
            assert!(row.relative.iter().all(|v| *v > 0.0), "{row:?}");
        }
    }
    // Bad input is refused before training, naming the option.
    let bad = RwsArgs {
        quick: true,
        ks: vec![6],
        nets: vec![Net::Cnn],
        run: RunArgs::quiet_to(dir.path().join("bad")),
        ..Default::default()
    };
    let e = run(&bad).unwrap_err().to_string();
    assert!(e.contains("--ks") && e.contains("k = 6"), "{e}");
    assert!(!dir.path().join("bad").exists());
}

#[test]
fn pleas_study_zips_two_vggs_between_their_average_and_their_ensemble() {
    use experiments::studies::pleas::{PleasArch, PleasArgs, run};
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pleas-vgg");
    run(&PleasArgs {
        quick: true,
        arch: PleasArch::Vgg,
        ratios: vec![1.0, 0.5, 0.0],
        run: RunArgs::quiet_to(&out),
        ..Default::default()
    })
    .unwrap();
    check_png(&out.join("joint_accuracy_vs_size.png"));
    let m = metrics::<experiments::studies::pleas_cnn::Metrics>(&out).metrics;
    assert_eq!(m.arch, "vgg");
    let rows = &m.merges;
    assert_eq!(rows.len(), 6, "none and wm × three ratios");
    for r in rows {
        let (ratio, width) = (r.ratio, r.width);
        assert!((width - (2.0 - ratio)).abs() < 0.05, "{r:?}");
        // A VGG has no normalisation: every channel kept apart is its own
        // model's, so ratio 0 scores exactly as the ensemble.
        if ratio == 0.0 {
            let (z, e) = (&r.scores, &m.models.ensemble);
            for (k, zk, ek) in [
                ("joint_loss", z.joint_loss, e.joint_loss),
                ("joint_acc", z.joint_acc, e.joint_acc),
                ("task_a_acc", z.task_a_acc, e.task_a_acc),
                ("task_b_acc", z.task_b_acc, e.task_b_acc),
            ] {
                let d = (zk - ek).abs();
                assert!(d < 1e-4, "{k}: {z:?} vs {e:?}");
            }
            // The ensemble is a least-squares solution too: the solves keep it
            // (up to the small ridge).
            let d = (r.least_squares.joint_loss - e.joint_loss).abs();
            assert!(d < 1e-2, "{r:?}");
        }
        assert!(r.least_squares.joint_loss.is_finite());
    }
    assert!(m.matching_l2["wm"] < m.matching_l2["none"]);
}
