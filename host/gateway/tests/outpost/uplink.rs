//! The cloud uplink against a real Mosquitto (Debian package, started per test on a free
//! loopback port) and the reference cloud (`cloud-sim`).

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use outpost_store::{DeviceState, NewDevice};

use super::onboarding::{Sim, import, run_json};
use outpost_test_support::EventLog;

use super::{DEADLINE, Gateway, Site, http_get};

const KEY: &str = "c2VjcmV0LWVucm9sbG1lbnQta2V5LTMyLWJ5dGVzISE=";

pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A Mosquitto on 127.0.0.1:`port`, persistent across its own restarts.
pub(crate) struct Mosquitto {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Mosquitto {
    pub(crate) fn start(extra: &str) -> Self {
        Self::start_on(free_port(), extra)
    }

    pub(crate) fn start_on(port: u16, extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut broker = Self {
            port,
            dir,
            child: None,
        };
        std::fs::write(
            broker.dir.path().join("mosquitto.conf"),
            format!(
                "listener {} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\n\
                 max_queued_messages 1000000\nmax_inflight_messages 0\nuser root\nlog_dest stderr\nlog_type error\n{extra}",
                broker.port,
                broker.dir.path().display()
            ),
        )
        .unwrap();
        broker.resume();
        broker
    }

    /// A broker's address for configs.
    pub(crate) fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// (Re)starts the broker on its port and waits until it accepts connections.
    pub(crate) fn resume(&mut self) {
        let binary = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("mosquitto is not installed: apt-get install mosquitto (.ci/run does)");
        let child = Command::new(binary)
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let end = Instant::now() + DEADLINE;
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < end,
                "mosquitto did not listen on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM (it saves its persistence file) and wait.
    pub(crate) fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, libc::SIGTERM);
            child.wait().unwrap();
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn signal(child: &Child, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    #[allow(unsafe_code)]
    // SAFETY: kill(2) on a child we spawned and have not reaped.
    unsafe {
        libc::kill(pid, signal);
    }
}

fn cloud_sim_binary() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_outpost")).with_file_name("cloud-sim");
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build -p cloud-sim` (cargo xtask test does)",
        path.display()
    );
    path
}

/// The reference cloud, with its JSON events.
pub(crate) struct Cloud {
    child: Child,
    stdin: ChildStdin,
    events: EventLog,
}

impl Cloud {
    pub(crate) fn start(args: &[String]) -> Self {
        let mut child = Command::new(cloud_sim_binary())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let events = EventLog::read(child.stdout.take().unwrap());
        let mut cloud = Self {
            child,
            stdin,
            events,
        };
        cloud.wait_for("ready", |_| true);
        cloud
    }

    pub(crate) fn send(&mut self, command: &serde_json::Value) {
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// Every event seen so far (`drain` reads what arrived since).
    pub(crate) fn seen(&self) -> &[serde_json::Value] {
        self.events.seen()
    }

    /// Takes in every event printed so far.
    pub(crate) fn drain(&mut self) {
        self.events.drain();
    }

    /// Waits for an event (also one seen before) matching `pred`.
    pub(crate) fn wait_for(
        &mut self,
        event: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        match self.events.wait_for(event, pred) {
            Some(found) => found,
            None => panic!(
                "cloud-sim: no {event} event; saw {}",
                serde_json::to_string_pretty(self.events.seen()).unwrap()
            ),
        }
    }

    /// Waits until `n` distinct messages (by message id) of `kind` were seen; returns
    /// the first copy of each in arrival order. Delivery is at-least-once: a message in
    /// flight when the broker went away is published again, and a duplicate must not
    /// stand in for a message that has not arrived yet.
    pub(crate) fn messages(&mut self, kind: &str, n: usize) -> Vec<serde_json::Value> {
        let mut ids = HashSet::new();
        let mut found = Vec::new();
        let mut take = |e: &serde_json::Value, found: &mut Vec<serde_json::Value>| {
            if e["event"] == "message"
                && e["kind"] == kind
                && ids.insert(e["messageId"].as_str().unwrap_or_default().to_owned())
            {
                found.push(e.clone());
            }
        };
        for e in self.events.seen() {
            take(e, &mut found);
        }
        let end = Instant::now() + DEADLINE * 2;
        while found.len() < n {
            match self.events.next_before(end) {
                Some(json) => take(&json, &mut found),
                None => panic!(
                    "cloud-sim saw {} distinct {kind} messages, not {n}",
                    found.len()
                ),
            }
        }
        found
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn uplink_site(uplink: &str, outbox: &str) -> Site {
    let site = Site::new(&format!(
        "[ble]\nenabled = false\n\n[uplink]\nbackoff_min_ms = 100\nbackoff_max_ms = 400\n{uplink}\n\n[outbox]\n{outbox}\n"
    ));
    site.seed(vec![NewDevice::new(
        "esp-1",
        "thermostat",
        DeviceState::Claimed,
    )]);
    site
}

/// Polls `/api/v1/uplink` until `pred` holds.
pub(crate) fn wait_uplink(
    addr: SocketAddr,
    token: &str,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let end = Instant::now() + DEADLINE;
    loop {
        let (status, json) = http_get(addr, "/api/v1/uplink", Some(token));
        assert_eq!(status, 200, "{json}");
        if pred(&json) {
            return json;
        }
        assert!(Instant::now() < end, "uplink never {what}: {json}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(crate) fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .unwrap_or_else(|e| panic!("{method} {path} on {addr}: {e}"));
    let (head, body) = response.split_once("\r\n\r\n").expect("no header end");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (
        status,
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

/// A device token for esp-1.
pub(crate) fn device_token(addr: SocketAddr, admin: &str) -> String {
    let (status, json) = http(addr, "POST", "/api/v1/devices/esp-1/credential", admin, "");
    assert_eq!(status, 201, "{json}");
    json["token"].as_str().unwrap().to_owned()
}

/// Posts `n` telemetry records for esp-1 in batches; returns their message ids.
pub(crate) fn post_telemetry(addr: SocketAddr, token: &str, n: usize, tag: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let mut sent = 0;
    while sent < n {
        let batch = (n - sent).min(100);
        let records: Vec<serde_json::Value> = (0..batch)
            .map(|i| serde_json::json!({ "tag": tag, "seq": sent + i, "temperature": 21.5 }))
            .collect();
        let (status, json) = http(
            addr,
            "POST",
            "/api/v1/devices/esp-1/telemetry",
            token,
            &serde_json::Value::from(records).to_string(),
        );
        assert_eq!(status, 202, "{json}");
        ids.extend(
            json["messageIds"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_owned()),
        );
        sent += batch;
    }
    ids
}

#[test]
fn a_broker_outage_queues_then_delivers_everything_priorities_first() {
    let mut broker = Mosquitto::start("");
    let mut cloud = Cloud::start(&[format!("--hub=a={}", broker.url())]);
    let site = uplink_site(&format!("broker = \"{}\"", broker.url()), "");
    let mut gateway = Gateway::spawn(&site.config(), &[]);
    let addr = gateway.ready();
    let admin = site.admin_token();
    wait_uplink(addr, &admin, "connected", |j| {
        j["link"]["state"] == "connected"
    });
    // The documented topics: retained online status, reported state.
    let status = cloud.wait_for("message", |e| {
        e["kind"] == "status" && e["body"]["state"] == "online"
    });
    assert_eq!(status["topic"], "outpost/v1/gw/gw-test/status");
    cloud.wait_for("message", |e| e["kind"] == "gateway-reported");

    // Bad input: no token, a wrong token, malformed JSON, an oversized record.
    let (code, json) = http(
        addr,
        "POST",
        "/api/v1/devices/esp-1/telemetry",
        "nope",
        "{}",
    );
    assert_eq!(code, 401, "{json}");
    let token = device_token(addr, &admin);
    let (code, json) = http(
        addr,
        "POST",
        "/api/v1/devices/esp-1/telemetry",
        &token,
        "{not json",
    );
    assert_eq!(
        (code, json["error"]["code"].as_str()),
        (400, Some("malformed_telemetry"))
    );
    let big = serde_json::json!({ "blob": "x".repeat(20_000) }).to_string();
    let (code, _) = http(
        addr,
        "POST",
        "/api/v1/devices/esp-1/telemetry",
        &token,
        &big,
    );
    assert_eq!(code, 413);
    let (code, _) = http(
        addr,
        "POST",
        "/api/v1/devices/esp-2/telemetry",
        &token,
        "{}",
    );
    assert_eq!(code, 401, "a token is for its own device only");

    let first = post_telemetry(addr, &token, 5, "before");
    let seen = cloud.messages("telemetry", 5);
    assert_eq!(
        seen.iter()
            .map(|e| e["messageId"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>(),
        first
    );
    assert_eq!(seen[0]["topic"], "outpost/v1/gw/gw-test/telemetry/esp-1");

    // The broker goes away mid-stream: messages queue.
    broker.stop();
    wait_uplink(addr, &admin, "down", |j| j["link"]["state"] == "connecting");
    let queued = post_telemetry(addr, &token, 300, "during");
    // A claim made offline (a State-class report) waits too.
    let state = site.state();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async move {
            let store = outpost_store::Store::open(state.join("outpost.db"))
                .await
                .unwrap();
            store
                .record_claim(
                    "esp-1",
                    "node-1",
                    "-----BEGIN CERTIFICATE-----",
                    "local-ca:test",
                )
                .await
                .unwrap();
            store.close().await.unwrap();
        });
    let stats = wait_uplink(addr, &admin, "queued", |j| {
        j["outbox"]["queued"].as_u64() >= Some(300)
    });
    assert!(
        stats["link"]["last_error"]
            .as_str()
            .unwrap()
            .contains("127.0.0.1"),
        "{stats}"
    );

    broker.resume();
    let all = cloud.messages("telemetry", 305);
    let ids: HashSet<&str> = all
        .iter()
        .map(|e| e["messageId"].as_str().unwrap())
        .collect();
    for id in &queued {
        assert!(ids.contains(id.as_str()), "lost {id}");
    }
    // Priorities: after the reconnect the reported state and the claim report went
    // before the telemetry queued during the outage.
    let position = |pred: &dyn Fn(&serde_json::Value) -> bool| {
        cloud
            .seen()
            .iter()
            .position(|e| e["event"] == "message" && pred(e))
            .unwrap()
    };
    let first_queued = position(&|e| e["messageId"] == queued[0].as_str());
    let claim = position(&|e| e["kind"] == "claim-report");
    assert!(
        claim < first_queued,
        "the claim report came after queued telemetry"
    );
    // Distinct ids: the cloud's own reconnect gets the retained copy once more.
    let reported_after = cloud.seen()[..first_queued]
        .iter()
        .filter(|e| e["kind"] == "gateway-reported")
        .map(|e| e["messageId"].as_str().unwrap_or_default())
        .collect::<HashSet<_>>()
        .len();
    assert_eq!(
        reported_after, 2,
        "one reported state per connection, both before the queued telemetry"
    );
    let stats = wait_uplink(addr, &admin, "drained", |j| j["outbox"]["queued"] == 0);
    assert!(
        stats["outbox"]["delivered"].as_u64() >= Some(305),
        "{stats}"
    );
    gateway.stop_cleanly(libc::SIGTERM, &site);
}

#[test]
fn kill_9_with_10000_queued_then_restart_delivers_all() {
    let port = free_port();
    let site = uplink_site(&format!("broker = \"mqtt://127.0.0.1:{port}\""), "");
    let mut gateway = Gateway::spawn(&site.config(), &[]);
    let addr = gateway.ready();
    let admin = site.admin_token();
    let token = device_token(addr, &admin);
    let ids = post_telemetry(addr, &token, 10_000, "killed");
    wait_uplink(addr, &admin, "holding 10000", |j| {
        j["outbox"]["queued"].as_u64() >= Some(10_000)
    });
    gateway.signal(libc::SIGKILL);
    let _ = gateway.wait();

    // Now the broker (on the configured port) and the cloud appear; the gateway restarts.
    let broker = Mosquitto::start_on(port, "");
    let mut cloud = Cloud::start(&[format!("--hub=a={}", broker.url())]);
    let mut gateway = Gateway::spawn(&site.config(), &[]);
    let addr = gateway.ready();
    let all = cloud.messages("telemetry", 10_000);
    let got: HashSet<&str> = all
        .iter()
        .map(|e| e["messageId"].as_str().unwrap())
        .collect();
    let missing: Vec<&String> = ids.iter().filter(|id| !got.contains(id.as_str())).collect();
    assert!(
        missing.is_empty(),
        "{} of 10000 lost, e.g. {:?}",
        missing.len(),
        missing.first()
    );
    wait_uplink(addr, &admin, "drained", |j| j["outbox"]["queued"] == 0);
    gateway.stop_cleanly(libc::SIGTERM, &site);
}

#[test]
fn expired_messages_are_dropped_and_counted_and_a_full_outbox_refuses_telemetry() {
    let port = free_port();
    let site = uplink_site(
        &format!("broker = \"mqtt://127.0.0.1:{port}\""),
        "ttl_secs = 1\nmax_messages = 30\n",
    );
    let mut gateway = Gateway::spawn(&site.config(), &[]);
    let addr = gateway.ready();
    let admin = site.admin_token();
    let token = device_token(addr, &admin);

    // Full: 30 fit; the 31st is refused with 507 and counted; nothing queued is dropped.
    post_telemetry(addr, &token, 30, "fills");
    let (code, json) = http(
        addr,
        "POST",
        "/api/v1/devices/esp-1/telemetry",
        &token,
        r#"{"one":"more"}"#,
    );
    assert_eq!(code, 507, "{json}");
    assert_eq!(json["error"]["code"], "outbox_full");
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("the outbox is full"),
        "{json}"
    );
    let stats = wait_uplink(addr, &admin, "counted", |j| j["outbox"]["refused"] == 1);
    assert_eq!(stats["outbox"]["queued"], 30);

    // TTL: a second later they expire, are counted, and are never sent.
    wait_uplink(addr, &admin, "expired", |j| {
        j["outbox"]["expired"] == 30 && j["outbox"]["queued"] == 0
    });
    let broker = Mosquitto::start_on(port, "");
    let mut cloud = Cloud::start(&[format!("--hub=a={}", broker.url())]);
    wait_uplink(addr, &admin, "connected", |j| {
        j["link"]["state"] == "connected"
    });
    let fresh = post_telemetry(addr, &token, 1, "fresh");
    let seen = cloud.messages("telemetry", 1);
    assert_eq!(
        seen[0]["messageId"].as_str().unwrap(),
        fresh[0],
        "an expired message was sent"
    );
    gateway.stop_cleanly(libc::SIGTERM, &site);
}

#[test]
fn refused_credentials_stop_the_uplink_without_retrying() {
    let dir = tempfile::tempdir().unwrap();
    let passwords = dir.path().join("passwd");
    let made = Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(&passwords)
        .args(["gw-test", "right-password"])
        .status()
        .expect("mosquitto_passwd (Debian mosquitto) is not installed");
    assert!(made.success());
    let broker = Mosquitto::start(&format!(
        "password_file {}\nallow_anonymous false\n",
        passwords.display()
    ));
    // allow_anonymous appears twice; Mosquitto takes the last per listener.
    let site = uplink_site(
        &format!(
            "broker = \"{}\"\nusername = \"gw-test\"\npassword = {{ env = \"MQTT_PASSWORD\" }}",
            broker.url()
        ),
        "",
    );
    let mut gateway = Gateway::spawn(&site.config(), &[("MQTT_PASSWORD", "wrong-password")]);
    let addr = gateway.ready();
    let admin = site.admin_token();
    let status = wait_uplink(addr, &admin, "stopped", |j| j["link"]["state"] == "stopped");
    let error = status["link"]["last_error"].as_str().unwrap();
    assert!(
        error.contains("refused the credentials") && error.contains("not retrying"),
        "{error}"
    );
    assert_eq!(status["link"]["connect_attempts"], 1);
    // Messages still queue for when the operator fixes the password.
    let token = device_token(addr, &admin);
    post_telemetry(addr, &token, 3, "kept");
    let status = wait_uplink(addr, &admin, "queued", |j| {
        j["outbox"]["queued"].as_u64() >= Some(3)
    });
    assert_eq!(status["link"]["connect_attempts"], 1, "it retried");
    let (stderr, _) = gateway.stop_cleanly(libc::SIGTERM, &site);
    assert_eq!(
        stderr.matches("uplink stopped: the broker").count(),
        1,
        "{stderr}"
    );
}

fn registration_site(registration: &Mosquitto) -> Site {
    uplink_site(
        &format!(
            "reregister_after_secs = 1\n\n[uplink.registration]\nbroker = \"{}\"\nscope = \"outpost\"\nkey = {{ env = \"ENROLLMENT_KEY\" }}\n",
            registration.url()
        ),
        "",
    )
}

#[test]
fn reprovisioning_to_a_second_broker_under_each_policy() {
    let registration = Mosquitto::start("");
    for policy in ["migrate", "reset", "never"] {
        let mut hub_a = Mosquitto::start("");
        let hub_b = Mosquitto::start("");
        // Retry discipline rides along: a 500 first (migrate), a 429 first (reset).
        let mut args = vec![
            format!("--registration={}", registration.url()),
            format!("--hub=a={}", hub_a.url()),
            format!("--hub=b={}", hub_b.url()),
            format!("--enrollment=gw-test:{KEY}:a:{policy}"),
        ];
        match policy {
            "migrate" => args.push("--server-errors=1".into()),
            "reset" => args.push("--throttle=1".into()),
            _ => {}
        }
        let mut cloud = Cloud::start(&args);
        let site = registration_site(&registration);
        let mut gateway = Gateway::spawn(&site.config(), &[("ENROLLMENT_KEY", KEY)]);
        let addr = gateway.ready();
        let admin = site.admin_token();
        let first = wait_uplink(addr, &admin, "connected to a", |j| {
            j["link"]["state"] == "connected" && j["link"]["broker"] == hub_a.url().as_str()
        });
        assert_eq!(first["link"]["substatus"], "initialAssignment", "{first}");
        assert_eq!(
            first["link"]["desired_version"], 1,
            "the initial state applies: {first}"
        );
        cloud.wait_for("registration", |e| e["status"] == 200);
        let regs: Vec<serde_json::Value> = cloud
            .seen()
            .iter()
            .filter(|e| e["event"] == "registration")
            .cloned()
            .collect();
        let last_at = regs.last().unwrap()["at"].as_u64().unwrap();
        match policy {
            "migrate" => {
                assert_eq!(regs[0]["status"], 500);
                let gap = regs[1]["at"].as_u64().unwrap() - regs[0]["at"].as_u64().unwrap();
                assert!(gap >= 5000, "retried a 500 after {gap} ms (< 5 s)");
            }
            "reset" => {
                assert_eq!(regs[0]["status"], 429);
                let gap = regs[1]["at"].as_u64().unwrap() - regs[0]["at"].as_u64().unwrap();
                assert!(
                    gap >= 1000,
                    "retried a 429 after {gap} ms, before its retry-after"
                );
            }
            _ => assert_eq!(regs[0]["status"], 200),
        }
        cloud.wait_for("message", |e| {
            e["hub"] == "a" && e["kind"] == "lobby" && e["deviceId"] == "esp-1"
        });
        cloud.send(&serde_json::json!({ "cmd": "desired", "gateway": "gw-test", "version": 2, "body": { "telemetryIntervalSecs": 5 } }));
        wait_uplink(addr, &admin, "desired v2", |j| {
            j["link"]["desired_version"] == 2
        });

        // The operator moves the enrollment; hub a goes away.
        cloud.send(
            &serde_json::json!({ "cmd": "reassign", "registrationId": "gw-test", "hub": "b" }),
        );
        cloud.wait_for("reassigned", |_| true);
        hub_a.stop();
        let token = device_token(addr, &admin);
        let during = post_telemetry(addr, &token, 3, policy);
        match policy {
            "never" => {
                // It registers again, is told to stay on a, and waits for a.
                cloud.wait_for("registration", |e| {
                    e["status"] == 200
                        && e["substatus"] == "initialAssignment"
                        && e["broker"] == hub_a.url().as_str()
                        && e["at"].as_u64() > Some(last_at)
                });
                hub_a.resume();
                wait_uplink(addr, &admin, "back on a", |j| {
                    j["link"]["state"] == "connected" && j["link"]["broker"] == hub_a.url().as_str()
                });
                let seen = cloud.messages("telemetry", 3);
                assert!(seen.iter().all(|e| e["hub"] == "a"));
                assert_eq!(
                    wait_uplink(addr, &admin, "", |_| true)["link"]["desired_version"],
                    2
                );
            }
            _ => {
                let moved = wait_uplink(addr, &admin, "connected to b", |j| {
                    j["link"]["state"] == "connected" && j["link"]["broker"] == hub_b.url().as_str()
                });
                let seen = cloud.messages("telemetry", 3);
                assert!(
                    seen.iter().all(|e| e["hub"] == "b"),
                    "queued telemetry follows the gateway"
                );
                let got: Vec<&str> = seen
                    .iter()
                    .map(|e| e["messageId"].as_str().unwrap())
                    .collect();
                assert_eq!(got, during.iter().map(String::as_str).collect::<Vec<_>>());
                // The devices are announced on the new hub.
                cloud.wait_for("message", |e| {
                    e["hub"] == "b" && e["kind"] == "lobby" && e["deviceId"] == "esp-1"
                });
                if policy == "migrate" {
                    assert_eq!(moved["link"]["substatus"], "deviceDataMigrated");
                    let kept = wait_uplink(addr, &admin, "v2 kept", |j| {
                        j["link"]["desired_version"] == 2
                    });
                    assert_eq!(kept["link"]["desired"]["telemetryIntervalSecs"], 5);
                } else {
                    assert_eq!(moved["link"]["substatus"], "deviceDataReset");
                    let reset =
                        wait_uplink(addr, &admin, "reset", |j| j["link"]["desired_version"] == 1);
                    assert_eq!(reset["link"]["desired"]["telemetryIntervalSecs"], 60);
                }
            }
        }
        gateway.stop_cleanly(libc::SIGTERM, &site);
    }
}

#[test]
fn a_wrong_enrollment_key_is_refused_once_and_not_retried() {
    let registration = Mosquitto::start("");
    let hub = Mosquitto::start("");
    let mut cloud = Cloud::start(&[
        format!("--registration={}", registration.url()),
        format!("--hub=a={}", hub.url()),
        format!("--enrollment=gw-test:{KEY}:a"),
    ]);
    let site = registration_site(&registration);
    let wrong = "d3Jvbmcta2V5LWZvci10aGlzLWVucm9sbG1lbnQhISE=";
    let mut gateway = Gateway::spawn(&site.config(), &[("ENROLLMENT_KEY", wrong)]);
    let addr = gateway.ready();
    let admin = site.admin_token();
    let status = wait_uplink(addr, &admin, "stopped", |j| j["link"]["state"] == "stopped");
    let error = status["link"]["last_error"].as_str().unwrap();
    assert!(
        error.contains("refused (401)") && error.contains("not retrying"),
        "{error}"
    );
    cloud.wait_for("registration", |e| e["status"] == 401);
    assert_eq!(status["link"]["registrations"], 0);
    gateway.stop_cleanly(libc::SIGTERM, &site);
    // After the gateway stopped, the cloud had seen exactly one attempt.
    cloud.drain();
    assert_eq!(
        cloud
            .seen()
            .iter()
            .filter(|e| e["event"] == "registration")
            .count(),
        1
    );
}

/// The site of the cloud-claim test: SoftAP onboarding, the uplink, no local CA.
fn claiming_site(broker: &Mosquitto) -> Site {
    let site = Site::new(&format!(
        "\n[ble]\nenabled = false\n\n[onboarding]\nstatus_poll_ms = 50\n\n\
         [[onboarding.wifi]]\nssid = \"outpost-site\"\npassphrase = {{ file = \"wifi\" }}\n\n\
         [uplink]\nbroker = \"{}\"\nbackoff_min_ms = 100\nbackoff_max_ms = 400\n",
        broker.url()
    ));
    super::write_secret(&site.dir.path().join("wifi"), "correct horse battery");
    site
}

/// The lobby states the cloud heard for `device`, in order.
fn lobby_states(cloud: &Cloud, device: &str) -> Vec<String> {
    let mut ids = HashSet::new();
    cloud
        .seen()
        .iter()
        .filter(|e| e["event"] == "message" && e["kind"] == "lobby")
        .filter(|e| e["body"]["deviceId"] == device)
        .filter(|e| ids.insert(e["messageId"].to_string()))
        .map(|e| e["body"]["state"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn claims_go_through_the_cloud_and_a_certificate_for_another_key_is_refused() {
    let broker = Mosquitto::start("");
    let mut cloud = Cloud::start(&[format!("--hub=a={}", broker.url())]);
    let site = claiming_site(&broker);
    let manifest = site.dir.path().join("fleet.json");
    let mut sim = Sim::start(&["--softap", "2", "--security", "2", "--claim"], &manifest);
    let mut gateway = Gateway::spawn(&site.config(), &[]);
    let addr = gateway.ready();
    let admin = site.admin_token();
    wait_uplink(addr, &admin, "connected", |j| {
        j["link"]["state"] == "connected"
    });

    // Each CSR goes up to the cloud, each certificate comes back down to its device.
    import(&site, &manifest);
    let report = run_json(&site);
    assert_eq!(report["succeeded"], 2, "{report:#}");
    let names: Vec<String> = report["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            assert_eq!(d["outcome"], "claimed", "{d}");
            d["name"].as_str().unwrap().to_owned()
        })
        .collect();
    for name in &names {
        sim.wait_for("claimed", |e| e["device"] == name.as_str());
    }
    // The claims are the cloud's (it signed, the gateway recorded them as reported).
    cloud.wait_for("claim", |e| e["status"] == 200);
    let (status, claims) = http_get(addr, "/api/v1/claims", Some(&admin));
    assert_eq!(status, 200);
    let claims = claims["claims"].as_array().unwrap();
    assert_eq!(claims.len(), 2, "{claims:?}");
    for claim in claims {
        assert_eq!(claim["authority"], "cloud", "{claim}");
        assert!(claim["reported_at"].is_string(), "{claim}");
    }
    // Every state change reached the cloud's lobby: provisioning, then claimed.
    cloud.messages("lobby", 4);
    for name in &names {
        assert_eq!(lobby_states(&cloud, name), ["provisioning", "claimed"]);
    }

    // A faulty cloud signs some other key: the gateway checks the certificate against
    // the CSR, aborts the claim on the device, and the device is not onboarded.
    drop(cloud);
    let mut cloud = Cloud::start(&[
        format!("--hub=a={}", broker.url()),
        "--wrong-claim-key".to_owned(),
    ]);
    let second = site.dir.path().join("second.json");
    let mut faulty = Sim::start(
        &[
            "--softap",
            "1",
            "--first-index",
            "32",
            "--security",
            "2",
            "--claim",
        ],
        &second,
    );
    import(&site, &second);
    let report = run_json(&site);
    assert_eq!(report["failed"], 1, "{report:#}");
    let device = &report["devices"][0];
    let name = device["name"].as_str().unwrap().to_owned();
    assert!(
        device["error"]
            .as_str()
            .unwrap()
            .contains("the certificate does not match the CSR's key"),
        "{device}"
    );
    cloud.wait_for("claim", |e| e["status"] == 200);
    faulty.wait_for("claim-aborted", |e| e["device"] == name.as_str());
    assert!(
        !faulty
            .drain()
            .iter()
            .any(|e| e["event"] == "claimed" && e["device"] == name.as_str()),
        "the device took a certificate for another key"
    );
    let (_, lobby) = http_get(addr, "/api/v1/devices", Some(&admin));
    let entry = lobby["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == name.as_str())
        .unwrap()
        .clone();
    assert_eq!(entry["state"], "failed", "{entry}");
    let (_, claims) = http_get(addr, "/api/v1/claims", Some(&admin));
    assert_eq!(
        claims["claims"].as_array().unwrap().len(),
        2,
        "no new claim"
    );
    cloud.messages("lobby", 2);
    assert_eq!(lobby_states(&cloud, &name), ["provisioning", "failed"]);
    drop(gateway);
}

/// A private CA and what it signs, written as PEM files into `dir`.
struct Pki {
    ca: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new(dir: &Path, name: &str) -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        Self {
            ca: rcgen::Issuer::new(params, key),
        }
    }

    /// A certificate for `names` (DNS names or IP addresses) into `{file}.pem` and `.key`.
    fn issue(&self, dir: &Path, file: &str, common_name: &str, names: &[&str]) {
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        let cert = params.signed_by(&key, &self.ca).unwrap();
        std::fs::write(dir.join(format!("{file}.pem")), cert.pem()).unwrap();
        let key_file = dir.join(format!("{file}.key"));
        if file == "client" {
            // The gateway's own key: a secret it refuses to read when others could.
            super::write_secret(&key_file, &key.serialize_pem());
        } else {
            // Mosquitto, when started as root, reads its key as the mosquitto user.
            std::fs::write(&key_file, key.serialize_pem()).unwrap();
        }
    }
}

#[test]
fn mqtts_with_a_private_ca_and_a_client_certificate_and_what_is_refused() {
    let pki_dir = tempfile::tempdir().unwrap();
    let tls = pki_dir.path();
    let site_ca = Pki::new(tls, "site-ca");
    site_ca.issue(tls, "broker", "localhost", &["localhost", "127.0.0.1"]);
    site_ca.issue(tls, "client", "gw-test", &[]);
    Pki::new(tls, "other-ca");
    // A plain listener for the cloud, a mutual-TLS one for the gateway.
    let tls_port = free_port();
    let broker = Mosquitto::start(&format!(
        "listener {tls_port} 127.0.0.1\ncafile {0}/site-ca.pem\ncertfile {0}/broker.pem\n\
         keyfile {0}/broker.key\nrequire_certificate true\n",
        tls.display()
    ));
    let mut cloud = Cloud::start(&[format!("--hub=a={}", broker.url())]);
    let uplink = |ca: &str, client: bool| {
        let mut text = format!(
            "broker = \"mqtts://localhost:{tls_port}\"\nca_file = \"{}/{ca}.pem\"\n",
            tls.display()
        );
        if client {
            text.push_str(&format!(
                "client_cert = \"{0}/client.pem\"\nclient_key = {{ file = \"{0}/client.key\" }}\n",
                tls.display()
            ));
        }
        text
    };

    // Trusted broker, client certificate: connected, and telemetry goes through.
    let site = uplink_site(&uplink("site-ca", true), "");
    let mut gateway = Gateway::spawn(&site.config(), &[]);
    let addr = gateway.ready();
    let admin = site.admin_token();
    let up = wait_uplink(addr, &admin, "connected", |j| {
        j["link"]["state"] == "connected"
    });
    assert_eq!(
        up["link"]["broker"],
        format!("mqtts://localhost:{tls_port}")
    );
    let token = device_token(addr, &admin);
    let ids = post_telemetry(addr, &token, 5, "tls");
    let got: HashSet<String> = cloud
        .messages("telemetry", 5)
        .iter()
        .map(|m| m["messageId"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(got, ids.into_iter().collect());
    drop(gateway);

    // A CA file that does not vouch for the broker: refused, and said why.
    site.write_config(
        &std::fs::read_to_string(site.config())
            .unwrap()
            .replace("site-ca.pem", "other-ca.pem"),
    );
    let mut gateway = Gateway::spawn(&site.config(), &[]);
    let addr = gateway.ready();
    let refused = wait_uplink(addr, &admin, "refusing the broker", |j| {
        j["link"]["last_error"].is_string()
    });
    assert_ne!(refused["link"]["state"], "connected");
    let error = refused["link"]["last_error"].as_str().unwrap();
    assert!(error.contains("UnknownIssuer"), "{error}");
    assert!(error.contains("check uplink.ca_file"), "{error}");
    drop(gateway);

    // Trusted, but without the client certificate the broker asks for: no connection.
    let config = std::fs::read_to_string(site.config()).unwrap();
    let start = config.find("client_cert").unwrap();
    let end = config[start..].find("}\n").unwrap() + start + 2;
    site.write_config(
        &format!("{}{}", &config[..start], &config[end..]).replace("other-ca.pem", "site-ca.pem"),
    );
    let mut gateway = Gateway::spawn(&site.config(), &[]);
    let addr = gateway.ready();
    let refused = wait_uplink(addr, &admin, "refused without a client certificate", |j| {
        j["link"]["last_error"].is_string() && j["link"]["connect_attempts"].as_u64() >= Some(2)
    });
    assert_eq!(refused["link"]["connections"], 0, "{refused}");
    let error = refused["link"]["last_error"].as_str().unwrap();
    assert!(error.contains("set uplink.client_cert"), "{error}");
    drop(gateway);
}

/// Two brokers (a cluster's nodes, a standby): the first stopped under load, delivery goes
/// on through the second with nothing lost (what the first acknowledged reaches the
/// backend from its persistent store when it is back); the gateway returns to the first
/// once it answers again. Duplicates only ever repeat a message id.
#[test]
fn with_two_brokers_the_gateway_fails_over_under_load_and_returns_to_the_first() {
    let mut first = Mosquitto::start("");
    let second = Mosquitto::start("");
    let mut cloud = Cloud::start(&[
        format!("--hub=a={}", first.url()),
        format!("--hub=b={}", second.url()),
    ]);
    let site = uplink_site(
        &format!("brokers = [\"{}\", \"{}\"]", first.url(), second.url()),
        "",
    );
    let mut gateway = Gateway::spawn(&site.config(), &[]);
    let addr = gateway.ready();
    let admin = site.admin_token();
    let first_url = first.url();
    wait_uplink(addr, &admin, "connected to the first", |j| {
        j["link"]["state"] == "connected" && j["link"]["broker"] == first_url.as_str()
    });
    let token = device_token(addr, &admin);

    // Load: 40 posts of 25 records from another thread while the first broker stops.
    let poster = {
        let token = token.clone();
        std::thread::spawn(move || {
            (0..40)
                .flat_map(|round| post_telemetry(addr, &token, 25, &format!("load-{round}")))
                .collect::<Vec<String>>()
        })
    };
    cloud.messages("telemetry", 100);
    first.stop();
    let second_url = second.url();
    wait_uplink(addr, &admin, "failed over to the second", |j| {
        j["link"]["state"] == "connected" && j["link"]["broker"] == second_url.as_str()
    });
    let posted = poster.join().unwrap();
    assert_eq!(posted.len(), 1000);
    let during = post_telemetry(addr, &token, 10, "during");
    // Delivered through the second before the first returns.
    wait_uplink(addr, &admin, "the second took them", |j| {
        j["outbox"]["queued"] == 0
    });

    // The first is back: the gateway returns to it, and what it had taken arrives.
    first.resume();
    let status = wait_uplink(addr, &admin, "back on the first", |j| {
        j["link"]["state"] == "connected" && j["link"]["broker"] == first_url.as_str()
    });
    assert!(
        status["link"]["failovers"].as_u64().unwrap() >= 2,
        "{status}"
    );
    let after = post_telemetry(addr, &token, 10, "after");
    let seen = cloud.messages("telemetry", 1020);
    let ids: HashSet<&str> = seen
        .iter()
        .map(|e| e["messageId"].as_str().unwrap())
        .collect();
    for id in posted.iter().chain(&during).chain(&after) {
        assert!(ids.contains(id.as_str()), "{id} was lost");
    }
    for (batch, hub) in [(&during, "b"), (&after, "a")] {
        for id in batch {
            let copy = seen.iter().find(|e| e["messageId"] == id.as_str()).unwrap();
            assert_eq!(copy["hub"], hub, "{copy}");
        }
    }
    // At least once: a copy is only ever a posted record again, whole. Each id's record,
    // from the order the ids were answered in (`post_telemetry` numbers records per call).
    let mut expected: HashMap<&str, (String, u64)> = HashMap::new();
    for (index, id) in posted.iter().enumerate() {
        expected.insert(id, (format!("load-{}", index / 25), (index % 25) as u64));
    }
    for (tag, batch) in [("during", &during), ("after", &after)] {
        for (index, id) in batch.iter().enumerate() {
            expected.insert(id, (tag.to_owned(), index as u64));
        }
    }
    let copies = cloud.seen();
    let copies: Vec<&serde_json::Value> =
        copies.iter().filter(|e| e["kind"] == "telemetry").collect();
    for copy in &copies {
        let id = copy["messageId"]
            .as_str()
            .unwrap_or_else(|| panic!("a copy without a messageId: {copy}"));
        let (tag, seq) = expected
            .get(id)
            .unwrap_or_else(|| panic!("{id} was never posted: {copy}"));
        let record = &copy["body"]["body"];
        assert_eq!(
            (record["tag"].as_str(), record["seq"].as_u64()),
            (Some(tag.as_str()), Some(*seq)),
            "{id} carries another record: {copy}"
        );
    }
    let everything = copies.len();
    println!(
        "failover: {} distinct telemetry messages, {} copies (at least once), failovers {}",
        ids.len(),
        everything,
        status["link"]["failovers"]
    );
    gateway.stop_cleanly(libc::SIGTERM, &site);
}

/// A registration that names the cluster's other brokers (`alternates`): the gateway
/// fails over to them as to `uplink.brokers`, without registering again.
#[test]
fn an_assignment_with_alternate_brokers_fails_over_without_registering_again() {
    let registration = Mosquitto::start("");
    let mut hub_a = Mosquitto::start("");
    let hub_b = Mosquitto::start("");
    let mut cloud = Cloud::start(&[
        format!("--registration={}", registration.url()),
        format!("--hub=a={}", hub_a.url()),
        format!("--hub=b={}", hub_b.url()),
        format!("--alternate=a={}", hub_b.url()),
        format!("--enrollment=gw-test:{KEY}:a"),
    ]);
    let site = registration_site(&registration);
    let mut gateway = Gateway::spawn(&site.config(), &[("ENROLLMENT_KEY", KEY)]);
    let addr = gateway.ready();
    let admin = site.admin_token();
    wait_uplink(addr, &admin, "connected to a", |j| {
        j["link"]["state"] == "connected" && j["link"]["broker"] == hub_a.url().as_str()
    });
    hub_a.stop();
    let status = wait_uplink(addr, &admin, "on the alternate", |j| {
        j["link"]["state"] == "connected" && j["link"]["broker"] == hub_b.url().as_str()
    });
    assert_eq!(status["link"]["registrations"], 1, "{status}");
    let token = device_token(addr, &admin);
    let ids = post_telemetry(addr, &token, 5, "alternate");
    let seen = cloud.messages("telemetry", 5);
    for (id, copy) in ids.iter().zip(&seen) {
        assert_eq!(
            (copy["messageId"].as_str(), copy["hub"].as_str()),
            (Some(id.as_str()), Some("b"))
        );
    }
    gateway.stop_cleanly(libc::SIGTERM, &site);
}

/// MQTT 5's message expiry: the outbox's time to live goes with each message, so the
/// broker drops telemetry that went stale while the backend was away; over 3.1.1 (the
/// control) the same telemetry is delivered late.
#[test]
fn mqtt5_message_expiry_drops_stale_telemetry_at_the_broker_while_the_backend_is_away() {
    for (protocol, stale_arrives) in [("5", false), ("3.1.1", true)] {
        let broker = Mosquitto::start("");
        let args = [format!("--hub=a={}", broker.url())];
        let cloud = Cloud::start(&args);
        let site = uplink_site(
            &format!("broker = \"{}\"\nprotocol = \"{protocol}\"", broker.url()),
            "ttl_secs = 5",
        );
        let mut gateway = Gateway::spawn(&site.config(), &[]);
        let addr = gateway.ready();
        let admin = site.admin_token();
        let status = wait_uplink(addr, &admin, "connected", |j| {
            j["link"]["state"] == "connected"
        });
        assert_eq!(status["link"]["protocol"], protocol, "{status}");
        let token = device_token(addr, &admin);
        // The backend goes away; its persistent session keeps queueing at the broker.
        drop(cloud);
        let stale = post_telemetry(addr, &token, 5, "stale");
        wait_uplink(addr, &admin, "the stale records at the broker", |j| {
            j["outbox"]["queued"] == 0
        });
        // Their 5 s run out at the broker.
        std::thread::sleep(Duration::from_secs(6));
        let fresh = post_telemetry(addr, &token, 5, "fresh");
        wait_uplink(addr, &admin, "the fresh records at the broker", |j| {
            j["outbox"]["queued"] == 0
        });
        // The backend is back: the broker hands over its session's queue, in order.
        let mut cloud = Cloud::start(&args);
        let wanted = if stale_arrives { 10 } else { 5 };
        let seen = cloud.messages("telemetry", wanted);
        let ids: HashSet<&str> = seen
            .iter()
            .map(|e| e["messageId"].as_str().unwrap())
            .collect();
        for id in &fresh {
            assert!(
                ids.contains(id.as_str()),
                "MQTT {protocol}: fresh {id} missing"
            );
        }
        for id in &stale {
            assert_eq!(
                ids.contains(id.as_str()),
                stale_arrives,
                "MQTT {protocol}: stale {id}"
            );
        }
        gateway.stop_cleanly(libc::SIGTERM, &site);
    }
}

/// MQTT 5's session expiry: a gateway killed for 10 s finds its session (and the command
/// the cloud sent meanwhile) when the session outlives the outage, and not when it
/// expired first; a second command then proves the first is gone, not late.
#[test]
fn mqtt5_session_expiry_keeps_the_session_across_a_10_s_outage_and_no_longer() {
    for (expiry, kept) in [(60, true), (5, false)] {
        let broker = Mosquitto::start("");
        let mut cloud = Cloud::start(&[format!("--hub=a={}", broker.url())]);
        let site = uplink_site(
            &format!(
                "broker = \"{}\"\nprotocol = \"5\"\nsession_expiry_secs = {expiry}",
                broker.url()
            ),
            "",
        );
        let mut gateway = Gateway::spawn(&site.config(), &[]);
        let addr = gateway.ready();
        let admin = site.admin_token();
        wait_uplink(addr, &admin, "connected", |j| {
            j["link"]["state"] == "connected"
        });
        cloud.wait_for("message", |e| e["kind"] == "gateway-reported");
        // Killed: no DISCONNECT, the session's expiry runs from now.
        gateway.signal(libc::SIGKILL);
        let _ = gateway.wait();
        let first = format!("during-{expiry}");
        cloud.send(&serde_json::json!({"cmd": "command", "gateway": "gw-test", "hub": "a", "rid": first, "name": "ping"}));
        std::thread::sleep(Duration::from_secs(10));
        let mut gateway = Gateway::spawn(&site.config(), &[]);
        let addr = gateway.ready();
        let again = wait_uplink(addr, &admin, "connected again", |j| {
            j["link"]["state"] == "connected"
        });
        // Subscribed again: this connection's online status goes after its
        // subscriptions, in order.
        let since = again["link"]["connected_since"].clone();
        cloud.wait_for("message", |e| {
            e["kind"] == "status" && e["body"]["state"] == "online" && e["body"]["since"] == since
        });
        let second = format!("after-{expiry}");
        cloud.send(&serde_json::json!({"cmd": "command", "gateway": "gw-test", "hub": "a", "rid": second, "name": "ping"}));
        cloud.wait_for("message", |e| {
            e["kind"] == "command-result" && e["topic"].as_str().unwrap().contains(&second)
        });
        let answered_first = cloud.seen().iter().any(|e| {
            e["kind"] == "command-result" && e["topic"].as_str().is_some_and(|t| t.contains(&first))
        });
        assert_eq!(
            answered_first, kept,
            "session expiry {expiry} s, outage 10 s"
        );
        gateway.stop_cleanly(libc::SIGTERM, &site);
    }
}

/// A broker that speaks MQTT 3.1.1 only: a TCP proxy to a Mosquitto that answers an
/// MQTT 5 CONNECT as a 3.1.1 broker does (CONNACK 0x01, unacceptable protocol version)
/// and closes, and passes every 3.1.1 connection through. Counts the refusals.
struct Mqtt311Only {
    port: u16,
    refused: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Mqtt311Only {
    fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let refused = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = std::sync::Arc::clone(&refused);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { return };
                let counter = std::sync::Arc::clone(&counter);
                std::thread::spawn(move || {
                    // The CONNECT: fixed header, remaining length, "MQTT", the level.
                    let mut packet = vec![0u8; 1];
                    client.read_exact(&mut packet).ok()?;
                    let mut remaining = 0usize;
                    for shift in [0, 7, 14, 21] {
                        let mut byte = [0u8; 1];
                        client.read_exact(&mut byte).ok()?;
                        packet.push(byte[0]);
                        remaining |= usize::from(byte[0] & 0x7f) << shift;
                        if byte[0] & 0x80 == 0 {
                            break;
                        }
                    }
                    let start = packet.len();
                    packet.resize(start + remaining, 0);
                    client.read_exact(&mut packet[start..]).ok()?;
                    if packet.get(start + 6) == Some(&5) {
                        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        client.write_all(&[0x20, 0x02, 0x00, 0x01]).ok()?;
                        return None;
                    }
                    let mut broker = TcpStream::connect(("127.0.0.1", upstream)).ok()?;
                    broker.write_all(&packet).ok()?;
                    let (mut from_client, mut to_broker) =
                        (client.try_clone().ok()?, broker.try_clone().ok()?);
                    std::thread::spawn(move || std::io::copy(&mut from_client, &mut to_broker));
                    std::io::copy(&mut broker, &mut client).ok()?;
                    Some(())
                });
            }
        });
        Self { port, refused }
    }
}

/// `uplink.protocol = "auto"` with a 3.1.1-only broker: the MQTT 5 CONNECT is refused,
/// the gateway speaks 3.1.1 to it and relays as ever.
#[test]
fn auto_speaks_3_1_1_to_a_broker_that_refuses_mqtt5() {
    let broker = Mosquitto::start("");
    let old = Mqtt311Only::start(broker.port);
    let mut cloud = Cloud::start(&[format!("--hub=a={}", broker.url())]);
    let site = uplink_site(&format!("broker = \"mqtt://127.0.0.1:{}\"", old.port), "");
    let mut gateway = Gateway::spawn(&site.config(), &[]);
    let addr = gateway.ready();
    let admin = site.admin_token();
    let status = wait_uplink(addr, &admin, "connected", |j| {
        j["link"]["state"] == "connected"
    });
    assert_eq!(status["link"]["protocol"], "3.1.1", "{status}");
    assert!(old.refused.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    let token = device_token(addr, &admin);
    let ids = post_telemetry(addr, &token, 3, "old broker");
    let seen = cloud.messages("telemetry", 3);
    for (id, copy) in ids.iter().zip(&seen) {
        assert_eq!(copy["messageId"], id.as_str());
    }
    gateway.stop_cleanly(libc::SIGTERM, &site);
}

/// cloud-sim `--share` with a 3.1.1-only broker: a shared-subscription member needs MQTT 5,
/// so the worker ends at once, saying so, rather than waiting for a share that never comes.
#[test]
fn a_shared_subscription_worker_on_a_3_1_1_broker_says_it_needs_mqtt5() {
    let broker = Mosquitto::start("");
    let old = Mqtt311Only::start(broker.port);
    let mut worker = Command::new(cloud_sim_binary())
        .args([
            format!("--hub=a=mqtt://127.0.0.1:{}", old.port),
            "--share=cloud".to_owned(),
            "--worker=w0".to_owned(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let end = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = worker.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > end {
            let _ = worker.kill();
            panic!("the worker still runs after {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success());
    let mut stdout = String::new();
    worker
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    let error: serde_json::Value = stdout
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .find(|e: &serde_json::Value| e["event"] == "error")
        .unwrap_or_else(|| panic!("no error event: {stdout}"));
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("--share needs an MQTT 5 broker"),
        "{message}"
    );
    assert!(!stdout.contains("\"ready\""), "{stdout}");
    assert!(old.refused.load(std::sync::atomic::Ordering::SeqCst) >= 1);
}

/// `uplink.protocol = "5"` with a 3.1.1-only broker: it answers the MQTT 5 CONNECT in
/// 3.1.1's words and closes, which an MQTT 5 client reads as closed before a CONNACK. The
/// gateway keeps trying (other causes close early too), says the likely cause and what to
/// change, and keeps the telemetry posted meanwhile.
#[test]
fn mqtt5_only_with_a_3_1_1_broker_says_what_to_change_and_keeps_the_telemetry() {
    let broker = Mosquitto::start("");
    let old = Mqtt311Only::start(broker.port);
    let site = uplink_site(
        &format!(
            "broker = \"mqtt://127.0.0.1:{}\"\nprotocol = \"5\"",
            old.port
        ),
        "",
    );
    let mut gateway = Gateway::spawn(&site.config(), &[]);
    let addr = gateway.ready();
    let admin = site.admin_token();
    // A third attempt under way: the second was refused.
    let status = wait_uplink(addr, &admin, "refused twice", |j| {
        j["link"]["connect_attempts"].as_u64().unwrap_or(0) >= 3
            && j["link"]["last_error"].is_string()
    });
    let why = status["link"]["last_error"].as_str().unwrap();
    assert!(
        why.contains("closed the connection before accepting it"),
        "{why}"
    );
    assert!(
        why.contains("uplink.protocol = \"auto\" falls back to 3.1.1"),
        "{why}"
    );
    assert!(old.refused.load(std::sync::atomic::Ordering::SeqCst) >= 2);
    let token = device_token(addr, &admin);
    post_telemetry(addr, &token, 3, "kept");
    let status = wait_uplink(addr, &admin, "holding the telemetry", |j| {
        j["outbox"]["queued"] == 3
    });
    assert_eq!(status["link"]["state"], "connecting", "{status}");
    assert_eq!(status["link"]["connections"], 0, "{status}");
    gateway.stop_cleanly(libc::SIGTERM, &site);
}

/// cloud-sim as three workers on one MQTT 5 shared subscription (`--share`,
/// `$share/cloud/outpost/v1/gw/+/#` on Mosquitto): each telemetry message reaches exactly
/// one of them (counted again after a later message arrived, so a late second copy would
/// show), and each takes a share. A killed worker's share moves to the other two.
#[test]
fn workers_on_a_shared_subscription_each_take_a_share_and_every_message_once() {
    let broker = Mosquitto::start("");
    let mut workers: Vec<Option<Cloud>> = (0..3)
        .map(|w| {
            Some(Cloud::start(&[
                format!("--hub=a={}", broker.url()),
                "--share=cloud".to_owned(),
                format!("--worker=w{w}"),
            ]))
        })
        .collect();
    let site = uplink_site(&format!("broker = \"{}\"", broker.url()), "");
    let (gateway, addr, token) = connected_gateway(&site);

    // Every telemetry message each live worker handled so far: (worker, message id).
    let copies = |workers: &mut [Option<Cloud>]| {
        let mut copies: Vec<(usize, String)> = Vec::new();
        for (w, worker) in workers.iter_mut().enumerate() {
            let Some(worker) = worker else { continue };
            worker.drain();
            copies.extend(
                worker
                    .seen()
                    .iter()
                    .filter(|e| e["event"] == "message" && e["kind"] == "telemetry")
                    .map(|e| (w, e["messageId"].as_str().unwrap().to_owned())),
            );
        }
        copies
    };
    // Waits until the workers have every one of `ids`.
    let arrived = |workers: &mut [Option<Cloud>], ids: &[String]| {
        let end = Instant::now() + DEADLINE;
        loop {
            let copies = copies(workers);
            let distinct: HashSet<&str> = copies.iter().map(|(_, id)| id.as_str()).collect();
            if ids.iter().all(|id| distinct.contains(id.as_str())) {
                return;
            }
            assert!(
                Instant::now() < end,
                "the workers have {} of {} messages",
                ids.iter()
                    .filter(|id| distinct.contains(id.as_str()))
                    .count(),
                ids.len()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // How many copies of `ids` each worker handled, once every one arrived and then a
    // later message (a fence: a second copy would have come before it).
    let shares = |workers: &mut [Option<Cloud>], ids: &[String], tag: &str| {
        arrived(workers, ids);
        let fence = post_telemetry(addr, &token, 1, &format!("{tag}-fence"));
        arrived(workers, &fence);
        let wanted: HashSet<&str> = ids.iter().map(String::as_str).collect();
        let copies: Vec<(usize, String)> = copies(workers)
            .into_iter()
            .filter(|(_, id)| wanted.contains(id.as_str()))
            .collect();
        assert_eq!(
            copies.len(),
            ids.len(),
            "{tag}: a message reached two workers"
        );
        (0..3)
            .map(|w| copies.iter().filter(|(at, _)| *at == w).count())
            .collect::<Vec<usize>>()
    };

    let posted = post_telemetry(addr, &token, 300, "shared");
    let first = shares(&mut workers, &posted, "shared");
    assert!(first.iter().all(|&n| n > 0), "shares {first:?}");

    // Worker w0 dies. Its member connection is then taken over by a client of the test's
    // own with the same id (and no subscription), so the broker has surely dropped it
    // before more telemetry comes: its share goes to w1 and w2.
    drop(workers[0].take());
    drop(mqtt5_client(&broker, "cloud-sim-a-w0-share"));
    let posted = post_telemetry(addr, &token, 300, "after");
    let second = shares(&mut workers, &posted, "after");
    assert_eq!(second[0], 0, "shares {second:?}");
    assert!(second[1] > 0 && second[2] > 0, "shares {second:?}");
    println!(
        "shared subscription: 300 messages over 3 workers as {first:?}; \
         300 more after w0 was killed as {second:?}"
    );
    gateway.stop_cleanly(libc::SIGTERM, &site);
}

/// The site's gateway, started and connected to its broker: with its API address and a
/// token for device `esp-1`.
fn connected_gateway(site: &Site) -> (Gateway, SocketAddr, String) {
    let mut gateway = Gateway::spawn(&site.config(), &[]);
    let addr = gateway.ready();
    let admin = site.admin_token();
    wait_uplink(addr, &admin, "connected", |j| {
        j["link"]["state"] == "connected"
    });
    let token = device_token(addr, &admin);
    (gateway, addr, token)
}

/// An MQTT 5 client of the test's own on `broker` with client id `id`, once connected.
fn mqtt5_client(broker: &Mosquitto, id: &str) -> (rumqttc::v5::Client, rumqttc::v5::Connection) {
    let mut options = rumqttc::v5::MqttOptions::new(id, "127.0.0.1", broker.port);
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut connection) = rumqttc::v5::Client::new(options, 100);
    mqtt5_event(&mut connection, "the CONNACK", |packet| {
        matches!(packet, rumqttc::v5::mqttbytes::v5::Packet::ConnAck(_))
    });
    (client, connection)
}

/// The next incoming packet for which `pred` holds, within [`DEADLINE`].
fn mqtt5_event(
    connection: &mut rumqttc::v5::Connection,
    what: &str,
    pred: impl Fn(&rumqttc::v5::mqttbytes::v5::Packet) -> bool,
) -> rumqttc::v5::mqttbytes::v5::Packet {
    let end = Instant::now() + DEADLINE;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match connection.recv_timeout(left) {
            Ok(Ok(rumqttc::v5::Event::Incoming(packet))) if pred(&packet) => return packet,
            Ok(Ok(_)) => {}
            Ok(Err(err)) => panic!("the test's MQTT 5 client failed before {what}: {err}"),
            Err(err) => panic!("no {what} within {DEADLINE:?}: {err:?}"),
        }
    }
}

/// MQTT 5 publishes say what they carry in properties, for a backend (or a broker rule)
/// that routes without parsing the payload: the message id and the schema as user
/// properties, the outbox's time to live as the message expiry, JSON as the content type.
/// Over 3.1.1 (the control) the same telemetry arrives with none of them.
#[test]
fn mqtt5_publishes_carry_the_message_id_schema_and_expiry_as_properties() {
    use rumqttc::v5::mqttbytes::v5::Packet;
    for protocol in ["5", "3.1.1"] {
        let broker = Mosquitto::start("");
        let site = uplink_site(
            &format!("broker = \"{}\"\nprotocol = \"{protocol}\"", broker.url()),
            "ttl_secs = 600",
        );
        let (gateway, addr, token) = connected_gateway(&site);
        // Subscribed before anything is posted (and polled from then on).
        let (subscriber, mut events) = mqtt5_client(&broker, "backend");
        subscriber
            .subscribe(
                "outpost/v1/gw/gw-test/telemetry/#",
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            )
            .unwrap();
        mqtt5_event(&mut events, "the SUBACK", |p| {
            matches!(p, Packet::SubAck(_))
        });
        let ids: HashSet<String> = post_telemetry(addr, &token, 3, "properties")
            .into_iter()
            .collect();
        let mut seen = HashSet::new();
        while seen.len() < ids.len() {
            let Packet::Publish(publish) = mqtt5_event(&mut events, "the telemetry", |p| {
                matches!(p, Packet::Publish(_))
            }) else {
                unreachable!()
            };
            let envelope: serde_json::Value = serde_json::from_slice(&publish.payload).unwrap();
            let id = envelope["messageId"].as_str().unwrap().to_owned();
            assert!(ids.contains(&id), "MQTT {protocol}: {id} was not posted");
            let properties = publish.properties.unwrap_or_default();
            let user: Vec<(&str, &str)> = properties
                .user_properties
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            if protocol == "5" {
                assert_eq!(
                    user,
                    [
                        ("messageId", id.as_str()),
                        ("schema", envelope["schema"].as_str().unwrap())
                    ],
                    "{envelope}"
                );
                assert_eq!(envelope["schema"], "outpost.telemetry/1");
                let expiry = properties.message_expiry_interval.unwrap();
                assert!((590..=600).contains(&expiry), "expiry {expiry} s of 600");
                assert_eq!(properties.content_type.as_deref(), Some("application/json"));
            } else {
                assert!(user.is_empty(), "MQTT 3.1.1 carried {user:?}");
                assert_eq!(properties.message_expiry_interval, None);
                assert_eq!(properties.content_type, None);
            }
            seen.insert(id);
        }
        drop(subscriber);
        gateway.stop_cleanly(libc::SIGTERM, &site);
    }
}
