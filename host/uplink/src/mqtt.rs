//! One face for rumqttc's MQTT 3.1.1 and MQTT 5 clients, so that the session drains the
//! outbox the same way over either.
//!
//! MQTT 5 adds what the uplink uses where the broker has it: a session expiry interval (a
//! persistent session outlives a short outage, and no longer), a message expiry interval
//! from each outbox message's time to live (the broker drops what went stale while the
//! backend was away), user properties with the message id and schema (a backend can
//! route and de-duplicate without parsing), and reason codes on refused connections,
//! refused publishes and the broker's own DISCONNECT, logged with advice.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5 as v5p;
use rumqttc::{Outgoing, TlsConfiguration, Transport};

/// Which MQTT a connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// MQTT 3.1.1.
    V311,
    /// MQTT 5.
    V5,
}

impl Protocol {
    /// The name in logs and status (`3.1.1`, `5`).
    pub fn name(self) -> &'static str {
        match self {
            Self::V311 => "3.1.1",
            Self::V5 => "5",
        }
    }
}

/// The will: published by the broker when the connection dies.
pub(crate) struct Will {
    pub(crate) topic: String,
    pub(crate) payload: Vec<u8>,
    pub(crate) retain: bool,
}

/// What one connection is made with, in either protocol.
pub(crate) struct Options {
    pub(crate) client_id: String,
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) keepalive: Duration,
    /// Publishes in flight at most.
    pub(crate) inflight: u16,
    pub(crate) max_packet: usize,
    pub(crate) request_capacity: usize,
    pub(crate) credentials: Option<(String, String)>,
    pub(crate) will: Option<Will>,
    pub(crate) tls: Option<Arc<rustls::ClientConfig>>,
    /// MQTT 5's session expiry interval (seconds); 3.1.1 keeps a persistent session for
    /// as long as the broker likes.
    pub(crate) session_expiry: u32,
}

/// A client handle of either protocol.
#[derive(Clone)]
pub(crate) enum Client {
    V311(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// The event loop of either protocol.
pub(crate) enum Events {
    V311(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

/// Makes a client for one connection (nothing is sent before the first poll).
pub(crate) fn client(protocol: Protocol, options: Options) -> (Client, Events) {
    let capacity = options.request_capacity;
    match protocol {
        Protocol::V311 => {
            let mut o = rumqttc::MqttOptions::new(options.client_id, options.host, options.port);
            o.set_keep_alive(options.keepalive);
            // A persistent session: the broker keeps our subscriptions (and what the
            // cloud sends to them) while we are away.
            o.set_clean_session(false);
            o.set_inflight(options.inflight);
            o.set_max_packet_size(options.max_packet, options.max_packet);
            o.set_request_channel_capacity(capacity);
            if let Some((username, password)) = options.credentials {
                o.set_credentials(username, password);
            }
            if let Some(will) = options.will {
                o.set_last_will(rumqttc::LastWill::new(
                    will.topic,
                    will.payload,
                    rumqttc::QoS::AtLeastOnce,
                    will.retain,
                ));
            }
            if let Some(tls) = options.tls {
                o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
            }
            let (client, events) = rumqttc::AsyncClient::new(o, capacity);
            (Client::V311(client), Events::V311(Box::new(events)))
        }
        Protocol::V5 => {
            let mut o =
                rumqttc::v5::MqttOptions::new(options.client_id, options.host, options.port);
            o.set_keep_alive(options.keepalive);
            o.set_clean_start(false);
            o.set_session_expiry_interval(Some(options.session_expiry));
            o.set_outgoing_inflight_upper_limit(options.inflight);
            o.set_max_packet_size(u32::try_from(options.max_packet).ok());
            o.set_request_channel_capacity(capacity);
            if let Some((username, password)) = options.credentials {
                o.set_credentials(username, password);
            }
            if let Some(will) = options.will {
                o.set_last_will(v5p::LastWill::new(
                    will.topic,
                    will.payload,
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    will.retain,
                    None,
                ));
            }
            if let Some(tls) = options.tls {
                o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
            }
            let (client, events) = rumqttc::v5::AsyncClient::new(o, capacity);
            (Client::V5(client), Events::V5(Box::new(events)))
        }
    }
}

/// What MQTT 5 adds to a publish.
#[derive(Default)]
pub(crate) struct Extras<'a> {
    /// The outbox message id (user property `messageId`).
    pub(crate) message_id: Option<&'a str>,
    /// The payload's schema (user property `schema`).
    pub(crate) schema: Option<&'a str>,
    /// Seconds until the broker may drop it undelivered.
    pub(crate) expiry: Option<u32>,
}

impl Client {
    /// Publishes with QoS 1.
    pub(crate) async fn publish(
        &self,
        topic: String,
        payload: Bytes,
        retain: bool,
        extras: Extras<'_>,
    ) -> Result<(), String> {
        match self {
            Self::V311(client) => client
                .publish_bytes(topic, rumqttc::QoS::AtLeastOnce, retain, payload)
                .await
                .map_err(|e| format!("publish: {e}")),
            Self::V5(client) => {
                let mut user_properties = Vec::new();
                if let Some(id) = extras.message_id.filter(|id| !id.is_empty()) {
                    user_properties.push(("messageId".to_owned(), id.to_owned()));
                }
                if let Some(schema) = extras.schema {
                    user_properties.push(("schema".to_owned(), schema.to_owned()));
                }
                let properties = v5p::PublishProperties {
                    message_expiry_interval: extras.expiry,
                    user_properties,
                    content_type: Some("application/json".to_owned()),
                    ..v5p::PublishProperties::default()
                };
                let qos = rumqttc::v5::mqttbytes::QoS::AtLeastOnce;
                // The request channel has room for the whole window and more (see
                // `Options::request_capacity`), so a publish nearly always fits at once:
                // handed over without building the waiting send's future (its moves
                // showed in the profile). Only when it does not, it waits for room.
                match client.try_publish_with_properties(topic, qos, retain, payload, properties) {
                    Ok(()) => Ok(()),
                    Err(rumqttc::v5::ClientError::TryRequest(rumqttc::v5::Request::Publish(
                        publish,
                    ))) => {
                        let topic = String::from_utf8(publish.topic.to_vec())
                            .map_err(|e| format!("publish: topic {e}"))?;
                        client
                            .publish_bytes_with_properties(
                                topic,
                                qos,
                                retain,
                                publish.payload,
                                publish.properties.unwrap_or_default(),
                            )
                            .await
                            .map_err(|e| format!("publish: {e}"))
                    }
                    Err(e) => Err(format!("publish: {e}")),
                }
            }
        }
    }

    /// Subscribes with QoS 1.
    pub(crate) async fn subscribe(&self, filter: String) -> Result<(), String> {
        match self {
            Self::V311(client) => client
                .subscribe(filter, rumqttc::QoS::AtLeastOnce)
                .await
                .map_err(|e| format!("subscribe: {e}")),
            Self::V5(client) => client
                .subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
                .await
                .map_err(|e| format!("subscribe: {e}")),
        }
    }

    /// Sends DISCONNECT (no will).
    pub(crate) async fn disconnect(&self) {
        let _ = match self {
            Self::V311(client) => client.disconnect().await.map_err(|e| e.to_string()),
            Self::V5(client) => client.disconnect().await.map_err(|e| e.to_string()),
        };
    }
}

/// What a connection reported, in either protocol.
#[derive(Debug)]
pub(crate) enum Event {
    /// The broker accepted the connection.
    ConnAck {
        /// It still had our session.
        session_present: bool,
        /// MQTT 5: the largest packet the broker takes (a larger message cannot be sent).
        max_packet: Option<u32>,
    },
    /// A message for us.
    Publish { topic: String, payload: Bytes },
    /// A publish went out with this packet id.
    Sent(u16),
    /// rumqttc holds a publish whose packet id is still in flight.
    AwaitAck(u16),
    /// The broker acknowledged a publish; MQTT 5 may refuse it (the reason, in words).
    PubAck { pkid: u16, refused: Option<Refusal> },
    /// The broker closed the connection (MQTT 5: with its reason and advice).
    Disconnect(Option<String>),
    /// Anything else (pings, subscription acknowledgements).
    Other,
}

/// A publish the broker refused (MQTT 5 PUBACK reason code).
#[derive(Debug)]
pub(crate) struct Refusal {
    /// The reason and what to do.
    pub(crate) why: String,
    /// Sending it again cannot help (not authorised, an invalid topic or payload).
    pub(crate) permanent: bool,
}

/// Why a connection attempt or a connection failed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The broker refused the credentials.
    Auth(String),
    /// The broker does not speak this protocol version.
    Unsupported(String),
    /// The connection was made, but closed (or answered with something unreadable)
    /// before a CONNACK: what a broker may do with a protocol version it does not speak.
    NoConnAck(String),
    /// A refusal no retry fixes (a bad client id, banned).
    Fatal(String),
    /// Anything else: retried with backoff.
    Other(String),
}

impl Failure {
    /// The failure in words.
    pub(crate) fn text(self) -> String {
        match self {
            Self::Auth(text)
            | Self::Unsupported(text)
            | Self::NoConnAck(text)
            | Self::Fatal(text)
            | Self::Other(text) => text,
        }
    }
}

impl Events {
    /// The next event.
    pub(crate) async fn poll(&mut self) -> Result<Event, Failure> {
        match self {
            Self::V311(events) => match events.poll().await {
                Ok(event) => Ok(from_v311(event)),
                Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
                    use rumqttc::ConnectReturnCode as C;
                    let text = format!("{code:?}");
                    Err(match code {
                        C::BadUserNamePassword | C::NotAuthorized => Failure::Auth(text),
                        C::RefusedProtocolVersion => Failure::Unsupported(text),
                        C::BadClientId => Failure::Fatal(text),
                        _ => Failure::Other(format!("refused ({text})")),
                    })
                }
                Err(
                    err @ (rumqttc::ConnectionError::MqttState(_)
                    | rumqttc::ConnectionError::NotConnAck(_)),
                ) => Err(no_connack(err.to_string())),
                Err(rumqttc::ConnectionError::Io(err)) if closed_early(&err) => {
                    Err(Failure::NoConnAck(err.to_string()))
                }
                Err(err) => Err(Failure::Other(err.to_string())),
            },
            Self::V5(events) => match events.poll().await {
                Ok(event) => Ok(from_v5(event)),
                Err(rumqttc::v5::ConnectionError::ConnectionRefused(code)) => {
                    use v5p::ConnectReturnCode as C;
                    let text = format!("{code:?}");
                    Err(match code {
                        C::BadUserNamePassword | C::NotAuthorized | C::BadAuthenticationMethod => {
                            Failure::Auth(text)
                        }
                        C::RefusedProtocolVersion | C::UnsupportedProtocolVersion => {
                            Failure::Unsupported(text)
                        }
                        C::BadClientId | C::ClientIdentifierNotValid | C::Banned => {
                            Failure::Fatal(text)
                        }
                        C::UseAnotherServer | C::ServerMoved => Failure::Other(format!(
                            "refused ({text}): the broker sends clients elsewhere; list the \
                             cluster's other nodes in uplink.brokers"
                        )),
                        C::ServerBusy | C::ServerUnavailable | C::ConnectionRateExceeded => {
                            Failure::Other(format!(
                                "refused ({text}): the broker is overloaded; the gateway backs off"
                            ))
                        }
                        _ => Failure::Other(format!("refused ({text})")),
                    })
                }
                Err(rumqttc::v5::ConnectionError::MqttState(
                    rumqttc::v5::StateError::ServerDisconnect {
                        reason_code,
                        reason_string,
                    },
                )) => Err(Failure::Other(disconnect_reason(&v5p::Disconnect {
                    reason_code,
                    properties: reason_string.map(|text| v5p::DisconnectProperties {
                        session_expiry_interval: None,
                        reason_string: Some(text),
                        user_properties: Vec::new(),
                        server_reference: None,
                    }),
                }))),
                Err(
                    err @ (rumqttc::v5::ConnectionError::MqttState(_)
                    | rumqttc::v5::ConnectionError::NotConnAck(_)),
                ) => Err(no_connack(err.to_string())),
                Err(rumqttc::v5::ConnectionError::Io(err)) if closed_early(&err) => {
                    Err(Failure::NoConnAck(err.to_string()))
                }
                Err(err) => Err(Failure::Other(err.to_string())),
            },
        }
    }
}

impl Events {
    /// The next event if rumqttc already holds it: PUBACKs arrive in bunches, and what
    /// one read brought waits in the event loop's queue. Taking those without a new
    /// [`poll`](Self::poll) (and the caller's `select!` around it) is cheaper, and safe:
    /// nothing is read or written.
    pub(crate) fn queued(&mut self) -> Option<Event> {
        match self {
            Self::V311(events) => events.state.events.pop_front().map(from_v311),
            Self::V5(events) => events.state.events.pop_front().map(from_v5),
        }
    }
}

fn from_v311(event: rumqttc::Event) -> Event {
    match event {
        rumqttc::Event::Incoming(packet) => match packet {
            rumqttc::Incoming::ConnAck(ack) => Event::ConnAck {
                session_present: ack.session_present,
                max_packet: None,
            },
            rumqttc::Incoming::Publish(publish) => Event::Publish {
                topic: publish.topic,
                payload: publish.payload,
            },
            rumqttc::Incoming::PubAck(ack) => Event::PubAck {
                pkid: ack.pkid,
                refused: None,
            },
            rumqttc::Incoming::Disconnect => Event::Disconnect(None),
            _ => Event::Other,
        },
        rumqttc::Event::Outgoing(outgoing) => outgoing_event(&outgoing),
    }
}

fn from_v5(event: rumqttc::v5::Event) -> Event {
    match event {
        rumqttc::v5::Event::Incoming(packet) => match packet {
            v5p::Packet::ConnAck(ack) => Event::ConnAck {
                session_present: ack.session_present,
                max_packet: ack.properties.as_ref().and_then(|p| p.max_packet_size),
            },
            v5p::Packet::Publish(publish) => Event::Publish {
                topic: String::from_utf8_lossy(&publish.topic).into_owned(),
                payload: publish.payload,
            },
            v5p::Packet::PubAck(ack) => Event::PubAck {
                pkid: ack.pkid,
                refused: puback_refusal(&ack),
            },
            v5p::Packet::Disconnect(disconnect) => {
                Event::Disconnect(Some(disconnect_reason(&disconnect)))
            }
            _ => Event::Other,
        },
        rumqttc::v5::Event::Outgoing(outgoing) => outgoing_event(&outgoing),
    }
}

/// A connection closed before its CONNACK, unless TLS said why (a TLS 1.3 server reports
/// a missing client certificate after the handshake, as an alert on the first read).
fn no_connack(text: String) -> Failure {
    if text.contains("alert") {
        Failure::Other(text)
    } else {
        Failure::NoConnAck(text)
    }
}

/// An I/O error of a connection the peer closed (not one that was never made).
fn closed_early(err: &std::io::Error) -> bool {
    matches!(
        err.kind(),
        std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
    )
}

fn outgoing_event(outgoing: &Outgoing) -> Event {
    match outgoing {
        Outgoing::Publish(pkid) => Event::Sent(*pkid),
        Outgoing::AwaitAck(pkid) => Event::AwaitAck(*pkid),
        _ => Event::Other,
    }
}

/// An MQTT 5 PUBACK's refusal, with advice; `None` when it was taken.
fn puback_refusal(ack: &v5p::PubAck) -> Option<Refusal> {
    use v5p::PubAckReason as R;
    let reason = ack
        .properties
        .as_ref()
        .and_then(|p| p.reason_string.clone())
        .map(|text| format!(": {text}"))
        .unwrap_or_default();
    let (advice, permanent) = match ack.reason {
        R::Success | R::NoMatchingSubscribers => return None,
        R::NotAuthorized => (
            "the broker's ACL does not let the gateway publish there; fix the ACL for the gateway's topics",
            true,
        ),
        R::TopicNameInvalid => ("the broker does not take this topic", true),
        R::PayloadFormatInvalid => ("the broker does not take this payload", true),
        R::QuotaExceeded => (
            "the broker's quota for this client is used up; it goes again after a reconnect",
            false,
        ),
        R::PacketIdentifierInUse | R::UnspecifiedError | R::ImplementationSpecificError => {
            ("it goes again after a reconnect", false)
        }
    };
    Some(Refusal {
        why: format!(
            "the broker refused a publish ({:?}{reason}): {advice}",
            ack.reason
        ),
        permanent,
    })
}

/// The broker's DISCONNECT in words, with advice.
fn disconnect_reason(disconnect: &v5p::Disconnect) -> String {
    use v5p::DisconnectReasonCode as D;
    let properties = disconnect.properties.as_ref();
    let text = properties
        .and_then(|p| p.reason_string.clone())
        .map(|text| format!(": {text}"))
        .unwrap_or_default();
    let elsewhere = properties
        .and_then(|p| p.server_reference.clone())
        .map(|server| format!(" (it names {server})"))
        .unwrap_or_default();
    let advice = match disconnect.reason_code {
        D::SessionTakenOver => {
            "another client connected with the gateway's client id: two gateways share an id"
        }
        D::NotAuthorized => "the broker withdrew the gateway's rights; check its ACL",
        D::ServerShuttingDown => "the broker is shutting down; the gateway reconnects",
        D::UseAnotherServer | D::ServerMoved => {
            "the broker sends clients elsewhere; list the cluster's other nodes in uplink.brokers"
        }
        D::KeepAliveTimeout => "no packet within 1.5 keep-alives: a slow or lossy link",
        D::ServerBusy | D::QuotaExceeded | D::MessageRateTooHigh => {
            "the broker is overloaded or limits the gateway; it backs off and reconnects"
        }
        D::PacketTooLarge => "a message was larger than the broker takes",
        _ => "the gateway reconnects",
    };
    format!(
        "the broker disconnected the gateway ({:?}{text}){elsewhere}: {advice}",
        disconnect.reason_code
    )
}

/// The `schema` of an Outpost payload, read without parsing it: the contract's
/// serialisers write it first (`{"schema":"outpost.telemetry/1",…`).
pub(crate) fn schema_of(payload: &[u8]) -> Option<&str> {
    let rest = payload.strip_prefix(b"{\"schema\":\"")?;
    let end = rest.iter().position(|b| *b == b'"')?;
    std::str::from_utf8(&rest[..end]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schema_is_read_from_the_front_of_a_payload() {
        assert_eq!(
            schema_of(br#"{"schema":"outpost.telemetry/1","messageId":"m"}"#),
            Some("outpost.telemetry/1")
        );
        assert_eq!(schema_of(br#"{"messageId":"m","schema":"x"}"#), None);
        assert_eq!(schema_of(b"{\"schema\":\"unterminated"), None);
    }

    #[tokio::test]
    async fn a_publish_that_does_not_fit_at_once_waits_for_room() {
        let (client, events) = client(
            Protocol::V5,
            Options {
                client_id: "gw-test".into(),
                host: "127.0.0.1".into(),
                port: 1,
                keepalive: Duration::from_secs(30),
                inflight: 10,
                max_packet: 1 << 16,
                request_capacity: 1,
                credentials: None,
                will: None,
                tls: None,
                session_expiry: 60,
            },
        );
        let publish = |payload: &'static [u8]| {
            client.publish(
                "t/1".into(),
                Bytes::from_static(payload),
                false,
                Extras::default(),
            )
        };
        // The one place in the request channel: taken at once.
        publish(b"1").await.unwrap();
        // The channel is full (no event loop drains it): the next one waits, no error.
        let second = publish(b"2");
        tokio::pin!(second);
        let pending = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(second.as_mut().poll(cx).is_pending())
        })
        .await;
        assert!(pending, "a full channel is waited on, not an error");
        // The event loop gone, the waiting send ends with an error instead of hanging.
        drop(events);
        let err = second.await.unwrap_err();
        assert!(err.starts_with("publish:"), "{err}");
    }

    #[test]
    fn refusals_and_disconnects_say_what_to_do() {
        let ack = |reason| v5p::PubAck {
            pkid: 1,
            reason,
            properties: None,
        };
        assert!(puback_refusal(&ack(v5p::PubAckReason::Success)).is_none());
        assert!(puback_refusal(&ack(v5p::PubAckReason::NoMatchingSubscribers)).is_none());
        let denied = puback_refusal(&ack(v5p::PubAckReason::NotAuthorized)).unwrap();
        assert!(denied.permanent && denied.why.contains("ACL"), "{denied:?}");
        let quota = puback_refusal(&ack(v5p::PubAckReason::QuotaExceeded)).unwrap();
        assert!(!quota.permanent);
        let taken = disconnect_reason(&v5p::Disconnect {
            reason_code: v5p::DisconnectReasonCode::SessionTakenOver,
            properties: None,
        });
        assert!(taken.contains("two gateways share an id"), "{taken}");
    }
}
