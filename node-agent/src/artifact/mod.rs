//! Artifacts: packed from a directory ([`pack`]) and brought into an app's
//! artifact cache — downloaded from an HTTPS URL ([`https`]).

pub mod https;
pub mod pack;

pub use pack::{pack_dir, Compression};
