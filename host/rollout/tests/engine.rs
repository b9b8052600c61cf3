//! The rollout engine at library level, over real parts: SQLite, the firmware cache, the
//! wasmtime handler host with the `hostile` guest built from `plugins/`, the outbox and
//! the deployment inbox. Devices are played by the test through the mailbox and
//! [`Rollouts::report`], as the device API would hand them over.
//!
//! The `hostile` guest answers 901 "not installed" for ordinary device ids, 900 for
//! `current-…`, traps for `panic`; its other steps succeed at once, and a `done`
//! report with the update's version finishes the update.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use outpost_cache::manifest::{self, ManifestFile, Step, TrustedSigner, UpdateId, UpdateManifest};
use outpost_cache::{CacheConfig, FetchConfig, FirmwareCache};
use outpost_rollout::{
    DeviceStatus, Mailbox, Origin, RolloutError, RolloutSpec, RolloutState, RolloutView, Rollouts,
    WifiRotation,
};
use outpost_runtime::package::{Manifest, Package, RequestedLimits, TrustedVendor};
use outpost_runtime::{HandlerRegistry, Runtime, RuntimeConfig};
use outpost_store::{DeviceState, NewDevice, Store};
use outpost_uplink::contract::{Deployment, schema};
use outpost_uplink::{DeploymentInbox, Outbox, OutboxLimits};
use tokio_util::sync::CancellationToken;

const VERSION: &str = "2.0.0";
const GATEWAY: &str = "gw-test";
/// Every wait in these tests ends by this deadline, with the state it saw.
const PATIENCE: Duration = Duration::from_secs(60);

fn vendor_key() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

fn fleet_key() -> SigningKey {
    SigningKey::from_bytes(&[11; 32])
}

/// The `hostile` guest as a package signed by the trusted vendor.
fn handler_package() -> Vec<u8> {
    let wasm = std::fs::read(outpost_test_guests::HOSTILE)
        .unwrap_or_else(|err| panic!("{}: {err}", outpost_test_guests::HOSTILE));
    let manifest = Manifest {
        format: 1,
        name: "hostile".into(),
        version: "1.0.0".into(),
        vendor: "acme".into(),
        device_types: vec!["hostile-device".into()],
        wit: "outpost:handler@0.1.0".into(),
        limits: RequestedLimits {
            memory_mib: 64,
            cpu_ms: 1000,
        },
        component: "handler.wasm".into(),
        files: Default::default(),
    };
    let mut package = Package::build(manifest, wasm).unwrap();
    package.sign(&vendor_key());
    package.to_tar()
}

/// One gateway's engine and what it is built on, in a state directory that outlives it.
struct Engine {
    store: Store,
    inbox: DeploymentInbox,
    mailbox: Arc<Mailbox>,
    rollouts: Rollouts,
    firmware: FirmwareCache,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    outbox_shutdown: CancellationToken,
    writer: tokio::task::JoinHandle<()>,
}

impl Engine {
    async fn start(dir: &Path) -> Self {
        let store = Store::open(dir.join("outpost.db")).await.unwrap();
        let firmware = FirmwareCache::open(
            store.clone(),
            CacheConfig {
                root: dir.join("firmware"),
                max_bytes: 64 << 20,
                memory_bytes: 8 << 20,
                trusted_signers: vec![TrustedSigner {
                    name: "fleet".into(),
                    key: fleet_key().verifying_key(),
                }],
                adu_roots: Vec::new(),
                fetch: FetchConfig::default(),
            },
        )
        .await
        .unwrap();
        let runtime = Arc::new(Runtime::new(RuntimeConfig::default()).unwrap());
        let (registry, _) = HandlerRegistry::open(
            dir.join("handlers"),
            runtime,
            vec![TrustedVendor {
                name: "acme".into(),
                key: vendor_key().verifying_key(),
                device_types: vec!["hostile-device".into()],
            }],
        )
        .await
        .unwrap();
        if registry.for_device_type("hostile-device").is_none() {
            registry.install(&handler_package()).await.unwrap();
        }
        let outbox_shutdown = CancellationToken::new();
        let (outbox, writer) = Outbox::open(
            store.clone(),
            OutboxLimits::default(),
            outbox_shutdown.clone(),
        )
        .await
        .unwrap();
        let inbox = DeploymentInbox::new(store.clone());
        let mailbox = Mailbox::new(
            "http://127.0.0.1:9".into(),
            outpost_cache::links::LinkSigner::new([5; 32]),
        );
        let rollouts = Rollouts::new(
            store.clone(),
            firmware.clone(),
            Arc::new(registry),
            outbox.clone(),
            inbox.clone(),
            Arc::clone(&mailbox),
            GATEWAY.into(),
        );
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(rollouts.clone().run(shutdown.clone()));
        Self {
            store,
            inbox,
            mailbox,
            rollouts,
            firmware,
            shutdown,
            task,
            outbox_shutdown,
            writer,
        }
    }

    /// Stops the engine as the gateway does at shutdown, then everything under it.
    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap();
        self.outbox_shutdown.cancel();
        self.writer.await.unwrap();
        self.firmware.shutdown().await.unwrap();
        self.store.close().await.unwrap();
    }

    /// Lobby devices of the handler's type; each has polled once, so it counts as
    /// connected.
    async fn add_devices(&self, ids: &[&str]) {
        for id in ids {
            self.store
                .upsert_device(NewDevice::new(
                    *id,
                    "hostile-device",
                    DeviceState::Provisioned,
                ))
                .await
                .unwrap();
            assert!(self.mailbox.next(id, Duration::ZERO).await.is_none());
        }
    }

    /// A signed manifest for the hostile handler with one imported file.
    async fn manifest(&self, dir: &Path) -> String {
        let path = dir.join("fw.bin");
        std::fs::write(&path, vec![0x5a; 4096]).unwrap();
        let blob = self.firmware.import(&path).await.unwrap();
        let manifest = UpdateManifest {
            manifest_version: manifest::MANIFEST_VERSION,
            update_id: UpdateId {
                provider: "acme".into(),
                name: "fw".into(),
                version: VERSION.into(),
            },
            compatibility: vec![BTreeMap::from([(
                "deviceType".to_owned(),
                "hostile-device".to_owned(),
            )])],
            steps: vec![Step {
                handler: "hostile".into(),
                files: vec!["fw".into()],
                handler_properties: serde_json::Map::new(),
            }],
            files: vec![ManifestFile {
                id: "fw".into(),
                file_name: "fw.bin".into(),
                size_in_bytes: 4096,
                sha256: blob.sha256,
                url: None,
            }],
            created_date_time: None,
        };
        manifest::sign(&manifest, &fleet_key(), "fleet").unwrap()
    }

    /// Waits until the rollout's view satisfies `done`; panics with it at the deadline.
    async fn until(
        &self,
        id: &str,
        what: &str,
        done: impl Fn(&RolloutView) -> bool,
    ) -> RolloutView {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            // A deployment from the inbox becomes a rollout only when the engine ran.
            let view = self.rollouts.view(id, true).await;
            if let Ok(view) = &view
                && done(view)
            {
                return view.clone();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: not within {PATIENCE:?}: {view:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Plays the devices: each reports `done` (or `failed` when listed in `failing`)
    /// to its update once one is in flight. Runs until every listed device reported
    /// once per update it was given.
    fn devices_report(&self, ids: &[&str], failing: &[&str]) -> tokio::task::JoinHandle<()> {
        let rollouts = self.rollouts.clone();
        let mut waiting: Vec<String> = ids.iter().map(|s| (*s).to_owned()).collect();
        let failing: HashSet<String> = failing.iter().map(|s| (*s).to_owned()).collect();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + PATIENCE;
            while !waiting.is_empty() && tokio::time::Instant::now() < deadline {
                waiting.retain(|id| {
                    let (kind, payload) = if failing.contains(id) {
                        ("failed", b"flash write error".to_vec())
                    } else {
                        ("done", VERSION.as_bytes().to_vec())
                    };
                    !rollouts.report(id, kind.into(), payload)
                });
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(waiting.is_empty(), "never in flight: {waiting:?}");
        })
    }

    /// Every message in the outbox: (message id column, topic, payload JSON).
    async fn outbox_rows(&self) -> Vec<(String, String, serde_json::Value)> {
        self.store
            .call(|conn| {
                let mut stmt =
                    conn.prepare("SELECT message_id, topic, payload FROM outbox ORDER BY seq")?;
                let rows = stmt
                    .query_map([], |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, Vec<u8>>(2)?,
                        ))
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            })
            .await
            .unwrap()
            .into_iter()
            .map(|(id, topic, payload)| (id, topic, serde_json::from_slice(&payload).unwrap()))
            .collect()
    }
}

fn spec(json: serde_json::Value) -> RolloutSpec {
    serde_json::from_value(json).unwrap()
}

fn status_of(view: &RolloutView, device: &str) -> DeviceStatus {
    view.devices
        .as_ref()
        .unwrap()
        .iter()
        .find(|d| d.device_id == device)
        .unwrap_or_else(|| panic!("{device} is not in the rollout"))
        .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waves_run_in_order_and_every_message_carries_its_outbox_id() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start(dir.path()).await;
    let ids = [
        "dev-00", "dev-01", "dev-02", "dev-03", "dev-04", "dev-05", "dev-06", "dev-07", "dev-08",
        "dev-09",
    ];
    engine.add_devices(&ids).await;
    engine.add_devices(&["current-10"]).await;
    let jws = engine.manifest(dir.path()).await;
    let created = engine
        .rollouts
        .create(
            Some("r-waves".into()),
            Origin::Local,
            &jws,
            spec(serde_json::json!({"waves": [30, 100]})),
        )
        .await
        .unwrap();
    assert_eq!(created.waves, 2);
    let devices = engine.devices_report(&ids, &[]);
    let view = engine
        .until("r-waves", "finished", |v| v.state == RolloutState::Finished)
        .await;
    devices.await.unwrap();
    assert_eq!(view.counts["succeeded"], 10, "{view:#?}");
    assert_eq!(view.counts["skipped"], 1, "{view:#?}");
    assert_eq!(status_of(&view, "current-10"), DeviceStatus::Skipped);
    // Wave 1 (a third of 11 devices, rounded up) ended before wave 2 began.
    let rows = view.devices.as_ref().unwrap();
    let first: Vec<_> = rows.iter().filter(|d| d.wave == 0).collect();
    let second: Vec<_> = rows.iter().filter(|d| d.wave == 1).collect();
    assert_eq!((first.len(), second.len()), (4, 7));
    let first_done = first.iter().filter_map(|d| d.finished_at).max().unwrap();
    let second_started = second.iter().filter_map(|d| d.started_at).min().unwrap();
    assert!(first_done <= second_started, "{view:#?}");

    // Results, reported state and rollout status went to the outbox, each message with
    // the id the outbox keeps it under.
    let outbox = engine.outbox_rows().await;
    for (id, topic, payload) in &outbox {
        assert_eq!(payload["messageId"], id.as_str(), "{topic}");
    }
    let results: HashSet<&str> = outbox
        .iter()
        .filter(|(_, t, _)| t.contains("/results/r-waves/"))
        .map(|(_, _, p)| p["deviceId"].as_str().unwrap())
        .collect();
    assert_eq!(results.len(), 11, "{results:?}");
    let last_status = outbox
        .iter()
        .rev()
        .find(|(_, t, _)| t.ends_with("/rollouts/r-waves"))
        .unwrap();
    assert_eq!(last_status.2["state"], "finished");
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_threshold_stops_the_rollout_and_a_trap_is_summarised() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start(dir.path()).await;
    // Batch, one at a time: `panic` (first by id) fails before the others start.
    let ids = ["x-1", "x-2", "x-3"];
    engine.add_devices(&["panic"]).await;
    engine.add_devices(&ids).await;
    let jws = engine.manifest(dir.path()).await;
    engine
        .rollouts
        .create(
            Some("r-stop".into()),
            Origin::Local,
            &jws,
            spec(serde_json::json!({
                "errorThreshold": {"count": 1},
                "priority": "batch",
                "maxParallel": 1,
            })),
        )
        .await
        .unwrap();
    let view = engine
        .until("r-stop", "stopped", |v| v.state.has_ended())
        .await;
    assert_eq!(view.state, RolloutState::Stopped, "{view:#?}");
    assert!(
        view.reason
            .as_deref()
            .unwrap()
            .starts_with("error threshold crossed: 1 of 4 devices failed"),
        "{view:#?}"
    );
    // The devices not yet started never start.
    for id in ids {
        assert_eq!(status_of(&view, id), DeviceStatus::Cancelled, "{view:#?}");
    }
    // The trap's result is the guest's own panic line, not a wasm backtrace.
    let failed = view
        .devices
        .as_ref()
        .unwrap()
        .iter()
        .find(|d| d.device_id == "panic")
        .unwrap();
    assert_eq!(failed.status, DeviceStatus::Failed);
    let details = failed.result.as_ref().unwrap()["lastInstallResult"]["resultDetails"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(details.len() <= 256, "{} bytes: {details}", details.len());
    assert!(
        details.contains("hostile handler panicked on purpose"),
        "{details}"
    );
    assert!(
        !details.contains("backtrace") && !details.contains("0x"),
        "{details}"
    );
    // The same short text is what the cloud gets.
    let outbox = engine.outbox_rows().await;
    let result = outbox
        .iter()
        .find(|(_, t, _)| t.ends_with("/results/r-stop/panic"))
        .unwrap();
    assert_eq!(
        result.2["agent"]["lastInstallResult"]["resultDetails"],
        details.as_str()
    );
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wave_below_its_success_threshold_pauses_and_the_operator_pauses_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start(dir.path()).await;
    let ids = ["dev-1", "dev-2", "dev-3", "dev-4"];
    engine.add_devices(&ids).await;
    let jws = engine.manifest(dir.path()).await;

    // Wave 1 is dev-1 and dev-2; dev-1 fails, so only 50 % succeed.
    engine
        .rollouts
        .create(
            Some("r-pause".into()),
            Origin::Local,
            &jws,
            spec(serde_json::json!({"waves": [50, 100], "successThreshold": 100})),
        )
        .await
        .unwrap();
    let first_wave = engine.devices_report(&["dev-1", "dev-2"], &["dev-1"]);
    let view = engine
        .until("r-pause", "paused", |v| v.state == RolloutState::Paused)
        .await;
    first_wave.await.unwrap();
    assert_eq!(view.wave, 0);
    assert!(
        view.reason
            .as_deref()
            .unwrap()
            .contains("1 of 2 devices succeeded (50%), below the 100% success threshold"),
        "{view:#?}"
    );
    assert_eq!(status_of(&view, "dev-3"), DeviceStatus::Pending);
    // A paused rollout cannot be paused again; resuming accepts the wave as it is.
    assert!(engine.rollouts.pause("r-pause").await.is_err());
    let resumed = engine.rollouts.resume("r-pause").await.unwrap();
    assert_eq!((resumed.state, resumed.wave), (RolloutState::Running, 1));
    let second_wave = engine.devices_report(&["dev-3", "dev-4"], &[]);
    let view = engine
        .until("r-pause", "finished", |v| v.state == RolloutState::Finished)
        .await;
    second_wave.await.unwrap();
    assert_eq!((view.counts["succeeded"], view.counts["failed"]), (3, 1));

    // The operator pauses a running batch rollout: the device in flight goes on, no
    // other starts until it is resumed.
    engine.add_devices(&["dev-5", "dev-6"]).await;
    engine
        .rollouts
        .create(
            Some("r-hold".into()),
            Origin::Local,
            &jws,
            spec(serde_json::json!({
                "target": {"devices": ["dev-5", "dev-6"]},
                "priority": "batch",
                "maxParallel": 1,
            })),
        )
        .await
        .unwrap();
    engine
        .until("r-hold", "one in flight", |v| v.counts["running"] == 1)
        .await;
    let paused = engine.rollouts.pause("r-hold").await.unwrap();
    assert_eq!(paused.reason.as_deref(), Some("paused by the operator"));
    engine.devices_report(&["dev-5"], &[]).await.unwrap();
    let view = engine
        .until("r-hold", "the one in flight done", |v| {
            v.counts["succeeded"] == 1
        })
        .await;
    assert_eq!(view.state, RolloutState::Paused);
    assert_eq!(status_of(&view, "dev-6"), DeviceStatus::Pending);
    engine.rollouts.resume("r-hold").await.unwrap();
    engine.devices_report(&["dev-6"], &[]).await.unwrap();
    engine
        .until("r-hold", "finished", |v| v.state == RolloutState::Finished)
        .await;
    engine.stop().await;
}

/// Fills the state database as a full disk would: it may not grow past the pages it has
/// (`max_page_count`), and a table of the test's own takes every free byte of those, so
/// SQLite fails the next write that needs a page with SQLITE_FULL, the error a full disk
/// gives. `full: false` lets it grow again.
async fn fill_database(store: &Store, full: bool) {
    store
        .call(move |conn| {
            if !full {
                conn.query_row("PRAGMA max_page_count = 1073741823", [], |_| Ok(()))?;
                return Ok(());
            }
            conn.execute_batch("CREATE TABLE test_filler (b BLOB)")?;
            let pages: i64 = conn.query_row("PRAGMA page_count", [], |row| row.get(0))?;
            conn.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))?;
            // Bounded: each row takes at least 100 bytes of at most 4 KiB per page.
            for _ in 0..pages * 41 {
                if let Err(err) = conn.execute("INSERT INTO test_filler VALUES (zeroblob(100))", [])
                {
                    assert_eq!(
                        err.sqlite_error_code(),
                        Some(outpost_store::rusqlite::ErrorCode::DiskFull),
                        "{err}"
                    );
                    return Ok(());
                }
            }
            panic!("the capped database never filled");
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_state_database_is_disk_full_creates_nothing_and_the_same_create_succeeds_later() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start(dir.path()).await;
    // Enough devices that the rollout's rows need new pages, not the slack of old ones.
    let ids: Vec<String> = (0..200).map(|n| format!("dev-{n:03}")).collect();
    engine
        .add_devices(&ids.iter().map(String::as_str).collect::<Vec<_>>())
        .await;
    let jws = engine.manifest(dir.path()).await;
    let create = || {
        engine.rollouts.create(
            Some("r-full".into()),
            Origin::Local,
            &jws,
            spec(serde_json::json!({"maxParallel": 1})),
        )
    };

    fill_database(&engine.store, true).await;
    let refused = create().await.unwrap_err();
    assert!(
        matches!(&refused, RolloutError::DiskFull(m) if m.contains("full")),
        "{refused:?}"
    );
    // Nothing half-made, and reads go on.
    assert!(engine.rollouts.list().await.unwrap().is_empty());
    assert!(matches!(
        engine.rollouts.view("r-full", false).await,
        Err(RolloutError::NotFound(_))
    ));

    // Room again: the same create goes through, with every device.
    fill_database(&engine.store, false).await;
    let view = create().await.unwrap();
    assert_eq!(view.counts.values().sum::<u64>(), 200, "{view:?}");
    engine.rollouts.cancel("r-full").await.unwrap();
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_mid_rollout_starts_the_devices_in_flight_over_and_nothing_else_twice() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start(dir.path()).await;
    let ids = ["dev-1", "dev-2", "dev-3"];
    engine.add_devices(&ids).await;
    let jws = engine.manifest(dir.path()).await;
    engine
        .rollouts
        .create(
            Some("r-restart".into()),
            Origin::Local,
            &jws,
            RolloutSpec::default(),
        )
        .await
        .unwrap();
    // dev-1 finishes; dev-2 and dev-3 wait in the rollback window when the gateway stops.
    engine.devices_report(&["dev-1"], &[]).await.unwrap();
    engine
        .until("r-restart", "dev-1 done, two in flight", |v| {
            v.counts["succeeded"] == 1 && v.counts["running"] == 2
        })
        .await;
    engine.stop().await;

    let engine = Engine::start(dir.path()).await;
    engine.add_devices(&ids).await;
    let devices = engine.devices_report(&["dev-2", "dev-3"], &[]);
    let view = engine
        .until("r-restart", "finished", |v| {
            v.state == RolloutState::Finished
        })
        .await;
    devices.await.unwrap();
    let attempts: BTreeMap<&str, u32> = view
        .devices
        .as_ref()
        .unwrap()
        .iter()
        .map(|d| (d.device_id.as_str(), d.attempts))
        .collect();
    assert_eq!(
        attempts,
        BTreeMap::from([("dev-1", 1), ("dev-2", 2), ("dev-3", 2)])
    );
    assert_eq!(view.counts["succeeded"], 3);
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_deployment_becomes_a_rollout_and_a_bad_one_is_refused_to_the_cloud() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start(dir.path()).await;
    engine.add_devices(&["dev-1"]).await;
    let jws = engine.manifest(dir.path()).await;
    let deployment = |id: &str, manifest: &str, rollout: serde_json::Value| Deployment {
        schema: schema::DEPLOYMENT.into(),
        deployment_id: id.into(),
        manifest: manifest.into(),
        rollout,
    };
    // The uplink hands it over; the engine is woken by the inbox, not a table scan.
    engine
        .inbox
        .receive(&deployment(
            "dep-1",
            &jws,
            serde_json::json!({"waves": [100]}),
        ))
        .await
        .unwrap();
    let devices = engine.devices_report(&["dev-1"], &[]);
    let view = engine
        .until("dep-1", "finished", |v| v.state == RolloutState::Finished)
        .await;
    devices.await.unwrap();
    assert_eq!(view.origin, "cloud");

    // A deployment whose rollout settings are wrong, and one whose manifest is not
    // signed: both refused, with the reason, on the retained rollout topic.
    engine
        .inbox
        .receive(&deployment(
            "dep-2",
            &jws,
            serde_json::json!({"waves": "all"}),
        ))
        .await
        .unwrap();
    engine
        .inbox
        .receive(&deployment("dep-3", "not.a.jws", serde_json::Value::Null))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !engine.inbox.pending().await.unwrap().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "never settled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let outbox = engine.outbox_rows().await;
    for (id, reason) in [
        ("dep-2", "rollout: "),
        ("dep-3", "the manifest was refused"),
    ] {
        let refusal = outbox
            .iter()
            .find(|(_, t, _)| t.ends_with(&format!("/rollouts/{id}")))
            .unwrap_or_else(|| panic!("no status for {id}"));
        assert_eq!(refusal.2["state"], "refused");
        assert!(
            refusal.2["reason"].as_str().unwrap().contains(reason),
            "{}",
            refusal.2
        );
        assert!(engine.rollouts.view(id, false).await.is_err());
    }
    engine.stop().await;
}

/// Device Update deploys a goal state: a new `adu-` deployment cancels the one in
/// progress, and a cancel from the cloud cancels the `adu-` rollouts and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_update_goal_replaces_the_one_in_progress_and_a_cancel_stops_it() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start(dir.path()).await;
    // The device never reports: every rollout stays in progress until cancelled.
    engine.add_devices(&["dev-1"]).await;
    let jws = engine.manifest(dir.path()).await;
    let deployment = |schema: &str, id: &str, manifest: &str| Deployment {
        schema: schema.into(),
        deployment_id: id.into(),
        manifest: manifest.into(),
        rollout: serde_json::json!({"successThreshold": 0}),
    };
    let active =
        |v: &RolloutView| matches!(v.state, RolloutState::Running | RolloutState::Scheduled);
    for id in ["dep-other", "adu-wf-1"] {
        engine
            .inbox
            .receive(&deployment(schema::DEPLOYMENT, id, &jws))
            .await
            .unwrap();
        engine.until(id, "started", active).await;
    }
    engine
        .inbox
        .receive(&deployment(schema::DEPLOYMENT, "adu-wf-2", &jws))
        .await
        .unwrap();
    engine.until("adu-wf-2", "started", active).await;
    let replaced = engine
        .until("adu-wf-1", "replaced", |v| {
            v.state == RolloutState::Cancelled
        })
        .await;
    assert_eq!(
        replaced.reason.as_deref(),
        Some(outpost_uplink::contract::ADU_REPLACED)
    );
    // Device Update's ids are its own: a local rollout cannot take one.
    let err = engine
        .rollouts
        .create(
            Some("adu-mine".into()),
            Origin::Local,
            &jws,
            RolloutSpec::default(),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("are Device Update's"), "{err}");
    // A cancel with no prefix would cancel everything: refused, nothing cancelled.
    engine
        .inbox
        .receive(&deployment(schema::DEPLOYMENT_CANCEL, "adu-cancel-0", ""))
        .await
        .unwrap();
    engine
        .inbox
        .receive(&deployment(
            schema::DEPLOYMENT_CANCEL,
            "adu-cancel-1",
            "adu-",
        ))
        .await
        .unwrap();
    engine
        .until("adu-wf-2", "cancelled", |v| {
            v.state == RolloutState::Cancelled
        })
        .await;
    let other = engine.rollouts.view("dep-other", false).await.unwrap();
    assert!(active(&other), "{other:?}");
    // Cancels are settled, not answered on the rollouts topic (the rollouts are).
    let outbox = engine.outbox_rows().await;
    assert!(
        !outbox
            .iter()
            .any(|(_, t, _)| t.contains("/rollouts/adu-cancel-")),
        "{outbox:?}"
    );
    let outcome: String = engine
        .store
        .call(|c| {
            Ok(c.query_row(
                "SELECT outcome FROM inbound_deployments WHERE id = 'adu-cancel-0'",
                [],
                |r| r.get(0),
            )?)
        })
        .await
        .unwrap();
    assert!(outcome.contains("empty prefix"), "{outcome}");
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wifi_rotation_reaches_the_agents_only_and_forgets_its_passphrase_once_all_moved() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start(dir.path()).await;
    engine
        .add_devices(&["agent-1", "agent-2", "no-agent"])
        .await;
    for id in ["agent-1", "agent-2"] {
        engine.store.issue_device_credential(id).await.unwrap();
    }
    let rotation = |ssid: &str, passphrase: &str| WifiRotation {
        ssid: ssid.into(),
        passphrase: passphrase.into(),
        fallback_secs: 30,
    };
    let settings = spec(serde_json::json!({"waves": [100], "successThreshold": 50}));
    // What no device could use is refused, and nothing is created.
    for (bad, needle) in [
        (rotation("", "correct horse battery"), "ssid must be"),
        (rotation("site-new", "short"), "passphrase must be"),
    ] {
        let err = engine
            .rollouts
            .create_wifi(Some("w-0".into()), bad, settings.clone())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, RolloutError::Invalid(m) if m.contains(needle)),
            "{err:?}"
        );
    }
    assert!(engine.rollouts.list().await.unwrap().is_empty());

    let view = engine
        .rollouts
        .create_wifi(
            Some("w-1".into()),
            rotation("site-new", "correct horse battery"),
            settings,
        )
        .await
        .unwrap();
    assert_eq!(
        (view.kind.as_str(), view.update_id.as_str()),
        ("wifi", "wifi/site-new")
    );
    // Only the devices that run the agent (they hold a credential) are targeted.
    assert_eq!(view.counts.values().sum::<u64>(), 2, "{view:?}");

    // The agents: each gets the network, answers, and reports; agent-2 cannot join at
    // first, and can on the retry.
    let agent = |id: &'static str, joins: bool| {
        let (mailbox, rollouts) = (Arc::clone(&engine.mailbox), engine.rollouts.clone());
        tokio::spawn(async move {
            let pending = mailbox.next(id, PATIENCE).await.expect("a command in time");
            assert_eq!(pending.command, "wifi-rotate");
            let payload: serde_json::Value =
                serde_json::from_str(pending.payload.as_deref().unwrap()).unwrap();
            assert_eq!(
                payload,
                serde_json::json!({"ssid": "site-new", "passphrase": "correct horse battery", "fallbackSecs": 30})
            );
            assert!(mailbox.reply(id, pending.id, Ok(Vec::new())));
            let (kind, text) = if joins {
                ("done", "site-new")
            } else {
                (
                    "failed",
                    "cannot join site-new: no such network in range; back on old",
                )
            };
            assert!(rollouts.report(id, kind.into(), text.as_bytes().to_vec()));
        })
    };
    for task in [agent("agent-1", true), agent("agent-2", false)] {
        task.await.unwrap();
    }
    let ended = engine
        .until("w-1", "finished", |v| v.state == RolloutState::Finished)
        .await;
    assert_eq!(status_of(&ended, "agent-1"), DeviceStatus::Succeeded);
    assert_eq!(status_of(&ended, "agent-2"), DeviceStatus::Failed);
    let details = ended.devices.as_ref().unwrap()[1].result.as_ref().unwrap()["lastInstallResult"]
        ["resultDetails"]
        .clone();
    assert_eq!(
        details,
        "device failed: cannot join site-new: no such network in range; back on old"
    );
    let stored = |engine: &Engine| {
        let store = engine.store.clone();
        async move {
            store
                .call(|conn| {
                    Ok(conn.query_row(
                        "SELECT network FROM rollouts WHERE id = 'w-1'",
                        [],
                        |r| r.get::<_, String>(0),
                    )?)
                })
                .await
                .unwrap()
        }
    };
    // Finished with a failure, it keeps the passphrase: the failed device is retried.
    assert!(stored(&engine).await.contains("correct horse"));
    engine.rollouts.retry("w-1").await.unwrap();
    agent("agent-2", true).await.unwrap();
    let ended = engine
        .until("w-1", "finished again", |v| {
            v.state == RolloutState::Finished && v.counts["succeeded"] == 2
        })
        .await;
    assert_eq!(status_of(&ended, "agent-2"), DeviceStatus::Succeeded);
    // Every device is on the new network: the passphrase is gone from the database.
    let network = stored(&engine).await;
    assert!(!network.contains("correct horse"), "{network}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&network).unwrap()["passphrase"],
        serde_json::Value::Null
    );
    engine.stop().await;
}
