//! One module per study.

pub mod spectra;
