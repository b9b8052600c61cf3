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

use bytes::Bytes;
use outpost_azure::provision::Attestation;
use outpost_azure::sas;
use outpost_store::backoff::Backoff;
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, Incoming, MqttOptions, QoS,
    TlsConfiguration, Transport,
};
use serde::Serialize;
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::azure;
use crate::contract;
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
            note(&shared, &own, |s| {
                s.state = "refused".into();
                s.last_error = Some(format!("uplink TLS settings: {why}"));
            });
            return;
        }
    };
    let settings = &shared.settings;
    let mut backoff = Backoff::new(settings.backoff_min, settings.backoff_max);
    let mut hub_of_gateway = shared.hub.subscribe();
    loop {
        // Where, and as whom.
        let login = match &own.key {
            OwnKey::Hub(key) => {
                note(&shared, &own, |s| s.state = "waiting-for-hub".into());
                let hub = tokio::select! {
                    () = shutdown.cancelled() => return,
                    hub = hub_of_gateway.wait_for(Option::is_some) => match hub {
                        Ok(hub) => hub.clone().unwrap_or_default(),
                        Err(_) => return,
                    },
                };
                direct(azure, &hub, &own.hub_device_id, key.clone())
            }
            OwnKey::Group => {
                note(&shared, &own, |s| s.state = "registering".into());
                let registered = tokio::select! {
                    () = shutdown.cancelled() => return,
                    registered = register(&shared, azure, &own) => registered,
                };
                match registered {
                    Ok(login) => login,
                    Err(why) => {
                        tracing::warn!(device = %own.device, reason = %why, "the device's own identity did not register");
                        note(&shared, &own, |s| {
                            s.state = "refused".into();
                            s.last_error = Some(why);
                        });
                        if sleep(&shutdown, settings.backoff_max).await {
                            return;
                        }
                        continue;
                    }
                }
            }
        };
        let (hub, device_id, identity) = login;
        note(&shared, &own, |s| {
            s.state = "connecting".into();
            s.hub = Some(hub.clone());
        });
        // A device at the gateway's hub follows the gateway when it moves (reprovisioned).
        let moved = match own.key {
            OwnKey::Hub(_) => {
                hub_of_gateway.mark_unchanged();
                Some(&mut hub_of_gateway)
            }
            OwnKey::Group => None,
        };
        let link = Link {
            shared: &shared,
            own: &own,
            device_id: &device_id,
        };
        let ended = link
            .connect_and_pump(&identity, &hub, &tls, &mut backoff, moved, &shutdown)
            .await;
        match ended {
            Ended::Shutdown => return,
            Ended::Renew => {}
            Ended::Moved => {
                tracing::info!(device = %own.device, "the gateway moved to another hub; the device follows");
            }
            Ended::Refused(why) => {
                tracing::warn!(device = %own.device, reason = %why, "the hub refused the device's own identity");
                note(&shared, &own, |s| {
                    s.state = "refused".into();
                    s.connected_since = None;
                    s.last_error = Some(why);
                });
                if sleep(&shutdown, settings.backoff_max).await {
                    return;
                }
            }
            Ended::Lost(why) => {
                tracing::warn!(device = %own.device, reason = %why, "the device's own connection is down");
                note(&shared, &own, |s| {
                    s.state = "connecting".into();
                    s.connected_since = None;
                    s.last_error = Some(why);
                });
                if sleep(&shutdown, backoff.next_delay()).await {
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
    let identity = AzureSettings {
        identity: AzureIdentity::Direct {
            hub: hub.to_owned(),
            device_id: device_id.to_owned(),
            key: Some(key),
        },
        port: azure.port,
        token_ttl: azure.token_ttl,
        device_update: None,
        devices: Vec::new(),
    };
    (hub.to_owned(), device_id.to_owned(), identity)
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
    let registering = AzureSettings {
        identity: AzureIdentity::Dps {
            host: host.clone(),
            id_scope: id_scope.clone(),
            registration_id: own.hub_device_id.clone(),
            attestation: Attestation::GroupKey(group.clone()),
        },
        port: azure.port,
        token_ttl: azure.token_ttl,
        device_update: None,
        devices: Vec::new(),
    };
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
        let mut options = MqttOptions::new(device_id, hub, identity.port);
        options.set_keep_alive(shared.settings.keepalive);
        options.set_clean_session(false);
        options.set_inflight(u16::try_from(WINDOW + 8).unwrap_or(u16::MAX));
        options.set_max_packet_size(contract::MAX_PAYLOAD + 4096, contract::MAX_PAYLOAD + 4096);
        options.set_credentials(login.username, login.password);
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            tls.clone(),
        )));
        let (client, mut events) = AsyncClient::new(options, WINDOW + 16);
        let connected = tokio::select! {
            () = shutdown.cancelled() => return Ended::Shutdown,
            first = events.poll() => first,
        };
        match connected {
            Ok(Event::Incoming(Incoming::ConnAck(_))) => {}
            Ok(other) => return Ended::Lost(format!("{hub} answered CONNECT with {other:?}")),
            Err(ConnectionError::ConnectionRefused(
                code @ (ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized),
            )) => {
                return Ended::Refused(format!(
                    "the hub {hub} refused {device_id} ({code:?}): check the device's entry in \
                 [[uplink.azure.devices]] (its key, the device at its hub); its messages wait \
                 in the outbox and it is tried again"
                ));
            }
            Err(err) => return Ended::Lost(format!("cannot reach {hub} as {device_id}: {err}")),
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
        let ended = self
            .pump(&client, &mut events, renew_at, moved, shutdown)
            .await;
        if matches!(ended, Ended::Shutdown | Ended::Renew | Ended::Moved) {
            session::disconnect(&client, &mut events).await;
        }
        ended
    }

    /// Drains the device's lane and takes its twin's desired properties.
    async fn pump(
        &self,
        client: &AsyncClient,
        events: &mut EventLoop,
        renew_at: Option<tokio::time::Instant>,
        mut moved: Option<&mut watch::Receiver<Option<String>>>,
        shutdown: &CancellationToken,
    ) -> Ended {
        let Self {
            shared,
            own,
            device_id,
        } = *self;
        let outbox = &shared.outbox;
        let gateway_prefix = format!("{}/gw/{}/", contract::ROOT, shared.settings.gateway_id);
        let mut handed: VecDeque<i64> = VecDeque::new();
        let mut in_flight: HashMap<u16, i64> = HashMap::new();
        let mut cursors = [0i64; 3];
        let mut exhausted = false;
        let mut commits = outbox.lane_commits();
        let mut next_rid = 0u64;
        let mut last_get = 0u64;
        let mut rid = |kind: &str| {
            next_rid += 1;
            format!("{kind}-{next_rid}")
        };
        let (acks_tx, acks) = mpsc::unbounded_channel::<i64>();
        let acker = tokio::spawn(session::acker(outbox.clone(), acks));
        let ended = async {
        for filter in [
            outpost_azure::topics::TWIN_RESPONSES,
            outpost_azure::topics::DESIRED_PATCHES,
        ] {
            if let Err(err) = client.subscribe(filter, QoS::AtLeastOnce).await {
                return Ended::Lost(format!("subscribe: {err}"));
            }
        }
        let get = outpost_azure::topics::twin_get(&rid("get"));
        if let Err(why) = session::publish_direct(client, &mut handed, get, Vec::new(), false).await
        {
            return Ended::Lost(why);
        }
        loop {
            let room = WINDOW.saturating_sub(in_flight.len() + handed.len());
            if !exhausted && room > 0 {
                // Marked seen before the read: a commit meanwhile wakes the next wait.
                commits.borrow_and_update();
                let batch = match outbox.fetch_lane(&own.device, &mut cursors, room).await {
                    Ok(batch) => batch,
                    Err(err) => return Ended::Lost(format!("reading the outbox: {err}")),
                };
                if batch.len() < room {
                    exhausted = true;
                }
                for message in batch {
                    let tail = message
                        .topic
                        .strip_prefix(&gateway_prefix)
                        .unwrap_or(&message.topic);
                    let (topic, payload) = outgoing(
                        device_id,
                        &message.message_id,
                        tail,
                        &message.payload,
                        &rid("patch"),
                    );
                    handed.push_back(message.seq);
                    if let Err(err) = client
                        .publish_bytes(topic, QoS::AtLeastOnce, false, payload)
                        .await
                    {
                        return Ended::Lost(format!("publish: {err}"));
                    }
                }
                continue;
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ended::Shutdown,
                () = async { tokio::time::sleep_until(renew_at.unwrap_or_else(tokio::time::Instant::now)).await }, if renew_at.is_some() => {
                    return Ended::Renew;
                }
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
                    Ok(Event::Incoming(Incoming::Publish(publish))) => {
                        let get_twin = inbound(shared, own, device_id, &publish.topic, &publish.payload, &mut last_get).await;
                        if get_twin {
                            let get = outpost_azure::topics::twin_get(&rid("get"));
                            if let Err(why) = session::publish_direct(client, &mut handed, get, Vec::new(), false).await {
                                return Ended::Lost(why);
                            }
                        }
                    }
                    Ok(Event::Incoming(Incoming::Disconnect)) => {
                        return Ended::Lost("the hub closed the session".into());
                    }
                    Ok(event) => session::track(&event, &mut handed, &mut in_flight, &acks_tx),
                    Err(err) => return Ended::Lost(format!("connection lost: {err}")),
                },
            }
        }
    }
    .await;
        drop(acks_tx);
        let _ = acker.await;
        ended
    }
}

/// What one of the device's outbox messages (`tail` below `gw/{gateway}/`) becomes at
/// the hub: its lobby event and reported state a patch of its own twin, its telemetry a
/// device-to-cloud message of its own.
fn outgoing(
    device_id: &str,
    message_id: &str,
    tail: &str,
    payload: &Bytes,
    rid: &str,
) -> (String, Bytes) {
    let kind = tail.split('/').next().unwrap_or_default();
    if matches!(kind, "lobby" | "reported") {
        let body =
            serde_json::from_slice::<serde_json::Value>(payload).unwrap_or(serde_json::Value::Null);
        return azure::reported(&json!({ kind: body }), rid);
    }
    azure::d2c(device_id, message_id, tail, payload)
}

/// Acts on what the hub sent the device; `true`: read the whole twin again.
async fn inbound(
    shared: &Arc<Shared>,
    own: &OwnIdentity,
    device_id: &str,
    topic: &str,
    payload: &[u8],
    last_get: &mut u64,
) -> bool {
    match azure::inbound(device_id, topic) {
        Ok(azure::Inbound::TwinResponse { status, rid }) if rid.starts_with("get-") => {
            let number = rid["get-".len()..].parse::<u64>().unwrap_or(0);
            if status != 200 || number <= *last_get {
                return false;
            }
            *last_get = number;
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
            if status >= 300 {
                tracing::warn!(device = %own.device, status, rid, body = %String::from_utf8_lossy(payload), "IoT Hub refused a patch of the device's twin");
            }
            false
        }
        Ok(azure::Inbound::DesiredPatch) => true,
        Ok(_) => false,
        Err(why) => {
            tracing::warn!(device = %own.device, topic, reason = %why, "ignoring a message from IoT Hub on a topic we do not know");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_goes_to_the_devices_own_twin_and_telemetry_as_its_own_messages() {
        let (topic, body) = outgoing(
            "site-esp-1",
            "m1",
            "reported/esp-1",
            &Bytes::from_static(b"{\"agent\":{\"version\":\"1.2\"}}"),
            "patch-3",
        );
        assert_eq!(
            topic,
            "$iothub/twin/PATCH/properties/reported/?$rid=patch-3"
        );
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            body,
            json!({"outpost": {"reported": {"agent": {"version": "1.2"}}}})
        );
        let (topic, body) = outgoing(
            "site-esp-1",
            "m2",
            "telemetry/esp-1",
            &Bytes::from_static(b"{\"t\":1}"),
            "patch-4",
        );
        assert!(
            topic.starts_with("devices/site-esp-1/messages/events/"),
            "{topic}"
        );
        assert!(topic.contains("$.mid=m2"), "{topic}");
        assert_eq!(&body[..], b"{\"t\":1}");
    }
}
