//! CA rotation in phases, as files of the data dir (so `slipway-controller
//! ca rotate` works beside a running `serve`, which watches them):
//!
//! ```text
//! (none) ──start──▶ started ──finish──▶ (none)
//! ```
//!
//! - **start**: a new CA is made (`ca-next.pem`, `ca-next.key`); `ca.pem`
//!   becomes the trust bundle: the current CA first, then the new one; the
//!   state is written to `ca-rotation.json`. From then on the controller
//!   trusts client certificates of either CA and signs new ones (every
//!   enrollment and renewal) with the new CA; the server certificate stays
//!   on the current CA, so agents that have not had the bundle yet (offline
//!   at start) still connect, get the bundle and renew.
//! - **finish**: the new CA becomes the only one: `ca.key` then `ca.pem`
//!   are replaced by it, the server certificate is reissued from it and
//!   certificates of the old CA are refused.
//!
//! Every step is a write to a temp file, fsync, rename, so a crash leaves
//! a data dir the controller loads ([`super::ca::Ca::load_existing`] picks
//! the signing CA by key, not by order).

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ca::{
    Ca, CaError, CA_CERT_FILE, CA_KEY_FILE, NEXT_CA_CERT_FILE, NEXT_CA_KEY_FILE, SERVER_CERT_FILE,
    SERVER_HOSTS_FILE,
};
use super::crypto;

/// The rotation in progress, if any.
pub const ROTATION_FILE: &str = "ca-rotation.json";

/// A rotation in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rotation {
    /// "started" (the only phase between start and finish).
    pub phase: String,
    /// When it started (seconds since the epoch): node certificates issued
    /// since are the new CA's.
    pub started_at: i64,
    /// The CA being replaced.
    pub old_ca_sha256: String,
    /// The new CA.
    pub new_ca_sha256: String,
    /// `start --now`: agents renew onto the new CA as soon as they have the
    /// bundle, instead of at their next renewal.
    pub renew_now: bool,
    /// When a running controller began signing with the new CA (it reads
    /// the files within seconds of `start`); unset if none ran then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_since: Option<i64>,
}

impl Rotation {
    /// Node certificates issued before this are the old CA's.
    pub fn new_ca_since(&self) -> i64 {
        self.signing_since
            .unwrap_or(self.started_at)
            .max(self.started_at)
    }
}

/// Records that a running controller signs with the new CA from `now` on
/// (once per rotation).
pub fn mark_signing(data_dir: &Path, now: i64) -> Result<(), RotationError> {
    let Some(mut rotation) = current(data_dir)? else {
        return Ok(());
    };
    if rotation.signing_since.is_some() {
        return Ok(());
    }
    rotation.signing_since = Some(now);
    let json = serde_json::to_string_pretty(&rotation).map_err(|e| RotationError::State {
        path: data_dir.join(ROTATION_FILE),
        why: e.to_string(),
    })?;
    write(data_dir, ROTATION_FILE, &format!("{json}\n"), 0o644)
}

/// Why a rotation step was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    /// `start` while one runs.
    #[error("a CA rotation is already in progress (started {started}); finish it first")]
    InProgress {
        /// When it started (RFC 3339).
        started: String,
    },
    /// `finish` with none.
    #[error("no CA rotation is in progress (start one with `ca rotate start`)")]
    NotStarted,
    /// The state file cannot be read.
    #[error("{}: {why}", path.display())]
    State {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The CA files.
    #[error(transparent)]
    Ca(#[from] CaError),
}

impl RotationError {
    /// The operator's mistake (exit 64) rather than a failure.
    pub fn is_usage(&self) -> bool {
        matches!(self, Self::InProgress { .. } | Self::NotStarted)
    }
}

/// The rotation in progress in `data_dir`, if any.
pub fn current(data_dir: &Path) -> Result<Option<Rotation>, RotationError> {
    let path = data_dir.join(ROTATION_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(RotationError::State {
                path,
                why: e.to_string(),
            })
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| RotationError::State {
            path,
            why: e.to_string(),
        })
}

/// `ca rotate start`: makes the new CA and the trust bundle (see the
/// module doc). `now`: seconds since the epoch.
pub fn start(data_dir: &Path, renew_now: bool, now: i64) -> Result<Rotation, RotationError> {
    if let Some(r) = current(data_dir)? {
        return Err(RotationError::InProgress {
            started: crate::rfc3339(r.started_at),
        });
    }
    let ca = Ca::load_existing(data_dir)?;
    let (next_pem, next_key) = Ca::generate()?;
    let current_pem =
        fs::read_to_string(data_dir.join(CA_CERT_FILE)).map_err(|e| RotationError::State {
            path: data_dir.join(CA_CERT_FILE),
            why: e.to_string(),
        })?;
    // Key, certificate, bundle, state: until the state file is written no
    // rotation is under way, and a `start` again begins afresh.
    write(data_dir, NEXT_CA_KEY_FILE, &next_key, 0o600)?;
    write(data_dir, NEXT_CA_CERT_FILE, &next_pem, 0o644)?;
    let next = Ca::load_existing(data_dir)?;
    let new_ca_sha256 = next
        .next_fingerprint()
        .ok_or_else(|| RotationError::State {
            path: data_dir.join(NEXT_CA_CERT_FILE),
            why: "the new CA was not loaded".to_owned(),
        })?;
    let old_ca_sha256 = ca.fingerprint();
    // Only the current CA's block(s) of ca.pem, then the new one.
    let mut bundle = first_pem_block(&current_pem);
    bundle.push_str(&next_pem);
    write(data_dir, CA_CERT_FILE, &bundle, 0o644)?;
    let rotation = Rotation {
        phase: "started".to_owned(),
        started_at: now,
        old_ca_sha256,
        new_ca_sha256,
        renew_now,
        signing_since: None,
    };
    let json = serde_json::to_string_pretty(&rotation).map_err(|e| RotationError::State {
        path: data_dir.join(ROTATION_FILE),
        why: e.to_string(),
    })?;
    write(data_dir, ROTATION_FILE, &format!("{json}\n"), 0o644)?;
    Ok(rotation)
}

/// `ca rotate finish`: the new CA becomes the only one (see the module
/// doc); returns the rotation that ended.
pub fn finish(data_dir: &Path) -> Result<Rotation, RotationError> {
    let rotation = current(data_dir)?.ok_or(RotationError::NotStarted)?;
    let read = |file: &str| {
        fs::read_to_string(data_dir.join(file)).map_err(|e| RotationError::State {
            path: data_dir.join(file),
            why: e.to_string(),
        })
    };
    let next_key = read(NEXT_CA_KEY_FILE)?;
    let next_pem = read(NEXT_CA_CERT_FILE)?;
    // The server certificate is the old CA's: a start without a running
    // serve must issue a new one (a running one does it at once).
    for file in [SERVER_HOSTS_FILE, SERVER_CERT_FILE] {
        let _ = fs::remove_file(data_dir.join(file));
    }
    write(data_dir, CA_KEY_FILE, &next_key, 0o600)?;
    write(data_dir, CA_CERT_FILE, &next_pem, 0o644)?;
    for file in [NEXT_CA_KEY_FILE, NEXT_CA_CERT_FILE, ROTATION_FILE] {
        let _ = fs::remove_file(data_dir.join(file));
    }
    Ok(rotation)
}

/// The first PEM block of a file (the current CA of `ca.pem`).
fn first_pem_block(pem: &str) -> String {
    const END: &str = "-----END CERTIFICATE-----";
    match pem.find(END) {
        Some(at) => format!("{}\n", &pem[..at + END.len()]),
        None => pem.to_owned(),
    }
}

fn write(data_dir: &Path, file: &str, contents: &str, mode: u32) -> Result<(), RotationError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = data_dir.join(file);
    let err = |e: std::io::Error| RotationError::State {
        path: path.clone(),
        why: e.to_string(),
    };
    let tmp = data_dir.join(format!(
        ".{file}.tmp-{}",
        crypto::random_hex::<4>().map_err(|e| RotationError::State {
            path: path.clone(),
            why: e.to_string(),
        })?
    ));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(contents.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    fs::rename(&tmp, &path).map_err(err)?;
    fs::File::open(data_dir)
        .and_then(|d| d.sync_all())
        .map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_then_finish_moves_every_signature_to_the_new_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let old = ca.fingerprint();
        assert!(current(dir.path()).unwrap().is_none());
        assert!(matches!(
            finish(dir.path()).unwrap_err(),
            RotationError::NotStarted
        ));

        let r = start(dir.path(), true, 1000).unwrap();
        assert_eq!(r.old_ca_sha256, old);
        assert_eq!(current(dir.path()).unwrap().as_ref(), Some(&r));
        assert!(start(dir.path(), false, 1001).unwrap_err().is_usage());
        // The running controller's Ca sees both, still signs the server
        // with the old one and clients with the new.
        assert!(ca.reload(dir.path()).unwrap());
        assert_eq!(ca.trusted().len(), 2);
        assert_eq!(ca.fingerprint(), old);
        assert_eq!(ca.next_fingerprint().as_deref(), Some(&*r.new_ca_sha256));
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        let (op, _) = ca
            .issue_operator(None, "op-1", std::time::Duration::from_secs(60))
            .unwrap();
        assert!(verifies(&ca.trusted()[1..], &op.pem));
        assert!(!verifies(&ca.trusted()[..1], &op.pem));

        let ended = finish(dir.path()).unwrap();
        assert_eq!(ended, r);
        assert!(ca.reload(dir.path()).unwrap());
        assert_eq!(ca.trusted().len(), 1);
        assert_eq!(ca.fingerprint(), r.new_ca_sha256);
        assert_eq!(ca.next_fingerprint(), None);
        assert!(!dir.path().join(SERVER_CERT_FILE).exists());
        assert!(current(dir.path()).unwrap().is_none());
        // A fresh load agrees.
        assert_eq!(
            Ca::load_existing(dir.path()).unwrap().fingerprint(),
            r.new_ca_sha256
        );
    }

    fn verifies(roots: &[rustls::pki_types::CertificateDer<'static>], pem: &str) -> bool {
        use rustls::pki_types::pem::PemObject as _;
        let mut store = rustls::RootCertStore::empty();
        for r in roots {
            store.add(r.clone()).unwrap();
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            std::sync::Arc::new(store),
            crypto::provider(),
        )
        .build()
        .unwrap();
        let leaf = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        verifier
            .verify_client_cert(&leaf, &[], rustls::pki_types::UnixTime::now())
            .is_ok()
    }
}
