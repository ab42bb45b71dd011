//! Crafted archives: each is refused with an error naming the entry, nothing
//! is written outside staging, staging is removed, and `current` is unchanged.

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;

use crate::support::{targz, Node, RawTar};
use tar::EntryType;

/// Deploys `v1`, then the crafted tar as `bad`, and checks the refusal.
fn refuse(node: &Node, tar: Vec<u8>, expect_in_error: &[&str]) {
    let v1 = node.artifact("v1.tar.gz", &[("index.js", "v1")]);
    if node.current().is_none() {
        node.deploy(&v1, "v1").ok();
    }
    let before = node.all_paths();
    let bad = node.dir.path().join("bad.tar.gz");
    fs::write(&bad, targz(&tar)).unwrap();
    let before_bad: std::collections::BTreeSet<_> =
        before.into_iter().chain([bad.clone()]).collect();
    let run = node.deploy(&bad, "bad").fails(1);
    for needle in expect_in_error {
        assert!(
            run.stderr.contains(needle),
            "error should mention {needle:?}: {}",
            run.stderr
        );
    }
    assert_eq!(node.current().as_deref(), Some("v1"));
    assert!(node.staging_is_empty(), "staging left behind");
    assert!(!node.root.join("releases/bad").exists());
    // The agent's own bookkeeping (artifact cache, deploy log) is expected.
    let cache = node.root.join(".slipway/cache");
    let logs = node.root.join(".slipway/logs");
    let new: Vec<_> = node
        .all_paths()
        .difference(&before_bad)
        .filter(|p| !p.starts_with(&cache) && !p.starts_with(&logs))
        .cloned()
        .collect();
    assert!(new.is_empty(), "paths written outside staging: {new:?}");
    let statuses = node.statuses();
    assert_eq!(statuses, vec![("v1".to_owned(), "good".to_owned())]);
}

#[test]
fn absolute_path_is_refused() {
    let node = Node::new("");
    let target = node.dir.path().join("abs-escape");
    let name = target.to_str().unwrap().to_owned();
    let tar = RawTar::default()
        .file("ok.txt", 0o644, b"x")
        .file(&name, 0o644, b"pwned")
        .finish();
    refuse(&node, tar, &["absolute path", &name]);
    assert!(!target.exists());
}

#[test]
fn parent_dir_components_are_refused() {
    let node = Node::new("");
    let tar = RawTar::default()
        .file("a/../../../escape.txt", 0o644, b"pwned")
        .finish();
    refuse(&node, tar, &["a/../../../escape.txt", "`..`"]);
    assert!(!node.dir.path().join("escape.txt").exists());
}

#[test]
fn symlink_pointing_outside_is_refused() {
    let node = Node::new("");
    let tar = RawTar::default().symlink("etc", "../../../../etc").finish();
    refuse(&node, tar, &["symlink", "\"etc\"", "escapes"]);
    let tar = RawTar::default().symlink("abs", "/etc/passwd").finish();
    refuse(&node, tar, &["symlink", "\"abs\"", "escapes"]);
}

#[test]
fn symlink_chain_escaping_through_another_link_is_refused() {
    // `d -> .` is harmless alone, and `x -> d/../secret` looks like it stays
    // inside lexically, but resolves to ../secret.
    let node = Node::new("");
    let tar = RawTar::default()
        .dir("sub")
        .symlink("sub/d", ".")
        .symlink("sub/x", "d/../../../secret")
        .finish();
    refuse(&node, tar, &["escapes"]);
    let tar = RawTar::default()
        .symlink("up", ".")
        .symlink("y", "up/../z")
        .finish();
    refuse(&node, tar, &["\"y\"", "escapes"]);
}

#[test]
fn writing_through_a_symlink_is_refused() {
    let node = Node::new("");
    let outside = node.dir.path().join("outside");
    fs::create_dir_all(&outside).unwrap();
    // Even a link that stays inside may not be written through.
    let tar = RawTar::default()
        .dir("real")
        .symlink("link", "real")
        .file("link/file.txt", 0o644, b"x")
        .finish();
    refuse(&node, tar, &["link/file.txt", "through a symlink"]);
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
}

#[test]
fn hardlinks_outside_or_to_unknown_files_are_refused() {
    let node = Node::new("");
    let tar = RawTar::default()
        .hardlink("passwd", "../../../../etc/passwd")
        .finish();
    refuse(&node, tar, &["hardlink", "\"passwd\""]);
    let tar = RawTar::default().hardlink("shadow", "/etc/shadow").finish();
    refuse(&node, tar, &["hardlink", "\"shadow\""]);
    let tar = RawTar::default()
        .hardlink("early", "later.txt")
        .file("later.txt", 0o644, b"x")
        .finish();
    refuse(
        &node,
        tar,
        &["hardlink", "\"early\"", "earlier in the archive"],
    );
}

#[test]
fn device_nodes_and_fifos_are_refused() {
    let node = Node::new("");
    let mut t = RawTar::default();
    t.entry("dev/null2", EntryType::Char, 0o666, None, b"");
    refuse(&node, t.finish(), &["dev/null2", "character device"]);
    let mut t = RawTar::default();
    t.entry("disk", EntryType::Block, 0o660, None, b"");
    refuse(&node, t.finish(), &["\"disk\"", "block device"]);
    let mut t = RawTar::default();
    t.entry("pipe", EntryType::Fifo, 0o644, None, b"");
    refuse(&node, t.finish(), &["\"pipe\"", "fifo"]);
}

#[test]
fn too_many_entries_is_refused() {
    let node = Node::new("max_entries = 10");
    let mut t = RawTar::default();
    for i in 0..11 {
        t.file(&format!("f{i}"), 0o644, b"x");
    }
    refuse(&node, t.finish(), &["more than 10 entries", "max_entries"]);
}

#[test]
fn expanding_past_the_limit_is_refused() {
    let node = Node::new("max_expanded_size = \"64KiB\"");
    let big = vec![0u8; 40 << 10];
    let tar = RawTar::default()
        .file("a.bin", 0o644, &big)
        .file("b.bin", 0o644, &big)
        .finish();
    refuse(&node, tar, &["\"b.bin\"", "65536", "max_expanded_size"]);
}

#[test]
fn truncated_and_corrupt_archives_fail_cleanly() {
    let node = Node::new("");
    let mut t = RawTar::default();
    t.file("big.bin", 0o644, &vec![7u8; 200_000])
        .file("after.txt", 0o644, b"x");
    let tar = t.finish();
    // Truncated: cut the gzip stream in the middle of a file.
    let gz = targz(&tar);
    let v1 = node.artifact("v1.tar.gz", &[("index.js", "v1")]);
    node.deploy(&v1, "v1").ok();
    let cut = node.dir.path().join("cut.tar.gz");
    fs::write(&cut, &gz[..gz.len() / 2]).unwrap();
    let run = node.deploy(&cut, "cut").fails(1);
    assert!(
        run.stderr.contains("truncated or corrupt"),
        "{}",
        run.stderr
    );
    // Corrupt: flip bytes in the compressed data.
    let mut bad = gz.clone();
    let mid = bad.len() / 2;
    for b in &mut bad[mid..mid + 16] {
        *b ^= 0xff;
    }
    let corrupt = node.dir.path().join("corrupt.tar.gz");
    fs::write(&corrupt, &bad).unwrap();
    let run = node.deploy(&corrupt, "corrupt").fails(1);
    assert!(
        run.stderr.contains("truncated or corrupt"),
        "{}",
        run.stderr
    );
    // Not an archive at all.
    let junk = node.dir.path().join("junk.tar.gz");
    fs::write(&junk, b"definitely not gzip").unwrap();
    let run = node.deploy(&junk, "junk").fails(1);
    assert!(run.stderr.contains("is not a .tar.gz"), "{}", run.stderr);
    assert_eq!(node.current().as_deref(), Some("v1"));
    assert!(node.staging_is_empty());
    assert_eq!(node.dirs_on_disk().into_iter().collect::<Vec<_>>(), ["v1"]);
}

#[test]
fn setuid_setgid_and_sticky_bits_are_stripped() {
    for store in ["true", "false"] {
        let node = Node::new(&format!("content_store = {store}"));
        let tar = RawTar::default()
            .file("bin/tool", 0o6755, b"#!/bin/sh\n")
            .entry("tmpdir", EntryType::Directory, 0o1777, None, b"")
            .finish();
        let art = node.dir.path().join("a.tar.gz");
        fs::write(&art, targz(&tar)).unwrap();
        node.deploy(&art, "v1").ok();
        let mode = fs::metadata(node.root.join("current/bin/tool"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7000, 0, "set-id bits kept: {mode:o}");
        assert_ne!(mode & 0o100, 0, "exec bit lost: {mode:o}");
        let dmode = fs::metadata(node.root.join("current/tmpdir"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dmode & 0o7000, 0, "sticky kept: {dmode:o}");
    }
}

#[test]
fn links_that_stay_inside_are_kept() {
    let node = Node::new("");
    let tar = RawTar::default()
        .dir("lib")
        .file("lib/real.js", 0o644, b"real")
        .symlink("lib/alias.js", "real.js")
        .symlink("top", "lib/../lib/real.js")
        .hardlink("lib/hard.js", "lib/real.js")
        .finish();
    let art = node.dir.path().join("a.tar.gz");
    fs::write(&art, targz(&tar)).unwrap();
    node.deploy(&art, "v1").ok();
    let cur = node.root.join("current");
    assert_eq!(
        fs::read_to_string(cur.join("lib/alias.js")).unwrap(),
        "real"
    );
    assert_eq!(fs::read_to_string(cur.join("top")).unwrap(), "real");
    assert_eq!(fs::read_to_string(cur.join("lib/hard.js")).unwrap(), "real");
    node.run(&["verify", "--app", "web"]).ok();
}
