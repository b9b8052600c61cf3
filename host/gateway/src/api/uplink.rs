//! The uplink's local endpoints: device telemetry in (per-device credential), device
//! credentials (admin), and the uplink's status (admin).

use std::collections::HashMap;
use std::sync::RwLock;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use outpost_store::rusqlite::{OptionalExtension, params};
use outpost_uplink::contract::{self, MAX_TELEMETRY_BODY, schema, topics};
use outpost_uplink::{Message, OutboxError, Priority};
use serde::Serialize;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{ApiError, ApiState, json_response};
use crate::rollout::now_millis;

/// One telemetry request carries at most this many records.
const MAX_RECORDS: usize = 100;
/// And at most this many bytes.
const MAX_REQUEST: usize = 1024 * 1024;

/// Device tokens, by device id: the SHA-256 of each, loaded from the store on first use.
#[derive(Debug, Default)]
pub(crate) struct DeviceTokens {
    known: RwLock<HashMap<String, [u8; 32]>>,
}

impl DeviceTokens {
    /// Checks the bearer token `header` against `device_id`'s credential.
    pub(crate) async fn check(
        &self,
        state: &ApiState,
        device_id: &str,
        header: Option<&HeaderValue>,
    ) -> Result<(), ApiError> {
        let presented = header
            .and_then(|h| h.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .ok_or_else(|| {
                ApiError::unauthorized(
                    "missing device token: send Authorization: Bearer <device token> \
                     (issued by `outpost device credential <id>`)",
                )
            })?;
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let cached = self
            .known
            .read()
            .expect("token lock")
            .get(device_id)
            .copied();
        // A cached hash that does not match may be stale (a credential replaced by
        // onboarding): the store decides.
        let expected = match cached {
            Some(hash) if bool::from(hash.ct_eq(&digest)) => Some(hash),
            _ => {
                let id = device_id.to_owned();
                let loaded = state
                    .store
                    .call(move |conn| {
                        Ok(conn
                            .query_row(
                                "SELECT token_sha256 FROM device_credentials WHERE device_id = ?1",
                                [id],
                                |row| row.get::<_, Vec<u8>>(0),
                            )
                            .optional()?)
                    })
                    .await
                    .map_err(|e| ApiError::internal(format!("the state database failed: {e}")))?;
                let hash = loaded.and_then(|bytes| <[u8; 32]>::try_from(bytes).ok());
                if let Some(hash) = hash {
                    self.known
                        .write()
                        .expect("token lock")
                        .insert(device_id.to_owned(), hash);
                }
                hash
            }
        };
        match expected {
            Some(hash) if bool::from(hash.ct_eq(&digest)) => Ok(()),
            _ => Err(ApiError::unauthorized(format!(
                "invalid device token for {device_id}"
            ))),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Accepted {
    accepted: usize,
    message_ids: Vec<String>,
}

/// `POST /api/v1/devices/{id}/telemetry`: one JSON object, or an array of up to 100.
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
    state
        .device_tokens
        .check(
            state,
            device_id,
            request.headers().get(header::AUTHORIZATION),
        )
        .await?;
    let body = super::onboarding::body(request, MAX_REQUEST).await?;
    // Validated as JSON but relayed as posted, without building a value tree.
    let malformed = |err: serde_json::Error| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_telemetry",
            format!("telemetry must be a JSON object or an array of objects: {err}"),
        )
    };
    let raw: &RawValue = serde_json::from_slice(&body).map_err(malformed)?;
    let records: Vec<&RawValue> = match raw.get().as_bytes().first() {
        Some(b'{') => vec![raw],
        Some(b'[') => {
            let items: Vec<&RawValue> = serde_json::from_str(raw.get()).map_err(malformed)?;
            if items.is_empty() || items.len() > MAX_RECORDS {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "malformed_telemetry",
                    format!(
                        "an array carries 1 to {MAX_RECORDS} records, not {}",
                        items.len()
                    ),
                ));
            }
            items
        }
        _ => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "malformed_telemetry",
                "telemetry must be a JSON object or an array of objects",
            ));
        }
    };
    let now = now_millis();
    let gateway = state.health.gateway.id.as_str();
    let topic = topics::telemetry(gateway, device_id);
    let mut messages = Vec::with_capacity(records.len());
    let mut ids = Vec::with_capacity(records.len());
    for (index, record) in records.into_iter().enumerate() {
        if !record.get().starts_with('{') {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "malformed_telemetry",
                format!("record {index} is not a JSON object"),
            ));
        }
        let size = record.get().len();
        if size > MAX_TELEMETRY_BODY {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!(
                    "record {index} is {size} bytes; a record may be at most {MAX_TELEMETRY_BODY}"
                ),
            ));
        }
        let id = contract::message_id();
        let payload = serde_json::to_vec(&contract::Telemetry {
            schema: schema::TELEMETRY.into(),
            message_id: id.clone(),
            device_id: device_id.to_owned(),
            received_at: now,
            body: record,
        })
        .expect("serialisable");
        messages.push(Message {
            message_id: id.clone(),
            topic: topic.clone(),
            payload,
            priority: Priority::Telemetry,
            retain: false,
            ttl: None,
        });
        ids.push(id);
    }
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
    let exists = state
        .store
        .has_device(device_id)
        .await
        .map_err(|e| ApiError::internal(format!("the state database failed: {e}")))?;
    if !exists {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_device",
            format!("no device {device_id:?} in the lobby; onboard it first"),
        ));
    }
    let token = store_credential(&state.store, device_id)
        .await
        .map_err(ApiError::internal)?;
    Ok(json_response(
        StatusCode::CREATED,
        &Credential {
            device_id: device_id.to_owned(),
            token,
        },
    ))
}

/// A new token for `device_id`, its hash stored (replacing any earlier one). The
/// caller shows the token once.
pub(crate) async fn store_credential(
    store: &outpost_store::Store,
    device_id: &str,
) -> Result<String, String> {
    let token = format!(
        "opd_{}",
        super::auth::random_token().map_err(|e| e.to_string())?
    );
    let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    let id = device_id.to_owned();
    store
        .call(move |conn| {
            conn.execute(
                "INSERT INTO device_credentials (device_id, token_sha256, created_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (device_id) DO UPDATE SET token_sha256 = excluded.token_sha256, \
                 created_at = excluded.created_at",
                params![id, hash.to_vec(), now_millis()],
            )?;
            Ok(())
        })
        .await
        .map_err(|e| format!("the state database failed: {e}"))?;
    Ok(token)
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
