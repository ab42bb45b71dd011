//! `database_url`: which engine the store runs on. Unset is the SQLite file
//! in the data dir; `postgres://…` (or `postgresql://…`) is a PostgreSQL
//! database. The URL may carry a password, so it is only ever shown
//! redacted ([`redact`]).

use std::fmt;
use std::str::FromStr;

use sqlx::postgres::PgConnectOptions;

/// A checked `postgres://…` URL. `Debug` and `Display` show it with the
/// password replaced, so it can go into errors and logs.
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresUrl(String);

impl PostgresUrl {
    /// Checks `text` as a `database_url`: `Err` says what is wrong (and
    /// never repeats a password).
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let scheme = text.split_once("://").map(|(scheme, _)| scheme);
        match scheme {
            Some("postgres" | "postgresql") => {}
            Some("sqlite") => {
                return Err("SQLite is the default: leave database_url unset and the \
                            database is controller.db in the data dir"
                    .to_owned())
            }
            _ if text.is_empty() => {
                return Err("expected postgres://USER:PASSWORD@HOST:PORT/DATABASE \
                            (or unset for SQLite in the data dir), got an empty value"
                    .to_owned())
            }
            _ => {
                return Err("expected postgres://USER:PASSWORD@HOST:PORT/DATABASE \
                            (or unset for SQLite in the data dir)"
                    .to_owned())
            }
        }
        // sqlx's own parser, so what passes here also connects; its
        // messages name the part (port, parameter) and not the password.
        PgConnectOptions::from_str(text).map_err(|e| format!("not a PostgreSQL URL: {e}"))?;
        Ok(Self(text.to_owned()))
    }

    /// The URL itself, password included: only for connecting.
    pub(crate) fn secret(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PostgresUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(&self.0))
    }
}

impl fmt::Debug for PostgresUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PostgresUrl({})", redact(&self.0))
    }
}

/// `url` with the password (in the user info, or a `password=` query
/// parameter) replaced by `***`.
pub fn redact(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some(parts) => parts,
        None => return url.to_owned(),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{user}:***@{host}"),
            None => format!("{userinfo}@{host}"),
        },
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((key, _)) if key.eq_ignore_ascii_case("password") => {
                        format!("{key}=***")
                    }
                    _ => pair.to_owned(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_owned(),
    };
    format!("{scheme}://{authority}{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_urls_are_taken_and_shown_without_their_password() {
        let url = PostgresUrl::parse("postgres://slipway:s3cret@db.internal:5432/slipway").unwrap();
        assert_eq!(
            url.secret(),
            "postgres://slipway:s3cret@db.internal:5432/slipway"
        );
        assert_eq!(
            url.to_string(),
            "postgres://slipway:***@db.internal:5432/slipway"
        );
        assert!(!format!("{url:?}").contains("s3cret"));
        let url = PostgresUrl::parse("postgresql://u@h/d?password=pw&sslmode=require").unwrap();
        assert_eq!(
            url.to_string(),
            "postgresql://u@h/d?password=***&sslmode=require"
        );
        assert_eq!(redact("postgres://h/d"), "postgres://h/d");
    }

    #[test]
    fn other_values_are_refused_saying_why() {
        for (text, want) in [
            ("", "got an empty value"),
            ("mysql://u:pw@h/d", "expected postgres://"),
            ("/var/lib/slipway/controller.db", "expected postgres://"),
            (
                "sqlite:///var/lib/slipway/controller.db",
                "leave database_url unset",
            ),
            ("postgres://u:pw@h:notaport/d", "not a PostgreSQL URL"),
        ] {
            let err = PostgresUrl::parse(text).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
            assert!(!err.contains("pw"), "{text}: {err}");
        }
    }
}
