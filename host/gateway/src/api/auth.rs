//! Bearer tokens: the admin token that guards `/api/v1`, and the device tokens of the
//! device endpoints.

use hyper::header::HeaderValue;
use subtle::ConstantTimeEq;

use super::ApiState;
use super::error::ApiError;
use crate::state_dir::AdminToken;

impl AdminToken {
    /// Checks an `Authorization` header, in constant time over the token bytes.
    pub(crate) fn check(&self, header: Option<&HeaderValue>) -> Result<(), ApiError> {
        let header = header.ok_or_else(|| {
            ApiError::unauthorized(
                "missing admin token: send the header Authorization: Bearer <token>",
            )
        })?;
        let presented = header
            .to_str()
            .ok()
            .and_then(|value| {
                let (scheme, token) = value.split_once(' ')?;
                scheme
                    .eq_ignore_ascii_case("bearer")
                    .then_some(token.trim())
            })
            .ok_or_else(|| {
                ApiError::unauthorized("the Authorization header must be: Bearer <token>")
            })?;
        if bool::from(presented.as_bytes().ct_eq(self.reveal().as_bytes())) {
            Ok(())
        } else {
            Err(ApiError::unauthorized("invalid admin token"))
        }
    }
}

/// Checks the bearer token in `header` against `device_id`'s credential (the store
/// keeps the hashes; a replaced or revoked token stops working at once).
pub(crate) async fn check_device_token(
    state: &ApiState,
    device_id: &str,
    header: Option<&HeaderValue>,
) -> Result<(), ApiError> {
    let presented = header
        .and_then(|h| h.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .ok_or_else(|| {
            ApiError::unauthorized(
                "missing device token: send Authorization: Bearer <device token> \
                 (issued by `outpost devices credential <id>`)",
            )
        })?;
    let valid = state
        .store
        .check_device_credential(device_id, presented)
        .await
        .map_err(|e| ApiError::internal(format!("the state database failed: {e}")))?;
    if valid {
        Ok(())
    } else {
        Err(ApiError::unauthorized(format!(
            "invalid device token for {device_id}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use hyper::header::HeaderValue;

    use crate::state_dir::AdminToken;

    #[test]
    fn checks_scheme_and_value() {
        let token = AdminToken::new("0123456789abcdef-token").unwrap();
        let header = |v: &str| HeaderValue::from_str(v).unwrap();
        assert!(
            token
                .check(Some(&header("Bearer 0123456789abcdef-token")))
                .is_ok()
        );
        assert!(
            token
                .check(Some(&header("bearer 0123456789abcdef-token")))
                .is_ok()
        );
        assert!(token.check(None).is_err());
        assert!(
            token
                .check(Some(&header("Basic 0123456789abcdef-token")))
                .is_err()
        );
        assert!(
            token
                .check(Some(&header("Bearer 0123456789abcdef-toke")))
                .is_err()
        );
        assert!(token.check(Some(&header("Bearer"))).is_err());
        assert!(AdminToken::new("short").is_err());
        assert!(AdminToken::new("has a space in the middle").is_err());
        assert!(!format!("{token:?}").contains("0123"));
    }
}
