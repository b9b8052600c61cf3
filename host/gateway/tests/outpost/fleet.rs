//! A fleet on a clustered broker: 100 `outpost run` gateways x 20 devices on a 3-node NATS
//! cluster (Debian `nats-server`: JetStream and its MQTT listener on loopback ports, each
//! node started and killed by pid), cloud-sim as 3 workers sharing one JetStream durable
//! consumer on NATS's `$MQTT_msgs`. One node is killed mid-run and started again, one worker is killed: every
//! record a gateway acknowledged reaches a worker (by distinct message id), and every
//! gateway is connected again within its bound once the cluster takes sessions again (its
//! CONNECT in flight, then its backoff).
//!
//! The harness is `benches/fleet` (`fleet-bench`, also `cargo xtask bench-fleet` in
//! release); here it runs with the debug binaries and this test checks its summary.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn binary(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_outpost")).with_file_name(name);
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build -p cloud-sim -p outpost-fleet-bench` \
         (cargo xtask test does)",
        path.display()
    );
    path
}

#[test]
fn a_hundred_gateways_on_a_nats_cluster_lose_nothing_when_a_node_and_a_worker_die() {
    assert!(
        Path::new("/usr/bin/nats-server").exists() || Path::new("/usr/sbin/nats-server").exists(),
        "nats-server is not installed: apt-get install nats-server (.ci/run and cargo xtask test do)"
    );
    let dir = tempfile::tempdir().unwrap();
    let summary_path = dir.path().join("summary.json");
    let log = dir.path().join("fleet-bench.log");
    let mut child = Command::new(binary("fleet-bench"))
        .arg("--outpost")
        .arg(env!("CARGO_BIN_EXE_outpost"))
        .arg("--cloud-sim")
        .arg(binary("cloud-sim"))
        .args([
            "--gateways",
            "100",
            "--devices",
            "20",
            "--records",
            "5",
            "--workers",
            "3",
            "--faults",
            "--summary",
        ])
        .arg(&summary_path)
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    // Bounded: the harness has deadlines of its own; this one stops it (and with it its
    // nodes, workers and gateways, which die with it) if they fail.
    let end = Instant::now() + Duration::from_secs(900);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "fleet-bench did not finish within 15 minutes:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let printed = std::fs::read_to_string(&log).unwrap_or_default();
    println!("{printed}");
    assert!(
        status.success(),
        "fleet-bench failed ({status}):\n{printed}"
    );
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&summary_path).unwrap()).unwrap();
    // Every device's records were acknowledged, and each reached the backend.
    assert_eq!(summary["acknowledged"], 100 * 20 * 5, "{summary:#}");
    assert_eq!(summary["lost"], 0, "{summary:#}");
    assert_eq!(summary["unknown"], 0, "{summary:#}");
    assert_eq!(summary["received"], summary["acknowledged"], "{summary:#}");
    // The node died with gateways on it, and each of them was connected to another node
    // within its bound once the cluster took sessions again (NATS elects new leaders
    // first): the CONNECT it had in flight, then its backoff.
    let on_node = summary["onKilledNode"].as_u64().unwrap();
    assert!(
        on_node > 0,
        "no gateway was on the killed node: {summary:#}"
    );
    assert_eq!(
        summary["reconnected"].as_u64(),
        Some(on_node),
        "{summary:#}"
    );
    let ready = summary["clusterReadyMs"].as_u64();
    assert!(
        ready.is_some(),
        "the cluster never took sessions again: {summary:#}"
    );
    assert!(
        summary["reconnectAfterReadyMaxMs"].as_u64().unwrap()
            <= summary["reconnectBoundMs"].as_u64().unwrap(),
        "{summary:#}"
    );
    // The killed worker had taken a share before it died, and the two left went on
    // taking records after.
    let killed = summary["killedWorker"].as_str().unwrap();
    let by_worker = summary["byWorker"].as_object().unwrap();
    assert!(by_worker[killed].as_u64().unwrap() > 0, "{summary:#}");
    let after = summary["byWorkerAfterKill"].as_object().unwrap();
    for worker in by_worker.keys().filter(|w| *w != killed) {
        assert!(
            after.get(worker).and_then(serde_json::Value::as_u64) > Some(0),
            "{worker} took nothing after {killed} died: {summary:#}"
        );
    }
    assert!(
        summary["workerErrors"].as_array().unwrap().is_empty(),
        "{summary:#}"
    );
}
