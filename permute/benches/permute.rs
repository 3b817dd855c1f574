//! `cargo bench -p permute`: the LAP solver on uniform and weight-matching-like
//! costs, and weight matching of two MLPs and two 12-layer transformers.
//! `python3 permute/benches/reference.py` runs the same inputs through scipy's
//! `linear_sum_assignment` and a numpy port of Git Re-Basin's weight matching.

use criterion::{Criterion, criterion_group, criterion_main};
use models::{mlp_shapes, random_sd, transformer_config, transformer_shapes};
use permute::builders::{llama, mlp};
use permute::lap::{Objective, solve, solve_warm};
use permute::{MatchOptions, weight_matching};
use weights::rng::Rng;

mod models;

/// Uniform [0, 1) costs.
pub fn uniform_costs(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = Rng::new(seed);
    (0..n * n).map(|_| rng.uniform()).collect()
}

/// Weight-matching-like costs `C = A·Bᵀ`, A and B Gaussian `n × 4n`.
pub fn wm_costs(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = Rng::new(seed);
    let a = rng.normal_array((n, 4 * n));
    let b = rng.normal_array((n, 4 * n));
    a.dot(&b.t()).iter().map(|&v| v as f64).collect()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("lap");
    g.sample_size(10);
    for n in [512usize, 1024, 2048, 4096] {
        let uni = uniform_costs(n, 1);
        g.bench_function(format!("uniform/{n}"), |b| {
            b.iter(|| solve(&uni, n, Objective::Maximize, "u").unwrap())
        });
        let wm = wm_costs(n, 2);
        g.bench_function(format!("wm_like/{n}"), |b| {
            b.iter(|| solve(&wm, n, Objective::Maximize, "w").unwrap())
        });
        // What weight matching sees from its second pass on: the same group's
        // costs, slightly changed, solved from the previous duals.
        let (_, duals) = solve_warm(&wm, n, Objective::Maximize, None, "w").unwrap();
        let scale = wm.iter().map(|v| v.abs()).sum::<f64>() / wm.len() as f64;
        let mut rng = Rng::new(9);
        let near: Vec<f64> = wm.iter().map(|v| v + 0.01 * scale * rng.normal()).collect();
        g.bench_function(format!("wm_like_warm/{n}"), |b| {
            b.iter(|| solve_warm(&near, n, Objective::Maximize, Some(&duals), "w").unwrap())
        });
    }
    g.finish();

    let mut g = c.benchmark_group("weight_matching");
    g.sample_size(10);
    let (a, b) = (
        random_sd(&mlp_shapes(512), 3),
        random_sd(&mlp_shapes(512), 4),
    );
    // The same two models for benches/reference.py, so both sides match identical weights.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-data");
    if std::fs::create_dir_all(&dir).is_ok() {
        a.save_safetensors(dir.join("mlp_a.safetensors")).unwrap();
        b.save_safetensors(dir.join("mlp_b.safetensors")).unwrap();
    }
    let spec = mlp(&a).unwrap();
    let res = weight_matching(&spec, &a, &b, &MatchOptions::default()).unwrap();
    eprintln!(
        "mlp: {} passes, L2 {:.3} -> {:.3}",
        res.passes, res.l2_before, res.l2_after
    );
    g.bench_function("mlp_784_512x3_10", |bch| {
        bch.iter(|| weight_matching(&spec, &a, &b, &MatchOptions::default()).unwrap())
    });
    let (a, b) = (
        random_sd(&transformer_shapes(), 5),
        random_sd(&transformer_shapes(), 6),
    );
    if std::fs::create_dir_all(&dir).is_ok() {
        a.save_safetensors(dir.join("transformer_a.safetensors"))
            .unwrap();
        b.save_safetensors(dir.join("transformer_b.safetensors"))
            .unwrap();
    }
    let spec = llama(&transformer_config(), &a).unwrap();
    let opts = MatchOptions {
        max_iter: 1,
        ..Default::default()
    };
    let t = std::time::Instant::now();
    let full = weight_matching(&spec, &a, &b, &MatchOptions::default()).unwrap();
    eprintln!(
        "transformer: {} passes to converge in {:.1} s, L2 {:.3} -> {:.3}",
        full.passes,
        t.elapsed().as_secs_f64(),
        full.l2_before,
        full.l2_after
    );
    g.bench_function("transformer_12x768_one_pass", |bch| {
        bch.iter(|| weight_matching(&spec, &a, &b, &opts).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
