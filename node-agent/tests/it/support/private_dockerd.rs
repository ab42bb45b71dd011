//! A Docker engine of the test's own, so a test can restart dockerd without
//! disturbing the machine's engine (/var/run/docker.sock) that the other
//! tests use at the same time.
//!
//! Everything it uses is its own: the API socket, `--data-root`,
//! `--exec-root` (so dockerd starts a containerd of its own, with its socket
//! and state under it), `--pidfile`, a containerd namespace, and a bridge
//! created for it on a free 10.231.N.0/24. It adds no iptables rules
//! (`--iptables=false`: with it dockerd would rebuild the DOCKER chains the
//! machine's engine shares) and leaves the ip_forward sysctl alone;
//! published ports on 127.0.0.1 are served by docker-proxy, which needs
//! neither. The vfs storage driver needs no overlay mounts to clean up.
//!
//! Dropping it removes its containers, stops the daemon (by its pid: SIGTERM,
//! then SIGKILL), deletes the bridge and the directory, pass or fail.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::docker_image::docker_cli_on;

/// Engines started by this process, for unique bridge names.
static ENGINES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
/// Held while a bridge's subnet is picked and assigned.
static BRIDGES: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// How long the daemon may take to answer after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a SIGTERMed daemon may take to exit: it first stops its
/// containers, each within its stop timeout (10 s unless set).
const STOP_TIMEOUT: Duration = Duration::from_secs(40);

pub struct PrivateDockerd {
    /// Socket, data root, exec root, pid file and daemon log.
    dir: tempfile::TempDir,
    /// The bridge its containers attach to; deleted on drop.
    bridge: String,
    /// Set once `ip link add` succeeded, so drop never deletes a bridge
    /// that is not this one's.
    bridge_made: bool,
    daemon: Option<Child>,
}

impl std::fmt::Debug for PrivateDockerd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivateDockerd")
            .field("dir", &self.dir.path())
            .field("bridge", &self.bridge)
            .field("pid", &self.daemon.as_ref().map(Child::id))
            .finish()
    }
}

impl PrivateDockerd {
    /// Creates the bridge and starts the daemon; returns once it answers.
    pub fn start() -> Self {
        let mut engine = Self {
            dir: tempfile::tempdir().unwrap(),
            // Unique per engine: tests of one process start theirs at once.
            bridge: format!(
                "slwd{}x{}",
                std::process::id(),
                ENGINES.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            ),
            bridge_made: false,
            daemon: None,
        };
        engine.make_bridge();
        engine.spawn();
        engine
    }

    /// The engine's API socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("docker.sock")
    }

    /// Runs the docker CLI against this engine.
    pub fn cli(&self, args: &[&str]) -> String {
        docker_cli_on(Some(&self.socket()), args)
    }

    /// The daemon's pid (the test stops it by this pid, never by name).
    pub fn pid(&self) -> u32 {
        self.daemon
            .as_ref()
            .expect("the daemon is not running")
            .id()
    }

    /// A dockerd restart, as `systemctl restart docker` does it: SIGTERM
    /// (the daemon stops its containers and exits), then the same daemon
    /// started again. Returns how long the daemon took to exit.
    pub fn restart(&mut self) -> Duration {
        let took = self.stop();
        self.spawn();
        took
    }

    fn make_bridge(&mut self) {
        // One at a time in this process: the free subnet is read, then taken.
        let _one = BRIDGES
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let used = String::from_utf8_lossy(
            &Command::new("ip")
                .args(["-4", "-o", "addr"])
                .output()
                .unwrap()
                .stdout,
        )
        .into_owned()
            + &String::from_utf8_lossy(
                &Command::new("ip")
                    .args(["-4", "route"])
                    .output()
                    .unwrap()
                    .stdout,
            );
        let start = std::process::id() % 250;
        let net = (0..250)
            .map(|i| (start + i) % 250 + 1)
            .find(|n| !used.contains(&format!("10.231.{n}.")))
            .expect("no free 10.231.N.0/24 for the test bridge");
        ip(&["link", "add", &self.bridge, "type", "bridge"]);
        self.bridge_made = true;
        // A fixed MAC (locally administered, from the net number), as
        // dockerd gives the bridges it makes: otherwise Linux gives a bridge
        // the lowest MAC of its ports, so it changes when a container's veth
        // leaves, and the other containers' ARP entries for the gateway go
        // stale — their answers are lost for seconds (a blue/green switch
        // under load sees it as hung requests).
        ip(&[
            "link",
            "set",
            &self.bridge,
            "address",
            &format!("02:42:0a:e7:{net:02x}:01"),
        ]);
        ip(&[
            "addr",
            "add",
            &format!("10.231.{net}.1/24"),
            "dev",
            &self.bridge,
        ]);
        ip(&["link", "set", &self.bridge, "up"]);
    }

    fn spawn(&mut self) {
        assert!(self.daemon.is_none(), "the daemon is already running");
        let d = self.dir.path();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("dockerd.log"))
            .unwrap();
        let ns = format!("slipway-test-{}", std::process::id());
        let child = Command::new("dockerd")
            .arg("-H")
            .arg(format!("unix://{}", self.socket().display()))
            .arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("dockerd.pid"))
            .args(["--containerd-namespace", &ns])
            .args(["--containerd-plugins-namespace", &format!("{ns}-plugins")])
            .args(["--bridge", &self.bridge])
            .args(["--iptables=false", "--ip-forward=false", "--ip-masq=false"])
            .args(["--storage-driver", "vfs"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start dockerd: {e}"));
        self.daemon = Some(child);
        let since = Instant::now();
        loop {
            let up = Command::new("docker")
                .arg("-H")
                .arg(format!("unix://{}", self.socket().display()))
                .args(["version", "--format", "{{.Server.Version}}"])
                .output()
                .is_ok_and(|o| o.status.success());
            if up {
                return;
            }
            if let Some(status) = self.daemon.as_mut().unwrap().try_wait().unwrap() {
                self.daemon = None;
                panic!(
                    "the private dockerd exited ({status}):\n{}",
                    self.log_tail()
                );
            }
            assert!(
                since.elapsed() < START_TIMEOUT,
                "the private dockerd did not answer within {START_TIMEOUT:?}:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// SIGTERM, then waits for the daemon to exit; SIGKILL after
    /// `STOP_TIMEOUT`. Returns how long it took.
    fn stop(&mut self) -> Duration {
        let Some(mut child) = self.daemon.take() else {
            return Duration::ZERO;
        };
        let since = Instant::now();
        let pid = Pid::from_raw(i32::try_from(child.id()).unwrap());
        let _ = kill(pid, Signal::SIGTERM);
        while child.try_wait().unwrap().is_none() {
            if since.elapsed() > STOP_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the private dockerd did not exit within {STOP_TIMEOUT:?} of SIGTERM:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        since.elapsed()
    }

    /// The last lines of the daemon's log, for a failure message.
    pub fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for PrivateDockerd {
    fn drop(&mut self) {
        if self.daemon.is_some() {
            // Killed rather than stopped: the daemon's shutdown is then quick.
            let socket = self.socket();
            let host = format!("unix://{}", socket.display());
            if let Ok(out) = Command::new("docker")
                .args(["-H", &host, "ps", "-aq"])
                .output()
            {
                let ids = String::from_utf8_lossy(&out.stdout).into_owned();
                let ids: Vec<&str> = ids.split_whitespace().collect();
                if !ids.is_empty() {
                    let _ = Command::new("docker")
                        .args(["-H", &host, "rm", "-f"])
                        .args(&ids)
                        .output();
                }
            }
            // A panic here would abort a test already panicking: stop by
            // hand, quietly.
            if let Some(mut child) = self.daemon.take() {
                let pid = Pid::from_raw(i32::try_from(child.id()).unwrap());
                let _ = kill(pid, Signal::SIGTERM);
                let since = Instant::now();
                while child.try_wait().ok().flatten().is_none() {
                    if since.elapsed() > STOP_TIMEOUT {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        if self.bridge_made {
            let _ = Command::new("ip")
                .args(["link", "del", &self.bridge])
                .output();
        }
        // The TempDir goes after this: nothing is mounted in it once the
        // daemon has exited (vfs, and dockerd unmounts its netns files).
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
