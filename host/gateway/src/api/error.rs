//! The API's one error shape: `{"error":{"code":"…","message":"…"}}`.
//!
//! `code` is stable and meant for programs; `message` is for people and may change.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use serde::Serialize;

/// An error answer.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    allow: Option<&'static str>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    code: &'a str,
    message: &'a str,
}

impl ApiError {
    pub(crate) fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub(crate) fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub(crate) fn not_found(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no such endpoint: {path}"),
        )
    }

    pub(crate) fn method_not_allowed(method: &hyper::Method, allow: &'static str) -> Self {
        Self {
            allow: Some(allow),
            ..Self::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{method} is not allowed here; use {allow}"),
            )
        }
    }

    /// A store failure: invalid input is 400, an unknown id 404, a full disk 507,
    /// anything else 500.
    pub(crate) fn store(err: outpost_store::StoreError) -> Self {
        if err.is_disk_full() {
            return Self::disk_full(&err);
        }
        match err {
            outpost_store::StoreError::InvalidInput { .. } => {
                Self::new(StatusCode::BAD_REQUEST, "invalid_input", err.to_string())
            }
            outpost_store::StoreError::NotFound { .. } => {
                Self::new(StatusCode::NOT_FOUND, "not_found", err.to_string())
            }
            other => Self::internal(format!("the state database failed: {other}")),
        }
    }

    /// The disk under the state directory is full: nothing was written, and the same
    /// request succeeds once there is room again.
    pub(crate) fn disk_full(err: &dyn std::fmt::Display) -> Self {
        Self::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "disk_full",
            format!(
                "the gateway's disk is full, so nothing was stored ({err}); free space \
                 under the state directory and send it again"
            ),
        )
    }

    /// A request body that does not parse as `what`.
    pub(crate) fn malformed(what: &str, err: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "malformed_request",
            format!("{what}: {err}"),
        )
    }

    pub(crate) fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            allow: None,
        }
    }

    pub(crate) fn into_response(self) -> Response<Full<Bytes>> {
        let body = Body {
            error: Inner {
                code: self.code,
                message: &self.message,
            },
        };
        let mut response = super::json_response(self.status, &body);
        let headers = response.headers_mut();
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"outpost\""),
            );
        }
        if let Some(allow) = self.allow {
            headers.insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        response
    }
}
