//! Named tensors in and out of checkpoint files.
//!
//! The ground every other crate of the toolkit stands on: a [`StateDict`]
//! (ordered name → `f32` array, remembering each tensor's stored [`DType`],
//! plus string metadata) and lazy, memory-mapped readers that convert one
//! tensor at a time:
//!
//! | format | reader | writer |
//! |---|---|---|
//! | safetensors (F64/F32/F16/BF16/FP8, integers, bool) | [`SafetensorsFile`] | [`SafetensorsWriter`], [`StateDict::save_safetensors`] |
//! | sharded Hugging Face folder (`model.safetensors.index.json`) | [`ShardedCheckpoint`] | [`ShardedWriter`], [`StateDict::save_sharded`] |
//! | GGUF v2/v3 (F32, F16, BF16, Q4_0, Q4_1, Q8_0, …) | [`GgufFile`] | — |
//!
//! [`Checkpoint::open`] recognises the format of a path. Every reader
//! implements [`TensorSource`], so algorithms can stream a model much larger
//! than memory tensor by tensor. Writes are atomic ([`atomic`]); every error
//! is a typed [`WeightsError`] naming the file and tensor.
//!
//! Layout convention: tensors keep PyTorch/Hugging Face layouts (`weight` is
//! `[out, in]`); GGUF shapes are reversed into that order and llama tensors
//! renamed to Hugging Face names, with the RoPE row order of q/k undone.
//!
//! ```no_run
//! use weights::{Checkpoint, TensorSource};
//! let ckpt = Checkpoint::open("model.safetensors")?;
//! for info in ckpt.infos() {
//!     let t = ckpt.load(&info.name)?; // converted now, dropped after use
//!     println!("{} {:?} {}", info.name, info.shape, t.data.sum());
//! }
//! # Ok::<(), weights::WeightsError>(())
//! ```

#![warn(missing_docs)]

// The README's examples run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeExamples;

pub mod alloc;
pub mod atomic;
mod checkpoint;
#[cfg(feature = "cli")]
pub mod cli;
pub mod dtype;
mod error;
pub mod gguf;
pub mod hf_tokenizer;
pub mod llama;
pub mod mem;
mod quant;
pub mod rng;
mod safetensors_io;
pub mod sharded;
pub mod stats;
mod tensor;
pub mod testing;

pub use checkpoint::{Checkpoint, CheckpointWriter};
pub use dtype::DType;
pub use error::{Result, WeightsError};
pub use gguf::{GgufFile, GgufModelConfig, GgufValue};
pub use hf_tokenizer::HfTokenizerFiles;
pub use llama::{LlamaConfig, MoeShape};
pub use safetensors_io::{SafetensorsFile, SafetensorsWriter, output_dtype};
pub use sharded::{ShardedCheckpoint, ShardedWriter};
pub use tensor::{Scope, StateDict, Tensor, TensorInfo, TensorSource};

/// Hugging Face's default maximum shard size (5 GB) for sharded output.
pub const DEFAULT_SHARD_BYTES: u64 = 5_000_000_000;
