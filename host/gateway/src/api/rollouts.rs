//! Rollouts for the operator (admin token) and the device side of updates (device token):
//! register, next command, replies, reports.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header;
use hyper::{Request, Response, StatusCode};
use serde::{Deserialize, Serialize};

use super::{ApiError, ApiState, json_response};
use outpost_rollout::{Origin, RolloutError, RolloutSpec};

/// A device waits at most this long for its next command.
const MAX_WAIT: Duration = Duration::from_secs(30);
/// Request bodies on these endpoints.
const MAX_BODY: usize = 512 * 1024;

fn rollout_error(err: RolloutError) -> ApiError {
    match err {
        RolloutError::Invalid(m) => ApiError::new(StatusCode::BAD_REQUEST, "invalid_rollout", m),
        RolloutError::NotFound(id) => ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_rollout",
            format!("no rollout {id:?}"),
        ),
        RolloutError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "rollout_conflict", m),
        RolloutError::DiskFull(m) => ApiError::disk_full(&m),
        RolloutError::Internal(m) => ApiError::internal(m),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CreateRollout {
    #[serde(default)]
    id: Option<String>,
    /// The signed manifest (JWS) of an update rollout.
    #[serde(default)]
    manifest: Option<String>,
    /// A Wi-Fi credential rotation instead of a manifest.
    #[serde(default)]
    wifi: Option<outpost_rollout::WifiRotation>,
    #[serde(default)]
    rollout: Option<RolloutSpec>,
}

/// `POST /api/v1/rollouts`: a local rollout (offline sites) of a signed manifest, or a
/// Wi-Fi credential rotation (`wifi`; only over the TLS device listener, since the
/// passphrase travels in the command).
pub(crate) async fn create(
    state: &ApiState,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let body = super::read_body(request, MAX_BODY).await?;
    let create: CreateRollout = super::parse_json(&body, "a rollout")?;
    let spec = create.rollout.unwrap_or_default();
    let view = match (create.manifest, create.wifi) {
        (Some(manifest), None) => {
            state
                .rollouts
                .create(create.id, Origin::Local, manifest.trim(), spec)
                .await
        }
        (None, Some(rotation)) => {
            if state.health.devices_url.is_none() {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "no_device_listener",
                    "a Wi-Fi rotation sends the passphrase to the devices, which this gateway \
                     would do in the clear: configure the TLS device listener ([devices] bind) \
                     first",
                ));
            }
            state.rollouts.create_wifi(create.id, rotation, spec).await
        }
        _ => {
            return Err(ApiError::malformed(
                "a rollout",
                "give either manifest (a signed update manifest) or wifi (a Wi-Fi rotation)",
            ));
        }
    }
    .map_err(rollout_error)?;
    Ok(json_response(StatusCode::CREATED, &view))
}

#[derive(Serialize)]
struct List {
    rollouts: Vec<outpost_rollout::RolloutView>,
}

/// `GET /api/v1/rollouts`.
pub(crate) async fn list(state: &ApiState) -> Result<Response<Full<Bytes>>, ApiError> {
    let rollouts = state.rollouts.list().await.map_err(rollout_error)?;
    Ok(json_response(StatusCode::OK, &List { rollouts }))
}

/// `GET /api/v1/rollouts/{id}` and `POST /api/v1/rollouts/{id}/{action}`.
pub(crate) async fn one(
    state: &ApiState,
    rest: &str,
    method: &hyper::Method,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let (id, action) = match rest.split_once('/') {
        Some((id, action)) => (id, Some(action)),
        None => (rest, None),
    };
    let rollouts = &state.rollouts;
    let view = match (action, method) {
        (None, &hyper::Method::GET) => rollouts.view(id, true).await,
        (None, _) => return Err(ApiError::method_not_allowed(method, "GET")),
        (Some(action), &hyper::Method::POST) => match action {
            "pause" => rollouts.pause(id).await,
            "resume" => rollouts.resume(id).await,
            "cancel" => rollouts.cancel(id).await,
            "retry" => rollouts.retry(id).await,
            _ => return Err(ApiError::not_found(&format!("/api/v1/rollouts/{rest}"))),
        },
        (Some(_), _) => return Err(ApiError::method_not_allowed(method, "POST")),
    }
    .map_err(rollout_error)?;
    Ok(json_response(StatusCode::OK, &view))
}

/// `…/devices/{id}/register` body: what the device says about itself.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Register {
    #[serde(default)]
    manufacturer: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    firmware_version: Option<String>,
    /// Further compatibility properties (chip, project, site, …).
    #[serde(default)]
    properties: BTreeMap<String, String>,
}

/// The device endpoints under `/api/v1/devices/{id}/…` other than telemetry, after the
/// device token was checked.
pub(crate) async fn device(
    state: &ApiState,
    device_id: &str,
    what: &str,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    super::auth::check_device_token(
        state,
        device_id,
        request.headers().get(header::AUTHORIZATION),
    )
    .await?;
    let method = request.method().clone();
    match (what, &method) {
        ("register", &hyper::Method::POST) => register(state, device_id, request).await,
        ("next", &hyper::Method::GET) => next(state, device_id, request.uri().query()).await,
        ("reports", &hyper::Method::POST) => report(state, device_id, request).await,
        (reply, &hyper::Method::POST)
            if reply.starts_with("commands/") && reply.ends_with("/reply") =>
        {
            let number = &reply["commands/".len()..reply.len() - "/reply".len()];
            let number: u64 = number.parse().map_err(|_| {
                ApiError::not_found(&format!("/api/v1/devices/{device_id}/{reply}"))
            })?;
            command_reply(state, device_id, number, request).await
        }
        ("register" | "reports", _) => Err(ApiError::method_not_allowed(&method, "POST")),
        ("next", _) => Err(ApiError::method_not_allowed(&method, "GET")),
        _ => Err(ApiError::not_found(&format!(
            "/api/v1/devices/{device_id}/{what}"
        ))),
    }
}

async fn register(
    state: &ApiState,
    device_id: &str,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let body = super::read_body(request, MAX_BODY).await?;
    let register: Register = super::parse_json(&body, "a registration")?;
    let device = super::groups::update_device(state, device_id, |device| {
        device.compat.extend(register.properties);
        if register.manufacturer.is_some() {
            device.manufacturer = register.manufacturer;
        }
        if register.model.is_some() {
            device.model = register.model;
        }
        if register.firmware_version.is_some() {
            device.firmware_version = register.firmware_version;
        }
    })
    .await?;
    state
        .store
        .touch_device(device_id)
        .await
        .map_err(ApiError::store)?;
    Ok(json_response(StatusCode::OK, &device))
}

async fn next(
    state: &ApiState,
    device_id: &str,
    query: Option<&str>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let wait = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == "wait")
        .map(|(_, v)| {
            v.parse::<u64>().map_err(|_| {
                ApiError::malformed("wait", format!("{v:?} is not a number of seconds"))
            })
        })
        .transpose()?
        .map_or(Duration::ZERO, Duration::from_secs)
        .min(MAX_WAIT);
    let _ = state.store.touch_device(device_id).await;
    match state.rollouts.mailbox().next(device_id, wait).await {
        Some(pending) => Ok(json_response(StatusCode::OK, &pending.to_wire())),
        None => {
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = StatusCode::NO_CONTENT;
            Ok(response)
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Reply {
    ok: bool,
    #[serde(default)]
    payload: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

async fn command_reply(
    state: &ApiState,
    device_id: &str,
    number: u64,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let body = super::read_body(request, MAX_BODY).await?;
    let reply: Reply = super::parse_json(&body, "a reply")?;
    let answer = if reply.ok {
        Ok(reply.payload.unwrap_or_default().into_bytes())
    } else {
        Err(reply.error.unwrap_or_else(|| "refused".into()))
    };
    if state.rollouts.mailbox().reply(device_id, number, answer) {
        Ok(json_response(
            StatusCode::OK,
            &serde_json::json!({"delivered": true}),
        ))
    } else {
        Err(ApiError::new(
            StatusCode::GONE,
            "command_gone",
            format!(
                "command {number} is not waiting for {device_id}'s answer (it timed out or was withdrawn)"
            ),
        ))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceReportBody {
    kind: String,
    #[serde(default)]
    payload: String,
}

async fn report(
    state: &ApiState,
    device_id: &str,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let body = super::read_body(request, MAX_BODY).await?;
    let report: DeviceReportBody = super::parse_json(&body, "a report")?;
    if report.kind.is_empty() || report.kind.len() > 64 {
        return Err(ApiError::malformed(
            "a report",
            "kind must be 1-64 characters",
        ));
    }
    let delivered = state
        .rollouts
        .report(device_id, report.kind, report.payload.into_bytes());
    Ok(json_response(
        StatusCode::ACCEPTED,
        &serde_json::json!({ "delivered": delivered }),
    ))
}
