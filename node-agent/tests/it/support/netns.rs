//! Tests that install nftables rules run inside a network namespace of
//! their own, so no rule ever touches the machine's namespace: the test
//! process runs itself again in it (`nsenter --net`, one test, `--exact`),
//! and the namespace is removed afterwards, with whatever still runs in it
//! (the front, a PM2 daemon) killed by pid.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Set in the test process started inside the namespace (its name).
const INSIDE: &str = "SLIPWAY_TEST_NETNS";

/// Outside a test's namespace the agent's fronts get an `nft` that does not
/// exist (they proxy every connection themselves, as before kernel
/// forwarding): no test writes rules into the machine's namespace.
pub fn nft_env() -> Option<(&'static str, &'static str)> {
    std::env::var_os(INSIDE).is_none().then_some((
        slipway_agent::front::kernel::NFT_ENV,
        "/nonexistent/nft-outside-the-test-network-namespace",
    ))
}

/// Whether `ip` and `nft` can be used here (root, both installed), or why
/// not.
fn unusable() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root (network namespaces and nftables need it)".into());
    }
    for tool in ["ip", "nft", "nsenter"] {
        let found = Command::new(tool)
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!(
                "`{tool} -V` does not run ({tool} is not installed?)"
            ));
        }
    }
    None
}

/// The namespace, removed on drop after killing what runs in it.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &self.0]).output() {
            for pid in String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Call first in a test named `test` (`module::name`): `true` inside the
/// namespace (run the test's body), `false` outside, where it ran the body
/// in a new namespace and asserted that it passed (or said why it was
/// skipped).
#[track_caller]
pub fn enter(test: &str) -> bool {
    if std::env::var_os(INSIDE).is_some() {
        return true;
    }
    if let Some(why) = unusable() {
        eprintln!("SKIPPED {test}: {why}");
        return false;
    }
    static N: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "slipway-t{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    );
    let ok = Command::new("ip")
        .args(["netns", "add", &name])
        .status()
        .unwrap()
        .success();
    assert!(ok, "ip netns add {name} failed");
    let ns = Netns(name);
    let ok = Command::new("ip")
        .args(["netns", "exec", &ns.0, "ip", "link", "set", "lo", "up"])
        .status()
        .unwrap()
        .success();
    assert!(ok, "cannot bring lo up in {}", ns.0);
    let exe = std::env::current_exe().unwrap();
    // nsenter rather than `ip netns exec`, which mounts a sysfs of the
    // namespace over /sys and so hides the cgroup hierarchy a test's own
    // dockerd needs.
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ns.0))
        .arg(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(INSIDE, &ns.0)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("--- {test} in network namespace {} ---\n{text}", ns.0);
    assert!(
        out.status.success(),
        "{test} failed in network namespace {}: {}",
        ns.0,
        tail(&text, 6000)
    );
    assert!(
        text.contains("1 passed"),
        "{test} did not run in the namespace (a wrong name?): {text}"
    );
    drop(ns);
    false
}

/// The last `n` bytes of `text` or a little more (whole characters).
fn tail(text: &str, n: usize) -> &str {
    let mut at = text.len().saturating_sub(n);
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    &text[at..]
}
