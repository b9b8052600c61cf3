//! The C device agent (devices/esp-idf/components/outpost_agent), built for Linux with
//! ASan and UBSan, against the real `outpost` gateway: onboarded over SoftAP by esp-sim
//! (stock protocomm; the credential the gateway writes to `outpost-agent` is handed to
//! the C agent), then updated by a rollout over the TLS device listener.

use std::path::Path;

use outpost_test_device_agent::Agent;

use super::firmware::sha256_hex;
use super::rollouts::{FleetSite, SimFleet, by_status, firmware_file, onboard_sims, wait_rollout};
use super::{DEADLINE, Gateway, http_get, stdout_of};

/// Where the first download of the resuming device is cut, and the byte the corrupting
/// device receives flipped.
const CUT_AT: u64 = 100_000;
/// The agents download in segments of this many bytes (the image is four).
const SEGMENT: u64 = 65_536;
const CORRUPT_AT: u64 = 200_000;

/// An esp32-app image made by `esp-sim firmware` (the simulated vendor's build output).
fn app_image(version: &str) -> Vec<u8> {
    firmware_file(&[
        "--kind",
        "esp-app",
        "--chip",
        "esp32c3",
        "--version",
        version,
        "--project",
        "outpost-light",
        "--size",
        "262144",
    ])
}

/// A one-step esp32-app manifest for `image` (imported by hand: no URL).
fn manifest(image: &[u8]) -> serde_json::Value {
    serde_json::json!({
        "manifestVersion": 1,
        "updateId": {"provider": "Outpost", "name": "light", "version": "2.0.0"},
        "compatibility": [{"manufacturer": "Espressif", "model": "esp32-app"}],
        "steps": [{"handler": "esp32-app", "files": ["app"]}],
        "files": [{
            "id": "app", "fileName": "light-2.0.0.bin",
            "sizeInBytes": image.len(), "sha256": sha256_hex(image),
        }],
    })
}

/// One C agent per credential esp-sim handed off, each with its own flash directory
/// holding `first` in slot 0, and `extra[i]` as further arguments of the i-th.
fn start_agents(
    dir: &Path,
    handoffs: &[serde_json::Value],
    first: &Path,
    extra: Vec<Vec<String>>,
) -> Vec<(String, Agent)> {
    handoffs
        .iter()
        .zip(extra)
        .map(|(handoff, extra)| {
            let id = handoff["device_id"].as_str().unwrap().to_owned();
            let flash = dir.join(format!("flash-{id}"));
            let mut args: Vec<String> = vec![
                "--flash".into(),
                flash.to_str().unwrap().into(),
                "--image".into(),
                first.to_str().unwrap().into(),
                "--credential".into(),
                handoff["path"].as_str().unwrap().into(),
                "--model".into(),
                "esp32-app".into(),
                "--poll-wait".into(),
                "2".into(),
                "--confirm-timeout-ms".into(),
                "6000".into(),
                "--segment-bytes".into(),
                SEGMENT.to_string(),
            ];
            args.extend(extra);
            (id.clone(), Agent::start(&id, &args))
        })
        .collect()
}

/// The credential esp-sim handed off: the gateway's requests to `outpost-agent`, one per
/// line, each at most the chunk limit; reassembled here.
fn handed_over(path: &Path) -> serde_json::Value {
    use base64::Engine as _;
    let text = std::fs::read_to_string(path).unwrap();
    let requests: Vec<serde_json::Value> = text
        .lines()
        .map(|line| {
            assert!(
                line.len() <= outpost_onboarding::AGENT_CHUNK_LIMIT,
                "{line}"
            );
            serde_json::from_str(line).unwrap()
        })
        .collect();
    assert!(
        requests.len() > 1,
        "a credential with the CA comes in chunks"
    );
    let mut whole = Vec::new();
    for (i, request) in requests.iter().enumerate() {
        assert_eq!(
            (request["chunk"].as_u64(), request["of"].as_u64()),
            (Some(i as u64), Some(requests.len() as u64))
        );
        whole.extend(
            base64::engine::general_purpose::STANDARD
                .decode(request["base64"].as_str().unwrap())
                .unwrap(),
        );
    }
    serde_json::from_slice(&whole).unwrap()
}

/// The result details a rollout view records for `id`.
fn result_details(view: &serde_json::Value, id: &str) -> String {
    view["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device_id"] == id)
        .unwrap_or_else(|| panic!("{id} not in {view}"))["result"]["lastInstallResult"]
        ["resultDetails"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn the_c_agent_updates_resumes_refuses_a_corrupted_image_and_is_rolled_back() {
    // A site whose devices reach the gateway over its TLS device listener only.
    let fleet =
        FleetSite::new("[devices]\nbind = \"127.0.0.1:0\"\nmax_connections_per_client = 64\n");
    let mut gateway = Gateway::spawn(&fleet.site.config(), &[]);
    let addr = gateway.ready();
    let admin = fleet.site.admin_token();
    fleet.install_handlers();
    let dir = fleet.site.dir.path().to_owned();

    // Five devices with stock protocomm announce the agent; the gateway writes each its
    // credential, which esp-sim hands to a C agent instead of running its own.
    let handoff_dir = dir.join("handoff");
    std::fs::create_dir(&handoff_dir).unwrap();
    let mut onboarded = onboard_sims(
        &fleet,
        vec![SimFleet {
            args: vec![
                "--softap",
                "5",
                "--security",
                "1",
                "--pop",
                "abcd1234",
                "--agent",
                "--agent-handoff",
                handoff_dir.to_str().unwrap(),
                "--device-type",
                "esp32-app",
                "--connect-delay-ms",
                "20",
            ],
            devices: 5,
            ready: "handed_off",
        }],
    );
    let (sim, handoffs) = onboarded.remove(0);
    // What the gateway handed over: the TLS device API and the site CA to trust, in
    // chunks (a BLE write carries at most 512 bytes).
    let credential = handed_over(Path::new(handoffs[0]["path"].as_str().unwrap()));
    assert!(
        credential["api"]
            .as_str()
            .unwrap()
            .starts_with("https://127.0.0.1:")
    );
    assert!(
        credential["caPem"]
            .as_str()
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );

    let first = dir.join("light-1.0.0.bin");
    std::fs::write(&first, app_image("1.0.0")).unwrap();
    let cut = format!("cut:{CUT_AT}");
    let corrupt = format!("corrupt:{CORRUPT_AT}");
    let fault = |f: &str| vec!["--fault".to_owned(), f.to_owned()];
    let mut agents = start_agents(
        &dir,
        &handoffs,
        &first,
        vec![
            vec![],
            vec![],
            fault(&cut),
            fault(&corrupt),
            fault("offline-new-image"),
        ],
    );
    for (_, agent) in &mut agents {
        agent.wait_for("registered", |e| e["version"] == "1.0.0");
    }
    // The agents registered what they run, read from their images.
    let (_, devices) = http_get(addr, "/api/v1/devices", Some(&admin));
    for (id, _) in &agents {
        let device = devices["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["id"] == id.as_str())
            .unwrap_or_else(|| panic!("{id} is not in the lobby: {devices}"));
        assert_eq!(device["firmware_version"], "1.0.0", "{device}");
        assert_eq!(device["compat"]["chip"], "esp32c3", "{device}");
        assert_eq!(device["compat"]["project"], "outpost-light", "{device}");
        assert_eq!(device["compat"]["secure_version"], "0", "{device}");
    }

    // The new image comes in by hand and goes out in one wave.
    let image = app_image("2.0.0");
    let file = dir.join("light-2.0.0.bin");
    std::fs::write(&file, &image).unwrap();
    stdout_of(
        &fleet
            .site
            .command(&["firmware", "import", file.to_str().unwrap()]),
    );
    let jws = fleet.sign(&manifest(&image));
    let created = stdout_of(&fleet.site.command(&[
        "rollout",
        "create",
        "--manifest",
        jws.to_str().unwrap(),
        "--id",
        "c-agents",
        "--waves",
        "100",
        "--error-threshold",
        "5",
        "--priority",
        "immediate",
        "--rollback-window",
        "3",
    ]));
    assert!(created.contains("to 5 devices"), "{created}");
    let done = wait_rollout(addr, &admin, "c-agents", "settled", DEADLINE * 2, |v| {
        v["counts"]["running"] == 0 && v["counts"]["pending"] == 0
    });
    let details = |id: &str| result_details(&done, id);
    let succeeded: Vec<&str> = by_status(&done, "succeeded")
        .iter()
        .map(|d| d["device_id"].as_str().unwrap())
        .collect();
    let ids: Vec<String> = agents.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(succeeded.len(), 3, "{done}");
    for id in &ids[..3] {
        assert!(
            succeeded.contains(&id.as_str()),
            "{id} did not succeed: {done}"
        );
    }

    // Two devices updated plainly: downloaded from 0, rebooted, confirmed, reported.
    for (_, agent) in &mut agents[..2] {
        agent.wait_for("confirmed", |e| e["version"] == "2.0.0");
        agent.wait_for("report", |e| e["kind"] == "done" && e["payload"] == "2.0.0");
    }
    // The third fetched the image in four segments; it lost its connection at byte
    // 100,000, in the second, and resumed there with a Range request the firmware
    // server answered with 206.
    let (_, resumed) = &mut agents[2];
    resumed.wait_for("confirmed", |e| e["version"] == "2.0.0");
    let downloads: Vec<(u64, u64)> = resumed
        .events()
        .iter()
        .filter(|e| e["event"] == "download")
        .map(|e| (e["offset"].as_u64().unwrap(), e["status"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        downloads,
        vec![
            (0, 206),
            (SEGMENT, 206),
            (CUT_AT, 206),
            (2 * SEGMENT, 206),
            (3 * SEGMENT, 206)
        ]
    );
    let progress: Vec<&str> = resumed
        .events()
        .iter()
        .filter(|e| e["event"] == "report" && e["kind"] == "progress")
        .filter_map(|e| e["payload"].as_str())
        .collect();
    assert_eq!(progress, ["25", "50", "75", "100"]);

    // The fourth received a flipped byte: its sha256 check failed, it reported so, and
    // nothing was applied (no rollback either).
    let corrupted = details(&ids[3]);
    assert!(
        corrupted.contains("image check failed: sha256"),
        "{corrupted}"
    );
    assert!(!corrupted.contains("rolled back"), "{corrupted}");
    assert!(
        agents[3]
            .1
            .events()
            .iter()
            .all(|e| e["event"] != "rebooting")
    );

    // The fifth booted 2.0.0, which could not reach the gateway: the rollback window
    // lapsed and esp32-app's rollback was called; meanwhile the agent gave the image up
    // after its confirm timeout, the previous image booted, and the ota-rollback found
    // it already there (nothing more to do).
    let lost = details(&ids[4]);
    assert!(lost.contains("rollback window"), "{lost}");
    assert!(
        lost.ends_with("; rolled back: device runs 1.0.0 again"),
        "{lost}"
    );
    let (_, offline) = &mut agents[4];
    offline.wait_for("giving_up", |e| e["version"] == "2.0.0");
    offline.wait_for("report", |e| {
        e["kind"] == "failed"
            && e["payload"]
                .as_str()
                .unwrap()
                .contains("did not reach the gateway within 6 s")
    });
    offline.wait_for("command", |e| e["command"] == "ota-rollback");

    // The lobby shows what each runs now.
    let (_, devices) = http_get(addr, "/api/v1/devices", Some(&admin));
    let version_of = |id: &str| {
        devices["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["id"] == id)
            .unwrap()["firmware_version"]
            .clone()
    };
    for id in &ids[..3] {
        assert_eq!(version_of(id), "2.0.0");
    }
    for id in &ids[3..] {
        assert_eq!(version_of(id), "1.0.0");
    }

    // Revoking a device's credential stops its agent at its next request (exit code 3),
    // and the sanitizers found nothing in any of them, leaks included.
    for (id, agent) in &mut agents {
        let out = fleet.site.command(&["devices", "revoke", id]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let status = agent.wait_exit();
        assert_eq!(status.code(), Some(3), "{id}: {}", agent.stderr());
        let peak = agent
            .events()
            .iter()
            .filter(|e| e["event"] == "heap")
            .filter_map(|e| e["peak"].as_u64())
            .max()
            .unwrap_or(0);
        eprintln!("agent {id}: peak heap {peak} bytes (its own and cJSON's)");
    }
    drop(sim);
}

/// The stored rotation of rollout `id`, read from the state database.
fn stored_network(site: &super::Site, id: &str) -> serde_json::Value {
    let conn = outpost_store::rusqlite::Connection::open_with_flags(
        site.state().join("outpost.db"),
        outpost_store::rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let text: String = conn
        .query_row("SELECT network FROM rollouts WHERE id = ?1", [id], |r| {
            r.get(0)
        })
        .unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn a_wifi_rotation_moves_the_fleet_and_a_device_with_a_wrong_passphrase_falls_back() {
    let fleet =
        FleetSite::new("[devices]\nbind = \"127.0.0.1:0\"\nmax_connections_per_client = 64\n");
    let mut gateway = Gateway::spawn(&fleet.site.config(), &[]);
    let addr = gateway.ready();
    let admin = fleet.site.admin_token();
    let dir = fleet.site.dir.path().to_owned();
    let old = ("outpost-site", "correct horse battery");
    let new = ("site-new", "staple battery horse 2");

    // Two devices whose firmware runs the C agent (PROV_5E0000, PROV_5E0001) and four
    // esp-sim agents (PROV_5E0008..0B), all onboarded onto the old network. The second C
    // device's access point for the new network has another passphrase; so has esp-sim's
    // second device's.
    let handoff_dir = dir.join("handoff");
    std::fs::create_dir(&handoff_dir).unwrap();
    let common = [
        "--security",
        "1",
        "--pop",
        "abcd1234",
        "--agent",
        "--device-type",
        "esp32-app",
        "--connect-delay-ms",
        "20",
        "--reboot-ms",
        "100",
    ];
    let mut c_args = vec![
        "--softap",
        "2",
        "--agent-handoff",
        handoff_dir.to_str().unwrap(),
    ];
    c_args.extend(common);
    let extra = format!("{}:{}", new.0, new.1);
    let mut sim_args = vec![
        "--softap",
        "4",
        "--first-index",
        "8",
        "--ap-extra",
        &extra,
        "--update-fault",
        "1=wifi-refused",
    ];
    sim_args.extend(common);
    let mut onboarded = onboard_sims(
        &fleet,
        vec![
            SimFleet {
                args: c_args,
                devices: 2,
                ready: "handed_off",
            },
            SimFleet {
                args: sim_args,
                devices: 4,
                ready: "agent_ready",
            },
        ],
    );
    let (mut sim, _) = onboarded.pop().unwrap();
    let (c_sim, handoffs) = onboarded.pop().unwrap();
    let first = dir.join("light-1.0.0.bin");
    std::fs::write(&first, app_image("1.0.0")).unwrap();
    let in_range = |passphrase: &str| -> Vec<String> {
        vec![
            "--network".into(),
            format!("{}:{}", old.0, old.1),
            "--network".into(),
            format!("{}:{passphrase}", new.0),
        ]
    };
    let mut agents = start_agents(
        &dir,
        &handoffs,
        &first,
        vec![in_range(new.1), in_range("another passphrase")],
    );
    for (_, agent) in &mut agents {
        agent.wait_for("registered", |_| true);
    }
    // Bad input is refused before anything is created.
    let passphrase = dir.join("new-passphrase");
    super::write_secret(&passphrase, &format!("{}\n", new.1));
    let rotate = |args: &[&str]| {
        let mut all = vec!["wifi", "rotate", "--ssid", new.0];
        all.extend_from_slice(args);
        fleet.site.command(&all)
    };
    let refused = |args: &[&str], needle: &str| {
        let out = rotate(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    };
    let loose = dir.join("loose-passphrase");
    std::fs::write(&loose, new.1).unwrap();
    refused(
        &["--passphrase-file", loose.to_str().unwrap()],
        "can be read by other users",
    );
    let short = dir.join("short-passphrase");
    super::write_secret(&short, "short");
    refused(
        &["--passphrase-file", short.to_str().unwrap()],
        "passphrase must be 8-63",
    );
    refused(
        &[
            "--passphrase-file",
            passphrase.to_str().unwrap(),
            "--fallback-secs",
            "5",
        ],
        "fallbackSecs must be 30-3600",
    );
    assert_eq!(
        stdout_of(&fleet.site.command(&["rollout", "list"])),
        "No rollouts.\n"
    );

    // The rotation: two waves of three; the second failure stops it.
    let created = stdout_of(&rotate(&[
        "--passphrase-file",
        passphrase.to_str().unwrap(),
        "--fallback-secs",
        "30",
        "--id",
        "wifi-1",
        "--waves",
        "50,100",
        "--success-threshold",
        "50",
        "--error-threshold",
        "2",
        "--priority",
        "immediate",
    ]));
    assert!(
        created.starts_with("Rollout wifi-1 created: Wi-Fi site-new to 6 devices in 2 wave(s)"),
        "{created}"
    );
    let stopped = wait_rollout(addr, &admin, "wifi-1", "stopped", DEADLINE, |v| {
        v["state"] == "stopped" && v["counts"]["running"] == 0
    });
    assert_eq!(stopped["kind"], "wifi");
    assert_eq!(stopped["update_id"], "wifi/site-new");
    assert!(
        stopped["reason"]
            .as_str()
            .unwrap()
            .starts_with("error threshold crossed: 2 of 6 devices failed"),
        "{stopped}"
    );
    // Wave 1 went through with its one failure (2 of 3 is above the 50 % threshold).
    let wave1 = &stopped["wave_counts"][0];
    assert_eq!(
        (
            wave1["devices"].as_u64(),
            wave1["succeeded"].as_u64(),
            wave1["failed"].as_u64()
        ),
        (Some(3), Some(2), Some(1)),
        "{stopped}"
    );
    let result = |id: &str| result_details(&stopped, id);
    let failed: Vec<&str> = by_status(&stopped, "failed")
        .iter()
        .map(|d| d["device_id"].as_str().unwrap())
        .collect();
    assert_eq!(failed, ["PROV_5E0001", "PROV_5E0009"], "{stopped}");
    for id in ["PROV_5E0001", "PROV_5E0009"] {
        let details = result(id);
        assert!(
            details.starts_with(
                "device failed: cannot join site-new: wrong passphrase (4-way handshake failed); \
                 back on outpost-site"
            ),
            "{id}: {details}"
        );
    }
    assert_eq!(result("PROV_5E0000"), "device is on site-new");
    assert_eq!(result("PROV_5E0008"), "device is on site-new");
    // The C agents: one moved, one fell back by itself; both still reach the gateway.
    let (_, moved) = &mut agents[0];
    moved.wait_for("wifi_joined", |e| e["ssid"] == "site-new");
    moved.wait_for("report", |e| {
        e["kind"] == "done" && e["payload"] == "site-new"
    });
    let (_, fell_back) = &mut agents[1];
    fell_back.wait_for("wifi_fallback", |e| e["ssid"] == "outpost-site");
    sim.wait_for("wifi_fallback", |e| e["back_on"] == "outpost-site");
    // The passphrase shows nowhere: not in the API, not in the CLI.
    let (_, view) = http_get(addr, "/api/v1/rollouts/wifi-1", Some(&admin));
    let listed = stdout_of(&fleet.site.command(&["rollout", "list", "--json"]));
    for text in [view.to_string(), listed, created] {
        assert!(!text.contains(new.1), "{text}");
    }
    // A stopped rotation keeps it for a retry; cancelled, it is dropped, and nothing can
    // run it again.
    assert_eq!(stored_network(&fleet.site, "wifi-1")["passphrase"], new.1);
    stdout_of(&fleet.site.command(&["rollout", "cancel", "wifi-1"]));
    assert_eq!(
        stored_network(&fleet.site, "wifi-1")["passphrase"],
        serde_json::Value::Null
    );
    let retry = fleet.site.command(&["rollout", "retry", "wifi-1"]);
    assert!(!retry.status.success());

    for (id, agent) in &mut agents {
        let out = fleet.site.command(&["devices", "revoke", id]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            agent.wait_exit().code(),
            Some(3),
            "{id}: {}",
            agent.stderr()
        );
    }
    drop((sim, c_sim));
}
