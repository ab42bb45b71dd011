//! The join token format, shared by the controller (which prints tokens) and
//! the agent (which reads the pinned CA out of them).
//!
//! `slw1.<id>.<secret>.<ca-sha256>`: `id` names the token in the controller's
//! database, `secret` is 32 random bytes (hex) of which only a hash is
//! stored, and `ca-sha256` is the sha256 (hex) of the controller CA
//! certificate's DER, so the agent can authenticate the controller before it
//! sends the secret — no trust-on-first-use.

use std::fmt;

/// Version prefix; a new format gets a new prefix.
pub const PREFIX: &str = "slw1";

/// A parsed join token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Public token id (hex).
    pub id: String,
    /// The secret (hex); proves possession.
    pub secret: String,
    /// Pinned controller CA fingerprint: lowercase sha256 hex of its DER.
    pub ca_sha256: String,
}

impl fmt::Debug for JoinToken {
    // The secret must not reach logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id)
            .field("ca_sha256", &self.ca_sha256)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}.{}.{}.{}", self.id, self.secret, self.ca_sha256)
    }
}

/// Why a string is not a join token. Never echoes the input (it may be a
/// real secret pasted slightly wrong).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseJoinTokenError(&'static str);

impl fmt::Display for ParseJoinTokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed join token: {}", self.0)
    }
}

impl std::error::Error for ParseJoinTokenError {}

fn is_lower_hex(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl std::str::FromStr for JoinToken {
    type Err = ParseJoinTokenError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.trim().split('.');
        let (Some(prefix), Some(id), Some(secret), Some(ca), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(ParseJoinTokenError(
                "expected slw1.<id>.<secret>.<ca-sha256>",
            ));
        };
        if prefix != PREFIX {
            return Err(ParseJoinTokenError(
                "unknown version prefix (expected slw1)",
            ));
        }
        if !is_lower_hex(id) || !is_lower_hex(secret) {
            return Err(ParseJoinTokenError("id and secret must be lowercase hex"));
        }
        if ca.len() != 64 || !is_lower_hex(ca) {
            return Err(ParseJoinTokenError(
                "CA fingerprint must be 64 lowercase hex digits",
            ));
        }
        Ok(Self {
            id: id.to_owned(),
            secret: secret.to_owned(),
            ca_sha256: ca.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_hides_the_secret() {
        let token = JoinToken {
            id: "ab12".to_owned(),
            secret: "cd".repeat(32),
            ca_sha256: "ef".repeat(32),
        };
        let text = token.to_string();
        assert_eq!(text.parse::<JoinToken>().unwrap(), token);
        assert!(!format!("{token:?}").contains("cdcd"));
    }

    #[test]
    fn rejects_malformed_tokens() {
        let ca = "ef".repeat(32);
        for bad in [
            String::new(),
            format!("slw2.ab.cd.{ca}"),
            "slw1.ab.cd".to_owned(),
            format!("slw1.AB.cd.{ca}"),
            "slw1.ab.cd.1234".to_owned(),
            format!("slw1.ab.cd.{ca}.extra"),
        ] {
            assert!(bad.parse::<JoinToken>().is_err(), "{bad:?}");
        }
    }
}
