//! Log rotation through the real agent: no line lost or duplicated across
//! many rotations of the exec driver's output, inotify-triggered rotation,
//! retention, and pruning under disk pressure.

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::support::{tar_of, targz, wait_until, Node, RunningAgent};

/// Writes `0..LINES` one line per write(2), in bursts, then touches
/// `../../shared/done`.
const WRITER: &str = r#"
import os, time
LINES, BURST = 60000, 2000
for i in range(LINES):
    os.write(1, b"line %d\n" % i)
    if i % BURST == BURST - 1:
        time.sleep(0.05)
open("../../shared/done", "w").close()
time.sleep(3600)
"#;

/// Text of a log file, decompressed when rotated.
fn read_log(p: &Path) -> String {
    let mut text = String::new();
    let f = fs::File::open(p).unwrap();
    if p.extension().is_some_and(|e| e == "gz") {
        flate2::read::MultiGzDecoder::new(f)
            .read_to_string(&mut text)
            .unwrap();
    } else if p.extension().is_some_and(|e| e == "zst") {
        text = String::from_utf8(zstd::stream::decode_all(f).unwrap()).unwrap();
    } else {
        let mut f = f;
        f.read_to_string(&mut text).unwrap();
    }
    text
}

fn rotated_siblings(live: &Path) -> Vec<PathBuf> {
    let prefix = format!("{}-", live.file_name().unwrap().to_string_lossy());
    let mut v: Vec<PathBuf> = fs::read_dir(live.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(&prefix)
        })
        .collect();
    v.sort();
    v
}

#[test]
fn every_line_appears_exactly_once_across_many_rotations() {
    let node = Node::new(
        r#"
[apps.web.run]
driver = "exec"
command = ["python3", "writer.py"]
stop_grace = "2s"

[apps.web.logs]
max_size = "16KiB"
keep = 1000
compress = "gzip"
"#,
    );
    let art = node.dir.path().join("w.tar.gz");
    fs::write(&art, targz(&tar_of(&[("writer.py", WRITER)]))).unwrap();
    let agent = RunningAgent::start(&node);
    node.deploy(&art, "v1").ok();
    // A second rotator racing the agent's own: `logs --rotate --force`.
    let done = node.root.join("shared/done");
    let t = Instant::now();
    let mut forced = 0;
    while !done.exists() && t.elapsed() < Duration::from_secs(60) {
        node.run(&["logs", "--app", "web", "--rotate", "--force"]);
        forced += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(done.exists(), "the writer did not finish");
    // The supervisor has copied the last line out of the pipe.
    let live = node.root.join(".slipway/run/output.log");
    wait_until("the last line in the logs", Duration::from_secs(10), || {
        rotated_siblings(&live)
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "gz"))
            .chain([&live])
            .any(|p| {
                // A copy being compressed may be cut short: read what is there.
                let mut text = String::new();
                let Ok(f) = fs::File::open(p) else {
                    return false;
                };
                if p.extension().is_some_and(|e| e == "gz") {
                    let _ = flate2::read::MultiGzDecoder::new(f).read_to_string(&mut text);
                } else {
                    let _ = { f }.read_to_string(&mut text);
                }
                text.contains("line 59999\n")
            })
    });
    node.run(&["stop", "--app", "web"]).ok();
    drop(agent);

    let rotated = rotated_siblings(&live);
    assert!(
        rotated.len() >= 10,
        "only {} rotations ({forced} forced attempts)",
        rotated.len()
    );
    assert!(
        rotated
            .iter()
            .all(|p| p.extension().is_some_and(|e| e == "gz")),
        "{rotated:?}"
    );
    let mut seen: BTreeMap<u64, u32> = BTreeMap::new();
    for p in rotated.iter().chain([&live]) {
        for line in read_log(p).lines() {
            let n: u64 = line
                .strip_prefix("line ")
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("garbled line {line:?} in {}", p.display()));
            *seen.entry(n).or_default() += 1;
        }
    }
    let dup: Vec<_> = seen.iter().filter(|(_, c)| **c > 1).take(5).collect();
    assert!(dup.is_empty(), "duplicated lines: {dup:?}");
    let missing: Vec<u64> = (0..60000)
        .filter(|n| !seen.contains_key(n))
        .take(5)
        .collect();
    assert!(missing.is_empty(), "lost lines, e.g. {missing:?}");
    assert_eq!(seen.len(), 60000);

    let status = node.run(&["status", "--json"]).ok().json();
    let files = &status["apps"][0]["logs"]["files"];
    let entry = &files[live.to_str().unwrap()];
    assert_eq!(entry["method"], "reopen", "{status:#}");
    assert!(entry["rotations"].as_u64().unwrap() >= 10);
    assert!(entry["last_rotated_at"].as_str().unwrap().starts_with("20"));
}

#[test]
fn a_log_that_jumps_past_its_size_is_rotated_within_seconds() {
    let node = Node::new("[apps.web.logs]\nmax_size = \"64KiB\"\nkeep = 2\ncompress = \"zstd\"\n");
    let logs = node.root.join("shared/logs");
    fs::create_dir_all(&logs).unwrap();
    let live = logs.join("app.log");
    fs::write(&live, "boot\n").unwrap();
    // Returns once the agent watches the log directory.
    let _agent = RunningAgent::start(&node);
    // Well past the size; the agent's tick is 30 s, so only inotify can
    // make this fast.
    fs::write(&live, "x".repeat(200 << 10) + "\n").unwrap();
    // Done once the rotated copy is compressed (the uncompressed copy exists
    // for a moment while the compressor runs).
    wait_until("the rotation", Duration::from_secs(5), || {
        let r = rotated_siblings(&live);
        !r.is_empty() && r.iter().all(|p| p.extension().is_some_and(|e| e == "zst"))
    });
    let rotated = rotated_siblings(&live);
    assert!(
        rotated[0].to_string_lossy().ends_with(".zst"),
        "{rotated:?}"
    );
    assert_eq!(read_log(&rotated[0]).len(), (200 << 10) + 1);
    assert_eq!(
        fs::metadata(&live).unwrap().len(),
        0,
        "copytruncate leaves an empty live file"
    );
    // Retention: keep 2.
    for _ in 0..3 {
        let before = rotated_siblings(&live).len();
        fs::write(&live, "y".repeat(100 << 10)).unwrap();
        wait_until("another rotation", Duration::from_secs(5), || {
            fs::metadata(&live).map(|m| m.len()).unwrap_or(1) == 0
                && rotated_siblings(&live).len() >= before.min(2)
        });
        // The pass ends with the copy compressed and retention applied.
        wait_until(
            "the rotation pass to finish",
            Duration::from_secs(5),
            || {
                let r = rotated_siblings(&live);
                r.len() <= 2 && r.iter().all(|p| p.extension().is_some_and(|e| e == "zst"))
            },
        );
    }
    assert_eq!(
        rotated_siblings(&live).len(),
        2,
        "{:?}",
        rotated_siblings(&live)
    );
}

#[test]
fn disk_pressure_prunes_caches_and_rotated_logs_but_no_release() {
    let node =
        Node::new("keep = 10\ndisk_pressure_free = \"1000000TB\"\n[apps.web.logs]\nkeep = 1\n");
    for v in ["v1", "v2", "v3"] {
        let a = node.artifact(
            &format!("{v}.tar.gz"),
            &[("VERSION", v), ("big.bin", &v.repeat(100_000))],
        );
        node.deploy(&a, v).ok();
    }
    // Rotated logs beyond retention (as left by an older, larger `keep`).
    let logs = node.root.join("shared/logs");
    fs::write(logs.join("app.log"), "live\n").unwrap();
    for i in 1..=3 {
        fs::write(
            logs.join(format!("app.log-20261120-170000000{i}.gz")),
            vec![0u8; 10_000],
        )
        .unwrap();
    }
    let run = node.run(&["prune", "--app", "web", "--pressure", "--json"]);
    // The threshold cannot be met on any disk: exit 1, everything tried.
    assert_eq!(run.code, Some(1), "{run:#?}");
    let rep = run.json();
    let steps: BTreeMap<String, u64> = rep["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s[0].as_str().unwrap().to_owned(), s[1].as_u64().unwrap()))
        .collect();
    assert_eq!(
        steps.keys().collect::<Vec<_>>(),
        ["cached artifacts", "rotated logs", "store objects"]
    );
    assert_eq!(steps["rotated logs"], 20_000, "{rep:#}");
    assert!(
        steps["cached artifacts"] > 0,
        "v1's cached artifact (not current, not rollback target) goes"
    );
    assert_eq!(rotated_siblings(&logs.join("app.log")).len(), 1);
    // Every release survives; current and rollback target keep their artifacts.
    assert_eq!(
        node.dirs_on_disk().into_iter().collect::<Vec<_>>(),
        ["v1", "v2", "v3"]
    );
    assert_eq!(
        fs::read_dir(node.root.join(".slipway/cache"))
            .unwrap()
            .count(),
        2
    );
    let status = node.run(&["status", "--json"]).ok().json();
    let last = &status["apps"][0]["last_prune"];
    assert_eq!(last["trigger"], "disk_pressure", "{status:#}");
    assert!(last["bytes_freed"].as_u64().unwrap() >= 20_000);
    // Without a threshold the flag is a usage error.
    let plain = Node::new("");
    let run = plain
        .run(&["prune", "--app", "web", "--pressure"])
        .fails(64);
    assert!(run.stderr.contains("disk_pressure_free"), "{}", run.stderr);
}
