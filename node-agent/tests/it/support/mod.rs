//! Test harness: a node (temp dir + agent.toml) driven through the real
//! `slipway-agent` binary, and artifact builders (honest and crafted).
// Each test binary uses part of the harness; a failed setup step should
// panic with its error, which is what unwrap does.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

mod docker_image;
pub mod load;
pub mod netns;
mod private_dockerd;

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_slipway-agent");

/// One simulated droplet: its own directory, config and app root.
pub struct Node {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub root: PathBuf,
}

/// The result of one CLI run.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(out: Output) -> Self {
        use std::os::unix::process::ExitStatusExt;
        Self {
            code: out.status.code(),
            signal: out.status.signal(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    #[track_caller]
    pub fn ok(self) -> Self {
        assert_eq!(self.code, Some(0), "expected success: {self:#?}");
        self
    }

    #[track_caller]
    pub fn fails(self, code: i32) -> Self {
        assert_eq!(self.code, Some(code), "expected exit {code}: {self:#?}");
        self
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("bad json ({e}): {}", self.stdout))
    }
}

impl Node {
    /// A node with app `web` (shared `.env` and `logs/`) plus `extra` TOML
    /// lines inside `[apps.web]`.
    pub fn new(extra: &str) -> Self {
        Self::with_config(|root| {
            format!(
                "[apps.web]\nroot = \"{}\"\nshared_files = [\".env\"]\nshared_dirs = [\"logs\"]\n{extra}\n",
                root.display()
            )
        })
    }

    pub fn with_config(make: impl FnOnce(&Path) -> String) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("app");
        let config = dir.path().join("agent.toml");
        fs::write(&config, make(&root)).unwrap();
        fs::create_dir_all(root.join("shared")).unwrap();
        fs::write(root.join("shared/.env"), "SECRET=s3cr3t\n").unwrap();
        Self { dir, config, root }
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.arg("--config")
            .arg(&self.config)
            .args(args)
            .env_remove("SLIPWAY_TEST_CRASH_AT");
        c.envs(netns::nft_env());
        c
    }

    pub fn run(&self, args: &[&str]) -> Run {
        Run::from(self.cmd(args).output().unwrap())
    }

    /// [`Node::run`] with `env` added (what the agent starts inherits it).
    pub fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let mut c = self.cmd(args);
        c.envs(env.iter().copied());
        Run::from(c.output().unwrap())
    }

    /// Writes an artifact with `files` into the node dir and returns its path.
    pub fn artifact(&self, name: &str, files: &[(&str, &str)]) -> PathBuf {
        let path = self.dir.path().join(name);
        fs::write(&path, targz(&tar_of(files))).unwrap();
        path
    }

    /// `deploy --app web --artifact <artifact> --id <id>`.
    pub fn deploy(&self, artifact: &Path, id: &str) -> Run {
        self.run(&deploy_args(artifact, id))
    }

    /// [`Node::deploy`] with `--json`: the report is on stdout.
    pub fn deploy_json(&self, artifact: &Path, id: &str) -> Run {
        let mut args = deploy_args(artifact, id).to_vec();
        args.push("--json");
        self.run(&args)
    }

    /// Runs `args` with the crash point armed and asserts the agent died of
    /// SIGKILL there.
    #[track_caller]
    pub fn run_killed_at(&self, point: &str, args: &[&str]) {
        // The dev-dependency on slipway-agent turns the crash points on.
        const {
            assert!(
                slipway_agent::fault::ENABLED,
                "built without the fault-injection feature"
            )
        };
        let run = Run::from(
            self.cmd(args)
                .env("SLIPWAY_TEST_CRASH_AT", point)
                .output()
                .unwrap(),
        );
        assert_eq!(
            run.signal,
            Some(9),
            "{point}: the agent was not killed there: {run:#?}"
        );
    }

    /// Deploys with the crash point armed (see [`Node::run_killed_at`]).
    #[track_caller]
    pub fn deploy_killed_at(&self, point: &str, artifact: &Path, id: &str) {
        self.run_killed_at(point, &deploy_args(artifact, id));
    }

    pub fn releases(&self) -> Value {
        self.run(&["releases", "--app", "web", "--json"])
            .ok()
            .json()
    }

    pub fn current(&self) -> Option<String> {
        let t = fs::read_link(self.root.join("current")).ok()?;
        Some(t.file_name()?.to_string_lossy().into_owned())
    }

    /// The release ids recorded, with their status.
    pub fn statuses(&self) -> Vec<(String, String)> {
        self.releases()["releases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["id"].as_str().unwrap().to_owned(),
                    r["status"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    /// Release dirs on disk.
    pub fn dirs_on_disk(&self) -> BTreeSet<String> {
        match fs::read_dir(self.root.join("releases")) {
            Ok(d) => d
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => BTreeSet::new(),
        }
    }

    /// Every path under the node dir, for "nothing written outside" checks.
    pub fn all_paths(&self) -> BTreeSet<PathBuf> {
        let mut out = BTreeSet::new();
        walk(self.dir.path(), &mut out);
        out
    }

    pub fn staging_is_empty(&self) -> bool {
        fs::read_dir(self.root.join(".slipway/staging"))
            .map(|mut d| d.next().is_none())
            .unwrap_or(true)
    }
}

fn walk(p: &Path, out: &mut BTreeSet<PathBuf>) {
    if let Ok(d) = fs::read_dir(p) {
        for e in d {
            let e = e.unwrap();
            out.insert(e.path());
            if e.file_type().unwrap().is_dir() {
                walk(&e.path(), out);
            }
        }
    }
}

/// An ordinary tar of regular files (parents implied).
pub fn tar_of(files: &[(&str, &str)]) -> Vec<u8> {
    let mut t = RawTar::default();
    for (name, body) in files {
        t.file(name, 0o644, body.as_bytes());
    }
    t.finish()
}

pub fn targz(tar: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(tar).unwrap();
    enc.finish().unwrap()
}

pub fn tarzst(tar: &[u8]) -> Vec<u8> {
    zstd::stream::encode_all(tar, 3).unwrap()
}

/// Builds tar streams byte by byte, so tests can write entries no honest
/// tool would (absolute names, `..`, escaping links, device nodes).
#[derive(Default)]
pub struct RawTar {
    out: Vec<u8>,
}

impl RawTar {
    pub fn entry(
        &mut self,
        name: &str,
        kind: tar::EntryType,
        mode: u32,
        link: Option<&str>,
        data: &[u8],
    ) -> &mut Self {
        let mut h = tar::Header::new_ustar();
        {
            let old = h.as_old_mut();
            assert!(name.len() < 100, "test names stay short");
            old.name = [0; 100];
            old.name[..name.len()].copy_from_slice(name.as_bytes());
            if let Some(l) = link {
                old.linkname = [0; 100];
                old.linkname[..l.len()].copy_from_slice(l.as_bytes());
            }
        }
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h.set_cksum();
        self.out.extend_from_slice(h.as_bytes());
        self.out.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.out.extend(std::iter::repeat_n(0u8, pad));
        self
    }

    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.entry(name, tar::EntryType::Regular, mode, None, data)
    }

    pub fn dir(&mut self, name: &str) -> &mut Self {
        self.entry(name, tar::EntryType::Directory, 0o755, None, b"")
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.entry(name, tar::EntryType::Symlink, 0o777, Some(target), b"")
    }

    pub fn hardlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.entry(name, tar::EntryType::Link, 0o644, Some(target), b"")
    }

    pub fn finish(&mut self) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.out);
        out.extend(std::iter::repeat_n(0u8, 1024));
        out
    }
}

pub use docker_image::{busybox_image, busybox_image_on, docker_cli, docker_cli_on};
pub use private_dockerd::PrivateDockerd;

/// `GET path` on 127.0.0.1:`port` with a new connection: (status, body), or
/// `None` when nothing answers within the time limits.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::Read;
    use std::time::Duration;
    let addr = format!("127.0.0.1:{port}").parse().ok()?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((
        code,
        text.split("\r\n\r\n")
            .nth(1)
            .unwrap_or("")
            .trim()
            .to_owned(),
    ))
}

/// `slipway-agent run` of a node (output discarded), stopped with SIGTERM
/// on drop if the test did not stop it.
pub struct RunningAgent(Option<Child>);

impl RunningAgent {
    /// Starts `slipway-agent run` and returns once it says (`--ready-file`)
    /// that every app's logs are watched: no sleep guessing when.
    pub fn start(node: &Node) -> Self {
        let ready = node.dir.path().join("agent.ready");
        let _ = fs::remove_file(&ready);
        let mut child = node
            .cmd(&["run", "--ready-file", ready.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let t = Instant::now();
        while !ready.exists() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("slipway-agent run exited before it was ready: {status}");
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "slipway-agent run not ready after 30 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self(Some(child))
    }

    /// `kill -9`, as a crash or the OOM killer would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits up to 10 s for the agent to exit (then kills
    /// it): its exit code, None if it had to be killed or died of a signal.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.0.take()?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The arguments of `deploy --app web --artifact <artifact> --id <id>`.
pub fn deploy_args<'a>(artifact: &'a Path, id: &'a str) -> [&'a str; 7] {
    [
        "deploy",
        "--app",
        "web",
        "--artifact",
        artifact.to_str().unwrap(),
        "--id",
        id,
    ]
}

/// The sample app of the workspace's tests (tests/fixtures/server.py), run
/// as `python3 server.py` with `PORT` from the app's `.env`: every path
/// answers the release's `VERSION`; /api/health answers the status in the
/// release's `HEALTH` file (200 without one), or 503 while the file named
/// by `SICK_FILE` exists.
pub const SAMPLE_APP: &str = include_str!("../../../../tests/fixtures/server.py");

/// A loopback TCP port that was free a moment ago, for a server the test
/// starts next. Taken below the kernel's ephemeral range (32768–60999 by
/// default), so the outgoing connections of the load loops running beside
/// cannot occupy it before that server binds it, and never the same twice
/// in one test process.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7_919) % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(LOW + (start + n) % SPAN).unwrap();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {LOW}..{}", LOW + SPAN);
}

/// `N` distinct ports of [`free_port`] (a blue/green pair, say).
pub fn free_ports<const N: usize>() -> [u16; N] {
    std::array::from_fn(|_| free_port())
}

/// Config lines for app `web` run as `python3 server.py` by the exec driver
/// (3 s stop grace), with an HTTP health check on `url`: the caller adds
/// the rest of `[apps.web.health]` after them.
pub fn exec_python_web(url: &str) -> String {
    format!(
        r#"
[apps.web.run]
driver = "exec"
command = ["python3", "server.py"]
stop_grace = "3s"

[apps.web.health]
check = "http"
url = "{url}"
"#
    )
}

/// Polls `f` until it holds; fails the test after `limit`, naming `what`.
pub fn wait_until(what: &str, limit: std::time::Duration, mut f: impl FnMut() -> bool) {
    let t = std::time::Instant::now();
    while !f() {
        assert!(
            t.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
