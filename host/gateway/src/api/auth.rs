//! Bearer tokens: who calls `/api/v1` and `/metrics` (the admin token of the config or
//! state directory, or an API token with a role), what each role may do, and the device
//! tokens of the device endpoints.

use hyper::Method;
use hyper::header::HeaderValue;
use outpost_store::Role;
use subtle::ConstantTimeEq;

use super::ApiState;
use super::error::ApiError;

/// Who is calling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Caller {
    /// The token's name (`admin-token` for the bootstrap token).
    pub(crate) name: String,
    /// What it may do.
    pub(crate) role: Role,
}

/// The token in an `Authorization: Bearer …` header.
fn bearer(header: Option<&HeaderValue>) -> Result<&str, ApiError> {
    let header = header.ok_or_else(|| {
        ApiError::unauthorized("missing token: send the header Authorization: Bearer <token>")
    })?;
    header
        .to_str()
        .ok()
        .and_then(|value| {
            let (scheme, token) = value.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then_some(token.trim())
        })
        .ok_or_else(|| ApiError::unauthorized("the Authorization header must be: Bearer <token>"))
}

/// Who presents `header`: the admin token (compared in constant time) or a stored API
/// token (looked up by its hash; a revoked one fails at once).
pub(crate) async fn caller(
    state: &ApiState,
    header: Option<&HeaderValue>,
) -> Result<Caller, ApiError> {
    let presented = bearer(header)?;
    if bool::from(presented.as_bytes().ct_eq(state.admin.reveal().as_bytes())) {
        return Ok(Caller {
            name: "admin-token".to_owned(),
            role: Role::Admin,
        });
    }
    match state.store.check_api_token(presented).await {
        Ok(Some(token)) => Ok(Caller {
            name: token.name,
            role: token.role,
        }),
        Ok(None) => Err(ApiError::unauthorized("invalid token")),
        Err(err) => Err(ApiError::store(err)),
    }
}

/// The role a request needs: reading is for viewers, handler trust and tokens for
/// admins, everything else for operators.
pub(crate) fn required_role(method: &Method, path: &str) -> Role {
    let admin_only = path == "/api/v1/tokens"
        || path.starts_with("/api/v1/tokens/")
        || ((path == "/api/v1/handlers" || path.starts_with("/api/v1/handlers/"))
            && !matches!(*method, Method::GET | Method::HEAD));
    // A nearby scan drives the radio and may connect to devices: an operator's GET.
    let operator_get = path == "/api/v1/onboarding/nearby";
    if admin_only {
        Role::Admin
    } else if matches!(*method, Method::GET | Method::HEAD) && !operator_get {
        Role::Viewer
    } else {
        Role::Operator
    }
}

/// Authenticates and authorizes a request to `/api/v1` or `/metrics`: 401 without a
/// valid token, 403 when its role is too low.
pub(crate) async fn authorize(
    state: &ApiState,
    method: &Method,
    path: &str,
    header: Option<&HeaderValue>,
) -> Result<Caller, ApiError> {
    let caller = caller(state, header).await?;
    let needed = required_role(method, path);
    if caller.role >= needed {
        Ok(caller)
    } else {
        Err(ApiError::forbidden(format!(
            "{method} {path} needs the {needed} role; the token {:?} is {} {}",
            caller.name,
            if caller.role == Role::Admin {
                "an"
            } else {
                "a"
            },
            caller.role
        )))
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
    use hyper::Method;
    use hyper::header::HeaderValue;
    use outpost_store::Role;

    use super::{bearer, required_role};
    use crate::state_dir::AdminToken;

    #[test]
    fn the_bearer_scheme_is_required_and_tokens_are_validated() {
        let header = |v: &str| HeaderValue::from_str(v).unwrap();
        let token = "0123456789abcdef-token";
        assert_eq!(
            bearer(Some(&header(&format!("Bearer {token}")))).unwrap(),
            token
        );
        assert_eq!(
            bearer(Some(&header(&format!("bearer {token}")))).unwrap(),
            token
        );
        assert!(bearer(None).is_err());
        assert!(bearer(Some(&header(&format!("Basic {token}")))).is_err());
        assert!(bearer(Some(&header("Bearer"))).is_err());
        assert!(AdminToken::new("short").is_err());
        assert!(AdminToken::new("has a space in the middle").is_err());
        let admin = AdminToken::new(token).unwrap();
        assert!(!format!("{admin:?}").contains("0123"));
    }

    #[test]
    fn reading_is_for_viewers_handler_trust_and_tokens_for_admins() {
        assert_eq!(
            required_role(&Method::GET, "/api/v1/rollouts"),
            Role::Viewer
        );
        assert_eq!(required_role(&Method::HEAD, "/metrics"), Role::Viewer);
        assert_eq!(
            required_role(&Method::POST, "/api/v1/rollouts/r/pause"),
            Role::Operator
        );
        assert_eq!(
            required_role(&Method::POST, "/api/v1/handlers"),
            Role::Admin
        );
        assert_eq!(
            required_role(&Method::DELETE, "/api/v1/handlers/acme"),
            Role::Admin
        );
        assert_eq!(
            required_role(&Method::GET, "/api/v1/handlers"),
            Role::Viewer
        );
        assert_eq!(required_role(&Method::GET, "/api/v1/tokens"), Role::Admin);
        assert_eq!(
            required_role(&Method::DELETE, "/api/v1/tokens/x"),
            Role::Admin
        );
    }
}
