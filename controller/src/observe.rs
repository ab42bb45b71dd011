//! Histograms of what the rollout executor sees while the controller runs:
//! whole deployments, each node's part, each step on each node. They live
//! for the process (as Prometheus counters do: `rate()` copes with a
//! restart), in one process-wide set so that every door that starts a
//! deployment (gRPC, HTTP) is measured without a handle passed around;
//! [`crate::metrics`] shows them on `/metrics`.

use std::collections::BTreeSet;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec};

/// Buckets of whole-deployment and per-node durations, seconds: from a
/// restart (a second) to a slow rolling deploy of many batches.
const DEPLOYMENT_BUCKETS: &[f64] = &[
    0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0,
];
/// Buckets of one step on one node (fetch, verify, deploy, ...), seconds.
const STEP_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
/// At most this many distinct step names get a series of their own; later
/// ones count as "other" (step names come from agents).
const MAX_STEP_LABELS: usize = 32;
/// Longest step name kept as a label.
const MAX_STEP_LEN: usize = 32;

/// What the rollout executor observes, for the life of the process.
#[derive(Debug)]
struct Observed {
    /// Whole deployments by kind and outcome.
    deployment: HistogramVec,
    /// One node's command, sent to answered, by kind and outcome.
    node: HistogramVec,
    /// One step on one node, by kind and step.
    step: HistogramVec,
    /// Step names given a series so far.
    steps: Mutex<BTreeSet<String>>,
}

fn histogram(name: &str, help: &str, buckets: &[f64], labels: &[&str]) -> HistogramVec {
    let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
    match HistogramVec::new(opts, labels) {
        Ok(h) => h,
        // The names, labels and buckets are constants checked by the tests.
        Err(e) => unreachable!("histogram {name}: {e}"),
    }
}

static OBSERVED: LazyLock<Observed> = LazyLock::new(|| {
    Observed {
    deployment: histogram(
        "slipway_deployment_duration_seconds",
        "Duration of finished deployments (start to last node's answer) run by this controller process.",
        DEPLOYMENT_BUCKETS,
        &["kind", "outcome"],
    ),
    node: histogram(
        "slipway_deployment_node_duration_seconds",
        "Duration of one node's part of a deployment, command sent to result.",
        DEPLOYMENT_BUCKETS,
        &["kind", "outcome"],
    ),
    step: histogram(
        "slipway_deployment_step_duration_seconds",
        "Duration of one step (as the agent names it in its progress) on one node.",
        STEP_BUCKETS,
        &["kind", "step"],
    ),
    steps: Mutex::new(BTreeSet::new()),
}
});

/// Records a finished deployment of `kind` ("deploy", "rollback", ...).
pub fn observe_deployment(kind: &str, succeeded: bool, took: Duration) {
    let outcome = if succeeded { "succeeded" } else { "failed" };
    OBSERVED
        .deployment
        .with_label_values(&[kind, outcome])
        .observe(took.as_secs_f64());
}

/// Records one node's part of a deployment; `outcome` is the controller's
/// spelling ("succeeded", "failed", "rolled_back", ...).
pub fn observe_node(kind: &str, outcome: &str, took: Duration) {
    OBSERVED
        .node
        .with_label_values(&[kind, outcome])
        .observe(took.as_secs_f64());
}

/// Records one step of one node's command.
pub fn observe_step(kind: &str, step: &str, took: Duration) {
    let step = step_label(step);
    OBSERVED
        .step
        .with_label_values(&[kind, &step])
        .observe(took.as_secs_f64());
}

/// The label for a step name an agent sent: the name itself if it is a
/// short lowercase word and one of the first [`MAX_STEP_LABELS`] seen,
/// else "other".
pub(crate) fn step_label(step: &str) -> String {
    let word = !step.is_empty()
        && step.len() <= MAX_STEP_LEN
        && step
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if !word {
        return "other".to_owned();
    }
    let Ok(mut seen) = OBSERVED.steps.lock() else {
        return "other".to_owned();
    };
    if seen.contains(step) || seen.len() < MAX_STEP_LABELS {
        seen.insert(step.to_owned());
        step.to_owned()
    } else {
        "other".to_owned()
    }
}

/// The histograms, to register in a scrape's registry (clones share the
/// process-wide values).
pub fn histograms() -> [HistogramVec; 3] {
    [
        OBSERVED.deployment.clone(),
        OBSERVED.node.clone(),
        OBSERVED.step.clone(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_names_from_agents_are_bounded() {
        assert_eq!(step_label("fetch"), "fetch");
        assert_eq!(step_label("Fetch"), "other");
        assert_eq!(step_label(""), "other");
        assert_eq!(step_label(&"a".repeat(MAX_STEP_LEN + 1)), "other");
        assert_eq!(step_label("a\"b"), "other");
        for i in 0..(MAX_STEP_LABELS * 2) {
            let _ = step_label(&format!("s{i}"));
        }
        let seen = OBSERVED.steps.lock().map(|s| s.len()).unwrap_or(usize::MAX);
        assert!(seen <= MAX_STEP_LABELS, "{seen} step labels");
        assert_eq!(
            step_label("fetch"),
            "fetch",
            "a step seen before keeps its label"
        );
    }

    #[test]
    fn observations_show_in_the_histograms() {
        observe_deployment("unit-test", true, Duration::from_millis(1500));
        observe_node("unit-test", "failed", Duration::from_secs(3));
        let [deployment, node, _] = histograms();
        let d = deployment.with_label_values(&["unit-test", "succeeded"]);
        assert!(d.get_sample_count() >= 1);
        assert!(d.get_sample_sum() >= 1.5);
        assert!(
            node.with_label_values(&["unit-test", "failed"])
                .get_sample_count()
                >= 1
        );
    }
}
