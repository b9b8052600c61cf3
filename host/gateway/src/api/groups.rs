//! Device groups (the unit a rollout may target) and operator-set device properties
//! (site, customer, tag, … that rollouts select on).

use std::collections::BTreeMap;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use outpost_store::{Device, NewDevice, StoreError};
use serde::Deserialize;

use super::{ApiError, ApiState, json_response};

const MAX_BODY: usize = 64 * 1024;

/// [`Store::update_device`](outpost_store::Store::update_device), with `404
/// unknown_device` when the lobby does not have it.
pub(super) async fn update_device(
    state: &ApiState,
    id: &str,
    change: impl FnOnce(&mut NewDevice),
) -> Result<Device, ApiError> {
    match state.store.update_device(id, change).await {
        Err(StoreError::NotFound { .. }) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_device",
            format!("no device {id:?} in the lobby"),
        )),
        other => other.map_err(ApiError::store),
    }
}

/// `GET /api/v1/groups`.
pub(crate) async fn list(state: &ApiState) -> Result<Response<Full<Bytes>>, ApiError> {
    let groups = state.store.list_groups().await.map_err(ApiError::store)?;
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
    let body = super::read_body(request, MAX_BODY).await?;
    let group: NewGroup = super::parse_json(&body, "a group")?;
    let name = group.name.unwrap_or_else(|| group.id.clone());
    let created = state
        .store
        .create_group(&group.id, &name, &group.description)
        .await
        .map_err(|err| match err {
            StoreError::InvalidInput { .. } => {
                ApiError::new(StatusCode::CONFLICT, "group_exists", err.to_string())
            }
            other => ApiError::store(other),
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
        .map_err(ApiError::store)?;
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
    let body = super::read_body(request, MAX_BODY).await?;
    let changes: BTreeMap<String, Option<String>> = serde_json::from_slice(&body).map_err(|e| {
        ApiError::malformed(
            "properties (a JSON object of strings, or null to remove one)",
            e,
        )
    })?;
    let device = update_device(state, device_id, |device| {
        for (key, value) in changes {
            match value {
                Some(value) => device.compat.insert(key, value),
                None => device.compat.remove(&key),
            };
        }
    })
    .await?;
    Ok(json_response(StatusCode::OK, &device))
}
