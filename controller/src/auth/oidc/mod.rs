//! GitHub Actions OIDC tokens as CI credentials: a workflow with
//! `permissions: id-token: write` asks the Actions runtime for a token
//! (the `slipway` CLI does, with `--oidc`) and presents it where an API
//! token would go; no secret is stored in the repository.
//!
//! The controller checks each token ([`Oidc::authenticate`]):
//! 1. its size ([`MAX_TOKEN`]) and header ([`jwt::parse`]: RS256 only, a
//!    key id);
//! 2. the signature against the issuer's published keys ([`jwks::KeySet`]:
//!    fetched, cached, refetched on an unknown key id at a limited rate);
//! 3. `iss`, `aud`, `exp` and `nbf` with a small leeway
//!    ([`jwt::check_registered`]);
//! 4. the grants of `[oidc]` in the controller config ([`decide`]): a grant
//!    names an app, the scopes it gives, and the claims a token must carry —
//!    `repository_id` / `repository_owner_id` (numbers that a re-registered
//!    name does not inherit), `ref`, `environment`, `job_workflow_ref`. The
//!    caller gets the scopes of every grant the token matches; a token that
//!    matches none is refused naming, per grant, the claim that did not
//!    match.
//!
//! Every decision is audited (OIDC_TOKEN_ACCEPTED / OIDC_TOKEN_REFUSED) with
//! the claims that decided it, once the signature has shown them to be the
//! issuer's.

pub mod jwks;
pub mod jwt;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::audit::{self, AuditEvent};
use crate::auth::apitoken::{Caller, Scope};
use crate::store::Store;

/// GitHub's issuer (github.com; GitHub Enterprise Server has its own).
pub const DEFAULT_ISSUER: &str = "https://token.actions.githubusercontent.com";
/// The audience asked for and expected when none is configured; a
/// controller-specific one (its URL) is better, see the README.
pub const DEFAULT_AUDIENCE: &str = "slipway";
/// Clock difference forgiven on `exp` and `nbf` by default.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(60);
/// The most leeway accepted: more would keep expired tokens useful.
const MAX_LEEWAY: Duration = Duration::from_secs(300);
/// Default shortest time between two fetches of the issuer's keys.
pub const DEFAULT_KEY_REFETCH: Duration = Duration::from_secs(60);
/// Longest token accepted (GitHub's are ~1.5 KiB).
pub const MAX_TOKEN: usize = 8 * 1024;
/// Longest configured claim value (a `job_workflow_ref` is the longest).
const MAX_CLAIM_VALUE: usize = 512;

/// Why a token was refused, or could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    /// The controller has no `[oidc]` section.
    #[error("this controller accepts no OIDC tokens (its config has no [oidc] section); use an API token")]
    NotConfigured,
    /// Longer than [`MAX_TOKEN`].
    #[error("OIDC token of {0} bytes refused: the limit is {MAX_TOKEN}")]
    TooLong(usize),
    /// Not a compact JWS, bad base64url or JSON, no `kid`, a `crit` header.
    #[error("malformed OIDC token: {0}")]
    Malformed(String),
    /// `alg` other than RS256.
    #[error("OIDC token signed with {0:?} refused: only RS256 is accepted")]
    Algorithm(String),
    /// The issuer's key set has no such key (after a refetch, or a refetch
    /// was made too recently to make another).
    #[error("OIDC token signed with unknown key {kid:?} (the issuer's keys were fetched {fetched_ago}s ago)")]
    UnknownKey {
        /// The token's key id.
        kid: String,
        /// Seconds since the keys were last fetched.
        fetched_ago: u64,
    },
    /// The issuer's keys could not be fetched and none is cached.
    #[error("cannot check OIDC tokens: the issuer's keys are unavailable: {0}")]
    Keys(String),
    /// The signature does not verify.
    #[error("OIDC token signature does not verify with the issuer's key {0:?}")]
    Signature(String),
    /// `iss` is another issuer.
    #[error("OIDC token from issuer {got:?} refused: this controller trusts {want:?}")]
    Issuer {
        /// The token's `iss`.
        got: String,
        /// The configured issuer.
        want: String,
    },
    /// `aud` does not name this controller's audience.
    #[error("OIDC token for audience {got:?} refused: this controller expects {want:?} (slipway --oidc-audience)")]
    Audience {
        /// The token's `aud`.
        got: String,
        /// The configured audience.
        want: String,
    },
    /// `exp` is past (beyond the leeway).
    #[error("OIDC token expired {ago}s ago")]
    Expired {
        /// Seconds since `exp`.
        ago: i64,
    },
    /// `nbf` is ahead (beyond the leeway).
    #[error("OIDC token not valid for another {within}s")]
    NotYetValid {
        /// Seconds until `nbf`.
        within: i64,
    },
    /// A valid token that no grant of `[oidc]` covers.
    #[error("OIDC token of {actor} matches no [[oidc.grant]]: {why}")]
    NoGrant {
        /// Who it is (`oidc:OWNER/REPO`).
        actor: String,
        /// Per grant, the claim that did not match.
        why: String,
    },
}

impl OidcError {
    /// True when the controller could not judge the token (the issuer's
    /// keys are unavailable): the caller may retry.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Keys(_))
    }

    /// True for a genuine token that no grant allows (403, not 401).
    pub fn is_forbidden(&self) -> bool {
        matches!(self, Self::NoGrant { .. })
    }

    /// The actor a refusal can name: the verified repository, if known.
    pub fn actor(&self) -> Option<&str> {
        match self {
            Self::NoGrant { actor, .. } => Some(actor),
            _ => None,
        }
    }
}

/// A claim a grant can require.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The repository's number: a deleted and re-created `owner/repo` gets a new one.
    RepositoryId,
    /// The owner's (user or organisation) number.
    RepositoryOwnerId,
    /// `refs/heads/main`, `refs/tags/v1.2.3`.
    Ref,
    /// The job's deployment environment (only set when the job names one).
    Environment,
    /// The workflow file that runs the job: `owner/repo/.github/workflows/deploy.yml@refs/heads/main`.
    JobWorkflowRef,
}

impl Claim {
    /// The claim's (and config key's) name.
    pub fn name(self) -> &'static str {
        match self {
            Self::RepositoryId => "repository_id",
            Self::RepositoryOwnerId => "repository_owner_id",
            Self::Ref => "ref",
            Self::Environment => "environment",
            Self::JobWorkflowRef => "job_workflow_ref",
        }
    }
}

impl fmt::Display for Claim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The claims recorded in audit events: what decided, and what names the
/// run for a person reading the log.
const AUDITED_CLAIMS: &[&str] = &[
    "sub",
    "repository",
    "repository_id",
    "repository_owner",
    "repository_owner_id",
    "ref",
    "environment",
    "job_workflow_ref",
    "workflow",
    "event_name",
    "actor",
    "sha",
    "run_id",
    "run_attempt",
    "jti",
];

/// A configured value: TOML lets ids be written as numbers or strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawValue {
    /// `repository_id = 123456`.
    Number(u64),
    /// `ref = "refs/heads/main"`.
    Text(String),
}

/// One value or a list of accepted values.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawValues {
    /// One accepted value.
    One(RawValue),
    /// Any of these.
    Many(Vec<RawValue>),
}

/// `[oidc]` in the controller config.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOidc {
    /// The token issuer (`iss`); default [`DEFAULT_ISSUER`].
    pub issuer: Option<String>,
    /// Where the issuer's keys are; default `<issuer>/.well-known/jwks`.
    pub jwks_url: Option<String>,
    /// CA certificates (PEM) the issuer's HTTPS certificate must chain to;
    /// default the system's roots.
    pub ca_file: Option<PathBuf>,
    /// The `aud` tokens must carry; default [`DEFAULT_AUDIENCE`].
    pub audience: Option<String>,
    /// Clock difference forgiven on `exp`/`nbf`, e.g. "60s" (at most 5m).
    pub leeway: Option<String>,
    /// Shortest time between two fetches of the issuer's keys, e.g. "60s".
    pub key_refetch_interval: Option<String>,
    /// `[[oidc.grant]]`: who may do what.
    #[serde(default)]
    pub grant: Vec<RawGrant>,
}

/// `[[oidc.grant]]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGrant {
    /// The app the grant is for.
    pub app: Option<String>,
    /// `deploy` (the default; `deploy:APP` is the same) and/or `read`.
    pub scopes: Option<Vec<String>>,
    /// Required claims.
    pub repository_id: Option<RawValues>,
    /// Required claims.
    pub repository_owner_id: Option<RawValues>,
    /// Required claims.
    #[serde(rename = "ref")]
    pub ref_: Option<RawValues>,
    /// Required claims.
    pub environment: Option<RawValues>,
    /// Required claims.
    pub job_workflow_ref: Option<RawValues>,
}

/// A checked grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The app.
    pub app: String,
    /// What a matching token may do.
    pub scopes: Vec<Scope>,
    /// Each claim named, with the values it may have (any of them).
    pub conditions: Vec<(Claim, Vec<String>)>,
}

/// Checked `[oidc]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcConfig {
    /// `iss`.
    pub issuer: String,
    /// The JWKS document.
    pub jwks_url: String,
    /// CA file for the issuer's HTTPS, or the system roots.
    pub ca_file: Option<PathBuf>,
    /// `aud`.
    pub audience: String,
    /// Forgiven clock difference.
    pub leeway: Duration,
    /// Shortest time between key fetches.
    pub key_refetch_interval: Duration,
    /// The grants, in config order.
    pub grants: Vec<Grant>,
}

fn https_url(key: &str, url: &str) -> Result<(), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("oidc.{key} = {url:?}: not a URL: {e}"))?;
    if uri.scheme_str() != Some("https") || uri.host().is_none_or(str::is_empty) {
        return Err(format!("oidc.{key} = {url:?}: expected an https:// URL"));
    }
    if uri.query().is_some() {
        return Err(format!("oidc.{key} = {url:?}: must not have a query"));
    }
    Ok(())
}

fn duration(
    key: &str,
    text: Option<String>,
    default: Duration,
    max: Duration,
) -> Result<Duration, String> {
    let Some(text) = text else {
        return Ok(default);
    };
    let zero = text.trim() == "0s" || text.trim() == "0";
    match slipway_proto::cli::parse_duration(&text) {
        Some(d) if d <= max => Ok(d),
        None if zero => Ok(Duration::ZERO),
        _ => Err(format!(
            "oidc.{key} = {text:?}: expected a duration of at most {}s, e.g. 60s",
            max.as_secs()
        )),
    }
}

impl OidcConfig {
    /// Checks `[oidc]`; every error names its key (`oidc.grant[2].ref`).
    pub fn new(raw: RawOidc) -> Result<Self, String> {
        let issuer = raw
            .issuer
            .unwrap_or_else(|| DEFAULT_ISSUER.to_owned())
            .trim_end_matches('/')
            .to_owned();
        https_url("issuer", &issuer)?;
        let jwks_url = raw
            .jwks_url
            .unwrap_or_else(|| format!("{issuer}/.well-known/jwks"));
        https_url("jwks_url", &jwks_url)?;
        let audience = raw.audience.unwrap_or_else(|| DEFAULT_AUDIENCE.to_owned());
        if audience.is_empty()
            || audience.len() > 256
            || !audience.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(format!(
                "oidc.audience = {audience:?}: expected 1 to 256 printable ASCII characters, e.g. the controller's URL"
            ));
        }
        let leeway = duration("leeway", raw.leeway, DEFAULT_LEEWAY, MAX_LEEWAY)?;
        let key_refetch_interval = duration(
            "key_refetch_interval",
            raw.key_refetch_interval,
            DEFAULT_KEY_REFETCH,
            jwks::MAX_AGE,
        )?;
        if key_refetch_interval.is_zero() {
            return Err("oidc.key_refetch_interval: must be at least 1s (it limits how often unknown key ids make the controller ask the issuer)".into());
        }
        if let Some(path) = &raw.ca_file {
            // Read now, so a bad file stops the start with its key named.
            load_roots(path).map_err(|e| e.to_string())?;
        }
        if raw.grant.is_empty() {
            return Err("[oidc] has no [[oidc.grant]]: add one with app = \"APP\" and repository_id = ... (no token could do anything)".into());
        }
        let grants = raw
            .grant
            .into_iter()
            .enumerate()
            .map(|(i, g)| grant(i, g))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            issuer,
            jwks_url,
            ca_file: raw.ca_file,
            audience,
            leeway,
            key_refetch_interval,
            grants,
        })
    }
}

/// Checks `[[oidc.grant]]` number `i`.
fn grant(i: usize, raw: RawGrant) -> Result<Grant, String> {
    let key = |name: &str| format!("oidc.grant[{i}].{name}");
    let app = raw
        .app
        .ok_or_else(|| format!("{}: missing (the app this grant is for)", key("app")))?;
    if !crate::auth::apitoken::is_app_name(&app) {
        return Err(format!(
            "{} = {app:?}: not an app name (letters, digits, . _ -)",
            key("app")
        ));
    }
    let mut scopes = Vec::new();
    for text in raw.scopes.unwrap_or_else(|| vec!["deploy".to_owned()]) {
        let scope = match text.as_str() {
            "read" => Scope::Read,
            "deploy" => Scope::Deploy(app.clone()),
            other if other == format!("deploy:{app}") => Scope::Deploy(app.clone()),
            other => {
                return Err(format!(
                    "{} has {other:?}: a grant gives \"deploy\" (deploy:{app}) and/or \"read\"",
                    key("scopes")
                ))
            }
        };
        if !scopes.contains(&scope) {
            scopes.push(scope);
        }
    }
    if scopes.is_empty() {
        return Err(format!("{}: empty", key("scopes")));
    }
    let mut conditions = Vec::new();
    for (claim, values) in [
        (Claim::RepositoryId, raw.repository_id),
        (Claim::RepositoryOwnerId, raw.repository_owner_id),
        (Claim::Ref, raw.ref_),
        (Claim::Environment, raw.environment),
        (Claim::JobWorkflowRef, raw.job_workflow_ref),
    ] {
        let Some(values) = values else { continue };
        let list = match values {
            RawValues::One(v) => vec![v],
            RawValues::Many(vs) => vs,
        };
        let mut texts = Vec::new();
        for value in list {
            let text = match value {
                RawValue::Number(n) => n.to_string(),
                RawValue::Text(t) => t,
            };
            let numeric = matches!(claim, Claim::RepositoryId | Claim::RepositoryOwnerId);
            if numeric && (text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit())) {
                return Err(format!(
                    "{} = {text:?}: expected the number GitHub shows (e.g. `gh api repos/OWNER/REPO --jq .id`), not a name",
                    key(claim.name())
                ));
            }
            if text.is_empty() || text.len() > MAX_CLAIM_VALUE {
                return Err(format!(
                    "{}: values must be 1 to {MAX_CLAIM_VALUE} characters",
                    key(claim.name())
                ));
            }
            texts.push(text);
        }
        if texts.is_empty() {
            return Err(format!(
                "{}: an empty list matches nothing",
                key(claim.name())
            ));
        }
        conditions.push((claim, texts));
    }
    // Names can be re-registered by someone else; numbers cannot.
    if !conditions
        .iter()
        .any(|(c, _)| matches!(c, Claim::RepositoryId | Claim::RepositoryOwnerId))
    {
        return Err(format!(
            "oidc.grant[{i}] (app {app}): needs repository_id or repository_owner_id, or any repository on GitHub could use it"
        ));
    }
    Ok(Grant {
        app,
        scopes,
        conditions,
    })
}

/// A claim's text: ids may come as strings (GitHub) or numbers.
fn claim_text(claims: &Map<String, Value>, name: &str) -> Option<String> {
    match claims.get(name)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The scopes `claims` earn: those of every grant they match; or why no
/// grant matched, naming per grant the first claim that did not.
pub fn decide(
    grants: &[Grant],
    claims: &Map<String, Value>,
) -> Result<(Vec<Scope>, Vec<usize>), String> {
    let mut scopes = Vec::new();
    let mut matched = Vec::new();
    let mut misses = Vec::new();
    for (i, grant) in grants.iter().enumerate() {
        let miss = grant.conditions.iter().find_map(|(claim, wanted)| {
            let got = claim_text(claims, claim.name());
            match got {
                Some(got) if wanted.contains(&got) => None,
                Some(got) => Some(format!(
                    "{claim} is {:?}, the grant wants {}",
                    jwt::cut(&got),
                    wanted_text(wanted)
                )),
                None => Some(format!(
                    "{claim} is absent, the grant wants {}",
                    wanted_text(wanted)
                )),
            }
        });
        match miss {
            None => {
                matched.push(i);
                for scope in &grant.scopes {
                    if !scopes.contains(scope) {
                        scopes.push(scope.clone());
                    }
                }
            }
            Some(miss) => misses.push(format!("grant[{i}] (app {}): {miss}", grant.app)),
        }
    }
    if matched.is_empty() {
        return Err(misses.join("; "));
    }
    Ok((scopes, matched))
}

fn wanted_text(wanted: &[String]) -> String {
    match wanted {
        [one] => format!("{one:?}"),
        many => format!("one of {many:?}"),
    }
}

/// The audited claims, each cut to a bounded length.
fn audited(claims: &Map<String, Value>) -> Value {
    let mut out = Map::new();
    for name in AUDITED_CLAIMS {
        if let Some(text) = claim_text(claims, name) {
            out.insert((*name).to_owned(), Value::String(jwt::cut(&text)));
        }
    }
    Value::Object(out)
}

/// Why the roots of `[oidc] ca_file` cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("oidc.ca_file: {0}")]
pub struct CaFileError(String);

/// The token verifier: the checked config and the issuer's keys.
#[derive(Debug)]
pub struct Oidc {
    config: OidcConfig,
    keys: jwks::KeySet,
}

impl Oidc {
    /// A verifier for `config`, reading its CA file now so a bad one stops
    /// the start.
    pub fn new(config: OidcConfig) -> Result<Self, CaFileError> {
        let roots = match &config.ca_file {
            Some(path) => load_roots(path)?,
            None => slipway_proto::https::system_roots(),
        };
        if roots.is_empty() {
            return Err(CaFileError(
                "no CA certificates: set ca_file, or install the system's (ca-certificates)".into(),
            ));
        }
        let keys = jwks::KeySet::new(config.jwks_url.clone(), roots, config.key_refetch_interval);
        Ok(Self { config, keys })
    }

    /// The checked config.
    pub fn config(&self) -> &OidcConfig {
        &self.config
    }

    /// Checks `token` and audits the decision; the caller has the scopes of
    /// the grants it matches.
    pub async fn authenticate(
        &self,
        store: &Store,
        token: &str,
        peer: &str,
    ) -> Result<Caller, OidcError> {
        let now = crate::now_unix();
        let (checked, claims) = self.check(token, now).await;
        let details = |extra: Value| {
            let mut d = serde_json::json!({ "peer": peer, "claims": claims.as_ref().map(audited) });
            if let (Value::Object(d), Value::Object(extra)) = (&mut d, extra) {
                d.extend(extra);
            }
            d
        };
        let resource = claims
            .as_ref()
            .and_then(|c| claim_text(c, "jti"))
            .map_or_else(|| "unverified".to_owned(), |j| jwt::cut(&j));
        let event = match &checked {
            Ok((caller, grants)) => AuditEvent::success(
                audit::OIDC_TOKEN_ACCEPTED,
                caller.token_id.clone(),
                "oidc_token",
                resource,
                details(serde_json::json!({
                    "scopes": caller
                        .scopes
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(","),
                    "grants": grants,
                })),
            ),
            Err(err) => AuditEvent::error(
                audit::OIDC_TOKEN_REFUSED,
                err.actor().unwrap_or(peer).to_owned(),
                "oidc_token",
                resource,
                details(serde_json::json!({})),
                err.to_string(),
            ),
        };
        if let Err(err) = store.audit(&event, now).await {
            tracing::error!(%err, "could not record audit event");
        }
        checked.map(|(caller, _)| caller)
    }

    /// The checks, and the claims once the signature proved them.
    async fn check(
        &self,
        token: &str,
        now: i64,
    ) -> (
        Result<(Caller, Vec<usize>), OidcError>,
        Option<Map<String, Value>>,
    ) {
        if token.len() > MAX_TOKEN {
            return (Err(OidcError::TooLong(token.len())), None);
        }
        let unverified = match jwt::parse(token) {
            Ok(u) => u,
            Err(e) => return (Err(e), None),
        };
        let key = match self.keys.key(&unverified.kid).await {
            Ok(k) => k,
            Err(e) => return (Err(e), None),
        };
        let claims = match unverified.verify(&key) {
            Ok(c) => c,
            Err(e) => return (Err(e), None),
        };
        let expect = jwt::Expect {
            issuer: &self.config.issuer,
            audience: &self.config.audience,
            leeway: i64::try_from(self.config.leeway.as_secs()).unwrap_or(0),
            now,
        };
        if let Err(e) = jwt::check_registered(&claims, expect) {
            return (Err(e), Some(claims));
        }
        let repository = claim_text(&claims, "repository").unwrap_or_else(|| "?".to_owned());
        let actor = format!("oidc:{}", jwt::cut(&repository));
        let decided = decide(&self.config.grants, &claims);
        let result = match decided {
            Ok((scopes, grants)) => {
                let run = claim_text(&claims, "run_id")
                    .map(|r| format!(":run/{}", jwt::cut(&r)))
                    .unwrap_or_default();
                Ok((
                    Caller {
                        token_id: format!("{actor}{run}"),
                        scopes,
                    },
                    grants,
                ))
            }
            Err(why) => Err(OidcError::NoGrant { actor, why }),
        };
        (result, Some(claims))
    }
}

/// The PEM certificates of `path`.
fn load_roots(path: &Path) -> Result<rustls::RootCertStore, CaFileError> {
    slipway_proto::client::load_ca(path).map_err(|e| CaFileError(e.to_string()))
}

/// True if `token` has the shape of a JWT (`eyJ….….…`) rather than an API
/// token (`slwa1.…`): which checker a bearer token goes to.
pub fn looks_like_jwt(token: &str) -> bool {
    token.starts_with("eyJ") && token.bytes().filter(|b| *b == b'.').count() == 2
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Result<OidcConfig, String> {
        #[derive(Deserialize)]
        struct File {
            oidc: RawOidc,
        }
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        OidcConfig::new(file.oidc)
    }

    const GOOD: &str = r#"
[oidc]
audience = "https://ctl.example.com"
[[oidc.grant]]
app = "web"
repository_id = 123
repository_owner_id = "456"
ref = ["refs/heads/main", "refs/tags/v1"]
environment = "production"
"#;

    fn claims(pairs: &[(&str, &str)]) -> Map<String, Value> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Value::String((*v).to_owned())))
            .collect()
    }

    #[test]
    fn config_defaults_and_checks() {
        let c = config(GOOD).unwrap();
        assert_eq!(c.issuer, DEFAULT_ISSUER);
        assert_eq!(c.jwks_url, format!("{DEFAULT_ISSUER}/.well-known/jwks"));
        assert_eq!(c.leeway, DEFAULT_LEEWAY);
        assert_eq!(c.grants[0].scopes, [Scope::Deploy("web".into())]);
        assert_eq!(
            c.grants[0].conditions[0],
            (Claim::RepositoryId, vec!["123".to_owned()])
        );
        for (text, want) in [
            ("[oidc]\nissuer = \"http://x\"\n[[oidc.grant]]\napp = \"w\"\nrepository_id = 1", "oidc.issuer"),
            ("[oidc]\n", "no [[oidc.grant]]"),
            ("[oidc]\n[[oidc.grant]]\nrepository_id = 1", "oidc.grant[0].app"),
            ("[oidc]\n[[oidc.grant]]\napp = \"w\"\nref = \"refs/heads/main\"", "needs repository_id"),
            ("[oidc]\n[[oidc.grant]]\napp = \"w\"\nrepository_id = \"octo/app\"", "oidc.grant[0].repository_id"),
            ("[oidc]\n[[oidc.grant]]\napp = \"w\"\nrepository_id = 1\nscopes = [\"agent-upgrade\"]", "oidc.grant[0].scopes"),
            ("[oidc]\n[[oidc.grant]]\napp = \"w\"\nrepository_id = 1\nscopes = [\"deploy:other\"]", "oidc.grant[0].scopes"),
            ("[oidc]\nleeway = \"1h\"\n[[oidc.grant]]\napp = \"w\"\nrepository_id = 1", "oidc.leeway"),
            ("[oidc]\n[[oidc.grant]]\napp = \"w\"\nrepository_id = 1\n[[oidc.grant]]\napp = \"../x\"\nrepository_id = 1", "oidc.grant[1].app"),
            ("[oidc]\n[[oidc.grant]]\napp = \"w\"\nrepository_id = []", "oidc.grant[0].repository_id"),
            ("[oidc]\n[[oidc.grant]]\napp = \"w\"\nrepo_id = 1", "repo_id"),
        ] {
            let err = config(text).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn a_token_gets_the_scopes_of_the_grants_it_matches_or_hears_which_claim_failed() {
        let mut c = config(GOOD).unwrap();
        c.grants.push(Grant {
            app: "api".into(),
            scopes: vec![Scope::Read],
            conditions: vec![(Claim::RepositoryOwnerId, vec!["456".into()])],
        });
        let good = [
            ("repository", "octo/web"),
            ("repository_id", "123"),
            ("repository_owner_id", "456"),
            ("ref", "refs/tags/v1"),
            ("environment", "production"),
        ];
        let (scopes, grants) = decide(&c.grants, &claims(&good)).unwrap();
        assert_eq!(scopes, [Scope::Deploy("web".into()), Scope::Read]);
        assert_eq!(grants, [0, 1]);
        // The name is right, the number is not: a re-registered repository.
        let mut other = good;
        other[1] = ("repository_id", "999");
        other[2] = ("repository_owner_id", "777");
        let err = decide(&c.grants, &claims(&other)).unwrap_err();
        assert!(
            err.contains("grant[0] (app web): repository_id is \"999\", the grant wants \"123\""),
            "{err}"
        );
        assert!(
            err.contains("grant[1] (app api): repository_owner_id is \"777\""),
            "{err}"
        );
        let mut branch = good;
        branch[3] = ("ref", "refs/heads/feature");
        let (scopes, _) = decide(&c.grants, &claims(&branch)).unwrap();
        assert_eq!(
            scopes,
            [Scope::Read],
            "only the grant without a ref condition"
        );
        let no_env = &good[..4];
        c.grants.pop();
        let err = decide(&c.grants, &claims(no_env)).unwrap_err();
        assert!(err.contains("environment is absent"), "{err}");
        // Numbers as claims are compared as their text.
        let mut numeric = claims(&good);
        numeric.insert("repository_id".into(), serde_json::json!(123));
        assert!(decide(&c.grants, &numeric).is_ok());
    }

    #[test]
    fn bearer_kinds() {
        assert!(looks_like_jwt("eyJhbGciOi.eyJzdWIi.c2ln"));
        assert!(!looks_like_jwt("slwa1.0123.abcd"));
        assert!(!looks_like_jwt("eyJ.a"));
    }
}
