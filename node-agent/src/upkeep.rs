//! What the agent keeps about keeping each app running, in the app's
//! `.slipway/`:
//!
//! - `stopped.json`: the app was stopped on purpose (`slipway-agent stop`,
//!   `slipway stop`); `run` repairs and restarts nothing while it is there.
//!   `start` (and any deploy, rollback or restart that runs the app again)
//!   removes it.
//! - `recovery.json`: the restarts and repairs `run` made (for the crash
//!   loop limit and the backoff between them) and whether the app is
//!   crashlooping.
//! - `events.json`: node events (`APP_RESTORED`, `APP_CRASHLOOPING`,
//!   `APP_ROLLED_BACK`) for `status` and the controller's audit log. Each is
//!   kept with `sent = false` until the controller acknowledged it, so an
//!   event made while the controller is away reaches it on the next
//!   session, and one acknowledged is never sent again.
//!
//! Every file is replaced through [`crate::durable`]; the read-modify-write
//! of the events file is serialised within the process by one mutex (only
//! `run` — its liveness loops and its controller session — writes it).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::durable;

/// Acknowledged events kept for `status` (unsent ones are always kept).
const KEEP_SENT: usize = 50;
/// Unsent events kept at most: a controller gone for months must not grow
/// the file without bound (the oldest are dropped, with a warning).
const KEEP_UNSENT: usize = 1000;

/// Serialises read-modify-write of every app's events file in this process
/// (threads); [`EventsFileLock`] does it between processes (`slipway-agent
/// rollback` records an event while `slipway-agent run` marks others sent).
static EVENTS_LOCK: Mutex<()> = Mutex::new(());

/// An exclusive `flock(2)` on an app's `.slipway/events.lock`, held while
/// its events file is read, changed and written.
struct EventsFileLock {
    _flock: nix::fcntl::Flock<std::fs::File>,
}

impl EventsFileLock {
    fn take(root: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(state_dir(root).join("events.lock"))?;
        let flock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, errno)| std::io::Error::from(errno))?;
        Ok(Self { _flock: flock })
    }
}

fn state_dir(root: &Path) -> PathBuf {
    root.join(".slipway")
}

fn stopped_path(root: &Path) -> PathBuf {
    state_dir(root).join("stopped.json")
}

fn recovery_path(root: &Path) -> PathBuf {
    state_dir(root).join("recovery.json")
}

fn events_path(root: &Path) -> PathBuf {
    state_dir(root).join("events.json")
}

/// The files of this module for one app, for the controller session's
/// inotify watch ([`crate::link::watch`] is above; it asks).
pub fn state_files(root: &Path) -> [PathBuf; 3] {
    [stopped_path(root), recovery_path(root), events_path(root)]
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// An app stopped on purpose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stopped {
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// Who asked: "slipway-agent stop", "controller (command …)".
    pub by: String,
}

/// Records that the app was stopped on purpose (durably, before the driver
/// stops it, so `run` never restarts it in between).
pub fn record_stop(root: &Path, by: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(state_dir(root))?;
    durable::write_json(
        &stopped_path(root),
        &Stopped {
            at: now(),
            by: by.to_owned(),
        },
    )
}

/// The stop on purpose, if the app is stopped.
pub fn stopped(root: &Path) -> Option<Stopped> {
    durable::read_json(&stopped_path(root))
}

/// Clears a stop on purpose (and a crash loop: the app is being run again
/// by someone's decision). Returns whether the app was stopped.
pub fn clear_stop(root: &Path) -> std::io::Result<bool> {
    let path = stopped_path(root);
    let was = match std::fs::remove_file(&path) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(e),
    };
    if was {
        durable::fsync_parent(&path)?;
    }
    Ok(was)
}

/// A crash loop: the restarts stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Crashloop {
    pub release: String,
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
    /// Restarts within the window when it was declared.
    pub restarts: u32,
    /// What `run` did about it ("rolled back to v1", "left stopped: …").
    pub action: String,
}

/// The restarts `run` made of the current release.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recovery {
    /// The release these restarts were of; a new current release starts a
    /// new record.
    pub release: Option<String>,
    /// When each restart or repair was made (unix seconds), oldest first.
    pub restarts: Vec<i64>,
    /// Set when the restarts stopped.
    pub crashloop: Option<Crashloop>,
}

impl Recovery {
    /// The record for `release` (a record of another release is dropped).
    pub fn load(root: &Path, release: &str) -> Self {
        match durable::read_json::<Self>(&recovery_path(root)) {
            Some(r) if r.release.as_deref() == Some(release) => r,
            _ => Self {
                release: Some(release.to_owned()),
                ..Self::default()
            },
        }
    }

    /// Whatever record there is (for `status` and heartbeats).
    pub fn read(root: &Path) -> Option<Self> {
        durable::read_json(&recovery_path(root))
    }

    pub fn save(&self, root: &Path) -> std::io::Result<()> {
        durable::write_json(&recovery_path(root), self)
    }

    /// Forgets restarts and any crash loop (`start`, a deploy).
    pub fn clear(root: &Path) -> std::io::Result<()> {
        match std::fs::remove_file(recovery_path(root)) {
            Ok(()) => durable::fsync_parent(&recovery_path(root)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Restarts made within `window` before `now` (older ones are dropped).
    pub fn in_window(&mut self, now: i64, window: std::time::Duration) -> u32 {
        let since = now.saturating_sub(i64::try_from(window.as_secs()).unwrap_or(i64::MAX));
        self.restarts.retain(|&t| t > since);
        u32::try_from(self.restarts.len()).unwrap_or(u32::MAX)
    }
}

/// How long to wait after the last restart before the next one, when
/// `made` restarts were made within the window: none before the first, then
/// `base`, doubled for each further one, at most `cap`.
pub fn backoff(
    made: u32,
    base: std::time::Duration,
    cap: std::time::Duration,
) -> std::time::Duration {
    if made == 0 {
        return std::time::Duration::ZERO;
    }
    let factor = 1u32.checked_shl(made - 1).unwrap_or(u32::MAX);
    base.checked_mul(factor).unwrap_or(cap).min(cap)
}

/// The crash loop of `current`, if it is crashlooping.
pub fn crashloop(root: &Path, current: Option<&str>) -> Option<Crashloop> {
    let r = Recovery::read(root)?;
    let c = r.crashloop?;
    (Some(c.release.as_str()) == current).then_some(c)
}

/// What the agent's keeping says about the app, overriding its health
/// verdict: `stopped: …` (on purpose) or `crashlooping: …`; `None` when
/// neither.
pub fn verdict(root: &Path, current: Option<&str>) -> Option<String> {
    if let Some(s) = stopped(root) {
        let at =
            s.at.format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default();
        return Some(format!("stopped: on purpose by {} at {at}", s.by));
    }
    let c = crashloop(root, current)?;
    Some(format!(
        "crashlooping: {} restarts of {} within the window; {}",
        c.restarts, c.release, c.action
    ))
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EventKind {
    /// The app's current release was (re)started: drift from what should
    /// run, or liveness failures.
    AppRestored,
    /// Restarts stopped: too many within the window.
    AppCrashlooping,
    /// A crashlooping release was rolled back by the agent.
    AppRolledBack,
    /// Someone on the node deployed with `slipway-agent deploy`.
    LocalDeploy,
    /// Someone on the node rolled back with `slipway-agent rollback`.
    LocalRollback,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AppRestored => "APP_RESTORED",
            Self::AppCrashlooping => "APP_CRASHLOOPING",
            Self::AppRolledBack => "APP_ROLLED_BACK",
            Self::LocalDeploy => "LOCAL_DEPLOY",
            Self::LocalRollback => "LOCAL_ROLLBACK",
        }
    }
}

/// One node event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Unique on this node: `<app>.<unix ms>.<seq>`; the controller records
    /// an id once.
    pub id: String,
    pub kind: EventKind,
    pub app: String,
    /// The release that runs after it (or was found crashlooping).
    pub release: String,
    /// The release rolled back from (APP_ROLLED_BACK).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub from_release: String,
    /// What was found ("the PM2 daemon is not running", "3 liveness
    /// failures in a row: …").
    pub cause: String,
    /// What was done and how it ended.
    pub outcome: String,
    /// Whether it did what it meant to (the app serves again).
    pub ok: bool,
    /// LOCAL_*: the local user who ran the command.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub actor: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// The controller acknowledged it.
    #[serde(default)]
    pub sent: bool,
}

/// The events file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Events {
    pub next_seq: u64,
    /// Oldest first.
    pub events: Vec<Event>,
}

impl Events {
    pub fn load(root: &Path) -> Self {
        durable::read_json(&events_path(root)).unwrap_or_default()
    }

    fn trim(&mut self) {
        let sent = self.events.iter().filter(|e| e.sent).count();
        let mut drop_sent = sent.saturating_sub(KEEP_SENT);
        self.events.retain(|e| {
            if e.sent && drop_sent > 0 {
                drop_sent -= 1;
                false
            } else {
                true
            }
        });
        let unsent = self.events.iter().filter(|e| !e.sent).count();
        if unsent > KEEP_UNSENT {
            tracing::warn!(
                dropped = unsent - KEEP_UNSENT,
                "too many node events the controller has not acknowledged; dropping the oldest"
            );
            let mut drop = unsent - KEEP_UNSENT;
            self.events.retain(|e| {
                if !e.sent && drop > 0 {
                    drop -= 1;
                    false
                } else {
                    true
                }
            });
        }
    }
}

/// What an event says, before it has an id.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub kind: EventKind,
    pub release: String,
    pub from_release: String,
    pub cause: String,
    pub outcome: String,
    pub ok: bool,
    /// Who ran a node-local command; empty for the agent's own events.
    pub actor: String,
}

/// Records an event of `app` durably (the controller session notices the
/// file change through inotify).
pub fn record_event(root: &Path, app: &str, e: NewEvent) -> std::io::Result<Event> {
    let _guard = EVENTS_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    std::fs::create_dir_all(state_dir(root))?;
    let _file_lock = EventsFileLock::take(root)?;
    let mut events = Events::load(root);
    let at = now();
    let event = Event {
        id: format!(
            "{app}.{}.{}",
            at.unix_timestamp_nanos() / 1_000_000,
            events.next_seq
        ),
        kind: e.kind,
        app: app.to_owned(),
        release: e.release,
        from_release: e.from_release,
        cause: e.cause,
        outcome: e.outcome,
        ok: e.ok,
        actor: e.actor,
        at,
        sent: false,
    };
    events.next_seq += 1;
    events.events.push(event.clone());
    events.trim();
    durable::write_json(&events_path(root), &events)?;
    Ok(event)
}

/// Events of the app at `root` the controller has not acknowledged.
pub fn unsent(root: &Path) -> Vec<Event> {
    Events::load(root)
        .events
        .into_iter()
        .filter(|e| !e.sent)
        .collect()
}

/// Marks the events `ids` of the app at `root` as acknowledged.
pub fn mark_sent(root: &Path, ids: &[String]) -> std::io::Result<()> {
    let _guard = EVENTS_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    if !state_dir(root).is_dir() {
        return Ok(());
    }
    let _file_lock = EventsFileLock::take(root)?;
    let mut events = Events::load(root);
    let mut changed = false;
    for e in &mut events.events {
        if !e.sent && ids.contains(&e.id) {
            e.sent = true;
            changed = true;
        }
    }
    if changed {
        events.trim();
        durable::write_json(&events_path(root), &events)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let s = Duration::from_secs;
        assert_eq!(backoff(0, s(5), s(300)), s(0));
        assert_eq!(backoff(1, s(5), s(300)), s(5));
        assert_eq!(backoff(2, s(5), s(300)), s(10));
        assert_eq!(backoff(4, s(5), s(300)), s(40));
        assert_eq!(backoff(10, s(5), s(300)), s(300));
        assert_eq!(backoff(u32::MAX, s(5), s(300)), s(300));
    }

    #[test]
    fn events_are_kept_until_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let new = |cause: &str| NewEvent {
            kind: EventKind::AppRestored,
            release: "v1".into(),
            from_release: String::new(),
            cause: cause.into(),
            outcome: "started".into(),
            ok: true,
            actor: String::new(),
        };
        let a = record_event(dir.path(), "web", new("a")).unwrap();
        let b = record_event(dir.path(), "web", new("b")).unwrap();
        assert_ne!(a.id, b.id);
        assert_eq!(unsent(dir.path()).len(), 2);
        mark_sent(dir.path(), std::slice::from_ref(&a.id)).unwrap();
        let left = unsent(dir.path());
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].id, b.id);
        assert_eq!(Events::load(dir.path()).events.len(), 2);
    }

    #[test]
    fn stop_is_recorded_and_cleared() {
        let dir = tempfile::tempdir().unwrap();
        assert!(stopped(dir.path()).is_none());
        record_stop(dir.path(), "test").unwrap();
        assert_eq!(stopped(dir.path()).unwrap().by, "test");
        assert!(clear_stop(dir.path()).unwrap());
        assert!(!clear_stop(dir.path()).unwrap());
    }

    #[test]
    fn restarts_outside_the_window_do_not_count() {
        let mut r = Recovery {
            restarts: vec![100, 500, 900],
            ..Recovery::default()
        };
        assert_eq!(r.in_window(1000, Duration::from_secs(600)), 2);
        assert_eq!(r.restarts, vec![500, 900]);
    }
}
