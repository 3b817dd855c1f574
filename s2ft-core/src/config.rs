//! The LLaMA-family hyper-parameters: [`weights::LlamaConfig`], the one model
//! description every crate of the workspace uses (re-exported here, where the
//! Burn model is built from it).

pub use weights::llama::{LlamaConfig, MoeShape};
