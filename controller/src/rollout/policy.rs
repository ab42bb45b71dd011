//! The rollout policy, pure: the batches of a rollout and, given each
//! target's state, what a deployment does next ([`next_step`]); the
//! default release id and the summary of a finished deployment.

use slipway_proto::v1::{rollout, NodeResult, Outcome};

/// The shape of a rollout (control.proto `Rollout.Strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    /// Every node at once; the controller stops and undoes nothing.
    #[default]
    AllAtOnce,
    /// Batches of `max_parallel` nodes, one after the other.
    Rolling,
    /// `canary` nodes first, then the rest in batches of `max_parallel`.
    Canary,
}

impl Strategy {
    /// The name in records and output: `all_at_once`, `rolling`, `canary`.
    pub fn name(self) -> &'static str {
        match self {
            Self::AllAtOnce => "all_at_once",
            Self::Rolling => "rolling",
            Self::Canary => "canary",
        }
    }
}

/// A rollout as the controller runs it: the protocol's `Rollout`, checked,
/// with its defaults filled in (see control.proto for the semantics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rollout {
    /// The shape.
    pub strategy: Strategy,
    /// Nodes per batch: ≥ 1 for rolling; for canary, after the canary
    /// batch, 0 meaning all the rest at once; 0 for all at once.
    pub max_parallel: u32,
    /// Node failures tolerated before the rollout stops (rolling, canary).
    pub max_unavailable: u32,
    /// Canary nodes: ≥ 1 for canary, else 0.
    pub canary: u32,
}

/// A `Rollout` request that makes no sense.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RolloutError {
    /// A strategy number this controller does not know.
    #[error("unknown rollout strategy {0}")]
    UnknownStrategy(i32),
    /// A setting given for a strategy that does not use it.
    #[error(
        "rollout {field} = {value} does not apply to strategy {strategy} (only to {applies_to})"
    )]
    NotApplicable {
        /// The setting.
        field: &'static str,
        /// Its value.
        value: u32,
        /// The strategy asked for.
        strategy: &'static str,
        /// The strategies it applies to.
        applies_to: &'static str,
    },
}

/// One batch of a rollout: target indices, started together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Indices into [`super::Plan::targets`].
    pub nodes: std::ops::Range<usize>,
    /// The canary batch of a canary rollout.
    pub canary: bool,
}

impl Rollout {
    /// Checks the protocol's rollout (unset = all at once) and fills in its
    /// defaults.
    pub fn from_proto(rollout: Option<&slipway_proto::v1::Rollout>) -> Result<Self, RolloutError> {
        let Some(r) = rollout else {
            return Ok(Self::default());
        };
        let strategy = match rollout::Strategy::try_from(r.strategy) {
            Ok(rollout::Strategy::AllAtOnce) => Strategy::AllAtOnce,
            Ok(rollout::Strategy::Rolling) => Strategy::Rolling,
            Ok(rollout::Strategy::Canary) => Strategy::Canary,
            Err(_) => return Err(RolloutError::UnknownStrategy(r.strategy)),
        };
        let not_for = |field: &'static str, value: u32, applies_to: &'static str| {
            RolloutError::NotApplicable {
                field,
                value,
                strategy: strategy.name(),
                applies_to,
            }
        };
        match strategy {
            Strategy::AllAtOnce => {
                for (field, value) in [
                    ("max_parallel", r.max_parallel),
                    ("max_unavailable", r.max_unavailable),
                ] {
                    if value != 0 {
                        return Err(not_for(field, value, "rolling and canary"));
                    }
                }
                if r.canary != 0 {
                    return Err(not_for("canary", r.canary, "canary"));
                }
                Ok(Self::default())
            }
            Strategy::Rolling => {
                if r.canary != 0 {
                    return Err(not_for("canary", r.canary, "canary"));
                }
                Ok(Self {
                    strategy,
                    max_parallel: r.max_parallel.max(1),
                    max_unavailable: r.max_unavailable,
                    canary: 0,
                })
            }
            Strategy::Canary => Ok(Self {
                strategy,
                max_parallel: r.max_parallel,
                max_unavailable: r.max_unavailable,
                canary: r.canary.max(1),
            }),
        }
    }

    /// The protocol form (defaults filled in).
    pub fn to_proto(self) -> slipway_proto::v1::Rollout {
        let strategy = match self.strategy {
            Strategy::AllAtOnce => rollout::Strategy::AllAtOnce,
            Strategy::Rolling => rollout::Strategy::Rolling,
            Strategy::Canary => rollout::Strategy::Canary,
        };
        slipway_proto::v1::Rollout {
            strategy: strategy as i32,
            max_parallel: self.max_parallel,
            max_unavailable: self.max_unavailable,
            canary: self.canary,
        }
    }

    /// For the database and the audit log.
    pub fn to_json(self) -> serde_json::Value {
        serde_json::json!({
            "strategy": self.strategy.name(),
            "max_parallel": self.max_parallel,
            "max_unavailable": self.max_unavailable,
            "canary": self.canary,
        })
    }

    /// Whether node failures stop the rollout (never all at once: every
    /// node has its command already).
    pub fn stops_on_failure(self) -> bool {
        self.strategy != Strategy::AllAtOnce
    }

    /// The batches for `n` targets, in target order; every target is in
    /// exactly one batch.
    pub fn batches(self, n: usize) -> Vec<Batch> {
        let size = |s: u32| usize::try_from(s).unwrap_or(usize::MAX);
        let mut out = Vec::new();
        let mut at = 0;
        if self.strategy == Strategy::Canary && n > 0 {
            at = size(self.canary).clamp(1, n);
            out.push(Batch {
                nodes: 0..at,
                canary: true,
            });
        }
        let step = match self.strategy {
            Strategy::AllAtOnce => n,
            Strategy::Rolling => size(self.max_parallel).max(1),
            Strategy::Canary if self.max_parallel == 0 => n,
            Strategy::Canary => size(self.max_parallel),
        };
        while at < n {
            let end = at.saturating_add(step).min(n);
            out.push(Batch {
                nodes: at..end,
                canary: false,
            });
            at = end;
        }
        out
    }
}

/// Where one target of a running deployment is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    /// Its batch has not started.
    Pending,
    /// Its command is out, no answer yet.
    Running,
    /// It answered SUCCEEDED.
    Succeeded,
    /// Anything else: failed, rolled back by its health gate, unreachable,
    /// connection lost, timed out.
    Failed,
}

/// What a deployment does next ([`next_step`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Send the commands of this batch (index into the batches).
    Start(usize),
    /// Wait for a running node to answer.
    Wait,
    /// Stop the rollout: this target's failure was one too many.
    Stop {
        /// Index of the target whose failure stopped it.
        stopped_by: usize,
    },
    /// Every batch ran.
    Done,
}

/// The rollout policy, as a pure decision: given the batches, each
/// target's state and the targets that failed (in the order they failed),
/// what happens next. A batch runs to its end before the failures are
/// judged; then more than `max_unavailable` failures stop a rolling or
/// canary rollout, else the next batch starts.
pub fn next_step(
    rollout: &Rollout,
    batches: &[Batch],
    states: &[NodeState],
    failed_in_order: &[usize],
) -> Step {
    if states.contains(&NodeState::Running) {
        return Step::Wait;
    }
    let tolerated = usize::try_from(rollout.max_unavailable).unwrap_or(usize::MAX);
    if rollout.stops_on_failure() {
        if let Some(&stopped_by) = failed_in_order.get(tolerated) {
            return Step::Stop { stopped_by };
        }
    }
    let pending = |b: &Batch| {
        b.nodes
            .clone()
            .all(|i| states.get(i) == Some(&NodeState::Pending))
    };
    match batches.iter().position(pending) {
        Some(index) => Step::Start(index),
        None => Step::Done,
    }
}

/// The default release id: `<UTC yyyymmddThhmmssZ>-<sha256[..12]>`, sortable
/// by time and traceable to the artifact.
pub fn default_release_id(sha256: &str, now: time::OffsetDateTime) -> String {
    let format = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
    let stamp = now
        .format(&format)
        .unwrap_or_else(|_| now.unix_timestamp().to_string());
    format!("{stamp}-{}", &sha256[..sha256.len().min(12)])
}

/// The summary of a finished deployment: success only if every node
/// succeeded; the message names each node that did not and why.
pub fn summarize(results: &[NodeResult]) -> (bool, u32, String) {
    let failed: Vec<&NodeResult> = results
        .iter()
        .filter(|r| r.outcome != Outcome::Succeeded as i32)
        .collect();
    if failed.is_empty() {
        let n = results.len();
        return (true, 0, format!("{n} of {n} nodes succeeded"));
    }
    let reasons: Vec<String> = failed
        .iter()
        .map(|r| {
            let outcome = match Outcome::try_from(r.outcome) {
                Ok(Outcome::RolledBack) => "rolled back: ",
                Ok(Outcome::Skipped) => "skipped: ",
                _ => "",
            };
            format!("{} ({outcome}{})", r.node_name, r.message)
        })
        .collect();
    let count = u32::try_from(failed.len()).unwrap_or(u32::MAX);
    let message = format!(
        "{count} of {} nodes failed: {}",
        results.len(),
        reasons.join(", ")
    );
    (false, count, message)
}

/// Why a rollout stopped, as recorded and sent: "deployment stopped after
/// web-2 failed" (a follower from the record finds the node by it).
pub fn stop_reason(node_name: &str) -> String {
    format!("deployment stopped after {node_name} failed")
}

/// The outcome as recorded: `succeeded`, `failed`, `rolled_back`, `skipped`.
pub(crate) fn outcome_text(outcome: i32) -> &'static str {
    match Outcome::try_from(outcome) {
        Ok(Outcome::Succeeded) => "succeeded",
        Ok(Outcome::RolledBack) => "rolled_back",
        Ok(Outcome::Skipped) => "skipped",
        _ => "failed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(name: &str, outcome: Outcome, message: &str) -> NodeResult {
        NodeResult {
            node_id: format!("n-{name}"),
            node_name: name.to_owned(),
            outcome: outcome as i32,
            release_id: String::new(),
            message: message.to_owned(),
        }
    }

    #[test]
    fn summary_names_failed_nodes_and_why() {
        let ok = [result("a", Outcome::Succeeded, "")];
        assert_eq!(
            summarize(&ok),
            (true, 0, "1 of 1 nodes succeeded".to_owned())
        );
        let mixed = [
            result("a", Outcome::Succeeded, ""),
            result("b", Outcome::Failed, "unreachable (no live session)"),
            result("c", Outcome::RolledBack, "health gate failed"),
        ];
        let (ok, failed, message) = summarize(&mixed);
        assert!(!ok);
        assert_eq!(failed, 2);
        assert_eq!(
            message,
            "2 of 3 nodes failed: b (unreachable (no live session)), c (rolled back: health gate failed)"
        );
    }

    #[test]
    fn summary_says_skipped() {
        let stopped = [
            result("a", Outcome::Failed, "unreachable (no live session)"),
            result("b", Outcome::Skipped, "deployment stopped after a failed"),
        ];
        assert_eq!(
            summarize(&stopped).2,
            "2 of 2 nodes failed: a (unreachable (no live session)), b (skipped: deployment stopped after a failed)"
        );
    }

    fn rollout(
        strategy: i32,
        max_parallel: u32,
        max_unavailable: u32,
        canary: u32,
    ) -> Result<Rollout, RolloutError> {
        Rollout::from_proto(Some(&slipway_proto::v1::Rollout {
            strategy,
            max_parallel,
            max_unavailable,
            canary,
        }))
    }

    fn ranges(batches: &[Batch]) -> Vec<(std::ops::Range<usize>, bool)> {
        batches
            .iter()
            .map(|b| (b.nodes.clone(), b.canary))
            .collect()
    }

    #[test]
    fn all_at_once_is_one_batch_and_the_default() {
        let all = Rollout::from_proto(None).unwrap();
        assert_eq!(all, Rollout::default());
        assert_eq!(ranges(&all.batches(3)), vec![(0..3, false)]);
        assert!(all.batches(0).is_empty());
        assert!(!all.stops_on_failure());
        assert_eq!(rollout(0, 0, 0, 0).unwrap(), all);
        let err = rollout(0, 2, 0, 0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "rollout max_parallel = 2 does not apply to strategy all_at_once (only to rolling and canary)"
        );
        assert!(rollout(0, 0, 1, 0).is_err());
        assert!(rollout(0, 0, 0, 1).is_err());
        assert_eq!(
            rollout(7, 0, 0, 0).unwrap_err(),
            RolloutError::UnknownStrategy(7)
        );
    }

    #[test]
    fn rolling_batches_of_max_parallel_in_target_order() {
        let r = rollout(1, 0, 0, 0).unwrap();
        assert_eq!(r.max_parallel, 1, "0 means 1 for rolling");
        assert_eq!(
            ranges(&r.batches(3)),
            vec![(0..1, false), (1..2, false), (2..3, false)]
        );
        let r = rollout(1, 2, 1, 0).unwrap();
        assert_eq!(
            ranges(&r.batches(5)),
            vec![(0..2, false), (2..4, false), (4..5, false)]
        );
        assert_eq!(ranges(&r.batches(1)), vec![(0..1, false)]);
        assert!(rollout(1, 2, 0, 1).is_err(), "canary is for canary only");
    }

    #[test]
    fn canary_first_then_the_rest() {
        let r = rollout(2, 0, 0, 0).unwrap();
        assert_eq!(r.canary, 1, "0 means 1 canary");
        assert_eq!(ranges(&r.batches(4)), vec![(0..1, true), (1..4, false)]);
        let r = rollout(2, 2, 0, 2).unwrap();
        assert_eq!(
            ranges(&r.batches(7)),
            vec![(0..2, true), (2..4, false), (4..6, false), (6..7, false)]
        );
        // More canaries than nodes: every node is a canary.
        let r = rollout(2, 0, 0, 5).unwrap();
        assert_eq!(ranges(&r.batches(2)), vec![(0..2, true)]);
    }

    #[test]
    fn next_step_runs_batches_and_stops_past_max_unavailable() {
        use NodeState::{Failed, Pending, Running, Succeeded};
        let r = rollout(1, 1, 0, 0).unwrap();
        let b = r.batches(3);
        assert_eq!(
            next_step(&r, &b, &[Pending, Pending, Pending], &[]),
            Step::Start(0)
        );
        assert_eq!(
            next_step(&r, &b, &[Running, Pending, Pending], &[]),
            Step::Wait
        );
        assert_eq!(
            next_step(&r, &b, &[Succeeded, Pending, Pending], &[]),
            Step::Start(1)
        );
        assert_eq!(
            next_step(&r, &b, &[Succeeded, Failed, Pending], &[1]),
            Step::Stop { stopped_by: 1 }
        );
        assert_eq!(
            next_step(&r, &b, &[Succeeded, Succeeded, Succeeded], &[]),
            Step::Done
        );

        // One failure tolerated: the rollout goes on; the second stops it.
        let r = rollout(1, 1, 1, 0).unwrap();
        assert_eq!(
            next_step(&r, &b, &[Succeeded, Failed, Pending], &[1]),
            Step::Start(2)
        );
        assert_eq!(
            next_step(&r, &b, &[Succeeded, Failed, Succeeded], &[1]),
            Step::Done
        );
        assert_eq!(
            next_step(&r, &b, &[Failed, Failed, Pending], &[1, 0]),
            Step::Stop { stopped_by: 0 }
        );

        // A batch runs to its end before the failures are judged.
        let r = rollout(1, 2, 0, 0).unwrap();
        let b = r.batches(3);
        assert_eq!(
            next_step(&r, &b, &[Failed, Running, Pending], &[0]),
            Step::Wait
        );

        // All at once: failures stop nothing.
        let all = Rollout::default();
        let b = all.batches(3);
        assert_eq!(
            next_step(&all, &b, &[Failed, Failed, Succeeded], &[0, 1]),
            Step::Done
        );

        // Canary failing: the rest never starts.
        let c = rollout(2, 0, 0, 1).unwrap();
        let b = c.batches(3);
        assert_eq!(
            next_step(&c, &b, &[Pending, Pending, Pending], &[]),
            Step::Start(0)
        );
        assert_eq!(
            next_step(&c, &b, &[Failed, Pending, Pending], &[0]),
            Step::Stop { stopped_by: 0 }
        );
        assert_eq!(
            next_step(&c, &b, &[Succeeded, Pending, Pending], &[]),
            Step::Start(1)
        );
    }

    #[test]
    fn default_release_id_is_time_then_digest() {
        let now = time::macros::datetime!(2026-01-02 03:04:05 UTC);
        assert_eq!(
            default_release_id(&"ab".repeat(32), now),
            "20260102T030405Z-abababababab"
        );
    }
}
