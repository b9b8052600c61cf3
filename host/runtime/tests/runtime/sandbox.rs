//! The sandbox's limits, proved against a real guest built from `plugins/` for
//! wasm32-wasip2: each misbehaviour is stopped as what it is, and the very next call into
//! the same handler answers normally.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outpost_runtime::{
    Artifact, CallError, Device, DeviceReport, Handler, LoadError, Outcome, ReportVerdict, Runtime,
    RuntimeConfig, Services, Step, TrapKind, Update,
};

use crate::support::{hostile_wasm, services, services_with};

fn device(id: &str) -> Device {
    Device {
        id: id.into(),
        device_type: "hostile-device".into(),
        properties: vec![("manufacturer".into(), "Contoso".into())],
        firmware_version: Some("1.0.0".into()),
    }
}

fn update(files: Vec<Artifact>) -> Update {
    Update {
        provider: "contoso".into(),
        name: "firmware".into(),
        version: "2.0.0".into(),
        files,
        handler_properties: "{}".into(),
    }
}

fn setup(config: RuntimeConfig) -> (Runtime, Handler) {
    let runtime = Runtime::new(config).unwrap();
    let handler = runtime.load("hostile", hostile_wasm()).unwrap();
    (runtime, handler)
}

async fn is_installed(
    runtime: &Runtime,
    handler: &Handler,
    id: &str,
) -> Result<Outcome, CallError> {
    runtime
        .step(
            handler,
            &services(),
            Step::IsInstalled,
            &device(id),
            &update(vec![]),
        )
        .await
}

/// The call right after a failure must answer normally.
async fn assert_still_answers(runtime: &Runtime, handler: &Handler) {
    let outcome = is_installed(runtime, handler, "ok")
        .await
        .unwrap_or_else(|err| panic!("the next call failed: {err}"));
    assert_eq!(
        (outcome.result_code, outcome.details.as_str()),
        (901, "not installed")
    );
}

fn expect_trap(result: Result<Outcome, CallError>, kind: &TrapKind) -> CallError {
    let err = result.expect_err("the misbehaving call succeeded");
    assert_eq!(err.trap_kind(), Some(kind), "{err}");
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_reports_the_handler() {
    let (runtime, handler) = setup(RuntimeConfig::default());
    let info = runtime.describe(&handler, &services()).await.unwrap();
    assert_eq!(info.name, "hostile");
    assert_eq!(info.device_types, ["hostile-device"]);
    assert_eq!(info.requested_limits.memory_mib, 64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_receive_the_device_and_update() {
    let (runtime, handler) = setup(RuntimeConfig::default());
    let outcome = is_installed(&runtime, &handler, "echo").await.unwrap();
    assert_eq!(outcome.result_code, 901);
    assert_eq!(
        outcome.details,
        r#"echo hostile-device [("manufacturer", "Contoso")] Some("1.0.0") firmware@2.0.0 files=0 props={}"#
    );
    let verdict = runtime
        .interpret_report(
            &handler,
            &services(),
            &device("echo"),
            &update(vec![]),
            &DeviceReport {
                kind: "progress".into(),
                payload: b"50".to_vec(),
            },
        )
        .await
        .unwrap();
    assert!(matches!(verdict, ReportVerdict::Ignored));
}

/// The no_std guest (`plugins/test-handlers/small`), which handler-bench measures: a
/// working handler that imports nothing from WASI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_small_no_std_guest_is_a_working_handler_without_wasi() {
    let wasm = std::fs::read(outpost_test_guests::SMALL).expect("the small guest is built");
    let engine = wasmtime::Engine::default();
    let component = wasmtime::component::Component::new(&engine, &wasm).expect("a component");
    let imports: Vec<String> = component
        .component_type()
        .imports(&engine)
        .map(|(name, _)| name.to_owned())
        .collect();
    assert!(
        imports
            .iter()
            .all(|name| name.starts_with("outpost:handler/")),
        "the small guest imports {imports:?}"
    );

    let runtime = Runtime::new(RuntimeConfig::default()).unwrap();
    let handler = runtime.load("small", &wasm).unwrap();
    let services = Services::closed();
    let info = runtime.describe(&handler, &services).await.unwrap();
    assert_eq!(
        (info.name.as_str(), info.device_types),
        ("small", vec!["small-device".to_owned()])
    );
    let mut on_device = device("esp-small");
    let update = update(vec![]);
    let steps = [
        (Step::IsInstalled, 901),
        (Step::Download, 500),
        (Step::Install, 600),
        (Step::Apply, 700),
        (Step::Cancel, 800),
        (Step::Rollback, 1100),
    ];
    for (step, code) in steps {
        let outcome = runtime
            .step(&handler, &services, step, &on_device, &update)
            .await
            .unwrap();
        assert_eq!(outcome.result_code, code, "{step:?}: {outcome:?}");
    }
    on_device.firmware_version = Some(update.version.clone());
    let outcome = runtime
        .step(&handler, &services, Step::IsInstalled, &on_device, &update)
        .await
        .unwrap();
    assert_eq!(outcome.result_code, 900);

    let report = |kind: &str, payload: &str| DeviceReport {
        kind: kind.into(),
        payload: payload.as_bytes().to_vec(),
    };
    let verdict = |report| {
        let (runtime, handler, services, on_device, update) =
            (&runtime, &handler, &services, &on_device, &update);
        async move {
            runtime
                .interpret_report(handler, services, on_device, update, &report)
                .await
                .unwrap()
        }
    };
    assert!(matches!(
        verdict(report("done", &update.version)).await,
        ReportVerdict::Finished(Outcome {
            result_code: 700,
            ..
        })
    ));
    assert!(matches!(
        verdict(report("done", "0.0.1")).await,
        ReportVerdict::Finished(Outcome { result_code: 0, .. })
    ));
    assert!(matches!(
        verdict(report("progress", "40")).await,
        ReportVerdict::Ignored
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spinning_handler_is_stopped_within_a_second_of_its_cpu_deadline() {
    let config = RuntimeConfig::default();
    let deadline = config.cpu_time;
    let (runtime, handler) = setup(config);
    let started = Instant::now();
    expect_trap(
        is_installed(&runtime, &handler, "loop").await,
        &TrapKind::CpuDeadline,
    );
    let took = started.elapsed();
    assert!(took >= deadline / 2, "stopped before its budget: {took:?}");
    assert!(
        took < deadline + Duration::from_secs(1),
        "stopped late: {took:?}"
    );
    assert_still_answers(&runtime, &handler).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_bomb_is_trapped_at_the_limit() {
    let (runtime, handler) = setup(RuntimeConfig::default());
    let err = expect_trap(
        is_installed(&runtime, &handler, "memory-bomb").await,
        &TrapKind::MemoryLimit,
    );
    assert!(err.to_string().contains("memory limit of 64 MiB"), "{err}");
    assert_still_answers(&runtime, &handler).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runaway_recursion_is_a_stack_overflow() {
    let (runtime, handler) = setup(RuntimeConfig::default());
    expect_trap(
        is_installed(&runtime, &handler, "recursion").await,
        &TrapKind::StackOverflow,
    );
    assert_still_answers(&runtime, &handler).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_is_a_trap_carrying_the_message() {
    let (runtime, handler) = setup(RuntimeConfig::default());
    let err = expect_trap(
        is_installed(&runtime, &handler, "panic").await,
        &TrapKind::Panic,
    );
    assert!(
        err.stderr().contains("hostile handler panicked on purpose"),
        "stderr: {}",
        err.stderr()
    );
    assert_still_answers(&runtime, &handler).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_wait_that_never_ends_is_cut_by_the_wall_clock() {
    let config = RuntimeConfig {
        wall_time: Duration::from_secs(2),
        max_device_wait: Duration::from_secs(3600),
        ..RuntimeConfig::default()
    };
    let (runtime, handler) = setup(config);
    let started = Instant::now();
    let err = is_installed(&runtime, &handler, "wait-forever")
        .await
        .unwrap_err();
    assert!(matches!(err, CallError::WallClock { .. }), "{err}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(4),
        "{took:?}"
    );
    assert_still_answers(&runtime, &handler).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_waits_are_capped_and_reported_to_the_handler() {
    let config = RuntimeConfig {
        max_device_wait: Duration::from_millis(200),
        ..RuntimeConfig::default()
    };
    let (runtime, handler) = setup(config);
    let outcome = is_installed(&runtime, &handler, "wait-forever")
        .await
        .unwrap();
    assert_eq!(
        (outcome.result_code, outcome.details.as_str()),
        (0, "ChannelError::Timeout")
    );
}

/// Counts the events the runtime logs on behalf of handlers.
#[derive(Clone, Default)]
struct Counter {
    handler_events: Arc<AtomicUsize>,
    warnings: Arc<Mutex<Vec<String>>>,
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Counter {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if event.metadata().target() == "outpost::handler" {
            self.handler_events.fetch_add(1, Ordering::Relaxed);
        }
        if *event.metadata().level() == tracing::Level::WARN {
            struct Message(String);
            impl tracing::field::Visit for Message {
                fn record_debug(
                    &mut self,
                    field: &tracing::field::Field,
                    value: &dyn std::fmt::Debug,
                ) {
                    if field.name() == "message" {
                        self.0 = format!("{value:?}");
                    }
                }
            }
            let mut message = Message(String::new());
            event.record(&mut message);
            self.warnings.lock().unwrap().push(message.0);
        }
    }
}

#[test]
fn a_log_flood_is_bounded_and_counted() {
    use tracing_subscriber::layer::SubscriberExt;
    let counter = Counter::default();
    let subscriber = tracing_subscriber::registry().with(counter.clone());
    // A current-thread runtime keeps every event of the call on this thread's subscriber.
    let _guard = tracing::subscriber::set_default(subscriber);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let config = RuntimeConfig {
        cpu_time: Duration::from_secs(30),
        ..RuntimeConfig::default()
    };
    let (log_lines, output_limit) = (config.log_lines as usize, config.output_limit);
    let (runtime, handler) = setup(config);
    rt.block_on(async {
        let outcome = is_installed(&runtime, &handler, "log-flood")
            .await
            .unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(outcome.details, "survived the flood");
    });
    let events = counter.handler_events.load(Ordering::Relaxed);
    // Log lines within the budget, plus at most one event per captured stderr line
    // (each line is at least 20 bytes).
    assert!(events >= log_lines, "only {events} events");
    assert!(
        events <= log_lines + output_limit / 20,
        "{events} events: the flood was not bounded"
    );
    let warnings = counter.warnings.lock().unwrap().join("\n");
    assert!(warnings.contains("exceeded its log budget"), "{warnings}");
    assert!(
        warnings.contains("more than the output limit"),
        "{warnings}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_persists_across_calls_within_its_quota() {
    let (runtime, handler) = setup(RuntimeConfig::default());
    let services = services_with(HashMap::new(), 1000);
    let call = |id: &'static str| {
        let (runtime, handler, services) = (&runtime, &handler, services.clone());
        async move {
            runtime
                .step(
                    handler,
                    &services,
                    Step::IsInstalled,
                    &device(id),
                    &update(vec![]),
                )
                .await
                .unwrap()
        }
    };
    assert_eq!(call("state:500").await.details, "stored 500 (had 0)");
    assert_eq!(call("state:600").await.details, "stored 600 (had 500)");
    let refused = call("state:2000").await;
    assert_eq!(
        (refused.result_code, refused.details.as_str()),
        (0, "StateError::QuotaExceeded (had 600)")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifacts_are_read_in_bounded_chunks() {
    let firmware: Vec<u8> = (0..200_000u32).map(|n| (n % 251) as u8).collect();
    let file_id = "ab".repeat(32);
    let services = services_with(HashMap::from([(file_id.clone(), firmware.clone())]), 4096);
    let (runtime, handler) = setup(RuntimeConfig::default());
    let files = vec![Artifact {
        file_id,
        name: "app.bin".into(),
        size: firmware.len() as u64,
    }];
    let outcome = runtime
        .step(
            &handler,
            &services,
            Step::IsInstalled,
            &device("artifact"),
            &update(files),
        )
        .await
        .unwrap();
    let sum = firmware
        .iter()
        .fold(0u64, |s, b| s.wrapping_mul(31).wrapping_add(u64::from(*b)));
    assert_eq!(
        outcome.details,
        format!("read {} bytes, sum {sum}", firmware.len())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_beyond_the_instance_bound_wait_their_turn() {
    let config = RuntimeConfig {
        max_instances: 2,
        ..RuntimeConfig::default()
    };
    let (runtime, handler) = setup(config);
    let runtime = Arc::new(runtime);
    let calls: Vec<_> = (0..12)
        .map(|_| {
            let (runtime, handler) = (Arc::clone(&runtime), handler.clone());
            tokio::spawn(async move { is_installed(&runtime, &handler, "ok").await })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap().result_code, 901);
    }
}

#[test]
fn loading_refuses_what_is_not_a_handler_component() {
    let runtime = Runtime::new(RuntimeConfig::default()).unwrap();
    let load = |bytes: &[u8]| runtime.load("bad", bytes).unwrap_err();

    assert!(matches!(load(b"#!/bin/sh\nrm -rf /\n"), LoadError::NotWasm));
    let core = wat::parse_str("(module (func (export \"is-installed\")))").unwrap();
    assert!(
        matches!(load(&core), LoadError::CoreModule),
        "{}",
        load(&core)
    );

    let foreign_import = wat::parse_str(
        r#"(component (import "outpost:handler/firmware-flasher@0.1.0" (instance (export "flash" (func)))))"#,
    )
    .unwrap();
    let err = load(&foreign_import);
    assert!(matches!(err, LoadError::UnsupportedImport(_)), "{err}");
    assert!(err.to_string().contains("firmware-flasher"), "{err}");

    let future_wit = wat::parse_str(
        r#"(component (import "outpost:handler/log@0.9.0" (instance (export "write" (func)))))"#,
    )
    .unwrap();
    assert!(
        matches!(load(&future_wit), LoadError::UnsupportedImport(_)),
        "{}",
        load(&future_wit)
    );

    let no_exports = wat::parse_str("(component)").unwrap();
    assert!(
        matches!(load(&no_exports), LoadError::WrongExports(_)),
        "{}",
        load(&no_exports)
    );

    // The interface with every export, each of the wrong type: refused when loaded, not
    // at each call.
    let exports: String = [
        "describe",
        "is-installed",
        "download",
        "install",
        "apply",
        "cancel",
        "rollback",
        "interpret-report",
    ]
    .iter()
    .map(|name| format!(r#"(export "{name}" (func $f))"#))
    .collect();
    let mistyped = |exports: &str| {
        wat::parse_str(format!(
            r#"(component
                (core module $m (func (export "f")))
                (core instance $i (instantiate $m))
                (func $f (canon lift (core func $i "f")))
                (instance $h {exports})
                (export "outpost:handler/handler@0.1.0" (instance $h)))"#
        ))
        .unwrap()
    };
    let err = load(&mistyped(&exports));
    assert!(matches!(err, LoadError::WrongExports(_)), "{err}");
    assert!(
        err.to_string()
            .contains("the export `describe` does not have the WIT's type"),
        "{err}"
    );
    let err = load(&mistyped(r#"(export "describe" (func $f))"#));
    assert!(matches!(err, LoadError::WrongExports(_)), "{err}");
    assert!(
        err.to_string().contains("has no export `is-installed`"),
        "{err}"
    );

    let mut truncated = hostile_wasm().to_vec();
    truncated.truncate(truncated.len() / 2);
    assert!(
        matches!(load(&truncated), LoadError::Invalid(_)),
        "{}",
        load(&truncated)
    );
}

/// A state backend whose disk has failed.
struct BrokenState;

impl outpost_runtime::StateStore for BrokenState {
    fn get<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
    ) -> outpost_runtime::BoxFuture<'a, Result<Option<Vec<u8>>, outpost_runtime::StateError>> {
        Box::pin(async { Ok(None) })
    }

    fn set<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
        _: Vec<u8>,
    ) -> outpost_runtime::BoxFuture<'a, Result<(), outpost_runtime::StateError>> {
        Box::pin(async {
            Err(outpost_runtime::StateError::Backend(
                "disk I/O error".into(),
            ))
        })
    }

    fn delete<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
    ) -> outpost_runtime::BoxFuture<'a, Result<(), outpost_runtime::StateError>> {
        Box::pin(async { Ok(()) })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_state_backend_fails_the_call_instead_of_losing_the_write() {
    let (runtime, handler) = setup(RuntimeConfig::default());
    let services = Services {
        state: Arc::new(BrokenState),
        ..services()
    };
    let err = runtime
        .step(
            &handler,
            &services,
            Step::IsInstalled,
            &device("state:10"),
            &update(vec![]),
        )
        .await
        .unwrap_err();
    match err {
        CallError::Host(message) => assert_eq!(
            message,
            "handler state: state backend failed: disk I/O error"
        ),
        other => panic!("expected a host failure, got {other}"),
    }
    assert_still_answers(&runtime, &handler).await;
}
