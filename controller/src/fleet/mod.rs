//! The fleet: the view of every node from the database ([`nodes()`]), the
//! operator's node actions ([`revoke`]), the status summary of `slipway
//! status` ([`summarize_status`]), and both as the Control API sends them
//! (`wire`: `From` conversions into the `slipway_proto::v1` messages), and
//! the certificate health of the whole system ([`certs`]), which status
//! embeds.

pub mod certs;
mod nodes;
mod status;
mod wire;

pub use nodes::{apply_sessions, nodes, nodes_and_certs, revoke, NodeView, RevokeError, Revoked};
pub use status::{
    summarize_status, AgentSummary, AppSummary, FleetStatus, NodeStatus, RefreshAnswer,
    ReleaseNodes, StatusInputs, UnhealthyApp, VersionNodes, RSS_OUTLIER_FACTOR,
    RSS_OUTLIER_MIN_EXCESS,
};
