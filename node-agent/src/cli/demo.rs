//! `slipway-agent demo`: the agent end to end in a scratch directory.
//!
//! It writes an `agent.toml` for one small Node web app, run by PM2 in
//! cluster mode when `pm2` is installed (the test command installs it) and
//! otherwise supervised by the agent itself (the exec driver), behind an
//! HTTP health gate; packs
//! three releases and runs the commands an operator would, printing each one
//! first: deploy, a second deploy (mostly hardlinked from the content store),
//! a release whose health check answers 500 (rolled back automatically),
//! releases, a node-local rollback, a redeploy rebuilt from its manifest,
//! verify, prune and status. The app is stopped at the end.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Parser;

use super::args::{Cli, DemoDriver};
use crate::artifact::{pack_dir, Compression};

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        crate::driver::pm2::find_executable(Path::new(program), &paths).is_some()
    })
}

/// Runs the walk-through in `dir` (a new temp dir by default); each command
/// goes through `run_command`, the command line's own runner, as if typed.
pub fn run(
    dir: Option<PathBuf>,
    driver: DemoDriver,
    run_command: &dyn Fn(Cli) -> u8,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        on_path("node"),
        "the demo app needs `node` (Node.js) on PATH"
    );
    let use_pm2 = match driver {
        DemoDriver::Pm2 => {
            anyhow::ensure!(
                on_path("pm2"),
                "--driver pm2: `pm2` is not on PATH (npm install -g pm2)"
            );
            true
        }
        DemoDriver::Exec => false,
        DemoDriver::Auto => on_path("pm2"),
    };
    let dir = match dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("slipway-demo-{}", std::process::id())),
    };
    fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create demo dir {}", dir.display()))?;
    let dir = fs::canonicalize(&dir)?;
    let root = dir.join("app");
    if root.exists() {
        anyhow::bail!(
            "{} already exists; give --dir a fresh directory",
            root.display()
        );
    }
    let config = dir.join("agent.toml");
    // A free port for the sample app (its shared .env sets PORT) and its
    // health check.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let run_section = if use_pm2 {
        format!(
            r#"# PM2 runs the app in cluster mode from /current: a reload is zero-downtime.
[apps.web.run]
driver = "pm2"
script = "server.js"
instances = 2
exec_mode = "cluster"
pm2_home = "{}"
"#,
            dir.join("pm2").display()
        )
    } else {
        r#"# No PM2 here: the agent supervises the app itself (the exec driver).
# (Install PM2 — the test command does — and the demo uses it instead.)
[apps.web.run]
driver = "exec"
command = ["node", "server.js"]
stop_grace = "3s"
"#
        .to_owned()
    };
    fs::write(
        &config,
        format!(
            r#"# Written by `slipway-agent demo`.
[apps.web]
root = "{}"
keep = 3
# Failed and bad releases kept for a look (the newest one).
keep_failed = 1
shared_files = [".env"]
shared_dirs = ["logs"]

[apps.web.hooks]
# Refuse a release that lacks its entry point, before it goes live.
before_activate = ["test -f server.js"]
after_activate = ["echo \"$(date -u +%FT%TZ) $SLIPWAY_RELEASE is live (was: ${{SLIPWAY_PREVIOUS:-none}})\" >> logs/activations.log"]
timeout = "30s"

{run_section}
# A release stays live only if /api/health passes 3 times in a row.
[apps.web.health]
check = "http"
url = "http://127.0.0.1:{port}/api/health"
interval = "200ms"
successes = 3
start_period = "2s"
deadline = "20s"
"#,
            root.display(),
        ),
    )?;
    fs::create_dir_all(root.join("shared"))?;
    fs::write(
        root.join("shared/.env"),
        format!("PORT={port}\nDATABASE_URL=postgres://demo:secret@db/app\n"),
    )?;

    let artifacts = dir.join("artifacts");
    fs::create_dir_all(&artifacts)?;
    let v1 = sample(&dir, &artifacts, "v1", 200)?;
    let v2 = sample(&dir, &artifacts, "v2", 200)?;
    let broken = sample(&dir, &artifacts, "v3", 500)?;

    println!(
        "Slipway demo in {}\nconfig: {}\n",
        dir.display(),
        config.display()
    );
    let sh = Shell {
        config: config.to_string_lossy().into_owned(),
        run_command,
    };
    let result = walk_through(&sh, [&v1, &v2, &broken], port);
    // Whatever happened, do not leave the demo app (or its PM2) running.
    let stopped = sh.step(&["stop", "--app", "web"], 0);
    if use_pm2 {
        let _ = std::process::Command::new("pm2")
            .arg("kill")
            .env("PM2_HOME", dir.join("pm2"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
    result?;
    stopped?;
    println!(
        "current -> {}\nactivations:\n{}",
        fs::read_link(root.join("current"))?.display(),
        fs::read_to_string(root.join("shared/logs/activations.log")).unwrap_or_default()
    );
    println!("Everything is in {}; remove it when done.", dir.display());
    Ok(())
}

fn walk_through(sh: &Shell<'_>, [v1, v2, broken]: [&Path; 3], port: u16) -> anyhow::Result<()> {
    let s = |p: &Path| p.to_string_lossy().into_owned();
    sh.step(
        &["deploy", "--app", "web", "--artifact", &s(v1), "--id", "v1"],
        0,
    )?;
    show(port);
    println!("# v2: unchanged files are hardlinked from the content store");
    sh.step(
        &["deploy", "--app", "web", "--artifact", &s(v2), "--id", "v2"],
        0,
    )?;
    show(port);
    println!("# v3 answers 500 on /api/health: the gate fails and v2 is restored, automatically");
    sh.step(
        &[
            "deploy",
            "--app",
            "web",
            "--artifact",
            &s(broken),
            "--id",
            "v3",
        ],
        1,
    )?;
    show(port);
    sh.step(&["releases", "--app", "web"], 0)?;
    println!("# roll back on this node alone, no controller needed");
    sh.step(&["rollback", "--app", "web"], 0)?;
    show(port);
    println!(
        "# the same artifact again: rebuilt from its manifest by hardlinks, no unpacking;\n\
         # then the deploy prunes: the current release, its rollback target and the newest\n\
         # failed one stay (keep = 3, keep_failed = 1), the older bad v2 goes"
    );
    sh.step(
        &["deploy", "--app", "web", "--artifact", &s(v2), "--id", "v4"],
        0,
    )?;
    show(port);
    sh.step(&["verify", "--app", "web"], 0)?;
    sh.step(&["releases", "--app", "web"], 0)?;
    sh.step(&["status"], 0)?;
    Ok(())
}

/// Prints what the app answers right now.
fn show(port: u16) {
    use std::io::{Read, Write};
    let answer = (|| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .ok()?;
        write!(
            s,
            "GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        text.split("\r\n\r\n").nth(1).map(|b| b.trim().to_owned())
    })();
    println!(
        "$ curl http://127.0.0.1:{port}/\n{}\n",
        answer.as_deref().unwrap_or("(no answer)")
    );
}

/// Runs commands of the walk-through as the operator would type them.
struct Shell<'a> {
    /// `--config` of every command.
    config: String,
    /// The command line's runner.
    run_command: &'a dyn Fn(Cli) -> u8,
}

impl Shell<'_> {
    /// Prints `slipway-agent ARGS`, runs it and checks its exit code.
    fn step(&self, args: &[&str], expect: u8) -> anyhow::Result<()> {
        println!("$ slipway-agent {}", args.join(" "));
        let mut argv = vec!["slipway-agent", "--config", &self.config];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv).context("demo built a bad command line")?;
        let code = (self.run_command)(cli);
        if code != expect {
            anyhow::bail!(
                "`slipway-agent {}` exited {code}, expected {expect}",
                args.join(" ")
            );
        }
        if code != 0 {
            println!("(exit {code}, as expected)");
        }
        println!();
        Ok(())
    }
}

/// A small Node web app packed into `artifacts/web-<name>.tar.gz`; its
/// /api/health answers `health`.
fn sample(dir: &Path, artifacts: &Path, name: &str, health: u16) -> anyhow::Result<PathBuf> {
    let src = dir.join("src").join(name);
    fs::create_dir_all(src.join("lib"))?;
    fs::create_dir_all(src.join("public"))?;
    fs::write(
        src.join("server.js"),
        format!(
            r#"'use strict';
const http = require('http');
http.createServer((req, res) => {{
  const code = req.url === '/api/health' ? {health} : 200;
  const body = `hello from {name} (pid ${{process.pid}})\n`;
  res.writeHead(code, {{ 'content-length': Buffer.byteLength(body), connection: 'close' }});
  res.end(body);
}}).listen(Number(process.env.PORT), '127.0.0.1');
"#
        ),
    )?;
    // Most of an app does not change between releases: the content store
    // keeps one copy of these.
    for i in 0..50 {
        fs::write(
            src.join("lib").join(format!("mod{i}.js")),
            format!("module.exports.v{i} = {i};\n").repeat(40),
        )?;
    }
    fs::write(src.join("public/index.html"), "<h1>web</h1>\n")?;
    let out = artifacts.join(format!("web-{name}.tar.gz"));
    pack_dir(&src, &out, Compression::Gzip)?;
    Ok(out)
}
