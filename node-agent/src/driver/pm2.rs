//! The PM2 driver: the app runs under a PM2 daemon and is reloaded in place.
//!
//! # How a release is run
//!
//! Each activation writes a PM2 process file, `<root>/.slipway/run/pm2-<name>.json`
//! (mode 0600: it holds `.env` values), and runs `pm2 startOrReload FILE
//! --update-env`. The file's `cwd` is the `current` *symlink path*, never the
//! resolved release dir: PM2 keeps `pm_cwd` and `pm_exec_path` as strings and
//! every worker it forks `chdir`s to them anew, so a reload after the switch
//! lands in the new release. (Running `pm2` with that directory as its working
//! directory would not do: `getcwd` resolves the link and PM2 would pin the old
//! release forever.)
//!
//! The file is built from the release's ecosystem file when there is one
//! (loaded with `node`, as PM2 itself would), with `name`, `cwd`,
//! `instances` and `exec_mode` forced to what `agent.toml` says, and the env
//! being the ecosystem's, then `shared/.env`, then Slipway's own variables.
//!
//! # PM2 behaviour this module works around
//!
//! - A reload only updates the environment of a running app; `pm_exec_path`,
//!   `pm_cwd`, `exec_mode` and the instance count stay as they were started.
//!   When those differ from what this release needs, the app is deleted and
//!   started again (a restart, said so in the activation detail); a different
//!   explicit instance count is fixed with `pm2 scale` after the reload.
//! - A reload merges the new environment into the old one (`--update-env`
//!   adds and changes, never removes): a variable removed from `.env` would
//!   stay set until the app is deleted. So when the last process file set a
//!   variable this one does not, the app is deleted and started again (a
//!   restart, said so in the activation detail with the names), and the
//!   process sees exactly the new environment.
//! - The `pm2` CLI copies its own environment into the app's, so it runs with
//!   a cleared environment (PATH, HOME, USER, PM2_HOME only), never the agent's.
//! - Almost every `pm2` command spawns a daemon when none runs; `status` and
//!   `stop` look at `PM2_HOME/pm2.pid` first so asking never starts one.
//! - `pm2 jlist` carries each process's whole environment; it is parsed into
//!   structs that take only the fields shown here, so values never reach a
//!   [`DriverStatus`] or an error message.
//!
//! # Cluster reloads that hang a connection, and why ours do not
//!
//! In cluster mode the PM2 daemon ("God") is the Node cluster *master*. With
//! Node's default scheduling on Linux, round-robin, the master accepts every
//! connection itself and hands the socket to a worker over IPC, then waits
//! for the worker's reply before closing its own copy. During `pm2 reload`
//! the old workers are told to stop; a connection handed to a worker that
//! is already disconnecting is never answered *and never given back*: the
//! reply never comes, so the master neither closes the socket nor passes it
//! on. The client waits forever. Measured with PM2 7.0.4 and Node 20 (plain
//! `pm2 reload` of a two-instance app under a loop of new connections, no
//! Slipway involved): 7 hung connections in 6 reloads, and `ss -tnp` showed
//! each hung connection ESTABLISHED, with unread request bytes, held by
//! `PM2 v7.0.4: God` — the master, not a worker.
//!
//! The cure is the cluster's other policy, `NODE_CLUSTER_SCHED_POLICY=none`:
//! the master only shares the listening socket, every worker accepts from it
//! itself, and the kernel spreads connections over the workers (all cores
//! still used). A connection is then either in the kernel's accept queue,
//! where any live worker takes it, or owned by one worker that answers it
//! before it exits — nothing sits in the master. The policy is read once,
//! when the daemon starts, so every `pm2` call here carries it and a daemon
//! this agent spawns has it. Same load, same reloads with it: 0 hung in 8
//! reloads (140,000 requests). A daemon started some other way (an old
//! `pm2 startup` unit, a user's shell) may lack it; `status` and the
//! activation detail say so (see [`Runner::balancing`]), and `pm2 kill`
//! once lets the agent start the apps again under a daemon that has it.
//!
//! What the app must do: on SIGINT (PM2's stop signal) stop listening and
//! finish what is in flight — `server.close()` and exit when it calls back,
//! within PM2's `kill_timeout` (1.6 s by default; set it in the ecosystem
//! file). An app that just dies on SIGINT resets the requests it was serving.
//!
//! Fork mode has no master to share a socket: a reload stops the one
//! process and starts the next, so connections are refused in between
//! ([`FORK_NOTE`]).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::de::IgnoredAny;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use super::{Activation, Driver, DriverError, DriverStatus, ProcessInfo, Target};
use crate::config::{AppConfig, Pm2Config};
use crate::durable;
use crate::proc;

const DRIVER: &str = "pm2";

/// `startOrReload` (and a delete + start) reloads instances one after the
/// other, each waiting up to PM2's listen timeout; generous for many cores.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(180);
/// `jlist`, `delete`, `scale`, `save`: quick daemon round trips.
const QUERY_TIMEOUT: Duration = Duration::from_secs(30);
/// Evaluating the release's ecosystem file with node.
const ECOSYSTEM_TIMEOUT: Duration = Duration::from_secs(30);
/// How long every instance may take to be `online` after the reload.
const ONLINE_TIMEOUT: Duration = Duration::from_secs(30);
/// Instances must stay online with the same pids this long: PM2's default
/// `min_uptime`, so a crash loop is not mistaken for a start.
const STABLE_FOR: Duration = Duration::from_secs(1);
/// Between two `pm2 jlist` polls while waiting for `online`.
const ONLINE_POLL: Duration = Duration::from_millis(250);
/// Once a command exited, how long to wait for the rest of its output (a
/// daemon it spawned must not keep us waiting on an inherited pipe).
const OUTPUT_GRACE: Duration = Duration::from_secs(2);
/// A `pm2` call past its timeout gets SIGTERM, then SIGKILL this much later.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// Bytes of each output stream of a `pm2` call kept: `jlist` prints every
/// process with its whole environment, so this is generous, but bounded.
const OUTPUT_LIMIT: usize = 16 << 20;
/// Lines of a failed command's output kept in the error.
const TAIL_LINES: usize = 12;
/// PATH for pm2 and node when the agent has none (systemd gives one).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Ecosystem files looked for in a release when neither `ecosystem` nor
/// `script` is configured (`.cjs` for packages with `"type": "module"`).
const DEFAULT_ECOSYSTEMS: [&str; 2] = ["ecosystem.config.js", "ecosystem.config.cjs"];
/// Prints a CommonJS/JSON module as JSON: how PM2 reads an ecosystem file.
const ECOSYSTEM_LOADER: &str = "process.stdout.write(JSON.stringify(require(process.argv[1])))";
/// Shown by `status` in fork mode.
const FORK_NOTE: &str = "fork mode: pm2 reload is a restart, not zero-downtime";
/// Shown by `status` in cluster mode under a daemon balancing round-robin.
const ROUND_ROBIN_NOTE: &str = "the pm2 daemon balances cluster connections round-robin (it was \
     started without NODE_CLUSTER_SCHED_POLICY=none): a reload can leave a connection hanging; \
     `pm2 kill` once and the agent starts the apps again under a daemon that balances in the kernel";
/// Shown by `status` in cluster mode under a daemon Slipway configured.
const KERNEL_BALANCED_NOTE: &str = "cluster mode: zero-downtime reloads, connections balanced by \
     the kernel; the app must close its server on SIGINT and exit within kill_timeout";
/// The cluster scheduling policy every `pm2` call (and so the daemon it may
/// spawn) runs with: see the module doc.
const SCHED_POLICY: (&str, &str) = ("NODE_CLUSTER_SCHED_POLICY", "none");

/// Runs the app under PM2.
#[derive(Debug)]
pub struct Pm2 {
    config: Pm2Config,
    /// Set for one blue/green process set of fork mode behind the front
    /// (`PORT`).
    extra_env: Vec<(String, String)>,
}

/// Shown by `status` for fork mode behind the agent's front.
const FRONT_NOTE: &str = "fork mode behind the agent's proxy (listen): a new release starts as a second process set on the other port of ports, takes new connections once healthy, and the old set is deleted after its connections drained (zero-downtime)";

impl Pm2 {
    pub fn new(config: Pm2Config) -> Self {
        Self {
            config,
            extra_env: Vec::new(),
        }
    }

    /// Fork mode behind the front: the blue/green ports, else `None`.
    fn front_ports(&self) -> Option<[u16; 2]> {
        self.config.ports.filter(|_| !self.config.cluster)
    }

    /// The process set on `port` (fork mode behind the front): PM2 name
    /// `NAME-PORT`, `PORT=port`.
    fn slot(&self, port: u16) -> Pm2 {
        let mut config = self.config.clone();
        config.name = format!("{}-{port}", self.config.name);
        config.ports = None;
        Pm2 {
            config,
            extra_env: vec![("PORT".into(), port.to_string())],
        }
    }

    /// The PM2 names this app's processes may have.
    fn names(&self) -> Vec<String> {
        let mut names = vec![self.config.name.clone()];
        if let Some(ports) = self.front_ports() {
            names.extend(ports.iter().map(|p| format!("{}-{p}", self.config.name)));
        }
        names
    }

    /// Where the port of the process set that serves is recorded.
    fn live_file(root: &Path) -> PathBuf {
        root.join(".slipway/run/pm2-live.json")
    }

    fn live_port(root: &Path) -> Option<u16> {
        crate::durable::read_json::<serde_json::Value>(&Self::live_file(root))
            .and_then(|v| v.get("port").and_then(Value::as_u64))
            .and_then(|p| u16::try_from(p).ok())
    }

    /// Starts `target` as a process set on the port the live set does not
    /// use; the front moves to it once it passed its gate.
    fn front_activate(&self, target: &Target, ports: [u16; 2]) -> Result<Activation, DriverError> {
        let pm2 = Runner::new(&self.config)?;
        let port = match Self::live_port(&target.app.root) {
            Some(l) if l == ports[0] => ports[1],
            _ => ports[0],
        };
        let slot = self.slot(port);
        let stale = slot.processes(&pm2)?;
        if !stale.is_empty() {
            // Left by a deploy that never finished: this set is not live.
            pm2.delete(&stale)?;
        }
        let mut a = slot.run_release(target)?;
        a.port = Some(port);
        a.handle = Some(slot.config.name.clone());
        let _ = write!(
            a.detail,
            "; new process set on port {port}, behind the agent's proxy"
        );
        Ok(a)
    }

    /// The set on `port` serves: record it, delete every other set.
    fn front_commit(&self, root: &Path, port: u16) -> Result<(), DriverError> {
        crate::durable::write_json(&Self::live_file(root), &serde_json::json!({ "port": port }))
            .map_err(|e| {
                DriverError::failed(
                    DRIVER,
                    format!("cannot write {}: {e}", Self::live_file(root).display()),
                )
            })?;
        let pm2 = Runner::new(&self.config)?;
        let keep = self.slot(port).config.name;
        let others: Vec<JlistProcess> = self
            .processes(&pm2)?
            .into_iter()
            .filter(|p| p.name.as_deref() != Some(keep.as_str()))
            .collect();
        pm2.delete(&others)?;
        self.save(&pm2);
        Ok(())
    }

    /// The new set failed its gate: delete it; the live set (which the
    /// front never left) serves on, or is started again if it is gone.
    fn front_restore(
        &self,
        previous: &Target,
        failed: &Activation,
        ports: [u16; 2],
    ) -> Result<Activation, DriverError> {
        let pm2 = Runner::new(&self.config)?;
        if let Some(p) = failed.port {
            let dead = self.slot(p).processes(&pm2)?;
            pm2.delete(&dead)?;
        }
        let live = Self::live_port(&previous.app.root)
            .filter(|p| Some(*p) != failed.port)
            .unwrap_or(ports[0]);
        let slot = self.slot(live);
        let procs = slot.processes(&pm2)?;
        if !procs.is_empty() && procs.iter().all(|p| p.status() == "online") {
            return Ok(Activation {
                port: Some(live),
                handle: Some(slot.config.name.clone()),
                detail: format!("pm2 {} kept on port {live}", slot.config.name),
            });
        }
        let mut a = slot.run_release(previous)?;
        a.port = Some(live);
        a.handle = Some(slot.config.name.clone());
        Ok(a)
    }

    fn exec_mode(&self) -> &'static str {
        if self.config.cluster {
            "cluster"
        } else {
            "fork"
        }
    }

    /// `instances` as PM2 takes it: a count, or "max" (one per core).
    fn instances_value(&self) -> Value {
        match self.config.instances {
            0 => Value::from("max"),
            n => Value::from(n),
        }
    }

    /// Where the process file of this app goes.
    fn process_file(&self, root: &Path) -> PathBuf {
        let safe: String = self
            .config
            .name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        root.join(".slipway/run").join(format!("pm2-{safe}.json"))
    }

    /// Where [`Restarts`] are kept: beside the process file.
    fn restarts_file(&self, root: &Path) -> PathBuf {
        self.process_file(root).with_extension("restarts.json")
    }

    /// The app's processes in `jlist`, or none when no daemon runs.
    fn processes(&self, pm2: &Runner) -> Result<Vec<JlistProcess>, DriverError> {
        if !pm2.daemon_running() {
            return Ok(Vec::new());
        }
        let names = self.names();
        let mut procs: Vec<JlistProcess> = pm2
            .jlist()?
            .into_iter()
            .filter(|p| p.name.as_ref().is_some_and(|n| names.contains(n)))
            .collect();
        procs.sort_by_key(|p| p.pm_id);
        Ok(procs)
    }

    /// Process sets of fork mode behind `listen` (`NAME-PORT`) that the
    /// app's config no longer has (`listen` and `ports` removed): left to
    /// delete once the app runs without them. Another app's processes are
    /// told apart by their working directory, which is under this app's
    /// root.
    fn leftover_sets(&self, pm2: &Runner, root: &Path) -> Result<Vec<JlistProcess>, DriverError> {
        if self.front_ports().is_some() || !pm2.daemon_running() {
            return Ok(Vec::new());
        }
        let prefix = format!("{}-", self.config.name);
        Ok(pm2
            .jlist()?
            .into_iter()
            .filter(|p| {
                p.name
                    .as_deref()
                    .and_then(|n| n.strip_prefix(&prefix))
                    .is_some_and(|port| port.parse::<u16>().is_ok())
                    && p.pm2_env
                        .pm_cwd
                        .as_deref()
                        .is_some_and(|cwd| Path::new(cwd).starts_with(root))
            })
            .collect())
    }

    /// Deletes the [`Pm2::leftover_sets`] and their files.
    fn delete_leftover_sets(&self, pm2: &Runner, root: &Path) -> Result<(), DriverError> {
        let left = self.leftover_sets(pm2, root)?;
        if left.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = left.iter().map(JlistProcess::label).collect();
        pm2.delete(&left)?;
        for p in &left {
            let Some(port) = p
                .name
                .as_deref()
                .and_then(|n| n.rsplit('-').next())
                .and_then(|port| port.parse::<u16>().ok())
            else {
                continue;
            };
            let _ = fs::remove_file(self.slot(port).process_file(root));
        }
        let _ = fs::remove_file(Self::live_file(root));
        tracing::info!(app = %self.config.name, sets = ?names, "deleted the process sets of fork mode behind listen, which the app no longer has");
        Ok(())
    }

    /// `pm2 save`, so PM2's dump (what `pm2 resurrect` starts at boot)
    /// matches what runs. A failed save only warns: it must not fail a good
    /// deploy or a stop.
    fn save(&self, pm2: &Runner) {
        if !pm2.daemon_running() {
            return;
        }
        // --force: save an empty list too, after the last app was stopped.
        if let Err(e) = pm2.run(&["save".as_ref(), "--force".as_ref()], QUERY_TIMEOUT) {
            tracing::warn!(app = %self.config.name, "pm2 save failed: {e}");
        }
    }

    /// Runs the release of `target` (start, reload, or restart when a reload
    /// cannot apply the change) and waits until every instance is online.
    fn run_release(&self, target: &Target) -> Result<Activation, DriverError> {
        let pm2 = Runner::new(&self.config)?;
        let name = &self.config.name;
        let app = self.app_entry(target, &pm2)?;
        check_script(target, &app, &pm2)?;
        let file = self.process_file(&target.app.root);
        let dropped = dropped_env(&file, &app);
        write_process_file(&file, &app, pm2.owner)?;

        let running = self.processes(&pm2)?;
        let restarts_file = self.restarts_file(&target.app.root);
        let mut restarts = Restarts::load(&restarts_file);
        restarts.before_reload(&running);
        let mut action = if running.is_empty() {
            "start"
        } else {
            "reload"
        };
        let mut why = None;
        if let Some(reason) = self.needs_restart(target, &app, &running) {
            // A reload keeps the old script path, cwd and exec mode: only a
            // fresh start applies them.
            tracing::info!(app = %name, %reason, "pm2 cannot reload this change; restarting");
            pm2.delete(&running)?;
            action = "restart";
            why = Some(reason);
        } else if !running.is_empty() && !dropped.is_empty() {
            // `--update-env` merges: only a fresh start drops a variable.
            let reason = format!(
                "variables removed from the environment ({}): a pm2 reload would keep them",
                dropped.join(", ")
            );
            tracing::info!(app = %name, "{reason}; restarting");
            pm2.delete(&running)?;
            action = "restart";
            why = Some(reason);
        }

        let file_arg = file.as_os_str();
        pm2.run(
            &[
                OsStr::new("startOrReload"),
                file_arg,
                OsStr::new("--update-env"),
            ],
            RELOAD_TIMEOUT,
        )?;

        if action == "reload" && self.config.instances > 0 {
            let count = self.processes(&pm2)?.len();
            if count != self.config.instances as usize {
                let n = self.config.instances.to_string();
                pm2.run(
                    &["scale".as_ref(), name.as_ref(), n.as_ref()],
                    QUERY_TIMEOUT,
                )?;
            }
        }

        let online = self.wait_online(&pm2)?;
        // PM2 counts this reload as a restart of every instance: what the
        // agent did is remembered, so status tells it from a crash.
        match self.processes(&pm2) {
            Ok(now) => restarts.after_reload(&now),
            Err(e) => tracing::warn!(app = %name, "pm2 restart counts not read: {e}"),
        }
        restarts.save(&restarts_file, pm2.owner);
        let mode = self.exec_mode();
        let mut detail = format!(
            "pm2 {action} {name} ({mode}, {online} instance{})",
            if online == 1 { "" } else { "s" }
        );
        if let Some(why) = why {
            let _ = write!(detail, ": {why}");
        } else if action == "reload" && !self.config.cluster {
            detail.push_str("; fork mode: a restart, not zero-downtime");
        }
        if self.config.cluster && pm2.balancing() == Balancing::RoundRobin {
            detail
                .push_str("; the pm2 daemon balances round-robin: a reload can hang a connection");
        }
        Ok(Activation {
            port: None,
            handle: None,
            detail,
        })
    }

    /// The PM2 app entry for `target`: from the ecosystem file when there is
    /// one, else from `script`; with cwd, name, mode and env set by Slipway.
    fn app_entry(&self, target: &Target, pm2: &Runner) -> Result<Map<String, Value>, DriverError> {
        let release = &target.release_dir;
        let ecosystem = match (&self.config.ecosystem, &self.config.script) {
            (Some(e), _) => Some(release.join(e)),
            (None, Some(_)) => None,
            (None, None) => DEFAULT_ECOSYSTEMS
                .iter()
                .map(|f| release.join(f))
                .find(|p| p.is_file()),
        };
        let mut app = match (&ecosystem, &self.config.script) {
            (Some(path), _) => self.ecosystem_app(target, path, pm2)?,
            (None, Some(script)) => {
                let mut app = Map::new();
                app.insert("script".into(), Value::from(path_str(script)?));
                app
            }
            (None, None) => {
                return Err(DriverError::failed(
                    DRIVER,
                    format!(
                        "no script to run in {}: set run.script or run.ecosystem, or ship ecosystem.config.js",
                        release.display()
                    ),
                ))
            }
        };

        // Environment: the ecosystem's, then shared/.env, then Slipway's own
        // (later wins, as when PM2 merges an env block over the shell's).
        let mut env = Map::new();
        if let Some(Value::Object(eco_env)) = app.remove("env") {
            for (k, v) in eco_env {
                let v = match v {
                    Value::String(s) => s,
                    Value::Null => continue,
                    // PM2 stringifies non-string values the same way.
                    other => other.to_string(),
                };
                env.insert(k, Value::from(v));
            }
        }
        for (k, v) in target
            .env
            .iter()
            .chain(target.slipway_env().iter())
            .chain(self.extra_env.iter())
        {
            env.insert(k.clone(), Value::from(v.as_str()));
        }

        app.insert("name".into(), Value::from(self.config.name.as_str()));
        app.insert("cwd".into(), Value::from(path_str(&target.current)?));
        app.insert("instances".into(), self.instances_value());
        app.insert("exec_mode".into(), Value::from(self.exec_mode()));
        app.insert("env".into(), Value::Object(env));
        // The agent owns the app's logs (rotation, retention): one out and
        // one error file for all instances, in the app's shared logs dir.
        let [out, err] = self.log_files(&target.app.root);
        if let Some(dir) = out.parent() {
            fs::create_dir_all(dir).map_err(|e| {
                DriverError::failed(DRIVER, format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        app.insert("out_file".into(), Value::from(path_str(&out)?));
        app.insert("error_file".into(), Value::from(path_str(&err)?));
        app.insert("merge_logs".into(), Value::from(true));
        Ok(app)
    }

    /// The app's stdout and stderr log files.
    pub fn log_files(&self, root: &Path) -> [PathBuf; 2] {
        let dir = root.join("shared/logs");
        [
            dir.join(format!("pm2-{}-out.log", self.config.name)),
            dir.join(format!("pm2-{}-error.log", self.config.name)),
        ]
    }

    /// Has PM2 reopen its log files (after a rotation renamed them).
    pub fn reload_logs(&self) -> Result<(), DriverError> {
        let pm2 = Runner::new(&self.config)?;
        if !pm2.daemon_running() {
            return Ok(());
        }
        pm2.run(&[OsStr::new("reloadLogs")], QUERY_TIMEOUT)
            .map(|_| ())
    }

    /// Loads the entry for this app from an ecosystem file with node.
    fn ecosystem_app(
        &self,
        target: &Target,
        path: &Path,
        pm2: &Runner,
    ) -> Result<Map<String, Value>, DriverError> {
        if !path.is_file() {
            return Err(DriverError::failed(
                DRIVER,
                format!("ecosystem file {} does not exist", path.display()),
            ));
        }
        // The ecosystem file is the app's code: it runs as the app's user,
        // from `current` like `pm2 reload ecosystem.config.js` would, and
        // sees the app's environment (files often read `process.env`).
        let mut cmd = pm2.base_command(OsStr::new("node"));
        cmd.current_dir(&target.current)
            .envs(target.env.iter().cloned())
            .envs(target.slipway_env())
            .args(["-e", ECOSYSTEM_LOADER])
            .arg(path);
        let what = format!("node (loading {})", path.display());
        let out = run_bounded(cmd, &what, ECOSYSTEM_TIMEOUT)?;
        if !out.status.success() {
            return Err(DriverError::failed(
                DRIVER,
                format!(
                    "cannot load ecosystem file {} ({}): {}",
                    path.display(),
                    out.status,
                    out.tail()
                ),
            ));
        }
        // The value holds the ecosystem's env: parse errors carry only the
        // position, never the text.
        let value: Value = serde_json::from_slice(&out.stdout).map_err(|e| {
            DriverError::failed(
                DRIVER,
                format!(
                    "ecosystem file {} did not evaluate to JSON (line {}, column {})",
                    path.display(),
                    e.line(),
                    e.column()
                ),
            )
        })?;
        let apps = match value {
            Value::Object(mut o) if o.contains_key("apps") => o.remove("apps").unwrap_or_default(),
            other => other,
        };
        let apps: Vec<Value> = match apps {
            Value::Array(a) => a,
            obj @ Value::Object(_) => vec![obj],
            _ => Vec::new(),
        };
        let mut apps: Vec<Map<String, Value>> = apps
            .into_iter()
            .filter_map(|a| match a {
                Value::Object(o) => Some(o),
                _ => None,
            })
            .collect();
        let index = apps
            .iter()
            .position(|a| a.get("name").and_then(Value::as_str) == Some(&self.config.name))
            .unwrap_or(0);
        if index >= apps.len() {
            return Err(DriverError::failed(
                DRIVER,
                format!("ecosystem file {} declares no apps", path.display()),
            ));
        }
        let mut app = apps.swap_remove(index);

        let script = match app.get("script").or_else(|| app.get("cmd")) {
            Some(Value::String(s)) => PathBuf::from(s),
            _ => {
                return Err(DriverError::failed(
                    DRIVER,
                    format!("the app in ecosystem file {} has no script", path.display()),
                ))
            }
        };
        app.remove("cmd");
        // `script: path.join(__dirname, 'server.js')` names the resolved
        // release dir (require resolves the link); PM2 would keep running that
        // release after every later reload. Make it relative to `cwd`.
        if let Some(rel) = strip_release_prefix(&script, &target.release_dir) {
            app.insert("script".into(), Value::from(path_str(&rel)?));
        } else {
            app.insert("script".into(), Value::from(path_str(&script)?));
        }

        for (key, ours) in [
            ("instances", self.instances_value()),
            ("exec_mode", Value::from(self.exec_mode())),
        ] {
            if let Some(theirs) = app.get(key) {
                let same = theirs == &ours
                    || theirs.as_str().map(|s| s.trim_end_matches("_mode")) == ours.as_str();
                if !same {
                    tracing::warn!(
                        app = %self.config.name,
                        ecosystem = %path.display(),
                        "the ecosystem file sets {key} {theirs}; agent.toml's run settings ({ours}) win"
                    );
                }
            }
        }
        Ok(app)
    }

    /// Why the running processes cannot simply be reloaded into `app`, if so.
    fn needs_restart(
        &self,
        target: &Target,
        app: &Map<String, Value>,
        running: &[JlistProcess],
    ) -> Option<String> {
        let want_mode = format!("{}_mode", self.exec_mode());
        let want_cwd = target.current.to_string_lossy().into_owned();
        let script = app
            .get("script")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let want_exec = lexical_join(&target.current, Path::new(script));
        // PM2 looks a script that is not a file up on PATH (`script: "npm"`);
        // only a script inside the release can be compared.
        let comparable_exec = target.release_dir.join(script).is_file();
        for p in running {
            let env = &p.pm2_env;
            if let Some(mode) = &env.exec_mode {
                if *mode != want_mode {
                    return Some(format!("exec mode was {mode}, now {want_mode}"));
                }
            }
            if let Some(cwd) = &env.pm_cwd {
                if *cwd != want_cwd {
                    return Some(format!("pm2 ran it from {cwd}, now {want_cwd}"));
                }
            }
            if let Some(exec) = &env.pm_exec_path {
                if comparable_exec && Path::new(exec) != want_exec {
                    return Some(format!("pm2 ran {exec}, now {}", want_exec.display()));
                }
            }
        }
        None
    }

    /// Polls `jlist` until every instance is online with unchanged pids for
    /// [`STABLE_FOR`]; returns the number of instances.
    fn wait_online(&self, pm2: &Runner) -> Result<usize, DriverError> {
        let name = &self.config.name;
        let deadline = Instant::now() + ONLINE_TIMEOUT;
        let mut stable: Option<(Vec<Option<u64>>, Instant)> = None;
        loop {
            let procs = self.processes(pm2)?;
            let count_ok = match self.config.instances {
                0 => !procs.is_empty(),
                n => procs.len() == n as usize,
            };
            let all_online = procs.iter().all(|p| p.status() == "online");
            if let Some(bad) = procs.iter().find(|p| p.status() == "errored") {
                return Err(DriverError::failed(
                    DRIVER,
                    format!(
                        "{} is errored after {} restarts (pm2 gave up); see `pm2 logs {name}` \
                         with PM2_HOME={}",
                        bad.label(),
                        bad.pm2_env.restart_time.unwrap_or(0),
                        pm2.pm2_home.display()
                    ),
                ));
            }
            if count_ok && all_online {
                let pids: Vec<Option<u64>> = procs.iter().map(|p| p.pid).collect();
                match &stable {
                    Some((seen, since)) if *seen == pids => {
                        if since.elapsed() >= STABLE_FOR {
                            return Ok(procs.len());
                        }
                    }
                    _ => stable = Some((pids, Instant::now())),
                }
            } else {
                stable = None;
            }
            if Instant::now() >= deadline {
                let seen = if procs.is_empty() {
                    "no process".to_owned()
                } else {
                    procs
                        .iter()
                        .map(|p| format!("{} {}", p.label(), p.status()))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let want = match self.config.instances {
                    0 => "every instance".to_owned(),
                    n => format!("{n} instance{}", if n == 1 { "" } else { "s" }),
                };
                return Err(DriverError::failed(
                    DRIVER,
                    format!(
                        "{name} did not have {want} online within {}s; pm2 shows {seen}",
                        ONLINE_TIMEOUT.as_secs()
                    ),
                ));
            }
            thread::sleep(ONLINE_POLL);
        }
    }
}

impl Driver for Pm2 {
    fn name(&self) -> &'static str {
        DRIVER
    }

    fn activate(&self, target: &Target) -> Result<Activation, DriverError> {
        match self.front_ports() {
            Some(ports) => self.front_activate(target, ports),
            None => self.run_release(target),
        }
    }

    fn commit(&self, target: &Target, activation: &Activation) -> Result<(), DriverError> {
        if let (Some(_), Some(port)) = (self.front_ports(), activation.port) {
            return self.front_commit(&target.app.root, port);
        }
        // The reload replaced the old processes already; all that is left is
        // PM2's dump, so `pm2 resurrect` at boot starts this release's env
        // (and, after `listen` was removed, the process sets it had).
        match Runner::new(&self.config) {
            Ok(pm2) => {
                let left = self.delete_leftover_sets(&pm2, &target.app.root);
                self.save(&pm2);
                left?;
            }
            Err(e) => tracing::warn!(app = %self.config.name, "pm2 save skipped: {e}"),
        }
        Ok(())
    }

    fn restore(&self, previous: &Target, failed: &Activation) -> Result<Activation, DriverError> {
        if let Some(ports) = self.front_ports() {
            return self.front_restore(previous, failed, ports);
        }
        // `current` points at `previous` again and the processes run from
        // `current`: reloading brings the previous release back, and there is
        // nothing of the failed one to drop beyond what the reload replaces.
        let activation = self.run_release(previous)?;
        self.commit(previous, &activation)?;
        Ok(activation)
    }

    fn stop(&self, app: &AppConfig) -> Result<(), DriverError> {
        let pm2 = Runner::new(&self.config)?;
        let mut running = self.processes(&pm2)?;
        running.extend(self.leftover_sets(&pm2, &app.root)?);
        if !running.is_empty() {
            pm2.delete(&running)?;
            // Or `pm2 resurrect` at boot would start it again.
            self.save(&pm2);
        }
        // The process files hold `.env` values and are useless once stopped.
        if let Some(ports) = self.front_ports() {
            for p in ports {
                let _ = fs::remove_file(self.slot(p).process_file(&app.root));
            }
            let _ = fs::remove_file(Self::live_file(&app.root));
        }
        match fs::remove_file(self.process_file(&app.root)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(DriverError::failed(
                DRIVER,
                format!(
                    "cannot remove {}: {e}",
                    self.process_file(&app.root).display()
                ),
            )),
        }
    }

    fn drift(&self, target: &Target, _port: Option<u16>) -> Result<Option<String>, DriverError> {
        let pm2 = Runner::new(&self.config)?;
        if !pm2.daemon_running() {
            return Ok(Some(format!(
                "the PM2 daemon is not running (PM2_HOME {}): a reboot or `pm2 kill`",
                pm2.pm2_home.display()
            )));
        }
        let status = self.status(&target.app)?;
        let name = &self.config.name;
        if status.processes.is_empty() {
            return Ok(Some(format!(
                "PM2 has no process named {name:?} (`pm2 delete`?)"
            )));
        }
        let want = target.release.as_str();
        // PM2 restarting a crashed instance by itself is not drift; one it
        // gave up on (errored) or that was stopped is.
        let bad: Vec<String> = status
            .processes
            .iter()
            .filter(|p| {
                !matches!(
                    p.status.as_str(),
                    "online" | "launching" | "waiting restart"
                )
            })
            .map(|p| format!("{} is {}", p.name, p.status))
            .collect();
        if !bad.is_empty() {
            return Ok(Some(format!("PM2: {}", bad.join(", "))));
        }
        let elsewhere: Vec<String> = status
            .processes
            .iter()
            .filter(|p| p.status == "online" && p.release.as_deref().is_some_and(|r| r != want))
            .map(|p| {
                format!(
                    "{} runs release {}",
                    p.name,
                    p.release.as_deref().unwrap_or("?")
                )
            })
            .collect();
        if !elsewhere.is_empty() {
            return Ok(Some(format!("PM2: {}, not {want}", elsewhere.join(", "))));
        }
        Ok(None)
    }

    fn status(&self, app: &AppConfig) -> Result<DriverStatus, DriverError> {
        let pm2 = Runner::new(&self.config)?;
        let mut notes = Vec::new();
        if !pm2.daemon_running() {
            notes.push(format!(
                "pm2 daemon is not running (PM2_HOME {})",
                pm2.pm2_home.display()
            ));
        }
        let procs = self.processes(&pm2)?;
        let fork = !self.config.cluster
            || procs
                .iter()
                .any(|p| p.pm2_env.exec_mode.as_deref() == Some("fork_mode"));
        if self.front_ports().is_some() {
            notes.push(FRONT_NOTE.to_owned());
        } else if fork {
            notes.push(FORK_NOTE.to_owned());
        } else {
            match pm2.balancing() {
                Balancing::Kernel => notes.push(KERNEL_BALANCED_NOTE.to_owned()),
                Balancing::RoundRobin => notes.push(ROUND_ROBIN_NOTE.to_owned()),
                Balancing::Unknown => {}
            }
        }
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let releases = app.root.join("releases");
        let releases_real = fs::canonicalize(&releases).unwrap_or(releases);
        let restarts = Restarts::load(&self.restarts_file(&app.root));
        let processes = procs
            .iter()
            .map(|p| {
                let online = p.status() == "online";
                let pid = p
                    .pid
                    .filter(|&pid| pid > 0)
                    .and_then(|pid| u32::try_from(pid).ok());
                ProcessInfo {
                    name: p.label(),
                    pid,
                    status: p.status().to_owned(),
                    restarts: restarts.crashes(p),
                    reloads: restarts.reloads(p),
                    memory_bytes: p.monit.memory,
                    cpu_percent: p.monit.cpu,
                    uptime_secs: p
                        .pm2_env
                        .pm_uptime
                        .filter(|_| online)
                        .map(|t| now_ms.saturating_sub(t) / 1000),
                    release: pid
                        .and_then(|pid| release_of_pid(pid, &releases_real))
                        .or_else(|| p.pm2_env.env.release.clone()),
                }
            })
            .collect();
        Ok(DriverStatus {
            driver: DRIVER.to_owned(),
            processes,
            notes,
        })
    }
}

/// Fails unless the script is in the release or a command on PATH. PM2
/// checks only on a start: a reload keeps running the old path, so a
/// release that lacks its script would look like a good deploy.
fn check_script(
    target: &Target,
    app: &Map<String, Value>,
    pm2: &Runner,
) -> Result<(), DriverError> {
    let script = app
        .get("script")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let path = Path::new(script);
    let in_release = target.release_dir.join(path).exists();
    let on_path = path.components().count() == 1 && find_executable(path, &pm2.path).is_some();
    if in_release || on_path {
        return Ok(());
    }
    Err(DriverError::failed(
        DRIVER,
        format!(
            "script {script:?} is neither in release {} nor a command on PATH",
            target.release_dir.display()
        ),
    ))
}

/// The release a process runs: the kernel resolved `current` when the
/// process `chdir`ed into it, so its cwd names the release it really runs.
fn release_of_pid(pid: u32, releases: &Path) -> Option<String> {
    let cwd = fs::read_link(format!("/proc/{pid}/cwd")).ok()?;
    if cwd.parent()? != releases {
        return None;
    }
    cwd.file_name()?.to_str().map(str::to_owned)
}

/// `script` relative to `release`, when it is an absolute path inside it.
fn strip_release_prefix(script: &Path, release: &Path) -> Option<PathBuf> {
    if !script.is_absolute() {
        return None;
    }
    if let Ok(rel) = script.strip_prefix(release) {
        return Some(rel.to_owned());
    }
    let real = fs::canonicalize(release).ok()?;
    script.strip_prefix(real).ok().map(Path::to_owned)
}

/// `base/path` normalised without touching the file system, as node's
/// `path.resolve` does (PM2 computes `pm_exec_path` that way).
fn lexical_join(base: &Path, path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in base.join(path).components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

fn path_str(path: &Path) -> Result<&str, DriverError> {
    path.to_str()
        .ok_or_else(|| DriverError::failed(DRIVER, format!("path {path:?} is not valid UTF-8")))
}

/// The variables the last process file set that this one does not: a PM2
/// reload would keep them (names only; values are never read out).
fn dropped_env(file: &Path, app: &Map<String, Value>) -> Vec<String> {
    #[derive(Deserialize)]
    struct Keys {
        apps: Vec<AppKeys>,
    }
    #[derive(Deserialize)]
    struct AppKeys {
        #[serde(default)]
        env: std::collections::BTreeMap<String, IgnoredAny>,
    }
    let Ok(text) = fs::read(file) else {
        return Vec::new();
    };
    let Ok(old) = serde_json::from_slice::<Keys>(&text) else {
        return Vec::new();
    };
    let new: BTreeSet<&str> = match app.get("env") {
        Some(Value::Object(env)) => env.keys().map(String::as_str).collect(),
        _ => BTreeSet::new(),
    };
    let mut dropped: Vec<String> = old
        .apps
        .iter()
        .flat_map(|a| a.env.keys())
        .filter(|k| !new.contains(k.as_str()))
        .cloned()
        .collect();
    dropped.sort();
    dropped.dedup();
    dropped
}

/// Writes the process file atomically, readable only by whoever runs pm2.
fn write_process_file(
    path: &Path,
    app: &Map<String, Value>,
    owner: Option<(u32, u32)>,
) -> Result<(), DriverError> {
    let io_err = |action: &str, p: &Path, e: io::Error| {
        DriverError::failed(DRIVER, format!("cannot {action} {}: {e}", p.display()))
    };
    let doc = serde_json::json!({ "apps": [app] });
    let data = serde_json::to_vec_pretty(&doc)
        .map_err(|e| DriverError::failed(DRIVER, format!("cannot encode the process file: {e}")))?;
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|e| io_err("create", dir, e))?;
    }
    // Like durable::write_atomic, but created 0600 (it holds `.env` values)
    // and owned by the pm2 user, who must read it.
    let tmp = durable::temp_sibling(path, "tmp");
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
        }
        f.write_all(&data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        durable::fsync_parent(path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(io_err("write", path, e));
    }
    Ok(())
}

/// How a PM2 daemon hands cluster connections to workers (module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Balancing {
    /// `NODE_CLUSTER_SCHED_POLICY=none`: workers accept themselves.
    Kernel,
    /// Node's default on Linux: the master accepts and hands over.
    RoundRobin,
    Unknown,
}

/// The balancing of a daemon whose environment (NUL-separated
/// `NAME=value` entries, as `/proc/PID/environ`) is `environ`.
fn balancing_of(environ: &[u8]) -> Balancing {
    let key = format!("{}=", SCHED_POLICY.0);
    let value = environ
        .split(|&b| b == 0)
        .find_map(|kv| kv.strip_prefix(key.as_bytes()));
    match value {
        Some(v) if v == SCHED_POLICY.1.as_bytes() => Balancing::Kernel,
        // Node's own parsing: only "none" and "rr" mean anything; the rest
        // (and no variable at all) is the platform default, round-robin.
        _ => Balancing::RoundRobin,
    }
}

/// How pm2 is run for this app: which binary, as whom, with which PM2_HOME.
#[derive(Debug)]
struct Runner {
    bin: PathBuf,
    /// uid and gid to switch to, when `user` is set.
    owner: Option<(u32, u32)>,
    user: Option<String>,
    home: PathBuf,
    pm2_home: PathBuf,
    path: OsString,
}

impl Runner {
    fn new(config: &Pm2Config) -> Result<Self, DriverError> {
        let path = std::env::var_os("PATH")
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| DEFAULT_PATH.into());
        let bin = find_executable(&config.pm2_bin, &path).ok_or_else(|| {
            DriverError::failed(
                DRIVER,
                format!(
                    "pm2 not found (looked for {}); install it with `npm install -g pm2`",
                    config.pm2_bin.display()
                ),
            )
        })?;
        let (owner, user, home) = match &config.user {
            Some(name) => {
                let u = nix::unistd::User::from_name(name)
                    .map_err(|e| {
                        DriverError::failed(DRIVER, format!("cannot look up user {name:?}: {e}"))
                    })?
                    .ok_or_else(|| {
                        DriverError::failed(DRIVER, format!("user {name:?} does not exist"))
                    })?;
                (Some((u.uid.as_raw(), u.gid.as_raw())), Some(u.name), u.dir)
            }
            None => {
                let me = nix::unistd::User::from_uid(nix::unistd::geteuid())
                    .ok()
                    .flatten();
                let home = me
                    .as_ref()
                    .map(|u| u.dir.clone())
                    .or_else(|| std::env::var_os("HOME").map(PathBuf::from))
                    .unwrap_or_else(|| PathBuf::from("/"));
                (None, me.map(|u| u.name), home)
            }
        };
        let pm2_home = config.pm2_home.clone().unwrap_or_else(|| home.join(".pm2"));
        Ok(Self {
            bin,
            owner,
            user,
            home,
            pm2_home,
            path,
        })
    }

    /// `program` with a cleared environment, as the pm2 user. The `pm2` CLI
    /// copies its environment into the app's: the agent's must not leak.
    fn base_command(&self, program: &OsStr) -> Command {
        let mut cmd = Command::new(program);
        cmd.env_clear()
            .env("PATH", &self.path)
            .env("HOME", &self.home)
            .env("PM2_HOME", &self.pm2_home)
            .env(SCHED_POLICY.0, SCHED_POLICY.1)
            // The daemon a pm2 command spawns inherits this directory; `/`
            // never disappears (a release dir is pruned one day).
            .current_dir("/");
        if let Some(user) = &self.user {
            cmd.env("USER", user).env("LOGNAME", user);
        }
        if let Some((uid, gid)) = self.owner {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    /// Whether a daemon answers for this PM2_HOME (its pid file names a live
    /// process), so read-only calls need not spawn one.
    fn daemon_running(&self) -> bool {
        self.daemon_pid().is_some()
    }

    /// The pid of the live daemon of this PM2_HOME, if one runs.
    fn daemon_pid(&self) -> Option<i32> {
        let text = fs::read_to_string(self.pm2_home.join("pm2.pid")).ok()?;
        let pid = text.trim().parse::<i32>().ok().filter(|&p| p > 0)?;
        match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
            Ok(()) => Some(pid),
            // Alive, owned by another user.
            Err(nix::errno::Errno::EPERM) => Some(pid),
            Err(_) => None,
        }
    }

    /// How the running daemon balances cluster connections: read from its
    /// environment (`/proc/PID/environ`), where the policy it started with
    /// is. Unknown when no daemon runs or its environment cannot be read.
    fn balancing(&self) -> Balancing {
        let Some(pid) = self.daemon_pid() else {
            return Balancing::Unknown;
        };
        match fs::read(format!("/proc/{pid}/environ")) {
            Ok(env) => balancing_of(&env),
            Err(_) => Balancing::Unknown,
        }
    }

    /// Runs `pm2 ARGS`, failing with the tail of its output.
    fn run(&self, args: &[&OsStr], timeout: Duration) -> Result<Captured, DriverError> {
        let mut cmd = self.base_command(self.bin.as_os_str());
        cmd.args(args);
        let what = self.describe(args);
        let out = run_bounded(cmd, &what, timeout)?;
        if !out.status.success() {
            return Err(DriverError::failed(
                DRIVER,
                format!("`{what}` failed ({}): {}", out.status, out.tail()),
            ));
        }
        Ok(out)
    }

    fn describe(&self, args: &[&OsStr]) -> String {
        let mut what = self.bin.display().to_string();
        for a in args {
            what.push(' ');
            what.push_str(&a.to_string_lossy());
        }
        if let (Some(user), Some(_)) = (&self.user, self.owner) {
            let _ = write!(what, " (as {user})");
        }
        what
    }

    /// Every process PM2 manages, with only the fields Slipway shows.
    fn jlist(&self) -> Result<Vec<JlistProcess>, DriverError> {
        let out = self.run(&["jlist".as_ref()], QUERY_TIMEOUT)?;
        parse_jlist(&out.stdout)
    }

    /// Deletes `procs` by PM2 id: a name could also match a namespace, or be
    /// `all`.
    fn delete(&self, procs: &[JlistProcess]) -> Result<(), DriverError> {
        let ids: Vec<String> = procs
            .iter()
            .filter_map(|p| p.pm_id)
            .map(|id| id.to_string())
            .collect();
        if ids.is_empty() {
            return Ok(());
        }
        let mut args: Vec<&OsStr> = vec!["delete".as_ref()];
        args.extend(ids.iter().map(|s| OsStr::new(s.as_str())));
        self.run(&args, QUERY_TIMEOUT).map(drop)
    }
}

/// `name` itself if it has a directory part, else the first executable of
/// that name in the `PATH`-style list `path`.
pub(crate) fn find_executable(name: &Path, path: &OsStr) -> Option<PathBuf> {
    let is_exec = |p: &Path| fs::metadata(p).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0);
    if name.components().count() > 1 || name.is_absolute() {
        return is_exec(name).then(|| name.to_owned());
    }
    std::env::split_paths(path)
        .map(|dir| dir.join(name))
        .find(|p| is_exec(p))
}

/// The `jlist` JSON. PM2 may print a notice (daemon spawned, version
/// mismatch) before it, so a line that is the JSON array is looked for too.
fn parse_jlist(stdout: &[u8]) -> Result<Vec<JlistProcess>, DriverError> {
    // Parse errors carry only the position: the text holds env values.
    let whole = serde_json::from_slice::<Vec<JlistProcess>>(stdout);
    let first_err = match whole {
        Ok(v) => return Ok(v),
        Err(e) => e,
    };
    for line in stdout.split(|&b| b == b'\n').rev() {
        if line.first() == Some(&b'[') {
            if let Ok(v) = serde_json::from_slice::<Vec<JlistProcess>>(line) {
                return Ok(v);
            }
        }
    }
    Err(DriverError::failed(
        DRIVER,
        format!(
            "cannot parse `pm2 jlist` output ({} bytes): {:?} error at line {}, column {}",
            stdout.len(),
            first_err.classify(),
            first_err.line(),
            first_err.column()
        ),
    ))
}

/// One process of `pm2 jlist`: only what `status` shows. Everything else,
/// the environment above all, is skipped by serde and never kept.
#[derive(Debug, Deserialize)]
struct JlistProcess {
    #[serde(default, deserialize_with = "lenient_u64")]
    pid: Option<u64>,
    #[serde(default, deserialize_with = "lenient_string")]
    name: Option<String>,
    /// A number, except for the stand-in of a worker being replaced.
    #[serde(default, deserialize_with = "lenient_u64")]
    pm_id: Option<u64>,
    #[serde(default)]
    monit: Monit,
    #[serde(default)]
    pm2_env: Pm2Env,
}

impl JlistProcess {
    fn status(&self) -> &str {
        self.pm2_env.status.as_deref().unwrap_or("unknown")
    }

    /// `name#id`: the id is what `pm2 logs ID` takes.
    fn label(&self) -> String {
        let name = self.name.as_deref().unwrap_or("?");
        match self.pm_id {
            Some(id) => format!("{name}#{id}"),
            None => name.to_owned(),
        }
    }
}

/// PM2's `restart_time` counts every restart of a process: the agent's
/// reloads (one per instance per deploy) as well as PM2 restarting it after
/// a crash. This keeps, per PM2 process id, the count right after the
/// agent's last start or reload and the crash restarts seen before it, so
/// `status` shows crash restarts and reloads apart. A process the agent has
/// no record of has all its restarts counted as crashes: a crash is never
/// hidden.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Restarts {
    /// `restart_time` right after the agent's last start or reload.
    baseline: BTreeMap<u64, u64>,
    /// Crash restarts counted before that.
    crashes: BTreeMap<u64, u64>,
}

impl Restarts {
    fn load(file: &Path) -> Self {
        fs::read(file)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    fn save(&self, file: &Path, owner: Option<(u32, u32)>) {
        let saved = serde_json::to_vec(self)
            .map_err(io::Error::other)
            .and_then(|json| durable::write_atomic(file, &json));
        if let Err(e) = saved {
            tracing::warn!("cannot keep pm2 restart counts in {}: {e}", file.display());
            return;
        }
        if let Some((uid, gid)) = owner {
            let _ = std::os::unix::fs::chown(file, Some(uid), Some(gid));
        }
    }

    /// Crash restarts of `p`: those counted before the agent's last reload
    /// and those since.
    fn crashes(&self, p: &JlistProcess) -> u64 {
        let now = p.pm2_env.restart_time.unwrap_or(0);
        let Some(id) = p.pm_id else { return now };
        let since = now.saturating_sub(self.baseline.get(&id).copied().unwrap_or(0));
        self.crashes.get(&id).copied().unwrap_or(0) + since
    }

    /// Restarts of `p` the agent made (reloads).
    fn reloads(&self, p: &JlistProcess) -> u64 {
        p.pm2_env
            .restart_time
            .unwrap_or(0)
            .saturating_sub(self.crashes(p))
    }

    /// Before a reload: crash restarts since the last one are counted.
    fn before_reload(&mut self, running: &[JlistProcess]) {
        let crashes = running
            .iter()
            .filter_map(|p| Some((p.pm_id?, self.crashes(p))))
            .collect();
        self.crashes = crashes;
    }

    /// After a start or reload: `restart_time` now is the new baseline;
    /// processes that are gone (a fresh start) are forgotten.
    fn after_reload(&mut self, now: &[JlistProcess]) {
        self.baseline = now
            .iter()
            .filter_map(|p| Some((p.pm_id?, p.pm2_env.restart_time.unwrap_or(0))))
            .collect();
        let live: BTreeSet<u64> = self.baseline.keys().copied().collect();
        self.crashes.retain(|id, _| live.contains(id));
    }
}

#[derive(Debug, Default, Deserialize)]
struct Monit {
    #[serde(default, deserialize_with = "lenient_u64")]
    memory: Option<u64>,
    #[serde(default, deserialize_with = "lenient_f64")]
    cpu: Option<f64>,
}

/// The few `pm2_env` fields Slipway reads. PM2 also copies every env var
/// into `pm2_env` itself; those are not fields here, so they are skipped.
#[derive(Debug, Default, Deserialize)]
struct Pm2Env {
    #[serde(default, deserialize_with = "lenient_string")]
    status: Option<String>,
    #[serde(default, deserialize_with = "lenient_u64")]
    restart_time: Option<u64>,
    /// Start of the current run, ms since the epoch.
    #[serde(default, deserialize_with = "lenient_u64")]
    pm_uptime: Option<u64>,
    /// `cluster_mode` or `fork_mode`.
    #[serde(default, deserialize_with = "lenient_string")]
    exec_mode: Option<String>,
    #[serde(default, deserialize_with = "lenient_string")]
    pm_cwd: Option<String>,
    #[serde(default, deserialize_with = "lenient_string")]
    pm_exec_path: Option<String>,
    #[serde(default)]
    env: ReleaseEnv,
}

/// Of the app's environment, only the variable Slipway set itself.
#[derive(Debug, Default, Deserialize)]
struct ReleaseEnv {
    #[serde(
        rename = "SLIPWAY_RELEASE",
        default,
        deserialize_with = "lenient_string"
    )]
    release: Option<String>,
}

/// A JSON value read leniently: a field of an unexpected type becomes
/// `None` rather than an error that would quote the value.
#[derive(Deserialize)]
#[serde(untagged)]
enum Lenient {
    U(u64),
    F(f64),
    S(String),
    Other(IgnoredAny),
}

fn lenient_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Ok(match Lenient::deserialize(d)? {
        Lenient::U(n) => Some(n),
        Lenient::F(f) if f.is_finite() && f >= 0.0 => Some(f as u64),
        _ => None,
    })
}

fn lenient_f64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    Ok(match Lenient::deserialize(d)? {
        Lenient::U(n) => Some(n as f64),
        Lenient::F(f) => Some(f),
        _ => None,
    })
}

fn lenient_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Lenient::deserialize(d)? {
        Lenient::S(s) => Some(s),
        _ => None,
    })
}

/// A finished command's exit status and output.
#[derive(Debug)]
struct Captured {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl Captured {
    /// The last lines of output for an error: colours and PM2's process
    /// table stripped.
    fn tail(&self) -> String {
        // PM2 prints its errors to stderr and its banner and table to stdout:
        // stderr, when there is any, is the part that says what went wrong.
        let pick = |bytes: &[u8]| {
            let text = strip_ansi(&String::from_utf8_lossy(bytes));
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .filter(|l| !l.starts_with(['│', '┌', '├', '└', '─']))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        let mut lines = pick(&self.stderr);
        if lines.is_empty() {
            lines = pick(&self.stdout);
        }
        if lines.is_empty() {
            return "no output".to_owned();
        }
        lines[lines.len().saturating_sub(TAIL_LINES)..].join(" | ")
    }
}

/// Removes ANSI escape sequences (PM2 colours its output even into a pipe).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        if chars.peek() == Some(&'[') {
            chars.next();
            // Parameters and intermediates, then one final byte in @..~.
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        }
    }
    out
}

/// Runs `cmd` to completion under [`proc`]'s kill policy: past `timeout`
/// the CLI's whole process group is killed (SIGTERM, SIGKILL after
/// [`KILL_GRACE`]); once it exits by itself, whatever it started is left
/// alone — the daemon a first `pm2` call spawns must outlive it (PM2 puts it
/// in a session of its own anyway) — and its output is read for at most
/// [`OUTPUT_GRACE`] more.
fn run_bounded(cmd: Command, what: &str, timeout: Duration) -> Result<Captured, DriverError> {
    let policy = proc::Policy {
        timeout,
        kill_grace: KILL_GRACE,
        after_exit: proc::AfterExit::Leave {
            drain: OUTPUT_GRACE,
        },
    };
    let output = proc::Output::Capture {
        limit: OUTPUT_LIMIT,
    };
    let done = proc::run(cmd, output, &policy).map_err(|e| {
        if matches!(&e, proc::ProcError::Spawn(s) if s.kind() == io::ErrorKind::NotFound) {
            DriverError::failed(DRIVER, format!("cannot run `{what}`: program not found"))
        } else {
            DriverError::Spawn {
                driver: DRIVER,
                command: what.to_owned(),
                source: e.into_io(),
            }
        }
    })?;
    let status = match done.ending {
        proc::Ending::Exited(status) => status,
        proc::Ending::TimedOut => {
            return Err(DriverError::failed(
                DRIVER,
                format!(
                    "`{what}` did not finish within {}s; killed it and its process group",
                    timeout.as_secs()
                ),
            ))
        }
    };
    // What a successful call prints is parsed whole (jlist, the ecosystem
    // JSON): a cut one would only fail to parse, less clearly.
    if status.success() && done.stdout.dropped > 0 {
        return Err(DriverError::failed(
            DRIVER,
            format!(
                "`{what}` printed more than {} MiB; not read",
                OUTPUT_LIMIT >> 20
            ),
        ));
    }
    Ok(Captured {
        status,
        stdout: done.stdout.bytes,
        stderr: done.stderr.bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balancing_is_read_from_the_daemon_environment() {
        let env = |s: &str| s.replace(' ', "\0").into_bytes();
        assert_eq!(
            balancing_of(&env("PATH=/bin NODE_CLUSTER_SCHED_POLICY=none HOME=/")),
            Balancing::Kernel
        );
        assert_eq!(
            balancing_of(&env("PATH=/bin HOME=/")),
            Balancing::RoundRobin
        );
        assert_eq!(
            balancing_of(&env("NODE_CLUSTER_SCHED_POLICY=rr")),
            Balancing::RoundRobin
        );
        // Another variable that merely ends with the name is not it.
        assert_eq!(
            balancing_of(&env("X_NODE_CLUSTER_SCHED_POLICY=none")),
            Balancing::RoundRobin
        );
        assert_eq!(
            balancing_of(&env("NODE_CLUSTER_SCHED_POLICY=nonesuch")),
            Balancing::RoundRobin
        );
    }

    #[test]
    fn jlist_keeps_no_env_values() {
        let text = br#"notice
[{"pid":7,"name":"web","pm_id":0,"monit":{"memory":1024,"cpu":1.5},
  "pm2_env":{"status":"online","restart_time":2,"pm_uptime":1000,
  "exec_mode":"fork_mode","pm_cwd":"/app/current","SECRET":"s3cr3t","restart":"x",
  "env":{"SECRET":"s3cr3t","SLIPWAY_RELEASE":"v1"}}}]"#;
        // The array is on its own line after a notice, as PM2 prints it.
        let joined: Vec<u8> = text
            .split(|&b| b == b'\n')
            .enumerate()
            .flat_map(|(i, l)| {
                let mut l = l.to_vec();
                if i == 0 {
                    l.push(b'\n');
                }
                l
            })
            .collect();
        let procs = parse_jlist(&joined).unwrap();
        assert_eq!(procs.len(), 1);
        let p = &procs[0];
        assert_eq!(p.label(), "web#0");
        assert_eq!(p.status(), "online");
        assert_eq!(p.pm2_env.restart_time, Some(2));
        assert_eq!(p.monit.memory, Some(1024));
        assert_eq!(p.pm2_env.env.release.as_deref(), Some("v1"));
        assert!(!format!("{procs:?}").contains("s3cr3t"));
    }

    #[test]
    fn jlist_odd_types_do_not_fail() {
        let procs = parse_jlist(
            br#"[{"pid":"x","name":"web","pm_id":"_old_0","monit":{},"pm2_env":{"status":5,"restart_time":"secret-ish"}}]"#,
        )
        .unwrap();
        assert_eq!(procs[0].pid, None);
        assert_eq!(procs[0].pm_id, None);
        assert_eq!(procs[0].status(), "unknown");
    }

    #[test]
    fn bad_jlist_error_does_not_quote_output() {
        let err = parse_jlist(b"[{\"pid\": \"s3cr3t").unwrap_err().to_string();
        assert!(!err.contains("s3cr3t"), "{err}");
    }

    #[test]
    fn tail_strips_colours_and_tables() {
        let out = Captured {
            status: ExitStatus::default(),
            stdout: "\u{1b}[32m[PM2] \u{1b}[39mok\n│ 0 │ web │\n".into(),
            stderr: "\u{1b}[31m[PM2][ERROR] \u{1b}[39mScript not found\n".into(),
        };
        assert_eq!(out.tail(), "[PM2][ERROR] Script not found");
        let quiet = Captured {
            stderr: Vec::new(),
            ..out
        };
        assert_eq!(quiet.tail(), "[PM2] ok");
    }

    #[test]
    fn paths() {
        assert_eq!(
            lexical_join(Path::new("/app/current"), Path::new("./dist/../server.js")),
            PathBuf::from("/app/current/server.js")
        );
        assert_eq!(
            strip_release_prefix(
                Path::new("/app/releases/v1/server.js"),
                Path::new("/app/releases/v1")
            ),
            Some(PathBuf::from("server.js"))
        );
        assert_eq!(
            strip_release_prefix(Path::new("server.js"), Path::new("/app/releases/v1")),
            None
        );
    }

    #[test]
    fn a_call_past_its_timeout_leaves_no_grandchild() {
        use crate::proc::testing::{forks_grandchild, is_gone, recorded_pid};
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        // `sh SCRIPT` stands in for a hung `pm2` that forked: a script
        // needs no exec bit, so no ETXTBSY from a fork in a parallel test.
        let script = dir.path().join("hung-pm2");
        fs::write(&script, forks_grandchild(&pid_file)).unwrap();
        let config = Pm2Config {
            name: "web".into(),
            ecosystem: None,
            script: None,
            instances: 1,
            cluster: false,
            pm2_home: Some(dir.path().join("pm2-home")),
            pm2_bin: PathBuf::from("/bin/sh"),
            user: None,
            ports: None,
        };
        let runner = Runner::new(&config).unwrap();
        let err = runner
            .run(&[script.as_os_str()], Duration::from_secs(1))
            .unwrap_err()
            .to_string();
        assert!(err.contains("did not finish within 1s"), "{err}");
        let pid = recorded_pid(&pid_file);
        assert!(is_gone(pid), "grandchild {pid} survived the pm2 call");
    }

    #[test]
    fn missing_binary_is_named() {
        let config = Pm2Config {
            name: "web".into(),
            ecosystem: None,
            script: None,
            instances: 1,
            cluster: true,
            pm2_home: None,
            pm2_bin: PathBuf::from("/nonexistent/pm2"),
            user: None,
            ports: None,
        };
        let err = Runner::new(&config).unwrap_err().to_string();
        assert_eq!(
            err,
            "pm2: pm2 not found (looked for /nonexistent/pm2); install it with `npm install -g pm2`"
        );
    }
}
