//! Linking `shared/` files and directories into a release.
//!
//! Links are relative (`../../shared/.env` from `releases/<id>/.env`) so a
//! release still resolves them when the app root is bind-mounted elsewhere.

use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use crate::config::AppConfig;

/// Why shared paths could not be linked.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("shared file {path} does not exist; create it before deploying (it is listed in shared_files)")]
    MissingFile { path: PathBuf },
    #[error("shared path {path} exists but is not a {expected}")]
    WrongType {
        path: PathBuf,
        expected: &'static str,
    },
    #[error(
        "the artifact contains {path} but it is a shared path; remove it from the artifact or set artifact_wins = true"
    )]
    InArtifact { path: String },
    #[error("shared path {path} would be linked through a symlink in the release")]
    ThroughSymlink { path: String },
    #[error("cannot link shared path {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// Links every shared file and dir of `app` into `release_dir`. Returns the
/// relative paths linked (an artifact that wins keeps its own copy).
pub fn link(
    app: &AppConfig,
    shared_dir: &Path,
    release_dir: &Path,
) -> Result<Vec<PathBuf>, SharedError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| SharedError::Io { path, source }
    };
    let mut linked = Vec::new();
    for d in &app.shared_dirs {
        let src = shared_dir.join(d);
        match fs::metadata(&src) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(SharedError::WrongType {
                    path: src,
                    expected: "directory",
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir_all(&src).map_err(io(&src))?
            }
            Err(e) => {
                return Err(SharedError::Io {
                    path: src,
                    source: e,
                })
            }
        }
    }
    for f in &app.shared_files {
        let src = shared_dir.join(f);
        match fs::metadata(&src) {
            Ok(m) if m.is_file() => {}
            Ok(_) => {
                return Err(SharedError::WrongType {
                    path: src,
                    expected: "regular file",
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(SharedError::MissingFile { path: src })
            }
            Err(e) => {
                return Err(SharedError::Io {
                    path: src,
                    source: e,
                })
            }
        }
    }
    for rel in app.shared_dirs.iter().chain(&app.shared_files) {
        let dest = release_dir.join(rel);
        let shown = rel.display().to_string();
        // Every ancestor inside the release must be a real directory.
        let mut cur = release_dir.to_path_buf();
        let parents: Vec<_> = rel.parent().map(|p| p.iter().collect()).unwrap_or_default();
        for part in parents {
            cur.push(part);
            match fs::symlink_metadata(&cur) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(SharedError::ThroughSymlink { path: shown })
                }
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(SharedError::InArtifact { path: shown }),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir(&cur).map_err(io(&cur))?
                }
                Err(e) => {
                    return Err(SharedError::Io {
                        path: cur,
                        source: e,
                    })
                }
            }
        }
        match fs::symlink_metadata(&dest) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(SharedError::Io {
                    path: dest,
                    source: e,
                })
            }
            Ok(_) if app.artifact_wins => continue,
            // An empty directory (an artifact's placeholder `logs/`) gives way.
            Ok(m) if m.is_dir() && fs::read_dir(&dest).map_err(io(&dest))?.next().is_none() => {
                fs::remove_dir(&dest).map_err(io(&dest))?;
            }
            Ok(_) => return Err(SharedError::InArtifact { path: shown }),
        }
        let ups = rel.components().count() + 1;
        let mut target = PathBuf::new();
        for _ in 0..ups {
            target.push("..");
        }
        target.push("shared");
        target.push(rel);
        symlink(&target, &dest).map_err(io(&dest))?;
        linked.push(rel.clone());
    }
    Ok(linked)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, AppConfig) {
        let dir = tempfile::tempdir().unwrap();
        let mut app = AppConfig::with_defaults("web", dir.path().to_owned());
        app.shared_files = vec![PathBuf::from(".env"), PathBuf::from("config/db.yml")];
        app.shared_dirs = vec![PathBuf::from("logs"), PathBuf::from("public/uploads")];
        fs::create_dir_all(dir.path().join("shared/config")).unwrap();
        fs::write(dir.path().join("shared/.env"), "SECRET=1").unwrap();
        fs::write(dir.path().join("shared/config/db.yml"), "db").unwrap();
        fs::create_dir_all(dir.path().join("releases/r1/logs")).unwrap();
        (dir, app)
    }

    #[test]
    fn links_resolve_through_relative_paths() {
        let (dir, app) = setup();
        let rel = dir.path().join("releases/r1");
        let linked = link(&app, &dir.path().join("shared"), &rel).unwrap();
        assert_eq!(linked.len(), 4);
        assert_eq!(fs::read_to_string(rel.join(".env")).unwrap(), "SECRET=1");
        assert_eq!(fs::read_to_string(rel.join("config/db.yml")).unwrap(), "db");
        assert!(dir.path().join("shared/public/uploads").is_dir());
        fs::write(rel.join("public/uploads/x"), "u").unwrap();
        assert!(dir.path().join("shared/public/uploads/x").exists());
        assert_eq!(
            fs::read_link(rel.join("public/uploads")).unwrap(),
            PathBuf::from("../../../shared/public/uploads")
        );
    }

    #[test]
    fn missing_shared_file_and_artifact_conflict() {
        let (dir, mut app) = setup();
        let rel = dir.path().join("releases/r1");
        fs::remove_file(dir.path().join("shared/.env")).unwrap();
        let err = link(&app, &dir.path().join("shared"), &rel).unwrap_err();
        assert!(matches!(err, SharedError::MissingFile { .. }), "{err}");
        fs::write(dir.path().join("shared/.env"), "S").unwrap();
        fs::write(rel.join(".env"), "from artifact").unwrap();
        let err = link(&app, &dir.path().join("shared"), &rel).unwrap_err();
        assert!(err.to_string().contains("artifact_wins"), "{err}");
        app.artifact_wins = true;
        link(&app, &dir.path().join("shared"), &rel).unwrap();
        assert_eq!(
            fs::read_to_string(rel.join(".env")).unwrap(),
            "from artifact"
        );
    }
}
