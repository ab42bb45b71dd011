//! End-to-end tests, one binary: a controller and several agent processes
//! of the workspace's binaries, real TLS, real processes, PM2 and Docker.

mod support;

// The busybox test images, shared with the agent's own Docker tests.
#[path = "../../node-agent/tests/it/support/docker_image.rs"]
mod docker_image;

mod auth;
mod commands;
mod demo;
mod deploy;
mod docker;
mod fleet;
mod reconnect;
mod rollout;
mod trust;
mod upgrade;
