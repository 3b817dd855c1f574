//! The counting allocator the `experiments` binary installs (see
//! [`weights::alloc`]), re-exported for the studies.

pub use weights::alloc::{Counting, PeakWindow, installed, live};
