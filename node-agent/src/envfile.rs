//! `shared/.env`: `KEY=value` lines handed to the app's environment.
//!
//! Accepts what dotenv files in the wild contain: comments, blank lines,
//! `export KEY=value`, single- or double-quoted values (double quotes take
//! `\n`, `\"` and `\\` escapes). Values never leave the node: nothing here is
//! logged or reported.

use std::io::Write as _;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

/// Where the app's environment file is, under its root.
pub fn path(root: &Path) -> PathBuf {
    root.join("shared/.env")
}

/// Where the controller's env version of the file is recorded.
fn version_path(root: &Path) -> PathBuf {
    root.join(".slipway/env-version")
}

/// The file's bytes as they are, or None when there is none.
pub fn read_raw(root: &Path) -> std::io::Result<Option<Vec<u8>>> {
    match std::fs::read(path(root)) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Replaces `shared/.env` with `data` atomically and durably: a temp file
/// beside it (mode 0600 from its creation, so no reader ever sees the
/// values under a wider mode), fsync, rename, fsync of the directory. The
/// file is owned by whoever owns the file it replaces, else the `shared/`
/// directory (the app's user: the app may read `.env` itself).
pub fn write(root: &Path, data: &[u8]) -> std::io::Result<()> {
    let target = path(root);
    let dir = root.join("shared");
    std::fs::create_dir_all(&dir)?;
    let owner = std::fs::metadata(&target)
        .or_else(|_| std::fs::metadata(&dir))
        .map(|m| (m.uid(), m.gid()))?;
    let tmp = crate::durable::temp_sibling(&target, "tmp");
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        if nix::unistd::geteuid().is_root() {
            std::os::unix::fs::fchown(&f, Some(owner.0), Some(owner.1))?;
        }
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &target)?;
        crate::durable::fsync_dir(&dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Removes `shared/.env` (durably): the app had none before a change that
/// failed.
pub fn remove(root: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path(root)) {
        Ok(()) => crate::durable::fsync_dir(&root.join("shared")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// The controller's env version the file was last written from; 0 when
/// the controller never wrote it.
pub fn version(root: &Path) -> u64 {
    std::fs::read_to_string(version_path(root))
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0)
}

/// Records that the file holds the controller's env `version`.
pub fn record_version(root: &Path, version: u64) -> std::io::Result<()> {
    let p = version_path(root);
    if let Some(dir) = p.parent() {
        std::fs::create_dir_all(dir)?;
    }
    crate::durable::write_atomic(&p, format!("{version}\n").as_bytes())
}

#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Syntax {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// Reads and parses `root/shared/.env`; no file means no variables.
pub fn load(root: &Path) -> Result<Vec<(String, String)>, EnvError> {
    let path = root.join("shared/.env");
    match std::fs::read_to_string(&path) {
        Ok(text) => parse(&path, &text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(EnvError::Read { path, source }),
    }
}

/// Parses `text` (read from `path`, for messages).
pub fn parse(path: &Path, text: &str) -> Result<Vec<(String, String)>, EnvError> {
    slipway_proto::dotenv::parse(text).map_err(|e| EnvError::Syntax {
        path: path.to_owned(),
        line: e.line,
        message: e.message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_common_forms() {
        let text = "# db\nexport DATABASE_URL=postgres://x\nPORT = 3000 # web\nA=\"line\\nnext\"\nB='raw \\n'\nPORT=3001\n\n";
        let env = parse(Path::new(".env"), text).unwrap();
        assert_eq!(
            env,
            vec![
                ("DATABASE_URL".to_owned(), "postgres://x".to_owned()),
                ("A".to_owned(), "line\nnext".to_owned()),
                ("B".to_owned(), "raw \\n".to_owned()),
                ("PORT".to_owned(), "3001".to_owned()),
            ]
        );
    }

    #[test]
    fn errors_name_the_line() {
        let err = parse(Path::new("/app/shared/.env"), "A=1\nnot a pair\n").unwrap_err();
        assert_eq!(err.to_string(), "/app/shared/.env:2: expected KEY=value");
        let err = parse(Path::new(".env"), "1X=2").unwrap_err();
        assert!(err.to_string().contains("not a valid variable name"));
        let err = parse(Path::new(".env"), "A=\"open").unwrap_err();
        assert!(err.to_string().contains("unterminated"));
    }

    #[test]
    fn a_written_file_is_0600_from_the_start_and_replaced_whole() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        assert_eq!(read_raw(root).unwrap(), None);
        assert_eq!(version(root), 0);
        write(root, b"A=\"1\"\n").unwrap();
        let mode = std::fs::metadata(path(root)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        write(root, b"B=\"2\"\n").unwrap();
        assert_eq!(read_raw(root).unwrap().as_deref(), Some(&b"B=\"2\"\n"[..]));
        assert_eq!(load(root).unwrap(), vec![("B".to_owned(), "2".to_owned())]);
        // No temp file is left beside it.
        let names: Vec<String> = std::fs::read_dir(root.join("shared"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec![".env".to_owned()]);
        record_version(root, 7).unwrap();
        assert_eq!(version(root), 7);
        remove(root).unwrap();
        assert_eq!(read_raw(root).unwrap(), None);
        remove(root).unwrap();
    }
}
