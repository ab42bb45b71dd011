//! `slipway-controller dns point NAME --tag TAG`: the A records of NAME
//! follow the public IPv4 addresses of the droplets with TAG (listed from
//! the API at the time, not from the last sync). The plan is a pure
//! function ([`plan`]); by default it is only printed (a dry run), with
//! `--apply` it is carried out and audited.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use serde::Serialize;

use super::api::{check_hostname, DomainRecord, NewRecord};
use super::client::{Client, DoError};
use crate::audit::AuditEvent;
use crate::store::{Store, StoreError};

/// Audited when `--apply` changed records.
pub const DNS_RECORDS_CHANGED: &str = "DNS_RECORDS_CHANGED";
/// TTL of the records made, unless `--ttl` says otherwise.
pub const DEFAULT_TTL: u32 = 300;
/// DigitalOcean's shortest TTL.
pub const MIN_TTL: u32 = 30;

/// One change to the records of the name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    Create {
        ip: Ipv4Addr,
    },
    /// The address stays; only the TTL differs.
    Retime {
        record: u64,
        ip: Ipv4Addr,
        from: Option<u32>,
    },
    Delete {
        record: u64,
        data: String,
    },
}

/// The changes that make the A records of a name hold exactly `wanted`,
/// each with `ttl`. Records that already hold a wanted address are kept
/// (one per address; a duplicate is deleted).
pub fn plan(existing: &[DomainRecord], wanted: &BTreeSet<Ipv4Addr>, ttl: u32) -> Vec<Change> {
    let mut changes = Vec::new();
    let mut covered = BTreeSet::new();
    for record in existing {
        match record.data.parse::<Ipv4Addr>() {
            Ok(ip) if wanted.contains(&ip) && covered.insert(ip) => {
                if record.ttl != Some(ttl) {
                    changes.push(Change::Retime {
                        record: record.id,
                        ip,
                        from: record.ttl,
                    });
                }
            }
            _ => changes.push(Change::Delete {
                record: record.id,
                data: record.data.clone(),
            }),
        }
    }
    for ip in wanted.difference(&covered) {
        changes.push(Change::Create { ip: *ip });
    }
    changes
}

/// What `dns point` found and did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pointed {
    pub name: String,
    pub domain: String,
    pub wanted: Vec<Ipv4Addr>,
    pub ttl: u32,
    pub changes: Vec<Change>,
    pub applied: bool,
}

/// Why `dns point` did nothing.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Api(#[from] DoError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Splits `name` into (record name, domain): `app.example.com` →
/// (`app`, `example.com`) unless `domain` is given; the apex is `@`.
pub fn split_name(name: &str, domain: Option<&str>) -> Result<(String, String), String> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    check_hostname(&name)?;
    let domain = match domain {
        Some(d) => d.trim_end_matches('.').to_ascii_lowercase(),
        None => match name.split_once('.') {
            Some((_, rest)) if rest.contains('.') => rest.to_owned(),
            _ => {
                return Err(format!(
                    "{name:?}: give --domain (the apex of a zone needs it)"
                ))
            }
        },
    };
    check_hostname(&domain)?;
    if name == domain {
        return Ok(("@".to_owned(), domain));
    }
    match name.strip_suffix(&format!(".{domain}")) {
        Some(record) => Ok((record.to_owned(), domain)),
        None => Err(format!("{name:?} is not inside the domain {domain:?}")),
    }
}

/// Plans (and with `apply`, makes) the changes; see the module docs. A
/// tag with no droplets would delete every record: refused unless
/// `allow_empty`.
#[allow(clippy::too_many_arguments)]
pub async fn point(
    client: &Client,
    store: &Store,
    name: &str,
    domain: Option<&str>,
    tag: &str,
    ttl: u32,
    apply: bool,
    allow_empty: bool,
    actor: &str,
    now: i64,
) -> Result<Pointed, DnsError> {
    if ttl < MIN_TTL {
        return Err(DnsError::Usage(format!(
            "--ttl {ttl} is under DigitalOcean's minimum of {MIN_TTL}"
        )));
    }
    let (record_name, domain) = split_name(name, domain).map_err(DnsError::Usage)?;
    let fqdn = if record_name == "@" {
        domain.clone()
    } else {
        format!("{record_name}.{domain}")
    };
    let wanted: BTreeSet<Ipv4Addr> = client
        .droplets_by_tag(tag)
        .await?
        .iter()
        .filter_map(super::api::Droplet::public_ipv4)
        .collect();
    if wanted.is_empty() && !allow_empty {
        return Err(DnsError::Usage(format!(
            "no droplet with tag {tag:?} has a public IPv4 address: that would remove every A record of {fqdn} (--allow-empty to do so)"
        )));
    }
    let existing = client.records(&domain, "A", &fqdn).await?;
    let changes = plan(&existing, &wanted, ttl);
    if apply {
        for change in &changes {
            match change {
                Change::Create { ip } => {
                    client
                        .create_record(&domain, &record(&record_name, *ip, ttl))
                        .await?;
                }
                Change::Retime { record: id, ip, .. } => {
                    client
                        .update_record(&domain, *id, &record(&record_name, *ip, ttl))
                        .await?;
                }
                Change::Delete { record: id, .. } => client.delete_record(&domain, *id).await?,
            }
        }
        if !changes.is_empty() {
            let event = AuditEvent::success(
                DNS_RECORDS_CHANGED,
                actor,
                "dns",
                &fqdn,
                serde_json::json!({ "tag": tag, "ttl": ttl, "changes": changes }),
            );
            store.audit(&event, now).await?;
        }
    }
    Ok(Pointed {
        name: fqdn,
        domain,
        wanted: wanted.into_iter().collect(),
        ttl,
        changes,
        applied: apply,
    })
}

fn record(name: &str, ip: Ipv4Addr, ttl: u32) -> NewRecord {
    NewRecord {
        kind: "A".into(),
        name: name.to_owned(),
        data: ip.to_string(),
        ttl,
    }
}

/// The diff as printed by `dns point`.
pub fn render(p: &Pointed) -> String {
    let mut out = String::new();
    for c in &p.changes {
        out.push_str(&match c {
            Change::Create { ip } => format!("+ A {} {ip}\n", p.name),
            Change::Retime { record, ip, from } => format!(
                "~ A {} {ip} (record {record}): ttl {} -> {}\n",
                p.name,
                from.map_or("none".to_owned(), |t| t.to_string()),
                p.ttl
            ),
            Change::Delete { record, data } => format!("- A {} {data} (record {record})\n", p.name),
        });
    }
    out.push_str(&match (p.changes.len(), p.applied) {
        (0, _) => format!(
            "{} already points at {} address(es)\n",
            p.name,
            p.wanted.len()
        ),
        (n, true) => format!("applied {n} change(s) to {}\n", p.name),
        (n, false) => format!(
            "dry run: {n} change(s) to {}; --apply to make them\n",
            p.name
        ),
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: u64, data: &str, ttl: u32) -> DomainRecord {
        DomainRecord {
            id,
            kind: "A".into(),
            name: "app".into(),
            data: data.into(),
            ttl: Some(ttl),
        }
    }

    #[test]
    fn the_plan_creates_keeps_retimes_and_deletes() {
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let wanted: BTreeSet<_> = [ip("203.0.113.1"), ip("203.0.113.2"), ip("203.0.113.3")].into();
        let existing = [
            rec(1, "203.0.113.1", 300),
            rec(2, "203.0.113.2", 60),
            rec(3, "198.51.100.9", 300),
            rec(4, "203.0.113.1", 300),
        ];
        assert_eq!(
            plan(&existing, &wanted, 300),
            [
                Change::Retime {
                    record: 2,
                    ip: ip("203.0.113.2"),
                    from: Some(60)
                },
                Change::Delete {
                    record: 3,
                    data: "198.51.100.9".into()
                },
                Change::Delete {
                    record: 4,
                    data: "203.0.113.1".into()
                },
                Change::Create {
                    ip: ip("203.0.113.3")
                },
            ]
        );
        assert!(plan(
            &[rec(1, "203.0.113.1", 300)],
            &[ip("203.0.113.1")].into(),
            300
        )
        .is_empty());
    }

    #[test]
    fn names_split_into_record_and_domain() {
        assert_eq!(
            split_name("app.example.com", None).unwrap(),
            ("app".into(), "example.com".into())
        );
        assert_eq!(
            split_name("a.b.example.com", Some("example.com")).unwrap(),
            ("a.b".into(), "example.com".into())
        );
        assert_eq!(
            split_name("example.com", Some("example.com")).unwrap(),
            ("@".into(), "example.com".into())
        );
        assert!(split_name("example.com", None)
            .unwrap_err()
            .contains("--domain"));
        assert!(split_name("app.other.org", Some("example.com")).is_err());
        assert!(split_name("bad name.example.com", None).is_err());
    }
}
