//! One face for rumqttc's MQTT 3.1.1 and MQTT 5 clients, so that the session drains the
//! outbox the same way over either.
//!
//! MQTT 5 adds what the uplink uses where the broker has it: a session expiry interval (a
//! persistent session outlives a short outage, and no longer), a message expiry interval
//! from each outbox message's time to live (the broker drops what went stale while the
//! backend was away), user properties with the message id and schema (a backend can
//! route and de-duplicate without parsing), and reason codes on refused connections,
//! refused publishes and the broker's own DISCONNECT, logged with advice.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use rumqttc::mqttbytes::v4 as v4p;
use rumqttc::v5::mqttbytes::v5 as v5p;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

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
    pub(crate) credentials: Option<(String, String)>,
    pub(crate) will: Option<Will>,
    pub(crate) tls: Option<Arc<rustls::ClientConfig>>,
    /// MQTT 5's session expiry interval (seconds); 3.1.1 keeps a persistent session for
    /// as long as the broker likes.
    pub(crate) session_expiry: u32,
}

/// The requests a [`Client`] hands to its connection.
enum Request {
    Publish {
        topic: String,
        payload: Bytes,
        retain: bool,
        /// MQTT 5 only.
        properties: Option<v5p::PublishProperties>,
    },
    Subscribe(String),
    Disconnect,
}

/// Where a [`Client`] leaves its requests for the [`Events`] that writes them.
struct Queue {
    requests: Mutex<VecDeque<Request>>,
    wake: tokio::sync::Notify,
    /// The connection's [`Events`] was dropped.
    gone: AtomicBool,
}

impl Queue {
    fn push(&self, request: Request) -> Result<(), String> {
        if self.gone.load(Ordering::Acquire) {
            return Err("the connection is closed".to_owned());
        }
        lock(&self.requests).push_back(request);
        self.wake.notify_one();
        Ok(())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A client handle of either protocol: it queues requests, which the connection's
/// [`Events::poll`] writes.
#[derive(Clone)]
pub(crate) struct Client {
    protocol: Protocol,
    queue: Arc<Queue>,
}

/// One MQTT connection, driven by [`poll`](Self::poll): rumqttc's codec (its `mqttbytes`
/// for 3.1.1 and 5) under an event loop of our own. What rumqttc's own `EventLoop` does
/// per request (a flush, a timer, a copy of the publish kept for a resend, a channel hop)
/// cost 44% of the gateway's CPU in the batched benchmark; here every request queued is
/// encoded into one buffer and written with one flush, packet ids are allocated without
/// keeping the publish (the outbox resends what a lost connection did not acknowledge),
/// and the broker's receive maximum (MQTT 5) bounds what is in flight.
pub(crate) struct Events {
    protocol: Protocol,
    options: Options,
    queue: Arc<Queue>,
    state: State,
    events: VecDeque<Event>,
}

/// Where a connection is in its one life.
enum State {
    /// Made by the first poll.
    New,
    Live(Box<Conn>),
    /// Failed or ended: not made again (a new client is). Why, once the events decoded
    /// before it are taken.
    Ended(Option<Failure>),
}

impl Drop for Events {
    fn drop(&mut self) {
        self.queue.gone.store(true, Ordering::Release);
    }
}

/// Makes a client for one connection (nothing is sent before the first poll).
pub(crate) fn client(protocol: Protocol, options: Options) -> (Client, Events) {
    let queue = Arc::new(Queue {
        requests: Mutex::new(VecDeque::new()),
        wake: tokio::sync::Notify::new(),
        gone: AtomicBool::new(false),
    });
    (
        Client {
            protocol,
            queue: Arc::clone(&queue),
        },
        Events {
            protocol,
            options,
            queue,
            state: State::New,
            events: VecDeque::new(),
        },
    )
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
    /// Publishes with QoS 1: queued at once (the caller bounds what it queues by its
    /// window); written by the next [`Events::poll`] with whatever else is queued.
    pub(crate) async fn publish(
        &self,
        topic: String,
        payload: Bytes,
        retain: bool,
        extras: Extras<'_>,
    ) -> Result<(), String> {
        let properties = match self.protocol {
            Protocol::V311 => None,
            Protocol::V5 => {
                let mut user_properties = Vec::new();
                if let Some(id) = extras.message_id.filter(|id| !id.is_empty()) {
                    user_properties.push(("messageId".to_owned(), id.to_owned()));
                }
                if let Some(schema) = extras.schema {
                    user_properties.push(("schema".to_owned(), schema.to_owned()));
                }
                Some(v5p::PublishProperties {
                    message_expiry_interval: extras.expiry,
                    user_properties,
                    content_type: Some("application/json".to_owned()),
                    ..v5p::PublishProperties::default()
                })
            }
        };
        self.queue
            .push(Request::Publish {
                topic,
                payload,
                retain,
                properties,
            })
            .map_err(|e| format!("publish: {e}"))
    }

    /// Subscribes with QoS 1.
    pub(crate) async fn subscribe(&self, filter: String) -> Result<(), String> {
        self.queue
            .push(Request::Subscribe(filter))
            .map_err(|e| format!("subscribe: {e}"))
    }

    /// Sends DISCONNECT (no will).
    pub(crate) async fn disconnect(&self) {
        let _ = self.queue.push(Request::Disconnect);
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

/// How long a TCP connect, a TLS handshake, the CONNACK, or a write may take (rumqttc's
/// connection timeout).
const NETWORK_TIMEOUT: Duration = Duration::from_secs(5);

/// Bytes encoded before they are written (some fifty telemetry publishes).
const WRITE_BATCH: usize = 16 * 1024;

/// A byte stream to the broker: TCP, or TLS over it.
trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// A live connection.
struct Conn {
    stream: Box<dyn Stream>,
    /// Read from the broker, not yet decoded.
    input: BytesMut,
    /// Encoded, not yet written (kept here across a cancelled poll).
    output: BytesMut,
    /// Packet ids awaiting an acknowledgement (a bit per id).
    in_use: Vec<u64>,
    in_flight: usize,
    /// Publishes and subscriptions in flight at most: ours, or the broker's receive
    /// maximum (MQTT 5) if smaller.
    limit: usize,
    next_pkid: u16,
    /// The largest packet we send (MQTT 5: the broker's maximum, if it said one).
    max_out: usize,
    /// The largest packet we take.
    max_in: usize,
    keepalive: Duration,
    last_out: Instant,
    /// When the broker last sent anything.
    last_in: Instant,
    /// A PINGREQ unanswered since.
    ping_since: Option<Instant>,
    /// When what is in `output` must be written by (set when it starts, kept across a
    /// cancelled poll, so a broker that stops reading is noticed within the timeout).
    write_by: Option<Instant>,
    /// DISCONNECT is encoded: nothing more is taken or sent after it.
    closing: bool,
}

impl Conn {
    fn take_pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
            let (word, bit) = (usize::from(self.next_pkid) / 64, self.next_pkid % 64);
            if self.in_use[word] & (1 << bit) == 0 {
                self.in_use[word] |= 1 << bit;
                self.in_flight += 1;
                return self.next_pkid;
            }
        }
    }

    /// Frees the packet id the broker acknowledged; one not in use (never sent, or
    /// acknowledged already) breaks the protocol.
    fn acknowledged(&mut self, pkid: u16, what: &str) -> Result<(), Failure> {
        let (word, bit) = (usize::from(pkid) / 64, pkid % 64);
        if pkid == 0 || self.in_use[word] & (1 << bit) == 0 {
            return Err(Failure::Other(format!(
                "the broker acknowledged {what} {pkid}, which was not sent"
            )));
        }
        self.in_use[word] &= !(1 << bit);
        self.in_flight -= 1;
        Ok(())
    }

    /// Writes what is encoded, with one flush. Cancel-safe: what is not yet written
    /// stays in `output`.
    async fn write_out(&mut self) -> Result<(), Failure> {
        let deadline = *self
            .write_by
            .get_or_insert_with(|| Instant::now() + NETWORK_TIMEOUT);
        let pending = self.output.len();
        let write = async {
            while !self.output.is_empty() {
                let n = self.stream.write(&self.output).await?;
                if n == 0 {
                    return Err(std::io::Error::from(std::io::ErrorKind::WriteZero));
                }
                self.output.advance(n);
            }
            self.stream.flush().await
        };
        match tokio::time::timeout_at(deadline, write).await {
            Ok(Ok(())) => {
                self.last_out = Instant::now();
                self.write_by = None;
                if self.closing {
                    // MQTT: after DISCONNECT the client closes the connection. The
                    // broker's last PUBACKs may still come; the read ends at its close.
                    let _ = self.stream.shutdown().await;
                }
                Ok(())
            }
            Ok(Err(err)) => Err(Failure::Other(format!("writing to the broker: {err}"))),
            Err(_) => Err(Failure::Other(format!(
                "could not write {pending} bytes to the broker within {NETWORK_TIMEOUT:?}"
            ))),
        }
    }

    /// When the keep-alive wants something: the broker's answer to a PINGREQ overdue, or
    /// a PINGREQ due because either direction was quiet for a keep-alive (MQTT asks for
    /// one when we sent nothing; one when the broker sent nothing finds a half-open link
    /// that our writes alone would not, as they land in the kernel's buffer).
    fn keepalive_at(&self) -> Option<Instant> {
        if self.keepalive.is_zero() || self.closing {
            return None;
        }
        Some(
            self.ping_since
                .unwrap_or_else(|| self.last_out.min(self.last_in))
                + self.keepalive,
        )
    }
}

/// An incoming packet of either protocol.
#[expect(
    clippy::large_enum_variant,
    reason = "one at a time, on the stack, from decode to its handling"
)]
enum Incoming {
    V311(v4p::Packet),
    V5(v5p::Packet),
}

impl Events {
    /// The next event: the CONNACK first (the connection is made by the first poll),
    /// then what the broker sends and what was written. Each turn writes every request
    /// queued so far (as far as the in-flight limit lets) with one flush.
    pub(crate) async fn poll(&mut self) -> Result<Event, Failure> {
        if let Some(event) = self.events.pop_front() {
            return Ok(event);
        }
        let result = match &mut self.state {
            State::Ended(failure) => {
                return Err(failure
                    .take()
                    .unwrap_or_else(|| Failure::Other("the connection has ended".to_owned())));
            }
            State::New => match connect(self.protocol, &self.options).await {
                Ok((conn, event)) => {
                    self.state = State::Live(Box::new(conn));
                    Ok(event)
                }
                Err(failure) => Err(failure),
            },
            State::Live(conn) => turn(self.protocol, conn, &self.queue, &mut self.events).await,
        };
        let failure = match result {
            Ok(event) => return Ok(event),
            Err(failure) => failure,
        };
        // What the broker said before the failure (its PUBACKs, its DISCONNECT and the
        // reason) comes first; the failure after it.
        match self.events.pop_front() {
            Some(event) => {
                self.state = State::Ended(Some(failure));
                Ok(event)
            }
            None => {
                self.state = State::Ended(None);
                Err(failure)
            }
        }
    }

    /// The next event if the connection already holds it: PUBACKs arrive in bunches,
    /// and what one read brought waits here. Taking those without a new
    /// [`poll`](Self::poll) (and the caller's `select!` around it) is cheaper, and safe:
    /// nothing is read or written.
    pub(crate) fn queued(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
}

/// Connects: TCP (and TLS), CONNECT, and the broker's CONNACK, within
/// [`NETWORK_TIMEOUT`] each.
async fn connect(protocol: Protocol, options: &Options) -> Result<(Conn, Event), Failure> {
    let tcp = match tokio::time::timeout(
        NETWORK_TIMEOUT,
        tokio::net::TcpStream::connect((options.host.as_str(), options.port)),
    )
    .await
    {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(err)) => return Err(Failure::Other(format!("I/O: {err}"))),
        Err(_) => {
            return Err(Failure::Other(format!(
                "no TCP connection within {NETWORK_TIMEOUT:?}"
            )));
        }
    };
    let _ = tcp.set_nodelay(true);
    let stream: Box<dyn Stream> = match &options.tls {
        None => Box::new(tcp),
        Some(config) => {
            let name = rustls_pki_types::ServerName::try_from(options.host.clone())
                .map_err(|e| Failure::Other(format!("TLS: {}: {e}", options.host)))?;
            let connector = rumqttc::tokio_rustls::TlsConnector::from(Arc::clone(config));
            match tokio::time::timeout(NETWORK_TIMEOUT, connector.connect(name, tcp)).await {
                Ok(Ok(tls)) => Box::new(tls),
                Ok(Err(err)) => return Err(Failure::Other(format!("TLS: {err}"))),
                Err(_) => {
                    return Err(Failure::Other(format!(
                        "no TLS handshake within {NETWORK_TIMEOUT:?}"
                    )));
                }
            }
        }
    };
    let keep_alive = u16::try_from(options.keepalive.as_secs()).unwrap_or(u16::MAX);
    let mut output = BytesMut::with_capacity(8 * 1024);
    let written = match protocol {
        Protocol::V311 => v4p::Packet::Connect(v4p::Connect {
            protocol: rumqttc::mqttbytes::Protocol::V4,
            keep_alive,
            client_id: options.client_id.clone(),
            // A persistent session: the broker keeps our subscriptions (and what the
            // cloud sends to them) while we are away.
            clean_session: false,
            last_will: options.will.as_ref().map(|will| {
                v4p::LastWill::new(
                    will.topic.clone(),
                    will.payload.clone(),
                    rumqttc::QoS::AtLeastOnce,
                    will.retain,
                )
            }),
            login: options
                .credentials
                .as_ref()
                .map(|(user, password)| v4p::Login::new(user, password)),
        })
        .write(&mut output, usize::MAX)
        .map_err(|e| e.to_string()),
        Protocol::V5 => {
            let mut properties = v5p::ConnectProperties::new();
            properties.session_expiry_interval = Some(options.session_expiry);
            properties.max_packet_size = u32::try_from(options.max_packet).ok();
            v5p::Packet::Connect(
                v5p::Connect {
                    keep_alive,
                    client_id: options.client_id.clone(),
                    clean_start: false,
                    properties: Some(properties),
                },
                options.will.as_ref().map(|will| {
                    v5p::LastWill::new(
                        will.topic.clone(),
                        will.payload.clone(),
                        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                        will.retain,
                        None,
                    )
                }),
                options
                    .credentials
                    .as_ref()
                    .map(|(user, password)| v5p::Login::new(user, password)),
            )
            .write(&mut output, None)
            .map_err(|e| e.to_string())
        }
    };
    written.map_err(|e| Failure::Fatal(format!("the CONNECT cannot be made: {e}")))?;
    let mut conn = Conn {
        stream,
        input: BytesMut::with_capacity(8 * 1024),
        output,
        in_use: vec![0; 1024],
        in_flight: 0,
        limit: usize::from(options.inflight.max(1)),
        next_pkid: 0,
        max_out: options.max_packet,
        max_in: options.max_packet,
        keepalive: options.keepalive,
        last_out: Instant::now(),
        last_in: Instant::now(),
        ping_since: None,
        write_by: None,
        closing: false,
    };
    // As a broker that closes at once (one that does not speak this version) may.
    match tokio::time::timeout(NETWORK_TIMEOUT, conn.stream.write_all(&conn.output)).await {
        Ok(Ok(())) => conn.output.clear(),
        Ok(Err(err)) if closed_early(&err) => {
            return Err(Failure::NoConnAck(format!("I/O: {err}")));
        }
        Ok(Err(err)) => return Err(no_connack(format!("I/O: {err}"))),
        Err(_) => {
            return Err(Failure::Other(format!(
                "could not send CONNECT within {NETWORK_TIMEOUT:?}"
            )));
        }
    }
    let ack = tokio::time::timeout(NETWORK_TIMEOUT, async {
        loop {
            match decode(protocol, &mut conn.input, conn.max_in) {
                Ok(Some(packet)) => return Ok(packet),
                Ok(None) => {}
                Err(text) => return Err(no_connack(text)),
            }
            match conn.stream.read_buf(&mut conn.input).await {
                Ok(0) => {
                    return Err(Failure::NoConnAck(
                        "the broker closed the connection before its CONNACK".to_owned(),
                    ));
                }
                Ok(_) => {}
                Err(err) if closed_early(&err) => {
                    return Err(Failure::NoConnAck(format!("I/O: {err}")));
                }
                Err(err) => return Err(no_connack(format!("I/O: {err}"))),
            }
        }
    })
    .await
    .map_err(|_| Failure::Other(format!("no CONNACK within {NETWORK_TIMEOUT:?}")))??;
    let event = match ack {
        Incoming::V311(v4p::Packet::ConnAck(ack)) => {
            use rumqttc::ConnectReturnCode as C;
            let text = format!("{:?}", ack.code);
            match ack.code {
                C::Success => {}
                C::BadUserNamePassword | C::NotAuthorized => return Err(Failure::Auth(text)),
                C::RefusedProtocolVersion => return Err(Failure::Unsupported(text)),
                C::BadClientId => return Err(Failure::Fatal(text)),
                C::ServiceUnavailable => return Err(Failure::Other(format!("refused ({text})"))),
            }
            Event::ConnAck {
                session_present: ack.session_present,
                max_packet: None,
            }
        }
        Incoming::V5(v5p::Packet::ConnAck(ack)) => {
            refused_v5(ack.code)?;
            let properties = ack.properties.as_ref();
            if let Some(most) = properties.and_then(|p| p.receive_max) {
                conn.limit = conn.limit.min(usize::from(most.max(1)));
            }
            let max_packet = properties.and_then(|p| p.max_packet_size);
            if let Some(max) = max_packet {
                conn.max_out = conn.max_out.min(usize::try_from(max).unwrap_or(usize::MAX));
            }
            // MQTT 5: the broker may set the keep-alive, and the client then uses it.
            if let Some(secs) = properties.and_then(|p| p.server_keep_alive) {
                conn.keepalive = Duration::from_secs(u64::from(secs));
            }
            Event::ConnAck {
                session_present: ack.session_present,
                max_packet,
            }
        }
        Incoming::V311(other) => {
            return Err(Failure::NoConnAck(format!(
                "the broker answered CONNECT with {other:?}"
            )));
        }
        Incoming::V5(other) => {
            return Err(Failure::NoConnAck(format!(
                "the broker answered CONNECT with {other:?}"
            )));
        }
    };
    Ok((conn, event))
}

/// An MQTT 5 CONNACK's refusal as a failure.
fn refused_v5(code: v5p::ConnectReturnCode) -> Result<(), Failure> {
    use v5p::ConnectReturnCode as C;
    let text = format!("{code:?}");
    Err(match code {
        C::Success => return Ok(()),
        C::BadUserNamePassword | C::NotAuthorized | C::BadAuthenticationMethod => {
            Failure::Auth(text)
        }
        C::RefusedProtocolVersion | C::UnsupportedProtocolVersion => Failure::Unsupported(text),
        C::BadClientId | C::ClientIdentifierNotValid | C::Banned => Failure::Fatal(text),
        C::UseAnotherServer | C::ServerMoved => Failure::Other(format!(
            "refused ({text}): the broker sends clients elsewhere; list the cluster's other \
             nodes in uplink.brokers"
        )),
        C::ServerBusy | C::ServerUnavailable | C::ConnectionRateExceeded => Failure::Other(
            format!("refused ({text}): the broker is overloaded; the gateway backs off"),
        ),
        _ => Failure::Other(format!("refused ({text})")),
    })
}

/// The next whole packet in `input`, if there is one.
fn decode(
    protocol: Protocol,
    input: &mut BytesMut,
    max: usize,
) -> Result<Option<Incoming>, String> {
    match protocol {
        Protocol::V311 => match v4p::Packet::read(input, max) {
            Ok(packet) => Ok(Some(Incoming::V311(packet))),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(size)) => Err(format!(
                "the broker sent a packet of {size} bytes, over the gateway's limit of {max}"
            )),
            Err(err) => Err(format!("the broker sent what is not MQTT 3.1.1: {err}")),
        },
        // MQTT 5 lets a DISCONNECT with reason 0 leave out its reason and properties;
        // rumqttc's codec wants them.
        Protocol::V5 if input.starts_with(&[0xe0, 0x00]) => {
            input.advance(2);
            Ok(Some(Incoming::V5(v5p::Packet::Disconnect(
                v5p::Disconnect::new(v5p::DisconnectReasonCode::NormalDisconnection),
            ))))
        }
        Protocol::V5 => match v5p::Packet::read(input, u32::try_from(max).ok()) {
            Ok(packet) => Ok(Some(Incoming::V5(packet))),
            Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(rumqttc::v5::mqttbytes::Error::PayloadSizeLimitExceeded {
                pkt_size: size, ..
            }) => Err(format!(
                "the broker sent a packet of {size} bytes, over the gateway's limit of {max}"
            )),
            Err(err) => Err(format!("the broker sent what is not MQTT 5: {err}")),
        },
    }
}

/// One turn of a live connection: writes what is queued, then waits for the broker, a
/// new request or the keep-alive, until there is an event.
async fn turn(
    protocol: Protocol,
    conn: &mut Conn,
    queue: &Queue,
    events: &mut VecDeque<Event>,
) -> Result<Event, Failure> {
    loop {
        // What came with an earlier read first (publishes queued for our session may
        // arrive with the CONNACK).
        while let Some(packet) =
            decode(protocol, &mut conn.input, conn.max_in).map_err(Failure::Other)?
        {
            incoming(conn, packet, events)?;
        }
        let more = take_requests(protocol, conn, queue, events)?;
        if !conn.output.is_empty() {
            conn.write_out().await?;
        }
        if let Some(event) = events.pop_front() {
            return Ok(event);
        }
        if more {
            continue;
        }
        let keepalive_at = conn.keepalive_at();
        // Room for a bunch of PUBACKs (or a large message) per read.
        if conn.input.capacity() - conn.input.len() < 1024 {
            conn.input.reserve(8 * 1024);
        }
        tokio::select! {
            // What arrived first: a PINGRESP waiting to be read must not lose to the timer.
            biased;
            read = conn.stream.read_buf(&mut conn.input) => match read {
                Ok(0) => return Err(Failure::Other("the broker closed the connection".to_owned())),
                Ok(_) => conn.last_in = Instant::now(),
                Err(err) => return Err(Failure::Other(format!("I/O: {err}"))),
            },
            () = queue.wake.notified() => {}
            () = async {
                match keepalive_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                if conn.ping_since.is_some() {
                    return Err(Failure::Other(format!(
                        "the broker did not answer a ping within the keep-alive ({:?})",
                        conn.keepalive
                    )));
                }
                encode_ping(protocol, &mut conn.output);
                conn.ping_since = Some(Instant::now());
            }
        }
    }
}

fn encode_ping(protocol: Protocol, output: &mut BytesMut) {
    // A PINGREQ is two bytes; encoding it cannot fail.
    match protocol {
        Protocol::V311 => drop(v4p::Packet::PingReq.write(output, usize::MAX)),
        Protocol::V5 => drop(v5p::Packet::PingReq(v5p::PingReq).write(output, None)),
    }
}

/// Encodes the queued requests, as far as the in-flight limit lets and up to
/// [`WRITE_BATCH`] bytes: each publish gets a packet id and a [`Event::Sent`], in order.
/// True when requests that could go are left for the next write.
fn take_requests(
    protocol: Protocol,
    conn: &mut Conn,
    queue: &Queue,
    events: &mut VecDeque<Event>,
) -> Result<bool, Failure> {
    let mut requests = lock(&queue.requests);
    // Up to a write's worth at a time: a whole window at once would only grow the buffer
    // (it keeps its size) without saving more syscalls worth having.
    while !conn.closing && conn.output.len() < WRITE_BATCH {
        // DISCONNECT takes no packet id: next in the queue, it needs no room in flight.
        match requests.front() {
            None => break,
            Some(Request::Disconnect) => {}
            Some(_) if conn.in_flight >= conn.limit => break,
            Some(_) => {}
        }
        let Some(request) = requests.pop_front() else {
            break;
        };
        let written = match request {
            Request::Publish {
                topic,
                payload,
                retain,
                properties,
            } => {
                let pkid = conn.take_pkid();
                events.push_back(Event::Sent(pkid));
                match protocol {
                    Protocol::V311 => v4p::Packet::Publish(v4p::Publish {
                        dup: false,
                        qos: rumqttc::QoS::AtLeastOnce,
                        retain,
                        topic,
                        pkid,
                        payload,
                    })
                    .write(&mut conn.output, conn.max_out)
                    .map_err(|e| e.to_string()),
                    Protocol::V5 => v5p::Packet::Publish(v5p::Publish {
                        dup: false,
                        qos: rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                        retain,
                        topic: Bytes::from(topic),
                        pkid,
                        payload,
                        properties,
                    })
                    .write(&mut conn.output, u32::try_from(conn.max_out).ok())
                    .map_err(|e| e.to_string()),
                }
            }
            Request::Subscribe(filter) => {
                let pkid = conn.take_pkid();
                match protocol {
                    Protocol::V311 => {
                        let mut subscribe = v4p::Subscribe::new(filter, rumqttc::QoS::AtLeastOnce);
                        subscribe.pkid = pkid;
                        v4p::Packet::Subscribe(subscribe)
                            .write(&mut conn.output, conn.max_out)
                            .map_err(|e| e.to_string())
                    }
                    Protocol::V5 => {
                        let mut subscribe = v5p::Subscribe::new(
                            v5p::Filter::new(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce),
                            None,
                        );
                        subscribe.pkid = pkid;
                        v5p::Packet::Subscribe(subscribe)
                            .write(&mut conn.output, u32::try_from(conn.max_out).ok())
                            .map_err(|e| e.to_string())
                    }
                }
            }
            Request::Disconnect => {
                conn.closing = true;
                match protocol {
                    Protocol::V311 => v4p::Packet::Disconnect
                        .write(&mut conn.output, usize::MAX)
                        .map_err(|e| e.to_string()),
                    Protocol::V5 => v5p::Packet::Disconnect(v5p::Disconnect::new(
                        v5p::DisconnectReasonCode::NormalDisconnection,
                    ))
                    .write(&mut conn.output, None)
                    .map_err(|e| e.to_string()),
                }
            }
        };
        written.map_err(|e| Failure::Other(format!("a request cannot be sent: {e}")))?;
    }
    Ok(!conn.closing && conn.in_flight < conn.limit && !requests.is_empty())
}

/// Takes one packet from the broker: acknowledgements free their packet ids, a
/// publish for us is acknowledged (QoS 1; QoS 2 through PUBREC and PUBCOMP).
fn incoming(
    conn: &mut Conn,
    packet: Incoming,
    events: &mut VecDeque<Event>,
) -> Result<(), Failure> {
    match packet {
        Incoming::V311(packet) => match packet {
            v4p::Packet::PubAck(ack) => {
                conn.acknowledged(ack.pkid, "publish")?;
                events.push_back(Event::PubAck {
                    pkid: ack.pkid,
                    refused: None,
                });
            }
            v4p::Packet::Publish(publish) => {
                let ack = match publish.qos {
                    rumqttc::QoS::AtMostOnce => None,
                    rumqttc::QoS::AtLeastOnce => {
                        Some(v4p::Packet::PubAck(v4p::PubAck::new(publish.pkid)))
                    }
                    rumqttc::QoS::ExactlyOnce => {
                        Some(v4p::Packet::PubRec(v4p::PubRec::new(publish.pkid)))
                    }
                };
                // Nothing goes after our DISCONNECT.
                if let Some(ack) = ack.filter(|_| !conn.closing) {
                    let _ = ack.write(&mut conn.output, usize::MAX);
                }
                events.push_back(Event::Publish {
                    topic: publish.topic,
                    payload: publish.payload,
                });
            }
            v4p::Packet::PubRel(rel) if !conn.closing => {
                let _ = v4p::Packet::PubComp(v4p::PubComp::new(rel.pkid))
                    .write(&mut conn.output, usize::MAX);
            }
            v4p::Packet::SubAck(ack) => {
                conn.acknowledged(ack.pkid, "subscription")?;
                if ack
                    .return_codes
                    .iter()
                    .any(|code| matches!(code, v4p::SubscribeReasonCode::Failure))
                {
                    tracing::warn!("the broker refused a subscription of the gateway's");
                }
                events.push_back(Event::Other);
            }
            v4p::Packet::PubRel(_) => {}
            v4p::Packet::PingResp => conn.ping_since = None,
            v4p::Packet::Disconnect => events.push_back(Event::Disconnect(None)),
            other => {
                return Err(Failure::Other(format!(
                    "the broker sent a client's packet: {other:?}"
                )));
            }
        },
        Incoming::V5(packet) => match packet {
            v5p::Packet::PubAck(ack) => {
                conn.acknowledged(ack.pkid, "publish")?;
                events.push_back(Event::PubAck {
                    pkid: ack.pkid,
                    refused: puback_refusal(&ack),
                });
            }
            v5p::Packet::Publish(publish) => {
                use rumqttc::v5::mqttbytes::QoS;
                let ack = match publish.qos {
                    QoS::AtMostOnce => None,
                    QoS::AtLeastOnce => {
                        Some(v5p::Packet::PubAck(v5p::PubAck::new(publish.pkid, None)))
                    }
                    QoS::ExactlyOnce => {
                        Some(v5p::Packet::PubRec(v5p::PubRec::new(publish.pkid, None)))
                    }
                };
                if let Some(ack) = ack.filter(|_| !conn.closing) {
                    let _ = ack.write(&mut conn.output, None);
                }
                events.push_back(Event::Publish {
                    topic: String::from_utf8_lossy(&publish.topic).into_owned(),
                    payload: publish.payload,
                });
            }
            v5p::Packet::PubRel(rel) if !conn.closing => {
                let _ = v5p::Packet::PubComp(v5p::PubComp::new(rel.pkid, None))
                    .write(&mut conn.output, None);
            }
            v5p::Packet::SubAck(ack) => {
                conn.acknowledged(ack.pkid, "subscription")?;
                if let Some(code) = ack
                    .return_codes
                    .iter()
                    .find(|code| !matches!(code, v5p::SubscribeReasonCode::Success(_)))
                {
                    tracing::warn!(reason = ?code, "the broker refused a subscription of the gateway's");
                }
                events.push_back(Event::Other);
            }
            v5p::Packet::PubRel(_) => {}
            v5p::Packet::PingResp(_) => conn.ping_since = None,
            v5p::Packet::Disconnect(disconnect) => {
                events.push_back(Event::Disconnect(Some(disconnect_reason(&disconnect))));
            }
            other => {
                return Err(Failure::Other(format!(
                    "the broker sent a client's packet: {other:?}"
                )));
            }
        },
    }
    Ok(())
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

    /// A broker of the test's own on loopback, one connection, in rumqttc's MQTT 5 codec.
    struct Broker {
        stream: tokio::net::TcpStream,
        input: BytesMut,
    }

    impl Broker {
        async fn accept(listener: &tokio::net::TcpListener) -> Self {
            let (stream, _) = listener.accept().await.unwrap();
            Self {
                stream,
                input: BytesMut::new(),
            }
        }

        async fn read(&mut self) -> v5p::Packet {
            loop {
                // The client's own reader: it also takes the two-byte DISCONNECT that
                // rumqttc writes and its reader refuses.
                match decode(Protocol::V5, &mut self.input, usize::MAX) {
                    Ok(Some(Incoming::V5(packet))) => return packet,
                    Ok(Some(Incoming::V311(_))) => unreachable!("read as MQTT 5"),
                    Ok(None) => {}
                    Err(err) => panic!("the client sent {err}"),
                }
                let n = self.stream.read_buf(&mut self.input).await.unwrap();
                assert!(n > 0, "the client closed the connection");
            }
        }

        async fn write(&mut self, packet: v5p::Packet) {
            let mut out = BytesMut::new();
            packet.write(&mut out, None).unwrap();
            self.stream.write_all(&out).await.unwrap();
        }

        async fn connack(&mut self, properties: Option<v5p::ConnAckProperties>) {
            assert!(matches!(self.read().await, v5p::Packet::Connect(..)));
            self.write(v5p::Packet::ConnAck(v5p::ConnAck {
                session_present: false,
                code: v5p::ConnectReturnCode::Success,
                properties,
            }))
            .await;
        }
    }

    fn options(port: u16, keepalive: Duration) -> Options {
        Options {
            client_id: "gw-test".into(),
            host: "127.0.0.1".into(),
            port,
            keepalive,
            inflight: 100,
            max_packet: 1 << 16,
            credentials: None,
            will: None,
            tls: None,
            session_expiry: 60,
        }
    }

    async fn listener() -> (tokio::net::TcpListener, u16) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        (listener, port)
    }

    fn publish(client: &Client, n: u8) -> impl Future<Output = Result<(), String>> {
        client.publish(
            format!("t/{n}"),
            Bytes::from(vec![n]),
            false,
            Extras::default(),
        )
    }

    /// Publishes queued together go out together, each with its own packet id, but no
    /// more at once than the broker's receive maximum; each PUBACK lets the next one go.
    #[tokio::test]
    async fn the_broker_receive_maximum_bounds_what_is_in_flight() {
        let (listener, port) = listener().await;
        let (client, mut events) = client(Protocol::V5, options(port, Duration::from_secs(30)));
        let broker = tokio::spawn(async move {
            let mut broker = Broker::accept(&listener).await;
            broker
                .connack(Some(v5p::ConnAckProperties {
                    session_expiry_interval: None,
                    receive_max: Some(2),
                    max_qos: None,
                    retain_available: None,
                    max_packet_size: None,
                    assigned_client_identifier: None,
                    topic_alias_max: None,
                    reason_string: None,
                    user_properties: Vec::new(),
                    wildcard_subscription_available: None,
                    subscription_identifiers_available: None,
                    shared_subscription_available: None,
                    server_keep_alive: None,
                    response_information: None,
                    server_reference: None,
                    authentication_method: None,
                    authentication_data: None,
                }))
                .await;
            let mut seen = Vec::new();
            while seen.len() < 5 {
                let v5p::Packet::Publish(publish) = broker.read().await else {
                    panic!("not a publish")
                };
                seen.push((publish.pkid, publish.payload[0]));
                // Acknowledged only once two are in: a third cannot have come yet.
                if seen.len() >= 2 {
                    let pkid = seen[seen.len() - 2].0;
                    broker
                        .write(v5p::Packet::PubAck(v5p::PubAck::new(pkid, None)))
                        .await;
                }
            }
            broker
                .write(v5p::Packet::PubAck(v5p::PubAck::new(seen[4].0, None)))
                .await;
            seen
        });
        assert!(matches!(events.poll().await, Ok(Event::ConnAck { .. })));
        for n in 0..5 {
            publish(&client, n).await.unwrap();
        }
        // The first turn writes two and keeps three queued.
        assert!(matches!(events.poll().await, Ok(Event::Sent(_))));
        assert!(matches!(events.queued(), Some(Event::Sent(_))));
        assert!(events.queued().is_none());
        assert_eq!(lock(&events.queue.requests).len(), 3);
        let (mut sent, mut acked) = (2, 0);
        while acked < 5 {
            match events.poll().await.unwrap() {
                Event::Sent(_) => sent += 1,
                Event::PubAck { refused: None, .. } => acked += 1,
                other => panic!("{other:?}"),
            }
            assert!(sent - acked <= 2, "{sent} sent, {acked} acknowledged");
        }
        let seen = broker.await.unwrap();
        let order: Vec<u8> = seen.iter().map(|(_, n)| *n).collect();
        assert_eq!(order, [0, 1, 2, 3, 4]);
        let ids: std::collections::HashSet<u16> = seen.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids.len(), 5, "{seen:?}");
    }

    /// A QoS 1 publish for us is acknowledged with its packet id, also one that arrives
    /// with the CONNACK (a kept session's queue); a PUBACK for a packet id never sent ends
    /// the connection, as does what is not MQTT.
    #[tokio::test]
    async fn publishes_for_us_are_acknowledged_and_a_broker_that_breaks_the_protocol_is_left() {
        for bad in ["unsolicited", "garbage"] {
            let (listener, port) = listener().await;
            let (_client, mut events) =
                client(Protocol::V5, options(port, Duration::from_secs(30)));
            let broker = tokio::spawn(async move {
                let mut broker = Broker::accept(&listener).await;
                assert!(matches!(broker.read().await, v5p::Packet::Connect(..)));
                // The CONNACK and a publish the session kept for us, in one write.
                let mut incoming =
                    v5p::Publish::new("cmd/1", rumqttc::v5::mqttbytes::QoS::AtLeastOnce, "x", None);
                incoming.pkid = 7;
                let mut out = BytesMut::new();
                for packet in [
                    v5p::Packet::ConnAck(v5p::ConnAck {
                        session_present: true,
                        code: v5p::ConnectReturnCode::Success,
                        properties: None,
                    }),
                    v5p::Packet::Publish(incoming),
                ] {
                    packet.write(&mut out, None).unwrap();
                }
                broker.stream.write_all(&out).await.unwrap();
                let ack = match broker.read().await {
                    v5p::Packet::PubAck(ack) => ack,
                    other => panic!("not a PUBACK: {other:?}"),
                };
                assert_eq!(ack.pkid, 7);
                match bad {
                    "unsolicited" => {
                        broker
                            .write(v5p::Packet::PubAck(v5p::PubAck::new(9, None)))
                            .await;
                    }
                    _ => broker.stream.write_all(&[0xf0, 0x01, 0x00]).await.unwrap(),
                }
                broker
            });
            assert!(matches!(events.poll().await, Ok(Event::ConnAck { .. })));
            match events.poll().await {
                Ok(Event::Publish { topic, payload }) => {
                    assert_eq!((topic.as_str(), &payload[..]), ("cmd/1", &b"x"[..]));
                }
                other => panic!("{other:?}"),
            }
            let failure = events.poll().await.unwrap_err().text();
            match bad {
                "unsolicited" => assert!(failure.contains("acknowledged publish 9"), "{failure}"),
                _ => assert!(failure.contains("not MQTT 5"), "{failure}"),
            }
            // Ended for good: a new client is made for the next attempt.
            assert!(events.poll().await.is_err());
            drop(broker.await.unwrap());
        }
    }

    /// An idle connection sends PINGREQ after the keep-alive; a broker that does not
    /// answer within another is left.
    #[tokio::test]
    async fn an_idle_connection_pings_and_leaves_a_broker_that_does_not_answer() {
        let (listener, port) = listener().await;
        let (_client, mut events) = client(Protocol::V5, options(port, Duration::from_secs(1)));
        let broker = tokio::spawn(async move {
            let mut broker = Broker::accept(&listener).await;
            broker.connack(None).await;
            assert!(matches!(broker.read().await, v5p::Packet::PingReq(_)));
            broker.write(v5p::Packet::PingResp(v5p::PingResp)).await;
            assert!(matches!(broker.read().await, v5p::Packet::PingReq(_)));
            // No answer this time.
            broker
        });
        let start = Instant::now();
        assert!(matches!(events.poll().await, Ok(Event::ConnAck { .. })));
        let failure = events.poll().await.unwrap_err().text();
        assert!(failure.contains("did not answer a ping"), "{failure}");
        assert!(
            start.elapsed() >= Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );
        drop(broker.await.unwrap());
    }

    /// A broker that takes our publishes but never answers (a half-open link: the writes
    /// land in the kernel's buffer) is pinged although we keep writing, and left when the
    /// ping goes unanswered.
    #[tokio::test]
    async fn a_broker_that_stops_answering_is_pinged_while_we_write_and_left() {
        let (listener, port) = listener().await;
        let (client, mut events) = client(Protocol::V5, options(port, Duration::from_secs(1)));
        let broker = tokio::spawn(async move {
            let mut broker = Broker::accept(&listener).await;
            broker.connack(None).await;
            // Reads all, answers nothing, until a PINGREQ comes.
            let mut publishes = 0;
            loop {
                match broker.read().await {
                    v5p::Packet::Publish(_) => publishes += 1,
                    v5p::Packet::PingReq(_) => return (broker, publishes),
                    other => panic!("{other:?}"),
                }
            }
        });
        assert!(matches!(events.poll().await, Ok(Event::ConnAck { .. })));
        let start = Instant::now();
        // A publish every 200 ms: never a keep-alive without a write.
        let writer = tokio::spawn(async move {
            for n in 0..50 {
                if publish(&client, n).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        let failure = loop {
            match events.poll().await {
                Ok(Event::Sent(_)) => {}
                Ok(other) => panic!("{other:?}"),
                Err(failure) => break failure.text(),
            }
        };
        assert!(failure.contains("did not answer a ping"), "{failure}");
        let (_broker, publishes) = broker.await.unwrap();
        assert!(publishes >= 3, "{publishes} publishes before the ping");
        assert!(
            start.elapsed() < Duration::from_secs(4),
            "{:?}",
            start.elapsed()
        );
        writer.abort();
    }

    /// DISCONNECT goes after what was queued before it (the offline status the session
    /// sends first) but needs no room in flight; nothing follows it, and the client closes
    /// its side. What the broker says as it goes (here MQTT 5's two-byte DISCONNECT, which
    /// leaves out its reason) comes before the end.
    #[tokio::test]
    async fn disconnect_goes_at_once_and_ends_the_connection() {
        let (listener, port) = listener().await;
        let mut small = options(port, Duration::from_secs(30));
        small.inflight = 1;
        let (client, mut events) = client(Protocol::V5, small);
        let broker = tokio::spawn(async move {
            let mut broker = Broker::accept(&listener).await;
            broker.connack(None).await;
            let v5p::Packet::Publish(first) = broker.read().await else {
                panic!("not a publish")
            };
            broker
                .write(v5p::Packet::PubAck(v5p::PubAck::new(first.pkid, None)))
                .await;
            assert!(matches!(broker.read().await, v5p::Packet::Publish(_)));
            // The second is not acknowledged: the DISCONNECT comes all the same.
            let v5p::Packet::Disconnect(disconnect) = broker.read().await else {
                panic!("not a DISCONNECT")
            };
            assert_eq!(
                disconnect.reason_code,
                v5p::DisconnectReasonCode::NormalDisconnection
            );
            // The client closed its side: nothing more comes.
            let mut rest = Vec::new();
            broker.stream.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty(), "{rest:?}");
            broker.stream.write_all(&[0xe0, 0x00]).await.unwrap();
        });
        assert!(matches!(events.poll().await, Ok(Event::ConnAck { .. })));
        publish(&client, 1).await.unwrap();
        publish(&client, 2).await.unwrap();
        client.disconnect().await;
        let mut seen = Vec::new();
        let why = loop {
            match events.poll().await {
                Ok(Event::Disconnect(why)) => break why,
                Ok(event) => seen.push(format!("{event:?}")),
                Err(failure) => panic!("{seen:?} then {}", failure.text()),
            }
        };
        assert_eq!(seen.len(), 3, "{seen:?}");
        match Ok::<_, ()>(Event::Disconnect(why)) {
            Ok(Event::Disconnect(Some(why))) => {
                assert!(why.contains("NormalDisconnection"), "{why}");
            }
            other => panic!("{other:?}"),
        }
        assert!(events.poll().await.is_err());
        broker.await.unwrap();
    }

    /// The refusals a CONNACK can carry, sorted as the session needs them.
    #[tokio::test]
    async fn connack_refusals_are_sorted_for_the_session() {
        for (code, auth) in [
            (v5p::ConnectReturnCode::NotAuthorized, true),
            (v5p::ConnectReturnCode::ServerBusy, false),
        ] {
            let (listener, port) = listener().await;
            let (_client, mut events) =
                client(Protocol::V5, options(port, Duration::from_secs(30)));
            tokio::spawn(async move {
                let mut broker = Broker::accept(&listener).await;
                assert!(matches!(broker.read().await, v5p::Packet::Connect(..)));
                broker
                    .write(v5p::Packet::ConnAck(v5p::ConnAck {
                        session_present: false,
                        code,
                        properties: None,
                    }))
                    .await;
                broker
            });
            match events.poll().await {
                Err(Failure::Auth(_)) if auth => {}
                Err(Failure::Other(text)) if !auth => {
                    assert!(text.contains("overloaded"), "{text}");
                }
                other => panic!("{code:?}: {other:?}"),
            }
        }
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
