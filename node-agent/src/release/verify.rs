//! `verify`: re-hash a release against its manifest.
//!
//! With the content store on, files are hardlinks shared between releases; a
//! file edited in place (root ignores the read-only mode) changes them all.
//! This names every file that no longer matches.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::id::ReleaseId;
use super::manifest::{EntryKind, Manifest};
use crate::config::AppConfig;

/// One difference between a release and its manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Finding {
    Modified {
        path: String,
        expected: String,
        actual: String,
    },
    Missing {
        path: String,
    },
    WrongType {
        path: String,
        expected: &'static str,
    },
    ModeChanged {
        path: String,
        expected: String,
        actual: String,
    },
    SymlinkChanged {
        path: String,
        expected: String,
        actual: String,
    },
    /// Not from the artifact (e.g. written by a hook); reported, not a failure.
    Added {
        path: String,
    },
}

impl Finding {
    /// Whether this finding means the release no longer matches its artifact.
    pub fn is_failure(&self) -> bool {
        !matches!(self, Self::Added { .. })
    }
}

/// The result of verifying one release.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub release: ReleaseId,
    pub files_checked: u64,
    pub findings: Vec<Finding>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        !self.findings.iter().any(Finding::is_failure)
    }
}

pub(super) fn verify(
    app: &AppConfig,
    id: &ReleaseId,
    dir: &Path,
    manifest: &Manifest,
) -> io::Result<VerifyReport> {
    let mut findings = Vec::new();
    let mut files_checked = 0;
    let mut known: HashSet<PathBuf> = HashSet::new();
    for e in &manifest.entries {
        let path = dir.join(&e.path);
        // Parents the archive implied without a directory entry count too.
        for a in Path::new(&e.path).ancestors() {
            if !known.insert(a.to_path_buf()) {
                break;
            }
        }
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                findings.push(Finding::Missing {
                    path: e.path.clone(),
                });
                continue;
            }
            Err(err) => return Err(err),
        };
        match &e.kind {
            EntryKind::Dir { .. } => {
                if !meta.is_dir() {
                    findings.push(Finding::WrongType {
                        path: e.path.clone(),
                        expected: "directory",
                    });
                }
            }
            EntryKind::File { mode, sha256, .. } => {
                if !meta.is_file() {
                    findings.push(Finding::WrongType {
                        path: e.path.clone(),
                        expected: "regular file",
                    });
                    continue;
                }
                files_checked += 1;
                let actual = crate::digest::Sha256::of_file(&path)?;
                if actual != *sha256 {
                    findings.push(Finding::Modified {
                        path: e.path.clone(),
                        expected: sha256.clone(),
                        actual: actual.into_string(),
                    });
                }
                let actual_mode = meta.permissions().mode() & 0o7777;
                if actual_mode != *mode {
                    findings.push(Finding::ModeChanged {
                        path: e.path.clone(),
                        expected: format!("{mode:o}"),
                        actual: format!("{actual_mode:o}"),
                    });
                }
            }
            EntryKind::Symlink { target } => {
                if !meta.file_type().is_symlink() {
                    findings.push(Finding::WrongType {
                        path: e.path.clone(),
                        expected: "symlink",
                    });
                    continue;
                }
                let actual = fs::read_link(&path)?.to_string_lossy().into_owned();
                if &actual != target {
                    findings.push(Finding::SymlinkChanged {
                        path: e.path.clone(),
                        expected: target.clone(),
                        actual,
                    });
                }
            }
        }
    }
    let shared: HashSet<&PathBuf> = app.shared_files.iter().chain(&app.shared_dirs).collect();
    let mut added = Vec::new();
    walk(dir, Path::new(""), &known, &shared, &mut added)?;
    added.sort();
    findings.extend(added.into_iter().map(|path| Finding::Added { path }));
    Ok(VerifyReport {
        release: id.clone(),
        files_checked,
        findings,
    })
}

fn walk(
    base: &Path,
    rel: &Path,
    known: &HashSet<PathBuf>,
    shared: &HashSet<&PathBuf>,
    added: &mut Vec<String>,
) -> io::Result<()> {
    for entry in fs::read_dir(base.join(rel))? {
        let entry = entry?;
        let r = rel.join(entry.file_name());
        if shared.contains(&r) {
            continue;
        }
        let is_dir = entry.file_type()?.is_dir();
        if !known.contains(&r) {
            // Parents created to hold a shared link are not "added" files.
            let holds_shared = is_dir && shared.iter().any(|s| s.starts_with(&r));
            if !holds_shared {
                added.push(r.to_string_lossy().into_owned());
                continue;
            }
        }
        if is_dir {
            walk(base, &r, known, shared, added)?;
        }
    }
    Ok(())
}
