//! The `slipway-agent` command line.
//!
//! Exit codes: 0 success, 1 the operation failed (the message says why and
//! what state the app is in), 64 bad usage or configuration (EX_USAGE).

pub mod demo;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde::Serialize;

use crate::bridge::Bridge;
use crate::config::{Config, ConfigError, DEFAULT_CONFIG_PATH};
use crate::deploy::{self, DeployError, DeployRequest, Deployer};
use crate::digest::Sha256;
use crate::release::{self, ReleaseError, ReleaseId, Snapshot};

/// Exit code for bad usage or configuration (sysexits EX_USAGE).
pub const EXIT_USAGE: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "slipway-agent",
    version,
    about = "Slipway node agent: atomic releases with node-local rollback",
    after_help = "Exit codes: 0 success, 1 operation failed, 64 bad usage or configuration."
)]
pub struct Cli {
    /// Agent configuration file.
    #[arg(long, global = true, env = "SLIPWAY_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// More log output on stderr (-v debug, -vv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Deploy an artifact (.tar.gz, .tar.zst or .tar) as a new release, from
    /// a local file (--artifact) or downloaded from an https:// URL (--url,
    /// which needs --sha256; see `[artifacts]` in agent.toml).
    Deploy {
        #[arg(long)]
        app: String,
        #[arg(long, required_unless_present = "url")]
        artifact: Option<PathBuf>,
        /// Download the artifact from this https:// URL into the app's
        /// artifact cache (not again when its sha256 is already cached).
        #[arg(long, conflicts_with = "artifact", requires = "sha256")]
        url: Option<String>,
        /// Expected sha256 of the artifact; the deploy is refused on mismatch.
        #[arg(long)]
        sha256: Option<String>,
        /// Release id (default: UTC timestamp + short artifact hash).
        #[arg(long)]
        id: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Switch back to the previous good release, or to --to ID.
    Rollback {
        #[arg(long)]
        app: String,
        #[arg(long)]
        to: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// List an app's releases.
    Releases {
        #[arg(long)]
        app: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove old releases, keeping N good ones (default: the app's `keep`).
    Prune {
        #[arg(long)]
        app: String,
        #[arg(long)]
        keep: Option<usize>,
        /// Instead: free space as under disk pressure (images of releases
        /// gone, rotated logs past retention, cached artifacts, store
        /// objects) until free space is above the app's disk_pressure_free.
        #[arg(long, conflicts_with = "keep")]
        pressure: bool,
        #[arg(long)]
        json: bool,
    },
    /// The app's log files and their rotation state; --rotate rotates the
    /// ones that are due (--force: every non-empty one).
    Logs {
        #[arg(long)]
        app: String,
        #[arg(long)]
        rotate: bool,
        #[arg(long, requires = "rotate")]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// Re-hash a release (default: current) against its manifest.
    Verify {
        #[arg(long)]
        app: String,
        #[arg(long)]
        id: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Every app's state on this node: releases, processes, health, and the
    /// node's cpu, memory, load and disks.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Restart the current release through the app's driver, then run the
    /// health gate.
    Restart {
        #[arg(long)]
        app: String,
        #[arg(long)]
        json: bool,
    },
    /// Stop the app's processes (the release files stay).
    Stop {
        #[arg(long)]
        app: String,
    },
    /// Run the agent: liveness checks, log rotation and disk-pressure
    /// pruning for every app, until SIGTERM.
    Run,
    /// Enroll this node with a controller using a one-time join token (from
    /// `slipway-controller token create`). The key is made here and never
    /// leaves the node.
    Enroll {
        /// host:port or https://host:port of the controller.
        #[arg(long, env = "SLIPWAY_CONTROLLER")]
        controller: String,
        #[arg(long, env = "SLIPWAY_JOIN_TOKEN", hide_env_values = true)]
        token: String,
        /// Where the key, certificate and CA are kept.
        #[arg(long, default_value = "/var/lib/slipway-agent")]
        state_dir: PathBuf,
        /// This node's name (default: the host name): 1 to 253 letters,
        /// digits, . _ - starting with a letter or digit, unique among the
        /// controller's live nodes.
        #[arg(long)]
        name: Option<String>,
        /// Take the name over from the live node that has it (e.g. this
        /// droplet rebuilt): that node is revoked, and the controller audits
        /// it as NODE_REPLACED.
        #[arg(long)]
        replace: bool,
    },
    /// Pack a directory into an artifact (.tar.gz, or .tar.zst by extension)
    /// and print its sha256.
    Pack {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Run an app's command and keep it running (started by the exec driver).
    #[command(hide = true)]
    Supervise {
        /// The app root (its `current/` is the working directory).
        #[arg(long)]
        root: PathBuf,
        /// Milliseconds between SIGTERM and SIGKILL when stopping.
        #[arg(long, default_value_t = 10_000)]
        grace_ms: u64,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Walk through deploy, releases, rollback and prune in a scratch directory.
    Demo {
        /// Directory to work in (default: a new temp dir, kept afterwards).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// What runs the sample app.
        #[arg(long, value_enum, default_value = "auto")]
        driver: demo::DemoDriver,
    },
}

/// Logs go to stderr so `--json` output on stdout stays clean.
pub fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLIPWAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// A failure, with the exit code it maps to.
#[derive(Debug)]
struct Failure {
    code: u8,
    message: String,
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Self {
            code: EXIT_USAGE,
            message: e.to_string(),
        }
    }
}

impl From<DeployError> for Failure {
    fn from(e: DeployError) -> Self {
        let code = match e {
            DeployError::Store(ReleaseError::InvalidId(_)) => EXIT_USAGE,
            _ => 1,
        };
        Self {
            code,
            message: e.to_string(),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Self {
            code: 1,
            message: format!("{e:#}"),
        }
    }
}

fn usage(message: String) -> Failure {
    Failure {
        code: EXIT_USAGE,
        message,
    }
}

/// Runs one command and maps the outcome to an exit code.
pub fn run(cli: Cli) -> ExitCode {
    ExitCode::from(run_code(cli))
}

/// Runs one command; errors are printed to stderr and become the exit code.
pub fn run_code(cli: Cli) -> u8 {
    match execute(cli) {
        Ok(code) => code,
        Err(f) => {
            eprintln!("error: {}", f.message);
            f.code
        }
    }
}

/// The deploy pipeline of `app` for this one-shot command, with the
/// runtime its driver blocks on (one per command).
fn store_for(config: &Config, app: &str) -> Result<Deployer, Failure> {
    let app = config.app(app).map_err(|e| usage(e.to_string()))?;
    Ok(Deployer::new(app, &owned_bridge()?))
}

/// The runtime a one-shot command's blocking code (a driver, a download)
/// blocks on: built once per command, never per call.
fn owned_bridge() -> Result<Bridge, Failure> {
    Bridge::owned().map_err(|e| anyhow::anyhow!("cannot start the runtime: {e}").into())
}

fn parse_id(id: &str) -> Result<ReleaseId, Failure> {
    ReleaseId::new(id).map_err(|e| usage(e.to_string()))
}

fn print_json<T: Serialize>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("error: cannot encode output: {e}"),
    }
}

fn execute(cli: Cli) -> Result<u8, Failure> {
    // Commands that need no agent.toml run without reading it.
    let Cli {
        config: config_path,
        command,
        ..
    } = cli;
    let load = || Config::load(&config_path);
    match command {
        Command::Demo { dir, driver } => {
            demo::run(dir, driver)?;
        }
        Command::Enroll {
            controller,
            token,
            state_dir,
            name,
            replace,
        } => {
            let name = match name {
                Some(n) => n,
                None => sysinfo::System::host_name()
                    .ok_or_else(|| anyhow::anyhow!("cannot read the host name (give --name)"))?,
            };
            slipway_proto::limits::check_node_name("--name", &name)
                .map_err(|e| usage(e.to_string()))?;
            let enrolled = current_thread_runtime()?
                .block_on(crate::link::enroll(
                    &controller,
                    &token,
                    &state_dir,
                    &name,
                    replace,
                ))
                .map_err(|e| anyhow::anyhow!("enrollment failed: {e}"))?;
            println!(
                "enrolled as node {} (certificate {}, expires at unix time {})",
                enrolled.node_id,
                enrolled.cert_path.display(),
                enrolled.expires_at_unix
            );
        }
        Command::Supervise {
            root,
            grace_ms,
            command,
        } => {
            crate::supervise::run(&root, &command, std::time::Duration::from_millis(grace_ms))?;
        }
        Command::Pack { dir, out } => {
            if !dir.is_dir() {
                return Err(usage(format!("--dir {} is not a directory", dir.display())));
            }
            crate::artifact::pack_dir(&dir, &out, crate::artifact::Compression::for_path(&out))
                .map_err(|e| {
                    anyhow::anyhow!("cannot pack {} into {}: {e}", dir.display(), out.display())
                })?;
            let sha = crate::digest::Sha256::of_file(&out)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", out.display()))?;
            println!("{sha}  {}", out.display());
        }
        Command::Deploy {
            app,
            artifact,
            url,
            sha256,
            id,
            json,
        } => {
            let config = load()?;
            let store = store_for(&config, &app)?;
            let id = id.as_deref().map(parse_id).transpose()?;
            let result = match (artifact, url) {
                (Some(artifact), None) => (|| {
                    let sha256 = sha256
                        .as_deref()
                        .map(Sha256::parse)
                        .transpose()
                        .map_err(|e| usage(e.to_string()))?;
                    let mut session = store.begin("deploy", id.as_ref())?;
                    Ok(session.deploy(&DeployRequest {
                        artifact,
                        sha256,
                        id,
                    })?)
                })(),
                (None, Some(url)) => deploy_from_url(&config, &store, &url, sha256, id),
                // clap enforces exactly one of them; this is the message if not.
                _ => Err(usage(
                    "give exactly one of --artifact FILE or --url URL".into(),
                )),
            };
            let report = match result {
                Ok(r) => r,
                Err(e) => {
                    // CI reading --json gets a machine-readable failure too
                    // (current was never switched, or was switched back).
                    if json {
                        print_json(&serde_json::json!({
                            "app": app,
                            "outcome": deploy::Outcome::Failed,
                            "error": e.message,
                        }));
                    }
                    return Err(e);
                }
            };
            if report.outcome != deploy::Outcome::Succeeded {
                if json {
                    print_json(&report);
                } else {
                    println!(
                        "deploy of {} release {} ROLLED BACK: {}",
                        report.app,
                        report.release,
                        report.failure.as_deref().unwrap_or("unknown failure")
                    );
                    if let Some(r) = &report.restored {
                        println!("{r}");
                    }
                }
                return Ok(1);
            }
            if json {
                print_json(&report);
            } else {
                println!(
                    "deployed {} release {} ({}; {} files, {} bytes, {} reused) in {:.0} ms",
                    report.app,
                    report.release,
                    report.method,
                    report.files,
                    report.bytes,
                    report.reused_files,
                    report.total_ms
                );
                if let Some(prev) = &report.previous {
                    println!("previous release {prev} is the rollback target");
                }
                if let Some(a) = &report.activation {
                    println!("{}", a.detail);
                }
                if let Some(h) = &report.health {
                    println!(
                        "healthy after {} probes ({} ms): {}",
                        h.probes, h.elapsed_ms, h.last.output
                    );
                }
                if !report.pruned.is_empty() {
                    let ids: Vec<_> = report.pruned.iter().map(ReleaseId::as_str).collect();
                    println!("pruned {}", ids.join(", "));
                }
            }
        }
        Command::Rollback { app, to, json } => {
            let config = load()?;
            let store = store_for(&config, &app)?;
            let to = to.as_deref().map(parse_id).transpose()?;
            let mut session = store.begin("rollback", to.as_ref())?;
            let report = session.rollback(to.as_ref())?;
            let code = u8::from(report.problem.is_some());
            if json {
                print_json(&report);
            } else {
                if let Some(p) = &report.problem {
                    println!("warning: the release is current but not serving healthily: {p}");
                }
                match &report.from {
                    Some(from) => println!(
                        "{}: current is now {} (rolled back from {from}, now marked bad)",
                        report.app, report.to
                    ),
                    None => println!("{}: current is now {}", report.app, report.to),
                }
            }
            return Ok(code);
        }
        Command::Releases { app, json } => {
            let config = load()?;
            let snap = store_for(&config, &app)?.snapshot()?;
            if json {
                print_json(&snap);
            } else {
                print_releases(&snap);
            }
        }
        Command::Prune {
            app,
            pressure: true,
            json,
            ..
        } => {
            let config = load()?;
            let store = store_for(&config, &app)?;
            let Some(threshold) = store.app().disk_pressure_free else {
                return Err(usage(format!(
                    "app {app:?} has no disk_pressure_free threshold in {}",
                    config.path.display()
                )));
            };
            let mut session = store.begin("prune", None)?;
            let report = session.relieve_pressure(threshold)?;
            if json {
                print_json(&report);
            } else {
                for (step, bytes) in &report.steps {
                    println!("{step:<18} freed {bytes} bytes");
                }
                println!(
                    "free space {} -> {} bytes (threshold {}): {}",
                    report.free_before,
                    report.free_after,
                    report.threshold,
                    if report.relieved {
                        "ok"
                    } else {
                        "STILL BELOW THE THRESHOLD"
                    }
                );
            }
            return Ok(u8::from(!report.relieved));
        }
        Command::Logs {
            app,
            rotate,
            force,
            json,
        } => {
            let config = load()?;
            let app_cfg = config.app(&app).map_err(|e| usage(e.to_string()))?;
            let (rotations, errors) = if rotate {
                crate::logs::rotate_app(app_cfg, force)
            } else {
                (Vec::new(), Vec::new())
            };
            let state = crate::logs::LogsState::load(&app_cfg.root);
            let files: Vec<serde_json::Value> = crate::logs::discover(app_cfg)
                .iter()
                .map(|f| {
                    serde_json::json!({
                        "path": f.path,
                        "method": f.method.name(),
                        "bytes": std::fs::metadata(&f.path).map(|m| m.len()).unwrap_or(0),
                        "rotated_files": crate::logs::rotated_files(&f.path),
                        "state": state.files.get(&f.path),
                    })
                })
                .collect();
            if json {
                print_json(&serde_json::json!({
                    "app": app,
                    "files": files,
                    "rotations": rotations,
                    "errors": errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
                }));
            } else {
                for r in &rotations {
                    println!(
                        "rotated {} -> {} ({} bytes, {})",
                        r.file.display(),
                        r.rotated_to.display(),
                        r.bytes,
                        r.method
                    );
                }
                for f in &files {
                    println!(
                        "{}  {} bytes  {} rotated  ({})",
                        f["path"].as_str().unwrap_or(""),
                        f["bytes"],
                        f["rotated_files"].as_array().map_or(0, Vec::len),
                        f["method"].as_str().unwrap_or("")
                    );
                }
            }
            for e in &errors {
                eprintln!("error: {e}");
            }
            return Ok(u8::from(!errors.is_empty()));
        }
        Command::Prune {
            app, keep, json, ..
        } => {
            let config = load()?;
            let store = store_for(&config, &app)?;
            let keep = keep.unwrap_or(store.app().keep);
            if keep == 0 {
                return Err(usage("--keep must be at least 1".into()));
            }
            let mut session = store.begin("prune", None)?;
            let report = session.prune(keep)?;
            if json {
                print_json(&report);
            } else {
                let ids: Vec<_> = report.store.removed.iter().map(ReleaseId::as_str).collect();
                println!(
                    "removed {} release(s){}{}; freed {} objects ({} bytes)",
                    ids.len(),
                    if ids.is_empty() { "" } else { ": " },
                    ids.join(", "),
                    report.store.objects_removed,
                    report.store.bytes_freed
                );
            }
        }
        Command::Verify { app, id, json } => {
            let config = load()?;
            let store = store_for(&config, &app)?;
            let id = id.as_deref().map(parse_id).transpose()?;
            let report = store.verify(id.as_ref())?;
            if json {
                print_json(&report);
            } else {
                for f in &report.findings {
                    println!("{}", describe_finding(f));
                }
                println!(
                    "release {}: {} files checked, {}",
                    report.release,
                    report.files_checked,
                    if report.ok() { "intact" } else { "MODIFIED" }
                );
            }
            return Ok(if report.ok() { 0 } else { 1 });
        }
        Command::Status { json } => {
            let config = load()?;
            let bridge = owned_bridge()?;
            let mut apps = Vec::new();
            for app in config.apps.values() {
                apps.push(app_status(app, &bridge)?);
            }
            let roots: Vec<PathBuf> = config.apps.values().map(|a| a.root.clone()).collect();
            let node = crate::metrics::snapshot(&roots);
            if json {
                print_json(&serde_json::json!({ "node": node, "apps": apps }));
            } else {
                print_status(&node, &apps);
            }
        }
        Command::Restart { app, json } => {
            let config = load()?;
            let store = store_for(&config, &app)?;
            let mut session = store.begin("restart", None)?;
            let (release, activation, health) = session.restart()?;
            if json {
                print_json(
                    &serde_json::json!({ "app": app, "release": release, "activation": activation, "health": health }),
                );
            } else {
                println!("{app}: restarted {release}: {}", activation.detail);
                if let Some(h) = health {
                    println!("healthy after {} probes: {}", h.probes, h.last.output);
                }
            }
        }
        Command::Stop { app } => {
            let config = load()?;
            let app_cfg = config.app(&app).map_err(|e| usage(e.to_string()))?;
            let bridge = owned_bridge()?;
            let Some(driver) = crate::driver::for_app(app_cfg, &bridge) else {
                return Err(usage(format!(
                    "app {app:?} has no [apps.{app}.run] driver to stop"
                )));
            };
            let store = Deployer::new(app_cfg, &bridge);
            let _session = store.begin("stop", None)?;
            driver.stop(app_cfg).map_err(|e| Failure {
                code: 1,
                message: e.to_string(),
            })?;
            println!("{app}: stopped ({})", driver.name());
        }
        Command::Run => {
            let config = load()?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| anyhow::anyhow!("cannot start the runtime: {e}"))?;
            runtime.block_on(crate::daemon::run(config, crate::daemon::shutdown_signal()))?;
        }
    }
    Ok(0)
}

/// A runtime for the one async call of `enroll`.
fn current_thread_runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the runtime: {e}").into())
}

/// `deploy --url`: downloads the artifact into the app's artifact cache (or
/// finds it there) with the cache pinned but the app not locked — a
/// `rollback` meanwhile works — then takes the app's lock and deploys it.
fn deploy_from_url(
    config: &Config,
    store: &Deployer,
    url: &str,
    sha256: Option<String>,
    id: Option<ReleaseId>,
) -> Result<deploy::DeployReport, Failure> {
    let download_failure = |e: crate::artifact::https::DownloadError| Failure {
        code: if e.is_usage() { EXIT_USAGE } else { 1 },
        message: format!("cannot download the artifact: {e}"),
    };
    let Some(sha256) = sha256 else {
        return Err(usage(
            "--url needs --sha256 HEX (the artifact's digest)".into(),
        ));
    };
    // Bad input is refused before anything is fetched, and so is a deploy
    // that would find the app busy.
    let sha256 = Sha256::parse(&sha256).map_err(|e| download_failure(e.into()))?;
    crate::artifact::https::parse_url(url).map_err(download_failure)?;
    store.check_idle("deploy", id.as_ref())?;
    let pin = store.pin_cache()?;
    let fetched = store
        .bridge()
        .block_on(crate::artifact::https::fetch(
            url,
            &sha256,
            &store.paths().cache,
            &config.artifacts,
            &mut |line| eprintln!("{line}"),
        ))
        .map_err(download_failure)?;
    // From here the app's lock keeps prune away; the deploy re-hashes the
    // cached file under it.
    let mut session = store.begin("deploy", id.as_ref())?;
    drop(pin);
    Ok(session.deploy(&DeployRequest {
        artifact: fetched.path,
        sha256: Some(sha256),
        id,
    })?)
}

#[derive(Debug, Serialize)]
struct AppStatus {
    #[serde(flatten)]
    snapshot: Snapshot,
    /// The driver's view of the app's processes (never environment values).
    processes: Option<crate::driver::DriverStatus>,
    /// Set when the driver could not be asked.
    process_error: Option<String>,
    /// Latest liveness results, kept by `slipway-agent run`.
    liveness: Option<crate::health::Liveness>,
    /// Rotation state of each log file (last rotation, count, method).
    logs: crate::logs::LogsState,
    /// The last prune and what it freed.
    last_prune: Option<crate::release::PruneRecord>,
}

fn app_status(app: &crate::config::AppConfig, bridge: &Bridge) -> Result<AppStatus, Failure> {
    let snapshot = Deployer::new(app, bridge).snapshot()?;
    let (processes, process_error) = match crate::driver::for_app(app, bridge) {
        None => (None, None),
        Some(d) => match d.status(app) {
            Ok(s) => (Some(s), None),
            Err(e) => (None, Some(e.to_string())),
        },
    };
    Ok(AppStatus {
        snapshot,
        processes,
        process_error,
        liveness: crate::health::Liveness::load(&app.root),
        logs: crate::logs::LogsState::load(&app.root),
        last_prune: crate::release::PruneRecord::load(&app.root),
    })
}

fn print_status(node: &crate::metrics::NodeMetrics, apps: &[AppStatus]) {
    const GIB: f64 = (1u64 << 30) as f64;
    println!(
        "node {}: cpu {:.0}% of {} cores, memory {:.1}/{:.1} GiB, load {:.2} {:.2} {:.2}",
        node.hostname.as_deref().unwrap_or("?"),
        node.cpu_percent,
        node.cores,
        node.mem_used_bytes as f64 / GIB,
        node.mem_total_bytes as f64 / GIB,
        node.load1,
        node.load5,
        node.load15
    );
    for d in &node.disks {
        println!(
            "disk {} ({}): {:.1}/{:.1} GiB used",
            d.path.display(),
            d.mount
                .as_ref()
                .map_or("?".into(), |m| m.display().to_string()),
            d.used_bytes as f64 / GIB,
            d.total_bytes as f64 / GIB
        );
    }
    for a in apps {
        let s = &a.snapshot;
        println!(
            "\n{:<16} current {:<32} releases {:<3} {}",
            s.app,
            s.current.as_ref().map_or("-", ReleaseId::as_str),
            s.releases.len(),
            match (&s.lock_holder, &s.in_progress) {
                (Some(h), _) => format!("busy: {h}"),
                (None, Some(op)) => format!("interrupted {}", op.name()),
                _ => "idle".into(),
            }
        );
        if let Some(p) = &a.processes {
            for proc_ in &p.processes {
                println!(
                    "  {:<20} {:<10} pid {:<8} restarts {:<4} mem {:>6.1} MiB  release {}",
                    proc_.name,
                    proc_.status,
                    proc_.pid.map_or("-".into(), |p| p.to_string()),
                    proc_.restarts,
                    proc_.memory_bytes.unwrap_or(0) as f64 / 1048576.0,
                    proc_.release.as_deref().unwrap_or("-")
                );
            }
            for n in &p.notes {
                println!("  note: {n}");
            }
        }
        if let Some(e) = &a.process_error {
            println!("  processes: {e}");
        }
        if let Some(l) = &a.liveness {
            println!(
                "  health: {} ({} probes, {} failures in a row; last: {})",
                match l.healthy {
                    Some(true) => "healthy",
                    Some(false) => "UNHEALTHY",
                    None => "unknown",
                },
                l.probes,
                l.consecutive_failures,
                l.last_output.as_deref().unwrap_or("-")
            );
        }
    }
}

fn print_releases(snap: &Snapshot) {
    if snap.releases.is_empty() {
        println!("{}: no releases under {}", snap.app, snap.root.display());
        return;
    }
    println!(
        "{:<2} {:<36} {:<9} {:<20} {:>7} {:>12}  note",
        "", "RELEASE", "STATUS", "CREATED", "FILES", "BYTES"
    );
    for r in snap.releases.iter().rev() {
        let mark = if r.current {
            "*"
        } else if r.rollback_target {
            "<"
        } else {
            ""
        };
        let created = r
            .release
            .created_at
            .format(&time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute]:[second]"
            ))
            .unwrap_or_default();
        println!(
            "{:<2} {:<36} {:<9} {:<20} {:>7} {:>12}  {}",
            mark,
            r.release.id.as_str(),
            r.release.status.as_str(),
            created,
            r.release.files,
            r.release.bytes,
            one_line(r.release.reason.as_deref().unwrap_or(""), 72)
        );
    }
    println!("* current   < rollback target");
    if let Some(h) = &snap.lock_holder {
        println!("busy: {h}");
    }
    if let Some(r) = &snap.recovered {
        println!("recovered: {r}");
    }
}

/// The first line of `text`, cut to `max` characters, for tables.
fn one_line(text: &str, max: usize) -> String {
    let first = text.lines().next().unwrap_or("");
    if first.chars().count() > max || text.lines().count() > 1 {
        let cut: String = first.chars().take(max).collect();
        format!("{cut}…")
    } else {
        first.to_owned()
    }
}

fn describe_finding(f: &release::Finding) -> String {
    use release::Finding::*;
    match f {
        Modified {
            path,
            expected,
            actual,
        } => format!("modified: {path} (sha256 {actual}, expected {expected})"),
        Missing { path } => format!("missing:  {path}"),
        WrongType { path, expected } => format!("changed:  {path} is no longer a {expected}"),
        ModeChanged {
            path,
            expected,
            actual,
        } => format!("mode:     {path} is {actual}, expected {expected}"),
        SymlinkChanged {
            path,
            expected,
            actual,
        } => format!("symlink:  {path} -> {actual}, expected {expected}"),
        Added { path } => format!("added:    {path} (not in the artifact)"),
    }
}
