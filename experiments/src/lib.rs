//! The studies behind `cargo run -p experiments --release -- <study>`, as a
//! library so the `tests` crate runs them at tiny size.

#![warn(missing_docs)]

pub mod alloc;
pub mod cnn;
pub mod corrupt;
pub mod data;
pub mod device;
pub mod gpu_check;
pub mod idx;
pub mod llm;
pub mod lm;
pub mod mlp;
pub mod moe;
pub mod plot;
pub mod report;
pub mod studies;
pub mod tasks;
pub mod train;
