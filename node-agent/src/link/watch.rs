//! Noticing, through inotify, that an app's state on disk changed: its
//! `current` symlink was switched or its journal rewritten — by a node-local
//! `slipway-agent deploy`/`rollback` run from a shell as much as by a
//! controller command. The controller session ([`crate::link::session`]) sends a
//! heartbeat at once on such a change instead of up to one interval later.
//!
//! So do the files of [`crate::upkeep`] — a node event recorded, a stop on
//! purpose, a crash loop — so they reach the controller at once too (the
//! session sends unacknowledged node events on every change and beat).
//!
//! Only those names count: the liveness loop rewrites `health.json`
//! every few seconds and must not turn every probe into a heartbeat. Events
//! are gathered for [`DEBOUNCE`] after the first one, so a deploy writing
//! its journal step by step gives one heartbeat per burst, not one per step.
//!
//! An app root (or its `.slipway/`) that does not exist yet cannot be
//! watched; [`StateWatcher::refresh`] picks such directories up once they
//! appear (the session calls it on every regular heartbeat).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::Watcher as _;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Quiet time gathered after the first event before reporting a change.
pub const DEBOUNCE: Duration = Duration::from_millis(200);

/// inotify on every app's root and `.slipway/` directory.
pub struct StateWatcher {
    watcher: notify::RecommendedWatcher,
    /// Directories to watch: each root and each `.slipway/`.
    dirs: Vec<PathBuf>,
    /// Those of `dirs` watched so far.
    watched: BTreeSet<PathBuf>,
    events: mpsc::Receiver<()>,
    /// When the change being gathered is reported. Kept here, not in a
    /// local of [`StateWatcher::changed`], so a `select!` that drops that
    /// future midway loses no change.
    due: Option<Instant>,
}

impl std::fmt::Debug for StateWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateWatcher")
            .field("dirs", &self.dirs)
            .field("watched", &self.watched)
            .field("due", &self.due)
            .finish_non_exhaustive()
    }
}

impl StateWatcher {
    /// Watches the apps under `roots` (those that exist so far).
    pub fn new(roots: &[PathBuf]) -> notify::Result<Self> {
        let targets: BTreeSet<PathBuf> = roots
            .iter()
            .flat_map(|r| {
                [r.join("current"), journal_path(r)]
                    .into_iter()
                    .chain(crate::upkeep::state_files(r))
            })
            .collect();
        // One pending wake-up is enough: a full channel already holds one.
        let (tx, events) = mpsc::channel(1);
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if let Ok(ev) = res {
                if !matches!(ev.kind, notify::EventKind::Access(_))
                    && ev.paths.iter().any(|p| targets.contains(p))
                {
                    let _ = tx.try_send(());
                }
            }
        })?;
        let mut me = Self {
            watcher,
            dirs: roots
                .iter()
                .flat_map(|r| [r.clone(), r.join(".slipway")])
                .collect(),
            watched: BTreeSet::new(),
            events,
            due: None,
        };
        me.refresh();
        Ok(me)
    }

    /// Starts watching directories that have appeared since (an app's first
    /// deploy creates its root and `.slipway/`).
    pub fn refresh(&mut self) {
        for dir in &self.dirs {
            if self.watched.contains(dir) || !dir.is_dir() {
                continue;
            }
            match self.watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
                Ok(()) => {
                    self.watched.insert(dir.clone());
                }
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot watch app state")
                }
            }
        }
    }

    /// Resolves once some app's `current` or journal changed, [`DEBOUNCE`]
    /// after the first event of a burst. Cancel-safe.
    pub async fn changed(&mut self) {
        loop {
            if let Some(at) = self.due {
                tokio::time::sleep_until(at).await;
                self.due = None;
                // Events of the same burst are covered by this report.
                while self.events.try_recv().is_ok() {}
                return;
            }
            match self.events.recv().await {
                Some(()) => self.due = Some(Instant::now() + DEBOUNCE),
                // The watcher is gone (it lives in self, so: never); wait
                // forever rather than report changes that did not happen.
                None => std::future::pending::<()>().await,
            }
        }
    }
}

fn journal_path(root: &Path) -> PathBuf {
    crate::release::Paths::new(root).journal
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::deploy::{DeployRequest, Deployer};
    use crate::release::ReleaseId;

    /// Bound for waiting on an event that must come (not a timing claim).
    const MUST_COME: Duration = Duration::from_secs(10);
    /// Window in which an event that must not come is looked for.
    const MUST_NOT_COME: Duration = Duration::from_millis(1500);

    fn store_for(dir: &Path) -> (Deployer, PathBuf) {
        let root = dir.join("app");
        let text = format!("[apps.web]\nroot = \"{}\"\n", root.display());
        let config = Config::parse(&dir.join("agent.toml"), &text).unwrap();
        (
            Deployer::new(
                config.app("web").unwrap(),
                &crate::bridge::Bridge::current(),
            ),
            root,
        )
    }

    fn artifact(dir: &Path, version: &str) -> PathBuf {
        let src = dir.join(format!("src-{version}"));
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("VERSION"), version).unwrap();
        let out = dir.join(format!("{version}.tar.gz"));
        crate::artifact::pack_dir(&src, &out, crate::artifact::Compression::Gzip).unwrap();
        out
    }

    fn deploy(store: &Deployer, artifact: PathBuf, id: &str) {
        let id = ReleaseId::new(id).unwrap();
        let mut session = store.begin("deploy", Some(&id)).unwrap();
        let report = session
            .deploy(&DeployRequest {
                artifact,
                sha256: None,
                id: Some(id),
                verified: None,
            })
            .unwrap();
        assert_eq!(report.outcome, crate::deploy::Outcome::Succeeded);
    }

    #[tokio::test]
    async fn deploys_and_rollbacks_are_noticed_and_other_files_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let (store, root) = store_for(dir.path());
        let (v1, v2) = (artifact(dir.path(), "v1"), artifact(dir.path(), "v2"));
        // Nothing exists yet: nothing can be watched until refresh.
        let mut w = StateWatcher::new(std::slice::from_ref(&root)).unwrap();
        assert!(w.watched.is_empty());
        std::fs::create_dir_all(root.join(".slipway")).unwrap();
        w.refresh();
        assert_eq!(w.watched.len(), 2);

        deploy(&store, v1, "v1");
        tokio::time::timeout(MUST_COME, w.changed())
            .await
            .expect("the first deploy was not noticed");
        deploy(&store, v2, "v2");
        tokio::time::timeout(MUST_COME, w.changed())
            .await
            .expect("the second deploy was not noticed");

        // Late events of that deploy are taken in first (bounded).
        for _ in 0..20 {
            if tokio::time::timeout(Duration::from_millis(300), w.changed())
                .await
                .is_err()
            {
                break;
            }
        }
        // Liveness writes health.json; shared files and logs change; none
        // of that is a state change worth a heartbeat.
        std::fs::write(root.join(".slipway/health.json"), "{}").unwrap();
        std::fs::write(root.join("shared-note"), "x").unwrap();
        assert!(tokio::time::timeout(MUST_NOT_COME, w.changed())
            .await
            .is_err());

        // A node-local rollback switches `current` back.
        let mut session = store.begin("rollback", None).unwrap();
        let report = session.rollback(None).unwrap();
        assert_eq!(report.to.as_str(), "v1");
        drop(session);
        tokio::time::timeout(MUST_COME, w.changed())
            .await
            .expect("the rollback was not noticed");
    }

    #[tokio::test]
    async fn a_change_survives_a_select_that_drops_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("app");
        std::fs::create_dir_all(root.join(".slipway")).unwrap();
        let mut w = StateWatcher::new(std::slice::from_ref(&root)).unwrap();
        crate::durable::write_atomic(&journal_path(&root), b"{}").unwrap();
        // Wait until the event is taken in (the debounce has started), then
        // drop the wait midway, as a select! with another branch would.
        tokio::time::timeout(MUST_COME, async {
            while w.due.is_none() {
                let _ = tokio::time::timeout(Duration::from_millis(10), w.changed()).await;
            }
        })
        .await
        .expect("the journal write was not noticed");
        tokio::time::timeout(MUST_COME, w.changed())
            .await
            .expect("the change was lost when the wait was dropped");
    }
}
