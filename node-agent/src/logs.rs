//! Log rotation and retention of an app's logs.
//!
//! Which files: the globs of `[apps.NAME.logs] paths` (default
//! `shared/logs/*.log`), the exec driver's output and PM2's out/error files.
//! How each is rotated, so that no line is lost or written twice:
//!
//! - **exec driver output** — the agent's supervisor owns the app's pipes and
//!   writes whole lines: the file is renamed, the supervisor is told to reopen
//!   (SIGUSR1) and the rotation waits for it to say it did. Lines written
//!   before the reopen are in the rotated file, lines after in the new one.
//! - **PM2 logs** — renamed, then `pm2 reloadLogs` has PM2 reopen them.
//! - **anything else** (a writer that cannot be told to reopen) — copy, then
//!   truncate ("copytruncate"). Lines written between the copy and the
//!   truncate are lost; the window is the time to copy the file, which is why
//!   the agent's own outputs never use this.
//!
//! Rotated files are named in logrotate's `dateext` style with a time of day
//! so several rotations a day stay apart — `app.log-20261125-1732537200`,
//! then `.gz` or `.zst` — and only the newest `keep` are kept. What happened is
//! recorded in `.slipway/logs.json` for `status`.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::config::{AppConfig, Compress, RunConfig};
use crate::driver::pm2::Pm2;
use crate::durable;
use crate::supervise::{self, RunFiles, State};

/// How long a rotation waits for a writer to reopen its file.
const REOPEN_WAIT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(10);

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{path}: {message}")]
    Reopen { path: PathBuf, message: String },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> LogError {
    let path = path.to_owned();
    move |source| LogError::Io {
        action,
        path,
        source,
    }
}

/// How a log file is switched to a new one.
#[derive(Debug, Clone)]
pub enum Method {
    /// The exec driver's supervisor reopens on SIGUSR1.
    Supervisor(RunFiles),
    /// PM2 reopens on `pm2 reloadLogs`.
    Pm2(crate::config::Pm2Config),
    /// Copy, then truncate in place.
    CopyTruncate,
}

impl Method {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Supervisor(_) => "reopen",
            Self::Pm2(_) => "pm2 reloadLogs",
            Self::CopyTruncate => "copytruncate",
        }
    }
}

/// One live log file of an app.
#[derive(Debug, Clone)]
pub struct LogFile {
    pub path: PathBuf,
    pub method: Method,
}

/// The live log files of `app`, each once.
pub fn discover(app: &AppConfig) -> Vec<LogFile> {
    let mut found: BTreeMap<PathBuf, Method> = BTreeMap::new();
    for pattern in &app.logs.paths {
        let full = app.root.join(pattern);
        let Ok(paths) = glob::glob(&full.to_string_lossy()) else {
            continue;
        };
        for p in paths.flatten() {
            if fs::symlink_metadata(&p).is_ok_and(|m| m.is_file()) && !is_rotated(&p) {
                found.insert(p, Method::CopyTruncate);
            }
        }
    }
    match &app.run {
        Some(RunConfig::Exec(_)) => {
            let files = RunFiles::new(&app.root);
            found.insert(files.output.clone(), Method::Supervisor(files));
        }
        Some(RunConfig::Pm2(c)) => {
            for p in Pm2::new(c.clone()).log_files(&app.root) {
                found.insert(p, Method::Pm2(c.clone()));
            }
        }
        _ => {}
    }
    found
        .into_iter()
        .filter(|(p, _)| p.is_file())
        .map(|(path, method)| LogFile { path, method })
        .collect()
}

/// Whether `path` is a rotated file (`name-YYYYMMDD-<time>[.N][.gz|.zst]`),
/// not a live log.
fn is_rotated(path: &Path) -> bool {
    let name = file_name(path);
    let base = uncompressed(&name);
    base.match_indices('-').any(|(i, _)| {
        let rest = &base[i + 1..];
        rest.len() > 9
            && rest[..8].bytes().all(|b| b.is_ascii_digit())
            && rest.as_bytes()[8] == b'-'
            && rest[9..].bytes().all(|b| b.is_ascii_digit() || b == b'.')
    })
}

/// The file name of `path` as text.
fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A rotated file's name without its compression suffix.
fn uncompressed(name: &str) -> &str {
    name.trim_end_matches(".gz").trim_end_matches(".zst")
}

fn date_stamp(t: OffsetDateTime) -> String {
    format!("{:04}{:02}{:02}", t.year(), u8::from(t.month()), t.day())
}

/// The rotation state of one file, kept for `status` and for age checks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileState {
    /// When the agent first saw the file (age of an unrotated log).
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub first_seen: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub last_rotated_at: Option<OffsetDateTime>,
    pub last_rotated_to: Option<PathBuf>,
    pub rotations: u64,
    pub method: String,
}

/// `.slipway/logs.json`: per-file state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsState {
    pub files: BTreeMap<PathBuf, FileState>,
}

impl LogsState {
    pub fn path(root: &Path) -> PathBuf {
        root.join(".slipway/logs.json")
    }

    pub fn load(root: &Path) -> Self {
        durable::read_json(&Self::path(root)).unwrap_or_default()
    }

    pub fn save(&self, root: &Path) -> io::Result<()> {
        fs::create_dir_all(root.join(".slipway"))?;
        durable::write_json(&Self::path(root), self)
    }
}

/// One rotation done.
#[derive(Debug, Clone, Serialize)]
pub struct Rotation {
    pub file: PathBuf,
    pub rotated_to: PathBuf,
    pub bytes: u64,
    pub method: &'static str,
    /// Rotated files removed by retention.
    pub removed: Vec<PathBuf>,
}

/// Whether `file` is due: bigger than `max_size`, or older than `max_age`
/// since its last rotation (or since first seen) and not empty.
pub fn due(app: &AppConfig, file: &Path, state: &FileState, now: OffsetDateTime) -> bool {
    let Ok(meta) = fs::metadata(file) else {
        return false;
    };
    if meta.len() == 0 {
        return false;
    }
    if app.logs.max_size.is_some_and(|max| meta.len() > max) {
        return true;
    }
    let since = state.last_rotated_at.or(state.first_seen);
    match (app.logs.max_age, since) {
        (Some(age), Some(t)) => now - t >= age,
        _ => false,
    }
}

/// Rotates every due log of `app` (or every non-empty one with `force`).
pub fn rotate_app(app: &AppConfig, force: bool) -> (Vec<Rotation>, Vec<LogError>) {
    let _lock = match lock_rotation(&app.root) {
        Ok(l) => l,
        Err(e) => return (Vec::new(), vec![e]),
    };
    let now = OffsetDateTime::now_utc();
    let mut state = LogsState::load(&app.root);
    let before = state.clone();
    let (mut done, mut errors) = (Vec::new(), Vec::new());
    for file in discover(app) {
        let entry = state.files.entry(file.path.clone()).or_default();
        entry.first_seen.get_or_insert(now);
        entry.method = file.method.name().to_owned();
        let is_due = if force {
            fs::metadata(&file.path).is_ok_and(|m| m.len() > 0)
        } else {
            due(app, &file.path, entry, now)
        };
        if !is_due {
            continue;
        }
        match rotate(app, &file, now) {
            Ok(r) => {
                entry.last_rotated_at = Some(now);
                entry.last_rotated_to = Some(r.rotated_to.clone());
                entry.rotations += 1;
                done.push(r);
            }
            Err(e) => errors.push(e),
        }
    }
    // Most passes (one per burst of writes to a watched log) change nothing:
    // they need not rewrite and fsync the file.
    if state == before {
        return (done, errors);
    }
    if let Err(e) = state.save(&app.root) {
        errors.push(LogError::Io {
            action: "write",
            path: LogsState::path(&app.root),
            source: e,
        });
    }
    (done, errors)
}

/// Takes the app's rotation lock. One rotator per app at a time (the agent's
/// loop and a `logs --rotate` may both try): waits, rather than fails, for the
/// other to finish.
fn lock_rotation(root: &Path) -> Result<nix::fcntl::Flock<File>, LogError> {
    let path = root.join(".slipway/logs.lock");
    let file = fs::create_dir_all(root.join(".slipway"))
        .and_then(|()| {
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
        })
        .map_err(io_err("open", &path))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| {
        LogError::Io {
            action: "lock",
            path,
            source: io::Error::from(e),
        }
    })
}

/// A rotated name beside `path`, after every existing one: within the same
/// second a `.N` suffix one higher than any present (so the order survives
/// retention deleting the oldest).
fn rotated_name(path: &Path, now: OffsetDateTime) -> PathBuf {
    let name = file_name(path);
    let base = format!("{name}-{}-{}", date_stamp(now), now.unix_timestamp());
    let same_second: Vec<u64> = path
        .parent()
        .and_then(|d| fs::read_dir(d).ok())
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            let rest = n.strip_prefix(&base)?;
            let rest = uncompressed(rest);
            match rest {
                "" => Some(0),
                r => r.strip_prefix('.')?.parse().ok(),
            }
        })
        .collect();
    match same_second.iter().max() {
        None => path.with_file_name(base),
        Some(n) => path.with_file_name(format!("{base}.{}", n + 1)),
    }
}

/// Rotates one file now.
pub fn rotate(app: &AppConfig, file: &LogFile, now: OffsetDateTime) -> Result<Rotation, LogError> {
    let to = rotated_name(&file.path, now);
    let bytes;
    match &file.method {
        Method::CopyTruncate => {
            bytes = fs::copy(&file.path, &to).map_err(io_err("copy", &file.path))?;
            // Lines written between the copy above and this truncate are lost:
            // the documented window of copytruncate.
            OpenOptions::new()
                .write(true)
                .open(&file.path)
                .and_then(|f| f.set_len(0))
                .map_err(io_err("truncate", &file.path))?;
        }
        Method::Supervisor(files) => {
            bytes = fs::metadata(&file.path).map(|m| m.len()).unwrap_or(0);
            fs::rename(&file.path, &to).map_err(io_err("rename", &file.path))?;
            reopen_supervisor(files)?;
        }
        Method::Pm2(cfg) => {
            bytes = fs::metadata(&file.path).map(|m| m.len()).unwrap_or(0);
            fs::rename(&file.path, &to).map_err(io_err("rename", &file.path))?;
            Pm2::new(cfg.clone())
                .reload_logs()
                .map_err(|e| LogError::Reopen {
                    path: file.path.clone(),
                    message: e.to_string(),
                })?;
        }
    }
    let rotated_to = compress(&to, app.logs.compress)?;
    let (removed, _) = retain(&file.path, app.logs.keep)?;
    tracing::info!(file = %file.path.display(), to = %rotated_to.display(), bytes, "rotated");
    Ok(Rotation {
        file: file.path.clone(),
        rotated_to,
        bytes,
        method: file.method.name(),
        removed,
    })
}

/// Tells the supervisor to reopen and waits until it has (so nothing is
/// still written to the renamed file when it is compressed).
fn reopen_supervisor(files: &RunFiles) -> Result<(), LogError> {
    if !supervise::is_running(files) {
        return Ok(());
    }
    let Some(before) = State::load(files) else {
        return Ok(());
    };
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(before.supervisor_pid as i32),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .map_err(|e| LogError::Reopen {
        path: files.output.clone(),
        message: format!(
            "cannot signal supervisor pid {}: {e}",
            before.supervisor_pid
        ),
    })?;
    let deadline = Instant::now() + REOPEN_WAIT;
    while Instant::now() < deadline {
        if State::load(files).is_some_and(|s| s.log_generation > before.log_generation) {
            return Ok(());
        }
        std::thread::sleep(POLL);
    }
    Err(LogError::Reopen {
        path: files.output.clone(),
        message: format!(
            "supervisor pid {} did not reopen within {REOPEN_WAIT:?}",
            before.supervisor_pid
        ),
    })
}

/// Compresses `path` into `path.gz`/`path.zst` (then removes `path`).
pub fn compress(path: &Path, how: Compress) -> Result<PathBuf, LogError> {
    let ext = match how {
        Compress::None => return Ok(path.to_owned()),
        Compress::Gzip => "gz",
        Compress::Zstd => "zst",
    };
    let name = file_name(path);
    let out = path.with_file_name(format!("{name}.{ext}"));
    let tmp = durable::temp_sibling(&out, "part");
    let result = (|| -> io::Result<()> {
        let mut input = BufReader::with_capacity(1 << 20, File::open(path)?);
        let output = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
        let file = match how {
            Compress::Gzip => {
                let mut enc = flate2::write::GzEncoder::new(output, flate2::Compression::default());
                io::copy(&mut input, &mut enc)?;
                enc.finish()?.into_inner().map_err(|e| e.into_error())?
            }
            _ => {
                let mut enc = zstd::stream::write::Encoder::new(output, 3)?;
                io::copy(&mut input, &mut enc)?;
                enc.finish()?.into_inner().map_err(|e| e.into_error())?
            }
        };
        file.sync_all()?;
        fs::rename(&tmp, &out)?;
        fs::remove_file(path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(LogError::Io {
            action: "compress",
            path: path.to_owned(),
            source: e,
        });
    }
    Ok(out)
}

/// The rotated files of live log `path`, oldest first.
pub fn rotated_files(path: &Path) -> Vec<PathBuf> {
    let Some(dir) = path.parent() else {
        return Vec::new();
    };
    let prefix = format!("{}-", file_name(path));
    let mut out: Vec<(SystemTime, String, PathBuf)> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let rest = name.strip_prefix(&prefix)?;
            // `YYYYMMDD-…`: not some other log that shares the prefix.
            if rest.len() < 9
                || !rest[..8].bytes().all(|b| b.is_ascii_digit())
                || rest.as_bytes()[8] != b'-'
            {
                return None;
            }
            let mtime = e.metadata().ok()?.modified().ok()?;
            Some((mtime, name, e.path()))
        })
        .collect();
    // Names sort by time (date, then unix time); ties by a `.N` suffix.
    out.sort_by(|a, b| {
        rotated_key(&a.1)
            .cmp(&rotated_key(&b.1))
            .then(a.0.cmp(&b.0))
    });
    out.into_iter().map(|(_, _, p)| p).collect()
}

/// (unix time, suffix number) of a rotated name, for ordering.
fn rotated_key(name: &str) -> (i64, u64) {
    let base = uncompressed(name);
    let (stamp, n) = match base.rsplit_once('.') {
        Some((s, n)) if n.bytes().all(|b| b.is_ascii_digit()) => (s, n.parse().unwrap_or(0)),
        _ => (base, 0),
    };
    let unix = stamp
        .rsplit('-')
        .next()
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    (unix, n)
}

/// Keeps the newest `keep` rotated files of `path`; returns what it removed
/// and the bytes that freed.
pub fn retain(path: &Path, keep: usize) -> Result<(Vec<PathBuf>, u64), LogError> {
    let files = rotated_files(path);
    let excess = files.len().saturating_sub(keep);
    let (mut removed, mut bytes) = (Vec::new(), 0);
    for f in files.into_iter().take(excess) {
        let size = fs::metadata(&f).map_or(0, |m| m.len());
        fs::remove_file(&f).map_err(io_err("remove", &f))?;
        bytes += size;
        removed.push(f);
    }
    Ok((removed, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn app(root: &Path) -> AppConfig {
        let mut a = AppConfig::with_defaults("web", root.to_owned());
        a.logs.keep = 3;
        a.logs.max_size = Some(100);
        a
    }

    #[test]
    fn copytruncate_rotation_compresses_and_keeps_n() {
        let dir = tempfile::tempdir().unwrap();
        let a = app(dir.path());
        let logs = dir.path().join("shared/logs");
        fs::create_dir_all(&logs).unwrap();
        let live = logs.join("app.log");
        for i in 0..5 {
            fs::write(&live, format!("round {i}\n").repeat(20)).unwrap();
            let (done, errors) = rotate_app(&a, false);
            assert!(errors.is_empty(), "{errors:?}");
            assert_eq!(done.len(), 1, "round {i}");
            assert_eq!(fs::metadata(&live).unwrap().len(), 0);
        }
        let rotated = rotated_files(&live);
        assert_eq!(rotated.len(), 3, "{rotated:?}");
        // The newest kept file holds the last round.
        let mut text = String::new();
        flate2::read::GzDecoder::new(File::open(rotated.last().unwrap()).unwrap())
            .read_to_string(&mut text)
            .unwrap();
        assert!(text.starts_with("round 4"), "{text}");
        assert!(rotated[0].to_string_lossy().contains(&format!(
            "app.log-{}-",
            date_stamp(OffsetDateTime::now_utc())
        )));
        // Rotated files are not picked up as live logs.
        assert_eq!(discover(&a).len(), 1);
        let state = LogsState::load(dir.path());
        assert_eq!(state.files[&live].rotations, 5);
    }

    #[test]
    fn small_young_logs_are_left_alone_and_age_triggers() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = app(dir.path());
        a.logs.max_age = Some(Duration::from_secs(3600));
        let live = dir.path().join("shared/logs/app.log");
        fs::create_dir_all(live.parent().unwrap()).unwrap();
        fs::write(&live, "short\n").unwrap();
        let now = OffsetDateTime::now_utc();
        let mut st = FileState {
            first_seen: Some(now),
            ..FileState::default()
        };
        assert!(!due(&a, &live, &st, now));
        st.first_seen = Some(now - Duration::from_secs(7200));
        assert!(due(&a, &live, &st, now));
        fs::write(&live, "").unwrap();
        assert!(!due(&a, &live, &st, now), "empty files are never rotated");
    }

    #[test]
    fn a_pass_that_changes_nothing_leaves_the_state_file_alone() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let a = app(dir.path());
        let live = dir.path().join("shared/logs/app.log");
        fs::create_dir_all(live.parent().unwrap()).unwrap();
        fs::write(&live, "short\n").unwrap();
        let state = LogsState::path(dir.path());
        rotate_app(&a, false);
        let first = fs::metadata(&state).unwrap().ino();
        let (done, errors) = rotate_app(&a, false);
        assert!(done.is_empty() && errors.is_empty(), "{errors:?}");
        // write_atomic renames a new file in: the same inode means no rewrite.
        assert_eq!(fs::metadata(&state).unwrap().ino(), first);
        fs::write(&live, "x".repeat(200)).unwrap();
        let (done, _) = rotate_app(&a, false);
        assert_eq!(done.len(), 1);
        assert_ne!(fs::metadata(&state).unwrap().ino(), first);
    }

    #[test]
    fn zstd_and_no_compression() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.log-20261125-1");
        fs::write(&p, "hello\n".repeat(1000)).unwrap();
        let z = compress(&p, Compress::Zstd).unwrap();
        assert!(z.to_string_lossy().ends_with(".zst") && !p.exists());
        let back = zstd::stream::decode_all(File::open(&z).unwrap()).unwrap();
        assert_eq!(back, "hello\n".repeat(1000).as_bytes());
        let q = dir.path().join("y.log-20261125-1");
        fs::write(&q, "x").unwrap();
        assert_eq!(compress(&q, Compress::None).unwrap(), q);
    }

    #[test]
    fn rotated_names_never_collide_within_a_second() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("a.log");
        let now = OffsetDateTime::now_utc();
        let mut names = Vec::new();
        for _ in 0..3 {
            let n = rotated_name(&live, now);
            fs::write(&n, "x").unwrap();
            names.push(n);
        }
        names.dedup();
        assert_eq!(names.len(), 3);
        assert_eq!(rotated_files(&live), names, "ordered oldest first");
    }
}
