//! Peak training heap: full fine-tuning needs more than S²FT at a LoRA-sized
//! budget (S²FT keeps gradients and Adam state for the selected rows and
//! columns only, and back-propagates only as far as it must).
//!
//! This binary holds one test and installs the counting allocator, so no
//! other test thread adds to the process-wide peak. (The `s2ft` study test
//! runs beside other studies in one process and so cannot compare methods.)

use burn::prelude::*;
use burn::tensor::TensorData;
use s2ft_core::s2ft::{S2ftConfig, apply_s2ft, lora_param_count, ratios_for_budget, select};
use s2ft_core::train::{TrainConfig, train};
use s2ft_core::{CpuTrain, Llama, LlamaConfig};

#[global_allocator]
static GLOBAL: weights::alloc::Counting = weights::alloc::Counting;

type B = CpuTrain;

/// Heap bytes above the live model that `steps` training steps peak at.
fn training_peak(model: Llama<B>, tokens: &Tensor<B, 2, Int>, steps: usize) -> usize {
    let window = weights::alloc::PeakWindow::open();
    let out = train(
        model,
        |_| tokens.clone(),
        &TrainConfig {
            lr: 1e-4,
            steps,
            weight_decay: 0.0,
            schedule: s2ft_core::train::LrSchedule::Constant,
        },
    );
    assert!(out.stopped.is_none());
    window
        .growth()
        .expect("the counting allocator is installed")
}

#[test]
fn full_fine_tuning_peaks_above_s2ft_at_a_lora_sized_budget() {
    assert!(weights::alloc::installed());
    let c = LlamaConfig::tiny(1024, 128, 2, 4, 4, 384);
    let (batch, seq) = (2, 32);
    let device = Default::default();
    let data: Vec<i64> = (0..batch * seq)
        .map(|i| ((i * 7919 + 13) % c.vocab_size) as i64)
        .collect();
    let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(data, [batch, seq]), &device);

    let full = training_peak(Llama::<B>::random(&c, 1, &device).unwrap(), &tokens, 3);

    let targets = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"];
    let (heads_ratio, channels_ratio) =
        ratios_for_budget(&c, lora_param_count(&c, 8, &targets), 0.5);
    let sc = S2ftConfig {
        heads_ratio,
        channels_ratio,
        seed: 0,
        ..Default::default()
    };
    let sel = select(&c, &sc, None).unwrap();
    let model = apply_s2ft(Llama::<B>::random(&c, 1, &device).unwrap(), &sel, &sc).unwrap();
    let s2ft = training_peak(model, &tokens, 3);

    eprintln!("peak above the model: full {full} B, S²FT {s2ft} B");
    assert!(
        s2ft > 0,
        "the S²FT run allocated nothing: the counter is not counting"
    );
    assert!(
        full as f64 > 1.3 * s2ft as f64,
        "full fine-tuning peaked at {full} B, S²FT at {s2ft} B"
    );
}
