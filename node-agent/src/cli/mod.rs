//! The `slipway-agent` command line.
//!
//! Exit codes: 0 success, 1 the operation failed (the message says why and
//! what state the app is in), 64 bad usage or configuration (EX_USAGE).

//!
//! # Layout
//!
//! - [`args`]: the command line as clap parses it.
//! - this module: each command run through the layers below (the deploy
//!   pipeline, the daemon, the link's enrollment), mapped to an exit code.
//! - [`print`]: tables and `--json` output.
//! - [`demo`]: the walk-through behind `slipway-agent demo`, which runs
//!   commands through the runner it is handed.

pub mod args;
pub mod demo;
mod print;

use std::path::PathBuf;
use std::process::ExitCode;

use crate::bridge::Bridge;
use crate::config::{Config, ConfigError};
use crate::deploy::{self, DeployError, DeployRequest, Deployer};
use crate::digest::Sha256;
use crate::release::{ReleaseError, ReleaseId};
pub use args::{Cli, Command};
use print::{print_json, print_releases, print_status, AppStatus, ControllerLink};

/// Exit code for bad usage or configuration (sysexits EX_USAGE).
pub const EXIT_USAGE: u8 = 64;

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
/// Who runs this node-local command: the login name (the one behind
/// `sudo` too), on one line.
fn local_actor() -> String {
    let uid = nix::unistd::getuid();
    let user = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map_or_else(|| format!("uid {uid}"), |u| u.name);
    let who = match std::env::var("SUDO_USER") {
        Ok(sudo) if !sudo.is_empty() && sudo != user => format!("{sudo} (sudo as {user})"),
        _ => user,
    };
    slipway_proto::limits::one_line(&who, slipway_proto::limits::MAX_ACTOR - 8)
}

fn local_deploy_event(r: &deploy::DeployReport) -> crate::upkeep::NewEvent {
    let ok = r.outcome == deploy::Outcome::Succeeded;
    crate::upkeep::NewEvent {
        kind: crate::upkeep::EventKind::LocalDeploy,
        release: if ok {
            r.release.to_string()
        } else {
            r.previous
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default()
        },
        from_release: r
            .previous
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        cause: format!(
            "deploy of release {} (artifact {})",
            r.release, r.artifact_sha256
        ),
        outcome: if ok {
            format!("release {} is current", r.release)
        } else {
            format!(
                "rolled back: {}",
                r.failure.as_deref().unwrap_or("unknown failure")
            )
        },
        ok,
        actor: local_actor(),
    }
}

fn local_rollback_event(r: &deploy::RollbackReport) -> crate::upkeep::NewEvent {
    crate::upkeep::NewEvent {
        kind: crate::upkeep::EventKind::LocalRollback,
        release: r.to.to_string(),
        from_release: r.from.as_ref().map(ToString::to_string).unwrap_or_default(),
        cause: match &r.from {
            Some(from) => format!("rollback from {from} to {}", r.to),
            None => format!("rollback to {}", r.to),
        },
        outcome: match &r.problem {
            None => match &r.from {
                Some(from) => format!("current is now {}; {from} marked bad", r.to),
                None => format!("current is now {}", r.to),
            },
            Some(p) => format!("current is now {} but it does not serve: {p}", r.to),
        },
        ok: r.problem.is_none(),
        actor: local_actor(),
    }
}

/// Records a node-local deploy or rollback as a node event for the
/// controller's audit log: `slipway-agent run` sends it at once if it is
/// connected, else when it next is; the controller records an event once.
/// Nothing is recorded on a node that has no controller configured.
fn record_local(config: &Config, app: &str, event: crate::upkeep::NewEvent) {
    if config.controller.is_none() {
        return;
    }
    let Ok(app_config) = config.app(app) else {
        return;
    };
    if let Err(e) = crate::upkeep::record_event(&app_config.root, app, event) {
        eprintln!(
            "warning: app {app}: could not record this command for the controller's audit log: {e}"
        );
    }
}

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
            demo::run(dir, driver, &run_code)?;
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
            let expires = time::OffsetDateTime::from_unix_timestamp(enrolled.expires_at_unix)
                .ok()
                .and_then(|t| {
                    t.format(&time::format_description::well_known::Rfc3339)
                        .ok()
                })
                .unwrap_or_else(|| format!("unix time {}", enrolled.expires_at_unix));
            println!(
                "enrolled as node {} (certificate {}, expires {expires})",
                enrolled.node_id,
                enrolled.cert_path.display(),
            );
        }
        Command::UpgradeGuard { state_dir } => {
            crate::link::upgrade::guard(&state_dir)
                .map_err(|e| anyhow::anyhow!("agent upgrade guard: {e}"))?;
        }
        Command::Supervise {
            root,
            grace_ms,
            listen,
            command,
        } => {
            let listen = listen
                .map(|l| crate::listen::ListenAddr::parse(&l))
                .transpose()
                .map_err(|e| usage(format!("--listen {e}")))?;
            crate::supervise::run(
                &root,
                &command,
                std::time::Duration::from_millis(grace_ms),
                listen.as_ref(),
            )?;
        }
        Command::Front { root, listen } => {
            let listen = crate::listen::ListenAddr::parse(&listen)
                .map_err(|e| usage(format!("--listen {e}")))?;
            crate::front::run(&root, &listen)?;
        }
        Command::SocketExec { command } => {
            return Err(crate::supervise::socket_exec(&command).into());
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
                        verified: None,
                    })?)
                })(),
                (None, Some(url)) => deploy_from_url(&config, &store, &url, sha256, id),
                // clap enforces exactly one of them; this is the message if not.
                _ => Err(usage(
                    "give exactly one of --artifact FILE or --url URL".into(),
                )),
            };
            let report = match result {
                Ok(r) => {
                    record_local(&config, &app, local_deploy_event(&r));
                    r
                }
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
            session.set_actor(format!("{} on the node", local_actor()));
            let report = session.rollback(to.as_ref())?;
            drop(session);
            record_local(&config, &app, local_rollback_event(&report));
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
                    println!("{}", print::describe_finding(f));
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
            let link = config.controller.as_ref().map(controller_link);
            if json {
                print_json(&serde_json::json!({ "node": node, "controller": link, "apps": apps }));
            } else {
                print_status(&node, link.as_ref(), &apps);
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
            let store = store_for(&config, &app)?;
            let mut session = store.begin("stop", None)?;
            let done = session.stop("slipway-agent stop")?;
            println!("{app}: {done}; `slipway-agent start --app {app}` runs it again");
        }
        Command::Start { app, json } => {
            let config = load()?;
            let store = store_for(&config, &app)?;
            let mut session = store.begin("start", None)?;
            let (release, activation, health) = session.restart()?;
            if json {
                print_json(
                    &serde_json::json!({ "app": app, "release": release, "activation": activation, "health": health }),
                );
            } else {
                println!("{app}: started {release}: {}", activation.detail);
                if let Some(h) = health {
                    println!("healthy after {} probes: {}", h.probes, h.last.output);
                }
            }
        }
        Command::Run { ready_file } => {
            let config = load()?;
            // Before the runtime's threads start: it edits the environment.
            let notifier = slipway_proto::notify::Notifier::take_from_env();
            // One agent per state dir: held for the life of the process (an
            // exec for an upgrade lets it go, the new image takes it again).
            let _agent = match &config.controller {
                Some(ctl) => Some(crate::link::upgrade::lock_agent(&ctl.state_dir).map_err(
                    |e| Failure {
                        code: 1,
                        message: e,
                    },
                )?),
                None => None,
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| anyhow::anyhow!("cannot start the runtime: {e}"))?;
            runtime.block_on(crate::daemon::run(
                config,
                ready_file,
                notifier,
                crate::daemon::shutdown_signal(),
            ))?;
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
    // From here the app's lock keeps prune away; the file verified while
    // downloading stayed pinned, so it is not hashed again.
    let mut session = store.begin("deploy", id.as_ref())?;
    drop(pin);
    Ok(session.deploy(&DeployRequest {
        artifact: fetched.path.clone(),
        sha256: Some(sha256),
        id,
        verified: Some(fetched),
    })?)
}

/// Where the controller session of this node stands: what `slipway-agent
/// run` recorded, when it runs (it holds the agent lock); otherwise none.
fn controller_link(ctl: &crate::config::ControllerConfig) -> ControllerLink {
    let running = crate::lock::is_held(&crate::link::upgrade::agent_lock_path(&ctl.state_dir));
    let state = running
        .then(|| crate::link::replicas::read_state(&ctl.state_dir))
        .flatten();
    ControllerLink {
        replicas: ctl.urls.clone(),
        agent_running: running,
        connected_to: state.as_ref().and_then(|s| s.connected_to.clone()),
        node_id: state.as_ref().and_then(|s| s.node_id.clone()),
        since_unix: state.as_ref().map(|s| s.since_unix),
        detail: state.and_then(|s| s.detail),
    }
}

fn app_status(app: &crate::config::AppConfig, bridge: &Bridge) -> Result<AppStatus, Failure> {
    let snapshot = Deployer::new(app, bridge).snapshot()?;
    let snapshot_current = snapshot.current.as_ref().map(ToString::to_string);
    let (processes, process_error) = match crate::driver::for_app(app, bridge) {
        None => (None, None),
        Some(d) => match d.status(app) {
            Ok(mut s) => {
                // Docker and PM2 fork mode: the agent's proxy holds the
                // public address (exec hands the socket over itself).
                if let (Some(l), false) = (&app.listen, d.name() == "exec") {
                    s.notes.insert(0, crate::front::describe(&app.root, l));
                }
                (Some(s), None)
            }
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
        stopped: crate::upkeep::stopped(&app.root),
        crashloop: crate::upkeep::crashloop(&app.root, snapshot_current.as_deref()),
        restarts: crate::upkeep::Recovery::read(&app.root)
            .filter(|r| r.release == snapshot_current)
            .map(|r| r.restarts)
            .unwrap_or_default(),
        events: {
            let mut e = crate::upkeep::Events::load(&app.root).events;
            let skip = e.len().saturating_sub(20);
            e.drain(..skip);
            e
        },
        public: crate::public::of(app),
    })
}
