//! A webhook delivery that matched a trigger becomes a deployment: the
//! commit is known (a push, a workflow run) or resolved from the release's
//! tag; the artifact is a release asset the controller downloads with the
//! app's credentials into its artifact store (its digest computed, and
//! checked against a checksums asset when one is named), or a URL agents
//! download themselves with the digest from a `sha256sum` checksums file.
//! The deployment's actor is `github-delivery:<X-GitHub-Delivery>`, and a
//! `GITHUB_WEBHOOK_DEPLOY` audit event names the delivery, the event, the
//! artifact and its digest (or, as an error, why nothing was deployed).

use std::sync::Arc;

use slipway_proto::v1::{selector, DeployRequest, Selector};

use super::client::{Client, GhError, Secret, Sink};
use super::config::{GithubConfig, Link};
use super::webhook::{checksum_for, expand, Start};
use crate::api::ControlService;
use crate::audit::{self, AuditEvent};
use crate::auth::apitoken::{Caller, Scope};

/// Largest checksums file read.
const MAX_CHECKSUMS: usize = 1 << 20;

/// What the webhook endpoint needs; cheap to clone.
#[derive(Debug, Clone)]
pub struct Hooks {
    config: Arc<GithubConfig>,
    client: Client,
    control: ControlService,
}

/// Bytes into memory, for a checksums asset.
struct Memory {
    bytes: Vec<u8>,
}

impl Sink for Memory {
    async fn write(&mut self, data: &[u8]) -> Result<(), String> {
        if self.bytes.len() + data.len() > MAX_CHECKSUMS {
            return Err(format!("checksums file over {MAX_CHECKSUMS} bytes"));
        }
        self.bytes.extend_from_slice(data);
        Ok(())
    }
}

impl Sink for crate::artifacts::Upload {
    async fn write(&mut self, data: &[u8]) -> Result<(), String> {
        crate::artifacts::Upload::write(self, data)
            .await
            .map_err(|e| e.to_string())
    }
}

/// What a trigger deploys.
#[derive(Debug)]
struct Resolved {
    sha: String,
    sha256: String,
    /// Empty: the controller holds it (a release asset).
    artifact_url: String,
    /// The asset name or URL, for the audit.
    artifact: String,
    size: Option<u64>,
}

impl Hooks {
    pub fn new(config: Arc<GithubConfig>, client: Client, control: ControlService) -> Self {
        Self {
            config,
            client,
            control,
        }
    }

    /// The webhook secret (None: webhooks are off).
    pub fn secret(&self) -> Option<&Secret> {
        self.config.credentials.webhook_secret.as_ref()
    }

    /// The linked apps.
    pub fn links(&self) -> impl Iterator<Item = &Link> {
        self.config.links.values()
    }

    /// The store (deliveries, audit).
    pub fn store(&self) -> &crate::store::Store {
        self.control.store()
    }

    /// Starts the deployment `start` asks for, audited either way; the
    /// deployment id.
    pub async fn deploy(
        &self,
        delivery: &str,
        event: &str,
        start: &Start,
    ) -> Result<String, String> {
        let actor = format!("github-delivery:{delivery}");
        let mut details = serde_json::json!({
            "delivery": delivery,
            "event": event,
            "trigger": start.trigger,
            "app": start.app,
            "tag": start.tag,
            "branch": start.branch,
        });
        let outcome = self.try_deploy(&actor, start).await;
        let event = match &outcome {
            Ok((deployment_id, r)) => {
                details["deployment_id"] = deployment_id.as_str().into();
                details["sha"] = r.sha.as_str().into();
                details["artifact"] = r.artifact.as_str().into();
                details["artifact_sha256"] = r.sha256.as_str().into();
                if let Some(size) = r.size {
                    details["artifact_size"] = size.into();
                }
                tracing::info!(%delivery, app = %start.app, %deployment_id, "github: webhook started a deployment");
                AuditEvent::success(
                    audit::GITHUB_WEBHOOK_DEPLOY,
                    &actor,
                    "deployment",
                    deployment_id,
                    details,
                )
            }
            Err(why) => {
                tracing::warn!(%delivery, app = %start.app, %why, "github: webhook deploy not started");
                AuditEvent::error(
                    audit::GITHUB_WEBHOOK_DEPLOY,
                    &actor,
                    "app",
                    &start.app,
                    details,
                    why,
                )
            }
        };
        if let Err(err) = self.store().audit(&event, crate::now_unix()).await {
            tracing::error!(%err, "could not record audit event");
        }
        outcome.map(|(id, _)| id)
    }

    async fn try_deploy(&self, actor: &str, start: &Start) -> Result<(String, Resolved), String> {
        let link = self
            .config
            .link(&start.app)
            .ok_or_else(|| format!("app {} is not linked", start.app))?;
        let resolved = self.resolve(link, start).await?;
        let caller = Caller {
            token_id: actor.to_owned(),
            scopes: vec![Scope::Deploy(start.app.clone())],
        };
        let request = DeployRequest {
            app: start.app.clone(),
            sha256: resolved.sha256.clone(),
            release_id: String::new(),
            selector: link.tag.as_ref().map(|tag| Selector {
                target: Some(selector::Target::Tag(tag.clone())),
            }),
            git_sha: resolved.sha.clone(),
            artifact_url: resolved.artifact_url.clone(),
            rollout: None,
        };
        let started = self
            .control
            .deploy_for(&caller, request)
            .await
            .map_err(|e| e.to_string())?;
        // The deployment runs on without a listener.
        Ok((started.deployment_id, resolved))
    }

    async fn resolve(&self, link: &Link, start: &Start) -> Result<Resolved, String> {
        let gh = |e: GhError| e.to_string();
        let sha = match (&start.sha, &start.tag) {
            (Some(sha), _) => sha.clone(),
            (None, Some(tag)) => self.client.commit_sha(&link.repo, tag).await.map_err(gh)?,
            (None, None) => return Err("the event names neither a commit nor a tag".into()),
        };
        let source = &link.artifact;
        if let (Some(template), "release") = (&source.release_asset, start.trigger) {
            let name = expand(template, start, &sha)?;
            let asset = start
                .assets
                .iter()
                .find(|a| a.name == name)
                .ok_or_else(|| {
                    format!(
                        "release {} has no asset named {name:?}",
                        start.tag.as_deref().unwrap_or("")
                    )
                })?;
            if !asset.state.is_empty() && asset.state != "uploaded" {
                return Err(format!("asset {name:?} is {:?}, not uploaded", asset.state));
            }
            let expected = match &source.checksums_asset {
                Some(template) => {
                    let sums_name = expand(template, start, &sha)?;
                    let sums = start
                        .assets
                        .iter()
                        .find(|a| a.name == sums_name)
                        .ok_or_else(|| format!("release has no checksums asset {sums_name:?}"))?;
                    let mut memory = Memory { bytes: Vec::new() };
                    self.client
                        .download_release_asset(
                            &link.repo,
                            sums.id,
                            MAX_CHECKSUMS as u64,
                            &mut memory,
                        )
                        .await
                        .map_err(gh)?;
                    Some(checksum_for(
                        &String::from_utf8_lossy(&memory.bytes),
                        &name,
                    )?)
                }
                None => None,
            };
            let artifacts = self.control.artifacts();
            let mut upload = match &expected {
                Some(digest) => artifacts.upload(digest, asset.size).await,
                None => artifacts.receive(asset.size).await,
            }
            .map_err(|e| e.to_string())?;
            self.client
                .download_release_asset(&link.repo, asset.id, asset.size, &mut upload)
                .await
                .map_err(gh)?;
            let (sha256, size) = upload
                .finish_any()
                .await
                .map_err(|e| format!("release asset {name:?} (id {}): {e}", asset.id))?;
            return Ok(Resolved {
                sha,
                sha256,
                artifact_url: String::new(),
                artifact: format!("release asset {name} (id {})", asset.id),
                size: Some(size),
            });
        }
        let (Some(url), Some(sums_url)) = (&source.url, &source.checksums_url) else {
            return Err(format!(
                "app {} has no artifact source for a {} event",
                link.app, start.trigger
            ));
        };
        let url = expand(url, start, &sha)?;
        let sums_url = expand(sums_url, start, &sha)?;
        crate::api::check_artifact_url(&url).map_err(|e| e.to_string())?;
        let sums = self
            .client
            .fetch_public(&sums_url, MAX_CHECKSUMS)
            .await
            .map_err(gh)?;
        let file = url
            .split(['?', '#'])
            .next()
            .and_then(|u| u.rsplit('/').next())
            .unwrap_or("");
        let sha256 = checksum_for(&String::from_utf8_lossy(&sums), file)
            .map_err(|e| format!("{sums_url}: {e}"))?;
        Ok(Resolved {
            sha,
            sha256,
            artifact: url.clone(),
            artifact_url: url,
            size: None,
        })
    }
}
