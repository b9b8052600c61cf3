//! `/api/v1/tokens` (admin): API tokens with a role. `outpost tokens create|list|revoke`
//! uses these when a gateway is running.

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use outpost_store::{Role, StoreError};
use serde::Deserialize;

use super::{ApiError, ApiState, json_response};

/// The body of `POST /api/v1/tokens`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    name: String,
    role: Role,
}

/// `GET /api/v1/tokens`: names, roles and creation times; never the tokens.
pub(crate) async fn list(state: &ApiState) -> Result<Response<Full<Bytes>>, ApiError> {
    let tokens = state
        .store
        .list_api_tokens()
        .await
        .map_err(ApiError::store)?;
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({ "tokens": tokens }),
    ))
}

/// `POST /api/v1/tokens` with `{"name", "role"}`: `201` with the token, shown this once.
pub(crate) async fn create(
    state: &ApiState,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let body = super::read_body(request, 4096).await?;
    let wanted: NewToken = super::parse_json(&body, "a token (name, role)")?;
    let token = state
        .store
        .create_api_token(&wanted.name, wanted.role)
        .await
        .map_err(|err| match err {
            StoreError::Exists { .. } => ApiError::new(
                StatusCode::CONFLICT,
                "token_exists",
                format!("{err}: revoke it first, or pick another name"),
            ),
            other => ApiError::store(other),
        })?;
    tracing::info!(name = %wanted.name, role = %wanted.role, "API token created");
    Ok(json_response(
        StatusCode::CREATED,
        &serde_json::json!({ "name": wanted.name, "role": wanted.role, "token": token }),
    ))
}

/// `DELETE /api/v1/tokens/{name}`: revoked at once.
pub(crate) async fn revoke(
    state: &ApiState,
    name: &str,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let removed = state
        .store
        .revoke_api_token(name)
        .await
        .map_err(ApiError::store)?;
    if !removed {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no_token",
            format!("no token named {name:?}"),
        ));
    }
    tracing::info!(name, "API token revoked");
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({ "revoked": name }),
    ))
}
