//! `spectra`: per-layer spectral report of a checkpoint.
//!
//! ```text
//! spectra report PATH [--json | --csv] [--out FILE] [--farms] [--min-evals N]
//!                [--fix-fingers none|xmin-peak|clip-xmax] [--conv per-position|flatten]
//!                [--normalize] [--randomize SEED]
//! ```

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use spectra::esd::ConvMode;
use spectra::farms::FarmsOptions;
use spectra::powerlaw::FixFingers;
use spectra::report::{LayerReport, ReportOptions, analyze_source, to_csv};
use weights::Checkpoint;

#[derive(Parser)]
#[command(
    name = "spectra",
    version,
    about = "WeightWatcher-style spectral analysis of model checkpoints"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Fingers {
    None,
    XminPeak,
    ClipXmax,
}

#[derive(Clone, Copy, ValueEnum)]
enum Conv {
    PerPosition,
    Flatten,
}

#[derive(Subcommand)]
enum Command {
    /// One row of metrics per weight matrix of a safetensors file, sharded folder or GGUF file.
    Report {
        path: PathBuf,
        /// JSON array, one object per layer.
        #[arg(long, conflicts_with = "csv")]
        json: bool,
        /// CSV table.
        #[arg(long)]
        csv: bool,
        /// Write to this file (atomically) instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Also compute FARMS α (fixed-aspect-ratio subsampling).
        #[arg(long)]
        farms: bool,
        /// Least eigenvalues for a power-law fit.
        #[arg(long, default_value_t = 8)]
        min_evals: usize,
        /// How xmin is chosen.
        #[arg(long, value_enum, default_value = "none")]
        fix_fingers: Fingers,
        /// Convolution kernels per kernel position (pooled) or flattened.
        #[arg(long, value_enum, default_value = "per-position")]
        conv: Conv,
        /// Divide eigenvalues by the larger dimension N.
        #[arg(long)]
        normalize: bool,
        /// Also compare each ESD with that of the shuffled matrix (seed).
        #[arg(long)]
        randomize: Option<u64>,
    },
}

fn fmt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into())
}

fn table(rows: &[LayerReport]) -> String {
    let w = rows.iter().map(|r| r.name.len()).max().unwrap_or(4).max(4);
    let mut s = format!(
        "{:<w$}  {:<12} {:>7} {:>9} {:>6} {:>7} {:>8} {:>8} {:>7} {:>6} {:>7} {:>7}  {}\n",
        "name",
        "shape",
        "alpha",
        "xmin",
        "D",
        "a_wtd",
        "lognorm",
        "logspec",
        "stabrk",
        "spikes",
        "softrk",
        "farms",
        "status"
    );
    for r in rows {
        s.push_str(&format!(
            "{:<w$}  {:<12} {:>7} {:>9} {:>6} {:>7} {:>8} {:>8} {:>7} {:>6} {:>7} {:>7}  {}{}\n",
            r.name,
            r.shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join("x"),
            fmt(r.alpha),
            r.xmin.map(|x| format!("{x:.3e}")).unwrap_or("-".into()),
            fmt(r.ks_distance),
            fmt(r.alpha_weighted),
            fmt(r.log_norm),
            fmt(r.log_spectral_norm),
            fmt(r.stable_rank),
            r.num_spikes.map(|x| x.to_string()).unwrap_or("-".into()),
            fmt(r.mp_softrank),
            fmt(r.farms_alpha.flatten()),
            r.status,
            r.warning
                .as_ref()
                .map(|w| format!(" ({w})"))
                .unwrap_or_default(),
        ));
    }
    s
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    weights::cli::main(weights::atomic::OnInterrupt::RestoreOutputs, || run(cli))
}

fn run(cli: Cli) -> Result<()> {
    let Command::Report {
        path,
        json,
        csv,
        out,
        farms,
        min_evals,
        fix_fingers,
        conv,
        normalize,
        randomize,
    } = cli.command;
    let opts = ReportOptions {
        fix_fingers: match fix_fingers {
            Fingers::None => FixFingers::None,
            Fingers::XminPeak => FixFingers::XminPeak,
            Fingers::ClipXmax => FixFingers::ClipXmax {
                max_fingers: 10,
                finger_thresh: 1.0,
            },
        },
        min_evals,
        conv: match conv {
            Conv::PerPosition => ConvMode::PerPosition,
            Conv::Flatten => ConvMode::Flatten,
        },
        normalize,
        farms: farms.then(FarmsOptions::default),
        randomize,
        ..ReportOptions::default()
    };
    let ckpt = Checkpoint::open(&path)?;
    let started = std::time::Instant::now();
    let tty = std::io::stderr().is_terminal();
    let rows = analyze_source(&ckpt, &opts, &|done, total, name| {
        if tty {
            eprint!("\r\x1b[Kanalysed {done}/{total}: {name}");
        } else if done == total || done % 50 == 0 {
            eprintln!("analysed {done}/{total} layers");
        }
    })?;
    if tty {
        eprintln!();
    }
    eprintln!(
        "{} layers in {:.2} s",
        rows.len(),
        started.elapsed().as_secs_f64()
    );
    let text = if json {
        serde_json::to_string_pretty(&rows)? + "\n"
    } else if csv {
        to_csv(&rows)
    } else {
        table(&rows)
    };
    match out {
        Some(p) => weights::atomic::write_atomic(&p, text.as_bytes())?,
        None => print!("{text}"),
    }
    Ok(())
}
