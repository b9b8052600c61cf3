//! A fleet on a clustered broker, end to end, with faults: `cargo xtask bench-fleet`, and the
//! gateway's fleet test (`tests/outpost/fleet.rs`, which runs this with debug binaries and
//! checks the summary it writes).
//!
//! 1. A **3-node NATS cluster** (Debian `nats-server`): JetStream and the MQTT listener on
//!    each node, every port on 127.0.0.1, each node started and killed by pid.
//! 2. **cloud-sim as W workers** (`--jetstream`): one durable consumer they all pull from,
//!    on the stream NATS's MQTT listener stores QoS 1 messages in before its PUBACK
//!    (`$MQTT_msgs`, 3 replicas), filtered to the gateways' subjects.
//! 3. **G gateways** (`outpost run`, each its own state dir, port and small config, their
//!    broker lists rotated so that a third starts on each node), D devices each.
//! 4. **Anchor**, with the gateways connected and idle: QoS 1 publishers straight into the
//!    cluster's MQTT listeners, as many as there are gateways, spread over the nodes, the
//!    same number of records as the fleet, counted at the workers: what the cluster and the
//!    workers do without the gateways' work, in this run. Then the devices post telemetry
//!    through the device API (R records per device, `--batch` per POST).
//! 5. **Faults** (`--faults`): at a third of the records the NATS node that leads the
//!    workers' consumer is killed (SIGKILL); the time its gateways take to be connected
//!    elsewhere is taken from their `/api/v1/uplink`, and when the other nodes take MQTT
//!    sessions again from probe clients; the node is started again. Once the workers have
//!    two thirds of the records, one worker is killed.
//!
//! Every record a gateway acknowledged (202, its message id) must reach a worker: counted
//! by distinct message id, 0 lost, none unknown; copies only with a repeated id. Prints the
//! totals, msg/s end to end and its ratio to the anchor, p50/p99 latency (the record's
//! `t` to the worker's receipt), gateway RSS (peak, median and max) and the reconnect
//! times; `--summary FILE` writes them as JSON. Exits non-zero when a record was lost or a
//! gateway did not reconnect within its bound (below).

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use outpost_test_support::{free_port, unix_micros as micros};
use serde_json::json;

type Error = Box<dyn std::error::Error + Send + Sync>;

const ADMIN: &str = "fleet-admin-token-0123456789abcdef";
/// The gateways' reconnect backoff (`[uplink] backoff_max_ms`): the bound on how long a
/// gateway may take to be connected again after its node dies.
const BACKOFF_MAX_MS: u64 = 5_000;
/// How long NATS's MQTT listener waits on a JetStream request (the session lookup of a
/// CONNECT) before it gives up and closes the connection: a gateway's attempt that began
/// while the cluster could not look sessions up fails that much later. 4 s is nats-server
/// 2.9's `mqttJSAPITimeout` (what Debian 12 ships, and what this bench runs); later
/// versions default to 5 s and make it `mqtt { js_api_timeout }`.
const NATS_MQTT_API_TIMEOUT_MS: u64 = 4_000;
/// After a node dies the others take MQTT sessions again only once they elected new
/// leaders (Raft, 4–9 s in nats-server when the dead node led `$MQTT_sess`). The bench
/// measures that moment with probe clients; from then on each gateway of the dead node
/// must be connected within its attempt in flight (the API timeout) and its backoff.
const RECONNECT_BOUND_MS: u64 = NATS_MQTT_API_TIMEOUT_MS + BACKOFF_MAX_MS;

struct Args {
    outpost: PathBuf,
    cloud_sim: PathBuf,
    gateways: usize,
    devices: usize,
    records: usize,
    batch: usize,
    workers: usize,
    faults: bool,
    summary: Option<PathBuf>,
}

fn args() -> Result<Args, Error> {
    let mut args = Args {
        outpost: PathBuf::from("target/release/outpost"),
        cloud_sim: PathBuf::from("target/release/cloud-sim"),
        gateways: 100,
        devices: 20,
        records: 20,
        batch: 1,
        workers: 3,
        faults: false,
        summary: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        if arg == "--faults" {
            args.faults = true;
            continue;
        }
        let value = it.next().ok_or(format!("{arg} needs a value"))?;
        let count = || -> Result<usize, Error> {
            match value.parse::<usize>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(format!("{arg} takes a count above zero, not {value:?}").into()),
            }
        };
        match arg.as_str() {
            "--outpost" => args.outpost = value.clone().into(),
            "--cloud-sim" => args.cloud_sim = value.clone().into(),
            "--gateways" => args.gateways = count()?,
            "--devices" => args.devices = count()?,
            "--records" => args.records = count()?,
            "--batch" => {
                args.batch = count()?;
                if args.batch > 100 {
                    return Err("--batch takes 1 to 100 records per POST".into());
                }
            }
            "--workers" => args.workers = count()?,
            "--summary" => args.summary = Some(value.clone().into()),
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    if args.faults && args.workers < 2 {
        return Err("--faults kills a worker: give --workers 2 or more".into());
    }
    Ok(args)
}

/// Waits until something listens on 127.0.0.1:`port`, without holding up the runtime's
/// threads (a node is started again while the devices post).
async fn wait_listening(port: u16, what: &str, within: Duration) -> Result<(), Error> {
    let end = Instant::now() + within;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if Instant::now() > end {
            return Err(format!("{what} did not listen on 127.0.0.1:{port}").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// `command` with its child killed (SIGKILL) when the thread that spawns it ends: every
/// child is spawned from `run` on the main thread, so however this process ends (a signal,
/// a test harness's timeout) no node, worker or gateway outlives it.
fn dies_with_us(command: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt as _;
    #[allow(unsafe_code)]
    // SAFETY: the closure runs in the child between fork and exec and calls only
    // prctl(2), which is async-signal-safe; it touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
}

/// A child process killed (SIGKILL) and reaped when dropped.
struct Proc(Option<Child>);

impl Proc {
    fn kill(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    fn pid(&self) -> Option<u32> {
        self.0.as_ref().map(Child::id)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The `nats-server` program: on the PATH, or where Debian puts it (/usr/sbin).
fn nats_server() -> Result<PathBuf, Error> {
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            "nats-server is not installed: apt-get install nats-server (.ci/run and cargo xtask do)"
                .into()
        })
}

/// One node of the NATS cluster.
struct Node {
    name: String,
    mqtt: u16,
    client: u16,
    /// The HTTP monitoring port (`/jsz`: which node leads the consumer).
    monitor: u16,
    config: PathBuf,
    log: PathBuf,
    process: Proc,
}

impl Node {
    async fn start(&mut self) -> Result<(), Error> {
        let binary = nats_server()?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        self.process = Proc(Some(
            dies_with_us(&mut Command::new(binary))
                .arg("-c")
                .arg(&self.config)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()?,
        ));
        wait_listening(self.mqtt, &self.name, Duration::from_secs(30)).await
    }
}

async fn cluster(dir: &Path) -> Result<Vec<Node>, Error> {
    let mut ports = Vec::new();
    for _ in 0..3 {
        ports.push((free_port()?, free_port()?, free_port()?, free_port()?));
    }
    let routes: Vec<String> = ports
        .iter()
        .map(|(_, cluster, _, _)| format!("nats-route://127.0.0.1:{cluster}"))
        .collect();
    let mut nodes = Vec::new();
    for (i, (client, cluster, mqtt, monitor)) in ports.into_iter().enumerate() {
        let name = format!("n{}", i + 1);
        let config = dir.join(format!("{name}.conf"));
        std::fs::write(
            &config,
            format!(
                "server_name: {name}\nlisten: 127.0.0.1:{client}\nhttp: 127.0.0.1:{monitor}\n\
                 jetstream {{ store_dir: \"{store}\", max_memory_store: 64MB, max_file_store: 2GB }}\n\
                 cluster {{ name: outpost-fleet, listen: 127.0.0.1:{cluster}, routes: [{routes}] }}\n\
                 mqtt {{ listen: 127.0.0.1:{mqtt} }}\n",
                store = dir.join(format!("{name}-js")).display(),
                routes = routes.join(", "),
            ),
        )?;
        nodes.push(Node {
            log: dir.join(format!("{name}.log")),
            name,
            mqtt,
            client,
            monitor,
            config,
            process: Proc(None),
        });
    }
    for node in &mut nodes {
        node.start().await?;
    }
    Ok(nodes)
}

/// What the workers received, by message id.
#[derive(Default)]
struct Received {
    copies: HashMap<String, u32>,
    /// Latency of each id's first copy (a later copy is a resend, not a new record).
    latencies: Vec<u64>,
    /// When the last new id arrived.
    last: Option<Instant>,
    by_worker: HashMap<String, u64>,
    /// Records each worker took after one was killed.
    after_kill: HashMap<String, u64>,
    killed: bool,
    /// The anchor is over: a late copy of one of its records is not the fleet's.
    anchor_over: bool,
    errors: Vec<String>,
    /// What the workers said about their NATS connections (missed heartbeats, …).
    notes: Vec<String>,
}

struct Worker {
    process: Proc,
}

async fn start_worker(
    cloud_sim: &Path,
    name: &str,
    nodes: &[Node],
    index: usize,
    received: &Arc<Mutex<Received>>,
) -> Result<Worker, Error> {
    let servers: Vec<String> = nodes
        .iter()
        .map(|n| format!("nats://127.0.0.1:{}", n.client))
        .collect();
    let mut child = dies_with_us(&mut Command::new(cloud_sim))
        .arg("--hub")
        .arg(format!(
            "fleet=mqtt://127.0.0.1:{}",
            nodes[index % nodes.len()].mqtt
        ))
        .arg("--jetstream")
        .arg(format!("fleet={}", servers.join(",")))
        .args(["--worker", name, "--telemetry-ids"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("{}: {e}", cloud_sim.display()))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let mut ready_tx = Some(ready_tx);
    let received = Arc::clone(received);
    let worker = name.to_owned();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            match event["event"].as_str() {
                Some("ready") => {
                    if let Some(ready) = ready_tx.take() {
                        let _ = ready.send(());
                    }
                }
                Some("telemetry") => {
                    let now = Instant::now();
                    let mut r = received.lock().expect("lock");
                    let id = event["messageId"].as_str().unwrap_or_default().to_owned();
                    if r.anchor_over && id.starts_with("anchor-") {
                        continue;
                    }
                    let copies = r.copies.entry(id).or_default();
                    *copies += 1;
                    if *copies == 1 {
                        if let (Some(t), Some(at)) = (event["t"].as_u64(), event["at"].as_u64()) {
                            r.latencies.push(at.saturating_sub(t));
                        }
                        r.last = Some(now);
                    }
                    *r.by_worker.entry(worker.clone()).or_default() += 1;
                    if r.killed {
                        *r.after_kill.entry(worker.clone()).or_default() += 1;
                    }
                }
                Some("nats" | "retry") => {
                    received
                        .lock()
                        .expect("lock")
                        .notes
                        .push(format!("{worker}: {line}"));
                }
                Some("error") => {
                    received
                        .lock()
                        .expect("lock")
                        .errors
                        .push(format!("{worker}: {line}"));
                }
                _ => {}
            }
        }
    });
    let process = Proc(Some(child));
    match tokio::time::timeout(Duration::from_secs(60), ready_rx).await {
        Ok(Ok(())) => {}
        _ => return Err(format!("cloud-sim worker {name} was not ready within 60 s").into()),
    }
    Ok(Worker { process })
}

/// An HTTP/1.1 connection to `addr` (no Nagle), driven on its own task.
async fn connect(
    addr: SocketAddr,
) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, Error> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

/// One HTTP/1.1 request on a fresh connection: (status, JSON body); an error after 10 s.
async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
    body: Option<String>,
) -> Result<(u16, serde_json::Value), Error> {
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut sender = connect(addr).await?;
        send(&mut sender, addr, method, path, token, body).await
    })
    .await
    .map_err(|_| format!("{method} {path} on {addr}: no answer within 10 s"))?
}

async fn send(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
    body: Option<String>,
) -> Result<(u16, serde_json::Value), Error> {
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or_default())))?;
    sender.ready().await?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok((
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    ))
}

/// The node that leads the workers' consumer (from a node's `/jsz` monitoring page): the
/// hardest node to lose, as every worker's waiting pull is held there.
async fn consumer_leader(nodes: &[Node]) -> Result<usize, Error> {
    // While the consumer elects a leader, `/jsz` names none: ask each node in turn for up
    // to 10 s.
    let end = Instant::now() + Duration::from_secs(10);
    let mut k = 0;
    loop {
        let node = &nodes[k % nodes.len()];
        k += 1;
        let addr = SocketAddr::from(([127, 0, 0, 1], node.monitor));
        let answer = request(addr, "GET", "/jsz?consumers=true", "", None).await;
        let leader = answer.as_ref().ok().and_then(|(_, jsz)| {
            jsz["account_details"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|account| account["stream_detail"].as_array().into_iter().flatten())
                .filter(|stream| stream["name"] == "$MQTT_msgs")
                .flat_map(|stream| stream["consumer_detail"].as_array().into_iter().flatten())
                .find(|consumer| consumer["name"] == "cloud-sim")
                .and_then(|consumer| consumer["cluster"]["leader"].as_str())
                .map(str::to_owned)
        });
        if let Some(leader) = leader {
            return nodes
                .iter()
                .position(|node| node.name == leader)
                .ok_or_else(|| {
                    format!("the consumer's leader {leader:?} is none of the nodes").into()
                });
        }
        if Instant::now() > end {
            return Err(format!(
                "no node's /jsz named a leader of consumer cloud-sim within 10 s (last, from {}: {answer:?})",
                node.name
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

struct Gateway {
    id: String,
    api: SocketAddr,
    /// Index of the node its broker list starts with.
    first: usize,
    process: Proc,
}

/// Makes and starts gateway `g`: D claimed devices in its store, a small config.
async fn start_gateway(
    args: &Args,
    dir: &Path,
    nodes: &[Node],
    g: usize,
) -> Result<Gateway, Error> {
    let id = format!("gw-{g:03}");
    let home = dir.join(&id);
    let state = home.join("state");
    std::fs::create_dir_all(&state)?;
    {
        let store = outpost_store::Store::open(state.join("outpost.db")).await?;
        for d in 0..args.devices {
            store
                .upsert_device(outpost_store::NewDevice::new(
                    format!("{id}-dev-{d:02}"),
                    "thermostat",
                    outpost_store::DeviceState::Claimed,
                ))
                .await?;
        }
        store.close().await?;
    }
    let first = g % nodes.len();
    let brokers: Vec<String> = (0..nodes.len())
        .map(|k| {
            format!(
                "\"mqtt://127.0.0.1:{}\"",
                nodes[(first + k) % nodes.len()].mqtt
            )
        })
        .collect();
    let port = free_port()?;
    std::fs::write(
        home.join("outpost.toml"),
        format!(
            "[gateway]\nid = \"{id}\"\nstate_dir = \"state\"\n\
             [api]\nbind = \"127.0.0.1:{port}\"\nmax_connections_per_client = {conns}\nadmin_token = \"{ADMIN}\"\n\
             [cache]\nbind = \"127.0.0.1:0\"\n[ble]\nenabled = false\n[log]\nlevel = \"warn\"\n\
             [uplink]\nbrokers = [{brokers}]\nbackoff_min_ms = 250\nbackoff_max_ms = {BACKOFF_MAX_MS}\n",
            conns = args.devices + 8,
            brokers = brokers.join(", "),
        ),
    )?;
    let log = std::fs::File::create(home.join("outpost.log"))?;
    let process = Proc(Some(
        dies_with_us(&mut Command::new(&args.outpost))
            .arg("--config")
            .arg(home.join("outpost.toml"))
            .arg("run")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("{}: {e}", args.outpost.display()))?,
    ));
    Ok(Gateway {
        id,
        api: format!("127.0.0.1:{port}").parse()?,
        first,
        process,
    })
}

/// A gateway's uplink status (`link` of `/api/v1/uplink`) and outbox.
async fn uplink(gateway: &Gateway) -> Option<serde_json::Value> {
    match request(gateway.api, "GET", "/api/v1/uplink", ADMIN, None).await {
        Ok((200, body)) => Some(body),
        _ => None,
    }
}

fn connected_to(status: &serde_json::Value) -> Option<String> {
    (status["link"]["state"] == "connected")
        .then(|| status["link"]["broker"].as_str().map(str::to_owned))
        .flatten()
}

/// Posts `records` records for one device, `batch` per POST; the acknowledged ids.
async fn device(
    addr: SocketAddr,
    id: String,
    token: String,
    records: usize,
    batch: usize,
    posted: Arc<AtomicUsize>,
) -> Result<Vec<String>, Error> {
    let mut sender = connect(addr).await?;
    let path = format!("/api/v1/devices/{id}/telemetry");
    let mut acked = Vec::with_capacity(records);
    let mut seq = 0;
    while seq < records {
        let n = batch.min(records - seq);
        let body = if batch == 1 {
            json!({ "t": micros(), "seq": seq }).to_string()
        } else {
            let t = micros();
            serde_json::Value::Array(
                (seq..seq + n)
                    .map(|s| json!({ "t": t, "seq": s }))
                    .collect(),
            )
            .to_string()
        };
        let (status, answer) = send(&mut sender, addr, "POST", &path, &token, Some(body)).await?;
        if status != 202 {
            return Err(format!("{id}: telemetry answered {status}: {answer}").into());
        }
        let ids = answer["messageIds"].as_array().ok_or("no messageIds")?;
        acked.extend(ids.iter().filter_map(|v| v.as_str().map(str::to_owned)));
        seq += n;
        posted.fetch_add(n, Ordering::Relaxed);
    }
    Ok(acked)
}

/// Peak resident set and the anonymous part of the current one (the process's own memory;
/// the rest is its executable's pages, shared by every gateway on a host), in KiB
/// (`/proc/PID/status`).
fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("RssAnon:"))
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// The anchor: `n` QoS 1 records published straight into the cluster by `connections`
/// MQTT clients spread over the nodes (as many as there are gateways), shaped like gateway
/// telemetry; msg/s until the workers have them all.
async fn anchor(
    nodes: &[Node],
    n: usize,
    connections: usize,
    received: &Arc<Mutex<Received>>,
) -> Result<f64, Error> {
    let start = Instant::now();
    let per = n.div_ceil(connections);
    let mut publishers = Vec::new();
    let mut ids = Vec::new();
    for k in 0..connections {
        let node = &nodes[k % nodes.len()];
        let count = per.min(n.saturating_sub(k * per));
        let run: Vec<String> = (0..count).map(|i| format!("anchor-{k}-{i}")).collect();
        ids.extend(run.iter().cloned());
        let port = node.mqtt;
        publishers.push(tokio::spawn(async move {
            let mut options = rumqttc::MqttOptions::new(format!("anchor-{k}"), "127.0.0.1", port);
            options.set_inflight(512);
            options.set_keep_alive(Duration::from_secs(30));
            let (client, mut events) = rumqttc::AsyncClient::new(options, 1024);
            let topic = format!("outpost/v1/gw/anchor-{k}/telemetry/dev");
            let sender = tokio::spawn(async move {
                for id in run {
                    let body = json!({ "schema": "outpost.telemetry/1", "messageId": id, "deviceId": "dev", "receivedAt": 0, "body": { "t": micros() } });
                    if client
                        .publish(&topic, rumqttc::QoS::AtLeastOnce, false, body.to_string())
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                client
            });
            let mut acked = 0;
            while acked < count {
                match events.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Incoming::PubAck(_))) => acked += 1,
                    Ok(_) => {}
                    Err(e) => return Err(format!("anchor publisher {k}: {e}")),
                }
            }
            let client = sender.await.map_err(|e| e.to_string())?;
            let _ = client.disconnect().await;
            Ok(())
        }));
    }
    for publisher in publishers {
        tokio::time::timeout(Duration::from_secs(120), publisher)
            .await
            .map_err(|_| "anchor: the broker did not acknowledge within 120 s")???;
    }
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let (have, last) = {
            let r = received.lock().expect("lock");
            (
                ids.iter().filter(|id| r.copies.contains_key(*id)).count(),
                r.last,
            )
        };
        if have == ids.len() {
            let last = last.unwrap_or_else(Instant::now);
            return Ok(n as f64 / (last - start).as_secs_f64());
        }
        if Instant::now() > end {
            return Err(format!("anchor: the workers got {have} of {} records", ids.len()).into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args = args()?;
    let dir = tempfile::Builder::new()
        .prefix("outpost-fleet-")
        .tempdir()?;
    let result = run(&args, dir.path()).await;
    if result.is_err() {
        // The nodes', workers' and gateways' logs, for the error.
        eprintln!("fleet-bench: the logs are kept in {}", dir.keep().display());
    }
    result
}

/// Waits until `posted` reaches `count`; an error when the devices stopped before (one
/// failed) or after `within`.
async fn wait_posted(
    posted: &AtomicUsize,
    count: usize,
    devices: &[tokio::task::JoinHandle<Result<Vec<String>, Error>>],
    within: Duration,
) -> Result<(), Error> {
    let end = Instant::now() + within;
    while posted.load(Ordering::Relaxed) < count {
        if devices.iter().all(tokio::task::JoinHandle::is_finished) {
            return Err(format!(
                "the devices stopped at {} records, before {count} (one failed)",
                posted.load(Ordering::Relaxed)
            )
            .into());
        }
        if Instant::now() > end {
            return Err(format!("{count} records not posted within {within:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// When the cluster took MQTT sessions again after a node died: probe clients (clean
/// sessions, MQTT 3.1.1) start every 100 ms on the nodes in `ports` until one gets a
/// CONNACK (or for 60 s); the answer is the start (ms after `since`) of the earliest
/// attempt that got one. Each attempt gives up after 6 s, so at most 60 are in flight.
async fn cluster_ready(ports: Vec<u16>, since: Instant) -> Option<u64> {
    let answered = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut attempts = Vec::new();
    let mut k = 0usize;
    while !answered.load(Ordering::Relaxed) && since.elapsed() < Duration::from_secs(60) {
        let port = ports[k % ports.len()];
        let started = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX);
        let answered = Arc::clone(&answered);
        attempts.push(tokio::spawn(async move {
            let mut options =
                rumqttc::MqttOptions::new(format!("fleet-probe-{k}"), "127.0.0.1", port);
            options.set_keep_alive(Duration::from_secs(30));
            let (client, mut events) = rumqttc::AsyncClient::new(options, 10);
            let accepted = tokio::time::timeout(Duration::from_secs(6), async {
                loop {
                    match events.poll().await {
                        Ok(rumqttc::Event::Incoming(rumqttc::Incoming::ConnAck(ack))) => {
                            break ack.code == rumqttc::ConnectReturnCode::Success;
                        }
                        Ok(_) => {}
                        Err(_) => break false,
                    }
                }
            })
            .await
            .unwrap_or(false);
            if accepted {
                answered.store(true, Ordering::Relaxed);
                let _ = client.disconnect().await;
                let _ = tokio::time::timeout(Duration::from_millis(200), events.poll()).await;
            }
            accepted.then_some(started)
        }));
        k += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // An attempt that started earlier may still answer: the earliest start wins.
    let mut ready = None;
    for attempt in attempts {
        if let Ok(Some(started)) = attempt.await {
            ready = Some(ready.map_or(started, |r: u64| r.min(started)));
        }
    }
    ready
}

/// For each gateway in `which`, the milliseconds from `since` until its uplink is
/// connected to a broker other than `lost` (polled in parallel), or an error after `within`.
async fn reconnect_times(
    gateways: &[Gateway],
    which: &[usize],
    lost: &str,
    since: Instant,
    within: Duration,
) -> Result<Vec<u64>, Error> {
    let mut polls = Vec::new();
    for &g in which {
        let api = gateways[g].api;
        let id = gateways[g].id.clone();
        let lost = lost.to_owned();
        polls.push(tokio::spawn(async move {
            let end = since + within;
            loop {
                if let Ok((200, status)) = request(api, "GET", "/api/v1/uplink", ADMIN, None).await
                    && connected_to(&status).is_some_and(|b| b != lost)
                {
                    return Ok(u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX));
                }
                if Instant::now() > end {
                    return Err(id);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    let mut times = Vec::new();
    let mut late = Vec::new();
    for poll in polls {
        match poll.await? {
            Ok(ms) => times.push(ms),
            Err(id) => late.push(id),
        }
    }
    if !late.is_empty() {
        return Err(format!(
            "{} gateways not connected elsewhere {within:?} after their node died: {late:?}",
            late.len()
        )
        .into());
    }
    times.sort_unstable();
    Ok(times)
}

async fn run(args: &Args, dir: &Path) -> Result<(), Error> {
    let total = args.gateways * args.devices * args.records;
    println!(
        "fleet bench: {} gateways x {} devices x {} records ({} per POST) = {total}, {} cloud-sim workers, 3 NATS nodes{}",
        args.gateways,
        args.devices,
        args.records,
        args.batch,
        args.workers,
        if args.faults {
            ", a node and a worker killed on the way"
        } else {
            ""
        }
    );
    let version = Command::new(nats_server()?).arg("--version").output()?;
    println!("  {}", String::from_utf8_lossy(&version.stdout).trim());
    let mut nodes = cluster(dir).await?;
    let received = Arc::new(Mutex::new(Received::default()));
    let mut workers = Vec::new();
    for w in 0..args.workers {
        workers.push(start_worker(&args.cloud_sim, &format!("w{w}"), &nodes, w, &received).await?);
    }

    // The gateways.
    let started = Instant::now();
    let mut gateways = Vec::new();
    for g in 0..args.gateways {
        gateways.push(start_gateway(args, dir, &nodes, g).await?);
    }
    for gateway in &gateways {
        let end = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = uplink(gateway).await
                && connected_to(&status).is_some()
            {
                break;
            }
            if Instant::now() > end {
                return Err(format!(
                    "{} did not connect within 120 s; see {}",
                    gateway.id,
                    dir.join(&gateway.id).join("outpost.log").display()
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    println!(
        "  {} gateways started and connected in {:.1} s",
        gateways.len(),
        started.elapsed().as_secs_f64()
    );
    // The anchor runs with the gateways connected: NATS's MQTT listener keeps a JetStream
    // consumer per QoS 1 subscription of each gateway's session and matches every stored
    // QoS 1 message against them, so the cluster works harder with the fleet on it than
    // empty, and the anchor should pay that as the fleet does.
    let anchor_rate = anchor(&nodes, total, args.gateways, &received).await?;
    println!(
        "  anchor: QoS 1 from {} MQTT clients straight into the cluster -> workers: {anchor_rate:>8.0} msg/s",
        args.gateways
    );
    *received.lock().expect("lock") = Received {
        anchor_over: true,
        ..Received::default()
    };
    let mut tokens = Vec::new();
    for gateway in &gateways {
        for d in 0..args.devices {
            let device = format!("{}-dev-{d:02}", gateway.id);
            let (status, body) = request(
                gateway.api,
                "POST",
                &format!("/api/v1/devices/{device}/credential"),
                ADMIN,
                None,
            )
            .await?;
            let token = body["token"]
                .as_str()
                .ok_or(format!("{device}: credential answered {status}: {body}"))?;
            tokens.push((gateway.id.clone(), gateway.api, device, token.to_owned()));
        }
    }

    // The load, and the faults on the way.
    let posted = Arc::new(AtomicUsize::new(0));
    let load_start = Instant::now();
    let mut devices = Vec::new();
    let mut device_gateway = Vec::new();
    for (gateway_id, api, device_id, token) in tokens {
        device_gateway.push(gateway_id);
        devices.push(tokio::spawn(device(
            api,
            device_id,
            token,
            args.records,
            args.batch,
            Arc::clone(&posted),
        )));
    }
    let mut reconnects: Vec<u64> = Vec::new();
    let mut killed_node = None;
    let mut killed_worker = None;
    let mut on_victim = 0;
    let mut cluster_ready_ms: Option<u64> = None;
    let load_deadline = Duration::from_secs(600);
    let mut worker_kill = None;
    if args.faults {
        // Worker w1 dies once the workers have two thirds of the records, so that a third
        // is still to come for the others to take (when it is posted does not say: the
        // node's death holds records back in the outboxes for an election).
        let w = 1 % workers.len();
        killed_worker = Some(format!("w{w}"));
        let mut process = std::mem::replace(&mut workers[w].process, Proc(None));
        let received = Arc::clone(&received);
        worker_kill = Some(tokio::spawn(async move {
            let end = Instant::now() + load_deadline;
            loop {
                {
                    let mut r = received.lock().expect("lock");
                    if r.copies.len() >= 2 * total / 3 {
                        process.kill();
                        r.killed = true;
                        return Ok(());
                    }
                }
                if Instant::now() > end {
                    return Err(format!(
                        "the workers did not get two thirds of the records within {load_deadline:?}"
                    ));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
        wait_posted(&posted, total / 3, &devices, load_deadline).await?;
        // The node leading the workers' consumer: when it dies, every waiting pull dies
        // with it, whichever node the workers are connected to.
        let victim = consumer_leader(&nodes).await?;
        killed_node = Some(nodes[victim].name.clone());
        let lost_url = format!("mqtt://127.0.0.1:{}", nodes[victim].mqtt);
        // The gateways on the victim when it dies (polled in parallel just before).
        let mut which = Vec::new();
        for (g, gateway) in gateways.iter().enumerate() {
            if let Some(status) = uplink(gateway).await
                && connected_to(&status).as_deref() == Some(lost_url.as_str())
            {
                which.push(g);
            }
        }
        on_victim = which.len();
        let kill_at = Instant::now();
        nodes[victim].process.kill();
        let live: Vec<u16> = (0..nodes.len())
            .filter(|&n| n != victim)
            .map(|n| nodes[n].mqtt)
            .collect();
        let probe = tokio::spawn(cluster_ready(live, kill_at));
        let times = reconnect_times(
            &gateways,
            &which,
            &lost_url,
            kill_at,
            Duration::from_secs(60),
        )
        .await;
        let ready = probe.await?;
        reconnects = times?;
        cluster_ready_ms = Some(ready.ok_or("no probe client got a CONNACK after the node died")?);
        nodes[victim].start().await?;
    }
    let mut acked = HashSet::with_capacity(total);
    // Which gateway acknowledged each record (to say where a lost one went in).
    let mut gateway_of: HashMap<String, String> = HashMap::with_capacity(total);
    for (task, gateway_id) in devices.into_iter().zip(device_gateway) {
        let ids = tokio::time::timeout(load_deadline, task)
            .await
            .map_err(|_| format!("a device did not finish within {load_deadline:?}"))???;
        for id in ids {
            gateway_of.insert(id.clone(), gateway_id.clone());
            acked.insert(id);
        }
    }
    let accepted_in = load_start.elapsed();

    // Every acknowledged record at a worker (a killed worker's unacknowledged ones come
    // again after the consumer's ack wait).
    let end = Instant::now() + Duration::from_secs(180);
    let (missing, unknown) = loop {
        let (missing, unknown) = {
            let r = received.lock().expect("lock");
            let missing = acked
                .iter()
                .filter(|id| !r.copies.contains_key(*id))
                .count();
            let unknown = r
                .copies
                .keys()
                .filter(|id| !id.starts_with("anchor-") && !acked.contains(*id))
                .count();
            (missing, unknown)
        };
        if missing == 0 || Instant::now() > end {
            break (missing, unknown);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The worker was killed once two thirds of the records had arrived; if they never
    // did, that is reported after the lost records, which say why.
    let worker_killed = match worker_kill {
        None => Ok(()),
        Some(mut kill) => match tokio::time::timeout(Duration::from_secs(2), &mut kill).await {
            Ok(joined) => joined.map_err(|e| e.to_string()).and_then(|killed| killed),
            Err(_) => {
                kill.abort();
                Err(
                    "the workers never had two thirds of the records: no worker was killed"
                        .to_owned(),
                )
            }
        },
    };
    let mut returned = 0;
    let mut rss = Vec::new();
    for gateway in &gateways {
        if let Some(status) = uplink(gateway).await
            && connected_to(&status)
                .is_some_and(|b| b.ends_with(&format!(":{}", nodes[gateway.first].mqtt)))
        {
            returned += 1;
        }
        if let Some(pid) = gateway.process.pid() {
            rss.push(rss_kib(pid));
        }
    }
    let r = received.lock().expect("lock");
    let copies: u64 = r.copies.values().map(|&c| u64::from(c)).sum();
    let duplicates = copies - r.copies.len() as u64;
    let mut latencies = r.latencies.clone();
    latencies.sort_unstable();
    let span = match (r.last, load_start) {
        (Some(last), start) => (last - start).as_secs_f64(),
        (None, _) => f64::INFINITY,
    };
    let rate = acked.len() as f64 / span;
    let mut peaks: Vec<u64> = rss.iter().map(|(peak, _)| *peak).collect();
    peaks.sort_unstable();
    let mut anon: Vec<u64> = rss.iter().map(|(_, anon)| *anon).collect();
    anon.sort_unstable();
    // The slowest of the dead node's gateways, counted from when the cluster took sessions
    // again (the gateway cannot be faster than the cluster).
    let after_ready = cluster_ready_ms.map(|ready| {
        reconnects
            .last()
            .copied()
            .unwrap_or(0)
            .saturating_sub(ready)
    });
    let summary = json!({
        "gateways": args.gateways,
        "devicesPerGateway": args.devices,
        "recordsPerDevice": args.records,
        "batch": args.batch,
        "workers": args.workers,
        "acknowledged": acked.len(),
        "received": r.copies.len(),
        "lost": missing,
        "unknown": unknown,
        "duplicates": duplicates,
        "msgPerSec": rate,
        "anchorMsgPerSec": anchor_rate,
        "ratio": rate / anchor_rate,
        "acceptedSecs": accepted_in.as_secs_f64(),
        "latencyP50Ms": percentile(&latencies, 0.5) as f64 / 1000.0,
        "latencyP99Ms": percentile(&latencies, 0.99) as f64 / 1000.0,
        "rssPeakMedianKib": percentile(&peaks, 0.5),
        "rssPeakMaxKib": peaks.last().copied().unwrap_or(0),
        "rssAnonMedianKib": percentile(&anon, 0.5),
        "rssAnonMaxKib": anon.last().copied().unwrap_or(0),
        "killedNode": killed_node,
        "killedWorker": killed_worker,
        "onKilledNode": on_victim,
        "reconnected": reconnects.len(),
        "reconnectMedianMs": percentile(&reconnects, 0.5),
        "reconnectMaxMs": reconnects.last().copied().unwrap_or(0),
        "clusterReadyMs": cluster_ready_ms,
        "reconnectAfterReadyMaxMs": after_ready,
        "backoffMaxMs": BACKOFF_MAX_MS,
        "reconnectBoundMs": RECONNECT_BOUND_MS,
        "returnedToFirst": returned,
        "byWorker": r.by_worker,
        "byWorkerAfterKill": r.after_kill,
        "workerErrors": r.errors,
        "workerNotes": r.notes,
    });
    println!(
        "  acknowledged {} records, received {} distinct ({duplicates} duplicate copies, all with repeated ids), lost {missing}, unknown {unknown}",
        acked.len(),
        r.copies.len()
    );
    println!(
        "  end to end: {rate:>8.0} msg/s = {:.2}x anchor  (accepted in {:.1} s; latency p50 {:.1} ms, p99 {:.1} ms)",
        rate / anchor_rate,
        accepted_in.as_secs_f64(),
        percentile(&latencies, 0.5) as f64 / 1000.0,
        percentile(&latencies, 0.99) as f64 / 1000.0,
    );
    println!(
        "  gateway RSS (peak): median {:.1} MB, max {:.1} MB  (goal <= 20 MB); its own (anonymous) memory at the end: median {:.1} MB, max {:.1} MB",
        percentile(&peaks, 0.5) as f64 / 1024.0,
        peaks.last().copied().unwrap_or(0) as f64 / 1024.0,
        percentile(&anon, 0.5) as f64 / 1024.0,
        anon.last().copied().unwrap_or(0) as f64 / 1024.0,
    );
    if let Some(node) = &killed_node {
        println!(
            "  {node} killed: the other nodes took MQTT sessions again after {} ms; its {} gateways connected elsewhere in median {} ms, max {} ms after the kill, at most {} ms after the cluster was ready (bound {RECONNECT_BOUND_MS} ms: a CONNECT in flight, then the backoff); {returned} of {} back on their first node at the end; worker {} killed",
            cluster_ready_ms.unwrap_or(0),
            reconnects.len(),
            percentile(&reconnects, 0.5),
            reconnects.last().copied().unwrap_or(0),
            after_ready.unwrap_or(0),
            gateways.len(),
            killed_worker.as_deref().unwrap_or("-"),
        );
    }
    println!(
        "  per worker: {:?}; after the kill: {:?}",
        r.by_worker, r.after_kill
    );
    println!(
        "  rerun: cargo xtask bench-fleet -- --gateways {} --devices {} --records {} --batch {}{}",
        args.gateways,
        args.devices,
        args.records,
        args.batch,
        if args.faults { " --faults" } else { "" }
    );
    if let Some(path) = &args.summary {
        std::fs::write(path, serde_json::to_vec_pretty(&summary)?)?;
    }
    if missing > 0 {
        let mut lost_by_gateway: HashMap<&str, usize> = HashMap::new();
        for id in acked.iter().filter(|id| !r.copies.contains_key(*id)) {
            *lost_by_gateway
                .entry(gateway_of.get(id).map_or("?", String::as_str))
                .or_default() += 1;
        }
        let mut lost: Vec<_> = lost_by_gateway.into_iter().collect();
        lost.sort_unstable();
        eprintln!(
            "fleet-bench: lost records by gateway (gw-N starts on node n(N mod 3 + 1)): {lost:?}"
        );
    }
    if missing > 0 || unknown > 0 {
        return Err(format!("{missing} acknowledged records lost, {unknown} unknown").into());
    }
    worker_killed?;
    if after_ready.is_some_and(|ms| ms > RECONNECT_BOUND_MS) {
        return Err(format!(
            "a gateway took longer than {RECONNECT_BOUND_MS} ms after the cluster was ready to reconnect"
        )
        .into());
    }
    Ok(())
}
