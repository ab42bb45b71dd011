//! Artifacts: packed from a directory ([`pack`]) and brought into an app's
//! artifact cache ([`cache`], its one writer) — copied from a file,
//! downloaded from an HTTPS URL ([`https`]), fetched from the controller
//! ([`controller`]).

pub mod cache;
pub mod controller;
pub mod https;
pub mod pack;

pub use pack::{pack_dir, Compression};
