//! Deployment statuses on GitHub, off the rollout's path: the rollout hands
//! [`Note`]s to a bounded channel without waiting ([`crate::rollout::Observer`]);
//! one task turns them into GitHub calls, in order per deployment, and
//! retries them until they are taken or [`GithubConfig::give_up_after`]
//! has passed — then drops the update with a `GITHUB_UPDATE_GAVE_UP` audit
//! event. GitHub down or rate-limited never slows or fails a deploy.
//!
//! For each rollout of a linked app that names a git commit (`slipway
//! deploy --git-sha`, or a webhook deploy):
//!
//! ```text
//! Started   ─▶ create the Deployment (ref = the sha, environment,
//!              auto_merge false, required_contexts [], payload with the
//!              Slipway deployment id) ─▶ status queued ─▶ commit status
//!              pending (if commit_status) ─▶ status in_progress "0/N nodes"
//! Progress  ─▶ status in_progress "k/N nodes done, f failed" (a newer one
//!              replaces one still waiting in the queue)
//! Finished  ─▶ status success | failure (the summary) ─▶ commit status ─▶
//!              on success, inactive for the environment's deployment it
//!              replaced
//! ```
//!
//! A deployment another replica (or this controller after a restart)
//! takes over is followed on from there ([`Note::Resumed`]): an
//! `in_progress` status says so, then its progress and end as usual. One
//! that could not be carried on (failed at start or by the sweep) gets
//! `error`, if its GitHub deployment had not finished.
//!
//! A 4xx other than a rate limit is not retried (GitHub would answer the
//! same); if the Deployment itself could not be created, its later updates
//! are dropped with it (one audit event says how many).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::api::{description, is_commit_sha, NewCommitStatus, NewDeployment, NewStatus};
use super::client::{Client, GhError};
use super::config::{GithubConfig, Link};
use crate::audit::{self, AuditEvent};
use crate::rollout::Note;
use crate::store::Store;

/// Updates waiting at most; past this, progress notes are dropped (the
/// start and the end of a deployment always queue).
const MAX_JOBS: usize = 10_000;

/// One rollout GitHub is told about.
#[derive(Debug)]
struct Tracked {
    deployment_id: String,
    link: Link,
    sha: String,
    nodes: usize,
    release_id: String,
    log_url: Option<String>,
    /// GitHub's id once the Deployment is created.
    github_id: Mutex<Option<u64>>,
}

#[derive(Debug, Clone)]
enum Work {
    Create,
    Status {
        state: &'static str,
        text: String,
    },
    Commit {
        state: &'static str,
        text: String,
    },
    /// `inactive` for the environment's deployments this one replaced.
    Inactivate,
}

impl Work {
    fn name(&self) -> String {
        match self {
            Self::Create => "create the deployment".into(),
            Self::Status { state, .. } => format!("deployment status {state}"),
            Self::Commit { state, .. } => format!("commit status {state}"),
            Self::Inactivate => "inactive status for the replaced deployment".into(),
        }
    }
}

#[derive(Debug)]
struct Job {
    tracked: Arc<Tracked>,
    work: Work,
    enqueued: Instant,
    attempts: u32,
    not_before: Instant,
}

/// The task's state.
struct Queue {
    config: Arc<GithubConfig>,
    client: Client,
    store: Store,
    jobs: VecDeque<Job>,
    /// Whether the front job is being sent.
    busy: bool,
    tracked: std::collections::HashMap<String, Arc<Tracked>>,
}

/// Starts the task that sends the statuses of the deployments `notes`
/// tells of; it ends when `stop` is cancelled or every sender is gone.
/// `interrupted`: deployments a controller restart cut short (see
/// [`crate::store::Store::abandon_running_deployments`]); their GitHub
/// deployments, if they had one still running, get an `error` status.
/// `later`: those found later (a dead replica's), the same way.
pub fn spawn(
    config: Arc<GithubConfig>,
    client: Client,
    store: Store,
    notes: mpsc::Receiver<Note>,
    interrupted: Vec<String>,
    later: mpsc::UnboundedReceiver<Vec<String>>,
    stop: CancellationToken,
) -> JoinHandle<()> {
    let mut queue = Queue {
        config,
        client,
        store,
        jobs: VecDeque::new(),
        busy: false,
        tracked: std::collections::HashMap::new(),
    };
    tokio::spawn(async move {
        queue.interrupted(interrupted).await;
        queue.run(notes, later, stop).await;
    })
}

impl Queue {
    /// Queues `error` for the GitHub deployments of `ids` not finished yet.
    async fn interrupted(&mut self, ids: Vec<String>) {
        for id in ids {
            let row = match self.store.github_deployment(&id).await {
                Ok(Some(row)) => row,
                Ok(None) => continue,
                Err(err) => {
                    tracing::error!(%err, deployment_id = %id, "github: cannot read the deployment");
                    continue;
                }
            };
            if matches!(
                row.state.as_str(),
                "success" | "failure" | "error" | "inactive"
            ) {
                continue;
            }
            let Some(link) = self.config.link(&row.app) else {
                continue;
            };
            let tracked = Arc::new(Tracked {
                deployment_id: id.clone(),
                link: link.clone(),
                sha: row.sha,
                nodes: 0,
                release_id: String::new(),
                log_url: self
                    .config
                    .public_url
                    .as_ref()
                    .map(|base| format!("{base}/deployments/{id}")),
                github_id: Mutex::new(u64::try_from(row.github_id).ok()),
            });
            let text = "interrupted: the controller restarted during this rollout".to_owned();
            self.push(
                &tracked,
                Work::Status {
                    state: "error",
                    text: text.clone(),
                },
                true,
            );
            if tracked.link.commit_status && is_commit_sha(&tracked.sha) {
                self.push(
                    &tracked,
                    Work::Commit {
                        state: "error",
                        text,
                    },
                    true,
                );
            }
        }
    }

    /// Follows on a deployment another replica took over (`started` as its
    /// start was): its GitHub deployment, when the dead replica had made
    /// one and it is not finished, gets an `in_progress` status saying so
    /// and the rest as usual; one not made yet is made now (the create
    /// looks for it by payload first, so a lost answer makes no second).
    async fn resumed(&mut self, started: Note, done: usize, failed: usize, from: &str) {
        let Note::Started {
            deployment_id,
            app,
            kind,
            release_id,
            git_sha,
            nodes,
            ..
        } = &started
        else {
            return;
        };
        let Some(link) = self.config.link(app) else {
            return;
        };
        if *kind != "deploy" || git_sha.is_empty() {
            return;
        }
        let row = match self.store.github_deployment(deployment_id).await {
            Ok(row) => row,
            Err(err) => {
                tracing::warn!(%err, %deployment_id, "github: cannot read the deployment; creating it if missing");
                None
            }
        };
        let Some(row) = row else {
            self.merge(started);
            return;
        };
        if matches!(
            row.state.as_str(),
            "success" | "failure" | "error" | "inactive"
        ) {
            return;
        }
        let tracked = Arc::new(Tracked {
            deployment_id: deployment_id.clone(),
            link: link.clone(),
            sha: row.sha,
            nodes: *nodes,
            release_id: release_id.clone(),
            log_url: self
                .config
                .public_url
                .as_ref()
                .map(|base| format!("{base}/deployments/{deployment_id}")),
            github_id: Mutex::new(u64::try_from(row.github_id).ok()),
        });
        self.tracked
            .insert(deployment_id.clone(), Arc::clone(&tracked));
        self.push(
            &tracked,
            Work::Status {
                state: "in_progress",
                text: format!(
                    "carried on by another controller replica ({from} is gone); \
                     {done}/{nodes} nodes done, {failed} failed"
                ),
            },
            true,
        );
    }

    async fn run(
        mut self,
        mut notes: mpsc::Receiver<Note>,
        mut later: mpsc::UnboundedReceiver<Vec<String>>,
        stop: CancellationToken,
    ) {
        let mut in_flight: Option<JoinHandle<Result<Option<u64>, GhError>>> = None;
        let mut open = true;
        let mut later_open = true;
        loop {
            let due = self
                .jobs
                .front()
                .filter(|_| in_flight.is_none())
                .map(|j| j.not_before);
            if !open && self.jobs.is_empty() && in_flight.is_none() {
                return;
            }
            tokio::select! {
                () = stop.cancelled() => {
                    if !self.jobs.is_empty() {
                        tracing::warn!(waiting = self.jobs.len(), "github: stopping with status updates not sent");
                    }
                    return;
                }
                note = notes.recv(), if open => match note {
                    Some(Note::Resumed { deployment_id, app, kind, release_id, git_sha, nodes, done, failed, from_replica }) => {
                        let started = Note::Started {
                            deployment_id, app, kind, release_id, git_sha, nodes,
                            actor: String::new(),
                        };
                        self.resumed(started, done, failed, &from_replica).await;
                    }
                    Some(note) => self.merge(note),
                    None => open = false,
                },
                ids = later.recv(), if later_open => match ids {
                    Some(ids) => self.interrupted(ids).await,
                    None => later_open = false,
                },
                done = async {
                    match in_flight.as_mut() {
                        Some(handle) => handle.await,
                        None => std::future::pending().await,
                    }
                } => {
                    in_flight = None;
                    self.busy = false;
                    let outcome = done.unwrap_or_else(|e| Err(GhError::Config(format!("the status task failed: {e}"))));
                    self.settle(outcome).await;
                }
                () = async {
                    match due {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let Some(job) = self.jobs.front_mut() {
                        job.attempts += 1;
                        self.busy = true;
                        in_flight = Some(tokio::spawn(send(
                            self.client.clone(),
                            self.store.clone(),
                            Arc::clone(&job.tracked),
                            job.work.clone(),
                            job.attempts,
                        )));
                    }
                }
            }
        }
    }

    fn push(&mut self, tracked: &Arc<Tracked>, work: Work, always: bool) {
        if !always && self.jobs.len() >= MAX_JOBS {
            tracing::warn!(deployment_id = %tracked.deployment_id, "github: status queue full; a progress update was dropped");
            return;
        }
        let now = Instant::now();
        self.jobs.push_back(Job {
            tracked: Arc::clone(tracked),
            work,
            enqueued: now,
            attempts: 0,
            not_before: now,
        });
    }

    fn merge(&mut self, note: Note) {
        match note {
            // Needs the store: handled by `resumed` before it gets here.
            Note::Resumed { .. } => {}
            Note::Started {
                deployment_id,
                app,
                kind,
                release_id,
                git_sha,
                nodes,
                ..
            } => {
                let Some(link) = self.config.link(&app) else {
                    return;
                };
                if kind != "deploy" || git_sha.is_empty() {
                    tracing::debug!(%deployment_id, %app, kind, "github: not a deploy of a known commit; no GitHub deployment");
                    return;
                }
                let log_url = self
                    .config
                    .public_url
                    .as_ref()
                    .map(|base| format!("{base}/deployments/{deployment_id}"));
                let tracked = Arc::new(Tracked {
                    deployment_id: deployment_id.clone(),
                    link: link.clone(),
                    sha: git_sha.to_ascii_lowercase(),
                    nodes,
                    release_id,
                    log_url,
                    github_id: Mutex::new(None),
                });
                self.tracked.insert(deployment_id, Arc::clone(&tracked));
                self.push(&tracked, Work::Create, true);
                self.push(
                    &tracked,
                    Work::Status {
                        state: "queued",
                        text: format!(
                            "Slipway {}: release {} to {} node(s)",
                            tracked.deployment_id, tracked.release_id, nodes
                        ),
                    },
                    true,
                );
                if tracked.link.commit_status && is_commit_sha(&tracked.sha) {
                    self.push(
                        &tracked,
                        Work::Commit {
                            state: "pending",
                            text: format!("deploying to {}", tracked.link.environment),
                        },
                        true,
                    );
                }
                self.push(
                    &tracked,
                    Work::Status {
                        state: "in_progress",
                        text: format!("0/{nodes} nodes done"),
                    },
                    true,
                );
            }
            Note::Progress {
                deployment_id,
                done,
                failed,
                nodes,
                node,
                outcome,
                ..
            } => {
                let Some(tracked) = self.tracked.get(&deployment_id).cloned() else {
                    return;
                };
                let text = format!(
                    "{done}/{nodes} nodes done, {failed} failed; {node}: {}",
                    outcome.to_ascii_lowercase()
                );
                // A newer progress replaces one still waiting (not the one
                // being sent).
                let first_waiting = usize::from(self.busy);
                if let Some(last) = self.jobs.iter_mut().skip(first_waiting).next_back() {
                    if Arc::ptr_eq(&last.tracked, &tracked) {
                        if let Work::Status {
                            state: "in_progress",
                            text: waiting,
                        } = &mut last.work
                        {
                            *waiting = text;
                            return;
                        }
                    }
                }
                self.push(
                    &tracked,
                    Work::Status {
                        state: "in_progress",
                        text,
                    },
                    false,
                );
            }
            Note::Finished {
                deployment_id,
                succeeded,
                message,
                ..
            } => {
                let Some(tracked) = self.tracked.remove(&deployment_id) else {
                    return;
                };
                let state = if succeeded { "success" } else { "failure" };
                self.push(
                    &tracked,
                    Work::Status {
                        state,
                        text: message.clone(),
                    },
                    true,
                );
                if tracked.link.commit_status && is_commit_sha(&tracked.sha) {
                    self.push(
                        &tracked,
                        Work::Commit {
                            state,
                            text: message,
                        },
                        true,
                    );
                }
                if succeeded {
                    self.push(&tracked, Work::Inactivate, true);
                }
            }
        }
    }

    /// The front job's outcome: done, retried later, or given up.
    async fn settle(&mut self, outcome: Result<Option<u64>, GhError>) {
        let Some(job) = self.jobs.front_mut() else {
            return;
        };
        let error = match outcome {
            Ok(_) => {
                tracing::info!(
                    deployment_id = %job.tracked.deployment_id,
                    update = %job.work.name(),
                    "github: update sent"
                );
                self.jobs.pop_front();
                return;
            }
            Err(e) => e,
        };
        let waited = job.enqueued.elapsed();
        if error.is_transient() && waited < self.config.give_up_after {
            let wait = error.retry_after().map_or_else(
                || self.config.retry.backoff(job.attempts.saturating_sub(1)),
                |w| self.config.retry.clamp(w),
            );
            tracing::warn!(
                deployment_id = %job.tracked.deployment_id,
                update = %job.work.name(),
                attempts = job.attempts,
                %error,
                ?wait,
                "github: update not taken; trying again"
            );
            job.not_before = Instant::now() + wait;
            return;
        }
        let Some(job) = self.jobs.pop_front() else {
            return;
        };
        let mut dropped = 0;
        if matches!(job.work, Work::Create) {
            // Without the Deployment its statuses have nowhere to go.
            let before = self.jobs.len();
            self.jobs.retain(|j| {
                !Arc::ptr_eq(&j.tracked, &job.tracked) || matches!(j.work, Work::Commit { .. })
            });
            dropped = before - self.jobs.len();
        }
        let why = if error.is_transient() {
            format!(
                "GitHub did not take it within {:?}: {error}",
                self.config.give_up_after
            )
        } else {
            error.to_string()
        };
        tracing::error!(
            deployment_id = %job.tracked.deployment_id,
            update = %job.work.name(),
            %why,
            "github: gave up on an update"
        );
        let event = AuditEvent::error(
            audit::GITHUB_UPDATE_GAVE_UP,
            "controller",
            "deployment",
            &job.tracked.deployment_id,
            serde_json::json!({
                "app": job.tracked.link.app,
                "repo": job.tracked.link.repo.to_string(),
                "environment": job.tracked.link.environment,
                "sha": job.tracked.sha,
                "update": job.work.name(),
                "attempts": job.attempts,
                "waited_secs": waited.as_secs(),
                "later_updates_dropped": dropped,
            }),
            why,
        );
        if let Err(err) = self.store.audit(&event, crate::now_unix()).await {
            tracing::error!(%err, "could not record audit event");
        }
    }
}

/// One update: the HTTP call(s) and what the store keeps of them.
async fn send(
    client: Client,
    store: Store,
    tracked: Arc<Tracked>,
    work: Work,
    attempts: u32,
) -> Result<Option<u64>, GhError> {
    let link = &tracked.link;
    let github_id = *tracked
        .github_id
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let status = |state: &'static str, text: &str| NewStatus {
        state,
        description: description(text),
        log_url: tracked.log_url.clone(),
        environment: link.environment.clone(),
        auto_inactive: false,
    };
    let stored = |r: Result<(), crate::store::StoreError>| {
        if let Err(err) = r {
            tracing::error!(%err, "github: could not record a deployment's state");
        }
    };
    match work {
        Work::Create => {
            if github_id.is_some() {
                return Ok(github_id);
            }
            if attempts > 1 {
                // An earlier try may have created it and lost the answer.
                if let Some(id) = client
                    .find_deployment(
                        &link.repo,
                        &tracked.sha,
                        &link.environment,
                        &tracked.deployment_id,
                    )
                    .await?
                {
                    tracing::info!(deployment_id = %tracked.deployment_id, github_id = id, "github: the deployment was created by an earlier try");
                    *tracked
                        .github_id
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(id);
                    stored(
                        store
                            .record_github_deployment(
                                &tracked.deployment_id,
                                &link.app,
                                &link.repo.to_string(),
                                &link.environment,
                                i64::try_from(id).unwrap_or(i64::MAX),
                                &tracked.sha,
                                crate::now_unix(),
                            )
                            .await,
                    );
                    return Ok(Some(id));
                }
            }
            let new = NewDeployment {
                git_ref: tracked.sha.clone(),
                environment: link.environment.clone(),
                description: description(&format!(
                    "Slipway: {} release {} to {} node(s)",
                    link.app, tracked.release_id, tracked.nodes
                )),
                auto_merge: false,
                required_contexts: Vec::new(),
                payload: serde_json::json!({
                    "slipway_deployment_id": tracked.deployment_id,
                    "app": link.app,
                    "release_id": tracked.release_id,
                }),
                production_environment: link.environment == "production",
            };
            let id = client.create_deployment(&link.repo, &new).await?;
            *tracked
                .github_id
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(id);
            stored(
                store
                    .record_github_deployment(
                        &tracked.deployment_id,
                        &link.app,
                        &link.repo.to_string(),
                        &link.environment,
                        i64::try_from(id).unwrap_or(i64::MAX),
                        &tracked.sha,
                        crate::now_unix(),
                    )
                    .await,
            );
            Ok(Some(id))
        }
        Work::Status { state, text } => {
            let id = github_id
                .ok_or_else(|| GhError::Config("the deployment was never created".into()))?;
            client
                .create_deployment_status(&link.repo, id, &status(state, &text))
                .await?;
            stored(
                store
                    .set_github_deployment_state(&tracked.deployment_id, state, crate::now_unix())
                    .await,
            );
            Ok(None)
        }
        Work::Commit { state, text } => {
            client
                .create_commit_status(
                    &link.repo,
                    &tracked.sha,
                    &NewCommitStatus {
                        state,
                        description: description(&text),
                        target_url: tracked.log_url.clone(),
                        context: format!("slipway/{}", link.app),
                    },
                )
                .await?;
            Ok(None)
        }
        Work::Inactivate => {
            let replaced = store
                .active_github_deployments(
                    &link.repo.to_string(),
                    &link.environment,
                    &tracked.deployment_id,
                )
                .await
                .map_err(|e| GhError::Config(format!("reading the replaced deployments: {e}")))?;
            for old in replaced {
                let id = u64::try_from(old.github_id).unwrap_or(0);
                client
                    .create_deployment_status(
                        &link.repo,
                        id,
                        &status(
                            "inactive",
                            &format!("replaced by {} ({})", tracked.deployment_id, tracked.sha),
                        ),
                    )
                    .await?;
                stored(
                    store
                        .set_github_deployment_state(
                            &old.deployment_id,
                            "inactive",
                            crate::now_unix(),
                        )
                        .await,
                );
            }
            Ok(None)
        }
    }
}
