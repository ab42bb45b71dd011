//! `[github]` in the controller's config file: how the controller
//! authenticates (a GitHub App, or a fine-grained token), the webhook
//! secret, and per app the repository it is linked to, its environment and
//! what starts a deployment.
//!
//! ```toml
//! [github]
//! app_id = 123456                    # a GitHub App ...
//! installation_id = 7890123
//! private_key_file = "/etc/slipway/github-app.pem"  # else $SLIPWAY_GITHUB_APP_KEY (the PEM)
//! # token_file = "/etc/slipway/github-token"        # ... or a fine-grained token, else $SLIPWAY_GITHUB_TOKEN
//! webhook_secret_file = "/etc/slipway/github-webhook-secret"  # else $SLIPWAY_GITHUB_WEBHOOK_SECRET
//! public_url = "https://ctl.example.com:8443"  # log_url base; default: from http_listen
//! give_up_after = "1h"               # status updates GitHub did not take by then are dropped (audited)
//!
//! [github.apps.web]
//! repo = "acme/web"
//! environment = "production"         # default
//! commit_status = true               # also a commit status on the sha (default false)
//! tag = "env:production"             # the nodes a webhook deploy goes to (default: all)
//!
//! [github.apps.web.trigger]
//! push = ["main"]                    # a push to these branches
//! release = true                     # a published release
//! workflow_run = ["build"]           # a completed, successful run of these workflows
//! workflow_branches = ["main"]       # ... on these branches (default: any)
//!
//! [github.apps.web.artifact]
//! release_asset = "web-{tag}.tar.gz" # downloaded by the controller (release events)
//! checksums_asset = "SHA256SUMS"     # optional: the asset's digest must match its line
//! url = "https://dl.example.com/web/{sha}.tar.gz"       # or agents download this ...
//! checksums_url = "https://dl.example.com/web/{sha}/SHA256SUMS"  # ... checked against this
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::api::Repo;
use super::auth::{AppKey, Auth, DEFAULT_RENEW_BEFORE};
use super::client::{Client, GhError, RetryPolicy, Secret, Settings, DEFAULT_API_URL};

/// Environment variables the secrets are read from when no file is named.
pub const TOKEN_ENV: &str = "SLIPWAY_GITHUB_TOKEN";
pub const APP_KEY_ENV: &str = "SLIPWAY_GITHUB_APP_KEY";
pub const WEBHOOK_SECRET_ENV: &str = "SLIPWAY_GITHUB_WEBHOOK_SECRET";
/// Default deadline of a status update.
pub const DEFAULT_GIVE_UP_AFTER: Duration = Duration::from_secs(60 * 60);
/// Linked apps at most.
const MAX_APPS: usize = 256;
/// Branches or workflows listed per trigger at most.
const MAX_NAMES: usize = 64;

/// `[github]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGithub {
    pub api_url: Option<String>,
    pub app_id: Option<u64>,
    pub installation_id: Option<u64>,
    pub private_key_file: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    pub webhook_secret_file: Option<PathBuf>,
    pub public_url: Option<String>,
    pub give_up_after: Option<String>,
    /// Tests only: retry waits ("10ms", "1s") and how long before expiry an
    /// installation token is renewed.
    pub retry_min_wait: Option<String>,
    pub retry_max_wait: Option<String>,
    pub token_renew_before: Option<String>,
    pub apps: Option<BTreeMap<String, RawLink>>,
}

/// `[github.apps.APP]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLink {
    pub repo: Option<String>,
    pub environment: Option<String>,
    pub commit_status: Option<bool>,
    pub tag: Option<String>,
    pub trigger: Option<RawTrigger>,
    pub artifact: Option<RawArtifact>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTrigger {
    pub push: Option<Vec<String>>,
    pub release: Option<bool>,
    pub workflow_run: Option<Vec<String>>,
    pub workflow_branches: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawArtifact {
    pub release_asset: Option<String>,
    pub checksums_asset: Option<String>,
    pub url: Option<String>,
    pub checksums_url: Option<String>,
}

/// The secrets, loaded once at start.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub auth: Auth,
    /// None: no webhooks (`/hooks/github` answers 404).
    pub webhook_secret: Option<Secret>,
}

/// What starts a deployment of a linked app.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Triggers {
    pub push: Vec<String>,
    pub release: bool,
    pub workflow_run: Vec<String>,
    /// Empty: a workflow run on any branch.
    pub workflow_branches: Vec<String>,
}

/// Where a webhook deploy's artifact comes from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArtifactSource {
    /// A release asset name template (`{tag}`, `{version}` = tag without a
    /// leading `v`, `{sha}`).
    pub release_asset: Option<String>,
    /// The release asset in `sha256sum` format the asset's digest is
    /// checked against.
    pub checksums_asset: Option<String>,
    /// A URL template agents download from (`{sha}`, `{tag}`, `{version}`,
    /// `{branch}`).
    pub url: Option<String>,
    /// The URL template of its `sha256sum` checksums file.
    pub checksums_url: Option<String>,
}

/// An app linked to a repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub app: String,
    pub repo: Repo,
    pub environment: String,
    pub commit_status: bool,
    /// `key:value` label of the nodes a webhook deploy goes to.
    pub tag: Option<String>,
    pub triggers: Triggers,
    pub artifact: ArtifactSource,
}

/// Checked `[github]`.
#[derive(Debug, Clone)]
pub struct GithubConfig {
    pub api_url: String,
    pub credentials: Credentials,
    /// Base of `log_url` (the controller's pages), if known.
    pub public_url: Option<String>,
    pub give_up_after: Duration,
    pub retry: RetryPolicy,
    pub links: BTreeMap<String, Link>,
    /// Where the secrets came from, for equality and the start-up log.
    sources: String,
}

impl PartialEq for GithubConfig {
    fn eq(&self, other: &Self) -> bool {
        self.api_url == other.api_url
            && self.public_url == other.public_url
            && self.give_up_after == other.give_up_after
            && self.retry == other.retry
            && self.links == other.links
            && self.sources == other.sources
    }
}
impl Eq for GithubConfig {}

fn parse_wait(text: &str) -> Option<Duration> {
    if let Some(ms) = text.strip_suffix("ms") {
        return ms.parse().ok().map(Duration::from_millis);
    }
    if text == "0s" || text == "0" {
        return Some(Duration::ZERO);
    }
    slipway_proto::cli::parse_duration(text)
}

/// Checks a template: only the known `{placeholders}`, balanced braces.
fn check_template(key: &str, text: &str, allowed: &[&str]) -> Result<(), String> {
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let close = after
            .find('}')
            .ok_or_else(|| format!("{key}: {text:?} has a '{{' without a '}}'"))?;
        let name = &after[..close];
        if !allowed.contains(&name) {
            return Err(format!(
                "{key}: {text:?} uses {{{name}}}; known: {}",
                allowed
                    .iter()
                    .map(|a| format!("{{{a}}}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        rest = &after[close + 1..];
    }
    if rest.contains('}') {
        return Err(format!("{key}: {text:?} has a '}}' without a '{{'"));
    }
    Ok(())
}

fn names(key: &str, list: Option<Vec<String>>) -> Result<Vec<String>, String> {
    let list = list.unwrap_or_default();
    if list.len() > MAX_NAMES {
        return Err(format!("{key}: more than {MAX_NAMES} names"));
    }
    for name in &list {
        if name.is_empty() || name.len() > 255 || name.chars().any(char::is_control) {
            return Err(format!("{key}: {name:?} is not a branch or workflow name"));
        }
    }
    Ok(list)
}

impl Link {
    fn new(app: &str, raw: RawLink) -> Result<Self, String> {
        let key = |k: &str| format!("github.apps.{app}.{k}");
        slipway_proto::limits::check_app_name(&format!("github.apps.{app}"), app)
            .map_err(|e| e.to_string())?;
        let repo = raw
            .repo
            .ok_or_else(|| format!("{}: missing, e.g. repo = \"owner/name\"", key("repo")))?;
        let repo = Repo::parse(&repo).map_err(|e| format!("{}: {e}", key("repo")))?;
        let environment = raw.environment.unwrap_or_else(|| "production".to_owned());
        if environment.is_empty()
            || environment.len() > 255
            || environment.chars().any(char::is_control)
        {
            return Err(format!(
                "{}: {environment:?} is not an environment name",
                key("environment")
            ));
        }
        if let Some(tag) = &raw.tag {
            slipway_proto::limits::check_tag(&key("tag"), tag).map_err(|e| e.to_string())?;
        }
        let t = raw.trigger.unwrap_or_default();
        let triggers = Triggers {
            push: names(&key("trigger.push"), t.push)?,
            release: t.release.unwrap_or(false),
            workflow_run: names(&key("trigger.workflow_run"), t.workflow_run)?,
            workflow_branches: names(&key("trigger.workflow_branches"), t.workflow_branches)?,
        };
        let a = raw.artifact.unwrap_or_default();
        let artifact = ArtifactSource {
            release_asset: a.release_asset,
            checksums_asset: a.checksums_asset,
            url: a.url,
            checksums_url: a.checksums_url,
        };
        if let Some(t) = &artifact.release_asset {
            check_template(
                &key("artifact.release_asset"),
                t,
                &["tag", "version", "sha"],
            )?;
        }
        if let Some(t) = &artifact.checksums_asset {
            check_template(
                &key("artifact.checksums_asset"),
                t,
                &["tag", "version", "sha"],
            )?;
            if artifact.release_asset.is_none() {
                return Err(format!(
                    "{}: needs artifact.release_asset (the asset it checks)",
                    key("artifact.checksums_asset")
                ));
            }
        }
        let url_vars = ["sha", "tag", "version", "branch"];
        match (&artifact.url, &artifact.checksums_url) {
            (Some(url), Some(sums)) => {
                check_template(&key("artifact.url"), url, &url_vars)?;
                check_template(&key("artifact.checksums_url"), sums, &url_vars)?;
                if !url.starts_with("https://") {
                    return Err(format!(
                        "{}: {url:?} must be https:// (agents download it)",
                        key("artifact.url")
                    ));
                }
                super::client::parse_origin(sums, &key("artifact.checksums_url"))
                    .map_err(|e| e.to_string())?;
            }
            (Some(_), None) => {
                return Err(format!(
                    "{}: needed with artifact.url (the digest agents check the download against)",
                    key("artifact.checksums_url")
                ))
            }
            (None, Some(_)) => {
                return Err(format!(
                    "{}: needs artifact.url",
                    key("artifact.checksums_url")
                ))
            }
            (None, None) => {}
        }
        let any_trigger =
            !triggers.push.is_empty() || triggers.release || !triggers.workflow_run.is_empty();
        if any_trigger {
            let needs_url = !triggers.push.is_empty() || !triggers.workflow_run.is_empty();
            if needs_url && artifact.url.is_none() {
                return Err(format!(
                    "{}: push and workflow_run triggers need artifact.url and artifact.checksums_url",
                    key("artifact")
                ));
            }
            if triggers.release && artifact.release_asset.is_none() && artifact.url.is_none() {
                return Err(format!(
                    "{}: a release trigger needs artifact.release_asset (or artifact.url)",
                    key("artifact")
                ));
            }
        }
        Ok(Self {
            app: app.to_owned(),
            repo,
            environment,
            commit_status: raw.commit_status.unwrap_or(false),
            tag: raw.tag,
            triggers,
            artifact,
        })
    }
}

impl GithubConfig {
    /// Checks every key and loads the secrets; the error names the key.
    pub fn new(raw: RawGithub) -> Result<Self, String> {
        let api_url = raw.api_url.unwrap_or_else(|| DEFAULT_API_URL.to_owned());
        super::client::check_api_url(&api_url).map_err(|e| format!("github.api_url: {e}"))?;
        let wait = |key: &str, text: &str| {
            parse_wait(text)
                .ok_or_else(|| format!("github.{key}: {text:?} is not a duration like 60s"))
        };
        let mut retry = super::client::DEFAULT_RETRY;
        if let Some(text) = raw.retry_min_wait.as_deref() {
            retry.min_wait = wait("retry_min_wait", text)?;
        }
        if let Some(text) = raw.retry_max_wait.as_deref() {
            retry.max_wait = wait("retry_max_wait", text)?;
        }
        if retry.min_wait > retry.max_wait || retry.max_wait > Duration::from_secs(300) {
            return Err("github.retry_*: need retry_min_wait <= retry_max_wait <= 300s".into());
        }
        let give_up_after = match raw.give_up_after.as_deref() {
            None => DEFAULT_GIVE_UP_AFTER,
            Some(text) => match wait("give_up_after", text)? {
                d if d.is_zero() || d > Duration::from_secs(7 * 24 * 3600) => {
                    return Err(format!(
                        "github.give_up_after: {text:?} must be more than 0 and at most 7d"
                    ))
                }
                d => d,
            },
        };
        let renew_before = match raw.token_renew_before.as_deref() {
            None => DEFAULT_RENEW_BEFORE,
            Some(text) => wait("token_renew_before", text)?,
        };
        let (auth, sources) = match (raw.app_id, raw.installation_id, &raw.token_file) {
            (Some(_), _, Some(_)) => {
                return Err(
                    "github.token_file: give either app_id (a GitHub App) or token_file, not both"
                        .into(),
                )
            }
            (Some(app_id), Some(installation_id), None) => {
                let (pem, origin) = match &raw.private_key_file {
                    Some(path) => (
                        std::fs::read(path).map_err(|e| {
                            format!("github.private_key_file: cannot read {}: {e}", path.display())
                        })?,
                        path.display().to_string(),
                    ),
                    None => (
                        std::env::var(APP_KEY_ENV)
                            .map_err(|_| {
                                format!(
                                    "github.private_key_file: not set, and ${APP_KEY_ENV} is not set either"
                                )
                            })?
                            .into_bytes(),
                        format!("${APP_KEY_ENV}"),
                    ),
                };
                let key = AppKey::from_pem(&pem, &origin)
                    .map_err(|e| format!("github.private_key_file: {e}"))?;
                (
                    Auth::app(app_id, installation_id, key, renew_before),
                    format!("app {app_id} installation {installation_id} key {origin}"),
                )
            }
            (Some(_), None, None) => {
                return Err(
                    "github.installation_id: needed with app_id (the App's installation on the repositories)"
                        .into(),
                )
            }
            (None, Some(_), _) => {
                return Err("github.app_id: needed with installation_id".into());
            }
            (None, None, file) => {
                if raw.private_key_file.is_some() {
                    return Err("github.private_key_file: needs app_id and installation_id".into());
                }
                let token = Secret::load(file.as_deref(), TOKEN_ENV, "the GitHub token")
                    .map_err(|e| format!("github.token_file: {e}"))?;
                let origin = file
                    .as_ref()
                    .map_or_else(|| format!("${TOKEN_ENV}"), |p| p.display().to_string());
                (Auth::Token(token), format!("token {origin}"))
            }
        };
        let webhook_secret = match &raw.webhook_secret_file {
            Some(path) => Some(
                Secret::load(Some(path), WEBHOOK_SECRET_ENV, "the webhook secret")
                    .map_err(|e| format!("github.webhook_secret_file: {e}"))?,
            ),
            None => std::env::var_os(WEBHOOK_SECRET_ENV)
                .map(|_| Secret::load(None, WEBHOOK_SECRET_ENV, "the webhook secret"))
                .transpose()
                .map_err(|e| format!("github.webhook_secret_file: {e}"))?,
        };
        if let Some(url) = &raw.public_url {
            super::client::parse_origin(url, "github.public_url").map_err(|e| e.to_string())?;
        }
        let raw_apps = raw.apps.unwrap_or_default();
        if raw_apps.len() > MAX_APPS {
            return Err(format!("github.apps: more than {MAX_APPS} apps"));
        }
        let mut links = BTreeMap::new();
        for (app, raw_link) in raw_apps {
            links.insert(app.clone(), Link::new(&app, raw_link)?);
        }
        let needs_webhooks = links.values().any(|l| {
            !l.triggers.push.is_empty() || l.triggers.release || !l.triggers.workflow_run.is_empty()
        });
        if needs_webhooks && webhook_secret.is_none() {
            return Err(format!(
                "github.webhook_secret_file: an app has triggers, so webhooks need a secret (or set ${WEBHOOK_SECRET_ENV})"
            ));
        }
        Ok(Self {
            api_url,
            credentials: Credentials {
                auth,
                webhook_secret,
            },
            public_url: raw.public_url.map(|u| u.trim_end_matches('/').to_owned()),
            give_up_after,
            retry,
            links,
            sources,
        })
    }

    /// A client with these settings.
    pub fn client(&self) -> Result<Client, GhError> {
        Client::new(Settings {
            api_url: self.api_url.clone(),
            auth: self.credentials.auth.clone(),
            retry: self.retry,
            timeout: Duration::from_secs(30),
        })
    }

    /// The app's link, if it is linked.
    pub fn link(&self, app: &str) -> Option<&Link> {
        self.links.get(app)
    }

    /// Where the secrets came from (never the secrets).
    pub fn sources(&self) -> &str {
        &self.sources
    }
}

/// Shared, so the HTTP face and the status queue see one config.
pub type Shared = Arc<GithubConfig>;

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<GithubConfig, String> {
        GithubConfig::new(toml::from_str(text).map_err(|e| e.to_string())?)
    }

    #[test]
    fn every_key_is_checked_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "github_pat_abc\n").unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s3cret\n").unwrap();
        let base = format!(
            "token_file = \"{}\"\nwebhook_secret_file = \"{}\"\n",
            token.display(),
            secret.display()
        );
        let ok = parse(&format!(
            "{base}[apps.web]\nrepo = \"acme/web\"\ncommit_status = true\n\
             [apps.web.trigger]\nrelease = true\n[apps.web.artifact]\nrelease_asset = \"web-{{tag}}.tar.gz\"\n"
        ))
        .unwrap();
        let link = ok.link("web").unwrap();
        assert_eq!(link.environment, "production");
        assert!(link.triggers.release && link.commit_status);
        assert!(!format!("{ok:?}").contains("github_pat_abc"));
        for (text, want) in [
            ("[apps.web]\n".to_owned(), "github.apps.web.repo"),
            ("[apps.web]\nrepo = \"acme\"\n".to_owned(), "github.apps.web.repo"),
            (
                "[apps.web]\nrepo = \"a/b\"\n[apps.web.trigger]\npush = [\"main\"]\n".to_owned(),
                "github.apps.web.artifact",
            ),
            (
                "[apps.web]\nrepo = \"a/b\"\n[apps.web.artifact]\nrelease_asset = \"x-{nope}\"\n"
                    .to_owned(),
                "github.apps.web.artifact.release_asset",
            ),
            (
                "[apps.web]\nrepo = \"a/b\"\n[apps.web.artifact]\nurl = \"http://x/{sha}\"\nchecksums_url = \"https://x/s\"\n"
                    .to_owned(),
                "github.apps.web.artifact.url",
            ),
            (
                "[apps.\"bad name\"]\nrepo = \"a/b\"\n".to_owned(),
                "github.apps.bad name",
            ),
            ("give_up_after = \"never\"\n".to_owned(), "github.give_up_after"),
            ("api_url = \"http://example.com\"\n".to_owned(), "github.api_url"),
        ] {
            let e = parse(&format!("{base}{text}")).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
        let e = parse("app_id = 1\n").unwrap_err();
        assert!(e.contains("github.installation_id"), "{e}");
        let e = parse(&format!(
            "app_id = 1\ninstallation_id = 2\nprivate_key_file = \"{}\"\n",
            token.display()
        ))
        .unwrap_err();
        assert!(
            e.contains("github.private_key_file") && e.contains("PEM"),
            "{e}"
        );
        assert!(!e.contains("github_pat_abc"), "{e}");
        let e = parse(&format!(
            "token_file = \"{}\"\n[apps.web]\nrepo = \"a/b\"\n[apps.web.trigger]\nrelease = true\n[apps.web.artifact]\nrelease_asset = \"w\"\n",
            token.display()
        ))
        .unwrap_err();
        assert!(e.contains("webhook_secret_file"), "{e}");
    }

    #[test]
    fn templates_name_unknown_placeholders() {
        assert!(check_template("k", "a-{tag}-{sha}", &["tag", "sha"]).is_ok());
        assert!(check_template("k", "a-{tag", &["tag"])
            .unwrap_err()
            .contains("without"));
        assert!(check_template("k", "{x}", &["tag"])
            .unwrap_err()
            .contains("{x}"));
    }
}
