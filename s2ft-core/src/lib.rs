//! Structured sparse fine-tuning (S²FT).
//!
//! This crate will hold a LLaMA-style decoder written with Burn (generic over
//! the backend; CPU by default, CUDA behind the `cuda` feature), loaded from
//! and saved to a [`weights::StateDict`] with Hugging Face names, the S²FT
//! coupled-structure selection (attention heads, FFN channels) with partial
//! back-propagation, and LoRA and full fine-tuning baselines; see issue 6.
//! Burn is compiled only here and in `experiments`.
