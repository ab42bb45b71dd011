//! Test-only crash points, compiled in only with the `fault-injection`
//! cargo feature.
//!
//! The crash-safety tests need to `kill -9` the agent at an exact step. With
//! the feature on, when `SLIPWAY_TEST_CRASH_AT` names a point, the process
//! sends itself SIGKILL there: no destructor, no flush, exactly like an OOM
//! kill or power cut of the process (one cached lookup otherwise).
//!
//! Without the feature — every binary `cargo build` makes, the shipped one
//! included — [`point`] is an empty function and the variable is never
//! read. Only the tests turn the feature on (see the self dev-dependency in
//! `node-agent/Cargo.toml`).

/// The environment variable that arms a crash point (read only with the
/// `fault-injection` feature).
pub const CRASH_ENV: &str = "SLIPWAY_TEST_CRASH_AT";

/// Whether this build has crash points (tests assert it before relying on
/// them).
pub const ENABLED: bool = cfg!(feature = "fault-injection");

/// The crash points a deploy passes, in order.
pub const DEPLOY_POINTS: &[&str] = &[
    "after_fetch",
    "mid_unpack",
    "after_unpack",
    "after_link",
    "after_hooks",
    "after_switch",
    "before_commit",
];

/// The crash points around the switch of an app's front (the agent's
/// proxy): after the new release passed its gate, and after the front
/// took it, before the old one is retired.
pub const FRONT_POINTS: &[&str] = &["before_front_switch", "after_front_switch"];
/// The crash points a switch of the node's key and certificate passes
/// (enrollment, renewal, migration of the old layout), in order: see
/// `identity::install`.
pub const IDENTITY_POINTS: &[&str] = &[
    "identity_mid_write",
    "identity_after_write",
    "identity_after_link",
    "identity_after_switch",
];

#[cfg(feature = "fault-injection")]
fn armed() -> Option<&'static str> {
    use std::sync::OnceLock;
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    ARMED
        .get_or_init(|| std::env::var(CRASH_ENV).ok())
        .as_deref()
}

/// Kills this process with SIGKILL if `name` is the armed crash point.
#[cfg(feature = "fault-injection")]
pub fn point(name: &str) {
    if armed() == Some(name) {
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

/// Does nothing: this build has no crash points.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn point(_name: &str) {}
