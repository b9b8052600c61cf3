//! Rollouts end to end over real parts: Mosquitto, cloud-sim, the `outpost` binary with
//! two signed handlers (esp32-app and zigbee-ota, built from plugins/), and esp-sim
//! devices onboarded over SoftAP that run the Outpost agent and download from the
//! gateway's firmware cache.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::firmware::sha256_hex;
use super::onboarding::Sim;
use super::uplink::{Cloud, Mosquitto};
use super::{DEADLINE, Gateway, Site, http_get, stdout_of};

/// A firmware file made by `esp-sim firmware` (the simulated vendors' build output).
pub(crate) fn firmware_file(args: &[&str]) -> Vec<u8> {
    let out = tempfile::NamedTempFile::new().unwrap();
    let status = std::process::Command::new(super::onboarding::esp_sim_binary())
        .arg("firmware")
        .args(args)
        .arg("--out")
        .arg(out.path())
        .status()
        .unwrap();
    assert!(status.success(), "esp-sim firmware {args:?} failed");
    std::fs::read(out.path()).unwrap()
}

/// A firmware origin on loopback that counts the GETs per path.
pub(crate) struct CountingOrigin {
    addr: SocketAddr,
    gets: Arc<Mutex<HashMap<String, usize>>>,
}

impl CountingOrigin {
    pub(crate) fn start(files: Vec<(&'static str, Vec<u8>)>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let gets = Arc::new(Mutex::new(HashMap::new()));
        let counted = Arc::clone(&gets);
        let files: HashMap<String, Vec<u8>> =
            files.into_iter().map(|(p, b)| (p.to_owned(), b)).collect();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut first = String::new();
                let _ = reader.read_line(&mut first);
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                }
                let path = first.split(' ').nth(1).unwrap_or("").to_owned();
                *counted.lock().unwrap().entry(path.clone()).or_insert(0) += 1;
                match files.get(&path) {
                    Some(bytes) => {
                        let _ = write!(
                            stream,
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            bytes.len()
                        );
                        let _ = stream.write_all(bytes);
                    }
                    None => {
                        let _ = stream.write_all(
                            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                        );
                    }
                }
            }
        });
        Self { addr, gets }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub(crate) fn gets(&self, path: &str) -> usize {
        self.gets.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

/// The two update files and their manifest entries.
pub(crate) struct Release {
    pub(crate) app: Vec<u8>,
    pub(crate) zigbee: Vec<u8>,
}

impl Release {
    pub(crate) fn new() -> Self {
        Self {
            app: firmware_file(&[
                "--kind",
                "esp-app",
                "--chip",
                "esp32c3",
                "--version",
                "2.0.0",
                "--project",
                "outpost-light",
                "--size",
                "262144",
            ]),
            zigbee: firmware_file(&[
                "--kind",
                "zigbee-ota",
                "--version",
                "2.0.0",
                "--manufacturer-code",
                "0x131b",
                "--image-type",
                "0x0042",
                "--size",
                "196608",
            ]),
        }
    }

    /// The manifest JSON: one step per handler; files with URLs when `origin` is given.
    pub(crate) fn manifest(&self, origin: Option<&CountingOrigin>) -> serde_json::Value {
        let file = |id: &str, name: &str, bytes: &[u8], path: &str| {
            let mut f = serde_json::json!({
                "id": id, "fileName": name, "sizeInBytes": bytes.len(), "sha256": sha256_hex(bytes),
            });
            if let Some(origin) = origin {
                f["url"] = serde_json::json!(origin.url(path));
            }
            f
        };
        serde_json::json!({
            "manifestVersion": 1,
            "updateId": {"provider": "Outpost", "name": "site-fleet", "version": "2.0.0"},
            "compatibility": [
                {"manufacturer": "Espressif", "model": "esp32-app"},
                {"manufacturer": "Espressif", "model": "zigbee-sensor"}
            ],
            "steps": [
                {"handler": "esp32-app", "files": ["app"]},
                {"handler": "zigbee-ota", "files": ["zb"]}
            ],
            "files": [
                file("app", "light-2.0.0.bin", &self.app, "/light-2.0.0.bin"),
                file("zb", "sensor-2.0.0.ota", &self.zigbee, "/sensor-2.0.0.ota"),
            ],
        })
    }
}

/// Public key from `handler keygen` output.
fn keygen(site: &Site, name: &str) -> (PathBuf, String) {
    let key = site.dir.path().join(format!("{name}.key"));
    let out = stdout_of(&site.command(&["handler", "keygen", "--out", key.to_str().unwrap()]));
    let public = out
        .lines()
        .find_map(|l| l.strip_prefix("Public key: "))
        .expect("keygen prints the public key")
        .trim()
        .to_owned();
    (key, public)
}

/// A site with a vendor and a fleet key trusted, Wi-Fi for onboarding, and `uplink`.
pub(crate) struct FleetSite {
    pub(crate) site: Site,
    vendor_key: PathBuf,
    fleet_key: PathBuf,
}

impl FleetSite {
    pub(crate) fn new(uplink: &str) -> Self {
        Self::with_api("127.0.0.1:0", uplink)
    }

    /// As [`new`](Self::new) with the API on `api` (a fixed port survives a restart, as
    /// the devices' agents need).
    pub(crate) fn with_api(api: &str, uplink: &str) -> Self {
        let site = Site::new("");
        let (vendor_key, vendor) = keygen(&site, "vendor");
        let (fleet_key, fleet) = keygen(&site, "fleet");
        super::write_secret(&site.dir.path().join("wifi"), "correct horse battery");
        site.write_config(&format!(
            // Every simulated device connects from 127.0.0.1: one address for many.
            "[gateway]\nid = \"gw-test\"\nstate_dir = \"state\"\n\n\
             [api]\nbind = \"{api}\"\nmax_connections_per_client = 512\n\n\
             [cache]\nbind = \"127.0.0.1:0\"\nmax_connections_per_client = 512\n\n\
             [[cache.trusted_signers]]\nname = \"fleet\"\npublic_key = \"{fleet}\"\n\n\
             [handlers]\nmax_concurrent = 16\n\n\
             [[handlers.trusted_vendors]]\nname = \"outpost-demo\"\npublic_key = \"{vendor}\"\n\
             device_types = [\"esp32-app\", \"zigbee-sensor\", \"py-light\"]\n\n\
             [ble]\nenabled = false\n\n\
             [onboarding]\nstatus_poll_ms = 50\n\n\
             [[onboarding.wifi]]\nssid = \"outpost-site\"\npassphrase = {{ file = \"wifi\" }}\n\n\
             {uplink}\n"
        ));
        Self {
            site,
            vendor_key,
            fleet_key,
        }
    }

    /// Packs, signs and installs both handlers into the running gateway.
    pub(crate) fn install_handlers(&self) {
        self.install(outpost_test_guests::ESP32_APP, "esp32-app", "esp32-app");
        self.install(
            outpost_test_guests::ZIGBEE_OTA,
            "zigbee-ota",
            "zigbee-sensor",
        );
    }

    /// Packs, signs and installs the handler `wasm` into the running gateway.
    pub(crate) fn install(&self, wasm: &str, name: &str, device_type: &str) {
        let package = self.site.dir.path().join(format!("{name}.tar"));
        for args in [
            vec![
                "handler",
                "pack",
                wasm,
                "--name",
                name,
                "--version",
                "1.0.0",
                "--vendor",
                "outpost-demo",
                "--device-type",
                device_type,
                "--out",
                package.to_str().unwrap(),
            ],
            vec![
                "handler",
                "sign",
                package.to_str().unwrap(),
                "--key",
                self.vendor_key.to_str().unwrap(),
            ],
            vec!["handler", "install", package.to_str().unwrap()],
        ] {
            let out = self.site.command(&args);
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// Signs the manifest with the fleet key; returns the JWS file.
    pub(crate) fn sign(&self, manifest: &serde_json::Value) -> PathBuf {
        let json = self.site.dir.path().join("release.json");
        std::fs::write(&json, manifest.to_string()).unwrap();
        let jws = self.site.dir.path().join("release.jws");
        let out = self.site.command(&[
            "firmware",
            "manifest",
            "sign",
            json.to_str().unwrap(),
            "--key",
            self.fleet_key.to_str().unwrap(),
            "--kid",
            "fleet",
            "--out",
            jws.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        jws
    }
}

/// esp-sim's arguments (after `--softap N`) for esp32-app lights that run the Outpost
/// agent, onboarded over SoftAP with Security 1.
pub(crate) const LIGHT_ARGS: &[&str] = &[
    "--security",
    "1",
    "--pop",
    "abcd1234",
    "--agent",
    "--device-type",
    "esp32-app",
    "--chip",
    "esp32c3",
    "--project",
    "outpost-light",
    "--reboot-ms",
    "200",
    "--connect-delay-ms",
    "20",
];

/// Two simulators (esp32-app lights, Zigbee sensors), all onboarded over SoftAP;
/// returns them once every agent has registered.
pub(crate) fn onboard_fleet(
    fleet: &FleetSite,
    lights: usize,
    sensors: usize,
    light_faults: &[&str],
) -> (Sim, Sim) {
    let dir = fleet.site.dir.path();
    let light_manifest = dir.join("lights.json");
    let sensor_manifest = dir.join("sensors.json");
    let lights_n = lights.to_string();
    let mut light_args = vec!["--softap", &lights_n];
    light_args.extend_from_slice(LIGHT_ARGS);
    for fault in light_faults {
        light_args.push("--update-fault");
        light_args.push(fault);
    }
    let lights_sim = Sim::start(&light_args, &light_manifest);
    let sensors_n = sensors.to_string();
    let sensors_sim = Sim::start(
        &[
            "--softap",
            &sensors_n,
            "--first-index",
            "256",
            "--security",
            "2",
            "--pop",
            "abcd1234",
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
            "200",
            "--connect-delay-ms",
            "20",
        ],
        &sensor_manifest,
    );
    for manifest in [&light_manifest, &sensor_manifest] {
        super::onboarding::import(&fleet.site, manifest);
    }
    let report = super::onboarding::run_json(&fleet.site);
    let onboarded = report["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["outcome"] == "provisioned" || d["outcome"] == "claimed")
        .count();
    assert_eq!(onboarded, lights + sensors, "{report}");
    let (mut lights_sim, mut sensors_sim) = (lights_sim, sensors_sim);
    for (sim, n) in [(&mut lights_sim, lights), (&mut sensors_sim, sensors)] {
        let end = Instant::now() + DEADLINE;
        while sim
            .drain()
            .iter()
            .filter(|e| e["event"] == "agent_ready")
            .count()
            < n
        {
            assert!(
                Instant::now() < end,
                "agents did not register: {:?}",
                sim.drain()
            );
            sim.wait_for("agent_ready", |_| true);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    (lights_sim, sensors_sim)
}

/// One esp-sim fleet to onboard: its arguments (without `--manifest`), how many devices
/// it has, and the event each device prints once it is ready (`agent_ready`, or
/// `handed_off` when the credential goes to another agent).
pub(crate) struct SimFleet<'a> {
    pub(crate) args: Vec<&'a str>,
    pub(crate) devices: usize,
    pub(crate) ready: &'static str,
}

/// Starts each simulator, onboards all their devices in one run (every one must be
/// provisioned), and returns each simulator with its devices' ready events, sorted by
/// device.
pub(crate) fn onboard_sims(
    fleet: &FleetSite,
    sims: Vec<SimFleet<'_>>,
) -> Vec<(Sim, Vec<serde_json::Value>)> {
    let dir = fleet.site.dir.path();
    let started: Vec<(Sim, SimFleet<'_>)> = sims
        .into_iter()
        .enumerate()
        .map(|(i, sim)| {
            let manifest = dir.join(format!("sim-{i}.json"));
            let started = Sim::start(&sim.args, &manifest);
            super::onboarding::import(&fleet.site, &manifest);
            (started, sim)
        })
        .collect();
    let report = super::onboarding::run_json(&fleet.site);
    let devices = report["devices"].as_array().unwrap();
    assert!(
        devices.iter().all(|d| d["outcome"] == "provisioned"),
        "{report}"
    );
    assert_eq!(
        devices.len(),
        started.iter().map(|(_, s)| s.devices).sum::<usize>(),
        "{report}"
    );
    started
        .into_iter()
        .map(|(mut sim, spec)| {
            let mut ready: Vec<serde_json::Value> = Vec::new();
            while ready.len() < spec.devices {
                let seen: Vec<serde_json::Value> =
                    ready.iter().map(|e| e["device"].clone()).collect();
                ready.push(sim.wait_for(spec.ready, |e| !seen.contains(&e["device"])));
            }
            // By the gateway's device id (esp-sim names it; a hand-off event carries it).
            ready.sort_by_key(|e| {
                e.get("device_id")
                    .unwrap_or(&e["device"])
                    .as_str()
                    .expect("a ready event names its device")
                    .to_owned()
            });
            (sim, ready)
        })
        .collect()
}

/// Polls the rollout until `pred` holds.
pub(crate) fn wait_rollout(
    addr: SocketAddr,
    token: &str,
    id: &str,
    what: &str,
    deadline: Duration,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let end = Instant::now() + deadline;
    loop {
        let (status, json) = http_get(addr, &format!("/api/v1/rollouts/{id}"), Some(token));
        if status == 200 && pred(&json) {
            return json;
        }
        assert!(
            Instant::now() < end,
            "rollout {id} never {what}: {status} {json}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub(crate) fn by_status<'a>(
    view: &'a serde_json::Value,
    status: &str,
) -> Vec<&'a serde_json::Value> {
    view["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["status"] == status)
        .collect()
}

#[test]
fn a_cloud_deployment_rolls_out_in_waves_and_stops_at_the_error_threshold() {
    let broker = Mosquitto::start("");
    let mut cloud = Cloud::start(&[format!("--hub=a={}", broker.url())]);
    let release = Release::new();
    let origin = CountingOrigin::start(vec![
        ("/light-2.0.0.bin", release.app.clone()),
        ("/sensor-2.0.0.ota", release.zigbee.clone()),
    ]);
    let fleet = FleetSite::new(&format!(
        "[uplink]\nbroker = \"{}\"\nbackoff_min_ms = 100\nbackoff_max_ms = 400\n",
        broker.url()
    ));
    let mut gateway = Gateway::spawn(&fleet.site.config(), &[]);
    let addr = gateway.ready();
    let admin = fleet.site.admin_token();
    fleet.install_handlers();

    // 30 lights and 20 sensors. Sorted by id the lights come first: wave 1 holds 5
    // devices (10 %), wave 2 the next 20 (to 50 %), wave 3 the last 25: lights 25-29
    // and every sensor. Four lights of wave 3 fail, each in its own way.
    let (mut lights, _sensors) = onboard_fleet(
        &fleet,
        30,
        20,
        &[
            "25=refuse",
            "26=download-fails",
            "27=wrong-version",
            "28=never-returns",
        ],
    );

    let jws = std::fs::read_to_string(fleet.sign(&release.manifest(Some(&origin)))).unwrap();
    cloud.send(&serde_json::json!({
        "cmd": "deploy",
        "gateway": "gw-test",
        "deploymentId": "dep-1",
        "manifest": jws.trim(),
        "rollout": {
            "waves": [10, 50, 100],
            "successThreshold": 100,
            "errorThreshold": {"count": 4},
            "priority": "immediate",
            "rollbackWindowSecs": 3
        },
    }));

    // The cloud hears at once that the deployment became a running rollout.
    let accepted = cloud.wait_for("message", |e| e["kind"] == "rollout");
    assert_eq!(accepted["body"]["state"], "running", "{accepted}");
    let stopped = wait_rollout(addr, &admin, "dep-1", "stopped", DEADLINE * 3, |v| {
        v["state"] == "stopped"
    });
    assert_eq!(stopped["origin"], "cloud");
    assert!(
        stopped["reason"]
            .as_str()
            .unwrap()
            .starts_with("error threshold crossed: 4 of 50 devices failed"),
        "{stopped}"
    );
    // Waves 1 and 2 went through whole before wave 3 started.
    let waves = stopped["wave_counts"].as_array().unwrap();
    assert_eq!(
        (waves[0]["devices"].as_u64(), waves[0]["succeeded"].as_u64()),
        (Some(5), Some(5))
    );
    assert_eq!(
        (waves[1]["devices"].as_u64(), waves[1]["succeeded"].as_u64()),
        (Some(20), Some(20))
    );
    assert_eq!(stopped["wave"], 2);
    // The four failures, each with the reason its handler or the gateway gave.
    let failed = by_status(&stopped, "failed");
    assert_eq!(failed.len(), 4, "{stopped}");
    let names: Vec<String> = lights.wait_for("ready", |_| true)["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_owned())
        .collect();
    let reason = |index: usize| {
        let id = &names[index];
        let device = failed
            .iter()
            .find(|d| d["device_id"] == id.as_str())
            .unwrap_or_else(|| panic!("{id} did not fail: {stopped}"));
        device["result"]["lastInstallResult"]["resultDetails"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert!(reason(25).contains("battery too low"), "{}", reason(25));
    assert!(reason(26).contains("flash write error"), "{}", reason(26));
    assert!(
        reason(27).contains("device runs 1.0.0, expected 2.0.0"),
        "{}",
        reason(27)
    );
    assert!(reason(28).contains("rollback window"), "{}", reason(28));
    // A failed apply and a device that did not come back were rolled back by the
    // handler (esp32-app: ota-rollback), and the devices booted their previous image;
    // failures before apply were not.
    for index in [27, 28] {
        assert!(
            reason(index).ends_with("; rolled back: device runs 1.0.0 again"),
            "{}",
            reason(index)
        );
        lights.wait_for("rolled_back", |e| {
            e["device"] == names[index].as_str() && e["version"] == "1.0.0"
        });
    }
    for index in [25, 26] {
        assert!(!reason(index).contains("rolled back"), "{}", reason(index));
    }
    // The dashboard shows it stopped, with the reason and the four failures.
    let browser = super::dashboard::Browser::start();
    browser.open(&format!("http://{addr}/dashboard#token={admin}"));
    let card = "document.querySelector('[data-rollout=\"dep-1\"]')";
    browser.wait_for(
        "the stopped rollout",
        &format!("return {card}?.querySelector('.state')?.textContent || null"),
        |v| v == "stopped",
    );
    let reason = browser.eval(&format!(
        "return {card}.querySelector('.reason').textContent"
    ));
    assert!(
        reason
            .as_str()
            .unwrap()
            .starts_with("error threshold crossed"),
        "{reason}"
    );
    let failed_rows = browser.eval(&format!(
        "return [...{card}.querySelectorAll('tr[data-device] td.failed')].length"
    ));
    assert_eq!(failed_rows, 4);
    drop(browser);

    // Nothing is left running; devices not finished when it stopped were cancelled.
    let end = Instant::now() + DEADLINE;
    let settled = loop {
        let (_, view) = http_get(addr, "/api/v1/rollouts/dep-1", Some(&admin));
        if view["counts"]["running"] == 0 {
            break view;
        }
        assert!(Instant::now() < end, "devices still running: {view}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let succeeded = settled["counts"]["succeeded"].as_u64().unwrap();
    let cancelled = settled["counts"]["cancelled"].as_u64().unwrap();
    assert_eq!(succeeded + cancelled + 4, 50, "{settled}");
    assert!(succeeded >= 25);

    // One upstream download per artifact, for all those devices.
    assert_eq!(origin.gets("/light-2.0.0.bin"), 1);
    assert_eq!(origin.gets("/sensor-2.0.0.ota"), 1);
    // …served locally to every device that downloaded (the byte counts are flushed
    // every 5 s): at least the 25 successful devices of waves 1 and 2.
    let end = Instant::now() + DEADLINE;
    loop {
        let (_, files) = http_get(addr, "/api/v1/firmware", Some(&admin));
        let served: u64 = files["blobs"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|b| b["bytes_served"].as_u64())
            .sum();
        if served >= 25 * release.zigbee.len() as u64 {
            break;
        }
        assert!(
            Instant::now() < end,
            "only {served} bytes served locally: {files}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // The cloud saw a result per finished device, with ADU-style agent state.
    let results = cloud.messages("result", (succeeded + 4) as usize);
    let failed_result = results
        .iter()
        .find(|r| r["body"]["agent"]["lastInstallResult"]["resultCode"] == 0)
        .expect("a failure reached the cloud");
    assert_eq!(failed_result["body"]["agent"]["state"], 255);
    assert_eq!(failed_result["body"]["deploymentId"], "dep-1");
    let ok_result = results
        .iter()
        .find(|r| r["body"]["agent"]["lastInstallResult"]["resultCode"] == 700)
        .expect("a success reached the cloud");
    assert_eq!(ok_result["body"]["agent"]["state"], 0);
    assert_eq!(
        ok_result["body"]["agent"]["installedUpdateId"],
        "Outpost/site-fleet/2.0.0"
    );
    assert!(
        ok_result["body"]["agent"]["lastInstallResult"]["stepResults"]
            .as_object()
            .unwrap()
            .keys()
            .all(|k| k == "step_0" || k == "step_1")
    );
    cloud.wait_for("message", |e| {
        e["kind"] == "rollout" && e["body"]["state"] == "stopped"
    });
    // The devices report the new version in the lobby.
    let (_, devices) = http_get(addr, "/api/v1/devices", Some(&admin));
    let updated = devices["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["firmware_version"] == "2.0.0")
        .count() as u64;
    assert!(
        updated >= succeeded,
        "{updated} devices run 2.0.0, {succeeded} succeeded"
    );

    // The operator retries the failed devices; the same four fail again and the
    // rollout stops again, with the attempts counted.
    let out = fleet.site.command(&["rollout", "retry", "dep-1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again = wait_rollout(addr, &admin, "dep-1", "stopped again", DEADLINE, |v| {
        v["state"] == "stopped" && v["counts"]["running"] == 0 && v["counts"]["pending"] == 0
    });
    assert!(
        by_status(&again, "failed")
            .iter()
            .all(|d| d["attempts"] == 2),
        "{again}"
    );
}

#[test]
fn an_offline_site_rolls_out_locally_and_results_reach_the_cloud_when_the_uplink_appears() {
    // The site's broker is down (the cloud's subscription waits in its persistent
    // session, as a fleet backend's does).
    let mut broker = Mosquitto::start("");
    let mut cloud = Cloud::start(&[format!("--hub=a={}", broker.url())]);
    broker.stop();
    // Devices reach the gateway on its TLS device listener, trusting only the site CA
    // they are handed at onboarding: registration, commands, reports and downloads.
    let fleet = FleetSite::new(&format!(
        "[uplink]\nbroker = \"{}\"\nbackoff_min_ms = 100\nbackoff_max_ms = 400\n\n\
         [devices]\nbind = \"127.0.0.1:0\"\nmax_connections_per_client = 512\n",
        broker.url()
    ));
    let mut gateway = Gateway::spawn(&fleet.site.config(), &[]);
    let (addr, firmware) = gateway.ready_with_firmware();
    let admin = fleet.site.admin_token();
    fleet.install_handlers();
    let (mut lights, _sensors) = onboard_fleet(&fleet, 6, 4, &[]);

    // Firmware comes in by hand (no URLs in the manifest: there is no internet here).
    let release = Release::new();
    let dir = fleet.site.dir.path();
    for (name, bytes) in [
        ("light-2.0.0.bin", &release.app),
        ("sensor-2.0.0.ota", &release.zigbee),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        let out = fleet
            .site
            .command(&["firmware", "import", path.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let jws = fleet.sign(&release.manifest(None));

    // Bad input first: unknown settings, impossible waves, a manifest nobody trusts,
    // and a target no device matches are refused with the reason; nothing is created.
    let refused = |args: &[&str], needle: &str| {
        let mut all = vec!["rollout", "create", "--manifest", jws.to_str().unwrap()];
        all.extend_from_slice(args);
        let out = fleet.site.command(&all);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    };
    refused(&["--waves", "50,40"], "waves must");
    refused(&["--where", "site=elsewhere"], "no device matches");
    refused(&["--error-threshold", "ten"], "expected a count");
    let spec = dir.join("typo.json");
    std::fs::write(&spec, r#"{"wave": [100]}"#).unwrap();
    refused(&["--spec", spec.to_str().unwrap()], "unknown field `wave`");
    let forged = dir.join("forged.jws");
    let text = std::fs::read_to_string(&jws).unwrap();
    let mut parts: Vec<String> = text.trim().split('.').map(str::to_owned).collect();
    parts[2] = parts[2].chars().rev().collect();
    std::fs::write(&forged, parts.join(".")).unwrap();
    let out = fleet
        .site
        .command(&["rollout", "create", "--manifest", forged.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the manifest was refused"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout_of(&fleet.site.command(&["rollout", "list"])),
        "No rollouts.\n"
    );

    // Groups and operator-set properties narrow a rollout. One that starts next year
    // stands still, so its devices can be counted and it is cancelled.
    let names: Vec<String> = lights.drain()[..]
        .iter()
        .find(|e| e["event"] == "ready")
        .unwrap()["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_owned())
        .collect();
    stdout_of(
        &fleet
            .site
            .command(&["groups", "create", "north", "--name", "North wing"]),
    );
    let dup = fleet.site.command(&["groups", "create", "north"]);
    assert!(!dup.status.success(), "a second group north");
    stdout_of(
        &fleet
            .site
            .command(&["groups", "add", "north", &names[0], &names[1]]),
    );
    let unknown = fleet
        .site
        .command(&["groups", "add", "north", "no-such-device"]);
    assert!(!unknown.status.success());
    let listed = stdout_of(&fleet.site.command(&["groups", "list"]));
    assert!(
        listed.starts_with("north                2 device(s)"),
        "{listed}"
    );
    stdout_of(
        &fleet
            .site
            .command(&["devices", "set", &names[2], "site=plant-2", "customer=acme"]),
    );
    for (selector, expected) in [
        (vec!["--group", "north"], "to 2 devices"),
        (vec!["--where", "site=plant-2"], "to 1 devices"),
        (vec!["--device-type", "zigbee-sensor"], "to 4 devices"),
    ] {
        let mut args = vec![
            "rollout",
            "create",
            "--manifest",
            jws.to_str().unwrap(),
            "--start-at",
            "2099-01-01T00:00:00Z",
        ];
        args.extend_from_slice(&selector);
        let out = stdout_of(&fleet.site.command(&args));
        assert!(out.contains(expected), "{selector:?}: {out}");
        let id = out
            .strip_prefix("Rollout ")
            .and_then(|rest| rest.split_once(' '))
            .unwrap()
            .0;
        let cancelled = stdout_of(&fleet.site.command(&["rollout", "cancel", id]));
        assert!(cancelled.contains("cancelled"), "{cancelled}");
    }

    // The local rollout: two waves, paused by the operator between them.
    let created = stdout_of(&fleet.site.command(&[
        "rollout",
        "create",
        "--manifest",
        jws.to_str().unwrap(),
        "--id",
        "site-1",
        "--waves",
        "50,100",
        "--priority",
        "batch",
        "--max-parallel",
        "3",
        "--rollback-window",
        "10",
    ]));
    assert!(
        created.starts_with(
            "Rollout site-1 created: Outpost/site-fleet/2.0.0 to 10 devices in 2 wave(s)"
        ),
        "{created}"
    );
    let paused = stdout_of(&fleet.site.command(&["rollout", "pause", "site-1"]));
    assert!(
        paused.starts_with("Rollout site-1: paused (paused by the operator)"),
        "{paused}"
    );
    let view = wait_rollout(
        addr,
        &admin,
        "site-1",
        "settled while paused",
        DEADLINE,
        |v| v["counts"]["running"] == 0,
    );
    assert_eq!(view["state"], "paused");
    let before = view["counts"]["succeeded"].as_u64().unwrap();
    assert!(before <= 3, "a pause stops new devices: {view}");
    // Resuming twice: the second is refused, the rollout goes on.
    stdout_of(&fleet.site.command(&["rollout", "resume", "site-1"]));
    let again = fleet.site.command(&["rollout", "resume", "site-1"]);
    assert!(!again.status.success());
    let finished = wait_rollout(addr, &admin, "site-1", "finished", DEADLINE * 2, |v| {
        v["state"] == "finished"
    });
    assert_eq!(finished["counts"]["succeeded"], 10, "{finished}");
    let status = stdout_of(&fleet.site.command(&["rollout", "status", "site-1"]));
    assert!(status.contains("rollout site-1  finished"), "{status}");
    assert!(status.contains("10 ok, 0 skipped, 0 failed"), "{status}");
    // Devices fetched through signed per-device links; a forged one is refused, and so
    // is a plain request: an operator asks the gateway for a link.
    let sha = sha256_hex(&release.app);
    let (status, _, body) = super::firmware::fetch(
        firmware,
        &format!(
            "/firmware/{sha}?device=PROV_5E0000&expires=99999999999999&sig={}",
            "0".repeat(64)
        ),
        "",
    );
    assert_eq!(status, 403);
    assert!(String::from_utf8_lossy(&body).contains("not valid"));
    let (status, _, body) = super::firmware::fetch(firmware, &format!("/firmware/{sha}"), "");
    assert_eq!(status, 403);
    assert!(String::from_utf8_lossy(&body).contains("only through signed per-device links"));
    let link = super::firmware::link(&fleet.site, &sha);
    let (status, _, body) = super::firmware::fetch(firmware, &link, "");
    assert_eq!((status, body.len()), (200, release.app.len()));
    // Finished: the files are no longer pinned for it.
    let (_, files) = http_get(addr, "/api/v1/firmware", Some(&admin));
    assert!(
        files["blobs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["pins"].as_array().unwrap().is_empty()),
        "{files}"
    );

    // What happened shows on /metrics, and Prometheus's promtool accepts it.
    let (status, _, metrics) = super::metrics::scrape(addr, &admin);
    assert_eq!(status, 200);
    super::metrics::promtool_check(&metrics);
    let summed = |prefix: &str, with: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(prefix) && l.contains(with))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum()
    };
    assert!(
        summed("outpost_handler_calls_total{", "result=\"ok\"") >= 10.0,
        "{metrics}"
    );
    assert!(
        summed("outpost_handler_call_duration_seconds_count{", "") >= 10.0,
        "{metrics}"
    );
    assert!(
        summed("outpost_cache_served_bytes_total", "") > 0.0,
        "{metrics}"
    );
    assert!(
        summed("outpost_cache_hits_total", "") + summed("outpost_cache_misses_total", "") >= 10.0,
        "{metrics}"
    );
    assert_eq!(
        super::metrics::sample(&metrics, r#"outpost_rollout_devices{status="succeeded"}"#),
        Some(10.0),
        "{metrics}"
    );
    assert!(summed("outpost_outbox_messages{", "") >= 10.0, "{metrics}");

    // Everything for the cloud waited in the outbox…
    let (_, uplink) = http_get(addr, "/api/v1/uplink", Some(&admin));
    assert!(
        uplink["outbox"]["queued"].as_u64().unwrap() >= 10,
        "{uplink}"
    );
    // …and arrives once the broker is back.
    broker.resume();
    let results = cloud.messages("result", 10);
    assert!(
        results
            .iter()
            .all(|r| r["body"]["agent"]["lastInstallResult"]["resultCode"] == 700),
        "{results:?}"
    );
    cloud.wait_for("message", |e| {
        e["kind"] == "rollout"
            && e["body"]["deploymentId"] == "site-1"
            && e["body"]["state"] == "finished"
    });
}

#[test]
fn a_gateway_killed_mid_rollout_starts_the_devices_in_flight_over_after_restart() {
    let api = format!("127.0.0.1:{}", super::uplink::free_port());
    let fleet = FleetSite::with_api(&api, "");
    let mut gateway = Gateway::spawn(&fleet.site.config(), &[]);
    let addr = gateway.ready();
    let admin = fleet.site.admin_token();
    fleet.install_handlers();
    // Light 2 never comes back from its update: it is in flight, waiting out its
    // rollback window, when the gateway dies.
    let (mut lights, _sensors) = onboard_fleet(&fleet, 3, 1, &["2=never-returns"]);
    let stuck = lights.wait_for("ready", |_| true)["devices"][2]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    let release = Release::new();
    for (name, bytes) in [("a.bin", &release.app), ("b.ota", &release.zigbee)] {
        let path = fleet.site.dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        stdout_of(
            &fleet
                .site
                .command(&["firmware", "import", path.to_str().unwrap()]),
        );
    }
    let jws = fleet.sign(&release.manifest(None));
    stdout_of(&fleet.site.command(&[
        "rollout",
        "create",
        "--manifest",
        jws.to_str().unwrap(),
        "--id",
        "crash",
        "--priority",
        "immediate",
        "--rollback-window",
        "4",
    ]));
    wait_rollout(
        addr,
        &admin,
        "crash",
        "waiting on the stuck light",
        DEADLINE,
        |v| {
            v["counts"]["succeeded"] == 3
                && v["devices"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|d| d["device_id"] == stuck.as_str() && d["step"] == "verify")
        },
    );
    gateway.signal(libc::SIGKILL);
    let _ = gateway.wait();

    let mut gateway = Gateway::spawn(&fleet.site.config(), &[]);
    let addr = gateway.ready();
    // The stuck light runs again from is-installed, fails in its window, and the wave
    // (3 of 4 succeeded, below 100 %) pauses the rollout. Nothing else ran twice.
    let view = wait_rollout(addr, &admin, "crash", "paused", DEADLINE, |v| {
        v["state"] == "paused"
    });
    for device in view["devices"].as_array().unwrap() {
        if device["device_id"] == stuck.as_str() {
            assert_eq!(device["status"], "failed", "{view}");
            assert_eq!(device["attempts"], 2, "{view}");
            let details = device["result"]["lastInstallResult"]["resultDetails"]
                .as_str()
                .unwrap();
            assert!(details.contains("rollback window"), "{details}");
            let phases: Vec<&str> = device["result"]["phases"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["step"].as_str().unwrap())
                .collect();
            // The stuck device was rolled back once its window lapsed (1100).
            assert_eq!(
                phases,
                ["is-installed", "download", "install", "apply", "rollback"]
            );
            assert_eq!(device["result"]["phases"][4]["resultCode"], 1100, "{view}");
        } else {
            assert_eq!(
                (device["status"].as_str(), device["attempts"].as_u64()),
                (Some("succeeded"), Some(1)),
                "{view}"
            );
        }
    }
    assert!(
        view["reason"]
            .as_str()
            .unwrap()
            .contains("3 of 4 devices succeeded (75%), below the 100% success threshold"),
        "{view}"
    );
}

#[test]
fn a_python_handler_built_with_componentize_py_updates_its_devices_through_a_rollout() {
    let wasm = outpost_test_guests::python_example();
    // A fixed API port: the devices' agents find the gateway again after its restart.
    let api = format!("127.0.0.1:{}", super::uplink::free_port());
    let fleet = FleetSite::with_api(&api, "");
    let mut gateway = Gateway::spawn(&fleet.site.config(), &[]);
    gateway.ready();
    let admin = fleet.site.admin_token();
    // Packed with the limits its describe asks for (CPython needs more than a Rust guest),
    // signed, installed into the running gateway.
    fleet.install(wasm, "python-example", "py-light");
    let listed = stdout_of(&fleet.site.command(&["handler", "list"]));
    assert!(listed.contains("python-example"), "{listed}");
    assert!(listed.contains("py-light"), "{listed}");
    assert!(!listed.contains("compiling"), "{listed}");
    // The compiler ran in a child process: its few hundred MB went with it.
    let rss = gateway.rss_mib();
    eprintln!("gateway RSS after installing the Python handler live: {rss} MiB");
    assert!(
        rss <= 80,
        "the gateway holds {rss} MiB after installing the Python handler live"
    );

    // Three py-light devices with the agent; the third's flash fails during the download.
    let dir = fleet.site.dir.path();
    // (kept to the end: dropping a simulator stops its devices)
    let _onboarded = onboard_sims(
        &fleet,
        vec![SimFleet {
            args: vec![
                "--softap",
                "3",
                "--security",
                "1",
                "--pop",
                "abcd1234",
                "--agent",
                "--device-type",
                "py-light",
                "--reboot-ms",
                "100",
                "--connect-delay-ms",
                "20",
                "--update-fault",
                "2=download-fails",
            ],
            devices: 3,
            ready: "agent_ready",
        }],
    );

    // The gateway restarts with no compiled code: it serves at once and lists the
    // handler as compiling; a rollout created meanwhile waits for it.
    gateway.stop_cleanly(libc::SIGTERM, &fleet.site);
    std::fs::remove_dir_all(fleet.site.state().join("handlers/.compiled")).unwrap();
    let mut gateway = Gateway::spawn(&fleet.site.config(), &[]);
    let addr = gateway.ready();
    let (status, handlers) = http_get(addr, "/api/v1/handlers", Some(&admin));
    assert_eq!(status, 200, "{handlers}");
    assert_eq!(
        handlers["handlers"][0]["name"], "python-example",
        "{handlers}"
    );
    assert_eq!(handlers["handlers"][0]["state"], "compiling", "{handlers}");

    // The handler checks no image format: any file is an image.
    let image: Vec<u8> = (0..150_000u32).map(|i| (i % 251) as u8).collect();
    let file = dir.join("py-light-2.0.0.bin");
    std::fs::write(&file, &image).unwrap();
    stdout_of(
        &fleet
            .site
            .command(&["firmware", "import", file.to_str().unwrap()]),
    );
    let jws = fleet.sign(&serde_json::json!({
        "manifestVersion": 1,
        "updateId": {"provider": "Outpost", "name": "py-light", "version": "2.0.0"},
        "compatibility": [{"manufacturer": "Espressif", "model": "py-light"}],
        "steps": [{"handler": "python-example", "files": ["app"]}],
        "files": [{"id": "app", "fileName": "py-light-2.0.0.bin",
            "sizeInBytes": image.len(), "sha256": sha256_hex(&image)}],
    }));
    let created = stdout_of(&fleet.site.command(&[
        "rollout",
        "create",
        "--manifest",
        jws.to_str().unwrap(),
        "--id",
        "py-1",
        "--waves",
        "100",
        "--success-threshold",
        "50",
        "--error-threshold",
        "5",
        "--priority",
        "immediate",
    ]));
    assert!(created.contains("to 3 devices"), "{created}");
    // Created while the handler compiles (a Python component takes seconds); its devices
    // wait for it.
    let (_, handlers) = http_get(addr, "/api/v1/handlers", Some(&admin));
    assert_eq!(handlers["handlers"][0]["state"], "compiling", "{handlers}");
    wait_rollout(
        addr,
        &admin,
        "py-1",
        "a device waiting for its handler",
        DEADLINE,
        |v| {
            v["devices"]
                .as_array()
                .unwrap()
                .iter()
                .any(|d| d["step"] == "handler-compiling")
        },
    );
    let done = wait_rollout(addr, &admin, "py-1", "finished", DEADLINE * 2, |v| {
        v["state"] == "finished"
    });
    assert_eq!(done["counts"]["succeeded"], 2, "{done}");
    let failed = by_status(&done, "failed");
    assert_eq!(failed.len(), 1, "{done}");
    assert_eq!(
        failed[0]["result"]["lastInstallResult"]["resultDetails"],
        "device failed: flash write error at 0x110000",
        "{done}"
    );
    // The Python handler's own extended code (facility 1, component 0x50, value 4).
    assert_eq!(
        failed[0]["result"]["lastInstallResult"]["extendedResultCode"],
        (1 << 28) | (0x50 << 20) | 4,
        "{done}"
    );
    let (_, devices) = http_get(addr, "/api/v1/devices", Some(&admin));
    let updated = devices["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["firmware_version"] == "2.0.0")
        .count();
    assert_eq!(updated, 2, "{devices}");
}
