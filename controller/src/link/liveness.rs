//! When a node counts as alive: the heartbeat interval the controller
//! announces, and the state a node is in given when it was last heard from.
//! Both are pure functions so the rules are tested without clocks or sockets.
//!
//! # Heartbeat interval (as Nomad does)
//!
//! The controller wants about [`HeartbeatPolicy::target_rate`] heartbeats
//! per second in total, whatever the fleet size, so
//!
//! ```text
//! interval = clamp(ceil(connected_nodes / target_rate) s, min_interval, max_interval)
//! ```
//!
//! With the defaults (5 s, 50/s, 60 s): up to 250 nodes heartbeat every 5 s,
//! 1,000 nodes every 20 s, and from 3,000 nodes on every 60 s (the cap keeps
//! failure detection within minutes; past it the rate grows again). Each
//! agent is told the interval in its Welcome, computed with itself counted,
//! and keeps it for that session.
//!
//! # Node state
//!
//! A node is [`NodeState::Online`] while it was heard from (Hello or
//! heartbeat) within `unreachable_after` intervals (default 3, so a single
//! lost heartbeat does not flap). After a controller (re)start, agents need
//! time to notice, back off and reconnect, so for the same grace period every
//! node not yet heard from is [`NodeState::Unknown`] rather than
//! unreachable.

use std::time::Duration;

/// Default and minimum heartbeat interval.
pub const DEFAULT_MIN_INTERVAL: Duration = Duration::from_secs(5);
/// Longest interval the controller will announce, however large the fleet.
pub const DEFAULT_MAX_INTERVAL: Duration = Duration::from_secs(60);
/// Heartbeats per second the controller aims for across the whole fleet
/// (Nomad's `max_heartbeats_per_second` default is 50 too).
pub const DEFAULT_TARGET_RATE: u32 = 50;
/// Missed intervals before a node is unreachable, and the length (in
/// intervals) of the grace period after a controller start.
pub const DEFAULT_UNREACHABLE_AFTER: u32 = 3;

/// How the heartbeat interval grows with the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatPolicy {
    /// Shortest interval, used for small fleets.
    pub min_interval: Duration,
    /// Longest interval, so failure detection stays bounded.
    pub max_interval: Duration,
    /// Heartbeats per second aimed for across the fleet (at least 1).
    pub target_rate: u32,
}

impl Default for HeartbeatPolicy {
    fn default() -> Self {
        Self {
            min_interval: DEFAULT_MIN_INTERVAL,
            max_interval: DEFAULT_MAX_INTERVAL,
            target_rate: DEFAULT_TARGET_RATE,
        }
    }
}

/// The interval to announce when `connected` nodes (this one included) hold
/// a session: `clamp(ceil(connected / target_rate) s, min, max)`.
pub fn heartbeat_interval(connected: usize, policy: &HeartbeatPolicy) -> Duration {
    let rate = u64::from(policy.target_rate.max(1));
    let connected = u64::try_from(connected).unwrap_or(u64::MAX);
    let spread = Duration::from_secs(connected.div_ceil(rate));
    spread
        .max(policy.min_interval)
        .min(policy.max_interval.max(policy.min_interval))
}

/// Liveness of a node as shown in the fleet view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    /// Heard from within the allowed silence.
    Online,
    /// Silent for longer than the allowed silence.
    Unreachable,
    /// Not heard from since the controller started, still within the grace
    /// period after that start.
    Unknown,
    /// Revoked by an operator; its certificates are refused.
    Revoked,
    /// Heard from within the allowed silence but holding no session with
    /// the running controller, so no command can reach it (only the
    /// controller itself knows its sessions: views it serves say this).
    Disconnected,
}

impl NodeState {
    /// Lowercase name, as in the JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Online => "online",
            Self::Unreachable => "unreachable",
            Self::Unknown => "unknown",
            Self::Revoked => "revoked",
            Self::Disconnected => "disconnected",
        }
    }
}

/// The state of a node last heard from at `last_seen` (seconds since the
/// epoch, `None` if never), at `now`, for a controller started at
/// `started_at` that expects a heartbeat every `interval` and declares a
/// node unreachable after `unreachable_after` silent intervals. (Revocation
/// is decided by the caller; this never returns [`NodeState::Revoked`].)
pub fn node_state(
    last_seen: Option<i64>,
    now: i64,
    started_at: i64,
    interval: Duration,
    unreachable_after: u32,
) -> NodeState {
    let allowed = i64::try_from(
        interval
            .as_secs()
            .saturating_mul(u64::from(unreachable_after)),
    )
    .unwrap_or(i64::MAX);
    // Heard before this controller started means heard by an earlier one:
    // the node has not connected to this one yet. (Whole seconds: a node
    // heard in the start's own second counts as heard by this one; the
    // controller's own views also know its sessions, fleet::apply_sessions.)
    if last_seen.is_some_and(|seen| seen >= started_at && now.saturating_sub(seen) <= allowed) {
        return NodeState::Online;
    }
    if now.saturating_sub(started_at) < allowed {
        return NodeState::Unknown;
    }
    NodeState::Unreachable
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIVE: Duration = Duration::from_secs(5);

    #[test]
    fn interval_grows_with_the_fleet_within_bounds() {
        let policy = HeartbeatPolicy::default();
        let secs = |n| heartbeat_interval(n, &policy).as_secs();
        assert_eq!(secs(0), 5);
        assert_eq!(secs(1), 5);
        assert_eq!(secs(250), 5);
        assert_eq!(secs(251), 6);
        assert_eq!(secs(1_000), 20);
        assert_eq!(secs(2_999), 60);
        assert_eq!(secs(100_000), 60);
        // The fleet-wide rate stays at or below the target until the cap.
        for n in [1, 50, 300, 1_234, 2_999] {
            assert!(n as u64 / secs(n) <= 50, "{n}");
        }
    }

    #[test]
    fn interval_policy_edge_cases() {
        let zero_rate = HeartbeatPolicy {
            target_rate: 0,
            ..HeartbeatPolicy::default()
        };
        assert_eq!(heartbeat_interval(10, &zero_rate).as_secs(), 10);
        let inverted = HeartbeatPolicy {
            min_interval: Duration::from_secs(30),
            max_interval: Duration::from_secs(10),
            target_rate: 50,
        };
        assert_eq!(heartbeat_interval(1, &inverted).as_secs(), 30);
    }

    #[test]
    fn online_while_heard_within_three_intervals() {
        let started = 1_000;
        assert_eq!(
            node_state(Some(2_000), 2_000, started, FIVE, 3),
            NodeState::Online
        );
        assert_eq!(
            node_state(Some(2_000), 2_015, started, FIVE, 3),
            NodeState::Online
        );
        assert_eq!(
            node_state(Some(2_000), 2_016, started, FIVE, 3),
            NodeState::Unreachable
        );
        // A clock that went backwards is not silence.
        assert_eq!(
            node_state(Some(2_000), 1_990, started, FIVE, 3),
            NodeState::Online
        );
    }

    #[test]
    fn grace_period_after_controller_start() {
        let started = 10_000;
        // Last heard long before the restart: unknown during the grace period...
        assert_eq!(
            node_state(Some(100), 10_000, started, FIVE, 3),
            NodeState::Unknown
        );
        assert_eq!(
            node_state(Some(100), 10_014, started, FIVE, 3),
            NodeState::Unknown
        );
        assert_eq!(
            node_state(None, 10_014, started, FIVE, 3),
            NodeState::Unknown
        );
        // ...then unreachable if it still has not come back.
        assert_eq!(
            node_state(Some(100), 10_015, started, FIVE, 3),
            NodeState::Unreachable
        );
        assert_eq!(
            node_state(None, 10_015, started, FIVE, 3),
            NodeState::Unreachable
        );
        // Back within the grace period: online.
        assert_eq!(
            node_state(Some(10_010), 10_012, started, FIVE, 3),
            NodeState::Online
        );
        // Heard by the previous controller a moment before this one
        // started: not online until it connects to this one.
        assert_eq!(
            node_state(Some(9_998), 10_001, started, FIVE, 3),
            NodeState::Unknown
        );

        // A longer interval (large fleet) stretches both windows.
        let twenty = Duration::from_secs(20);
        assert_eq!(
            node_state(Some(100), 10_059, started, twenty, 3),
            NodeState::Unknown
        );
        assert_eq!(
            node_state(Some(10_000), 10_060, started, twenty, 3),
            NodeState::Online
        );
    }
}
