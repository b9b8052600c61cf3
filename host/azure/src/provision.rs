//! Registering with DPS over MQTT, as Azure's device SDKs do.
//!
//! Connect to `{host}:8883` over TLS as client `{registrationId}` with the username
//! `{idScope}/registrations/{registrationId}/api-version=2019-03-31&ClientVersion=…` and a
//! SAS token for `{idScope}/registrations/{registrationId}` (symmetric-key attestation:
//! the individual enrollment's key, or the key derived from the group's); subscribe to
//! `$dps/registrations/res/#`; publish `iotdps-register`; while the answer says
//! `assigning`, wait its `retry-after` and ask `iotdps-get-operationstatus`. A 429 or 5xx
//! is asked again after its `retry-after` (or a growing pause); any other 4xx, a refused
//! CONNECT, and a `failed` registration are final.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rumqttc::{
    AsyncClient, ConnectionError, Event, Incoming, MqttOptions, QoS, TlsConfiguration, Transport,
};

use crate::dps::{self, ErrorBody, OperationStatus, RegistrationRequest, RegistrationState};
use crate::sas;
use crate::topics::{self, DpsResponse};

/// How a device proves who it is to DPS.
#[derive(Clone)]
pub enum Attestation {
    /// An individual enrollment's symmetric key (base64).
    SymmetricKey(String),
    /// An enrollment group's key (base64): the device signs with the key derived from it
    /// for its registration id.
    GroupKey(String),
    /// An X.509 certificate whose CN is the registration id: it travels in the TLS
    /// handshake (the client certificate of [`DpsSettings::tls`]), and no token is sent.
    X509,
}

impl std::fmt::Debug for Attestation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::SymmetricKey(_) => "SymmetricKey(..)",
            Self::GroupKey(_) => "GroupKey(..)",
            Self::X509 => "X509",
        })
    }
}

/// Where and as whom to register.
#[derive(Clone)]
pub struct DpsSettings {
    /// DPS's host (`global.azure-devices-provisioning.net`).
    pub host: String,
    /// Its MQTT port (8883).
    pub port: u16,
    /// The id scope.
    pub id_scope: String,
    /// The registration id.
    pub registration_id: String,
    /// The attestation.
    pub attestation: Attestation,
    /// TLS (the roots that verify DPS).
    pub tls: Arc<rustls::ClientConfig>,
    /// Data for a custom allocation policy.
    pub payload: Option<serde_json::Value>,
    /// How long a SAS token lives.
    pub token_ttl: Duration,
    /// How long a registration may take in all.
    pub timeout: Duration,
    /// What the username's `ClientVersion` says.
    pub client_version: String,
}

impl DpsSettings {
    /// The symmetric key the device signs with (derived for a group's member); `None`
    /// with X.509.
    pub fn device_key(&self) -> Result<Option<String>, sas::SasError> {
        match &self.attestation {
            Attestation::SymmetricKey(key) => Ok(Some(key.clone())),
            Attestation::GroupKey(group) => {
                sas::derive_device_key(group, &self.registration_id).map(Some)
            }
            Attestation::X509 => Ok(None),
        }
    }
}

/// Why registration did not end in an assignment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProvisionError {
    /// DPS refused the device (credentials, unknown enrollment, disabled): trying again
    /// will not help until the configuration changes.
    #[error("DPS refused the registration: {0}")]
    Refused(String),
    /// DPS ended the registration as failed.
    #[error("DPS registration failed ({code}): {message}")]
    Failed {
        /// DPS's error code.
        code: u32,
        /// Its message.
        message: String,
    },
    /// Could not reach DPS, or it did not finish in time: try again later.
    #[error("DPS is unreachable or slow: {0}")]
    Transient(String),
    /// The settings cannot work (a key that is not base64).
    #[error("the DPS settings are unusable: {0}")]
    Settings(String),
}

/// The outcome of a registration.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    /// The IoT Hub's host name.
    pub hub: String,
    /// The device id at that hub.
    pub device_id: String,
    /// `initialAssignment`, `deviceDataMigrated`, `deviceDataReset`, …
    pub substatus: String,
    /// All DPS said.
    pub state: RegistrationState,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

fn request_id() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the OS's random source");
    // A UUID v4's shape, as the SDKs send.
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex = hex::encode(bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// The longest DPS may ask us to wait before asking again.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// How long to wait when an `assigning` answer names no `retry-after`.
const DEFAULT_POLL: Duration = Duration::from_secs(2);

enum Request {
    Register,
    Status(String),
}

/// Registers with DPS and returns the assignment.
pub async fn register(settings: &DpsSettings) -> Result<Assignment, ProvisionError> {
    let key = settings
        .device_key()
        .map_err(|err| ProvisionError::Settings(err.to_string()))?;
    let resource = sas::dps_resource(&settings.id_scope, &settings.registration_id);
    let expiry = unix_now().saturating_add(settings.token_ttl.as_secs().clamp(60, 365 * 24 * 3600));
    // X.509: the username alone (an empty password is not sent).
    let password = match key {
        Some(key) => sas::token(&key, &resource, expiry, None)
            .map_err(|err| ProvisionError::Settings(err.to_string()))?,
        None => String::new(),
    };
    let mut options = MqttOptions::new(&settings.registration_id, &settings.host, settings.port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true)
        .set_max_packet_size(64 * 1024, 64 * 1024)
        .set_credentials(
            dps::username(
                &settings.id_scope,
                &settings.registration_id,
                &settings.client_version,
            ),
            password,
        )
        .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            settings.tls.clone(),
        )));
    let (client, mut events) = AsyncClient::new(options, 16);
    let outcome = converse(settings, &client, &mut events).await;
    // Let the DISCONNECT go out (bounded) from a live connection. After an error the
    // event loop would connect again when polled, so it is dropped instead.
    if outcome.is_ok() && client.disconnect().await.is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while events.poll().await.is_ok() {}
        })
        .await;
    }
    outcome
}

async fn converse(
    settings: &DpsSettings,
    client: &AsyncClient,
    events: &mut rumqttc::EventLoop,
) -> Result<Assignment, ProvisionError> {
    let deadline = tokio::time::Instant::now() + settings.timeout.min(Duration::from_secs(3600));
    let body = serde_json::to_vec(&RegistrationRequest {
        registration_id: settings.registration_id.clone(),
        payload: settings.payload.clone(),
    })
    .expect("serialisable");
    // What to ask next, and when; the request id of the question awaiting its answer.
    let mut next: Option<(Request, tokio::time::Instant)> = None;
    let mut last = Request::Register;
    let mut awaiting: Option<String> = None;
    let mut pause = Duration::from_secs(1);
    loop {
        let send_at = next.as_ref().map(|(_, at)| *at);
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => {
                return Err(ProvisionError::Transient(format!(
                    "no assignment within {:?}", settings.timeout
                )));
            }
            () = async { tokio::time::sleep_until(send_at.unwrap_or(deadline)).await }, if send_at.is_some() => {
                let (request, _) = next.take().expect("scheduled");
                let rid = request_id();
                let (topic, payload) = match &request {
                    Request::Register => (topics::dps_register(&rid), body.clone()),
                    Request::Status(operation) => (topics::dps_status(&rid, operation), Vec::new()),
                };
                client
                    .publish(topic, QoS::AtLeastOnce, false, payload)
                    .await
                    .map_err(|err| ProvisionError::Transient(err.to_string()))?;
                awaiting = Some(rid);
                last = request;
            }
            event = events.poll() => match event {
                Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                    client
                        .subscribe(topics::DPS_RESPONSES, QoS::AtLeastOnce)
                        .await
                        .map_err(|err| ProvisionError::Transient(err.to_string()))?;
                }
                Ok(Event::Incoming(Incoming::SubAck(ack))) => {
                    if ack.return_codes.iter().any(|code| matches!(code, rumqttc::SubscribeReasonCode::Failure)) {
                        return Err(ProvisionError::Refused("DPS refused the response subscription".into()));
                    }
                    next = Some((Request::Register, tokio::time::Instant::now()));
                }
                Ok(Event::Incoming(Incoming::Publish(publish))) => {
                    let Ok(response) = DpsResponse::parse(&publish.topic) else {
                        tracing::warn!(topic = %publish.topic, "an answer from DPS on a topic we do not know");
                        continue;
                    };
                    if awaiting.as_deref() != Some(response.rid.as_str()) {
                        continue;
                    }
                    awaiting = None;
                    let retry_after = response
                        .retry_after
                        .map(|secs| Duration::from_secs(secs.into()).min(MAX_RETRY_AFTER));
                    match response.status {
                        200..=299 => {
                            let status: OperationStatus = serde_json::from_slice(&publish.payload)
                                .map_err(|err| ProvisionError::Transient(format!("DPS's answer is not an operation status: {err}")))?;
                            match status.status.as_str() {
                                "assigning" => {
                                    let wait = retry_after.unwrap_or(DEFAULT_POLL);
                                    next = Some((Request::Status(status.operation_id), tokio::time::Instant::now() + wait));
                                }
                                "assigned" => return assignment(status),
                                _ => {
                                    let state = status.registration_state.unwrap_or_default();
                                    return Err(ProvisionError::Failed {
                                        code: state.error_code.unwrap_or_default(),
                                        message: state.error_message.unwrap_or_else(|| format!("status {:?}", status.status)),
                                    });
                                }
                            }
                        }
                        429 | 500..=599 => {
                            let wait = retry_after.unwrap_or(pause);
                            pause = (pause * 2).min(MAX_RETRY_AFTER);
                            tracing::info!(status = response.status, ?wait, "DPS asks us to try again later");
                            let again = match &last {
                                Request::Register => Request::Register,
                                Request::Status(operation) => Request::Status(operation.clone()),
                            };
                            next = Some((again, tokio::time::Instant::now() + wait));
                        }
                        status => {
                            let why = serde_json::from_slice::<ErrorBody>(&publish.payload)
                                .map(|body| format!("{status} ({}): {}", body.error_code, body.message))
                                .unwrap_or_else(|_| format!("status {status}"));
                            return Err(ProvisionError::Refused(why));
                        }
                    }
                }
                Ok(_) => {}
                Err(ConnectionError::ConnectionRefused(rumqttc::ConnectReturnCode::ServiceUnavailable)) => {
                    return Err(ProvisionError::Transient("DPS is unavailable (CONNACK 3)".into()));
                }
                Err(ConnectionError::ConnectionRefused(code)) => {
                    return Err(ProvisionError::Refused(format!("DPS refused the connection ({code:?})")));
                }
                Err(err) => return Err(ProvisionError::Transient(err.to_string())),
            }
        }
    }
}

fn assignment(status: OperationStatus) -> Result<Assignment, ProvisionError> {
    let state = status.registration_state.ok_or_else(|| {
        ProvisionError::Transient("`assigned` without a registration state".into())
    })?;
    let (Some(hub), Some(device_id)) = (state.assigned_hub.clone(), state.device_id.clone()) else {
        return Err(ProvisionError::Transient(
            "`assigned` without a hub or device id".into(),
        ));
    };
    Ok(Assignment {
        hub,
        device_id,
        substatus: state
            .substatus
            .clone()
            .unwrap_or_else(|| "initialAssignment".into()),
        state,
    })
}
