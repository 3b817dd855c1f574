//! Model merging.
//!
//! This crate will hold the merge methods researchers use today through
//! mergekit (linear, slerp, the task-vector family — task arithmetic, TIES,
//! DARE, breadcrumbs, DELLA — as one generalised function with presets,
//! model stock, Karcher mean), permutation-aware merging, reversible low-rank
//! merging, LoRA-LEGO and shared-basis merging, mergekit YAML configs, PEFT
//! LoRA adapters and streaming sharded output over lazily read
//! [`weights`] checkpoints; see issue 5.
