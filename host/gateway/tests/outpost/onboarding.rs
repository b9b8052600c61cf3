//! Onboarding over real parts: the `esp-sim` fleet simulator (protocomm device role) on
//! SoftAP HTTP and on BLE through a private D-Bus + BlueZoo, and the gateway's btleplug
//! central. BlueZoo comes from the venv `cargo xtask test` makes (or `OUTPOST_BLUEZOO`);
//! a missing part fails the test, it never skips.

use std::path::Path;

pub(crate) use outpost_test_support::{Sim, esp_sim_binary};

use super::{Gateway, Site, http_get, stdout_of};

/// A site with two networks (the first has a wrong passphrase) and a claiming CA.
pub(crate) fn onboarding_site(ap_passphrase: &str) -> Site {
    let site = Site::new(
        "\n[ble]\nadapter = \"hci0\"\nmax_concurrent_sessions = 8\n\n\
         [onboarding]\nstatus_poll_ms = 50\nscan_timeout_secs = 20\n\n\
         [[onboarding.wifi]]\nssid = \"outpost-site\"\npassphrase = { file = \"wifi-old\" }\n\n\
         [[onboarding.wifi]]\nssid = \"outpost-site\"\npassphrase = { file = \"wifi-new\" }\n\n\
         [onboarding.claim]\nca_cert = \"ca/claim-ca.pem\"\nca_key = { file = \"ca/claim-ca.key\" }\n",
    );
    for (file, passphrase) in [
        ("wifi-old", "last year's passphrase"),
        ("wifi-new", ap_passphrase),
    ] {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(site.dir.path().join(file))
            .unwrap()
            .write_all(passphrase.as_bytes())
            .unwrap();
    }
    let out = site.command(&[
        "onboard",
        "ca-init",
        site.dir.path().join("ca").to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    site
}

pub(crate) fn start_gateway(site: &Site, bus: Option<&str>) -> (Gateway, std::net::SocketAddr) {
    let mut env: Vec<(&str, &str)> = Vec::new();
    if let Some(bus) = bus {
        env.push(("DBUS_SYSTEM_BUS_ADDRESS", bus));
    }
    let mut gateway = Gateway::spawn(&site.config(), &env);
    let addr = gateway.ready();
    (gateway, addr)
}

/// `outpost onboard import FILE`, which must succeed; returns its output.
pub(crate) fn import(site: &Site, manifest: &Path) -> std::process::Output {
    let out = site.command(&["onboard", "import", manifest.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A site with emulated BLE devices and its running gateway, for the tests that meet
/// devices without a manifest. Fields drop in order: the gateway, then the simulator.
pub(crate) struct BleFleet {
    pub(crate) gateway: Gateway,
    pub(crate) addr: std::net::SocketAddr,
    /// The simulator's own record of its devices: what is printed on each.
    pub(crate) fleet: serde_json::Value,
    pub(crate) sim: Sim,
    pub(crate) site: Site,
}

/// `devices` BLE devices of Security `security` (esp-sim `--emulate`, plus `extra`).
pub(crate) fn ble_fleet(devices: &str, security: &str, extra: &[&str]) -> BleFleet {
    let site = onboarding_site("correct horse battery");
    let manifest = site.dir.path().join("fleet.json");
    let mut args = vec!["--emulate", "--ble", devices, "--security", security];
    args.extend(extra);
    let sim = Sim::start(&args, &manifest);
    let (gateway, addr) = start_gateway(&site, sim.bus.as_deref());
    let fleet = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    BleFleet {
        gateway,
        addr,
        fleet,
        sim,
        site,
    }
}

pub(crate) fn run_json(site: &Site) -> serde_json::Value {
    let out = site.command(&["onboard", "run", "--json"]);
    // A run with failures exits non-zero; its JSON report is still printed.
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "onboard run printed no JSON; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn ble_and_softap_devices_are_onboarded_in_parallel_and_claimed() {
    let site = onboarding_site("correct horse battery");
    let manifest = site.dir.path().join("fleet.json");
    let mut sim = Sim::start(
        &[
            "--emulate",
            "--ble",
            "4",
            "--softap",
            "2",
            "--claim",
            "--security",
            "2",
        ],
        &manifest,
    );
    let (gateway, addr) = start_gateway(&site, sim.bus.as_deref());
    let (_, health) = http_get(addr, "/healthz", None);
    assert_eq!(health["onboarding"]["state"], "ready", "{health}");
    assert_eq!(health["onboarding"]["adapter"], "hci0");

    let out = import(&site, &manifest);
    assert!(stdout_of(&out).contains("Imported 6 devices"));

    let report = run_json(&site);
    assert_eq!(report["failed"], 0, "{report:#}");
    assert_eq!(report["succeeded"], 6);
    let devices = report["devices"].as_array().unwrap();
    assert_eq!(
        devices.iter().filter(|d| d["transport"] == "ble").count(),
        4
    );
    for device in devices {
        assert_eq!(device["outcome"], "claimed", "{device}");
        // The device's own Wi-Fi scan is kept with the run: the site's network is there.
        let scan = &device["wifi_scan"];
        assert_eq!(scan["sees_configured"], true, "{device}");
        assert!(scan["warning"].is_null(), "{device}");
        assert_eq!(
            (&scan["networks"][0]["ssid"], &scan["networks"][0]["rssi"]),
            (&"outpost-site".into(), &(-48).into()),
            "{device}"
        );
        // the first network's passphrase is wrong: each device was reset and joined the second
        assert_eq!(device["wifi_attempts"], 2, "{device}");
        assert!(
            device["node_id"]
                .as_str()
                .unwrap()
                .starts_with("node-240ac45e")
        );
    }
    // In parallel: the run took less than the sum of the devices' times.
    let sum: f64 = devices
        .iter()
        .map(|d| d["elapsed_ms"].as_f64().unwrap())
        .sum();
    assert!(report["elapsed_ms"].as_f64().unwrap() < sum, "{report:#}");

    // The devices themselves accepted the certificates and joined.
    for device in devices {
        let name = device["name"].as_str().unwrap().to_owned();
        sim.wait_for("claimed", |e| e["device"] == name.as_str());
        sim.wait_for("wifi", |e| {
            e["device"] == name.as_str() && e["state"] == "connected"
        });
    }
    let token = site.admin_token();
    let (status, claims) = http_get(addr, "/api/v1/claims", Some(&token));
    assert_eq!(status, 200);
    let claims = claims["claims"].as_array().unwrap();
    assert_eq!(claims.len(), 6);
    assert!(
        claims.iter().all(|c| c["reported_at"].is_null()),
        "claims wait for the uplink"
    );
    let (_, lobby) = http_get(addr, "/api/v1/devices", Some(&token));
    assert!(
        lobby["devices"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["state"] == "claimed")
    );
    // Nothing left to do: a second run refuses.
    let again = site.command(&["onboard", "run"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("nothing to onboard"));
    // /metrics counted the run: six devices claimed, each with its duration.
    let (status, _, metrics) = super::metrics::scrape(addr, &token);
    assert_eq!(status, 200);
    super::metrics::promtool_check(&metrics);
    let sample = |series: &str| super::metrics::sample(&metrics, series);
    assert_eq!(
        sample("outpost_onboarding_runs_total"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(r#"outpost_onboarding_devices_total{outcome="claimed"}"#),
        Some(6.0),
        "{metrics}"
    );
    assert_eq!(
        sample(r#"outpost_onboarding_duration_seconds_count{outcome="claimed"}"#),
        Some(6.0),
        "{metrics}"
    );
    drop(gateway);
}

/// What an installer does without a manifest: scan, see the devices around (imported or
/// not), adopt one with the secret printed on it, onboard it; read the others' security
/// and capabilities and adopt one on what it says. (BlueZoo cannot connect to a device a
/// second time, so no device here is connected twice.)
#[test]
fn nearby_devices_are_listed_and_one_adopted_with_its_secret_is_onboarded() {
    let BleFleet {
        gateway,
        fleet,
        site,
        // Held to the end: dropping the simulator stops the devices.
        sim: _sim,
        ..
    } = ble_fleet("3", "2", &[]);
    let labels = fleet["devices"].as_array().unwrap();
    let label = |i: usize| {
        (
            labels[i]["name"].as_str().unwrap(),
            labels[i]["mac"].as_str().unwrap(),
            labels[i]["password"].as_str().unwrap(),
        )
    };
    let adopt = |device: &str, extra: &[&str]| {
        let mut args = vec!["onboard", "adopt", device, "--device-type", "esp32-app"];
        args.extend(extra);
        site.command(&args)
    };
    let scan = |args: &[&str]| -> serde_json::Value {
        let mut all = vec!["onboard", "scan", "--seconds", "1", "--json"];
        all.extend(args);
        let out = site.command(&all);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let heard_at = |heard: &serde_json::Value, address: &str| -> serde_json::Value {
        heard
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["address"].as_str().unwrap().eq_ignore_ascii_case(address))
            .unwrap_or_else(|| panic!("{address} was not heard: {heard}"))
            .clone()
    };

    // Adopting before any scan is refused, saying what to do.
    let (name, address, password) = label(0);
    let out = adopt(address, &["--pop", password, "--username", "wifiprov"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("scan first (outpost onboard scan)"),
        "{stderr}"
    );

    // Every device is heard, none imported yet; the table names them.
    let heard = scan(&[]);
    assert_eq!(heard.as_array().unwrap().len(), 3, "{heard}");
    for i in 0..3 {
        let device = heard_at(&heard, label(i).1);
        assert_eq!(device["name"], label(i).0, "{device}");
        assert!(
            device["target"].is_null() && device["details"].is_null(),
            "{device}"
        );
    }
    let table = site.command(&["onboard", "scan", "--seconds", "1"]);
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(table.starts_with("NAME") && table.contains(name), "{table}");

    // Security 2 needs the username too; then the device is a target, and onboarded.
    let out = adopt(address, &["--pop", password, "--security", "2"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("security 2 needs a username"), "{stderr}");
    let out = adopt(
        address,
        &[
            "--pop",
            password,
            "--username",
            "wifiprov",
            "--security",
            "2",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout_of(&out).contains(&format!("Adopted {name} (")),
        "{}",
        stdout_of(&out)
    );
    let report = run_json(&site);
    assert_eq!(
        (report["succeeded"].as_u64(), report["failed"].as_u64()),
        (Some(1), Some(0)),
        "only the adopted device: {report:#}"
    );
    assert_eq!(report["devices"][0]["name"], name);

    // The others' proto-ver, read on request; one is adopted on what it said.
    let heard = scan(&["--details"]);
    for i in 1..3 {
        let device = heard_at(&heard, label(i).1);
        assert_eq!(device["details"]["security"], 2, "{device}");
        assert!(
            device["details"]["capabilities"]
                .as_array()
                .unwrap()
                .contains(&"wifi_scan".into()),
            "{device}"
        );
    }
    let (name, address, password) = label(1);
    let out = adopt(name, &["--pop", password, "--username", "wifiprov"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout_of(&out).contains(&format!("Adopted {name} ({address}, Security 2)")));
    let device = heard_at(&scan(&[]), address);
    assert_eq!(device["target"], name, "{device}");
    assert_eq!(
        device["details"]["security"], 2,
        "kept from the last read: {device}"
    );
    drop(gateway);
}

/// A device that says it runs Security 0 would be handed the site's Wi-Fi passphrase in
/// the clear (a look-alike could claim it to downgrade the session): adopting it needs
/// the operator to ask for exactly that.
#[test]
fn adopting_a_security_0_device_needs_the_operator_to_say_so() {
    let BleFleet {
        gateway,
        fleet,
        site,
        // Held to the end: dropping the simulator stops the devices.
        sim: _sim,
        ..
    } = ble_fleet("1", "0", &[]);
    let address = fleet["devices"][0]["mac"].as_str().unwrap();
    let scan = site.command(&["onboard", "scan", "--seconds", "1"]);
    assert!(
        scan.status.success(),
        "{}",
        String::from_utf8_lossy(&scan.stderr)
    );

    // Asked for its security, the device says 0: refused, the PoP given unused.
    let out = site.command(&[
        "onboard",
        "adopt",
        address,
        "--device-type",
        "esp32-app",
        "--pop",
        "abcd1234",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("says it runs Security 0")
            && stderr.contains("in the clear and the PoP you gave would not be used"),
        "{stderr}"
    );
    let out = site.command(&["onboard", "list"]);
    assert!(
        !stdout_of(&out).contains(address) && !stdout_of(&out).contains("PROV_"),
        "nothing adopted"
    );
    let out = site.command(&[
        "onboard",
        "adopt",
        address,
        "--device-type",
        "esp32-app",
        "--security",
        "0",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout_of(&out).contains("Security 0"),
        "{}",
        stdout_of(&out)
    );
    drop(gateway);
}

/// `outpost onboard import - [DEFAULTS]` with the manifest on standard input, as a QR
/// scanner pipes it.
fn import_stdin(site: &Site, text: &str, defaults: &[&str]) -> std::process::Output {
    super::output_with_stdin(
        super::outpost()
            .arg("--config")
            .arg(site.config())
            .args(["onboard", "import", "-"])
            .args(defaults),
        text.as_bytes(),
    )
}

/// An installer scans the devices' QR codes (the payload ESP-IDF's provisioning examples
/// print: name, Security 2 username, the password as `pop`, no device type) and pipes
/// them into the import, giving the site's device type.
#[test]
fn espressif_qr_codes_piped_into_import_onboard_the_devices() {
    let site = onboarding_site("correct horse battery");
    let manifest = site.dir.path().join("fleet.json");
    let qr = site.dir.path().join("qr.txt");
    let sim = Sim::start(
        &[
            "--emulate",
            "--ble",
            "2",
            "--security",
            "2",
            "--qr",
            qr.to_str().unwrap(),
        ],
        &manifest,
    );
    let (gateway, addr) = start_gateway(&site, sim.bus.as_deref());
    let codes = std::fs::read_to_string(&qr).unwrap();
    assert_eq!(codes.lines().count(), 2, "{codes}");
    assert!(
        codes
            .lines()
            .all(|l| l.contains(r#""ver":"v1""#) && l.contains(r#""username":"wifiprov""#)),
        "{codes}"
    );

    // A QR code names no device type: refused whole, saying what to give.
    let out = import_stdin(&site, &codes, &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("standard input was refused: line 1: a QR code names no device type")
            && stderr.contains("--device-type"),
        "{stderr}"
    );
    let out = import_stdin(&site, &codes, &["--device-type", "esp32-app"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout_of(&out).contains("Imported 2 devices"));

    let report = run_json(&site);
    assert_eq!(
        (report["succeeded"].as_u64(), report["failed"].as_u64()),
        (Some(2), Some(0)),
        "{report:#}"
    );
    let token = site.admin_token();
    let (_, lobby) = http_get(addr, "/api/v1/devices", Some(&token));
    let devices = lobby["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 2, "{lobby}");
    for device in devices {
        assert_eq!(device["device_type"], "esp32-app", "{device}");
        assert!(
            codes.contains(&format!(r#""name":{}"#, device["id"])),
            "{device} was not among the codes"
        );
    }
    drop(gateway);
}

#[test]
fn bad_credentials_garbage_oversized_and_dropped_links_fail_clearly() {
    let site = onboarding_site("correct horse battery");
    // Security 1 devices over SoftAP: 0 gets a wrong PoP, 1 answers garbage, 2 drops
    // the link after the session, 3 answers proto-ver with more than 4096 bytes.
    let sec1 = site.dir.path().join("sec1.json");
    let _sim1 = Sim::start(
        &[
            "--softap",
            "4",
            "--security",
            "1",
            "--fault",
            "1=garbage",
            "--fault",
            "2=drop-after-session",
            "--fault",
            "3=oversized",
        ],
        &sec1,
    );
    // Security 2: 0 gets a wrong SRP password; 1 cannot see the site AP.
    let sec2 = site.dir.path().join("sec2.json");
    let _sim2 = Sim::start(
        &[
            "--softap",
            "2",
            "--security",
            "2",
            "--first-index",
            "10",
            "--ap-ssid",
            "elsewhere",
        ],
        &sec2,
    );
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&sec1).unwrap()).unwrap();
    let second: serde_json::Value = serde_json::from_slice(&std::fs::read(&sec2).unwrap()).unwrap();
    manifest["devices"][0]["pop"] = "not-the-pop".into();
    let mut wrong_password = second["devices"][0].clone();
    wrong_password["password"] = "guess".into();
    let devices = manifest["devices"].as_array_mut().unwrap();
    devices.push(wrong_password);
    devices.push(second["devices"][1].clone());
    let path = site.dir.path().join("all.json");
    std::fs::write(&path, serde_json::to_vec(&manifest).unwrap()).unwrap();

    let (gateway, addr) = start_gateway(&site, None);
    // A broken manifest is refused whole, naming the entry.
    let broken = site.dir.path().join("broken.csv");
    std::fs::write(&broken, "name,security,device_type\nPROV_1,2,light\n").unwrap();
    let out = site.command(&["onboard", "import", broken.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 2: security 2 needs a username"));

    import(&site, &path);
    let report = run_json(&site);
    assert_eq!(report["failed"], 6, "{report:#}");
    let error_of = |name: &serde_json::Value| {
        report["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| &d["name"] == name)
            .unwrap()["error"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let expect = [
        (
            &manifest["devices"][0]["name"],
            "proof of possession rejected",
        ),
        (&manifest["devices"][1]["name"], "malformed SessionData"),
        (&manifest["devices"][2]["name"], "dropped the link"),
        (
            &manifest["devices"][3]["name"],
            "transport carries at most 4096",
        ),
        (
            &manifest["devices"][4]["name"],
            "proof of possession rejected",
        ),
        (&manifest["devices"][5]["name"], "access point not found"),
    ];
    for (name, needle) in expect {
        let error = error_of(name);
        assert!(
            error.contains(needle),
            "{name}: {error:?} should say {needle:?}"
        );
    }
    // The run keeps each device's Wi-Fi scan; the device that cannot see the site's
    // network was warned about before it failed to join.
    let token = site.admin_token();
    let (status, run) = http_get(
        addr,
        &format!("/api/v1/onboarding/runs/{}", report["id"]),
        Some(&token),
    );
    assert_eq!(status, 200, "{run}");
    let scan_of = |name: &serde_json::Value| {
        run["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| &d["name"] == name)
            .unwrap()["wifi_scan"]
            .clone()
    };
    let lost = scan_of(&manifest["devices"][5]["name"]);
    assert_eq!(lost["sees_configured"], false, "{lost}");
    assert!(
        lost["warning"]
            .as_str()
            .unwrap()
            .contains("sees none of the configured networks (outpost-site) among the 5"),
        "{lost}"
    );
    assert_eq!(
        lost["networks"][0]["ssid"], "elsewhere",
        "strongest first: {lost}"
    );
    assert_eq!(lost["networks"][0]["auth"], "wpa2-psk", "{lost}");
    // The human report shows the warning and what the device saw.
    let out = site.command(&[
        "onboard",
        "run",
        "--device",
        manifest["devices"][5]["name"].as_str().unwrap(),
    ]);
    assert!(!out.status.success(), "the device still cannot join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("! the device sees none of the configured networks")
            && stdout.contains("it sees: elsewhere (-48 dBm)"),
        "{stdout}"
    );
    // Nothing was marked onboarded; every attempt is recorded with its reason.
    let token = site.admin_token();
    let (_, lobby) = http_get(addr, "/api/v1/devices", Some(&token));
    assert!(
        lobby["devices"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["state"] == "failed"),
        "{lobby}"
    );
    let (_, targets) = http_get(addr, "/api/v1/onboarding/targets", Some(&token));
    assert!(
        targets["targets"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["last_error"].is_string())
    );
    let (_, claims) = http_get(addr, "/api/v1/claims", Some(&token));
    assert!(claims["claims"].as_array().unwrap().is_empty());
    drop(gateway);
}

#[test]
fn duplicate_ble_names_and_a_device_dropping_mid_session_over_ble() {
    let site = onboarding_site("correct horse battery");
    let manifest = site.dir.path().join("fleet.json");
    let mut sim = Sim::start(
        &[
            "--emulate",
            "--ble",
            "3",
            "--rename",
            "1=PROV_5E0000",
            "--fault",
            "2=drop-after-session",
        ],
        &manifest,
    );
    let (gateway, _addr) = start_gateway(&site, sim.bus.as_deref());
    // The manifest the simulator wrote names PROV_5E0000 twice: refused whole.
    let out = site.command(&["onboard", "import", manifest.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("duplicate device name"));
    // Keep one entry per name: the scan then sees two devices advertising it.
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    let devices = json["devices"].as_array_mut().unwrap();
    devices.remove(1);
    for device in devices.iter_mut() {
        device.as_object_mut().unwrap().remove("mac");
    }
    std::fs::write(&manifest, serde_json::to_vec(&json).unwrap()).unwrap();
    import(&site, &manifest);
    let report = run_json(&site);
    assert_eq!(report["failed"], 2, "{report:#}");
    let devices = report["devices"].as_array().unwrap();
    let duplicate = devices.iter().find(|d| d["name"] == "PROV_5E0000").unwrap();
    assert!(
        duplicate["error"]
            .as_str()
            .unwrap()
            .contains("duplicate name: 2 devices"),
        "{duplicate}"
    );
    let dropped = devices.iter().find(|d| d["name"] == "PROV_5E0002").unwrap();
    assert!(
        dropped["error"]
            .as_str()
            .unwrap()
            .contains("dropped the link"),
        "{dropped}"
    );
    assert!(
        sim.drain()
            .iter()
            .any(|e| e["event"] == "session" && e["device"] == "PROV_5E0002")
    );
    drop(gateway);
}
