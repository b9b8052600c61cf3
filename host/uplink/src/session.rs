//! The uplink task: register if needed, connect, drain the outbox, take what the cloud
//! sends, and reconnect with backoff when the broker goes away.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outpost_store::Store;
use outpost_store::rusqlite::{OptionalExtension, params};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use outpost_store::backoff::Backoff;

use crate::azure;
use crate::contract::{self, Assignment, DesiredState, schema, topics};
use crate::inbox::DeploymentInbox;
use crate::mqtt::{self, Client, Event, Events, Failure, Protocol};
use crate::now_millis;
use crate::outbox::{Message, Outbox, OutboxError, Priority};
use crate::own_identity::{self, OwnIdentityStatus};
use crate::registration::{self, RegistrationError};
use crate::settings::{
    AzureIdentity, AzureSettings, BrokerAddr, Credentials, Endpoint, ProtocolChoice,
    UplinkSettings, rustls_config,
};

/// How often a broker may refuse one message (for now) before it is dropped.
const MAX_REFUSALS: u32 = 5;

/// A publish that is not an outbox row (status, online): acknowledged but not deleted.
const UNTRACKED: i64 = -1;

/// What the uplink is doing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LinkState {
    /// Not started yet.
    #[default]
    Starting,
    /// Asking the registration service for an assignment.
    Registering,
    /// Connecting (or waiting to reconnect).
    Connecting,
    /// Connected; the outbox drains.
    Connected,
    /// Stopped for good until the config changes (credentials refused).
    Stopped,
}

/// The uplink's state for `/api/v1/uplink` and `outpost uplink status`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct UplinkStatus {
    /// What it is doing.
    pub state: LinkState,
    /// The broker it talks to (or tries to).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker: Option<String>,
    /// Times it moved to another of several brokers (lost one, or returned to the first).
    pub failovers: u64,
    /// The MQTT it speaks (`3.1.1` or `5`) once connected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<&'static str>,
    /// Connection attempts since start.
    pub connect_attempts: u64,
    /// Successful connections since start.
    pub connections: u64,
    /// Registrations since start.
    pub registrations: u64,
    /// Unix milliseconds since connected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connected_since: Option<i64>,
    /// The last error, in words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The current assignment's substatus (registration only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub substatus: Option<String>,
    /// The gateway's desired-state version.
    pub desired_version: u64,
    /// The gateway's desired state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub desired: Option<serde_json::Value>,
    /// The devices with a hub identity of their own (`azure-iot`), by device id.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub own_identities: BTreeMap<String, OwnIdentityStatus>,
}

/// Why a cloud claim failed.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// Not connected: the caller may fall back to a local CA.
    #[error("the cloud uplink is not connected")]
    Offline,
    /// The uplink's cloud signs no claims (IoT Hub): the caller's local CA must.
    #[error("the azure-iot uplink has no claim service (IoT Hub signs no device certificates)")]
    NoClaimService,
    /// No answer in time.
    #[error("the cloud did not answer the claim request within {0:?}")]
    Timeout(Duration),
    /// The cloud refused.
    #[error("the cloud refused the claim ({status}): {error}")]
    Refused {
        /// Its status.
        status: u16,
        /// Its reason.
        error: String,
    },
    /// The request could not be queued.
    #[error(transparent)]
    Outbox(#[from] OutboxError),
}

pub(crate) struct Shared {
    pub(crate) settings: UplinkSettings,
    pub(crate) outbox: Outbox,
    inbox: DeploymentInbox,
    status: watch::Sender<UplinkStatus>,
    /// The gateway's hub (`azure-iot`), once known: devices with a key of their own
    /// connect there.
    pub(crate) hub: watch::Sender<Option<String>>,
    claims: Mutex<HashMap<String, oneshot::Sender<contract::ClaimResponse>>>,
    /// The azure-iot profile's device summaries in the twin.
    twin_devices: Mutex<azure::TwinDevices>,
}

/// A handle on the running uplink.
#[derive(Clone)]
pub struct Uplink {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Uplink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uplink")
            .field("status", &self.status())
            .finish()
    }
}

impl Uplink {
    /// Starts the uplink task; it runs until `shutdown`, then publishes `offline` if it
    /// can and disconnects. Deployments from the cloud go to `inbox`.
    pub fn spawn(
        settings: UplinkSettings,
        outbox: Outbox,
        inbox: DeploymentInbox,
        shutdown: CancellationToken,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (status, _) = watch::channel(UplinkStatus::default());
        let shared = Arc::new(Shared {
            settings,
            outbox,
            inbox,
            status,
            claims: Mutex::new(HashMap::new()),
            twin_devices: Mutex::new(azure::TwinDevices::default()),
            hub: watch::Sender::new(None),
        });
        let task = tokio::spawn(run(Arc::clone(&shared), shutdown));
        (Self { shared }, task)
    }

    /// The current status.
    pub fn status(&self) -> UplinkStatus {
        self.shared.status.borrow().clone()
    }

    /// Status changes, for waiting on a state.
    pub fn watch(&self) -> watch::Receiver<UplinkStatus> {
        self.shared.status.subscribe()
    }

    /// The gateway id used in topics.
    pub fn gateway_id(&self) -> &str {
        &self.shared.settings.gateway_id
    }

    /// Queues a lobby event for one device whose state changed (`outpost.lobby/1` on
    /// `lobby/{device}`, state class); delivered when the link is up.
    pub async fn announce_device(
        &self,
        device_id: &str,
        device_type: &str,
        state: &str,
    ) -> Result<(), OutboxError> {
        self.shared
            .outbox
            .enqueue(lobby_message(
                &self.shared.settings.gateway_id,
                device_id,
                device_type,
                state,
            ))
            .await
    }

    /// Asks the cloud to sign a device's CSR; returns the certificate (PEM). Offline it is
    /// [`ClaimError::Offline`], and with the `azure-iot` profile (no claim service)
    /// [`ClaimError::NoClaimService`], so the caller may sign with its local CA.
    pub async fn claim(
        &self,
        device_id: &str,
        node_id: &str,
        csr_pem: &str,
        timeout: Duration,
    ) -> Result<String, ClaimError> {
        // IoT Hub has no claim service: the caller's local CA signs.
        if matches!(self.shared.settings.endpoint, Endpoint::Azure(_)) {
            return Err(ClaimError::NoClaimService);
        }
        if self.status().state != LinkState::Connected {
            return Err(ClaimError::Offline);
        }
        let rid = contract::message_id();
        let (answer_tx, answer) = oneshot::channel();
        self.shared
            .claims
            .lock()
            .expect("claims lock")
            .insert(rid.clone(), answer_tx);
        let gateway = &self.shared.settings.gateway_id;
        let request = contract::ClaimRequest {
            schema: schema::CLAIM_REQUEST.into(),
            message_id: rid.clone(),
            rid: rid.clone(),
            device_id: device_id.into(),
            node_id: node_id.into(),
            csr: csr_pem.into(),
        };
        let queued = self
            .shared
            .outbox
            .enqueue(Message {
                message_id: rid.clone(),
                topic: topics::claim_request(gateway, &rid),
                payload: serde_json::to_vec(&request).expect("serialisable"),
                priority: Priority::Control,
                retain: false,
                ttl: Some(timeout),
            })
            .await;
        if let Err(err) = queued {
            self.shared.claims.lock().expect("claims lock").remove(&rid);
            return Err(err.into());
        }
        let response = match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(response)) => response,
            _ => {
                self.shared.claims.lock().expect("claims lock").remove(&rid);
                return Err(ClaimError::Timeout(timeout));
            }
        };
        match (response.status, response.certificate) {
            (200, Some(certificate)) => Ok(certificate),
            (status, _) => Err(ClaimError::Refused {
                status,
                error: response.error.unwrap_or_else(|| "no reason given".into()),
            }),
        }
    }
}

pub(crate) fn set_status(shared: &Shared, change: impl FnOnce(&mut UplinkStatus)) {
    shared.status.send_modify(change);
}

/// How one connection ended.
enum Ended {
    Shutdown,
    /// The cloud asked for a new registration (IoT Hub's `reprovision` method).
    Reprovision,
    /// The broker refused the credentials.
    AuthRefused(String),
    /// The broker could not be reached for longer than `reregister_after`.
    Unreachable(String),
    /// A configuration problem no retry fixes.
    Fatal(String),
}

/// Registers with the registration service or DPS, as the endpoint says.
async fn register(
    settings: &UplinkSettings,
    gateway: &str,
) -> Result<Assignment, RegistrationError> {
    match &settings.endpoint {
        Endpoint::Registration(registration) => {
            registration::register(registration, settings, gateway).await
        }
        Endpoint::Azure(azure) => azure::assignment(azure, settings).await,
        Endpoint::Fixed { .. } => Err(RegistrationError::Fatal(
            "a fixed broker needs no registration".to_owned(),
        )),
    }
}

async fn run(shared: Arc<Shared>, shutdown: CancellationToken) {
    let store = shared.outbox.store().clone();
    if let Err(err) = load_desired(&shared, &store).await {
        tracing::warn!(error = %err, "cannot read the stored desired state");
    }
    // Devices with a hub identity of their own: a connection each, which goes on when the
    // gateway's stops for good (a device without a key needs only DPS), ended by the
    // shutdown and waited for, so their acknowledgements are committed.
    let own_identities: Vec<_> = match &shared.settings.endpoint {
        Endpoint::Azure(azure) => azure
            .devices
            .iter()
            .map(|own| {
                tokio::spawn(own_identity::run(
                    Arc::clone(&shared),
                    own.clone(),
                    shutdown.clone(),
                ))
            })
            .collect(),
        _ => Vec::new(),
    };
    run_gateway(&shared, &store, &shutdown).await;
    for task in own_identities {
        let _ = task.await;
    }
}

async fn run_gateway(shared: &Arc<Shared>, store: &Store, shutdown: &CancellationToken) {
    let shared = Arc::clone(shared);
    let store = store.clone();
    let shutdown = shutdown.clone();
    let gateway = shared.settings.gateway_id.clone();
    let fatal = loop {
        let (brokers, credentials, client_id) = match &shared.settings.endpoint {
            Endpoint::Fixed {
                brokers,
                credentials,
            } => (brokers.clone(), credentials.clone(), gateway.clone()),
            Endpoint::Registration(_) | Endpoint::Azure(_) => {
                // A device registered at its hub directly has its assignment in the config
                // (never cached, so a changed config takes effect).
                if let Endpoint::Azure(
                    azure @ AzureSettings {
                        identity: AzureIdentity::Direct { .. },
                        ..
                    },
                ) = &shared.settings.endpoint
                {
                    let assignment = match azure::assignment(azure, &shared.settings).await {
                        Ok(assignment) => assignment,
                        Err(err) => break Some(err.to_string()),
                    };
                    match BrokerAddr::parse(&assignment.broker) {
                        Ok(broker) => (vec![broker], Credentials::default(), assignment.device_id),
                        Err(err) => break Some(format!("[uplink.azure] hub: {err}")),
                    }
                } else {
                    let cached = match cached_assignment(&store).await {
                        Ok(cached) => cached,
                        Err(err) => {
                            tracing::warn!(error = %err, "the cached assignment is unreadable; registering again");
                            None
                        }
                    };
                    let (assignment, fresh) = match cached {
                        Some(assignment) => (assignment, false),
                        None => {
                            set_status(&shared, |s| s.state = LinkState::Registering);
                            let registered = tokio::select! {
                                () = shutdown.cancelled() => break None,
                                registered = register(&shared.settings, &gateway) => registered,
                            };
                            match registered {
                                Ok(assignment) => {
                                    set_status(&shared, |s| s.registrations += 1);
                                    (assignment, true)
                                }
                                Err(RegistrationError::Refused(why)) => break Some(why),
                                Err(RegistrationError::Fatal(why)) => break Some(why),
                            }
                        }
                    };
                    let broker = match BrokerAddr::parse(&assignment.broker) {
                        Ok(broker) => broker,
                        Err(err) => {
                            tracing::warn!(error = %err, "the assignment names an unusable broker; registering again");
                            let _ = forget_assignment(&store).await;
                            continue;
                        }
                    };
                    let mut brokers = vec![broker];
                    for alternate in assignment.alternates.iter().take(15) {
                        match BrokerAddr::parse(alternate) {
                            Ok(alternate) if !brokers.contains(&alternate) => {
                                brokers.push(alternate);
                            }
                            Ok(_) => {}
                            Err(err) => {
                                tracing::warn!(error = %err, "the assignment names an unusable alternate broker; left out");
                            }
                        }
                    }
                    if fresh && let Err(err) = apply_assignment(&shared, &store, &assignment).await
                    {
                        tracing::error!(error = %err, "cannot record the new assignment");
                    }
                    set_status(&shared, |s| {
                        s.substatus = Some(assignment.substatus.clone());
                    });
                    (
                        brokers,
                        Credentials {
                            username: assignment.username.clone(),
                            password: assignment.password.clone(),
                        },
                        assignment.device_id.clone(),
                    )
                }
            }
        };
        if let (Endpoint::Azure(_), Some(broker)) = (&shared.settings.endpoint, brokers.first()) {
            // Devices at the gateway's hub reconnect only when it is another.
            shared.hub.send_if_modified(|hub| {
                let moved = hub.as_deref() != Some(broker.host.as_str());
                if moved {
                    *hub = Some(broker.host.clone());
                }
                moved
            });
        }
        match connect_and_pump(&shared, &brokers, &credentials, &client_id, &shutdown).await {
            Ended::Shutdown => break None,
            Ended::Fatal(why) => break Some(why),
            Ended::Reprovision => {
                tracing::info!("the cloud asked the gateway to provision again");
                let _ = forget_assignment(&store).await;
            }
            Ended::AuthRefused(why) => match &shared.settings.endpoint {
                Endpoint::Fixed { .. }
                | Endpoint::Azure(AzureSettings {
                    identity: AzureIdentity::Direct { .. },
                    ..
                }) => break Some(why),
                Endpoint::Registration(_) | Endpoint::Azure(_) => {
                    tracing::warn!(reason = %why, "the assigned broker refused our credentials; registering again");
                    let _ = forget_assignment(&store).await;
                    if let Endpoint::Azure(_) = &shared.settings.endpoint {
                        // DPS may assign the same hub, which may refuse again (a disabled
                        // device): do not hammer either.
                        tokio::select! {
                            () = shutdown.cancelled() => break None,
                            () = tokio::time::sleep(shared.settings.backoff_max) => {}
                        }
                    }
                }
            },
            Ended::Unreachable(why) => {
                tracing::warn!(reason = %why, "the assigned broker stayed unreachable; registering again");
                let _ = forget_assignment(&store).await;
            }
        }
    };
    if let Some(why) = fatal {
        tracing::error!("uplink stopped: {why}");
        set_status(&shared, |s| {
            s.state = LinkState::Stopped;
            s.connected_since = None;
            s.last_error = Some(why);
        });
    }
}

/// The options of one connection attempt, and for the `azure-iot` profile when its token
/// must be renewed (a new token each attempt).
fn mqtt_options(
    shared: &Shared,
    broker: &BrokerAddr,
    credentials: &Credentials,
    client_id: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<(mqtt::Options, Option<Duration>), String> {
    let settings = &shared.settings;
    let window = u16::try_from(settings.window.clamp(1, 60_000)).unwrap_or(512);
    let mut options = mqtt::Options {
        client_id: client_id.to_owned(),
        host: broker.host.clone(),
        port: broker.port,
        keepalive: settings.keepalive,
        inflight: window.saturating_add(8),
        max_packet: contract::MAX_PAYLOAD + 4096,
        credentials: None,
        will: None,
        tls: tls.cloned(),
        session_expiry: u32::try_from(settings.session_expiry.as_secs()).unwrap_or(u32::MAX),
    };
    let mut renew_in = None;
    if let Endpoint::Azure(azure) = &settings.endpoint {
        let login = azure::login(azure, &broker.host, client_id)?;
        options.credentials = Some((login.username, login.password));
        renew_in = login.renew_in;
        // IoT Hub sends a will as a device-to-cloud message (it keeps nothing retained).
        let (topic, payload) = azure::d2c(
            client_id,
            &contract::message_id(),
            "status",
            &status_payload(shared, "offline", 0).into(),
        );
        options.will = Some(mqtt::Will {
            topic,
            payload: payload.to_vec(),
            retain: false,
        });
    } else {
        if let Some(username) = &credentials.username {
            options.credentials = Some((
                username.clone(),
                credentials.password.clone().unwrap_or_default(),
            ));
        } else if credentials.password.is_some() {
            options.credentials = Some((
                String::new(),
                credentials.password.clone().unwrap_or_default(),
            ));
        }
        options.will = Some(mqtt::Will {
            topic: topics::status(&settings.gateway_id),
            payload: status_payload(shared, "offline", 0),
            retain: true,
        });
    }
    Ok((options, renew_in))
}

fn status_payload(shared: &Shared, state: &str, since: i64) -> Vec<u8> {
    serde_json::to_vec(&contract::GatewayStatus {
        schema: schema::STATUS.into(),
        gateway_id: shared.settings.gateway_id.clone(),
        state: state.into(),
        version: shared.settings.version.clone(),
        since,
    })
    .expect("serialisable")
}

async fn connect_and_pump(
    shared: &Arc<Shared>,
    brokers: &[BrokerAddr],
    credentials: &Credentials,
    client_id: &str,
    shutdown: &CancellationToken,
) -> Ended {
    let Some(first) = brokers.first() else {
        return Ended::Fatal("no broker to connect to".into());
    };
    let registration = matches!(
        shared.settings.endpoint,
        Endpoint::Registration(_)
            | Endpoint::Azure(AzureSettings {
                identity: AzureIdentity::Dps { .. },
                ..
            })
    );
    let tls = if brokers.iter().any(|broker| broker.tls) {
        match rustls_config(&shared.settings.tls) {
            Ok(config) => Some(config),
            Err(why) => return Ended::Fatal(format!("uplink TLS settings: {why}")),
        }
    } else {
        None
    };
    let mut backoff = Backoff::new(shared.settings.backoff_min, shared.settings.backoff_max);
    let mut failing_since: Option<Instant> = None;
    // Which of the brokers this attempt goes to.
    let mut index = 0;
    // IoT Hub speaks 3.1.1. `auto` starts with 5, and after a failed attempt tries the
    // other version next: a 3.1.1-only broker may answer 5 with "unacceptable protocol
    // version" or just close the connection. A version that connected is kept until an
    // attempt with it fails.
    let auto = shared.settings.protocol == ProtocolChoice::Auto
        && !matches!(shared.settings.endpoint, Endpoint::Azure(_));
    let first_choice = match (&shared.settings.endpoint, shared.settings.protocol) {
        (Endpoint::Azure(_), _) | (_, ProtocolChoice::V311) => Protocol::V311,
        _ => Protocol::V5,
    };
    // Per broker: the version to speak, and the versions it said it does not speak
    // (CONNACK "unacceptable protocol version").
    let mut versions = vec![first_choice; brokers.len()];
    let mut said_no = vec![VersionsRefused::default(); brokers.len()];
    // The version each broker last accepted: a connection it closes early after that is
    // a broker restarting, not one that does not speak the version.
    let mut spoke: Vec<Option<Protocol>> = vec![None; brokers.len()];
    // Brokers that refused us for good (credentials, a banned id): with several, the
    // others are tried, and the uplink stops only when every one refused.
    let mut refused: Vec<Option<Ended>> = brokers.iter().map(|_| None).collect();
    // On a standby, how often the first broker is probed: longer after each failed
    // return, so a first broker that takes TCP but not MQTT does not make it flap.
    let mut probe_every = shared.settings.backoff_max.max(Duration::from_millis(100));
    let mut returning = false;
    // Messages a broker refused for now, by outbox seq: sent again, but not for ever.
    let mut refusals: HashMap<i64, u32> = HashMap::new();
    loop {
        let broker = &brokers[index];
        let protocol = versions[index];
        set_status(shared, |s| s.broker = Some(broker.to_string()));
        // Made for each attempt: an IoT Hub token is good for one connection's life.
        let tls_for = if broker.tls { tls.as_ref() } else { None };
        let (options, renew_in) =
            match mqtt_options(shared, broker, credentials, client_id, tls_for) {
                Ok(options) => options,
                Err(why) => return Ended::Fatal(format!("uplink settings: {why}")),
            };
        // Counted from when the token was made, not from when the connection came up.
        let renew_at = renew_in.map(|after| tokio::time::Instant::now() + after);
        set_status(shared, |s| {
            s.state = LinkState::Connecting;
            s.connect_attempts += 1;
        });
        let (client, mut events) = mqtt::client(protocol, options);
        let connected = tokio::select! {
            () = shutdown.cancelled() => return Ended::Shutdown,
            first = events.poll() => first,
        };
        let accepted = matches!(connected, Ok(Event::ConnAck { .. }));
        if returning && !accepted {
            probe_every = (probe_every * 2).min(shared.settings.backoff_max * 16);
        }
        returning = false;
        let why = match connected {
            Ok(Event::ConnAck {
                session_present,
                max_packet,
            }) => {
                backoff.reset();
                failing_since = None;
                spoke[index] = Some(protocol);
                refused.iter_mut().for_each(|r| *r = None);
                if index == 0 {
                    probe_every = shared.settings.backoff_max.max(Duration::from_millis(100));
                }
                let since = now_millis();
                set_status(shared, |s| {
                    s.state = LinkState::Connected;
                    s.connections += 1;
                    s.connected_since = Some(since);
                    s.last_error = None;
                    s.protocol = Some(protocol.name());
                });
                tracing::info!(broker = %broker, mqtt = protocol.name(), session_present, "uplink connected");
                let dialect = match &shared.settings.endpoint {
                    Endpoint::Azure(_) => Dialect::Azure {
                        device_id: client_id.to_owned(),
                        renew_at,
                    },
                    _ => Dialect::Outpost,
                };
                // On another than the first broker: watch for the first to answer again.
                let prefer = (index > 0).then_some(first);
                let link = Connection {
                    client: &client,
                    since,
                    dialect: &dialect,
                    prefer: prefer.map(|first| (first, probe_every)),
                    max_packet,
                };
                let ended = pump(shared, &link, &mut events, shutdown).await;
                set_status(shared, |s| s.connected_since = None);
                match ended {
                    Ok(()) => return Ended::Shutdown,
                    Err(Broken::Preferred) => {
                        tracing::info!(broker = %first, "the first broker answers again; returning to it");
                        index = 0;
                        returning = true;
                        set_status(shared, |s| {
                            s.failovers += 1;
                            s.state = LinkState::Connecting;
                        });
                        continue;
                    }
                    Err(Broken::Refused { seq, why }) => {
                        // The broker took the connection but not this message: not the
                        // broker's fault, so no failover; a pause, and the message again
                        // unless it was refused too often.
                        if let Some(seq) = seq {
                            let times = refusals.entry(seq).or_insert(0);
                            *times += 1;
                            if *times >= MAX_REFUSALS {
                                tracing::error!(reason = %why, times = *times, "a message the broker keeps refusing is dropped");
                                metrics::counter!(crate::metrics::REFUSED_BY_BROKER).increment(1);
                                refusals.remove(&seq);
                                if let Err(err) = shared.outbox.ack(vec![seq]).await {
                                    tracing::warn!(error = %err, "cannot drop the refused message");
                                }
                            }
                        }
                        tracing::warn!(reason = %why, "reconnecting after a refused message");
                        set_status(shared, |s| s.last_error = Some(why));
                        tokio::select! {
                            () = shutdown.cancelled() => return Ended::Shutdown,
                            () = tokio::time::sleep(backoff.next_delay()) => {}
                        }
                        continue;
                    }
                    Err(Broken::Renew) => {
                        tracing::info!("reconnecting with a new SAS token before this one expires");
                        disconnect(&client, &mut events).await;
                        continue;
                    }
                    Err(Broken::Reprovision) => {
                        disconnect(&client, &mut events).await;
                        return Ended::Reprovision;
                    }
                    Err(Broken::Lost(why)) => format!("{broker}: {why}"),
                }
            }
            Ok(other) => format!("the broker answered CONNECT with {other:?}"),
            Err(Failure::Auth(code)) => {
                let fix = match &shared.settings.endpoint {
                    Endpoint::Azure(_) => "Check [uplink.azure] (the key, the device at its hub)",
                    _ => "Fix uplink.username/password (or the assignment)",
                };
                let why = format!(
                    "the broker {broker} refused the credentials ({code}); not retrying. \
                     {fix} and restart"
                );
                set_status(shared, |s| s.last_error = Some(why.clone()));
                refused[index] = Some(Ended::AuthRefused(why.clone()));
                why
            }
            Err(failure @ (Failure::Unsupported(_) | Failure::NoConnAck(_)))
                if auto && said_no[index].try_other(&failure, protocol, spoke[index]) =>
            {
                // Perhaps a broker that does not speak this version: the other next.
                let other = other_version(protocol);
                let unsupported_now = matches!(failure, Failure::Unsupported(_));
                let text = failure.text();
                tracing::info!(broker = %broker, mqtt = protocol.name(), reason = %text, "trying MQTT {} with this broker next", other.name());
                versions[index] = other;
                if unsupported_now {
                    continue;
                }
                format!(
                    "{broker} closed the connection before accepting it ({text}){}",
                    tls_advice(&text)
                )
            }
            Err(Failure::Unsupported(code)) => {
                let hint = if protocol == Protocol::V5 {
                    " (uplink.protocol = \"5\"; \"auto\" falls back to 3.1.1)"
                } else {
                    ""
                };
                let why = format!(
                    "the broker {broker} does not speak MQTT {}{hint} ({code}); not retrying",
                    protocol.name()
                );
                refused[index] = Some(Ended::Fatal(why.clone()));
                why
            }
            Err(Failure::Fatal(code)) => {
                let why =
                    format!("the broker {broker} refused the connection ({code}); not retrying");
                refused[index] = Some(Ended::Fatal(why.clone()));
                why
            }
            Err(Failure::NoConnAck(text)) => {
                // A 3.1.1-only broker answers an MQTT 5 CONNECT in 3.1.1's words (a CONNACK
                // an MQTT 5 client cannot read) and closes. Other causes close early too,
                // so this is retried; with "5" fixed, and a broker that never spoke 5 with
                // the gateway (not one restarting), the likely cause is said.
                let hint = if protocol == Protocol::V5 && !auto && spoke[index] != Some(protocol) {
                    "; a broker that does not speak MQTT 5 does so: uplink.protocol = \"auto\" \
                     falls back to 3.1.1"
                } else {
                    ""
                };
                format!(
                    "{broker} closed the connection before accepting it ({text}){}{hint}",
                    tls_advice(&text)
                )
            }
            Err(Failure::Other(text)) => {
                format!("cannot reach {broker}: {text}{}", tls_advice(&text))
            }
        };
        // Refused for good by every broker there is: stop, saying why.
        if refused.iter().all(Option::is_some) {
            return refused[index].take().unwrap_or(Ended::Fatal(why));
        }
        tracing::warn!(reason = %why, mqtt = protocol.name(), "uplink down");
        set_status(shared, |s| {
            s.state = LinkState::Connecting;
            s.last_error = Some(why.clone());
        });
        if brokers.len() > 1 {
            // The next broker (that has not refused us) at once; a pause only after each
            // of them failed in turn.
            let from = index;
            loop {
                index = (index + 1) % brokers.len();
                if refused[index].is_none() || index == from {
                    break;
                }
            }
            if index != from {
                set_status(shared, |s| s.failovers += 1);
            }
            if index > from {
                tracing::info!(broker = %brokers[index], "trying the next broker");
                continue;
            }
        }
        let since = *failing_since.get_or_insert_with(Instant::now);
        if registration && since.elapsed() >= shared.settings.reregister_after {
            return Ended::Unreachable(why);
        }
        let delay = backoff.next_delay();
        tokio::select! {
            () = shutdown.cancelled() => return Ended::Shutdown,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// The other MQTT version.
fn other_version(protocol: Protocol) -> Protocol {
    match protocol {
        Protocol::V5 => Protocol::V311,
        Protocol::V311 => Protocol::V5,
    }
}

/// The MQTT versions one broker said it does not speak (`auto`).
#[derive(Clone, Copy, Debug, Default)]
struct VersionsRefused {
    v311: bool,
    v5: bool,
}

impl VersionsRefused {
    fn refused(self, protocol: Protocol) -> bool {
        match protocol {
            Protocol::V311 => self.v311,
            Protocol::V5 => self.v5,
        }
    }

    /// After an attempt with `protocol` failed with `failure`: whether to try the other
    /// version next. A refusal of the version ("unacceptable protocol version") is
    /// remembered and the other is tried unless it was refused too (then the broker speaks
    /// neither). A connection closed before CONNACK by a broker that never accepted this
    /// version may be one that does not speak it, or one restarting or overloaded: the
    /// other is tried, again each time (never one the broker refused), so a broker that
    /// closes early on both does not leave the gateway on the version it does not speak.
    fn try_other(
        &mut self,
        failure: &Failure,
        protocol: Protocol,
        spoke: Option<Protocol>,
    ) -> bool {
        let other = other_version(protocol);
        match failure {
            Failure::Unsupported(_) => {
                match protocol {
                    Protocol::V311 => self.v311 = true,
                    Protocol::V5 => self.v5 = true,
                }
                !self.refused(other)
            }
            Failure::NoConnAck(_) => spoke != Some(protocol) && !self.refused(other),
            _ => false,
        }
    }
}

/// Words for the operator after a TLS failure whose cause is in the config.
fn tls_advice(error: &str) -> &'static str {
    if error.contains("invalid peer certificate") {
        ". The broker's certificate is not trusted: check uplink.ca_file (absent: the \
         system's CAs) and that the broker URL names a host the certificate is for"
    } else if error.contains("CertificateRequired") {
        ". The broker asks for a client certificate: set uplink.client_cert and \
         uplink.client_key"
    } else {
        ""
    }
}

/// Which dialect a connection speaks.
enum Dialect {
    /// Outpost's MQTT contract.
    Outpost,
    /// IoT Hub's, as the device `device_id`; `renew_at` is when the token needs renewing.
    Azure {
        device_id: String,
        renew_at: Option<tokio::time::Instant>,
    },
}

/// Why a connection ended other than by shutdown.
enum Broken {
    /// Lost, in words.
    Lost(String),
    /// The SAS token is about to expire: connect again with a new one.
    Renew,
    /// The cloud asked the gateway to provision again.
    Reprovision,
    /// The first of several brokers answers again: move back to it.
    Preferred,
    /// The broker refused a message for now (MQTT 5 PUBACK).
    Refused {
        /// The message's outbox seq (none for a status publish).
        seq: Option<i64>,
        /// The reason and what to do.
        why: String,
    },
}

/// One connection as the pump drives it.
struct Connection<'a> {
    client: &'a Client,
    /// Unix milliseconds since connected.
    since: i64,
    dialect: &'a Dialect,
    /// On a standby: the first broker, and how often to probe it.
    prefer: Option<(&'a BrokerAddr, Duration)>,
    /// MQTT 5: the largest packet the broker takes.
    max_packet: Option<u32>,
}

impl From<String> for Broken {
    fn from(why: String) -> Self {
        Self::Lost(why)
    }
}

/// Sends DISCONNECT and lets it go out (bounded), so the broker does not send our will.
pub(crate) async fn disconnect(client: &Client, events: &mut Events) {
    client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while events.poll().await.is_ok() {}
    })
    .await;
}

/// Runs one connection: drains the outbox, dispatches what arrives. `Ok` on shutdown,
/// `Err` when the connection broke or must be made again.
async fn pump(
    shared: &Arc<Shared>,
    connection: &Connection<'_>,
    events: &mut Events,
    shutdown: &CancellationToken,
) -> Result<(), Broken> {
    let Connection {
        client,
        since,
        dialect,
        prefer,
        max_packet,
    } = *connection;
    let gateway = shared.settings.gateway_id.clone();
    // On a standby broker: probe the first in the background, every `backoff_max`.
    let probing = CancellationToken::new();
    let _stop_probing = probing.clone().drop_guard();
    let mut first_answers = match prefer {
        Some((first, every)) => {
            let (found, answer) = oneshot::channel();
            tokio::spawn(probe(first.clone(), every, found, probing));
            Some(answer)
        }
        None => None,
    };
    let outbox = &shared.outbox;
    let window = shared.settings.window.max(1);
    // Every QoS 1 publish handed to the connection gets its packet id in an Event::Sent,
    // in the order handed over: `handed` holds the outbox seqs in that order,
    // `in_flight` maps packet ids to seqs until the PUBACK.
    let mut handed: VecDeque<i64> = VecDeque::new();
    let mut in_flight: HashMap<u16, i64> = HashMap::new();
    let counts = crate::metrics::Delivery::new();
    let mut cursors = [0i64; 3];
    let mut exhausted = false;
    // IoT Hub's twin requests of this connection: `get-N` and `patch-N`.
    let mut next_rid = 0u64;
    // The newest twin GET answered on this connection.
    let mut last_get = 0u64;
    let mut rid = |kind: &str| {
        next_rid += 1;
        format!("{kind}-{next_rid}")
    };
    let renew_at = match dialect {
        Dialect::Azure { renew_at, .. } => *renew_at,
        Dialect::Outpost => None,
    };

    let (acks_tx, acks) = mpsc::unbounded_channel::<i64>();
    let acker = tokio::spawn(acker(outbox.clone(), acks));
    // While this connection drains the outbox, telemetry is paced to it: a backlog of
    // one window (on top of the window in flight) keeps the publisher busy without
    // growing a queue, and every record's latency with it, when devices post faster
    // than the broker takes.
    let _pacing = outbox.pacing(window);
    let result = async {
        let subscriptions = match dialect {
            Dialect::Outpost => topics::gateway_subscriptions(&gateway),
            Dialect::Azure { device_id, .. } => azure::subscriptions(device_id),
        };
        for filter in subscriptions {
            client.subscribe(filter).await?;
        }
        let online = status_payload(shared, "online", since);
        let (topic, payload, retain) = status_message(dialect, &gateway, online, &rid("patch"));
        publish_direct(client, &mut handed, topic, payload, retain).await?;
        if let Dialect::Azure { .. } = dialect {
            // The whole twin: the desired state may have changed while we were away.
            let get = outpost_azure::topics::twin_get(&rid("get"));
            publish_direct(client, &mut handed, get, Vec::new(), false).await?;
            // The device summaries again once the twin has answered: a patch may have
            // been lost with the connection.
            lock(&shared.twin_devices).reconnected();
        }
        queue_after_connect(shared).await;
        // Registered once, not at each turn of the loop (a turn per event under load).
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);
        loop {
            let room = window.saturating_sub(in_flight.len() + handed.len());
            if !exhausted && room >= window.min(64) {
                let batch = outbox
                    .fetch(&mut cursors, room)
                    .await
                    .map_err(|e| format!("reading the outbox: {e}"))?;
                if batch.len() < room {
                    exhausted = true;
                }
                let now = now_millis();
                for mut message in batch {
                    // MQTT 5: a message larger than the broker takes would end the
                    // connection each time it is sent: said, counted and dropped.
                    if let Some(max) = max_packet
                        && message.topic.len() + message.payload.len() + 512 > max as usize
                    {
                        tracing::error!(topic = %message.topic, bytes = message.payload.len(), max, "a message larger than the broker takes is dropped");
                        metrics::counter!(crate::metrics::REFUSED_BY_BROKER).increment(1);
                        let _ = acks_tx.send(message.seq);
                        continue;
                    }
                    handed.push_back(message.seq);
                    // MQTT 5: the message's own time to live goes with it (rounded up), so
                    // the broker drops what went stale while the backend was away; not
                    // retained state, which must stay at the broker.
                    let expiry = if message.retain {
                        None
                    } else {
                        u32::try_from(((message.expires_at - now).max(1) + 999) / 1_000).ok()
                    };
                    let (topic, payload, retain) = match dialect {
                        // The payload is shared (Bytes), not copied.
                        Dialect::Outpost => (
                            std::mem::take(&mut message.topic),
                            message.payload.clone(),
                            message.retain,
                        ),
                        Dialect::Azure { device_id, .. } => {
                            let (topic, payload) = azure::outgoing(
                                &gateway,
                                device_id,
                                &message.message_id,
                                &message.topic,
                                &message.payload,
                                &rid("patch"),
                                &mut lock(&shared.twin_devices),
                            );
                            (topic, payload, false)
                        }
                    };
                    let extras = mqtt::Extras {
                        message_id: Some(&message.message_id),
                        schema: mqtt::schema_of(&message.payload),
                        expiry,
                    };
                    client.publish(topic, payload, retain, extras).await?;
                }
                if let Dialect::Azure { .. } = dialect {
                    publish_twin_devices(shared, client, &mut handed, &rid("devices")).await?;
                }
                continue;
            }
            tokio::select! {
                () = &mut cancelled => {
                    let book = Book { handed: &mut handed, in_flight: &mut in_flight, acks: &acks_tx, counts: &counts };
                    sign_off(shared, client, events, dialect, &rid("patch"), book).await;
                    return Ok(());
                }
                () = async { tokio::time::sleep_until(renew_at.unwrap_or_else(tokio::time::Instant::now)).await }, if renew_at.is_some() => {
                    return Err(Broken::Renew);
                }
                () = outbox.committed(), if exhausted => exhausted = false,
                found = async {
                    match first_answers.as_mut() {
                        Some(answer) => answer.await.is_ok(),
                        None => std::future::pending().await,
                    }
                } => {
                    if !found {
                        first_answers = None;
                        continue;
                    }
                    // Leave as at shutdown, so what arrived is not sent again.
                    let book = Book { handed: &mut handed, in_flight: &mut in_flight, acks: &acks_tx, counts: &counts };
                    sign_off(shared, client, events, dialect, &rid("patch"), book).await;
                    return Err(Broken::Preferred);
                }
                event = events.poll() => {
                    let mut event = event;
                    loop {
                        match event {
                            Ok(Event::Publish { topic, payload }) => match dialect {
                                Dialect::Outpost => inbound(shared, &topic, &payload).await,
                                Dialect::Azure { device_id, .. } => {
                                    let answer = azure_inbound(shared, device_id, &topic, &payload, &mut last_get).await;
                                    for (topic, payload) in answer.publish {
                                        publish_direct(client, &mut handed, topic, payload, false).await?;
                                    }
                                    if answer.get_twin {
                                        let get = outpost_azure::topics::twin_get(&rid("get"));
                                        publish_direct(client, &mut handed, get, Vec::new(), false).await?;
                                    }
                                    // The summaries wait for the twin's answer after a connect.
                                    publish_twin_devices(shared, client, &mut handed, &rid("devices")).await?;
                                    if answer.reprovision {
                                        return Err(Broken::Reprovision);
                                    }
                                }
                            },
                            Ok(Event::Disconnect(why)) => {
                                let why = why.unwrap_or_else(|| "the broker closed the session".to_owned());
                                return Err(why.into());
                            }
                            Ok(event) => {
                                if let Some(refused) = track(&event, &mut handed, &mut in_flight, &acks_tx, &counts) {
                                    return Err(Broken::Refused { seq: refused.seq, why: refused.why });
                                }
                            }
                            Err(failure) => {
                                return Err(format!("connection lost: {}", failure.text()).into());
                            }
                        }
                        // What the same read brought (PUBACKs come in bunches) is taken
                        // here rather than each through a new select.
                        match events.queued() {
                            Some(next) => event = Ok(next),
                            None => break,
                        }
                    }
                }
            }
        }
    }
    .await;
    drop(acks_tx);
    let _ = acker.await;
    result
}

/// A connection's publish bookkeeping (see [`track`]).
struct Book<'a> {
    handed: &'a mut VecDeque<i64>,
    in_flight: &'a mut HashMap<u16, i64>,
    acks: &'a mpsc::UnboundedSender<i64>,
    counts: &'a crate::metrics::Delivery,
}

/// Ends a connection on purpose: the offline status, DISCONNECT, and the
/// acknowledgements still on their way taken (bounded, 2 s), so that what arrived is not
/// sent again by the next connection.
async fn sign_off(
    shared: &Shared,
    client: &Client,
    events: &mut Events,
    dialect: &Dialect,
    rid: &str,
    book: Book<'_>,
) {
    let offline = status_payload(shared, "offline", now_millis());
    let (topic, payload, retain) =
        status_message(dialect, &shared.settings.gateway_id, offline, rid);
    let _ = publish_direct(client, book.handed, topic, payload, retain).await;
    client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(event) = events.poll().await {
            let _ = track(&event, book.handed, book.in_flight, book.acks, book.counts);
        }
    })
    .await;
}

/// Connects to `broker` over TCP every `every` until it accepts (then says so on
/// `found`) or `stop`. A TCP accept is the sign the broker is back; should it still
/// refuse MQTT, the gateway moves on to the next broker as after any failure.
async fn probe(
    broker: BrokerAddr,
    every: Duration,
    found: oneshot::Sender<()>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let connect = tokio::net::TcpStream::connect((broker.host.as_str(), broker.port));
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), connect).await {
            let _ = found.send(());
            return;
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Sends the device summaries that changed as one twin patch (untracked: they are sent
/// again after a reconnect or a refusal, and the detail is in the outbox's messages).
async fn publish_twin_devices(
    shared: &Arc<Shared>,
    client: &Client,
    handed: &mut VecDeque<i64>,
    rid: &str,
) -> Result<(), String> {
    let patch = lock(&shared.twin_devices).patch();
    if let Some(patch) = patch {
        let (topic, payload) = azure::reported(&patch, rid);
        publish_direct(client, handed, topic, payload.to_vec(), false).await?;
    }
    Ok(())
}

/// The gateway's status as the dialect publishes it: retained on its own topic, or a
/// patch of the twin's reported properties.
fn status_message(
    dialect: &Dialect,
    gateway: &str,
    payload: Vec<u8>,
    rid: &str,
) -> (String, Vec<u8>, bool) {
    match dialect {
        Dialect::Outpost => (topics::status(gateway), payload, true),
        Dialect::Azure { device_id, .. } => {
            let (topic, payload) = azure::outgoing(
                gateway,
                device_id,
                "",
                &topics::status(gateway),
                &payload.into(),
                rid,
                &mut azure::TwinDevices::default(),
            );
            (topic, payload.to_vec(), false)
        }
    }
}

/// What the session does after something IoT Hub sent.
#[derive(Default)]
struct AzureAnswer {
    /// Publishes to make (method responses).
    publish: Vec<(String, Vec<u8>)>,
    /// Fetch the whole twin (a desired patch arrived).
    get_twin: bool,
    /// Provision again (the `reprovision` method).
    reprovision: bool,
}

/// What IoT Hub sent us.
async fn azure_inbound(
    shared: &Arc<Shared>,
    device_id: &str,
    topic: &str,
    payload: &[u8],
    last_get: &mut u64,
) -> AzureAnswer {
    let mut answer = AzureAnswer::default();
    let message = match azure::inbound(device_id, topic) {
        Ok(message) => message,
        Err(why) => {
            tracing::warn!(topic, reason = %why, "ignoring a message from IoT Hub on a topic we do not know");
            return answer;
        }
    };
    match message {
        azure::Inbound::TwinResponse { status, rid } if rid.starts_with("get-") => {
            if status != 200 {
                tracing::warn!(status, "IoT Hub did not give the twin");
                lock(&shared.twin_devices).seed_unknown();
                return answer;
            }
            // The answer to the newest request wins (the twin changed in between).
            let number = rid["get-".len()..].parse::<u64>().unwrap_or(0);
            if number <= *last_get {
                return answer;
            }
            *last_get = number;
            lock(&shared.twin_devices).seed(payload);
            match azure::desired_of_twin(payload) {
                Ok(desired) => {
                    // The whole twin is the truth: taken even with a lower `$version`
                    // (a new hub after reprovisioning counts from 1 again).
                    if let Err(err) = store_desired(shared, "gateway", &desired, true).await {
                        tracing::warn!(error = %err, "cannot store the desired state");
                    }
                }
                Err(why) => tracing::warn!(reason = %why, "ignoring a twin we cannot read"),
            }
            if device_update(shared).is_some() {
                device_update_goal(shared, payload).await;
            }
        }
        azure::Inbound::TwinResponse { status, rid } => {
            // Refused (too large, throttled, a hub error): the summaries go again after
            // a pause, placed against the twin as a new GET shows it.
            if rid.starts_with("devices-") && status >= 400 {
                lock(&shared.twin_devices).refused(status);
                answer.get_twin = true;
            }
            if status >= 300 {
                tracing::warn!(
                    status,
                    rid,
                    body = %String::from_utf8_lossy(payload),
                    "IoT Hub refused a reported-properties patch"
                );
            }
        }
        azure::Inbound::DesiredPatch => answer.get_twin = true,
        azure::Inbound::Method { name, rid } => {
            let (status, body) = if name == "reprovision" {
                answer.reprovision = true;
                (200, serde_json::json!({ "reprovisioning": true }))
            } else {
                command_answer(shared, &name).await
            };
            answer.publish.push((
                outpost_azure::topics::method_response(i32::from(status), &rid),
                serde_json::to_vec(&body).expect("serialisable"),
            ));
        }
        azure::Inbound::C2d(props) => {
            if props.get("outpost-schema") == Some(schema::DEPLOYMENT) {
                deployment(shared, topic, None, payload).await;
            } else {
                tracing::info!(
                    properties = ?props,
                    bytes = payload.len(),
                    "a cloud-to-device message that is not an Outpost deployment; ignored"
                );
            }
        }
    }
    answer
}

/// Packet-id bookkeeping: a new publish takes the next handed seq; a PUBACK releases its
/// seq for deletion (status publishes are untracked). An MQTT 5 broker may refuse a
/// publish in its PUBACK: one that cannot succeed (not authorised, an invalid topic or
/// payload) is logged and deleted; any other refusal is a reason (returned) to reconnect,
/// after which it goes again.
pub(crate) fn track(
    event: &Event,
    handed: &mut VecDeque<i64>,
    in_flight: &mut HashMap<u16, i64>,
    acks: &mpsc::UnboundedSender<i64>,
    counts: &crate::metrics::Delivery,
) -> Option<Refused> {
    match event {
        Event::Sent(pkid) => {
            counts.published.increment(1);
            if let Some(seq) = handed.pop_front() {
                in_flight.insert(*pkid, seq);
            }
            None
        }
        Event::PubAck { pkid, refused } => {
            counts.acked.increment(1);
            let seq = in_flight.remove(pkid);
            match refused {
                None => {
                    if let Some(seq) = seq.filter(|seq| *seq != UNTRACKED) {
                        let _ = acks.send(seq);
                    }
                    None
                }
                Some(refusal) if refusal.permanent => {
                    tracing::error!(reason = %refusal.why, "a message was refused for good and dropped");
                    metrics::counter!(crate::metrics::REFUSED_BY_BROKER).increment(1);
                    if let Some(seq) = seq.filter(|seq| *seq != UNTRACKED) {
                        let _ = acks.send(seq);
                    }
                    None
                }
                Some(refusal) => Some(Refused {
                    seq: seq.filter(|seq| *seq != UNTRACKED),
                    why: refusal.why.clone(),
                }),
            }
        }
        _ => None,
    }
}

/// A publish the broker refused for now.
pub(crate) struct Refused {
    /// Its outbox seq (none for an untracked publish).
    pub(crate) seq: Option<i64>,
    /// The reason and what to do.
    pub(crate) why: String,
}

pub(crate) async fn publish_direct(
    client: &Client,
    handed: &mut VecDeque<i64>,
    topic: String,
    payload: Vec<u8>,
    retain: bool,
) -> Result<(), String> {
    handed.push_back(UNTRACKED);
    client
        .publish(topic, payload.into(), retain, mqtt::Extras::default())
        .await
}

/// Deletes acknowledged messages in batches.
pub(crate) async fn acker(outbox: Outbox, mut acks: mpsc::UnboundedReceiver<i64>) {
    let mut batch = Vec::with_capacity(4096);
    while acks.recv_many(&mut batch, 4096).await > 0 {
        if let Err(err) = outbox.ack(std::mem::take(&mut batch)).await {
            // They stay queued and go again: at least once.
            tracing::warn!(error = %err, "cannot delete acknowledged messages");
        }
    }
}

/// The Device Update settings, when the profile is `azure-iot` with Device Update.
fn device_update(shared: &Shared) -> Option<&crate::DeviceUpdateSettings> {
    match &shared.settings.endpoint {
        Endpoint::Azure(azure) => azure.device_update.as_ref(),
        _ => None,
    }
}

/// Queues a patch of Device Update's twin component (durable, in order with the
/// rollout reports that follow it).
async fn queue_device_update(shared: &Arc<Shared>, fields: serde_json::Value) {
    let id = contract::message_id();
    let message = Message {
        message_id: id,
        topic: format!(
            "{}/gw/{}/{}",
            contract::ROOT,
            shared.settings.gateway_id,
            azure::ADU_TOPIC
        ),
        payload: serde_json::to_vec(&fields).expect("serialisable"),
        priority: Priority::State,
        retain: false,
        ttl: None,
    };
    if let Err(err) = shared.outbox.enqueue(message).await {
        tracing::warn!(error = %err, "cannot queue a Device Update report");
    }
}

/// Acts on Device Update's goal in a twin (at each connect and after each desired
/// patch): a deployment goes to the inbox once, as the rollout `adu-{workflow}`; a
/// cancel cancels the `adu-` rollouts; either is acknowledged in the component, and a
/// goal that cannot be read is answered 400 and reported failed.
async fn device_update_goal(shared: &Arc<Shared>, twin: &[u8]) {
    use outpost_azure::adu::{self, Goal};
    use serde_json::json;
    let Ok(twin) = serde_json::from_slice::<serde_json::Value>(twin) else {
        return;
    };
    let Some((version, service)) = adu::service_of_twin(&twin) else {
        // No deployment was ever made for this device: nothing can be in progress.
        queue_device_update(shared, json!({ "agent": { "state": adu::state::IDLE } })).await;
        return;
    };
    let merged = |mut a: serde_json::Value, b: serde_json::Value| {
        if let (Some(a), serde_json::Value::Object(b)) = (a.as_object_mut(), b) {
            a.extend(b);
        }
        a
    };
    let (inbox_id, deployment, agent) = match adu::goal(&service) {
        Ok(Goal::Deploy { id, deployment }) => {
            let rollout = format!("{}{id}", azure::ADU_ROLLOUT_PREFIX);
            if !contract::valid_id(&rollout) || rollout.starts_with("adu-cancel-") {
                let why =
                    format!("workflow id {id:?} must be 1-124 characters of A-Z a-z 0-9 . _ : -");
                refuse_goal(shared, &service, version, (400, adu::erc::MALFORMED), &why).await;
                return;
            }
            let du = device_update(shared).expect("only called with Device Update");
            let agent = adu::agent_startup(&du.manufacturer, &du.model, &shared.settings.version);
            if !adu::is_for_agent(
                &deployment.update_manifest,
                &agent["agent"]["deviceProperties"],
            ) {
                let why = format!(
                    "the update is not for this gateway: no compatibility entry matches \
                     manufacturer {:?}, model {:?}",
                    du.manufacturer, du.model
                );
                refuse_goal(
                    shared,
                    &service,
                    version,
                    (200, adu::erc::NO_COMPATIBLE_COMPONENT),
                    &why,
                )
                .await;
                return;
            }
            let deployment = contract::Deployment {
                schema: schema::DEPLOYMENT.into(),
                deployment_id: rollout.clone(),
                manifest: deployment.to_stored(),
                // One wave to every compatible device that ends when each has: Device
                // Update reports one result, failed if any device failed (a pause for
                // the operator would leave the twin in progress for good).
                rollout: json!({ "successThreshold": 0 }),
            };
            let agent = json!({ "agent": {
                "state": adu::state::DEPLOYMENT_IN_PROGRESS,
                "workflow": { "action": adu::ACTION_PROCESS_DEPLOYMENT, "id": id },
            }});
            (rollout, deployment, agent)
        }
        Ok(Goal::Cancel) => {
            let id = format!("adu-cancel-{version}");
            let deployment = contract::Deployment {
                schema: schema::DEPLOYMENT_CANCEL.into(),
                deployment_id: id.clone(),
                manifest: azure::ADU_ROLLOUT_PREFIX.into(),
                rollout: serde_json::Value::Null,
            };
            let agent = json!({ "agent": {
                "state": adu::state::IDLE,
                "workflow": { "action": adu::ACTION_CANCEL, "id": adu::NO_DEPLOYMENT },
            }});
            (id, deployment, agent)
        }
        Err(why) => {
            refuse_goal(shared, &service, version, (400, adu::erc::MALFORMED), &why).await;
            return;
        }
    };
    // Seen before (this twin again after a reconnect or a restart): its rollout reports.
    match shared.inbox.contains(&inbox_id).await {
        Ok(false) => {}
        Ok(true) => return,
        Err(err) => {
            tracing::warn!(error = %err, "cannot read the deployment inbox");
            return;
        }
    }
    if let Err(err) = shared.inbox.receive(&deployment).await {
        tracing::warn!(error = %err, "cannot store a Device Update deployment");
        return;
    }
    tracing::info!(deployment = %inbox_id, "Device Update goal received");
    queue_device_update(
        shared,
        merged(adu::service_ack(&service, version, 200, ""), agent),
    )
    .await;
}

/// Answers a Device Update goal that is not acted on: the acknowledgement `ac` and the
/// agent failed with the extended result code `erc`.
async fn refuse_goal(
    shared: &Arc<Shared>,
    service: &serde_json::Value,
    version: u64,
    (ac, erc): (u16, u32),
    why: &str,
) {
    use outpost_azure::adu;
    tracing::warn!(reason = %why, "refusing a Device Update deployment");
    let mut patch = adu::service_ack(service, version, ac, if ac == 200 { "" } else { why });
    patch["agent"] = serde_json::json!({
        "state": adu::state::FAILED,
        "workflow": service.get("workflow").cloned().unwrap_or_default(),
        "lastInstallResult": adu::install_result(adu::result::FAILURE, erc, why, &[]),
    });
    queue_device_update(shared, patch).await;
}

/// After each connect: the gateway's reported state, and claims made offline.
async fn queue_after_connect(shared: &Arc<Shared>) {
    if let Err(err) = queue_reported(shared).await {
        tracing::warn!(error = %err, "cannot queue the reported state");
    }
    if let Some(du) = device_update(shared) {
        let startup = outpost_azure::adu::agent_startup(
            &du.manufacturer,
            &du.model,
            &shared.settings.version,
        );
        queue_device_update(shared, startup).await;
    }
    let store = shared.outbox.store().clone();
    let gateway = &shared.settings.gateway_id;
    match store.claims(true).await {
        Ok(claims) => {
            for claim in claims {
                let id = contract::message_id();
                let report = contract::ClaimReport {
                    schema: schema::CLAIM_REPORT.into(),
                    message_id: id.clone(),
                    device_id: claim.device_id.clone(),
                    node_id: claim.node_id.clone(),
                    certificate: claim.certificate.clone(),
                    authority: claim.authority.clone(),
                    claimed_at: claim.claimed_at.unix_millis(),
                };
                let queued = shared
                    .outbox
                    .enqueue(Message {
                        message_id: id,
                        topic: topics::claim_report(gateway, &claim.device_id),
                        payload: serde_json::to_vec(&report).expect("serialisable"),
                        priority: Priority::State,
                        retain: false,
                        ttl: None,
                    })
                    .await;
                // Queued is as good as sent: the outbox delivers it.
                match queued {
                    Ok(()) => {
                        let _ = store.mark_claim_reported(&claim.device_id).await;
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, device = %claim.device_id, "cannot queue a claim report");
                    }
                }
            }
        }
        Err(err) => tracing::warn!(error = %err, "cannot read unreported claims"),
    }
}

async fn queue_reported(shared: &Arc<Shared>) -> Result<(), String> {
    let store = shared.outbox.store().clone();
    let devices = store.list_devices().await.map_err(|e| e.to_string())?.len() as u64;
    let status = shared.status.borrow().clone();
    let id = contract::message_id();
    let reported = contract::GatewayReported {
        schema: schema::GATEWAY_REPORTED.into(),
        message_id: id.clone(),
        gateway_id: shared.settings.gateway_id.clone(),
        version: shared.settings.version.clone(),
        desired_version: status.desired_version,
        devices,
        substatus: status.substatus.clone(),
        at: now_millis(),
    };
    shared
        .outbox
        .enqueue(Message {
            message_id: id,
            topic: topics::gateway_reported(&shared.settings.gateway_id),
            payload: serde_json::to_vec(&reported).expect("serialisable"),
            priority: Priority::State,
            retain: true,
            ttl: None,
        })
        .await
        .map_err(|e| e.to_string())
}

/// What the cloud sent us.
async fn inbound(shared: &Arc<Shared>, topic: &str, payload: &[u8]) {
    let gateway = &shared.settings.gateway_id;
    let prefix = format!("{}/gw/{gateway}/", contract::ROOT);
    let Some(rest) = topic.strip_prefix(&prefix) else {
        tracing::warn!(topic, "ignoring a message on a topic outside our namespace");
        return;
    };
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        ["desired", target] => match serde_json::from_slice::<DesiredState>(payload) {
            Ok(desired) => {
                if let Err(err) = store_desired(shared, target, &desired, false).await {
                    tracing::warn!(error = %err, target, "cannot store desired state");
                }
            }
            Err(err) => tracing::warn!(topic, error = %err, "ignoring malformed desired state"),
        },
        ["commands", rid] => command(shared, rid, payload).await,
        ["deployments", id] => deployment(shared, topic, Some(id), payload).await,
        ["claims", rid, "res"] => {
            match serde_json::from_slice::<contract::ClaimResponse>(payload) {
                Ok(response) => {
                    let waiting = shared.claims.lock().expect("claims lock").remove(*rid);
                    match waiting {
                        Some(answer) => {
                            let _ = answer.send(response);
                        }
                        None => tracing::debug!(
                            rid,
                            "a claim response nobody waits for (timed out or redelivered)"
                        ),
                    }
                }
                Err(err) => {
                    tracing::warn!(topic, error = %err, "ignoring a malformed claim response");
                }
            }
        }
        _ => tracing::warn!(topic, "ignoring a message on an unknown topic"),
    }
}

/// A deployment from the cloud into the inbox; `id` is the one its topic names.
async fn deployment(shared: &Arc<Shared>, topic: &str, id: Option<&str>, payload: &[u8]) {
    match serde_json::from_slice::<contract::Deployment>(payload) {
        // Only deployments come from the wire: a cancel is the gateway's own (Device
        // Update's), and `adu-` ids are Device Update's rollouts.
        Ok(deployment) if deployment.schema != schema::DEPLOYMENT => tracing::warn!(
            topic,
            schema = %deployment.schema,
            "ignoring a deployment whose schema is not {}",
            schema::DEPLOYMENT
        ),
        Ok(deployment)
            if deployment
                .deployment_id
                .starts_with(contract::ADU_ROLLOUT_PREFIX) =>
        {
            tracing::warn!(
                topic,
                "ignoring a deployment whose id starts with {:?} (reserved for Device Update)",
                contract::ADU_ROLLOUT_PREFIX
            );
        }
        Ok(deployment)
            if contract::valid_id(&deployment.deployment_id)
                && id.is_none_or(|id| deployment.deployment_id == id) =>
        {
            match shared.inbox.receive(&deployment).await {
                Ok(()) => {
                    tracing::info!(deployment = %deployment.deployment_id, "deployment received");
                }
                Err(err) => tracing::warn!(error = %err, "cannot store a deployment"),
            }
        }
        Ok(_) => tracing::warn!(
            topic,
            "ignoring a deployment whose id does not match its topic or is unusable"
        ),
        Err(err) => tracing::warn!(topic, error = %err, "ignoring a malformed deployment"),
    }
}

/// A command's status and answer body.
async fn command_answer(shared: &Arc<Shared>, name: &str) -> (u16, serde_json::Value) {
    match name {
        "ping" => (200, serde_json::json!({ "pong": now_millis() })),
        "report-state" => match queue_reported(shared).await {
            Ok(()) => (200, serde_json::json!({ "queued": true })),
            Err(err) => (500, serde_json::json!({ "error": err })),
        },
        "outbox-stats" => (
            200,
            serde_json::to_value(shared.outbox.stats()).expect("serialisable"),
        ),
        other => (
            404,
            serde_json::json!({ "error": format!("unknown command {other:?}") }),
        ),
    }
}

async fn command(shared: &Arc<Shared>, rid: &str, payload: &[u8]) {
    if !contract::valid_id(rid) {
        tracing::warn!(rid, "ignoring a command with an unusable request id");
        return;
    }
    let (status, body) = match serde_json::from_slice::<contract::Command>(payload) {
        Err(err) => (
            400,
            serde_json::json!({ "error": format!("malformed command: {err}") }),
        ),
        Ok(cmd) => command_answer(shared, &cmd.name).await,
    };
    let id = contract::message_id();
    let result = contract::CommandResult {
        schema: schema::COMMAND_RESULT.into(),
        message_id: id.clone(),
        rid: rid.into(),
        status,
        body,
    };
    let queued = shared
        .outbox
        .enqueue(Message {
            message_id: id,
            topic: topics::command_result(&shared.settings.gateway_id, rid),
            payload: serde_json::to_vec(&result).expect("serialisable"),
            priority: Priority::Control,
            retain: false,
            ttl: None,
        })
        .await;
    if let Err(err) = queued {
        tracing::warn!(error = %err, rid, "cannot queue a command result");
    }
}

/// Stores a desired state: a newer version than held (`whole`: any other version or
/// body, when it is the whole of the cloud's record, such as a twin).
pub(crate) async fn store_desired(
    shared: &Arc<Shared>,
    target: &str,
    desired: &DesiredState,
    whole: bool,
) -> Result<(), String> {
    if !contract::valid_id(target) {
        return Err(format!("{target:?} is not a valid target"));
    }
    let store = shared.outbox.store().clone();
    let (target_owned, version, body) = (
        target.to_owned(),
        i64::try_from(desired.version).map_err(|_| "version too large".to_owned())?,
        desired.body.to_string(),
    );
    let newer = store
        .call(move |conn| {
            let changed = conn.execute(
                "INSERT INTO desired_state (target, version, body, received_at) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (target) DO UPDATE SET version = excluded.version, body = excluded.body, \
                 received_at = excluded.received_at WHERE excluded.version > desired_state.version \
                 OR (?5 AND (excluded.version != desired_state.version OR excluded.body != desired_state.body))",
                params![target_owned, version, body, now_millis(), whole],
            )?;
            Ok(changed > 0)
        })
        .await
        .map_err(|e| e.to_string())?;
    if newer && target == "gateway" {
        set_status(shared, |s| {
            s.desired_version = desired.version;
            s.desired = Some(desired.body.clone());
        });
        tracing::info!(version = desired.version, "new desired state");
        queue_reported(shared).await?;
    }
    Ok(())
}

async fn load_desired(shared: &Arc<Shared>, store: &Store) -> Result<(), String> {
    let found = store
        .call(|conn| {
            Ok(conn
                .query_row(
                    "SELECT version, body FROM desired_state WHERE target = 'gateway'",
                    [],
                    |row| Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?)),
                )
                .optional()?)
        })
        .await
        .map_err(|e| e.to_string())?;
    if let Some((version, body)) = found {
        let body: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
        set_status(shared, |s| {
            s.desired_version = u64::try_from(version).unwrap_or(0);
            s.desired = Some(body);
        });
    }
    Ok(())
}

async fn cached_assignment(store: &Store) -> Result<Option<Assignment>, String> {
    let text = store
        .call(|conn| {
            Ok(conn
                .query_row(
                    "SELECT assignment FROM uplink_assignment WHERE id = 1",
                    [],
                    |row| row.get::<_, String>(0),
                )
                .optional()?)
        })
        .await
        .map_err(|e| e.to_string())?;
    text.map(|text| serde_json::from_str(&text).map_err(|e| e.to_string()))
        .transpose()
}

async fn forget_assignment(store: &Store) -> Result<(), String> {
    store
        .call(|conn| {
            conn.execute("DELETE FROM uplink_assignment", [])?;
            Ok(())
        })
        .await
        .map_err(|e| e.to_string())
}

/// Records a new assignment and applies its reprovisioning outcome:
/// * `deviceDataReset`: the desired state of the gateway and every device is dropped and
///   the enrollment's initial state applied;
/// * `deviceDataMigrated` (and a first assignment): local state is kept;
///
/// and in every case the lobby is announced again on the (possibly new) broker, and the
/// outbox keeps every queued message: it drains to wherever the gateway now belongs.
async fn apply_assignment(
    shared: &Arc<Shared>,
    store: &Store,
    assignment: &Assignment,
) -> Result<(), String> {
    let text = serde_json::to_string(assignment).expect("serialisable");
    let reset = assignment.substatus == "deviceDataReset";
    let initial = assignment.initial_state.clone();
    let applied = store
        .call(move |conn| {
            let tx = conn.transaction()?;
            tx.execute(
                "INSERT INTO uplink_assignment (id, assignment, registered_at) VALUES (1, ?1, ?2) \
                 ON CONFLICT (id) DO UPDATE SET assignment = excluded.assignment, registered_at = excluded.registered_at",
                params![text, now_millis()],
            )?;
            if reset {
                tx.execute("DELETE FROM desired_state", [])?;
            }
            let mut applied = None;
            if let Some(initial) = initial {
                let have: Option<i64> = tx
                    .query_row("SELECT version FROM desired_state WHERE target = 'gateway'", [], |r| r.get(0))
                    .optional()?;
                if have.is_none() {
                    tx.execute(
                        "INSERT INTO desired_state (target, version, body, received_at) VALUES ('gateway', ?1, ?2, ?3)",
                        params![i64::try_from(initial.version).unwrap_or(0), initial.body.to_string(), now_millis()],
                    )?;
                    applied = Some(initial);
                }
            }
            tx.commit()?;
            Ok(applied)
        })
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(
        broker = %assignment.broker,
        substatus = %assignment.substatus,
        policy = ?assignment.policy,
        "registered: assignment recorded"
    );
    if reset {
        set_status(shared, |s| {
            s.desired_version = 0;
            s.desired = None;
        });
    }
    if let Some(initial) = applied {
        set_status(shared, |s| {
            s.desired_version = initial.version;
            s.desired = Some(initial.body.clone());
        });
    }
    announce_lobby(shared, store).await
}

/// One device's lobby event, as an outbox message.
fn lobby_message(gateway: &str, device_id: &str, device_type: &str, state: &str) -> Message {
    let id = contract::message_id();
    let event = contract::LobbyEvent {
        schema: schema::LOBBY.into(),
        message_id: id.clone(),
        device_id: device_id.to_owned(),
        device_type: device_type.to_owned(),
        state: state.to_owned(),
        at: now_millis(),
    };
    Message {
        message_id: id,
        topic: topics::lobby(gateway, device_id),
        payload: serde_json::to_vec(&event).expect("serialisable"),
        priority: Priority::State,
        retain: false,
        ttl: None,
    }
}

/// Queues a lobby event for every device (after a (re)assignment).
async fn announce_lobby(shared: &Arc<Shared>, store: &Store) -> Result<(), String> {
    let devices = store.list_devices().await.map_err(|e| e.to_string())?;
    let gateway = &shared.settings.gateway_id;
    let messages = devices
        .iter()
        .map(|device| {
            lobby_message(
                gateway,
                &device.id,
                &device.device_type,
                &device.state.to_string(),
            )
        })
        .collect();
    shared
        .outbox
        .enqueue_all(messages)
        .await
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod version_tests {
    use super::{Failure, Protocol, VersionsRefused};

    fn closed() -> Failure {
        Failure::NoConnAck("closed by peer".into())
    }

    fn refused() -> Failure {
        Failure::Unsupported("unacceptable protocol version".into())
    }

    #[test]
    fn a_broker_that_closes_early_on_both_versions_is_tried_with_each_in_turn() {
        // A 3.1.1-only broker under load (NATS 2.9 restarting): it closes before CONNACK
        // on 5 and on 3.1.1 alike. The gateway must not stay on 5.
        let mut said = VersionsRefused::default();
        assert!(said.try_other(&closed(), Protocol::V5, None));
        assert!(said.try_other(&closed(), Protocol::V311, None));
        assert!(said.try_other(&closed(), Protocol::V5, None));
        // Once it says 5 is not spoken, 3.1.1 is kept through early closes.
        assert!(said.try_other(&refused(), Protocol::V5, None));
        assert!(!said.try_other(&closed(), Protocol::V311, None));
        // A broker that accepted 3.1.1 before and closes early now is restarting.
        let mut fresh = VersionsRefused::default();
        assert!(!fresh.try_other(&closed(), Protocol::V311, Some(Protocol::V311)));
    }

    #[test]
    fn a_broker_that_refuses_both_versions_is_given_up() {
        let mut said = VersionsRefused::default();
        assert!(said.try_other(&refused(), Protocol::V5, None));
        assert!(!said.try_other(&refused(), Protocol::V311, None));
        assert!(!said.try_other(&Failure::Other("refused".into()), Protocol::V5, None));
    }
}
