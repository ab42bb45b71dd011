//! The fleet environment through the Control API (and the HTTP API, which
//! calls the same `*_for` methods): a change stores a new sealed version
//! and delivers it like a deploy; list and history show names; get shows
//! one value, to `secrets:<app>` only, audited.

use slipway_proto::v1::{
    ChangeEnvRequest, EnvEntry, EnvHistoryResponse, EnvVersion, GetEnvResponse, ListEnvResponse,
};

use super::{selector_json, ApiError, ControlService, Started};
use crate::audit::{self, AuditEvent};
use crate::auth::apitoken::Caller;
use crate::rollout::{self, Action, EnvText, Plan};
use crate::secrets::Vars;
use crate::store::EnvVersionRow;

/// One problem line per app whose current env version some live node
/// that runs the app does not hold yet (`slipway status`): names and
/// versions only.
pub(crate) fn env_lag(
    views: &[crate::fleet::NodeView],
    latest: &[(String, u64)],
    only: Option<&str>,
) -> Vec<String> {
    let mut lines = Vec::new();
    for (app, version) in latest {
        if only.is_some_and(|o| o != app) {
            continue;
        }
        let lagging: Vec<String> = views
            .iter()
            .filter(|v| v.revoked_at.is_none())
            .filter_map(|v| {
                let a = v.apps.iter().find(|a| &a.app == app)?;
                (a.env_version < *version).then(|| format!("{} (has v{})", v.name, a.env_version))
            })
            .collect();
        if !lagging.is_empty() {
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

impl ControlService {
    /// The current version of `app`'s environment and its variables
    /// (version 0 and none when it was never set).
    pub(crate) async fn current_env(
        &self,
        app: &str,
    ) -> Result<(Option<EnvVersionRow>, Vars), ApiError> {
        match self.store.env_latest(app).await? {
            Some(row) => {
                let vars = self.secrets.open_vars(&row)?;
                Ok((Some(row), vars))
            }
            None => Ok((None, Vars::default())),
        }
    }

    /// Stores the change as a new version (none when it changes nothing)
    /// and delivers the current version to the selected nodes. `caller`'s
    /// deploy:<app> scope was checked and `req` validated.
    pub async fn change_env_for(
        &self,
        caller: &Caller,
        req: ChangeEnvRequest,
    ) -> Result<Started, ApiError> {
        let rollout = rollout::Rollout::from_proto(req.rollout.as_ref())?;
        let app = req.app.clone();
        let (latest, current) = self.current_env(&app).await?;
        let latest_version = latest.as_ref().map_or(0, |r| r.version);
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
            self.secrets.open_vars(&row)?
        } else {
            let set: Vec<(String, String)> = req
                .set
                .iter()
                .map(|v| (v.key.clone(), v.value.clone()))
                .collect();
            current.apply(&set, &req.unset, req.replace).0
        };
        let summary = current.diff(&next);
        let version = if summary.set.is_empty() && summary.unset.is_empty() && latest.is_some() {
            // Nothing changes: no new version; the current one is sent
            // again (nodes that hold it are not touched).
            latest_version
        } else {
            let version = latest_version + 1;
            let now = crate::now_unix();
            let change = change_kind(&req);
            let row = EnvVersionRow {
                app: app.clone(),
                version,
                actor: caller.token_id.clone(),
                created_at: now,
                change: change.to_owned(),
                set_keys: summary.set.clone(),
                unset_keys: summary.unset.clone(),
                rollback_to: (req.rollback_to != 0).then_some(req.rollback_to),
                var_count: next.0.len() as u64,
                sealed: self.secrets.seal_vars(&app, version, &next)?,
            };
            let event = AuditEvent::success(
                audit::ENV_CHANGED,
                &caller.token_id,
                "app",
                &app,
                serde_json::json!({
                    "app": app,
                    "version": version,
                    "change": change,
                    "set": summary.set,
                    "unset": summary.unset,
                    "rollback_to": row.rollback_to,
                    "count": row.var_count,
                }),
            );
            self.store.insert_env_version(&row, &event).await?;
            tracing::info!(%app, version, change, set = ?summary.set, unset = ?summary.unset, "env version stored");
            version
        };
        let not_delivered = |reason: ApiError| ApiError::NotDelivered {
            app: app.clone(),
            version,
            reason: Box::new(reason),
        };
        let targets = self
            .select(req.selector.as_ref())
            .await
            .map_err(not_delivered)?;
        let text = next.render();
        let sha256 = crate::pki::crypto::sha256_hex(text.as_bytes());
        let plan = Plan {
            app: app.clone(),
            action: Action::Env {
                version,
                text: EnvText(text),
                sha256,
            },
            targets,
            actor: caller.token_id.clone(),
            selector: selector_json(req.selector.as_ref()),
            rollout,
            snapshots: Vec::new(),
        };
        self.start_plan(plan).await.map_err(not_delivered)
    }

    /// The names of `app`'s current environment, each with the version
    /// that last set it.
    pub async fn list_env_for(&self, app: &str) -> Result<ListEnvResponse, ApiError> {
        let history = self.store.env_history(app).await?;
        let Some(latest) = history.last() else {
            return Ok(ListEnvResponse::default());
        };
        let mut last: std::collections::BTreeMap<&str, &EnvVersionRow> =
            std::collections::BTreeMap::new();
        for row in &history {
            for key in &row.set_keys {
                last.insert(key, row);
            }
            for key in &row.unset_keys {
                last.remove(key.as_str());
            }
        }
        Ok(ListEnvResponse {
            version: latest.version,
            entries: last
                .into_iter()
                .map(|(key, row)| EnvEntry {
                    key: key.to_owned(),
                    version: row.version,
                    actor: row.actor.clone(),
                    changed_at: row.created_at,
                })
                .collect(),
        })
    }

    /// Every version of `app`'s environment, newest first.
    pub async fn env_history_for(&self, app: &str) -> Result<EnvHistoryResponse, ApiError> {
        let history = self.store.env_history(app).await?;
        Ok(EnvHistoryResponse {
            versions: history
                .into_iter()
                .rev()
                .map(|row| EnvVersion {
                    version: row.version,
                    actor: row.actor,
                    created_at: row.created_at,
                    change: row.change,
                    set: row.set_keys,
                    unset: row.unset_keys,
                    rollback_to: row.rollback_to.unwrap_or(0),
                    count: row.var_count,
                })
                .collect(),
        })
    }

    /// One value of `app`'s current environment, for `caller` (whose
    /// secrets:<app> scope was checked); audited as ENV_VALUE_READ with the
    /// name only.
    pub async fn get_env_for(
        &self,
        caller: &Caller,
        app: &str,
        key: &str,
    ) -> Result<GetEnvResponse, ApiError> {
        let (latest, vars) = self.current_env(app).await?;
        let version = latest.map_or(0, |r| r.version);
        let found = vars.0.get(key).cloned();
        let event = AuditEvent::success(
            audit::ENV_VALUE_READ,
            &caller.token_id,
            "app",
            app,
            serde_json::json!({ "app": app, "key": key, "version": version, "found": found.is_some() }),
        );
        self.store.audit(&event, crate::now_unix()).await?;
        let value = found.ok_or_else(|| {
            ApiError::NotFound(format!(
                "app {app} has no env variable {key} (version {version}; slipway env list {app} shows the names)"
            ))
        })?;
        Ok(GetEnvResponse { value, version })
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
                let latest = match control.store.env_latest(&app).await {
                    Ok(Some(latest)) => latest,
                    Ok(None) => continue,
                    Err(err) => {
                        tracing::warn!(%err, %app, "env catch-up: cannot read the env");
                        continue;
                    }
                };
                if have >= latest.version {
                    continue;
                }
                tracing::info!(%node_id, %app, have, current = latest.version, "env catch-up: the node lags");
                control.catch_up_one(&node_id, &app, latest).await;
            }
        });
    }

    async fn catch_up_one(&self, node_id: &str, app: &str, latest: EnvVersionRow) {
        let vars = match self.secrets.open_vars(&latest) {
            Ok(vars) => vars,
            Err(err) => {
                tracing::error!(%err, %app, "env catch-up: cannot open the env");
                return;
            }
        };
        let text = vars.render();
        let sha256 = crate::pki::crypto::sha256_hex(text.as_bytes());
        let selector = slipway_proto::v1::Selector {
            target: Some(slipway_proto::v1::selector::Target::Node(
                node_id.to_owned(),
            )),
        };
        for _ in 0..CATCH_UP_TRIES {
            let targets = match self.select(Some(&selector)).await {
                Ok(t) => t,
                Err(err) => {
                    tracing::warn!(%err, %app, "env catch-up: node not selectable");
                    return;
                }
            };
            let plan = Plan {
                app: app.to_owned(),
                action: Action::Env {
                    version: latest.version,
                    text: EnvText(text.clone()),
                    sha256: sha256.clone(),
                },
                targets,
                actor: "controller".to_owned(),
                selector: serde_json::json!({ "node": node_id, "catch_up": true }),
                rollout: rollout::Rollout::from_proto(None).unwrap_or_default(),
                snapshots: Vec::new(),
            };
            match self.start_plan(plan).await {
                Ok(started) => {
                    tracing::info!(%app, %node_id, deployment = %started.deployment_id, version = latest.version, "env catch-up started");
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
