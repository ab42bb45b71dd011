//! The agent's version and the git commit it was built from (set by
//! `build.rs`): what `--version` prints and what the agent reports to the
//! controller in its enrollment, hello and heartbeats.

/// `slipway-agent --version`: `0.1.0 (commit 1a2b3c4d5e6f, 2026-12-01)`;
/// `-dirty` after the commit when the sources differed from it, `unknown`
/// when the build knew no commit (no git, no `SLIPWAY_GIT_COMMIT`).
pub const LONG: &str = env!("SLIPWAY_BUILD_VERSION");

/// The version the agent reports to the controller (the fleet view's
/// column): the package version with the commit as semver build metadata,
/// `0.1.0+1a2b3c4d5e6f` (`0.1.0+1a2b3c4d5e6f-dirty`, `0.1.0+unknown`).
pub const REPORTED: &str = concat!(env!("CARGO_PKG_VERSION"), "+", env!("SLIPWAY_BUILD_COMMIT"));
