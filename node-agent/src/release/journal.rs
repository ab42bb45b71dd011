//! The per-app journal: the durable record of releases and of the operation
//! in flight.
//!
//! It is one JSON file replaced atomically ([`crate::durable::write_atomic`])
//! before and after every step that changes the disk. An operation that is
//! still recorded when the next process takes the lock was interrupted; see
//! `recover` in the parent module for what is finished and what is undone.

use std::path::Path;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::id::ReleaseId;
use crate::durable;

/// Bumped when the file format changes incompatibly.
pub const JOURNAL_VERSION: u32 = 1;

/// What the journal says about one release.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseStatus {
    /// Unpacked, not yet committed by its deploy.
    Deploying,
    /// Deployed successfully; a rollback target.
    Good,
    /// Its deploy failed or was interrupted; never activated for good.
    Failed,
    /// Rolled away from; kept for inspection, skipped by rollbacks.
    Bad,
}

impl ReleaseStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deploying => "deploying",
            Self::Good => "good",
            Self::Failed => "failed",
            Self::Bad => "bad",
        }
    }
}

/// One release as recorded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Release {
    pub id: ReleaseId,
    pub status: ReleaseStatus,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Last time it became `current`; orders rollback targets.
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub activated_at: Option<OffsetDateTime>,
    pub artifact_sha256: String,
    /// Regular files and their total size, from the manifest.
    pub files: u64,
    pub bytes: u64,
    /// Why it is failed or bad.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The port its driver serves it on (docker's blue/green port), for
    /// liveness checks that use `{port}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// The step a deploy has durably reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeployStep {
    Started,
    Fetched,
    Unpacked,
    Linked,
    Hooked,
    Activated,
}

/// An operation in flight.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Operation {
    Deploy {
        release: ReleaseId,
        previous: Option<ReleaseId>,
        step: DeployStep,
        /// Re-activating an existing good release: an interrupted attempt
        /// must not mark it failed.
        #[serde(default)]
        reactivate: bool,
        pid: u32,
        #[serde(with = "time::serde::rfc3339")]
        started_at: OffsetDateTime,
    },
    Rollback {
        from: Option<ReleaseId>,
        to: ReleaseId,
        pid: u32,
        #[serde(with = "time::serde::rfc3339")]
        started_at: OffsetDateTime,
    },
    Prune {
        remove: Vec<ReleaseId>,
        pid: u32,
        #[serde(with = "time::serde::rfc3339")]
        started_at: OffsetDateTime,
    },
}

impl Operation {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Deploy { .. } => "deploy",
            Self::Rollback { .. } => "rollback",
            Self::Prune { .. } => "prune",
        }
    }
}

/// The whole journal file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Journal {
    pub version: u32,
    pub app: String,
    /// Oldest first.
    pub releases: Vec<Release>,
    pub op: Option<Operation>,
}

/// Errors reading or writing the journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("cannot read journal {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("journal {path} is corrupt: {source}")]
    Corrupt {
        path: String,
        source: serde_json::Error,
    },
    #[error("journal {path} has version {found}, this agent reads version {JOURNAL_VERSION}")]
    Version { path: String, found: u32 },
    #[error("cannot write journal {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

impl Journal {
    pub fn empty(app: &str) -> Self {
        Self {
            version: JOURNAL_VERSION,
            app: app.to_owned(),
            releases: Vec::new(),
            op: None,
        }
    }

    /// Reads the journal at `path`; a missing file is an empty journal.
    pub fn load(path: &Path, app: &str) -> Result<Self, JournalError> {
        let p = || path.display().to_string();
        let data = match std::fs::read(path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::empty(app)),
            Err(source) => return Err(JournalError::Read { path: p(), source }),
        };
        let j: Self = serde_json::from_slice(&data)
            .map_err(|source| JournalError::Corrupt { path: p(), source })?;
        if j.version != JOURNAL_VERSION {
            return Err(JournalError::Version {
                path: p(),
                found: j.version,
            });
        }
        Ok(j)
    }

    /// Durably replaces the journal at `path`.
    pub fn save(&self, path: &Path) -> Result<(), JournalError> {
        let data = serde_json::to_vec_pretty(self).map_err(|e| JournalError::Write {
            path: path.display().to_string(),
            source: std::io::Error::other(e),
        })?;
        durable::write_atomic(path, &data).map_err(|source| JournalError::Write {
            path: path.display().to_string(),
            source,
        })
    }

    pub fn get(&self, id: &ReleaseId) -> Option<&Release> {
        self.releases.iter().find(|r| &r.id == id)
    }

    pub fn get_mut(&mut self, id: &ReleaseId) -> Option<&mut Release> {
        self.releases.iter_mut().find(|r| &r.id == id)
    }

    /// Marks `id` with `status` and `reason`, if recorded.
    pub fn mark(&mut self, id: &ReleaseId, status: ReleaseStatus, reason: Option<String>) {
        if let Some(r) = self.get_mut(id) {
            r.status = status;
            r.reason = reason;
        }
    }

    /// The release a rollback from `current` goes to: the good release, other
    /// than `current`, that was live most recently (newest created among the
    /// never-activated ones).
    pub fn rollback_target(&self, current: Option<&ReleaseId>) -> Option<&Release> {
        self.releases
            .iter()
            .filter(|r| r.status == ReleaseStatus::Good && Some(&r.id) != current)
            .max_by_key(|r| (r.activated_at, r.created_at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn rel(id: &str, status: ReleaseStatus, act: Option<OffsetDateTime>) -> Release {
        Release {
            id: ReleaseId::new(id).unwrap(),
            status,
            created_at: datetime!(2026-01-01 0:00 UTC),
            activated_at: act,
            artifact_sha256: "00".into(),
            files: 0,
            bytes: 0,
            reason: None,
            port: None,
        }
    }

    #[test]
    fn rollback_target_is_most_recently_live_good_release() {
        let mut j = Journal::empty("web");
        j.releases = vec![
            rel(
                "a",
                ReleaseStatus::Good,
                Some(datetime!(2026-01-02 0:00 UTC)),
            ),
            rel(
                "b",
                ReleaseStatus::Good,
                Some(datetime!(2026-01-03 0:00 UTC)),
            ),
            rel(
                "c",
                ReleaseStatus::Bad,
                Some(datetime!(2026-01-04 0:00 UTC)),
            ),
            rel(
                "d",
                ReleaseStatus::Good,
                Some(datetime!(2026-01-05 0:00 UTC)),
            ),
        ];
        let cur = ReleaseId::new("d").unwrap();
        assert_eq!(j.rollback_target(Some(&cur)).unwrap().id.as_str(), "b");
        let cur = ReleaseId::new("b").unwrap();
        assert_eq!(j.rollback_target(Some(&cur)).unwrap().id.as_str(), "d");
    }

    #[test]
    fn round_trips_and_rejects_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("journal.json");
        assert_eq!(Journal::load(&p, "web").unwrap(), Journal::empty("web"));
        let mut j = Journal::empty("web");
        j.releases.push(rel("a", ReleaseStatus::Good, None));
        j.op = Some(Operation::Prune {
            remove: vec![ReleaseId::new("a").unwrap()],
            pid: 1,
            started_at: datetime!(2026-01-01 0:00 UTC),
        });
        j.save(&p).unwrap();
        assert_eq!(Journal::load(&p, "web").unwrap(), j);
        std::fs::write(&p, b"{not json").unwrap();
        let err = Journal::load(&p, "web").unwrap_err().to_string();
        assert!(
            err.contains("corrupt") && err.contains("journal.json"),
            "{err}"
        );
    }
}
