//! `slipway-agent demo`: the release engine end to end in a scratch directory.
//!
//! It writes an `agent.toml`, packs three versions of a small sample app and
//! runs the same commands an operator would, printing each one first: deploy,
//! a second deploy (mostly hardlinked from the content store), a broken deploy
//! that is refused before activation, releases, rollback, redeploy, verify,
//! prune and status.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Parser;

use crate::artifact::{pack_dir, Compression};
use crate::cli::{self, Cli};

/// Runs the walk-through in `dir` (a new temp dir by default).
pub fn run(dir: Option<PathBuf>) -> anyhow::Result<()> {
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
    fs::write(
        &config,
        format!(
            r#"# Written by `slipway-agent demo`.
[apps.web]
root = "{}"
keep = 3
shared_files = [".env"]
shared_dirs = ["logs"]

[apps.web.hooks]
# Refuse a release that lacks its entry point, before it goes live.
before_activate = ["test -f server.js"]
after_activate = ["echo \"$(date -u +%FT%TZ) $SLIPWAY_RELEASE is live (was: ${{SLIPWAY_PREVIOUS:-none}})\" >> logs/activations.log"]
timeout = "30s"
"#,
            root.display()
        ),
    )?;
    fs::create_dir_all(root.join("shared"))?;
    fs::write(
        root.join("shared/.env"),
        "PORT=3000\nDATABASE_URL=postgres://demo\n",
    )?;

    let artifacts = dir.join("artifacts");
    fs::create_dir_all(&artifacts)?;
    let v1 = sample(&dir, &artifacts, "v1", "hello from v1", true)?;
    let v2 = sample(&dir, &artifacts, "v2", "hello from v2", true)?;
    let broken = sample(&dir, &artifacts, "v3", "this build lost server.js", false)?;

    println!(
        "Slipway demo in {}\nconfig: {}\n",
        dir.display(),
        config.display()
    );
    let c = config.to_string_lossy().into_owned();
    let s = |p: &Path| p.to_string_lossy().into_owned();
    step(
        &c,
        &[
            "deploy",
            "--app",
            "web",
            "--artifact",
            &s(&v1),
            "--id",
            "v1",
        ],
        0,
    )?;
    step(
        &c,
        &[
            "deploy",
            "--app",
            "web",
            "--artifact",
            &s(&v2),
            "--id",
            "v2",
        ],
        0,
    )?;
    println!("# v3 lacks server.js: before_activate refuses it and current stays v2");
    step(
        &c,
        &[
            "deploy",
            "--app",
            "web",
            "--artifact",
            &s(&broken),
            "--id",
            "v3",
        ],
        1,
    )?;
    step(&c, &["releases", "--app", "web"], 0)?;
    println!("# roll back on this node alone, no controller needed");
    step(&c, &["rollback", "--app", "web"], 0)?;
    println!("# the same artifact again: rebuilt from its manifest by hardlinks, no unpacking");
    step(
        &c,
        &[
            "deploy",
            "--app",
            "web",
            "--artifact",
            &s(&v2),
            "--id",
            "v4",
        ],
        0,
    )?;
    step(&c, &["verify", "--app", "web"], 0)?;
    step(&c, &["prune", "--app", "web", "--keep", "2"], 0)?;
    step(&c, &["releases", "--app", "web"], 0)?;
    step(&c, &["status"], 0)?;
    println!(
        "current -> {}\nactivations: \n{}",
        fs::read_link(root.join("current"))?.display(),
        fs::read_to_string(root.join("shared/logs/activations.log")).unwrap_or_default()
    );
    println!("Everything is in {}; remove it when done.", dir.display());
    Ok(())
}

fn step(config: &str, args: &[&str], expect: u8) -> anyhow::Result<()> {
    println!("$ slipway-agent {}", args.join(" "));
    let mut argv = vec!["slipway-agent", "--config", config];
    argv.extend_from_slice(args);
    let cli = Cli::try_parse_from(argv).context("demo built a bad command line")?;
    let code = cli::run_code(cli);
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

/// A small Node-style app tree packed into `artifacts/<name>.tar.gz`.
fn sample(
    dir: &Path,
    artifacts: &Path,
    name: &str,
    greeting: &str,
    with_server: bool,
) -> anyhow::Result<PathBuf> {
    let src = dir.join("src").join(name);
    fs::create_dir_all(src.join("lib"))?;
    fs::create_dir_all(src.join("public"))?;
    if with_server {
        fs::write(
            src.join("server.js"),
            format!(
                "const http = require('http');\nhttp.createServer((q, r) => r.end({greeting:?})).listen(process.env.PORT || 3000);\n"
            ),
        )?;
    }
    fs::write(
        src.join("package.json"),
        format!("{{\"name\":\"web\",\"version\":\"{name}\"}}\n"),
    )?;
    // Most of an app does not change between releases: the content store
    // keeps one copy of these.
    for i in 0..50 {
        fs::write(
            src.join("lib").join(format!("mod{i}.js")),
            format!("module.exports = {i};\n").repeat(40),
        )?;
    }
    fs::write(src.join("public/index.html"), "<h1>web</h1>\n")?;
    let out = artifacts.join(format!("web-{name}.tar.gz"));
    pack_dir(&src, &out, Compression::Gzip)?;
    Ok(out)
}
