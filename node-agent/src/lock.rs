//! Locks through `flock(2)`: one operation per app at a time ([`AppLock`]),
//! the artifact cache pinned by fetches in flight ([`CachePin`],
//! [`CacheClean`]), and [`is_held`] for any of them (the exec driver's
//! supervisor says it is alive with one too).
//!
//! The kernel drops an flock when its holder dies, however it dies, so there
//! is never a stale lock to clean up by hand (the most common complaint about
//! Deployer's and Kamal's lock files). The holder writes who it is into the
//! lock file so a second caller can say *who* holds it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

/// Who holds an app's lock, as written into the lock file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    /// What the holder is doing: `deploy`, `rollback`, `prune`, `recover`.
    pub operation: String,
    /// The release it is working on, when there is one.
    pub release: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: time::OffsetDateTime,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let started = self
            .started_at
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| self.started_at.to_string());
        write!(f, "pid {} ({}", self.pid, self.operation)?;
        if let Some(r) = &self.release {
            write!(f, " of release {r}")?;
        }
        write!(f, ", started {started})")
    }
}

/// Errors taking the lock.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{operation} in progress for app {app:?} by {}", holder_text(holder))]
    Busy {
        app: String,
        operation: String,
        holder: Option<Holder>,
    },
    #[error("cannot open lock file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn holder_text(h: &Option<Holder>) -> String {
    match h {
        Some(h) => h.to_string(),
        None => "another process (holder unknown)".to_owned(),
    }
}

/// The operations the agent runs by itself (`run`'s liveness and
/// housekeeping passes): one someone asked for waits for these.
pub const BACKGROUND_OPERATIONS: [&str; 4] =
    ["reconcile", "repair", "liveness restart", "disk pressure"];
/// How long an asked-for operation waits for a background one.
const BACKGROUND_WAIT: std::time::Duration = std::time::Duration::from_secs(120);
/// Between two tries while waiting.
const BACKGROUND_POLL: std::time::Duration = std::time::Duration::from_millis(100);
/// Any holder is waited for this long before the rules below apply: a
/// holder writes its record only after it took the lock (it reads as
/// unknown until then), and [`is_held`] probes hold a shared lock for an
/// instant, with the last holder's record still in the file.
const UNRECORDED_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

fn is_background(operation: &str) -> bool {
    BACKGROUND_OPERATIONS.contains(&operation)
}

/// A held lock; dropping it releases the lock.
#[derive(Debug)]
pub struct AppLock {
    flock: Flock<File>,
}

impl AppLock {
    /// Takes the lock at `path` without waiting, recording `holder` in it.
    pub fn acquire(path: &Path, app: &str, holder: &Holder) -> Result<Self, LockError> {
        let io = |source| LockError::Io {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        let ours_is_background = is_background(&holder.operation);
        let patience = std::time::Instant::now() + BACKGROUND_WAIT;
        let unrecorded_patience = std::time::Instant::now() + UNRECORDED_WAIT;
        let mut file = file;
        let mut flock = loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(l) => break l,
                Err((back, nix::errno::Errno::EWOULDBLOCK)) => {
                    let theirs = read_holder(path);
                    // The agent's own passes (a reconcile, a repair, a
                    // restart after liveness failures, disk-pressure
                    // pruning) are short and come by themselves: an
                    // operation someone asked for waits for them (bounded)
                    // instead of failing. Anything else is refused at once,
                    // naming the holder.
                    let background = theirs.as_ref().is_some_and(|h| is_background(&h.operation));
                    // A lock taken a moment ago (no record yet) or an
                    // is_held probe: wait briefly before judging.
                    if std::time::Instant::now() < unrecorded_patience {
                        std::thread::sleep(BACKGROUND_POLL);
                        file = back;
                        continue;
                    }
                    if background && !ours_is_background && std::time::Instant::now() < patience {
                        std::thread::sleep(BACKGROUND_POLL);
                        file = back;
                        continue;
                    }
                    return Err(LockError::Busy {
                        app: app.to_owned(),
                        operation: theirs
                            .as_ref()
                            .map(|h| h.operation.clone())
                            .unwrap_or_else(|| "operation".to_owned()),
                        holder: theirs,
                    });
                }
                Err((_, errno)) => return Err(io(std::io::Error::from(errno))),
            }
        };
        let text = serde_json::to_vec(holder).unwrap_or_default();
        flock.set_len(0).map_err(io)?;
        flock.seek(SeekFrom::Start(0)).map_err(io)?;
        flock.write_all(&text).map_err(io)?;
        Ok(Self { flock })
    }
}

impl AppLock {
    /// Rewrites the holder record (e.g. once the release id is known). Best
    /// effort: the record only feeds messages.
    pub fn update(&mut self, holder: &Holder) {
        let text = serde_json::to_vec(holder).unwrap_or_default();
        let _ = self.flock.set_len(0);
        let _ = self.flock.seek(SeekFrom::Start(0));
        let _ = self.flock.write_all(&text);
    }
}

/// The holder recorded in a lock file, if it can be read.
pub fn read_holder(path: &Path) -> Option<Holder> {
    let mut text = String::new();
    File::open(path).ok()?.read_to_string(&mut text).ok()?;
    serde_json::from_str(&text).ok()
}

/// A fetch into an app's artifact cache in flight: a shared `flock` on the
/// cache lock file, taken before the cache is looked at and held until the
/// deploy that uses the artifact holds the app's lock. A network fetch runs
/// without the app's lock (a node-local rollback must not wait for a
/// download), so this is what keeps a prune's cache clean-up — which needs
/// the same lock exclusively and skips itself when it cannot have it — from
/// removing a temp file being written or an artifact about to be deployed.
/// The kernel drops it when its holder dies, so it never goes stale.
#[derive(Debug)]
pub struct CachePin {
    _flock: Flock<File>,
}

/// The cache clean-up's exclusive hold on the cache lock file: no fetch is
/// in flight while it lives, and none starts.
#[derive(Debug)]
pub struct CacheClean {
    _flock: Flock<File>,
}

fn open_lock_file(path: &Path) -> Result<File, LockError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|source| LockError::Io {
            path: path.to_owned(),
            source,
        })
}

impl CachePin {
    /// Pins the cache whose lock file is `path`. Blocks while a clean-up
    /// holds it (a directory scan and a few unlinks), never longer.
    pub fn acquire(path: &Path) -> Result<Self, LockError> {
        let file = open_lock_file(path)?;
        let flock =
            Flock::lock(file, FlockArg::LockShared).map_err(|(_, errno)| LockError::Io {
                path: path.to_owned(),
                source: errno.into(),
            })?;
        Ok(Self { _flock: flock })
    }
}

impl CacheClean {
    /// The clean-up's hold, or `None` while some fetch has the cache pinned.
    pub fn try_acquire(path: &Path) -> Result<Option<Self>, LockError> {
        let file = open_lock_file(path)?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(flock) => Ok(Some(Self { _flock: flock })),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, errno)) => Err(LockError::Io {
                path: path.to_owned(),
                source: errno.into(),
            }),
        }
    }
}

/// Whether some process holds the lock at `path` right now.
pub fn is_held(path: &Path) -> bool {
    let Ok(file) = File::open(path) else {
        return false;
    };
    match Flock::lock(file, FlockArg::LockSharedNonblock) {
        Ok(_) => false,
        Err((_, errno)) => errno == nix::errno::Errno::EWOULDBLOCK,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(op: &str) -> Holder {
        Holder {
            pid: std::process::id(),
            operation: op.into(),
            release: Some("v2".into()),
            started_at: time::OffsetDateTime::now_utc(),
        }
    }

    #[test]
    fn second_acquire_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lock");
        let held = AppLock::acquire(&p, "web", &holder("deploy")).unwrap();
        assert!(is_held(&p));
        let err = AppLock::acquire(&p, "web", &holder("prune")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("deploy in progress"), "{msg}");
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        assert!(msg.contains("release v2"), "{msg}");
        drop(held);
        assert!(!is_held(&p));
        AppLock::acquire(&p, "web", &holder("prune")).unwrap();
    }

    #[test]
    fn an_asked_for_operation_waits_for_the_agents_own_pass_and_only_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lock");
        // A reconcile holds the lock for a moment: a deploy waits for it.
        let held = AppLock::acquire(&p, "web", &holder("reconcile")).unwrap();
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(held);
        });
        let t = std::time::Instant::now();
        let deploy = AppLock::acquire(&p, "web", &holder("deploy")).unwrap();
        assert!(t.elapsed() >= std::time::Duration::from_millis(250));
        releaser.join().unwrap();
        drop(deploy);
        // Another background pass does not wait: it comes again by itself.
        let held = AppLock::acquire(&p, "web", &holder("repair")).unwrap();
        let err = AppLock::acquire(&p, "web", &holder("reconcile")).unwrap_err();
        assert!(err.to_string().contains("repair in progress"), "{err}");
        drop(held);
    }

    #[test]
    fn a_pinned_cache_is_not_cleaned_and_pins_share() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cache.lock");
        let first = CachePin::acquire(&p).unwrap();
        let second = CachePin::acquire(&p).unwrap();
        assert!(CacheClean::try_acquire(&p).unwrap().is_none());
        drop(first);
        assert!(CacheClean::try_acquire(&p).unwrap().is_none());
        drop(second);
        let clean = CacheClean::try_acquire(&p).unwrap();
        assert!(clean.is_some());
        // A second clean-up at the same time is told to skip too.
        assert!(CacheClean::try_acquire(&p).unwrap().is_none());
    }
}
