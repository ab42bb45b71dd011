//! `[digitalocean]` in the controller's config file: the token, the tags
//! that make up the fleet, the API URL, how often `serve` syncs.
//!
//! ```toml
//! [digitalocean]
//! token_file = "/etc/slipway/digitalocean-token"  # else $DIGITALOCEAN_ACCESS_TOKEN
//! fleet_tags = ["env:production"]
//! sync_every = "60s"                               # default; "0s" turns the periodic sync off
//! api_url = "https://api.digitalocean.com"         # default
//! ```

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::api::check_tag;
use super::client::{Client, DoError, RetryPolicy, Settings, Token, DEFAULT_API_URL, TOKEN_ENV};

/// Shortest periodic sync: each costs one listing per fleet tag, and DO
/// allows 250 requests a minute.
pub const MIN_SYNC_EVERY: Duration = Duration::from_secs(10);
/// Fleet tags at most.
const MAX_FLEET_TAGS: usize = 16;

/// `[digitalocean]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDigitalOcean {
    pub token_file: Option<PathBuf>,
    pub fleet_tags: Option<Vec<String>>,
    pub api_url: Option<String>,
    pub sync_every: Option<String>,
    /// Tests only: the shortest and longest retry wait ("10ms", "1s").
    pub retry_min_wait: Option<String>,
    pub retry_max_wait: Option<String>,
    /// `[digitalocean.firewall]`: the fleet firewall.
    pub firewall: Option<super::firewall::RawFirewall>,
    /// Per app: `[digitalocean.apps.web] snapshot_before_deploy = true`.
    pub apps: Option<std::collections::BTreeMap<String, RawApp>>,
    /// How long the snapshots before a deploy may take (default 30m).
    pub snapshot_timeout: Option<String>,
    /// How often a snapshot action is polled (default 10s).
    pub snapshot_poll: Option<String>,
}

/// `[digitalocean.apps.APP]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApp {
    /// Snapshot the app's droplets before each deploy of it.
    #[serde(default)]
    pub snapshot_before_deploy: bool,
}

/// Checked `[digitalocean]` settings. The token is read when used, so a
/// rotated token file is picked up without a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DoConfig {
    pub token_file: Option<PathBuf>,
    pub fleet_tags: Vec<String>,
    pub api_url: String,
    /// None: no periodic sync in `serve`.
    pub sync_every: Option<Duration>,
    pub retry: RetryPolicy,
    pub firewall: Option<super::firewall::FirewallConfig>,
    /// Apps snapshotted before each deploy.
    pub snapshot_apps: std::collections::BTreeSet<String>,
    /// Deadline of those snapshots.
    pub snapshot_timeout: Duration,
    /// How often they are polled.
    pub snapshot_poll: Duration,
}

impl DoConfig {
    /// Checks every key; the error names the key and what was wrong.
    pub fn new(raw: RawDigitalOcean) -> Result<Self, String> {
        let fleet_tags = raw.fleet_tags.unwrap_or_default();
        if fleet_tags.is_empty() {
            return Err(
                "digitalocean.fleet_tags: name at least one tag, e.g. fleet_tags = [\"env:production\"]"
                    .into(),
            );
        }
        if fleet_tags.len() > MAX_FLEET_TAGS {
            return Err(format!(
                "digitalocean.fleet_tags: more than {MAX_FLEET_TAGS} tags"
            ));
        }
        for tag in &fleet_tags {
            check_tag(tag).map_err(|e| format!("digitalocean.fleet_tags: {tag:?}: {e}"))?;
        }
        let duration = |key: &str, text: &str| {
            parse_wait(text)
                .ok_or_else(|| format!("digitalocean.{key}: {text:?} is not a duration like 60s"))
        };
        let sync_every = match raw.sync_every.as_deref() {
            None => Some(Duration::from_secs(60)),
            Some(text) => match duration("sync_every", text)? {
                d if d.is_zero() => None,
                d if d < MIN_SYNC_EVERY => {
                    return Err(format!(
                        "digitalocean.sync_every: {text:?} is shorter than {MIN_SYNC_EVERY:?}"
                    ))
                }
                d => Some(d),
            },
        };
        let mut retry = super::client::DEFAULT_RETRY;
        if let Some(text) = raw.retry_min_wait.as_deref() {
            retry.min_wait = duration("retry_min_wait", text)?;
        }
        if let Some(text) = raw.retry_max_wait.as_deref() {
            retry.max_wait = duration("retry_max_wait", text)?;
        }
        if retry.min_wait > retry.max_wait || retry.max_wait > Duration::from_secs(300) {
            return Err(
                "digitalocean.retry_*: need retry_min_wait <= retry_max_wait <= 300s".into(),
            );
        }
        let mut snapshot_apps = std::collections::BTreeSet::new();
        for (app, table) in raw.apps.unwrap_or_default() {
            slipway_proto::limits::check_app_name("app", &app)
                .map_err(|e| format!("digitalocean.apps.{app}: {e}"))?;
            if table.snapshot_before_deploy {
                snapshot_apps.insert(app);
            }
        }
        let snapshot_timeout = match raw.snapshot_timeout.as_deref() {
            None => super::snapshot::DEFAULT_TIMEOUT,
            Some(text) => match duration("snapshot_timeout", text)? {
                d if d.is_zero() => {
                    return Err("digitalocean.snapshot_timeout: must be more than 0s".into())
                }
                d => d,
            },
        };
        let snapshot_poll = match raw.snapshot_poll.as_deref() {
            None => super::snapshot::DEFAULT_POLL,
            Some(text) => match duration("snapshot_poll", text)? {
                d if d < Duration::from_millis(10) || d > Duration::from_secs(300) => {
                    return Err(format!(
                        "digitalocean.snapshot_poll: {text:?} is not between 10ms and 300s"
                    ))
                }
                d => d,
            },
        };
        let config = Self {
            snapshot_apps,
            snapshot_timeout,
            snapshot_poll,
            token_file: raw.token_file,
            fleet_tags,
            api_url: raw.api_url.unwrap_or_else(|| DEFAULT_API_URL.to_owned()),
            sync_every,
            retry,
            firewall: raw
                .firewall
                .map(super::firewall::FirewallConfig::new)
                .transpose()?,
        };
        // The URL is checked now, not at the first sync.
        super::client::check_api_url(&config.api_url)
            .map_err(|e| format!("digitalocean.api_url: {e}"))?;
        Ok(config)
    }

    /// The token: from `token_file`, else `$DIGITALOCEAN_ACCESS_TOKEN`.
    pub fn token(&self) -> Result<Token, DoError> {
        match &self.token_file {
            Some(path) => Token::from_file(path),
            None => Token::from_env(TOKEN_ENV),
        }
    }

    /// A client with these settings (reads the token).
    /// The snapshot policy, when some app has `snapshot_before_deploy`.
    pub fn snapshot_policy(&self) -> Result<Option<super::snapshot::SnapshotPolicy>, DoError> {
        if self.snapshot_apps.is_empty() {
            return Ok(None);
        }
        Ok(Some(super::snapshot::SnapshotPolicy {
            client: self.client()?,
            apps: self.snapshot_apps.clone(),
            timeout: self.snapshot_timeout,
            poll: self.snapshot_poll,
        }))
    }

    pub fn client(&self) -> Result<Client, DoError> {
        let mut settings = Settings::new(self.token()?);
        settings.api_url = self.api_url.clone();
        settings.retry = self.retry;
        Client::new(settings)
    }
}

/// A duration as the rest of the config writes them ("60s", "5m"), plus
/// "0s" and milliseconds ("10ms", for tests' retry waits).
fn parse_wait(text: &str) -> Option<Duration> {
    if let Some(ms) = text.strip_suffix("ms") {
        return ms.parse().ok().map(Duration::from_millis);
    }
    if text == "0s" || text == "0" {
        return Some(Duration::ZERO);
    }
    slipway_proto::cli::parse_duration(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(toml_text: &str) -> RawDigitalOcean {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn every_key_is_checked() {
        let ok = DoConfig::new(raw("fleet_tags = [\"env:production\"]")).unwrap();
        assert_eq!(ok.sync_every, Some(Duration::from_secs(60)));
        assert_eq!(ok.api_url, DEFAULT_API_URL);
        for (text, want) in [
            ("", "fleet_tags"),
            ("fleet_tags = [\"a b\"]", "fleet_tags"),
            ("fleet_tags = [\"a\"]\nsync_every = \"1s\"", "sync_every"),
            ("fleet_tags = [\"a\"]\nsync_every = \"soon\"", "sync_every"),
            (
                "fleet_tags = [\"a\"]\napi_url = \"http://example.com\"",
                "api_url",
            ),
            (
                "fleet_tags = [\"a\"]\nretry_min_wait = \"5s\"\nretry_max_wait = \"1s\"",
                "retry",
            ),
            (
                "fleet_tags = [\"a\"]\nsnapshot_timeout = \"0s\"",
                "snapshot_timeout",
            ),
            (
                "fleet_tags = [\"a\"]\nsnapshot_poll = \"1h\"",
                "snapshot_poll",
            ),
            (
                "fleet_tags = [\"a\"]\n[apps.\"a b\"]\nsnapshot_before_deploy = true",
                "apps.a b",
            ),
        ] {
            let e = DoConfig::new(raw(text)).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
        let off = DoConfig::new(raw("fleet_tags = [\"a\"]\nsync_every = \"0s\"")).unwrap();
        assert_eq!(off.sync_every, None);
    }
}
