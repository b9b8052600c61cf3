//! The `azure-iot` uplink profile against hub-sim, whose dialect Microsoft's own device
//! SDK referees first (examples/hub-sim/tests/referee.rs): the gateway provisions
//! through DPS, reports its state in its twin, relays
//! telemetry with properties, follows desired-property patches, answers direct methods,
//! renews its SAS token before it expires, provisions again when told, and stops on a
//! refused key.

use outpost_test_support::{HubSim, hub_sim_binary};
use serde_json::json;

use super::uplink::{device_token, http, post_telemetry, wait_uplink};
use super::{DEADLINE, Gateway, Site};
use outpost_store::{DeviceState, NewDevice};

const KEY: &str = "YXp1cmUgcHJvZmlsZSBnYXRld2F5IGtleSBmb3IgdGVzdHM=";
const OTHER_KEY: &str = "bm90IHRoZSBlbnJvbGxtZW50J3Mga2V5IGF0IGFsbCEhIQ==";

/// One device in the lobby, whose telemetry the tests post.
fn seed_thermostat(site: &Site) {
    site.seed(vec![NewDevice::new(
        "esp-1",
        "thermostat",
        DeviceState::Claimed,
    )]);
}

fn azure_site(sim: &HubSim, key: &str, extra: &str) -> Site {
    let site = Site::new(&format!(
        "[ble]\nenabled = false\n\n[uplink]\nprofile = \"azure-iot\"\nca_file = \"{}\"\n\
         backoff_min_ms = 100\nbackoff_max_ms = 400\n\n[uplink.azure]\ndps_host = \"{}\"\n\
         id_scope = \"{}\"\nsymmetric_key = \"{key}\"\n{extra}\n",
        sim.ca().display(),
        sim.dps(),
        sim.id_scope(),
    ));
    seed_thermostat(&site);
    site
}

#[test]
fn a_gateway_provisions_through_dps_and_speaks_iot_hub() {
    let mut sim = HubSim::start(
        &hub_sim_binary(),
        &[
            "--enrollment",
            &format!("gw-test:{KEY}"),
            "--initial-twin",
            r#"{"telemetryIntervalSecs":60}"#,
        ],
    );
    let hub = sim.hub().to_owned();
    let site = azure_site(&sim, KEY, "");
    let mut gateway = Gateway::spawn(&site.config(), &[]);
    let addr = gateway.ready();
    let admin = site.admin_token();

    // DPS, then the hub with a persistent session (no Plug and Play model announced
    // until the twin carries Device Update's component).
    sim.wait("dps_registered", |e| e["registration"] == "gw-test");
    let connected = sim.wait("connected", |e| {
        e["client"] == "gw-test" && e["service"] == hub.as_str()
    });
    assert!(connected["model_id"].is_null(), "{connected}");
    assert_eq!(connected["clean_session"], false);
    let status = wait_uplink(addr, &admin, "connected", |j| {
        j["link"]["state"] == "connected"
    });
    assert_eq!(status["link"]["broker"], format!("mqtts://{hub}:8883"));
    assert_eq!(status["link"]["substatus"], "initialAssignment");

    // State goes to the twin: online, the device in the lobby, and the desired state
    // it read from the twin (the enrollment's initial twin, version 1).
    sim.wait("reported", |e| {
        e["patch"]["outpost"]["status"]["state"] == "online"
    });
    sim.wait("reported", |e| {
        e["patch"]["outpost"]["devices"]["esp-1"]["type"] == "thermostat"
    });
    let status = wait_uplink(addr, &admin, "desired v1", |j| {
        j["link"]["desired_version"] == 1
    });
    assert_eq!(
        status["link"]["desired"],
        json!({"telemetryIntervalSecs": 60})
    );
    sim.wait("reported", |e| {
        e["patch"]["outpost"]["gateway"]["desiredVersion"] == 1
    });

    // Telemetry: one device-to-cloud message per record, its id as $.mid.
    let token = device_token(addr, &admin);
    let ids = post_telemetry(addr, &token, 3, "azure");
    for id in &ids {
        let message = sim.wait("telemetry", |e| e["properties"]["$.mid"] == id.as_str());
        assert_eq!(message["device"], "gw-test");
        assert_eq!(message["properties"]["outpost-device"], "esp-1");
        assert_eq!(message["properties"]["outpost-topic"], "telemetry/esp-1");
        assert_eq!(message["properties"]["$.ct"], "application/json");
        assert_eq!(message["payload"]["body"]["tag"], "azure", "{message}");
    }

    // A desired patch: the gateway reads the whole twin again and takes version 2.
    sim.command(
        &json!({"op": "desired", "device": "gw-test", "patch": {"telemetryIntervalSecs": 5}}),
    );
    let status = wait_uplink(addr, &admin, "desired v2", |j| {
        j["link"]["desired_version"] == 2
    });
    assert_eq!(
        status["link"]["desired"],
        json!({"telemetryIntervalSecs": 5})
    );

    // Direct methods are the commands; an unknown one is 404.
    sim.command(&json!({"op": "method", "device": "gw-test", "name": "ping", "payload": {}}));
    let pong = sim.wait("method_response", |e| e["name"] == "ping");
    assert_eq!(pong["status"], 200, "{pong}");
    assert!(pong["payload"]["pong"].is_u64(), "{pong}");
    sim.command(
        &json!({"op": "method", "device": "gw-test", "name": "format-disk", "payload": {}}),
    );
    let unknown = sim.wait("method_response", |e| e["name"] == "format-disk");
    assert_eq!(unknown["status"], 404, "{unknown}");
    // A message that is not an Outpost deployment is ignored, and the link stays up.
    sim.command(&json!({"op": "c2d", "device": "gw-test", "payload": "hello", "properties": {"kind": "note"}}));
    sim.command(
        &json!({"op": "method", "device": "gw-test", "name": "outbox-stats", "payload": {}}),
    );
    let stats = sim.wait("method_response", |e| e["name"] == "outbox-stats");
    assert_eq!(stats["status"], 200, "{stats}");

    // `reprovision`: the gateway registers with DPS again and comes back.
    sim.command(
        &json!({"op": "method", "device": "gw-test", "name": "reprovision", "payload": {}}),
    );
    sim.wait("method_response", |e| {
        e["name"] == "reprovision" && e["status"] == 200
    });
    let registrations = |sim: &mut HubSim| {
        sim.events
            .drain()
            .iter()
            .filter(|e| e["event"] == "dps_registered")
            .count()
    };
    let end = std::time::Instant::now() + DEADLINE;
    while registrations(&mut sim) < 2 {
        assert!(std::time::Instant::now() < end, "no second registration");
        sim.events.next_before(end);
    }
    wait_uplink(addr, &admin, "back", |j| {
        j["link"]["state"] == "connected" && j["link"]["registrations"] == 2
    });

    // Shutdown: offline in the twin.
    let (stderr, _) = gateway.stop_cleanly(libc::SIGTERM, &site);
    sim.wait("reported", |e| {
        e["patch"]["outpost"]["status"]["state"] == "offline"
    });
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn the_token_is_renewed_before_it_expires_and_a_wrong_key_stops_the_uplink() {
    let mut sim = HubSim::start(
        &hub_sim_binary(),
        &["--enrollment", &format!("gw-test:{KEY}")],
    );
    let hub = sim.hub().to_owned();
    // Tokens that live 6 s: renewed at half their life, each on a new connection that
    // ends with DISCONNECT, never by IoT Hub for an expired token.
    let site = azure_site(&sim, KEY, "token_ttl_secs = 6");
    let mut gateway = Gateway::spawn(&site.config(), &[]);
    gateway.ready();
    let end = std::time::Instant::now() + DEADLINE;
    let mut connects = 0;
    while connects < 4 {
        let event = sim
            .events
            .next_before(end)
            .expect("three renewals within the deadline");
        if event["client"] != "gw-test" || event["service"] != hub.as_str() {
            continue;
        }
        if event["event"] == "connected" {
            connects += 1;
        }
        if event["event"] == "disconnected" {
            assert_eq!(event["why"], "disconnected", "{event}");
        }
    }
    gateway.stop_cleanly(libc::SIGTERM, &site);

    // The wrong key: DPS refuses once and the uplink stops, saying what to fix.
    let wrong = azure_site(&sim, OTHER_KEY, "");
    let mut gateway = Gateway::spawn(&wrong.config(), &[]);
    let addr = gateway.ready();
    let admin = wrong.admin_token();
    let status = wait_uplink(addr, &admin, "stopped", |j| j["link"]["state"] == "stopped");
    let error = status["link"]["last_error"].as_str().unwrap();
    assert!(
        error.contains("DPS refused") && error.contains("[uplink.azure]"),
        "{error}"
    );
    // Telemetry still queues for when the operator fixes the key.
    let token = device_token(addr, &admin);
    post_telemetry(addr, &token, 2, "kept");
    wait_uplink(addr, &admin, "queued", |j| {
        j["outbox"]["queued"].as_u64() >= Some(2)
    });
    let (code, _) = http(addr, "GET", "/api/v1/uplink", &admin, "");
    assert_eq!(code, 200);
    gateway.stop_cleanly(libc::SIGTERM, &wrong);
    let refused: Vec<_> = sim
        .events
        .drain()
        .iter()
        .filter(|e| e["event"] == "auth_refused" && e["client"] == "gw-test")
        .cloned()
        .collect();
    assert_eq!(
        refused.len(),
        1,
        "DPS was asked again after refusing: {refused:#?}"
    );
}

#[test]
fn a_device_registered_at_the_hub_connects_without_dps() {
    let mut sim = HubSim::start(&hub_sim_binary(), &["--device", &format!("site-gw:{KEY}")]);
    let hub = sim.hub().to_owned();
    let site = Site::new(&format!(
        "[ble]\nenabled = false\n\n[uplink]\nprofile = \"azure-iot\"\nca_file = \"{}\"\n\n\
         [uplink.azure]\nhub = \"{hub}\"\ndevice_id = \"site-gw\"\nsymmetric_key = \"{KEY}\"\n",
        sim.ca().display(),
    ));
    seed_thermostat(&site);
    let mut gateway = Gateway::spawn(&site.config(), &[]);
    let addr = gateway.ready();
    let admin = site.admin_token();
    let status = wait_uplink(addr, &admin, "connected", |j| {
        j["link"]["state"] == "connected"
    });
    assert_eq!(status["link"]["registrations"], 0, "no DPS: {status}");
    sim.wait("connected", |e| {
        e["client"] == "site-gw" && e["service"] == hub.as_str()
    });
    let token = device_token(addr, &admin);
    let ids = post_telemetry(addr, &token, 1, "direct");
    let message = sim.wait("telemetry", |e| e["properties"]["$.mid"] == ids[0].as_str());
    assert_eq!(message["device"], "site-gw");
    // Disabled at the hub: the connection ends, the next CONNECT is refused, and the
    // uplink stops saying what to check.
    sim.command(&json!({"op": "disable", "device": "site-gw"}));
    let status = wait_uplink(addr, &admin, "stopped", |j| j["link"]["state"] == "stopped");
    let error = status["link"]["last_error"].as_str().unwrap();
    assert!(error.contains("[uplink.azure]"), "{error}");
    gateway.stop_cleanly(libc::SIGTERM, &site);
}

/// Moved to another hub with its data (DPS's migrate policy): the new hub's twin counts
/// `$version` from 1 again, and the gateway takes the whole twin as the truth instead of
/// waiting for a version above the old hub's.
#[test]
fn a_gateway_migrated_to_another_hub_follows_the_new_twins_versions() {
    let mut sim = HubSim::start(
        &hub_sim_binary(),
        &[
            "--hub",
            "auto",
            "--hub",
            "auto",
            "--enrollment",
            &format!("gw-test:{KEY}:0:migrate"),
            "--initial-twin",
            r#"{"interval":60}"#,
        ],
    );
    let (first, second) = (sim.hub_at(0).to_owned(), sim.hub_at(1).to_owned());
    let site = azure_site(&sim, KEY, "");
    let mut gateway = Gateway::spawn(&site.config(), &[]);
    let addr = gateway.ready();
    let admin = site.admin_token();
    wait_uplink(addr, &admin, "at the first hub", |j| {
        j["link"]["broker"] == format!("mqtts://{first}:8883")
    });
    for interval in [30, 20, 10] {
        sim.command(
            &json!({"op": "desired", "device": "gw-test", "patch": {"interval": interval}}),
        );
    }
    wait_uplink(addr, &admin, "desired v4", |j| {
        j["link"]["desired_version"] == 4
    });
    sim.command(&json!({"op": "reassign", "enrollment": "gw-test", "hub": second}));
    sim.wait("reassigned", |e| e["enrollment"] == "gw-test");
    sim.command(
        &json!({"op": "method", "device": "gw-test", "name": "reprovision", "payload": {}}),
    );
    wait_uplink(addr, &admin, "migrated to the second hub", |j| {
        j["link"]["broker"] == format!("mqtts://{second}:8883")
            && j["link"]["substatus"] == "deviceDataMigrated"
    });
    // The migrated twin (version 1, the operator's last value), then a patch at the new
    // hub (version 2): both taken.
    wait_uplink(addr, &admin, "the migrated twin", |j| {
        j["link"]["desired_version"] == 1 && j["link"]["desired"]["interval"] == 10
    });
    sim.command(&json!({"op": "desired", "device": "gw-test", "patch": {"interval": 5}}));
    wait_uplink(addr, &admin, "the new hub's patch", |j| {
        j["link"]["desired_version"] == 2 && j["link"]["desired"]["interval"] == 5
    });
}

/// X.509: the gateway's certificate (CN = its registration id, or its device id at the
/// hub) is its credential, with no key in the config and no token: through DPS, and as a
/// device registered at the hub.
#[test]
fn a_gateway_with_an_x509_certificate_registers_and_connects_without_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, certs, keys) = outpost_test_support::x509_files(dir.path(), &["gw-x509", "hub-x509"]);
    let mut sim = HubSim::start(
        &hub_sim_binary(),
        &[
            "--client-ca",
            ca.to_str().unwrap(),
            "--x509-enrollment",
            "gw-x509",
            "--x509-device",
            "hub-x509",
        ],
    );
    let hub = sim.hub().to_owned();
    for (index, identity) in [
        format!(
            "dps_host = \"{}\"\nid_scope = \"{}\"\nregistration_id = \"gw-x509\"\n",
            sim.dps(),
            sim.id_scope()
        ),
        format!("hub = \"{hub}\"\ndevice_id = \"hub-x509\"\n"),
    ]
    .iter()
    .enumerate()
    {
        let site = Site::new(&format!(
            "[ble]\nenabled = false\n\n[uplink]\nprofile = \"azure-iot\"\nca_file = \"{}\"\n\
             client_cert = \"{}\"\nclient_key = {{ file = \"gateway.key\" }}\n\
             backoff_min_ms = 100\nbackoff_max_ms = 400\n\n[uplink.azure]\n{identity}",
            sim.ca().display(),
            certs[index].display(),
        ));
        super::write_secret(
            &site.dir.path().join("gateway.key"),
            &std::fs::read_to_string(&keys[index]).unwrap(),
        );
        seed_thermostat(&site);
        let mut gateway = Gateway::spawn(&site.config(), &[]);
        let addr = gateway.ready();
        let admin = site.admin_token();
        let client = ["gw-x509", "hub-x509"][index];
        let connected = sim.wait("connected", |e| {
            e["client"] == client && e["service"] == hub.as_str()
        });
        // hub-sim refuses an X.509 device's CONNECT that carries a token.
        assert!(connected["token_expiry"].is_null(), "no token: {connected}");
        let token = device_token(addr, &admin);
        let ids = post_telemetry(addr, &token, 1, client);
        let message = sim.wait("telemetry", |e| e["properties"]["$.mid"] == ids[0].as_str());
        assert_eq!(message["device"], client);
        gateway.stop_cleanly(libc::SIGTERM, &site);
    }
    // At DPS it registered with its certificate (no token either).
    let registered = sim.wait("dps_registered", |e| e["registration"] == "gw-x509");
    assert_eq!(registered["registration"], "gw-x509");
}

/// IoT Hub signs no device certificates: a device that asks to be claimed is signed by
/// the local CA, and without one the run says what to configure.
#[test]
fn a_claim_without_a_local_ca_says_iot_hub_has_no_claim_service() {
    use super::rollouts::FleetSite;
    let sim = HubSim::start(
        &hub_sim_binary(),
        &["--enrollment", &format!("gw-test:{KEY}")],
    );
    let fleet = FleetSite::new(&format!(
        "[uplink]\nprofile = \"azure-iot\"\nca_file = \"{}\"\n\n[uplink.azure]\n\
         dps_host = \"{}\"\nid_scope = \"{}\"\nsymmetric_key = \"{KEY}\"\n",
        sim.ca().display(),
        sim.dps(),
        sim.id_scope(),
    ));
    let mut gateway = Gateway::spawn(&fleet.site.config(), &[]);
    gateway.ready();
    let manifest = fleet.site.dir.path().join("claim.json");
    let _device = super::onboarding::Sim::start(
        &[
            "--softap",
            "1",
            "--security",
            "1",
            "--pop",
            "abcd1234",
            "--claim",
        ],
        &manifest,
    );
    super::onboarding::import(&fleet.site, &manifest);
    let report = super::onboarding::run_json(&fleet.site);
    let error = report["devices"][0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("has no claim service"), "{report}");
    assert!(error.contains("[onboarding.claim]"), "{report}");
}

/// 200 devices behind the gateway: each has its summary in the twin, which stays under
/// IoT Hub's 32 KiB (hub-sim refuses a bigger one as IoT Hub does), in a few coalesced
/// patches; each device's detail travels as a device-to-cloud message.
#[test]
fn two_hundred_devices_fit_the_twin_and_their_detail_goes_as_messages() {
    let mut sim = HubSim::start(
        &hub_sim_binary(),
        &["--enrollment", &format!("gw-test:{KEY}")],
    );
    let site = azure_site(&sim, KEY, "");
    let ids: Vec<String> = (0..200).map(|i| format!("esp32-light-{i:03}")).collect();
    site.seed(
        ids.iter()
            .map(|id| NewDevice::new(id, "esp32-app", DeviceState::Claimed))
            .collect(),
    );
    let _gateway = {
        let mut gateway = Gateway::spawn(&site.config(), &[]);
        gateway.ready();
        gateway
    };
    // Every device's lobby event arrives as a message of its own.
    for id in &ids {
        sim.wait("telemetry", |e| {
            e["properties"]["outpost-topic"] == format!("lobby/{id}")
                && e["properties"]["outpost-device"] == id.as_str()
        });
    }
    // And every device is in the twin, which IoT Hub would accept.
    let mut patches = 0;
    let mut in_twin = std::collections::BTreeSet::new();
    while in_twin.len() < ids.len() {
        let patch = sim.wait("reported", |e| {
            e["patch"]["outpost"]["devices"]
                .as_object()
                .is_some_and(|d| d.keys().any(|k| !in_twin.contains(k)))
        });
        patches += 1;
        in_twin.extend(
            patch["patch"]["outpost"]["devices"]
                .as_object()
                .unwrap()
                .keys()
                .cloned(),
        );
    }
    assert!(patches < 20, "coalesced: {patches} patches for 200 devices");
    sim.command(&json!({"op": "twin", "device": "gw-test"}));
    let twin = sim.wait("twin", |e| e["device"] == "gw-test");
    let reported = twin["reported"].to_string();
    println!("200 devices: the reported twin is {} bytes", reported.len());
    assert!(reported.len() <= 32 * 1024, "{}", reported.len());
    assert_eq!(twin["reported"]["outpost"]["devicesNotInTwin"], 0);
    assert_eq!(
        twin["reported"]["outpost"]["devices"]["esp32-light-199"],
        json!({"type": "esp32-app", "state": "claimed"})
    );
    assert!(
        !sim.events
            .drain()
            .iter()
            .any(|e| e["event"] == "reported_refused"),
        "IoT Hub would refuse a patch"
    );
}

/// Device Update's keys made for the tests (tests/support/fixtures/adu).
fn adu_key(name: &str, kid: &str) -> outpost_cache::adu::AduSigner {
    let path = outpost_test_support::repo_root()
        .join("tests/support/fixtures/adu")
        .join(format!("{name}.pk8.der"));
    outpost_cache::adu::AduSigner::from_pkcs8(kid, &std::fs::read(path).unwrap()).unwrap()
}

/// An ADU update manifest (v5) for the gateway model `gateway_model`, whose one inline
/// step updates the `model` devices through the `outpost/esp32-app:1` handler.
fn adu_manifest(gateway_model: &str, model: &str, firmware: &[u8]) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    json!({
        "manifestVersion": "5",
        "updateId": {"provider": "Outpost", "name": "light-fw", "version": "2.0.0"},
        // The agent's (the gateway's) compatibility, which Device Update matches, and
        // the devices' in the step.
        "compatibility": [{"manufacturer": "Outpost", "model": gateway_model}],
        "instructions": {"steps": [{
            "type": "inline",
            "handler": "outpost/esp32-app:1",
            "files": ["f0"],
            "handlerProperties": {
                "installedCriteria": "2.0.0",
                "compatibility": [{"manufacturer": "Espressif", "model": model}]
            }
        }]},
        "files": {"f0": {
            "fileName": "light-2.0.0.bin",
            "sizeInBytes": firmware.len(),
            "hashes": {"sha256": base64::engine::general_purpose::STANDARD
                .encode(sha2::Sha256::digest(firmware))}
        }},
        "createdDateTime": "2026-12-05T10:00:00Z"
    })
    .to_string()
}

/// The reported `deviceUpdate.agent` once its workflow is `workflow` and `done` holds.
fn adu_agent(
    sim: &mut HubSim,
    workflow: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let found = sim.wait("reported", |e| {
        let agent = &e["patch"]["deviceUpdate"]["agent"];
        agent["workflow"]["id"] == workflow && done(agent)
    });
    found["patch"]["deviceUpdate"]["agent"].clone()
}

/// Device Update end to end: the gateway is a Device Update agent whose components are
/// its esp-sim lights. A deployment signed root -> signing key -> manifest rolls out
/// through the esp32-app handler and the twin ends at 700; an unknown root, a file
/// whose bytes do not match the manifest's hash and a manifest for other devices each
/// end failed (255) with their own extended result code and nothing installed; a cancel
/// leaves the agent idle with `nodeployment`.
#[test]
fn device_update_deployments_roll_out_to_the_devices_behind_the_gateway() {
    use super::rollouts::{
        CountingOrigin, FleetSite, Release, SimFleet, onboard_sims, wait_rollout,
    };
    let mut sim = HubSim::start(
        &hub_sim_binary(),
        &["--enrollment", &format!("gw-test:{KEY}")],
    );
    let root = adu_key("root", "ADU.test.R");
    let signing = adu_key("signing", "ADU.test.S");
    let (n, e) = root.root().to_base64();
    let fleet = FleetSite::new(&format!(
        "[uplink]\nprofile = \"azure-iot\"\nca_file = \"{}\"\nbackoff_min_ms = 100\n\
         backoff_max_ms = 400\n\n[uplink.azure]\ndps_host = \"{}\"\nid_scope = \"{}\"\n\
         symmetric_key = \"{KEY}\"\n\n[uplink.azure.device_update]\nmanufacturer = \"Outpost\"\n\
         model = \"site-gateway\"\n\n[[cache.adu_roots]]\nkid = \"ADU.test.R\"\nn = \"{n}\"\n\
         e = \"{e}\"\n",
        sim.ca().display(),
        sim.dps(),
        sim.id_scope(),
    ));
    let mut gateway = Gateway::spawn(&fleet.site.config(), &[]);
    let addr = gateway.ready();
    let admin = fleet.site.admin_token();
    fleet.install(outpost_test_guests::ESP32_APP, "esp32-app", "esp32-app");

    // The agent announces Device Update's model and reports who it is, and idle (no
    // deployment was ever made).
    let hub = sim.hub().to_owned();
    let connected = sim.wait("connected", |e| {
        e["client"] == "gw-test" && e["service"] == hub.as_str()
    });
    assert_eq!(connected["model_id"], "dtmi:azure:iot:deviceUpdateModel;3");
    let startup = sim.wait("reported", |e| {
        e["patch"]["deviceUpdate"]["agent"]["deviceProperties"].is_object()
    });
    let component = &startup["patch"]["deviceUpdate"];
    assert_eq!(component["__t"], "c");
    assert_eq!(
        component["agent"]["deviceProperties"]["contractModelId"],
        "dtmi:azure:iot:deviceUpdateContractModel;3"
    );
    assert_eq!(
        component["agent"]["deviceProperties"]["model"],
        "site-gateway"
    );
    assert_eq!(
        component["agent"]["compatPropertyNames"],
        "manufacturer,model"
    );
    sim.wait("reported", |e| {
        e["patch"]["deviceUpdate"]["agent"]["state"] == 0
    });

    let mut onboarded = onboard_sims(
        &fleet,
        vec![SimFleet {
            args: [&["--softap", "3"], super::rollouts::LIGHT_ARGS].concat(),
            devices: 3,
            ready: "agent_ready",
        }],
    );
    let (mut lights, _) = onboarded.remove(0);
    let firmware = Release::new().app;
    let mut other = firmware.clone();
    other[1000] ^= 0xFF;
    let origin = CountingOrigin::start(vec![
        ("/light-2.0.0.bin", firmware.clone()),
        ("/tampered.bin", other),
    ]);
    let deploy = |sim: &mut HubSim, workflow: &str, manifest: &str, signer_root: &_, path: &str| {
        let signature = signing.sign_manifest(signer_root, manifest);
        sim.command(&json!({
            "op": "deploy", "device": "gw-test", "workflow": workflow,
            "deployment": {
                "updateManifest": manifest,
                "updateManifestSignature": signature,
                "fileUrls": {"f0": origin.url(path)},
            }
        }));
    };
    let good = adu_manifest("site-gateway", "esp32-app", &firmware);

    // 1. Signed through a root the operator does not trust: refused before any download.
    let stranger = adu_key("other-root", "ADU.other.R");
    deploy(
        &mut sim,
        "wf-unknown-root",
        &good,
        &stranger,
        "/light-2.0.0.bin",
    );
    let agent = adu_agent(&mut sim, "wf-unknown-root", |a| a["state"] == 255);
    let result = &agent["lastInstallResult"];
    assert_eq!(result["resultCode"], 0, "{agent}");
    assert_eq!(result["extendedResultCodes"], "A0000001", "{agent}");
    assert!(
        result["resultDetails"]
            .as_str()
            .unwrap()
            .contains("\"ADU.other.R\" is not a trusted"),
        "{agent}"
    );
    // The service property was acknowledged with its version.
    sim.wait("reported", |e| {
        e["patch"]["deviceUpdate"]["service"]["value"]["workflow"]["id"] == "wf-unknown-root"
            && e["patch"]["deviceUpdate"]["service"]["ac"] == 200
    });

    // 2. A manifest for devices the gateway does not have.
    deploy(
        &mut sim,
        "wf-incompatible",
        &adu_manifest("site-gateway", "esp32-s3-cam", &firmware),
        &root,
        "/light-2.0.0.bin",
    );
    let agent = adu_agent(&mut sim, "wf-incompatible", |a| a["state"] == 255);
    assert_eq!(
        agent["lastInstallResult"]["extendedResultCodes"], "70000001",
        "{agent}"
    );
    // A manifest for another kind of gateway (Device Update would not send it).
    deploy(
        &mut sim,
        "wf-other-gateway",
        &adu_manifest("toaster", "esp32-app", &firmware),
        &root,
        "/light-2.0.0.bin",
    );
    let agent = adu_agent(&mut sim, "wf-other-gateway", |a| a["state"] == 255);
    let result = &agent["lastInstallResult"];
    assert_eq!(result["extendedResultCodes"], "70000001", "{agent}");
    assert!(
        result["resultDetails"]
            .as_str()
            .unwrap()
            .contains("not for this gateway"),
        "{agent}"
    );
    assert_eq!(origin.gets("/light-2.0.0.bin"), 0, "nothing was downloaded");

    // 3. The URL serves bytes that are not the manifest's: the cache refuses them, every
    // device fails before install, the rollout stops.
    deploy(&mut sim, "wf-tampered", &good, &root, "/tampered.bin");
    let agent = adu_agent(&mut sim, "wf-tampered", |a| a["state"] == 255);
    assert_eq!(agent["lastInstallResult"]["resultCode"], 0, "{agent}");
    assert_eq!(
        agent["lastInstallResult"]["extendedResultCodes"], "30000001",
        "{agent}"
    );
    assert_eq!(
        agent["lastInstallResult"]["resultDetails"], "3 of 3 devices failed",
        "{agent}"
    );
    assert!(agent.get("installedUpdateId").is_none(), "{agent}");
    let view = wait_rollout(addr, &admin, "adu-wf-tampered", "ended", DEADLINE, |v| {
        v["state"] == "finished"
    });
    assert_eq!(view["counts"]["failed"], 3, "{view}");
    let failed = super::rollouts::by_status(&view, "failed");
    assert_eq!(failed.len(), 3, "{view}");
    for device in failed {
        let details = device["result"]["lastInstallResult"]["resultDetails"].to_string();
        assert!(details.contains("sha256"), "{details}");
    }
    assert!(origin.gets("/tampered.bin") >= 1);

    // 4. The real thing: every light updates and the twin says 700 with the update id.
    deploy(&mut sim, "wf-good", &good, &root, "/light-2.0.0.bin");
    adu_agent(&mut sim, "wf-good", |a| a["state"] == 6);
    let agent = adu_agent(&mut sim, "wf-good", |a| a["state"] == 0);
    assert_eq!(agent["lastInstallResult"]["resultCode"], 700, "{agent}");
    assert_eq!(
        agent["lastInstallResult"]["stepResults"]["step_0"]["resultCode"],
        700
    );
    assert_eq!(
        agent["installedUpdateId"],
        r#"{"provider":"Outpost","name":"light-fw","version":"2.0.0"}"#
    );
    let view = wait_rollout(addr, &admin, "adu-wf-good", "finished", DEADLINE, |v| {
        v["state"] == "finished"
    });
    assert_eq!(view["counts"]["succeeded"], 3, "{view}");
    assert_eq!(view["origin"], "cloud");
    // One verified download served every device.
    assert_eq!(origin.gets("/light-2.0.0.bin"), 1);
    let ready = lights.wait_for("ready", |_| true);
    assert_eq!(ready["devices"].as_array().unwrap().len(), 3);

    // 5. A cancel with nothing in progress: the agent says idle with `nodeployment`,
    // and the finished rollout stays finished (a cancel in flight: tests/engine.rs and
    // the twin mapping's unit test).
    sim.command(&json!({"op": "cancel-deployment", "device": "gw-test"}));
    let agent = adu_agent(&mut sim, "nodeployment", |a| a["state"] == 0);
    assert_eq!(agent["workflow"]["action"], 255);
    sim.wait("reported", |e| {
        e["patch"]["deviceUpdate"]["service"]["value"]["workflow"]["action"] == 255
    });

    // Hostile cloud-to-device messages cannot pose as Device Update: a deployment with
    // the gateway's own cancel schema, and one with an `adu-` id, are ignored. A plain
    // (unusable) deployment sent after them marks when they were processed.
    let c2d = |sim: &mut HubSim, body: serde_json::Value| {
        sim.command(&json!({"op": "c2d", "device": "gw-test", "payload": body,
            "properties": {"outpost-schema": "outpost.deployment/1"}}));
    };
    c2d(
        &mut sim,
        json!({"schema": "outpost.deployment-cancel/1", "deploymentId": "evil-1", "manifest": "adu-"}),
    );
    c2d(
        &mut sim,
        json!({"schema": "outpost.deployment/1", "deploymentId": "adu-evil", "manifest": "x"}),
    );
    c2d(
        &mut sim,
        json!({"schema": "outpost.deployment/1", "deploymentId": "marker", "manifest": "x"}),
    );
    sim.wait("telemetry", |e| {
        e["properties"]["outpost-topic"] == "rollouts/marker"
    });
    let seen = sim.events.drain();
    assert!(
        !seen.iter().any(|e| {
            e["patch"]["deviceUpdate"]["agent"]["workflow"]["id"] == "evil"
                || e["properties"]["outpost-topic"] == "rollouts/adu-evil"
                || e["properties"]["outpost-topic"] == "rollouts/evil-1"
        }),
        "a hostile message was taken as a deployment"
    );
    let db = outpost_store::rusqlite::Connection::open_with_flags(
        fleet.site.database(),
        outpost_store::rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let inbox: Vec<String> = db
        .prepare("SELECT id FROM inbound_deployments WHERE id IN ('evil-1', 'adu-evil', 'marker')")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        inbox,
        ["marker"],
        "only the plain deployment reached the inbox"
    );
    let (status, list) = super::http_get(addr, "/api/v1/rollouts", Some(&admin));
    assert_eq!(status, 200);
    let mut adu: Vec<(&str, &str)> = list["rollouts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["id"].as_str().unwrap(), r["state"].as_str().unwrap()))
        .filter(|(id, _)| id.starts_with("adu-"))
        .collect();
    adu.sort_unstable();
    assert_eq!(
        adu,
        [("adu-wf-good", "finished"), ("adu-wf-tampered", "finished")],
        "only usable deployments became rollouts: {list}"
    );
}

const DEVICE_KEY: &str = "ZXNwLTEncyBvd24ga2V5IGF0IHRoZSBodWIsIGZvciB0ZXN0cw==";

/// A device behind a directly registered gateway, with its own hub identity.
fn own_identity_config(sim: &HubSim, device_key: &str) -> String {
    format!(
        "[ble]\nenabled = false\n\n[uplink]\nprofile = \"azure-iot\"\nca_file = \"{}\"\n\
         backoff_min_ms = 100\nbackoff_max_ms = 400\n\n[uplink.azure]\nhub = \"{}\"\n\
         device_id = \"site-gw\"\nsymmetric_key = \"{KEY}\"\n\n[[uplink.azure.devices]]\n\
         device = \"esp-1\"\ndevice_id = \"site-esp-1\"\nsymmetric_key = \"{device_key}\"\n",
        sim.ca().display(),
        sim.hub(),
    )
}

/// IoT Hub's MQTT has no multiplexing: a device given its own identity connects as
/// itself, beside the gateway. Refused (a wrong key), its messages wait in its lane of
/// the outbox while the gateway's and the other devices' go on; with the right key
/// after a restart they arrive as the device's own, its lobby event lands in its own
/// twin, and its twin's desired properties become its desired state.
#[test]
fn a_device_with_its_own_hub_identity_connects_as_itself_and_a_refused_one_loses_nothing() {
    let mut sim = HubSim::start(
        &hub_sim_binary(),
        &[
            "--device",
            &format!("site-gw:{KEY}"),
            "--device",
            &format!("site-esp-1:{DEVICE_KEY}"),
        ],
    );
    let hub = sim.hub().to_owned();
    let site = Site::new(&own_identity_config(&sim, OTHER_KEY));
    site.seed(vec![
        NewDevice::new("esp-1", "thermostat", DeviceState::Claimed),
        NewDevice::new("esp-2", "thermostat", DeviceState::Claimed),
    ]);
    let mut gateway = Gateway::spawn(&site.config(), &[]);
    let addr = gateway.ready();
    let admin = site.admin_token();
    let status = wait_uplink(addr, &admin, "esp-1 refused", |j| {
        j["link"]["state"] == "connected"
            && j["link"]["own_identities"]["esp-1"]["state"] == "refused"
    });
    let error = status["link"]["own_identities"]["esp-1"]["last_error"]
        .as_str()
        .unwrap();
    assert!(
        error.contains("[[uplink.azure.devices]]") && error.contains("site-esp-1"),
        "{error}"
    );
    sim.wait("auth_refused", |e| e["client"] == "site-esp-1");
    let token = device_token(addr, &admin);
    let held = post_telemetry(addr, &token, 3, "held");
    // Another device's telemetry goes through the gateway meanwhile.
    let (code, credential) = http(addr, "POST", "/api/v1/devices/esp-2/credential", &admin, "");
    assert_eq!(code, 201, "{credential}");
    let (code, answer) = http(
        addr,
        "POST",
        "/api/v1/devices/esp-2/telemetry",
        credential["token"].as_str().unwrap(),
        "{\"tag\":\"through the gateway\"}",
    );
    assert_eq!(code, 202, "{answer}");
    sim.wait("telemetry", |e| {
        e["device"] == "site-gw" && e["properties"]["outpost-device"] == "esp-2"
    });
    gateway.stop_cleanly(libc::SIGTERM, &site);
    // esp-1's three records wait in its lane of the outbox.
    let database = site.database();
    let waiting: i64 = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async move {
            let store = outpost_store::Store::open(database).await.unwrap();
            // Messages, not rows (telemetry is stored in groups).
            let waiting = outpost_uplink::outbox::waiting(&store)
                .await
                .unwrap()
                .into_iter()
                .filter(|m| m.lane == "esp-1" && m.topic.ends_with("/telemetry/esp-1"))
                .count();
            store.close().await.unwrap();
            waiting as i64
        });
    assert_eq!(waiting, 3);
    let before = sim.events.drain();
    assert!(
        !before
            .iter()
            .any(|e| e["event"] == "telemetry" && e["properties"]["outpost-device"] == "esp-1"),
        "esp-1's messages went out without its identity: {before:?}"
    );

    // The right key: what waited arrives as the device itself.
    let config = std::fs::read_to_string(site.config()).unwrap();
    site.write_config(&config.replace(OTHER_KEY, DEVICE_KEY));
    let mut gateway = Gateway::spawn(&site.config(), &[]);
    let addr = gateway.ready();
    for id in &held {
        let message = sim.wait("telemetry", |e| e["properties"]["$.mid"] == id.as_str());
        assert_eq!(message["device"], "site-esp-1", "{message}");
        assert_eq!(message["properties"]["outpost-device"], "esp-1");
    }
    let status = wait_uplink(addr, &admin, "esp-1 connected", |j| {
        j["link"]["own_identities"]["esp-1"]["state"] == "connected"
    });
    let own = &status["link"]["own_identities"]["esp-1"];
    assert_eq!(own["hub"], hub.as_str(), "{own}");
    assert_eq!(own["hub_device_id"], "site-esp-1");
    // Its twin's desired properties are its desired state: read at connect, and again
    // after a desired patch.
    let first = wait_uplink(addr, &admin, "esp-1's twin read", |j| {
        j["link"]["own_identities"]["esp-1"]["desired_version"]
            .as_u64()
            .is_some_and(|v| v >= 1)
    })["link"]["own_identities"]["esp-1"]["desired_version"]
        .as_u64()
        .unwrap();
    sim.command(&json!({"op": "desired", "device": "site-esp-1", "patch": {"interval": 5}}));
    wait_uplink(addr, &admin, "esp-1's desired state", |j| {
        j["link"]["own_identities"]["esp-1"]["desired_version"]
            .as_u64()
            .is_some_and(|v| v > first)
    });
    // Everything went: nothing of esp-1's waits any more.
    wait_uplink(addr, &admin, "the outbox drained", |j| {
        j["outbox"]["queued"] == 0
    });
    gateway.stop_cleanly(libc::SIGTERM, &site);
}

/// Through DPS in the gateway's enrollment group, a device without a key of its own
/// registers with its key derived from the group's and connects where DPS assigns it;
/// its lobby event (announced after the gateway's registration) lands in its own twin,
/// and the gateway's twin summarises only the devices that have no identity of their own.
#[test]
fn a_device_without_a_key_registers_through_the_gateways_enrollment_group() {
    let mut sim = HubSim::start(
        &hub_sim_binary(),
        &["--group", &format!("site-group:{KEY}")],
    );
    let site = Site::new(&format!(
        "[ble]\nenabled = false\n\n[uplink]\nprofile = \"azure-iot\"\nca_file = \"{}\"\n\
         backoff_min_ms = 100\nbackoff_max_ms = 400\n\n[uplink.azure]\ndps_host = \"{}\"\n\
         id_scope = \"{}\"\ngroup_key = \"{KEY}\"\n\n[[uplink.azure.devices]]\ndevice = \"esp-1\"\n",
        sim.ca().display(),
        sim.dps(),
        sim.id_scope(),
    ));
    site.seed(vec![
        NewDevice::new("esp-1", "thermostat", DeviceState::Claimed),
        NewDevice::new("esp-2", "thermostat", DeviceState::Claimed),
    ]);
    let hub = sim.hub().to_owned();
    let mut gateway = Gateway::spawn(&site.config(), &[]);
    let addr = gateway.ready();
    let admin = site.admin_token();
    sim.wait("connected", |e| {
        e["client"] == "esp-1" && e["service"] == hub.as_str()
    });
    let token = device_token(addr, &admin);
    let ids = post_telemetry(addr, &token, 2, "own");
    for id in &ids {
        let message = sim.wait("telemetry", |e| e["properties"]["$.mid"] == id.as_str());
        assert_eq!(message["device"], "esp-1", "{message}");
    }
    let status = wait_uplink(addr, &admin, "both connected", |j| {
        j["link"]["state"] == "connected"
            && j["link"]["own_identities"]["esp-1"]["state"] == "connected"
    });
    assert_eq!(status["link"]["registrations"], 1, "{status}");
    sim.wait("reported", |e| {
        e["device"] == "esp-1"
            && e["patch"]["outpost"]["lobby"]["deviceId"] == "esp-1"
            && e["patch"]["outpost"]["lobby"]["state"] == "claimed"
    });
    sim.wait("reported", |e| {
        e["device"] == "gw-test" && e["patch"]["outpost"]["devices"].get("esp-2").is_some()
    });
    sim.command(&json!({"op": "twin", "device": "gw-test"}));
    let twin = sim.wait("twin", |e| e["device"] == "gw-test");
    let devices = &twin["reported"]["outpost"]["devices"];
    assert!(devices.get("esp-2").is_some(), "{twin}");
    assert!(devices.get("esp-1").is_none(), "{twin}");
    gateway.stop_cleanly(libc::SIGTERM, &site);
}
