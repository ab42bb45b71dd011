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
        // The CA file of `sslrootcert` (and a client certificate and key)
        // must be there now, not at the first connection.
        for (key, value) in query_pairs(text) {
            if matches!(key.as_str(), "sslrootcert" | "sslcert" | "sslkey") {
                let path = std::path::Path::new(&value);
                if !path.is_file() {
                    return Err(format!(
                        "{key}={value}: no such file (the PEM file it names must be readable \
                         by the controller)"
                    ));
                }
            }
        }
        Ok(Self(text.to_owned()))
    }

    /// The URL itself, password included: only for connecting.
    pub(crate) fn secret(&self) -> &str {
        &self.0
    }
}

/// The query parameters of `url`, percent-decoded.
fn query_pairs(url: &str) -> Vec<(String, String)> {
    url::Url::parse(url)
        .map(|u| {
            u.query_pairs()
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        })
        .unwrap_or_default()
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

    #[test]
    fn a_tls_file_that_is_not_there_is_named() {
        let err = PostgresUrl::parse(
            "postgres://u:pw@db.example:25060/slipway?sslmode=verify-full&sslrootcert=%2Fnope%2Fca.pem",
        )
        .unwrap_err();
        assert!(
            err.contains("sslrootcert=/nope/ca.pem: no such file"),
            "{err}"
        );
        assert!(!err.contains("pw"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "x").unwrap();
        PostgresUrl::parse(&format!(
            "postgres://u@h/d?sslmode=verify-full&sslrootcert={}",
            ca.display()
        ))
        .unwrap();
    }

    /// A CA and a server certificate for 127.0.0.1 signed by it: PEM of
    /// (CA, server certificate, server key).
    fn server_pki() -> (String, String, String) {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "test database CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::from_ca_cert_der(ca.der(), &ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let server = CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        (ca.pem(), server.pem(), key.serialize_pem())
    }

    /// TLS to PostgreSQL: `sslmode=verify-full` with the server's CA
    /// connects (the store opens and migrates), with another CA it is
    /// refused, and `sslmode=require` against a server without TLS says so.
    #[tokio::test]
    async fn the_store_talks_tls_to_postgres_and_checks_the_server() {
        use crate::store::testing::test_postgres::{self, OwnServer};
        use crate::store::Store;
        use std::os::unix::fs::PermissionsExt as _;
        if test_postgres::skipped() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let (ca, cert, key) = server_pki();
        let (other_ca, _, _) = server_pki();
        let path = |name: &str| dir.path().join(name);
        std::fs::write(path("ca.pem"), ca).unwrap();
        std::fs::write(path("other-ca.pem"), other_ca).unwrap();
        std::fs::write(path("server.crt"), cert).unwrap();
        std::fs::write(path("server.key"), key).unwrap();
        std::fs::set_permissions(path("server.key"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        // The server runs as `postgres` when the tests run as root: its
        // key must be its own.
        if nix::unistd::Uid::effective().is_root() {
            let user = nix::unistd::User::from_name("postgres").unwrap().unwrap();
            for file in ["server.crt", "server.key"] {
                std::os::unix::fs::chown(
                    path(file),
                    Some(user.uid.as_raw()),
                    Some(user.gid.as_raw()),
                )
                .unwrap();
            }
        }
        let (crt, key) = (path("server.crt"), path("server.key"));
        let server = OwnServer::start(&[
            ("ssl", "on"),
            ("ssl_cert_file", crt.to_str().unwrap()),
            ("ssl_key_file", key.to_str().unwrap()),
        ])
        .unwrap();
        let url = server.database_url().unwrap();
        let with = |query: &str| PostgresUrl::parse(&format!("{url}?{query}")).unwrap();

        let store = Store::open_postgres(&with(&format!(
            "sslmode=verify-full&sslrootcert={}",
            path("ca.pem").display()
        )))
        .await
        .unwrap();
        let tls: bool =
            sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                .fetch_one(&store.pool)
                .await
                .unwrap();
        assert!(tls, "the connection is not encrypted");

        let refused = Store::open_postgres(&with(&format!(
            "sslmode=verify-full&sslrootcert={}",
            path("other-ca.pem").display()
        )))
        .await
        .unwrap_err()
        .to_string();
        assert!(refused.to_lowercase().contains("certificate"), "{refused}");

        // A server without TLS: `require` is refused, not sent in clear.
        let plain = OwnServer::start(&[]).unwrap();
        let url = plain.database_url().unwrap();
        let refused =
            Store::open_postgres(&PostgresUrl::parse(&format!("{url}?sslmode=require")).unwrap())
                .await
                .unwrap_err()
                .to_string();
        assert!(
            refused.to_lowercase().contains("tls") || refused.to_lowercase().contains("ssl"),
            "{refused}"
        );
    }
}
