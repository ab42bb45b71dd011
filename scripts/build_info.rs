//! Shared by the build scripts of `node-agent` and `controller` (included
//! with `#[path]`): the git commit a binary is built from, for `--version`
//! and the version the agent reports to the controller.
//!
//! Sets, for the package's code:
//! - `SLIPWAY_BUILD_COMMIT`: 12 hex digits of `HEAD`, `-dirty` appended when
//!   the sources that go into this package differ from `HEAD`; else the
//!   `SLIPWAY_GIT_COMMIT` environment variable (a build from a tarball);
//!   else `unknown`.
//! - `SLIPWAY_BUILD_DATE`: the commit's date (`YYYY-MM-DD`), empty when unknown.
//! - `SLIPWAY_BUILD_VERSION`: what `--version` prints after the program's
//!   name: `0.1.0 (commit 1a2b3c4d5e6f, 2026-12-01)`.
//!
//! Rebuilds: only when `HEAD` moves (the worktree's `HEAD`, the branch's
//! ref file and `packed-refs` in the common git dir — a linked worktree's
//! `.git` is a file, so the paths come from `git rev-parse`), when
//! `SLIPWAY_GIT_COMMIT` changes, or when the watched sources change (and
//! then the package recompiles anyway), never on every build.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Digits of the commit id shown: enough to be unique in any real history.
const SHORT: usize = 12;

/// Emits the cargo instructions. `watched` are the sources (relative to the
/// workspace root) whose changes make this package's build `-dirty`.
pub(crate) fn emit(watched: &[&str]) {
    let manifest =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest
        .parent()
        .expect("the package sits in the workspace")
        .to_owned();
    println!("cargo:rerun-if-env-changed=SLIPWAY_GIT_COMMIT");
    println!("cargo:rerun-if-changed=build.rs");
    println!(
        "cargo:rerun-if-changed={}",
        root.join("scripts/build_info.rs").display()
    );
    for w in watched {
        let p = root.join(w);
        if p.exists() {
            println!("cargo:rerun-if-changed={}", p.display());
        }
    }
    let (commit, date) = from_git(&root, watched).unwrap_or_else(|| {
        // Only what a version string may carry (semver build metadata).
        let given: String = std::env::var("SLIPWAY_GIT_COMMIT")
            .unwrap_or_default()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
            .take(40)
            .collect();
        if given.is_empty() {
            ("unknown".to_owned(), String::new())
        } else if given.len() == 40 && given.chars().all(|c| c.is_ascii_hexdigit()) {
            // A full commit id, shown as git's is.
            (given[..SHORT].to_owned(), String::new())
        } else {
            (given, String::new())
        }
    });
    println!("cargo:rustc-env=SLIPWAY_BUILD_COMMIT={commit}");
    println!("cargo:rustc-env=SLIPWAY_BUILD_DATE={date}");
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    if date.is_empty() {
        println!("cargo:rustc-env=SLIPWAY_BUILD_VERSION={version} (commit {commit})");
    } else {
        println!("cargo:rustc-env=SLIPWAY_BUILD_VERSION={version} (commit {commit}, {date})");
    }
}

/// Commit, date and the rerun paths from git, when `root` is the top of a
/// git work tree (not merely inside some other repository).
fn from_git(root: &Path, watched: &[&str]) -> Option<(String, String)> {
    let top = git(root, &["rev-parse", "--show-toplevel"])?;
    if std::fs::canonicalize(&top).ok()? != std::fs::canonicalize(root).ok()? {
        return None;
    }
    let abs = |p: String| {
        if Path::new(&p).is_absolute() {
            PathBuf::from(p)
        } else {
            root.join(p)
        }
    };
    let git_dir = abs(git(root, &["rev-parse", "--git-dir"])?);
    let common = abs(git(root, &["rev-parse", "--git-common-dir"])?);
    let mut reruns = vec![git_dir.join("HEAD"), common.join("packed-refs")];
    if let Some(branch) = git(root, &["symbolic-ref", "-q", "HEAD"]) {
        // A branch ref lives in the common dir (shared by all worktrees).
        reruns.push(common.join(&branch));
        reruns.push(git_dir.join(&branch));
    }
    for p in reruns {
        // A path that does not exist would make cargo rerun this every time.
        if p.exists() {
            println!("cargo:rerun-if-changed={}", p.display());
        }
    }
    let full = git(root, &["rev-parse", "HEAD"])?;
    let mut commit: String = full.chars().take(SHORT).collect();
    let mut status = vec!["status", "--porcelain", "--untracked-files=no", "--"];
    status.extend_from_slice(watched);
    if git(root, &status).is_some_and(|s| !s.is_empty()) {
        commit.push_str("-dirty");
    }
    let date = git(root, &["log", "-1", "--format=%cs", "HEAD"]).unwrap_or_default();
    Some((commit, date))
}

/// Runs git in `dir`; its trimmed stdout, or `None` when git is missing or fails.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    Some(String::from_utf8(out.stdout).ok()?.trim().to_owned())
}
