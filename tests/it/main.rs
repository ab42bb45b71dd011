//! End-to-end tests, one binary: a controller and several agent processes
//! of the workspace's binaries, real TLS, real processes, PM2 and Docker.

mod support;

mod auth;
mod commands;
mod demo;
mod deploy;
mod docker;
mod fleet;
mod reconnect;
mod rollout;
mod trust;
