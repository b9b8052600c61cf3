//! Onboarding at library level, over real parts: the `esp-sim` fleet simulator (the
//! protocomm device role, run by `outpost-test-support`; `cargo xtask test` builds it)
//! serving SoftAP HTTP on loopback, SQLite, and a claiming CA made by [`create_ca`]. No
//! gateway process: the run is driven through [`Onboarder`] directly.

use std::sync::Arc;
use std::time::Duration;

use outpost_onboarding::{
    ClaimCaSettings, ImportDefaults, Onboarder, OnboardingError, OnboardingSettings, RunRequest,
    RunView, WifiNetwork, create_ca,
};
use outpost_store::{DeviceState, Store, Transport};
use outpost_test_support::{DEADLINE, Sim};

fn settings(ca: Option<ClaimCaSettings>) -> OnboardingSettings {
    OnboardingSettings {
        ble_enabled: false,
        networks: vec![
            // The first is last year's passphrase: each device is reset and tries the next.
            WifiNetwork {
                ssid: "outpost-site".into(),
                passphrase: "last year's passphrase".into(),
            },
            WifiNetwork {
                ssid: "outpost-site".into(),
                passphrase: "correct horse battery".into(),
            },
        ],
        status_poll: Duration::from_millis(50),
        claim_ca: ca,
        ..OnboardingSettings::default()
    }
}

async fn finished(run: &outpost_onboarding::Run) -> RunView {
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        let view = run.view();
        if view.done {
            return view;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "the run did not finish: {view:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn softap_devices_are_provisioned_and_claimed_through_the_local_ca() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("fleet.json");
    let mut sim = Sim::start(&["--softap", "3", "--claim", "--security", "2"], &manifest);
    let (ca_cert, ca_key) = create_ca(&dir.path().join("ca"), "Site claiming CA").unwrap();
    // A CA is never overwritten.
    assert!(matches!(
        create_ca(&dir.path().join("ca"), "again"),
        Err(OnboardingError::Settings(text)) if text.contains("not overwriting")
    ));
    let store = Store::open(dir.path().join("outpost.db")).await.unwrap();
    let onboarder = Arc::new(
        Onboarder::new(
            settings(Some(ClaimCaSettings {
                ca_cert: ca_cert.clone(),
                ca_key_pem: std::fs::read_to_string(&ca_key).unwrap(),
                valid_days: 30,
            })),
            store.clone(),
            None,
            "http://127.0.0.1:9/".into(),
        )
        .unwrap(),
    );

    // A broken manifest is refused whole; the good one is imported.
    let err = onboarder
        .import(
            b"name,security,device_type\nPROV_1,2,light\n",
            &ImportDefaults::default(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, OnboardingError::Manifest(text) if text.contains("security 2 needs a username")),
        "{err}"
    );
    assert!(store.onboarding_targets().await.unwrap().is_empty());
    let imported = onboarder
        .import(
            &std::fs::read(&manifest).unwrap(),
            &ImportDefaults::default(),
        )
        .await
        .unwrap();
    assert_eq!(imported, 3);

    let run = onboarder.start(RunRequest::default()).await.unwrap();
    let view = finished(&run).await;
    assert_eq!((view.succeeded, view.failed), (3, 0), "{view:#?}");
    for device in &view.devices {
        assert_eq!(device.transport, Transport::Softap);
        assert_eq!(device.outcome, Some(DeviceState::Claimed), "{device:?}");
        assert_eq!(device.wifi_attempts, 2, "{device:?}");
        assert!(device.node_id.as_deref().unwrap().starts_with("node-"));
    }
    // The devices took certificates issued by the site CA, and joined.
    for device in &view.devices {
        sim.wait_for("claimed", |e| e["device"] == device.name.as_str());
        sim.wait_for("wifi", |e| {
            e["device"] == device.name.as_str() && e["state"] == "connected"
        });
    }
    let ca_pem = std::fs::read(&ca_cert).unwrap();
    let (_, ca_der) = x509_parser::pem::parse_x509_pem(&ca_pem).unwrap();
    let ca = ca_der.parse_x509().unwrap();
    let claims = store.claims(false).await.unwrap();
    assert_eq!(claims.len(), 3);
    for claim in &claims {
        let (_, der) = x509_parser::pem::parse_x509_pem(claim.certificate.as_bytes()).unwrap();
        let cert = der.parse_x509().unwrap();
        assert_eq!(cert.issuer(), ca.subject(), "{}", claim.device_id);
        assert!(
            cert.subject().to_string().contains(&claim.node_id),
            "{}",
            cert.subject()
        );
        assert!(
            claim.reported_at.is_none(),
            "no uplink: waits to be reported"
        );
    }
    for device in store.list_devices().await.unwrap() {
        assert_eq!(device.state, DeviceState::Claimed, "{device:?}");
    }

    // Nothing left to do; a name not in the manifest is refused.
    let again = onboarder.start(RunRequest::default()).await.unwrap_err();
    assert!(again.to_string().contains("nothing to onboard"), "{again}");
    let unknown = onboarder
        .start(RunRequest {
            devices: vec!["PROV_nowhere".into()],
            all: false,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&unknown, OnboardingError::Refused(text) if text.contains("not in the imported manifest")),
        "{unknown}"
    );
    drop(sim);
    store.close().await.unwrap();
}

#[tokio::test]
async fn settings_that_cannot_work_are_refused_before_a_run() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("outpost.db")).await.unwrap();
    // A CA certificate that does not exist.
    let err = Onboarder::new(
        settings(Some(ClaimCaSettings {
            ca_cert: dir.path().join("missing.pem"),
            ca_key_pem: "not a key".into(),
            valid_days: 30,
        })),
        store.clone(),
        None,
        "http://127.0.0.1:9".into(),
    )
    .unwrap_err();
    assert!(matches!(err, OnboardingError::Settings(_)), "{err}");
    // No site Wi-Fi: a run says what to configure.
    let onboarder = Arc::new(
        Onboarder::new(
            OnboardingSettings {
                ble_enabled: false,
                ..OnboardingSettings::default()
            },
            store.clone(),
            None,
            "http://127.0.0.1:9".into(),
        )
        .unwrap(),
    );
    let err = onboarder.start(RunRequest::default()).await.unwrap_err();
    assert!(err.to_string().contains("[[onboarding.wifi]]"), "{err}");
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_stops_a_run_in_flight_and_refuses_new_ones() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("outpost.db")).await.unwrap();
    // A "device" that accepts the connection and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = silent.local_addr().unwrap();
    let (accepted_tx, accepted) = tokio::sync::oneshot::channel();
    let holder = tokio::spawn(async move {
        let (connection, _) = silent.accept().await.unwrap();
        let _ = accepted_tx.send(());
        // Held open, unanswered, until the test ends.
        std::future::pending::<()>().await;
        drop(connection);
    });
    let mut quiet = settings(None);
    quiet.timeouts.request = Duration::from_secs(600);
    let onboarder =
        Arc::new(Onboarder::new(quiet, store.clone(), None, "http://127.0.0.1:9".into()).unwrap());
    let manifest = serde_json::json!({"devices": [{
        "name": "PROV_silent", "transport": "softap", "address": address.to_string(),
        "security": 0, "device_type": "light",
    }]});
    onboarder
        .import(manifest.to_string().as_bytes(), &ImportDefaults::default())
        .await
        .unwrap();
    let run = onboarder.start(RunRequest::default()).await.unwrap();
    tokio::time::timeout(DEADLINE, accepted)
        .await
        .expect("the run reached the device")
        .unwrap();
    assert!(!run.view().done);
    tokio::time::timeout(Duration::from_secs(10), onboarder.shutdown())
        .await
        .expect("the shutdown did not wait for a 600 s request");
    let refused = onboarder.start(RunRequest::default()).await.unwrap_err();
    assert!(refused.to_string().contains("shutting down"), "{refused}");
    holder.abort();
    store.close().await.unwrap();
}
