//! Deployments across the fleet (deploy, rollback, restart, prune, and
//! agent upgrades recorded under the app [`AGENT_APP`]): a
//! rollout plan (all at once, rolling batches, canary then the rest), one
//! command per node over its live session, progress and results routed
//! back by command id, the outcome recorded per node and for the whole
//! deployment.
//!
//! - [`policy`]: pure decisions: [`Rollout::batches`], [`next_step`],
//!   [`summarize`], [`default_release_id`].
//! - [`plan`]: what is asked: the [`Action`], its [`Target`]s and rollout.
//! - [`executor`]: [`start`] records the deployment and runs it.
//! - [`observer`]: [`Note`]s for a watcher outside the rollout (GitHub's
//!   deployment statuses), handed over without waiting.
//!
//! # State machine of one deployment
//!
//! ```text
//! started ──▶ next_step(rollout, batches, node states):
//!   Start(batch) ──▶ every node of the batch: online? ── no ──▶ FAILED "unreachable"
//!                        │ yes
//!                        ▼
//!           command sent ──▶ Progress* ──▶ CommandResult ──▶ node done
//!                        │
//!                        ├─ session ends, no result within RECONNECT_GRACE
//!                        │  ──▶ FAILED "connection lost" (a node that
//!                        │  reconnects gets the command again; the agent
//!                        │  answers a known id from its record)
//!                        └─ no result within COMMAND_TIMEOUT ──▶ FAILED "timed out"
//!   Wait        ──▶ a node of the running batch has not answered yet
//!   Stop        ──▶ (rolling / canary) a batch ended with more than
//!                   max_unavailable failed nodes: nodes never started are
//!                   SKIPPED; nodes this deployment switched are sent a
//!                   Rollback to the release current on them before
//!                   ──▶ ROLLED_BACK "deployment stopped after web-2 failed"
//!   Done        ──▶ every batch ran
//!   (database down: a node's result is written again, and a command that
//!    found no session waits for it, before anything else; past
//!    RESULT_RETRY_FOR the rollout halts: running nodes FAILED, never
//!    started SKIPPED, the deployment failed naming why)
//! finished ──▶ succeeded (every node SUCCEEDED, every result recorded) or failed
//!              audit DEPLOY_COMPLETED / DEPLOY_FAILED
//!                    (ROLLBACK_…, RESTART_…, PRUNE_… likewise)
//! ```
//!
//! [`next_step`] and [`Rollout::batches`] are pure: the whole rollout
//! policy is there, tested without processes.
//!
//! Command ids are `<deployment id>.<node id>` (`d-<16 hex>.n-…`), and
//! `<deployment id>.<node id>.undo` for the controller's rollback of a node
//! when the rollout stops: unique per node, and they name the deployment in
//! the agent's logs. An agent's Progress and CommandResult reach the
//! deployment only when they come from the node the command was sent to
//! ([`crate::link::commands::Commands`]).
//!
//! One deployment per app runs at a time, across replicas:
//! [`crate::store::Store::insert_deployment`] refuses a second one while
//! the first is `running` ([`crate::store::StoreError::AppBusy`]), checked
//! in the database's write transaction (SQLite `BEGIN IMMEDIATE`,
//! PostgreSQL's write advisory lock).
//!
//! # Takeover
//!
//! A deployment is recorded with its whole plan ([`Plan::to_record`]) and
//! the replica that runs it (`owner_replica`): its lease is that replica
//! being alive (renewed every few seconds; on SQLite also its lock file).
//! When it dies, another replica takes the deployment over
//! ([`executor::take_over`]: a conditional update, exactly one wins,
//! audit `DEPLOY_TAKEN_OVER` naming both replicas) and carries it on from
//! its recorded state: nodes with a result keep it; nodes of a started
//! batch without one are sent their command again under the same id (the
//! agent answers from its ledger, or its result follows); later batches
//! and the stop/rollback policy go on as they would have. Every node
//! result and the end are written only while the writer still owns the
//! deployment, so a replica that was only slow stops instead of writing
//! over its successor's work. An env delivery (its texts are secret, not
//! recorded) or a deployment recorded without a plan is failed instead,
//! naming why.

pub mod executor;
pub mod observer;
pub mod plan;
pub mod policy;

pub use executor::{start, start_observed, take_over, TakeOver, COMMAND_TIMEOUT, RECONNECT_GRACE};
pub use observer::{Note, Observer};
pub use plan::{Action, EnvPayload, EnvText, Plan, PlanRecordError, Target, AGENT_APP};
pub use policy::{
    default_release_id, next_step, stop_reason, summarize, Batch, NodeState, Rollout, RolloutError,
    Step, Strategy,
};
