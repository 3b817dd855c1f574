//! Spectral analysis of weight matrices.
//!
//! This crate will hold thin and full SVDs and symmetric eigenvalues of the
//! 2-D (and convolutional) weights of a [`weights::StateDict`], the empirical
//! spectral density (ESD) of `W·Wᵀ`, Clauset–Shalizi–Newman power-law fits and
//! the WeightWatcher metrics built on them (α, weighted α, log norms, stable
//! rank, Marchenko–Pastur spikes), FARMS fixed-aspect-ratio subsampling,
//! WeLore rank selection and singular-vector alignment between two models.
//! It is plain ndarray code, parallel over layers; see issue 3.
