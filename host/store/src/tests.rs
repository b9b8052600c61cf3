//! Store behaviour against real SQLite files in temp directories.

use std::path::{Path, PathBuf};

use rusqlite::Connection;

use crate::open::open_at;
use crate::{DeviceState, NewDevice, SCHEMA_VERSION, Store, StoreError};

fn db_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("outpost.db")
}

fn table_names(path: &Path) -> Vec<String> {
    let conn = Connection::open(path).unwrap();
    let mut stmt = conn
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")
        .unwrap();
    stmt.query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn user_version(path: &Path) -> u32 {
    Connection::open(path)
        .unwrap()
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .unwrap()
}

/// Opening must refuse `path` and leave every byte of it as it was.
async fn assert_refused_untouched(path: &Path) -> StoreError {
    let before = std::fs::read(path).unwrap();
    let err = Store::open(path)
        .await
        .expect_err("the store must refuse this file");
    assert_eq!(
        std::fs::read(path).unwrap(),
        before,
        "refused file was modified"
    );
    err
}

#[tokio::test]
async fn migrates_from_empty_to_the_current_schema() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let store = Store::open(&path).await.unwrap();
    let (mode, version): (String, u32) = store
        .call(|conn| {
            Ok((
                conn.pragma_query_value(None, "journal_mode", |r| r.get(0))?,
                conn.pragma_query_value(None, "user_version", |r| r.get(0))?,
            ))
        })
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    assert_eq!(version, SCHEMA_VERSION);
    store.close().await.unwrap();
    assert_eq!(
        table_names(&path),
        [
            "api_tokens",
            "claims",
            "desired_state",
            "device_credentials",
            "devices",
            "firmware_blobs",
            "firmware_downloads",
            "firmware_pins",
            "firmware_served",
            "group_members",
            "groups",
            "handler_state",
            "inbound_deployments",
            "manifest_files",
            "onboarding_targets",
            "outbox",
            "outbox_counters",
            "rollout_devices",
            "rollouts",
            "update_manifests",
            "uplink_assignment"
        ]
    );
}

#[tokio::test]
async fn migrates_from_the_previous_schema_keeping_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    {
        let conn = open_at(&path, SCHEMA_VERSION - 1).unwrap();
        conn.execute(
            "INSERT INTO devices (id, device_type, state, created_at, updated_at) \
             VALUES ('esp-1', 'thermostat', 'claimed', 1000, 2000)",
            [],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO rollouts (id, origin, manifest, update_id, spec, state, created_at, updated_at) \
             VALUES ('r-1', 'local', 'a.b.c', 'acme/fw/1', '{}', 'running', 1, 1)",
            [],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO outbox (message_id, topic, payload, priority, created_at, expires_at) \
             VALUES ('m0', 't', x'00', 0, 1, 2)",
            [],
        )
        .unwrap();
        conn.close().unwrap();
    }
    assert_eq!(user_version(&path), SCHEMA_VERSION - 1);

    let store = Store::open(&path).await.unwrap();
    let device = store
        .device("esp-1")
        .await
        .unwrap()
        .expect("device survives migration");
    assert_eq!(device.state, DeviceState::Claimed);
    assert_eq!(device.created_at.unix_millis(), 1000);
    // Outbox rows (schema 10) gain their lane: what was queued is the gateway's ('').
    let queued: i64 = store
        .call(|conn| {
            conn.execute(
                "INSERT INTO outbox (message_id, topic, payload, priority, created_at, expires_at) \
                 VALUES ('m1', 't', x'00', 0, 1, 2)",
                [],
            )?;
            Ok(
                conn.query_row("SELECT count(*) FROM outbox WHERE lane = ''", [], |r| {
                    r.get(0)
                })?,
            )
        })
        .await
        .unwrap();
    assert_eq!(queued, 2);
    // Rollouts (schema 9) gain their kind: what was there is an update rollout.
    let (kind, network): (String, Option<String>) = store
        .call(|conn| {
            Ok(conn.query_row(
                "SELECT kind, network FROM rollouts WHERE id = 'r-1'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?)
        })
        .await
        .unwrap();
    assert_eq!((kind.as_str(), network), ("update", None));
    // The uplink's deployments (schema 6) gain the outcome column.
    store
        .call(|conn| {
            conn.execute(
                "INSERT INTO inbound_deployments (id, body, received_at, outcome) \
                 VALUES ('d1', '{}', 1, 'accepted')",
                [],
            )?;
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!(
        store
            .handler_state_set("h", "k", vec![1], 10)
            .await
            .unwrap(),
        crate::StateWrite::Stored
    );
    store.close().await.unwrap();
    assert_eq!(user_version(&path), SCHEMA_VERSION);
}

#[tokio::test]
async fn migrates_from_the_first_schema_through_every_later_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    {
        let conn = open_at(&path, 1).unwrap();
        conn.execute(
            "INSERT INTO devices (id, device_type, state, created_at, updated_at) \
             VALUES ('esp-old', 'valve', 'provisioned', 5, 6)",
            [],
        )
        .unwrap();
        conn.close().unwrap();
    }
    assert_eq!(user_version(&path), 1);
    let store = Store::open(&path).await.unwrap();
    assert_eq!(store.list_devices().await.unwrap()[0].id, "esp-old");
    store.close().await.unwrap();
    assert_eq!(user_version(&path), SCHEMA_VERSION);
    assert_eq!(
        table_names(&path),
        [
            "api_tokens",
            "claims",
            "desired_state",
            "device_credentials",
            "devices",
            "firmware_blobs",
            "firmware_downloads",
            "firmware_pins",
            "firmware_served",
            "group_members",
            "groups",
            "handler_state",
            "inbound_deployments",
            "manifest_files",
            "onboarding_targets",
            "outbox",
            "outbox_counters",
            "rollout_devices",
            "rollouts",
            "update_manifests",
            "uplink_assignment"
        ]
    );
}

#[tokio::test]
async fn refuses_a_database_from_a_newer_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    Store::open(&path).await.unwrap().close().await.unwrap();
    Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .unwrap();

    match assert_refused_untouched(&path).await {
        StoreError::TooNew {
            found, supported, ..
        } => {
            assert_eq!((found, supported), (SCHEMA_VERSION + 1, SCHEMA_VERSION));
        }
        other => panic!("expected TooNew, got {other}"),
    }
}

#[tokio::test]
async fn refuses_a_file_that_is_not_a_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    std::fs::write(
        &path,
        b"this is a firmware image, not a database\n".repeat(200),
    )
    .unwrap();
    let err = assert_refused_untouched(&path).await;
    assert!(matches!(err, StoreError::Corrupt { .. }), "got {err}");
    assert!(err.to_string().contains("left untouched"), "{err}");
}

#[tokio::test]
async fn refuses_a_database_with_damaged_pages() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let store = Store::open(&path).await.unwrap();
    for n in 0..300 {
        let mut device =
            NewDevice::new(format!("esp-{n:04}"), "thermostat", DeviceState::Discovered);
        device.firmware_version = Some("1.0.0".repeat(20));
        store.upsert_device(device).await.unwrap();
    }
    store.close().await.unwrap();
    // Scribble over the middle of the file: table b-tree pages, not the header.
    let mut bytes = std::fs::read(&path).unwrap();
    let page = 4096;
    assert!(
        bytes.len() > 8 * page,
        "fixture too small: {} bytes",
        bytes.len()
    );
    bytes[3 * page..5 * page].fill(0xA5);
    std::fs::write(&path, &bytes).unwrap();

    let err = assert_refused_untouched(&path).await;
    assert!(matches!(err, StoreError::Corrupt { .. }), "got {err}");
}

#[tokio::test]
async fn refuses_another_programs_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    Connection::open(&path)
        .unwrap()
        .execute_batch("CREATE TABLE photos (id INTEGER PRIMARY KEY, blob BLOB);")
        .unwrap();
    let err = assert_refused_untouched(&path).await;
    assert!(matches!(err, StoreError::Foreign { .. }), "got {err}");
}

#[tokio::test]
async fn lobby_records_and_updates_devices() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(db_path(&dir)).await.unwrap();

    let mut device = NewDevice::new("esp-b", "thermostat", DeviceState::Discovered);
    device.manufacturer = Some("Contoso".into());
    device.model = Some("T1000".into());
    device.compat.insert("chip".into(), "esp32c3".into());
    let first = store.upsert_device(device.clone()).await.unwrap();
    store
        .upsert_device(NewDevice::new("esp-a", "valve", DeviceState::Provisioning))
        .await
        .unwrap();

    device.firmware_version = Some("2.1.0".into());
    device.state = DeviceState::Claimed;
    let second = store.upsert_device(device).await.unwrap();
    assert_eq!(second.created_at, first.created_at);
    assert_eq!(second.firmware_version.as_deref(), Some("2.1.0"));
    assert_eq!(
        second.compat.get("chip").map(String::as_str),
        Some("esp32c3")
    );

    store
        .set_device_state("esp-a", DeviceState::Failed)
        .await
        .unwrap();
    store.touch_device("esp-a").await.unwrap();
    let all = store.list_devices().await.unwrap();
    let ids: Vec<_> = all.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["esp-a", "esp-b"]);
    assert_eq!(all[0].state, DeviceState::Failed);
    assert!(all[0].last_seen_at.is_some());
    assert!(store.has_device("esp-b").await.unwrap());

    let missing = store.set_device_state("nope", DeviceState::Claimed).await;
    assert!(
        matches!(missing, Err(StoreError::NotFound { .. })),
        "{missing:?}"
    );
}

#[tokio::test]
async fn rejects_unprintable_or_empty_device_ids() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(db_path(&dir)).await.unwrap();
    for bad in ["", "esp\n1", &"x".repeat(129)] {
        let err = store
            .upsert_device(NewDevice::new(bad, "thermostat", DeviceState::Discovered))
            .await
            .expect_err("invalid id accepted");
        assert!(
            matches!(
                err,
                StoreError::InvalidInput {
                    what: "device id",
                    ..
                }
            ),
            "{err}"
        );
    }
    assert!(store.list_devices().await.unwrap().is_empty());
}

#[tokio::test]
async fn unknown_state_in_the_file_is_a_decode_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(db_path(&dir)).await.unwrap();
    store
        .call(|conn| {
            conn.execute(
                "INSERT INTO devices (id, device_type, state, created_at, updated_at) \
                 VALUES ('esp-x', 't', 'exploded', 0, 0)",
                [],
            )?;
            Ok(())
        })
        .await
        .unwrap();
    let err = store.list_devices().await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Decode {
                what: "device state",
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn groups_hold_existing_devices_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(db_path(&dir)).await.unwrap();
    store
        .upsert_device(NewDevice::new("esp-1", "thermostat", DeviceState::Claimed))
        .await
        .unwrap();
    store
        .create_group("floor-2", "Floor 2", "east wing")
        .await
        .unwrap();
    store.add_group_member("floor-2", "esp-1").await.unwrap();
    store.add_group_member("floor-2", "esp-1").await.unwrap();

    let dup = store
        .create_group("floor-2", "again", "")
        .await
        .unwrap_err();
    assert!(matches!(dup, StoreError::InvalidInput { .. }), "{dup}");
    let missing = store
        .add_group_member("floor-2", "esp-404")
        .await
        .unwrap_err();
    assert!(
        matches!(missing, StoreError::NotFound { what: "device", .. }),
        "{missing}"
    );

    let groups = store.list_groups().await.unwrap();
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0].members, ["esp-1"]);
}

#[tokio::test]
async fn a_panicking_call_is_an_error_and_the_store_carries_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(db_path(&dir)).await.unwrap();
    let err = store
        .call(|conn| -> Result<(), StoreError> {
            let tx = conn.transaction()?;
            tx.execute(
                "INSERT INTO devices (id, device_type, state, created_at, updated_at) \
                 VALUES ('ghost', 't', 'discovered', 0, 0)",
                [],
            )?;
            panic!("handler bug");
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Panicked(ref m) if m == "handler bug"),
        "{err}"
    );
    assert!(
        !store.has_device("ghost").await.unwrap(),
        "transaction was not rolled back"
    );
}

#[tokio::test]
async fn close_checkpoints_the_log_and_ends_every_handle() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let store = Store::open(&path).await.unwrap();
    let other = store.clone();
    store
        .upsert_device(NewDevice::new(
            "esp-1",
            "thermostat",
            DeviceState::Discovered,
        ))
        .await
        .unwrap();
    assert!(path.with_extension("db-wal").exists());
    store.close().await.unwrap();

    assert!(
        !path.with_extension("db-wal").exists(),
        "WAL left after a clean close"
    );
    assert!(matches!(
        other.list_devices().await,
        Err(StoreError::Closed)
    ));
    let reopened = Store::open(&path).await.unwrap();
    assert_eq!(reopened.list_devices().await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_missing_directory_is_an_open_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such-dir").join("outpost.db");
    let err = Store::open(&path).await.unwrap_err();
    assert!(matches!(err, StoreError::Open { .. }), "{err}");
    assert!(err.to_string().contains("no-such-dir"), "{err}");
}

#[tokio::test]
async fn calls_run_on_the_store_thread_not_the_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(db_path(&dir)).await.unwrap();
    let caller = std::thread::current().id();
    let (name, id) = store
        .call(|_| {
            let me = std::thread::current();
            Ok((me.name().map(str::to_owned), me.id()))
        })
        .await
        .unwrap();
    assert_eq!(name.as_deref(), Some("outpost-store"));
    assert_ne!(id, caller);
}

#[tokio::test]
async fn handler_state_is_per_handler_within_quota_and_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let store = Store::open(&path).await.unwrap();
    use crate::StateWrite::{QuotaExceeded, Stored};
    assert_eq!(
        store
            .handler_state_set("esp32-app", "last", vec![1; 90], 100)
            .await
            .unwrap(),
        Stored
    );
    // Replacing a value counts only the new one.
    assert_eq!(
        store
            .handler_state_set("esp32-app", "last", vec![2; 96], 100)
            .await
            .unwrap(),
        Stored
    );
    assert_eq!(
        store
            .handler_state_set("esp32-app", "more", vec![0; 1], 100)
            .await
            .unwrap(),
        QuotaExceeded
    );
    assert_eq!(
        store
            .handler_state_set("other", "last", vec![3; 96], 100)
            .await
            .unwrap(),
        Stored
    );
    store.close().await.unwrap();

    let store = Store::open(&path).await.unwrap();
    assert_eq!(
        store.handler_state_get("esp32-app", "last").await.unwrap(),
        Some(vec![2; 96])
    );
    assert_eq!(
        store.handler_state_get("esp32-app", "more").await.unwrap(),
        None
    );
    assert_eq!(
        store.handler_state_get("other", "last").await.unwrap(),
        Some(vec![3; 96])
    );
    store
        .handler_state_delete("esp32-app", "last")
        .await
        .unwrap();
    store
        .handler_state_delete("esp32-app", "never-set")
        .await
        .unwrap();
    assert_eq!(
        store.handler_state_get("esp32-app", "last").await.unwrap(),
        None
    );
    assert_eq!(
        store
            .handler_state_set("esp32-app", "more", vec![0; 1], 100)
            .await
            .unwrap(),
        Stored
    );
}
