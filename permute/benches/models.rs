//! The random models that `cargo bench -p permute` and the `wm_speed` example
//! match (and write to `target/bench-data/` for `reference.py`).

use ndarray::{ArrayD, IxDyn};
use weights::rng::Rng;
use weights::{StateDict, Tensor};

/// Every tensor `N(0, 1/fan_in)` (fan-in: the last axis), one stream in order.
pub fn random_sd(shapes: &[(String, Vec<usize>)], seed: u64) -> StateDict {
    let mut rng = Rng::new(seed);
    let mut sd = StateDict::new();
    for (name, shape) in shapes {
        let scale = (1.0 / *shape.last().expect("not a scalar") as f64).sqrt();
        sd.insert(
            name.clone(),
            Tensor::f32(ArrayD::from_shape_fn(IxDyn(shape), |_| {
                (scale * rng.normal()) as f32
            })),
        );
    }
    sd
}

/// A 784-`width`³-10 MLP in `layers.i.{weight,bias}` names.
pub fn mlp_shapes(width: usize) -> Vec<(String, Vec<usize>)> {
    let sizes = [784, width, width, width, 10];
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

/// GPT-2-small's sizes in LLaMA names: 12 layers, hidden 768, 12 heads, FFN
/// 3072, vocabulary 1000, the head tied to the embedding.
pub fn transformer_config() -> weights::LlamaConfig {
    let mut c = weights::LlamaConfig::tiny(1000, 768, 12, 12, 12, 3072);
    c.tie_word_embeddings = true;
    c
}

/// The weights of [`transformer_config`], in checkpoint order.
pub fn transformer_shapes() -> Vec<(String, Vec<usize>)> {
    transformer_config().weight_shapes()
}
