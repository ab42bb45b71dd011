//! The command ledger, `<state_dir>/commands.json`: the result of every
//! command already run, so a command the controller sends again (after a
//! reconnect, say) is answered with its result instead of being run twice.
//!
//! The ledger's file work (read once, fsync'd on every result) runs on
//! blocking threads, never on a runtime worker. A ledger that cannot be
//! read (an outcome this agent does not know, say) is an error naming the
//! file, never guessed at and overwritten.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use slipway_proto::v1::CommandResult;

use crate::deploy::Outcome;
use crate::durable;

/// Results kept for idempotency: enough for any realistic re-send window.
const KEEP_RESULTS: usize = 500;

/// A recorded result, as kept in `commands.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recorded {
    pub command_id: String,
    pub outcome: Outcome,
    pub release_id: String,
    pub message: String,
}

impl Recorded {
    /// As sent to the controller.
    pub fn to_proto(&self) -> CommandResult {
        // A release id the controller would refuse (a result recorded by an
        // older agent, say) is left out rather than sent: a refused result
        // would close the session, and the same result would be sent again
        // on every reconnect.
        let release_id =
            if slipway_proto::limits::check_release_id("release_id", &self.release_id).is_ok() {
                self.release_id.clone()
            } else {
                String::new()
            };
        CommandResult {
            command_id: self.command_id.clone(),
            outcome: proto_outcome(self.outcome) as i32,
            release_id,
            // Within the limit the controller checks (a long hook or check
            // output is cut, never the reason the session is refused).
            message: slipway_proto::limits::truncate(
                &self.message,
                slipway_proto::limits::MAX_MESSAGE,
            )
            .to_owned(),
        }
    }
}

/// The wire value of an outcome (exhaustive: a new outcome must be mapped).
fn proto_outcome(outcome: Outcome) -> slipway_proto::v1::Outcome {
    match outcome {
        Outcome::Succeeded => slipway_proto::v1::Outcome::Succeeded,
        Outcome::Failed => slipway_proto::v1::Outcome::Failed,
        Outcome::RolledBack => slipway_proto::v1::Outcome::RolledBack,
    }
}

/// The command ledger cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The file exists but cannot be read.
    #[error("cannot read the command ledger {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not a ledger this agent understands (an unknown outcome,
    /// say): it is left as it is for the operator, never overwritten.
    #[error("the command ledger {} is invalid: {source}", path.display())]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    /// The updated ledger could not be written.
    #[error("cannot write the command ledger {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The blocking task doing the file work failed.
    #[error("command ledger task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// The results of commands already run, newest last.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Ledger {
    pub results: VecDeque<Recorded>,
}

impl Ledger {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("commands.json")
    }

    /// Reads the ledger at `path` (blocking): empty when there is none, an
    /// error naming the file when it cannot be read or parsed.
    pub fn load(path: &Path) -> Result<Self, LedgerError> {
        let data = match std::fs::read(path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(LedgerError::Read {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        serde_json::from_slice(&data).map_err(|source| LedgerError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    pub fn find(&self, id: &str) -> Option<&Recorded> {
        self.results.iter().find(|r| r.command_id == id)
    }

    /// Adds `r` (replacing an older result of the same id), keeping the
    /// newest [`KEEP_RESULTS`].
    fn add(&mut self, r: Recorded) {
        self.results.retain(|x| x.command_id != r.command_id);
        self.results.push_back(r);
        while self.results.len() > KEEP_RESULTS {
            self.results.pop_front();
        }
    }
}

/// `commands.json` and the copy of it in memory. Read once (on a blocking
/// thread), then every result is added in memory and the file rewritten
/// (temp + fsync + rename, on a blocking thread). The async lock is held
/// across the write, so writes land in the order results were added and
/// none is lost; waiting for it parks a task, never a runtime worker.
#[derive(Debug)]
pub struct LedgerFile {
    path: PathBuf,
    /// `None` until first read; a failed read is not kept, so a ledger the
    /// operator repaired is picked up by the next command.
    state: tokio::sync::Mutex<Option<Ledger>>,
}

impl LedgerFile {
    /// The ledger in `state_dir` (nothing is read yet).
    pub fn new(state_dir: &Path) -> Self {
        Self {
            path: Ledger::path(state_dir),
            state: tokio::sync::Mutex::new(None),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Loads the file into `slot` unless it already holds it.
    async fn loaded<'a>(
        &self,
        slot: &'a mut Option<Ledger>,
    ) -> Result<&'a mut Ledger, LedgerError> {
        if slot.is_none() {
            let path = self.path.clone();
            *slot = Some(tokio::task::spawn_blocking(move || Ledger::load(&path)).await??);
        }
        Ok(slot.get_or_insert_with(Ledger::default))
    }

    /// The recorded result of command `id`, if it ran before.
    pub async fn find(&self, id: &str) -> Result<Option<Recorded>, LedgerError> {
        let mut slot = self.state.lock().await;
        Ok(self.loaded(&mut slot).await?.find(id).cloned())
    }

    /// Records `r` and writes the ledger durably.
    pub async fn record(&self, r: Recorded) -> Result<(), LedgerError> {
        let mut slot = self.state.lock().await;
        let ledger = self.loaded(&mut slot).await?;
        ledger.add(r);
        let snapshot = ledger.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            durable::write_json(&path, &snapshot).map_err(|source| LedgerError::Write {
                path: path.clone(),
                source,
            })
        })
        .await?
    }

    /// Every recorded result, oldest first.
    pub async fn results(&self) -> Result<Vec<Recorded>, LedgerError> {
        let mut slot = self.state.lock().await;
        Ok(self
            .loaded(&mut slot)
            .await?
            .results
            .iter()
            .cloned()
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use slipway_proto::limits::Validate as _;

    #[test]
    fn a_recorded_result_is_always_sent_in_a_form_the_controller_takes() {
        let r = Recorded {
            command_id: "d-1.n-1".into(),
            outcome: Outcome::Succeeded,
            // An agent version, once recorded as if it were a release.
            release_id: "0.1.0+1a2b3c4d5e6f".into(),
            message: "x".repeat(slipway_proto::limits::MAX_MESSAGE * 2),
        };
        let sent = r.to_proto();
        sent.validate().unwrap();
        assert_eq!(sent.release_id, "");
        let good = Recorded {
            release_id: "v7".into(),
            ..r
        };
        assert_eq!(good.to_proto().release_id, "v7");
    }

    #[test]
    fn results_recorded_concurrently_are_all_kept() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        let ledger = LedgerFile::new(dir.path());
        std::thread::scope(|scope| {
            for t in 0..8 {
                let (ledger, rt) = (&ledger, rt.handle());
                scope.spawn(move || {
                    for i in 0..10 {
                        let r = Recorded {
                            command_id: format!("c-{t}-{i}"),
                            outcome: Outcome::Succeeded,
                            release_id: String::new(),
                            message: "done".into(),
                        };
                        rt.block_on(ledger.record(r)).unwrap();
                    }
                });
            }
        });
        assert_eq!(rt.block_on(ledger.results()).unwrap().len(), 80);
        let on_disk = Ledger::load(ledger.path()).unwrap();
        assert_eq!(on_disk.results.len(), 80);
    }
}
