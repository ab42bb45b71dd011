//! The README's first command, `bash scripts/demo.sh`, end to end on the
//! binaries this test run built.

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::process::Command;

#[test]
fn fleet_demo_runs_end_to_end() {
    let bins = crate::support::bin("slipway").parent().unwrap().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/demo.sh");
    let out = Command::new("bash")
        .arg(&script)
        .env("SLIPWAY_BIN_DIR", &bins)
        .env("SLIPWAY_DEMO_DIR", dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "3 of 3 nodes succeeded",
        "n2: hello from v2",
        "ROLLED_BACK (release v3)",
        "HTTP 500",
        "n3: hello from v1",
        "DEPLOY_FAILED",
        // n3's local rollback, in the audit log and the release view.
        "NODE_LOCAL_ROLLBACK",
        "same CPU, memory and load",
        "n2 (online): current v2",
    ] {
        assert!(
            stdout.contains(needle),
            "demo output lacks {needle:?}:\n{stdout}"
        );
    }
    // `slipway status --refresh`: all three online and healthy, exit 0;
    // `slipway nodes` lists them online too.
    assert!(stdout.contains("nodes: 3 (3 online)"), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("OK: 3 nodes online, 1 app healthy")),
        "{stdout}"
    );
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.starts_with("n-") && l.contains(" online "))
            .count(),
        3,
        "{stdout}"
    );
    // `slipway releases web`: v3 failed on n2 (the gate's reason), v2
    // marked bad on n3 by its local rollback (who and when).
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("v3") && l.contains(" failed — health gate failed")),
        "{stdout}"
    );
    assert!(
        stdout.lines().any(|l| l.contains("v2")
            && l.contains(" bad — rolled back to v1 at ")
            && l.trim_end().ends_with(" on the node")),
        "{stdout}"
    );
}
