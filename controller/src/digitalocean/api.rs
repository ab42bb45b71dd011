//! The operations Slipway uses and the shapes it reads from them. Every
//! shape read is checked ([`Droplet::check`] and friends) before the rest of
//! the controller sees it: names and tags within DO's own limits, addresses
//! that parse, lists of bounded length. An answer that fails a check is a
//! [`DoError::Invalid`] naming the field.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use http::Method;
use serde::{Deserialize, Serialize};

use super::client::{Client, DoError};

/// DO's limit on a tag's and a droplet's name.
pub const MAX_NAME: usize = 255;
/// Tags on one droplet (far past any real use; bounds what is stored).
pub const MAX_TAGS: usize = 256;
/// Addresses of one family on one droplet.
pub const MAX_ADDRESSES: usize = 64;
/// Largest `user_data` DO accepts (64 KiB).
pub const MAX_USER_DATA: usize = 64 * 1024;

/// A droplet as Slipway sees it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Droplet {
    pub id: u64,
    pub name: String,
    /// `new`, `active`, `off`, `archive`.
    pub status: String,
    pub region: Region,
    pub size_slug: String,
    pub networks: Networks,
    pub tags: Vec<String>,
    pub created_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Region {
    pub slug: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Networks {
    #[serde(default)]
    pub v4: Vec<NetworkV4>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct NetworkV4 {
    pub ip_address: String,
    /// `public` or `private`.
    #[serde(rename = "type")]
    pub kind: String,
}

impl Droplet {
    /// The limits of the module docs; the error names the field.
    pub fn check(&self) -> Result<(), String> {
        let at = |field: &str, why: String| format!("droplet {}: {field}: {why}", self.id);
        check_name(&self.name).map_err(|e| at("name", e))?;
        for (field, value) in [
            ("status", &self.status),
            ("region.slug", &self.region.slug),
            ("size_slug", &self.size_slug),
            ("created_at", &self.created_at),
        ] {
            check_text(value, 64).map_err(|e| at(field, e))?;
        }
        if self.tags.len() > MAX_TAGS {
            return Err(at(
                "tags",
                format!("{} tags, over {MAX_TAGS}", self.tags.len()),
            ));
        }
        for (i, tag) in self.tags.iter().enumerate() {
            check_tag(tag).map_err(|e| at(&format!("tags[{i}]"), e))?;
        }
        if self.networks.v4.len() > MAX_ADDRESSES {
            return Err(at("networks.v4", format!("over {MAX_ADDRESSES} addresses")));
        }
        for (i, net) in self.networks.v4.iter().enumerate() {
            net.ip_address.parse::<Ipv4Addr>().map_err(|_| {
                at(
                    &format!("networks.v4[{i}].ip_address"),
                    format!("{:?} is not an IPv4 address", cut(&net.ip_address)),
                )
            })?;
            if net.kind != "public" && net.kind != "private" {
                return Err(at(
                    &format!("networks.v4[{i}].type"),
                    format!("{:?} is neither public nor private", cut(&net.kind)),
                ));
            }
        }
        Ok(())
    }

    /// The first public IPv4 address.
    pub fn public_ipv4(&self) -> Option<Ipv4Addr> {
        self.ipv4("public")
    }

    /// The first private (VPC) IPv4 address.
    pub fn private_ipv4(&self) -> Option<Ipv4Addr> {
        self.ipv4("private")
    }

    fn ipv4(&self, kind: &str) -> Option<Ipv4Addr> {
        self.networks
            .v4
            .iter()
            .filter(|n| n.kind == kind)
            .find_map(|n| n.ip_address.parse().ok())
    }
}

/// What `droplets create` asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NewDroplet {
    pub name: String,
    pub region: String,
    pub size: String,
    pub image: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ssh_keys: Vec<String>,
    pub tags: Vec<String>,
    /// cloud-init user-data (≤ [`MAX_USER_DATA`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
}

impl NewDroplet {
    /// The limits DO itself applies, checked before sending.
    pub fn check(&self) -> Result<(), String> {
        check_name(&self.name).map_err(|e| format!("name: {e}"))?;
        check_hostname(&self.name).map_err(|e| format!("name: {e}"))?;
        for (field, value) in [
            ("region", &self.region),
            ("size", &self.size),
            ("image", &self.image),
        ] {
            check_text(value, 64).map_err(|e| format!("{field}: {e}"))?;
            if value.is_empty() {
                return Err(format!("{field}: empty"));
            }
        }
        for tag in &self.tags {
            check_tag(tag).map_err(|e| format!("tag {:?}: {e}", cut(tag)))?;
        }
        for key in &self.ssh_keys {
            check_text(key, 128).map_err(|e| format!("ssh key: {e}"))?;
        }
        if let Some(data) = &self.user_data {
            if data.len() > MAX_USER_DATA {
                return Err(format!(
                    "user_data is {} bytes, over DigitalOcean's limit of {MAX_USER_DATA}",
                    data.len()
                ));
            }
        }
        Ok(())
    }
}

/// A droplet action or any other DO action.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Action {
    pub id: u64,
    /// `in-progress`, `completed` or `errored`.
    pub status: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub resource_id: Option<u64>,
}

impl Action {
    fn check(&self) -> Result<(), String> {
        match self.status.as_str() {
            "in-progress" | "completed" | "errored" => {}
            other => {
                return Err(format!(
                    "action {}: status {:?} unknown",
                    self.id,
                    cut(other)
                ))
            }
        }
        check_text(&self.kind, 64).map_err(|e| format!("action {}: type: {e}", self.id))
    }
}

/// A DNS record of a domain.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct DomainRecord {
    pub id: u64,
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub data: String,
    pub ttl: Option<u32>,
}

impl DomainRecord {
    fn check(&self) -> Result<(), String> {
        let at = |f: &str, e: String| format!("domain record {}: {f}: {e}", self.id);
        check_text(&self.kind, 16).map_err(|e| at("type", e))?;
        check_text(&self.name, MAX_NAME).map_err(|e| at("name", e))?;
        check_text(&self.data, 4096).map_err(|e| at("data", e))
    }
}

/// A record to create or change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NewRecord {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub data: String,
    pub ttl: u32,
}

/// A cloud firewall.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Firewall {
    #[serde(default, skip_serializing)]
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub inbound_rules: Vec<FirewallRule>,
    #[serde(default)]
    pub outbound_rules: Vec<OutboundRule>,
    #[serde(default)]
    pub droplet_ids: Vec<u64>,
    #[serde(default)]
    pub tags: Vec<String>,
}

/// One inbound rule: a protocol, ports, and where from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct FirewallRule {
    pub protocol: String,
    /// `"22"`, `"8000-9000"`, `"0"` or `"all"`; none for icmp.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ports: String,
    pub sources: Endpoints,
}

/// One outbound rule.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct OutboundRule {
    pub protocol: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ports: String,
    pub destinations: Endpoints,
}

/// The addresses, tags, droplets and load balancers of a rule.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct Endpoints {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub droplet_ids: Vec<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub load_balancer_uids: Vec<String>,
}

impl Firewall {
    fn check(&self) -> Result<(), String> {
        let at = |f: &str, e: String| format!("firewall {:?}: {f}: {e}", cut(&self.id));
        check_text(&self.id, 64).map_err(|e| at("id", e))?;
        check_text(&self.name, MAX_NAME).map_err(|e| at("name", e))?;
        if self.inbound_rules.len() + self.outbound_rules.len() > 1000
            || self.droplet_ids.len() > 10_000
            || self.tags.len() > MAX_TAGS
        {
            return Err(at("rules/droplet_ids/tags", "too many entries".into()));
        }
        Ok(())
    }
}

#[derive(Deserialize)]
struct DropletBody {
    droplet: Droplet,
}
#[derive(Deserialize)]
struct CountBody {
    meta: Meta,
}
#[derive(Deserialize)]
struct Meta {
    total: u64,
}
#[derive(Deserialize)]
struct ActionBody {
    action: Action,
}
#[derive(Deserialize)]
struct RecordBody {
    domain_record: DomainRecord,
}
#[derive(Deserialize)]
struct FirewallBody {
    firewall: Firewall,
}
#[derive(Deserialize)]
struct TagBody {
    tag: TagName,
}
#[derive(Deserialize)]
struct TagName {
    name: String,
}

impl Client {
    /// Every droplet with `tag`, all pages.
    pub async fn droplets_by_tag(&self, tag: &str) -> Result<Vec<Droplet>, DoError> {
        check_tag(tag).map_err(|e| DoError::Config(format!("tag {:?}: {e}", cut(tag))))?;
        let path = format!("/v2/droplets?tag_name={}", encode(tag));
        let droplets: Vec<Droplet> = self.list(&path, "droplets").await?;
        checked(&path, droplets.iter().map(Droplet::check))?;
        Ok(droplets)
    }

    /// How many droplets carry `tag` (one small request: `meta.total`);
    /// `validate` uses it to check the token.
    pub async fn count_by_tag(&self, tag: &str) -> Result<u64, DoError> {
        check_tag(tag).map_err(|e| DoError::Config(format!("tag {:?}: {e}", cut(tag))))?;
        let path = format!("/v2/droplets?tag_name={}&per_page=1&page=1", encode(tag));
        let body: CountBody = self.get(&path).await?;
        Ok(body.meta.total)
    }

    /// One droplet; [`DoError::is_not_found`] when it is gone.
    pub async fn droplet(&self, id: u64) -> Result<Droplet, DoError> {
        let path = format!("/v2/droplets/{id}");
        let body: DropletBody = self.get(&path).await?;
        checked(&path, [body.droplet.check()])?;
        Ok(body.droplet)
    }

    /// Creates a droplet (DO answers at once; it boots in the background).
    pub async fn create_droplet(&self, new: &NewDroplet) -> Result<Droplet, DoError> {
        new.check()
            .map_err(|e| DoError::Config(format!("droplet {:?}: {e}", cut(&new.name))))?;
        let path = "/v2/droplets";
        let body: DropletBody = self.send(Method::POST, path, new).await?;
        checked(path, [body.droplet.check()])?;
        Ok(body.droplet)
    }

    /// Destroys a droplet.
    pub async fn destroy_droplet(&self, id: u64) -> Result<(), DoError> {
        self.delete(&format!("/v2/droplets/{id}")).await
    }

    /// Starts a snapshot of a droplet named `name`.
    pub async fn snapshot(&self, droplet: u64, name: &str) -> Result<Action, DoError> {
        check_text(name, MAX_NAME).map_err(|e| DoError::Config(format!("snapshot name: {e}")))?;
        self.droplet_action(
            droplet,
            &serde_json::json!({ "type": "snapshot", "name": name }),
        )
        .await
    }

    /// Power-cycles a droplet.
    pub async fn power_cycle(&self, droplet: u64) -> Result<Action, DoError> {
        self.droplet_action(droplet, &serde_json::json!({ "type": "power_cycle" }))
            .await
    }

    async fn droplet_action(
        &self,
        droplet: u64,
        body: &serde_json::Value,
    ) -> Result<Action, DoError> {
        let path = format!("/v2/droplets/{droplet}/actions");
        let answer: ActionBody = self.send(Method::POST, &path, body).await?;
        checked(&path, [answer.action.check()])?;
        Ok(answer.action)
    }

    /// An action's current state.
    pub async fn action(&self, id: u64) -> Result<Action, DoError> {
        let path = format!("/v2/actions/{id}");
        let body: ActionBody = self.get(&path).await?;
        checked(&path, [body.action.check()])?;
        Ok(body.action)
    }

    /// Polls an action every `every` until it completes; an errored action
    /// or one still running at `deadline` is an error.
    pub async fn wait_action(
        &self,
        id: u64,
        every: Duration,
        deadline: Instant,
    ) -> Result<Action, DoError> {
        loop {
            let action = self.action(id).await?;
            match action.status.as_str() {
                "completed" => return Ok(action),
                "errored" => {
                    return Err(DoError::Invalid {
                        method: Method::GET,
                        path: format!("/v2/actions/{id}"),
                        reason: format!("action {id} ({}) errored", action.kind),
                    })
                }
                _ => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(DoError::Timeout {
                    method: Method::GET,
                    path: format!("/v2/actions/{id}"),
                    during: "waiting for the action to complete",
                    after: every,
                });
            }
            tokio::time::sleep(every.min(deadline - now)).await;
        }
    }

    /// The records of `domain` of type `kind` named `name` (a full name,
    /// as DO's filter wants: `app.example.com`).
    pub async fn records(
        &self,
        domain: &str,
        kind: &str,
        name: &str,
    ) -> Result<Vec<DomainRecord>, DoError> {
        check_hostname(domain).map_err(|e| DoError::Config(format!("domain: {e}")))?;
        let path = format!(
            "/v2/domains/{}/records?type={}&name={}",
            encode(domain),
            encode(kind),
            encode(name)
        );
        let records: Vec<DomainRecord> = self.list(&path, "domain_records").await?;
        checked(&path, records.iter().map(DomainRecord::check))?;
        Ok(records)
    }

    pub async fn create_record(
        &self,
        domain: &str,
        record: &NewRecord,
    ) -> Result<DomainRecord, DoError> {
        check_hostname(domain).map_err(|e| DoError::Config(format!("domain: {e}")))?;
        let path = format!("/v2/domains/{}/records", encode(domain));
        let body: RecordBody = self.send(Method::POST, &path, record).await?;
        checked(&path, [body.domain_record.check()])?;
        Ok(body.domain_record)
    }

    pub async fn update_record(
        &self,
        domain: &str,
        id: u64,
        record: &NewRecord,
    ) -> Result<DomainRecord, DoError> {
        check_hostname(domain).map_err(|e| DoError::Config(format!("domain: {e}")))?;
        let path = format!("/v2/domains/{}/records/{id}", encode(domain));
        let body: RecordBody = self.send(Method::PATCH, &path, record).await?;
        checked(&path, [body.domain_record.check()])?;
        Ok(body.domain_record)
    }

    pub async fn delete_record(&self, domain: &str, id: u64) -> Result<(), DoError> {
        check_hostname(domain).map_err(|e| DoError::Config(format!("domain: {e}")))?;
        self.delete(&format!("/v2/domains/{}/records/{id}", encode(domain)))
            .await
    }

    /// Every firewall of the account, all pages.
    pub async fn firewalls(&self) -> Result<Vec<Firewall>, DoError> {
        let path = "/v2/firewalls";
        let firewalls: Vec<Firewall> = self.list(path, "firewalls").await?;
        checked(path, firewalls.iter().map(Firewall::check))?;
        Ok(firewalls)
    }

    pub async fn create_firewall(&self, firewall: &Firewall) -> Result<Firewall, DoError> {
        let path = "/v2/firewalls";
        let body: FirewallBody = self.send(Method::POST, path, firewall).await?;
        checked(path, [body.firewall.check()])?;
        Ok(body.firewall)
    }

    /// Replaces firewall `id` with `firewall` (DO's PUT is a full update).
    pub async fn update_firewall(
        &self,
        id: &str,
        firewall: &Firewall,
    ) -> Result<Firewall, DoError> {
        check_text(id, 64).map_err(|e| DoError::Config(format!("firewall id: {e}")))?;
        let path = format!("/v2/firewalls/{}", encode(id));
        let body: FirewallBody = self.send(Method::PUT, &path, firewall).await?;
        checked(&path, [body.firewall.check()])?;
        Ok(body.firewall)
    }

    /// Creates a tag (DO answers 201 also when it exists).
    pub async fn create_tag(&self, name: &str) -> Result<(), DoError> {
        check_tag(name).map_err(|e| DoError::Config(format!("tag {:?}: {e}", cut(name))))?;
        let body: TagBody = self
            .send(
                Method::POST,
                "/v2/tags",
                &serde_json::json!({ "name": name }),
            )
            .await?;
        checked("/v2/tags", [check_tag(&body.tag.name)])
    }

    /// Whether a tag exists.
    pub async fn tag_exists(&self, name: &str) -> Result<bool, DoError> {
        check_tag(name).map_err(|e| DoError::Config(format!("tag {:?}: {e}", cut(name))))?;
        // `:` is a legal path character (RFC 3986 pchar) and DO's tag_id
        // pattern wants it as is.
        let path = format!("/v2/tags/{}", encode(name).replace("%3A", ":"));
        match self.get::<TagBody>(&path).await {
            Ok(body) => {
                checked(&path, [check_tag(&body.tag.name)])?;
                Ok(true)
            }
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// The first failed check of an answer as [`DoError::Invalid`].
fn checked(
    path: &str,
    checks: impl IntoIterator<Item = Result<(), String>>,
) -> Result<(), DoError> {
    for check in checks {
        check.map_err(|reason| DoError::Invalid {
            method: Method::GET,
            path: path.to_owned(),
            reason,
        })?;
    }
    Ok(())
}

/// A DO tag: 1–255 letters, digits, `:`, `-`, `_` (DO's own rule).
pub fn check_tag(tag: &str) -> Result<(), String> {
    if tag.is_empty() || tag.len() > MAX_NAME {
        return Err(format!("must be 1 to {MAX_NAME} characters"));
    }
    if let Some(c) = tag
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, ':' | '-' | '_')))
    {
        return Err(format!(
            "{c:?} is not allowed (letters, digits, ':', '-', '_' only)"
        ));
    }
    Ok(())
}

/// A droplet name: 1–255 printable characters.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty".into());
    }
    check_text(name, MAX_NAME)
}

/// A hostname-like name: letters, digits, `-` and `.`.
pub fn check_hostname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 253 {
        return Err("must be 1 to 253 characters".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.')))
    {
        return Err(format!(
            "{:?} has {c:?} (letters, digits, '-' and '.' only)",
            cut(name)
        ));
    }
    Ok(())
}

/// Text of at most `max` bytes without control characters.
fn check_text(value: &str, max: usize) -> Result<(), String> {
    if value.len() > max {
        return Err(format!("{} bytes, over the limit of {max}", value.len()));
    }
    if value.chars().any(char::is_control) {
        return Err(format!("{:?} has control characters", cut(value)));
    }
    Ok(())
}

/// At most 64 characters of a value, for messages.
fn cut(value: &str) -> String {
    value.chars().take(64).collect()
}

/// Percent-encodes all but RFC 3986's unreserved characters.
pub(crate) fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_follow_digitaloceans_rule() {
        assert!(check_tag("env:production").is_ok());
        assert!(check_tag("product_x-1").is_ok());
        assert!(check_tag("").is_err());
        assert!(check_tag("a b").unwrap_err().contains("' '"));
        assert!(check_tag(&"a".repeat(256)).is_err());
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(encode("env:production"), "env%3Aproduction");
        assert_eq!(encode("a&b=c"), "a%26b%3Dc");
        assert_eq!(encode("app.example.com"), "app.example.com");
    }

    #[test]
    fn user_data_over_the_limit_is_refused_before_sending() {
        let new = NewDroplet {
            name: "web-4".into(),
            region: "fra1".into(),
            size: "s-1vcpu-1gb".into(),
            image: "debian-12-x64".into(),
            ssh_keys: vec![],
            tags: vec!["env:production".into()],
            user_data: Some("x".repeat(MAX_USER_DATA + 1)),
        };
        assert!(new.check().unwrap_err().contains("user_data"));
        let bad_name = NewDroplet {
            name: "web 4".into(),
            user_data: None,
            ..new
        };
        assert!(bad_name.check().unwrap_err().contains("name"));
    }
}
