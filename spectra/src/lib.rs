//! Spectral analysis of weight matrices.
//!
//! Thin and full SVDs and symmetric eigenvalues ([`linalg`]), the empirical
//! spectral density (ESD) of `WᵀW` ([`esd`]), Clauset–Shalizi–Newman
//! power-law fits as WeightWatcher computes them ([`powerlaw`]), the
//! WeightWatcher layer metrics and a Marchenko–Pastur bulk fit
//! ([`metrics`]), FARMS fixed-aspect-ratio subsampling ([`farms`]), WeLore
//! rank selection ([`welore`]), singular-vector alignment between two models
//! ([`alignment`]) and a per-layer report over a whole checkpoint
//! ([`report`]). Plain ndarray code, parallel over layers with rayon.

#![warn(missing_docs)]

// The README's examples run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeExamples;

pub mod alignment;
pub mod error;
pub mod esd;
pub mod farms;
pub mod linalg;
pub mod metrics;
pub mod powerlaw;
pub mod report;
pub mod welore;

pub use error::{Result, SpectraError};
pub use report::{LayerReport, ReportOptions, analyze_source, analyze_tensor};
