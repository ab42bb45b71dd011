//! Certificate health of the whole system: how long the CA, the server
//! certificate and every live node's and operator's certificate have left,
//! and what `slipway status` makes of it (a note under
//! [`WARN_BELOW`], a problem under [`FAIL_BELOW`] or once expired).
//!
//! [`system_cert_health`] gathers it from the data dir and the store; the
//! judgement ([`CertHealth::level`], [`SystemCertHealth::findings`]) is
//! pure. The fleet status embeds it, and anything else that wants the
//! figures (a metrics endpoint) calls [`system_cert_health`] the same way.

use std::path::Path;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateDer;
use slipway_proto::span;

use crate::pki::ca::{common_name_of, validity_of, CA_CERT_FILE, SERVER_CERT_FILE};
use crate::pki::rotation::Rotation;
use crate::store::{Store, StoreError};

/// One day, in seconds.
const DAY: i64 = 24 * 60 * 60;
/// A certificate with less than this left is worth a note (status still
/// exits 0): someone has weeks to act.
pub const WARN_BELOW: i64 = 30 * DAY;
/// A certificate with less than this left (or expired) is a problem:
/// `slipway status` exits 1.
pub const FAIL_BELOW: i64 = 7 * DAY;

/// Which certificate of the system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CertKind {
    /// The controller's CA: every other certificate chains to it.
    Ca,
    /// The controller's TLS server certificate.
    Server,
    /// A node's client certificate (its newest).
    Node,
    /// An operator's client certificate.
    Operator,
}

impl CertKind {
    /// The word shown and sent: "ca", "server", "node", "operator".
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ca => "ca",
            Self::Server => "server",
            Self::Node => "node",
            Self::Operator => "operator",
        }
    }
}

/// What status makes of a certificate's time left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CertLevel {
    /// Nothing to do.
    Ok,
    /// A note: renew or replace it soon.
    Warning,
    /// A problem: it expires within days, or has expired.
    Failing,
}

impl CertLevel {
    /// The word shown and sent: "ok", "warning", "failing".
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Warning => "warning",
            Self::Failing => "failing",
        }
    }
}

/// One certificate's validity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertHealth {
    /// Which certificate.
    pub kind: CertKind,
    /// Whose: node or operator name, "controller", the CA's common name.
    pub name: String,
    /// Node or operator id, the CA's sha256 fingerprint, "" for the server.
    pub id: String,
    /// Valid from (seconds since the epoch).
    pub not_before: i64,
    /// Valid until (seconds since the epoch).
    pub not_after: i64,
}

impl CertHealth {
    /// True for the certificates renewed without anyone acting: the server
    /// certificate (by the controller) and node certificates (by their
    /// agents), both at two thirds of their life.
    pub fn renewed_automatically(&self) -> bool {
        matches!(self.kind, CertKind::Server | CertKind::Node)
    }

    /// Seconds left at `now` (negative once expired).
    pub fn secs_left(&self, now: i64) -> i64 {
        self.not_after - now
    }

    /// Whole days left at `now`, rounded down (-1 the first day after
    /// expiry).
    pub fn days_left(&self, now: i64) -> i64 {
        self.secs_left(now).div_euclid(DAY)
    }

    /// Below how many seconds left it is a warning, and a failure.
    ///
    /// [`WARN_BELOW`] and [`FAIL_BELOW`] for every certificate, except
    /// that one renewed automatically with a short life (a node's 7 days)
    /// is judged against its life instead: a warning once a quarter of it
    /// is left (its renewal, due at two thirds, is overdue), a failure at
    /// an eighth — otherwise every healthy node would fail at once.
    pub fn thresholds(&self) -> (i64, i64) {
        if !self.renewed_automatically() {
            return (WARN_BELOW, FAIL_BELOW);
        }
        let life = (self.not_after - self.not_before).max(0);
        (WARN_BELOW.min(life / 4), FAIL_BELOW.min(life / 8))
    }

    /// The level at `now`.
    pub fn level(&self, now: i64) -> CertLevel {
        let left = self.secs_left(now);
        let (warn, fail) = self.thresholds();
        if left <= 0 || left < fail {
            CertLevel::Failing
        } else if left < warn {
            CertLevel::Warning
        } else {
            CertLevel::Ok
        }
    }

    /// Who it is, in a sentence.
    fn subject(&self) -> String {
        match self.kind {
            CertKind::Ca => format!("the CA {}", self.name),
            CertKind::Server => "the controller's server certificate".to_owned(),
            CertKind::Node => format!("node {}'s certificate", self.name),
            CertKind::Operator => format!("operator {}'s certificate", self.name),
        }
    }

    /// What to do about it.
    fn remedy(&self) -> &'static str {
        match self.kind {
            CertKind::Ca => "rotate the CA (slipway-controller ca rotate start)",
            CertKind::Server => {
                "the controller renews it at two thirds of its life: see its log for \
                 SERVER_CERT_RENEW_FAILED"
            }
            CertKind::Node => {
                "its agent renews it while connected; once expired, re-enroll the node with \
                 `slipway-agent enroll --replace --token …`"
            }
            CertKind::Operator => {
                "create a new one (slipway-controller operator create) and revoke this one"
            }
        }
    }

    /// The status line for it at `now`, if it deserves one.
    pub fn finding(&self, now: i64) -> Option<(CertLevel, String)> {
        let level = self.level(now);
        if level == CertLevel::Ok {
            return None;
        }
        let left = self.secs_left(now);
        let when = if left <= 0 {
            format!("expired {} ago", span(-left))
        } else {
            format!("expires in {}", span(left))
        };
        Some((
            level,
            format!(
                "{} {when} ({}): {}",
                self.subject(),
                crate::rfc3339(self.not_after),
                self.remedy()
            ),
        ))
    }
}

/// The certificate health of the whole system at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SystemCertHealth {
    /// When it was gathered (seconds since the epoch).
    pub now: i64,
    /// Every certificate in use, soonest expiry first.
    pub certs: Vec<CertHealth>,
}

impl SystemCertHealth {
    /// `certs` as of `now`, soonest expiry first.
    pub fn new(now: i64, mut certs: Vec<CertHealth>) -> Self {
        certs.sort_by(|a, b| (a.not_after, a.kind, &a.name).cmp(&(b.not_after, b.kind, &b.name)));
        Self { now, certs }
    }

    /// The worst level of any certificate (`Ok` when there is none).
    pub fn worst(&self) -> CertLevel {
        self.certs
            .iter()
            .map(|c| c.level(self.now))
            .max()
            .unwrap_or(CertLevel::Ok)
    }

    /// (problems, notes): a line for each failing, and each warning,
    /// certificate.
    pub fn findings(&self) -> (Vec<String>, Vec<String>) {
        let mut problems = Vec::new();
        let mut notes = Vec::new();
        for (level, line) in self.certs.iter().filter_map(|c| c.finding(self.now)) {
            match level {
                CertLevel::Failing => problems.push(line),
                CertLevel::Warning => notes.push(line),
                CertLevel::Ok => {}
            }
        }
        (problems, notes)
    }
}

/// Why the certificate health could not be gathered.
#[derive(Debug, thiserror::Error)]
pub enum CertHealthError {
    /// A certificate file of the data dir is missing or unreadable.
    #[error("{}: {why}", path.display())]
    File {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The CA(s) and the server certificate, read from `data_dir` (blocking).
/// `ca.pem` may hold several CAs (during a CA rotation, every one trusted).
pub fn data_dir_certs(data_dir: &Path) -> Result<Vec<CertHealth>, CertHealthError> {
    let mut out = Vec::new();
    for (file, kind) in [
        (CA_CERT_FILE, CertKind::Ca),
        (SERVER_CERT_FILE, CertKind::Server),
    ] {
        let path = data_dir.join(file);
        let bad = |why: String| CertHealthError::File {
            path: path.clone(),
            why,
        };
        let pem = std::fs::read(&path).map_err(|e| bad(e.to_string()))?;
        let ders: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<_, _>>()
            .map_err(|e| bad(format!("not PEM certificates: {e}")))?;
        if ders.is_empty() {
            return Err(bad("holds no certificate".to_owned()));
        }
        // server.pem is the leaf alone; ca.pem every trusted CA.
        let take = if kind == CertKind::Server {
            1
        } else {
            ders.len()
        };
        for der in ders.iter().take(take) {
            let (not_before, not_after) =
                validity_of(der).ok_or_else(|| bad("a certificate cannot be parsed".to_owned()))?;
            let (name, id) = match kind {
                CertKind::Ca => (
                    common_name_of(der).unwrap_or_else(|| "(no name)".to_owned()),
                    crate::pki::crypto::sha256_hex(der),
                ),
                _ => ("controller".to_owned(), String::new()),
            };
            out.push(CertHealth {
                kind,
                name,
                id,
                not_before,
                not_after,
            });
        }
    }
    Ok(out)
}

/// The certificate health of the whole system at `now`: the CA(s) and the
/// server certificate from `data_dir`, the newest certificate of every
/// live (unrevoked) node and every unrevoked operator certificate from
/// `store`. What `slipway status` shows, and what a metrics endpoint can
/// export (days left per certificate, [`CertHealth::level`]).
pub async fn system_cert_health(
    data_dir: &Path,
    store: &Store,
    now: i64,
) -> Result<SystemCertHealth, CertHealthError> {
    let nodes = store.live_node_certs().await?;
    system_cert_health_with(data_dir, store, nodes, now).await
}

/// [`system_cert_health`] with the live nodes' certificates already read
/// ([`crate::store::Store::fleet_and_certs`]).
pub async fn system_cert_health_with(
    data_dir: &Path,
    store: &Store,
    nodes: Vec<crate::store::NodeCert>,
    now: i64,
) -> Result<SystemCertHealth, CertHealthError> {
    let dir = data_dir.to_owned();
    let mut certs = tokio::task::spawn_blocking(move || data_dir_certs(&dir))
        .await
        .map_err(|e| CertHealthError::File {
            path: data_dir.to_owned(),
            why: format!("reading task failed: {e}"),
        })??;
    for node in nodes {
        certs.push(CertHealth {
            kind: CertKind::Node,
            name: node.name,
            id: node.id,
            not_before: node.issued_at,
            not_after: node.expires_at,
        });
    }
    for op in store.operators().await? {
        if op.revoked_at.is_some() {
            continue;
        }
        certs.push(CertHealth {
            kind: CertKind::Operator,
            name: op.name,
            id: op.id,
            not_before: op.created_at,
            not_after: op.expires_at,
        });
    }
    Ok(SystemCertHealth::new(now, certs))
}

/// During `rotation`: the live nodes whose newest certificate was signed
/// by the old CA, by name.
pub async fn nodes_on_old_ca(
    store: &Store,
    rotation: &Rotation,
) -> Result<Vec<String>, StoreError> {
    Ok(old_ca_certs(store, rotation)
        .await?
        .map(|c| c.name)
        .collect())
}

/// The ids of the nodes [`nodes_on_old_ca`] names.
pub async fn node_ids_on_old_ca(
    store: &Store,
    rotation: &Rotation,
) -> Result<Vec<String>, StoreError> {
    Ok(old_ca_certs(store, rotation).await?.map(|c| c.id).collect())
}

async fn old_ca_certs(
    store: &Store,
    rotation: &Rotation,
) -> Result<impl Iterator<Item = crate::store::NodeCert>, StoreError> {
    let new_ca = rotation.new_ca_sha256.clone();
    let since = rotation.new_ca_since();
    Ok(store
        .live_node_certs()
        .await?
        .into_iter()
        .filter(move |c| on_old_ca(c, &new_ca, since)))
}

/// Whether `cert` was signed by a CA other than `new_ca`; certificates
/// recorded without their CA are judged by issue time (`since`: when the
/// new CA began signing).
fn on_old_ca(cert: &crate::store::NodeCert, new_ca: &str, since: i64) -> bool {
    match &cert.ca_sha256 {
        Some(ca) => ca != new_ca,
        None => cert.issued_at < since,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signing_ca_decides_not_the_second_of_issue() {
        let cert = |issued_at, ca: Option<&str>| crate::store::NodeCert {
            id: "n".to_owned(),
            name: "n".to_owned(),
            issued_at,
            expires_at: issued_at + 100,
            ca_sha256: ca.map(str::to_owned),
        };
        // Issued in the very second the new CA began signing: its CA says
        // which one it is, either way.
        assert!(on_old_ca(&cert(1000, Some("old")), "new", 1000));
        assert!(!on_old_ca(&cert(1000, Some("new")), "new", 1000));
        assert!(on_old_ca(&cert(2000, Some("old")), "new", 1000));
        // Recorded before the store kept the CA: by time.
        assert!(on_old_ca(&cert(999, None), "new", 1000));
        assert!(!on_old_ca(&cert(1000, None), "new", 1000));
    }

    fn cert(kind: CertKind, life_days: i64, left_secs: i64) -> CertHealth {
        let now = 1_000_000_000;
        CertHealth {
            kind,
            name: "x".to_owned(),
            id: String::new(),
            not_before: now + left_secs - life_days * DAY,
            not_after: now + left_secs,
        }
    }

    const NOW: i64 = 1_000_000_000;

    #[test]
    fn thirty_days_warn_and_seven_fail() {
        for kind in [CertKind::Ca, CertKind::Operator, CertKind::Server] {
            let level = |left| cert(kind, 365, left).level(NOW);
            assert_eq!(level(31 * DAY), CertLevel::Ok, "{kind:?}");
            assert_eq!(level(30 * DAY), CertLevel::Ok, "{kind:?}");
            assert_eq!(level(30 * DAY - 1), CertLevel::Warning, "{kind:?}");
            assert_eq!(level(7 * DAY), CertLevel::Warning, "{kind:?}");
            assert_eq!(level(7 * DAY - 1), CertLevel::Failing, "{kind:?}");
            assert_eq!(level(0), CertLevel::Failing, "{kind:?}");
            assert_eq!(level(-9 * DAY), CertLevel::Failing, "{kind:?}");
        }
        // An operator's certificate made for 20 days warns from the start:
        // nobody renews it but its owner.
        assert_eq!(
            cert(CertKind::Operator, 20, 20 * DAY).level(NOW),
            CertLevel::Warning
        );
    }

    #[test]
    fn short_lived_automatic_certificates_are_judged_against_their_life() {
        // A node's 7-day certificate: fine until its renewal is overdue.
        let node = |left| cert(CertKind::Node, 7, left).level(NOW);
        assert_eq!(node(7 * DAY), CertLevel::Ok);
        // Past two thirds (renewal due at 56 h left), not yet a quarter.
        assert_eq!(node(50 * 3600), CertLevel::Ok);
        assert_eq!(node(42 * 3600 - 1), CertLevel::Warning);
        assert_eq!(node(21 * 3600), CertLevel::Warning);
        assert_eq!(node(21 * 3600 - 1), CertLevel::Failing);
        assert_eq!(node(-1), CertLevel::Failing);
        assert_eq!(
            cert(CertKind::Node, 7, 0).thresholds(),
            (42 * 3600, 21 * 3600)
        );
        // A long-lived server certificate keeps the plain thresholds.
        assert_eq!(
            cert(CertKind::Server, 365, 0).thresholds(),
            (WARN_BELOW, FAIL_BELOW)
        );
    }

    #[test]
    fn days_left_round_down_and_go_negative() {
        assert_eq!(cert(CertKind::Ca, 3650, 10 * DAY + 5).days_left(NOW), 10);
        assert_eq!(cert(CertKind::Ca, 3650, DAY - 1).days_left(NOW), 0);
        assert_eq!(cert(CertKind::Ca, 3650, -1).days_left(NOW), -1);
        assert_eq!(cert(CertKind::Ca, 3650, -9 * DAY).days_left(NOW), -9);
    }

    #[test]
    fn findings_say_who_when_and_what_to_do() {
        let mut expired = cert(CertKind::Node, 7, -9 * DAY);
        expired.name = "web-1".to_owned();
        let mut soon = cert(CertKind::Operator, 90, 20 * DAY);
        soon.name = "ci".to_owned();
        let fine = cert(CertKind::Ca, 3650, 3000 * DAY);
        let health = SystemCertHealth::new(NOW, vec![fine, soon, expired]);
        assert_eq!(health.certs[0].name, "web-1", "soonest first");
        assert_eq!(health.worst(), CertLevel::Failing);
        let (problems, notes) = health.findings();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("node web-1's certificate expired 9 days ago ("),
            "{problems:?}"
        );
        assert!(
            problems[0].contains("slipway-agent enroll --replace"),
            "{problems:?}"
        );
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(
            notes[0].starts_with("operator ci's certificate expires in 20 days ("),
            "{notes:?}"
        );
        assert_eq!(SystemCertHealth::new(NOW, vec![]).worst(), CertLevel::Ok);
    }

    #[test]
    fn the_data_dir_certificates_are_read_from_their_files() {
        let dir = tempfile::tempdir().unwrap();
        let ca = crate::pki::ca::Ca::load_or_create(dir.path()).unwrap();
        let server = ca
            .server_identity(
                dir.path(),
                &[],
                std::time::Duration::from_secs(40 * DAY as u64),
            )
            .unwrap();
        let certs = data_dir_certs(dir.path()).unwrap();
        assert_eq!(certs.len(), 2, "{certs:?}");
        assert_eq!(certs[0].kind, CertKind::Ca);
        assert_eq!(certs[0].id, ca.fingerprint());
        assert!(certs[0].name.starts_with("Slipway controller CA "));
        assert_eq!(certs[1].kind, CertKind::Server);
        assert_eq!(certs[1].not_after, server.not_after);
        let now = crate::now_unix();
        assert!((39..=40).contains(&certs[1].days_left(now)));
        // 40 days, renewed at two thirds: not a warning yet.
        assert_eq!(certs[1].level(now), CertLevel::Ok);

        std::fs::write(dir.path().join(SERVER_CERT_FILE), "garbage").unwrap();
        let err = data_dir_certs(dir.path()).unwrap_err().to_string();
        assert!(err.contains("server.pem"), "{err}");
    }
}
