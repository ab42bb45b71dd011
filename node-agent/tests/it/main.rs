//! The agent's integration tests, one binary (one link of the crate instead
//! of one per file): each module is one area, run against the real
//! `slipway-agent` binary, PM2 and Docker where they apply.

mod support;

mod controller_fetch;
mod crash;
mod demo;
mod docker_deploy;
mod docker_driver;
mod download;
mod exec_driver;
mod exec_listen;
mod front;
mod front_http;
mod front_kernel;
mod keep;
mod layers;
mod lifecycle;
mod listen_change;
mod logs;
mod pm2_deploy;
mod pm2_driver;
mod switch;
mod unpack_safety;
