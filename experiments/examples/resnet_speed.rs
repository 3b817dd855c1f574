//! Times training steps of the LayerNorm ResNet on the CPU backend, and one
//! epoch on 4,000 MNIST digits with the test accuracy it reaches.
//!
//! `cargo run -p experiments --release --example resnet_speed -- [WIDTH] [BATCH]`
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use experiments::cnn::{ResNet, init_state_dict};

type B = s2ft_core::CpuTrain;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let width = args.first().copied().unwrap_or(8);
    let batch = args.get(1).copied().unwrap_or(128);
    let device = Default::default();
    let mut model =
        ResNet::<B>::from_state_dict(&init_state_dict(1, width, 10, 0), &device).expect("model");
    let x = ndarray::Array2::<f32>::from_elem((batch, 784), 0.5);
    let y: Vec<usize> = (0..batch).map(|i| i % 10).collect();
    let mut optim = AdamConfig::new().init::<B, ResNet<B>>();
    let mut steps = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let loss = experiments::mlp::cross_entropy(
            model.forward(experiments::mlp::batch::<B>(&x, &device)),
            &y,
        );
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-3, model, grads);
        steps.push(t.elapsed().as_secs_f64() * 1e3);
    }
    steps.sort_by(f64::total_cmp);
    let t = Instant::now();
    let _ = model
        .valid()
        .forward(experiments::mlp::batch::<s2ft_core::Cpu>(&x, &device));
    println!(
        "width {width}, batch {batch}: median training step {:.0} ms, inference forward {:.0} ms",
        steps[2],
        t.elapsed().as_secs_f64() * 1e3
    );
    let (train, test) =
        experiments::data::mnist(&experiments::data::default_mnist_dir()).expect("MNIST");
    let m =
        ResNet::<B>::from_state_dict(&init_state_dict(1, width, 10, 0), &device).expect("model");
    let t = Instant::now();
    let m = experiments::cnn::train(
        m,
        &train.take(4000),
        1,
        batch,
        1e-3,
        0,
        &indicatif::ProgressBar::hidden(),
    );
    let (l, a) = experiments::cnn::evaluate(&m.to_state_dict(), &test.take(500)).expect("eval");
    println!(
        "one epoch on 4000 digits: {:.0} s, test loss {l:.3}, accuracy {a:.3}",
        t.elapsed().as_secs_f64()
    );
}
