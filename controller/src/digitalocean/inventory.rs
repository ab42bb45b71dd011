//! The fleet from droplet tags: a sync lists the droplets of the fleet's
//! tags, stores them as expected nodes, audits what changed, and retires
//! (revokes) the live node of every droplet that is gone — destroyed, or
//! no longer carrying a fleet tag. A node is matched to its droplet only by
//! the droplet id its agent read from the metadata service and reported in
//! its Hello (`nodes.droplet_id`), never by name.
//!
//! A failed listing changes nothing: a droplet is marked gone only by a
//! sync whose every listing succeeded.

use std::collections::BTreeMap;

use serde::Serialize;

use super::client::{Client, DoError};
use super::config::DoConfig;
use crate::audit::AuditEvent;
use crate::store::{DropletRow, Store, StoreError};

/// Audit actor of what a sync does.
pub const ACTOR: &str = "digitalocean-sync";
/// A droplet of the fleet's tags was seen for the first time (or again).
pub const DROPLET_ADDED: &str = "DROPLET_ADDED";
/// A fleet droplet's tags changed.
pub const DROPLET_RETAGGED: &str = "DROPLET_RETAGGED";
/// A fleet droplet is no longer found under the fleet's tags.
pub const DROPLET_GONE: &str = "DROPLET_GONE";
/// The node of a gone droplet was revoked (its certificates refused).
pub const NODE_RETIRED: &str = "NODE_RETIRED";
/// `droplets retire --destroy` destroyed a droplet.
pub const DROPLET_DESTROYED: &str = "DROPLET_DESTROYED";
/// A periodic sync failed (the fleet view keeps the last good sync).
pub const DROPLET_SYNC_FAILED: &str = "DROPLET_SYNC_FAILED";

/// Why a sync failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Api(#[from] DoError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    MassRetire(#[from] MassRetire),
}

/// The listing would retire most of the fleet at once: more likely a fleet
/// tag renamed or removed than the droplets destroyed.
#[derive(Debug, thiserror::Error)]
#[error(
    "this sync would retire {} of the {known} droplets of the fleet ({}): was a fleet tag \
     renamed or removed? Nothing was changed; `slipway-controller droplets sync --force` \
     accepts it",
    gone.len(),
    gone.join(", ")
)]
pub struct MassRetire {
    /// The droplets it would mark gone, by name.
    pub gone: Vec<String>,
    /// Live droplets of the fleet before it.
    pub known: usize,
}

/// The droplets a sync would mark gone, refused when they are more than
/// half of a fleet of two or more (unless `force`): the names, for the
/// refusal. A one-droplet fleet losing its droplet, or a few destroyed
/// droplets, go through.
pub fn check_mass_retire(
    known: &[DropletRow],
    seen: &[DropletRow],
    force: bool,
) -> Result<(), MassRetire> {
    let live: Vec<&DropletRow> = known.iter().filter(|d| d.gone_at.is_none()).collect();
    let gone: Vec<String> = live
        .iter()
        .filter(|d| !seen.iter().any(|s| s.id == d.id))
        .map(|d| d.name.clone())
        .collect();
    if !force && live.len() >= 2 && gone.len() * 2 > live.len() {
        return Err(MassRetire {
            gone,
            known: live.len(),
        });
    }
    Ok(())
}

/// What one sync found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SyncReport {
    /// Droplets under the fleet's tags now.
    pub droplets: usize,
    pub added: Vec<String>,
    pub retagged: Vec<String>,
    pub gone: Vec<String>,
    /// Nodes revoked because their droplet is gone: (node id, name).
    pub retired: Vec<(String, String)>,
}

/// One sync: see the module docs. Refused, changing nothing, when it
/// would retire more than half of the fleet at once, unless `force`
/// ([`check_mass_retire`]).
pub async fn sync(
    store: &Store,
    client: &Client,
    config: &DoConfig,
    now: i64,
    force: bool,
) -> Result<SyncReport, SyncError> {
    let mut seen: BTreeMap<u64, DropletRow> = BTreeMap::new();
    for tag in &config.fleet_tags {
        for d in client.droplets_by_tag(tag).await? {
            seen.entry(d.id).or_insert_with(|| DropletRow {
                id: d.id,
                name: d.name.clone(),
                region: d.region.slug.clone(),
                size: d.size_slug.clone(),
                public_ipv4: d.public_ipv4().map(|ip| ip.to_string()),
                private_ipv4: d.private_ipv4().map(|ip| ip.to_string()),
                tags: d.tags.clone(),
                status: d.status.clone(),
                first_seen_at: now,
                synced_at: now,
                gone_at: None,
                node_id: None,
                node_name: None,
            });
        }
    }
    let seen: Vec<DropletRow> = seen.into_values().collect();
    check_mass_retire(&store.droplets().await?, &seen, force)?;
    let changes = store.sync_droplets(&seen, now).await?;
    let mut report = SyncReport {
        droplets: seen.len(),
        ..SyncReport::default()
    };
    for d in &changes.added {
        report.added.push(d.name.clone());
        audit(store, DROPLET_ADDED, d, serde_json::json!({}), now).await;
    }
    for (d, before) in &changes.retagged {
        report.retagged.push(d.name.clone());
        audit(
            store,
            DROPLET_RETAGGED,
            d,
            serde_json::json!({ "tags_before": before }),
            now,
        )
        .await;
    }
    for d in &changes.gone {
        report.gone.push(d.name.clone());
        audit(
            store,
            DROPLET_GONE,
            d,
            serde_json::json!({ "why": "no longer listed under the fleet tags (destroyed or untagged)",
                                "fleet_tags": config.fleet_tags }),
            now,
        )
        .await;
    }
    // Every live node on a gone droplet, not only this sync's: a sync
    // interrupted between marking and retiring is finished by the next.
    for d in store.droplets().await? {
        let (Some(gone_at), Some(node_id)) = (d.gone_at, d.node_id.clone()) else {
            continue;
        };
        let name = d.node_name.clone().unwrap_or_default();
        let event = AuditEvent::success(
            NODE_RETIRED,
            ACTOR,
            "node",
            &node_id,
            serde_json::json!({
                "name": name,
                "droplet_id": d.id,
                "droplet_name": d.name,
                "droplet_gone_at": crate::rfc3339(gone_at),
                "why": "its droplet is destroyed or no longer has a fleet tag; certificates revoked",
            }),
        );
        if store.revoke_node(&node_id, &event, now).await? {
            tracing::info!(node = %node_id, droplet = d.id, "retired the node of a gone droplet");
            report.retired.push((node_id, name));
        }
    }
    Ok(report)
}

async fn audit(
    store: &Store,
    event_type: &'static str,
    d: &DropletRow,
    extra: serde_json::Value,
    now: i64,
) {
    let mut details = serde_json::json!({
        "name": d.name,
        "region": d.region,
        "size": d.size,
        "public_ipv4": d.public_ipv4,
        "private_ipv4": d.private_ipv4,
        "tags": d.tags,
    });
    if let (Some(map), serde_json::Value::Object(more)) = (details.as_object_mut(), extra) {
        map.extend(more);
    }
    let event = AuditEvent::success(event_type, ACTOR, "droplet", d.id.to_string(), details);
    if let Err(err) = store.audit(&event, now).await {
        tracing::error!(%err, "could not record audit event");
    }
}

/// What `droplets retire` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Retired {
    pub droplet_id: u64,
    pub droplet_name: String,
    /// The node revoked, if one was matched and live: (id, name).
    pub node: Option<(String, String)>,
    pub destroyed: bool,
}

/// Why a retire did not happen.
#[derive(Debug, thiserror::Error)]
pub enum RetireError {
    #[error(
        "no droplet named {0:?} under the fleet tags as of the last sync (run `droplets sync`)"
    )]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("node {node} was retired but destroying droplet {droplet} failed: {source}")]
    Destroy {
        node: String,
        droplet: u64,
        source: DoError,
    },
}

/// `droplets retire NAME [--destroy]`: the droplet's node stops being
/// selected and its certificates are refused (revoked, audited
/// `NODE_RETIRED`); with a client, the droplet is then destroyed (audited
/// `DROPLET_DESTROYED`). The droplet is found by name among the current
/// synced droplets — the operator names a droplet; the node is the one
/// matched to it by id.
pub async fn retire(
    store: &Store,
    name: &str,
    destroy: Option<&Client>,
    actor: &str,
    now: i64,
) -> Result<Retired, RetireError> {
    let droplet = store
        .droplets()
        .await?
        .into_iter()
        .find(|d| d.gone_at.is_none() && d.name == name)
        .ok_or_else(|| RetireError::NotFound(name.to_owned()))?;
    let mut node = None;
    if let (Some(node_id), Some(node_name)) = (&droplet.node_id, &droplet.node_name) {
        let event = AuditEvent::success(
            NODE_RETIRED,
            actor,
            "node",
            node_id,
            serde_json::json!({
                "name": node_name,
                "droplet_id": droplet.id,
                "droplet_name": droplet.name,
                "why": "droplets retire: drained (no longer selected) and certificates revoked",
            }),
        );
        if store.revoke_node(node_id, &event, now).await? {
            node = Some((node_id.clone(), node_name.clone()));
        }
    }
    let mut destroyed = false;
    if let Some(client) = destroy {
        match client.destroy_droplet(droplet.id).await {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {}
            Err(source) => {
                return Err(RetireError::Destroy {
                    node: node.map(|(id, _)| id).unwrap_or_else(|| "(none)".into()),
                    droplet: droplet.id,
                    source,
                })
            }
        }
        store.mark_droplet_gone(droplet.id, now).await?;
        let event = AuditEvent::success(
            DROPLET_DESTROYED,
            actor,
            "droplet",
            droplet.id.to_string(),
            serde_json::json!({ "name": droplet.name, "node": node.as_ref().map(|(id, _)| id) }),
        );
        store.audit(&event, now).await?;
        destroyed = true;
    }
    Ok(Retired {
        droplet_id: droplet.id,
        droplet_name: droplet.name,
        node,
        destroyed,
    })
}

/// `serve`'s periodic sync: one at once, then one every `every`, until
/// `stop`. A failure is logged and audited (once until a sync succeeds
/// again); the view keeps the last good sync.
pub async fn periodic(
    store: Store,
    config: DoConfig,
    every: std::time::Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut failing = false;
    loop {
        let outcome = tokio::select! {
            () = stop.cancelled() => return,
            r = async {
                let client = config.client()?;
                sync(&store, &client, &config, crate::now_unix(), false).await
            } => r,
        };
        match outcome {
            Ok(report) => {
                failing = false;
                tracing::info!(
                    droplets = report.droplets,
                    added = report.added.len(),
                    gone = report.gone.len(),
                    retired = report.retired.len(),
                    "droplets synced"
                );
            }
            Err(err) => {
                tracing::error!(%err, "droplet sync failed");
                if !failing {
                    let event = AuditEvent::error(
                        DROPLET_SYNC_FAILED,
                        ACTOR,
                        "droplets",
                        config.fleet_tags.join(","),
                        serde_json::json!({ "api_url": config.api_url }),
                        err.to_string(),
                    );
                    if let Err(err) = store.audit(&event, crate::now_unix()).await {
                        tracing::error!(%err, "could not record audit event");
                    }
                }
                failing = true;
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}

/// The fleet as DigitalOcean and the agents see it together.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DropletsView {
    /// Droplets under the fleet's tags, each with its node if one enrolled
    /// ("expected, not enrolled" otherwise).
    pub droplets: Vec<DropletRow>,
    /// Droplets no longer found (their nodes retired).
    pub gone: Vec<DropletRow>,
    /// Live nodes matched to no current droplet: (id, name, droplet id
    /// reported, if any).
    pub agents_without_droplet: Vec<AgentWithoutDroplet>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentWithoutDroplet {
    pub node_id: String,
    pub name: String,
    pub reported_droplet_id: Option<u64>,
}

/// Reads the view from the store (works while `serve` runs).
pub async fn view(store: &Store) -> Result<DropletsView, StoreError> {
    let all = store.droplets().await?;
    let current: std::collections::HashSet<u64> = all
        .iter()
        .filter(|d| d.gone_at.is_none())
        .map(|d| d.id)
        .collect();
    let (mut gone, droplets): (Vec<_>, Vec<_>) = all.into_iter().partition(|d| d.gone_at.is_some());
    // A gone droplet's node was retired (revoked): named all the same.
    let retired = store.nodes_of_droplets().await?;
    for d in gone.iter_mut().filter(|d| d.node_id.is_none()) {
        if let Some((id, name)) = retired.get(&d.id) {
            d.node_id = Some(id.clone());
            d.node_name = Some(name.clone());
        }
    }
    let agents_without_droplet = store
        .node_droplet_ids()
        .await?
        .into_iter()
        .filter(|(_, _, d)| d.is_none_or(|d| !current.contains(&d)))
        .map(|(node_id, name, reported_droplet_id)| AgentWithoutDroplet {
            node_id,
            name,
            reported_droplet_id,
        })
        .collect();
    Ok(DropletsView {
        droplets,
        gone,
        agents_without_droplet,
    })
}

impl From<&DropletsView> for slipway_proto::v1::DropletsView {
    fn from(view: &DropletsView) -> Self {
        let entry = |d: &DropletRow| slipway_proto::v1::DropletEntry {
            id: d.id,
            name: d.name.clone(),
            region: d.region.clone(),
            size: d.size.clone(),
            public_ipv4: d.public_ipv4.clone().unwrap_or_default(),
            tags: d.tags.clone(),
            node_id: d.node_id.clone().unwrap_or_default(),
            node_name: d.node_name.clone().unwrap_or_default(),
            gone_at_unix: d.gone_at.unwrap_or(0),
        };
        Self {
            droplets: view.droplets.iter().map(entry).collect(),
            gone: view.gone.iter().map(entry).collect(),
            agents_without_droplet: view
                .agents_without_droplet
                .iter()
                .map(|a| slipway_proto::v1::AgentWithoutDroplet {
                    node_id: a.node_id.clone(),
                    node_name: a.name.clone(),
                    reported_droplet_id: a.reported_droplet_id.unwrap_or(0),
                })
                .collect(),
        }
    }
}

/// The view as the table `slipway-controller droplets list` prints.
pub fn render(view: &DropletsView) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{:<20} {:>10} {:<6} {:<14} {:<15} {:<30} NODE\n",
        "DROPLET", "ID", "REGION", "SIZE", "PUBLIC IPV4", "TAGS"
    ));
    for d in &view.droplets {
        let node = match (&d.node_id, &d.node_name) {
            (Some(id), Some(name)) => format!("{name} ({id})"),
            _ => "expected, not enrolled".to_owned(),
        };
        out.push_str(&format!(
            "{:<20} {:>10} {:<6} {:<14} {:<15} {:<30} {node}\n",
            d.name,
            d.id,
            d.region,
            d.size,
            d.public_ipv4.as_deref().unwrap_or("-"),
            d.tags.join(","),
        ));
    }
    if !view.gone.is_empty() {
        out.push_str("\ngone (destroyed or untagged; their nodes retired):\n");
        for d in &view.gone {
            out.push_str(&format!(
                "{:<20} {:>10} gone since {}\n",
                d.name,
                d.id,
                crate::rfc3339(d.gone_at.unwrap_or_default())
            ));
        }
    }
    if !view.agents_without_droplet.is_empty() {
        out.push_str("\nagents without a droplet:\n");
        for a in &view.agents_without_droplet {
            let why = match a.reported_droplet_id {
                Some(id) => format!("reported droplet {id}, not under the fleet tags"),
                None => "reported no droplet id".to_owned(),
            };
            out.push_str(&format!("{:<20} {} {why}\n", a.name, a.node_id));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn droplet(id: u64, gone: bool) -> DropletRow {
        DropletRow {
            id,
            name: format!("web-{id}"),
            region: "fra1".into(),
            size: "s-1vcpu-1gb".into(),
            public_ipv4: None,
            private_ipv4: None,
            tags: vec!["env:production".into()],
            status: "active".into(),
            first_seen_at: 1,
            synced_at: 1,
            gone_at: gone.then_some(2),
            node_id: None,
            node_name: None,
        }
    }

    #[test]
    fn a_sync_that_would_retire_most_of_the_fleet_is_refused_unless_forced() {
        let known: Vec<DropletRow> = (1..=4).map(|id| droplet(id, false)).collect();
        // Nothing listed (a fleet tag renamed?): refused, naming them.
        let err = check_mass_retire(&known, &[], false).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("would retire 4 of the 4 droplets") && text.contains("web-1, web-2"),
            "{text}"
        );
        assert!(check_mass_retire(&known, &[], true).is_ok());
        // Three of four gone: refused; two of four (half): goes through.
        assert!(check_mass_retire(&known, &known[..1], false).is_err());
        assert!(check_mass_retire(&known, &known[..2], false).is_ok());
        // Droplets already gone do not count.
        let mut with_gone = known.clone();
        with_gone.push(droplet(9, true));
        assert!(check_mass_retire(&with_gone, &known[..2], false).is_ok());
        // A one-droplet fleet losing its droplet goes through.
        assert!(check_mass_retire(&known[..1], &[], false).is_ok());
    }
}
