//! Microsoft's own device SDK (`azure-iot-device` 2.14.0 from PyPI) is the referee of
//! hub-sim: it provisions through hub-sim's DPS (an individual enrollment and a group
//! member whose key the script derives as Azure's documentation does), connects to the
//! assigned hub over TLS, sends telemetry with properties, gets and patches its twin, and
//! takes a desired-property patch, a direct method and a cloud-to-device message. Its SAS
//! tokens are compared byte for byte with `outpost_azure::sas::token`. A wrong key is
//! refused. The same conversation with an X.509 certificate (CN = the registration id,
//! issued by the CA hub-sim is given), and a certificate for another name refused. Only
//! then are hub-sim's answers trusted for Outpost's own client.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use outpost_test_support::{EventLog, HubSim, azure_sdk_python, x509_files};
use serde_json::{Value, json};

const KEY: &str = "cmVmZXJlZSBpbmRpdmlkdWFsIGtleSBmb3IgaHViLXNpbSE=";
const GROUP_KEY: &str = "Z3JvdXAga2V5IG9mIHRoZSByZWZlcmVlJ3MgZmxlZXQhIQ==";

struct Sdk {
    child: Child,
    events: EventLog,
}

impl Sdk {
    fn run(config: &Value) -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/device.py");
        let mut child = Command::new(azure_sdk_python())
            .arg(&script)
            .arg(config.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .expect("the SDK's script starts");
        let events = EventLog::read(child.stdout.take().expect("stdout"));
        Self { child, events }
    }

    fn wait(&mut self, event: &str) -> Value {
        self.events.wait_for(event, |_| true).unwrap_or_else(|| {
            panic!(
                "the SDK never printed {event}; it printed {:#?}",
                self.events.drain()
            )
        })
    }

    fn finish(mut self) {
        let status = self.child.wait().expect("the script ends");
        assert!(status.success(), "the SDK's script failed: {status}");
    }
}

fn config(sim: &HubSim, registration_id: &str, key: &Value) -> Value {
    let mut config = json!({
        "dps": sim.dps(),
        "hub": sim.hub(),
        "id_scope": sim.id_scope(),
        "registration_id": registration_id,
        "ca": sim.ca(),
    });
    config
        .as_object_mut()
        .expect("an object")
        .extend(key.as_object().expect("an object").clone());
    config
}

/// Our SAS tokens are the SDK's, byte for byte, for the same key, resource and expiry.
fn same_tokens_as_the_sdk(sdk: &mut Sdk) {
    let mut compared = 0;
    while let Some(sas) = sdk
        .events
        .seen()
        .iter()
        .filter(|e| e["event"] == "sas")
        .nth(compared)
        .cloned()
    {
        let ours = outpost_azure::sas::token(
            sas["key"].as_str().expect("key"),
            sas["resource"].as_str().expect("resource"),
            sas["expiry"].as_u64().expect("expiry"),
            None,
        )
        .expect("a token");
        assert_eq!(
            ours,
            sas["token"].as_str().expect("token"),
            "for {}",
            sas["resource"]
        );
        compared += 1;
    }
    assert_eq!(compared, 2, "the script prints a DPS and a hub token");
}

fn whole_conversation(sim: &mut HubSim, registration_id: &str, key: &Value) {
    let hub = sim.hub().to_owned();
    let mut sdk = Sdk::run(&config(sim, registration_id, key));

    let registered = sdk.wait("registered");
    if key.get("cert").is_none() {
        same_tokens_as_the_sdk(&mut sdk);
    }
    assert_eq!(registered["status"], "assigned", "{registered}");
    assert_eq!(registered["assigned_hub"], hub.as_str());
    assert_eq!(registered["device_id"], registration_id);
    assert_eq!(registered["substatus"], "initialAssignment");
    // The SDK shows the payload DPS returned as JSON text: none without a custom
    // allocation function; the device's own payload reached DPS.
    assert_eq!(registered["payload"], "null");
    let at_dps = sim.wait("dps_registered", |e| e["registration"] == registration_id);
    assert_eq!(at_dps["payload"], json!({"site": "referee"}));

    // Telemetry arrives with its system and application properties.
    sdk.wait("sent");
    let telemetry = sim.wait("telemetry", |e| e["device"] == registration_id);
    assert_eq!(telemetry["payload"], json!({"temperature": 21.5}));
    assert_eq!(
        telemetry["properties"],
        json!({"$.mid": "m-1", "$.ct": "application/json", "$.ce": "utf-8", "source": "esp 1"})
    );

    // The twin starts from the enrollment's initial twin; a reported patch bumps its
    // version.
    let twin = sdk.wait("twin");
    assert_eq!(
        twin["twin"]["desired"]["telemetryIntervalSecs"], 60,
        "{twin}"
    );
    assert_eq!(twin["twin"]["desired"]["$version"], 1);
    assert_eq!(twin["twin"]["reported"]["$version"], 1);
    let after = sdk.wait("twin_after_patch");
    assert_eq!(after["twin"]["reported"]["firmware"]["version"], "1.2.0");
    assert_eq!(after["twin"]["reported"]["$version"], 2);
    sim.wait("reported", |e| {
        e["device"] == registration_id && e["version"] == 2
    });

    // The cloud's side: once the SDK listens, a desired patch, a method and a message.
    sdk.wait("listening");
    for filter in [
        "$iothub/twin/PATCH/properties/desired/#".to_owned(),
        "$iothub/methods/POST/#".to_owned(),
        format!("devices/{registration_id}/messages/devicebound/#"),
    ] {
        sim.wait("subscribed", |e| {
            e["client"] == registration_id
                && e["filters"]
                    .as_array()
                    .is_some_and(|f| f.iter().any(|f| f == filter.as_str()))
        });
    }
    sim.command(
        &json!({"op": "desired", "device": registration_id, "patch": {"telemetryIntervalSecs": 5}}),
    );
    sim.command(&json!({"op": "method", "device": registration_id, "name": "reboot", "payload": {"delay": 1}}));
    sim.command(&json!({"op": "c2d", "device": registration_id, "payload": "hello", "properties": {"kind": "greeting"}}));
    let desired = sdk.wait("desired");
    assert_eq!(desired["patch"]["telemetryIntervalSecs"], 5, "{desired}");
    assert_eq!(desired["patch"]["$version"], 2);
    let method = sdk.wait("method");
    assert_eq!(method["name"], "reboot");
    assert_eq!(method["payload"], json!({"delay": 1}));
    let c2d = sdk.wait("c2d");
    assert_eq!(c2d["data"], "hello");
    assert_eq!(c2d["custom_properties"], json!({"kind": "greeting"}));
    let answer = sim.wait("method_response", |e| e["device"] == registration_id);
    assert_eq!(answer["status"], 200, "{answer}");
    assert_eq!(answer["payload"], json!({"rebooting": true}));
    sdk.wait("done");
    sdk.finish();
}

#[test]
fn microsofts_device_sdk_provisions_and_talks_to_hub_sim() {
    let mut sim = HubSim::start(
        Path::new(env!("CARGO_BIN_EXE_hub-sim")),
        &[
            "--enrollment",
            &format!("referee-1:{KEY}"),
            "--group",
            &format!("fleet:{GROUP_KEY}"),
            "--initial-twin",
            r#"{"telemetryIntervalSecs":60}"#,
        ],
    );
    whole_conversation(&mut sim, "referee-1", &json!({"key": KEY}));
    // A member of the group: the script derives its key from the group key itself.
    whole_conversation(&mut sim, "fleet-member-7", &json!({"group_key": GROUP_KEY}));
}

#[test]
fn a_wrong_key_is_refused_at_connect() {
    let mut sim = HubSim::start(
        Path::new(env!("CARGO_BIN_EXE_hub-sim")),
        &["--enrollment", &format!("referee-2:{KEY}")],
    );
    let mut sdk = Sdk::run(&config(
        &sim,
        "referee-2",
        &json!({"key": KEY, "wrong_key": true}),
    ));
    let refused = sdk.wait("wrong_key_refused");
    assert!(refused["error"].is_string(), "{refused}");
    let why = sim.wait("auth_refused", |e| e["client"] == "referee-2");
    assert_eq!(why["service"], "dps");
    assert_eq!(why["code"], 5, "not authorized: {why}");
    assert!(
        why["reason"]
            .as_str()
            .is_some_and(|r| r.contains("signature")),
        "{why}"
    );
    sdk.finish();
}

#[test]
fn microsofts_device_sdk_registers_and_connects_with_an_x509_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = x509_files(dir.path(), &["referee-x509"]);
    let (cert, key) = (&cert[0], &key[0]);
    let mut sim = HubSim::start(
        Path::new(env!("CARGO_BIN_EXE_hub-sim")),
        &[
            "--client-ca",
            ca.to_str().unwrap(),
            "--x509-enrollment",
            "referee-x509",
            "--x509-enrollment",
            "someone-else",
            "--initial-twin",
            r#"{"telemetryIntervalSecs":60}"#,
        ],
    );
    whole_conversation(
        &mut sim,
        "referee-x509",
        &json!({"cert": cert, "cert_key": key}),
    );
    // The same certificate for another registration id: refused at DPS.
    let mut sdk = Sdk::run(&config(
        &sim,
        "someone-else",
        &json!({"cert": cert, "cert_key": key}),
    ));
    let why = sim.wait("auth_refused", |e| e["client"] == "someone-else");
    assert_eq!(why["service"], "dps");
    assert!(
        why["reason"]
            .as_str()
            .is_some_and(|r| r.contains("CN \"someone-else\"")),
        "{why}"
    );
    let status = sdk.child.wait().expect("the script ends");
    assert!(!status.success(), "a refused registration fails the script");
}
