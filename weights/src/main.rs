//! `weights`: inspect and convert checkpoints.
//!
//! ```text
//! weights inspect PATH [--json]
//! weights convert IN OUT [--dtype f32|f16|bf16|f64] [--shard-size BYTES]
//! ```
//! PATH/IN may be a safetensors file, a sharded folder (or its index) or a
//! GGUF file. `convert` writes one safetensors file when OUT ends in
//! `.safetensors`, otherwise a sharded folder; it streams tensor by tensor.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use serde::Serialize;
use weights::stats::tensor_stats;
use weights::{Checkpoint, CheckpointWriter, DType, TensorInfo, TensorSource, output_dtype};

#[derive(Parser)]
#[command(
    name = "weights",
    version,
    about = "Inspect and convert model checkpoints (safetensors, sharded, GGUF)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List every tensor with dtype, shape and min/max/mean/std/NaN count.
    Inspect {
        /// A .safetensors file, a sharded folder (or its index.json) or a .gguf file.
        path: PathBuf,
        /// Print a JSON array, one object per tensor.
        #[arg(long)]
        json: bool,
    },
    /// Convert between formats (GGUF to safetensors with Hugging Face names and layout).
    Convert {
        /// Input checkpoint.
        input: PathBuf,
        /// Output: a path ending in .safetensors for one file, otherwise a folder for a sharded checkpoint.
        output: PathBuf,
        /// Store floating-point tensors as this dtype (default: as stored; quantised tensors become f32).
        #[arg(long, value_parser = parse_dtype)]
        dtype: Option<DType>,
        /// Maximum shard size in bytes for folder output (suffixes KB, MB, GB accepted).
        #[arg(long, default_value = "5GB", value_parser = parse_size)]
        shard_size: u64,
    },
}

fn parse_dtype(s: &str) -> Result<DType, String> {
    DType::parse_float(s)
        .ok_or_else(|| format!("unknown dtype '{s}' (expected f32, f16, bf16 or f64)"))
}

fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_uppercase();
    let (num, mult) = [
        ("GB", 1_000_000_000u64),
        ("MB", 1_000_000),
        ("KB", 1_000),
        ("B", 1),
    ]
    .iter()
    .find_map(|(suf, m)| t.strip_suffix(suf).map(|n| (n.trim().to_string(), *m)))
    .unwrap_or((t.clone(), 1));
    let n: f64 = num.parse().map_err(|_| format!("invalid size '{s}'"))?;
    if !n.is_finite() || n <= 0.0 {
        return Err(format!("size must be positive, got '{s}'"));
    }
    Ok((n * mult as f64) as u64)
}

#[derive(Serialize)]
struct Row {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    numel: usize,
    min: Option<f64>,
    max: Option<f64>,
    mean: Option<f64>,
    std: Option<f64>,
    nan: usize,
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.4e}")).unwrap_or_else(|| "-".into())
}

fn inspect(path: &Path, json: bool) -> Result<()> {
    let ckpt = Checkpoint::open(path)?;
    let infos = ckpt.infos();
    let mut rows = Vec::with_capacity(infos.len());
    for info in &infos {
        let t = ckpt.load(&info.name)?;
        let s = tensor_stats(t.data.view());
        rows.push(Row {
            name: info.name.clone(),
            dtype: info.dtype.to_string(),
            shape: info.shape.clone(),
            numel: s.numel,
            min: s.min,
            max: s.max,
            mean: s.mean,
            std: s.std,
            nan: s.nan,
        });
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let params: usize = rows.iter().map(|r| r.numel).sum();
    println!(
        "{} ({}): {} tensors, {} parameters",
        path.display(),
        ckpt.format(),
        rows.len(),
        params
    );
    if let Checkpoint::Gguf(g) = &ckpt {
        println!("GGUF v{}, {:?}", g.version(), g.config());
    }
    let w = rows.iter().map(|r| r.name.len()).max().unwrap_or(4).max(4);
    println!(
        "{:<w$}  {:<7} {:<16} {:>11} {:>11} {:>11} {:>11} {:>6}",
        "name", "dtype", "shape", "min", "max", "mean", "std", "nan"
    );
    for r in &rows {
        println!(
            "{:<w$}  {:<7} {:<16} {:>11} {:>11} {:>11} {:>11} {:>6}",
            r.name,
            r.dtype,
            format!("{:?}", r.shape),
            fmt_opt(r.min),
            fmt_opt(r.max),
            fmt_opt(r.mean),
            fmt_opt(r.std),
            r.nan
        );
    }
    Ok(())
}

/// The files `transformers` keeps beside the weights, copied along by `convert`.
const SIDE_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

fn convert(input: &Path, output: &Path, dtype: Option<DType>, shard_size: u64) -> Result<()> {
    let ckpt = Checkpoint::open(input)?;
    let in_dir = if input.is_dir() {
        input.to_path_buf()
    } else {
        weights_parent(input)
    };
    let single = CheckpointWriter::is_single_file(output);
    let out_dir = if single {
        weights_parent(output)
    } else {
        output.to_path_buf()
    };
    if same_file(input, output) || (!single && same_file(&in_dir, &out_dir) && input.is_dir()) {
        bail!("refusing to write {} over its own input", output.display());
    }
    let plan: Vec<TensorInfo> = ckpt
        .infos()
        .into_iter()
        .map(|i| TensorInfo {
            dtype: output_dtype(i.dtype, dtype),
            ..i
        })
        .collect();
    let metadata = ckpt.metadata().clone();
    let started = std::time::Instant::now();
    let mut w = CheckpointWriter::create(output, &plan, &metadata, shard_size)?;
    for info in &plan {
        w.write(&info.name, ckpt.load(&info.name)?.data.view())?;
    }
    w.finish()?;
    // Side files: a config written from GGUF metadata, or the input's own.
    let mut wrote_config = false;
    let mut wrote_tokenizer = false;
    if let Checkpoint::Gguf(g) = &ckpt {
        if let Some(cfg) = g.config().to_hf_config() {
            weights::atomic::write_atomic(
                out_dir.join("config.json"),
                serde_json::to_string_pretty(&cfg)?.as_bytes(),
            )?;
            wrote_config = true;
        }
        // tokenizer.json and tokenizer_config.json from the GGUF's vocabulary,
        // merges and chat template, so the folder generates on its own.
        match weights::HfTokenizerFiles::from_gguf(g) {
            Ok(files) => {
                files.save(&out_dir)?;
                wrote_tokenizer = true;
            }
            Err(e) => eprintln!("note: no tokenizer files written: {e}"),
        }
    } else if !same_file(&in_dir, &out_dir) {
        for name in SIDE_FILES {
            let src = in_dir.join(name);
            if src.is_file() {
                let bytes =
                    std::fs::read(&src).with_context(|| format!("reading {}", src.display()))?;
                weights::atomic::write_atomic(out_dir.join(name), &bytes)?;
                wrote_config |= *name == "config.json";
            }
        }
    }
    eprintln!(
        "wrote {} tensors to {}{} in {:.2} s",
        plan.len(),
        output.display(),
        match (wrote_config, wrote_tokenizer) {
            (true, true) => " (with config.json and tokenizer files)",
            (true, false) => " (with config.json)",
            (false, true) => " (with tokenizer files)",
            (false, false) => "",
        },
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn weights_parent(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // A half-converted folder is worse than none: an interrupt restores it.
    weights::cli::main(weights::atomic::OnInterrupt::RestoreOutputs, || {
        match cli.command {
            Command::Inspect { path, json } => inspect(&path, json),
            Command::Convert {
                input,
                output,
                dtype,
                shard_size,
            } => convert(&input, &output, dtype, shard_size),
        }
    })
}
