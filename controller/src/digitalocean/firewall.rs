//! The fleet firewall: one DigitalOcean cloud firewall, attached to the
//! fleet's tags, that lets in only the ports `[digitalocean.firewall]`
//! names (from anywhere, or from a load balancer) and SSH from the
//! configured ranges. Nothing is opened for the agent: it dials out to the
//! controller. Outbound is open (the agent, package updates, the app's own
//! calls). `slipway-controller firewall sync` prints the diff; `--apply`
//! creates or replaces the firewall (audited `FIREWALL_CHANGED`).
//!
//! ```toml
//! [digitalocean.firewall]
//! name = "slipway-fleet"           # default
//! inbound_ports = ["80", "443"]   # "8000-9000" for a range
//! ssh_from = ["192.0.2.0/24"]     # none: no SSH at all
//! load_balancer = "lb-uid"        # inbound_ports from it instead of anywhere
//! ```

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::api::{Endpoints, Firewall, FirewallRule, OutboundRule};
use super::client::{Client, DoError};
use crate::audit::AuditEvent;
use crate::store::{Store, StoreError};

/// Audited when `--apply` created or replaced the firewall.
pub const FIREWALL_CHANGED: &str = "FIREWALL_CHANGED";
/// Default firewall name.
pub const DEFAULT_NAME: &str = "slipway-fleet";
/// Entries of each list at most.
const MAX_ENTRIES: usize = 64;

/// `[digitalocean.firewall]` as written.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFirewall {
    pub name: Option<String>,
    #[serde(default)]
    pub inbound_ports: Vec<String>,
    #[serde(default)]
    pub ssh_from: Vec<String>,
    pub load_balancer: Option<String>,
}

/// Checked `[digitalocean.firewall]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirewallConfig {
    pub name: String,
    pub inbound_ports: Vec<String>,
    pub ssh_from: Vec<String>,
    pub load_balancer: Option<String>,
}

impl FirewallConfig {
    /// Every key checked; the message names it.
    pub fn new(raw: RawFirewall) -> Result<Self, String> {
        let name = raw.name.unwrap_or_else(|| DEFAULT_NAME.to_owned());
        let name_ok = name.len() <= 255
            && name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric())
            && name.len() >= 2
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
        if !name_ok {
            return Err(format!(
                "digitalocean.firewall.name: {name:?}: letters, digits, '.' and '-', starting with a letter or digit"
            ));
        }
        if raw.inbound_ports.len() > MAX_ENTRIES || raw.ssh_from.len() > MAX_ENTRIES {
            return Err(format!(
                "digitalocean.firewall: more than {MAX_ENTRIES} entries in a list"
            ));
        }
        for ports in &raw.inbound_ports {
            check_ports(ports)
                .map_err(|e| format!("digitalocean.firewall.inbound_ports: {ports:?}: {e}"))?;
        }
        for range in &raw.ssh_from {
            check_cidr(range)
                .map_err(|e| format!("digitalocean.firewall.ssh_from: {range:?}: {e}"))?;
        }
        if let Some(lb) = &raw.load_balancer {
            if lb.is_empty()
                || lb.len() > 64
                || !lb.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            {
                return Err(format!(
                    "digitalocean.firewall.load_balancer: {lb:?} is not a load balancer id"
                ));
            }
        }
        Ok(Self {
            name,
            inbound_ports: raw.inbound_ports,
            ssh_from: raw.ssh_from,
            load_balancer: raw.load_balancer,
        })
    }

    /// The firewall the config describes, on `tags`.
    pub fn wanted(&self, tags: &[String]) -> Firewall {
        let anywhere = || vec!["0.0.0.0/0".to_owned(), "::/0".to_owned()];
        let mut inbound: Vec<FirewallRule> = self
            .inbound_ports
            .iter()
            .map(|ports| FirewallRule {
                protocol: "tcp".into(),
                ports: ports.clone(),
                sources: match &self.load_balancer {
                    Some(lb) => Endpoints {
                        load_balancer_uids: vec![lb.clone()],
                        ..Endpoints::default()
                    },
                    None => Endpoints {
                        addresses: anywhere(),
                        ..Endpoints::default()
                    },
                },
            })
            .collect();
        if !self.ssh_from.is_empty() {
            inbound.push(FirewallRule {
                protocol: "tcp".into(),
                ports: "22".into(),
                sources: Endpoints {
                    addresses: self.ssh_from.clone(),
                    ..Endpoints::default()
                },
            });
        }
        let out = |protocol: &str, ports: &str| OutboundRule {
            protocol: protocol.into(),
            ports: ports.into(),
            destinations: Endpoints {
                addresses: anywhere(),
                ..Endpoints::default()
            },
        };
        Firewall {
            id: String::new(),
            name: self.name.clone(),
            inbound_rules: inbound,
            // The description requires `ports` also for icmp, where DO ignores it.
            outbound_rules: vec![out("tcp", "all"), out("udp", "all"), out("icmp", "0")],
            droplet_ids: Vec::new(),
            tags: tags.to_vec(),
        }
    }
}

fn check_ports(ports: &str) -> Result<(), String> {
    let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p > 0);
    match ports.split_once('-') {
        Some((a, b)) => match (port(a), port(b)) {
            (Some(a), Some(b)) if a < b => Ok(()),
            _ => Err("a range is LOW-HIGH, 1 to 65535".into()),
        },
        None if port(ports).is_some() => Ok(()),
        None => Err("a port 1 to 65535 or a range LOW-HIGH".into()),
    }
}

fn check_cidr(range: &str) -> Result<(), String> {
    let (ip, bits) = range.split_once('/').unwrap_or((range, ""));
    let max = match ip.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(_)) => 32,
        Ok(std::net::IpAddr::V6(_)) => 128,
        Err(_) => return Err("not an IP address or CIDR range".into()),
    };
    if !bits.is_empty() && bits.parse::<u8>().ok().is_none_or(|b| b > max) {
        return Err(format!("prefix length must be 0 to {max}"));
    }
    Ok(())
}

/// A rule as compared: protocol, ports, and the sorted endpoints.
fn key(protocol: &str, ports: &str, e: &Endpoints) -> String {
    let sorted = |v: &[String]| {
        v.iter()
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
            .join(",")
    };
    let ports = if ports == "0" { "all" } else { ports };
    format!(
        "{protocol} {ports} addresses=[{}] tags=[{}] load_balancers=[{}]",
        sorted(&e.addresses),
        sorted(&e.tags),
        sorted(&e.load_balancer_uids)
    )
}

/// The differences between the firewall as it is and as wanted, one line
/// each (`+`/`-`); empty when they match.
pub fn diff(current: Option<&Firewall>, wanted: &Firewall) -> Vec<String> {
    let Some(current) = current else {
        let mut lines = vec![format!("+ firewall {}", wanted.name)];
        lines.extend(diff(
            Some(&Firewall {
                inbound_rules: vec![],
                outbound_rules: vec![],
                tags: vec![],
                ..wanted.clone()
            }),
            wanted,
        ));
        return lines;
    };
    let mut lines = Vec::new();
    let set = |rules: Vec<String>| rules.into_iter().collect::<BTreeSet<_>>();
    for (what, now, want) in [
        (
            "inbound",
            set(current
                .inbound_rules
                .iter()
                .map(|r| key(&r.protocol, &r.ports, &r.sources))
                .collect()),
            set(wanted
                .inbound_rules
                .iter()
                .map(|r| key(&r.protocol, &r.ports, &r.sources))
                .collect()),
        ),
        (
            "outbound",
            set(current
                .outbound_rules
                .iter()
                .map(|r| key(&r.protocol, &r.ports, &r.destinations))
                .collect()),
            set(wanted
                .outbound_rules
                .iter()
                .map(|r| key(&r.protocol, &r.ports, &r.destinations))
                .collect()),
        ),
        (
            "tag",
            current.tags.iter().cloned().collect(),
            wanted.tags.iter().cloned().collect(),
        ),
    ] {
        for gone in now.difference(&want) {
            lines.push(format!("- {what} {gone}"));
        }
        for new in want.difference(&now) {
            lines.push(format!("+ {what} {new}"));
        }
    }
    lines
}

/// What `firewall sync` found and did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Synced {
    pub name: String,
    pub id: Option<String>,
    pub diff: Vec<String>,
    pub applied: bool,
}

/// Why `firewall sync` failed.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("{0} firewalls are named {1:?}; rename or remove the extra ones")]
    Ambiguous(usize, String),
    #[error(transparent)]
    Api(#[from] DoError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Compares the firewall named in the config with the wanted one and, with
/// `apply`, creates or replaces it.
pub async fn sync(
    client: &Client,
    store: &Store,
    config: &FirewallConfig,
    tags: &[String],
    apply: bool,
    actor: &str,
    now: i64,
) -> Result<Synced, FirewallError> {
    let wanted = config.wanted(tags);
    let mut named: Vec<Firewall> = client
        .firewalls()
        .await?
        .into_iter()
        .filter(|f| f.name == config.name)
        .collect();
    if named.len() > 1 {
        return Err(FirewallError::Ambiguous(named.len(), config.name.clone()));
    }
    let current = named.pop();
    let lines = diff(current.as_ref(), &wanted);
    let mut id = current.as_ref().map(|f| f.id.clone());
    if apply && !lines.is_empty() {
        // DO's PUT replaces the whole firewall: droplets attached by id
        // (outside the fleet's tags) stay attached.
        let mut body = wanted.clone();
        if let Some(current) = &current {
            body.droplet_ids.clone_from(&current.droplet_ids);
        }
        let made = match &current {
            Some(current) => client.update_firewall(&current.id, &body).await?,
            None => client.create_firewall(&body).await?,
        };
        id = Some(made.id.clone());
        let event = AuditEvent::success(
            FIREWALL_CHANGED,
            actor,
            "firewall",
            &made.id,
            serde_json::json!({ "name": made.name, "created": current.is_none(), "diff": lines }),
        );
        store.audit(&event, now).await?;
    }
    Ok(Synced {
        name: config.name.clone(),
        id,
        diff: lines,
        applied: apply,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Result<FirewallConfig, String> {
        FirewallConfig::new(toml::from_str(text).unwrap())
    }

    #[test]
    fn the_config_is_checked() {
        assert!(config("inbound_ports = [\"80\", \"8000-9000\"]\nssh_from = [\"192.0.2.0/24\", \"2001:db8::/32\"]").is_ok());
        for (text, want) in [
            ("inbound_ports = [\"0\"]", "inbound_ports"),
            ("inbound_ports = [\"9000-8000\"]", "inbound_ports"),
            ("ssh_from = [\"192.0.2.0/33\"]", "ssh_from"),
            ("ssh_from = [\"everyone\"]", "ssh_from"),
            ("name = \"-x\"", "name"),
        ] {
            let e = config(text).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn the_diff_names_what_changes_and_nothing_when_equal() {
        let c = config("inbound_ports = [\"443\"]\nssh_from = [\"192.0.2.0/24\"]").unwrap();
        let tags = vec!["env:production".to_owned()];
        let wanted = c.wanted(&tags);
        assert!(diff(Some(&wanted), &wanted).is_empty());
        let created = diff(None, &wanted);
        assert_eq!(created[0], "+ firewall slipway-fleet");
        assert!(
            created
                .iter()
                .any(|l| l.starts_with("+ inbound tcp 22 addresses=[192.0.2.0/24]")),
            "{created:?}"
        );
        assert!(
            created.contains(&"+ tag env:production".to_owned()),
            "{created:?}"
        );
        let mut open = wanted.clone();
        open.inbound_rules.push(FirewallRule {
            protocol: "tcp".into(),
            ports: "3306".into(),
            sources: Endpoints {
                addresses: vec!["0.0.0.0/0".into()],
                ..Endpoints::default()
            },
        });
        assert_eq!(
            diff(Some(&open), &wanted),
            ["- inbound tcp 3306 addresses=[0.0.0.0/0] tags=[] load_balancers=[]"]
        );
    }
}
