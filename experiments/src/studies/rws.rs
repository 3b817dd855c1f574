//! `rws`: Robust Weight Signatures (Ruan et al., ICML 2023) on MNIST and
//! Fashion-MNIST. A clean model is fine-tuned on corrupted images (and, as
//! a contrast, trained from scratch on them); the weight difference is the
//! corruption's signature. The study asks the paper's four questions:
//! where the signature lives (per-layer relative norms, stable ranks), how
//! specific and consistent it is (cosines across corruptions, seeds —
//! raw and after re-basin alignment — and datasets), whether it patches
//! robustness in and out (α and depth sweeps, bit-exact removal,
//! composition, transfer to other clean models) and how small it can be
//! stored (first k layers at 8 and 4 bits).

use std::path::PathBuf;

use merge::rws::{Patched, Signature};
use serde::Serialize;
use weights::StateDict;

use crate::cnn::VggShape;
use crate::corrupt::{Corruption, corrupt};
use crate::data::{Split, default_mnist_dir, mnist};
use crate::device::Device;
use crate::mlp;
use crate::plot::{Series, heatmap, line_chart};
use crate::report::{Run, RunArgs};
use crate::studies::lmc::{Arch, vgg_shape};

/// The networks the study patches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Net {
    /// VGG-style CNN ([`crate::cnn::Vgg`]): three 3×3 convolutions, two
    /// max-pools, a two-layer classifier.
    Cnn,
    /// ReLU MLP ([`crate::mlp`]).
    Mlp,
}

/// Options.
#[derive(Clone, Debug, clap::Args)]
pub struct RwsArgs {
    /// Tiny size for tests (CNN 4/8/8 channels, MLP 32×2, 1000 training and
    /// 300 test images, two epochs, two corruptions).
    #[arg(long)]
    pub quick: bool,
    /// Networks (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Net::Cnn, Net::Mlp])]
    pub nets: Vec<Net>,
    /// Corruptions (comma-separated: gaussian_noise, shot_noise,
    /// impulse_noise, gaussian_blur, contrast, brightness, rotate; default
    /// all, or gaussian_noise,contrast with `--quick`).
    #[arg(long, value_delimiter = ',')]
    pub corruptions: Vec<String>,
    /// Severity of the corrupted training and test data (1–5).
    #[arg(long, default_value_t = 5)]
    pub severity: u8,
    /// Epochs of the clean and from-scratch models (default 5; 2 with `--quick`).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Epochs of each fine-tune on corrupted data (default 1).
    #[arg(long)]
    pub ft_epochs: Option<usize>,
    /// Seed of the first model (the second MNIST model uses seed + 1).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// MNIST idx folder (default: the vendored MNIST-10k).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Fashion-MNIST idx folder (default: the vendored Fashion-MNIST-10k).
    #[arg(long)]
    pub fashion_dir: Option<PathBuf>,
    /// Patch coefficients α of the α sweep (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0])]
    pub alphas: Vec<f64>,
    /// Depths k of the storage table (comma-separated; default every layer).
    #[arg(long, value_delimiter = ',')]
    pub ks: Vec<usize>,
    /// Device, report folder, progress.
    #[command(flatten)]
    pub run: RunArgs,
}

impl Default for RwsArgs {
    fn default() -> Self {
        RwsArgs {
            quick: false,
            nets: vec![Net::Cnn, Net::Mlp],
            corruptions: Vec::new(),
            severity: 5,
            epochs: None,
            ft_epochs: None,
            seed: 0,
            data_dir: None,
            fashion_dir: None,
            alphas: vec![0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0],
            ks: Vec::new(),
            run: RunArgs::default(),
        }
    }
}

/// Sizes after `--quick` and explicit options.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Plan {
    /// Corruptions studied.
    pub corruptions: Vec<Corruption>,
    /// Their severity.
    pub severity: u8,
    /// Clean / scratch epochs.
    pub epochs: usize,
    /// Fine-tune epochs.
    pub ft_epochs: usize,
    /// Training images used per dataset (all when `None`).
    pub train_n: Option<usize>,
    /// Test images per dataset (all when `None`).
    pub test_n: Option<usize>,
    /// CNN shape.
    pub cnn: VggShape,
    /// MLP layer sizes.
    pub mlp: Vec<usize>,
}

impl RwsArgs {
    /// Checks every option and fixes the sizes: unknown corruptions,
    /// severities, non-finite α and depths beyond the network are named
    /// errors here, before anything trains.
    pub fn plan(&self) -> anyhow::Result<Plan> {
        let corruptions: Vec<Corruption> = if self.corruptions.is_empty() {
            if self.quick {
                vec![Corruption::GaussianNoise, Corruption::Contrast]
            } else {
                Corruption::ALL.to_vec()
            }
        } else {
            let mut v = Vec::new();
            for c in &self.corruptions {
                let c =
                    Corruption::from_name(c).map_err(|e| anyhow::anyhow!("--corruptions: {e}"))?;
                if !v.contains(&c) {
                    v.push(c);
                }
            }
            v
        };
        anyhow::ensure!(
            !self.nets.is_empty(),
            "--nets: name at least one of cnn, mlp"
        );
        corruptions[0]
            .parameter(self.severity)
            .map_err(|e| anyhow::anyhow!("--severity: {e}"))?;
        if let Some(a) = self.alphas.iter().find(|a| !a.is_finite()) {
            anyhow::bail!("--alphas: α = {a} is not a finite number");
        }
        anyhow::ensure!(!self.alphas.is_empty(), "--alphas: give at least one α");
        let epochs = self.epochs.unwrap_or(if self.quick { 2 } else { 5 });
        let ft_epochs = self.ft_epochs.unwrap_or(1);
        anyhow::ensure!(
            epochs > 0 && ft_epochs > 0,
            "--epochs and --ft-epochs must be positive"
        );
        let cnn = if self.quick {
            vgg_shape(4, 28, 16)
        } else {
            vgg_shape(8, 28, 64)
        };
        let mlp = if self.quick {
            mlp::layer_sizes(784, 32, 2, 10)
        } else {
            mlp::layer_sizes(784, 256, 3, 10)
        };
        for net in &self.nets {
            let layers = match net {
                Net::Cnn => cnn.layer_names().len(),
                Net::Mlp => mlp.len() - 1,
            };
            if let Some(k) = self.ks.iter().find(|&&k| k == 0 || k > layers) {
                anyhow::bail!(
                    "--ks: k = {k} layers, but the {net:?} has {layers} (k must be 1 to {layers})"
                );
            }
        }
        Ok(Plan {
            corruptions,
            severity: self.severity,
            epochs,
            ft_epochs,
            train_n: self.quick.then_some(1000),
            test_n: self.quick.then_some(300),
            cnn,
            mlp,
        })
    }
}

/// A dataset with its corrupted copies.
struct Data {
    train: Split,
    test: Split,
    /// Per corruption: (train, test).
    corrupted: Vec<(Split, Split)>,
}

fn load(dir: &std::path::Path, plan: &Plan, seed: u64) -> anyhow::Result<Data> {
    let (train, test) = mnist(dir)?;
    anyhow::ensure!(
        train.x.ncols() == 784 && test.x.ncols() == 784,
        "{}: the rws study needs 28×28 grey images; these have {} pixels",
        dir.display(),
        train.x.ncols()
    );
    let train = train.take(plan.train_n.unwrap_or(usize::MAX));
    let test = test.take(plan.test_n.unwrap_or(usize::MAX));
    let corrupted = plan
        .corruptions
        .iter()
        .map(|&c| {
            Ok((
                corrupt(&train, c, plan.severity, seed.wrapping_mul(2))?,
                corrupt(&test, c, plan.severity, seed.wrapping_mul(2) + 1)?,
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(Data {
        train,
        test,
        corrupted,
    })
}

fn default_fashion_dir() -> PathBuf {
    let mnist = default_mnist_dir();
    mnist.with_file_name("fashion-mnist-10k")
}

impl Net {
    fn init(self, plan: &Plan, seed: u64) -> anyhow::Result<StateDict> {
        match self {
            Net::Cnn => crate::cnn::init_vgg(&plan.cnn, seed),
            Net::Mlp => Ok(mlp::init_state_dict(&plan.mlp, seed)),
        }
    }

    /// The `lmc` architecture it is.
    fn arch(self) -> Arch {
        match self {
            Net::Cnn => Arch::Vgg,
            Net::Mlp => Arch::Mlp,
        }
    }

    /// Accuracy of `sd` on `data` (CPU).
    fn accuracy(self, sd: &StateDict, data: &Split) -> anyhow::Result<f64> {
        Ok(self.arch().evaluate(sd, data)?.1)
    }

    fn spec(self, sd: &StateDict) -> anyhow::Result<permute::PermutationSpec> {
        self.arch().spec(sd)
    }

    fn name(self) -> &'static str {
        match self {
            Net::Cnn => "cnn",
            Net::Mlp => "mlp",
        }
    }
}

/// Trains on `dev` with Adam (lr 1e-3, batch 64).
fn train_on(
    dev: Device,
    net: Net,
    init: &StateDict,
    data: &Split,
    epochs: usize,
    seed: u64,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<StateDict> {
    crate::studies::lmc::train_batched_on(dev, net.arch(), init, data, (epochs, 64), seed, bar)
}

/// A clean model, its fine-tunes per corruption and their signatures.
struct Source {
    data: usize,
    clean: StateDict,
    signatures: Vec<Signature>,
}

/// Per-layer relative norms of one signature.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct LayerRow {
    /// Which signature (`mnist0/gaussian_noise`, `scratch/…`, `clean-ft`).
    pub signature: String,
    /// ‖δ_l‖/‖W_l‖ per layer.
    pub relative: Vec<f64>,
    /// Stable rank ‖δ_l‖²_F/σ₁² of each layer's weight (reshaped `[out, rest]`).
    pub stable_rank: Vec<f64>,
}

/// One point of the α or k sweep.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct SweepRow {
    /// Corruption.
    pub corruption: Corruption,
    /// α.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub alpha: f64,
    /// Layers patched (from the input).
    pub k: usize,
    /// Accuracy on the corrupted test images.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub corrupted_acc: f64,
    /// Accuracy on the clean test images.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub clean_acc: f64,
}

/// A patch of several signatures at once.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct ComposeRow {
    /// The signatures added (α = 1 each).
    pub corruptions: Vec<Corruption>,
    /// Per corruption of the set: accuracy on its test images with all patches.
    pub together: Vec<f64>,
    /// … with its own patch alone.
    pub alone: Vec<f64>,
    /// Clean test accuracy with all patches.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub clean_acc: f64,
}

/// A signature moved to another clean model.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct TransferRow {
    /// Target model.
    pub target: String,
    /// Where the signature came from.
    pub from: String,
    /// Corruption.
    pub corruption: Corruption,
    /// Target alone on the corrupted test images of its dataset.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub target_acc: f64,
    /// Target + the transferred signature.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub patched_acc: f64,
    /// Target + its own signature (the in-place reference), when it has one.
    pub own_acc: Option<f64>,
    /// Clean accuracy of the patched target.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub patched_clean_acc: f64,
}

/// A stored signature.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct StorageRow {
    /// First k layers.
    pub k: usize,
    /// 32 (f32), 8 or 4.
    pub bits: u8,
    /// Bytes (mean over corruptions; equal for all).
    pub bytes: usize,
    /// Full model bytes (f32) ÷ these bytes.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub compression: f64,
    /// Mean corrupted-test accuracy of the patched model over corruptions.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub corrupted_acc: f64,
    /// Mean clean-test accuracy.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub clean_acc: f64,
}

/// Cosine summaries.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct CosineSummary {
    /// On which tensors (`all layers` or the first layer).
    pub scope: String,
    /// Mean over corruptions of cos(MNIST seed 0, MNIST seed 1), raw.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub same_corruption_other_seed_raw: f64,
    /// … after aligning seed 1 to seed 0 by weight matching.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub same_corruption_other_seed_aligned: f64,
    /// … cos(MNIST seed 0, Fashion seed 0) (same initialisation).
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub same_corruption_other_dataset: f64,
    /// Mean over pairs of different corruptions of one model.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub different_corruptions: f64,
    /// Mean cos(signature, the clean fine-tune's delta).
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub vs_clean_finetune: f64,
    /// Mean over pairs of different corruptions of the signatures net of
    /// the clean fine-tune's delta.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub different_corruptions_net: f64,
    /// Nearest-neighbour identification of the corruption of seed 1
    /// (aligned) and Fashion signatures among seed 0's: hits / tries.
    pub identified: (usize, usize),
}

/// One network's results.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct NetResult {
    /// Which network.
    pub net: Net,
    /// Its layers, input first.
    pub layers: Vec<String>,
    /// Parameters.
    pub params: usize,
    /// Per model (mnist0, mnist1, fashion0) × corruption: clean model and
    /// fine-tune accuracy on clean and corrupted test data.
    pub accuracy: Vec<AccRow>,
    /// Per-layer norms and stable ranks.
    pub layer_rows: Vec<LayerRow>,
    /// Stable rank of each clean layer (MNIST seed 0).
    pub clean_stable_rank: Vec<f64>,
    /// Signature labels of the cosine matrix.
    pub cosine_labels: Vec<String>,
    /// Cosine matrix over all layers.
    pub cosine: Vec<Vec<f64>>,
    /// Summaries.
    pub cosine_summary: Vec<CosineSummary>,
    /// α sweep (k = all).
    pub alpha_sweep: Vec<SweepRow>,
    /// Depth sweep (α = 1).
    pub k_sweep: Vec<SweepRow>,
    /// Removal: elements restored bit for bit / elements, over all corruptions.
    pub removal_exact: (usize, usize),
    /// Composition.
    pub compose: Vec<ComposeRow>,
    /// Transfer.
    pub transfer: Vec<TransferRow>,
    /// Storage.
    pub storage: Vec<StorageRow>,
}

/// Accuracies of one clean model and its fine-tune.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct AccRow {
    /// mnist0, mnist1, fashion0 or scratch.
    pub model: String,
    /// Corruption.
    pub corruption: Corruption,
    /// Clean model on clean test data.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub clean_on_clean: f64,
    /// Clean model on corrupted test data.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub clean_on_corrupted: f64,
    /// Robust (fine-tuned or scratch) model on clean test data.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub robust_on_clean: f64,
    /// Robust model on corrupted test data.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub robust_on_corrupted: f64,
}

/// What `metrics.partial.json` holds while the networks run.
#[derive(Serialize)]
struct RwsPartial<'a> {
    nets: &'a [NetResult],
}

/// The study's `metrics.json`.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct RwsMetrics {
    /// Sizes.
    pub plan: Plan,
    /// Per network.
    pub nets: Vec<NetResult>,
}

fn stable_rank(t: &weights::Tensor) -> anyhow::Result<f64> {
    let rows = t.shape()[0];
    let m = t
        .data
        .view()
        .into_shape_with_order((rows, t.data.len() / rows))?
        .mapv(|v| v as f64);
    let s = spectra::linalg::singular_values(m.view(), "rws layer")?;
    let top = s.first().copied().unwrap_or(0.0);
    let fro: f64 = s.iter().map(|v| v * v).sum();
    Ok(if top > 0.0 { fro / (top * top) } else { 0.0 })
}

/// Stable rank of each layer's weight (its first ≥ 2-D tensor).
fn layer_stable_ranks(sd: &StateDict, layers: &[String]) -> anyhow::Result<Vec<f64>> {
    layers
        .iter()
        .map(|l| {
            let w = sd
                .get(&format!("{l}.weight"))
                .ok_or_else(|| anyhow::anyhow!("'{l}.weight' is missing"))?;
            stable_rank(w)
        })
        .collect()
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Runs the study; returns the report folder.
pub fn run(args: &RwsArgs) -> anyhow::Result<PathBuf> {
    let plan = args.plan()?;
    let mut run = args.run.open("rws")?;
    let mnist_dir = args.data_dir.clone().unwrap_or_else(default_mnist_dir);
    let fashion_dir = args.fashion_dir.clone().unwrap_or_else(default_fashion_dir);
    let datasets = run.phase("load and corrupt data", || -> anyhow::Result<Vec<Data>> {
        Ok(vec![
            load(&mnist_dir, &plan, args.seed)?,
            load(&fashion_dir, &plan, args.seed)?,
        ])
    })?;
    let mut md = format!(
        "# Robust weight signatures\n\nCorruptions at severity {}: {}. Clean models trained {} epoch(s), fine-tuned {} epoch(s) on each corrupted training set (Adam, lr 1e-3, batch 64); {} training and {} test images per dataset.\n",
        plan.severity,
        plan.corruptions
            .iter()
            .map(|c| c.name())
            .collect::<Vec<_>>()
            .join(", "),
        plan.epochs,
        plan.ft_epochs,
        datasets[0].train.y.len(),
        datasets[0].test.y.len(),
    );
    let mut nets = Vec::new();
    for &net in &args.nets {
        let ctx = Ctx {
            net,
            args,
            plan: &plan,
            datasets: &datasets,
            dev: run.device,
        };
        let r = study_net(&ctx, &mut run, &mut md)?;
        nets.push(r);
        run.partial(&RwsPartial { nets: &nets })?;
    }
    let metrics = RwsMetrics { plan, nets };
    run.finish(&metrics, &md)?;
    Ok(run.dir.clone())
}

/// What one network's training phase leaves: the three clean models with
/// their fine-tunes' signatures, mnist0's clean fine-tune and scratch models.
struct Trained {
    /// mnist0, mnist1, fashion0.
    sources: Vec<Source>,
    /// mnist0 fine-tuned on clean data (a source without signatures).
    clean_ft: Source,
    /// Its move from mnist0.
    clean_ft_sig: Signature,
    /// Per corruption: trained from mnist0's initialisation on corrupted data, minus mnist0.
    scratch: Vec<Signature>,
    /// mnist0's signatures net of the clean fine-tune's move.
    net_sigs: Vec<Signature>,
    /// Accuracies of every model.
    accuracy: Vec<AccRow>,
}

/// The options every phase of one network needs.
struct Ctx<'a> {
    net: Net,
    args: &'a RwsArgs,
    plan: &'a Plan,
    datasets: &'a [Data],
    dev: Device,
}

impl Ctx<'_> {
    fn cs(&self) -> &[Corruption] {
        &self.plan.corruptions
    }

    /// Phase label `"<net>: <what>"`.
    fn label(&self, what: &str) -> String {
        format!("{}: {what}", self.net.name())
    }

    /// Accuracy on mnist's corrupted test set `ci` and its clean test set.
    fn acc_pair(&self, model: &StateDict, ci: usize) -> anyhow::Result<(f64, f64)> {
        let mnist = &self.datasets[0];
        Ok((
            self.net.accuracy(model, &mnist.corrupted[ci].1)?,
            self.net.accuracy(model, &mnist.test)?,
        ))
    }
}

fn study_net(ctx: &Ctx, run: &mut Run, md: &mut String) -> anyhow::Result<NetResult> {
    let t = train_all(ctx, run)?;
    let m0 = &t.sources[0];
    let layers = merge::rws::layers(&m0.clean);
    let (layer_rows, clean_stable_rank) = where_it_lives(&t, &layers)?;
    let spec = ctx.net.spec(&m0.clean)?;
    let wm = run.phase(&ctx.label("weight matching mnist1 → mnist0"), || {
        permute::weight_matching(&spec, &m0.clean, &t.sources[1].clean, &Default::default())
    })?;
    let aligned = t.sources[1]
        .signatures
        .iter()
        .map(|sig| moved(sig, &spec, &wm.perm, "aligned"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (cosine_labels, cosine) = cosine_matrix(&t, &aligned)?;
    let cosine_summary = [("all layers", layers.len()), ("first layer", 1)]
        .into_iter()
        .map(|(scope, k)| summarise_cosines(&t, &aligned, scope, k))
        .collect::<anyhow::Result<_>>()?;
    let (alpha_sweep, k_sweep) = run.phase(&ctx.label("α and depth sweeps"), || {
        sweeps(ctx, &t, layers.len())
    })?;
    let compose = run.phase(&ctx.label("composition"), || {
        composition(ctx, &t, &alpha_sweep)
    })?;
    let inverse = permute::invert(&wm.perm);
    let transfer = run.phase(&ctx.label("transfer"), || {
        transfer(ctx, &t, &spec, &inverse)
    })?;
    let storage = run.phase(&ctx.label("storage"), || storage(ctx, &t, layers.len()))?;
    let result = NetResult {
        net: ctx.net,
        params: m0.clean.numel(),
        removal_exact: removal(&t)?,
        layers,
        accuracy: t.accuracy,
        layer_rows,
        clean_stable_rank,
        cosine_labels,
        cosine,
        cosine_summary,
        alpha_sweep,
        k_sweep,
        compose,
        transfer,
        storage,
    };
    report_net(&result, run, md)?;
    write_csvs(&result, run)?;
    Ok(result)
}

/// MNIST seed s, MNIST seed s+1, Fashion seed s (the same initialisation as
/// MNIST seed s), each fine-tuned per corruption; MNIST seed s also
/// fine-tuned on clean data, and trained from scratch per corruption.
fn train_all(ctx: &Ctx, run: &mut Run) -> anyhow::Result<Trained> {
    let (plan, d) = (ctx.plan, ctx.datasets);
    let nc = ctx.cs().len() as u64;
    let steps = |d: &Data, e: usize| (d.train.y.len().div_ceil(64) * e) as u64;
    let total = 2 * steps(&d[0], plan.epochs)
        + steps(&d[1], plan.epochs)
        + (2 * nc + 1) * steps(&d[0], plan.ft_epochs)
        + nc * steps(&d[1], plan.ft_epochs)
        + nc * steps(&d[0], plan.epochs);
    let bar = run.progress(total);
    let s = ctx.args.seed;
    let mut accuracy = Vec::new();
    let mut sources = Vec::new();
    for (label, data, seed) in [
        ("mnist0", 0usize, s),
        ("mnist1", 0, s + 1),
        ("fashion0", 1, s),
    ] {
        sources.push(train_source(
            ctx,
            run,
            &bar,
            label,
            data,
            seed,
            &mut accuracy,
        )?);
    }
    let m0 = &sources[0];
    let mnist = &d[0];
    let clean_ft = run.phase(&ctx.label("fine-tune mnist0 on clean data"), || {
        train_on(
            ctx.dev,
            ctx.net,
            &m0.clean,
            &mnist.train,
            plan.ft_epochs,
            s + 99,
            &bar,
        )
    })?;
    let clean_ft_sig = Signature::extract("mnist0/clean-ft", &m0.clean, &clean_ft)?;
    let scratch = train_scratch(ctx, run, &bar, &m0.clean, &mut accuracy)?;
    bar.finish_and_clear();
    let net_sigs = m0
        .signatures
        .iter()
        .map(|sig| sig.minus(&clean_ft_sig, &format!("{} − clean-ft", sig.name)))
        .collect::<merge::Result<_>>()?;
    Ok(Trained {
        sources,
        clean_ft: Source {
            data: 0,
            clean: clean_ft,
            signatures: Vec::new(),
        },
        clean_ft_sig,
        scratch,
        net_sigs,
        accuracy,
    })
}

/// One clean model and its fine-tune per corruption.
fn train_source(
    ctx: &Ctx,
    run: &mut Run,
    bar: &indicatif::ProgressBar,
    label: &str,
    d: usize,
    seed: u64,
    accuracy: &mut Vec<AccRow>,
) -> anyhow::Result<Source> {
    let (net, data) = (ctx.net, &ctx.datasets[d]);
    let init = net.init(ctx.plan, seed)?;
    let clean = run.phase(&ctx.label(&format!("train {label}")), || {
        train_on(ctx.dev, net, &init, &data.train, ctx.plan.epochs, seed, bar)
    })?;
    let clean_on_clean = net.accuracy(&clean, &data.test)?;
    let mut signatures = Vec::new();
    for (ci, &c) in ctx.cs().iter().enumerate() {
        let (tr, te) = &data.corrupted[ci];
        let ft = run.phase(&ctx.label(&format!("fine-tune {label} on {c}")), || {
            train_on(
                ctx.dev,
                net,
                &clean,
                tr,
                ctx.plan.ft_epochs,
                seed + 100 + ci as u64,
                bar,
            )
        })?;
        accuracy.push(AccRow {
            model: label.into(),
            corruption: c,
            clean_on_clean,
            clean_on_corrupted: net.accuracy(&clean, te)?,
            robust_on_clean: net.accuracy(&ft, &data.test)?,
            robust_on_corrupted: net.accuracy(&ft, te)?,
        });
        signatures.push(Signature::extract(&format!("{label}/{c}"), &clean, &ft)?);
    }
    Ok(Source {
        data: d,
        clean,
        signatures,
    })
}

/// Per corruption, a model trained from mnist0's initialisation on the
/// corrupted images only; its signature is taken against mnist0.
fn train_scratch(
    ctx: &Ctx,
    run: &mut Run,
    bar: &indicatif::ProgressBar,
    m0: &StateDict,
    accuracy: &mut Vec<AccRow>,
) -> anyhow::Result<Vec<Signature>> {
    let (net, mnist, s) = (ctx.net, &ctx.datasets[0], ctx.args.seed);
    let init0 = net.init(ctx.plan, s)?;
    let mut scratch = Vec::new();
    for (ci, &c) in ctx.cs().iter().enumerate() {
        let (tr, te) = &mnist.corrupted[ci];
        let m = run.phase(&ctx.label(&format!("train from scratch on {c}")), || {
            train_on(ctx.dev, net, &init0, tr, ctx.plan.epochs, s, bar)
        })?;
        // mnist0 itself was scored on these sets when it was fine-tuned.
        let clean = accuracy
            .iter()
            .find(|a| a.model == "mnist0" && a.corruption == c)
            .expect("mnist0 is scored on every corruption first");
        accuracy.push(AccRow {
            model: "scratch".into(),
            corruption: c,
            clean_on_clean: clean.clean_on_clean,
            clean_on_corrupted: clean.clean_on_corrupted,
            robust_on_clean: net.accuracy(&m, &mnist.test)?,
            robust_on_corrupted: net.accuracy(&m, te)?,
        });
        scratch.push(Signature::extract(&format!("scratch/{c}"), m0, &m)?);
    }
    Ok(scratch)
}

/// Relative norms and stable ranks per layer of mnist0's signatures (and of
/// the scratch, clean fine-tune and net ones); the clean layers' stable ranks.
fn where_it_lives(t: &Trained, layers: &[String]) -> anyhow::Result<(Vec<LayerRow>, Vec<f64>)> {
    let m0 = &t.sources[0];
    let sigs = m0
        .signatures
        .iter()
        .chain(&t.scratch)
        .chain([&t.clean_ft_sig])
        .chain(&t.net_sigs);
    let rows = sigs
        .map(|sig| {
            Ok(LayerRow {
                signature: sig.name.clone(),
                relative: sig
                    .layer_norms(&m0.clean)?
                    .iter()
                    .map(|l| l.relative)
                    .collect(),
                stable_rank: layer_stable_ranks(&sig.deltas, layers)?,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    Ok((rows, layer_stable_ranks(&m0.clean, layers)?))
}

/// A signature carried through a permutation of its model (`perm` applied
/// to its deltas, which a permutation moves like weights).
fn moved(
    sig: &Signature,
    spec: &permute::PermutationSpec,
    perm: &permute::Permutation,
    tag: &str,
) -> anyhow::Result<Signature> {
    Ok(Signature {
        name: format!("{}~{tag}", sig.name),
        deltas: permute::apply(spec, perm, &sig.deltas)?,
        model_layers: sig.model_layers.clone(),
    })
}

/// Cosines over all layers between mnist0's, mnist1's (aligned) and
/// fashion0's signatures.
fn cosine_matrix(
    t: &Trained,
    aligned: &[Signature],
) -> anyhow::Result<(Vec<String>, Vec<Vec<f64>>)> {
    let sigs: Vec<&Signature> = t.sources[0]
        .signatures
        .iter()
        .chain(aligned)
        .chain(&t.sources[2].signatures)
        .collect();
    let m = sigs
        .iter()
        .map(|a| {
            sigs.iter()
                .map(|b| a.cosine(b))
                .collect::<merge::Result<_>>()
        })
        .collect::<merge::Result<_>>()?;
    Ok((sigs.iter().map(|s| s.name.clone()).collect(), m))
}

/// The cosine summaries over the first `k` layers.
fn summarise_cosines(
    t: &Trained,
    aligned: &[Signature],
    scope: &str,
    k: usize,
) -> anyhow::Result<CosineSummary> {
    let cut = |sigs: &[Signature]| -> merge::Result<Vec<Signature>> {
        sigs.iter().map(|s| s.first_layers(k)).collect()
    };
    let m0 = cut(&t.sources[0].signatures)?;
    let (m1, al, f0) = (
        cut(&t.sources[1].signatures)?,
        cut(aligned)?,
        cut(&t.sources[2].signatures)?,
    );
    let (net, ctl) = (cut(&t.net_sigs)?, t.clean_ft_sig.first_layers(k)?);
    let nc = m0.len();
    let per = |other: &[Signature]| -> merge::Result<Vec<f64>> {
        (0..nc).map(|i| m0[i].cosine(&other[i])).collect()
    };
    let (mut diff, mut diff_net, mut hits) = (Vec::new(), Vec::new(), 0);
    for i in 0..nc {
        for j in (0..nc).filter(|&j| j != i) {
            diff.push(m0[i].cosine(&m0[j])?);
            diff_net.push(net[i].cosine(&net[j])?);
        }
        for probe in [&al[i], &f0[i]] {
            let sims = m0
                .iter()
                .map(|r| r.cosine(probe))
                .collect::<merge::Result<Vec<_>>>()?;
            let best = (0..nc)
                .max_by(|&x, &y| sims[x].total_cmp(&sims[y]))
                .expect("one corruption");
            hits += usize::from(best == i);
        }
    }
    let vs_ctl = m0
        .iter()
        .map(|s| s.cosine(&ctl))
        .collect::<merge::Result<Vec<_>>>()?;
    Ok(CosineSummary {
        scope: scope.into(),
        same_corruption_other_seed_raw: mean(&per(&m1)?),
        same_corruption_other_seed_aligned: mean(&per(&al)?),
        same_corruption_other_dataset: mean(&per(&f0)?),
        different_corruptions: mean(&diff),
        vs_clean_finetune: mean(&vs_ctl),
        different_corruptions_net: mean(&diff_net),
        identified: (hits, 2 * nc),
    })
}

/// mnist0 + α·RWS on all layers for every α, and RWS on the first k layers (α = 1).
fn sweeps(ctx: &Ctx, t: &Trained, nl: usize) -> anyhow::Result<(Vec<SweepRow>, Vec<SweepRow>)> {
    let m0 = &t.sources[0];
    let (mut alpha_sweep, mut k_sweep) = (Vec::new(), Vec::new());
    for (ci, &c) in ctx.cs().iter().enumerate() {
        let sig = &m0.signatures[ci];
        for &alpha in &ctx.args.alphas {
            let (corrupted_acc, clean_acc) =
                ctx.acc_pair(&merge::rws::patch(&m0.clean, &[(sig, alpha)])?, ci)?;
            alpha_sweep.push(SweepRow {
                corruption: c,
                alpha,
                k: nl,
                corrupted_acc,
                clean_acc,
            });
        }
        for k in 1..=nl {
            let part = sig.first_layers(k)?;
            let (corrupted_acc, clean_acc) =
                ctx.acc_pair(&merge::rws::patch(&m0.clean, &[(&part, 1.0)])?, ci)?;
            k_sweep.push(SweepRow {
                corruption: c,
                alpha: 1.0,
                k,
                corrupted_acc,
                clean_acc,
            });
        }
    }
    Ok((alpha_sweep, k_sweep))
}

/// Every signature of mnist0 added at once (α = 0.3, 0.67, …) then removed:
/// (weights restored bit for bit, weights).
fn removal(t: &Trained) -> anyhow::Result<(usize, usize)> {
    let m0 = &t.sources[0];
    let patches: Vec<(&Signature, f64)> = m0
        .signatures
        .iter()
        .enumerate()
        .map(|(i, s)| (s, 0.3 + 0.37 * i as f64))
        .collect();
    let back = Patched::new(&m0.clean, &patches)?
        .unpatch(&patches)?
        .to_state_dict();
    let mut out = (0usize, 0usize);
    for (k, w) in m0.clean.iter() {
        let b = back.get(k).expect("same tensors");
        out.1 += w.data.len();
        out.0 += w
            .data
            .iter()
            .zip(b.data.iter())
            .filter(|(x, y)| x.to_bits() == y.to_bits())
            .count();
    }
    Ok(out)
}

/// Every pair of signatures, and consecutive triples, added at once (α = 1 each).
fn composition(
    ctx: &Ctx,
    t: &Trained,
    alpha_sweep: &[SweepRow],
) -> anyhow::Result<Vec<ComposeRow>> {
    let (cs, net, mnist, m0) = (ctx.cs(), ctx.net, &ctx.datasets[0], &t.sources[0]);
    let nc = cs.len();
    let mut sets: Vec<Vec<usize>> = (0..nc)
        .flat_map(|i| (i + 1..nc).map(move |j| vec![i, j]))
        .collect();
    if nc >= 3 {
        sets.extend((0..nc).map(|i| vec![i, (i + 1) % nc, (i + 2) % nc]));
    }
    // Each signature alone on its own corruption: the α = 1 row.
    let alone_acc = |i: usize| {
        alpha_sweep
            .iter()
            .find(|x| x.corruption == cs[i] && x.alpha == 1.0)
            .map(|x| Ok(x.corrupted_acc))
            .unwrap_or_else(|| {
                let single = merge::rws::patch(&m0.clean, &[(&m0.signatures[i], 1.0)])?;
                net.accuracy(&single, &mnist.corrupted[i].1)
            })
    };
    sets.iter()
        .map(|set| {
            let patches: Vec<(&Signature, f64)> =
                set.iter().map(|&i| (&m0.signatures[i], 1.0)).collect();
            let model = merge::rws::patch(&m0.clean, &patches)?;
            Ok(ComposeRow {
                corruptions: set.iter().map(|&i| cs[i]).collect(),
                together: set
                    .iter()
                    .map(|&i| net.accuracy(&model, &mnist.corrupted[i].1))
                    .collect::<anyhow::Result<_>>()?,
                alone: set
                    .iter()
                    .map(|&i| alone_acc(i))
                    .collect::<anyhow::Result<_>>()?,
                clean_acc: net.accuracy(&model, &mnist.test)?,
            })
        })
        .collect()
}

/// A clean model that signatures are moved onto, scored once per
/// corruption: alone, and with its own signature (when it has one).
struct Target<'a> {
    source: &'a Source,
    name: &'a str,
    alone: f64,
    own: Option<f64>,
}

impl<'a> Target<'a> {
    fn new(
        ctx: &Ctx,
        ci: usize,
        (source, name): (&'a Source, &'a str),
        own: Option<&Signature>,
    ) -> anyhow::Result<Self> {
        let te = &ctx.datasets[source.data].corrupted[ci].1;
        let patched_acc = |sig| -> anyhow::Result<f64> {
            ctx.net
                .accuracy(&merge::rws::patch(&source.clean, &[(sig, 1.0)])?, te)
        };
        Ok(Target {
            source,
            name,
            alone: ctx.net.accuracy(&source.clean, te)?,
            own: own.map(patched_acc).transpose()?,
        })
    }

    /// `sig` added (α = 1) to the target, scored on the corruption `ci`
    /// of the target's dataset and on its clean test set.
    fn row(
        &self,
        ctx: &Ctx,
        ci: usize,
        (sig, from): (&Signature, &str),
    ) -> anyhow::Result<TransferRow> {
        let d = &ctx.datasets[self.source.data];
        let patched = merge::rws::patch(&self.source.clean, &[(sig, 1.0)])?;
        Ok(TransferRow {
            target: self.name.into(),
            from: from.into(),
            corruption: ctx.cs()[ci],
            target_acc: self.alone,
            patched_acc: ctx.net.accuracy(&patched, &d.corrupted[ci].1)?,
            own_acc: self.own,
            patched_clean_acc: ctx.net.accuracy(&patched, &d.test)?,
        })
    }
}

/// Signatures moved between datasets (same initialisation), to the other
/// seed (raw and through weight matching's permutation), net of the clean
/// fine-tune, and onto mnist0 after a further clean fine-tune.
fn transfer(
    ctx: &Ctx,
    t: &Trained,
    spec: &permute::PermutationSpec,
    to_m1: &permute::Permutation,
) -> anyhow::Result<Vec<TransferRow>> {
    let (m0, m1, f0) = (&t.sources[0], &t.sources[1], &t.sources[2]);
    let mut rows = Vec::new();
    for ci in 0..ctx.cs().len() {
        let (s0, sf, s1) = (&m0.signatures[ci], &f0.signatures[ci], &m1.signatures[ci]);
        let to_mnist1 = moved(s0, spec, to_m1, "to-mnist1")?;
        let on_f0 = Target::new(ctx, ci, (f0, "fashion0"), Some(sf))?;
        let on_m0 = Target::new(ctx, ci, (m0, "mnist0"), Some(s0))?;
        let on_m1 = Target::new(ctx, ci, (m1, "mnist1"), Some(s1))?;
        let on_further = Target::new(ctx, ci, (&t.clean_ft, "mnist0 after clean fine-tune"), None)?;
        let net_sig = &t.net_sigs[ci];
        rows.push(on_f0.row(ctx, ci, (s0, "mnist0"))?);
        rows.push(on_m0.row(ctx, ci, (sf, "fashion0"))?);
        rows.push(on_m1.row(ctx, ci, (s0, "mnist0 (raw)"))?);
        rows.push(on_m1.row(ctx, ci, (&to_mnist1, "mnist0 (re-basin)"))?);
        let mut net_row = on_m0.row(ctx, ci, (net_sig, "mnist0, net of clean fine-tune"))?;
        // The net signature is mnist0's own, reduced: no separate reference.
        net_row.own_acc = None;
        rows.push(net_row);
        rows.push(on_further.row(ctx, ci, (s0, "mnist0"))?);
    }
    Ok(rows)
}

/// mnist0's signatures on their first k layers at f32, 8 and 4 bits.
fn storage(ctx: &Ctx, t: &Trained, nl: usize) -> anyhow::Result<Vec<StorageRow>> {
    let m0 = &t.sources[0];
    let full_bytes = 4 * m0.clean.numel();
    let ks: Vec<usize> = if ctx.args.ks.is_empty() {
        (1..=nl).collect()
    } else {
        ctx.args.ks.clone()
    };
    let mut rows = Vec::new();
    for &k in &ks {
        for bits in [32u8, 8, 4] {
            let (mut acc, mut clean, mut bytes) = (Vec::new(), Vec::new(), 0);
            for (ci, sig) in m0.signatures.iter().enumerate() {
                let part = sig.first_layers(k)?;
                let stored = if bits == 32 {
                    bytes = part.bytes_f32();
                    part
                } else {
                    let q = part.quantise(bits)?;
                    bytes = q.bytes();
                    q.dequantise()
                };
                let (a, c) = ctx.acc_pair(&merge::rws::patch(&m0.clean, &[(&stored, 1.0)])?, ci)?;
                acc.push(a);
                clean.push(c);
            }
            rows.push(StorageRow {
                k,
                bits,
                bytes,
                compression: full_bytes as f64 / bytes.max(1) as f64,
                corrupted_acc: mean(&acc),
                clean_acc: mean(&clean),
            });
        }
    }
    Ok(rows)
}

fn write_csvs(r: &NetResult, run: &Run) -> anyhow::Result<()> {
    let n = r.net.name();
    let mut s = String::from(
        "model,corruption,clean_on_clean,clean_on_corrupted,robust_on_clean,robust_on_corrupted\n",
    );
    for a in &r.accuracy {
        s.push_str(&format!(
            "{},{},{:.4},{:.4},{:.4},{:.4}\n",
            a.model,
            a.corruption,
            a.clean_on_clean,
            a.clean_on_corrupted,
            a.robust_on_clean,
            a.robust_on_corrupted
        ));
    }
    run.write(&format!("{n}_accuracy.csv"), s.as_bytes())?;
    let mut s = format!(
        "signature,{}\n",
        r.layers
            .iter()
            .map(|l| format!("rel_{l}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    for row in &r.layer_rows {
        s.push_str(&format!(
            "{},{}\n",
            row.signature,
            row.relative
                .iter()
                .map(|v| format!("{v:.5}"))
                .collect::<Vec<_>>()
                .join(",")
        ));
    }
    run.write(&format!("{n}_layer_norms.csv"), s.as_bytes())?;
    let mut s = String::from("sweep,corruption,alpha,k,corrupted_acc,clean_acc\n");
    for (name, rows) in [("alpha", &r.alpha_sweep), ("k", &r.k_sweep)] {
        for x in rows {
            s.push_str(&format!(
                "{name},{},{},{},{:.4},{:.4}\n",
                x.corruption, x.alpha, x.k, x.corrupted_acc, x.clean_acc
            ));
        }
    }
    run.write(&format!("{n}_sweeps.csv"), s.as_bytes())?;
    let mut s = format!("signature,{}\n", r.cosine_labels.join(","));
    for (l, row) in r.cosine_labels.iter().zip(&r.cosine) {
        s.push_str(&format!(
            "{l},{}\n",
            row.iter()
                .map(|v| format!("{v:.4}"))
                .collect::<Vec<_>>()
                .join(",")
        ));
    }
    run.write(&format!("{n}_cosine.csv"), s.as_bytes())?;
    let mut s = String::from("k,bits,bytes,compression,corrupted_acc,clean_acc\n");
    for x in &r.storage {
        s.push_str(&format!(
            "{},{},{},{:.2},{:.4},{:.4}\n",
            x.k, x.bits, x.bytes, x.compression, x.corrupted_acc, x.clean_acc
        ));
    }
    run.write(&format!("{n}_storage.csv"), s.as_bytes())?;
    Ok(())
}

fn report_net(r: &NetResult, run: &Run, md: &mut String) -> anyhow::Result<()> {
    report_models(r, md);
    report_layers(r, run, md)?;
    report_cosines(r, run, md)?;
    report_patching(r, run, md)?;
    report_tables(r, run, md)
}

/// The models' accuracy table.
fn report_models(r: &NetResult, md: &mut String) {
    let n = r.net.name();
    md.push_str(&format!(
        "\n## {} ({} parameters; layers {})\n\n### Models\n\n| model | corruption | clean model, clean test | clean model, corrupted test | robust model, clean test | robust model, corrupted test |\n|---|---|---|---|---|---|\n",
        n.to_uppercase(),
        r.params,
        r.layers.join(", ")
    ));
    for a in &r.accuracy {
        md.push_str(&format!(
            "| {} | {} | {:.3} | {:.3} | {:.3} | {:.3} |\n",
            a.model,
            a.corruption,
            a.clean_on_clean,
            a.clean_on_corrupted,
            a.robust_on_clean,
            a.robust_on_corrupted
        ));
    }
}

/// Where the signature lives: the relative-norm table, stable ranks and plots.
fn report_layers(r: &NetResult, run: &Run, md: &mut String) -> anyhow::Result<()> {
    let nl = r.layers.len();
    md.push_str(&format!(
        "\n### Where the signature lives\n\n‖δ_l‖/‖W_l‖ per layer (fine-tunes of mnist0; `scratch/…` = trained from the same initialisation on corrupted data only; `clean-ft` = the same fine-tune on clean data):\n\n| signature | {} |\n|---|{}\n",
        r.layers.join(" | "),
        "---|".repeat(nl)
    ));
    for row in &r.layer_rows {
        md.push_str(&format!(
            "| {} | {} |\n",
            row.signature,
            row.relative
                .iter()
                .map(|v| format!("{v:.4}"))
                .collect::<Vec<_>>()
                .join(" | ")
        ));
    }
    md.push_str(&format!(
        "\nStable rank of each layer's weight: clean {}; fine-tune signatures (mean) {}.\n",
        r.clean_stable_rank
            .iter()
            .map(|v| format!("{v:.2}"))
            .collect::<Vec<_>>()
            .join(" / "),
        (0..nl)
            .map(|l| {
                let v: Vec<f64> = r
                    .layer_rows
                    .iter()
                    .filter(|x| {
                        x.signature.starts_with("mnist0/") && !x.signature.ends_with("clean-ft")
                    })
                    .map(|x| x.stable_rank[l])
                    .collect();
                format!("{:.2}", mean(&v))
            })
            .collect::<Vec<_>>()
            .join(" / ")
    ));
    layer_plots(r, run, md)
}

/// A layer-norm plot: file stem, title, which signatures it draws.
type LayerPlot = (&'static str, &'static str, fn(&str) -> bool);

/// Relative norms across depth: fine-tunes, scratch models, net signatures.
fn layer_plots(r: &NetResult, run: &Run, md: &mut String) -> anyhow::Result<()> {
    let n = r.net.name();
    let plots: [LayerPlot; 3] = [
        (
            "layer_norms",
            "fine-tunes on corrupted data (and on clean data)",
            |s| s.starts_with("mnist0/") && !s.contains(" − "),
        ),
        (
            "layer_norms_scratch",
            "trained from scratch on corrupted data",
            |s| s.starts_with("scratch/"),
        ),
        (
            "layer_norms_net",
            "fine-tunes net of the clean fine-tune",
            |s| s.contains(" − "),
        ),
    ];
    for (stem, title, keep) in plots {
        let series: Vec<Series> = r
            .layer_rows
            .iter()
            .filter(|row| keep(&row.signature))
            .map(|row| {
                let name = row
                    .signature
                    .trim_start_matches("mnist0/")
                    .trim_start_matches("scratch/");
                let pts = row
                    .relative
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| ((i + 1) as f64, v));
                Series::line(name, pts.collect())
            })
            .collect();
        line_chart(
            &run.dir.join(format!("{n}_{stem}")),
            &format!("{n}: {title}"),
            "layer (1 = input)",
            "‖δ‖ / ‖W‖",
            &series,
        )?;
        md.push_str(&format!("\n![{n}: {title}]({n}_{stem}.png)\n"));
    }
    Ok(())
}

/// Cosine summaries and heatmap.
fn report_cosines(r: &NetResult, run: &Run, md: &mut String) -> anyhow::Result<()> {
    let n = r.net.name();
    md.push_str("\n### Are signatures specific and consistent?\n\n| scope | same corruption, other seed (raw) | … after weight matching | same corruption, Fashion (same init) | different corruptions | vs clean fine-tune | different corruptions, net of clean fine-tune | corruption identified by nearest signature |\n|---|---|---|---|---|---|---|---|\n");
    for c in &r.cosine_summary {
        md.push_str(&format!(
            "| {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {}/{} |\n",
            c.scope,
            c.same_corruption_other_seed_raw,
            c.same_corruption_other_seed_aligned,
            c.same_corruption_other_dataset,
            c.different_corruptions,
            c.vs_clean_finetune,
            c.different_corruptions_net,
            c.identified.0,
            c.identified.1
        ));
    }
    heatmap(
        &run.dir.join(format!("{n}_cosine")),
        &format!("{n}: cosine of signatures (mnist0 | mnist1 aligned | fashion0)"),
        "signature",
        "signature",
        &r.cosine,
    )?;
    md.push_str(&format!(
        "\nRows and columns of the heatmap (negative cosines drawn as 0): {}.\n\n![{n} cosine]({n}_cosine.png)\n",
        r.cosine_labels.join(", ")
    ));
    Ok(())
}

/// Removal, α and depth sweeps with their plots.
fn report_patching(r: &NetResult, run: &Run, md: &mut String) -> anyhow::Result<()> {
    let n = r.net.name();
    md.push_str(&format!(
        "\n### Patching mnist0\n\nRemoval after adding every signature at once (α = 0.3, 0.67, …): {} of {} weights restored bit for bit.\n\nCorrupted-test accuracy vs α (all layers; clean-test accuracy in brackets):\n\n",
        r.removal_exact.0, r.removal_exact.1,
    ));
    sweep_section(
        md,
        run,
        n,
        &r.alpha_sweep,
        ("α", |x| x.alpha),
        "clean + α·RWS",
    )?;
    md.push_str("\nAccuracy vs depth k (α = 1, the first k layers patched):\n\n");
    sweep_section(
        md,
        run,
        n,
        &r.k_sweep,
        ("k", |x| x.k as f64),
        "first k layers patched, α = 1",
    )?;
    Ok(())
}

/// One sweep's table (a row per corruption, a column per value of `x`) and
/// its plot `<net>_accuracy_vs_<x>` (lines: corrupted test; dots: clean test).
fn sweep_section(
    md: &mut String,
    run: &Run,
    n: &str,
    rows: &[SweepRow],
    (x_name, x): (&str, fn(&SweepRow) -> f64),
    title: &str,
) -> anyhow::Result<()> {
    let mut corruptions: Vec<Corruption> = rows.iter().map(|r| r.corruption).collect();
    corruptions.dedup();
    let of = |c: Corruption| rows.iter().filter(move |r| r.corruption == c);
    let xs: Vec<f64> = corruptions
        .first()
        .map_or(Vec::new(), |&c| of(c).map(x).collect());
    md.push_str(&format!(
        "| corruption | {} |\n|---|{}\n",
        xs.iter()
            .map(|v| format!("{x_name}={v}"))
            .collect::<Vec<_>>()
            .join(" | "),
        "---|".repeat(xs.len())
    ));
    let mut series = Vec::new();
    for (i, &c) in corruptions.iter().enumerate() {
        md.push_str(&format!(
            "| {c} | {} |\n",
            of(c)
                .map(|r| format!("{:.3} ({:.3})", r.corrupted_acc, r.clean_acc))
                .collect::<Vec<_>>()
                .join(" | ")
        ));
        series.push(
            Series::line(c.name(), of(c).map(|r| (x(r), r.corrupted_acc)).collect()).colored(i),
        );
        series.push(Series::dots("", of(c).map(|r| (x(r), r.clean_acc)).collect()).colored(i));
    }
    let stem = format!(
        "{n}_accuracy_vs_{}",
        if x_name == "α" { "alpha" } else { x_name }
    );
    line_chart(
        &run.dir.join(&stem),
        &format!("{n}: {title} (lines: corrupted test; dots: clean test)"),
        x_name,
        "accuracy",
        &series,
    )?;
    md.push_str(&format!("\n![{n} accuracy vs {x_name}]({stem}.png)\n"));
    Ok(())
}

/// Composition, transfer and storage tables, the storage plot.
fn report_tables(r: &NetResult, run: &Run, md: &mut String) -> anyhow::Result<()> {
    let n = r.net.name();
    let nl = r.layers.len();
    md.push_str("\n### Composition (α = 1 each)\n\n| signatures | accuracy on each corruption, together | … each alone | clean accuracy |\n|---|---|---|---|\n");
    for c in &r.compose {
        md.push_str(&format!(
            "| {} | {} | {} | {:.3} |\n",
            c.corruptions
                .iter()
                .map(|x| x.name())
                .collect::<Vec<_>>()
                .join(" + "),
            c.together
                .iter()
                .map(|v| format!("{v:.3}"))
                .collect::<Vec<_>>()
                .join(" / "),
            c.alone
                .iter()
                .map(|v| format!("{v:.3}"))
                .collect::<Vec<_>>()
                .join(" / "),
            c.clean_acc
        ));
    }
    md.push_str("\n### Transfer (α = 1, all layers)\n\n| target | signature from | corruption | target alone | + transferred | + its own | clean acc. patched |\n|---|---|---|---|---|---|---|\n");
    for t in &r.transfer {
        md.push_str(&format!(
            "| {} | {} | {} | {:.3} | {:.3} | {} | {:.3} |\n",
            t.target,
            t.from,
            t.corruption,
            t.target_acc,
            t.patched_acc,
            t.own_acc.map_or("—".into(), |v| format!("{v:.3}")),
            t.patched_clean_acc
        ));
    }
    md.push_str("\n### Storage (first k layers; mean over corruptions)\n\n| k | bits | bytes | × smaller than the model | corrupted acc. | clean acc. |\n|---|---|---|---|---|---|\n");
    for s in &r.storage {
        md.push_str(&format!(
            "| {} | {} | {} | {:.1} | {:.3} | {:.3} |\n",
            s.k, s.bits, s.bytes, s.compression, s.corrupted_acc, s.clean_acc
        ));
    }
    let series: Vec<Series> = [32u8, 8, 4]
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            Series::line(
                format!("{b}-bit"),
                r.storage
                    .iter()
                    .filter(|s| s.bits == b)
                    .map(|s| (s.compression.log2(), s.corrupted_acc))
                    .collect(),
            )
            .colored(i)
        })
        .collect();
    line_chart(
        &run.dir.join(format!("{n}_storage")),
        &format!("{n}: stored signature (points: k = 1…{nl} from the right)"),
        "log2(model bytes / signature bytes)",
        "corrupted-test accuracy",
        &series,
    )?;
    md.push_str(&format!("\n![{n} storage]({n}_storage.png)\n"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_options_are_named_before_training() {
        let args = |f: &dyn Fn(&mut RwsArgs)| {
            let mut a = RwsArgs {
                quick: true,
                ..Default::default()
            };
            f(&mut a);
            a.plan().map(|_| ()).unwrap_err().to_string()
        };
        let e = args(&|a| a.corruptions = vec!["fog".into()]);
        assert!(e.contains("--corruptions") && e.contains("'fog'"), "{e}");
        let e = args(&|a| a.severity = 6);
        assert!(e.contains("--severity") && e.contains("severity 6"), "{e}");
        let e = args(&|a| a.alphas = vec![1.0, f64::INFINITY]);
        assert!(e.contains("--alphas") && e.contains("inf"), "{e}");
        let e = args(&|a| a.ks = vec![9]);
        assert!(e.contains("--ks") && e.contains("k = 9"), "{e}");
        let e = args(&|a| a.epochs = Some(0));
        assert!(e.contains("--epochs"), "{e}");
        let ok = RwsArgs {
            quick: true,
            ..Default::default()
        }
        .plan()
        .unwrap();
        assert_eq!(
            ok.corruptions,
            [Corruption::GaussianNoise, Corruption::Contrast]
        );
        assert_eq!(ok.cnn.layer_names().len(), 5);
    }
}
