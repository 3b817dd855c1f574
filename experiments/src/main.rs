//! `experiments`: one command per study of the toolkit.
//!
//! `cargo run -p experiments --release -- <study> [options]` will train or
//! load models, run the study and write `results/<study>/<run-id>/`. The
//! studies are filled in by issue 7; until then the binary lists them and
//! says which library crates they rest on.

use std::process::ExitCode;

/// A study: its command name, what it shows, and the crates it needs.
struct Study {
    name: &'static str,
    about: &'static str,
}

const STUDIES: &[Study] = &[
    Study {
        name: "lmc",
        about: "linear mode connectivity of independently trained MLPs: naive vs weight matching vs activation matching vs STE",
    },
    Study {
        name: "many",
        about: "MergeMany vs pairwise weight matching vs STE for 3-5 models",
    },
    Study {
        name: "svd-align",
        about: "singular-vector alignment after permutation (Ito et al.)",
    },
    Study {
        name: "spectra",
        about: "per-layer ESD report of a checkpoint: alpha, weighted alpha, stable rank, spikes, FARMS, WeLore",
    },
    Study {
        name: "s2ft",
        about: "structured sparse fine-tuning vs LoRA vs full fine-tuning on a LLaMA-style model",
    },
    Study {
        name: "merge",
        about: "mergekit-family merges of fine-tuned checkpoints, with and without permutation alignment",
    },
    Study {
        name: "pleas",
        about: "partial matching + merging (PLeaS) across widths",
    },
];

fn usage() -> String {
    let mut s = String::from("usage: experiments <study> [options]\n\nstudies:\n");
    for st in STUDIES {
        s.push_str(&format!("  {:<10} {}\n", st.name, st.about));
    }
    s.push_str(
        "\ntools:\n  merge-config CONFIG.yml OUT [--seed N]   run a mergekit config (same as `cargo run -p merge`)\n",
    );
    s
}

/// `merge-config CONFIG OUT [--seed N]`: the merge crate's runner.
fn merge_config(args: &[String]) -> Result<(), String> {
    let mut pos = Vec::new();
    let mut opts = merge::run::RunOptions {
        progress: true,
        ..Default::default()
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--seed" {
            let v = it.next().ok_or("--seed needs a value")?;
            opts.seed = v
                .parse()
                .map_err(|_| format!("--seed: '{v}' is not a non-negative integer"))?;
        } else {
            pos.push(a);
        }
    }
    let [cfg, out] = pos.as_slice() else {
        return Err("usage: experiments merge-config CONFIG.yml OUT [--seed N]".into());
    };
    let report = merge::run::run_file(std::path::Path::new(cfg), std::path::Path::new(out), &opts)
        .map_err(|e| e.to_string())?;
    eprintln!(
        "merged {} tensors into {out} in {:.2} s",
        report.tensors, report.seconds
    );
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None | Some("list") | Some("-h") | Some("--help") => {
            print!("{}", usage());
            ExitCode::SUCCESS
        }
        Some("merge-config") => match merge_config(&args[1..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Some(name) if STUDIES.iter().any(|s| s.name == name) => {
            eprintln!(
                "study '{name}' is not implemented yet (see the issue tracker); available studies:\n"
            );
            eprint!("{}", usage());
            ExitCode::from(2)
        }
        Some(other) => {
            eprintln!("unknown study '{other}'\n");
            eprint!("{}", usage());
            ExitCode::from(2)
        }
    }
}
