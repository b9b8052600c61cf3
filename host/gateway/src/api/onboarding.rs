//! `/api/v1/onboarding/…` and `/api/v1/claims`.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};

use super::{ApiError, ApiState, json_response};
use outpost_onboarding::{AdoptRequest, ImportDefaults, OnboardingError, RunRequest};

/// Largest manifest accepted (a few thousand devices).
const MAX_MANIFEST: usize = 4 << 20;

fn onboarding_error(err: OnboardingError) -> ApiError {
    match err {
        OnboardingError::Manifest(message) => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "manifest_rejected",
            message,
        ),
        OnboardingError::Refused(message) | OnboardingError::Settings(message) => {
            ApiError::new(StatusCode::CONFLICT, "cannot_onboard", message)
        }
        OnboardingError::Invalid(message) => {
            ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
        }
        OnboardingError::Unknown(message) => {
            ApiError::new(StatusCode::NOT_FOUND, "unknown_device", message)
        }
        OnboardingError::Store(err) => ApiError::store(err),
    }
}

/// `GET /api/v1/onboarding/nearby[?seconds=N&details=true]` (operator: it drives the
/// radio): the provisioning devices heard during N seconds (default 5), strongest first;
/// with details, each one's proto-ver.
pub(super) async fn nearby(
    state: &ApiState,
    query: Option<&str>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let mut seconds = 5;
    let mut details = false;
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match key.as_ref() {
            "seconds" => {
                seconds = value.parse().map_err(|_| {
                    ApiError::malformed("seconds", format!("{value:?} is not a whole number"))
                })?;
            }
            "details" => {
                details = match value.as_ref() {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    other => {
                        return Err(ApiError::malformed(
                            "details",
                            format!("{other:?} is not true or false"),
                        ));
                    }
                };
            }
            other => {
                return Err(ApiError::malformed(
                    "query",
                    format!("unknown key {other:?} (known: seconds, details)"),
                ));
            }
        }
    }
    let devices = state
        .onboarder
        .nearby(Duration::from_secs(seconds), details)
        .await
        .map_err(onboarding_error)?;
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({ "devices": devices }),
    ))
}

/// `POST /api/v1/onboarding/nearby/adopt` `{device, device_type, pop?, username?,
/// security?}`: a device of the last nearby scan becomes an onboarding target; 201.
pub(super) async fn adopt(
    state: &ApiState,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let bytes = super::read_body(request, 16 << 10).await?;
    let adopt: AdoptRequest = serde_json::from_slice(&bytes).map_err(|err| {
        ApiError::malformed(
            "the body must be {\"device\", \"device_type\", \"pop\"?, \"username\"?, \"security\"?}",
            err,
        )
    })?;
    let adopted = state
        .onboarder
        .adopt(adopt)
        .await
        .map_err(onboarding_error)?;
    Ok(json_response(StatusCode::CREATED, &adopted))
}

/// `GET /api/v1/onboarding/targets`: the imported manifest (no secrets) with each
/// device's last attempt.
pub(super) async fn targets(state: &ApiState) -> Result<Response<Full<Bytes>>, ApiError> {
    let targets = state
        .store
        .onboarding_targets()
        .await
        .map_err(ApiError::store)?;
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({ "targets": targets }),
    ))
}

/// `POST /api/v1/onboarding/targets[?device_type=…&security=…&username=…&address=…]`:
/// imports a manifest (JSON, JSON lines, Espressif QR codes or CSV), all or nothing; the
/// query gives what its entries leave out.
pub(super) async fn import(
    state: &ApiState,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let defaults = ImportDefaults::from_query(request.uri().query().unwrap_or_default()).map_err(
        |message| ApiError::new(StatusCode::BAD_REQUEST, "bad_import_settings", message),
    )?;
    let bytes = super::read_body(request, MAX_MANIFEST).await?;
    let imported = state
        .onboarder
        .import(&bytes, &defaults)
        .await
        .map_err(onboarding_error)?;
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({ "imported": imported }),
    ))
}

/// `POST /api/v1/onboarding/runs`: starts onboarding; answers 202 with the run.
pub(super) async fn start(
    state: &ApiState,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let bytes = super::read_body(request, 64 << 10).await?;
    let run_request: RunRequest = if bytes.is_empty() {
        RunRequest::default()
    } else {
        serde_json::from_slice(&bytes).map_err(|err| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("the body must be {{\"devices\": [names], \"all\": bool}}: {err}"),
            )
        })?
    };
    let run = state
        .onboarder
        .start(run_request)
        .await
        .map_err(onboarding_error)?;
    Ok(json_response(StatusCode::ACCEPTED, &run.view()))
}

/// `GET /api/v1/onboarding/runs/{id}`: a run's progress.
pub(super) fn run(state: &ApiState, id: &str) -> Result<Response<Full<Bytes>>, ApiError> {
    let path = format!("/api/v1/onboarding/runs/{id}");
    let run = id
        .parse()
        .ok()
        .and_then(|id| state.onboarder.run(id))
        .ok_or_else(|| ApiError::not_found(&path))?;
    Ok(json_response(StatusCode::OK, &run.view()))
}

/// `GET /api/v1/claims`: certificates obtained by claiming, and whether the cloud has
/// been told.
pub(super) async fn claims(state: &ApiState) -> Result<Response<Full<Bytes>>, ApiError> {
    let claims = state.store.claims(false).await.map_err(ApiError::store)?;
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({ "claims": claims }),
    ))
}
