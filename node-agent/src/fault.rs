//! Test-only crash points.
//!
//! The crash-safety tests need to `kill -9` a deploy at an exact step. When
//! `SLIPWAY_TEST_CRASH_AT` names a point, the process sends itself SIGKILL
//! there: no destructor, no flush, exactly like an OOM kill or power cut of
//! the process. Unset (always, in production) this is one cached lookup.

use std::sync::OnceLock;

/// The environment variable that arms a crash point.
pub const CRASH_ENV: &str = "SLIPWAY_TEST_CRASH_AT";

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

fn armed() -> Option<&'static str> {
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    ARMED
        .get_or_init(|| std::env::var(CRASH_ENV).ok())
        .as_deref()
}

/// Kills this process with SIGKILL if `name` is the armed crash point.
pub fn point(name: &str) {
    if armed() == Some(name) {
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}
