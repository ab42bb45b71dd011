//! The `slipway-agent` command line.
//!
//! Exit codes: 0 success, 1 the operation failed (the message says why and
//! what state the app is in), 64 bad usage or configuration (EX_USAGE).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde::Serialize;

use crate::config::{Config, ConfigError, DEFAULT_CONFIG_PATH};
use crate::release::{self, DeployRequest, ReleaseError, ReleaseId, Snapshot, Store};

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
    /// Deploy an artifact (.tar.gz, .tar.zst or .tar) as a new release.
    Deploy {
        #[arg(long)]
        app: String,
        #[arg(long)]
        artifact: PathBuf,
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
    /// Every app's state on this node.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Pack a directory into an artifact (.tar.gz, or .tar.zst by extension)
    /// and print its sha256.
    Pack {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Walk through deploy, releases, rollback and prune in a scratch directory.
    Demo {
        /// Directory to work in (default: a new temp dir, kept afterwards).
        #[arg(long)]
        dir: Option<PathBuf>,
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

impl From<ReleaseError> for Failure {
    fn from(e: ReleaseError) -> Self {
        let code = match e {
            ReleaseError::InvalidId(_) | ReleaseError::BadSha256 { .. } => EXIT_USAGE,
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

fn store_for(config: &Config, app: &str) -> Result<Store, Failure> {
    let app = config.app(app).map_err(|e| usage(e.to_string()))?;
    Ok(Store::new(app))
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
    if let Command::Demo { dir } = cli.command {
        crate::demo::run(dir)?;
        return Ok(0);
    }
    if let Command::Pack { dir, out } = &cli.command {
        if !dir.is_dir() {
            return Err(usage(format!("--dir {} is not a directory", dir.display())));
        }
        crate::artifact::pack_dir(dir, out, crate::artifact::Compression::for_path(out)).map_err(
            |e| anyhow::anyhow!("cannot pack {} into {}: {e}", dir.display(), out.display()),
        )?;
        let sha = release::hash_file(out)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", out.display()))?;
        println!("{sha}  {}", out.display());
        return Ok(0);
    }
    let config = Config::load(&cli.config)?;
    match cli.command {
        Command::Deploy {
            app,
            artifact,
            sha256,
            id,
            json,
        } => {
            let store = store_for(&config, &app)?;
            let id = id.as_deref().map(parse_id).transpose()?;
            let mut session = store.begin("deploy", id.as_ref())?;
            let report = session.deploy(&DeployRequest {
                artifact,
                sha256,
                id,
            })?;
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
                if !report.pruned.is_empty() {
                    let ids: Vec<_> = report.pruned.iter().map(ReleaseId::as_str).collect();
                    println!("pruned {}", ids.join(", "));
                }
            }
        }
        Command::Rollback { app, to, json } => {
            let store = store_for(&config, &app)?;
            let to = to.as_deref().map(parse_id).transpose()?;
            let mut session = store.begin("rollback", to.as_ref())?;
            let report = session.rollback(to.as_ref())?;
            if json {
                print_json(&report);
            } else {
                match &report.from {
                    Some(from) => println!(
                        "{}: current is now {} (rolled back from {from}, now marked bad)",
                        report.app, report.to
                    ),
                    None => println!("{}: current is now {}", report.app, report.to),
                }
            }
        }
        Command::Releases { app, json } => {
            let snap = store_for(&config, &app)?.snapshot()?;
            if json {
                print_json(&snap);
            } else {
                print_releases(&snap);
            }
        }
        Command::Prune { app, keep, json } => {
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
                let ids: Vec<_> = report.removed.iter().map(ReleaseId::as_str).collect();
                println!(
                    "removed {} release(s){}{}; freed {} objects ({} bytes)",
                    ids.len(),
                    if ids.is_empty() { "" } else { ": " },
                    ids.join(", "),
                    report.objects_removed,
                    report.bytes_freed
                );
            }
        }
        Command::Verify { app, id, json } => {
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
            let mut apps = Vec::new();
            for app in config.apps.values() {
                let snap = Store::new(app).snapshot()?;
                let free = release::unpack::SpaceGuard::available(&app.root).ok();
                apps.push(AppStatus {
                    snapshot: snap,
                    disk_free_bytes: free,
                });
            }
            if json {
                print_json(&serde_json::json!({ "apps": apps }));
            } else {
                for a in &apps {
                    let s = &a.snapshot;
                    println!(
                        "{:<16} current {:<32} releases {:<3} {}",
                        s.app,
                        s.current.as_ref().map_or("-", ReleaseId::as_str),
                        s.releases.len(),
                        match (&s.lock_holder, &s.in_progress) {
                            (Some(h), _) => format!("busy: {h}"),
                            (None, Some(op)) => format!("interrupted {}", op.name()),
                            _ => "idle".into(),
                        }
                    );
                }
            }
        }
        Command::Demo { .. } | Command::Pack { .. } => {
            return Err(usage("internal: command handled earlier".into()))
        }
    }
    Ok(0)
}

#[derive(Debug, Serialize)]
struct AppStatus {
    #[serde(flatten)]
    snapshot: Snapshot,
    disk_free_bytes: Option<u64>,
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
