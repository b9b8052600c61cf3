//! A real full disk under the state directory: the state database and the outbox on a
//! small tmpfs in a private mount namespace (root, `unshare` and `nsenter` required; the
//! test fails, never skips, without them).

use std::collections::BTreeSet;

use super::uplink::http;
use super::*;

const ADMIN: &str = "disk-test-admin-token-0123456789";

/// 100 records of about 2 KiB each: one POST adds some 200 KiB to the database.
fn batch(round: usize) -> String {
    let filler = "x".repeat(2000);
    let records: Vec<String> = (0..100)
        .map(|i| format!(r#"{{"round":{round},"i":{i},"filler":"{filler}"}}"#))
        .collect();
    format!("[{}]", records.join(","))
}

fn kill(pid: &str, signal: &str) {
    let status = Command::new("kill").args([signal, pid]).status().unwrap();
    assert!(status.success(), "kill {signal} {pid}");
}

#[test]
fn a_full_state_disk_answers_507_loses_nothing_acknowledged_and_recovers_by_itself() {
    let site = Site::new(&format!(
        "admin_token = \"{ADMIN}\"\n\n[ble]\nenabled = false\n\n\
         [outbox]\nmax_messages = 1000000\nmax_size_mib = 512\n"
    ));
    // The state as it is before the disk fills: one device in the lobby.
    site.seed(vec![NewDevice::new(
        "esp-1",
        "thermostat",
        DeviceState::Claimed,
    )]);
    let prepared = site.dir.path().join("prepared");
    std::fs::rename(site.state(), &prepared).unwrap();
    std::fs::create_dir(site.state()).unwrap();
    let after = site.dir.path().join("after");
    let pid_file = site.dir.path().join("outpost.pid");
    // The database and some room: about three batches fit, not many more.
    let used: u64 = std::fs::read_dir(&prepared)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    let size_kib = used / 1024 + 768;
    let script = format!(
        "set -e; mount -t tmpfs -o size={size_kib}k,mode=0700 outpost-state {state}; \
         cp -a {prepared}/. {state}/; \
         {outpost} --config {config} --log-format json run & \
         echo $! > {pid_file}; set +e; wait $!; rc=$?; \
         mkdir {after}; cp -a {state}/. {after}/; exit $rc",
        state = site.state().display(),
        prepared = prepared.display(),
        outpost = env!("CARGO_BIN_EXE_outpost"),
        config = site.config().display(),
        pid_file = pid_file.display(),
        after = after.display(),
    );
    let mut command = Command::new("unshare");
    command.args(["--mount", "--propagation", "private", "sh", "-c", &script]);
    let mut gateway = Gateway::spawn_command(command);
    let addr = gateway.ready();
    let pid = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .to_owned();

    let (status, json) = http(addr, "POST", "/api/v1/devices/esp-1/credential", ADMIN, "");
    assert_eq!(status, 201, "{json}");
    let device = json["token"].as_str().unwrap().to_owned();
    let telemetry = "/api/v1/devices/esp-1/telemetry";

    // Fill the disk: every batch is acknowledged (202) until one is refused with 507.
    let mut acknowledged = BTreeSet::new();
    let mut refused = None;
    for round in 0..200 {
        let (status, json) = http(addr, "POST", telemetry, &device, &batch(round));
        match status {
            202 => acknowledged.extend(
                json["messageIds"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|id| id.as_str().unwrap().to_owned()),
            ),
            507 => {
                refused = Some(json);
                break;
            }
            other => panic!("round {round}: {other} {json}"),
        }
    }
    let refused = refused.expect("the tmpfs never filled");
    assert!(!acknowledged.is_empty(), "the disk was full from the start");
    assert_eq!(refused["error"]["code"], "disk_full", "{refused}");
    let reason = refused["error"]["message"].as_str().unwrap();
    assert!(
        reason.contains("disk is full") && reason.contains("send it again"),
        "{reason}"
    );
    // The state database answers the same way, never with a 500; reads still work.
    let (status, json) = http(
        addr,
        "POST",
        "/api/v1/devices/esp-1/register",
        &device,
        &format!(r#"{{"properties":{{"note":"{}"}}}}"#, "y".repeat(100_000)),
    );
    assert!(status == 200 || status == 507, "{status} {json}");
    if status == 507 {
        assert_eq!(json["error"]["code"], "disk_full", "{json}");
    }
    let (status, health) = http_get(addr, "/healthz", None);
    assert_eq!(status, 200, "{health}");

    // Space returns: the same gateway takes the next batch by itself.
    let grown = Command::new("nsenter")
        .args([
            "--target",
            &pid,
            "--mount",
            "mount",
            "-o",
            "remount,size=64m",
        ])
        .arg(site.state())
        .status()
        .expect("nsenter (util-linux) is needed for the full-disk test");
    assert!(grown.success());
    let (status, json) = http(addr, "POST", telemetry, &device, &batch(1000));
    assert_eq!(status, 202, "after space returned: {json}");
    acknowledged.extend(
        json["messageIds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|id| id.as_str().unwrap().to_owned()),
    );

    kill(&pid, "-TERM");
    let (status, stderr, _) = gateway.wait();
    assert!(status.success(), "exit {status:?}; stderr:\n{stderr}");
    assert!(stderr.contains("outpost stopped cleanly"), "{stderr}");

    // Every acknowledged record is in the outbox of the database as it was left.
    let database = after.join("outpost.db");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let queued: BTreeSet<String> = runtime.block_on(async move {
        let store = Store::open(database).await.unwrap();
        // Grouped telemetry rows hold many messages: list the messages, not the rows.
        let waiting = outpost_uplink::outbox::waiting(&store).await.unwrap();
        store.close().await.unwrap();
        waiting.into_iter().map(|m| m.message_id).collect()
    });
    let lost: Vec<_> = acknowledged.difference(&queued).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged records lost, e.g. {:?}",
        lost.len(),
        lost.first()
    );
    assert_eq!(
        queued.len(),
        acknowledged.len(),
        "only what was acknowledged"
    );
}
