//! Step time and peak memory of full fine-tuning, LoRA and S²FT at matched
//! trainable parameters on a ~14 M-parameter LLaMA-style model (CPU).
//!
//! `cargo run -p s2ft-core --release --example efficiency -- [--json] [--steps N]`
//!
//! Peak memory is measured by a counting global allocator: the largest number
//! of live heap bytes during the training steps of each method (parameters,
//! gradients, optimizer state and the activations autodiff keeps), with the
//! previous method's memory freed first.

use burn::prelude::*;
use burn::tensor::TensorData;
use s2ft_core::s2ft::{
    S2ftConfig, apply_lora, apply_s2ft, lora_param_count, ratios_for_budget, select,
    trainable_params,
};
use s2ft_core::train::{TrainConfig, train};
use s2ft_core::{CpuTrain, Llama, LlamaConfig};

#[global_allocator]
static GLOBAL: weights::alloc::Counting = weights::alloc::Counting;

type B = CpuTrain;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let json = args.iter().any(|a| a == "--json");
    let steps: usize = args
        .iter()
        .position(|a| a == "--steps")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.parse().expect("--steps N"))
        .unwrap_or(8);
    let c = LlamaConfig::tiny(4096, 384, 6, 6, 6, 1024);
    let (batch, seq) = (4, 64);
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
    let targets = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"];
    let lora_n = lora_param_count(&c, 8, &targets);
    let (hr, cr) = ratios_for_budget(&c, lora_n, 0.5);
    let mut rows = Vec::new();
    for method in ["full", "lora", "s2ft"] {
        let base = Llama::<B>::random(&c, 1, &device).expect("model");
        let model = match method {
            "full" => base,
            "lora" => apply_lora(base, 8, 16.0, &targets, 0).expect("lora"),
            _ => {
                let sc = S2ftConfig {
                    heads_ratio: hr,
                    channels_ratio: cr,
                    seed: 0,
                    ..Default::default()
                };
                let sel = select(&c, &sc, None).expect("selection");
                apply_s2ft(base, &sel, &sc).expect("s2ft")
            }
        };
        let trainable = trainable_params(&model);
        weights::alloc::reset_peak();
        let out = train(
            model,
            |_| tokens.clone(),
            &TrainConfig {
                lr: 1e-4,
                steps: steps + 1,
                weight_decay: 0.0,
            },
        );
        assert!(out.stopped.is_none());
        let peak = weights::alloc::peak();
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
            "model: {} parameters; batch {batch} x {seq} tokens",
            s2ft_core::model::random_state_dict(&c, 1).numel()
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
