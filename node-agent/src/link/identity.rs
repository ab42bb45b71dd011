//! The node's identity on disk: its private key and client certificate,
//! always switched together in one atomic step.
//!
//! # Layout (in the controller state dir)
//!
//! ```text
//! identity -> identity-3          the pair in use (a relative symlink)
//! identity-3/node.key, node.pem   written whole and fsynced before the switch
//! identity-2/                     the previous pair, kept for a reader that
//!                                 resolved the link just before a switch
//! node.key -> identity/node.key   for people and tools that know the old
//! node.pem -> identity/node.pem   names (they follow the switch by themselves)
//! ```
//!
//! [`install`] writes the new pair into a fresh `identity-<n>/`, then moves
//! `identity` to it with one `rename(2)` of a temp symlink and fsyncs the
//! state dir: a `kill -9` or power cut at any point leaves `identity` on a
//! complete, matching pair, old or new. [`load`] reads both files through
//! one resolution of the link, so it never mixes two pairs.
//!
//! [`recover`] runs at start: it removes what an interrupted install left
//! (temp links, unswitched dirs, pairs older than the previous one) and
//! migrates the layout older agents wrote (`node.key` and `node.pem` as
//! plain files, renewed with two renames and copies in `*.old`), picking the
//! pair whose key matches its certificate.

use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use rustls::crypto::ring::default_provider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use crate::{durable, fault};

/// The private key (mode 0600), in an identity dir and as a top-level link.
pub const KEY_FILE: &str = "node.key";
/// The client certificate, in an identity dir and as a top-level link.
pub const CERT_FILE: &str = "node.pem";
/// The symlink naming the identity dir in use.
pub const LINK: &str = "identity";
/// Identity dirs are `identity-<n>`, `n` counting up from 1.
const DIR_PREFIX: &str = "identity-";
/// Temp symlinks are `identity.tmp-<pid>-<n>` until renamed over [`LINK`].
const TEMP_PREFIX: &str = "identity.tmp-";
/// What the renewal of older agents kept beside the pair.
const OLD_SUFFIX: &str = ".old";

/// Errors reading or writing the identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "no key in {} matches its certificate (tried {tried}); re-enroll this node",
        dir.display()
    )]
    NoMatchingPair { dir: PathBuf, tried: String },
    #[error("the certificate is not for this key; not installed")]
    Mismatch,
    #[error("{} points at {target:?}, not at an identity dir", path.display())]
    BadLink { path: PathBuf, target: PathBuf },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A key and the certificate issued for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    pub key_pem: String,
    pub cert_pem: String,
}

/// Whether `key_pem`'s public key is the one `cert_pem` certifies.
pub fn pair_matches(key_pem: &str, cert_pem: &str) -> bool {
    let (Ok(cert), Ok(key)) = (
        CertificateDer::from_pem_slice(cert_pem.as_bytes()),
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes()),
    ) else {
        return false;
    };
    let Ok(signer) = default_provider().key_provider.load_private_key(key) else {
        return false;
    };
    CertifiedKey::new(vec![cert], signer).keys_match().is_ok()
}

/// The pair in use: through one resolution of [`LINK`], or the plain files
/// of the old layout when there is no link yet ([`recover`] migrates them).
/// Reads only.
pub fn load(state_dir: &Path) -> Result<Pair, IdentityError> {
    let dir = match current(state_dir)? {
        Some(n) => state_dir.join(dir_name(n)),
        None => state_dir.to_owned(),
    };
    read_pair(&dir.join(KEY_FILE), &dir.join(CERT_FILE))
}

/// The not-after (seconds since the epoch) of the certificate in use;
/// `None` when there is none or it cannot be read.
pub fn cert_not_after(state_dir: &Path) -> Option<i64> {
    use rustls::pki_types::pem::PemObject as _;
    let pair = load(state_dir).ok()?;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(pair.cert_pem.as_bytes()).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// What storing a trust bundle did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trusted {
    /// The CA file changed.
    pub changed: bool,
    /// The bundle asks for a renewal now and the certificate in use is not
    /// the signing CA's.
    pub renew: bool,
}

/// Checks `bundle` (every certificate a CA certificate; the signing CA
/// among them) and stores it as the CA file of `state_dir` (temp, fsync,
/// rename). The caller validated its limits.
pub fn store_trust(
    state_dir: &Path,
    bundle: &slipway_proto::v1::TrustBundle,
) -> Result<Trusted, String> {
    use rustls::pki_types::pem::PemObject as _;
    let ders: Vec<rustls::pki_types::CertificateDer<'static>> =
        rustls::pki_types::CertificateDer::pem_slice_iter(bundle.ca_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("ca_pem is not PEM certificates: {e}"))?;
    let mut signing = None;
    for (i, der) in ders.iter().enumerate() {
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| format!("ca_pem certificate {i} cannot be parsed: {e}"))?;
        if !cert.is_ca() {
            return Err(format!("ca_pem certificate {i} is not a CA certificate"));
        }
        if crate::digest::Sha256::of_bytes(der.as_ref()).into_string()
            == bundle.signing_ca_sha256.to_ascii_lowercase()
        {
            signing = Some(cert.subject().as_raw().to_vec());
        }
    }
    let signing = signing.ok_or_else(|| {
        format!(
            "the signing CA {} is not in the bundle",
            bundle.signing_ca_sha256
        )
    })?;
    let path = state_dir.join(super::CA_FILE);
    let changed = fs::read_to_string(&path).ok().as_deref() != Some(bundle.ca_pem.as_str());
    if changed {
        crate::durable::write_atomic(&path, bundle.ca_pem.as_bytes())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    // Our certificate's issuer is the signing CA: nothing to renew.
    let issued_by_signing = load(state_dir).ok().is_some_and(|pair| {
        rustls::pki_types::CertificateDer::from_pem_slice(pair.cert_pem.as_bytes())
            .ok()
            .and_then(|der| {
                x509_parser::parse_x509_certificate(der.as_ref())
                    .ok()
                    .map(|(_, c)| c.issuer().as_raw() == signing.as_slice())
            })
            .unwrap_or(false)
    });
    Ok(Trusted {
        changed,
        renew: bundle.renew_now && !issued_by_signing,
    })
}

/// What to tell the operator when the certificate in use has expired at
/// `now` (the controller then refuses every session): how long ago, and
/// how to bring the node back as itself. `None` while it is valid.
pub fn expired_message(state_dir: &Path, now: i64) -> Option<String> {
    let not_after = cert_not_after(state_dir)?;
    if now < not_after {
        return None;
    }
    let when = time::OffsetDateTime::from_unix_timestamp(not_after)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| not_after.to_string());
    Some(format!(
        "this node's certificate expired {} ago (not after {when}), so the controller refuses \
         it; re-enroll with `slipway-agent enroll --replace --token …` (a new join token: \
         slipway-controller token create) — the node keeps its name, tags and history",
        slipway_proto::span(now - not_after)
    ))
}

/// Makes `pair` the identity in use, in one atomic step (see the module
/// doc); returns its dir. One caller at a time (the uplink renews, `enroll`
/// runs before it).
pub fn install(state_dir: &Path, pair: &Pair) -> Result<PathBuf, IdentityError> {
    if !pair_matches(&pair.key_pem, &pair.cert_pem) {
        return Err(IdentityError::Mismatch);
    }
    let n = current(state_dir)?.map_or(1, |c| c + 1);
    let dir = state_dir.join(dir_name(n));
    // Left by an install that died before its switch: never in use.
    durable::remove_tree(&dir).map_err(io_err(&dir))?;
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(io_err(&dir))?;
    write_new(&dir.join(KEY_FILE), &pair.key_pem, 0o600)?;
    fault::point("identity_mid_write");
    write_new(&dir.join(CERT_FILE), &pair.cert_pem, 0o644)?;
    durable::fsync_dir(&dir).map_err(io_err(&dir))?;
    fault::point("identity_after_write");
    let link = state_dir.join(LINK);
    let tmp = temp_link(state_dir);
    std::os::unix::fs::symlink(dir_name(n), &tmp).map_err(io_err(&tmp))?;
    fault::point("identity_after_link");
    fs::rename(&tmp, &link).map_err(io_err(&link))?;
    durable::fsync_dir(state_dir).map_err(io_err(state_dir))?;
    fault::point("identity_after_switch");
    tidy(state_dir, n)?;
    Ok(dir)
}

/// What [`recover`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovered {
    /// Not enrolled (no identity at all).
    Nothing,
    /// The layout was in order, or its leftovers were removed.
    InPlace,
    /// The old layout was moved into an identity dir.
    Migrated {
        /// The files the pair came from, e.g. `node.key.old + node.pem`.
        from: String,
    },
}

/// At start: finishes what an interrupted [`install`] left and migrates the
/// old layout (see the module doc). Call before anything reads the identity.
pub fn recover(state_dir: &Path) -> Result<Recovered, IdentityError> {
    if !state_dir.is_dir() {
        return Ok(Recovered::Nothing);
    }
    for name in entries(state_dir)? {
        if name.starts_with(TEMP_PREFIX) {
            let p = state_dir.join(&name);
            fs::remove_file(&p).map_err(io_err(&p))?;
        }
    }
    if let Some(n) = current(state_dir)? {
        tidy(state_dir, n)?;
        return Ok(Recovered::InPlace);
    }
    // No link: an enrollment that died before its switch left at most dirs
    // that were never in use.
    for (_, name) in identity_dirs(state_dir)? {
        let p = state_dir.join(name);
        durable::remove_tree(&p).map_err(io_err(&p))?;
    }
    let key = state_dir.join(KEY_FILE);
    let cert = state_dir.join(CERT_FILE);
    let old = |p: &Path| PathBuf::from(format!("{}{OLD_SUFFIX}", p.display()));
    let candidates = [
        (key.clone(), cert.clone()),
        // The old renewal copied both to *.old, then renamed the new key,
        // then the new certificate: a crash between the renames leaves the
        // new key with the old certificate, and the old key matches it.
        (old(&key), old(&cert)),
        (old(&key), cert.clone()),
        (key.clone(), old(&cert)),
    ];
    if !key.exists() && !cert.exists() {
        return Ok(Recovered::Nothing);
    }
    let mut tried = Vec::new();
    for (k, c) in &candidates {
        let Ok(pair) = read_pair(k, c) else { continue };
        let from = format!("{} + {}", file_name(k), file_name(c));
        if pair_matches(&pair.key_pem, &pair.cert_pem) {
            install(state_dir, &pair)?;
            return Ok(Recovered::Migrated { from });
        }
        tried.push(from);
    }
    Err(IdentityError::NoMatchingPair {
        dir: state_dir.to_owned(),
        tried: if tried.is_empty() {
            "no readable pair".into()
        } else {
            tried.join(", ")
        },
    })
}

/// After a switch to `identity-<n>`: the compatibility links in place, the
/// old layout's files gone, and no identity dir but `n` and the previous.
fn tidy(state_dir: &Path, n: u64) -> Result<(), IdentityError> {
    for file in [KEY_FILE, CERT_FILE] {
        compat_link(state_dir, file)?;
        let old = state_dir.join(format!("{file}{OLD_SUFFIX}"));
        match fs::remove_file(&old) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&old)(e)),
        }
    }
    let previous = identity_dirs(state_dir)?
        .iter()
        .map(|(m, _)| *m)
        .filter(|m| *m < n)
        .max();
    for (m, name) in identity_dirs(state_dir)? {
        if m != n && Some(m) != previous {
            let p = state_dir.join(name);
            durable::remove_tree(&p).map_err(io_err(&p))?;
        }
    }
    durable::fsync_dir(state_dir).map_err(io_err(state_dir))
}

/// `state_dir/file -> identity/file`, replacing a plain file (old layout)
/// or anything else there atomically.
fn compat_link(state_dir: &Path, file: &str) -> Result<(), IdentityError> {
    let path = state_dir.join(file);
    let target = Path::new(LINK).join(file);
    if fs::read_link(&path).is_ok_and(|t| t == target) {
        return Ok(());
    }
    let tmp = temp_link(state_dir);
    std::os::unix::fs::symlink(&target, &tmp).map_err(io_err(&tmp))?;
    fs::rename(&tmp, &path).map_err(io_err(&path))
}

/// The number of the identity dir [`LINK`] points at; `None` without a link.
fn current(state_dir: &Path) -> Result<Option<u64>, IdentityError> {
    let link = state_dir.join(LINK);
    match fs::read_link(&link) {
        Ok(target) => target
            .to_str()
            .and_then(parse_dir_name)
            .map(Some)
            .ok_or(IdentityError::BadLink { path: link, target }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(&link)(e)),
    }
}

fn dir_name(n: u64) -> String {
    format!("{DIR_PREFIX}{n}")
}

fn parse_dir_name(name: &str) -> Option<u64> {
    name.strip_prefix(DIR_PREFIX)?.parse().ok()
}

/// `(n, name)` of every `identity-<n>` entry.
fn identity_dirs(state_dir: &Path) -> Result<Vec<(u64, String)>, IdentityError> {
    Ok(entries(state_dir)?
        .into_iter()
        .filter_map(|name| parse_dir_name(&name).map(|n| (n, name)))
        .collect())
}

fn entries(dir: &Path) -> Result<Vec<String>, IdentityError> {
    fs::read_dir(dir)
        .map_err(io_err(dir))?
        .map(|e| {
            e.map(|e| e.file_name().to_string_lossy().into_owned())
                .map_err(io_err(dir))
        })
        .collect()
}

fn temp_link(state_dir: &Path) -> PathBuf {
    // temp_sibling names it `identity.tmp-<pid>-<n>` (TEMP_PREFIX).
    durable::temp_sibling(&state_dir.join(LINK), "tmp")
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn read_pair(key: &Path, cert: &Path) -> Result<Pair, IdentityError> {
    Ok(Pair {
        key_pem: fs::read_to_string(key).map_err(io_err(key))?,
        cert_pem: fs::read_to_string(cert).map_err(io_err(cert))?,
    })
}

/// Creates `path` (which must not exist) with `mode` from the first byte —
/// a key is never readable by others, even for an instant — and fsyncs it.
fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), IdentityError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io_err(path))?;
    file.write_all(contents.as_bytes()).map_err(io_err(path))?;
    file.sync_all().map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
    use std::os::unix::process::ExitStatusExt as _;
    use std::process::Command;

    /// Set in the child process of the crash test: `ACTION:DIR`.
    const CHILD_ENV: &str = "SLIPWAY_TEST_IDENTITY_CHILD";

    fn new_pair() -> Pair {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = CertificateParams::new(vec!["node".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        Pair {
            key_pem: key.serialize_pem(),
            cert_pem: cert.pem(),
        }
    }

    /// A CA (self-signed, CA:true) or a plain leaf, PEM, and its sha256.
    fn cert(is_ca: bool) -> (String, String) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(vec!["x".into()]).unwrap();
        if is_ca {
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        }
        let cert = params.self_signed(&key).unwrap();
        let sha = crate::digest::Sha256::of_bytes(cert.der().as_ref()).into_string();
        (cert.pem(), sha)
    }

    #[test]
    fn a_trust_bundle_is_checked_before_it_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join(crate::link::CA_FILE);
        let (old, _) = cert(true);
        fs::write(&ca_file, &old).unwrap();
        let (new, new_sha) = cert(true);
        let (leaf, leaf_sha) = cert(false);
        let bundle = |pem: String, sha: &str| slipway_proto::v1::TrustBundle {
            ca_pem: pem,
            renew_now: true,
            signing_ca_sha256: sha.to_owned(),
        };
        // A leaf in it: refused, the CA file untouched.
        let err = store_trust(dir.path(), &bundle(format!("{old}{leaf}"), &leaf_sha)).unwrap_err();
        assert!(
            err.contains("certificate 1 is not a CA certificate"),
            "{err}"
        );
        // The signing CA must be one of them.
        let (_, other_sha) = cert(true);
        let err = store_trust(dir.path(), &bundle(format!("{old}{new}"), &other_sha)).unwrap_err();
        assert!(err.contains("is not in the bundle"), "{err}");
        let err = store_trust(dir.path(), &bundle("junk".to_owned(), &new_sha)).unwrap_err();
        assert!(err.contains("is not in the bundle"), "{err}");
        assert_eq!(fs::read_to_string(&ca_file).unwrap(), old);
        // A good one is stored; with no identity to compare, renew now.
        let done = store_trust(dir.path(), &bundle(format!("{old}{new}"), &new_sha)).unwrap();
        assert_eq!(
            done,
            Trusted {
                changed: true,
                renew: true
            }
        );
        assert_eq!(fs::read_to_string(&ca_file).unwrap(), format!("{old}{new}"));
        let again = store_trust(dir.path(), &bundle(format!("{old}{new}"), &new_sha)).unwrap();
        assert!(!again.changed);
    }

    fn write_old_layout(state: &Path, key: &str, cert: &str) {
        fs::create_dir_all(state).unwrap();
        fs::write(state.join(KEY_FILE), key).unwrap();
        fs::write(state.join(CERT_FILE), cert).unwrap();
    }

    /// Every name in the state dir.
    fn names(state: &Path) -> Vec<String> {
        let mut n = entries(state).unwrap();
        n.sort();
        n
    }

    #[test]
    fn pairs_are_checked_by_public_key() {
        let (a, b) = (new_pair(), new_pair());
        assert!(pair_matches(&a.key_pem, &a.cert_pem));
        assert!(!pair_matches(&b.key_pem, &a.cert_pem));
        assert!(!pair_matches("not a key", &a.cert_pem));
    }

    #[test]
    fn install_switches_the_pair_and_keeps_only_the_previous() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path();
        let pairs = [new_pair(), new_pair(), new_pair()];
        for p in &pairs {
            install(state, p).unwrap();
            assert_eq!(&load(state).unwrap(), p);
            // The old names follow the switch.
            assert_eq!(
                fs::read_to_string(state.join(CERT_FILE)).unwrap(),
                p.cert_pem
            );
        }
        assert_eq!(
            names(state),
            [
                "identity",
                "identity-2",
                "identity-3",
                "node.key",
                "node.pem"
            ]
        );
        let mode = |p: &Path| {
            use std::os::unix::fs::PermissionsExt;
            fs::metadata(p).unwrap().permissions().mode() & 0o777
        };
        assert_eq!(mode(&state.join("identity-3").join(KEY_FILE)), 0o600);
        assert_eq!(mode(&state.join("identity-3")), 0o700);
        assert_eq!(recover(state).unwrap(), Recovered::InPlace);
        assert_eq!(load(state).unwrap(), pairs[2]);
    }

    #[test]
    fn a_mismatched_pair_is_not_installed() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (new_pair(), new_pair());
        let torn = Pair {
            key_pem: b.key_pem,
            cert_pem: a.cert_pem,
        };
        assert!(matches!(
            install(dir.path(), &torn),
            Err(IdentityError::Mismatch)
        ));
        assert!(names(dir.path()).is_empty());
    }

    #[test]
    fn the_old_layout_loads_and_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path();
        let a = new_pair();
        write_old_layout(state, &a.key_pem, &a.cert_pem);
        // Before any recovery (a node upgraded in place) it still loads.
        assert_eq!(load(state).unwrap(), a);
        assert_eq!(
            recover(state).unwrap(),
            Recovered::Migrated {
                from: "node.key + node.pem".into()
            }
        );
        assert_eq!(load(state).unwrap(), a);
        assert_eq!(
            fs::read_link(state.join(KEY_FILE)).unwrap(),
            Path::new("identity/node.key")
        );
        assert_eq!(
            names(state),
            ["identity", "identity-1", "node.key", "node.pem"]
        );
        // A renewal after the migration goes the new way.
        let b = new_pair();
        install(state, &b).unwrap();
        assert_eq!(load(state).unwrap(), b);
    }

    #[test]
    fn a_pair_torn_by_the_old_renewal_is_put_back_together() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path();
        let (a, b) = (new_pair(), new_pair());
        // The old renewal died between its two renames: new key, old cert,
        // and the old pair in *.old.
        write_old_layout(state, &b.key_pem, &a.cert_pem);
        fs::write(state.join("node.key.old"), &a.key_pem).unwrap();
        fs::write(state.join("node.pem.old"), &a.cert_pem).unwrap();
        assert_eq!(
            recover(state).unwrap(),
            Recovered::Migrated {
                from: "node.key.old + node.pem.old".into()
            }
        );
        assert_eq!(load(state).unwrap(), a);
        assert_eq!(
            names(state),
            ["identity", "identity-1", "node.key", "node.pem"]
        );
    }

    #[test]
    fn no_matching_pair_is_an_error_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path();
        let (a, b) = (new_pair(), new_pair());
        write_old_layout(state, &b.key_pem, &a.cert_pem);
        let err = recover(state).unwrap_err().to_string();
        assert!(
            err.contains("no key") && err.contains("node.key + node.pem"),
            "{err}"
        );
        assert_eq!(names(state), ["node.key", "node.pem"]);
    }

    #[test]
    fn nothing_enrolled_is_nothing_to_recover() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(recover(dir.path()).unwrap(), Recovered::Nothing);
        assert_eq!(
            recover(&dir.path().join("missing")).unwrap(),
            Recovered::Nothing
        );
    }

    /// The body of the crash test's child process; does nothing in a normal
    /// test run.
    #[test]
    fn crash_test_child() {
        let Ok(arg) = std::env::var(CHILD_ENV) else {
            return;
        };
        let (action, dir) = arg.split_once(':').unwrap();
        let dir = Path::new(dir);
        let state = dir.join("state");
        match action {
            "install" => {
                let pair = Pair {
                    key_pem: fs::read_to_string(dir.join("new.key")).unwrap(),
                    cert_pem: fs::read_to_string(dir.join("new.pem")).unwrap(),
                };
                install(&state, &pair).unwrap();
            }
            "recover" => {
                recover(&state).unwrap();
            }
            other => panic!("unknown action {other}"),
        }
    }

    /// Runs [`crash_test_child`] in a child process with crash `point` armed;
    /// asserts it was killed there.
    fn run_killed_at(point: &str, action: &str, dir: &Path) {
        // The test's name is its module path without the crate's.
        let (_, here) = module_path!().split_once("::").unwrap();
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                &format!("{here}::crash_test_child"),
                "--test-threads=1",
            ])
            .env(CHILD_ENV, format!("{action}:{}", dir.display()))
            .env(fault::CRASH_ENV, point)
            .output()
            .unwrap();
        assert_eq!(
            out.status.signal(),
            Some(9),
            "{action} was not killed at {point}: {out:?}"
        );
    }

    #[test]
    fn kill_at_every_step_leaves_a_matching_pair() {
        const { assert!(fault::ENABLED, "built without the fault-injection feature") };
        // (point, whether the new pair is in use after a crash there)
        let expect_new = [
            ("identity_mid_write", false),
            ("identity_after_write", false),
            ("identity_after_link", false),
            ("identity_after_switch", true),
        ];
        assert_eq!(
            expect_new.map(|(p, _)| p).as_slice(),
            fault::IDENTITY_POINTS,
            "a point without a case here"
        );
        for (point, switched) in expect_new {
            // A renewal: pair a in use, b being installed.
            let dir = tempfile::tempdir().unwrap();
            let state = dir.path().join("state");
            let (a, b) = (new_pair(), new_pair());
            fs::create_dir(&state).unwrap();
            install(&state, &a).unwrap();
            fs::write(dir.path().join("new.key"), &b.key_pem).unwrap();
            fs::write(dir.path().join("new.pem"), &b.cert_pem).unwrap();
            run_killed_at(point, "install", dir.path());
            // What a connect right after the crash, before recovery, reads.
            let seen = load(&state).unwrap();
            assert!(pair_matches(&seen.key_pem, &seen.cert_pem), "{point}");
            assert_eq!(recover(&state).unwrap(), Recovered::InPlace, "{point}");
            let seen = load(&state).unwrap();
            assert!(pair_matches(&seen.key_pem, &seen.cert_pem), "{point}");
            assert_eq!(
                seen,
                if switched { b.clone() } else { a.clone() },
                "{point}"
            );
            let want: &[&str] = if switched {
                &[
                    "identity",
                    "identity-1",
                    "identity-2",
                    "node.key",
                    "node.pem",
                ]
            } else {
                &["identity", "identity-1", "node.key", "node.pem"]
            };
            assert_eq!(names(&state), want, "{point}");
            // And the next renewal goes through.
            install(&state, &new_pair()).unwrap();

            // A migration of the old layout, killed at the same point.
            let dir = tempfile::tempdir().unwrap();
            let state = dir.path().join("state");
            write_old_layout(&state, &a.key_pem, &a.cert_pem);
            run_killed_at(point, "recover", dir.path());
            let seen = load(&state).unwrap();
            assert_eq!(seen, a, "{point}: before recovery");
            recover(&state).unwrap();
            assert_eq!(load(&state).unwrap(), a, "{point}");
            assert_eq!(
                names(&state),
                ["identity", "identity-1", "node.key", "node.pem"],
                "{point}"
            );
        }
    }
}
