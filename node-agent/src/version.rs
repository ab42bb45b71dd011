//! The agent's version, as `--version`, Hello and heartbeats report it.
//!
//! It is the crate version. Tests of fleet agent upgrades need a second
//! agent binary that is the same program with another version and another
//! digest; building one would take minutes. So, with the `fault-injection`
//! feature only (test builds; never a shipped binary, see `fault`), a copy
//! of the binary with the trailer `\nslipway-test-version=VERSION\n`
//! appended reports VERSION. The trailer is read from the running image
//! (`/proc/self/exe`), so it follows the file, not the environment: a
//! re-exec'd agent reports what its new file says.

use std::sync::OnceLock;

/// The marker before a test version at the end of the executable.
pub const TEST_TRAILER: &str = "\nslipway-test-version=";

/// The version this agent reports.
pub fn current() -> &'static str {
    static VERSION: OnceLock<String> = OnceLock::new();
    VERSION.get_or_init(|| test_override().unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_owned()))
}

/// The test trailer's version, if this test build has one.
#[cfg(feature = "fault-injection")]
fn test_override() -> Option<String> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let mut file = std::fs::File::open("/proc/self/exe").ok()?;
    let len = file.seek(SeekFrom::End(0)).ok()?;
    let tail_len = len.min(128);
    file.seek(SeekFrom::Start(len - tail_len)).ok()?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail).ok()?;
    let tail = String::from_utf8_lossy(&tail);
    let at = tail.rfind(TEST_TRAILER)?;
    let version = tail[at + TEST_TRAILER.len()..].trim_end_matches('\n');
    slipway_proto::limits::check_version("test version", version)
        .ok()
        .map(|()| version.to_owned())
}

/// No override: this build has no test hooks.
#[cfg(not(feature = "fault-injection"))]
fn test_override() -> Option<String> {
    None
}
