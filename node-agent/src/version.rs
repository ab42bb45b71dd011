//! The agent's version and the git commit it was built from (set by
//! `build.rs`): what `--version` prints and what the agent reports to the
//! controller in its enrollment, hello and heartbeats.
//!
//! The reported version is the package version with the commit as semver
//! build metadata, `0.1.0+1a2b3c4d5e6f` (`-dirty` after the commit when the
//! sources differed from it, `+unknown` when the build knew no commit), and
//! `--version` prints it first: `slipway-agent 0.1.0+1a2b3c4d5e6f (commit
//! 1a2b3c4d5e6f, 2026-12-01)`. A fleet agent upgrade reads that second word
//! of a new binary's `--version` and checks the node reports the same after
//! its restart.
//!
//! Tests of fleet agent upgrades need a second agent binary that is the same
//! program with another version and another digest; building one would take
//! minutes. So, with the `fault-injection` feature only (test builds; never
//! a shipped binary, see `fault`), a copy of the binary with the trailer
//! `\nslipway-test-version=VERSION\n` appended reports VERSION. The trailer
//! is read from the running image (`/proc/self/exe`), so it follows the
//! file, not the environment: a re-exec'd agent reports what its new file
//! says.

use std::sync::OnceLock;

/// `0.1.0 (commit 1a2b3c4d5e6f, 2026-12-01)`, as `build.rs` made it.
const LONG: &str = env!("SLIPWAY_BUILD_VERSION");

/// The version of this build as reported: `0.1.0+1a2b3c4d5e6f`.
pub const REPORTED: &str = concat!(env!("CARGO_PKG_VERSION"), "+", env!("SLIPWAY_BUILD_COMMIT"));

/// The marker before a test version at the end of the executable.
pub const TEST_TRAILER: &str = "\nslipway-test-version=";

/// The version this agent reports (and `--version` prints first).
pub fn current() -> &'static str {
    static VERSION: OnceLock<String> = OnceLock::new();
    VERSION.get_or_init(|| test_override().unwrap_or_else(|| REPORTED.to_owned()))
}

/// What `--version` prints after the program name: the reported version,
/// then the commit and build date.
pub fn long() -> &'static str {
    static LONG_TEXT: OnceLock<String> = OnceLock::new();
    LONG_TEXT.get_or_init(|| {
        let details = LONG.split_once(' ').map_or("", |(_, rest)| rest);
        format!("{} {details}", current()).trim_end().to_owned()
    })
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
