//! Devices behind the gateway with an IoT Hub identity of their own (the `azure-iot`
//! profile's `[[uplink.azure.devices]]`): IoT Hub's MQTT has no multiplexing, so each
//! such device gets a connection of its own, as itself, beside the gateway's.
//!
//! * **Its lane of the outbox.** The device's telemetry, lobby events and reported state
//!   are queued in its own lane ([`crate::Outbox::fetch_lane`]) and deleted only after its
//!   hub acknowledged them, so a device whose identity is refused or unreachable holds
//!   back its own messages (durably, until their time to live) and nobody else's.
//! * **Its twin.** Lobby events and reported state go to the device's own twin
//!   (`outpost.lobby`, `outpost.reported`), telemetry as its device-to-cloud messages;
//!   its desired properties are the device's desired state.
//! * **Where.** A device with a key of its own is registered at the gateway's hub; with the
//!   gateway's DPS enrollment group and no key, it registers through DPS with its hub
//!   device id as registration id and the key derived from the group's, and DPS assigns
//!   its hub.
//! * **Retries.** The gateway's backoff; a refused identity is said in the status and tried
//!   again after the longest backoff (a device may be enabled again at the hub).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use crate::outbox::Queued;
use outpost_azure::provision::Attestation;
use outpost_azure::sas;
use outpost_store::backoff::Backoff;
use serde::Serialize;
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::azure;
use crate::contract;
use crate::mqtt::{self, Client, Event, Events, Failure};
use crate::now_millis;
use crate::session::{self, Shared};
use crate::settings::{
    AzureIdentity, AzureSettings, BrokerAddr, Endpoint, OwnIdentity, OwnKey, TlsSettings,
    rustls_config,
};

/// Messages of one device in flight at most.
const WINDOW: usize = 64;

/// One device identity's state, in the uplink status.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct OwnIdentityStatus {
    /// Its device id at the hub.
    pub hub_device_id: String,
    /// `registering`, `waiting-for-hub`, `connecting`, `connected` or `refused`.
    pub state: String,
    /// The hub it talks to (or tries to).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hub: Option<String>,
    /// Unix milliseconds since connected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connected_since: Option<i64>,
    /// Successful connections since start.
    pub connections: u64,
    /// The last error, in words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The `$version` of its twin's desired properties last taken as the device's desired
    /// state.
    pub desired_version: u64,
}

fn note(shared: &Shared, own: &OwnIdentity, change: impl FnOnce(&mut OwnIdentityStatus)) {
    session::set_status(shared, |s| {
        let entry = s
            .own_identities
            .entry(own.device.clone())
            .or_insert_with(|| OwnIdentityStatus {
                hub_device_id: own.hub_device_id.clone(),
                ..OwnIdentityStatus::default()
            });
        change(entry);
    });
}

/// How one connection ended.
enum Ended {
    Shutdown,
    /// Refused: wait long, then try again (registering again through DPS).
    Refused(String),
    /// Lost or unreachable: back off and try again.
    Lost(String),
    /// The hub could not be reached or did not accept the connection.
    Unreachable(String),
    /// The token is about to expire.
    Renew,
    /// The gateway moved to another hub.
    Moved,
}

/// What one connection of a device works with.
struct Link<'a> {
    shared: &'a Arc<Shared>,
    own: &'a OwnIdentity,
    /// Its device id at the hub.
    device_id: &'a str,
}

/// Runs the connection of one device with its own identity until `shutdown`.
pub(crate) async fn run(shared: Arc<Shared>, own: OwnIdentity, shutdown: CancellationToken) {
    run_until_shutdown(&shared, &own, &shutdown).await;
    note(&shared, &own, |s| {
        s.state = "stopped".into();
        s.connected_since = None;
    });
}

async fn run_until_shutdown(shared: &Arc<Shared>, own: &OwnIdentity, shutdown: &CancellationToken) {
    let Endpoint::Azure(azure) = &shared.settings.endpoint else {
        return;
    };
    // The device's own token is its credential: the gateway's client certificate is not
    // presented for it.
    let tls = TlsSettings {
        ca_file: shared.settings.tls.ca_file.clone(),
        client_cert: None,
        client_key: None,
    };
    let tls = match rustls_config(&tls) {
        Ok(tls) => tls,
        Err(why) => {
            note(shared, own, |s| {
                s.state = "refused".into();
                s.last_error = Some(format!("uplink TLS settings: {why}"));
            });
            shutdown.cancelled().await;
            return;
        }
    };
    let settings = &shared.settings;
    let mut backoff = Backoff::new(settings.backoff_min, settings.backoff_max);
    let mut hub_of_gateway = shared.hub.subscribe();
    // Through DPS: the assignment, kept until the hub refuses the device or stays
    // unreachable for `reregister_after` (as the gateway's own).
    let mut assigned: Option<(String, String, AzureSettings)> = None;
    let mut failing_since: Option<std::time::Instant> = None;
    loop {
        // Where, and as whom.
        let (hub, device_id, identity) = match &own.key {
            OwnKey::Hub(key) => {
                note(shared, own, |s| s.state = "waiting-for-hub".into());
                // Marks the hub seen: a later move ends the connection (Moved).
                let hub = tokio::select! {
                    () = shutdown.cancelled() => return,
                    hub = hub_of_gateway.wait_for(Option::is_some) => match hub {
                        Ok(hub) => hub.clone().unwrap_or_default(),
                        Err(_) => return,
                    },
                };
                direct(azure, &hub, &own.hub_device_id, key.clone())
            }
            OwnKey::Group => match &assigned {
                Some(login) => login.clone(),
                None => {
                    note(shared, own, |s| s.state = "registering".into());
                    let registered = tokio::select! {
                        () = shutdown.cancelled() => return,
                        registered = register(shared, azure, own) => registered,
                    };
                    match registered {
                        Ok(login) => assigned.insert(login).clone(),
                        Err(why) => {
                            tracing::warn!(device = %own.device, reason = %why, "the device's own identity did not register");
                            note(shared, own, |s| {
                                s.state = "refused".into();
                                s.last_error = Some(why);
                            });
                            if sleep(shutdown, settings.backoff_max).await {
                                return;
                            }
                            continue;
                        }
                    }
                }
            },
        };
        note(shared, own, |s| {
            s.state = "connecting".into();
            s.hub = Some(hub.clone());
        });
        // A device at the gateway's hub follows the gateway when it moves (reprovisioned).
        let moved = match own.key {
            OwnKey::Hub(_) => Some(&mut hub_of_gateway),
            OwnKey::Group => None,
        };
        let link = Link {
            shared,
            own,
            device_id: &device_id,
        };
        let ended = link
            .connect_and_pump(&identity, &hub, &tls, &mut backoff, moved, shutdown)
            .await;
        let unreachable = matches!(ended, Ended::Unreachable(_));
        if !unreachable {
            failing_since = None;
        }
        match ended {
            Ended::Shutdown => return,
            Ended::Renew => {}
            Ended::Moved => {
                tracing::info!(device = %own.device, "the gateway moved to another hub; the device follows");
            }
            Ended::Refused(why) => {
                tracing::warn!(device = %own.device, reason = %why, "the hub refused the device's own identity");
                note(shared, own, |s| {
                    s.state = "refused".into();
                    s.connected_since = None;
                    s.last_error = Some(why);
                });
                assigned = None;
                if sleep(shutdown, settings.backoff_max).await {
                    return;
                }
            }
            Ended::Lost(why) | Ended::Unreachable(why) => {
                tracing::warn!(device = %own.device, reason = %why, "the device's own connection is down");
                note(shared, own, |s| {
                    s.state = "connecting".into();
                    s.connected_since = None;
                    s.last_error = Some(why);
                });
                if unreachable {
                    let since = *failing_since.get_or_insert_with(std::time::Instant::now);
                    if since.elapsed() >= settings.reregister_after {
                        // Perhaps DPS has another hub for it now.
                        assigned = None;
                        failing_since = None;
                    }
                }
                if sleep(shutdown, backoff.next_delay()).await {
                    return;
                }
            }
        }
    }
}

/// Sleeps `delay`; `true` when shut down meanwhile.
async fn sleep(shutdown: &CancellationToken, delay: Duration) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => true,
        () = tokio::time::sleep(delay) => false,
    }
}

/// The settings of a device registered at `hub` with `key`.
fn direct(
    azure: &AzureSettings,
    hub: &str,
    device_id: &str,
    key: String,
) -> (String, String, AzureSettings) {
    let identity = as_device(
        azure,
        AzureIdentity::Direct {
            hub: hub.to_owned(),
            device_id: device_id.to_owned(),
            key: Some(key),
        },
    );
    (hub.to_owned(), device_id.to_owned(), identity)
}

/// The gateway's settings for a device's own `identity`: the same port and token life, no
/// Device Update agent and no devices of its own.
fn as_device(azure: &AzureSettings, identity: AzureIdentity) -> AzureSettings {
    AzureSettings {
        identity,
        port: azure.port,
        token_ttl: azure.token_ttl,
        device_update: None,
        devices: Vec::new(),
    }
}

/// Registers the device through DPS in the gateway's enrollment group.
async fn register(
    shared: &Shared,
    azure: &AzureSettings,
    own: &OwnIdentity,
) -> Result<(String, String, AzureSettings), String> {
    let AzureIdentity::Dps {
        host,
        id_scope,
        attestation: Attestation::GroupKey(group),
        ..
    } = &azure.identity
    else {
        return Err(
            "a device without a key of its own needs the gateway's DPS enrollment group \
             ([uplink.azure] id_scope and group_key)"
                .into(),
        );
    };
    let registering = as_device(
        azure,
        AzureIdentity::Dps {
            host: host.clone(),
            id_scope: id_scope.clone(),
            registration_id: own.hub_device_id.clone(),
            attestation: Attestation::GroupKey(group.clone()),
        },
    );
    let assignment = azure::assignment(&registering, &shared.settings)
        .await
        .map_err(|err| err.to_string())?;
    let hub = BrokerAddr::parse(&assignment.broker)
        .map_err(|err| format!("DPS assigned an unusable hub: {err}"))?
        .host;
    tracing::info!(device = %own.device, hub = %hub, device_id = %assignment.device_id, "DPS assigned the device's own identity");
    let key = sas::derive_device_key(group, &own.hub_device_id).map_err(|err| err.to_string())?;
    Ok(direct(azure, &hub, &assignment.device_id, key))
}

impl Link<'_> {
    /// Connects (resetting `backoff` once the hub accepts) and pumps until the connection
    /// ends; `moved` changes when the gateway's hub does.
    async fn connect_and_pump(
        &self,
        identity: &AzureSettings,
        hub: &str,
        tls: &Arc<rustls::ClientConfig>,
        backoff: &mut Backoff,
        moved: Option<&mut watch::Receiver<Option<String>>>,
        shutdown: &CancellationToken,
    ) -> Ended {
        let Self {
            shared,
            own,
            device_id,
        } = *self;
        let login = match azure::login(identity, hub, device_id) {
            Ok(login) => login,
            Err(why) => return Ended::Refused(format!("cannot sign a token: {why}")),
        };
        let renew_at = login
            .renew_in
            .map(|after| tokio::time::Instant::now() + after);
        // IoT Hub speaks MQTT 3.1.1.
        let options = mqtt::Options {
            client_id: device_id.to_owned(),
            host: hub.to_owned(),
            port: identity.port,
            keepalive: shared.settings.keepalive,
            inflight: u16::try_from(WINDOW + 8).unwrap_or(u16::MAX),
            max_packet: contract::MAX_PAYLOAD + 4096,
            credentials: Some((login.username, login.password)),
            will: None,
            tls: Some(tls.clone()),
            session_expiry: 0,
        };
        let (client, mut events) = mqtt::client(mqtt::Protocol::V311, options);
        let connected = tokio::select! {
            () = shutdown.cancelled() => return Ended::Shutdown,
            first = events.poll() => first,
        };
        match connected {
            Ok(Event::ConnAck { .. }) => {}
            Ok(other) => {
                return Ended::Unreachable(format!("{hub} answered CONNECT with {other:?}"));
            }
            Err(Failure::Auth(code)) => {
                return Ended::Refused(format!(
                    "the hub {hub} refused {device_id} ({code}): check the device's entry in \
                 [[uplink.azure.devices]] (its key, the device at its hub); its messages wait \
                 in the outbox and it is tried again"
                ));
            }
            Err(failure) => {
                let why = failure.text();
                return Ended::Unreachable(format!("cannot reach {hub} as {device_id}: {why}"));
            }
        }
        backoff.reset();
        let since = now_millis();
        note(shared, own, |s| {
            s.state = "connected".into();
            s.connected_since = Some(since);
            s.connections += 1;
            s.last_error = None;
        });
        tracing::info!(device = %own.device, hub, device_id, "the device's own identity connected");
        self.pump(&client, &mut events, renew_at, moved, shutdown)
            .await
    }

    /// Drains the device's lane and takes its twin's desired properties.
    async fn pump(
        &self,
        client: &Client,
        events: &mut Events,
        renew_at: Option<tokio::time::Instant>,
        mut moved: Option<&mut watch::Receiver<Option<String>>>,
        shutdown: &CancellationToken,
    ) -> Ended {
        let outbox = &self.shared.outbox;
        let (acks_tx, acks) = mpsc::unbounded_channel::<i64>();
        let acker = tokio::spawn(session::acker(outbox.clone(), acks));
        let mut conn = Conn {
            link: self,
            client,
            gateway_prefix: format!("{}/gw/{}/", contract::ROOT, self.shared.settings.gateway_id),
            handed: VecDeque::new(),
            in_flight: HashMap::new(),
            acks: acks_tx,
            counts: crate::metrics::Delivery::new(),
            next_rid: 0,
            last_get: 0,
            twin: None,
            pending: HashMap::new(),
            again: Vec::new(),
            again_at: None,
        };
        let mut commits = outbox.lane_commits();
        let ended = conn
            .run(events, &mut commits, renew_at, &mut moved, shutdown)
            .await;
        if matches!(ended, Ended::Shutdown | Ended::Renew | Ended::Moved) {
            conn.settle(events).await;
        }
        drop(conn);
        let _ = acker.await;
        ended
    }
}

/// Waiting this long after the hub refused a twin patch (throttled, a hub error) before
/// it goes again.
const PATCH_RETRY: Duration = Duration::from_secs(10);

/// One connection's bookkeeping.
struct Conn<'a, 'b> {
    link: &'a Link<'b>,
    client: &'a Client,
    gateway_prefix: String,
    /// Outbox seqs of the publishes handed to the connection, in order (see the session's pump).
    handed: VecDeque<i64>,
    in_flight: HashMap<u16, i64>,
    acks: mpsc::UnboundedSender<i64>,
    counts: crate::metrics::Delivery,
    next_rid: u64,
    /// The newest twin GET answered.
    last_get: u64,
    /// The device's reported `outpost.*` as the hub holds it (from the GET after connect,
    /// then as patched); `None` until the GET answered, and the lane waits for it, so
    /// that a new event replaces the old one whole.
    twin: Option<serde_json::Map<String, serde_json::Value>>,
    /// Twin patches waiting for the hub's verdict: their outbox row is deleted on a 2xx,
    /// not on the PUBACK.
    pending: HashMap<String, Queued>,
    /// Patches the hub refused for now, to go again at `again_at`.
    again: Vec<Queued>,
    again_at: Option<tokio::time::Instant>,
}

impl Conn<'_, '_> {
    fn rid(&mut self, kind: &str) -> String {
        self.next_rid += 1;
        format!("{kind}-{}", self.next_rid)
    }

    async fn publish_untracked(&mut self, topic: String, payload: Vec<u8>) -> Result<(), Ended> {
        session::publish_direct(self.client, &mut self.handed, topic, payload, false)
            .await
            .map_err(Ended::Lost)
    }

    async fn get_twin(&mut self) -> Result<(), Ended> {
        let get = outpost_azure::topics::twin_get(&self.rid("get"));
        self.publish_untracked(get, Vec::new()).await
    }

    async fn run(
        &mut self,
        events: &mut Events,
        commits: &mut watch::Receiver<u64>,
        renew_at: Option<tokio::time::Instant>,
        moved: &mut Option<&mut watch::Receiver<Option<String>>>,
        shutdown: &CancellationToken,
    ) -> Ended {
        let Link { shared, own, .. } = *self.link;
        for filter in [
            outpost_azure::topics::TWIN_RESPONSES,
            outpost_azure::topics::DESIRED_PATCHES,
        ] {
            if let Err(err) = self.client.subscribe(filter.to_owned()).await {
                return Ended::Lost(err);
            }
        }
        if let Err(ended) = self.get_twin().await {
            return ended;
        }
        let mut cursors = [0i64; 3];
        let mut exhausted = false;
        loop {
            let room = WINDOW
                .saturating_sub(self.in_flight.len() + self.handed.len() + self.pending.len());
            if self.twin.is_some() && !exhausted && room > 0 {
                // Marked seen before the read: a commit meanwhile wakes the next wait.
                commits.borrow_and_update();
                let batch = match shared
                    .outbox
                    .fetch_lane(&own.device, &mut cursors, room)
                    .await
                {
                    Ok(batch) => batch,
                    Err(err) => return Ended::Lost(format!("reading the outbox: {err}")),
                };
                if batch.len() < room {
                    exhausted = true;
                }
                for message in batch {
                    if let Err(ended) = self.send(message).await {
                        return ended;
                    }
                }
                continue;
            }
            if self.twin.is_some()
                && self
                    .again_at
                    .is_some_and(|at| at <= tokio::time::Instant::now())
            {
                self.again_at = None;
                for message in std::mem::take(&mut self.again) {
                    if let Err(ended) = self.send(message).await {
                        return ended;
                    }
                }
                continue;
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ended::Shutdown,
                () = async { tokio::time::sleep_until(renew_at.unwrap_or_else(tokio::time::Instant::now)).await }, if renew_at.is_some() => {
                    return Ended::Renew;
                }
                () = async { tokio::time::sleep_until(self.again_at.unwrap_or_else(tokio::time::Instant::now)).await }, if self.again_at.is_some() && self.twin.is_some() => {}
                () = async {
                    match moved.as_deref_mut() {
                        Some(hub) => {
                            let _ = hub.changed().await;
                        }
                        None => std::future::pending().await,
                    }
                } => return Ended::Moved,
                changed = commits.changed(), if exhausted => {
                    if changed.is_err() {
                        return Ended::Shutdown;
                    }
                    exhausted = false;
                }
                event = events.poll() => match event {
                    Ok(Event::Publish { topic, payload }) => {
                        if self.inbound(&topic, &payload).await
                            && let Err(ended) = self.get_twin().await
                        {
                            return ended;
                        }
                    }
                    Ok(Event::Disconnect(_)) => {
                        return Ended::Lost("the hub closed the session".into());
                    }
                    Ok(event) => {
                        if let Some(refused) = session::track(&event, &mut self.handed, &mut self.in_flight, &self.acks, &self.counts) {
                            return Ended::Lost(refused.why);
                        }
                    }
                    Err(failure) => {
                        return Ended::Lost(format!("connection lost: {}", failure.text()));
                    }
                },
            }
        }
    }

    /// Publishes one of the lane's messages: telemetry is acknowledged by its PUBACK, a
    /// twin patch by the hub's verdict.
    async fn send(&mut self, message: Queued) -> Result<(), Ended> {
        let Link { device_id, .. } = *self.link;
        let tail = message
            .topic
            .strip_prefix(&self.gateway_prefix)
            .unwrap_or(&message.topic)
            .to_owned();
        let kind = tail.split('/').next().unwrap_or_default();
        if matches!(kind, "lobby" | "reported") {
            let body = serde_json::from_slice::<serde_json::Value>(&message.payload)
                .unwrap_or(serde_json::Value::Null);
            let twin = self.twin.get_or_insert_with(serde_json::Map::new);
            let patch = replacing(twin.get(kind).unwrap_or(&serde_json::Value::Null), &body);
            twin.insert(kind.to_owned(), body);
            let rid = self.rid("patch");
            let (topic, payload) = azure::reported(&json!({ kind: patch }), &rid);
            self.pending.insert(rid, message);
            return self.publish_untracked(topic, payload.to_vec()).await;
        }
        let (topic, payload) = azure::d2c(device_id, &message.message_id, &tail, &message.payload);
        self.handed.push_back(message.seq);
        self.client
            .publish(topic, payload, false, mqtt::Extras::default())
            .await
            .map_err(Ended::Lost)
    }

    /// Acts on what the hub sent the device; `true`: read the whole twin again.
    async fn inbound(&mut self, topic: &str, payload: &[u8]) -> bool {
        let Link {
            shared,
            own,
            device_id,
        } = *self.link;
        match azure::inbound(device_id, topic) {
            Ok(azure::Inbound::TwinResponse { status, rid }) if rid.starts_with("get-") => {
                let number = rid["get-".len()..].parse::<u64>().unwrap_or(0);
                if number <= self.last_get {
                    return false;
                }
                self.last_get = number;
                let twin: serde_json::Value = if status == 200 {
                    serde_json::from_slice(payload).unwrap_or_default()
                } else {
                    tracing::warn!(device = %own.device, status, "IoT Hub did not give the device's twin");
                    serde_json::Value::Null
                };
                // What the reported side holds, so that new events replace it whole.
                self.twin = Some(
                    twin.pointer("/reported/outpost")
                        .and_then(serde_json::Value::as_object)
                        .cloned()
                        .unwrap_or_default(),
                );
                if status != 200 {
                    return false;
                }
                match azure::desired_of_twin(payload) {
                    Ok(desired) => {
                        match session::store_desired(shared, &own.device, &desired, true).await {
                            Ok(()) => note(shared, own, |s| s.desired_version = desired.version),
                            Err(err) => {
                                tracing::warn!(device = %own.device, error = %err, "cannot store the device's desired state");
                            }
                        }
                    }
                    Err(why) => {
                        tracing::warn!(device = %own.device, reason = %why, "ignoring a twin we cannot read");
                    }
                }
                false
            }
            Ok(azure::Inbound::TwinResponse { status, rid }) => {
                let Some(message) = self.pending.remove(&rid) else {
                    return false;
                };
                if (200..300).contains(&status) {
                    let _ = self.acks.send(message.seq);
                    return false;
                }
                let body = String::from_utf8_lossy(payload);
                if status == 400 {
                    // Never taken (too large, a name IoT Hub does not allow): said and dropped.
                    tracing::warn!(device = %own.device, status, rid, body = %body, "IoT Hub refused a patch of the device's twin; dropped");
                    note(shared, own, |s| {
                        s.last_error = Some(format!(
                            "IoT Hub refused a patch of the twin of {device_id} (400: {body}); it was dropped"
                        ));
                    });
                    let _ = self.acks.send(message.seq);
                    return false;
                }
                // Throttled or a hub error: again after a pause, against the twin as it is.
                tracing::warn!(device = %own.device, status, rid, body = %body, "IoT Hub refused a patch of the device's twin for now; it goes again");
                self.again.push(message);
                self.again_at = Some(tokio::time::Instant::now() + PATCH_RETRY);
                self.twin = None;
                true
            }
            Ok(azure::Inbound::DesiredPatch) => true,
            Ok(_) => false,
            Err(why) => {
                tracing::warn!(device = %own.device, topic, reason = %why, "ignoring a message from IoT Hub on a topic we do not know");
                false
            }
        }
    }

    /// Ends the connection with DISCONNECT, taking the acknowledgements (and twin
    /// verdicts) still on their way for at most 2 s, so that what arrived is not sent
    /// again by the next connection.
    async fn settle(&mut self, events: &mut Events) {
        let end = tokio::time::Instant::now() + Duration::from_secs(2);
        while (!self.in_flight.is_empty() || !self.pending.is_empty() || !self.handed.is_empty())
            && tokio::time::Instant::now() < end
        {
            match tokio::time::timeout_at(end, events.poll()).await {
                Ok(Ok(Event::Publish { topic, payload })) => {
                    self.inbound(&topic, &payload).await;
                }
                Ok(Ok(event)) => {
                    let _ = session::track(
                        &event,
                        &mut self.handed,
                        &mut self.in_flight,
                        &self.acks,
                        &self.counts,
                    );
                }
                Ok(Err(_)) | Err(_) => break,
            }
        }
        session::disconnect(self.client, events).await;
    }
}

/// The JSON merge patch that turns `old` into `new`: `new`, with `null` for every member
/// `old` has and `new` has not (at every depth), so that an event replaces the previous
/// one whole instead of merging into it.
fn replacing(old: &serde_json::Value, new: &serde_json::Value) -> serde_json::Value {
    match (old, new) {
        (serde_json::Value::Object(old), serde_json::Value::Object(new)) => {
            let mut patch = serde_json::Map::new();
            for (name, value) in new {
                let before = old.get(name).unwrap_or(&serde_json::Value::Null);
                patch.insert(name.clone(), replacing(before, value));
            }
            for name in old.keys() {
                if !new.contains_key(name) {
                    patch.insert(name.clone(), serde_json::Value::Null);
                }
            }
            serde_json::Value::Object(patch)
        }
        _ => new.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_event_replaces_the_previous_one_whole() {
        let old = json!({
            "agent": {"version": "1.1", "workflow": {"id": "w1"}, "lastInstallResult": {"resultCode": 700}},
            "desiredVersion": 3,
        });
        let new = json!({"agent": {"version": "1.2"}, "desiredVersion": 4});
        let patch = replacing(&old, &new);
        assert_eq!(
            patch,
            json!({
                "agent": {"version": "1.2", "workflow": null, "lastInstallResult": null},
                "desiredVersion": 4,
            })
        );
        // Applied as IoT Hub applies a reported patch (JSON merge patch), it gives `new`.
        let mut twin = old.clone();
        json_patch_merge(&mut twin, &patch);
        assert_eq!(twin, new);
        // Nothing before: the event as it is.
        assert_eq!(replacing(&serde_json::Value::Null, &new), new);
    }

    /// RFC 7396, as IoT Hub applies a reported-properties patch.
    fn json_patch_merge(target: &mut serde_json::Value, patch: &serde_json::Value) {
        let serde_json::Value::Object(patch) = patch else {
            *target = patch.clone();
            return;
        };
        if !target.is_object() {
            *target = json!({});
        }
        let map = target.as_object_mut().unwrap();
        for (name, value) in patch {
            if value.is_null() {
                map.remove(name);
            } else {
                json_patch_merge(
                    map.entry(name.clone()).or_insert(serde_json::Value::Null),
                    value,
                );
            }
        }
    }
}
