//! The `azure-iot` uplink profile against hub-sim, whose dialect Microsoft's own device
//! SDK referees first (examples/hub-sim/tests/referee.rs): the gateway provisions
//! through DPS, reports its state in its twin, relays
//! telemetry with properties, follows desired-property patches, answers direct methods,
//! renews its SAS token before it expires, provisions again when told, and stops on a
//! refused key.

use outpost_test_support::{HubSim, hub_sim_binary};
use serde_json::json;

use super::uplink::{device_token, http, post_telemetry, wait_uplink};
use super::{Gateway, Site};
use outpost_store::{DeviceState, NewDevice};

const KEY: &str = "YXp1cmUgcHJvZmlsZSBnYXRld2F5IGtleSBmb3IgdGVzdHM=";
const OTHER_KEY: &str = "bm90IHRoZSBlbnJvbGxtZW50J3Mga2V5IGF0IGFsbCEhIQ==";

fn azure_site(sim: &HubSim, key: &str, extra: &str) -> Site {
    let site = Site::new(&format!(
        "[ble]\nenabled = false\n\n[uplink]\nprofile = \"azure-iot\"\nca_file = \"{}\"\n\
         backoff_min_ms = 100\nbackoff_max_ms = 400\n\n[uplink.azure]\ndps_host = \"{}\"\n\
         id_scope = \"{}\"\nsymmetric_key = \"{key}\"\n{extra}\n",
        sim.ca().display(),
        sim.dps(),
        sim.id_scope(),
    ));
    site.seed(vec![NewDevice::new(
        "esp-1",
        "thermostat",
        DeviceState::Claimed,
    )]);
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
        e["patch"]["outpost"]["devices"]["esp-1"]["lobby"]["deviceType"] == "thermostat"
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
    let end = std::time::Instant::now() + outpost_test_support::DEADLINE;
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
    let end = std::time::Instant::now() + outpost_test_support::DEADLINE;
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
    site.seed(vec![NewDevice::new(
        "esp-1",
        "thermostat",
        DeviceState::Claimed,
    )]);
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
