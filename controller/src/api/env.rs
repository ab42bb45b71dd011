//! The fleet environment through the Control API (and the HTTP API, which
//! calls the same `*_for` methods): a change stores a new sealed version
//! and delivers it like a deploy; list and history show names; get shows
//! one value, to `secrets:<app>` only, audited.

use slipway_proto::v1::{
    ChangeEnvRequest, EnvEntry, EnvHistoryResponse, EnvVersion, GetEnvResponse, ListEnvResponse,
};

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::{selector_json, ApiError, ControlService, Started};
use crate::audit::{self, AuditEvent};
use crate::auth::apitoken::Caller;
use crate::rollout::{self, Action, EnvPayload, Plan, Target};
use crate::secrets::{self, LayerVersion};
use crate::store::EnvVersionRow;

/// One problem line per app and needed version where some live node
/// that runs the app does not hold the version of its effective
/// environment (`slipway status`): names and versions only. `needs` maps
/// (app, node id) to the version the node should hold (0: none).
pub(crate) fn env_lag(
    views: &[crate::fleet::NodeView],
    apps: &[String],
    needs: &HashMap<(String, String), u64>,
) -> Vec<String> {
    let mut lines = Vec::new();
    for app in apps {
        let mut by_version: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        for v in views.iter().filter(|v| v.revoked_at.is_none()) {
            let Some(a) = v.apps.iter().find(|a| &a.app == app) else {
                continue;
            };
            let need = needs
                .get(&(app.clone(), v.id.clone()))
                .copied()
                .unwrap_or(0);
            if need != 0 && a.env_version != need {
                by_version
                    .entry(need)
                    .or_default()
                    .push(format!("{} (has v{})", v.name, a.env_version));
            }
        }
        for (version, lagging) in by_version {
            lines.push(format!(
                "app {app}: env v{version} is not on {} node(s): {}",
                lagging.len(),
                lagging.join(", ")
            ));
        }
    }
    lines
}

/// What a change is, for the record.
fn change_kind(req: &ChangeEnvRequest) -> &'static str {
    if req.rollback_to != 0 {
        "rollback"
    } else if req.replace {
        "import"
    } else if req.set.is_empty() {
        "unset"
    } else {
        "set"
    }
}

/// `what` of layer `layer`, for messages: "the base" or "layer env:staging".
fn layer_name(layer: &str) -> String {
    if layer.is_empty() {
        "the base layer".to_owned()
    } else {
        format!("layer {layer}")
    }
}

impl ControlService {
    /// Every version of `app`'s environment, oldest first, opened.
    pub(crate) async fn env_layers(
        &self,
        app: &str,
    ) -> Result<(Vec<EnvVersionRow>, Vec<LayerVersion>), ApiError> {
        let rows = self.store.env_history(app).await?;
        let opened = rows
            .iter()
            .map(|row| {
                Ok(LayerVersion {
                    version: row.version,
                    layer: row.layer.clone(),
                    vars: self.secrets.open_vars(row)?,
                })
            })
            .collect::<Result<Vec<_>, ApiError>>()?;
        Ok((rows, opened))
    }

    /// `status`'s env lines: for every app with an environment, the live
    /// nodes running it whose env version is not the one their effective
    /// environment (base and their tags' layers) stands at.
    pub(crate) async fn env_lag(
        &self,
        views: &[crate::fleet::NodeView],
        only: Option<&str>,
    ) -> Result<Vec<String>, ApiError> {
        let apps: Vec<String> = self
            .store
            .env_apps()
            .await?
            .into_iter()
            .filter(|a| only.is_none_or(|o| o == a))
            .collect();
        if apps.is_empty() {
            return Ok(Vec::new());
        }
        let nodes = self.node_tags().await?;
        let mut needs = HashMap::new();
        for app in &apps {
            let (_, history) = self.env_layers(app).await?;
            let mut effective = secrets::EffectiveCache::new(&history);
            for (target, tags) in &nodes {
                let (version, _) = effective.of(tags);
                needs.insert((app.clone(), target.node_id.clone()), version);
            }
        }
        Ok(env_lag(views, &apps, &needs))
    }

    /// Stores the change of one layer as a new version (none when it
    /// changes nothing) and delivers to each selected node whose effective
    /// environment it changes (a change that changes nothing re-sends every
    /// selected node its current one). A change of a tag layer that would
    /// make two tag layers set the same name on a live node is refused
    /// before anything is stored. `caller`'s deploy:<app> scope was checked
    /// and `req` validated.
    pub async fn change_env_for(
        &self,
        caller: &Caller,
        req: ChangeEnvRequest,
    ) -> Result<Started, ApiError> {
        let rollout = rollout::Rollout::from_proto(req.rollout.as_ref())?;
        let app = req.app.clone();
        let layer = if req.tag.is_empty() {
            String::new()
        } else {
            secrets::canonical_tag(&req.tag)
        };
        let (_, history) = self.env_layers(&app).await?;
        let latest_version = history.last().map_or(0, |v| v.version);
        let state = secrets::layer_state(&history);
        let current = state.get(&layer).cloned().unwrap_or_default();
        let next = if req.rollback_to != 0 {
            let row = self
                .store
                .env_version(&app, req.rollback_to)
                .await?
                .ok_or_else(|| {
                    ApiError::NotFound(format!(
                        "app {app} has no env version {} (slipway env history {app} lists them)",
                        req.rollback_to
                    ))
                })?;
            if req.rollback_as_of {
                // The layer as it stood at that version.
                history
                    .iter()
                    .rfind(|v| v.layer == layer && v.version <= req.rollback_to)
                    .map(|v| v.vars.clone())
                    .unwrap_or_default()
            } else if row.layer != layer {
                return Err(ApiError::Invalid(format!(
                    "env version {} of app {app} is a version of {}, not of {} \
                     (roll back with {})",
                    row.version,
                    layer_name(&row.layer),
                    layer_name(&layer),
                    if row.layer.is_empty() {
                        "no --tag".to_owned()
                    } else {
                        format!("--tag {}", row.layer)
                    }
                )));
            } else {
                self.secrets.open_vars(&row)?
            }
        } else {
            let set: Vec<(String, String)> = req
                .set
                .iter()
                .map(|v| (v.key.clone(), v.value.clone()))
                .collect();
            current.apply(&set, &req.unset, req.replace).0
        };
        let summary = current.diff(&next);
        let changed = !summary.set.is_empty()
            || !summary.unset.is_empty()
            || !history.iter().any(|v| v.layer == layer);
        let nodes = self.node_tags().await?;
        let mut after = history.clone();
        let version = if changed {
            let version = latest_version + 1;
            after.push(LayerVersion {
                version,
                layer: layer.clone(),
                vars: next.clone(),
            });
            if !layer.is_empty() {
                let named: Vec<(String, BTreeSet<String>)> = nodes
                    .iter()
                    .map(|(t, tags)| (t.name.clone(), tags.clone()))
                    .collect();
                let found = secrets::conflicts(&secrets::layer_state(&after), &named, &layer);
                if let Some(first) = found.first() {
                    return Err(ApiError::LayerConflict(format!(
                        "{first}{}: a node's layers may not set the same name (unset it in one \
                         of them first); nothing was stored",
                        if found.len() > 1 {
                            format!(" (and {} more such clash(es))", found.len() - 1)
                        } else {
                            String::new()
                        }
                    )));
                }
            }
            let now = crate::now_unix();
            let change = change_kind(&req);
            let row = EnvVersionRow {
                app: app.clone(),
                layer: layer.clone(),
                version,
                actor: caller.token_id.clone(),
                created_at: now,
                change: change.to_owned(),
                set_keys: summary.set.clone(),
                unset_keys: summary.unset.clone(),
                rollback_to: (req.rollback_to != 0).then_some(req.rollback_to),
                var_count: next.0.len() as u64,
                sealed: self.secrets.seal_vars(&app, version, &layer, &next)?,
            };
            let event = AuditEvent::success(
                audit::ENV_CHANGED,
                &caller.token_id,
                "app",
                &app,
                serde_json::json!({
                    "app": app,
                    "layer": layer,
                    "version": version,
                    "change": change,
                    "set": summary.set,
                    "unset": summary.unset,
                    "rollback_to": row.rollback_to,
                    "count": row.var_count,
                }),
            );
            self.store.insert_env_version(&row, &event).await?;
            tracing::info!(%app, %layer, version, change, set = ?summary.set, unset = ?summary.unset, "env version stored");
            version
        } else {
            latest_version
        };
        let not_delivered = |reason: ApiError| ApiError::NotDelivered {
            app: app.clone(),
            version,
            reason: Box::new(reason),
        };
        // The nodes that run the app (or the ones named), tag layers or not.
        let named = req.selector.as_ref().is_some_and(|s| s.target.is_some());
        let selected: Option<BTreeSet<String>> = Some(
            self.select(req.selector.as_ref(), Some(&app))
                .await
                .map_err(not_delivered)?
                .into_iter()
                .map(|t| t.node_id)
                .collect(),
        );
        let mut targets: Vec<Target> = Vec::new();
        let mut payloads = BTreeMap::new();
        let mut before = secrets::EffectiveCache::new(&history);
        let mut now = secrets::EffectiveCache::new(&after);
        for (target, tags) in &nodes {
            if selected
                .as_ref()
                .is_some_and(|s| !s.contains(&target.node_id))
            {
                continue;
            }
            let (now_version, now_vars) = now.of(tags);
            // The effective version moves exactly when the node's
            // environment changes (see `secrets::effective`).
            let deliver = !changed || before.of(tags).0 != now_version;
            if deliver && now_version != 0 {
                payloads.insert(
                    target.node_id.clone(),
                    EnvPayload::new(now_version, now_vars.render()),
                );
                targets.push(target.clone());
            }
        }
        if targets.is_empty() {
            let why = if layer.is_empty() {
                format!(
                    "no enrolled node matches {}",
                    selector_json(req.selector.as_ref())
                )
            } else {
                format!(
                    "no live node{} carries tag {layer} with an environment this changes",
                    if named { " selected" } else { "" }
                )
            };
            return Err(not_delivered(ApiError::Invalid(why)));
        }
        let plan = Plan {
            app: app.clone(),
            action: Action::Env { version, payloads },
            targets,
            actor: caller.token_id.clone(),
            selector: if layer.is_empty() {
                selector_json(req.selector.as_ref())
            } else {
                serde_json::json!({ "layer": layer, "selector": selector_json(req.selector.as_ref()) })
            },
            rollout,
            snapshots: Vec::new(),
        };
        self.start_plan(plan).await.map_err(not_delivered)
    }

    /// The names of `app`'s environment, each with the layer it is set in
    /// and the version that last set it there. With `tag`, what a node
    /// carrying that tag sees: each name once, from the layer it comes from.
    pub async fn list_env_for(&self, app: &str, tag: &str) -> Result<ListEnvResponse, ApiError> {
        let history = self.store.env_history(app).await?;
        let Some(latest) = history.last() else {
            return Ok(ListEnvResponse::default());
        };
        let tag = if tag.is_empty() {
            String::new()
        } else {
            secrets::canonical_tag(tag)
        };
        // layer -> name -> the row that last set it there.
        let mut last: BTreeMap<&str, BTreeMap<&str, &EnvVersionRow>> = BTreeMap::new();
        for row in &history {
            let names = last.entry(row.layer.as_str()).or_default();
            for key in &row.set_keys {
                names.insert(key, row);
            }
            for key in &row.unset_keys {
                names.remove(key.as_str());
            }
        }
        let overridden: BTreeSet<&str> = last
            .iter()
            .filter(|(layer, _)| !layer.is_empty() && (tag.is_empty() || **layer == tag))
            .flat_map(|(_, names)| names.keys().copied())
            .collect();
        let mut entries = Vec::new();
        for (layer, names) in &last {
            if !tag.is_empty() && !layer.is_empty() && **layer != tag {
                continue;
            }
            for (key, row) in names {
                let shadowed = layer.is_empty() && overridden.contains(key);
                if shadowed && !tag.is_empty() {
                    continue;
                }
                entries.push(EnvEntry {
                    key: (*key).to_owned(),
                    version: row.version,
                    actor: row.actor.clone(),
                    changed_at: row.created_at,
                    layer: (*layer).to_owned(),
                    overridden: shadowed,
                });
            }
        }
        entries.sort_by(|a, b| a.key.cmp(&b.key).then(a.layer.cmp(&b.layer)));
        Ok(ListEnvResponse {
            version: latest.version,
            entries,
        })
    }

    /// Every version of `app`'s environment (of one layer with `tag`),
    /// newest first.
    pub async fn env_history_for(
        &self,
        app: &str,
        tag: &str,
    ) -> Result<EnvHistoryResponse, ApiError> {
        let layer = if tag.is_empty() {
            None
        } else {
            Some(secrets::canonical_tag(tag))
        };
        let history = self.store.env_history(app).await?;
        Ok(EnvHistoryResponse {
            versions: history
                .into_iter()
                .rev()
                .filter(|row| layer.as_ref().is_none_or(|l| *l == row.layer))
                .map(|row| EnvVersion {
                    version: row.version,
                    actor: row.actor,
                    created_at: row.created_at,
                    change: row.change,
                    set: row.set_keys,
                    unset: row.unset_keys,
                    rollback_to: row.rollback_to.unwrap_or(0),
                    count: row.var_count,
                    layer: row.layer,
                })
                .collect(),
        })
    }

    /// One value of `app`'s environment — the base's, or with `tag` what a
    /// node carrying that tag sees — for `caller` (whose secrets:<app>
    /// scope was checked); audited as ENV_VALUE_READ with the name only.
    pub async fn get_env_for(
        &self,
        caller: &Caller,
        app: &str,
        key: &str,
        tag: &str,
    ) -> Result<GetEnvResponse, ApiError> {
        let (_, history) = self.env_layers(app).await?;
        let tag = if tag.is_empty() {
            String::new()
        } else {
            secrets::canonical_tag(tag)
        };
        let version = history.last().map_or(0, |v| v.version);
        let state = secrets::layer_state(&history);
        let found = [tag.as_str(), ""]
            .into_iter()
            .filter(|l| l.is_empty() || !tag.is_empty())
            .find_map(|l| {
                let value = state.get(l)?.0.get(key)?;
                let from = history.iter().rev().find(|v| v.layer == l)?.version;
                Some((l.to_owned(), value.clone(), from))
            });
        let event = AuditEvent::success(
            audit::ENV_VALUE_READ,
            &caller.token_id,
            "app",
            app,
            serde_json::json!({
                "app": app,
                "key": key,
                "tag": tag,
                "version": version,
                "found": found.is_some(),
            }),
        );
        self.store.audit(&event, crate::now_unix()).await?;
        let (layer, value, from) = found.ok_or_else(|| {
            ApiError::NotFound(format!(
                "app {app} has no env variable {key}{} (version {version}; slipway env list {app} \
                 shows the names)",
                if tag.is_empty() {
                    String::new()
                } else {
                    format!(" for tag {tag}")
                }
            ))
        })?;
        Ok(GetEnvResponse {
            value,
            version: from,
            layer,
        })
    }
}

/// How often a catch-up tries again while another deployment of the app
/// runs, and how many times.
const CATCH_UP_RETRY: std::time::Duration = std::time::Duration::from_secs(5);
const CATCH_UP_TRIES: u32 = 60;

impl ControlService {
    /// A node connected reporting `apps` with the env version each holds:
    /// every app whose current env version on the controller is newer is
    /// sent it (a deployment of kind "env" to that node alone, actor
    /// "controller"), so a node that was offline catches up. Runs in the
    /// background; retries while another deployment of the app runs.
    pub fn env_catch_up(&self, node_id: String, apps: Vec<(String, u64)>) {
        let control = self.clone();
        tokio::spawn(async move {
            for (app, have) in apps {
                let history = match control.env_layers(&app).await {
                    Ok((_, history)) => history,
                    Err(err) => {
                        tracing::warn!(%err, %app, "env catch-up: cannot read the env");
                        continue;
                    }
                };
                if history.is_empty() {
                    continue;
                }
                let tags = match control.node_tags().await {
                    Ok(nodes) => nodes
                        .into_iter()
                        .find(|(t, _)| t.node_id == node_id)
                        .map(|(_, tags)| tags),
                    Err(err) => {
                        tracing::warn!(%err, %app, "env catch-up: cannot read the node's tags");
                        continue;
                    }
                };
                let Some(tags) = tags else { continue };
                let (version, vars) = secrets::effective(&history, &tags);
                if version == 0 || have == version {
                    continue;
                }
                tracing::info!(%node_id, %app, have, current = version, "env catch-up: the node lags");
                control
                    .catch_up_one(&node_id, &app, EnvPayload::new(version, vars.render()))
                    .await;
            }
        });
    }

    async fn catch_up_one(&self, node_id: &str, app: &str, payload: EnvPayload) {
        let selector = slipway_proto::v1::Selector {
            target: Some(slipway_proto::v1::selector::Target::Node(
                node_id.to_owned(),
            )),
        };
        let version = payload.version;
        for _ in 0..CATCH_UP_TRIES {
            let targets = match self.select(Some(&selector), Some(app)).await {
                Ok(t) => t,
                Err(err) => {
                    tracing::warn!(%err, %app, "env catch-up: node not selectable");
                    return;
                }
            };
            let plan = Plan {
                app: app.to_owned(),
                action: Action::Env {
                    version,
                    payloads: targets
                        .iter()
                        .map(|t| (t.node_id.clone(), payload.clone()))
                        .collect(),
                },
                targets,
                actor: "controller".to_owned(),
                selector: serde_json::json!({ "node": node_id, "catch_up": true }),
                rollout: rollout::Rollout::from_proto(None).unwrap_or_default(),
                snapshots: Vec::new(),
            };
            match self.start_plan(plan).await {
                Ok(started) => {
                    tracing::info!(%app, %node_id, deployment = %started.deployment_id, version, "env catch-up started");
                    return;
                }
                Err(ApiError::Store(crate::store::StoreError::AppBusy { .. })) => {
                    tokio::time::sleep(CATCH_UP_RETRY).await;
                }
                Err(err) => {
                    tracing::warn!(%err, %app, %node_id, "env catch-up not started");
                    return;
                }
            }
        }
        tracing::warn!(%app, %node_id, "env catch-up gave up: the app stayed busy");
    }
}

impl ControlService {
    /// `rollback --with-env` for the HTTP API: the env version release
    /// `to_release_id` went live with (as recorded at its deploy), the
    /// rollback started, and — once it succeeded on every node — the base
    /// layer brought back to its content as of that version (a new
    /// version, delivered as an env deployment by the same caller). Tag
    /// layers stay as they are. Returns the rollback and the env version.
    pub async fn rollback_with_env_for(
        &self,
        caller: &Caller,
        req: slipway_proto::v1::RollbackRequest,
    ) -> Result<(Started, u64), ApiError> {
        let app = req.app.clone();
        let to = req.to_release_id.clone();
        if to.is_empty() {
            return Err(ApiError::Invalid(
                "with_env: needs to_release_id (the release whose env comes back)".to_owned(),
            ));
        }
        let env_version = self
            .store
            .release_env_versions(&app)
            .await?
            .get(&to)
            .copied()
            .filter(|v| *v != 0)
            .ok_or_else(|| {
                ApiError::Invalid(format!(
                    "with_env: release {to} of app {app} has no recorded env version (deployed \
                     before the controller kept its env, or not through it); roll back without \
                     with_env"
                ))
            })?;
        let selector = req.selector.clone();
        let rollout = req.rollout;
        let mut started = self.rollback_for(caller, req).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let events = std::mem::replace(&mut started.events, rx);
        let control = self.clone();
        let caller = caller.clone();
        tokio::spawn(async move {
            let mut events = events;
            let mut succeeded = false;
            while let Some(event) = events.recv().await {
                if let Some(slipway_proto::v1::deploy_event::Kind::Finished(f)) = &event.kind {
                    succeeded = f.succeeded;
                }
                // Whoever follows the rollback may have gone: go on.
                let _ = tx.send(event).await;
            }
            drop(tx);
            if !succeeded {
                tracing::warn!(%app, release = %to, env_version, "rollback with env: the rollback did not succeed everywhere; env not restored");
                return;
            }
            let change = ChangeEnvRequest {
                app: app.clone(),
                rollback_to: env_version,
                rollback_as_of: true,
                selector,
                rollout,
                ..ChangeEnvRequest::default()
            };
            match control.change_env_for(&caller, change).await {
                Ok(run) => {
                    tracing::info!(%app, release = %to, env_version, deployment = %run.deployment_id, "rollback with env: env restored");
                }
                Err(err) => {
                    tracing::warn!(%err, %app, release = %to, env_version, "rollback with env: env not restored");
                }
            }
        });
        Ok((started, env_version))
    }
}
