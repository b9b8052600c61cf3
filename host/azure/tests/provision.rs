//! Outpost's DPS client against hub-sim (whose DPS Microsoft's own SDK referees in
//! examples/hub-sim/tests/referee.rs): individual and group keys, throttling, refusals,
//! an unreachable DPS, and the three reprovisioning policies.

use std::sync::Arc;
use std::time::Duration;

use outpost_azure::provision::{self, Attestation, DpsSettings, ProvisionError};
use outpost_test_support::{HubSim, hub_sim_binary};
use serde_json::json;

const KEY: &str = "b3V0cG9zdCBnYXRld2F5IGluZGl2aWR1YWwga2V5IQ==";
const GROUP_KEY: &str = "b3V0cG9zdCBmbGVldCBncm91cCBrZXkgZm9yIGRwcyE=";

/// A client that trusts hub-sim's CA.
fn client(
    sim: &HubSim,
) -> rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(sim.ca()).expect("the CA file") {
        roots.add(cert.expect("PEM")).expect("a usable CA");
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
}

fn tls(sim: &HubSim) -> Arc<rustls::ClientConfig> {
    Arc::new(client(sim).with_no_client_auth())
}

/// As [`tls`], presenting `cert` (PEM files: certificate, key) as the client.
fn tls_with_certificate(
    sim: &HubSim,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Arc<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .expect("the certificate")
        .collect::<Result<Vec<_>, _>>()
        .expect("PEM");
    let key = PrivateKeyDer::from_pem_file(key).expect("the key");
    Arc::new(
        client(sim)
            .with_client_auth_cert(chain, key)
            .expect("a usable client certificate"),
    )
}

fn settings(sim: &HubSim, registration_id: &str, attestation: Attestation) -> DpsSettings {
    DpsSettings {
        host: sim.dps().to_owned(),
        port: 8883,
        id_scope: sim.id_scope().to_owned(),
        registration_id: registration_id.to_owned(),
        attestation,
        tls: tls(sim),
        payload: Some(json!({"gateway": true})),
        token_ttl: Duration::from_secs(3600),
        timeout: Duration::from_secs(30),
        client_version: "outpost/test".to_owned(),
    }
}

fn start(args: &[&str]) -> HubSim {
    HubSim::start(&hub_sim_binary(), args)
}

#[tokio::test(flavor = "multi_thread")]
async fn registers_with_an_individual_key_and_as_a_group_member() {
    let mut sim = start(&[
        "--enrollment",
        &format!("gw-1:{KEY}"),
        "--group",
        &format!("fleet:{GROUP_KEY}"),
    ]);
    let individual = provision::register(&settings(
        &sim,
        "gw-1",
        Attestation::SymmetricKey(KEY.into()),
    ))
    .await
    .expect("assigned");
    assert_eq!(individual.hub, sim.hub());
    assert_eq!(individual.device_id, "gw-1");
    assert_eq!(individual.substatus, "initialAssignment");
    let seen = sim.wait("dps_registered", |e| e["registration"] == "gw-1");
    assert_eq!(seen["payload"], json!({"gateway": true}));

    let member = provision::register(&settings(
        &sim,
        "gw-7",
        Attestation::GroupKey(GROUP_KEY.into()),
    ))
    .await
    .expect("assigned");
    assert_eq!(
        (member.hub.as_str(), member.device_id.as_str()),
        (sim.hub(), "gw-7")
    );
    // The group key itself is not a member's key.
    let err = provision::register(&settings(
        &sim,
        "gw-8",
        Attestation::SymmetricKey(GROUP_KEY.into()),
    ))
    .await
    .unwrap_err();
    assert!(matches!(err, ProvisionError::Refused(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_throttled_registration_is_asked_again_after_retry_after() {
    let mut sim = start(&["--enrollment", &format!("gw-1:{KEY}"), "--throttle", "2"]);
    let assigned = provision::register(&settings(
        &sim,
        "gw-1",
        Attestation::SymmetricKey(KEY.into()),
    ))
    .await
    .expect("assigned after two 429s");
    assert_eq!(assigned.hub, sim.hub());
    let throttled = sim
        .events
        .drain()
        .iter()
        .filter(|e| e["event"] == "dps_throttled")
        .count();
    assert_eq!(throttled, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_keys_unknown_devices_and_an_absent_dps_say_why() {
    let mut sim = start(&["--enrollment", &format!("gw-1:{KEY}")]);
    let wrong = provision::register(&settings(
        &sim,
        "gw-1",
        Attestation::SymmetricKey(GROUP_KEY.into()),
    ))
    .await
    .unwrap_err();
    assert!(
        matches!(&wrong, ProvisionError::Refused(why) if why.contains("NotAuthorized")),
        "{wrong}"
    );
    let why = sim.wait("auth_refused", |e| e["client"] == "gw-1");
    assert!(
        why["reason"].as_str().unwrap().contains("signature"),
        "{why}"
    );

    let unknown = provision::register(&settings(
        &sim,
        "stranger",
        Attestation::SymmetricKey(KEY.into()),
    ))
    .await
    .unwrap_err();
    assert!(matches!(unknown, ProvisionError::Refused(_)), "{unknown}");
    sim.wait("auth_refused", |e| e["client"] == "stranger");

    let not_base64 = provision::register(&settings(
        &sim,
        "gw-1",
        Attestation::SymmetricKey("not base64!".into()),
    ))
    .await
    .unwrap_err();
    assert!(
        matches!(not_base64, ProvisionError::Settings(_)),
        "{not_base64}"
    );

    // Nothing listens there: a transient failure, tried again later by the caller.
    let mut absent = settings(&sim, "gw-1", Attestation::SymmetricKey(KEY.into()));
    absent.host = "127.0.0.1".into();
    absent.port = 1;
    let err = provision::register(&absent).await.unwrap_err();
    assert!(matches!(err, ProvisionError::Transient(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn reprovisioning_follows_each_enrollments_policy() {
    let mut sim = start(&[
        "--hub",
        "auto",
        "--hub",
        "auto",
        "--enrollment",
        &format!("migrating:{KEY}:0:migrate"),
        "--enrollment",
        &format!("resetting:{KEY}:0:reset"),
        "--enrollment",
        &format!("staying:{KEY}:0:never"),
        "--initial-twin",
        r#"{"interval":60}"#,
    ]);
    let (first, second) = (sim.hub_at(0).to_owned(), sim.hub_at(1).to_owned());
    for (registration, moved_to, substatus) in [
        ("migrating", &second, "deviceDataMigrated"),
        ("resetting", &second, "deviceDataReset"),
        ("staying", &first, "initialAssignment"),
    ] {
        let dps = settings(&sim, registration, Attestation::SymmetricKey(KEY.into()));
        let assigned = provision::register(&dps).await.expect("assigned");
        assert_eq!(assigned.hub, first);
        sim.command(&json!({"op": "desired", "device": registration, "patch": {"interval": 5}}));
        sim.wait("desired", |e| e["device"] == registration);
        sim.command(&json!({"op": "reassign", "enrollment": registration, "hub": second}));
        sim.wait("reassigned", |e| e["enrollment"] == registration);
        let again = provision::register(&dps).await.expect("assigned again");
        assert_eq!(
            (again.hub.as_str(), again.substatus.as_str()),
            (moved_to.as_str(), substatus),
            "{registration}"
        );
        // What the twin kept: migrate keeps the operator's change, reset starts over.
        sim.command(&json!({"op": "twin", "device": registration}));
        let twin = sim.wait("twin", |e| e["device"] == registration);
        let interval = if substatus == "deviceDataReset" {
            60
        } else {
            5
        };
        assert_eq!(
            twin["desired"]["interval"], interval,
            "{registration}: {twin}"
        );
        assert_eq!(twin["hub"], moved_to.as_str());
    }
}

/// X.509 attestation: the certificate whose CN is the registration id registers, with no
/// token; without a certificate, or with one for another name, DPS refuses for good.
#[tokio::test(flavor = "multi_thread")]
async fn registers_with_an_x509_certificate_and_a_wrong_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, certs, keys) = outpost_test_support::x509_files(dir.path(), &["gw-x509", "intruder"]);
    let sim = start(&[
        "--client-ca",
        ca.to_str().unwrap(),
        "--x509-enrollment",
        "gw-x509",
    ]);
    let mut dps = settings(&sim, "gw-x509", Attestation::X509);
    dps.tls = tls_with_certificate(&sim, &certs[0], &keys[0]);
    let assigned = provision::register(&dps).await.expect("assigned");
    assert_eq!(assigned.hub, sim.hub());
    assert_eq!(assigned.device_id, "gw-x509");
    // Another name's certificate, and none at all.
    dps.tls = tls_with_certificate(&sim, &certs[1], &keys[1]);
    let err = provision::register(&dps).await.unwrap_err();
    assert!(matches!(err, ProvisionError::Refused(_)), "{err}");
    dps.tls = tls(&sim);
    let err = provision::register(&dps).await.unwrap_err();
    assert!(matches!(err, ProvisionError::Refused(_)), "{err}");
}
