//! DPS-style registration over MQTT, with the service's retry rules:
//! never retry an authentication error; on 429 wait exactly the `retryAfter` given; on
//! server errors and timeouts back off exponentially with jitter, the first retry after
//! at least 5 s.

use std::time::Duration;

use rumqttc::{AsyncClient, ConnectReturnCode, ConnectionError, Event, Incoming, MqttOptions, QoS};
use rumqttc::{TlsConfiguration, Transport};

use crate::contract::{
    self, Assignment, RegistrationRequest, RegistrationResponse, schema, topics,
};
use crate::settings::{RegistrationSettings, UplinkSettings, rustls_config};
use outpost_store::backoff::Backoff;

/// How long one registration request waits for its answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// SAS token lifetime.
const TOKEN_LIFETIME_SECS: u64 = 3600;
/// Server errors: the first retry comes after 5–10 s, then doubles up to 100 s.
const SERVER_BACKOFF_MIN: Duration = Duration::from_secs(10);
const SERVER_BACKOFF_MAX: Duration = Duration::from_secs(100);
/// A 429 without a retry-after waits this long.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(5);

/// Why registration gave up (it retries everything else itself).
#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    /// The service refused the enrollment's credentials: not retried.
    #[error("{0}")]
    Refused(String),
    /// A request the service will never accept (bad request, unknown enrollment).
    #[error("{0}")]
    Fatal(String),
}

enum Attempt {
    Assigned(Assignment),
    /// Wait this long and ask again (429 with retry-after, 202 assigning).
    RetryAfter(Duration, String),
    /// Back off and retry (5xx, timeouts, unreachable).
    ServerError(String),
}

/// Registers until assigned or refused.
pub(crate) async fn register(
    registration: &RegistrationSettings,
    settings: &UplinkSettings,
    gateway: &str,
) -> Result<Assignment, RegistrationError> {
    let mut backoff = Backoff::new(SERVER_BACKOFF_MIN, SERVER_BACKOFF_MAX);
    loop {
        let delay = match attempt(registration, settings, gateway).await? {
            Attempt::Assigned(assignment) => return Ok(assignment),
            Attempt::RetryAfter(delay, why) => {
                tracing::info!(wait = ?delay, reason = %why, "registration: asked to wait");
                delay
            }
            Attempt::ServerError(why) => {
                let delay = backoff.next_delay();
                tracing::warn!(wait = ?delay, reason = %why, "registration failed; retrying");
                delay
            }
        };
        tokio::time::sleep(delay).await;
    }
}

async fn attempt(
    registration: &RegistrationSettings,
    settings: &UplinkSettings,
    gateway: &str,
) -> Result<Attempt, RegistrationError> {
    let id = &registration.registration_id;
    let broker = &registration.broker;
    let mut options = MqttOptions::new(format!("{id}.reg"), broker.host.clone(), broker.port);
    options.set_keep_alive(settings.keepalive);
    options.set_clean_session(true);
    options.set_max_packet_size(contract::MAX_PAYLOAD + 4096, contract::MAX_PAYLOAD + 4096);
    if registration.credentials.username.is_some() || registration.credentials.password.is_some() {
        options.set_credentials(
            registration
                .credentials
                .username
                .clone()
                .unwrap_or_default(),
            registration
                .credentials
                .password
                .clone()
                .unwrap_or_default(),
        );
    }
    if broker.tls {
        let config = rustls_config(&settings.tls)
            .map_err(|why| RegistrationError::Fatal(format!("uplink TLS settings: {why}")))?;
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(config)));
    }
    let expiry = u64::try_from(crate::now_millis() / 1000).unwrap_or(0) + TOKEN_LIFETIME_SECS;
    let sas = crate::sas::token(&registration.key, &registration.scope, id, expiry)
        .map_err(|err| RegistrationError::Fatal(format!("uplink.registration.key: {err}")))?;
    let rid = contract::message_id();
    let request = RegistrationRequest {
        schema: schema::REGISTRATION_REQUEST.into(),
        rid: rid.clone(),
        registration_id: id.clone(),
        sas,
        payload: serde_json::json!({ "gatewayId": gateway, "version": settings.version }),
    };

    let (client, mut events) = AsyncClient::new(options, 16);
    let exchange = async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                    client
                        .subscribe(topics::registration_response(id), QoS::AtLeastOnce)
                        .await
                        .map_err(|e| Err(format!("subscribe: {e}")))?;
                }
                Ok(Event::Incoming(Incoming::SubAck(_))) => {
                    client
                        .publish(
                            topics::registration_request(id),
                            QoS::AtLeastOnce,
                            false,
                            serde_json::to_vec(&request).expect("serialisable"),
                        )
                        .await
                        .map_err(|e| Err(format!("publish: {e}")))?;
                }
                Ok(Event::Incoming(Incoming::Publish(publish))) => {
                    match serde_json::from_slice::<RegistrationResponse>(&publish.payload) {
                        Ok(response) if response.rid == rid => return Ok(response),
                        Ok(_) => {} // someone else's answer
                        Err(err) => {
                            tracing::warn!(error = %err, "ignoring a malformed registration response");
                        }
                    }
                }
                Ok(_) => {}
                Err(ConnectionError::ConnectionRefused(
                    code @ (ConnectReturnCode::BadUserNamePassword
                    | ConnectReturnCode::NotAuthorized),
                )) => {
                    return Err(Ok(format!(
                        "the registration broker {broker} refused the credentials ({code:?}); not retrying"
                    )));
                }
                Err(err) => return Err(Err(format!("registration broker {broker}: {err}"))),
            }
        }
    };
    // Err(Ok(why)): refused for good; Err(Err(why)): retry.
    let outcome = tokio::time::timeout(ANSWER_TIMEOUT, exchange).await;
    let _ = client.try_disconnect();
    let response = match outcome {
        Err(_) => {
            return Ok(Attempt::ServerError(format!(
                "no registration answer within {ANSWER_TIMEOUT:?}"
            )));
        }
        Ok(Err(Ok(refused))) => return Err(RegistrationError::Refused(refused)),
        Ok(Err(Err(why))) => return Ok(Attempt::ServerError(why)),
        Ok(Ok(response)) => response,
    };
    let error = response.error.clone().unwrap_or_default();
    match response.status {
        200 => response.assignment.map(Attempt::Assigned).ok_or_else(|| {
            RegistrationError::Fatal(
                "the registration service answered 200 without an assignment".into(),
            )
        }),
        202 => Ok(Attempt::RetryAfter(
            response
                .retry_after
                .map_or(Duration::from_secs(2), Duration::from_secs),
            "assigning".into(),
        )),
        401 | 403 => Err(RegistrationError::Refused(format!(
            "registration of {id} refused ({}): {error}; not retrying. Check \
             uplink.registration.key and the enrollment",
            response.status
        ))),
        429 => Ok(Attempt::RetryAfter(
            response
                .retry_after
                .map_or(DEFAULT_RETRY_AFTER, Duration::from_secs),
            format!("throttled (429): {error}"),
        )),
        status @ 400..=499 => Err(RegistrationError::Fatal(format!(
            "registration of {id} rejected ({status}): {error}"
        ))),
        status => Ok(Attempt::ServerError(format!(
            "the registration service answered {status}: {error}"
        ))),
    }
}
