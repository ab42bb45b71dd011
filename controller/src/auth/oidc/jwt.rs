//! The JSON Web Token itself (RFC 7519, compact JWS of RFC 7515): split,
//! decode, check the header, verify the RS256 signature with ring, and check
//! the registered claims (`iss`, `aud`, `exp`, `nbf`). Pure functions: the
//! keys come from [`super::jwks`], the time from the caller.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::signature::{RsaPublicKeyComponents, RSA_PKCS1_2048_8192_SHA256};
use serde_json::{Map, Value};

use super::OidcError;

/// The only signature algorithm accepted: what GitHub signs with. Anything
/// else (`none`, `HS256` with the public key as a secret, `PS256`...) is
/// refused before a key is looked at.
pub const ALGORITHM: &str = "RS256";
/// An RSA public key: modulus and exponent, big-endian (from the issuer's
/// JWKS, see [`super::jwks`]).
#[derive(Debug, PartialEq, Eq)]
pub struct RsaKey {
    /// Modulus.
    pub n: Vec<u8>,
    /// Public exponent.
    pub e: Vec<u8>,
}

/// Longest `kid` accepted (GitHub's are 40-odd characters).
const MAX_KID: usize = 256;

/// A token split and decoded, its signature not yet checked.
#[derive(Debug)]
pub struct Unverified<'a> {
    /// `kid`: which of the issuer's keys signed it.
    pub kid: String,
    /// `header.payload`, what the signature covers.
    signing_input: &'a str,
    /// The decoded payload (claims), not to be trusted before
    /// [`Unverified::verify`].
    payload: Vec<u8>,
    signature: Vec<u8>,
}

fn decode(part: &str, what: &str) -> Result<Vec<u8>, OidcError> {
    URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|e| OidcError::Malformed(format!("the {what} is not base64url: {e}")))
}

/// Splits and decodes `token`, and checks its header: `alg` RS256, a `kid`,
/// no `crit` extension.
pub fn parse(token: &str) -> Result<Unverified<'_>, OidcError> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(OidcError::Malformed(
            "a JWT has three dot-separated parts".into(),
        ));
    };
    let header: Map<String, Value> = serde_json::from_slice(&decode(header, "header")?)
        .map_err(|e| OidcError::Malformed(format!("the header is not a JSON object: {e}")))?;
    match header.get("alg") {
        Some(Value::String(alg)) if alg == ALGORITHM => {}
        Some(Value::String(alg)) => return Err(OidcError::Algorithm(cut(alg))),
        _ => return Err(OidcError::Algorithm("(none given)".into())),
    }
    // RFC 7515 4.1.11: extensions the recipient does not know must be refused.
    if header.contains_key("crit") {
        return Err(OidcError::Malformed(
            "the header has a `crit` extension".into(),
        ));
    }
    let kid = match header.get("kid") {
        Some(Value::String(kid)) if !kid.is_empty() && kid.len() <= MAX_KID => kid.clone(),
        _ => {
            return Err(OidcError::Malformed(format!(
                "the header has no `kid` (a key id of 1 to {MAX_KID} characters)"
            )))
        }
    };
    let signing_input = &token[..token.len() - signature.len() - 1];
    Ok(Unverified {
        kid,
        signing_input,
        payload: decode(payload, "payload")?,
        signature: decode(signature, "signature")?,
    })
}

impl Unverified<'_> {
    /// Checks the signature with `key` and returns the claims.
    pub fn verify(&self, key: &RsaKey) -> Result<Map<String, Value>, OidcError> {
        RsaPublicKeyComponents {
            n: &key.n,
            e: &key.e,
        }
        .verify(
            &RSA_PKCS1_2048_8192_SHA256,
            self.signing_input.as_bytes(),
            &self.signature,
        )
        .map_err(|_| OidcError::Signature(self.kid.clone()))?;
        serde_json::from_slice(&self.payload)
            .map_err(|e| OidcError::Malformed(format!("the claims are not a JSON object: {e}")))
    }
}

/// What the registered claims must say.
#[derive(Debug, Clone, Copy)]
pub struct Expect<'a> {
    /// `iss`, exactly.
    pub issuer: &'a str,
    /// One of `aud` (a string or an array of strings).
    pub audience: &'a str,
    /// Seconds of clock difference forgiven on `exp` and `nbf`.
    pub leeway: i64,
    /// Now, in seconds since the epoch.
    pub now: i64,
}

/// A NumericDate claim (seconds, possibly fractional) as whole seconds.
fn seconds(claims: &Map<String, Value>, name: &'static str) -> Result<Option<i64>, OidcError> {
    match claims.get(name) {
        None => Ok(None),
        Some(value) => value
            .as_i64()
            // Fractions are allowed by RFC 7519; whole seconds are enough.
            .or_else(|| value.as_f64().map(|f| f as i64))
            .map(Some)
            .ok_or(OidcError::Malformed(format!("`{name}` is not a number"))),
    }
}

/// Checks `iss`, `aud`, `exp` (required) and `nbf` (when present).
pub fn check_registered(claims: &Map<String, Value>, expect: Expect<'_>) -> Result<(), OidcError> {
    let issuer = claims.get("iss").and_then(Value::as_str).unwrap_or("");
    if issuer != expect.issuer {
        return Err(OidcError::Issuer {
            got: cut(issuer),
            want: expect.issuer.to_owned(),
        });
    }
    let audiences: Vec<&str> = match claims.get("aud") {
        Some(Value::String(aud)) => vec![aud.as_str()],
        Some(Value::Array(auds)) => auds.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    if !audiences.contains(&expect.audience) {
        return Err(OidcError::Audience {
            got: cut(&audiences.join(",")),
            want: expect.audience.to_owned(),
        });
    }
    let exp = seconds(claims, "exp")?
        .ok_or_else(|| OidcError::Malformed("the token has no `exp`".into()))?;
    if expect.now > exp.saturating_add(expect.leeway) {
        return Err(OidcError::Expired {
            ago: expect.now - exp,
        });
    }
    if let Some(nbf) = seconds(claims, "nbf")? {
        if nbf > expect.now.saturating_add(expect.leeway) {
            return Err(OidcError::NotYetValid {
                within: nbf - expect.now,
            });
        }
    }
    Ok(())
}

/// A peer's value, cut for a message or an audit event.
pub(super) fn cut(text: &str) -> String {
    const MAX: usize = 200;
    if text.len() <= MAX {
        return text.to_owned();
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(value: &Value) -> String {
        URL_SAFE_NO_PAD.encode(value.to_string())
    }

    #[test]
    fn header_rules() {
        let payload = b64(&serde_json::json!({}));
        let token = |header: Value| format!("{}.{payload}.AAAA", b64(&header));
        for (header, want) in [
            (serde_json::json!({"alg": "none", "kid": "k"}), "none"),
            (serde_json::json!({"alg": "HS256", "kid": "k"}), "HS256"),
            (serde_json::json!({"alg": "PS256", "kid": "k"}), "PS256"),
            (serde_json::json!({"kid": "k"}), "(none given)"),
            (serde_json::json!({"alg": "RS256"}), "kid"),
            (
                serde_json::json!({"alg": "RS256", "kid": "k", "crit": ["b64"]}),
                "crit",
            ),
        ] {
            let err = parse(&token(header.clone())).unwrap_err().to_string();
            assert!(err.contains(want), "{header}: {err}");
        }
        let good = token(serde_json::json!({"alg": "RS256", "kid": "k1"}));
        let ok = parse(&good).unwrap();
        assert_eq!(ok.kid, "k1");
        for bad in ["a.b", "a.b.c.d", "", "!!.e30.AA"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        // Padding is not base64url as JWS uses it.
        assert!(parse(&format!(
            "{}.{payload}.AA==",
            b64(&serde_json::json!({"alg": "RS256", "kid": "k"}))
        ))
        .is_err());
    }

    #[test]
    fn registered_claims() {
        let expect = Expect {
            issuer: "https://issuer.example",
            audience: "slipway",
            leeway: 60,
            now: 1_000_000,
        };
        let good = serde_json::json!({
            "iss": "https://issuer.example", "aud": "slipway",
            "exp": 1_000_100, "nbf": 999_000,
        });
        let map = |v: &Value| v.as_object().unwrap().clone();
        check_registered(&map(&good), expect).unwrap();
        let with = |key: &str, value: Value| {
            let mut v = map(&good);
            v.insert(key.to_owned(), value);
            v
        };
        check_registered(&with("aud", serde_json::json!(["x", "slipway"])), expect).unwrap();
        // Within the leeway on both ends.
        check_registered(&with("exp", serde_json::json!(999_950)), expect).unwrap();
        check_registered(&with("nbf", serde_json::json!(1_000_050)), expect).unwrap();
        for (claims, want) in [
            (with("iss", serde_json::json!("https://evil")), "issuer"),
            (with("aud", serde_json::json!("other")), "audience"),
            (with("aud", serde_json::json!(["a", "b"])), "audience"),
            (with("exp", serde_json::json!(999_000)), "expired 1000s ago"),
            (
                with("exp", serde_json::json!("soon")),
                "`exp` is not a number",
            ),
            (
                with("nbf", serde_json::json!(1_000_500)),
                "not valid for another 500s",
            ),
        ] {
            let err = check_registered(&claims, expect).unwrap_err().to_string();
            assert!(err.contains(want), "{claims:?}: {err}");
        }
        let mut no_exp = map(&good);
        no_exp.remove("exp");
        assert!(check_registered(&no_exp, expect).is_err());
    }
}
