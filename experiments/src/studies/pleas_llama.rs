//! `pleas --arch llama`: partial merging of two character-level LLaMA-style
//! decoders trained on different text (A on Moby-Dick, B on the State of the
//! Union addresses), through the library's zip over the head-aware spec
//! ([`permute::zip`]).
//!
//! B is aligned to A (no matching, weight matching, or activation matching);
//! in every block the `ratio` most similar key/value heads (with their query
//! heads) and FFN channels are merged and the others kept side by side, the
//! residual stream merged whole (an RMSNorm over a wider stream is not the
//! norm of either model's). The merged model is a LLaMA with more heads and
//! FFN channels, scored by its held-out loss on both texts. PLeaS's
//! per-layer least squares is not applied here (the `pleas` study solves it
//! for MLPs).

use std::path::PathBuf;

use anyhow::ensure;
use indexmap::IndexMap;
use permute::zip::{GroupPlan, ZipOptions, lookup_tables, plan_group, zip};
use permute::{MatchOptions, Permutation, PermutationSpec, apply, weight_matching};
use s2ft_core::LlamaConfig;
use serde::Serialize;
use weights::StateDict;

use crate::lm::{Corpus, Sample, ascii, default_text_dir, held_out, moby_dick};
use crate::plot::{Series, line_chart};
use crate::report::Run;
use crate::studies::lmc::LmcArgs;
use crate::studies::lmc_llama::{
    EvalSets, HEAD_DIM, Shape, TrainedPair, activation_matching, cpu_model, train_pair,
};
use crate::studies::pleas::{Allocation, Matching, PleasArgs};

/// Held-out loss (nats/token) on each text.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct TextLoss {
    /// On Moby-Dick (A's text).
    pub moby_dick: f64,
    /// On the State of the Union addresses (B's text).
    pub sotu: f64,
    /// Their mean.
    pub mean: f64,
}

/// One merged model.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// How B was aligned.
    pub matching: &'static str,
    /// Fraction of each block's heads and FFN channels merged.
    pub ratio: f64,
    /// Key/value heads per block of the merged model.
    pub kv_heads: usize,
    /// FFN channels per block.
    pub ffn: usize,
    /// Parameters ÷ one model's.
    pub params_ratio: f64,
    /// Its losses.
    pub loss: TextLoss,
}

/// What `metrics.json` holds.
#[derive(Clone, Debug, Serialize)]
pub struct Metrics {
    /// `llama`.
    pub arch: &'static str,
    /// The two models' sizes.
    pub shape: Shape,
    /// Model A (trained on Moby-Dick).
    pub a: TextLoss,
    /// Model B (trained on the addresses).
    pub b: TextLoss,
    /// Every merge.
    pub merges: Vec<Row>,
}

/// The State of the Union addresses as a 90/10 split of ASCII text.
fn sotu(dir: &std::path::Path) -> anyhow::Result<Corpus> {
    let text = ascii(crate::tasks::sotu_text(dir)?.join("\n\n").as_bytes());
    let cut = text.len() * 9 / 10;
    Ok(Corpus {
        train: text[..cut].to_vec(),
        test: text[cut..].to_vec(),
    })
}

/// Runs `pleas --arch llama`; returns the report folder.
pub fn run(args: &PleasArgs) -> anyhow::Result<PathBuf> {
    let shape = check(args)?;
    let mut run = args.run.open("pleas")?;
    let dir = args.data_dir.clone().unwrap_or_else(default_text_dir);
    let texts = run.phase("load data", || -> anyhow::Result<[Corpus; 2]> {
        Ok([moby_dick(&dir)?, sotu(&dir)?])
    })?;
    let pair = train_pair(shape, args.seed, [&texts[0], &texts[1]], &mut run)?;
    let sets = [0, 1].map(|k| EvalSets::new(&texts[k], &pair.shape));
    // One CPU model per merge, scored on each text's held-out windows.
    let score = |c: &LlamaConfig, sd: &StateDict| -> anyhow::Result<TextLoss> {
        let model = cpu_model(c, sd)?;
        let [x, y] = sets.each_ref().map(|s| s.test(&model).loss);
        Ok(TextLoss {
            moby_dick: x,
            sotu: y,
            mean: (x + y) / 2.0,
        })
    };
    let c = &pair.config;
    let mut m = Metrics {
        arch: "llama",
        shape: pair.shape.clone(),
        a: score(c, &pair.a)?,
        b: score(c, &pair.b)?,
        merges: Vec::new(),
    };
    let spec = permute::builders::llama(c, &pair.a)?;
    let probe = probe(&texts, &pair.shape, args.seed);
    for matching in args.matchings() {
        let perm = run.phase(&format!("match {}", matching.name()), || {
            align(matching, &spec, &pair, &probe, args.seed)
        })?;
        let bp = apply(&spec, &perm, &pair.b)?;
        // How alike each aligned block pair is: the blocks kept apart are the least alike.
        let sims = permute::many::pair_similarities(&spec, &spec.identity(), &pair.a, &bp)?;
        for &ratio in &args.ratios {
            let (z, zc) = run.phase(&format!("zip {} {ratio}", matching.name()), || {
                merge(&spec, c, (&pair.a, &bp), &sims, ratio)
            })?;
            m.merges.push(Row {
                matching: matching.name(),
                ratio,
                kv_heads: zc.num_key_value_heads,
                ffn: zc.intermediate_size,
                params_ratio: z.numel() as f64 / pair.a.numel() as f64,
                loss: score(&zc, &z)?,
            });
            run.partial(&serde_json::to_value(&m)?)?;
        }
    }
    plot(&run, &m, args)?;
    let md = report(&m);
    run.finish(serde_json::to_value(&m)?, &md)?;
    Ok(run.dir.clone())
}

/// The options checked (before any output is written) and the models' sizes.
fn check(args: &PleasArgs) -> anyhow::Result<Shape> {
    ensure!(
        args.allocation == Allocation::Uniform,
        "--allocation global: a LLaMA has as many heads and channels in every block; use --allocation uniform with --arch llama"
    );
    for r in &args.ratios {
        permute::zip::check_ratio(*r).map_err(|e| anyhow::anyhow!("--ratios: {e}"))?;
    }
    Shape::of(
        &LmcArgs {
            quick: args.quick,
            width: args.width,
            depth: args.depth,
            epochs: args.epochs,
            steps: args.steps,
            seed: args.seed,
            ..Default::default()
        },
        None,
    )
}

/// Activation matching's probe: one batch of windows of each text.
fn probe(texts: &[Corpus; 2], shape: &Shape, seed: u64) -> Sample {
    let draw = |k: usize| {
        held_out(1, seed ^ 0xAC7, |r| {
            Sample::text(&texts[k].train, shape.batch, shape.seq, r)
        })
        .pop()
        .expect("one batch")
    };
    let (x, y) = (draw(0), draw(1));
    Sample {
        tokens: [x.tokens, y.tokens].concat(),
        mask: [x.mask, y.mask].concat(),
        b: x.b + y.b,
        t: x.t,
    }
}

/// The permutation of B `matching` finds over the head-aware spec.
fn align(
    matching: Matching,
    spec: &PermutationSpec,
    pair: &TrainedPair,
    probe: &Sample,
    seed: u64,
) -> anyhow::Result<Permutation> {
    Ok(match matching {
        Matching::None => spec.identity(),
        Matching::Wm => {
            let o = MatchOptions {
                seed,
                ..Default::default()
            };
            weight_matching(spec, &pair.a, &pair.b, &o)?.perm
        }
        Matching::Am => activation_matching(&pair.config, spec, (&pair.a, &pair.b), probe)?,
    })
}

/// A and the aligned B zipped at `ratio` (the residual stream merged whole,
/// heads and FFN channels by similarity), and the merged model's config.
fn merge(
    spec: &PermutationSpec,
    c: &LlamaConfig,
    (a, bp): (&StateDict, &StateDict),
    sims: &IndexMap<String, Vec<f64>>,
    ratio: f64,
) -> anyhow::Result<(StateDict, LlamaConfig)> {
    let plan: IndexMap<String, GroupPlan> = spec
        .groups
        .iter()
        .map(|g| {
            let merged = if g.name == "residual" {
                g.blocks
            } else {
                (ratio * g.blocks as f64).round() as usize
            };
            let identity: Vec<usize> = (0..g.blocks).collect();
            Ok((
                g.name.clone(),
                plan_group(&identity, &sims[&g.name], merged, &g.name)?,
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    let opts = ZipOptions {
        lookups: lookup_tables(a),
        ..Default::default()
    };
    let z = zip(spec, a, bp, &plan, &opts)?;
    let kv = plan[&permute::builders::llama_heads_group(0)].width();
    let ffn = plan[&permute::builders::llama_ffn_group(0)].width();
    let mut zc = LlamaConfig::tiny(
        c.vocab_size,
        c.hidden_size,
        c.num_hidden_layers,
        kv * (c.num_attention_heads / c.num_key_value_heads),
        kv,
        ffn,
    );
    zc.head_dim = HEAD_DIM;
    Ok((z, zc))
}

fn plot(run: &Run, m: &Metrics, args: &PleasArgs) -> anyhow::Result<()> {
    let mut series: Vec<Series> = args
        .matchings()
        .iter()
        .map(|mt| {
            let pts = m
                .merges
                .iter()
                .filter(|r| r.matching == mt.name())
                .map(|r| (r.ratio, r.loss.mean))
                .collect();
            Series::line(mt.name(), pts)
        })
        .collect();
    for (name, l) in [("A alone", m.a.mean), ("B alone", m.b.mean)] {
        series.push(Series::line(name, vec![(0.0, l), (1.0, l)]));
    }
    line_chart(
        &run.dir.join("loss_vs_ratio"),
        "Mean held-out loss on both texts vs merge ratio",
        "fraction of heads and FFN channels merged",
        "loss (nats/token)",
        &series,
    )
}

fn report(m: &Metrics) -> String {
    let s = &m.shape;
    let mut md = format!(
        "# Partial merging of two LLaMA-style decoders (ZipIt!/PLeaS zip)\n\n\
         Two character-level decoders (width {}, {} blocks, {} heads of {HEAD_DIM}, FFN {}), trained {} steps each: \
         A on Moby-Dick, B on the State of the Union addresses. In every block the most alike fraction `ratio` of \
         key/value heads and FFN channels (after aligning B) is merged, the rest kept side by side; the residual stream is merged whole. \
         Losses are held-out nats/token; no least squares (the `pleas` MLP study has it).\n\n\
         | model | Moby-Dick | addresses | mean |\n|---|---|---|---|\n| A | {:.3} | {:.3} | {:.3} |\n| B | {:.3} | {:.3} | {:.3} |\n\n\
         | matching | ratio | kv heads | FFN | params ÷ one model | Moby-Dick | addresses | mean |\n|---|---|---|---|---|---|---|---|\n",
        s.hidden,
        s.layers,
        s.heads,
        s.ffn,
        s.steps,
        m.a.moby_dick,
        m.a.sotu,
        m.a.mean,
        m.b.moby_dick,
        m.b.sotu,
        m.b.mean
    );
    for r in &m.merges {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {:.2} | {:.3} | {:.3} | {:.3} |\n",
            r.matching,
            r.ratio,
            r.kv_heads,
            r.ffn,
            r.params_ratio,
            r.loss.moby_dick,
            r.loss.sotu,
            r.loss.mean
        ));
    }
    md.push_str("\n![loss vs ratio](loss_vs_ratio.png)\n");
    md
}
