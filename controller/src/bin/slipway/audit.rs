//! `audit`: the audit log, as lines or `--json`.

use std::process::ExitCode;

use clap::Args;
use slipway_proto::client;
use slipway_proto::limits;
use slipway_proto::v1::ListAuditRequest;

use crate::api::{status_error, Api};
use crate::Usage;

#[derive(Debug, Args)]
pub(crate) struct AuditArgs {
    /// Only events this recent (90s, 30m, 1h, 7d) or at or after this
    /// time (RFC 3339, e.g. 2026-01-02T03:04:05Z).
    #[arg(long)]
    since: Option<String>,
    /// Print JSON (an array of events).
    #[arg(long)]
    json: bool,
}

pub(crate) async fn audit(api: &mut Api, args: &AuditArgs) -> anyhow::Result<ExitCode> {
    let since_unix = match &args.since {
        Some(since) => since_unix(since, time::OffsetDateTime::now_utc().unix_timestamp())?,
        None => 0,
    };
    let events = api
        .client
        .list_audit(client::authed(ListAuditRequest { since_unix }, &api.token))
        .await
        .map_err(|s| status_error("listing audit events", s))?
        .into_inner()
        .events;
    if args.json {
        let json: Vec<serde_json::Value> = events
            .iter()
            .map(|e| {
                serde_json::json!({
                    "id": e.id,
                    "created_at": e.created_at_unix,
                    "event_type": e.event_type,
                    "actor": e.actor,
                    "resource_type": e.resource_type,
                    "resource_id": e.resource_id,
                    "details": serde_json::from_str::<serde_json::Value>(&e.details_json)
                        .unwrap_or(serde_json::Value::Null),
                    "status": e.status,
                    "error_message": if e.error_message.is_empty() { None } else { Some(&e.error_message) },
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(ExitCode::SUCCESS);
    }
    let format = time::format_description::well_known::Rfc3339;
    for e in &events {
        let when = time::OffsetDateTime::from_unix_timestamp(e.created_at_unix)
            .ok()
            .and_then(|t| t.format(&format).ok())
            .unwrap_or_else(|| e.created_at_unix.to_string());
        // Actors, resources and errors can carry what a peer sent: one
        // line each, control characters escaped, so no row can be forged.
        let line = |text: &str| limits::one_line(text, limits::MAX_MESSAGE);
        let error = if e.error_message.is_empty() {
            String::new()
        } else {
            format!("  {}", line(&e.error_message))
        };
        println!(
            "{when}  {:<22} {:<7} {:<18} {}:{}{error}",
            line(&e.event_type),
            line(&e.status),
            line(&e.actor),
            line(&e.resource_type),
            line(&e.resource_id)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `--since`: a duration back from `now` (`90s`, `30m`, `1h`, `7d`) or an
/// RFC 3339 time, as seconds since the epoch.
fn since_unix(since: &str, now: i64) -> Result<i64, Usage> {
    if let Some(ago) = slipway_proto::cli::parse_duration(since) {
        return Ok(now.saturating_sub(i64::try_from(ago.as_secs()).unwrap_or(i64::MAX)));
    }
    time::OffsetDateTime::parse(since, &time::format_description::well_known::Rfc3339)
        .map(time::OffsetDateTime::unix_timestamp)
        .map_err(|_| {
            Usage(format!(
                "--since {since:?} is neither a duration (90s, 30m, 1h, 7d) nor an RFC 3339 time (2026-01-02T03:04:05Z)"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_a_duration_or_an_rfc3339_time() {
        assert_eq!(since_unix("1h", 10_000).unwrap(), 10_000 - 3600);
        assert_eq!(since_unix("90s", 100).unwrap(), 10);
        assert_eq!(
            since_unix("2026-01-02T03:04:05Z", 0).unwrap(),
            time::macros::datetime!(2026-01-02 03:04:05 UTC).unix_timestamp()
        );
        assert_eq!(
            since_unix("2026-01-02T04:04:05+01:00", 0).unwrap(),
            time::macros::datetime!(2026-01-02 03:04:05 UTC).unix_timestamp()
        );
        let err = since_unix("yesterday", 0).unwrap_err().to_string();
        assert!(err.contains("\"yesterday\" is neither"), "{err}");
    }
}
