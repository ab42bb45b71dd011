//! Deployments across the fleet: the rollout policy and its executor.

mod executor;

pub use executor::*;
