//! Telemetry throughput through the gateway, next to raw Mosquitto, in one run.
//!
//! Run with `cargo xtask bench-uplink` (release build), or directly:
//! `cargo run --release -p outpost-uplink-bench -- --outpost target/release/outpost`.
//!
//! 1. **Raw**: a rumqttc publisher sends N QoS 1 messages to a local Mosquitto and a
//!    QoS 1 subscriber receives them; messages/s from first publish to last receipt.
//! 2. **Gateway**: `outpost run` with the uplink on the same broker; C keep-alive HTTP
//!    connections (devices) POST one telemetry record each per request (local API →
//!    durable outbox → Mosquitto QoS 1 → the subscriber). Messages/s, and p50/p99 latency
//!    from the POST to the subscriber's receipt. Run once per connection count in
//!    `--connections` (default 128 and 256, a site's devices): each device waits for its
//!    record to be committed before it posts the next, so the count sets how many records
//!    one group commit can take.
//! 3. **Batched**: the same with `--batch` records (default 100) per POST, a JSON array, over
//!    `--batch-connections` connections (default 8): each record still its own message
//!    with its own id, committed durably as one group.
//!
//! Raw runs before and after the gateway; the ratios are to the faster of the two. With
//! `--rounds R` the gateway runs R times, each round followed by raw again (each round's
//! ratios against the raw runs around it), and the median ratio of each run is printed:
//! on a shared host whose speed drifts, that says more than any one round.
//! Prints each figure and its ratio to raw (goals: per record ≥ 0.5× raw, batched ≥ 1.0×
//! raw, p99 < 50 ms), and for each run the CPU time per message of the gateway, Mosquitto
//! and the bench itself (from `/proc/PID/stat`), with how busy Mosquitto's one thread
//! was: near 100% the broker is the limit.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use outpost_test_support::{free_port, unix_micros as micros};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};

type Error = Box<dyn std::error::Error + Send + Sync>;

struct Args {
    outpost: PathBuf,
    messages: usize,
    connections: Vec<usize>,
    batch: usize,
    batch_connections: usize,
    protocol: String,
    rounds: usize,
}

fn args() -> Result<Args, Error> {
    let mut args = Args {
        outpost: PathBuf::from("target/release/outpost"),
        messages: 200_000,
        connections: vec![128, 256],
        batch: 100,
        batch_connections: 8,
        protocol: "auto".into(),
        rounds: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let value = it.next().ok_or(format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--outpost" => args.outpost = value.into(),
            "--messages" => args.messages = value.parse()?,
            "--connections" => {
                args.connections = value.split(',').map(str::parse).collect::<Result<_, _>>()?;
                if args.connections.is_empty() || args.connections.contains(&0) {
                    return Err("--connections takes counts above zero, e.g. 128,256".into());
                }
            }
            "--batch" => {
                args.batch = value.parse()?;
                if !(1..=100).contains(&args.batch) {
                    return Err("--batch takes 1 to 100 records per POST".into());
                }
            }
            "--batch-connections" => {
                args.batch_connections = value.parse()?;
                if args.batch_connections == 0 {
                    return Err("--batch-connections takes a count above zero".into());
                }
            }
            "--rounds" => {
                args.rounds = value.parse()?;
                if !(1..=9).contains(&args.rounds) {
                    return Err("--rounds takes 1 to 9".into());
                }
            }
            "--protocol" => {
                if !["auto", "3.1.1", "5"].contains(&value.as_str()) {
                    return Err("--protocol takes auto, 3.1.1 or 5".into());
                }
                args.protocol = value;
            }
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    Ok(args)
}

/// CPU time (user + system, all threads) process `pid` has used so far.
fn cpu_time(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // The command name (field 2) may hold spaces; count from the `)` that ends it: the
    // state (field 3) comes first, utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // In clock ticks of USER_HZ, which Linux's ABI fixes at 100 a second for /proc.
    const USER_HZ: u64 = 100;
    Duration::from_millis((field(11) + field(12)) * 1000 / USER_HZ)
}

/// The processes whose CPU time each run reports.
struct Meter(Vec<(&'static str, u32)>);

impl Meter {
    fn snapshot(&self) -> Vec<Duration> {
        self.0.iter().map(|&(_, pid)| cpu_time(pid)).collect()
    }

    /// `"gateway 12.1 µs, Mosquitto 9.0 µs, bench 7.7 µs per message; Mosquitto busy 97%"`.
    fn report(&self, before: &[Duration], messages: usize, wall: Duration) -> String {
        let after = self.snapshot();
        let mut parts = Vec::new();
        let mut broker_busy = None;
        for ((&(name, _), was), now) in self.0.iter().zip(before).zip(&after) {
            let used = now.saturating_sub(*was);
            parts.push(format!(
                "{name} {:.1} µs",
                used.as_secs_f64() * 1e6 / messages.max(1) as f64
            ));
            if name == "Mosquitto" {
                broker_busy = Some(used.as_secs_f64() / wall.as_secs_f64().max(1e-9) * 100.0);
            }
        }
        format!(
            "CPU per message: {}; Mosquitto busy {:.0}% of the run",
            parts.join(", "),
            broker_busy.unwrap_or(0.0)
        )
    }
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A subscriber that counts `n` messages on `filter`; returns (first, last) receipt times
/// and the latencies taken from each payload's `"t"` (microseconds since the epoch).
async fn subscriber(
    port: u16,
    filter: &str,
    ready: tokio::sync::oneshot::Sender<()>,
    n: usize,
) -> Result<(Instant, Vec<u64>), Error> {
    let mut options = MqttOptions::new(format!("bench-sub-{}", micros()), "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_inflight(1000);
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut events) = AsyncClient::new(options, 1000);
    client.subscribe(filter, QoS::AtLeastOnce).await?;
    let mut ready = Some(ready);
    let mut latencies = Vec::with_capacity(n);
    loop {
        match events.poll().await? {
            Event::Incoming(Incoming::SubAck(_)) => {
                if let Some(r) = ready.take() {
                    let _ = r.send(());
                }
            }
            Event::Incoming(Incoming::Publish(p)) => {
                let now = micros();
                let t = find_t(&p.payload);
                latencies.push(now.saturating_sub(t));
                if latencies.len() == n {
                    return Ok((Instant::now(), latencies));
                }
            }
            _ => {}
        }
    }
}

/// The `"t":` number in a payload (raw messages are just the number).
fn find_t(payload: &[u8]) -> u64 {
    let text = std::str::from_utf8(payload).unwrap_or("");
    let digits = match text.find("\"t\":") {
        Some(at) => &text[at + 4..],
        None => text,
    };
    digits
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap_or(0)
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index] as f64 / 1000.0
}

async fn raw(port: u16, n: usize) -> Result<(f64, Duration), Error> {
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    let sub = tokio::spawn(async move { subscriber(port, "raw/#", ready_tx, n).await });
    ready.await?;
    let mut options = MqttOptions::new("bench-pub", "127.0.0.1", port);
    options.set_inflight(512);
    let (client, mut events) = AsyncClient::new(options, 1024);
    let start = Instant::now();
    let publisher = tokio::spawn(async move {
        for _ in 0..n {
            if client
                .publish("raw/t", QoS::AtLeastOnce, false, micros().to_string())
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let pump = tokio::spawn(async move {
        loop {
            if events.poll().await.is_err() {
                break;
            }
        }
    });
    let (end, _) = sub.await??;
    publisher.await?;
    pump.abort();
    Ok((n as f64 / (end - start).as_secs_f64(), end - start))
}

async fn post_loop(
    addr: SocketAddr,
    token: Arc<String>,
    next: Arc<AtomicUsize>,
    n: usize,
    batch: usize,
) -> Result<(), Error> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    // The headers are the same for every request: built once. The connection is driven in
    // this task rather than a task of its own, so the load generator's own scheduling
    // takes less of the CPU it shares with the gateway and the broker.
    let host = hyper::header::HeaderValue::from_str(&addr.to_string())?;
    let authorization = hyper::header::HeaderValue::from_str(&format!("Bearer {token}"))?;
    let json = hyper::header::HeaderValue::from_static("application/json");
    let requests = async move {
        loop {
            let first = next.fetch_add(batch, Ordering::Relaxed);
            if first >= n {
                break;
            }
            let count = batch.min(n - first);
            let body = if batch == 1 {
                format!(r#"{{"t":{},"temperature":21.5}}"#, micros())
            } else {
                let t = micros();
                let records: Vec<String> = (0..count)
                    .map(|_| format!(r#"{{"t":{t},"temperature":21.5}}"#))
                    .collect();
                format!("[{}]", records.join(","))
            };
            let request = hyper::Request::post("/api/v1/devices/esp-bench/telemetry")
                .header(hyper::header::HOST, host.clone())
                .header(hyper::header::AUTHORIZATION, authorization.clone())
                .header(hyper::header::CONTENT_TYPE, json.clone())
                .body(Full::new(Bytes::from(body)))?;
            sender.ready().await?;
            let response = sender.send_request(request).await?;
            let status = response.status();
            let bytes = response.into_body().collect().await?.to_bytes();
            if status != 202 {
                return Err::<(), Error>(
                    format!(
                        "telemetry answered {status}: {}",
                        String::from_utf8_lossy(&bytes)
                    )
                    .into(),
                );
            }
        }
        // Dropping the sender lets the connection close once it is idle.
        Ok(())
    };
    tokio::pin!(connection);
    tokio::pin!(requests);
    tokio::select! {
        done = &mut requests => {
            done?;
            // The last answer is in; the connection ends when it sees the sender gone.
            connection.await?;
        }
        ended = &mut connection => {
            ended?;
            return Err("the gateway closed the connection before every record was sent".into());
        }
    }
    Ok(())
}

/// One gateway run: `n` records over `connections` HTTP connections; returns msg/s (first
/// POST to the last receipt), the time until every POST was answered, the sorted
/// latencies and the run's wall time.
async fn through_gateway(
    port: u16,
    addr: SocketAddr,
    token: &Arc<String>,
    n: usize,
    connections: usize,
    batch: usize,
) -> Result<(f64, Duration, Vec<u64>, Duration), Error> {
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    let sub = tokio::spawn(async move {
        subscriber(port, "outpost/v1/gw/gw-bench/telemetry/#", ready_tx, n).await
    });
    ready.await?;
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut posters = Vec::new();
    for _ in 0..connections {
        posters.push(tokio::spawn(post_loop(
            addr,
            Arc::clone(token),
            Arc::clone(&next),
            n,
            batch,
        )));
    }
    for poster in posters {
        poster.await??;
    }
    let accepted = start.elapsed();
    let (end, mut latencies) = sub.await??;
    latencies.sort_unstable();
    Ok((
        n as f64 / (end - start).as_secs_f64(),
        accepted,
        latencies,
        end - start,
    ))
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args = args()?;
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    std::fs::write(
        dir.path().join("mosquitto.conf"),
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 1000000\nmax_inflight_messages 0\nuser root\n"
        ),
    )?;
    let broker = Killed(
        Command::new("mosquitto")
            .arg("-c")
            .arg(dir.path().join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("mosquitto: {e} (apt-get install mosquitto)"))?,
    );
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let version = Command::new("mosquitto").arg("-h").output()?;
    let version = String::from_utf8_lossy(&version.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned();
    println!(
        "uplink bench: {} messages, HTTP connections {:?}, {version}",
        args.messages, args.connections
    );

    // Raw Mosquitto is measured before and after the gateway (on this shared VM it varies
    // from run to run); the ratios are to the faster of the two, the conservative choice.
    let raw_meter = Meter(vec![
        ("Mosquitto", broker.0.id()),
        ("bench", std::process::id()),
    ]);
    let cpu = raw_meter.snapshot();
    let (raw_before, wall) = raw(port, args.messages).await?;
    println!("  raw Mosquitto QoS1 pub -> sub (before):   {raw_before:>10.0} msg/s");
    println!("    {}", raw_meter.report(&cpu, args.messages, wall));

    // The gateway, with a device and its token in the store before it starts.
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state)?;
    {
        let store = outpost_store::Store::open(state.join("outpost.db")).await?;
        store
            .upsert_device(outpost_store::NewDevice::new(
                "esp-bench",
                "thermostat",
                outpost_store::DeviceState::Claimed,
            ))
            .await?;
        store.close().await?;
    }
    let api_port = free_port()?;
    std::fs::write(
        dir.path().join("outpost.toml"),
        format!(
            "[gateway]\nid = \"gw-bench\"\nstate_dir = \"state\"\n[api]\nbind = \"127.0.0.1:{api_port}\"\nmax_connections_per_client = 256\nadmin_token = \"bench-admin-token-0123456789abcdef\"\n[cache]\nbind = \"127.0.0.1:0\"\n[ble]\nenabled = false\n[log]\nlevel = \"warn\"\n[uplink]\nbroker = \"mqtt://127.0.0.1:{port}\"\nprotocol = \"{}\"\n",
            args.protocol
        ),
    )?;
    let gateway = Killed(
        Command::new(&args.outpost)
            .arg("--config")
            .arg(dir.path().join("outpost.toml"))
            .arg("run")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("{}: {e}", args.outpost.display()))?,
    );
    let addr: SocketAddr = format!("127.0.0.1:{api_port}").parse()?;
    let token = loop {
        if let Ok(stream) = tokio::net::TcpStream::connect(addr).await {
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(connection);
            let request = hyper::Request::post("/api/v1/devices/esp-bench/credential")
                .header("host", addr.to_string())
                .header("authorization", "Bearer bench-admin-token-0123456789abcdef")
                .body(Full::new(Bytes::new()))?;
            let response = sender.send_request(request).await?;
            let bytes = response.into_body().collect().await?.to_bytes();
            let json: serde_json::Value = serde_json::from_slice(&bytes)?;
            break json["token"].as_str().ok_or("no token")?.to_owned();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let token = Arc::new(token);
    let n = args.messages;
    let meter = Meter(vec![
        ("gateway", gateway.0.id()),
        ("Mosquitto", broker.0.id()),
        ("bench", std::process::id()),
    ]);
    let mut plan: Vec<(String, usize, usize)> = args
        .connections
        .iter()
        .map(|&c| {
            (
                format!("{c:>3} connections: POST -> outbox (durable) -> QoS1:"),
                c,
                1,
            )
        })
        .collect();
    plan.push((
        format!(
            "{:>3} connections x {} records per POST:      ",
            args.batch_connections, args.batch
        ),
        args.batch_connections,
        args.batch,
    ));
    // Each round runs the plan, then raw Mosquitto again: a round's ratios are to the
    // faster of the raw runs just before and just after it (the host's speed drifts;
    // runs close in time are the fair comparison).
    let mut raw_last = raw_before;
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); plan.len()];
    for round in 1..=args.rounds {
        let mut runs = Vec::new();
        for (label, connections, batch) in &plan {
            let cpu = meter.snapshot();
            let (rate, accepted, latencies, wall) =
                through_gateway(port, addr, &token, n, *connections, *batch).await?;
            let cpu = meter.report(&cpu, n, wall);
            runs.push((label, rate, accepted, latencies, cpu));
        }
        let cpu = meter.snapshot();
        let (raw_after, wall) = raw(port, args.messages).await?;
        let when = if args.rounds == 1 {
            "after".to_owned()
        } else {
            format!("after round {round}")
        };
        println!("  raw Mosquitto QoS1 pub -> sub ({when}):    {raw_after:>10.0} msg/s");
        println!("    {}", meter.report(&cpu, args.messages, wall));
        let raw_rate = raw_last.max(raw_after);
        raw_last = raw_after;
        for (index, (label, rate, accepted, latencies, cpu)) in runs.into_iter().enumerate() {
            ratios[index].push(rate / raw_rate);
            println!(
                "  gateway, {label} {rate:>7.0} msg/s = {:.2}x raw  (accepted in {:.2} s; latency p50 {:.1} ms, p99 {:.1} ms)",
                rate / raw_rate,
                accepted.as_secs_f64(),
                percentile(&latencies, 0.5),
                percentile(&latencies, 0.99),
            );
            println!("    {cpu}");
        }
    }
    if args.rounds > 1 {
        for ((label, _, _), mut ratios) in plan.iter().zip(ratios) {
            ratios.sort_by(f64::total_cmp);
            let shown: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
            println!(
                "  median of {} rounds, {}: {:.2}x raw  ({})",
                args.rounds,
                label.trim_end_matches(|c: char| c == ':' || c.is_whitespace()),
                // With an even count, the lower of the middle two: never the better half.
                ratios[(ratios.len() - 1) / 2],
                shown.join(", ")
            );
        }
    }
    println!("  goals: per record >= 0.5x raw, batched >= 1.0x raw, p99 < 50 ms");
    let list: Vec<String> = args.connections.iter().map(ToString::to_string).collect();
    println!(
        "  rerun: cargo xtask bench-uplink -- --messages {n} --connections {} --batch {} --batch-connections {} --rounds {}",
        list.join(","),
        args.batch,
        args.batch_connections,
        args.rounds
    );
    Ok(())
}
