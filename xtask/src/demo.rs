//! `cargo xtask demo`: the whole story on one machine, with real parts.
//!
//! Mosquitto and cloud-sim play the fleet backend; a local HTTP origin plays the vendor's
//! firmware server; two esp-sim fleets (ESP32-C3 lights with an ESP-IDF app, ESP32-H2
//! Zigbee sensors) wait for onboarding. The release `outpost` onboards them over SoftAP,
//! installs two signed handlers, takes a signed deployment from the cloud, fetches each
//! file once and rolls it out in three waves; one light never comes back after its
//! update, fails in the rollback window and is rolled back. A summary table ends it.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A child process stopped when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if self.0.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A process that prints JSON events on stdout.
struct Events {
    proc: Proc,
    rx: Receiver<serde_json::Value>,
    seen: Vec<serde_json::Value>,
}

impl Events {
    fn spawn(command: &mut Command) -> anyhow::Result<Self> {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {command:?}"))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(json) = serde_json::from_str(&line)
                    && tx.send(json).is_err()
                {
                    break;
                }
            }
        });
        Ok(Self {
            proc: Proc(child),
            rx,
            seen: Vec::new(),
        })
    }

    fn drain(&mut self) -> &[serde_json::Value] {
        while let Ok(json) = self.rx.try_recv() {
            self.seen.push(json);
        }
        &self.seen
    }

    fn count(&mut self, pred: impl Fn(&serde_json::Value) -> bool) -> usize {
        self.drain().iter().filter(|e| pred(e)).count()
    }

    fn wait(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&mut Self) -> bool,
    ) -> anyhow::Result<()> {
        let end = Instant::now() + timeout;
        while !pred(self) {
            if Instant::now() > end {
                bail!("timed out waiting for {what}");
            }
            if let Ok(json) = self.rx.recv_timeout(Duration::from_millis(100)) {
                self.seen.push(json);
            }
        }
        Ok(())
    }

    fn stdin(&mut self) -> anyhow::Result<&mut ChildStdin> {
        self.proc.0.stdin.as_mut().context("no stdin")
    }
}

/// The vendor's firmware server: counts the bytes it sends.
fn origin(
    files: Vec<(String, Vec<u8>)>,
) -> anyhow::Result<(String, Arc<AtomicU64>, Arc<Mutex<usize>>)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let base = format!("http://{}", listener.local_addr()?);
    let bytes_sent = Arc::new(AtomicU64::new(0));
    let requests = Arc::new(Mutex::new(0usize));
    let (sent, count) = (Arc::clone(&bytes_sent), Arc::clone(&requests));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut first = String::new();
            let _ = reader.read_line(&mut first);
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
            }
            let path = first.split(' ').nth(1).unwrap_or("");
            *count.lock().expect("lock") += 1;
            match files.iter().find(|(p, _)| p == path) {
                Some((_, body)) => {
                    let _ = write!(
                        stream,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    if stream.write_all(body).is_ok() {
                        sent.fetch_add(body.len() as u64, Ordering::Relaxed);
                    }
                }
                None => {
                    let _ = stream.write_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                }
            }
        }
    });
    Ok((base, bytes_sent, requests))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Runs the demo. `--lights N --sensors N` size the fleet; `--keep` leaves everything
/// running (with the dashboard) until Enter is pressed.
pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    let (mut lights, mut sensors, mut keep) = (30usize, 20usize, false);
    let mut rest = args.iter().filter(|a| *a != "--");
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--lights" => {
                lights = rest
                    .next()
                    .and_then(|n| n.parse().ok())
                    .context("--lights N")?;
            }
            "--sensors" => {
                sensors = rest
                    .next()
                    .and_then(|n| n.parse().ok())
                    .context("--sensors N")?;
            }
            "--keep" => keep = true,
            other => bail!("unknown demo argument {other:?} (--lights N --sensors N --keep)"),
        }
    }
    anyhow::ensure!(
        lights >= 2 && sensors >= 1,
        "the demo needs at least 2 lights and 1 sensor"
    );
    let root = crate::workspace_root();
    crate::ensure_mosquitto()?;
    crate::ensure_rust_target(&root, crate::WASM_TARGET)?;
    crate::step("cargo build --release (outpost, esp-sim, cloud-sim) and the two handlers");
    // The gateway as the benches and the package build it (one feature set, so CI compiles
    // it once: built together with cloud-sim, its dependencies' features differ and the
    // whole gateway compiled again), then cloud-sim as bench-fleet builds it.
    crate::build_release_gateway_and_sim(&root)?;
    crate::build_release_cloud_sim(&root)?;
    let guests = root.join("target/demo-guests");
    crate::cargo_ok(
        &root,
        &[
            "build",
            "--release",
            "--locked",
            "--manifest-path",
            "plugins/Cargo.toml",
            "--target",
            crate::WASM_TARGET,
            "-p",
            "esp32-app",
            "-p",
            "zigbee-ota",
            "--target-dir",
            guests.to_str().context("path")?,
        ],
    )?;
    let bin = root.join("target/release");
    let wasm = guests.join(crate::WASM_TARGET).join("release");
    let dir = root.join("target/demo");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let outpost = |args: &[&str]| -> anyhow::Result<String> {
        let out = Command::new(bin.join("outpost"))
            .arg("--config")
            .arg(dir.join("outpost.toml"))
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "outpost {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let json = |args: &[&str]| -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_str(&outpost(args)?)?)
    };
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();

    crate::step("starting Mosquitto and cloud-sim (the fleet backend)");
    let port = free_port()?;
    std::fs::write(
        dir.join("mosquitto.conf"),
        format!("listener {port} 127.0.0.1\nallow_anonymous true\nuser root\nlog_dest none\n"),
    )?;
    let _broker = Proc(
        Command::new("mosquitto")
            .arg("-c")
            .arg(dir.join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start mosquitto")?,
    );
    let end = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(Instant::now() < end, "mosquitto did not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let broker = format!("mqtt://127.0.0.1:{port}");
    let mut cloud = Events::spawn(
        Command::new(bin.join("cloud-sim"))
            .arg(format!("--hub=a={broker}"))
            .stdin(Stdio::piped()),
    )?;
    cloud.wait("cloud-sim", Duration::from_secs(20), |c| {
        c.count(|e| e["event"] == "ready") > 0
    })?;

    crate::step("keys, firmware and the site config");
    let public_key = |out: String| -> anyhow::Result<String> {
        out.lines()
            .find_map(|l| l.strip_prefix("Public key: "))
            .map(|k| k.trim().to_owned())
            .context("keygen printed no key")
    };
    std::fs::write(dir.join("outpost.toml"), "[gateway]\nid = \"demo\"\n")?;
    let vendor = public_key(outpost(&[
        "handler",
        "keygen",
        "--out",
        &path("vendor.key"),
    ])?)?;
    let fleet = public_key(outpost(&[
        "handler",
        "keygen",
        "--out",
        &path("fleet.key"),
    ])?)?;
    std::fs::write(dir.join("wifi"), "correct horse battery")?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(dir.join("wifi"), std::fs::Permissions::from_mode(0o600))?;
    std::fs::write(
        dir.join("outpost.toml"),
        format!(
            "[gateway]\nid = \"demo\"\nname = \"Demo site\"\nstate_dir = \"state\"\n\n\
             [api]\nbind = \"127.0.0.1:0\"\nmax_connections_per_client = 512\n\n\
             [cache]\nbind = \"127.0.0.1:0\"\nmax_connections_per_client = 512\n\n\
             [[cache.trusted_signers]]\nname = \"fleet\"\npublic_key = \"{fleet}\"\n\n\
             [handlers]\nmax_concurrent = 16\n\n\
             [[handlers.trusted_vendors]]\nname = \"demo-vendor\"\npublic_key = \"{vendor}\"\n\
             device_types = [\"esp32-app\", \"zigbee-sensor\"]\n\n\
             [ble]\nenabled = false\n\n[onboarding]\nstatus_poll_ms = 50\n\n\
             [[onboarding.wifi]]\nssid = \"outpost-site\"\npassphrase = {{ file = \"wifi\" }}\n\n\
             [uplink]\nbroker = \"{broker}\"\n\n[log]\nformat = \"json\"\n"
        ),
    )?;
    let esp_sim = |args: &[&str]| -> anyhow::Result<()> {
        let status = Command::new(bin.join("esp-sim")).args(args).status()?;
        anyhow::ensure!(status.success(), "esp-sim {args:?} failed");
        Ok(())
    };
    esp_sim(&[
        "firmware",
        "--kind",
        "esp-app",
        "--chip",
        "esp32c3",
        "--project",
        "outpost-light",
        "--version",
        "2.0.0",
        "--size",
        "1048576",
        "--out",
        &path("light-2.0.0.bin"),
    ])?;
    esp_sim(&[
        "firmware",
        "--kind",
        "zigbee-ota",
        "--version",
        "2.0.0",
        "--manufacturer-code",
        "0x131b",
        "--image-type",
        "0x0042",
        "--size",
        "393216",
        "--out",
        &path("sensor-2.0.0.ota"),
    ])?;
    let app = std::fs::read(dir.join("light-2.0.0.bin"))?;
    let zigbee = std::fs::read(dir.join("sensor-2.0.0.ota"))?;
    let (origin_url, upstream_bytes, upstream_requests) = origin(vec![
        ("/light-2.0.0.bin".into(), app.clone()),
        ("/sensor-2.0.0.ota".into(), zigbee.clone()),
    ])?;

    crate::step("outpost run");
    let log = std::fs::File::create(dir.join("outpost.log"))?;
    let _gateway = Proc(
        Command::new(bin.join("outpost"))
            .arg("--config")
            .arg(dir.join("outpost.toml"))
            .arg("run")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?,
    );
    let end = Instant::now() + Duration::from_secs(60);
    while outpost(&["uplink", "status", "--json"]).is_err() {
        anyhow::ensure!(
            Instant::now() < end,
            "the gateway did not start; see {}",
            path("outpost.log")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for (file, name, device_type) in [
        ("esp32_app.wasm", "esp32-app", "esp32-app"),
        ("zigbee_ota.wasm", "zigbee-ota", "zigbee-sensor"),
    ] {
        let package = path(&format!("{name}.tar"));
        outpost(&[
            "handler",
            "pack",
            wasm.join(file).to_str().context("path")?,
            "--name",
            name,
            "--version",
            "1.0.0",
            "--vendor",
            "demo-vendor",
            "--device-type",
            device_type,
            "--out",
            &package,
        ])?;
        outpost(&["handler", "sign", &package, "--key", &path("vendor.key")])?;
        outpost(&["handler", "install", &package])?;
    }

    crate::step(&format!(
        "esp-sim: {lights} lights (ESP32-C3) and {sensors} Zigbee sensors (ESP32-H2)"
    ));
    let never_returns = format!("{}=never-returns", lights - 1);
    let (lights_n, sensors_n) = (lights.to_string(), sensors.to_string());
    let mut light_sim = Events::spawn(Command::new(bin.join("esp-sim")).args([
        "--softap",
        &lights_n,
        "--security",
        "2",
        "--agent",
        "--device-type",
        "esp32-app",
        "--chip",
        "esp32c3",
        "--project",
        "outpost-light",
        "--reboot-ms",
        "500",
        "--update-fault",
        &never_returns,
        "--manifest",
        &path("lights.json"),
    ]))?;
    let mut sensor_sim = Events::spawn(Command::new(bin.join("esp-sim")).args([
        "--softap",
        &sensors_n,
        "--first-index",
        "256",
        "--security",
        "1",
        "--pop",
        "demo-pop",
        "--agent",
        "--device-type",
        "zigbee-sensor",
        "--chip",
        "esp32h2",
        "--project",
        "outpost-sensor",
        "--property",
        "manufacturer_code=0x131b",
        "--property",
        "image_type=0x0042",
        "--reboot-ms",
        "500",
        "--manifest",
        &path("sensors.json"),
    ]))?;
    for sim in [&mut light_sim, &mut sensor_sim] {
        sim.wait("esp-sim", Duration::from_secs(30), |s| {
            s.count(|e| e["event"] == "ready") > 0
        })?;
    }

    crate::step("outpost onboard import + run");
    outpost(&["onboard", "import", &path("lights.json")])?;
    outpost(&["onboard", "import", &path("sensors.json")])?;
    let started = Instant::now();
    let report: serde_json::Value = serde_json::from_str(&String::from_utf8_lossy(
        &Command::new(bin.join("outpost"))
            .arg("--config")
            .arg(dir.join("outpost.toml"))
            .args(["onboard", "run", "--json"])
            .output()?
            .stdout,
    ))
    .context("onboard run printed no report")?;
    let onboarding_s = started.elapsed().as_secs_f64();
    let onboarded = report["succeeded"].as_u64().unwrap_or(0);
    let total = (lights + sensors) as u64;
    light_sim.wait("the lights' agents", Duration::from_secs(30), |s| {
        s.count(|e| e["event"] == "agent_ready") >= lights
    })?;
    sensor_sim.wait("the sensors' agents", Duration::from_secs(30), |s| {
        s.count(|e| e["event"] == "agent_ready") >= sensors
    })?;

    crate::step("the cloud publishes a signed deployment");
    let sha = |b: &[u8]| {
        let out = Command::new("sha256sum")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                c.stdin.take().expect("stdin").write_all(b)?;
                c.wait_with_output()
            });
        out.map(|o| String::from_utf8_lossy(&o.stdout)[..64].to_owned())
    };
    let manifest = serde_json::json!({
        "manifestVersion": 1,
        "updateId": {"provider": "Outpost", "name": "demo-fleet", "version": "2.0.0"},
        "compatibility": [
            {"manufacturer": "Espressif", "model": "esp32-app"},
            {"manufacturer": "Espressif", "model": "zigbee-sensor"}
        ],
        "steps": [
            {"handler": "esp32-app", "files": ["app"]},
            {"handler": "zigbee-ota", "files": ["zb"]}
        ],
        "files": [
            {"id": "app", "fileName": "light-2.0.0.bin", "sizeInBytes": app.len(),
             "sha256": sha(&app)?, "url": format!("{origin_url}/light-2.0.0.bin")},
            {"id": "zb", "fileName": "sensor-2.0.0.ota", "sizeInBytes": zigbee.len(),
             "sha256": sha(&zigbee)?, "url": format!("{origin_url}/sensor-2.0.0.ota")}
        ]
    });
    std::fs::write(dir.join("release.json"), manifest.to_string())?;
    outpost(&[
        "firmware",
        "manifest",
        "sign",
        &path("release.json"),
        "--key",
        &path("fleet.key"),
        "--kid",
        "fleet",
        "--out",
        &path("release.jws"),
    ])?;
    let jws = std::fs::read_to_string(dir.join("release.jws"))?;
    let deploy = serde_json::json!({
        "cmd": "deploy", "gateway": "demo", "deploymentId": "demo-2.0.0",
        "manifest": jws.trim(),
        "rollout": {
            "waves": [10, 50, 100], "successThreshold": 90,
            "errorThreshold": {"percent": 20}, "priority": "immediate",
            "rollbackWindowSecs": 5
        }
    });
    writeln!(cloud.stdin()?, "{deploy}")?;
    let deployed = Instant::now();
    let mut view = serde_json::Value::Null;
    let mut last = String::new();
    let end = Instant::now() + Duration::from_secs(300);
    while Instant::now() < end {
        if let Ok(v) = json(&["rollout", "status", "demo-2.0.0", "--json"]) {
            let line = format!(
                "  {:<9} wave {}/{}  {} ok, {} failed, {} running",
                v["state"].as_str().unwrap_or("?"),
                v["wave"].as_u64().unwrap_or(0) + 1,
                v["waves"],
                v["counts"]["succeeded"],
                v["counts"]["failed"],
                v["counts"]["running"]
            );
            if line != last {
                eprintln!("{line}");
                last = line;
            }
            let state = v["state"].as_str().unwrap_or("").to_owned();
            let settled = v["counts"]["running"] == 0;
            view = v;
            if matches!(
                state.as_str(),
                "finished" | "stopped" | "cancelled" | "paused"
            ) && settled
            {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let rollout_s = deployed.elapsed().as_secs_f64();
    let state = view["state"].as_str().unwrap_or("?").to_owned();
    let counts = &view["counts"];
    let done = counts["succeeded"].as_u64().unwrap_or(0)
        + counts["failed"].as_u64().unwrap_or(0)
        + counts["skipped"].as_u64().unwrap_or(0);
    let _ = cloud.wait("results at the cloud", Duration::from_secs(30), |c| {
        c.count(|e| e["kind"] == "result") as u64 >= done
    });
    let results = cloud.count(|e| e["kind"] == "result");
    let cloud_state = cloud
        .drain()
        .iter()
        .rev()
        .find(|e| e["kind"] == "rollout")
        .and_then(|e| e["body"]["state"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "-".into());
    // Bytes served per blob reach the store every 5 s.
    let downloaded: u64 = [&mut light_sim, &mut sensor_sim]
        .into_iter()
        .map(|s| {
            s.drain()
                .iter()
                .filter(|e| e["event"] == "downloaded")
                .filter_map(|e| e["bytes"].as_u64())
                .sum::<u64>()
        })
        .sum();
    let mut served = 0;
    let end = Instant::now() + Duration::from_secs(8);
    while Instant::now() < end {
        served = json(&["firmware", "list", "--json"])
            .map(|f| {
                f["blobs"]
                    .as_array()
                    .map(|b| b.iter().filter_map(|b| b["bytes_served"].as_u64()).sum())
                    .unwrap_or(0)
            })
            .unwrap_or(0);
        if served >= downloaded {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let upstream = upstream_bytes.load(Ordering::Relaxed);
    let requests = *upstream_requests.lock().expect("lock");

    // Per wave: devices, outcomes, and from the first start to the last finish.
    let mut waves: BTreeMap<u64, (u64, u64, u64, i64, i64)> = BTreeMap::new();
    for d in view["devices"].as_array().cloned().unwrap_or_default() {
        let w = waves
            .entry(d["wave"].as_u64().unwrap_or(0))
            .or_insert((0, 0, 0, i64::MAX, 0));
        w.0 += 1;
        match d["status"].as_str() {
            Some("succeeded" | "skipped") => w.1 += 1,
            Some("failed") => w.2 += 1,
            _ => {}
        }
        if let Some(s) = d["started_at"].as_i64() {
            w.3 = w.3.min(s);
        }
        if let Some(f) = d["finished_at"].as_i64() {
            w.4 = w.4.max(f);
        }
    }
    let failed_detail: Vec<String> = view["devices"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|d| d["status"] == "failed")
        .map(|d| {
            format!(
                "{}: {}",
                d["device_id"].as_str().unwrap_or("?"),
                d["result"]["lastInstallResult"]["resultDetails"]
                    .as_str()
                    .unwrap_or("?")
            )
        })
        .collect();

    println!("\nOutpost demo — {total} devices, 2 device types, 2 signed WASI handlers\n");
    println!("| step | result |");
    println!("|---|---|");
    println!(
        "| onboarding (SoftAP, Security 2 lights / Security 1 sensors, Wi-Fi, agent credential) | {onboarded}/{total} devices in {onboarding_s:.1} s |"
    );
    println!(
        "| firmware fetched upstream | {} in {requests} request(s) for 2 files ({} + {}) |",
        mib(upstream),
        mib(app.len() as u64),
        mib(zigbee.len() as u64)
    );
    println!(
        "| firmware served locally | {} to the devices ({:.1}× the upstream bytes) |",
        mib(served),
        served as f64 / upstream.max(1) as f64
    );
    println!("| rollout `demo-2.0.0` | {state} in {rollout_s:.1} s after the cloud published it |");
    for (wave, (n, ok, failed, start, finish)) in &waves {
        let secs = if *finish > 0 && *start < i64::MAX {
            format!("{:.1} s", (finish - start) as f64 / 1000.0)
        } else {
            "-".into()
        };
        println!(
            "| wave {} | {n} devices: {ok} updated, {failed} failed, {secs} |",
            wave + 1
        );
    }
    for line in &failed_detail {
        println!("| failed | {line} |");
    }
    println!(
        "| results at the cloud | {results} per-device results; rollout state {cloud_state} |"
    );
    println!("\nrerun: cargo xtask demo   (logs and state in target/demo)");
    if keep {
        let address = std::fs::read_to_string(dir.join("state/api-address"))?;
        let token = std::fs::read_to_string(dir.join("state/admin-token"))?;
        println!(
            "dashboard: http://{}/dashboard#token={}\nPress Enter to stop.",
            address.trim(),
            token.trim()
        );
        let _ = std::io::stdin().read(&mut [0u8; 1]);
    }
    if onboarded != total || state != "finished" {
        bail!(
            "the demo did not go as planned; see {}",
            path("outpost.log")
        );
    }
    Ok(())
}
