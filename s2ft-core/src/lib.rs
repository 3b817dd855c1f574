//! Structured sparse fine-tuning (S²FT, Yang et al., NeurIPS 2024) of
//! LLaMA-style decoders in Burn, with LoRA and full fine-tuning baselines in
//! the same code path.
//!
//! - [`config::LlamaConfig`]: shape from a Hugging Face `config.json` or a GGUF header.
//! - [`pretrained::Pretrained`]: a Hugging Face folder or GGUF file with its
//!   [`tokenizer::Tokenizer`] (Hugging Face's `tokenizers`, chat templates by
//!   `minijinja`); [`pretrained::save_hf_folder`] writes a fine-tune back.
//! - [`generate::greedy`]: batched greedy decoding with a [`KvCache`].
//! - [`model::Llama`]: the decoder (RMSNorm, GQA attention with rotate-half
//!   RoPE, SwiGLU, tied or untied head), generic over the Burn backend, built
//!   from and saved to a [`weights::StateDict`] with Hugging Face names.
//!
//! Backends: [`Cpu`] (Burn's flex CPU backend) by default, `Gpu` (CUDA) with the `cuda`
//! feature; their autodiff versions train. Burn is compiled only here and in
//! `experiments`.

#![warn(missing_docs)]

// The README's examples run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeExamples;

pub mod adapter;
pub mod config;
pub mod error;
pub mod generate;
pub mod model;
pub mod pretrained;
pub mod s2ft;
pub mod tokenizer;
pub mod train;

pub use config::LlamaConfig;
pub use error::{Result, S2ftError};
pub use model::{KvCache, Llama};
pub use pretrained::Pretrained;

/// The CPU backend.
pub type Cpu = burn::backend::Flex;
/// The CPU backend with autodiff (training).
pub type CpuTrain = burn::backend::Autodiff<Cpu>;
/// The CUDA backend.
#[cfg(feature = "cuda")]
pub type Gpu = burn::backend::Cuda<f32>;
/// The CUDA backend with autodiff.
#[cfg(feature = "cuda")]
pub type GpuTrain = burn::backend::Autodiff<Gpu>;
