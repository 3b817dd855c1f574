//! One module per study.

pub mod lmc;
pub mod many;
pub mod merging;
pub mod s2ft;
pub mod spectra;
pub mod svd_align;
