//! End-to-end tests, one binary: a controller and several agent processes
//! of the workspace's binaries, real TLS, real processes, PM2 and Docker.

mod support;

// The busybox test images, shared with the agent's own Docker tests.
#[path = "../../node-agent/tests/it/support/docker_image.rs"]
mod docker_image;

// The private PostgreSQL server of a test process, shared with the
// controller's store tests.
#[path = "../../controller/src/store/test_postgres.rs"]
mod test_postgres;

// The bounded HTTP load loop, shared with the agent's zero-downtime tests.
#[path = "../../node-agent/tests/it/support/load.rs"]
mod load;

mod auth;
mod backup;
mod certs;
mod commands;
mod container;
mod demo;
mod deploy;
mod digitalocean;
mod docker;
mod env;
mod fleet;
mod front;
mod github;
mod github_action;
mod http;
mod install;
mod keep;
mod listen;
mod metrics;
mod oidc;
mod pm2;
mod postgres;
mod reconnect;
mod replicas;
mod rollout;
mod static_binary;
mod systemd;
mod trust;
mod upgrade;
mod web;
