//! `merge CONFIG.yml OUT` — runs a mergekit configuration.
//! `merge extract-lora BASE FINETUNED OUT` — turns a fine-tune into a LoRA
//! adapter (mergekit-extract-lora).
//! `merge moe CONFIG.yml OUT` — a Mixtral mixture of experts from fine-tunes
//! (mergekit-moe).

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
    /// DARE's and DELLA's draws from a hash of each task-vector value and
    /// position instead of the seeded generator, so another tool can make the
    /// same mask (see `sparsify::value_hash_uniform`).
    #[arg(long)]
    value_hash_draws: bool,
}

fn after_help() -> String {
    format!(
        "Methods: {}\n\n`merge extract-lora --help`: a fine-tune as a LoRA adapter.\n\
         `merge moe --help`: fine-tunes as the experts of a Mixtral mixture (mergekit-moe).",
        merge::Method::names().join(", ")
    )
}

/// `merge extract-lora`: a fine-tune as a PEFT LoRA adapter, per linear weight
/// the truncated SVD of its change (mergekit-extract-lora's semantics).
#[derive(Parser)]
#[command(name = "merge extract-lora")]
struct ExtractCli {
    /// The base model (folder or file).
    base: PathBuf,
    /// The fine-tuned model.
    finetuned: PathBuf,
    /// Output adapter folder (adapter_model.safetensors, adapter_config.json, extraction.json).
    out: PathBuf,
    /// Largest rank of a module.
    #[arg(long, alias = "max-rank", default_value_t = 128)]
    rank: usize,
    /// Drop singular values at or below this (absolute, as mergekit's --sv-epsilon).
    #[arg(long, default_value_t = 0.0)]
    sv_epsilon: f64,
    /// Drop singular values below this fraction of each module's largest.
    #[arg(long, default_value_t = 0.0)]
    sv_relative: f64,
    /// Put all of Σ in A instead of √Σ in each factor.
    #[arg(long)]
    no_distribute_scale: bool,
    /// Save this module (name or last component) at full rank; repeatable.
    #[arg(long = "save-module")]
    save_module: Vec<String>,
    /// Only extract modules matching this regex; repeatable.
    #[arg(long = "include-regex", short = 'i')]
    include: Vec<String>,
    /// Leave out modules matching this regex; repeatable.
    #[arg(long = "exclude-regex", short = 'e')]
    exclude: Vec<String>,
    /// Drop tensors that cannot be decomposed (norms) instead of saving them at full rank.
    #[arg(long)]
    skip_undecomposable: bool,
}

fn extract(cli: ExtractCli) -> anyhow::Result<()> {
    use weights::Checkpoint;
    let base = Checkpoint::open(&cli.base)?;
    let ft = Checkpoint::open(&cli.finetuned)?;
    let opts = merge::extract::ExtractOptions {
        max_rank: cli.rank,
        sv_epsilon: cli.sv_epsilon,
        sv_relative: cli.sv_relative,
        distribute_scale: !cli.no_distribute_scale,
        modules_to_save: cli.save_module,
        include: cli.include,
        exclude: cli.exclude,
        skip_undecomposable: cli.skip_undecomposable,
    };
    let ex = merge::extract::extract_lora(&base, &ft, &opts)?;
    merge::extract::save_extraction(&ex, &cli.out)?;
    let lora: Vec<_> = ex.report.iter().filter(|t| t.kind == "lora").collect();
    let worst = lora.iter().map(|t| t.relative_error).fold(0.0f64, f64::max);
    eprintln!(
        "extracted {} LoRA modules (rank ≤ {}, worst relative error {:.3e}) and {} full-rank tensors into {}",
        lora.len(),
        ex.adapter.config.r,
        worst,
        ex.report.iter().filter(|t| t.kind == "full").count(),
        cli.out.display()
    );
    Ok(())
}

/// `merge moe`: a Mixtral mixture of experts from fine-tunes of one base,
/// from a mergekit-moe YAML config.
#[derive(Parser)]
#[command(
    name = "merge moe",
    after_help = "gate_mode random and uniform_random are drawn here (seeded). hidden, hidden_avg \
                  and cheap_embed need the base model's tokenizer and forward pass: run \
                  `cargo run -p experiments --release -- merge-moe CONFIG OUT`, or pass gates \
                  computed elsewhere with --gates."
)]
struct MoeCli {
    /// The mergekit-moe YAML config.
    config: PathBuf,
    /// Output folder (Hugging Face MixtralForCausalLM).
    out: PathBuf,
    /// Gate vectors: a safetensors file with one tensor `gates` of shape [layers, experts, hidden].
    #[arg(long)]
    gates: Option<PathBuf>,
    /// Seed of random gates and of experts' noise_scale.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Largest output shard, e.g. 5GB, 500MB.
    #[arg(long, default_value = "5GB")]
    shard_size: String,
}

fn moe(cli: MoeCli) -> anyhow::Result<()> {
    use merge::moe::{MoeJob, load_gates, random_gates};
    let job = MoeJob::load(&cli.config)?;
    let c = &job.base_config;
    let gates = match (&cli.gates, job.config.gate_mode) {
        (Some(p), _) => load_gates(p)?,
        (None, mode) if !mode.uses_prompts() => random_gates(
            mode,
            c.num_hidden_layers,
            job.config.experts.len(),
            c.hidden_size,
            cli.seed,
        )?,
        (None, mode) => anyhow::bail!(
            "gate_mode {mode:?} needs the base model's tokenizer{} (not in this crate): run \
             `cargo run -p experiments --release -- merge-moe {} {}`, or pass --gates FILE",
            if mode.needs_forward() {
                " and forward pass"
            } else {
                ""
            },
            cli.config.display(),
            cli.out.display()
        ),
    };
    let moe = job.build(
        gates.view(),
        cli.seed,
        &cli.out,
        parse_size(&cli.shard_size)?,
    )?;
    eprintln!(
        "wrote a mixture of {} experts (top-{}) over {} blocks, {} tensors, to {}",
        job.config.experts.len(),
        job.config.experts_per_token,
        c.num_hidden_layers,
        moe.weights.len(),
        cli.out.display()
    );
    Ok(())
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
    if std::env::args().nth(1).as_deref() == Some("moe") {
        let cli = MoeCli::parse_from(std::env::args().skip(1));
        return weights::cli::main(OnInterrupt::RemoveTemporaries, || moe(cli));
    }
    if std::env::args().nth(1).as_deref() == Some("extract-lora") {
        let cli = ExtractCli::parse_from(std::env::args().skip(1));
        return weights::cli::main(OnInterrupt::RemoveTemporaries, || extract(cli));
    }
    let cli = Cli::parse();
    // A half-merged folder is worse than none: an interrupt restores it.
    weights::cli::main(OnInterrupt::RestoreOutputs, || run(cli))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let opts = RunOptions {
        seed: cli.seed,
        shard_bytes: parse_size(&cli.shard_size)?,
        max_memory: cli.max_memory.as_deref().map(parse_size).transpose()?,
        progress: (!cli.quiet && !cli.json)
            .then(|| merge::run::Progress::new(weights::cli::progress_bar("tensors"))),
        embed: if cli.embed_base_rows {
            EmbedPolicy::BaseRows
        } else {
            EmbedPolicy::Error
        },
        draws: if cli.value_hash_draws {
            merge::sparsify::Draws::ValueHash
        } else {
            merge::sparsify::Draws::Seeded
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
