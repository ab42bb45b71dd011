//! The agent link: enrollment, the agents' sessions, the registry of live
//! sessions and the heartbeat rules.

pub mod enroll;
pub mod liveness;
pub mod registry;
pub mod session;
