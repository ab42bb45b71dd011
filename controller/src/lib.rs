//! Slipway controller.
//!
//! The controller owns the fleet view, rollouts, the enrollment CA and the
//! integrations (GitHub, DigitalOcean). It speaks to agents only through the
//! protocol in `slipway-proto`.
//!
//! # Layout
//!
//! - [`proto`]: the agent ⇄ controller protocol, re-exported so that the
//!   controller and its tests name one set of message types.

pub use slipway_proto as proto;
