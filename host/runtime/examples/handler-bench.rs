//! Handler call latency and throughput.
//!
//! ```sh
//! cargo run --release -p outpost-runtime --example handler-bench [-- --wasm FILE ...]
//! ```
//!
//! Beside the small Rust guest it measures the Python handler example (built by the
//! test build with componentize-py, when it could be) and every `--wasm` component given:
//! their first load and their warm instantiate + is-installed.
//!
//! Measures what the gateway pays per handler call: a fresh `Store` with its limits and
//! WASI context, instantiation from the pooling allocator via `InstancePre`, the
//! `is-installed` call, and teardown. Then a sweep of 10,000 devices through the bounded
//! instance pool. Targets (issues #3, #15): median ≤ 10 µs, sweep < 0.3 s. Measured
//! here (2 cores): median 14.8 µs, sweep 0.115 s. Of a call, about a fifth is the slot's
//! reset (a PAGEMAP_SCAN of the written pages, then memset), a fifth wiring the WASI
//! imports into the new instance, and a twentieth the bindings' type checks of all
//! eight exports at every instantiation.

use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_runtime::{Device, Runtime, RuntimeConfig, Services, Step, Update};

/// Calls measured on the small guest (`--calls N` changes it).
const CALLS: usize = 5_000;
const WARMUP: usize = 500;
const SWEEP_DEVICES: usize = 10_000;
/// Calls measured (after warm-up ones) for the other guests, which cost milliseconds.
const OTHER_CALLS: usize = 50;
const OTHER_WARMUP: usize = 5;

fn device(id: String) -> Device {
    Device {
        id,
        device_type: "hostile-device".into(),
        properties: vec![
            ("manufacturer".into(), "Contoso".into()),
            ("model".into(), "T1".into()),
        ],
        firmware_version: Some("1.0.0".into()),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let calls = args
        .iter()
        .position(|a| a == "--calls")
        .and_then(|i| args.get(i + 1))
        .map_or(CALLS, |n| n.parse().expect("--calls N"));
    let wasm = std::fs::read(outpost_test_guests::HOSTILE)
        .expect("the hostile guest is built by the test build");
    let config = RuntimeConfig::default();
    let instances = config.max_instances;
    let runtime = Arc::new(Runtime::new(config).expect("runtime"));
    let started = Instant::now();
    let handler = runtime.load("hostile", &wasm).expect("load");
    let compile = started.elapsed();
    // is-installed on these devices reaches for no service.
    let services = Services::closed();
    let update = Update {
        provider: "contoso".into(),
        name: "fw".into(),
        version: "2.0.0".into(),
        files: vec![],
        handler_properties: "{}".into(),
    };

    let one = device("esp-bench".into());
    for _ in 0..WARMUP {
        runtime
            .step(&handler, &services, Step::IsInstalled, &one, &update)
            .await
            .expect("call");
    }
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t = Instant::now();
        let outcome = runtime
            .step(&handler, &services, Step::IsInstalled, &one, &update)
            .await
            .expect("call");
        samples.push(t.elapsed());
        assert_eq!(outcome.result_code, 901);
    }
    samples.sort();

    let devices: Vec<Device> = (0..SWEEP_DEVICES)
        .map(|n| device(format!("esp-{n:05}")))
        .collect();
    let devices = Arc::new(devices);
    let workers = instances as usize;
    let started = Instant::now();
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let (runtime, handler, services, update, devices) = (
                Arc::clone(&runtime),
                handler.clone(),
                services.clone(),
                update.clone(),
                Arc::clone(&devices),
            );
            tokio::spawn(async move {
                for device in devices.iter().skip(w).step_by(workers) {
                    let outcome = runtime
                        .step(&handler, &services, Step::IsInstalled, device, &update)
                        .await
                        .expect("call");
                    assert_eq!(outcome.result_code, 901);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("sweep task");
    }
    let sweep = started.elapsed();

    println!(
        "handler-bench: is-installed on the hostile test guest ({} KiB), pooling allocator + InstancePre,",
        wasm.len() / 1024
    );
    println!("               a fresh Store, WASI context and limits per call");
    println!("  compile (first load, no cache):  {compile:.2?}");
    println!(
        "  instantiate + call, {calls} calls:   median {:.1} µs   p90 {:.1} µs   p99 {:.1} µs   (target: median ≤ 10 µs)",
        percentile(&samples, 0.5).as_secs_f64() * 1e6,
        percentile(&samples, 0.9).as_secs_f64() * 1e6,
        percentile(&samples, 0.99).as_secs_f64() * 1e6,
    );
    println!(
        "  sweep of {SWEEP_DEVICES} devices, {workers} instances: {:.3} s ({:.0} calls/s)   (target: < 0.3 s)",
        sweep.as_secs_f64(),
        SWEEP_DEVICES as f64 / sweep.as_secs_f64()
    );

    // Other guests: the Python example and any component named with --wasm.
    let mut others: Vec<(String, String)> = Vec::new();
    if !outpost_test_guests::PYTHON_EXAMPLE.is_empty() {
        others.push((
            "python-example (componentize-py)".into(),
            outpost_test_guests::PYTHON_EXAMPLE.into(),
        ));
    } else {
        println!(
            "  python-example: not built ({})",
            outpost_test_guests::PYTHON_EXAMPLE_MISSING
        );
    }
    let mut given = args.iter();
    while let Some(arg) = given.next() {
        match (arg.as_str(), given.next()) {
            ("--wasm", Some(path)) => others.push((path.clone(), path.clone())),
            ("--calls", Some(_)) => {}
            _ => panic!("usage: handler-bench [--calls N] [--wasm FILE]..."),
        }
    }
    for (name, path) in others {
        let wasm = std::fs::read(&path).unwrap_or_else(|err| panic!("{path}: {err}"));
        let started = Instant::now();
        let handler = runtime.load(&name, &wasm).expect("load");
        let compile = started.elapsed();
        let mut samples = Vec::with_capacity(OTHER_CALLS);
        for i in 0..OTHER_WARMUP + OTHER_CALLS {
            let t = Instant::now();
            runtime
                .step(&handler, &services, Step::IsInstalled, &one, &update)
                .await
                .expect("call");
            if i >= OTHER_WARMUP {
                samples.push(t.elapsed());
            }
        }
        samples.sort();
        println!(
            "  {name} ({} KiB): compile {compile:.2?}; warm instantiate + call, {OTHER_CALLS} calls: \
             median {:.2} ms   p90 {:.2} ms",
            wasm.len() / 1024,
            percentile(&samples, 0.5).as_secs_f64() * 1e3,
            percentile(&samples, 0.9).as_secs_f64() * 1e3,
        );
    }
    println!("rerun: cargo run --release -p outpost-runtime --example handler-bench");
}
