//! Deploy, rollback, prune, locking, hooks, shared links, content store and
//! verify, through the real binary.

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::support::{deploy_args, tar_of, tarzst, wait_until, Node};

fn app_files(version: &str, n: usize) -> Vec<(String, String)> {
    let mut f: Vec<(String, String)> = (0..n)
        .map(|i| {
            (
                format!("lib/m{i}.js"),
                format!("// shared module {i}\n").repeat(100),
            )
        })
        .collect();
    f.push(("VERSION".into(), version.into()));
    f
}

fn art(node: &Node, version: &str) -> std::path::PathBuf {
    let f = app_files(version, 30);
    let refs: Vec<(&str, &str)> = f.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    node.artifact(&format!("{version}.tar.gz"), &refs)
}

#[test]
fn second_deploy_fails_at_once_naming_the_holder_and_lock_dies_with_it() {
    let node = Node::new("");
    let gate = node.dir.path().join("gate");
    let entered = node.dir.path().join("entered");
    fs::write(
        &node.config,
        format!(
            "{}[apps.web.hooks]\nbefore_activate = [\"touch {}; while [ ! -e {} ]; do sleep 0.02; done\"]\n",
            fs::read_to_string(&node.config).unwrap(),
            entered.display(),
            gate.display()
        ),
    )
    .unwrap();
    let v1 = art(&node, "v1");
    let mut first = node
        .cmd(&deploy_args(&v1, "v1"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the first deploy's hook", Duration::from_secs(20), || {
        entered.exists()
    });
    let v2 = art(&node, "v2");
    let t = Instant::now();
    let run = node.deploy(&v2, "v2").fails(1);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "second deploy waited for the lock"
    );
    assert!(run.stderr.contains("deploy in progress"), "{}", run.stderr);
    assert!(
        run.stderr.contains(&format!("pid {}", first.id())),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("release v1"), "{}", run.stderr);
    assert!(run.stderr.contains("started 20"), "{}", run.stderr);
    // Reads still work while the lock is held, and say who holds it.
    let rel = node.releases();
    assert_eq!(rel["lock_holder"]["pid"], first.id());
    assert_eq!(rel["in_progress"]["kind"], "deploy");

    // kill -9 the holder: the lock goes with it; no stale lock to remove.
    first.kill().unwrap();
    first.wait().unwrap();
    fs::write(&gate, "").unwrap();
    node.deploy(&v2, "v2").ok();
    assert_eq!(node.current().as_deref(), Some("v2"));
}

#[test]
fn hooks_get_env_and_failures_keep_or_restore_current() {
    let node = Node::new("");
    let log = node.dir.path().join("hook.log");
    let base = fs::read_to_string(&node.config).unwrap();
    let set_hooks = |before: &str, after: &str| {
        fs::write(
            &node.config,
            format!("{base}[apps.web.hooks]\nbefore_activate = [{before:?}]\nafter_activate = [{after:?}]\ntimeout = \"20s\"\n"),
        )
        .unwrap();
    };
    let env_line = format!(
        "echo \"$SLIPWAY_APP $SLIPWAY_RELEASE [$SLIPWAY_PREVIOUS] $(basename $(pwd))\" >> {}",
        log.display()
    );
    set_hooks(&env_line, "true");
    node.deploy(&art(&node, "v1"), "v1").ok();
    node.deploy(&art(&node, "v2"), "v2").ok();
    assert_eq!(
        fs::read_to_string(&log).unwrap(),
        "web v1 [] v1\nweb v2 [v1] v2\n"
    );

    set_hooks("echo migration failed >&2; exit 7", "true");
    let run = node.deploy(&art(&node, "v3"), "v3").fails(1);
    assert!(
        run.stderr.contains("exit status: 7") && run.stderr.contains("migration failed"),
        "{}",
        run.stderr
    );
    assert_eq!(node.current().as_deref(), Some("v2"));
    let deploy_log = fs::read_to_string(node.root.join(".slipway/logs/v3.log")).unwrap();
    assert!(deploy_log.contains("migration failed"), "{deploy_log}");

    set_hooks("true", "exit 3");
    let run = node.deploy(&art(&node, "v4"), "v4").fails(1);
    assert!(
        run.stderr.contains("after_activate") && run.stderr.contains("current restored to v2"),
        "{}",
        run.stderr
    );
    assert_eq!(node.current().as_deref(), Some("v2"));
    let st = node.statuses();
    assert!(
        st.contains(&("v3".into(), "failed".into()))
            && st.contains(&("v4".into(), "failed".into())),
        "{st:?}"
    );
}

#[test]
fn commands_on_an_app_with_nothing_deployed_say_so() {
    let node = Node::new("");
    for cmd in ["restart", "verify"] {
        let run = node.run(&[cmd, "--app", "web"]).fails(1);
        assert!(
            run.stderr.contains("app \"web\" has no release deployed")
                && !run.stderr.contains("roll back"),
            "{cmd}: {}",
            run.stderr
        );
    }
    let run = node.run(&["rollback", "--app", "web"]).fails(1);
    assert!(
        run.stderr
            .contains("has no good release to roll back to (nothing is deployed)"),
        "{}",
        run.stderr
    );
}

#[test]
fn rollback_marks_bad_skips_bad_and_goes_to_named_release() {
    let node = Node::new("");
    for v in ["v1", "v2", "v3"] {
        node.deploy(&art(&node, v), v).ok();
    }
    node.run(&["rollback", "--app", "web"]).ok();
    assert_eq!(node.current().as_deref(), Some("v2"));
    assert!(node.statuses().contains(&("v3".into(), "bad".into())));
    // The next rollback skips bad v3 and goes to v1.
    node.run(&["rollback", "--app", "web"]).ok();
    assert_eq!(node.current().as_deref(), Some("v1"));
    let rel = node.releases();
    assert!(rel["rollback_target"].is_null(), "{rel:#}");
    let run = node.run(&["rollback", "--app", "web"]).fails(1);
    assert!(
        run.stderr.contains("no good release to roll back to"),
        "{}",
        run.stderr
    );
    // A named release, even a bad one, on purpose.
    node.run(&["rollback", "--app", "web", "--to", "v3"]).ok();
    assert_eq!(node.current().as_deref(), Some("v3"));
    let run = node
        .run(&["rollback", "--app", "web", "--to", "nope"])
        .fails(1);
    assert!(run.stderr.contains("has no release nope"), "{}", run.stderr);
    let run = node
        .run(&["rollback", "--app", "web", "--to", "../etc"])
        .fails(64);
    assert!(run.stderr.contains("invalid release id"), "{}", run.stderr);
}

#[test]
fn prune_keeps_good_releases_despite_failed_ones() {
    let node = Node::new("keep = 2\nkeep_failed = 1");
    node.deploy(&art(&node, "g1"), "g1").ok();
    node.deploy(&art(&node, "g2"), "g2").ok();
    let bad = node.dir.path().join("bad.tar.gz");
    fs::write(&bad, b"not an archive").unwrap();
    // A string of failed deploys (the artifact's shared link clashes).
    fs::write(
        &node.config,
        fs::read_to_string(&node.config).unwrap()
            + "[apps.web.hooks]\nbefore_activate = [\"exit 1\"]\n",
    )
    .unwrap();
    for i in 0..4 {
        node.deploy(&art(&node, &format!("f{i}")), &format!("f{i}"))
            .fails(1);
    }
    node.run(&["prune", "--app", "web"]).ok();
    let ids: Vec<String> = node.statuses().into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, ["g1", "g2", "f3"]);
    assert_eq!(
        node.dirs_on_disk().into_iter().collect::<Vec<_>>(),
        ["f3", "g1", "g2"]
    );
    let run = node
        .run(&["prune", "--app", "web", "--keep", "0"])
        .fails(64);
    assert!(run.stderr.contains("--keep"), "{}", run.stderr);
    node.run(&["prune", "--app", "web", "--keep", "1"]).ok();
    // g1 is the rollback target: kept even with keep = 1.
    let ids: Vec<String> = node.statuses().into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, ["g1", "g2", "f3"]);
}

#[test]
fn content_store_hardlinks_unchanged_files_and_gc_frees_them() {
    let node = Node::new("keep = 1\nkeep_failed = 0");
    node.deploy(&art(&node, "v1"), "v1").ok();
    let report = node.deploy_json(&art(&node, "v2"), "v2").ok().json();
    assert_eq!(report["reused_files"], 30, "{report:#}");
    assert_eq!(report["new_objects"], 1, "{report:#}");
    let a = fs::metadata(node.root.join("releases/v1/lib/m0.js")).unwrap();
    let b = fs::metadata(node.root.join("releases/v2/lib/m0.js")).unwrap();
    assert_eq!(a.ino(), b.ino(), "unchanged file not shared");
    assert_eq!(a.mode() & 0o222, 0, "store objects must be read-only");
    let v1 = fs::metadata(node.root.join("releases/v1/VERSION")).unwrap();
    let v2 = fs::metadata(node.root.join("releases/v2/VERSION")).unwrap();
    assert_ne!(v1.ino(), v2.ino());
    // Same artifact again: rebuilt from the manifest, nothing unpacked.
    let report = node.deploy_json(&art(&node, "v2"), "v2b").ok().json();
    assert_eq!(report["method"], "rebuilt from manifest");
    // v1 is pruned (keep 1: v2b current, v2 rollback target); its only
    // private object (VERSION "v1") is collected.
    assert!(!node.root.join("releases/v1").exists());
    let objects = count_files(&node.root.join(".slipway/objects"));
    assert_eq!(objects, 31, "30 shared modules + VERSION v2");
}

fn count_files(dir: &Path) -> usize {
    let mut n = 0;
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            n += count_files(&e.path());
        } else {
            n += 1;
        }
    }
    n
}

#[test]
fn store_off_writes_plain_copies() {
    let node = Node::new("content_store = false");
    node.deploy(&art(&node, "v1"), "v1").ok();
    node.deploy(&art(&node, "v2"), "v2").ok();
    let a = fs::metadata(node.root.join("releases/v1/lib/m0.js")).unwrap();
    let b = fs::metadata(node.root.join("releases/v2/lib/m0.js")).unwrap();
    assert_ne!(a.ino(), b.ino());
    assert_eq!(a.mode() & 0o777, 0o644);
    let objects = node
        .root
        .join(".slipway/objects")
        .read_dir()
        .unwrap()
        .count();
    assert_eq!(objects, 0, "store off must not fill the object store");
}

#[test]
fn verify_names_a_file_changed_in_place() {
    let node = Node::new("");
    node.deploy(&art(&node, "v1"), "v1").ok();
    node.run(&["verify", "--app", "web"]).ok();
    // Root can write a read-only hardlinked object in place: exactly the
    // accident verify exists for.
    let victim = node.root.join("current/lib/m3.js");
    fs::write(&victim, "tampered").unwrap();
    fs::write(node.root.join("current/new-file.txt"), "x").unwrap();
    let run = node.run(&["verify", "--app", "web"]).fails(1);
    assert!(run.stdout.contains("modified: lib/m3.js"), "{}", run.stdout);
    assert!(
        run.stdout.contains("added:    new-file.txt"),
        "{}",
        run.stdout
    );
    let json = node
        .run(&["verify", "--app", "web", "--json"])
        .fails(1)
        .json();
    assert_eq!(json["findings"][0]["kind"], "modified");
    assert_eq!(json["findings"][0]["path"], "lib/m3.js");
}

#[test]
fn shared_links_are_created_and_conflicts_refused() {
    let node = Node::new("");
    node.deploy(&art(&node, "v1"), "v1").ok();
    let cur = node.root.join("current");
    assert_eq!(
        fs::read_to_string(cur.join(".env")).unwrap(),
        "SECRET=s3cr3t\n"
    );
    assert!(
        node.root.join("shared/logs").is_dir(),
        "missing shared dir not created"
    );
    fs::write(cur.join("logs/app.log"), "line").unwrap();
    assert!(node.root.join("shared/logs/app.log").exists());
    // An artifact that ships its own .env clashes with the shared one.
    let clash = node.artifact(
        "clash.tar.gz",
        &[("VERSION", "v2"), (".env", "PROD_SECRET=oops")],
    );
    let run = node.deploy(&clash, "v2").fails(1);
    assert!(
        run.stderr.contains(".env") && run.stderr.contains("artifact_wins"),
        "{}",
        run.stderr
    );
    assert_eq!(node.current().as_deref(), Some("v1"));
    // Unless the config says the artifact wins.
    let cfg = fs::read_to_string(&node.config)
        .unwrap()
        .replace("[apps.web]\n", "[apps.web]\nartifact_wins = true\n");
    fs::write(&node.config, cfg).unwrap();
    node.deploy(&clash, "v3").ok();
    assert_eq!(
        fs::read_to_string(cur.join(".env")).unwrap(),
        "PROD_SECRET=oops"
    );
    // A missing shared file is a clear error.
    fs::remove_file(node.root.join("shared/.env")).unwrap();
    let run = node.deploy(&art(&node, "v4"), "v4").fails(1);
    assert!(
        run.stderr.contains("shared file") && run.stderr.contains("does not exist"),
        "{}",
        run.stderr
    );
}

#[test]
fn checksum_ids_space_and_formats() {
    let node = Node::new("");
    let v1 = art(&node, "v1");
    let bad_sha = "0".repeat(64);
    let run = node
        .run(&[
            "deploy",
            "--app",
            "web",
            "--artifact",
            v1.to_str().unwrap(),
            "--sha256",
            &bad_sha,
            "--json",
        ])
        .fails(1);
    assert!(run.stderr.contains("expected 0000"), "{}", run.stderr);
    let j = run.json();
    assert_eq!(j["outcome"], "failed");
    assert!(
        j["error"].as_str().unwrap().contains("expected 0000"),
        "{j:#}"
    );
    assert!(node.dirs_on_disk().is_empty());
    let run = node
        .run(&[
            "deploy",
            "--app",
            "web",
            "--artifact",
            v1.to_str().unwrap(),
            "--sha256",
            "xyz",
        ])
        .fails(64);
    assert!(run.stderr.contains("64 hexadecimal"), "{}", run.stderr);
    let run = node.deploy(&v1, "a/b").fails(64);
    assert!(
        run.stderr.contains("invalid release id \"a/b\""),
        "{}",
        run.stderr
    );

    // Generated id: timestamp + short sha; the right sha is accepted.
    let sha = support_sha(&v1);
    let rep = node
        .run(&[
            "deploy",
            "--app",
            "web",
            "--artifact",
            v1.to_str().unwrap(),
            "--sha256",
            &sha,
            "--json",
        ])
        .ok()
        .json();
    let id = rep["release"].as_str().unwrap();
    assert!(
        id.ends_with(&format!("Z-{}", &sha[..8])) && id.len() == 25,
        "{id}"
    );
    // Same id, different artifact: refused.
    let v2 = art(&node, "v2");
    let run = node.deploy(&v2, id).fails(1);
    assert!(
        run.stderr.contains("already exists with artifact sha256"),
        "{}",
        run.stderr
    );
    // Same id, same artifact, already current: a no-op success.
    let rep = node.deploy_json(&v1, id).ok().json();
    assert_eq!(rep["method"], "already current");

    // zstd artifacts.
    let zst = node.dir.path().join("v5.tar.zst");
    fs::write(&zst, tarzst(&tar_of(&[("VERSION", "v5")]))).unwrap();
    node.deploy(&zst, "v5").ok();
    assert_eq!(
        fs::read_to_string(node.root.join("current/VERSION")).unwrap(),
        "v5"
    );
}

fn support_sha(p: &Path) -> String {
    slipway_agent::digest::Sha256::of_file(p)
        .unwrap()
        .into_string()
}

#[test]
fn not_enough_free_space_is_refused_before_unpacking() {
    let node = Node::new("free_space_margin = \"1000000TB\"");
    let run = node.deploy(&art(&node, "v1"), "v1").fails(1);
    assert!(
        run.stderr.contains("not enough free space on"),
        "{}",
        run.stderr
    );
    assert!(node.dirs_on_disk().is_empty());
    assert!(node.staging_is_empty());
    assert!(node.current().is_none());
}

#[test]
fn bad_config_exits_64_with_file_line_and_key() {
    let node = Node::new("keep = \"lots\"\nbogus = 3");
    let run = node.run(&["releases", "--app", "web"]).fails(64);
    assert!(
        run.stderr.contains("agent.toml:5: apps.web.keep"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr
            .contains("agent.toml:6: apps.web.bogus: unknown key"),
        "{}",
        run.stderr
    );
    let node = Node::new("");
    let run = node.run(&["releases", "--app", "api"]).fails(64);
    assert!(
        run.stderr.contains("app \"api\" is not declared"),
        "{}",
        run.stderr
    );
    let run = node.run(&["deploy", "--app"]).fails(64);
    assert!(run.stderr.contains("--app"), "{}", run.stderr);
    let run = node.run(&["status", "--json"]).ok().json();
    assert_eq!(run["apps"][0]["app"], "web");
}

#[test]
fn polling_releases_and_status_never_makes_a_deploy_fail() {
    // Each deploy holds the lock for a while (its hook sleeps).
    let node = std::sync::Arc::new(Node::new(
        "[apps.web.hooks]\nbefore_activate = [\"sleep 0.3\"]",
    ));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let (node, stop) = (node.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut polls = 0;
            // Bounded: at most 2,000 polls, and never past the deploys.
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && polls < 2000 {
                let args: &[&str] = if polls % 10 == 9 {
                    &["status", "--json"]
                } else {
                    &["releases", "--app", "web", "--json"]
                };
                node.run(args).ok();
                polls += 1;
            }
            polls
        })
    };
    for v in ["v1", "v2", "v3", "v4", "v5"] {
        node.deploy(&art(&node, v), v).ok();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let polls = poller.join().unwrap();
    assert!(polls > 20, "the poller barely ran ({polls} polls)");
    assert_eq!(node.current().as_deref(), Some("v5"));
    // Deterministically: whoever takes the lock rewrites its holder record;
    // reads leave it alone.
    let lock = node.root.join(".slipway/lock");
    fs::write(&lock, "sentinel").unwrap();
    node.run(&["releases", "--app", "web"]).ok();
    node.run(&["status"]).ok();
    assert_eq!(
        fs::read_to_string(&lock).unwrap(),
        "sentinel",
        "a read took the lock"
    );
}

#[test]
fn redeploying_an_existing_good_release_id_reactivates_it() {
    let node = Node::new("");
    let v1 = art(&node, "v1");
    node.deploy(&v1, "v1").ok();
    node.deploy(&art(&node, "v2"), "v2").ok();
    let rep = node.deploy_json(&v1, "v1").ok().json();
    assert_eq!(rep["method"], "reactivated", "{rep:#}");
    assert_eq!(node.current().as_deref(), Some("v1"));
    assert_eq!(
        node.statuses(),
        vec![("v1".into(), "good".into()), ("v2".into(), "good".into())]
    );
    assert_eq!(
        fs::read_to_string(node.root.join("current/VERSION")).unwrap(),
        "v1"
    );
}
