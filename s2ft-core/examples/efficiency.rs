//! Step time and peak memory of full fine-tuning, LoRA and S²FT at matched
//! trainable parameters (CPU), on a real model or a ~14 M-parameter random one.
//!
//! ```text
//! cargo run -p s2ft-core --release --example efficiency -- \
//!     [--model PATH] [--batch 8] [--seq 64] [--rank 8] [--lora-dropout 0] [--steps 8]
//!     [--methods full,lora,s2ft] [--json]
//! ```
//!
//! `--model` takes a Hugging Face folder or a GGUF file (SmolLM2-135M-Instruct:
//! `models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf`); without it
//! a random LLaMA (vocabulary 4096, hidden 384, 6 layers) is used. LoRA is
//! PEFT-style on every projection (q, k, v, o, gate, up, down) at `--rank`
//! (alpha 2r, dropout `--lora-dropout`, whose masks are drawn on the host from
//! the run's seeded stream); S²FT trains o_proj columns of random heads and down_proj
//! columns of random channels, with as many parameters as that LoRA. The
//! batch is `--batch` sequences of `--seq` random tokens, every position
//! counted. `benches/torch_reference.py` does the same in PyTorch + PEFT.
//!
//! Peak memory is measured by a counting global allocator: the largest number
//! of live heap bytes during the training steps of each method (weights,
//! gradients, optimizer state and the activations autodiff keeps), with the
//! previous method's memory freed first.

use burn::prelude::*;
use burn::tensor::TensorData;
use s2ft_core::s2ft::{
    S2ftConfig, apply_lora_with_dropout, apply_s2ft, lora_param_count, ratios_for_budget, select,
    trainable_params,
};
use s2ft_core::train::{TrainConfig, train};
use s2ft_core::{CpuTrain, Llama, LlamaConfig, Pretrained};

#[global_allocator]
static GLOBAL: weights::alloc::Counting = weights::alloc::Counting;

type B = CpuTrain;

/// The value after `flag`, parsed, or `default`.
fn opt<T: std::str::FromStr>(args: &[String], flag: &str, default: T) -> T {
    match args.iter().position(|a| a == flag) {
        None => default,
        Some(i) => args
            .get(i + 1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{flag} needs a value")),
    }
}

const TARGETS: [&str; 7] = s2ft_core::s2ft::LORA_TARGETS_ALL;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let json = args.iter().any(|a| a == "--json");
    let steps: usize = opt(&args, "--steps", 8);
    let batch: usize = opt(&args, "--batch", 8);
    let seq: usize = opt(&args, "--seq", 64);
    let rank: usize = opt(&args, "--rank", 8);
    let dropout: f64 = opt(&args, "--lora-dropout", 0.0);
    let methods: String = opt(&args, "--methods", "full,lora,s2ft".to_string());
    let model_path: Option<String> = args
        .iter()
        .position(|a| a == "--model")
        .map(|i| args.get(i + 1).cloned().expect("--model PATH"));
    let (c, weights, name) = match &model_path {
        Some(p) => {
            let m = Pretrained::load(p.as_ref()).unwrap_or_else(|e| panic!("--model {p}: {e}"));
            (m.config, m.weights, p.clone())
        }
        None => {
            let c = LlamaConfig::tiny(4096, 384, 6, 6, 6, 1024);
            let sd = s2ft_core::model::random_state_dict(&c, 1);
            (c, sd, "random LLaMA (hidden 384, 6 layers)".to_string())
        }
    };
    let device = Default::default();
    let mut x = 7u64;
    let data: Vec<i64> = (0..batch * seq)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) % c.vocab_size as u64) as i64
        })
        .collect();
    let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(data, [batch, seq]), &device);
    let lora_n = lora_param_count(&c, rank, &TARGETS);
    let (hr, cr) = ratios_for_budget(&c, lora_n, 0.5);
    let mut rows = Vec::new();
    for method in methods.split(',') {
        let base =
            Llama::<B>::from_state_dict(&c, &weights, method == "full", &device).expect("model");
        let model = match method {
            "full" => base,
            "lora" => apply_lora_with_dropout(base, rank, 2.0 * rank as f64, dropout, &TARGETS, 0)
                .expect("lora"),
            "s2ft" => {
                let sc = S2ftConfig {
                    heads_ratio: hr,
                    channels_ratio: cr,
                    seed: 0,
                    ..Default::default()
                };
                let sel = select(&c, &sc, None).expect("selection");
                apply_s2ft(base, &sel, &sc).expect("s2ft")
            }
            other => panic!("--methods: unknown method '{other}' (full, lora, s2ft)"),
        };
        let trainable = trainable_params(&model);
        let window = weights::alloc::PeakWindow::open();
        let out = train(
            model,
            |_| tokens.clone(),
            &TrainConfig {
                lr: 1e-5,
                steps: steps + 1,
                weight_decay: 0.0,
                schedule: s2ft_core::train::LrSchedule::Constant,
            },
        );
        assert!(out.stopped.is_none());
        let peak = window.peak().unwrap_or(0);
        // The first step is warm-up.
        let median = out.median_step_ms();
        drop(out);
        rows.push(serde_json::json!({
            "method": method,
            "trainable_params": trainable,
            "median_step_ms": median,
            "peak_bytes": peak,
        }));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows).expect("JSON"));
    } else {
        println!(
            "model: {name}, {} parameters; batch {batch} x {seq} tokens; LoRA rank {rank}",
            weights.numel()
        );
        for r in &rows {
            println!(
                "{:<5} trainable {:>9}  median step {:>8.1} ms  peak {:>7.1} MB",
                r["method"].as_str().unwrap(),
                r["trainable_params"],
                r["median_step_ms"].as_f64().unwrap(),
                r["peak_bytes"].as_f64().unwrap() / 1e6
            );
        }
    }
}
