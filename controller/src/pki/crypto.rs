//! The one cryptography backend (ring, [`provider`]) and the small
//! primitives built on it: secure random ids and secrets, and certificate
//! fingerprints.

use sha2::{Digest as _, Sha256};
pub use slipway_proto::crypto::{install_default_provider, provider};

/// Errors from the crypto backend.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The operating system's random source failed; nothing secret can be made.
    #[error("secure random source failed")]
    Random,
}

/// `N` bytes from the backend's CSPRNG.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], CryptoError> {
    let mut buf = [0u8; N];
    provider()
        .secure_random
        .fill(&mut buf)
        .map_err(|_| CryptoError::Random)?;
    Ok(buf)
}

/// Lowercase hex of `N` random bytes, for ids and secrets.
pub fn random_hex<const N: usize>() -> Result<String, CryptoError> {
    Ok(hex::encode(random_bytes::<N>()?))
}

/// A random RFC 4122 version-4 UUID string (audit event ids, as in the seeds).
pub fn random_uuid() -> Result<String, CryptoError> {
    let mut b = random_bytes::<16>()?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

/// sha256 of `bytes` as lowercase hex: certificate fingerprints (of the DER)
/// and join-token secret hashes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_has_version_and_variant_bits() {
        let id = random_uuid().unwrap();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "{id}");
        assert_ne!(id, random_uuid().unwrap());
    }
}
