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
//! FFN channels, scored by its held-out loss on both texts, as zipped and
//! after PLeaS's per-layer least squares of every projection
//! ([`permute::zip::least_squares`] with [`LlamaProbe`]).

use std::path::PathBuf;

use anyhow::ensure;
use indexmap::IndexMap;
use permute::zip::{
    GroupPlan, LeastSquares, LeastSquaresOptions, ZipOptions, lookup_tables, plan_group, zip,
};
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
#[derive(Clone, Copy, Debug, Serialize, serde::Deserialize)]
pub struct TextLoss {
    /// On Moby-Dick (A's text).
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub moby_dick: f64,
    /// On the State of the Union addresses (B's text).
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub sotu: f64,
    /// Their mean.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub mean: f64,
}

/// One merged model.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Row {
    /// How B was aligned.
    pub matching: String,
    /// Fraction of each block's heads and FFN channels merged.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub ratio: f64,
    /// Key/value heads per block of the merged model.
    pub kv_heads: usize,
    /// FFN channels per block.
    pub ffn: usize,
    /// Parameters ÷ one model's.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub params_ratio: f64,
    /// The zip's losses (merged pairs averaged).
    pub loss: TextLoss,
    /// The losses after PLeaS's per-layer least squares.
    pub least_squares: TextLoss,
    /// Seconds of the least-squares solves (with their forward passes).
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub least_squares_seconds: f64,
}

/// What `metrics.json` holds.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Metrics {
    /// `llama`.
    pub arch: String,
    /// The two models' sizes.
    pub shape: Shape,
    /// Relative ridge of the least-squares solves.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub ridge: f64,
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
        arch: "llama".to_string(),
        shape: pair.shape.clone(),
        ridge: args.ridge,
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
        let mut solver = LeastSquares::new(&spec, &pair.a, &bp);
        for &ratio in &args.ratios {
            let z = run.phase(&format!("zip {} {ratio}", matching.name()), || {
                let ls = (&mut solver, args.ridge);
                merge(&spec, c, (&pair.a, &bp), (&sims, &probe), ratio, ls)
            })?;
            m.merges.push(Row {
                matching: matching.name().to_string(),
                ratio,
                kv_heads: z.config.num_key_value_heads,
                ffn: z.config.intermediate_size,
                params_ratio: z.zipped.numel() as f64 / pair.a.numel() as f64,
                loss: score(&z.config, &z.zipped)?,
                least_squares: score(&z.config, &z.least_squares)?,
                least_squares_seconds: z.least_squares_seconds,
            });
            run.partial(&m)?;
        }
    }
    plot(&run, &m, args)?;
    let md = report(&m);
    run.finish(&m, &md)?;
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
    crate::studies::pleas::check_ridge(args.ridge)?;
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
/// heads and FFN channels by similarity), the same zip refined by PLeaS's
/// per-layer least squares on the `probe` tokens (every projection of every
/// block, [`least_squares_steps`]; `solver` keeps A's and B's outputs from
/// one ratio to the next), and the merged model's config.
fn merge(
    spec: &PermutationSpec,
    c: &LlamaConfig,
    (a, bp): (&StateDict, &StateDict),
    (sims, probe): (&IndexMap<String, Vec<f64>>, &Sample),
    ratio: f64,
    (solver, ridge): (&mut LeastSquares, f64),
) -> anyhow::Result<Merged> {
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
    let zipped = zip(spec, a, bp, &plan, &opts)?;
    let kv = plan[&permute::builders::llama_heads_group(0)].width();
    let ffn = plan[&permute::builders::llama_ffn_group(0)].width();
    let mut config = LlamaConfig::tiny(
        c.vocab_size,
        c.hidden_size,
        c.num_hidden_layers,
        kv * (c.num_attention_heads / c.num_key_value_heads),
        kv,
        ffn,
    );
    config.head_dim = HEAD_DIM;
    let t = std::time::Instant::now();
    let ls = LeastSquaresOptions {
        steps: least_squares_steps(c),
        ridge,
    };
    let mut llama_probe = LlamaProbe::new(c, &config, probe);
    let least_squares = solver.merge(&plan, &opts, &ls, &mut llama_probe)?;
    Ok(Merged {
        zipped,
        least_squares,
        least_squares_seconds: t.elapsed().as_secs_f64(),
        config,
    })
}

/// One partial merge of two decoders.
struct Merged {
    zipped: StateDict,
    least_squares: StateDict,
    least_squares_seconds: f64,
    config: LlamaConfig,
}

fn plot(run: &Run, m: &Metrics, args: &PleasArgs) -> anyhow::Result<()> {
    let mut series = Vec::new();
    for mt in args.matchings() {
        for (method, pick) in [
            ("zip", (|r: &Row| r.loss.mean) as fn(&Row) -> f64),
            ("least squares", |r: &Row| r.least_squares.mean),
        ] {
            let pts = m
                .merges
                .iter()
                .filter(|r| r.matching == mt.name())
                .map(|r| (r.ratio, pick(r)))
                .collect();
            series.push(Series::line(format!("{} {method}", mt.name()), pts));
        }
    }
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
         *zip* averages each merged pair; *least squares* (PLeaS) then solves every projection of every block in turn, so that fed the merged \
         model's own inputs it reproduces the zip of both models' outputs on one batch of each text (ridge {}). \
         Losses are held-out nats/token.\n\n\
         | model | Moby-Dick | addresses | mean |\n|---|---|---|---|\n| A | {:.3} | {:.3} | {:.3} |\n| B | {:.3} | {:.3} | {:.3} |\n\n\
         | matching | ratio | kv heads | FFN | params ÷ one model | zip: Moby-Dick | zip: addresses | zip: mean | LS: Moby-Dick | LS: addresses | LS: mean | LS seconds |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        s.hidden,
        s.layers,
        s.heads,
        s.ffn,
        s.steps,
        m.ridge,
        m.a.moby_dick,
        m.a.sotu,
        m.a.mean,
        m.b.moby_dick,
        m.b.sotu,
        m.b.mean
    );
    for r in &m.merges {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {:.2} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.1} |\n",
            r.matching,
            r.ratio,
            r.kv_heads,
            r.ffn,
            r.params_ratio,
            r.loss.moby_dick,
            r.loss.sotu,
            r.loss.mean,
            r.least_squares.moby_dick,
            r.least_squares.sotu,
            r.least_squares.mean,
            r.least_squares_seconds
        ));
    }
    md.push_str("\n![loss vs ratio](loss_vs_ratio.png)\n");
    md
}

/// The least-squares steps of a LLaMA: per block, q/k/v (one input), o_proj,
/// gate/up (one input), down_proj. The embeddings, norms and LM head keep
/// their zipped values.
pub fn least_squares_steps(c: &LlamaConfig) -> Vec<Vec<String>> {
    use weights::llama::names;
    let mut steps = Vec::with_capacity(4 * c.num_hidden_layers);
    for l in 0..c.num_hidden_layers {
        for parts in [
            &[names::Q_PROJ, names::K_PROJ, names::V_PROJ][..],
            &[names::O_PROJ],
            &[names::GATE_PROJ, names::UP_PROJ],
            &[names::DOWN_PROJ],
        ] {
            steps.push(parts.iter().map(|p| names::weight(l, p)).collect());
        }
    }
    steps
}

/// The [`permute::zip::Probe`] of two LLaMA decoders and their zip on the
/// probe tokens: every projection's input from the CPU model's
/// [`s2ft_core::Llama::linear_inputs`] (A and B of one config, the merged
/// model of another).
pub struct LlamaProbe<'p> {
    config: &'p LlamaConfig,
    merged: &'p LlamaConfig,
    probe: &'p Sample,
}

impl<'p> LlamaProbe<'p> {
    /// The probe of models of `config` zipped into a model of `merged`, on `probe`'s tokens.
    pub fn new(config: &'p LlamaConfig, merged: &'p LlamaConfig, probe: &'p Sample) -> Self {
        LlamaProbe {
            config,
            merged,
            probe,
        }
    }
}

impl permute::zip::Probe for LlamaProbe<'_> {
    fn inputs(
        &mut self,
        source: permute::zip::Source,
        sd: &StateDict,
        weight: &str,
    ) -> Result<ndarray::Array2<f64>, permute::zip::ProbeError> {
        use crate::studies::lmc_llama::{probe_tokens, to_array};
        use weights::llama::names;
        let c = match source {
            permute::zip::Source::Merged => self.merged,
            _ => self.config,
        };
        let (l, part) = (0..c.num_hidden_layers)
            .find_map(|l| {
                names::PROJS
                    .iter()
                    .find(|p| names::weight(l, p) == weight)
                    .map(|p| (l, *p))
            })
            .ok_or_else(|| format!("'{weight}' is not a projection of the LLaMA"))?;
        let model = cpu_model(c, sd)?;
        let x = model
            .linear_inputs(probe_tokens(self.probe))
            .into_iter()
            .nth(l)
            .expect("one input set per block");
        let t = match part {
            names::Q_PROJ | names::K_PROJ | names::V_PROJ => x.attn,
            names::O_PROJ => x.o_proj,
            names::GATE_PROJ | names::UP_PROJ => x.mlp,
            _ => x
                .down_proj
                .ok_or_else(|| format!("block {l} has no dense FFN"))?,
        };
        Ok(to_array(t).mapv(f64::from))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lm::{VOCAB, held_out};

    fn probe_text() -> Sample {
        // Every byte value, so that the inputs span the embedding's rows.
        let text: Vec<u8> = (0..4000u32).map(|i| (i * 37 % 127) as u8).collect();
        held_out(1, 5, |r| Sample::text(&text, 4, 32, r))
            .pop()
            .unwrap()
    }

    /// Least squares of a decoder with itself merged whole finds the decoder
    /// again (every target is its own output on its own inputs); with a
    /// different decoder, the first solve (q/k/v of block 0, whose input the
    /// zip and the solve share) fits the zipped targets better than the zip.
    #[test]
    fn least_squares_of_a_llama_finds_itself_and_fits_better_than_the_zip() {
        let c = LlamaConfig::tiny(VOCAB, 2 * HEAD_DIM, 2, 2, 2, 24);
        let a = s2ft_core::model::random_state_dict(&c, 1);
        let spec = permute::builders::llama(&c, &a).unwrap();
        let probe = probe_text();
        let sims: IndexMap<String, Vec<f64>> = spec
            .groups
            .iter()
            .map(|g| (g.name.clone(), vec![1.0; g.blocks]))
            .collect();
        let mut solver = LeastSquares::new(&spec, &a, &a);
        let m = merge(
            &spec,
            &c,
            (&a, &a),
            (&sims, &probe),
            1.0,
            (&mut solver, 1e-10),
        )
        .unwrap();
        for (name, t) in a.iter() {
            let got = m.least_squares.get(name).unwrap();
            let d = (&t.data - &got.data)
                .iter()
                .fold(0f32, |x, v| x.max(v.abs()));
            assert!(d < 2e-3, "{name}: {d}");
        }
        // Half the heads and channels merged with another decoder.
        let b = s2ft_core::model::random_state_dict(&c, 2);
        let mut solver = LeastSquares::new(&spec, &a, &b);
        let m = merge(
            &spec,
            &c,
            (&a, &b),
            (&sims, &probe),
            0.5,
            (&mut solver, 1e-6),
        )
        .unwrap();
        assert_eq!(m.config.intermediate_size, 36);
        let q = weights::llama::names::weight(0, weights::llama::names::Q_PROJ);
        let mut p = LlamaProbe::new(&c, &m.config, &probe);
        use permute::zip::{Probe, Source};
        let x = p.inputs(Source::Merged, &m.zipped, &q).unwrap();
        let xa = p.inputs(Source::A, &a, &q).unwrap();
        let xb = p.inputs(Source::B, &b, &q).unwrap();
        let w = |sd: &StateDict| {
            sd.get(&q)
                .unwrap()
                .data
                .mapv(f64::from)
                .into_dimensionality::<ndarray::Ix2>()
                .unwrap()
        };
        let (za, zb) = (xa.dot(&w(&a).t()), xb.dot(&w(&b).t()));
        // The merged pair is the query head of the merged kv head (one of
        // the two, at ratio 0.5), then A's and B's kept apart.
        assert_eq!(m.config.num_key_value_heads, 3);
        let residual = |sd: &StateDict| {
            let z = x.dot(&w(sd).t());
            let mut r = 0.0;
            for (u, col) in z.columns().into_iter().enumerate() {
                // Units are [merged head | A's head | B's head] × HEAD_DIM.
                let (h, off) = (u / HEAD_DIM, u % HEAD_DIM);
                for (i, v) in col.iter().enumerate() {
                    let t = match h {
                        0 => 0.5 * (za[[i, off]] + zb[[i, off]]),
                        1 => za[[i, HEAD_DIM + off]],
                        _ => zb[[i, HEAD_DIM + off]],
                    };
                    r += (v - t).powi(2);
                }
            }
            r
        };
        let (ls, zip) = (residual(&m.least_squares), residual(&m.zipped));
        assert!(ls < 0.9 * zip, "least squares {ls} vs zip {zip}");
    }
}
