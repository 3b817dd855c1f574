//! `permute match A B`: align checkpoint B to checkpoint A by weight matching.
//!
//! ```text
//! permute match A B [--arch mlp|vgg|resnet|llama|bert] [--out B_ALIGNED] [--seed S]
//!                   [--max-iter N] [--heads H] [--config config.json] [--json]
//! ```
//! A and B are safetensors files or sharded folders (GGUF works too). The
//! architecture is inferred from tensor names when `--arch` is omitted:
//! `model.embed_tokens.weight` → llama, `*embeddings.word_embeddings.weight` →
//! bert, `conv1.weight` + `layer1.*` → resnet, `features.*` + `classifier.*` →
//! vgg, otherwise an MLP named
//! `<stem><index>.weight` (see `permute::builders::mlp`). Attention head counts
//! come from `--heads` or from the `config.json` next to A (or `--config`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use permute::builders::{SpecHints, infer_spec};
use permute::{MatchOptions, apply, weight_matching};
use weights::{CheckpointWriter, DEFAULT_SHARD_BYTES, StateDict, TensorInfo, TensorSource};

#[derive(Parser)]
#[command(
    name = "permute",
    version,
    about = "Align neural networks by permutation (Git Re-Basin weight matching)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Align checkpoint B to checkpoint A.
    Match {
        a: PathBuf,
        b: PathBuf,
        /// mlp, vgg, resnet, llama or bert (inferred from names when omitted).
        #[arg(long)]
        arch: Option<String>,
        /// Write the permuted B here (.safetensors file or sharded folder).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Seed of the group visiting order.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Most passes over all groups.
        #[arg(long, default_value_t = 100)]
        max_iter: usize,
        /// Attention heads (llama/bert), if no config.json says it.
        #[arg(long)]
        heads: Option<usize>,
        /// Key/value heads (llama), default: heads.
        #[arg(long)]
        kv_heads: Option<usize>,
        /// A Hugging Face config.json (default: next to A).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn config_text(a: &Path, explicit: Option<&Path>) -> Option<String> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => {
            let dir = if a.is_dir() {
                a.to_path_buf()
            } else {
                a.parent()?.to_path_buf()
            };
            dir.join("config.json")
        }
    };
    std::fs::read_to_string(path).ok()
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    weights::cli::main(weights::atomic::OnInterrupt::RestoreOutputs, || run(cli))
}

fn run(cli: Cli) -> Result<()> {
    let Command::Match {
        a,
        b,
        arch,
        out,
        seed,
        max_iter,
        heads,
        kv_heads,
        config,
        json,
    } = cli.command;
    let sa = StateDict::load(&a).with_context(|| format!("reading {}", a.display()))?;
    let sb = StateDict::load(&b).with_context(|| format!("reading {}", b.display()))?;
    let cfg = config_text(&a, config.as_deref());
    let hints = SpecHints {
        arch: arch.as_deref(),
        config_json: cfg.as_deref(),
        heads,
        kv_heads,
    };
    let (arch, spec) = infer_spec(&sa, &hints).context(
        "building the permutation spec (pass --arch, --heads/--kv-heads or --config where the checkpoint does not tell)",
    )?;
    let started = Instant::now();
    let res = weight_matching(
        &spec,
        &sa,
        &sb,
        &MatchOptions {
            seed,
            max_iter,
            ..Default::default()
        },
    )?;
    let seconds = started.elapsed().as_secs_f64();
    if let Some(out) = &out {
        if out
            .canonicalize()
            .ok()
            .is_some_and(|o| Some(o) == b.canonicalize().ok())
        {
            bail!("refusing to overwrite input {}", b.display());
        }
        let aligned = apply(&spec, &res.perm, &sb)?;
        let plan: Vec<TensorInfo> = aligned.infos();
        let mut w = CheckpointWriter::create(out, &plan, &aligned.metadata, DEFAULT_SHARD_BYTES)?;
        for (name, t) in aligned.iter() {
            w.write(name, t.data.view())?;
        }
        w.finish()?;
    }
    let objective = res.objective.last().copied().unwrap_or(0.0);
    if json {
        let v = serde_json::json!({
            "arch": arch,
            "groups": spec.groups.len(),
            "l2_before": res.l2_before,
            "l2_after": res.l2_after,
            "passes": res.passes,
            "objective": objective,
            "objective_per_pass": res.objective,
            "seconds": seconds,
            "out": out,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{arch}: {} groups, {} passes in {seconds:.3} s; L2 distance {:.6} -> {:.6}; objective {objective:.6}",
            spec.groups.len(),
            res.passes,
            res.l2_before,
            res.l2_after
        );
        if let Some(out) = out {
            println!("wrote {}", out.display());
        }
    }
    Ok(())
}
