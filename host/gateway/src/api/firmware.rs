//! `/api/v1/firmware`: the firmware cache — what it holds, operator imports and removals,
//! and the signed update manifests that say what may be downloaded.

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use outpost_cache::{CacheError, Sha256};
use serde::Serialize;

use super::{ApiError, ApiState, json_response};

/// The largest signed manifest accepted.
const MAX_MANIFEST_BYTES: usize = outpost_cache::manifest::MAX_JWS_BYTES;

/// A manifest as the API shows it.
#[derive(Debug, Serialize)]
pub(crate) struct ManifestSummary {
    pub(crate) update_id: String,
    pub(crate) signer: String,
    pub(crate) files: Vec<ManifestFileSummary>,
}

/// One file of a manifest.
#[derive(Debug, Serialize)]
pub(crate) struct ManifestFileSummary {
    pub(crate) file_name: String,
    pub(crate) sha256: Sha256,
    pub(crate) size: u64,
    pub(crate) url: Option<String>,
}

impl From<&outpost_cache::manifest::VerifiedManifest> for ManifestSummary {
    fn from(m: &outpost_cache::manifest::VerifiedManifest) -> Self {
        Self {
            update_id: m.manifest.update_id.to_string(),
            signer: m.signer.clone(),
            files: m
                .manifest
                .files
                .iter()
                .map(|f| ManifestFileSummary {
                    file_name: f.file_name.clone(),
                    sha256: f.sha256,
                    size: f.size_in_bytes,
                    url: f.url.clone(),
                })
                .collect(),
        }
    }
}

/// `GET /api/v1/firmware`.
pub(crate) async fn list(state: &ApiState) -> Result<Response<Full<Bytes>>, ApiError> {
    let cache = &state.firmware;
    let blobs = cache.list().await.map_err(|e| cache_error(&e))?;
    let pending = cache.pending().await.map_err(|e| cache_error(&e))?;
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({
            "blobs": blobs,
            "downloads": pending,
            "used_bytes": cache.used_bytes(),
            "budget_bytes": cache.config().max_bytes,
        }),
    ))
}

/// `POST /api/v1/firmware`: the body is the file; `X-Outpost-File-Name` names it.
pub(crate) async fn import(
    state: &ApiState,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let name = request
        .headers()
        .get("x-outpost-file-name")
        .and_then(|v| v.to_str().ok())
        .filter(|n| !n.is_empty() && !n.contains(['/', '\\']) && n.len() <= 255)
        .unwrap_or("upload.bin")
        .to_owned();
    let limit = state.firmware.config().max_bytes;
    // Written straight into the cache's staging folder and adopted there: no second copy.
    let staged = state.firmware.staging_path().map_err(|e| cache_error(&e))?;
    if let Err(error) = super::read_body_to_file(request.into_body(), &staged, limit).await {
        let _ = tokio::fs::remove_file(&staged).await;
        return Err(error);
    }
    let blob = state
        .firmware
        .import_staged(&staged, name)
        .await
        .map_err(|e| cache_error(&e))?;
    Ok(json_response(
        StatusCode::CREATED,
        &serde_json::json!({ "blob": blob }),
    ))
}

fn parse_sha(name: &str) -> Result<Sha256, ApiError> {
    name.parse().map_err(|e: outpost_cache::BadSha256| {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", e.to_string())
    })
}

/// A pin holder: 1-128 characters, no `/` and no control characters.
fn parse_holder(holder: &str) -> Result<&str, ApiError> {
    if holder.is_empty()
        || holder.len() > 128
        || holder.contains('/')
        || holder.chars().any(char::is_control)
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("a pin holder is 1-128 characters without '/': {holder:?}"),
        ));
    }
    Ok(holder)
}

/// `PUT` (`pin = true`) or `DELETE /api/v1/firmware/{sha256}/pins/{holder}`: keeps the
/// file from eviction (it need not be cached yet), or lets it go.
pub(crate) async fn set_pin(
    state: &ApiState,
    sha: &str,
    holder: &str,
    pin: bool,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let (sha256, holder) = (parse_sha(sha)?, parse_holder(holder)?);
    let done = if pin {
        state.firmware.pin(sha256, holder).await
    } else {
        state.firmware.unpin(sha256, holder).await
    };
    done.map_err(|e| cache_error(&e))?;
    let key = if pin { "pinned" } else { "unpinned" };
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({ key: sha256, "holder": holder }),
    ))
}

/// How long an operator's download link is valid when the request does not say.
const DEFAULT_LINK_SECS: u64 = 3600;
/// The longest an operator's download link may be valid: a week.
const MAX_LINK_SECS: u64 = 7 * 24 * 3600;

/// The body of `POST /api/v1/firmware/{sha256}/links`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct LinkRequest {
    /// Whom the link is for: a device id, or a name for a person or tool.
    device: String,
    #[serde(default)]
    valid_secs: Option<u64>,
}

/// `POST /api/v1/firmware/{sha256}/links`: a signed download link to a cached file,
/// for fetching by hand from a listener that requires signed links.
pub(crate) async fn link(
    state: &ApiState,
    sha: &str,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let sha256 = parse_sha(sha)?;
    let body = super::read_body(request, 4096).await?;
    let wanted: LinkRequest = super::parse_json(&body, "a link request")?;
    if !outpost_uplink::contract::valid_id(&wanted.device) {
        return Err(ApiError::malformed(
            "a link request",
            "device: 1 to 128 of letters, digits, '-', '_', '.', ':'",
        ));
    }
    let secs = wanted.valid_secs.unwrap_or(DEFAULT_LINK_SECS);
    if secs == 0 || secs > MAX_LINK_SECS {
        return Err(ApiError::malformed(
            "a link request",
            format!("validSecs: 1 to {MAX_LINK_SECS}"),
        ));
    }
    let (url, expires) = state.rollouts.mailbox().link(
        &sha256.to_string(),
        &wanted.device,
        std::time::Duration::from_secs(secs),
    );
    Ok(json_response(
        StatusCode::CREATED,
        &serde_json::json!({ "sha256": sha256, "device": wanted.device, "url": url, "expires": expires }),
    ))
}

/// `DELETE /api/v1/firmware/{sha256}`.
pub(crate) async fn remove(
    state: &ApiState,
    name: &str,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let sha256 = parse_sha(name)?;
    state
        .firmware
        .remove(sha256)
        .await
        .map_err(|e| cache_error(&e))?;
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({ "removed": sha256 }),
    ))
}

/// `GET /api/v1/firmware/manifests`.
pub(crate) async fn manifests(state: &ApiState) -> Result<Response<Full<Bytes>>, ApiError> {
    let manifests = state
        .firmware
        .manifests()
        .await
        .map_err(|e| cache_error(&e))?;
    let list: Vec<ManifestSummary> = manifests.iter().map(Into::into).collect();
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({ "manifests": list }),
    ))
}

/// `POST /api/v1/firmware/manifests`: the body is the JWS; its files start downloading.
pub(crate) async fn add_manifest(
    state: &ApiState,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let body = super::read_body(request, MAX_MANIFEST_BYTES).await?;
    let text = std::str::from_utf8(&body).map_err(|_| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "manifest_rejected",
            "the manifest is not UTF-8 text",
        )
    })?;
    let verified = state
        .firmware
        .add_manifest(text)
        .await
        .map_err(|e| cache_error(&e))?;
    for file in verified.manifest.files.iter().filter(|f| f.url.is_some()) {
        state.firmware.prefetch(file.sha256);
    }
    Ok(json_response(
        StatusCode::ACCEPTED,
        &serde_json::json!({ "manifest": ManifestSummary::from(&verified) }),
    ))
}

fn cache_error(error: &CacheError) -> ApiError {
    let message = error.to_string();
    match error {
        CacheError::Manifest(_) | CacheError::Signature(_) => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "manifest_rejected",
            message,
        ),
        CacheError::NotCached(_) | CacheError::NotNamed(_) => {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
        }
        CacheError::Pinned { .. } => ApiError::new(StatusCode::CONFLICT, "pinned", message),
        CacheError::Full { .. } => {
            ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "cache_full", message)
        }
        error if error.is_disk_full() => {
            ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "disk_full", message)
        }
        _ => {
            tracing::error!(error = %message, "firmware cache operation failed");
            ApiError::internal(message)
        }
    }
}
