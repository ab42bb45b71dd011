//! The controller's small certificate authority (rcgen, ECDSA P-256).
//!
//! On first start it creates, in the data dir, a CA certificate and a server
//! certificate for the controller's listen address; later starts reuse them.
//! Private keys are written mode 0600. Node client certificates are issued
//! from CSRs, so node keys never leave the nodes.

use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
    PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use crate::pki::crypto::{self, CryptoError};

/// CA certificate (public; agents receive it at enrollment).
pub const CA_CERT_FILE: &str = "ca.pem";
/// CA private key: whoever reads it can mint node certificates.
pub const CA_KEY_FILE: &str = "ca.key";
/// The controller's TLS server certificate.
pub const SERVER_CERT_FILE: &str = "server.pem";
/// The controller's TLS server key.
pub const SERVER_KEY_FILE: &str = "server.key";
/// The hosts the server certificate was made for; a different `--listen`
/// issues a new one.
pub const SERVER_HOSTS_FILE: &str = "server.hosts";

/// Default node certificate lifetime: short, so a lost node key is only
/// useful for days (renewal over mTLS will keep healthy nodes current).
pub const NODE_CERT_VALIDITY: Duration = Duration::from_secs(7 * 24 * 60 * 60);
/// CA lifetime: long, since rotating it means re-enrolling every node.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// Certificates start this far in the past, so a node whose clock is a little
/// behind the controller's does not see a "not yet valid" certificate.
const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// Errors from the CA.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Reading or writing a file in the data dir failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: io::Error,
    },
    /// A stored certificate or key could not be parsed.
    #[error("{}: {source}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: rcgen::Error,
    },
    /// The node's CSR is malformed or its signature does not verify.
    #[error("invalid certificate signing request: {0}")]
    Csr(rcgen::Error),
    /// Creating or signing a certificate failed.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// No random serial number.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

/// The new CA of a rotation (`ca rotate start`): its certificate.
pub const NEXT_CA_CERT_FILE: &str = "ca-next.pem";
/// The new CA's key: signs node and operator certificates during a
/// rotation, and becomes `ca.key` at `ca rotate finish`.
pub const NEXT_CA_KEY_FILE: &str = "ca-next.key";

/// The CA and the controller's own server identity, loaded from the data
/// dir; [`Ca::reload`] picks up a CA rotation made by another process.
pub struct Ca {
    state: std::sync::RwLock<std::sync::Arc<CaState>>,
}

/// What the data dir holds at one moment.
struct CaState {
    /// `ca.pem`: every trusted CA (two during a rotation), PEM.
    bundle_pem: String,
    /// The same, DER.
    bundle: Vec<CertificateDer<'static>>,
    /// The CA whose key is `ca.key`: it signs the server certificate.
    cert_der: CertificateDer<'static>,
    key: KeyPair,
    /// During a rotation, the new CA: it signs client certificates.
    next: Option<(CertificateDer<'static>, KeyPair)>,
}

/// The controller's TLS server certificate chain and key.
pub struct ServerIdentity {
    /// Server certificate, then the CA (so an enrolling agent can find the
    /// CA its token pins in what the server presents).
    pub chain: Vec<CertificateDer<'static>>,
    key_der: Vec<u8>,
    /// Validity of the server certificate, seconds since the epoch.
    pub not_before: i64,
    /// See `not_before`.
    pub not_after: i64,
}

impl std::fmt::Debug for ServerIdentity {
    // Hand-written so the private key never ends up in a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerIdentity").finish_non_exhaustive()
    }
}

impl ServerIdentity {
    /// The server's private key.
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    /// When the certificate is due for renewal: two thirds into its life,
    /// seconds since the epoch.
    pub fn renew_at(&self) -> i64 {
        renew_at(self.not_before, self.not_after)
    }
}

/// Two thirds of the way from `not_before` to `not_after`.
fn renew_at(not_before: i64, not_after: i64) -> i64 {
    not_before + (not_after - not_before).max(0) * 2 / 3
}

impl std::fmt::Debug for Ca {
    // Hand-written so the private keys never end up in a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("fingerprint", &self.fingerprint())
            .field("rotating_to", &self.next_fingerprint())
            .finish_non_exhaustive()
    }
}

/// A certificate issued to a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCert {
    /// PEM certificate.
    pub pem: String,
    /// sha256 hex of the DER: how the controller recognises the node later.
    pub fingerprint: String,
    /// Hex serial number.
    pub serial: String,
    /// Expiry, seconds since the epoch.
    pub not_after: i64,
    /// sha256 hex of the certificate of the CA that signed it (during a
    /// rotation, the new CA).
    pub issuer_sha256: String,
}

impl Ca {
    /// Loads the CA from `data_dir`, creating it (and the dir, mode 0700) on
    /// first use.
    pub fn load_or_create(data_dir: &Path) -> Result<Self, CaError> {
        create_private_dir(data_dir)?;
        let ca_cert_path = data_dir.join(CA_CERT_FILE);
        let ca_key_path = data_dir.join(CA_KEY_FILE);
        if !(ca_key_path.exists() && ca_cert_path.exists()) {
            let (cert_pem, key_pem) = new_ca()?;
            // Key first: a crash between the two writes leaves no certificate
            // without its key, and the next start recreates both.
            write_private(&ca_key_path, &key_pem)?;
            write_public(&ca_cert_path, &cert_pem)?;
        }
        Self::load_existing(data_dir)
    }

    /// Reads the CA files of `data_dir` again (a rotation started or
    /// finished by `slipway-controller ca rotate`); true when the trusted
    /// set or the signing CAs changed.
    pub fn reload(&self, data_dir: &Path) -> Result<bool, CaError> {
        let fresh = Self::load_existing(data_dir)?.state();
        let old = self.state();
        let same = fresh.bundle == old.bundle
            && fresh.cert_der == old.cert_der
            && fresh.next.as_ref().map(|n| &n.0) == old.next.as_ref().map(|n| &n.0);
        if !same {
            *self
                .state
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = fresh;
        }
        Ok(!same)
    }

    fn state(&self) -> std::sync::Arc<CaState> {
        self.state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Loads the CA of `data_dir`, which must have one (never creates it):
    /// for backups and restores.
    pub fn load_existing(data_dir: &Path) -> Result<Self, CaError> {
        let ca_cert_path = data_dir.join(CA_CERT_FILE);
        let ca_key_path = data_dir.join(CA_KEY_FILE);
        let key_pem = read(&ca_key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|source| CaError::Parse {
            path: ca_key_path.clone(),
            source,
        })?;
        let bundle_pem = read(&ca_cert_path)?;
        let bundle = pem_bundle(&ca_cert_path, &bundle_pem)?;
        // The signing CA is the one whose public key is ca.key's: the file
        // order does not matter, and a rotation's finish that stopped
        // between writing ca.key and ca.pem still loads.
        let cert_der = bundle
            .iter()
            .find(|der| has_key(der, &key))
            .cloned()
            .ok_or_else(|| CaError::Io {
                path: ca_cert_path.clone(),
                source: io::Error::new(
                    io::ErrorKind::InvalidData,
                    "no certificate in it matches ca.key",
                ),
            })?;
        let next_cert = data_dir.join(NEXT_CA_CERT_FILE);
        let next_key = data_dir.join(NEXT_CA_KEY_FILE);
        let next = if next_cert.exists() && next_key.exists() {
            let key_pem = read(&next_key)?;
            let key = KeyPair::from_pem(&key_pem).map_err(|source| CaError::Parse {
                path: next_key.clone(),
                source,
            })?;
            let der = pem_to_der(&next_cert, &read(&next_cert)?)?;
            // Finished already (ca.key is this key): no rotation.
            (der != cert_der).then_some((der, key))
        } else {
            None
        };
        Ok(Self {
            state: std::sync::RwLock::new(std::sync::Arc::new(CaState {
                bundle_pem,
                bundle,
                cert_der,
                key,
                next,
            })),
        })
    }

    /// Every CA the controller trusts (client certificates chaining to any
    /// are accepted): one, or two during a rotation.
    pub fn trusted(&self) -> Vec<CertificateDer<'static>> {
        self.state().bundle.clone()
    }

    /// The new CA's sha256 during a rotation.
    pub fn next_fingerprint(&self) -> Option<String> {
        self.state()
            .next
            .as_ref()
            .map(|(der, _)| crypto::sha256_hex(der))
    }

    /// Creates a new CA (a rotation's): its key and certificate PEMs.
    pub fn generate() -> Result<(String, String), CaError> {
        let (cert, key) = new_ca()?;
        Ok((cert, key))
    }

    /// Loads the controller's TLS server certificate from `data_dir`, or
    /// issues a new one when it is missing or was made for other hosts
    /// (`serve --listen` changed). `hosts` are names/IPs it must be valid
    /// for; `localhost` and `127.0.0.1` are always added.
    pub fn server_identity(
        &self,
        data_dir: &Path,
        hosts: &[String],
        validity: Duration,
    ) -> Result<ServerIdentity, CaError> {
        let hosts = with_loopback(hosts);
        let hosts_line = hosts.join(" ");
        let cert_path = data_dir.join(SERVER_CERT_FILE);
        let key_path = data_dir.join(SERVER_KEY_FILE);
        let hosts_path = data_dir.join(SERVER_HOSTS_FILE);
        let same_hosts = cert_path.exists()
            && key_path.exists()
            && fs::read_to_string(&hosts_path).is_ok_and(|h| h.trim() == hosts_line);
        if same_hosts {
            let cert_pem = read(&cert_path)?;
            let key_pem = read(&key_path)?;
            let parsed = pem_to_der(&cert_path, &cert_pem)
                .ok()
                .and_then(|der| validity_of(&der).map(|v| (der, v)));
            let now = OffsetDateTime::now_utc().unix_timestamp();
            match parsed {
                // Kept while it is young: before two thirds of its life.
                Some((der, (not_before, not_after))) if now < renew_at(not_before, not_after) => {
                    return self.identity(der, &key_path, &key_pem, not_before, not_after);
                }
                Some((_, (_, not_after))) => tracing::info!(
                    not_after = %crate::rfc3339(not_after),
                    "the server certificate is past two thirds of its life (or expired): issuing a new one"
                ),
                None => tracing::warn!(
                    path = %cert_path.display(),
                    "the stored server certificate cannot be read: issuing a new one"
                ),
            }
        }
        self.issue_server(data_dir, &hosts, validity)
    }

    /// Issues a new server certificate and key for `hosts` (plus loopback),
    /// valid from now for `validity`, and stores them in `data_dir` (each
    /// file replaced atomically).
    pub fn issue_server(
        &self,
        data_dir: &Path,
        hosts: &[String],
        validity: Duration,
    ) -> Result<ServerIdentity, CaError> {
        let hosts = with_loopback(hosts);
        let hosts_line = hosts.join(" ");
        let cert_path = data_dir.join(SERVER_CERT_FILE);
        let key_path = data_dir.join(SERVER_KEY_FILE);
        let hosts_path = data_dir.join(SERVER_HOSTS_FILE);
        let now = OffsetDateTime::now_utc();
        let state = self.state();
        let issuer = Issuer::from_ca_cert_der(&state.cert_der, &state.key)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(hosts)?;
        params.distinguished_name = common_name("Slipway controller");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Backdated for clock skew, but never by more than a tenth of its
        // life, or a short-lived certificate would be due for renewal (two
        // thirds in) the moment it is made.
        params.not_before = now - CLOCK_SKEW.min(validity / 10);
        params.not_after = now + validity;
        params.serial_number = Some(random_serial()?);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &issuer)?;
        let key_pem = key.serialize_pem();
        // Key first: a crash between the two writes leaves a new key with
        // the old certificate, which the next start finds unusable and
        // replaces (the handshake would fail, not accept a wrong key).
        write_private(&key_path, &key_pem)?;
        write_public(&cert_path, &cert.pem())?;
        write_public(&hosts_path, &format!("{hosts_line}\n"))?;
        let cert_der = cert.der().clone();
        self.identity(
            cert_der,
            &key_path,
            &key_pem,
            params.not_before.unix_timestamp(),
            params.not_after.unix_timestamp(),
        )
    }

    fn identity(
        &self,
        cert_der: CertificateDer<'static>,
        key_path: &Path,
        key_pem: &str,
        not_before: i64,
        not_after: i64,
    ) -> Result<ServerIdentity, CaError> {
        let key_der = KeyPair::from_pem(key_pem)
            .map_err(|source| CaError::Parse {
                path: key_path.to_owned(),
                source,
            })?
            .serialize_der();
        Ok(ServerIdentity {
            chain: vec![cert_der, self.state().cert_der.clone()],
            key_der,
            not_before,
            not_after,
        })
    }

    /// Every trusted CA certificate, PEM (`ca.pem`: what an enrolling
    /// agent stores as its trust), the signing CA first (as `ca rotate`
    /// writes it).
    pub fn cert_pem(&self) -> String {
        self.state().bundle_pem.clone()
    }

    /// The CA certificate that signs the server certificate, DER.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.state().cert_der.clone()
    }

    /// sha256 hex of the CA certificate's DER (the one signing the server
    /// certificate): what join tokens pin.
    pub fn fingerprint(&self) -> String {
        crypto::sha256_hex(&self.state().cert_der)
    }

    /// Issues a client certificate for `node_id` valid for `validity` from now.
    pub fn sign_node_csr(
        &self,
        csr_pem: &str,
        node_id: &str,
        validity: Duration,
    ) -> Result<IssuedCert, CaError> {
        let now = OffsetDateTime::now_utc();
        self.sign_node_csr_between(csr_pem, node_id, now - CLOCK_SKEW, now + validity)
    }

    /// Issues a client certificate for `node_id` with an explicit validity
    /// window (tests use it to make expired certificates).
    ///
    /// Only the CSR's public key is used: subject, SANs and usages are chosen
    /// here, so a node cannot ask for a server or CA certificate or for
    /// another node's name.
    pub fn sign_node_csr_between(
        &self,
        csr_pem: &str,
        node_id: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<IssuedCert, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(CaError::Csr)?;
        self.sign_client(
            &csr.public_key,
            node_id,
            &format!("urn:slipway:node:{node_id}"),
            not_before,
            not_after,
        )
    }

    /// Issues an operator client certificate (for the `slipway` CLI) for the
    /// key in `csr_pem`, or for a key made here when `csr_pem` is None;
    /// returns the certificate and the new key's PEM (None with a CSR).
    ///
    /// The certificate names the operator (`CN=op-…`, SAN
    /// `urn:slipway:operator:op-…`), never a node, so it cannot open an agent
    /// link: AgentLink only accepts certificates recorded for a node.
    pub fn issue_operator(
        &self,
        csr_pem: Option<&str>,
        operator_id: &str,
        validity: Duration,
    ) -> Result<(IssuedCert, Option<String>), CaError> {
        let now = OffsetDateTime::now_utc();
        let uri = format!("urn:slipway:operator:{operator_id}");
        let (not_before, not_after) = (now - CLOCK_SKEW, now + validity);
        match csr_pem {
            Some(pem) => {
                let csr = CertificateSigningRequestParams::from_pem(pem).map_err(CaError::Csr)?;
                let cert =
                    self.sign_client(&csr.public_key, operator_id, &uri, not_before, not_after)?;
                Ok((cert, None))
            }
            None => {
                let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
                let cert = self.sign_client(&key, operator_id, &uri, not_before, not_after)?;
                Ok((cert, Some(key.serialize_pem())))
            }
        }
    }

    /// A client-auth-only leaf for `public_key` named `cn`, with one URI SAN.
    ///
    /// Only the public key comes from the requester: subject, SANs and usages
    /// are chosen here, so nobody can ask for a server or CA certificate or
    /// for another identity's name.
    fn sign_client(
        &self,
        public_key: &impl rcgen::PublicKeyData,
        cn: &str,
        uri: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<IssuedCert, CaError> {
        let serial = random_serial()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(cn);
        params.subject_alt_names = vec![SanType::URI(uri.try_into()?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = not_before;
        params.not_after = not_after;
        params.serial_number = Some(serial.clone());
        params.use_authority_key_identifier_extension = true;
        // During a rotation the new CA signs client certificates: the
        // controller trusts both, and every renewal moves a node onto it.
        let state = self.state();
        let (ca_der, ca_key) = state
            .next
            .as_ref()
            .map_or((&state.cert_der, &state.key), |(der, key)| (der, key));
        let issuer = Issuer::from_ca_cert_der(ca_der, ca_key)?;
        let cert = params.signed_by(public_key, &issuer)?;
        Ok(IssuedCert {
            pem: cert.pem(),
            fingerprint: crypto::sha256_hex(cert.der()),
            serial: hex::encode(serial.as_ref()),
            not_after: not_after.unix_timestamp(),
            issuer_sha256: crypto::sha256_hex(ca_der),
        })
    }
}

/// A new self-signed CA: (certificate PEM, key PEM).
fn new_ca() -> Result<(String, String), CaError> {
    let now = OffsetDateTime::now_utc();
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    // A random suffix tells controllers' CAs apart, in logs and for
    // webpki, which picks a client certificate's issuer by name.
    params.distinguished_name = common_name(&format!(
        "Slipway controller CA {}",
        crypto::random_hex::<4>()?
    ));
    // pathlen 0: the CA signs leaves only, never another CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + CA_VALIDITY;
    params.serial_number = Some(random_serial()?);
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Every certificate of a PEM file.
fn pem_bundle(path: &Path, pem: &str) -> Result<Vec<CertificateDer<'static>>, CaError> {
    use rustls::pki_types::pem::PemObject as _;
    let bad = |why: String| CaError::Io {
        path: path.to_owned(),
        source: io::Error::new(io::ErrorKind::InvalidData, why),
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("holds no certificate".to_owned()));
    }
    Ok(certs)
}

/// True when `der`'s public key is `key`'s.
fn has_key(der: &CertificateDer<'_>, key: &KeyPair) -> bool {
    use rcgen::PublicKeyData as _;
    x509_parser::parse_x509_certificate(der.as_ref())
        .is_ok_and(|(_, cert)| cert.public_key().raw == key.subject_public_key_info())
}

/// `hosts` with `localhost` and `127.0.0.1` added when missing.
fn with_loopback(hosts: &[String]) -> Vec<String> {
    let mut hosts = hosts.to_vec();
    for default in ["localhost", "127.0.0.1"] {
        if !hosts.iter().any(|h| h == default) {
            hosts.push(default.to_owned());
        }
    }
    hosts
}

/// A certificate's validity (not before, not after), seconds since the
/// epoch; `None` when it cannot be parsed.
pub fn validity_of(der: &CertificateDer<'_>) -> Option<(i64, i64)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let v = cert.validity();
    Some((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// A certificate's subject common name; `None` when it has none or cannot
/// be parsed.
pub fn common_name_of(der: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(ToOwned::to_owned)
}

fn common_name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// 16 random bytes with the top bit clear, so the DER integer stays positive
/// and within RFC 5280's 20-octet limit.
fn random_serial() -> Result<SerialNumber, CryptoError> {
    let mut bytes = crypto::random_bytes::<16>()?;
    bytes[0] &= 0x7f;
    Ok(SerialNumber::from_slice(&bytes))
}

fn pem_to_der(path: &Path, pem: &str) -> Result<CertificateDer<'static>, CaError> {
    use rustls::pki_types::pem::PemObject as _;
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| CaError::Io {
        path: path.to_owned(),
        source: io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
    })
}

fn create_private_dir(dir: &Path) -> Result<(), CaError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| CaError::Io {
            path: dir.to_owned(),
            source,
        })
}

fn read(path: &Path) -> Result<String, CaError> {
    fs::read_to_string(path).map_err(|source| CaError::Io {
        path: path.to_owned(),
        source,
    })
}

fn write_public(path: &Path, contents: &str) -> Result<(), CaError> {
    write_with_mode(path, contents, 0o644)
}

fn write_private(path: &Path, contents: &str) -> Result<(), CaError> {
    write_with_mode(path, contents, 0o600)
}

/// Writes via a temp file + fsync + rename, so a crash never leaves a
/// half-written key, and the mode is set at creation (never world-readable,
/// even for an instant).
fn write_with_mode(path: &Path, contents: &str, mode: u32) -> Result<(), CaError> {
    let io_err = |source| CaError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err)?;
    file.write_all(contents.as_bytes()).map_err(io_err)?;
    file.sync_all().map_err(io_err)?;
    fs::rename(&tmp, path).map_err(io_err)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    const YEAR: Duration = Duration::from_secs(365 * 24 * 60 * 60);

    #[test]
    fn a_server_certificate_past_two_thirds_of_its_life_is_reissued_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let hosts = ["10.0.0.5".to_owned()];
        // 30 s of life, backdated 3 s: due for renewal 17 s from now.
        let young = ca
            .server_identity(dir.path(), &hosts, Duration::from_secs(30))
            .unwrap();
        let now = OffsetDateTime::now_utc().unix_timestamp();
        assert!(
            (now - 3..=now + 1).contains(&young.not_before),
            "{}",
            young.not_before
        );
        assert!((now + 29..=now + 31).contains(&young.not_after));
        assert_eq!(young.renew_at(), young.not_before + 22);
        // What was stored reads back with the same validity, and is kept.
        let kept = ca.server_identity(dir.path(), &hosts, YEAR).unwrap();
        assert_eq!(kept.chain, young.chain);
        assert_eq!(
            (kept.not_before, kept.not_after),
            (young.not_before, young.not_after)
        );

        // The renewal point is two thirds in, from the certificate itself.
        let (nb, na) = validity_of(&young.chain[0]).unwrap();
        assert_eq!(renew_at(nb, na), nb + (na - nb) * 2 / 3);
        // Past it (here: a certificate whose life is over) is replaced.
        assert_eq!(renew_at(100, 100), 100);

        // An unreadable stored certificate is replaced too, not an error.
        fs::write(dir.path().join(SERVER_CERT_FILE), "not a certificate\n").unwrap();
        let replaced = ca.server_identity(dir.path(), &hosts, YEAR).unwrap();
        assert_ne!(replaced.chain[0], young.chain[0]);
        assert!(replaced.not_after - replaced.not_before > 364 * 24 * 3600);
    }

    #[test]
    fn creates_once_with_private_keys_and_reuses() {
        let dir = tempfile::tempdir().unwrap();
        let first = Ca::load_or_create(dir.path()).unwrap();
        let server = first
            .server_identity(dir.path(), &["10.0.0.5".to_owned()], YEAR)
            .unwrap();
        for key in [CA_KEY_FILE, SERVER_KEY_FILE] {
            let mode = fs::metadata(dir.path().join(key))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
        let second = Ca::load_or_create(dir.path()).unwrap();
        assert_eq!(first.fingerprint(), second.fingerprint());
        let again = second
            .server_identity(dir.path(), &["10.0.0.5".to_owned()], YEAR)
            .unwrap();
        assert_eq!(server.chain, again.chain);
        let moved = second
            .server_identity(dir.path(), &["10.0.0.6".to_owned()], YEAR)
            .unwrap();
        assert_ne!(server.chain[0], moved.chain[0]);
        assert_eq!(server.chain[1], moved.chain[1]);
    }

    #[test]
    fn node_cert_uses_only_the_csr_key() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        // The node asks for a CA certificate named like the controller...
        let mut asked = CertificateParams::new(vec!["controller.example".to_owned()]).unwrap();
        asked.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let csr = asked.serialize_request(&key).unwrap().pem().unwrap();
        let issued = ca.sign_node_csr(&csr, "n-1", NODE_CERT_VALIDITY).unwrap();
        // ...and gets a plain client certificate (webpki refuses a CA
        // certificate or one without the client-auth EKU as a client leaf).
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            crypto::provider(),
        )
        .build()
        .unwrap();
        use rustls::pki_types::pem::PemObject as _;
        let leaf = CertificateDer::from_pem_slice(issued.pem.as_bytes()).unwrap();
        verifier
            .verify_client_cert(&leaf, &[], rustls::pki_types::UnixTime::now())
            .unwrap();
        assert_eq!(issued.fingerprint, crypto::sha256_hex(&leaf));
        assert!(ca
            .sign_node_csr("not a csr", "n-1", NODE_CERT_VALIDITY)
            .is_err());
    }
}
