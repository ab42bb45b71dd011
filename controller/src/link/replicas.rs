//! This controller replica among the others sharing its store: its random
//! id, its record in `replicas` renewed every [`RENEW_EVERY`], and the
//! judgement whether another replica lives (seen within
//! [`DEAD_AFTER_RENEWALS`] renewals). On SQLite, where every replica runs
//! on the machine holding the file, each also holds an exclusive `flock`
//! on `<data-dir>/replicas/<id>.lock` for as long as it runs: a replica
//! whose lock is free is dead at once (a `kill -9`, a restart), not only
//! after the window. PostgreSQL replicas on other machines are judged by
//! the window alone.
//!
//! A running deployment's lease is its owner (`deployments.owner_replica`)
//! being alive. Every renewal also takes over the running deployments of
//! replicas that are not alive ([`crate::rollout::take_over`]: a
//! conditional update, one replica wins) and carries them on; those that
//! cannot be carried on (recorded without their plan, by an older
//! controller) are failed, naming why. Every write of a deployment's
//! result is conditional on its replica still owning it, so a replica
//! that was only slow cannot write over its successor's work.
//!
//! Not right after this replica could not renew for a while (the store was
//! down or unreachable): the others could not either, so their records are
//! stale without them being dead. Nor while it cannot renew: a replica
//! whose own record is stale judges none by theirs. Until one liveness
//! window after such a gap, time for every live replica to renew again,
//! every replica with a record counts as alive, for the sweep and for
//! routing commands to the sessions the others hold alike.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use tokio_util::sync::CancellationToken;

use crate::rollout::TakeOver;
use crate::store::{Backend, ReplicaRow, Store, StoreError};

/// How often a replica renews its `seen_at` (and sweeps dead replicas'
/// deployments).
pub const RENEW_EVERY: Duration = Duration::from_secs(5);
/// A replica unseen for this many renewals is dead.
pub const DEAD_AFTER_RENEWALS: u64 = 3;
/// A replica unseen this long is forgotten (its record and session
/// records deleted): long past the liveness window, so only the dead go.
const FORGET_AFTER: Duration = Duration::from_secs(3600);
/// The folder of the data dir holding the SQLite replicas' lock files.
const LOCK_DIR: &str = "replicas";

/// Errors starting a replica.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// Its record could not be written.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No id could be drawn.
    #[error(transparent)]
    Crypto(#[from] crate::pki::crypto::CryptoError),
    /// The lock file could not be made or locked.
    #[error("replica lock file {}: {source}", path.display())]
    Lock {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The liveness window in seconds: [`DEAD_AFTER_RENEWALS`] renewals.
fn window_secs() -> i64 {
    i64::try_from(RENEW_EVERY.as_secs() * DEAD_AFTER_RENEWALS).unwrap_or(i64::MAX)
}

/// True if a replica last seen at `seen_at` is within the liveness window
/// at `now`.
pub fn seen_recently(seen_at: i64, now: i64) -> bool {
    now.saturating_sub(seen_at) <= window_secs()
}

/// True if this replica's renewal at `now` comes after at least one missed
/// renewal since the one at `before` (the store did not answer, or too
/// slowly): the other replicas' records may be stale for the same reason.
fn after_a_gap(before: i64, now: i64) -> bool {
    let every = i64::try_from(RENEW_EVERY.as_secs()).unwrap_or(i64::MAX);
    now.saturating_sub(before) > every.saturating_mul(2)
}

/// True if a replica that last renewed its own record at `renewed_at`, and
/// after its last gap judges from `judge_from`, may judge the others by
/// their records at `now`: not while its own renewals fail (the store does
/// not answer; theirs fail too), nor within the window after.
fn may_judge(renewed_at: i64, judge_from: i64, now: i64) -> bool {
    now >= judge_from && !after_a_gap(renewed_at, now)
}

/// What a replica carries dead replicas' deployments on with: its agent
/// sessions and command routing.
#[derive(Debug, Clone)]
pub struct Carrier {
    /// This replica's agent sessions.
    pub sessions: crate::link::registry::Sessions,
    /// Routing of the agents' answers.
    pub commands: crate::link::commands::Commands,
    /// Where followers of this replica's deployments find their events.
    pub live: crate::api::live::Live,
    /// Told of each deployment taken over (GitHub's statuses follow it).
    pub observer: Option<crate::rollout::Observer>,
}

/// This replica; cheap to clone.
#[derive(Debug, Clone)]
pub struct Replica {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    id: String,
    store: Store,
    /// SQLite: where the replicas' lock files are.
    lock_dir: Option<PathBuf>,
    /// Held while this replica runs (SQLite).
    _lock: Option<Flock<File>>,
    record: ReplicaRow,
    /// When this replica last renewed its record ([`may_judge`]).
    renewed_at: AtomicI64,
    /// Before when it judges no other replica dead ([`may_judge`]).
    judge_from: AtomicI64,
}

impl Replica {
    /// Draws an id, takes the lock (SQLite) and records this replica
    /// serving gRPC on `grpc_addr` (and HTTP on `http_addr`).
    pub async fn start(
        store: &Store,
        data_dir: &Path,
        grpc_addr: String,
        http_addr: Option<String>,
    ) -> Result<Self, ReplicaError> {
        let id = crate::pki::crypto::random_hex::<8>()?;
        let (lock_dir, lock) = match store.backend() {
            Backend::Sqlite => {
                let dir = data_dir.join(LOCK_DIR);
                let lock = take_lock(&dir, &id)?;
                (Some(dir), Some(lock))
            }
            Backend::Postgres => (None, None),
        };
        let now = crate::now_unix();
        let record = ReplicaRow {
            id: id.clone(),
            grpc_addr,
            http_addr,
            started_at: now,
            seen_at: now,
        };
        store.register_replica(&record).await?;
        tracing::info!(
            replica = %id, grpc = %record.grpc_addr, http = ?record.http_addr,
            "controller replica registered"
        );
        Ok(Self {
            inner: Arc::new(Inner {
                id: id.clone(),
                store: store.clone().for_replica(&id),
                lock_dir,
                _lock: lock,
                renewed_at: AtomicI64::new(record.seen_at),
                judge_from: AtomicI64::new(i64::MIN),
                record,
            }),
        })
    }

    /// This replica's id.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// The store, recording this replica as the owner of deployments.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// True if `replica` lives at `now`: this one always; another when seen
    /// within the window (or this one cannot judge by records now:
    /// [`may_judge`]) and (SQLite) its lock is held.
    pub fn is_alive(&self, replica: &ReplicaRow, now: i64) -> bool {
        if replica.id == self.inner.id {
            return true;
        }
        let judging = may_judge(
            self.inner.renewed_at.load(Ordering::Relaxed),
            self.inner.judge_from.load(Ordering::Relaxed),
            now,
        );
        (seen_recently(replica.seen_at, now) || !judging)
            && self
                .inner
                .lock_dir
                .as_deref()
                .is_none_or(|dir| lock_held(dir, &replica.id))
    }

    /// The ids of the live replicas (this one among them).
    pub async fn live_ids(&self, now: i64) -> Result<Vec<String>, StoreError> {
        let mut live: Vec<String> = self
            .inner
            .store
            .replicas()
            .await?
            .into_iter()
            .filter(|r| self.is_alive(r, now))
            .map(|r| r.id)
            .collect();
        if !live.contains(&self.inner.id) {
            live.push(self.inner.id.clone());
        }
        Ok(live)
    }

    /// Node id → the live replica other than this one holding its session.
    pub async fn remote_holders(
        &self,
        now: i64,
    ) -> Result<HashMap<String, Arc<ReplicaRow>>, StoreError> {
        // Each replica judged once (on SQLite that opens its lock file),
        // not once per node it holds; the sessions read as two short
        // columns, not joined with the replica's row.
        // Each live replica's row shared by the nodes it holds (10,000
        // copies of a few rows made a status call slower).
        let live: HashMap<String, Arc<ReplicaRow>> = self
            .inner
            .store
            .replicas()
            .await?
            .into_iter()
            .filter(|r| r.id != self.inner.id && self.is_alive(r, now))
            .map(|r| (r.id.clone(), Arc::new(r)))
            .collect();
        if live.is_empty() {
            return Ok(HashMap::new());
        }
        Ok(self
            .inner
            .store
            .sessions_not_of(&self.inner.id)
            .await?
            .into_iter()
            .filter_map(|(node, replica)| Some((node, live.get(&replica)?.clone())))
            .collect())
    }

    /// Fails the running deployments of replicas not alive now that were
    /// recorded without their plan (no replica can carry them on); returns
    /// their ids. Those with a plan are left to
    /// [`Self::take_over_dead_deployments`].
    pub async fn abandon_dead_deployments(&self, now: i64) -> Result<Vec<String>, StoreError> {
        let live = self.live_ids(now).await?;
        self.inner
            .store
            .abandon_running_deployments(now, &live)
            .await
    }

    /// Takes over the running deployments of replicas not alive now and
    /// carries them on through `carrier`; fails those that cannot be
    /// carried on and returns their ids.
    pub async fn take_over_dead_deployments(
        &self,
        now: i64,
        carrier: &Carrier,
    ) -> Result<Vec<String>, StoreError> {
        let live = self.live_ids(now).await?;
        let store = &self.inner.store;
        let mut failed = store.abandon_running_deployments(now, &live).await?;
        for orphan in store.orphaned_deployments(&live).await? {
            match crate::rollout::take_over(
                store,
                &carrier.sessions,
                &carrier.commands,
                &orphan,
                carrier.observer.as_ref(),
            )
            .await?
            {
                TakeOver::Resumed { first, events } => {
                    tracing::warn!(
                        deployment_id = %orphan.id, from_replica = ?orphan.owner,
                        "took over a dead replica's deployment"
                    );
                    // Followable here from now on (HTTP API, web UI);
                    // nobody holds the starter's end.
                    drop(carrier.live.follow(&orphan.id, first, events));
                }
                TakeOver::Failed(why) => {
                    tracing::warn!(deployment_id = %orphan.id, %why, "failed a dead replica's deployment");
                    failed.push(orphan.id);
                }
                TakeOver::Lost => {}
            }
        }
        Ok(failed)
    }

    /// Renews this replica's record every [`RENEW_EVERY`] and takes over
    /// dead replicas' deployments through `carrier` (the ids of those it
    /// had to fail sent on `abandoned`; without a carrier they are all
    /// failed), until `stop`; then removes the record.
    pub async fn run(
        self,
        abandoned: Option<tokio::sync::mpsc::UnboundedSender<Vec<String>>>,
        carrier: Option<Carrier>,
        stop: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(RENEW_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let now = crate::now_unix();
            let store = &self.inner.store;
            let renewed = match store.renew_replica(&self.inner.id, now).await {
                Ok(true) => true,
                // Swept away as dead by another replica (this one was
                // unseen too long): record it again.
                Ok(false) => {
                    let record = ReplicaRow {
                        seen_at: now,
                        ..self.inner.record.clone()
                    };
                    tracing::warn!(replica = %self.inner.id, "replica record was gone; registering again");
                    match store.register_replica(&record).await {
                        Ok(()) => true,
                        Err(err) => {
                            tracing::warn!(%err, "cannot register this replica again");
                            false
                        }
                    }
                }
                Err(err) => {
                    tracing::warn!(%err, "cannot renew this replica's record");
                    false
                }
            };
            if !renewed {
                continue;
            }
            let before = self.inner.renewed_at.swap(now, Ordering::Relaxed);
            if after_a_gap(before, now) {
                self.inner
                    .judge_from
                    .store(now.saturating_add(window_secs()), Ordering::Relaxed);
                tracing::warn!(
                    unrenewed_for_secs = now.saturating_sub(before),
                    "this replica could not renew its record for a while (the store was \
                     unreachable?): judging no other replica dead for one liveness window"
                );
            }
            if !may_judge(now, self.inner.judge_from.load(Ordering::Relaxed), now) {
                continue;
            }
            let swept = match &carrier {
                Some(carrier) => self.take_over_dead_deployments(now, carrier).await,
                None => self.abandon_dead_deployments(now).await,
            };
            match swept {
                Ok(ids) if !ids.is_empty() => {
                    tracing::warn!(
                        deployments = ?ids,
                        "marked deployments of a controller replica that is gone as failed"
                    );
                    if let Some(tx) = &abandoned {
                        let _ = tx.send(ids);
                    }
                }
                Ok(_) => {}
                Err(err) => tracing::warn!(%err, "cannot check for dead replicas' deployments"),
            }
            // Commands a dead replica routed through the others: nobody
            // reads their answers (its deployments are carried on above).
            match self.live_ids(now).await {
                Ok(live) => match store.delete_node_commands_of_senders_not_in(&live).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(
                        rows = n,
                        "deleted commands routed by replicas that are gone"
                    ),
                    Err(err) => {
                        tracing::warn!(%err, "cannot delete commands of replicas that are gone")
                    }
                },
                Err(err) => tracing::warn!(%err, "cannot list the live replicas"),
            }
            let cutoff = now.saturating_sub(i64::try_from(FORGET_AFTER.as_secs()).unwrap_or(0));
            match store.remove_replicas_unseen_since(cutoff).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(replicas = n, "forgot replicas unseen for an hour"),
                Err(err) => tracing::warn!(%err, "cannot forget long-dead replicas"),
            }
        }
        if let Err(err) = self.inner.store.remove_replica(&self.inner.id).await {
            tracing::warn!(%err, "cannot remove this replica's record");
        }
    }
}

/// Creates and locks `<dir>/<id>.lock`.
fn take_lock(dir: &Path, id: &str) -> Result<Flock<File>, ReplicaError> {
    let path = dir.join(format!("{id}.lock"));
    let lock_error = |source| ReplicaError::Lock {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(lock_error)?;
    let file = File::create(&path).map_err(lock_error)?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock)
        .map_err(|(_, errno)| lock_error(std::io::Error::from(errno)))
}

/// True if the replica `id`'s lock file in `dir` is locked (its process
/// runs). A missing file is a dead replica; a file that cannot be opened
/// counts as held (never fail a live replica's work on a doubt).
fn lock_held(dir: &Path, id: &str) -> bool {
    // The id comes from the database: never let it name another path.
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric()) {
        return false;
    }
    let path = dir.join(format!("{id}.lock"));
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return false,
        Err(_) => return true,
    };
    match Flock::lock(file, FlockArg::LockSharedNonblock) {
        Ok(lock) => {
            // Nobody holds it: the replica is gone. Its file goes too.
            drop(lock);
            let _ = std::fs::remove_file(&path);
            false
        }
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => true,
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_within_three_renewals_is_alive() {
        assert!(seen_recently(100, 100));
        assert!(seen_recently(100, 115));
        assert!(!seen_recently(100, 116));
        assert!(
            seen_recently(100, 90),
            "a clock a little behind is not death"
        );
    }

    #[test]
    fn no_replica_is_judged_by_its_record_while_or_just_after_this_one_cannot_renew() {
        // Renewing every 5 s, no gap: judging.
        assert!(may_judge(100, i64::MIN, 105));
        assert!(may_judge(100, i64::MIN, 110), "a slow tick");
        // Its own renewals fail for more than two periods: not judging
        // (the others' records are as stale as its own).
        assert!(!may_judge(100, i64::MIN, 111));
        assert!(!may_judge(100, i64::MIN, 130));
        // Renewed again after the gap: not for one window.
        assert!(!may_judge(130, 145, 130));
        assert!(!may_judge(140, 145, 144));
        assert!(may_judge(145, 145, 145));
    }

    #[test]
    fn a_missed_renewal_is_a_gap() {
        assert!(!after_a_gap(100, 105));
        assert!(!after_a_gap(100, 110), "a slow tick is not a gap");
        assert!(after_a_gap(100, 111));
        assert!(after_a_gap(100, 130), "a store outage of 20 s");
    }

    #[tokio::test]
    async fn on_sqlite_a_replica_whose_lock_is_free_is_dead_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        let a = Replica::start(&store, dir.path(), "127.0.0.1:1".into(), None)
            .await
            .unwrap();
        let b = Replica::start(&store, dir.path(), "127.0.0.1:2".into(), None)
            .await
            .unwrap();
        let now = crate::now_unix();
        let mut live = a.live_ids(now).await.unwrap();
        live.sort();
        let mut both = vec![a.id().to_owned(), b.id().to_owned()];
        both.sort();
        assert_eq!(live, both);
        // b's process ends (its lock goes) without removing its record.
        let b_id = b.id().to_owned();
        drop(b);
        assert_eq!(a.live_ids(now).await.unwrap(), [a.id().to_owned()]);
        assert!(!dir
            .path()
            .join(LOCK_DIR)
            .join(format!("{b_id}.lock"))
            .exists());
        // Held sessions of a dead replica do not count.
        store
            .open_agent_session("n-1", &b_id, 1, now)
            .await
            .unwrap();
        assert!(a.remote_holders(now).await.unwrap().is_empty());
        // A made-up id never reaches the file system.
        assert!(!lock_held(dir.path(), "../x"));
    }

    #[tokio::test]
    async fn a_live_replica_holds_its_sessions_until_unseen_for_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        let a = Replica::start(&store, dir.path(), "127.0.0.1:1".into(), None)
            .await
            .unwrap();
        let b = Replica::start(&store, dir.path(), "127.0.0.1:2".into(), None)
            .await
            .unwrap();
        let now = crate::now_unix();
        store
            .open_agent_session("n-1", b.id(), 1, now)
            .await
            .unwrap();
        store
            .open_agent_session("n-2", a.id(), 1, now)
            .await
            .unwrap();
        let holders = a.remote_holders(now).await.unwrap();
        assert_eq!(holders.len(), 1);
        assert_eq!(holders["n-1"].grpc_addr, "127.0.0.1:2");
        let later = now + 16;
        // a could not renew its own record meanwhile either (the store did
        // not answer): it takes nobody for dead by a stale record.
        assert_eq!(a.remote_holders(later).await.unwrap().len(), 1);
        // a renewed its own meanwhile, b not, unseen past the window (its
        // lock still held): dead.
        a.inner.renewed_at.store(later - 5, Ordering::Relaxed);
        assert!(a.remote_holders(later).await.unwrap().is_empty());
        assert_eq!(a.live_ids(later).await.unwrap(), [a.id().to_owned()]);
    }
}
