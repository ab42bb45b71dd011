//! End-to-end harness: `Controller::start()`, `Agent::enroll(&controller)`,
//! each a real process of the workspace's binaries with its own directories.
// A failed set-up step should panic with its error, as unwrap does.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

pub mod do_api;
pub mod gh_api;

use std::fs;
use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The agents these tests start give their fronts an `nft` that does not
/// exist: the fronts proxy every connection themselves and no test writes
/// nftables rules into the machine's network namespace (the agent's own
/// tests cover kernel forwarding, each in a namespace of its own).
const NFT_ENV: &str = slipway_agent::front::kernel::NFT_ENV;
const NO_NFT: &str = "/nonexistent/nft-outside-a-test-network-namespace";

/// Spawns `cmd`, again while the file is busy (ETXTBSY): a binary this
/// process just wrote may still be open for writing in a child another
/// test thread forked and that has not exec'd yet.
pub fn spawn_retrying(cmd: &mut Command) -> Child {
    for _ in 0..100 {
        match cmd.spawn() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other.unwrap(),
        }
    }
    cmd.spawn().unwrap()
}

/// [`spawn_retrying`], waiting for the output.
pub fn output_retrying(cmd: &mut Command) -> Output {
    for _ in 0..100 {
        match cmd.output() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other.unwrap(),
        }
    }
    cmd.output().unwrap()
}

/// A binary of this workspace, built by `cargo test --workspace` (which
/// builds every package's binaries before running any test).
pub fn bin(name: &str) -> PathBuf {
    // A benchmark may measure binaries of another profile (a release
    // controller under a debug-built bench): SLIPWAY_BIN_DIR names their dir.
    if let Some(dir) = std::env::var_os("SLIPWAY_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let path = exe.parent().and_then(Path::parent).unwrap().join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace` (or `cargo test --workspace`) first",
        path.display()
    );
    path
}

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

pub fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn check(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Stops a child with SIGTERM (SIGKILL after 10 s).
fn terminate(child: &mut Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A controller process with its own data dir.
pub struct Controller {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
    /// Extra `serve` flags, kept across restarts.
    pub serve_args: Vec<String>,
    /// Run `serve` under this command (e.g. `faketime +400d`), when set.
    pub wrapper: Vec<String>,
    /// Serve this data dir, another controller's (a replica, see
    /// [`Controller::replica`]), instead of `dir/data`.
    shared_data: Option<PathBuf>,
    /// The PostgreSQL store of `serve` and the admin commands
    /// (`SLIPWAY_DATABASE_URL`), when not SQLite in the data dir.
    pub database_url: Option<String>,
}

impl Controller {
    /// Starts on a port the kernel picks (`--listen 127.0.0.1:0`), learnt
    /// from `--ready-file`: no race with other tests for a free port.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts on the data dir already in `dir` (`dir/data`, e.g. restored
    /// from a backup), on a port the kernel picks.
    pub fn start_on(dir: tempfile::TempDir) -> Self {
        let mut c = Self {
            dir,
            port: 0,
            child: None,
            serve_args: Vec::new(),
            wrapper: Vec::new(),
            shared_data: None,
            database_url: None,
        };
        c.restart();
        c
    }

    /// [`Controller::start_with`] on the PostgreSQL database at `url` (the
    /// data dir keeps the CA and keys).
    pub fn start_postgres(url: &str, serve_args: &[&str]) -> Self {
        let mut c = Self {
            dir: tempfile::tempdir().unwrap(),
            port: 0,
            child: None,
            serve_args: serve_args.iter().map(|a| (*a).to_owned()).collect(),
            wrapper: Vec::new(),
            shared_data: None,
            database_url: Some(url.to_owned()),
        };
        c.restart();
        c
    }

    /// `slipway-controller`, with the store's URL in its environment when
    /// it is PostgreSQL.
    fn controller_command(&self) -> Command {
        let mut command = Command::new(bin("slipway-controller"));
        if let Some(url) = &self.database_url {
            command.env("SLIPWAY_DATABASE_URL", url);
        }
        command
    }

    /// [`Controller::start`] with extra `serve` flags.
    pub fn start_with(serve_args: &[&str]) -> Self {
        let mut c = Self {
            dir: tempfile::tempdir().unwrap(),
            port: 0,
            child: None,
            serve_args: serve_args.iter().map(|a| (*a).to_owned()).collect(),
            wrapper: Vec::new(),
            shared_data: None,
            database_url: None,
        };
        c.restart();
        c
    }

    /// [`Controller::start`] with the HTTP API too, on a loopback port the
    /// kernel picks (`--http-listen 127.0.0.1:0`, learnt from
    /// `--http-ready-file`; see [`Controller::http_url`]).
    pub fn start_http() -> Self {
        Self::start_http_with(&[])
    }

    /// [`Controller::start_http`] with extra `serve` flags.
    pub fn start_http_with(serve_args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ready = dir.path().join("http-ready");
        let mut args = vec![
            "--http-listen".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--http-ready-file".to_owned(),
            ready.to_string_lossy().into_owned(),
        ];
        args.extend(serve_args.iter().map(|a| (*a).to_owned()));
        let mut c = Self {
            dir,
            port: 0,
            child: None,
            serve_args: args,
            wrapper: Vec::new(),
            shared_data: None,
            database_url: None,
        };
        c.restart();
        c
    }

    /// `https://127.0.0.1:PORT` of the HTTP API of a controller started
    /// with [`Controller::start_http`] (written before the gRPC ready file).
    pub fn http_url(&self) -> String {
        let addr = fs::read_to_string(self.dir.path().join("http-ready")).unwrap();
        format!("https://{}", addr.trim())
    }

    /// The running controller's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.shared_data
            .clone()
            .unwrap_or_else(|| self.dir.path().join("data"))
    }

    /// A second `slipway-controller serve` of this controller's data dir
    /// (store, CA, artifacts) on a port of its own, with the same `serve`
    /// flags: a replica. Its ready file and log are in a dir of its own.
    pub fn replica(&self) -> Self {
        assert!(
            self.wrapper.is_empty(),
            "a replica of a wrapped controller is not supported"
        );
        let mut c = Self {
            dir: tempfile::tempdir().unwrap(),
            port: 0,
            child: None,
            serve_args: self.serve_args.clone(),
            wrapper: Vec::new(),
            shared_data: Some(self.data_dir()),
            database_url: self.database_url.clone(),
        };
        c.restart();
        c
    }

    /// [`Controller::replica`] of a controller started with
    /// [`Controller::start_http`]: its HTTP API on a port of its own, learnt
    /// from a ready file in its own dir (see [`Controller::http_url`]).
    pub fn http_replica(&self) -> Self {
        assert!(
            self.wrapper.is_empty(),
            "a replica of a wrapped controller is not supported"
        );
        let dir = tempfile::tempdir().unwrap();
        let mine = self
            .dir
            .path()
            .join("http-ready")
            .to_string_lossy()
            .into_owned();
        let own = dir.path().join("http-ready").to_string_lossy().into_owned();
        assert!(
            self.serve_args.contains(&mine),
            "not a controller started with its HTTP API (start_http)"
        );
        let mut c = Self {
            dir,
            port: 0,
            child: None,
            serve_args: self
                .serve_args
                .iter()
                .map(|a| if *a == mine { own.clone() } else { a.clone() })
                .collect(),
            wrapper: Vec::new(),
            shared_data: Some(self.data_dir()),
            database_url: self.database_url.clone(),
        };
        c.restart();
        c
    }

    /// Another `serve` of this controller's PostgreSQL database with a
    /// data dir of its own, as a replica on another machine runs: it
    /// shares the database and, copied into its data dir before it starts
    /// as an operator copies them, the CA (`ca.pem`, `ca.key`) and
    /// `secrets.key`; nothing else (its artifacts are its own cache).
    pub fn postgres_replica(&self, serve_args: &[&str]) -> Self {
        use std::os::unix::fs::DirBuilderExt as _;
        let url = self
            .database_url
            .clone()
            .expect("a PostgreSQL replica of a controller on PostgreSQL");
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        fs::DirBuilder::new().mode(0o700).create(&data).unwrap();
        for file in ["ca.pem", "ca.key", "secrets.key"] {
            // fs::copy keeps the mode (0600 for the keys).
            fs::copy(self.data_dir().join(file), data.join(file)).unwrap();
        }
        let mut c = Self {
            dir,
            port: 0,
            child: None,
            serve_args: serve_args.iter().map(|a| (*a).to_owned()).collect(),
            wrapper: Vec::new(),
            shared_data: None,
            database_url: Some(url),
        };
        c.restart();
        c
    }

    /// `https://127.0.0.1:PORT` of the gRPC listener, as an agent's
    /// `[controller] urls` lists it.
    pub fn https_url(&self) -> String {
        format!("https://{}", self.url())
    }

    /// Kills the controller with SIGKILL (no shutdown of any kind: its
    /// sessions are cut as by a crash) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts (again, on the same port: agents are configured with it) and
    /// waits until it has written its ready file.
    pub fn restart(&mut self) {
        self.stop();
        let ready = self.dir.path().join("ready");
        let _ = fs::remove_file(&ready);
        let log = fs::File::create(self.dir.path().join("controller.log")).unwrap();
        let mut command = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(bin("slipway-controller"));
                c
            }
            None => Command::new(bin("slipway-controller")),
        };
        if let Some(url) = &self.database_url {
            command.env("SLIPWAY_DATABASE_URL", url);
        }
        // Its own process group, so `stop` reaches a wrapper's child too.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let child = command
            .arg("serve")
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--listen")
            .arg(self.url())
            .arg("--ready-file")
            .arg(&ready)
            .args(&self.serve_args)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        self.child = Some(child);
        let mut addr = String::new();
        let started = Instant::now();
        while addr.is_empty() {
            addr = fs::read_to_string(&ready).unwrap_or_default();
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if addr.is_empty() && (exited.is_some() || started.elapsed() > Duration::from_secs(30))
            {
                let log = fs::read_to_string(self.dir.path().join("controller.log"));
                panic!(
                    "the controller wrote no ready file ({}); its log:\n{}",
                    exited.map_or("still running after 30s".to_owned(), |s| s.to_string()),
                    log.unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let port = addr.trim().rsplit(':').next().and_then(|p| p.parse().ok());
        self.port = port.unwrap_or_else(|| panic!("ready file says {addr:?}"));
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let group = c.id();
            terminate(&mut c);
            // A wrapper such as faketime forks the controller and waits for
            // it: signalling the wrapper alone left the controller running
            // after the test. The controller runs in its own process group
            // (see `restart`): whatever is left of it goes too.
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(group as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    pub fn token(&self) -> String {
        self.token_tagged(&[])
    }

    /// A join token whose node gets `tags` as labels (`env:staging`).
    pub fn token_tagged(&self, tags: &[&str]) -> String {
        let mut cmd = self.controller_command();
        cmd.args(["token", "create", "--ttl", "10m"]);
        for tag in tags {
            cmd.args(["--tag", tag]);
        }
        let out = cmd.arg("--data-dir").arg(self.data_dir()).output().unwrap();
        check(out, "token create").trim().to_owned()
    }

    /// `slipway-agent enroll` of `name` with a new join token, its identity
    /// in `state`, plus `extra` flags; the output, unchecked.
    pub fn enroll_cli(&self, name: &str, state: &Path, extra: &[&str]) -> Output {
        self.enroll_cli_tagged(name, state, &[], extra)
    }

    /// [`Controller::enroll_cli`] with a join token carrying `tags`.
    pub fn enroll_cli_tagged(
        &self,
        name: &str,
        state: &Path,
        tags: &[&str],
        extra: &[&str],
    ) -> Output {
        Command::new(bin("slipway-agent"))
            .args([
                "enroll",
                "--controller",
                &self.url(),
                "--token",
                &self.token_tagged(tags),
            ])
            .arg("--state-dir")
            .arg(state)
            .args(["--name", name])
            .args(extra)
            .output()
            .unwrap()
    }

    /// `slipway-controller <args> --data-dir DIR`.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.controller_command()
            .args(args)
            .arg("--data-dir")
            .arg(self.data_dir())
            .output()
            .unwrap()
    }

    /// The CA certificate the `slipway` CLI trusts.
    pub fn ca_pem(&self) -> PathBuf {
        self.data_dir().join("ca.pem")
    }

    /// A new API token (`slipway-controller token api --scope …`).
    pub fn api_token(&self, scopes: &str) -> String {
        let out = self.cli(&["token", "api", "--scope", scopes]);
        check(out, "token api").trim().to_owned()
    }

    /// `slipway --controller … --ca …`, to which the caller adds its
    /// credentials and arguments.
    pub fn slipway_command(&self) -> Command {
        let mut command = Command::new(bin("slipway"));
        command
            .arg("--controller")
            .arg(self.url())
            .arg("--ca")
            .arg(self.ca_pem());
        command
    }

    /// `slipway --controller … --ca … --token TOKEN <args>`.
    pub fn slipway(&self, token: &str, args: &[&str]) -> Output {
        self.slipway_command()
            .arg("--token")
            .arg(token)
            .args(args)
            .output()
            .unwrap()
    }

    /// `slipway --controller … --ca … --cert CERT --key KEY <args>`, with no
    /// token in the environment either.
    pub fn slipway_as(&self, cert: &Path, key: &Path, args: &[&str]) -> Output {
        self.slipway_command()
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key)
            .args(args)
            .env_remove("SLIPWAY_TOKEN")
            .output()
            .unwrap()
    }

    /// `slipway deploy web ART --sha SHA --id ID <extra>` with `token`.
    pub fn deploy_web(
        &self,
        token: &str,
        art: &Path,
        sha: &str,
        id: &str,
        extra: &[&str],
    ) -> Output {
        let mut args = vec![
            "deploy",
            "web",
            art.to_str().unwrap(),
            "--sha",
            sha,
            "--id",
            id,
        ];
        args.extend_from_slice(extra);
        self.slipway(token, &args)
    }

    /// Builds the artifact of `version` (`app` as its server.py) in `work`
    /// and deploys it: `slipway deploy web ART --sha … --id VERSION <extra>`.
    pub fn deploy_version(
        &self,
        token: &str,
        work: &Path,
        version: &str,
        app: &str,
        extra: &[&str],
    ) -> Output {
        let art = artifact(work, version, app);
        self.deploy_web(token, &art, &sha256_file(&art), version, extra)
    }

    /// How many nodes `slipway nodes --json` (with `token`) shows online.
    pub fn online(&self, token: &str) -> usize {
        let out = self.slipway(token, &["nodes", "--json"]);
        assert!(out.status.success(), "{}", text(&out));
        let nodes: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
        nodes.iter().filter(|n| n["state"] == "online").count()
    }

    /// Waits up to `limit` until `n` nodes are online.
    pub fn wait_online(&self, token: &str, n: usize, limit: Duration) {
        wait_until(&format!("{n} online nodes"), limit, || {
            self.online(token) == n
        });
    }

    /// The audit log (`slipway audit --json` with `token`).
    pub fn audit(&self, token: &str) -> Vec<Value> {
        let out = self.slipway(token, &["audit", "--json"]);
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The `slipway` command line (binary and global flags) as one shell
    /// string, for running it under `script` (a pseudo-terminal).
    pub fn slipway_shell(&self, token: &str, args: &[&str]) -> String {
        let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
        let mut line = vec![
            quote(&bin("slipway").to_string_lossy()),
            "--controller".to_owned(),
            quote(&self.url()),
            "--ca".to_owned(),
            quote(&self.ca_pem().to_string_lossy()),
            "--token".to_owned(),
            quote(token),
        ];
        line.extend(args.iter().map(|a| quote(a)));
        line.join(" ")
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One simulated droplet: an agent with its own root, config and identity.
pub struct Agent {
    pub dir: tempfile::TempDir,
    pub name: String,
    /// The app its agent.toml declares (stopped when the agent is dropped).
    pub app: String,
    pub config: PathBuf,
    pub root: PathBuf,
    pub port: u16,
    run: Option<Child>,
    /// The binary `run` starts: the workspace's, or the node's own copy
    /// (`own_binary`) for tests that upgrade it.
    exe: Option<PathBuf>,
    /// Extra environment for `run` (e.g. a crash point).
    run_env: Vec<(String, String)>,
}

/// The sample app for the exec driver (`python3 server.py`, tests/fixtures/
/// server.py): every path answers the release's VERSION; /api/health
/// answers 503 while the file named by `SICK_FILE` in the app's `.env`
/// exists, else the status in the release's HEALTH file (200 without one).
pub const APP: &str = include_str!("../../fixtures/server.py");

impl Agent {
    /// Enrolls a new node with `controller` and writes its agent.toml (one
    /// exec-driver app `web` behind an HTTP health gate).
    pub fn enroll(controller: &Controller, name: &str) -> Self {
        let agent = Self::enroll_with(controller, name, "web", |root, port| {
            format!(
                r#"[apps.web]
root = "{root}"
shared_files = [".env"]

[apps.web.run]
driver = "exec"
command = ["python3", "server.py"]
stop_grace = "2s"

[apps.web.health]
check = "http"
url = "http://127.0.0.1:{port}/api/health"
interval = "100ms"
successes = 2
start_period = "3s"
deadline = "15s"
liveness_interval = "500ms"
"#,
                root = root.display(),
            )
        });
        fs::create_dir_all(agent.root.join("shared")).unwrap();
        fs::write(
            agent.root.join("shared/.env"),
            format!("PORT={}\n", agent.port),
        )
        .unwrap();
        agent
    }

    /// Enrolls a new node with `controller` whose agent.toml declares one
    /// app, `app`: `apps` writes its `[apps.<app>…]` tables from the app's
    /// root and a free port (`Agent::port`) for it to use.
    pub fn enroll_with(
        controller: &Controller,
        name: &str,
        app: &str,
        apps: impl FnOnce(&Path, u16) -> String,
    ) -> Self {
        Self::enroll_tagged(controller, name, app, &[], apps)
    }

    /// [`Agent::enroll_with`] with a join token carrying `tags`, which
    /// become the node's labels (`env:staging`).
    pub fn enroll_tagged(
        controller: &Controller,
        name: &str,
        app: &str,
        tags: &[&str],
        apps: impl FnOnce(&Path, u16) -> String,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("app");
        let state = dir.path().join("state");
        let port = free_port();
        let config = dir.path().join("agent.toml");
        fs::write(
            &config,
            format!(
                "[controller]\nurl = \"{url}\"\nstate_dir = \"{state}\"\n\n{apps}",
                url = controller.url(),
                state = state.display(),
                apps = apps(&root, port),
            ),
        )
        .unwrap();
        let agent = Self {
            dir,
            name: name.to_owned(),
            app: app.to_owned(),
            config,
            root,
            port,
            run: None,
            exe: None,
            run_env: Vec::new(),
        };
        check(
            controller.enroll_cli_tagged(name, &state, tags, &[]),
            "enroll",
        );
        agent
    }

    /// Points this agent at another controller address (its agent.toml's
    /// `url`); call while `run` is stopped.
    pub fn set_controller_url(&self, url: &str) {
        let config = fs::read_to_string(&self.config).unwrap();
        // The first `url` is the [controller] table's (the health check's
        // comes later).
        let (head, rest) = config.split_once("\nurl = \"").unwrap();
        let (_, tail) = rest.split_once('\n').unwrap();
        fs::write(&self.config, format!("{head}\nurl = \"{url}\"\n{tail}")).unwrap();
    }

    /// Replaces the `[controller] url` of this agent's agent.toml with
    /// `urls = [...]` (controller replicas); call while `run` is stopped.
    pub fn set_controller_urls(&self, urls: &[String]) {
        let config = fs::read_to_string(&self.config).unwrap();
        // The first `url` is the [controller] table's (the health check's
        // comes later).
        let (head, rest) = config.split_once("\nurl = \"").unwrap();
        let (_, tail) = rest.split_once('\n').unwrap();
        let list: Vec<String> = urls.iter().map(|u| format!("{u:?}")).collect();
        fs::write(
            &self.config,
            format!("{head}\nurls = [{}]\n{tail}", list.join(", ")),
        )
        .unwrap();
    }

    /// What `slipway-agent status --json` says of the controller link.
    pub fn link(&self) -> Value {
        let out = self.cli(&["status", "--json"]);
        assert!(out.status.success(), "{}", text(&out));
        json(&out)["controller"].clone()
    }

    /// Sets how long the health gate forgives failures after a start
    /// (`start_period`, 3 s by default here: a Python app can take more than
    /// a second to listen on a loaded 2-core machine); call before `run`.
    pub fn set_start_period(&self, period: &str) {
        let config = fs::read_to_string(&self.config).unwrap();
        let default = "start_period = \"3s\"";
        assert!(
            config.contains(default),
            "no {default} in {}",
            self.config.display()
        );
        let changed = config.replace(default, &format!("start_period = \"{period}\""));
        fs::write(&self.config, changed).unwrap();
    }

    /// [`Agent::enroll`] for each of `names`, in order.
    pub fn enroll_all(controller: &Controller, names: &[&str]) -> Vec<Self> {
        names.iter().map(|n| Self::enroll(controller, n)).collect()
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("slipway-agent"))
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env(NFT_ENV, NO_NFT)
            .output()
            .unwrap()
    }

    /// Builds the `web` artifact of `version` and deploys it on this node.
    pub fn deploy(&self, version: &str) -> Value {
        let art = artifact(self.dir.path(), version, APP);
        let out = self.cli(&[
            "deploy",
            "--app",
            "web",
            "--artifact",
            art.to_str().unwrap(),
            "--id",
            version,
            "--json",
        ]);
        serde_json::from_str(&check(out, "deploy")).unwrap()
    }

    /// Gives this node its own copy of the agent binary
    /// (`<dir>/bin/slipway-agent`) for `run` to start: an agent upgrade
    /// replaces the file it runs, never the workspace's. Returns its path.
    pub fn own_binary(&mut self) -> PathBuf {
        let dir = self.dir.path().join("bin");
        fs::create_dir_all(&dir).unwrap();
        let exe = dir.join("slipway-agent");
        fs::copy(bin("slipway-agent"), &exe).unwrap();
        self.exe = Some(exe.clone());
        exe
    }

    /// Sets `KEY=VALUE` in the environment of the next `run`.
    pub fn set_run_env(&mut self, key: &str, value: &str) {
        self.run_env.push((key.to_owned(), value.to_owned()));
    }

    /// The controller state dir (identity, ledger, agent lock, upgrades).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The pid of the `slipway-agent run` holding this node's agent lock,
    /// if one runs (after an upgrade's rollback it is not `run`'s child).
    pub fn running_pid(&self) -> Option<u32> {
        let lock = self.state_dir().join("agent.lock");
        if !slipway_agent::lock::is_held(&lock) {
            return None;
        }
        slipway_agent::lock::read_holder(&lock).map(|h| h.pid)
    }

    /// The pid of the process `run` started, if it is running.
    pub fn child_pid(&self) -> Option<u32> {
        self.run.as_ref().map(Child::id)
    }

    /// Starts `slipway-agent run` (liveness, logs, controller session)
    /// and returns once it is ready (its `--ready-file`): logs watched,
    /// apps housekept once.
    pub fn run(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("agent.log"))
            .unwrap();
        let ready = self.ready_file();
        let _ = fs::remove_file(&ready);
        let exe = self.exe.clone().unwrap_or_else(|| bin("slipway-agent"));
        self.run = Some(spawn_retrying(
            Command::new(exe)
                .arg("--config")
                .arg(&self.config)
                .arg("run")
                .arg("--ready-file")
                .arg(&ready)
                .env(NFT_ENV, NO_NFT)
                .envs(self.run_env.iter().map(|(k, v)| (k, v)))
                .stdout(Stdio::null())
                .stderr(Stdio::from(log)),
        ));
        wait_until(
            "slipway-agent run to be ready",
            Duration::from_secs(30),
            || ready.exists(),
        );
    }

    /// The `--ready-file` of `run` (written again by a re-exec'd agent).
    pub fn ready_file(&self) -> PathBuf {
        self.dir.path().join("agent.ready")
    }

    /// Starts `slipway-agent run` as systemd would with the agent unit's
    /// `Restart=on-failure` (no systemd runs here): `INVOCATION_ID` set, and
    /// started again whenever it exits non-zero; returns once it is ready.
    pub fn run_supervised(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("agent.log"))
            .unwrap();
        let ready = self.ready_file();
        let _ = fs::remove_file(&ready);
        let exe = self.exe.clone().unwrap_or_else(|| bin("slipway-agent"));
        let restart_loop = r#"while :; do "$0" --config "$1" run --ready-file "$2"; rc=$?; echo "exited $rc" >&2; [ "$rc" -eq 0 ] && exit 0; sleep 0.1; done"#;
        self.run = Some(
            Command::new("sh")
                .arg("-c")
                .arg(restart_loop)
                .arg(&exe)
                .arg(&self.config)
                .arg(&ready)
                .env("INVOCATION_ID", "0123456789abcdef0123456789abcdef")
                .env(NFT_ENV, NO_NFT)
                .stdout(Stdio::null())
                .stderr(Stdio::from(log))
                .spawn()
                .unwrap(),
        );
        wait_until(
            "slipway-agent run (supervised) to be ready",
            Duration::from_secs(30),
            || ready.exists(),
        );
    }

    /// What the app answers on /, if anything.
    pub fn get(&self) -> Option<String> {
        use std::io::Read;
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(s, "GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        text.split("\r\n\r\n").nth(1).map(str::to_owned)
    }

    /// Appends `KEY=VALUE` lines to the app's `shared/.env` (the exec
    /// driver hands it to every release it starts).
    pub fn add_env(&self, lines: &str) {
        let path = self.root.join("shared/.env");
        let mut env = fs::read_to_string(&path).unwrap();
        env.push_str(lines);
        if !env.ends_with('\n') {
            env.push('\n');
        }
        fs::write(path, env).unwrap();
    }

    /// The release `current` points at on disk, if any.
    pub fn current(&self) -> Option<String> {
        let target = fs::read_link(self.root.join("current")).ok()?;
        Some(target.file_name()?.to_string_lossy().into_owned())
    }

    /// Whether a release directory `id` exists on disk (it was deployed here).
    pub fn has_release(&self, id: &str) -> bool {
        self.root.join("releases").join(id).exists()
    }

    /// Stops `slipway-agent run` (SIGTERM): the node drops its controller
    /// session; its apps keep running.
    pub fn stop_run(&mut self) {
        if let Some(mut c) = self.run.take() {
            terminate(&mut c);
        }
        // An agent an upgrade's guard started again is no child of ours.
        if let Some(pid) = self.running_pid() {
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let lock = self.state_dir().join("agent.lock");
            let t = Instant::now();
            while slipway_agent::lock::is_held(&lock) && t.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(50));
            }
            if slipway_agent::lock::is_held(&lock) {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            }
        }
    }

    /// The pid of the app process the exec driver's supervisor runs, from
    /// its `state.json`.
    pub fn app_pid(&self) -> Option<u64> {
        let state = fs::read(self.root.join(".slipway/run/state.json")).ok()?;
        serde_json::from_slice::<Value>(&state).ok()?["child_pid"].as_u64()
    }

    /// The release directories on this node, sorted.
    pub fn release_dirs(&self) -> Vec<String> {
        let mut ids: Vec<String> = fs::read_dir(self.root.join("releases"))
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    // Staging directories are hidden.
                    .filter(|n| !n.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default();
        ids.sort();
        ids
    }
}

/// Writes `<dir>/<version>.tar.gz`: `server.py` (`app`) and `VERSION`.
pub fn artifact(dir: &Path, version: &str, app: &str) -> PathBuf {
    let art = dir.join(format!("{version}.tar.gz"));
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
        fs::File::create(&art).unwrap(),
        flate2::Compression::fast(),
    ));
    for (name, body) in [("server.py", app), ("VERSION", version)] {
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, body.as_bytes()).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap().flush().unwrap();
    art
}

/// Hex sha256 of a file.
pub fn sha256_file(path: &Path) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(fs::read(path).unwrap()))
}

/// A command's exit status, stdout and stderr, for failure messages.
pub fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A command's stdout.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A command's stderr.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A command's stdout as JSON.
pub fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(out)))
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop_run();
        let _ = self.cli(&["stop", "--app", &self.app]);
    }
}
