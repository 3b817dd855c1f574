//! The model, adapter, generation, S²FT and SmolLM2 tests, as one test binary:
//! each binary re-instantiates Burn's generic kernels at opt-level 2 and links
//! Burn, so five binaries cost CI minutes for nothing. (`memory.rs` stays its
//! own binary: it installs a counting allocator and must run alone.)

mod adapter;
mod forward;
mod generate;
mod moe;
mod s2ft;
mod smollm2;
