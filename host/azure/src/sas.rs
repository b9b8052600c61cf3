//! Shared access signatures (SAS) as Azure IoT forms them.
//!
//! A token is `SharedAccessSignature sr={uri}&sig={sig}&se={expiry}` (and `&skn={policy}`
//! when signed with a shared access policy's key), where `uri` is the resource URL-encoded
//! with nothing left safe but letters, digits and `-._~` (Python's
//! `urllib.parse.quote(s, safe="")`, which Microsoft's device SDK uses), and `sig` is
//! `base64(HMAC-SHA256(base64decode(key), uri + "\n" + expiry))`, encoded the same way.
//! The resource of a DPS registration is `{idScope}/registrations/{registrationId}`, of an
//! IoT Hub device `{hostname}/devices/{deviceId}`. A device of a DPS enrollment group
//! signs with its own key, derived from the group's: [`derive_device_key`].

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// What URL-encoding leaves as it is: RFC 3986's unreserved characters, as Python's
/// `quote(s, safe="")` does.
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The longest token accepted for parsing (IoT Hub's own MQTT password limit is far
/// larger than any real token; this keeps a hostile CONNECT from costing more).
pub const MAX_TOKEN_LEN: usize = 4096;

/// Why a key or token is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SasError {
    /// The key is not base64.
    #[error("the symmetric key is not base64: {0}")]
    KeyEncoding(String),
    /// The token does not have the expected shape.
    #[error("malformed SAS token: {0}")]
    Malformed(&'static str),
    /// The signature does not match.
    #[error("the SAS token's signature does not match the key")]
    BadSignature,
    /// The token expired.
    #[error("the SAS token expired at {0} (unix seconds)")]
    Expired(u64),
    /// The token is for another resource.
    #[error("the SAS token is for {found}, not {expected}")]
    WrongResource {
        /// The resource the token names.
        found: String,
        /// The resource it should name.
        expected: String,
    },
}

/// URL-encodes `text` as Azure's SDKs do (`quote(text, safe="")`).
pub fn encode(text: &str) -> String {
    utf8_percent_encode(text, UNRESERVED).to_string()
}

/// The resource a DPS registration's token is for.
pub fn dps_resource(id_scope: &str, registration_id: &str) -> String {
    format!("{id_scope}/registrations/{registration_id}")
}

/// The resource an IoT Hub device's token is for.
pub fn hub_resource(hostname: &str, device_id: &str) -> String {
    format!("{hostname}/devices/{device_id}")
}

fn decode_key(key_b64: &str) -> Result<Vec<u8>, SasError> {
    STANDARD
        .decode(key_b64.trim())
        .map_err(|err| SasError::KeyEncoding(err.to_string()))
}

fn mac(key: &[u8]) -> HmacSha256 {
    HmacSha256::new_from_slice(key).expect("HMAC takes a key of any length")
}

/// `base64(HMAC-SHA256(base64decode(key_b64), message))`.
pub fn sign(key_b64: &str, message: &str) -> Result<String, SasError> {
    let mut mac = mac(&decode_key(key_b64)?);
    mac.update(message.as_bytes());
    Ok(STANDARD.encode(mac.finalize().into_bytes()))
}

/// A member's key in a DPS enrollment group: `base64(HMAC-SHA256(groupKey, registrationId))`.
pub fn derive_device_key(group_key_b64: &str, registration_id: &str) -> Result<String, SasError> {
    sign(group_key_b64, registration_id)
}

/// A token for `resource`, valid until `expiry` (unix seconds), signed with `key_b64`;
/// `key_name` (`skn`) only for a shared access policy's key. Byte-identical to what
/// Microsoft's device SDKs make from the same key, resource and expiry.
pub fn token(
    key_b64: &str,
    resource: &str,
    expiry: u64,
    key_name: Option<&str>,
) -> Result<String, SasError> {
    let uri = encode(resource);
    let sig = sign(key_b64, &format!("{uri}\n{expiry}"))?;
    let mut token = format!(
        "SharedAccessSignature sr={uri}&sig={}&se={expiry}",
        encode(&sig)
    );
    if let Some(name) = key_name {
        token.push_str("&skn=");
        token.push_str(&encode(name));
    }
    Ok(token)
}

/// A token's fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// `sr` as sent (URL-encoded): what the signature covers.
    pub encoded_resource: String,
    /// `sr` decoded.
    pub resource: String,
    /// `sig`, decoded: base64 text.
    pub signature: String,
    /// `se`, unix seconds.
    pub expiry: u64,
    /// `skn`, decoded, if present.
    pub key_name: Option<String>,
}

/// Reads a token's fields (in any order; each once; nothing else).
pub fn parse(token: &str) -> Result<Token, SasError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(SasError::Malformed("longer than 4096 bytes"));
    }
    let fields = token
        .strip_prefix("SharedAccessSignature ")
        .ok_or(SasError::Malformed("no `SharedAccessSignature ` prefix"))?;
    let (mut sr, mut sig, mut se, mut skn) = (None, None, None, None);
    for pair in fields.split('&') {
        let (name, value) = pair
            .split_once('=')
            .ok_or(SasError::Malformed("a field without `=`"))?;
        let slot = match name {
            "sr" => &mut sr,
            "sig" => &mut sig,
            "se" => &mut se,
            "skn" => &mut skn,
            _ => return Err(SasError::Malformed("an unknown field")),
        };
        if slot.replace(value).is_some() {
            return Err(SasError::Malformed("a field twice"));
        }
    }
    let decode = |value: &str| {
        percent_decode_str(value)
            .decode_utf8()
            .map(|text| text.into_owned())
            .map_err(|_| SasError::Malformed("a field is not UTF-8 once decoded"))
    };
    let encoded_resource = sr.ok_or(SasError::Malformed("no `sr`"))?;
    let expiry = se
        .ok_or(SasError::Malformed("no `se`"))?
        .parse::<u64>()
        .map_err(|_| SasError::Malformed("`se` is not unix seconds"))?;
    Ok(Token {
        encoded_resource: encoded_resource.to_owned(),
        resource: decode(encoded_resource)?,
        signature: decode(sig.ok_or(SasError::Malformed("no `sig`"))?)?,
        expiry,
        key_name: skn.map(decode).transpose()?,
    })
}

/// Checks `token` for `resource` (compared without regard to ASCII case, as IoT Hub
/// compares host names) against `key_b64` at `now` (unix seconds), in constant time.
pub fn verify(token: &str, key_b64: &str, resource: &str, now: u64) -> Result<Token, SasError> {
    let parsed = parse(token)?;
    if !parsed.resource.eq_ignore_ascii_case(resource) {
        return Err(SasError::WrongResource {
            found: parsed.resource,
            expected: resource.to_owned(),
        });
    }
    if parsed.expiry <= now {
        return Err(SasError::Expired(parsed.expiry));
    }
    let given = STANDARD
        .decode(&parsed.signature)
        .map_err(|_| SasError::Malformed("`sig` is not base64"))?;
    let mut mac = mac(&decode_key(key_b64)?);
    mac.update(format!("{}\n{}", parsed.encoded_resource, parsed.expiry).as_bytes());
    mac.verify_slice(&given)
        .map_err(|_| SasError::BadSignature)?;
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhpcyBpcyBhIHRlc3Qga2V5IGZvciBzYXMgdG9rZW5zIQ==";

    #[test]
    fn encoding_leaves_only_unreserved_characters() {
        assert_eq!(
            encode("hub-1.example_x~/devices/gw 1+=&"),
            "hub-1.example_x~%2Fdevices%2Fgw%201%2B%3D%26"
        );
    }

    #[test]
    fn a_token_verifies_and_names_its_fields() {
        let resource = hub_resource("127.0.0.9", "gw-1");
        let token = token(KEY, &resource, 2_000_000_000, None).unwrap();
        assert!(token.starts_with("SharedAccessSignature sr=127.0.0.9%2Fdevices%2Fgw-1&sig="));
        assert!(token.ends_with("&se=2000000000"));
        let parsed = verify(&token, KEY, &resource, 1_999_999_999).unwrap();
        assert_eq!(parsed.resource, resource);
        assert_eq!(parsed.key_name, None);
        let with_policy =
            super::token(KEY, &resource, 2_000_000_000, Some("registration")).unwrap();
        assert!(with_policy.ends_with("&skn=registration"));
        assert_eq!(
            verify(&with_policy, KEY, &resource, 0)
                .unwrap()
                .key_name
                .as_deref(),
            Some("registration")
        );
    }

    #[test]
    fn expired_forged_and_misdirected_tokens_are_refused() {
        let resource = dps_resource("0ne00000001", "dev-1");
        let token = token(KEY, &resource, 1000, None).unwrap();
        assert_eq!(
            verify(&token, KEY, &resource, 1000),
            Err(SasError::Expired(1000))
        );
        let other_key = "b3RoZXIga2V5";
        assert_eq!(
            verify(&token, other_key, &resource, 0),
            Err(SasError::BadSignature)
        );
        assert!(matches!(
            verify(&token, KEY, &dps_resource("0ne00000001", "dev-2"), 0),
            Err(SasError::WrongResource { .. })
        ));
        // A later expiry with the old signature: the signature covers `se`.
        let stretched = token.replace("se=1000", "se=9000");
        assert_eq!(
            verify(&stretched, KEY, &resource, 0),
            Err(SasError::BadSignature)
        );
    }

    #[test]
    fn malformed_tokens_say_what_is_wrong() {
        for (token, why) in [
            ("sr=a&sig=b&se=1", "no `SharedAccessSignature ` prefix"),
            ("SharedAccessSignature sr=a&sig=b", "no `se`"),
            ("SharedAccessSignature sr=a&se=1", "no `sig`"),
            ("SharedAccessSignature sig=a&se=1", "no `sr`"),
            (
                "SharedAccessSignature sr=a&sr=a&sig=b&se=1",
                "a field twice",
            ),
            (
                "SharedAccessSignature sr=a&sig=b&se=soon",
                "`se` is not unix seconds",
            ),
            (
                "SharedAccessSignature sr=a&sig=b&se=1&x=y",
                "an unknown field",
            ),
            ("SharedAccessSignature sr&sig=b&se=1", "a field without `=`"),
        ] {
            assert_eq!(parse(token), Err(SasError::Malformed(why)), "{token}");
        }
        let long = format!("SharedAccessSignature sr={}", "a".repeat(MAX_TOKEN_LEN));
        assert_eq!(
            parse(&long),
            Err(SasError::Malformed("longer than 4096 bytes"))
        );
        assert!(matches!(
            token("not base64!", "r", 1, None),
            Err(SasError::KeyEncoding(_))
        ));
    }

    #[test]
    fn a_group_members_key_is_the_hmac_of_its_registration_id() {
        // The derivation in Azure's docs (Python):
        // base64.b64encode(hmac.new(base64.b64decode(group), reg_id.encode(), sha256).digest())
        let derived = derive_device_key(KEY, "sensor-7").unwrap();
        let mut mac = mac(&STANDARD.decode(KEY).unwrap());
        mac.update(b"sensor-7");
        assert_eq!(derived, STANDARD.encode(mac.finalize().into_bytes()));
        assert_ne!(derived, derive_device_key(KEY, "sensor-8").unwrap());
    }
}
