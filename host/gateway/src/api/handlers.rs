//! `/api/v1/handlers`: the running gateway's installed update handlers.
//!
//! Installing here swaps the handler in the live registry: calls in flight finish with the
//! version they started with, and the next call gets the new one.

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use outpost_runtime::{CacheOutcome, HandlerSummary, InstallError};

use super::{ApiError, ApiState, json_response};

/// The largest package accepted in one request.
pub(crate) const MAX_PACKAGE_BYTES: usize = 64 << 20;

pub(crate) fn list(state: &ApiState) -> Response<Full<Bytes>> {
    let handlers: Vec<HandlerSummary> = state.handlers.summaries();
    json_response(StatusCode::OK, &serde_json::json!({ "handlers": handlers }))
}

pub(crate) async fn install(
    state: &ApiState,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let body = super::read_body(request, MAX_PACKAGE_BYTES).await?;
    let (installed, compiled) = state
        .handlers
        .install(&body)
        .await
        .map_err(|err| install_error(&err))?;
    let compiled = match compiled {
        CacheOutcome::Hit => "cached",
        CacheOutcome::Compiled => "compiled",
        CacheOutcome::Recompiled => "recompiled",
    };
    Ok(json_response(
        StatusCode::CREATED,
        &serde_json::json!({ "handler": HandlerSummary::from(installed.as_ref()), "compile": compiled }),
    ))
}

pub(crate) fn remove(state: &ApiState, name: &str) -> Result<Response<Full<Bytes>>, ApiError> {
    let removed = state
        .handlers
        .remove(name)
        .map_err(|err| install_error(&err))?;
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({ "removed": HandlerSummary::from(removed.as_ref()) }),
    ))
}

fn install_error(err: &InstallError) -> ApiError {
    let message = err.to_string();
    match err {
        InstallError::NotInstalled(_) => ApiError::new(StatusCode::NOT_FOUND, "not_found", message),
        InstallError::Conflict { .. } => ApiError::new(StatusCode::CONFLICT, "conflict", message),
        InstallError::Compiling(_) => ApiError::new(StatusCode::CONFLICT, "compiling", message),
        InstallError::Io { .. } => {
            tracing::error!(error = %message, "storing a handler failed");
            ApiError::internal(message)
        }
        InstallError::Package(_)
        | InstallError::Load(_)
        | InstallError::Describe(_)
        | InstallError::DescribeMismatch(_) => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "package_rejected",
            message,
        ),
    }
}
