//! `cloud-sim`: a reference fleet backend that speaks Outpost's cloud contract
//! (docs/cloud-contract.md) over any MQTT broker.
//!
//! * **Registration service** on `--registration`: checks each request's SAS token against
//!   the enrollment's key, assigns a hub, and applies the enrollment's reprovisioning
//!   policy when the operator moved it (`reassign`): `migrate` copies the gateway's desired
//!   state to the new hub, `reset` starts it from the initial state, `never` keeps the
//!   first hub. Faults for retry tests: `--throttle N` (429 with retry-after),
//!   `--server-errors N` (500).
//! * **Hubs** (`--hub name=mqtt://…`): a subscriber per hub (a persistent session, unless
//!   it shares the load) records everything
//!   gateways send (status, lobby, telemetry, reported state, results, claims) and signs
//!   claim requests with its CA (`--wrong-claim-key` signs a different key, to test that
//!   gateways catch it).
//! * **Operator commands** as JSON lines on stdin: `reassign`, `desired`, `deploy`,
//!   `command`. **Events** as JSON lines on stdout, for tests and demos.
//! * **Scale-out**: several cloud-sim processes share a hub's load as workers
//!   (`--worker NAME`), each gateway message handled by one of them. On an MQTT broker with
//!   MQTT 5 shared subscriptions (`--share GROUP`: `$share/GROUP/outpost/v1/gw/+/#` on an
//!   MQTT 5 connection of the worker's own, Mosquitto, EMQX, HiveMQ); on a NATS cluster through JetStream (`--jetstream NAME=nats://…`): the
//!   workers pull from one durable consumer on the stream NATS's MQTT listener stores every
//!   QoS 1 message in before its PUBACK (`$MQTT_msgs`), acknowledging each message after
//!   handling it, so a killed worker's unacknowledged messages go to the others
//!   (at-least-once from the gateway's PUBACK on, by message id). Each
//!   worker keeps its own state: its claim CA, the enrollments and desired state it was
//!   told; a real backend shares those (a database) and de-duplicates on the message id.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use outpost_uplink::contract::{self, Assignment, DesiredState, ReprovisionPolicy, schema, topics};
use outpost_uplink::{BrokerAddr, sas};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use serde_json::json;
use tokio::io::AsyncBufReadExt;

#[derive(Debug, Parser)]
#[command(name = "cloud-sim", about = "Outpost's reference cloud over MQTT")]
struct Args {
    /// The broker the registration service listens on.
    #[arg(long)]
    registration: Option<String>,
    /// A hub: `name=mqtt://host:port` (repeat for several).
    #[arg(long = "hub", value_name = "NAME=URL")]
    hubs: Vec<String>,
    /// Another broker of hub NAME's cluster, named in its assignments after the hub's own
    /// (repeatable, in order of preference). cloud-sim does not connect to it: give it as
    /// a hub of its own to hear what arrives there.
    #[arg(long = "alternate", value_name = "NAME=URL")]
    alternates: Vec<String>,
    /// An enrollment: `registrationId:base64key:hub[:migrate|reset|never]` (repeatable).
    #[arg(long = "enrollment", value_name = "ID:KEY:HUB[:POLICY]")]
    enrollments: Vec<String>,
    /// The id scope of the enrollments.
    #[arg(long, default_value = "outpost")]
    scope: String,
    /// The initial desired state (JSON body, version 1) of every enrollment.
    #[arg(long, default_value = r#"{"telemetryIntervalSecs":60}"#)]
    initial_desired: String,
    /// Answer the first N registration requests with 429 (retry-after 1 s).
    #[arg(long, default_value_t = 0)]
    throttle: u32,
    /// Answer the first N registration requests with 500.
    #[arg(long, default_value_t = 0)]
    server_errors: u32,
    /// Sign claims for a fresh key instead of the CSR's (a faulty cloud).
    #[arg(long)]
    wrong_claim_key: bool,
    /// Do not print an event per telemetry message (count them in `stats` instead).
    #[arg(long)]
    quiet_telemetry: bool,
    /// Print a short `telemetry` event per telemetry message (gateway, message id, the
    /// body's `t` and the receipt time in µs since the epoch) instead of the full message.
    #[arg(long, conflicts_with = "quiet_telemetry")]
    telemetry_ids: bool,
    /// This process is one worker of several sharing the hubs' load: NAME goes into its
    /// client ids and events.
    #[arg(long, value_name = "NAME")]
    worker: Option<String>,
    /// Subscribe to the hubs as a member of MQTT 5 shared-subscription GROUP
    /// (`$share/GROUP/...` on an MQTT 5 connection with no kept session; the hub's own
    /// connection only publishes): each message goes to one worker of the group.
    #[arg(long, value_name = "GROUP")]
    share: Option<String>,
    /// Take hub NAME's gateway messages from JetStream on these NATS servers
    /// (`NAME=nats://host:port[,nats://…]`) instead of an MQTT subscription; the hub's MQTT
    /// connection (to the cluster's MQTT listener) still publishes.
    #[arg(long = "jetstream", value_name = "NAME=URLS")]
    jetstream: Vec<String>,
    /// Seconds a JetStream message may stay unacknowledged before it is delivered again
    /// (to any worker).
    #[arg(long, default_value_t = 5)]
    ack_wait_secs: u64,
}

struct Enrollment {
    key: String,
    policy: ReprovisionPolicy,
    /// Where the operator wants it.
    hub: String,
    /// Where it was last assigned.
    assigned: Option<String>,
}

struct Cloud {
    args: Args,
    hubs: HashMap<String, (BrokerAddr, AsyncClient)>,
    enrollments: Mutex<HashMap<String, Enrollment>>,
    /// Desired state per gateway, per hub (the "twin" each hub holds).
    desired: Mutex<HashMap<(String, String), DesiredState>>,
    faults: Mutex<(u32, u32)>,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    telemetry: Mutex<u64>,
}

fn emit(event: &serde_json::Value) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{event}");
    let _ = out.flush();
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut jetstream = HashMap::new();
    for spec in &args.jetstream {
        let (name, urls) = spec
            .split_once('=')
            .with_context(|| format!("--jetstream {spec:?}: use name=nats://host:port[,…]"))?;
        let urls: Vec<String> = urls.split(',').map(str::to_owned).collect();
        if urls.iter().any(|url| !url.starts_with("nats://")) {
            bail!("--jetstream {spec:?}: the servers are nats://host:port URLs");
        }
        jetstream.insert(name.to_owned(), urls);
    }
    if args.share.is_some() && !jetstream.is_empty() {
        bail!("--share and --jetstream are two ways to share the load: use one");
    }
    if let Some(group) = &args.share
        && (group.is_empty() || group.contains(['/', '+', '#']))
    {
        bail!("--share {group:?}: name the group without '/', '+' or '#'");
    }
    if (args.share.is_some() || !jetstream.is_empty()) && args.worker.is_none() {
        // Without it every worker connects with the same client id, and the broker keeps
        // taking the connection from one to give it to the next.
        bail!("--share and --jetstream run several workers: name each with --worker NAME");
    }
    let mut hubs = HashMap::new();
    let mut loops = Vec::new();
    for spec in &args.hubs {
        let (name, url) = spec
            .split_once('=')
            .with_context(|| format!("--hub {spec:?}: use name=mqtt://host:port"))?;
        let addr = BrokerAddr::parse(url).map_err(anyhow::Error::msg)?;
        let client_id = match &args.worker {
            Some(worker) => format!("cloud-sim-{name}-{worker}"),
            None => format!("cloud-sim-{name}"),
        };
        // A worker's hub connection keeps no session: it takes in nothing (a shared
        // subscription has a connection of its own; JetStream is pulled), and a kept one
        // would go on queueing for a dead worker.
        let clean = args.share.is_some() || jetstream.contains_key(name);
        let (client, events) = connect(&client_id, &addr, clean);
        hubs.insert(name.to_owned(), (addr, client));
        loops.push((name.to_owned(), events));
    }
    if let Some(name) = jetstream.keys().find(|name| !hubs.contains_key(*name)) {
        bail!("--jetstream {name}=…: no hub named {name:?} (give it with --hub for publishing)");
    }
    for spec in &args.alternates {
        let (name, url) = spec
            .split_once('=')
            .with_context(|| format!("--alternate {spec:?}: use name=mqtt://host:port"))?;
        if !hubs.contains_key(name) {
            bail!("--alternate {spec:?}: no hub named {name:?}");
        }
        BrokerAddr::parse(url).map_err(anyhow::Error::msg)?;
    }
    let mut enrollments = HashMap::new();
    for spec in &args.enrollments {
        let parts: Vec<&str> = spec.split(':').collect();
        let (id, key, hub, policy) = match parts.as_slice() {
            [id, key, hub] => (*id, *key, *hub, ReprovisionPolicy::Migrate),
            [id, key, hub, policy] => (*id, *key, *hub, parse_policy(policy)?),
            _ => bail!("--enrollment {spec:?}: use id:key:hub[:policy]"),
        };
        if !hubs.contains_key(hub) {
            bail!("--enrollment {spec:?}: no hub named {hub:?}");
        }
        enrollments.insert(
            id.to_owned(),
            Enrollment {
                key: key.to_owned(),
                policy,
                hub: hub.to_owned(),
                assigned: None,
            },
        );
    }
    let _: serde_json::Value =
        serde_json::from_str(&args.initial_desired).context("--initial-desired is not JSON")?;
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "cloud-sim claiming CA");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_cert.pem(), ca_key)?;

    let registration = match &args.registration {
        Some(url) => {
            let addr = BrokerAddr::parse(url).map_err(anyhow::Error::msg)?;
            Some(connect("cloud-sim-registration", &addr, true))
        }
        None => None,
    };
    let cloud = Arc::new(Cloud {
        faults: Mutex::new((args.throttle, args.server_errors)),
        args,
        hubs,
        enrollments: Mutex::new(enrollments),
        desired: Mutex::new(HashMap::new()),
        issuer,
        telemetry: Mutex::new(0),
    });

    let mut ready = Vec::new();
    for (name, events) in loops {
        let (tx, rx) = tokio::sync::oneshot::channel();
        ready.push(rx);
        // A shared-subscription member takes in on an MQTT 5 connection of its own.
        let subscribe = !jetstream.contains_key(&name) && cloud.args.share.is_none();
        if let Some(group) = cloud.args.share.clone() {
            let (share_tx, share_rx) = tokio::sync::oneshot::channel();
            ready.push(share_rx);
            let cloud = Arc::clone(&cloud);
            let name = name.clone();
            tokio::spawn(async move {
                if let Err(err) = share_loop(&cloud, &name, &group, share_tx).await {
                    emit(&json!({ "event": "error", "hub": name, "message": format!("{err:#}") }));
                    std::process::exit(1);
                }
            });
        }
        tokio::spawn(hub_loop(Arc::clone(&cloud), name, events, subscribe, tx));
    }
    for (name, urls) in jetstream {
        let (tx, rx) = tokio::sync::oneshot::channel();
        ready.push(rx);
        let cloud = Arc::clone(&cloud);
        tokio::spawn(async move {
            if let Err(err) = jetstream_loop(&cloud, &name, &urls, tx).await {
                emit(&json!({ "event": "error", "hub": name, "message": format!("{err:#}") }));
                std::process::exit(1);
            }
        });
    }
    if let Some((client, events)) = registration {
        let (tx, rx) = tokio::sync::oneshot::channel();
        ready.push(rx);
        tokio::spawn(registration_loop(Arc::clone(&cloud), client, events, tx));
    }
    for rx in ready {
        rx.await
            .context("a broker connection ended before it was ready")?;
    }
    emit(&json!({ "event": "ready" }));

    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            line = lines.next_line() => match line? {
                None => {
                    // stdin closed: keep serving until a signal.
                    terminate.recv().await;
                    break;
                }
                Some(line) if line.trim().is_empty() => {}
                Some(line) => {
                    if let Err(err) = operator(&cloud, &line).await {
                        emit(&json!({ "event": "error", "message": format!("{err:#}") }));
                    }
                }
            },
        }
    }
    Ok(())
}

fn parse_policy(text: &str) -> anyhow::Result<ReprovisionPolicy> {
    Ok(match text {
        "migrate" => ReprovisionPolicy::Migrate,
        "reset" => ReprovisionPolicy::Reset,
        "never" => ReprovisionPolicy::Never,
        other => bail!("unknown reprovisioning policy {other:?}: migrate, reset or never"),
    })
}

fn connect(client_id: &str, addr: &BrokerAddr, clean: bool) -> (AsyncClient, rumqttc::EventLoop) {
    let mut options = MqttOptions::new(client_id, addr.host.clone(), addr.port);
    options.set_keep_alive(Duration::from_secs(10));
    options.set_clean_session(clean);
    options.set_max_packet_size(1 << 20, 1 << 20);
    options.set_inflight(1000);
    AsyncClient::new(options, 10_000)
}

/// A hub's MQTT connection: it publishes, and with `subscribe` it also takes in what the
/// gateways send (as a member of the shared subscription with `--share`).
async fn hub_loop(
    cloud: Arc<Cloud>,
    hub: String,
    mut events: rumqttc::EventLoop,
    subscribe: bool,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    let client = cloud.hubs[&hub].1.clone();
    let filter = format!("{}/gw/+/#", contract::ROOT);
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Incoming::ConnAck(_))) if !subscribe => {
                if let Some(ready) = ready.take() {
                    let _ = ready.send(());
                }
            }
            Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                let _ = client.subscribe(filter.as_str(), QoS::AtLeastOnce).await;
            }
            Ok(Event::Incoming(Incoming::SubAck(_))) => {
                if let Some(ready) = ready.take() {
                    let _ = ready.send(());
                }
            }
            Ok(Event::Incoming(Incoming::Publish(publish))) => {
                on_hub_message(
                    &cloud,
                    &hub,
                    &publish.topic,
                    &publish.payload,
                    publish.retain,
                )
                .await;
            }
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Hub `hub`'s gateway messages as a member of MQTT 5 shared subscription `group`
/// (`$share/GROUP/outpost/v1/gw/+/#`): the broker hands each message to one member. The
/// member keeps no session (clean start, session expiry 0): a kept one would go on taking
/// its share into a queue while the worker is dead. A broker that refuses the shared
/// subscription (not MQTT 5, or shared subscriptions switched off) ends the worker with
/// the reason. After a lost connection it connects and subscribes again.
async fn share_loop(
    cloud: &Arc<Cloud>,
    hub: &str,
    group: &str,
    ready: tokio::sync::oneshot::Sender<()>,
) -> anyhow::Result<()> {
    use rumqttc::v5::mqttbytes::QoS as QoS5;
    use rumqttc::v5::mqttbytes::v5::{Packet, SubscribeReasonCode};
    let filter = format!("$share/{group}/{}/gw/+/#", contract::ROOT);
    let addr = &cloud.hubs[hub].0;
    let worker = cloud.args.worker.as_deref().unwrap_or("worker");
    let mut options = rumqttc::v5::MqttOptions::new(
        format!("cloud-sim-{hub}-{worker}-share"),
        addr.host.clone(),
        addr.port,
    );
    options.set_keep_alive(Duration::from_secs(10));
    options.set_clean_start(true);
    options.set_session_expiry_interval(Some(0));
    options.set_max_packet_size(Some(1 << 20));
    let (client, mut events) = rumqttc::v5::AsyncClient::new(options, 1_000);
    let mut ready = Some(ready);
    loop {
        match events.poll().await {
            Ok(rumqttc::v5::Event::Incoming(Packet::ConnAck(_))) => {
                client
                    .subscribe(filter.as_str(), QoS5::AtLeastOnce)
                    .await
                    .context("subscribing")?;
            }
            Ok(rumqttc::v5::Event::Incoming(Packet::SubAck(ack))) => {
                match ack.return_codes.first() {
                    Some(SubscribeReasonCode::Success(_)) => {}
                    other => bail!(
                        "the broker refused shared subscription {filter} ({other:?}): it \
                         needs MQTT 5 shared subscriptions (Mosquitto 1.6+, EMQX, HiveMQ)"
                    ),
                }
                if let Some(ready) = ready.take() {
                    let _ = ready.send(());
                }
            }
            Ok(rumqttc::v5::Event::Incoming(Packet::Publish(publish))) => {
                let topic = String::from_utf8_lossy(&publish.topic);
                on_hub_message(cloud, hub, &topic, &publish.payload, publish.retain).await;
            }
            Ok(_) => {}
            Err(rumqttc::v5::ConnectionError::ConnectionRefused(code)) => {
                bail!("the broker refused the shared-subscription member's connection ({code:?})")
            }
            // Before the first subscription took, anything but a broker not up yet is a
            // broker that does not take MQTT 5 (a 3.1.1 one answers and closes).
            Err(err)
                if ready.is_some()
                    && !matches!(&err, rumqttc::v5::ConnectionError::Io(e)
                        if e.kind() == std::io::ErrorKind::ConnectionRefused) =>
            {
                bail!(
                    "the broker did not accept the shared-subscription member's MQTT 5 \
                     connection ({err}): --share needs an MQTT 5 broker with shared \
                     subscriptions (Mosquitto 1.6+, EMQX, HiveMQ)"
                )
            }
            // Once it took: the broker restarts; connect and subscribe again.
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn on_hub_message(
    cloud: &Arc<Cloud>,
    hub: &str,
    topic: &str,
    payload: &[u8],
    retained: bool,
) {
    let Some(rest) = topic.strip_prefix(&format!("{}/gw/", contract::ROOT)) else {
        return;
    };
    let parts: Vec<&str> = rest.split('/').collect();
    let gateway = parts[0];
    let kind = match &parts[1..] {
        ["status"] => "status",
        ["reported"] => "gateway-reported",
        ["lobby", _] => "lobby",
        ["telemetry", _] => "telemetry",
        ["reported", _] => "device-reported",
        ["commands", _, "result"] => "command-result",
        ["results", _, _] => "result",
        ["rollouts", _] => "rollout",
        ["claims", rid, "req"] => {
            sign_claim(cloud, hub, gateway, rid, payload).await;
            "claim-request"
        }
        ["claimed", _] => "claim-report",
        // What we publish ourselves comes back on the wildcard: skip it.
        _ => return,
    };
    let body: serde_json::Value =
        serde_json::from_slice(payload).unwrap_or(serde_json::Value::Null);
    if kind == "telemetry" {
        *cloud.telemetry.lock().expect("lock") += 1;
        if cloud.args.quiet_telemetry {
            return;
        }
        if cloud.args.telemetry_ids {
            emit(&json!({
                "event": "telemetry",
                "gateway": gateway,
                "worker": cloud.args.worker,
                "messageId": body.get("messageId"),
                "t": body.pointer("/body/t"),
                "at": std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_micros() as u64)
                    .unwrap_or(0),
            }));
            return;
        }
    }
    emit(&json!({
        "event": "message",
        "worker": cloud.args.worker,
        "hub": hub,
        "gateway": gateway,
        "kind": kind,
        "topic": topic,
        "retained": retained,
        "messageId": body.get("messageId"),
        "deviceId": body.get("deviceId"),
        "body": body,
    }));
}

/// The name of the JetStream stream that captures the gateways' subjects, and of the
/// durable consumer the workers share.
/// The stream NATS's MQTT listener keeps QoS 1 messages in (nats-server's
/// `server/README-MQTT.md`): it stores each QoS 1 PUBLISH there as `$MQTT.msgs.<subject>`
/// and sends the PUBACK only once the store is acknowledged, so a message in it is one the
/// gateway was told is safe. The stream has interest retention: it keeps a message while a
/// consumer whose filter matches it has not acknowledged it.
const MQTT_STREAM: &str = "$MQTT_msgs";
const MQTT_STREAM_PREFIX: &str = "$MQTT.msgs.";
const CONSUMER: &str = "cloud-sim";

/// Hub `hub`'s gateway messages from JetStream: every worker pulls from one durable
/// consumer on NATS's `$MQTT_msgs`, filtered to the gateways' subjects
/// (`$MQTT.msgs.outpost.v1.gw.>`), and acknowledges a message after handling it.
///
/// Why not a stream of our own on `outpost.v1.gw.>`: NATS routes a QoS 1 PUBLISH to the
/// core subject without waiting for any stream to store it, so while such a stream has no
/// leader (a node died: Raft takes seconds to elect another) the gateways' records are
/// acknowledged and never stored. The fleet bench lost thousands that way.
async fn jetstream_loop(
    cloud: &Arc<Cloud>,
    hub: &str,
    urls: &[String],
    ready: tokio::sync::oneshot::Sender<()>,
) -> anyhow::Result<()> {
    use async_nats::jetstream::consumer;
    use futures_util::StreamExt as _;

    let name = match &cloud.args.worker {
        Some(worker) => format!("cloud-sim-{hub}-{worker}"),
        None => format!("cloud-sim-{hub}"),
    };
    let client = async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .connect(urls)
        .await
        .with_context(|| format!("cannot connect to NATS at {}", urls.join(",")))?;
    let context = async_nats::jetstream::new(client);
    let consumer_config = consumer::pull::Config {
        durable_name: Some(CONSUMER.into()),
        filter_subject: format!(
            "{MQTT_STREAM_PREFIX}{}.gw.>",
            contract::ROOT.replace('/', ".")
        ),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_secs(cloud.args.ack_wait_secs),
        max_ack_pending: 20_000,
        ..Default::default()
    };
    // NATS makes `$MQTT_msgs` when the first MQTT client of the account connects (this
    // hub's own MQTT connection, at the latest); the workers start together: one creates
    // the consumer, the others find it (or race and try again while the cluster elects its
    // leader). Once made, the durable consumer outlives the workers: records that arrive
    // while none runs wait for them. Before it was first made, the stream keeps nothing
    // (no interest), so the workers start before the gateways.
    let mut attempt = 0;
    let consumer: consumer::PullConsumer = loop {
        let made = async {
            let stream = context.get_stream(MQTT_STREAM).await?;
            stream
                .get_or_create_consumer(CONSUMER, consumer_config.clone())
                .await
                .map_err(anyhow::Error::from)
        };
        match made.await {
            Ok(consumer) => break consumer,
            Err(err) if attempt < 120 => {
                attempt += 1;
                if attempt % 10 == 0 {
                    emit(&json!({ "event": "retry", "hub": hub, "message": format!("{err:#}") }));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(err) => {
                return Err(err.context(format!(
                    "cannot make consumer {CONSUMER} on NATS's stream {MQTT_STREAM} (is the \
                     cluster's MQTT listener on, and has an MQTT client connected?)"
                )));
            }
        }
    };
    // Small batches and short pulls: a worker holds little that another would have to
    // wait out (the ack wait) if it dies. A missed heartbeat means the pull this worker
    // is waiting on is gone (the node holding the consumer's leader died, or this
    // worker's own node): the client's own next pull would only come 5 s after that
    // pull's expiry (async-nats's fallback timer), 9 s here, so the worker drops the
    // stream and pulls again at once. Messages delivered to the dropped stream and not yet
    // handled come back after the ack wait.
    let mut ready = Some(ready);
    let mut pause = Duration::from_millis(100);
    loop {
        let pulled = consumer
            .stream()
            .max_messages_per_batch(100)
            .expires(Duration::from_secs(4))
            .heartbeat(Duration::from_secs(1))
            .messages()
            .await;
        let mut messages = match pulled {
            Ok(messages) => messages,
            Err(err) => {
                emit(
                    &json!({ "event": "nats", "hub": hub, "message": format!("cannot pull: {err}") }),
                );
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        if let Some(ready) = ready.take() {
            let _ = ready.send(());
        }
        while let Some(message) = messages.next().await {
            let message = match message {
                Ok(message) => message,
                Err(err) => {
                    emit(
                        &json!({ "event": "nats", "hub": hub, "message": format!("{err}; pulling again") }),
                    );
                    break;
                }
            };
            pause = Duration::from_millis(100);
            let topic = subject_to_topic(&message.subject);
            on_hub_message(cloud, hub, &topic, &message.payload, false).await;
            if let Err(err) = message.ack().await {
                emit(&json!({ "event": "nats", "hub": hub, "message": format!("ack: {err}") }));
            }
        }
        // The stream ended or failed: a short pause so a consumer that keeps failing
        // (deleted, a limit refused) does not spin, then a new pull.
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

/// An MQTT topic back from the subject NATS's MQTT listener stored it under in
/// `$MQTT_msgs` (`$MQTT.msgs.` and the core subject, where `/` was made `.` and a `.` in
/// the topic `//`).
fn subject_to_topic(subject: &str) -> String {
    let subject = subject.strip_prefix(MQTT_STREAM_PREFIX).unwrap_or(subject);
    let mut topic = String::with_capacity(subject.len());
    let mut chars = subject.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '/' if chars.peek() == Some(&'/') => {
                chars.next();
                topic.push('.');
            }
            '.' => topic.push('/'),
            c => topic.push(c),
        }
    }
    topic
}

async fn sign_claim(cloud: &Arc<Cloud>, hub: &str, gateway: &str, rid: &str, payload: &[u8]) {
    let answer = match serde_json::from_slice::<contract::ClaimRequest>(payload) {
        Err(err) => (400, None, Some(format!("malformed claim request: {err}"))),
        Ok(request) => match sign_csr(cloud, &request) {
            Ok(cert) => (200, Some(cert), None),
            Err(err) => (400, None, Some(format!("{err:#}"))),
        },
    };
    let response = contract::ClaimResponse {
        schema: schema::CLAIM_RESPONSE.into(),
        rid: rid.into(),
        status: answer.0,
        certificate: answer.1,
        error: answer.2,
    };
    emit(
        &json!({ "event": "claim", "hub": hub, "gateway": gateway, "rid": rid, "status": response.status }),
    );
    let client = &cloud.hubs[hub].1;
    let _ = client
        .publish(
            topics::claim_response(gateway, rid),
            QoS::AtLeastOnce,
            false,
            serde_json::to_vec(&response).expect("serialisable"),
        )
        .await;
}

fn sign_csr(cloud: &Cloud, request: &contract::ClaimRequest) -> anyhow::Result<String> {
    let mut csr = rcgen::CertificateSigningRequestParams::from_pem(&request.csr)
        .context("the CSR does not parse or its signature is wrong")?;
    let now = std::time::SystemTime::now();
    csr.params.not_before = now.into();
    csr.params.not_after = (now + Duration::from_secs(365 * 86_400)).into();
    csr.params.is_ca = rcgen::IsCa::ExplicitNoCa;
    if cloud.args.wrong_claim_key {
        let other = rcgen::KeyPair::generate()?;
        return Ok(csr.params.signed_by(&other, &cloud.issuer)?.pem());
    }
    Ok(csr.signed_by(&cloud.issuer)?.pem())
}

async fn registration_loop(
    cloud: Arc<Cloud>,
    client: AsyncClient,
    mut events: rumqttc::EventLoop,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                let _ = client
                    .subscribe(
                        format!("{}/register/+/req", contract::ROOT),
                        QoS::AtLeastOnce,
                    )
                    .await;
            }
            Ok(Event::Incoming(Incoming::SubAck(_))) => {
                if let Some(ready) = ready.take() {
                    let _ = ready.send(());
                }
            }
            Ok(Event::Incoming(Incoming::Publish(publish))) => {
                let Ok(request) =
                    serde_json::from_slice::<contract::RegistrationRequest>(&publish.payload)
                else {
                    emit(&json!({ "event": "registration", "status": 400, "error": "malformed" }));
                    continue;
                };
                let response = register(&cloud, &request).await;
                emit(&json!({
                    "event": "registration",
                    "registrationId": request.registration_id,
                    "status": response.status,
                    "broker": response.assignment.as_ref().map(|a| a.broker.clone()),
                    "substatus": response.assignment.as_ref().map(|a| a.substatus.clone()),
                    "at": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
                }));
                let _ = client
                    .publish(
                        topics::registration_response(&request.registration_id),
                        QoS::AtLeastOnce,
                        false,
                        serde_json::to_vec(&response).expect("serialisable"),
                    )
                    .await;
            }
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn register(
    cloud: &Arc<Cloud>,
    request: &contract::RegistrationRequest,
) -> contract::RegistrationResponse {
    let answer = |status: u16,
                  retry_after: Option<u64>,
                  error: Option<String>,
                  assignment: Option<Assignment>| {
        contract::RegistrationResponse {
            schema: schema::REGISTRATION_RESPONSE.into(),
            rid: request.rid.clone(),
            status,
            retry_after,
            error,
            assignment,
        }
    };
    {
        let mut faults = cloud.faults.lock().expect("lock");
        if faults.0 > 0 {
            faults.0 -= 1;
            return answer(429, Some(1), Some("throttled".into()), None);
        }
        if faults.1 > 0 {
            faults.1 -= 1;
            return answer(500, None, Some("internal error (injected)".into()), None);
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let initial = DesiredState {
        schema: schema::DESIRED.into(),
        version: 1,
        body: serde_json::from_str(&cloud.args.initial_desired).unwrap_or_default(),
    };
    let (hub, substatus, copy_from, publish_initial) = {
        let mut enrollments = cloud.enrollments.lock().expect("lock");
        let Some(enrollment) = enrollments.get_mut(&request.registration_id) else {
            return answer(401, None, Some("no such enrollment".into()), None);
        };
        if let Err(err) = sas::verify(
            &request.sas,
            &enrollment.key,
            &cloud.args.scope,
            &request.registration_id,
            now,
        ) {
            return answer(401, None, Some(err.to_string()), None);
        }
        match (&enrollment.assigned, enrollment.policy) {
            (None, _) => {
                enrollment.assigned = Some(enrollment.hub.clone());
                (enrollment.hub.clone(), "initialAssignment", None, true)
            }
            (Some(old), _) if *old == enrollment.hub => {
                (old.clone(), "initialAssignment", None, false)
            }
            (Some(old), ReprovisionPolicy::Never) => {
                (old.clone(), "initialAssignment", None, false)
            }
            (Some(old), ReprovisionPolicy::Migrate) => {
                let old = old.clone();
                enrollment.assigned = Some(enrollment.hub.clone());
                (
                    enrollment.hub.clone(),
                    "deviceDataMigrated",
                    Some(old),
                    false,
                )
            }
            (Some(_), ReprovisionPolicy::Reset) => {
                enrollment.assigned = Some(enrollment.hub.clone());
                (enrollment.hub.clone(), "deviceDataReset", None, true)
            }
        }
    };
    let gateway = request.registration_id.clone();
    // The new hub's twin: migrated from the old hub, or the initial state.
    let twin = match copy_from {
        Some(old) => cloud
            .desired
            .lock()
            .expect("lock")
            .get(&(old, gateway.clone()))
            .cloned(),
        None if publish_initial => Some(initial.clone()),
        None => None,
    };
    if let Some(twin) = &twin {
        cloud
            .desired
            .lock()
            .expect("lock")
            .insert((hub.clone(), gateway.clone()), twin.clone());
        publish_desired(cloud, &hub, &gateway, twin).await;
    }
    let policy = cloud.enrollments.lock().expect("lock")[&gateway].policy;
    answer(
        200,
        None,
        None,
        Some(Assignment {
            broker: cloud.hubs[&hub].0.to_string(),
            alternates: cloud
                .args
                .alternates
                .iter()
                .filter_map(|spec| spec.split_once('='))
                .filter(|(name, _)| *name == hub)
                .map(|(_, url)| url.to_owned())
                .collect(),
            device_id: gateway.clone(),
            username: None,
            password: None,
            substatus: substatus.into(),
            policy,
            initial_state: publish_initial.then_some(initial),
        }),
    )
}

async fn publish_desired(cloud: &Cloud, hub: &str, gateway: &str, desired: &DesiredState) {
    let _ = cloud.hubs[hub]
        .1
        .publish(
            topics::desired(gateway, "gateway"),
            QoS::AtLeastOnce,
            true,
            serde_json::to_vec(desired).expect("serialisable"),
        )
        .await;
}

/// The gateway's current hub: its assignment, or the only hub.
fn hub_of(cloud: &Cloud, gateway: &str) -> anyhow::Result<String> {
    if let Some(e) = cloud.enrollments.lock().expect("lock").get(gateway)
        && let Some(hub) = &e.assigned
    {
        return Ok(hub.clone());
    }
    if cloud.hubs.len() == 1 {
        return Ok(cloud.hubs.keys().next().expect("one").clone());
    }
    bail!("gateway {gateway:?} has no assignment and there are several hubs; name one with \"hub\"")
}

async fn operator(cloud: &Arc<Cloud>, line: &str) -> anyhow::Result<()> {
    let command: serde_json::Value = serde_json::from_str(line).context("not JSON")?;
    let text = |name: &str| -> anyhow::Result<String> {
        command[name]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("{name:?} missing"))
    };
    let gateway_hub = |gateway: &str| -> anyhow::Result<String> {
        match command["hub"].as_str() {
            Some(hub) => Ok(hub.to_owned()),
            None => hub_of(cloud, gateway),
        }
    };
    match text("cmd")?.as_str() {
        "reassign" => {
            let id = text("registrationId")?;
            let hub = text("hub")?;
            if !cloud.hubs.contains_key(&hub) {
                bail!("no hub {hub:?}");
            }
            cloud
                .enrollments
                .lock()
                .expect("lock")
                .get_mut(&id)
                .with_context(|| format!("no enrollment {id:?}"))?
                .hub = hub.clone();
            emit(&json!({ "event": "reassigned", "registrationId": id, "hub": hub }));
        }
        "desired" => {
            let gateway = text("gateway")?;
            let hub = gateway_hub(&gateway)?;
            let desired = DesiredState {
                schema: schema::DESIRED.into(),
                version: command["version"].as_u64().context("\"version\" missing")?,
                body: command["body"].clone(),
            };
            cloud
                .desired
                .lock()
                .expect("lock")
                .insert((hub.clone(), gateway.clone()), desired.clone());
            publish_desired(cloud, &hub, &gateway, &desired).await;
            emit(
                &json!({ "event": "desired-published", "gateway": gateway, "hub": hub, "version": desired.version }),
            );
        }
        "deploy" => {
            let gateway = text("gateway")?;
            let hub = gateway_hub(&gateway)?;
            let id = text("deploymentId")?;
            let deployment = contract::Deployment {
                schema: schema::DEPLOYMENT.into(),
                deployment_id: id.clone(),
                manifest: text("manifest")?,
                rollout: command["rollout"].clone(),
            };
            cloud.hubs[&hub]
                .1
                .publish(
                    topics::deployment(&gateway, &id),
                    QoS::AtLeastOnce,
                    false,
                    serde_json::to_vec(&deployment)?,
                )
                .await?;
            emit(
                &json!({ "event": "deployment-published", "gateway": gateway, "hub": hub, "deploymentId": id }),
            );
        }
        "command" => {
            let gateway = text("gateway")?;
            let hub = gateway_hub(&gateway)?;
            let rid = text("rid")?;
            let body = json!({ "schema": schema::COMMAND, "name": text("name")?, "args": command["args"] });
            cloud.hubs[&hub]
                .1
                .publish(
                    topics::command(&gateway, &rid),
                    QoS::AtLeastOnce,
                    false,
                    serde_json::to_vec(&body)?,
                )
                .await?;
        }
        "stats" => {
            emit(&json!({ "event": "stats", "telemetry": *cloud.telemetry.lock().expect("lock") }));
        }
        other => bail!("unknown command {other:?}: reassign, desired, deploy, command, stats"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::subject_to_topic;

    #[test]
    fn subjects_map_back_to_the_topics_nats_made_them_from() {
        assert_eq!(
            subject_to_topic("outpost.v1.gw.gw-1.telemetry.esp-1"),
            "outpost/v1/gw/gw-1/telemetry/esp-1"
        );
        // As stored in NATS's `$MQTT_msgs`, which the workers read.
        assert_eq!(
            subject_to_topic("$MQTT.msgs.outpost.v1.gw.gw-1.status"),
            "outpost/v1/gw/gw-1/status"
        );
        // nats-server 2.10 and later carry a '.' of a topic level as "//".
        assert_eq!(
            subject_to_topic("outpost.v1.gw.site//a.telemetry.esp//1"),
            "outpost/v1/gw/site.a/telemetry/esp.1"
        );
        assert_eq!(subject_to_topic(""), "");
    }
}
