//! Weight matching end to end on the bench's models, for the side-by-side
//! with the numpy + scipy port of Git Re-Basin (`permute/benches/reference.py`):
//!
//!     cargo run -p permute --release --example wm_speed -- mlp 512
//!     cargo run -p permute --release --example wm_speed -- mlp 1024
//!     cargo run -p permute --release --example wm_speed -- transformer
//!     cargo run -p permute --release --example wm_speed -- bound
//!     python3 permute/benches/reference.py 0     # reads the same models
//!
//! `bound` times what a pass is made of on the transformer's largest group:
//! one 3072 × 768 · 768 × 3072 f32 product (the reference prints numpy's on
//! the same shape) and a cold 3072 assignment on weight-matching-like costs.
//!
//! Each run writes its two models to `target/bench-data/` (the reference
//! matches identical weights) and prints medians: MLPs to convergence (5
//! runs), the 12 × 768 transformer for one pass (3 runs) and to convergence.
use std::time::Instant;

#[path = "../benches/models.rs"]
mod models;

use models::{mlp_shapes, random_sd, transformer_config, transformer_shapes};
use permute::builders::{llama, mlp};
use permute::{MatchOptions, PermutationSpec, weight_matching};
use weights::StateDict;
use weights::rng::Rng;

fn median_secs(runs: usize, mut f: impl FnMut() -> usize) -> (f64, usize) {
    let mut ts = Vec::new();
    let mut passes = 0;
    for _ in 0..runs {
        let t = Instant::now();
        passes = f();
        ts.push(t.elapsed().as_secs_f64());
    }
    (median(&ts), passes)
}

fn median(xs: &[f64]) -> f64 {
    let mut xs = xs.to_vec();
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn save(stem: &str, a: &StateDict, b: &StateDict) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-data");
    std::fs::create_dir_all(&dir).expect("target/bench-data");
    a.save_safetensors(dir.join(format!("{stem}_a.safetensors")))
        .expect("write model A");
    b.save_safetensors(dir.join(format!("{stem}_b.safetensors")))
        .expect("write model B");
}

fn run(spec: &PermutationSpec, a: &StateDict, b: &StateDict, max_iter: usize) -> usize {
    run_seeded(spec, a, b, max_iter, 0)
}

fn run_seeded(
    spec: &PermutationSpec,
    a: &StateDict,
    b: &StateDict,
    max_iter: usize,
    seed: u64,
) -> usize {
    let opts = MatchOptions {
        max_iter,
        seed,
        ..Default::default()
    };
    weight_matching(spec, a, b, &opts)
        .expect("weight matching")
        .passes
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("mlp") => {
            let width: usize = args.get(1).map_or(512, |w| w.parse().expect("width"));
            let shapes = mlp_shapes(width);
            let (a, b) = (random_sd(&shapes, 3), random_sd(&shapes, 4));
            save(if width == 512 { "mlp" } else { "mlp1024" }, &a, &b);
            let spec = mlp(&a).expect("MLP spec");
            let (t, passes) = median_secs(5, || run(&spec, &a, &b, 100));
            println!(
                "weight matching mlp 784-{width}x3-10: {:.1} ms ({passes} passes)",
                t * 1e3
            );
            // The visiting order's seed sets the pass count: the same seeds,
            // one run each, and the time per pass.
            let (mut times, mut counts) = (Vec::new(), Vec::new());
            for seed in 0..5 {
                let t = Instant::now();
                counts.push(run_seeded(&spec, &a, &b, 100, seed));
                times.push(t.elapsed().as_secs_f64());
            }
            let per_pass: Vec<f64> = times
                .iter()
                .zip(&counts)
                .map(|(t, &c)| t / c as f64)
                .collect();
            println!(
                "  seeds 0-4: median {:.1} ms, passes {counts:?}, median {:.1} ms per pass",
                median(&times) * 1e3,
                median(&per_pass) * 1e3
            );
        }
        Some("transformer") => {
            let shapes = transformer_shapes();
            let (a, b) = (random_sd(&shapes, 5), random_sd(&shapes, 6));
            save("transformer", &a, &b);
            let cfg = transformer_config();
            let spec = llama(&cfg, &a).expect("LLaMA spec");
            let (t, _) = median_secs(3, || run(&spec, &a, &b, 1));
            println!("weight matching transformer 12x768, one pass: {t:.2} s");
            let (t, passes) = median_secs(1, || run(&spec, &a, &b, 100));
            println!("  to convergence: {t:.1} s ({passes} passes)");
        }
        Some("bound") => {
            let (n, k) = (3072, 768);
            let mut rng = Rng::new(2);
            let a = rng.normal_array((n, k));
            let b = rng.normal_array((n, k));
            let mut c = vec![0f32; n * n];
            let (t, _) = median_secs(5, || {
                spectra::linalg::matmul_nt(a.view(), b.view(), &mut c, "bound").expect("shapes");
                0
            });
            println!("GEMM {n}x{k} . {k}x{n} f32: {:.1} ms", t * 1e3);
            let a = rng.normal_array((n, 4 * n));
            let b = rng.normal_array((n, 4 * n));
            let cost: Vec<f64> = a.dot(&b.t()).iter().map(|&v| v as f64).collect();
            let (t, _) = median_secs(3, || {
                permute::lap::solve(&cost, n, permute::lap::Objective::Maximize, "bound")
                    .expect("finite")
                    .len()
            });
            println!("LAP wm_like/{n} cold: {:.1} ms", t * 1e3);
        }
        _ => eprintln!("usage: wm_speed mlp [WIDTH] | transformer | bound"),
    }
}
