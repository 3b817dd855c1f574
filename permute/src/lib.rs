//! Permutation symmetry of neural networks.
//!
//! This crate will hold permutation specs as data (which permutation group
//! acts on which axis of which weight, for MLPs, CNNs/ResNets and LLaMA/BERT
//! transformers with attention heads), applying and inverting permutations,
//! weight matching (Git Re-Basin) over a linear-assignment solver, MergeMany,
//! activation matching, partial matching and interpolation barriers. All of
//! it works on [`weights::StateDict`]s; see issue 4.
