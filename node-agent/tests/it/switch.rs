//! A reader resolving `current` in a tight loop during 1,000 switches never
//! sees it missing or dangling.

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use slipway_agent::release::{activate, ReleaseId};

#[test]
fn current_never_missing_or_dangling_during_1000_switches() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    let ids: Vec<ReleaseId> = ["r1", "r2", "r3"]
        .iter()
        .map(|s| ReleaseId::new(s).unwrap())
        .collect();
    for id in &ids {
        let d = root.join("releases").join(id.as_str());
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("COMPLETE"), id.as_str()).unwrap();
    }
    activate::switch(&root, &ids[0]).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (root, stop, reads) = (root.clone(), stop.clone(), reads.clone());
            std::thread::spawn(move || -> Result<(), String> {
                let current = root.join("current");
                while !stop.load(Ordering::Relaxed) {
                    let target = fs::read_link(&current).map_err(|e| format!("read_link: {e}"))?;
                    let marker = fs::read_to_string(current.join("COMPLETE")).map_err(|e| {
                        format!("current/COMPLETE (target {}): {e}", target.display())
                    })?;
                    if marker.is_empty() {
                        return Err("empty marker".into());
                    }
                    reads.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    for i in 0..1000 {
        activate::switch(&root, &ids[(i + 1) % ids.len()]).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap().unwrap();
    }
    assert!(reads.load(Ordering::Relaxed) > 1000, "readers barely ran");
    // 1000 switches from r1: the last goes to ids[1000 % 3] = r2.
    assert_eq!(
        activate::read_current(&root).unwrap().unwrap().as_str(),
        "r2"
    );
    let leftovers: Vec<_> = fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with("current."))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
