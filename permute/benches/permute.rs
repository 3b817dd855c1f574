//! `cargo bench -p permute`: the LAP solver on uniform and weight-matching-like
//! costs, and weight matching of two MLPs and two 12-layer transformers.
//! `python3 permute/benches/reference.py` runs the same inputs through scipy's
//! `linear_sum_assignment` and a numpy port of Git Re-Basin's weight matching.

use criterion::{Criterion, criterion_group, criterion_main};
use ndarray::{Array2, ArrayD, IxDyn};
use permute::builders::{llama, mlp};
use permute::lap::{Objective, solve, solve_warm};
use permute::{MatchOptions, weight_matching};
use spectra::rng::Rng;
use weights::{StateDict, Tensor};

/// Uniform [0, 1) costs.
pub fn uniform_costs(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = Rng::new(seed);
    (0..n * n).map(|_| rng.uniform()).collect()
}

/// Weight-matching-like costs `C = A·Bᵀ`, A and B Gaussian `n × 4n`.
pub fn wm_costs(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = Rng::new(seed);
    let a = Array2::from_shape_fn((n, 4 * n), |_| rng.normal() as f32);
    let b = Array2::from_shape_fn((n, 4 * n), |_| rng.normal() as f32);
    a.dot(&b.t()).iter().map(|&v| v as f64).collect()
}

fn random_sd(shapes: &[(String, Vec<usize>)], seed: u64) -> StateDict {
    let mut rng = Rng::new(seed);
    let mut sd = StateDict::new();
    for (name, shape) in shapes {
        let scale = (1.0 / *shape.last().unwrap() as f64).sqrt();
        sd.insert(
            name.clone(),
            Tensor::f32(ArrayD::from_shape_fn(IxDyn(shape), |_| {
                (scale * rng.normal()) as f32
            })),
        );
    }
    sd
}

fn mlp_shapes() -> Vec<(String, Vec<usize>)> {
    let sizes = [784, 512, 512, 512, 10];
    sizes
        .windows(2)
        .enumerate()
        .flat_map(|(i, w)| {
            [
                (format!("layers.{i}.weight"), vec![w[1], w[0]]),
                (format!("layers.{i}.bias"), vec![w[1]]),
            ]
        })
        .collect()
}

/// GPT-2-small's sizes (12 × 768, 12 heads, FFN 3072, vocabulary 1000 here).
struct Gpt {
    layers: usize,
    hidden: usize,
    ffn: usize,
}

const GPT: Gpt = Gpt {
    layers: 12,
    hidden: 768,
    ffn: 3072,
};

fn transformer_shapes() -> Vec<(String, Vec<usize>)> {
    let (h, f) = (GPT.hidden, GPT.ffn);
    let mut v = vec![("model.embed_tokens.weight".to_string(), vec![1000, h])];
    for l in 0..GPT.layers {
        let p = format!("model.layers.{l}");
        v.push((format!("{p}.input_layernorm.weight"), vec![h]));
        for n in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            v.push((format!("{p}.self_attn.{n}.weight"), vec![h, h]));
        }
        v.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        v.push((format!("{p}.mlp.gate_proj.weight"), vec![f, h]));
        v.push((format!("{p}.mlp.up_proj.weight"), vec![f, h]));
        v.push((format!("{p}.mlp.down_proj.weight"), vec![h, f]));
    }
    v.push(("model.norm.weight".to_string(), vec![h]));
    v
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
    let (a, b) = (random_sd(&mlp_shapes(), 3), random_sd(&mlp_shapes(), 4));
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
    let spec = llama(&weights::LlamaConfig::tiny(1000, 768, 12, 12, 12, 3072), &a).unwrap();
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
