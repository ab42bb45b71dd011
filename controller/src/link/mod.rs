//! The agent link: enrollment, the agents' sessions, the registry of live
//! sessions, the routing of commands and their answers, and the heartbeat
//! rules.

pub mod commands;
pub mod enroll;
pub mod liveness;
pub mod registry;
pub mod replicas;
pub mod rotation;
pub mod routing;
pub mod session;
