//! Permutation symmetry of neural networks.
//!
//! Hidden units (and attention heads) of a network can be reordered without
//! changing its function. This crate describes those symmetries as data
//! ([`spec::PermutationSpec`], with builders in [`builders`]), applies and
//! inverts them on [`weights::StateDict`]s, and finds the permutation that
//! aligns one model with another: weight matching (Git Re-Basin,
//! [`matching`]) over a linear-assignment solver ([`lap`]), MergeMany,
//! activation matching and per-unit similarities for partial matching
//! ([`many`]), interpolation with loss barriers ([`interp`]), and REPAIR's
//! renormalisation of the interpolated model's channels ([`repair`]), and
//! orthogonal (Procrustes) alignment of a LLaMA's residual stream ([`orthogonal`]),
//! and partial (ZipIt!/PLeaS) merging over any spec ([`zip`]).

#![warn(missing_docs)]

// The README's examples run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeExamples;

pub mod builders;
pub mod error;
pub mod interp;
pub mod lap;
pub mod many;
pub mod matching;
pub mod orthogonal;
pub mod repair;
pub mod spec;
pub mod zip;

pub use error::{PermuteError, Result};
pub use matching::{MatchOptions, MatchResult, weight_matching};
pub use spec::{Group, GroupPerm, Inner, Member, Permutation, PermutationSpec, apply, invert};
