//! A fleet on a clustered broker: 100 `outpost run` gateways x 20 devices on a 3-node NATS
//! cluster (Debian `nats-server`: JetStream and its MQTT listener on loopback ports, each
//! node started and killed by pid), cloud-sim as 3 workers sharing one JetStream durable
//! consumer. One node is killed mid-run and started again, one worker is killed: every
//! record a gateway acknowledged reaches a worker (by distinct message id), and every
//! gateway is connected again within its backoff bound.
//!
//! The harness is `benches/fleet` (`fleet-bench`, also `cargo xtask bench-fleet` in
//! release); here it runs with the debug binaries and this test checks its summary.

use std::path::{Path, PathBuf};
use std::process::Command;

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
    let output = Command::new(binary("fleet-bench"))
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
        .output()
        .unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{printed}");
    assert!(output.status.success(), "fleet-bench failed:\n{printed}");
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&summary_path).unwrap()).unwrap();
    // Every device's records were acknowledged, and each reached the backend.
    assert_eq!(summary["acknowledged"], 100 * 20 * 5, "{summary:#}");
    assert_eq!(summary["lost"], 0, "{summary:#}");
    assert_eq!(summary["unknown"], 0, "{summary:#}");
    assert_eq!(summary["received"], summary["acknowledged"], "{summary:#}");
    // The faults happened, and every gateway of the killed node came back in time.
    assert_eq!(summary["killedNode"], "n1", "{summary:#}");
    assert_eq!(summary["killedWorker"], "w1", "{summary:#}");
    let reconnected = summary["reconnected"].as_u64().unwrap();
    assert!(reconnected >= 33, "{summary:#}");
    assert!(
        summary["reconnectMaxMs"].as_u64().unwrap() <= summary["backoffMaxMs"].as_u64().unwrap(),
        "{summary:#}"
    );
    // Each of the three workers took a share while it lived.
    let by_worker = summary["byWorker"].as_object().unwrap();
    assert_eq!(by_worker.len(), 3, "{summary:#}");
    assert!(
        summary["workerErrors"].as_array().unwrap().is_empty(),
        "{summary:#}"
    );
}
