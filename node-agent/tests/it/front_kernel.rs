//! The front's kernel forwarding (TCP mode): nftables DNAT for this
//! machine's own clients, with real `nft`, real PM2 fork-mode deploys and a
//! bounded load loop, each test inside a network namespace of its own
//! ([`netns::enter`]): no rule ever touches the machine's namespace.

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use slipway_agent::front::kernel;

use crate::front::{pm2_fork_node_with as pm2_node, Pm2Home};
use crate::support::load::{Load, Timeline};
use crate::support::{free_port, free_ports, http_get, netns, wait_until, Node};

const LOAD_TIME: Duration = Duration::from_secs(300);
const LOAD_REQUESTS: usize = 200_000;
/// The PM2 test app (answers `RELEASE PID` on $PORT).
const PM2_SERVER: &str = include_str!("../fixtures/pm2-app/server.js");

/// Stops the app (and its front) however the test ends.
struct StopApp<'a>(&'a Node);

impl Drop for StopApp<'_> {
    fn drop(&mut self) {
        let _ = self.0.run(&["stop", "--app", "web"]);
    }
}

/// Deploys release `v` with `env` added: the report, and the agent's log
/// lines (the front's switch line among them).
fn deploy(node: &Node, v: &str, env: &[(&str, &str)]) -> (serde_json::Value, String) {
    let art = artifact(node, v);
    let run = node
        .run_env(
            &[
                "deploy",
                "--app",
                "web",
                "--artifact",
                art.to_str().unwrap(),
                "--id",
                v,
                "--json",
            ],
            env,
        )
        .ok();
    let r = run.json();
    assert_eq!(
        r["outcome"], "succeeded",
        "deploy {v}: {r:#}\n{}",
        run.stderr
    );
    (r, run.stderr)
}

fn artifact(node: &Node, v: &str) -> PathBuf {
    let server = PM2_SERVER.replace("__RELEASE__", v);
    node.artifact(&format!("{v}.tar.gz"), &[("server.js", server.as_str())])
}

/// `nft list table ip NAME`: the rules, or `None` when there is no such
/// table.
fn table(node: &Node) -> Option<String> {
    let out = Command::new("nft")
        .args(["list", "table", "ip", &kernel::table_name(&node.root)])
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn any_slipway_table() -> String {
    let out = Command::new("nft")
        .args(["list", "tables"])
        .output()
        .unwrap();
    assert!(out.status.success(), "nft list tables: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("slipway_front_"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn front_state(node: &Node) -> serde_json::Value {
    serde_json::from_str(&fs::read_to_string(node.root.join(".slipway/run/front.json")).unwrap())
        .unwrap()
}

fn notes(node: &Node) -> String {
    let st = node.run(&["status", "--json"]).ok().json();
    st["apps"][0]["processes"]["notes"].to_string()
}

/// Tracked connections made to `public` that the kernel translated to one
/// of `ports` (any state: TIME_WAIT ones count, they were forwarded).
fn forwarded_by_kernel(public: u16, ports: [u16; 2]) -> usize {
    let text = fs::read_to_string(kernel::CONNTRACK).unwrap();
    text.lines()
        .filter(|l| {
            l.contains(&format!(" dport={public} "))
                && ports
                    .iter()
                    .any(|p| l.contains(&format!(" sport={p} dport=")))
        })
        .count()
}

/// A keep-alive connection to `public`: sends `GET /`, returns the
/// release that answered.
fn ask(s: &mut TcpStream) -> String {
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: keep-alive\r\n\r\n")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_owned())
                })
                .unwrap()
                .parse()
                .unwrap();
            if buf.len() >= end + 4 + len {
                return text[end + 4..end + 4 + len]
                    .split(' ')
                    .next()
                    .unwrap()
                    .to_owned();
            }
        }
    }
}

#[test]
fn kernel_forwarded_deploys_under_load_lose_nothing_and_stop_removes_the_table() {
    if !netns::enter(
        "front_kernel::kernel_forwarded_deploys_under_load_lose_nothing_and_stop_removes_the_table",
    ) {
        return;
    }
    const DEPLOYS: usize = 6;
    let public = free_port();
    let ports = free_ports::<2>();
    let pm2_home = tempfile::tempdir().unwrap();
    let _pm2 = Pm2Home(pm2_home.path().to_owned());
    let node = pm2_node(public, ports, pm2_home.path(), "");
    let stop = StopApp(&node);
    let r = node.deploy_json(&artifact(&node, "v0"), "v0").ok().json();
    assert_eq!(r["outcome"], "succeeded", "{r:#}");
    let rules = table(&node).expect("no table after the first deploy");
    assert!(
        rules.contains("hook output")
            && rules.contains(&format!(
                "ip daddr 127.0.0.1 tcp dport {public} dnat to 127.0.0.1:{}",
                ports[0]
            )),
        "{rules}"
    );
    assert!(!rules.contains("prerouting"), "{rules}");
    let n = notes(&node);
    assert!(n.contains("kernel-forwarded for local clients"), "{n}");
    let st = node.run(&["status", "--json"]).ok().json();
    let f = st["apps"][0]["public"]["forwarding"]
        .as_str()
        .unwrap_or_default();
    assert!(
        f.starts_with("kernel-forwarded for local clients"),
        "{st:#}"
    );
    let text = node.run(&["status"]).ok().stdout;
    assert!(
        text.contains("kernel-forwarded for local clients"),
        "{text}"
    );

    let t0 = Instant::now();
    let mut timeline = Timeline::live("v0", t0);
    let load = Load::start(public, "/", 2, 1, LOAD_TIME, LOAD_REQUESTS);
    let mut deployed = BTreeSet::from(["v0".to_owned()]);
    for i in 1..=DEPLOYS {
        let v = format!("v{i}");
        let started = Instant::now();
        let r = node.deploy_json(&artifact(&node, &v), &v).ok().json();
        assert_eq!(r["outcome"], "succeeded", "deploy {v}: {r:#}");
        timeline.step(&v, started, Instant::now());
        eprintln!(
            "{:.3}s: {v} deployed: {}",
            t0.elapsed().as_secs_f64(),
            r["steps"]
        );
        // The table now forwards to the new release's port, the only rule.
        let rules = table(&node).unwrap();
        assert!(
            rules.contains(&format!("dnat to 127.0.0.1:{}", ports[i % 2]))
                && !rules.contains(&format!("dnat to 127.0.0.1:{}", ports[(i + 1) % 2])),
            "{v}: {rules}"
        );
        deployed.insert(v);
    }
    std::thread::sleep(Duration::from_millis(300));
    let report = load.stop();
    eprintln!(
        "{DEPLOYS} kernel-forwarded pm2 fork deploys: {}",
        report.summary()
    );
    assert_eq!(report.failures(), 0, "{}", report.summary());
    assert!(report.ok >= 300, "too little load: {}", report.summary());
    let seen: BTreeSet<String> = report.bodies.iter().cloned().collect();
    assert!(seen.is_subset(&deployed), "{seen:?}");
    assert!(seen.contains(&format!("v{DEPLOYS}")), "{seen:?}");
    let stale = timeline.stale(&report, false);
    assert!(
        stale.is_empty(),
        "{} stale: {:?}",
        stale.len(),
        &stale[..stale.len().min(5)]
    );
    // The load went through the kernel's translation, not the front.
    let forwarded = forwarded_by_kernel(public, ports);
    assert!(
        forwarded >= 100,
        "only {forwarded} connections forwarded by the kernel"
    );

    // A clean stop of the app takes the table away.
    drop(stop);
    assert_eq!(table(&node), None);
    assert_eq!(any_slipway_table(), "");
}

#[test]
fn kernel_forwarded_connections_are_drained_before_the_old_release_stops() {
    if !netns::enter(
        "front_kernel::kernel_forwarded_connections_are_drained_before_the_old_release_stops",
    ) {
        return;
    }
    let public = free_port();
    let ports = free_ports::<2>();
    let pm2_home = tempfile::tempdir().unwrap();
    let _pm2 = Pm2Home(pm2_home.path().to_owned());
    let node = pm2_node(public, ports, pm2_home.path(), "");
    let _stop = StopApp(&node);
    let r = node.deploy_json(&artifact(&node, "v0"), "v0").ok().json();
    assert_eq!(r["outcome"], "succeeded", "{r:#}");
    // A keep-alive connection forwarded by the kernel to v0.
    let mut held = TcpStream::connect(("127.0.0.1", public)).unwrap();
    assert_eq!(ask(&mut held), "v0");
    let old = SocketAddrV4::new(Ipv4Addr::LOCALHOST, ports[0]);
    let open = kernel::open_connections(public, &[old]).unwrap();
    assert_eq!(open.get(&old), Some(&1), "conntrack: {open:?}");

    // The deploy of v1 waits for it: closed after 1.5 s, it ends then.
    let deployed = std::thread::scope(|s| {
        let started = Instant::now();
        let d = s.spawn(|| deploy(&node, "v1", &[]));
        let key = old.to_string();
        wait_until(
            "the front to count the old connection",
            Duration::from_secs(30),
            || front_state(&node)["draining"][&key].as_u64() == Some(1),
        );
        assert_eq!(
            front_state(&node)["backend"],
            format!("127.0.0.1:{}", ports[1])
        );
        std::thread::sleep(Duration::from_millis(1500).saturating_sub(started.elapsed()));
        assert!(
            !d.is_finished(),
            "the deploy did not wait for the open connection"
        );
        // The old release still serves it.
        assert_eq!(ask(&mut held), "v0");
        drop(held);
        let r = d.join().unwrap();
        (r, started.elapsed())
    });
    let ((_, log), took) = deployed;
    assert!(log.contains("previous backend drained in"), "{log}");
    assert!(log.contains("kernel-forwarded for local clients"), "{log}");
    assert!(took >= Duration::from_millis(1500), "{took:?}");
    assert_eq!(
        http_get(public, "/").unwrap().1.split(' ').next(),
        Some("v1")
    );

    // Bounded: a connection that stays open is waited for at most the
    // drain bound (3 s for PM2), then the old release stops all the same.
    let mut held = TcpStream::connect(("127.0.0.1", public)).unwrap();
    assert_eq!(ask(&mut held), "v1");
    let started = Instant::now();
    let (_, log) = deploy(&node, "v2", &[]);
    let took = started.elapsed();
    assert!(
        log.contains("1 connections still open to the previous backend after 3s"),
        "{log}"
    );
    assert!(took >= Duration::from_secs(3), "{took:?}");
    // v1 is gone: its connection was closed.
    let mut rest = Vec::new();
    held.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = held.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n");
    let got = held.read_to_end(&mut rest).map(|_| rest.len());
    assert!(matches!(got, Ok(0) | Err(_)), "v1 still answers: {got:?}");
}

#[test]
fn kernel_forward_false_leaves_no_table() {
    if !netns::enter("front_kernel::kernel_forward_false_leaves_no_table") {
        return;
    }
    let public = free_port();
    let ports = free_ports::<2>();
    let pm2_home = tempfile::tempdir().unwrap();
    let _pm2 = Pm2Home(pm2_home.path().to_owned());
    let node = pm2_node(public, ports, pm2_home.path(), "kernel_forward = false");
    let _stop = StopApp(&node);
    for v in ["v0", "v1"] {
        let r = node.deploy_json(&artifact(&node, v), v).ok().json();
        assert_eq!(r["outcome"], "succeeded", "{r:#}");
        assert_eq!(any_slipway_table(), "");
        assert_eq!(http_get(public, "/").unwrap().1.split(' ').next(), Some(v));
    }
    assert_eq!(forwarded_by_kernel(public, ports), 0);
    let n = notes(&node);
    assert!(
        n.contains("not kernel-forwarded: kernel_forward = false"),
        "{n}"
    );
}

#[test]
fn a_missing_or_refused_nft_leaves_the_front_proxying() {
    if !netns::enter("front_kernel::a_missing_or_refused_nft_leaves_the_front_proxying") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let denied = dir.path().join("nft-denied");
    fs::write(
        &denied,
        "#!/bin/sh\necho 'Error: Could not process rule: Operation not permitted' >&2\nexit 1\n",
    )
    .unwrap();
    fs::set_permissions(&denied, fs::Permissions::from_mode(0o755)).unwrap();
    let missing = dir.path().join("no-such-nft");
    for (nft, said) in [
        (missing.to_str().unwrap(), "cannot run"),
        (denied.to_str().unwrap(), "Operation not permitted"),
    ] {
        let public = free_port();
        let ports = free_ports::<2>();
        let pm2_home = tempfile::tempdir().unwrap();
        let _pm2 = Pm2Home(pm2_home.path().to_owned());
        let node = pm2_node(public, ports, pm2_home.path(), "");
        let _stop = StopApp(&node);
        for v in ["v0", "v1"] {
            let (_, log) = deploy(&node, v, &[(kernel::NFT_ENV, nft)]);
            assert!(
                log.contains("not kernel-forwarded: nft failed"),
                "{nft}: {log}"
            );
            assert_eq!(
                http_get(public, "/").unwrap().1.split(' ').next(),
                Some(v),
                "{nft}"
            );
        }
        assert_eq!(any_slipway_table(), "");
        assert_eq!(forwarded_by_kernel(public, ports), 0);
        let n = notes(&node);
        assert!(
            n.contains("not kernel-forwarded: nft failed") && n.contains(said),
            "{nft}: {n}"
        );
        // Said once at warn, not at every switch.
        let log = fs::read_to_string(node.root.join(".slipway/run/front.log")).unwrap();
        assert_eq!(log.matches("WARN").count(), 1, "{nft}: {log}");
        assert!(log.contains(said), "{nft}: {log}");
    }
}
