//! Tests only: one private PostgreSQL server per test process, and a fresh
//! database in it per test (`database_url()`), so tests stay independent
//! and run in parallel. Std only: the end-to-end test crate includes this
//! same file (`#[path]`).
//!
//! The server runs from Debian's binaries (`postgresql` package): the
//! directory in `SLIPWAY_TEST_POSTGRES_BIN`, else the newest
//! `/usr/lib/postgresql/*/bin`. Its data dir is
//! `$TMPDIR/slipway-test-pg-<pid>`, on 127.0.0.1 at a free port. It is
//! started through `setpriv --pdeathsig SIGQUIT` from a thread that lives
//! as long as the process, so it stops (immediate shutdown) when the test
//! process ends however it ends; data dirs of test processes that are gone
//! are removed by the next one. As root (PostgreSQL refuses to run as
//! root) it runs as the `postgres` user the package creates.
//!
//! Without the binaries `database_url()` fails saying so, unless
//! `SLIPWAY_TEST_NO_POSTGRES=1` asks to skip the PostgreSQL variants
//! ([`skipped`]).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Env var naming the directory of `initdb`, `postgres` and `createdb`.
pub(crate) const BIN_ENV: &str = "SLIPWAY_TEST_POSTGRES_BIN";

/// Env var that, set to 1, skips the PostgreSQL variants of the tests.
pub(crate) const SKIP_ENV: &str = "SLIPWAY_TEST_NO_POSTGRES";

/// How long the server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Prefix of the data dirs in the temp dir (followed by the pid).
const DIR_PREFIX: &str = "slipway-test-pg-";

/// Prefix of an [`OwnServer`]'s dir (followed by the pid, `-` and a
/// number): not [`DIR_PREFIX`], which older sweeps take for a pid whole.
const OWN_PREFIX: &str = "slipway-own-pg-";

/// The running server of this process.
#[derive(Debug)]
struct Server {
    /// Directory of the binaries.
    bin: PathBuf,
    /// Port on 127.0.0.1.
    port: u16,
}

static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();

/// Numbers the databases of this process.
static NEXT_DB: AtomicU32 = AtomicU32::new(1);

/// Numbers the [`OwnServer`]s of this process.
static NEXT_OWN: AtomicU32 = AtomicU32::new(1);

/// True when `SLIPWAY_TEST_NO_POSTGRES=1` asks to skip PostgreSQL tests.
pub(crate) fn skipped() -> bool {
    std::env::var(SKIP_ENV).is_ok_and(|v| v == "1")
}

/// The URL of a new, empty database on this process's server (started on
/// first use).
pub(crate) fn database_url() -> Result<String, String> {
    let server = SERVER.get_or_init(start).as_ref().map_err(Clone::clone)?;
    create_database(&server.bin, server.port)
}

/// Creates a new, empty database on the server at `port`; its URL.
fn create_database(bin: &Path, port: u16) -> Result<String, String> {
    let name = format!("test_{}", NEXT_DB.fetch_add(1, Ordering::Relaxed));
    let out = Command::new(bin.join("createdb"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .arg(&name)
        .output()
        .map_err(|e| format!("running createdb: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "createdb {name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(format!("postgres://postgres@127.0.0.1:{port}/{name}"))
}

/// The directory of the PostgreSQL binaries.
fn bin_dir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os(BIN_ENV) {
        let dir = PathBuf::from(dir);
        if !dir.join("initdb").is_file() {
            return Err(format!("{BIN_ENV}={} has no initdb in it", dir.display()));
        }
        return Ok(dir);
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).ok_or_else(|| {
        format!(
            "PostgreSQL binaries not found (no /usr/lib/postgresql/*/bin/initdb): install \
             Debian's postgresql package or set {BIN_ENV} to the directory of initdb and \
             postgres; {SKIP_ENV}=1 skips the PostgreSQL variants of the tests"
        )
    })
}

/// `setpriv` prefix: as root, run as the `postgres` user.
fn as_postgres_user(command: &mut Command, root: bool) {
    if root {
        command.args([
            "--reuid",
            "postgres",
            "--regid",
            "postgres",
            "--clear-groups",
        ]);
    }
}

fn run_id(args: &[&str]) -> Result<u32, String> {
    let out = Command::new("id")
        .args(args)
        .output()
        .map_err(|e| format!("running id: {e}"))?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|_| {
            format!(
                "id {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

/// Removes the data dirs of test processes that no longer run.
fn sweep_stale(tmp: &Path) {
    for entry in std::fs::read_dir(tmp).into_iter().flatten().flatten() {
        let name = entry.file_name();
        // `DIR_PREFIX<pid>` (the shared server) or `OWN_PREFIX<pid>-<n>`
        // (an [`OwnServer`]).
        let Some(pid) = name
            .to_str()
            .and_then(|n| {
                n.strip_prefix(DIR_PREFIX)
                    .or_else(|| n.strip_prefix(OWN_PREFIX))
            })
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn start() -> Result<Server, String> {
    let bin = bin_dir()?;
    let root = run_id(&["-u"])? == 0;
    let tmp = std::env::temp_dir();
    sweep_stale(&tmp);
    let dir = tmp.join(format!("{DIR_PREFIX}{}", std::process::id()));
    let data = init_data_dir(&bin, &dir, root)?;
    let port = free_port()?;
    spawn_server(&bin, &dir, &data, port, root, &[])?;
    Ok(Server { bin, port })
}

/// A free port on 127.0.0.1 a moment ago.
fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("finding a free port: {e}"))
}

/// Makes `dir` afresh (owned by `postgres` as root) and `initdb`s
/// `dir/data`; returns the data dir.
fn init_data_dir(bin: &Path, dir: &Path, root: bool) -> Result<PathBuf, String> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    if root {
        let (uid, gid) = (run_id(&["-u", "postgres"])?, run_id(&["-g", "postgres"])?);
        std::os::unix::fs::chown(dir, Some(uid), Some(gid))
            .map_err(|e| format!("chown {} to postgres: {e}", dir.display()))?;
    }
    let data = dir.join("data");
    let mut initdb = Command::new("setpriv");
    as_postgres_user(&mut initdb, root);
    let out = initdb
        .arg(bin.join("initdb"))
        .arg("-D")
        .arg(&data)
        .args([
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "-N",
        ])
        .output()
        .map_err(|e| format!("running setpriv initdb: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(data)
}

/// Starts `postgres` on `data` at 127.0.0.1:`port` (socket and log in
/// `dir`, `settings` as extra `-c name=value`) and waits until it accepts
/// connections; the postmaster's process.
fn spawn_server(
    bin: &Path,
    dir: &Path,
    data: &Path,
    port: u16,
    root: bool,
    settings: &[(&str, &str)],
) -> Result<std::process::Child, String> {
    let log = dir.join("postgres.log");
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(|e| format!("{}: {e}", log.display()))?;
    let mut postgres = Command::new("setpriv");
    as_postgres_user(&mut postgres, root);
    postgres
        .args(["--pdeathsig", "SIGQUIT"])
        .arg(bin.join("postgres"))
        .arg("-D")
        .arg(data)
        .arg("-k")
        .arg(dir)
        .args(["-p", &port.to_string()])
        .args(["-c", "listen_addresses=127.0.0.1"])
        .args(["-c", "max_connections=400"])
        // A throwaway server: durability buys nothing here.
        .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
        .args(["-c", "full_page_writes=off"]);
    for (name, value) in settings {
        postgres.arg("-c").arg(format!("{name}={value}"));
    }
    postgres
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file);
    // The parent-death signal follows the thread that spawned the server:
    // spawn it from a thread that never ends.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("test-postgres".into())
        .spawn(move || {
            let child = postgres.spawn();
            let started = child.is_ok();
            let _ = tx.send(child.map_err(|e| format!("starting postgres: {e}")));
            if started {
                loop {
                    std::thread::park();
                }
            }
        })
        .map_err(|e| format!("spawning the postgres thread: {e}"))?;
    let mut child = rx
        .recv()
        .map_err(|_| "the postgres thread ended".to_owned())??;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let ready = Command::new(bin.join("pg_isready"))
            .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string()])
            .status()
            .map_err(|e| format!("running pg_isready: {e}"))?;
        if ready.success() {
            return Ok(child);
        }
        let exited = child.try_wait().map_err(|e| e.to_string())?;
        if exited.is_some() || Instant::now() > deadline {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(format!(
                "the test PostgreSQL server did not start ({}): {log}",
                match exited {
                    Some(status) => format!("exited, {status}"),
                    None => format!("not ready after {START_TIMEOUT:?}"),
                }
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A PostgreSQL server of the caller's own, not shared with other tests:
/// one it may stop as by a crash ([`OwnServer::crash`]) and start again
/// on the same data dir and port ([`OwnServer::resume`]), or load (a
/// benchmark). Stopped and its dir removed when dropped.
#[derive(Debug)]
pub(crate) struct OwnServer {
    /// Directory of the binaries.
    bin: PathBuf,
    /// Holds the data dir, socket and log.
    dir: PathBuf,
    /// The data dir.
    data: PathBuf,
    /// Port on 127.0.0.1.
    port: u16,
    /// Whether it runs as the `postgres` user.
    root: bool,
    /// Extra `-c` settings.
    settings: Vec<(String, String)>,
    /// The postmaster, while it runs.
    child: Option<std::process::Child>,
}

/// How long an immediate shutdown may take.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

impl OwnServer {
    /// Initialises and starts a server with `settings` as extra
    /// `-c name=value` on top of the shared server's.
    pub(crate) fn start(settings: &[(&str, &str)]) -> Result<Self, String> {
        let bin = bin_dir()?;
        let root = run_id(&["-u"])? == 0;
        let tmp = std::env::temp_dir();
        sweep_stale(&tmp);
        let dir = tmp.join(format!(
            "{OWN_PREFIX}{}-{}",
            std::process::id(),
            NEXT_OWN.fetch_add(1, Ordering::Relaxed)
        ));
        let data = init_data_dir(&bin, &dir, root)?;
        let mut server = Self {
            bin,
            dir,
            data,
            port: free_port()?,
            root,
            settings: settings
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect(),
            child: None,
        };
        server.resume()?;
        Ok(server)
    }

    /// The URL of a new, empty database on it.
    pub(crate) fn database_url(&self) -> Result<String, String> {
        create_database(&self.bin, self.port)
    }

    /// The postmaster's pid, while it runs (its backends are its children).
    #[allow(dead_code)] // The benchmarks' (CPU of the server); not the tests'.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }

    /// Runs `sql` with `psql` on database `db` of it; the unaligned,
    /// tuples-only output.
    #[allow(dead_code)] // The benchmarks' (counters in pg_stat_*); not the tests'.
    pub(crate) fn psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let out = Command::new(self.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-d", db, "-Atc", sql])
            .output()
            .map_err(|e| format!("running psql: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "psql {sql:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Stops it at once, as a crash does: SIGQUIT to the postmaster
    /// (immediate shutdown: every backend killed, no checkpoint; the next
    /// start recovers from the WAL). Waits until it has exited.
    pub(crate) fn crash(&mut self) -> Result<(), String> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let out = Command::new("kill")
            .args(["-QUIT", &child.id().to_string()])
            .output()
            .map_err(|e| format!("running kill: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "kill -QUIT {}: {}",
                child.id(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while child.try_wait().map_err(|e| e.to_string())?.is_none() {
            if Instant::now() > deadline {
                return Err(format!(
                    "postgres still runs {STOP_TIMEOUT:?} after SIGQUIT"
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Starts it (again) on its data dir and port; waits until it accepts
    /// connections.
    pub(crate) fn resume(&mut self) -> Result<(), String> {
        if self.child.is_some() {
            return Ok(());
        }
        let settings: Vec<(&str, &str)> = self
            .settings
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        self.child = Some(spawn_server(
            &self.bin, &self.dir, &self.data, self.port, self.root, &settings,
        )?);
        Ok(())
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let _ = self.crash();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
