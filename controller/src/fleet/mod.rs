//! The fleet view and the fleet status summary.

mod status;

pub use status::*;
