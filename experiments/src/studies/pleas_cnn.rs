//! `pleas --arch resnet|vgg`: partial merging of two image CNNs trained on
//! disjoint label sets (by default digits 0–4 and 5–9), through the
//! library's zip over their permutation specs ([`permute::zip`]).
//!
//! B is aligned to A (no matching or weight matching); in every group of the
//! spec (a ResNet's stage streams and block-internal channels, a VGG's
//! convolutions and hidden classifier units) the `ratio` most alike channel
//! pairs (cosine similarity of their aligned weights) are merged and the
//! others kept side by side, so the merged network is between one model's
//! width and two. The logits take each task's classes from the head trained
//! on them (`--head task`) or average both heads. A VGG has no normalisation,
//! so ratio 0 is exactly the ensemble; a ResNet's channel LayerNorm
//! normalises over the whole widened stream, mixing A's and B's channels, so
//! its ratio 0 is *not* the ensemble (the `pleas` MLP and LLaMA studies, and
//! `permute`'s tests on BatchNorm ResNets, show the exact case). Each zip is
//! then refined by PLeaS's per-layer least squares of every convolution and
//! classifier layer ([`permute::zip::least_squares`] with [`CnnProbe`]'s
//! im2col patches) on unlabelled training images (`--samples`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::ensure;
use indexmap::IndexMap;
use ndarray::Array2;
use permute::zip::{
    GroupPlan, LeastSquares, LeastSquaresOptions, Probe, ProbeError, Source, ZipOptions,
    plan_groups, zip,
};
use permute::{MatchOptions, PermutationSpec, apply, weight_matching};
use serde::Serialize;
use weights::StateDict;

use crate::data::{Split, default_mnist_dir, mnist};
use crate::plot::{Series, line_chart};
use crate::report::Run;
use crate::studies::lmc::{Arch, init_cnn, train_on};
use crate::studies::pleas::{
    CLASSES, Head, HeadArg, Matching, PleasArch, PleasArgs, Scores, labels_in, score_logits,
};

/// The sizes after `--quick` and the options.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Sizes {
    /// Stem width (ResNet stages w, 2w, 4w; VGG convolutions w, 2w, 2w).
    pub width: usize,
    /// Epochs per model.
    pub epochs: usize,
    /// Training images of both tasks together (at most; the data's count once loaded).
    pub train_images: usize,
    /// Test images scored (likewise).
    pub test_images: usize,
    /// Unlabelled training images (both tasks) of the least-squares solves.
    pub samples: usize,
    /// Relative ridge of the least-squares solves.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub ridge: f64,
}

/// One merged model.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Row {
    /// How B was aligned.
    pub matching: String,
    /// Fraction of each group's channel pairs merged.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub ratio: f64,
    /// Channels of the merged model ÷ one model's, over all groups.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub width: f64,
    /// Parameters ÷ one model's.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub params_ratio: f64,
    /// The zip's scores on the test images (merged pairs averaged).
    pub scores: Scores,
    /// The scores after PLeaS's per-layer least squares.
    pub least_squares: Scores,
    /// Seconds of the least-squares solves (with their forward passes).
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub least_squares_seconds: f64,
}

/// What `metrics.json` holds.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Metrics {
    /// `resnet` or `vgg`.
    pub arch: String,
    /// The sizes.
    pub sizes: Sizes,
    /// Task A's labels are below this.
    pub split: usize,
    /// `uniform` or `global`.
    pub allocation: String,
    /// A, B, and both side by side with the chosen head.
    pub models: crate::studies::pleas::Models,
    /// ‖A − P·B‖ per matching.
    pub matching_l2: IndexMap<String, f64>,
    /// Seconds each matching took.
    pub matching_seconds: IndexMap<String, f64>,
    /// Every merge.
    pub merges: Vec<Row>,
}

/// The options checked (before anything is written) and the sizes.
fn check(args: &PleasArgs) -> anyhow::Result<(Arch, Sizes)> {
    let arch = match args.arch {
        PleasArch::Resnet => Arch::Resnet,
        PleasArch::Vgg => Arch::Vgg,
        other => anyhow::bail!("pleas_cnn runs --arch resnet|vgg, not {other:?}"),
    };
    let name = arch.name();
    ensure!(
        args.steps.is_none(),
        "--steps applies to --arch llama; --arch {name} trains for --epochs"
    );
    ensure!(
        args.depth.is_none(),
        "--depth applies to the MLP; --arch {name} has a fixed depth"
    );
    ensure!(
        !args.matchings.contains(&Matching::Am),
        "--matchings am: activation matching is implemented for --arch mlp and llama; use none,wm with --arch {name}"
    );
    ensure!(
        !args.ratios.is_empty(),
        "--ratios: give at least one fraction"
    );
    for r in &args.ratios {
        permute::zip::check_ratio(*r).map_err(|e| anyhow::anyhow!("--ratios: {e}"))?;
    }
    ensure!(
        (1..CLASSES).contains(&args.split),
        "--split {}: must be between 1 and {} so both tasks have labels",
        args.split,
        CLASSES - 1
    );
    // The CNNs' CPU steps cost ~100× the MLP's: quick sizes are small.
    let (width, epochs, train_images, test_images, samples) = if args.quick {
        (4, 2, 1000, 200, 128)
    } else {
        (8, 3, usize::MAX, 2000, 256)
    };
    crate::studies::pleas::check_ridge(args.ridge)?;
    let sizes = Sizes {
        width: args.width.unwrap_or(width),
        epochs: args.epochs.unwrap_or(epochs),
        train_images,
        test_images,
        samples: args.samples.unwrap_or(samples),
        ridge: args.ridge,
    };
    ensure!(
        sizes.width > 0 && sizes.epochs > 0 && sizes.samples > 0,
        "--width, --epochs and --samples must be positive"
    );
    Ok((arch, sizes))
}

/// Logits of an image network's state dict on `x` (CPU, batches of 500).
fn logits(arch: Arch, sd: &StateDict, x: &Array2<f32>) -> anyhow::Result<Array2<f32>> {
    use crate::cnn::{Classifier, ResNet, Vgg};
    type Cpu = s2ft_core::Cpu;
    let dev = Default::default();
    let model: Box<dyn Classifier<Cpu>> = match arch {
        Arch::Resnet => Box::new(ResNet::<Cpu>::from_state_dict(sd, &dev)?),
        _ => {
            let v = Vgg::<Cpu>::from_state_dict(sd, &dev)?;
            v.check_input(x.ncols())?;
            Box::new(v)
        }
    };
    let mut rows = Vec::new();
    let mut classes = 0;
    for start in (0..x.nrows()).step_by(500) {
        let part = x.slice(ndarray::s![start..(start + 500).min(x.nrows()), ..]);
        let l = model.logits(crate::mlp::batch::<Cpu>(&part.to_owned(), &dev));
        classes = l.dims()[1];
        rows.extend(
            l.into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .expect("f32"),
        );
    }
    Ok(Array2::from_shape_vec((x.nrows(), classes), rows)?)
}

/// The `--head` option as a merge of the logits.
fn head_of(args: &PleasArgs) -> Head {
    match args.head {
        HeadArg::Task => Head::Split(args.split),
        HeadArg::Average => Head::Average,
    }
}

/// The output layer's tensors, mixed per class by the head in a zip.
fn head_mix(arch: Arch, a: &StateDict, head: Head) -> anyhow::Result<ZipOptions> {
    let prefix = match arch {
        Arch::Resnet => "fc".to_string(),
        _ => {
            let last = (0..)
                .take_while(|j| a.contains(&format!("classifier.{}.weight", 2 * j)))
                .count();
            format!("classifier.{}", 2 * (last - 1))
        }
    };
    let m = head.merge_matrix(CLASSES)?;
    let mix: Vec<[f64; 2]> = (0..CLASSES)
        .map(|c| [m[[c, c]], m[[c, CLASSES + c]]])
        .collect();
    Ok(ZipOptions {
        lookups: vec![],
        output_mix: ["weight", "bias"]
            .iter()
            .map(|w| (format!("{prefix}.{w}"), mix.clone()))
            .collect(),
    })
}

/// Trains A on task A's images and B on task B's (seeds `2·seed`, `2·seed + 1`).
fn train(
    arch: Arch,
    args: &PleasArgs,
    z: &Sizes,
    tasks: [&Split; 2],
    run: &mut Run,
) -> anyhow::Result<[StateDict; 2]> {
    let dev = run.device;
    let steps: usize = tasks.iter().map(|t| t.y.len().div_ceil(128)).sum();
    let bar = run.progress((steps * z.epochs) as u64);
    let side = (tasks[0].x.ncols() as f64).sqrt().round() as usize;
    ensure!(
        side * side == tasks[0].x.ncols(),
        "--arch {} needs square single-channel images; the data has {} pixels per image",
        arch.name(),
        tasks[0].x.ncols()
    );
    let out = run.phase("train", || -> anyhow::Result<[StateDict; 2]> {
        let one = |k: usize| -> anyhow::Result<StateDict> {
            let seed = 2 * args.seed + k as u64;
            let init = init_cnn(arch, z.width, side, seed)?;
            train_on(dev, arch, &init, tasks[k], z.epochs, seed, &bar)
        };
        Ok([one(0)?, one(1)?])
    })?;
    bar.finish_and_clear();
    Ok(out)
}

/// Runs `pleas --arch resnet|vgg`; returns the report folder.
pub fn run(args: &PleasArgs) -> anyhow::Result<PathBuf> {
    let (arch, mut z) = check(args)?;
    let mut run = args.run.open("pleas")?;
    let dir = args.data_dir.clone().unwrap_or_else(default_mnist_dir);
    let (train_set, test) = run.phase("load data", || mnist(&dir))?;
    let train_set = train_set.take(z.train_images);
    let test = test.take(z.test_images);
    (z.train_images, z.test_images) = (train_set.y.len(), test.y.len());
    let tasks = [
        labels_in(&train_set, 0..args.split),
        labels_in(&train_set, args.split..CLASSES),
    ];
    ensure!(
        tasks.iter().all(|t| !t.y.is_empty()) && test.y.iter().all(|&y| y < CLASSES),
        "{}: each task needs training images and the labels must be below {CLASSES}",
        dir.display()
    );
    let [a, b] = train(arch, args, &z, [&tasks[0], &tasks[1]], &mut run)?;
    // The least-squares samples: the first training images (both tasks, unlabelled).
    z.samples = z.samples.min(train_set.y.len());
    let probe = train_set.x.slice(ndarray::s![..z.samples, ..]).to_owned();
    let head = head_of(args);
    let (la, lb) = (logits(arch, &a, &test.x)?, logits(arch, &b, &test.x)?);
    let mut m = Metrics {
        arch: arch.name().to_string(),
        sizes: z,
        split: args.split,
        allocation: args.allocation.name().to_string(),
        models: crate::studies::pleas::Models {
            a: score_logits(&la, &test.y, args.split),
            b: score_logits(&lb, &test.y, args.split),
            ensemble: score_logits(&head.combine(&la, &lb)?, &test.y, args.split),
        },
        matching_l2: IndexMap::new(),
        matching_seconds: IndexMap::new(),
        merges: Vec::new(),
    };
    let spec = arch.spec(&a)?;
    for matching in args.matchings() {
        merges(
            (arch, matching),
            &spec,
            (&a, &b),
            args,
            (&test, &probe),
            &mut m,
            &mut run,
        )?;
    }
    plot(&run, &m, args)?;
    let md = report(&m, args, [&tasks[0], &tasks[1]]);
    run.finish(&m, &md)?;
    Ok(run.dir.clone())
}

/// One matching: B aligned, then A and the aligned B zipped at every ratio
/// and scored on the test images (rows appended to `m`, partial metrics written).
fn merges(
    (arch, matching): (Arch, Matching),
    spec: &PermutationSpec,
    (a, b): (&StateDict, &StateDict),
    args: &PleasArgs,
    (test, probe): (&Split, &Array2<f32>),
    m: &mut Metrics,
    run: &mut Run,
) -> anyhow::Result<()> {
    let opts = head_mix(arch, a, head_of(args))?;
    let score = |sd: &StateDict| -> anyhow::Result<Scores> {
        Ok(score_logits(
            &logits(arch, sd, &test.x)?,
            &test.y,
            args.split,
        ))
    };
    let t = Instant::now();
    let perm = run.phase(&format!("match {}", matching.name()), || {
        anyhow::Ok(match matching {
            Matching::Wm => {
                let o = MatchOptions {
                    seed: args.seed,
                    ..Default::default()
                };
                weight_matching(spec, a, b, &o)?.perm
            }
            _ => spec.identity(),
        })
    })?;
    m.matching_seconds
        .insert(matching.name().to_string(), t.elapsed().as_secs_f64());
    let bp = apply(spec, &perm, b)?;
    m.matching_l2.insert(
        matching.name().to_string(),
        permute::matching::l2_distance(a, &bp),
    );
    let mut solver = LeastSquares::new(spec, a, &bp);
    let mut cnn_probe = CnnProbe { arch, x: probe };
    let steps = least_squares_steps(arch, a, probe)?;
    for &ratio in &args.ratios {
        let merged = run.phase(&format!("zip {} {ratio}", matching.name()), || {
            merge(spec, (a, &bp), ratio, args, &opts)
        })?;
        let t = Instant::now();
        let ls = run.phase(
            &format!("least squares {} {ratio}", matching.name()),
            || {
                let o = LeastSquaresOptions {
                    steps: steps.clone(),
                    ridge: args.ridge,
                };
                solver.merge(&merged.2, &opts, &o, &mut cnn_probe)
            },
        )?;
        let least_squares_seconds = t.elapsed().as_secs_f64();
        m.merges.push(Row {
            matching: matching.name().to_string(),
            ratio,
            width: merged.1,
            params_ratio: merged.0.numel() as f64 / a.numel() as f64,
            scores: score(&merged.0)?,
            least_squares: score(&ls)?,
            least_squares_seconds,
        });
        run.partial(&*m)?;
    }
    Ok(())
}

/// A and the aligned B zipped at `ratio` (the most alike channel pairs of
/// each group merged), the merged channels ÷ one model's, and the plan.
fn merge(
    spec: &PermutationSpec,
    (a, bp): (&StateDict, &StateDict),
    ratio: f64,
    args: &PleasArgs,
    opts: &ZipOptions,
) -> anyhow::Result<(StateDict, f64, IndexMap<String, GroupPlan>)> {
    let sims = permute::many::pair_similarities(spec, &spec.identity(), a, bp)?;
    let units: Vec<(String, Vec<usize>, Vec<f64>)> = spec
        .groups
        .iter()
        .map(|g| {
            (
                g.name.clone(),
                (0..g.blocks).collect(),
                sims[&g.name].clone(),
            )
        })
        .collect();
    let plan = plan_groups(&units, ratio, args.allocation)?;
    let z = zip(spec, a, bp, &plan, opts)?;
    let (wide, one): (usize, usize) = plan
        .values()
        .map(|p| (p.width(), p.source_width()))
        .fold((0, 0), |(x, y), (p, q)| (x + p, y + q));
    Ok((z, wide as f64 / one.max(1) as f64, plan))
}

/// The [`Probe`] of an image CNN on images `x`: every convolution's im2col
/// patches and the classifier layers' inputs from a CPU forward pass
/// ([`crate::cnn::Tapped::layer_inputs`] of the ResNet and the VGG).
pub struct CnnProbe<'x> {
    /// The network.
    pub arch: Arch,
    /// Images as rows.
    pub x: &'x Array2<f32>,
}

impl CnnProbe<'_> {
    /// Every layer's input on the images, in forward order.
    fn layer_inputs(&self, sd: &StateDict) -> anyhow::Result<Vec<crate::cnn::LayerInput>> {
        use crate::cnn::{ResNet, Tapped, Vgg};
        type Cpu = s2ft_core::Cpu;
        let dev = Default::default();
        let x = crate::mlp::batch::<Cpu>(self.x, &dev);
        Ok(match self.arch {
            Arch::Resnet => ResNet::<Cpu>::from_state_dict(sd, &dev)?.layer_inputs(x),
            _ => {
                let v = Vgg::<Cpu>::from_state_dict(sd, &dev)?;
                v.check_input(self.x.ncols())?;
                v.layer_inputs(x)
            }
        })
    }
}

impl Probe for CnnProbe<'_> {
    fn inputs(
        &mut self,
        _: Source,
        sd: &StateDict,
        weight: &str,
    ) -> Result<Array2<f64>, ProbeError> {
        let found = self
            .layer_inputs(sd)?
            .into_iter()
            .find(|l| l.weight == weight)
            .ok_or_else(|| {
                format!(
                    "'{weight}' is not a convolution or classifier layer of the {}",
                    self.arch.name()
                )
            })?;
        Ok(found.x.mapv(f64::from))
    }
}

/// The least-squares steps of a CNN: every convolution and classifier layer,
/// one at a time, in the order a forward pass of `sd` on one image reaches them.
pub fn least_squares_steps(
    arch: Arch,
    sd: &StateDict,
    x: &Array2<f32>,
) -> anyhow::Result<Vec<Vec<String>>> {
    let one = x.slice(ndarray::s![..1, ..]).to_owned();
    let probe = CnnProbe { arch, x: &one };
    Ok(probe
        .layer_inputs(sd)?
        .into_iter()
        .map(|l| vec![l.weight])
        .collect())
}

fn plot(run: &Run, m: &Metrics, args: &PleasArgs) -> anyhow::Result<()> {
    let mut series = Vec::new();
    for mt in args.matchings() {
        for (method, pick) in [
            ("zip", (|r: &Row| r.scores.joint_acc) as fn(&Row) -> f64),
            ("least squares", |r: &Row| r.least_squares.joint_acc),
        ] {
            let mut pts: Vec<(f64, f64)> = m
                .merges
                .iter()
                .filter(|r| r.matching == mt.name())
                .map(|r| (r.width, pick(r)))
                .collect();
            pts.sort_by(|x, y| x.0.total_cmp(&y.0));
            series.push(Series::line(format!("{} {method}", mt.name()), pts));
        }
    }
    let s = &m.models;
    series.push(Series::dots(
        "A, B alone",
        vec![(1.0, s.a.joint_acc), (1.0, s.b.joint_acc)],
    ));
    series.push(Series::dots("ensemble", vec![(2.0, s.ensemble.joint_acc)]));
    line_chart(
        &run.dir.join("joint_accuracy_vs_size"),
        &format!("{}: accuracy on all 10 classes vs merged width", m.arch),
        "merged channels (× one model's)",
        "accuracy",
        &series,
    )
}

fn report(m: &Metrics, args: &PleasArgs, tasks: [&Split; 2]) -> String {
    let z = &m.sizes;
    let what = if m.arch == "resnet" {
        "ResNets (channel LayerNorm; stages w, 2w, 4w)"
    } else {
        "VGG-style CNNs (convolutions w, 2w, 2w)"
    };
    let mut md = format!(
        "# Partial merging of two {what} (ZipIt!/PLeaS zip)\n\n\
         Width {}; model A trained on labels 0–{} ({} images), model B on {}–9 ({} images), {} epoch(s) each; \
         scored on {} test images. In every group the most alike fraction `ratio` of channel pairs (after aligning B) \
         is merged, the rest kept side by side (allocation {}). *zip* averages each merged pair; *least squares* (PLeaS) then \
         solves every convolution and classifier layer in turn, so that fed the merged model's own inputs it reproduces the zip of \
         both models' outputs on {} unlabelled training images (ridge {}).\n\n\
         | model | joint acc | task A acc | task B acc | joint loss |\n|---|---|---|---|---|\n",
        z.width,
        args.split - 1,
        tasks[0].y.len(),
        args.split,
        tasks[1].y.len(),
        z.epochs,
        z.test_images,
        m.allocation,
        z.samples,
        z.ridge
    );
    for (name, s) in [
        ("A", &m.models.a),
        ("B", &m.models.b),
        ("ensemble", &m.models.ensemble),
    ] {
        md.push_str(&format!(
            "| {name} | {:.3} | {:.3} | {:.3} | {:.3} |\n",
            s.joint_acc, s.task_a_acc, s.task_b_acc, s.joint_loss
        ));
    }
    md.push_str("\n| matching | ratio | width | params ÷ one model | zip: joint acc | zip: task A / B acc | zip: joint loss | LS: joint acc | LS: task A / B acc | LS: joint loss | LS seconds |\n|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in &m.merges {
        let (s, l) = (&r.scores, &r.least_squares);
        md.push_str(&format!(
            "| {} | {} | {:.2} | {:.2} | {:.3} | {:.3} / {:.3} | {:.3} | {:.3} | {:.3} / {:.3} | {:.3} | {:.1} |\n",
            r.matching,
            r.ratio,
            r.width,
            r.params_ratio,
            s.joint_acc,
            s.task_a_acc,
            s.task_b_acc,
            s.joint_loss,
            l.joint_acc,
            l.task_a_acc,
            l.task_b_acc,
            l.joint_loss,
            r.least_squares_seconds
        ));
    }
    if m.arch == "resnet" {
        md.push_str("\nThe ResNet's channel LayerNorm normalises over the whole widened stream, so a merge that keeps channels apart mixes A's and B's channels in every norm: ratio 0 is not the ensemble.\n");
    } else {
        md.push_str("\nThe VGG has no normalisation: ratio 0 is the ensemble exactly.\n");
    }
    md.push_str("\n![accuracy vs width](joint_accuracy_vs_size.png)\n");
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn images(n: usize, seed: u64) -> Array2<f32> {
        let mut rng = weights::rng::Rng::new(seed);
        Array2::from_shape_fn((n, 784), |_| rng.uniform() as f32)
    }

    /// A random width-4 network of `arch` for 28 × 28 images.
    fn init(arch: Arch, seed: u64) -> StateDict {
        match arch {
            Arch::Vgg => {
                let s = crate::studies::lmc::vgg_shape(4, 28, 16);
                crate::cnn::init_vgg(&s, seed).unwrap()
            }
            _ => crate::cnn::init_state_dict(1, 4, CLASSES, seed),
        }
    }

    fn max_abs(x: &Array2<f32>) -> f32 {
        x.iter().fold(0f32, |m, v| m.max(v.abs()))
    }

    /// Least squares through the CNN probe: a network merged whole with
    /// itself is found again (its convolutions solved from their im2col
    /// patches, stride-2 ones included, give its logits back), and the
    /// VGG's ratio 0, which the zip makes its ensemble exactly, stays it.
    #[test]
    fn least_squares_finds_a_cnn_again_and_keeps_the_vgg_ensemble() {
        let x = images(40, 3);
        for arch in [Arch::Vgg, Arch::Resnet] {
            let (a, b) = (init(arch, 1), init(arch, 2));
            let spec = arch.spec(&a).unwrap();
            let steps = least_squares_steps(arch, &a, &x).unwrap();
            let convs = steps
                .iter()
                .filter(|s| a.get(&s[0]).unwrap().shape().len() == 4)
                .count();
            assert!(convs >= 3 && steps.len() > convs, "{arch:?}: {steps:?}");
            let args = PleasArgs::default();
            let opts = head_mix(arch, &a, Head::Average).unwrap();
            let o = LeastSquaresOptions {
                steps: steps.clone(),
                ridge: 1e-12,
            };
            let mut probe = CnnProbe { arch, x: &x };
            let (_, _, plan) = merge(&spec, (&a, &a), 1.0, &args, &opts).unwrap();
            let got = LeastSquares::new(&spec, &a, &a)
                .merge(&plan, &opts, &o, &mut probe)
                .unwrap();
            // Channels a ReLU leaves dead on these images leave the weights
            // free there: compare functions, and the stem's weights, whose
            // patches (raw pixels) have full rank.
            let la = logits(arch, &a, &x).unwrap();
            let d = max_abs(&(logits(arch, &got, &x).unwrap() - &la));
            assert!(d < 1e-3 * max_abs(&la).max(1.0), "{arch:?}: {d}");
            let (t, g) = (a.get(&steps[0][0]).unwrap(), got.get(&steps[0][0]).unwrap());
            let d = (&t.data - &g.data).iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(d < 1e-3, "{arch:?} {}: {d}", steps[0][0]);
            if arch == Arch::Vgg {
                let head = Head::Split(5);
                let task = head_mix(arch, &a, head).unwrap();
                let (la, lb) = (logits(arch, &a, &x).unwrap(), logits(arch, &b, &x).unwrap());
                let ensemble = head.combine(&la, &lb).unwrap();
                let (_, _, plan) = merge(&spec, (&a, &b), 0.0, &args, &task).unwrap();
                let z = LeastSquares::new(&spec, &a, &b)
                    .merge(&plan, &task, &o, &mut probe)
                    .unwrap();
                let d = max_abs(&(logits(arch, &z, &x).unwrap() - &ensemble));
                assert!(d < 1e-3 * max_abs(&ensemble).max(1.0), "VGG ratio 0: {d}");
            }
        }
    }

    /// The zip spans the ensemble and the aligned average on both CNNs: at
    /// ratio 1 every tensor is the mean of A's and the aligned B's (head
    /// averaged); at ratio 0 the VGG's logits are the ensemble's (each task's
    /// classes from its own model), while the ResNet's widened channel
    /// LayerNorm mixes the two models, so its ratio-0 logits are not; every
    /// partial merge loads (stream and block-internal groups widened by
    /// different amounts) and gives finite logits.
    #[test]
    fn zip_spans_the_aligned_average_and_for_the_vgg_the_ensemble() {
        let x = images(16, 1);
        for arch in [Arch::Vgg, Arch::Resnet] {
            let (a, b) = (init(arch, 1), init(arch, 2));
            let spec = arch.spec(&a).unwrap();
            let wm = weight_matching(&spec, &a, &b, &MatchOptions::default()).unwrap();
            let bp = apply(&spec, &wm.perm, &b).unwrap();
            let args = PleasArgs::default();
            let avg = head_mix(arch, &a, Head::Average).unwrap();
            let (z, width, _) = merge(&spec, (&a, &bp), 1.0, &args, &avg).unwrap();
            assert_eq!(width, 1.0);
            let mean = permute::many::mean(&[a.clone(), bp.clone()]).unwrap();
            for (name, t) in mean.iter() {
                let d = (&t.data - &z.get(name).unwrap().data)
                    .iter()
                    .fold(0f32, |m, v| m.max(v.abs()));
                assert!(d < 1e-6, "{arch:?} {name}: {d}");
            }
            let head = Head::Split(5);
            let task = head_mix(arch, &a, head).unwrap();
            let (la, lb) = (logits(arch, &a, &x).unwrap(), logits(arch, &b, &x).unwrap());
            let ensemble = head.combine(&la, &lb).unwrap();
            let (z, width, _) = merge(&spec, (&a, &bp), 0.0, &args, &task).unwrap();
            assert_eq!(width, 2.0);
            let d = max_abs(&(logits(arch, &z, &x).unwrap() - &ensemble));
            let scale = max_abs(&ensemble);
            match arch {
                Arch::Vgg => assert!(d < 1e-4 * scale.max(1.0), "VGG ratio 0: {d}"),
                _ => assert!(d > 1e-3 * scale, "ResNet ratio 0 equals the ensemble: {d}"),
            }
            let (z, width, _) = merge(&spec, (&a, &bp), 0.5, &args, &task).unwrap();
            assert!(width > 1.0 && width < 2.0, "{width}");
            assert!(logits(arch, &z, &x).unwrap().iter().all(|v| v.is_finite()));
        }
    }

    /// Options the CNNs cannot take are refused by name before anything runs.
    #[test]
    fn options_for_other_architectures_are_named_errors() {
        let base = PleasArgs {
            arch: PleasArch::Vgg,
            ..Default::default()
        };
        assert_eq!(base.matchings(), [Matching::None, Matching::Wm]);
        for (bad, flag) in [
            (
                PleasArgs {
                    matchings: vec![Matching::Am],
                    ..base.clone()
                },
                "--matchings am",
            ),
            (
                PleasArgs {
                    steps: Some(3),
                    ..base.clone()
                },
                "--steps",
            ),
            (
                PleasArgs {
                    depth: Some(3),
                    ..base.clone()
                },
                "--depth",
            ),
            (
                PleasArgs {
                    samples: Some(0),
                    ..base.clone()
                },
                "--samples",
            ),
            (
                PleasArgs {
                    ridge: f64::NAN,
                    ..base.clone()
                },
                "--ridge",
            ),
            (
                PleasArgs {
                    ratios: vec![1.5],
                    ..base.clone()
                },
                "--ratios",
            ),
        ] {
            let e = check(&bad).unwrap_err().to_string();
            assert!(e.contains(flag), "{flag}: {e}");
        }
    }
}
