//! The controller's integration tests, one binary: an in-process controller
//! (support) and each way in — enrollment, the agent link, the Control API,
//! and the field limits every receiver checks.

mod support;

mod commands_api;
mod control;
mod digitalocean;
mod github;
mod limits;
mod link;
