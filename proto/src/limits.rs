//! What a peer may send: the name rules and a limit for every string and
//! collection of every request, checked by whoever receives it.
//!
//! Both sides share these so that a well-behaved sender stays within what
//! the receiver accepts (the agent cuts its own long messages with
//! [`truncate`]), while the receiver never takes the sender's word for it:
//! the controller calls [`Validate::validate`] on every request and agent
//! message, the agent on every command. A failed check names the field, the
//! rule or limit, and the offending value as [`shown`] (escaped and cut, so
//! a hostile value cannot forge a log line or blow up an error header).

use std::collections::HashMap;
use std::fmt;

use crate::v1::{
    agent_message, controller_message, selector, AgentMessage, AgentUpgrade, AgentUpgradeRequest,
    AppStatus, ChangeEnvRequest, CommandResult, ControllerMessage, DeployRequest, EnrollRequest,
    EnvHistoryRequest, FetchArtifactRequest, FleetStatusRequest, GetEnvRequest, Heartbeat, Hello,
    ListEnvRequest, NodeEvent, NodeEventKind, NodeMetrics, Progress, PruneRequest, PublicAddress,
    RenewRequest, RestartRequest, RollbackRequest, Selector, StartRequest, StopRequest,
    WatchDeploymentRequest,
};

/// A trust bundle (PEM CA certificates): a few KiB each.
pub const MAX_TRUST_BUNDLE: usize = 64 * 1024;
/// CAs in a trust bundle: two during a rotation.
pub const MAX_TRUSTED_CAS: usize = 4;
/// Node names: a droplet's host name fits (DNS names are at most 253).
pub const MAX_NODE_NAME: usize = 253;
/// App names: the agent makes each a directory and a systemd-style unit.
pub const MAX_APP_NAME: usize = 64;
/// Release ids: a directory name under `releases/`.
pub const MAX_RELEASE_ID: usize = 128;
/// Labels per node: tags such as `env:production`, `product:<id>`.
pub const MAX_LABELS: usize = 64;
/// A label's key.
pub const MAX_LABEL_KEY: usize = 63;
/// A label's value.
pub const MAX_LABEL_VALUE: usize = 255;
/// A git commit id: 40 hex (SHA-1) or 64 hex (SHA-256) digits, or a prefix.
pub const MAX_GIT_SHA: usize = 64;
/// Shortest git commit prefix accepted (git's own default abbreviation).
pub const MIN_GIT_SHA: usize = 7;
/// Agent version strings (`0.1.0`, `0.2.0-rc.1+abcdef`).
pub const MAX_VERSION: usize = 64;
/// Human-readable messages (results, progress, refusals).
pub const MAX_MESSAGE: usize = 16 * 1024;
/// A health verdict with the failing check's output.
pub const MAX_HEALTH: usize = 4 * 1024;
/// Short words: progress steps, release states.
pub const MAX_WORD: usize = 64;
/// Why a release is failed or bad (`ReleaseInfo.reason`): one per release
/// of every heartbeat, so short.
pub const MAX_RELEASE_REASON: usize = 512;
/// An app's public address (`PublicAddress.address`): the agent's own
/// limit on `listen`.
pub const MAX_PUBLIC_ADDRESS: usize = 256;
/// `PublicAddress.forwarding`, bytes.
pub const MAX_FORWARDING: usize = 256;
/// Open connections a front reports as draining: far more than one
/// process holds file descriptors for.
pub const MAX_DRAINING: u64 = 1 << 32;
/// The ways an app's new connections reach a release
/// (`PublicAddress.mode`), and whether each has an address of its own.
pub const PUBLIC_MODES: [(&str, bool); 4] = [
    ("socket_handover", true),
    ("agent_proxy", true),
    ("pm2_cluster", false),
    ("none", false),
];
/// Who ran a node-local command (`NodeEvent.actor`).
pub const MAX_ACTOR: usize = 128;
/// Command ids the controller makes (`<deployment>-<node>`).
pub const MAX_COMMAND_ID: usize = 128;
/// Node ids (`n-` and 16 hex digits).
pub const MAX_NODE_ID: usize = 64;
/// Apps one node reports.
pub const MAX_APPS: usize = 256;
/// Releases one app reports (keep is at most 1000, plus failed ones).
pub const MAX_RELEASES: usize = 2048;
/// Disks (mounts) one node reports.
pub const MAX_DISKS: usize = 256;
/// A mount point's path.
pub const MAX_MOUNT: usize = 4096;
/// A PEM certificate signing request.
pub const MAX_CSR_PEM: usize = 16 * 1024;
/// A join token (`slw1.<id>.<secret>.<ca-sha256>` is about 150 characters).
pub const MAX_JOIN_TOKEN: usize = 512;
/// Artifact URLs.
pub const MAX_URL: usize = 2048;
/// A label selector (`key:value`).
pub const MAX_TAG: usize = MAX_LABEL_KEY + 1 + MAX_LABEL_VALUE;
/// Fewest seconds an upgraded agent gets to reconnect: a start and a TLS
/// handshake on a slow droplet.
pub const MIN_COMMIT_DEADLINE_SECS: u32 = 5;
/// Most seconds a node may wait for its upgraded agent before the old one
/// comes back.
pub const MAX_COMMIT_DEADLINE_SECS: u32 = 3600;
/// Largest agent binary an upgrade accepts (a static agent is ~20 MB).
pub const MAX_AGENT_BINARY: u64 = 512 * 1024 * 1024;
/// Longest environment variable name.
pub const MAX_ENV_KEY: usize = 128;
/// Longest environment variable value (a PEM key or a JSON credential fits).
pub const MAX_ENV_VALUE: usize = 64 * 1024;
/// Most variables one env change names.
pub const MAX_ENV_VARS: usize = 1024;
/// Largest `.env` text a SetEnv carries.
pub const MAX_ENV_CONTENT: usize = 256 * 1024;
/// Characters of a refused value shown back in an error or a log line.
const SHOWN_CHARS: usize = 64;

/// One field of a message broke its rule or limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Where, e.g. `heartbeat.apps[3].releases[0].id`.
    pub field: String,
    /// What is wrong, with the limit or rule.
    pub problem: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

impl std::error::Error for FieldError {}

impl FieldError {
    /// An error for `field`.
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            problem: problem.into(),
        }
    }

    /// The same error for the field as part of `outer` (`outer.field`).
    #[must_use]
    pub fn within(mut self, outer: &str) -> Self {
        self.field = format!("{outer}.{}", self.field);
        self
    }
}

/// A value from outside as it may be printed: control characters escaped,
/// cut after a few dozen characters with the full length said.
#[derive(Debug, Clone, Copy)]
pub struct Shown<'a>(&'a str);

/// See [`Shown`].
pub fn shown(value: &str) -> Shown<'_> {
    Shown(value)
}

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"")?;
        for c in self.0.chars().take(SHOWN_CHARS) {
            write!(f, "{}", c.escape_debug())?;
        }
        f.write_str("\"")?;
        let chars = self.0.chars().count();
        if chars > SHOWN_CHARS {
            write!(f, "… ({} bytes)", self.0.len())?;
        }
        Ok(())
    }
}

/// `value` cut to at most `max` bytes at a character boundary, for a
/// sender that must stay within a limit (its own long message).
pub fn truncate(value: &str, max: usize) -> &str {
    if value.len() <= max {
        return value;
    }
    let mut end = max;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    &value[..end]
}

/// Text printed into a table cell or a one-line log: control characters
/// (newlines, escapes) escaped so a value cannot split a row or forge a
/// line, and cut to `max` characters with `…`.
pub fn one_line(value: &str, max: usize) -> String {
    let mut out = String::with_capacity(value.len().min(max + 8));
    for (count, c) in value.chars().enumerate() {
        if count >= max {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

fn too_long(field: &str, value: &str, max: usize) -> FieldError {
    FieldError::new(
        field,
        format!(
            "{} bytes is over the limit of {max} ({})",
            value.len(),
            shown(value)
        ),
    )
}

/// At most `max` bytes.
pub fn check_len(field: &str, value: &str, max: usize) -> Result<(), FieldError> {
    if value.len() > max {
        return Err(too_long(field, value, max));
    }
    Ok(())
}

/// At most `max` bytes and no control characters (one line).
pub fn check_line(field: &str, value: &str, max: usize) -> Result<(), FieldError> {
    check_len(field, value, max)?;
    if value.chars().any(char::is_control) {
        return Err(FieldError::new(
            field,
            format!("{} contains control characters", shown(value)),
        ));
    }
    Ok(())
}

/// A command id: one line of 1 to MAX_COMMAND_ID bytes (every command the
/// controller sends has one, and every report names the command it is for).
pub fn check_command_id(field: &str, value: &str) -> Result<(), FieldError> {
    if value.is_empty() {
        return Err(FieldError::new(field, "is empty"));
    }
    check_line(field, value, MAX_COMMAND_ID)
}

/// At most `max` items.
pub fn check_count(field: &str, count: usize, max: usize) -> Result<(), FieldError> {
    if count > max {
        return Err(FieldError::new(
            field,
            format!("{count} entries is over the limit of {max}"),
        ));
    }
    Ok(())
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// A name: 1 to `max` of letters, digits, `. _ -`, starting with a letter
/// or digit.
fn check_name(field: &str, what: &str, value: &str, max: usize) -> Result<(), FieldError> {
    let valid = !value.is_empty()
        && value.len() <= max
        && value
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && value.chars().all(is_name_char);
    if valid {
        return Ok(());
    }
    Err(FieldError::new(
        field,
        format!(
            "invalid {what} {}: 1 to {max} letters, digits, . _ - starting with a letter or digit",
            shown(value)
        ),
    ))
}

/// Node names (the same rule is checked at enrollment and in selectors).
pub fn check_node_name(field: &str, name: &str) -> Result<(), FieldError> {
    check_name(field, "node name", name, MAX_NODE_NAME)
}

/// App names, as the agent's config allows them: 1 to 64 letters, digits,
/// `. _ -`, not starting with `.` (the agent makes each a directory).
pub fn check_app_name(field: &str, app: &str) -> Result<(), FieldError> {
    if is_app_name(app) {
        return Ok(());
    }
    Err(FieldError::new(
        field,
        format!(
            "invalid app name {}: 1 to {MAX_APP_NAME} letters, digits, . _ - not starting with .",
            shown(app)
        ),
    ))
}

/// True if `app` is a usable app name (see [`check_app_name`]).
pub fn is_app_name(app: &str) -> bool {
    !app.is_empty()
        && app.len() <= MAX_APP_NAME
        && !app.starts_with('.')
        && app.chars().all(is_name_char)
}

/// Release ids: a directory under `releases/`.
pub fn check_release_id(field: &str, id: &str) -> Result<(), FieldError> {
    check_name(field, "release id", id, MAX_RELEASE_ID)
}

/// Empty, or a release id.
fn check_optional_release_id(field: &str, id: &str) -> Result<(), FieldError> {
    if id.is_empty() {
        return Ok(());
    }
    check_release_id(field, id)
}

/// An agent version as `--version` prints it after the program name:
/// 1–64 of `A-Z a-z 0-9 . + - _`, starting with a letter or digit.
pub fn check_version(field: &str, version: &str) -> Result<(), FieldError> {
    let ok = !version.is_empty()
        && version.len() <= MAX_VERSION
        && version.starts_with(|c: char| c.is_ascii_alphanumeric())
        && version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '+' | '-' | '_'));
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!(
                "{} is not a version (1-{MAX_VERSION} of A-Z a-z 0-9 . + - _, starting with a letter or digit)",
                shown(version)
            ),
        ))
    }
}

/// An upgrade's commit deadline within
/// [`MIN_COMMIT_DEADLINE_SECS`]..=[`MAX_COMMIT_DEADLINE_SECS`].
pub fn check_commit_deadline(field: &str, secs: u32) -> Result<(), FieldError> {
    if (MIN_COMMIT_DEADLINE_SECS..=MAX_COMMIT_DEADLINE_SECS).contains(&secs) {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!("{secs} s is out of range ({MIN_COMMIT_DEADLINE_SECS}..={MAX_COMMIT_DEADLINE_SECS})"),
        ))
    }
}

/// A deployment id: `d-` and 16 hex digits (as the controller makes them,
/// and as the HTTP API's `/api/v1/deployments/{id}` accepts them).
pub fn check_deployment_id(field: &str, id: &str) -> Result<(), FieldError> {
    let valid =
        id.len() == 18 && id.starts_with("d-") && id.bytes().skip(2).all(|b| b.is_ascii_hexdigit());
    if valid {
        return Ok(());
    }
    Err(FieldError::new(
        field,
        format!("deployment id {} is not d- and 16 hex digits", shown(id)),
    ))
}

/// A sha256 as stored: 64 lowercase hex digits.
pub fn check_sha256(field: &str, digest: &str) -> Result<(), FieldError> {
    let valid = digest.len() == 64
        && digest
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if valid {
        return Ok(());
    }
    Err(FieldError::new(
        field,
        format!(
            "{} is not a sha256 (64 lowercase hex digits)",
            shown(digest)
        ),
    ))
}

/// Empty, or a git commit id: 7 to 64 hex digits.
pub fn check_git_sha(field: &str, sha: &str) -> Result<(), FieldError> {
    if sha.is_empty() {
        return Ok(());
    }
    let valid = (MIN_GIT_SHA..=MAX_GIT_SHA).contains(&sha.len())
        && sha.bytes().all(|b| b.is_ascii_hexdigit());
    if valid {
        return Ok(());
    }
    Err(FieldError::new(
        field,
        format!(
            "{} is not a git commit id ({MIN_GIT_SHA} to {MAX_GIT_SHA} hex digits)",
            shown(sha)
        ),
    ))
}

/// A label key: 1 to 63 letters, digits, `. _ - /`.
pub fn check_label_key(field: &str, key: &str) -> Result<(), FieldError> {
    let valid = !key.is_empty()
        && key.len() <= MAX_LABEL_KEY
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'));
    if valid {
        return Ok(());
    }
    Err(FieldError::new(
        field,
        format!(
            "invalid label key {}: 1 to {MAX_LABEL_KEY} letters, digits, . _ - /",
            shown(key)
        ),
    ))
}

/// A label value: at most 255 bytes, no whitespace or control characters.
pub fn check_label_value(field: &str, value: &str) -> Result<(), FieldError> {
    check_len(field, value, MAX_LABEL_VALUE)?;
    if value.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(FieldError::new(
            field,
            format!(
                "label value {} contains whitespace or control characters",
                shown(value)
            ),
        ));
    }
    Ok(())
}

/// Labels as a node reports them: at most [`MAX_LABELS`], each key and
/// value within its rule.
pub fn check_labels(field: &str, labels: &HashMap<String, String>) -> Result<(), FieldError> {
    check_count(field, labels.len(), MAX_LABELS)?;
    for (key, value) in labels {
        check_label_key(&format!("{field}[{}]", shown(key)), key)?;
        check_label_value(&format!("{field}[{key}]"), value)?;
    }
    Ok(())
}

/// A tag (`key:value` or a bare `key`), as join tokens carry and selectors
/// match.
pub fn check_tag(field: &str, tag: &str) -> Result<(), FieldError> {
    check_len(field, tag, MAX_TAG)?;
    let (key, value) = tag.split_once(':').unwrap_or((tag, ""));
    check_label_key(field, key)?;
    check_label_value(field, value)
}

/// A node selector: a node by id or name, or a tag.
pub fn check_selector(field: &str, selector: Option<&Selector>) -> Result<(), FieldError> {
    match selector.and_then(|s| s.target.as_ref()) {
        None => Ok(()),
        Some(selector::Target::Node(node)) => check_node_name(&format!("{field}.node"), node),
        Some(selector::Target::Tag(tag)) => check_tag(&format!("{field}.tag"), tag),
    }
}

/// A message's fields within their rules and limits.
pub trait Validate {
    /// The first field (in declaration order) that breaks its rule.
    fn validate(&self) -> Result<(), FieldError>;
}

impl Validate for EnrollRequest {
    fn validate(&self) -> Result<(), FieldError> {
        check_len("join_token", &self.join_token, MAX_JOIN_TOKEN)?;
        check_node_name("node_name", &self.node_name)?;
        check_len("csr_pem", &self.csr_pem, MAX_CSR_PEM)?;
        check_line("agent_version", &self.agent_version, MAX_VERSION)?;
        check_labels("labels", &self.labels)
    }
}

impl Validate for RenewRequest {
    fn validate(&self) -> Result<(), FieldError> {
        check_len("csr_pem", &self.csr_pem, MAX_CSR_PEM)
    }
}

impl Validate for FetchArtifactRequest {
    fn validate(&self) -> Result<(), FieldError> {
        check_sha256("sha256", &self.sha256)?;
        check_command_id("command_id", &self.command_id)
    }
}

fn check_apps(field: &str, apps: &[AppStatus]) -> Result<(), FieldError> {
    check_count(field, apps.len(), MAX_APPS)?;
    for (i, app) in apps.iter().enumerate() {
        let at = format!("{field}[{i}]");
        check_app_name(&format!("{at}.app"), &app.app)?;
        check_optional_release_id(&format!("{at}.current_release"), &app.current_release)?;
        check_len(&format!("{at}.health"), &app.health, MAX_HEALTH)?;
        check_count(&format!("{at}.releases"), app.releases.len(), MAX_RELEASES)?;
        for (j, release) in app.releases.iter().enumerate() {
            let at = format!("{at}.releases[{j}]");
            check_release_id(&format!("{at}.id"), &release.id)?;
            check_line(&format!("{at}.status"), &release.status, MAX_WORD)?;
            if !release.artifact_sha256.is_empty() {
                check_sha256(&format!("{at}.artifact_sha256"), &release.artifact_sha256)?;
            }
            check_len(&format!("{at}.reason"), &release.reason, MAX_RELEASE_REASON)?;
        }
        if let Some(public) = &app.public {
            check_public(&format!("{at}.public"), public)?;
        }
    }
    Ok(())
}

/// An app's public address as an agent claims it: a known mode; with a
/// mode that holds an address, an IP and port or an absolute unix socket
/// path of printable characters; a release id; a loopback backend.
pub fn check_public(field: &str, p: &PublicAddress) -> Result<(), FieldError> {
    let Some((_, held)) = PUBLIC_MODES.iter().find(|(m, _)| *m == p.mode) else {
        let known: Vec<&str> = PUBLIC_MODES.iter().map(|(m, _)| *m).collect();
        return Err(FieldError::new(
            format!("{field}.mode"),
            format!("{} is not one of {}", shown(&p.mode), known.join(", ")),
        ));
    };
    check_line(
        &format!("{field}.forwarding"),
        &p.forwarding,
        MAX_FORWARDING,
    )?;
    let at = format!("{field}.address");
    check_line(&at, &p.address, MAX_PUBLIC_ADDRESS)?;
    if *held {
        let unix = p.address.starts_with('/')
            && !p.address.split('/').any(|c| c == "..")
            && !p.address.ends_with('/');
        if !unix && p.address.parse::<std::net::SocketAddr>().is_err() {
            return Err(FieldError::new(
                at,
                format!(
                    "{} is neither an IP address and port nor an absolute unix socket path",
                    shown(&p.address)
                ),
            ));
        }
    } else if !p.address.is_empty() || !p.release.is_empty() || !p.backend.is_empty() {
        return Err(FieldError::new(
            field,
            format!(
                "mode {} holds no public address, but address {}, release {} or backend {} is set",
                p.mode,
                shown(&p.address),
                shown(&p.release),
                shown(&p.backend)
            ),
        ));
    }
    check_optional_release_id(&format!("{field}.release"), &p.release)?;
    if !p.backend.is_empty() {
        let ok = p
            .backend
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|a| a.ip().is_loopback());
        if !ok {
            return Err(FieldError::new(
                format!("{field}.backend"),
                format!("{} is not a loopback address and port", shown(&p.backend)),
            ));
        }
    }
    if p.draining > MAX_DRAINING {
        return Err(FieldError::new(
            format!("{field}.draining"),
            format!("{} is over the limit of {MAX_DRAINING}", p.draining),
        ));
    }
    Ok(())
}

fn check_metrics(field: &str, metrics: &NodeMetrics) -> Result<(), FieldError> {
    for (name, value) in [
        ("cpu_percent", metrics.cpu_percent),
        ("load1", metrics.load1),
        ("load5", metrics.load5),
        ("load15", metrics.load15),
    ] {
        if !value.is_finite() || value < 0.0 {
            return Err(FieldError::new(
                format!("{field}.{name}"),
                format!("{value} is not a finite number ≥ 0"),
            ));
        }
    }
    check_count(&format!("{field}.disks"), metrics.disks.len(), MAX_DISKS)?;
    for (i, disk) in metrics.disks.iter().enumerate() {
        check_line(&format!("{field}.disks[{i}].mount"), &disk.mount, MAX_MOUNT)?;
    }
    Ok(())
}

impl Validate for Hello {
    fn validate(&self) -> Result<(), FieldError> {
        check_line("node_id", &self.node_id, MAX_NODE_ID)?;
        check_line("agent_version", &self.agent_version, MAX_VERSION)?;
        if self.droplet_id > MAX_DROPLET_ID {
            return Err(FieldError::new(
                "droplet_id",
                format!("{} is over the limit of {MAX_DROPLET_ID}", self.droplet_id),
            ));
        }
        check_apps("apps", &self.apps)
    }
}

/// Largest droplet id a Hello may carry (2^53 - 1: what JSON numbers and
/// the controller's SQLite integer hold exactly; DO's ids are far below).
pub const MAX_DROPLET_ID: u64 = (1 << 53) - 1;

impl Validate for Heartbeat {
    fn validate(&self) -> Result<(), FieldError> {
        if let Some(metrics) = &self.metrics {
            check_metrics("metrics", metrics)?;
        }
        check_apps("apps", &self.apps)?;
        check_line("agent_version", &self.agent_version, MAX_VERSION)
    }
}

impl Validate for Progress {
    fn validate(&self) -> Result<(), FieldError> {
        check_command_id("command_id", &self.command_id)?;
        check_line("step", &self.step, MAX_WORD)?;
        check_len("message", &self.message, MAX_MESSAGE)
    }
}

impl Validate for CommandResult {
    fn validate(&self) -> Result<(), FieldError> {
        check_command_id("command_id", &self.command_id)?;
        check_optional_release_id("release_id", &self.release_id)?;
        check_len("message", &self.message, MAX_MESSAGE)
    }
}

/// Event ids in one NodeEventAck.
pub const MAX_EVENT_IDS: usize = 256;

impl Validate for NodeEvent {
    fn validate(&self) -> Result<(), FieldError> {
        check_line("event_id", &self.event_id, MAX_COMMAND_ID)?;
        if self.event_id.is_empty() {
            return Err(FieldError::new("event_id", "must not be empty"));
        }
        let local = match NodeEventKind::try_from(self.kind) {
            Ok(
                NodeEventKind::AppRestored
                | NodeEventKind::AppCrashlooping
                | NodeEventKind::AppRolledBack,
            ) => false,
            Ok(NodeEventKind::LocalDeploy | NodeEventKind::LocalRollback) => true,
            _ => {
                return Err(FieldError::new(
                    "kind",
                    format!("{} is not a node event kind", self.kind),
                ))
            }
        };
        check_line("actor", &self.actor, MAX_ACTOR)?;
        if local && self.actor.is_empty() {
            return Err(FieldError::new(
                "actor",
                "is empty (a node-local command names who ran it)",
            ));
        }
        check_app_name("app", &self.app)?;
        check_optional_release_id("release_id", &self.release_id)?;
        check_optional_release_id("from_release_id", &self.from_release_id)?;
        check_len("cause", &self.cause, MAX_MESSAGE)?;
        check_len("outcome", &self.outcome, MAX_MESSAGE)
    }
}

impl Validate for AgentMessage {
    fn validate(&self) -> Result<(), FieldError> {
        match &self.kind {
            None => Ok(()),
            Some(agent_message::Kind::Hello(m)) => m.validate().map_err(|e| e.within("hello")),
            Some(agent_message::Kind::Heartbeat(m)) => {
                m.validate().map_err(|e| e.within("heartbeat"))
            }
            Some(agent_message::Kind::Progress(m)) => {
                m.validate().map_err(|e| e.within("progress"))
            }
            Some(agent_message::Kind::Result(m)) => m.validate().map_err(|e| e.within("result")),
            Some(agent_message::Kind::NodeEvent(m)) => {
                m.validate().map_err(|e| e.within("node_event"))
            }
        }
    }
}

/// The fields of an AgentUpgrade command (the agent checks them before it
/// fetches anything).
fn check_agent_upgrade(u: &AgentUpgrade) -> Result<(), FieldError> {
    check_command_id("command_id", &u.command_id)?;
    check_sha256("sha256", &u.sha256)?;
    if u.size == 0 || u.size > MAX_AGENT_BINARY {
        return Err(FieldError::new(
            "size",
            format!("{} bytes is out of range (1..={MAX_AGENT_BINARY})", u.size),
        ));
    }
    if !u.version.is_empty() {
        check_version("version", &u.version)?;
    }
    check_commit_deadline("commit_deadline_secs", u.commit_deadline_secs)
}

/// True if `key` is a usable environment variable name: letters, digits
/// and `_`, not starting with a digit, at most [`MAX_ENV_KEY`] bytes.
pub fn is_env_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= MAX_ENV_KEY
        && !key.as_bytes()[0].is_ascii_digit()
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// An environment variable name (see [`is_env_key`]); the message shows the
/// name, which is never secret.
pub fn check_env_key(field: &str, key: &str) -> Result<(), FieldError> {
    if is_env_key(key) {
        return Ok(());
    }
    Err(FieldError::new(
        field,
        format!(
            "{} is not a variable name (letters, digits and _, not starting with a digit, at most {MAX_ENV_KEY} bytes)",
            shown(key)
        ),
    ))
}

/// An environment variable value: at most [`MAX_ENV_VALUE`] bytes, no NUL
/// or carriage return. The message never shows the value.
pub fn check_env_value(field: &str, value: &str) -> Result<(), FieldError> {
    if value.len() > MAX_ENV_VALUE {
        return Err(FieldError::new(
            field,
            format!("value is {} bytes; at most {MAX_ENV_VALUE}", value.len()),
        ));
    }
    if value.contains(['\0', '\r']) {
        return Err(FieldError::new(
            field,
            "value holds a NUL or carriage return character",
        ));
    }
    Ok(())
}

impl Validate for ControllerMessage {
    fn validate(&self) -> Result<(), FieldError> {
        use controller_message::Kind;
        let command = |id: &str, app: &str| {
            check_command_id("command_id", id)?;
            check_app_name("app", app)
        };
        match &self.kind {
            None | Some(Kind::StatusRequest(_) | Kind::ArtifactChunk(_) | Kind::Welcome(_)) => {
                Ok(())
            }
            // A closure, so each `?` ends it and not `validate`: every
            // field's error is named within `deploy`.
            Some(Kind::Deploy(d)) => (|| {
                command(&d.command_id, &d.app)?;
                check_release_id("release_id", &d.release_id)?;
                // The agent normalizes the case of a digest it is given.
                check_sha256("artifact_sha256", &d.artifact_sha256.to_ascii_lowercase())?;
                check_len("artifact_url", &d.artifact_url, MAX_URL)?;
                check_git_sha("git_sha", &d.git_sha)
            })()
            .map_err(|e: FieldError| e.within("deploy")),
            Some(Kind::Rollback(r)) => command(&r.command_id, &r.app)
                .and_then(|()| check_optional_release_id("to_release_id", &r.to_release_id))
                .map_err(|e| e.within("rollback")),
            Some(Kind::Prune(p)) => command(&p.command_id, &p.app).map_err(|e| e.within("prune")),
            Some(Kind::Restart(r)) => {
                command(&r.command_id, &r.app).map_err(|e| e.within("restart"))
            }
            Some(Kind::StopApp(r)) => {
                command(&r.command_id, &r.app).map_err(|e| e.within("stop_app"))
            }
            Some(Kind::StartApp(r)) => {
                command(&r.command_id, &r.app).map_err(|e| e.within("start_app"))
            }
            Some(Kind::NodeEventAck(a)) => (|| {
                check_count("event_ids", a.event_ids.len(), MAX_EVENT_IDS)?;
                for (i, id) in a.event_ids.iter().enumerate() {
                    check_line(&format!("event_ids[{i}]"), id, MAX_COMMAND_ID)?;
                }
                Ok(())
            })()
            .map_err(|e: FieldError| e.within("node_event_ack")),
            Some(Kind::AgentUpgrade(u)) => {
                check_agent_upgrade(u).map_err(|e| e.within("agent_upgrade"))
            }
            Some(Kind::TrustBundle(b)) => (|| {
                check_len("ca_pem", &b.ca_pem, MAX_TRUST_BUNDLE)?;
                let blocks = b.ca_pem.matches("-----BEGIN CERTIFICATE-----").count();
                if blocks == 0 || blocks > MAX_TRUSTED_CAS {
                    return Err(FieldError::new(
                        "ca_pem",
                        format!("holds {blocks} certificates; 1 to {MAX_TRUSTED_CAS} expected"),
                    ));
                }
                check_sha256("signing_ca_sha256", &b.signing_ca_sha256)
            })()
            .map_err(|e: FieldError| e.within("trust_bundle")),
            Some(Kind::SetEnv(e)) => (|| {
                command(&e.command_id, &e.app)?;
                if e.version == 0 {
                    return Err(FieldError::new("version", "must be 1 or more"));
                }
                if e.content.len() > MAX_ENV_CONTENT {
                    return Err(FieldError::new(
                        "content",
                        format!("{} bytes; at most {MAX_ENV_CONTENT}", e.content.len()),
                    ));
                }
                if e.content.contains('\0') {
                    return Err(FieldError::new("content", "holds a NUL character"));
                }
                check_sha256("sha256", &e.sha256)
            })()
            .map_err(|err: FieldError| err.within("set_env")),
        }
    }
}

impl Validate for ChangeEnvRequest {
    fn validate(&self) -> Result<(), FieldError> {
        check_app_name("app", &self.app)?;
        check_count("set", self.set.len(), MAX_ENV_VARS)?;
        check_count("unset", self.unset.len(), MAX_ENV_VARS)?;
        for (i, var) in self.set.iter().enumerate() {
            check_env_key(&format!("set[{i}].key"), &var.key)?;
            check_env_value(&format!("set[{i}].value"), &var.value)?;
        }
        for (i, key) in self.unset.iter().enumerate() {
            check_env_key(&format!("unset[{i}]"), key)?;
        }
        if self.replace && !self.unset.is_empty() {
            return Err(FieldError::new(
                "unset",
                "must be empty when replace (import) is set",
            ));
        }
        if self.rollback_to != 0 && (self.replace || !self.set.is_empty() || !self.unset.is_empty())
        {
            return Err(FieldError::new(
                "rollback_to",
                "a rollback names no variables (set, unset and replace must be empty)",
            ));
        }
        if self.rollback_to == 0 && !self.replace && self.set.is_empty() && self.unset.is_empty() {
            return Err(FieldError::new(
                "set",
                "nothing to change: no variable to set or unset",
            ));
        }
        if self.rollback_as_of && self.rollback_to == 0 {
            return Err(FieldError::new(
                "rollback_as_of",
                "needs rollback_to (the version to go back to)",
            ));
        }
        check_selector("selector", self.selector.as_ref())?;
        check_env_layer("tag", &self.tag)
    }
}

/// An env layer's tag: empty (the base) or a tag as selectors take it.
pub fn check_env_layer(field: &str, tag: &str) -> Result<(), FieldError> {
    if tag.is_empty() {
        return Ok(());
    }
    check_tag(field, tag)
}

impl Validate for ListEnvRequest {
    fn validate(&self) -> Result<(), FieldError> {
        check_app_name("app", &self.app)?;
        check_env_layer("tag", &self.tag)
    }
}

impl Validate for EnvHistoryRequest {
    fn validate(&self) -> Result<(), FieldError> {
        check_app_name("app", &self.app)?;
        check_env_layer("tag", &self.tag)
    }
}

impl Validate for GetEnvRequest {
    fn validate(&self) -> Result<(), FieldError> {
        check_app_name("app", &self.app)?;
        check_env_key("key", &self.key)?;
        check_env_layer("tag", &self.tag)
    }
}

impl Validate for DeployRequest {
    fn validate(&self) -> Result<(), FieldError> {
        check_app_name("app", &self.app)?;
        check_sha256("sha256", &self.sha256)?;
        check_optional_release_id("release_id", &self.release_id)?;
        check_selector("selector", self.selector.as_ref())?;
        check_git_sha("git_sha", &self.git_sha)?;
        check_len("artifact_url", &self.artifact_url, MAX_URL)
    }
}

impl Validate for RollbackRequest {
    fn validate(&self) -> Result<(), FieldError> {
        check_app_name("app", &self.app)?;
        check_optional_release_id("to_release_id", &self.to_release_id)?;
        check_selector("selector", self.selector.as_ref())
    }
}

impl Validate for AgentUpgradeRequest {
    fn validate(&self) -> Result<(), FieldError> {
        check_sha256("sha256", &self.sha256)?;
        if !self.version.is_empty() {
            check_version("version", &self.version)?;
        }
        check_selector("selector", self.selector.as_ref())?;
        if self.commit_deadline_secs != 0 {
            check_commit_deadline("commit_deadline_secs", self.commit_deadline_secs)?;
        }
        Ok(())
    }
}

impl Validate for RestartRequest {
    fn validate(&self) -> Result<(), FieldError> {
        check_app_name("app", &self.app)?;
        check_selector("selector", self.selector.as_ref())
    }
}

impl Validate for StopRequest {
    fn validate(&self) -> Result<(), FieldError> {
        check_app_name("app", &self.app)?;
        check_selector("selector", self.selector.as_ref())
    }
}

impl Validate for StartRequest {
    fn validate(&self) -> Result<(), FieldError> {
        check_app_name("app", &self.app)?;
        check_selector("selector", self.selector.as_ref())
    }
}

impl Validate for PruneRequest {
    fn validate(&self) -> Result<(), FieldError> {
        check_app_name("app", &self.app)?;
        check_selector("selector", self.selector.as_ref())
    }
}

impl Validate for WatchDeploymentRequest {
    fn validate(&self) -> Result<(), FieldError> {
        check_deployment_id("deployment_id", &self.deployment_id)
    }
}

impl Validate for FleetStatusRequest {
    fn validate(&self) -> Result<(), FieldError> {
        if self.app.is_empty() {
            return Ok(());
        }
        check_app_name("app", &self.app)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watched_deployment_ids_are_d_and_16_hex_digits() {
        let watch = |id: &str| {
            WatchDeploymentRequest {
                deployment_id: id.to_owned(),
            }
            .validate()
        };
        assert_eq!(watch("d-0123456789abcdef"), Ok(()));
        for bad in [
            "",
            "d-0123456789abcde",
            "d-0123456789abcdef0",
            "x-0123456789abcdef",
            "d-0123456789abcdeg",
            "d-0123456789abcd\u{e9}",
            "../../etc/passwd",
        ] {
            let err = watch(bad).unwrap_err();
            assert_eq!(err.field, "deployment_id", "{bad:?}");
            assert!(err.problem.contains("not d- and 16 hex digits"), "{err}");
        }
    }

    #[test]
    fn env_layers_take_tags_with_their_limits() {
        let change = |tag: &str| ChangeEnvRequest {
            app: "web".to_owned(),
            unset: vec!["K".to_owned()],
            tag: tag.to_owned(),
            ..ChangeEnvRequest::default()
        };
        assert!(change("").validate().is_ok());
        assert!(change("env:staging").validate().is_ok());
        assert!(change("role").validate().is_ok());
        let at = format!("k:{}", "v".repeat(MAX_LABEL_VALUE));
        assert!(change(&at).validate().is_ok());
        let over = format!("k:{}", "v".repeat(MAX_LABEL_VALUE + 1));
        assert_eq!(change(&over).validate().unwrap_err().field, "tag");
        for bad in ["env staging", ":x", "a:b\n"] {
            let err = change(bad).validate().unwrap_err();
            assert_eq!(err.field, "tag", "{bad:?}: {err}");
        }
        let as_of = ChangeEnvRequest {
            rollback_as_of: true,
            ..change("")
        };
        assert_eq!(as_of.validate().unwrap_err().field, "rollback_as_of");
        let list = ListEnvRequest {
            app: "web".to_owned(),
            tag: "bad tag".to_owned(),
        };
        assert_eq!(list.validate().unwrap_err().field, "tag");
        let get = GetEnvRequest {
            app: "web".to_owned(),
            key: "K".to_owned(),
            tag: "env:staging".to_owned(),
        };
        assert!(get.validate().is_ok());
    }

    #[test]
    fn trust_bundles_are_bounded() {
        use crate::v1::TrustBundle;
        const BLOCK: &str = "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n";
        let bundle = |pem: String, sha: &str| ControllerMessage {
            kind: Some(controller_message::Kind::TrustBundle(TrustBundle {
                ca_pem: pem,
                renew_now: false,
                signing_ca_sha256: sha.to_owned(),
            })),
        };
        let sha = "a".repeat(64);
        bundle(BLOCK.repeat(2), &sha).validate().unwrap();
        let field = |m: ControllerMessage| m.validate().unwrap_err().to_string();
        assert!(field(bundle(String::new(), &sha)).contains("trust_bundle.ca_pem"));
        assert!(field(bundle(BLOCK.repeat(5), &sha)).contains("holds 5 certificates"));
        assert!(field(bundle("x".repeat(MAX_TRUST_BUNDLE + 1), &sha)).contains("ca_pem"));
        assert!(field(bundle(BLOCK.to_owned(), "nope")).contains("signing_ca_sha256"));
    }

    #[test]
    fn node_events_are_checked_field_by_field() {
        use crate::v1::{NodeEventAck, NodeEventKind};
        let good = || NodeEvent {
            event_id: "web.1764560000000.0".into(),
            kind: NodeEventKind::AppRestored as i32,
            app: "web".into(),
            release_id: "v1".into(),
            from_release_id: String::new(),
            cause: "the PM2 daemon is not running".into(),
            outcome: "repaired".into(),
            ok: true,
            unix_time: 1,
            actor: String::new(),
        };
        good().validate().unwrap();
        // A node-local command names who ran it, on one bounded line.
        let local = |actor: &str| NodeEvent {
            kind: NodeEventKind::LocalRollback as i32,
            actor: actor.into(),
            ..good()
        };
        local("alice").validate().unwrap();
        assert_eq!(local("").validate().unwrap_err().field, "actor");
        assert_eq!(local("a\nb").validate().unwrap_err().field, "actor");
        assert_eq!(
            local(&"a".repeat(MAX_ACTOR + 1))
                .validate()
                .unwrap_err()
                .field,
            "actor"
        );
        let field = |e: NodeEvent| e.validate().unwrap_err().field;
        assert_eq!(
            field(NodeEvent {
                event_id: String::new(),
                ..good()
            }),
            "event_id"
        );
        assert_eq!(
            field(NodeEvent {
                event_id: "a\nb".into(),
                ..good()
            }),
            "event_id"
        );
        assert_eq!(field(NodeEvent { kind: 0, ..good() }), "kind");
        assert_eq!(field(NodeEvent { kind: 99, ..good() }), "kind");
        assert_eq!(
            field(NodeEvent {
                app: "../x".into(),
                ..good()
            }),
            "app"
        );
        assert_eq!(
            field(NodeEvent {
                from_release_id: "../x".into(),
                ..good()
            }),
            "from_release_id"
        );
        let long = "x".repeat(MAX_MESSAGE + 1);
        assert_eq!(
            field(NodeEvent {
                cause: long.clone(),
                ..good()
            }),
            "cause"
        );
        assert_eq!(
            field(NodeEvent {
                outcome: long,
                ..good()
            }),
            "outcome"
        );
        let wrapped = AgentMessage {
            kind: Some(agent_message::Kind::NodeEvent(NodeEvent {
                kind: 7,
                ..good()
            })),
        };
        assert_eq!(wrapped.validate().unwrap_err().field, "node_event.kind");
        let ack = |n: usize| ControllerMessage {
            kind: Some(controller_message::Kind::NodeEventAck(NodeEventAck {
                event_ids: vec!["e".into(); n],
            })),
        };
        ack(MAX_EVENT_IDS).validate().unwrap();
        assert_eq!(
            ack(MAX_EVENT_IDS + 1).validate().unwrap_err().field,
            "node_event_ack.event_ids"
        );
    }

    #[test]
    fn every_field_of_a_deploy_command_is_named_within_deploy() {
        use crate::v1::Deploy;
        let good = Deploy {
            command_id: "d-1.n-1".into(),
            app: "web".into(),
            release_id: "v1".into(),
            artifact_sha256: "ab".repeat(32),
            ..Default::default()
        };
        let message = |d: Deploy| ControllerMessage {
            kind: Some(controller_message::Kind::Deploy(d)),
        };
        message(good.clone()).validate().unwrap();
        for (bad, field) in [
            (
                Deploy {
                    command_id: "a\nb".into(),
                    ..good.clone()
                },
                "deploy.command_id",
            ),
            (
                Deploy {
                    command_id: String::new(),
                    ..good.clone()
                },
                "deploy.command_id",
            ),
            (
                Deploy {
                    app: "../x".into(),
                    ..good.clone()
                },
                "deploy.app",
            ),
            (
                Deploy {
                    release_id: "a b".into(),
                    ..good.clone()
                },
                "deploy.release_id",
            ),
            (
                Deploy {
                    artifact_sha256: "zz".into(),
                    ..good.clone()
                },
                "deploy.artifact_sha256",
            ),
        ] {
            let err = message(bad.clone()).validate();
            assert_eq!(err.map_err(|e| e.field), Err(field.to_owned()), "{bad:?}");
        }
    }

    #[test]
    fn agent_upgrades_are_checked_field_by_field() {
        use crate::v1::AgentUpgrade;
        for good in ["0.1.0", "1.2.3-rc.1+git.abc", &"9".repeat(MAX_VERSION)] {
            check_version("version", good).unwrap();
        }
        for bad in [
            "",
            "-1",
            "1 2",
            "1.0\n",
            "v/1",
            &"9".repeat(MAX_VERSION + 1),
        ] {
            assert!(check_version("version", bad).is_err(), "{bad:?}");
        }
        let good = AgentUpgrade {
            command_id: "d-1.n-1".into(),
            sha256: "ab".repeat(32),
            size: 10,
            version: "0.2.0".into(),
            commit_deadline_secs: 60,
        };
        let message = |u: AgentUpgrade| ControllerMessage {
            kind: Some(controller_message::Kind::AgentUpgrade(u)),
        };
        message(good.clone()).validate().unwrap();
        for (bad, field) in [
            (
                AgentUpgrade {
                    size: 0,
                    ..good.clone()
                },
                "agent_upgrade.size",
            ),
            (
                AgentUpgrade {
                    size: MAX_AGENT_BINARY + 1,
                    ..good.clone()
                },
                "agent_upgrade.size",
            ),
            (
                AgentUpgrade {
                    sha256: "../x".into(),
                    ..good.clone()
                },
                "agent_upgrade.sha256",
            ),
            (
                AgentUpgrade {
                    version: "1 0".into(),
                    ..good.clone()
                },
                "agent_upgrade.version",
            ),
            (
                AgentUpgrade {
                    commit_deadline_secs: 4,
                    ..good.clone()
                },
                "agent_upgrade.commit_deadline_secs",
            ),
            (
                AgentUpgrade {
                    commit_deadline_secs: MAX_COMMIT_DEADLINE_SECS + 1,
                    ..good.clone()
                },
                "agent_upgrade.commit_deadline_secs",
            ),
        ] {
            let err = message(bad).validate().unwrap_err();
            assert_eq!(err.field, field, "{err}");
        }
    }

    #[test]
    fn names_follow_one_rule() {
        for good in ["n1", "web-1.prod_a", &"a".repeat(MAX_NODE_NAME)] {
            check_node_name("node_name", good).unwrap();
        }
        for bad in [
            "",
            "../../etc",
            "a/b",
            "<script>",
            "n1\nFAKE LOG LINE",
            "-n",
            ".n",
            "a b",
            &"a".repeat(MAX_NODE_NAME + 1),
        ] {
            let err = check_node_name("node_name", bad).unwrap_err();
            assert_eq!(err.field, "node_name");
            assert!(err.problem.starts_with("invalid node name"), "{err}");
            assert!(!err.to_string().contains('\n'), "{err}");
        }
    }

    #[test]
    fn shown_values_are_escaped_and_cut() {
        assert_eq!(shown("a\nb").to_string(), r#""a\nb""#);
        let long = "x".repeat(100_000);
        let text = shown(&long).to_string();
        assert!(text.len() < 100, "{text}");
        assert!(text.ends_with("… (100000 bytes)"), "{text}");
        assert_eq!(one_line("a\nb\u{1b}[31m", 80), "a\\nb\\u{1b}[31m");
        assert_eq!(one_line("abcdef", 3), "abc…");
    }

    #[test]
    fn truncate_keeps_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("héllo", 3), "hé");
        assert_eq!(truncate("abc", 10), "abc");
    }

    #[test]
    fn limits_hold_at_the_edge() {
        let mut labels = HashMap::new();
        for i in 0..MAX_LABELS {
            labels.insert(format!("k{i}"), "v".repeat(MAX_LABEL_VALUE));
        }
        check_labels("labels", &labels).unwrap();
        labels.insert("one-more".to_owned(), String::new());
        let err = check_labels("labels", &labels).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "labels: {} entries is over the limit of {MAX_LABELS}",
                MAX_LABELS + 1
            )
        );
        let mut labels = HashMap::new();
        labels.insert("k".to_owned(), "v".repeat(MAX_LABEL_VALUE + 1));
        let err = check_labels("labels", &labels).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("labels[k]: 256 bytes is over the limit of 255"));

        check_git_sha("git_sha", &"a".repeat(40)).unwrap();
        check_git_sha("git_sha", "").unwrap();
        let err = check_git_sha("git_sha", &"a".repeat(1_000_000)).unwrap_err();
        assert!(err.to_string().len() < 200, "{err}");
    }

    #[test]
    fn nested_fields_are_named() {
        let beat = Heartbeat {
            apps: vec![AppStatus {
                app: "web".to_owned(),
                releases: vec![crate::v1::ReleaseInfo {
                    id: "../x".to_owned(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let message = AgentMessage {
            kind: Some(agent_message::Kind::Heartbeat(beat)),
        };
        let err = message.validate().unwrap_err();
        assert_eq!(err.field, "heartbeat.apps[0].releases[0].id");
    }

    #[test]
    fn a_public_address_claim_is_checked_by_its_receiver() {
        let public = |address: &str, mode: &str, release: &str, backend: &str| PublicAddress {
            address: address.to_owned(),
            mode: mode.to_owned(),
            release: release.to_owned(),
            backend: backend.to_owned(),
            draining: 0,
            forwarding: String::new(),
        };
        let forwarding = |text: &str| PublicAddress {
            forwarding: text.to_owned(),
            ..public("0.0.0.0:3000", "agent_proxy", "v7", "127.0.0.1:8081")
        };
        check_public(
            "public",
            &forwarding(
                "kernel-forwarded for local clients (nftables table ip slipway_front_0123456789ab)",
            ),
        )
        .unwrap();
        let err = check_public("public", &forwarding("ok\nFAKE")).unwrap_err();
        assert_eq!(err.field, "public.forwarding", "{err}");
        let err = check_public("public", &forwarding(&"x".repeat(257))).unwrap_err();
        assert_eq!(err.field, "public.forwarding", "{err}");
        for ok in [
            public("0.0.0.0:3000", "agent_proxy", "v7", "127.0.0.1:8081"),
            public("[::]:80", "socket_handover", "v1", ""),
            public("/run/web.sock", "socket_handover", "", ""),
            public("", "none", "", ""),
            public("", "pm2_cluster", "", ""),
        ] {
            check_public("public", &ok).unwrap();
        }
        for (bad, field, why) in [
            (
                public("0.0.0.0:3000", "proxy", "", ""),
                "public.mode",
                "is not one of",
            ),
            (
                public("", "agent_proxy", "", ""),
                "public.address",
                "neither",
            ),
            (
                public("localhost:80", "agent_proxy", "", ""),
                "public.address",
                "neither",
            ),
            (
                public("/run/../x.sock", "socket_handover", "", ""),
                "public.address",
                "neither",
            ),
            (
                public("/run/a\nb", "socket_handover", "", ""),
                "public.address",
                "control characters",
            ),
            (
                public(&format!("/{}", "a".repeat(300)), "socket_handover", "", ""),
                "public.address",
                "over the limit of 256",
            ),
            (
                public("0.0.0.0:3000", "none", "", ""),
                "public",
                "holds no public address",
            ),
            (
                public("0.0.0.0:3000", "agent_proxy", "../v1", ""),
                "public.release",
                "",
            ),
            (
                public("0.0.0.0:3000", "agent_proxy", "v1", "10.0.0.1:80"),
                "public.backend",
                "not a loopback",
            ),
        ] {
            let err = check_public("public", &bad).unwrap_err();
            assert_eq!(err.field, field, "{bad:?}: {err}");
            assert!(err.problem.contains(why), "{bad:?}: {err}");
        }
        let beat = Heartbeat {
            apps: vec![AppStatus {
                app: "web".to_owned(),
                public: Some(public("nowhere", "agent_proxy", "", "")),
                ..Default::default()
            }],
            ..Default::default()
        };
        let err = beat.validate().unwrap_err();
        assert_eq!(err.field, "apps[0].public.address");
    }
}
