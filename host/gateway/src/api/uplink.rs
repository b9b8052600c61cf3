//! The uplink's local endpoints: device telemetry in (per-device credential), device
//! credentials (admin), and the uplink's status (admin).

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header;
use hyper::{Request, Response, StatusCode};
use outpost_uplink::OutboxError;
use outpost_uplink::contract;
use outpost_uplink::telemetry::{self, TelemetryError};
use serde::Serialize;

use super::{ApiError, ApiState, json_response};
use outpost_store::now_millis;

/// And at most this many bytes.
const MAX_REQUEST: usize = 1024 * 1024;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Accepted {
    accepted: usize,
    message_ids: Vec<String>,
}

/// `POST /api/v1/devices/{id}/telemetry`: one JSON object, an array of up to 100, or
/// (`Content-Type: application/x-ndjson`) up to 100 objects one per line; the records
/// are committed as one group, each its own message.
pub(crate) async fn telemetry(
    state: &ApiState,
    device_id: &str,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    if !contract::valid_id(device_id) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{device_id:?} is not a device id"),
        ));
    }
    super::auth::check_device_token(
        state,
        device_id,
        request.headers().get(header::AUTHORIZATION),
    )
    .await?;
    let ndjson = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "application/x-ndjson" | "application/ndjson" | "application/jsonl"
            )
        });
    let body = super::read_body(request, MAX_REQUEST).await?;
    let gateway = state.health.gateway.id.as_str();
    let parse = if ndjson {
        telemetry::ndjson_messages
    } else {
        telemetry::messages
    };
    let messages = parse(gateway, device_id, &body, now_millis()).map_err(|err| match err {
        TelemetryError::Malformed(text) => {
            ApiError::new(StatusCode::BAD_REQUEST, "malformed_telemetry", text)
        }
        TelemetryError::TooLarge(text) => {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", text)
        }
    })?;
    let ids: Vec<String> = messages.iter().map(|m| m.message_id.clone()).collect();
    match state.outbox.enqueue_all(messages).await {
        Ok(()) => Ok(json_response(
            StatusCode::ACCEPTED,
            &Accepted {
                accepted: ids.len(),
                message_ids: ids,
            },
        )),
        Err(err @ OutboxError::Full { .. }) => Err(ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "outbox_full",
            err.to_string(),
        )),
        Err(OutboxError::Store(err)) if err.is_disk_full() => Err(ApiError::disk_full(&err)),
        Err(err @ OutboxError::TooLarge { .. }) => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            err.to_string(),
        )),
        Err(err) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "outbox_unavailable",
            err.to_string(),
        )),
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Credential {
    device_id: String,
    token: String,
}

/// `POST /api/v1/devices/{id}/credential` (admin): a new device token, shown once; it
/// replaces any earlier one.
pub(crate) async fn credential(
    state: &ApiState,
    device_id: &str,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let token = match state.store.issue_device_credential(device_id).await {
        Ok(token) => token,
        Err(outpost_store::StoreError::NotFound { .. }) => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_device",
                format!("no device {device_id:?} in the lobby; onboard it first"),
            ));
        }
        Err(err) => return Err(ApiError::store(err)),
    };
    Ok(json_response(
        StatusCode::CREATED,
        &Credential {
            device_id: device_id.to_owned(),
            token,
        },
    ))
}

/// `DELETE /api/v1/devices/{id}/credential` (admin): the device token stops working
/// with the next request. `404 no_credential` when the device has none.
pub(crate) async fn revoke_credential(
    state: &ApiState,
    device_id: &str,
) -> Result<Response<Full<Bytes>>, ApiError> {
    if state
        .store
        .revoke_device_credential(device_id)
        .await
        .map_err(ApiError::store)?
    {
        Ok(json_response(
            StatusCode::OK,
            &serde_json::json!({"deviceId": device_id, "revoked": true}),
        ))
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no_credential",
            format!("device {device_id:?} has no credential"),
        ))
    }
}

#[derive(Serialize)]
struct Status {
    configured: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    link: Option<outpost_uplink::UplinkStatus>,
    outbox: outpost_uplink::OutboxStats,
}

/// `GET /api/v1/uplink` (admin).
pub(crate) fn status(state: &ApiState) -> Response<Full<Bytes>> {
    json_response(
        StatusCode::OK,
        &Status {
            configured: state.uplink.is_some(),
            link: state.uplink.as_ref().map(outpost_uplink::Uplink::status),
            outbox: state.outbox.stats(),
        },
    )
}
