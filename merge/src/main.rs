//! `merge CONFIG.yml OUT` — runs a mergekit configuration.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use merge::run::{EmbedPolicy, RunOptions, run_file};
use weights::atomic::OnInterrupt;

#[derive(Parser)]
#[command(
    name = "merge",
    about = "Runs a mergekit YAML merge config over safetensors / sharded / GGUF checkpoints",
    after_help = after_help()
)]
struct Cli {
    /// The mergekit YAML config.
    config: PathBuf,
    /// Output: a folder (sharded safetensors + config/tokenizer files) or a .safetensors file.
    out: PathBuf,
    /// Seed of random sparsification (DARE, DELLA).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Largest output shard, e.g. 5GB, 500MB.
    #[arg(long, default_value = "5GB")]
    shard_size: String,
    /// Memory budget for tensors in flight, e.g. 2GB (default: two of the largest tensor's working sets).
    #[arg(long)]
    max_memory: Option<String>,
    /// Where an embedding's vocabulary differs from the base's, take the base's rows for missing tokens.
    #[arg(long)]
    embed_base_rows: bool,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
    /// Print the run report as JSON.
    #[arg(long)]
    json: bool,
}

fn after_help() -> String {
    format!("Methods: {}", merge::Method::names().join(", "))
}

fn parse_size(s: &str) -> anyhow::Result<u64> {
    let t = s.trim().to_ascii_uppercase();
    let (num, mult) = [
        ("GB", 1u64 << 30),
        ("MB", 1 << 20),
        ("KB", 1 << 10),
        ("B", 1),
    ]
    .iter()
    .find_map(|(suf, m)| t.strip_suffix(suf).map(|n| (n.trim().to_string(), *m)))
    .unwrap_or((t.clone(), 1));
    let v: f64 = num
        .parse()
        .with_context(|| format!("invalid size '{s}' (e.g. 5GB, 500MB)"))?;
    anyhow::ensure!(v > 0.0, "size '{s}' must be positive");
    Ok((v * mult as f64) as u64)
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // A half-merged folder is worse than none: an interrupt restores it.
    weights::cli::main(OnInterrupt::RestoreOutputs, || run(cli))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let opts = RunOptions {
        seed: cli.seed,
        shard_bytes: parse_size(&cli.shard_size)?,
        max_memory: cli.max_memory.as_deref().map(parse_size).transpose()?,
        progress: !cli.quiet && !cli.json,
        embed: if cli.embed_base_rows {
            EmbedPolicy::BaseRows
        } else {
            EmbedPolicy::Error
        },
    };
    let report = run_file(&cli.config, &cli.out, &opts)?;
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        eprintln!(
            "merged {} tensors ({} elements) into {} in {:.2} s",
            report.tensors,
            report.elements,
            cli.out.display(),
            report.seconds
        );
    }
    Ok(())
}
