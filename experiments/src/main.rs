//! `experiments`: one command per study of the toolkit.
//!
//! `cargo run -p experiments --release -- <study> [options]` runs a study and
//! writes `results/<study>/<run-id>/` (report.md, metrics.json, CSV, PNG+SVG).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use experiments::studies;

/// Counts heap bytes so studies can report peak memory.
#[global_allocator]
static ALLOC: experiments::alloc::Counting = experiments::alloc::Counting;

/// A study: its command name and what it shows.
struct Study {
    name: &'static str,
    about: &'static str,
    ready: bool,
}

const STUDIES: &[Study] = &[
    Study {
        name: "lmc",
        about: "linear mode connectivity of independently trained MLPs: naive vs weight matching vs activation matching vs STE",
        ready: true,
    },
    Study {
        name: "many",
        about: "MergeMany vs pairwise weight matching vs STE for 3-5 models",
        ready: true,
    },
    Study {
        name: "svd-align",
        about: "singular-vector alignment after permutation (Ito et al.)",
        ready: true,
    },
    Study {
        name: "spectra",
        about: "per-layer ESD report of a checkpoint: alpha, weighted alpha, stable rank, spikes, FARMS, WeLore",
        ready: true,
    },
    Study {
        name: "s2ft",
        about: "structured sparse fine-tuning vs LoRA vs full fine-tuning on a LLaMA-style model",
        ready: true,
    },
    Study {
        name: "merge",
        about: "merging per-task fine-tunes (full, LoRA, S²FT) by every merge method: the character model, or a real one with --model --finetunes RUN",
        ready: true,
    },
    Study {
        name: "moe",
        about: "a mixture of experts from per-task fine-tunes of a real LLM (mergekit-moe), compressed by Sub-MoE, pruning and averaging",
        ready: true,
    },
    Study {
        name: "pleas",
        about: "two MLPs trained on disjoint label sets: partial matching ratios, least squares (PLeaS) vs averaging",
        ready: true,
    },
    Study {
        name: "rws",
        about: "robust weight signatures: robustness to image corruptions as a weight patch (where it lives, how it composes, transfers and compresses)",
        ready: true,
    },
];

#[derive(Parser)]
#[command(
    name = "experiments",
    about = "Reproducible studies of model merging, alignment, spectra and sparse fine-tuning"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// List the studies.
    List,
    /// Linear mode connectivity of two trained MLPs: naive vs WM vs AM vs STE.
    Lmc(studies::lmc::LmcArgs),
    /// Merging 3-5 MLPs: MergeMany vs anchor WM vs anchor STE vs averaging.
    Many(studies::many::ManyArgs),
    /// Singular-vector alignment of the lmc models after WM / AM / STE / random / no permutation.
    SvdAlign(studies::svd_align::SvdAlignArgs),
    /// Per-layer ESD report of a checkpoint (alpha, weighted alpha, stable rank, spikes, FARMS, WeLore).
    Spectra(studies::spectra::SpectraArgs),
    /// S²FT vs LoRA vs full fine-tuning of a small LLaMA-style model: task quality, forgetting, memory, step time, fusion, switch time.
    S2ft(Box<studies::s2ft::S2ftArgs>),
    /// Merging full / LoRA / S²FT fine-tunes of one base by every merge method (the character model, or a real one: --model PATH --finetunes RUN_DIR).
    Merge(Box<studies::merging::MergeArgs>),
    /// A mixture of experts from per-task fine-tunes of a real model (mergekit-moe), then compressed (Sub-MoE, pruning, averaging).
    Moe(Box<studies::moe::MoeArgs>),
    /// PLeaS: two MLPs trained on disjoint label sets merged by partial matching, with least squares vs averaging.
    Pleas(studies::pleas::PleasArgs),
    /// Robust weight signatures: corruption fine-tunes of a CNN and an MLP as weight patches on MNIST and Fashion-MNIST.
    Rws(Box<studies::rws::RwsArgs>),
    /// Run a mergekit YAML config (same as `cargo run -p merge`).
    MergeConfig {
        /// The config.
        config: PathBuf,
        /// Output folder (or .safetensors file).
        out: PathBuf,
        /// Seed of random sparsification.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Run a mergekit-moe YAML config: a Mixtral mixture of experts from fine-tunes (every gate mode).
    MergeMoe {
        /// The mergekit-moe config.
        config: PathBuf,
        /// Output folder (Hugging Face MixtralForCausalLM).
        out: PathBuf,
        /// Seed of random gates and of experts' noise.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Compare the CPU and CUDA runs of scripts/gpu-check.sh (DIR/{lmc,s2ft}-{cpu,cuda}).
    CompareRuns {
        /// The folder gpu-check.sh wrote.
        dir: PathBuf,
    },
    /// A study that is not implemented yet.
    #[command(external_subcommand)]
    Other(Vec<String>),
}

fn list() -> String {
    let mut s = String::from("studies:\n");
    for st in STUDIES {
        s.push_str(&format!(
            "  {:<10} {}{}\n",
            st.name,
            st.about,
            if st.ready {
                ""
            } else {
                " (not implemented yet)"
            }
        ));
    }
    s.push_str("\ntools:\n  merge-config CONFIG.yml OUT [--seed N]   run a mergekit config\n  merge-moe CONFIG.yml OUT [--seed N]      run a mergekit-moe config (a Mixtral mixture of experts)\n  compare-runs DIR                         compare scripts/gpu-check.sh's CPU and CUDA runs\n");
    s
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Studies keep the tables of the runs that finished; an interrupt removes
    // only the files being written.
    weights::atomic::on_interrupt(weights::atomic::OnInterrupt::RemoveTemporaries);
    let result = match cli.cmd {
        None | Some(Cmd::List) => {
            print!("{}", list());
            Ok(())
        }
        Some(Cmd::Spectra(a)) => studies::spectra::run(&a).map(|_| ()),
        Some(Cmd::Lmc(a)) => studies::lmc::run(&a).map(|_| ()),
        Some(Cmd::Many(a)) => studies::many::run(&a).map(|_| ()),
        Some(Cmd::SvdAlign(a)) => studies::svd_align::run(&a).map(|_| ()),
        Some(Cmd::S2ft(a)) => studies::s2ft::run(&a).map(|_| ()),
        Some(Cmd::Merge(a)) => studies::merging::run(&a).map(|_| ()),
        Some(Cmd::Pleas(a)) => studies::pleas::run(&a).map(|_| ()),
        Some(Cmd::Rws(a)) => studies::rws::run(&a).map(|_| ()),
        Some(Cmd::Moe(a)) => studies::moe::run(&a).map(|_| ()),
        Some(Cmd::MergeMoe { config, out, seed }) => {
            experiments::moe::merge_moe(&config, &out, seed)
        }
        Some(Cmd::MergeConfig { config, out, seed }) => {
            let opts = merge::run::RunOptions {
                seed,
                progress: Some(merge::run::Progress::new(weights::cli::progress_bar(
                    "tensors",
                ))),
                ..Default::default()
            };
            merge::run::run_file(&config, &out, &opts)
                .map(|r| {
                    eprintln!(
                        "merged {} tensors into {} in {:.2} s",
                        r.tensors,
                        out.display(),
                        r.seconds
                    )
                })
                .map_err(anyhow::Error::from)
        }
        Some(Cmd::CompareRuns { dir }) => {
            experiments::gpu_check::compare(&dir).map(|report| println!("{report}"))
        }
        Some(Cmd::Other(args)) => {
            let name = args.first().cloned().unwrap_or_default();
            if STUDIES.iter().any(|s| s.name == name) {
                eprintln!(
                    "study '{name}' is not implemented yet (see the issue tracker)\n\n{}",
                    list()
                );
            } else {
                eprintln!("unknown study '{name}'\n\n{}", list());
            }
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", weights::cli::error_line(&e));
            ExitCode::FAILURE
        }
    }
}
