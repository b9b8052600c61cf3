//! The local HTTP API (documented in `docs/local-api.md`).
//!
//! `GET /healthz` is open; everything under `/api/v1` needs the admin bearer token.
//! Every error answer has the shape `{"error":{"code","message"}}`.

mod auth;
mod dashboard;
mod error;
pub(crate) mod firmware;
mod groups;
pub(crate) mod handlers;
pub(crate) mod metrics;
mod onboarding;
mod rollouts;
mod tokens;
pub(crate) mod uplink;

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use outpost_runtime::HandlerRegistry;
use outpost_store::Store;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub(crate) use error::ApiError;

use outpost_onboarding::OnboardingStatus;

use crate::state_dir::AdminToken;

/// What the handlers need.
#[derive(Debug)]
pub(crate) struct ApiState {
    pub(crate) onboarder: Arc<outpost_onboarding::Onboarder>,
    pub(crate) store: Store,
    pub(crate) admin: AdminToken,
    pub(crate) health: Health,
    pub(crate) handlers: Arc<HandlerRegistry>,
    pub(crate) firmware: outpost_cache::FirmwareCache,
    pub(crate) outbox: outpost_uplink::Outbox,
    pub(crate) uplink: Option<outpost_uplink::Uplink>,
    pub(crate) rollouts: outpost_rollout::Rollouts,
    /// Checks the signed firmware links the device listener serves.
    pub(crate) links: outpost_cache::links::LinkSigner,
    /// Whether `/firmware/` needs a signed link (`cache.require_signed_links`).
    pub(crate) require_signed_links: bool,
}

/// The `/healthz` answer.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Health {
    pub(crate) status: &'static str,
    pub(crate) version: &'static str,
    pub(crate) gateway: GatewayInfo,
    /// `offline` (no uplink configured) or `configured`; the link state is in
    /// `/api/v1/uplink`.
    pub(crate) uplink: &'static str,
    pub(crate) onboarding: OnboardingStatus,
    /// The plain-HTTP firmware listener (`cache.bind`), when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) firmware_url: Option<String>,
    /// The device listener (`[devices]`), when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) devices_url: Option<String>,
}

/// Who answers.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct GatewayInfo {
    pub(crate) id: String,
    pub(crate) name: String,
}

/// Serves until `shutdown` is cancelled, then lets open connections finish their current
/// request (up to the limits' grace) and returns.
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Option<outpost_serve::TlsAcceptor>,
    limits: outpost_serve::Limits,
    state: Arc<ApiState>,
    shutdown: CancellationToken,
) {
    outpost_serve::serve_tls(listener, tls, limits, "local API", shutdown, move |peer| {
        let state = Arc::clone(&state);
        service_fn(move |request| {
            let state = Arc::clone(&state);
            async move {
                use http_body_util::Either;
                // Firmware by signed link here too, for sites without a device listener.
                if request.uri().path().starts_with("/firmware/") {
                    return Ok::<_, Infallible>(firmware(&state, &request, peer).await);
                }
                Ok::<_, Infallible>(route(&state, request).await.map(Either::Left))
            }
        })
    })
    .await;
}

/// What the device listener answers: JSON from the device endpoints, or firmware.
type DeviceBody = http_body_util::Either<Full<Bytes>, outpost_cache::server::FirmwareBody>;

/// Serves the device listener (`[devices]`): the device endpoints and `/firmware/`,
/// nothing else, over TLS when `tls` is given.
pub(crate) async fn serve_devices(
    listener: TcpListener,
    tls: Option<outpost_serve::TlsAcceptor>,
    limits: outpost_serve::Limits,
    state: Arc<ApiState>,
    shutdown: CancellationToken,
) {
    outpost_serve::serve_tls(listener, tls, limits, "devices", shutdown, move |peer| {
        let state = Arc::clone(&state);
        service_fn(move |request| {
            let state = Arc::clone(&state);
            async move { Ok::<_, Infallible>(device_route(&state, request, peer).await) }
        })
    })
    .await;
}

/// `GET`/`HEAD /firmware/{sha256}` with a signed link, as the fan-out server answers.
async fn firmware(
    state: &ApiState,
    request: &Request<Incoming>,
    peer: std::net::SocketAddr,
) -> Response<DeviceBody> {
    let answer = outpost_cache::server::answer(
        &state.firmware,
        Some(&state.links),
        state.require_signed_links,
        request,
        peer,
    )
    .await;
    metrics::count_request(request.uri().path(), answer.status());
    answer.map(http_body_util::Either::Right)
}

async fn device_route(
    state: &ApiState,
    request: Request<Incoming>,
    peer: std::net::SocketAddr,
) -> Response<DeviceBody> {
    use http_body_util::Either;
    let path = request.uri().path().to_owned();
    if path.starts_with("/firmware/") {
        return firmware(state, &request, peer).await;
    }
    let result = match device_endpoint(&path) {
        Some((id, what)) => device_request(state, id, what, request).await,
        // The operators' API is not served here.
        None => Err(ApiError::not_found(&path)),
    };
    let response = result.unwrap_or_else(ApiError::into_response);
    metrics::count_request(&path, response.status());
    response.map(Either::Left)
}

async fn route(state: &ApiState, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let result = match path.as_str() {
        "/" | "/dashboard" => match method {
            Method::GET | Method::HEAD => Ok(dashboard::page()),
            _ => Err(ApiError::method_not_allowed(&method, "GET, HEAD")),
        },
        "/healthz" => match method {
            Method::GET | Method::HEAD => Ok(json_response(StatusCode::OK, &state.health)),
            _ => Err(ApiError::method_not_allowed(&method, "GET, HEAD")),
        },
        // Prometheus scrapes with a token, as any other reader of the API.
        "/metrics" => match auth::authorize(
            state,
            &method,
            &path,
            request.headers().get(header::AUTHORIZATION),
        )
        .await
        {
            Err(err) => Err(err),
            Ok(_) => match method {
                Method::GET => metrics::render(state).await,
                _ => Err(ApiError::method_not_allowed(&method, "GET")),
            },
        },
        // Devices authenticate with their own token, on their own endpoint only.
        device if device_endpoint(device).is_some() => {
            let (id, what) = device_endpoint(device).expect("matched");
            device_request(state, id, what, request).await
        }
        // Authentication comes before routing under /api/, so an unauthenticated caller
        // learns nothing about which endpoints exist.
        api if api.starts_with("/api/") => match auth::authorize(
            state,
            &method,
            api,
            request.headers().get(header::AUTHORIZATION),
        )
        .await
        {
            Err(err) => Err(err),
            Ok(caller) => match (api, &method) {
                ("/api/v1/whoami", &Method::GET) => Ok(json_response(
                    StatusCode::OK,
                    &serde_json::json!({"name": caller.name, "role": caller.role}),
                )),
                ("/api/v1/tokens", &Method::GET) => tokens::list(state).await,
                ("/api/v1/tokens", &Method::POST) => tokens::create(state, request).await,
                ("/api/v1/tokens", _) => Err(ApiError::method_not_allowed(&method, "GET, POST")),
                (named, &Method::DELETE) if named.starts_with("/api/v1/tokens/") => {
                    tokens::revoke(state, &named["/api/v1/tokens/".len()..]).await
                }
                ("/api/v1/devices", &Method::GET) => list_devices(state).await,
                ("/api/v1/devices", _) => Err(ApiError::method_not_allowed(&method, "GET")),
                ("/api/v1/onboarding/targets", &Method::GET) => onboarding::targets(state).await,
                ("/api/v1/onboarding/targets", &Method::POST) => {
                    onboarding::import(state, request).await
                }
                ("/api/v1/onboarding/targets", _) => {
                    Err(ApiError::method_not_allowed(&method, "GET, POST"))
                }
                ("/api/v1/onboarding/nearby", &Method::GET) => {
                    onboarding::nearby(state, request.uri().query()).await
                }
                ("/api/v1/onboarding/nearby", _) => {
                    Err(ApiError::method_not_allowed(&method, "GET"))
                }
                ("/api/v1/onboarding/nearby/adopt", &Method::POST) => {
                    onboarding::adopt(state, request).await
                }
                ("/api/v1/onboarding/nearby/adopt", _) => {
                    Err(ApiError::method_not_allowed(&method, "POST"))
                }
                ("/api/v1/onboarding/runs", &Method::POST) => {
                    onboarding::start(state, request).await
                }
                ("/api/v1/onboarding/runs", _) => {
                    Err(ApiError::method_not_allowed(&method, "POST"))
                }
                (run, &Method::GET) if run.starts_with("/api/v1/onboarding/runs/") => {
                    onboarding::run(state, &run["/api/v1/onboarding/runs/".len()..])
                }
                ("/api/v1/claims", &Method::GET) => onboarding::claims(state).await,
                ("/api/v1/groups", &Method::GET) => groups::list(state).await,
                ("/api/v1/groups", &Method::POST) => groups::create(state, request).await,
                ("/api/v1/groups", _) => Err(ApiError::method_not_allowed(&method, "GET, POST")),
                (member, &Method::PUT) if member.starts_with("/api/v1/groups/") => {
                    match member["/api/v1/groups/".len()..].split_once("/members/") {
                        Some((group, device)) if !device.contains('/') => {
                            groups::add_member(state, group, device).await
                        }
                        _ => Err(ApiError::not_found(member)),
                    }
                }
                (properties, &Method::PUT)
                    if properties.starts_with("/api/v1/devices/")
                        && properties.ends_with("/properties") =>
                {
                    let id = &properties
                        ["/api/v1/devices/".len()..properties.len() - "/properties".len()];
                    groups::set_properties(state, id, request).await
                }
                ("/api/v1/rollouts", &Method::GET) => rollouts::list(state).await,
                ("/api/v1/rollouts", &Method::POST) => rollouts::create(state, request).await,
                ("/api/v1/rollouts", _) => Err(ApiError::method_not_allowed(&method, "GET, POST")),
                (one, _) if one.starts_with("/api/v1/rollouts/") => {
                    rollouts::one(state, &one["/api/v1/rollouts/".len()..], &method).await
                }
                ("/api/v1/uplink", &Method::GET) => Ok(uplink::status(state)),
                ("/api/v1/uplink", _) => Err(ApiError::method_not_allowed(&method, "GET")),
                (credential, &Method::POST | &Method::DELETE)
                    if credential.starts_with("/api/v1/devices/")
                        && credential.ends_with("/credential") =>
                {
                    let id = &credential
                        ["/api/v1/devices/".len()..credential.len() - "/credential".len()];
                    if method == Method::POST {
                        uplink::credential(state, id).await
                    } else {
                        uplink::revoke_credential(state, id).await
                    }
                }
                ("/api/v1/handlers", &Method::GET) => Ok(handlers::list(state)),
                ("/api/v1/handlers", &Method::POST) => handlers::install(state, request).await,
                ("/api/v1/handlers", _) => Err(ApiError::method_not_allowed(&method, "GET, POST")),
                ("/api/v1/firmware", &Method::GET) => firmware::list(state).await,
                ("/api/v1/firmware", &Method::POST) => firmware::import(state, request).await,
                ("/api/v1/firmware", _) => Err(ApiError::method_not_allowed(&method, "GET, POST")),
                ("/api/v1/firmware/manifests", &Method::GET) => firmware::manifests(state).await,
                ("/api/v1/firmware/manifests", &Method::POST) => {
                    firmware::add_manifest(state, request).await
                }
                ("/api/v1/firmware/manifests", _) => {
                    Err(ApiError::method_not_allowed(&method, "GET, POST"))
                }
                (named, _) if named.starts_with("/api/v1/firmware/") => {
                    let rest = &named["/api/v1/firmware/".len()..];
                    match (rest.split_once("/pins/"), &method) {
                        (Some((sha, holder)), &Method::PUT) => {
                            firmware::set_pin(state, sha, holder, true).await
                        }
                        (Some((sha, holder)), &Method::DELETE) => {
                            firmware::set_pin(state, sha, holder, false).await
                        }
                        (Some(_), _) => Err(ApiError::method_not_allowed(&method, "PUT, DELETE")),
                        (None, &Method::POST) if rest.ends_with("/links") => {
                            firmware::link(state, &rest[..rest.len() - "/links".len()], request)
                                .await
                        }
                        (None, &Method::DELETE) => firmware::remove(state, rest).await,
                        (None, _) => Err(ApiError::method_not_allowed(&method, "DELETE")),
                    }
                }
                (named, _) if named.starts_with("/api/v1/handlers/") => {
                    let name = &named["/api/v1/handlers/".len()..];
                    match method {
                        Method::DELETE if !name.is_empty() && !name.contains('/') => {
                            handlers::remove(state, name)
                        }
                        Method::DELETE => Err(ApiError::not_found(named)),
                        _ => Err(ApiError::method_not_allowed(&method, "DELETE")),
                    }
                }
                _ => Err(ApiError::not_found(api)),
            },
        },
        other => Err(ApiError::not_found(other)),
    };
    let response = result.unwrap_or_else(ApiError::into_response);
    metrics::count_request(&path, response.status());
    tracing::debug!(%method, %path, status = response.status().as_u16(), "API request");
    response
}

/// The endpoints a device calls with its own token: `/api/v1/devices/{id}/telemetry`
/// → `(id, "telemetry")`, and likewise `register`, `next`, `reports` and
/// `commands/{n}/reply`.
fn device_endpoint(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix("/api/v1/devices/")?;
    let (id, what) = rest.split_once('/')?;
    let device = matches!(what, "telemetry" | "register" | "next" | "reports")
        || (what.starts_with("commands/") && what.ends_with("/reply"));
    (device && !id.is_empty()).then_some((id, what))
}

/// One device endpoint (see [`device_endpoint`]), on whichever listener it came to.
async fn device_request(
    state: &ApiState,
    id: &str,
    what: &str,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    match what {
        "telemetry" if request.method() == Method::POST => {
            uplink::telemetry(state, id, request).await
        }
        "telemetry" => Err(ApiError::method_not_allowed(request.method(), "POST")),
        _ => rollouts::device(state, id, what, request).await,
    }
}

#[derive(Serialize)]
struct DeviceList {
    devices: Vec<outpost_store::Device>,
}

async fn list_devices(state: &ApiState) -> Result<Response<Full<Bytes>>, ApiError> {
    let devices = state.store.list_devices().await.map_err(|err| {
        tracing::error!(error = %err, "listing devices failed");
        ApiError::internal(format!("the device list could not be read: {err}"))
    })?;
    Ok(json_response(StatusCode::OK, &DeviceList { devices }))
}

/// Reads a request body of at most `limit` bytes that arrives within
/// [`outpost_serve::body::BODY_TIMEOUT`]: a larger one is refused with 413, a slower one
/// with 408, a body the client did not finish sending with 400.
pub(crate) async fn read_body(request: Request<Incoming>, limit: usize) -> Result<Bytes, ApiError> {
    use outpost_serve::BodyError;
    outpost_serve::read_body(
        request.into_body(),
        limit,
        outpost_serve::body::BODY_TIMEOUT,
    )
    .await
    .map_err(|err| match err {
        BodyError::TooLarge { .. } => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            err.to_string(),
        ),
        BodyError::TimedOut { .. } => {
            ApiError::new(StatusCode::REQUEST_TIMEOUT, "body_timeout", err.to_string())
        }
        BodyError::Incomplete(_) => {
            ApiError::new(StatusCode::BAD_REQUEST, "incomplete_body", err.to_string())
        }
    })
}

/// Parses a JSON request body as `what`, after checking its nesting depth
/// ([`outpost_serve::json::MAX_JSON_DEPTH`]): every body a device sends goes through here.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(
    body: &[u8],
    what: &str,
) -> Result<T, ApiError> {
    outpost_serve::json::check_depth(body, outpost_serve::json::MAX_JSON_DEPTH)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "too_deep", e.to_string()))?;
    serde_json::from_slice(body).map_err(|e| ApiError::malformed(what, e))
}

/// Streams a request body into `path`, refusing more than `limit` bytes.
pub(crate) async fn read_body_to_file(
    mut body: Incoming,
    path: &Path,
    limit: u64,
) -> Result<(), ApiError> {
    use http_body_util::BodyExt as _;
    use tokio::io::AsyncWriteExt as _;
    let io = |e: std::io::Error| {
        let disk_full = e.raw_os_error() == Some(28);
        let message = format!("storing the upload failed: {e}");
        if disk_full {
            ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "disk_full", message)
        } else {
            ApiError::internal(message)
        }
    };
    let mut file = tokio::fs::File::create(path).await.map_err(io)?;
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("reading the upload failed: {e}"),
            )
        })?;
        if let Ok(data) = frame.into_data() {
            received += data.len() as u64;
            if received > limit {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!("the upload is larger than the cache's budget of {limit} bytes"),
                ));
            }
            file.write_all(&data).await.map_err(io)?;
        }
    }
    file.flush().await.map_err(io)?;
    Ok(())
}

/// A JSON answer that no cache keeps.
pub(crate) fn json_response(status: StatusCode, body: &impl Serialize) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|err| {
        format!(r#"{{"error":{{"code":"internal","message":"cannot encode the answer: {err}"}}}}"#)
            .into_bytes()
    });
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests;
