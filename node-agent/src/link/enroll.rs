//! Enrollment and renewal: the node's key is made here and never leaves it.
//!
//! Enrollment: the agent generates its key pair locally, sends a CSR with
//! the one-time join token — only to a controller that proves it holds the
//! CA the token pins ([`super::tls`]) — and stores the returned client
//! certificate, the controller's CA and its node id in the state dir.
//! Renewal asks for a new certificate for a new key over mTLS. Key and
//! certificate go to [`super::identity`], which switches them as one pair:
//! a crash leaves the old pair or the new one, never a mix.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateDer;
use slipway_proto::join_token::JoinToken;
use slipway_proto::v1::agent_link_client::AgentLinkClient;
use slipway_proto::v1::enrollment_client::EnrollmentClient;
use slipway_proto::v1::EnrollRequest;

use super::identity::{self, Pair};
use super::tls::{self, Target};
use super::{LinkError, CA_FILE, CERT_FILE, NODE_ID_FILE};
use crate::durable;
use crate::error::status_text;

/// What enrollment stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrolled {
    /// The node id the controller assigned.
    pub node_id: String,
    /// Certificate expiry (seconds since the Unix epoch).
    pub expires_at_unix: i64,
    /// Where the client certificate was written.
    pub cert_path: PathBuf,
}

/// Enrolls this node with the controller at `controller` using `token`, and
/// stores key, certificate, CA and node id in `state_dir`. `replace` takes
/// the name over from a live node that has it (which is then revoked);
/// without it the controller refuses a name in use.
pub async fn enroll(
    controller: &str,
    token: &str,
    state_dir: &Path,
    node_name: &str,
    replace: bool,
) -> Result<Enrolled, LinkError> {
    let token: JoinToken = token.parse()?;
    let target = Target::parse(controller)?;

    create_private_dir(state_dir)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    // The controller chooses the certificate's subject; the CN here only
    // helps a human reading the CSR.
    let csr_pem = csr_pem(&key, node_name)?;

    let config = tls::pinned_config(&token.ca_sha256)?;
    let channel = tls::connect_channel(&target, config).await?;
    let response = EnrollmentClient::new(channel)
        .enroll(EnrollRequest {
            join_token: token.to_string(),
            node_name: node_name.to_owned(),
            csr_pem,
            agent_version: crate::version::current().to_owned(),
            labels: Default::default(),
            replace,
        })
        .await
        .map_err(|status| LinkError::EnrollRefused(status_text(&status)))?
        .into_inner();

    // The TLS verifier already proved the server holds the pinned CA; check
    // that the CA we are told to trust from now on is that same one.
    let ca_der = CertificateDer::from_pem_slice(response.ca_pem.as_bytes())
        .map_err(|_| LinkError::BadPem("CA certificate"))?;
    let got = tls::sha256_hex(&ca_der);
    if got != token.ca_sha256 {
        return Err(LinkError::CaMismatch {
            expected: token.ca_sha256,
            got,
        });
    }
    CertificateDer::from_pem_slice(response.cert_pem.as_bytes())
        .map_err(|_| LinkError::BadPem("client certificate"))?;

    write_file(&state_dir.join(CA_FILE), &response.ca_pem, 0o644)?;
    write_file(&state_dir.join(NODE_ID_FILE), &response.node_id, 0o644)?;
    // Key and certificate last, as one pair: the identity in place means
    // enrollment completed.
    identity::install(
        state_dir,
        &Pair {
            key_pem: key.serialize_pem(),
            cert_pem: response.cert_pem,
        },
    )?;
    let cert_path = state_dir.join(CERT_FILE);
    Ok(Enrolled {
        node_id: response.node_id,
        expires_at_unix: response.expires_at_unix,
        cert_path,
    })
}

/// Renews this node's certificate over mTLS with a new key made here; the
/// new pair replaces the old one on disk in one atomic step
/// ([`identity::install`]: a crash leaves the old pair or the new one, never
/// a mix). The open session is not touched: the controller keeps the old
/// certificate valid until it expires. Returns the new expiry.
pub async fn renew(controller: &str, state_dir: &Path) -> Result<i64, LinkError> {
    let node_id = read_node_id(state_dir)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let csr_pem = csr_pem(&key, &node_id)?;
    let channel = tls::mtls_channel(controller, state_dir).await?;
    let response = AgentLinkClient::new(channel)
        .renew(slipway_proto::v1::RenewRequest { csr_pem })
        .await
        .map_err(|status| LinkError::SessionRefused(status_text(&status)))?
        .into_inner();
    CertificateDer::from_pem_slice(response.cert_pem.as_bytes())
        .map_err(|_| LinkError::BadPem("client certificate"))?;
    let pair = Pair {
        key_pem: key.serialize_pem(),
        cert_pem: response.cert_pem,
    };
    let dir = state_dir.to_owned();
    // Files and fsyncs: off the runtime's workers.
    tokio::task::spawn_blocking(move || identity::install(&dir, &pair))
        .await
        .map_err(|e| LinkError::Unexpected(format!("identity install task failed: {e}")))??;
    Ok(response.expires_at_unix)
}

/// A CSR for `key` with `common_name` as its CN.
fn csr_pem(key: &KeyPair, common_name: &str) -> Result<String, LinkError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    Ok(params.serialize_request(key)?.pem()?)
}

/// The node id enrollment stored in `state_dir`.
pub(super) fn read_node_id(state_dir: &Path) -> Result<String, LinkError> {
    Ok(tls::read_file(&state_dir.join(NODE_ID_FILE))?
        .trim()
        .to_owned())
}

fn create_private_dir(dir: &Path) -> Result<(), LinkError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| LinkError::Io {
            path: dir.to_owned(),
            source,
        })
}

/// Temp file + fsync + rename + directory fsync (as [`durable::write_atomic`]),
/// with the mode set at creation so a key is never readable by others, even
/// for an instant. The temp file is removed on failure.
fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), LinkError> {
    let io_err = |source| LinkError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = durable::TempFile::new(durable::temp_sibling(path, "tmp"));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(tmp.path())
        .map_err(io_err)?;
    file.write_all(contents.as_bytes()).map_err(io_err)?;
    file.sync_all().map_err(io_err)?;
    tmp.persist(path).map_err(io_err)?;
    durable::fsync_parent(path).map_err(io_err)
}
