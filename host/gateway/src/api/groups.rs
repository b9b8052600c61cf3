//! Device groups (the unit a rollout may target) and operator-set device properties
//! (site, customer, tag, … that rollouts select on).

use std::collections::BTreeMap;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use outpost_store::{NewDevice, StoreError};
use serde::Deserialize;

use super::{ApiError, ApiState, json_response};

const MAX_BODY: usize = 64 * 1024;

fn store_error(err: StoreError) -> ApiError {
    match err {
        StoreError::InvalidInput { .. } => {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_input", err.to_string())
        }
        StoreError::NotFound { .. } => {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", err.to_string())
        }
        other => ApiError::internal(format!("the state database failed: {other}")),
    }
}

fn malformed(err: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "malformed_request",
        err.to_string(),
    )
}

/// `GET /api/v1/groups`.
pub(crate) async fn list(state: &ApiState) -> Result<Response<Full<Bytes>>, ApiError> {
    let groups = state.store.list_groups().await.map_err(store_error)?;
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({ "groups": groups }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewGroup {
    id: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    description: String,
}

/// `POST /api/v1/groups`: `{id, name?, description?}`.
pub(crate) async fn create(
    state: &ApiState,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let body = super::onboarding::body(request, MAX_BODY).await?;
    let group: NewGroup = serde_json::from_slice(&body).map_err(malformed)?;
    let name = group.name.unwrap_or_else(|| group.id.clone());
    let created = state
        .store
        .create_group(&group.id, &name, &group.description)
        .await
        .map_err(|err| match err {
            StoreError::InvalidInput { .. } => {
                ApiError::new(StatusCode::CONFLICT, "group_exists", err.to_string())
            }
            other => store_error(other),
        })?;
    Ok(json_response(StatusCode::CREATED, &created))
}

/// `PUT /api/v1/groups/{id}/members/{device}`.
pub(crate) async fn add_member(
    state: &ApiState,
    group: &str,
    device: &str,
) -> Result<Response<Full<Bytes>>, ApiError> {
    state
        .store
        .add_group_member(group, device)
        .await
        .map_err(store_error)?;
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({ "group": group, "added": device }),
    ))
}

/// `PUT /api/v1/devices/{id}/properties`: `{"site": "plant-2", "tag": null, …}` merges
/// into the device's properties (`null` removes one).
pub(crate) async fn set_properties(
    state: &ApiState,
    device_id: &str,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let body = super::onboarding::body(request, MAX_BODY).await?;
    let changes: BTreeMap<String, Option<String>> = serde_json::from_slice(&body).map_err(|e| {
        malformed(format!(
            "properties are a JSON object of strings (or null to remove): {e}"
        ))
    })?;
    let known = state
        .store
        .device(device_id)
        .await
        .map_err(store_error)?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_device",
                format!("no device {device_id:?} in the lobby"),
            )
        })?;
    let mut compat = known.compat;
    for (key, value) in changes {
        match value {
            Some(value) => compat.insert(key, value),
            None => compat.remove(&key),
        };
    }
    let device = state
        .store
        .upsert_device(NewDevice {
            id: known.id,
            device_type: known.device_type,
            manufacturer: known.manufacturer,
            model: known.model,
            compat,
            firmware_version: known.firmware_version,
            state: known.state,
        })
        .await
        .map_err(store_error)?;
    Ok(json_response(StatusCode::OK, &device))
}
