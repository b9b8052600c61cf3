//! Shared-access-signature tokens for registration, in Azure DPS's format.
//!
//! `SharedAccessSignature sr={url-encoded resource}&sig={url-encoded base64(HMAC-SHA256(key,
//! resource + "\n" + expiry))}&se={expiry}&skn=registration`, where the resource is
//! `{scope}/registrations/{registrationId}`. With an enrollment group, each member's key is
//! `base64(HMAC-SHA256(base64decode(groupKey), registrationId))`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Why a key or token is unusable.
#[derive(Debug, thiserror::Error)]
pub enum SasError {
    /// The key is not base64.
    #[error("the enrollment key is not base64: {0}")]
    KeyEncoding(String),
    /// The token does not have the expected shape.
    #[error("malformed SAS token: {0}")]
    Malformed(&'static str),
    /// The signature does not match.
    #[error("the SAS token's signature does not match the enrollment key")]
    BadSignature,
    /// The token expired.
    #[error("the SAS token expired")]
    Expired,
    /// The token is for another resource.
    #[error("the SAS token is for another registration ({0})")]
    WrongResource(String),
}

/// The registration resource a token is scoped to.
pub fn resource(scope: &str, registration_id: &str) -> String {
    format!("{scope}/registrations/{registration_id}")
}

fn signature(key_b64: &str, resource: &str, expiry: u64) -> Result<String, SasError> {
    let key = STANDARD
        .decode(key_b64.trim())
        .map_err(|err| SasError::KeyEncoding(err.to_string()))?;
    let mut mac = HmacSha256::new_from_slice(&key).expect("HMAC takes any key length");
    mac.update(format!("{resource}\n{expiry}").as_bytes());
    Ok(STANDARD.encode(mac.finalize().into_bytes()))
}

/// A token for `scope`/`registration_id`, valid until `expiry` (unix seconds).
pub fn token(
    key_b64: &str,
    scope: &str,
    registration_id: &str,
    expiry: u64,
) -> Result<String, SasError> {
    let resource = resource(scope, registration_id);
    let sig = signature(key_b64, &resource, expiry)?;
    Ok(format!(
        "SharedAccessSignature sr={}&sig={}&se={expiry}&skn=registration",
        utf8_percent_encode(&resource, NON_ALPHANUMERIC),
        utf8_percent_encode(&sig, NON_ALPHANUMERIC),
    ))
}

/// Checks `token` against `key_b64` for `scope`/`registration_id` at `now` (unix seconds).
pub fn verify(
    token: &str,
    key_b64: &str,
    scope: &str,
    registration_id: &str,
    now: u64,
) -> Result<(), SasError> {
    let fields = token
        .strip_prefix("SharedAccessSignature ")
        .ok_or(SasError::Malformed("no SharedAccessSignature prefix"))?;
    let (mut sr, mut sig, mut se) = (None, None, None);
    for pair in fields.split('&') {
        let (name, value) = pair
            .split_once('=')
            .ok_or(SasError::Malformed("field without ="))?;
        let value = percent_encoding::percent_decode_str(value)
            .decode_utf8()
            .map_err(|_| SasError::Malformed("not UTF-8"))?
            .into_owned();
        match name {
            "sr" => sr = Some(value),
            "sig" => sig = Some(value),
            "se" => se = Some(value),
            _ => {}
        }
    }
    let sr = sr.ok_or(SasError::Malformed("no sr"))?;
    let sig = sig.ok_or(SasError::Malformed("no sig"))?;
    let expiry: u64 = se
        .ok_or(SasError::Malformed("no se"))?
        .parse()
        .map_err(|_| SasError::Malformed("se is not a number"))?;
    let expected = resource(scope, registration_id);
    if sr != expected {
        return Err(SasError::WrongResource(sr));
    }
    let good = signature(key_b64, &sr, expiry)?;
    if !bool::from(subtle::ConstantTimeEq::ct_eq(
        good.as_bytes(),
        sig.as_bytes(),
    )) {
        return Err(SasError::BadSignature);
    }
    if expiry <= now {
        return Err(SasError::Expired);
    }
    Ok(())
}

/// A member's key in an enrollment group: `base64(HMAC-SHA256(groupKey, registrationId))`.
pub fn derive_device_key(group_key_b64: &str, registration_id: &str) -> Result<String, SasError> {
    let key = STANDARD
        .decode(group_key_b64.trim())
        .map_err(|err| SasError::KeyEncoding(err.to_string()))?;
    let mut mac = HmacSha256::new_from_slice(&key).expect("HMAC takes any key length");
    mac.update(registration_id.as_bytes());
    Ok(STANDARD.encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "c2VjcmV0LWVucm9sbG1lbnQta2V5LTMyLWJ5dGVzISE=";

    #[test]
    fn a_token_verifies_with_its_key_only() {
        let token = token(KEY, "0ne00000001", "gw-1", 2_000_000_000).unwrap();
        assert!(
            token.starts_with("SharedAccessSignature sr=0ne00000001%2Fregistrations%2Fgw%2D1&sig=")
        );
        assert!(token.ends_with("&se=2000000000&skn=registration"));
        verify(&token, KEY, "0ne00000001", "gw-1", 1_900_000_000).unwrap();
        let other = STANDARD.encode(b"another key entirely");
        assert!(matches!(
            verify(&token, &other, "0ne00000001", "gw-1", 1_900_000_000),
            Err(SasError::BadSignature)
        ));
        assert!(matches!(
            verify(&token, KEY, "0ne00000001", "gw-2", 1_900_000_000),
            Err(SasError::WrongResource(_))
        ));
        assert!(matches!(
            verify(&token, KEY, "0ne00000001", "gw-1", 2_000_000_001),
            Err(SasError::Expired)
        ));
        assert!(matches!(
            verify("Bearer x", KEY, "s", "gw-1", 0),
            Err(SasError::Malformed(_))
        ));
    }

    #[test]
    fn group_keys_derive_per_device_keys() {
        // HMAC-SHA256 of "gw-1" under the decoded key; stable across runs.
        let a = derive_device_key(KEY, "gw-1").unwrap();
        let b = derive_device_key(KEY, "gw-2").unwrap();
        assert_ne!(a, b);
        assert_eq!(STANDARD.decode(&a).unwrap().len(), 32);
        assert_eq!(a, derive_device_key(KEY, "gw-1").unwrap());
        assert!(derive_device_key("not base64!", "gw-1").is_err());
    }
}
