//! The MQTT 3.1.1 endpoint that DPS and each hub listen with: TLS, CONNECT checked by the
//! service, per-connection sessions (subscriptions and unacknowledged QoS 1 messages kept
//! across reconnects unless the client asks for a clean session), and delivery to one
//! client at a time.
//!
//! IoT Hub and DPS are not brokers: a device's `$iothub/...` and `$dps/...` topics are a
//! request/response surface private to its connection (every device subscribes to
//! `$iothub/twin/res/#`, and only its own answers may reach it). A general broker would
//! send each answer to every subscriber, so this endpoint routes what the service
//! publishes to one client. The packets are read and written with rumqttc's MQTT codec.
//!
//! Limits per connection: TLS handshake and CONNECT within 10 s, a packet at most
//! [`MAX_PACKET`] bytes (IoT Hub's 256 KiB message and its topic), silence at most 1.5
//! times the keep-alive (which IoT Hub caps at 1177 s), 32 subscriptions, 256 packets
//! queued to a slow reader and 30 s for one to go out before it is disconnected, 64
//! unacknowledged QoS 1 messages;
//! at most [`MAX_CONNECTIONS`] connections per listener. A token that expires while
//! connected ends the connection, as IoT Hub does.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::{self, QoS, valid_filter};
use rumqttc::{
    ConnAck, Connect, ConnectReturnCode, Packet, PubAck, Publish, SubAck, Subscribe,
    SubscribeReasonCode, UnsubAck,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;

/// The largest packet read or written: IoT Hub's 256 KiB message plus its topic.
pub(crate) const MAX_PACKET: usize = 256 * 1024 + 64 * 1024;
/// Connections served at once per listener.
pub(crate) const MAX_CONNECTIONS: usize = 1024;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one packet may take to go out before the connection ends.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// IoT Hub's largest keep-alive; also what a client asking for none gets.
const MAX_KEEP_ALIVE_SECS: u64 = 1177;
const MAX_SUBSCRIPTIONS: usize = 32;
const OUTGOING_QUEUE: usize = 256;
const MAX_INFLIGHT: usize = 64;
/// Durable messages (cloud-to-device) kept for a client that is away: IoT Hub's queue
/// depth per device.
pub(crate) const MAX_QUEUED: usize = 50;

/// Which listener a connection came to (0 is DPS, then the hubs).
pub(crate) type ListenerId = usize;

/// What the service behind the endpoint decides.
pub(crate) trait Service: Send + Sync + 'static {
    /// Accepts a CONNECT (returning when its credentials expire, unix seconds) or refuses it.
    fn connect(
        &self,
        listener: ListenerId,
        peer: SocketAddr,
        connect: &Connect,
        certificate_cn: Option<&str>,
    ) -> Result<Option<u64>, ConnectReturnCode>;
    /// Whether the client may subscribe to `filter`.
    fn may_subscribe(&self, listener: ListenerId, client: &str, filter: &str) -> bool;
    /// Handles a client's PUBLISH (already acknowledged when QoS 1); an error ends the
    /// connection, as IoT Hub does for a topic it does not know.
    fn publish(&self, listener: ListenerId, client: &str, publish: Publish) -> Result<(), String>;
    /// The client now holds these subscriptions (granted ones only).
    fn subscribed(&self, listener: ListenerId, client: &str, filters: &[String]);
    /// The connection ended (`why`).
    fn disconnected(&self, listener: ListenerId, client: &str, why: &str);
}

/// What became of a message handed to [`Broker::deliver`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// Sent to the connected client.
    Sent,
    /// Kept for when the client connects and subscribes.
    Queued,
    /// Not sent: the client is away or has no matching subscription.
    Dropped,
}

struct Conn {
    id: u64,
    tx: mpsc::Sender<Packet>,
    kick: Arc<Notify>,
}

#[derive(Default)]
struct Session {
    subscriptions: Vec<(String, QoS)>,
    conn: Option<Conn>,
    /// Sent, not yet acknowledged; `true` for durable (cloud-to-device) messages.
    inflight: BTreeMap<u16, (Publish, bool)>,
    next_pkid: u16,
    /// Durable messages waiting for a connection and subscription.
    queued: VecDeque<Publish>,
    /// The live (or last) connection asked for a clean session.
    clean: bool,
}

impl Session {
    fn granted(&self, topic: &str) -> Option<QoS> {
        self.subscriptions
            .iter()
            .filter(|(filter, _)| matches(topic, filter))
            .map(|(_, qos)| *qos)
            .max_by_key(|qos| *qos as u8)
    }

    fn pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
            if !self.inflight.contains_key(&self.next_pkid) {
                return self.next_pkid;
            }
        }
    }

    /// Sends `publish` on the live connection if it has a subscription for it.
    fn send(&mut self, mut publish: Publish, durable: bool) -> Result<Delivery, Publish> {
        let Some(granted) = self.granted(&publish.topic) else {
            return Err(publish);
        };
        if self.conn.is_none() {
            return Err(publish);
        }
        publish.qos = min_qos(publish.qos, granted);
        if publish.qos == QoS::AtLeastOnce {
            if self.inflight.len() >= MAX_INFLIGHT {
                return Err(publish);
            }
            publish.pkid = self.pkid();
            self.inflight
                .insert(publish.pkid, (publish.clone(), durable));
        } else {
            publish.pkid = 0;
        }
        let conn = self.conn.as_ref().expect("checked above");
        if conn.tx.try_send(Packet::Publish(publish)).is_err() {
            // A reader this far behind is gone or stuck: end its connection.
            conn.kick.notify_one();
        }
        Ok(Delivery::Sent)
    }

    /// Sends what was queued and can go now.
    fn flush(&mut self) {
        let waiting = std::mem::take(&mut self.queued);
        for publish in waiting {
            if let Err(publish) = self.send(publish, true) {
                self.queued.push_back(publish);
            }
        }
    }
}

fn min_qos(a: QoS, b: QoS) -> QoS {
    if (a as u8) <= (b as u8) { a } else { b }
}

/// The subject CN of a DER certificate.
fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
}

/// Whether `topic` matches `filter` (MQTT 3.1.1 §4.7): `+` is one level, `#` the rest, and
/// a topic starting with `$` is matched only by a filter naming that first level.
pub(crate) fn matches(topic: &str, filter: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut levels = topic.split('/');
    for part in filter.split('/') {
        if part == "#" {
            return true;
        }
        match levels.next() {
            Some(level) if part == "+" || part == level => {}
            _ => return false,
        }
    }
    levels.next().is_none()
}

/// The sessions of every listener.
#[derive(Default)]
pub(crate) struct Broker {
    sessions: Mutex<HashMap<(ListenerId, String), Session>>,
    next_conn: std::sync::atomic::AtomicU64,
}

impl Broker {
    /// Hands `payload` on `topic` to `client` of `listener`: sent if it is connected and
    /// subscribed, else queued if `durable`, else dropped.
    pub(crate) fn deliver(
        &self,
        listener: ListenerId,
        client: &str,
        topic: String,
        payload: Bytes,
        durable: bool,
    ) -> Delivery {
        let mut sessions = self.sessions.lock().expect("sessions lock");
        let publish = Publish::from_bytes(topic, QoS::AtLeastOnce, payload);
        let session = match sessions.get_mut(&(listener, client.to_owned())) {
            Some(session) => session,
            None if durable => sessions.entry((listener, client.to_owned())).or_default(),
            None => return Delivery::Dropped,
        };
        match session.send(publish, durable) {
            Ok(delivery) => delivery,
            Err(publish) if durable && session.queued.len() < MAX_QUEUED => {
                session.queued.push_back(publish);
                Delivery::Queued
            }
            Err(_) => Delivery::Dropped,
        }
    }

    /// Whether `client` is connected with a subscription matching `topic`.
    pub(crate) fn listening(&self, listener: ListenerId, client: &str, topic: &str) -> bool {
        let sessions = self.sessions.lock().expect("sessions lock");
        sessions
            .get(&(listener, client.to_owned()))
            .is_some_and(|s| s.conn.is_some() && s.granted(topic).is_some())
    }

    /// Ends `client`'s connection, if it has one.
    pub(crate) fn kick(&self, listener: ListenerId, client: &str) -> bool {
        let sessions = self.sessions.lock().expect("sessions lock");
        match sessions
            .get(&(listener, client.to_owned()))
            .and_then(|s| s.conn.as_ref())
        {
            Some(conn) => {
                conn.kick.notify_one();
                true
            }
            None => false,
        }
    }

    /// Forgets `client`'s session (a device deleted from its hub).
    pub(crate) fn forget(&self, listener: ListenerId, client: &str) {
        let mut sessions = self.sessions.lock().expect("sessions lock");
        if let Some(session) = sessions.remove(&(listener, client.to_owned()))
            && let Some(conn) = session.conn
        {
            conn.kick.notify_one();
        }
    }

    /// Accepts connections on `tcp` for `listener` until the process ends.
    pub(crate) async fn serve(
        self: Arc<Self>,
        service: Arc<dyn Service>,
        listener: ListenerId,
        tcp: TcpListener,
        tls: TlsAcceptor,
    ) {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let (socket, peer) = match tcp.accept().await {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: do not spin.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                drop(socket);
                continue;
            };
            let (broker, service, tls) = (self.clone(), service.clone(), tls.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let _ = socket.set_nodelay(true);
                let Ok(Ok(stream)) =
                    tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(socket)).await
                else {
                    return;
                };
                // A client certificate, verified against --client-ca by the handshake.
                let cn = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .and_then(|cert| common_name(cert.as_ref()));
                broker.connection(service, listener, peer, stream, cn).await;
            });
        }
    }

    /// Binds a new connection to `client`'s session, ending any connection it had, and
    /// queues its CONNACK, then what it missed (unacknowledged messages again, then what
    /// was queued), all under the lock so nothing is sent before the CONNACK; returns the
    /// connection id.
    fn attach(
        &self,
        listener: ListenerId,
        client: &str,
        clean: bool,
        tx: mpsc::Sender<Packet>,
        kick: Arc<Notify>,
    ) -> u64 {
        let id = self
            .next_conn
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut sessions = self.sessions.lock().expect("sessions lock");
        let session = sessions.entry((listener, client.to_owned())).or_default();
        if let Some(old) = session.conn.take() {
            old.kick.notify_one();
        }
        let present = !clean && !session.clean && !session.subscriptions.is_empty();
        if clean || session.clean {
            // Subscriptions and QoS 1 state end; durable messages wait (IoT Hub keeps a
            // device's cloud-to-device queue whatever its sessions do).
            session.subscriptions.clear();
            let inflight = std::mem::take(&mut session.inflight);
            for (_, (publish, durable)) in inflight.into_iter().rev() {
                if durable {
                    session.queued.push_front(publish);
                }
            }
        }
        session.clean = clean;
        let _ = tx.try_send(Packet::ConnAck(ConnAck::new(
            ConnectReturnCode::Success,
            present,
        )));
        for (publish, _) in session.inflight.values() {
            let mut again = publish.clone();
            again.dup = true;
            if tx.try_send(Packet::Publish(again)).is_err() {
                kick.notify_one();
                break;
            }
        }
        session.conn = Some(Conn { id, tx, kick });
        session.flush();
        id
    }

    /// The session of `client` while connection `id` is its live one.
    fn live<'a>(
        sessions: &'a mut HashMap<(ListenerId, String), Session>,
        listener: ListenerId,
        client: &str,
        id: u64,
    ) -> Option<&'a mut Session> {
        sessions
            .get_mut(&(listener, client.to_owned()))
            .filter(|session| session.conn.as_ref().is_some_and(|conn| conn.id == id))
    }

    fn detach(&self, listener: ListenerId, client: &str, id: u64) {
        let mut sessions = self.sessions.lock().expect("sessions lock");
        if let Some(session) = Self::live(&mut sessions, listener, client, id) {
            session.conn = None;
            if session.clean {
                session.subscriptions.clear();
                let inflight = std::mem::take(&mut session.inflight);
                for (_, (publish, durable)) in inflight.into_iter().rev() {
                    if durable {
                        session.queued.push_front(publish);
                    }
                }
            }
        }
    }

    fn acked(&self, listener: ListenerId, client: &str, id: u64, pkid: u16) {
        let mut sessions = self.sessions.lock().expect("sessions lock");
        if let Some(session) = Self::live(&mut sessions, listener, client, id) {
            session.inflight.remove(&pkid);
            session.flush();
        }
    }

    /// Records the granted filters and sends what was waiting for them.
    fn subscribe(
        &self,
        listener: ListenerId,
        client: &str,
        id: u64,
        granted: &[(String, QoS)],
    ) -> bool {
        let mut sessions = self.sessions.lock().expect("sessions lock");
        let Some(session) = Self::live(&mut sessions, listener, client, id) else {
            return false;
        };
        for (filter, qos) in granted {
            session.subscriptions.retain(|(f, _)| f != filter);
            if session.subscriptions.len() == MAX_SUBSCRIPTIONS {
                return false;
            }
            session.subscriptions.push((filter.clone(), *qos));
        }
        true
    }

    fn flush(&self, listener: ListenerId, client: &str, id: u64) {
        let mut sessions = self.sessions.lock().expect("sessions lock");
        if let Some(session) = Self::live(&mut sessions, listener, client, id) {
            session.flush();
        }
    }

    fn unsubscribe(&self, listener: ListenerId, client: &str, id: u64, filters: &[String]) {
        let mut sessions = self.sessions.lock().expect("sessions lock");
        if let Some(session) = Self::live(&mut sessions, listener, client, id) {
            session.subscriptions.retain(|(f, _)| !filters.contains(f));
        }
    }

    async fn connection<S>(
        self: Arc<Self>,
        service: Arc<dyn Service>,
        listener: ListenerId,
        peer: SocketAddr,
        stream: S,
        certificate_cn: Option<String>,
    ) where
        S: AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (mut rd, mut wr) = tokio::io::split(stream);
        let mut buf = BytesMut::with_capacity(4096);
        let connect =
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_packet(&mut rd, &mut buf)).await {
                Ok(Ok(Packet::Connect(connect))) => connect,
                _ => return,
            };
        let expires = match service.connect(listener, peer, &connect, certificate_cn.as_deref()) {
            Ok(expires) => expires,
            Err(code) => {
                let mut out = BytesMut::new();
                if Packet::ConnAck(ConnAck::new(code, false))
                    .write(&mut out, MAX_PACKET)
                    .is_ok()
                {
                    let _ = wr.write_all(&out).await;
                }
                let _ = wr.shutdown().await;
                return;
            }
        };
        let client = connect.client_id.clone();
        let (tx, mut rx) = mpsc::channel::<Packet>(OUTGOING_QUEUE);
        let kick = Arc::new(Notify::new());
        let id = self.attach(
            listener,
            &client,
            connect.clean_session,
            tx.clone(),
            kick.clone(),
        );
        let writer_kick = kick.clone();
        let mut writer = tokio::spawn(async move {
            let mut out = BytesMut::with_capacity(4096);
            while let Some(packet) = rx.recv().await {
                out.clear();
                if packet.write(&mut out, MAX_PACKET).is_err() {
                    break;
                }
                // A reader that takes nothing for this long is stuck or hostile.
                match tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(&out)).await {
                    Ok(Ok(())) => {}
                    _ => break,
                }
            }
            writer_kick.notify_one();
            let _ = tokio::time::timeout(WRITE_TIMEOUT, wr.shutdown()).await;
        });
        let keep_alive = match u64::from(connect.keep_alive) {
            0 => MAX_KEEP_ALIVE_SECS,
            secs => secs.min(MAX_KEEP_ALIVE_SECS),
        };
        let silence = Duration::from_millis(keep_alive * 1500);
        let expiry = expires.map(|unix| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            // A far-off expiry (a client can sign any) is capped at a year.
            let left = Duration::from_secs(unix.saturating_sub(now).min(365 * 24 * 3600));
            tokio::time::Instant::now() + left
        });
        let why = loop {
            let token_expired = async {
                match expiry {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let packet = tokio::select! {
                () = kick.notified() => break Cow::Borrowed("taken over or ended by the service"),
                () = token_expired => break Cow::Borrowed("its SAS token expired"),
                read = tokio::time::timeout(silence, read_packet(&mut rd, &mut buf)) => match read {
                    Err(_) => break Cow::Borrowed("silent for longer than 1.5 x keep-alive"),
                    Ok(Err(ReadError::Closed)) => break Cow::Borrowed("closed by the client"),
                    Ok(Err(ReadError::Io(err))) => break Cow::Owned(format!("connection error: {err}")),
                    Ok(Err(ReadError::Malformed(err))) => break Cow::Owned(format!("malformed packet: {err}")),
                    Ok(Ok(packet)) => packet,
                }
            };
            match packet {
                Packet::Publish(publish) => {
                    if publish.qos == QoS::ExactlyOnce {
                        break Cow::Borrowed("QoS 2 is not supported");
                    }
                    if publish.qos == QoS::AtLeastOnce
                        && tx
                            .try_send(Packet::PubAck(PubAck::new(publish.pkid)))
                            .is_err()
                    {
                        break Cow::Borrowed("too far behind in reading");
                    }
                    if let Err(why) = service.publish(listener, &client, publish) {
                        tracing::info!(client, "{why}");
                        break Cow::Borrowed("published to a topic it may not");
                    }
                }
                Packet::PubAck(ack) => self.acked(listener, &client, id, ack.pkid),
                Packet::Subscribe(Subscribe { pkid, filters }) => {
                    let mut granted = Vec::new();
                    let codes = filters
                        .iter()
                        .map(|filter| {
                            if valid_filter(&filter.path)
                                && service.may_subscribe(listener, &client, &filter.path)
                            {
                                let qos = min_qos(filter.qos, QoS::AtLeastOnce);
                                granted.push((filter.path.clone(), qos));
                                SubscribeReasonCode::Success(qos)
                            } else {
                                SubscribeReasonCode::Failure
                            }
                        })
                        .collect();
                    if !self.subscribe(listener, &client, id, &granted) {
                        break Cow::Borrowed("too many subscriptions");
                    }
                    let filters: Vec<String> = granted.into_iter().map(|(f, _)| f).collect();
                    service.subscribed(listener, &client, &filters);
                    if tx
                        .try_send(Packet::SubAck(SubAck::new(pkid, codes)))
                        .is_err()
                    {
                        break Cow::Borrowed("too far behind in reading");
                    }
                    self.flush(listener, &client, id);
                }
                Packet::Unsubscribe(unsubscribe) => {
                    self.unsubscribe(listener, &client, id, &unsubscribe.topics);
                    if tx
                        .try_send(Packet::UnsubAck(UnsubAck::new(unsubscribe.pkid)))
                        .is_err()
                    {
                        break Cow::Borrowed("too far behind in reading");
                    }
                }
                Packet::PingReq => {
                    if tx.try_send(Packet::PingResp).is_err() {
                        break Cow::Borrowed("too far behind in reading");
                    }
                }
                Packet::Disconnect => break Cow::Borrowed("disconnected"),
                _ => break Cow::Borrowed("sent a packet a client may not"),
            }
        };
        self.detach(listener, &client, id);
        drop(tx);
        // What is queued goes out if the reader takes it; a stuck one is cut off.
        if tokio::time::timeout(WRITE_TIMEOUT, &mut writer)
            .await
            .is_err()
        {
            writer.abort();
        }
        service.disconnected(listener, &client, &why);
    }
}

enum ReadError {
    Closed,
    Io(std::io::Error),
    Malformed(mqttbytes::Error),
}

/// Reads one packet, at most [`MAX_PACKET`] bytes (cancel-safe: what was read stays in
/// `buf`).
async fn read_packet<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
) -> Result<Packet, ReadError> {
    loop {
        match Packet::read(buf, MAX_PACKET) {
            Ok(packet) => return Ok(packet),
            Err(mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(err) => return Err(ReadError::Malformed(err)),
        }
        match rd.read_buf(buf).await {
            Ok(0) => return Err(ReadError::Closed),
            Ok(_) => {}
            Err(err) => return Err(ReadError::Io(err)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn filters_match_as_mqtt_says_and_dollar_topics_only_by_name() {
        assert!(matches(
            "$iothub/twin/res/200/?$rid=1",
            "$iothub/twin/res/#"
        ));
        assert!(matches(
            "devices/d/messages/devicebound/a=1",
            "devices/d/messages/devicebound/#"
        ));
        assert!(matches("a/b", "a/+"));
        assert!(matches("a", "a/#"));
        assert!(!matches("a/b/c", "a/+"));
        assert!(!matches("$iothub/twin/res/200/", "#"));
        assert!(!matches("$iothub/twin/res/200/", "+/twin/#"));
        assert!(!matches(
            "devices/e/messages/devicebound/",
            "devices/d/messages/devicebound/#"
        ));
    }
}
