//! One call into a handler: a fresh `Store` with its limits, the deadlines, and the
//! translation of whatever happened into a result or a [`CallError`].

use std::collections::HashSet;
use std::sync::Arc;

use wasmtime::component::HasSelf;
use wasmtime::{Store, Trap, UpdateDeadline};
use wasmtime_wasi::WasiCtxBuilder;

use crate::bindings::UpdateHandler;
use crate::exports::Exports;
use crate::host::{CallScope, HostState, MemoryLimiter};
use crate::output::BoundedOutput;
use crate::{
    CallError, Device, DeviceReport, Handler, HandlerInfo, Outcome, ReportVerdict, Runtime,
    Services, Step, TrapKind, Update,
};

/// What to call.
pub(crate) enum Request<'a> {
    Describe,
    Step(Step, &'a Device, &'a Update),
    Report(&'a Device, &'a Update, &'a DeviceReport),
}

impl Request<'_> {
    fn name(&self) -> &'static str {
        match self {
            Self::Describe => "describe",
            Self::Step(step, ..) => step.name(),
            Self::Report(..) => "interpret-report",
        }
    }

    fn device_id(&self) -> &str {
        match self {
            Self::Describe => "-",
            Self::Step(_, device, _) | Self::Report(device, ..) => &device.id,
        }
    }

    fn files(&self) -> HashSet<String> {
        match self {
            Self::Describe => HashSet::new(),
            Self::Step(_, _, update) | Self::Report(_, update, _) => {
                update.files.iter().map(|f| f.file_id.clone()).collect()
            }
        }
    }
}

/// What came back.
pub(crate) enum Response {
    Info(HandlerInfo),
    Outcome(Outcome),
    Verdict(ReportVerdict),
}

pub(crate) fn link(linker: &mut wasmtime::component::Linker<HostState>) -> wasmtime::Result<()> {
    wasmtime_wasi::p2::add_to_linker_async(linker)?;
    UpdateHandler::add_to_linker::<HostState, HasSelf<HostState>>(linker, |state| state)
}

impl Runtime {
    /// Runs one call and counts it for `/metrics`.
    pub(crate) async fn invoke(
        &self,
        handler: &Handler,
        services: &Services,
        request: Request<'_>,
    ) -> Result<Response, CallError> {
        let export = request.name();
        let started = std::time::Instant::now();
        let result = self.invoke_unmetered(handler, services, request).await;
        let handler = handler.name().to_owned();
        let outcome = match &result {
            Ok(_) => "ok",
            Err(CallError::Trap { kind, .. }) => {
                metrics::counter!(crate::metrics::TRAPS, "handler" => handler.clone(), "kind" => kind.to_string())
                    .increment(1);
                "trap"
            }
            Err(CallError::WallClock { .. }) => "wall-clock",
            Err(_) => "host",
        };
        metrics::counter!(crate::metrics::CALLS, "handler" => handler.clone(), "export" => export, "result" => outcome)
            .increment(1);
        metrics::histogram!(crate::metrics::DURATION, "handler" => handler)
            .record(started.elapsed().as_secs_f64());
        result
    }

    async fn invoke_unmetered(
        &self,
        handler: &Handler,
        services: &Services,
        request: Request<'_>,
    ) -> Result<Response, CallError> {
        let config = &self.config;
        let (handler_name, pre, limits) = (handler.name(), &handler.pre, handler.limits());
        let _slot = Arc::clone(&self.slots)
            .acquire_owned()
            .await
            .map_err(|_| CallError::Host("the handler runtime is shutting down".into()))?;

        let stdout = BoundedOutput::new(config.output_limit);
        let stderr = BoundedOutput::new(config.output_limit);
        // No preopens, no environment, no arguments, no network: the defaults, spelled out
        // where they are not.
        let wasi = WasiCtxBuilder::new()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let state = HostState {
            wasi,
            table: wasmtime::component::ResourceTable::new(),
            limiter: MemoryLimiter {
                limit: usize::try_from(limits.memory).unwrap_or(usize::MAX),
                refused: None,
            },
            cpu_ticks: 0,
            host_failure: None,
            scope: CallScope {
                handler: handler_name.to_owned(),
                device_id: request.device_id().to_owned(),
                files: request.files(),
                services: services.clone(),
                max_device_wait: config.max_device_wait,
                log_lines_left: config.log_lines,
                log_bytes_left: config.log_bytes,
                log_dropped: 0,
            },
        };
        // The epoch advances only while some call runs; start it before the deadline is
        // set, keep it until the store is done.
        // A handler exists only once its runtime's core does; this cannot fail.
        let core = self
            .core()
            .map_err(|err| CallError::Host(err.to_string()))?;
        let _ticking = core.ticker.running();
        let mut store = Store::new(&core.engine, state);
        store.limiter(|state| &mut state.limiter);
        // Each tick the guest runs costs one tick of its budget; between ticks it yields to
        // the async runtime so the wall-clock timeout and other tasks get their turn.
        let cpu_ticks =
            (limits.cpu_time.as_micros() / config.epoch_tick.as_micros().max(1)).max(1) as u64;
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |mut ctx| {
            let used = &mut ctx.data_mut().cpu_ticks;
            *used += 1;
            Ok(if *used >= cpu_ticks {
                UpdateDeadline::Interrupt
            } else {
                UpdateDeadline::Yield(1)
            })
        });

        let name = request.name();
        let run = async {
            let instance = pre.instantiate_async(&mut store).await?;
            call_export(&handler.exports, instance, &mut store, request).await
        };
        let outcome = tokio::time::timeout(config.wall_time, run).await;

        let (stderr_text, stderr_dropped) = stderr.contents();
        let (stdout_text, stdout_dropped) = stdout.contents();
        let state = store.data();
        let scope = &state.scope;
        forward_output(scope, "stdout", &stdout_text, stdout_dropped);
        forward_output(scope, "stderr", &stderr_text, stderr_dropped);
        if scope.log_dropped > 0 {
            tracing::warn!(
                handler = %scope.handler,
                device = %scope.device_id,
                dropped = scope.log_dropped,
                "the handler exceeded its log budget; lines were dropped"
            );
        }

        let result = match outcome {
            Err(_elapsed) => Err(CallError::WallClock {
                limit: config.wall_time,
                stderr: stderr_text,
            }),
            Ok(Ok(response)) => Ok(response),
            Ok(Err(err)) => Err(classify(&err, state, stderr_text)),
        };
        match &result {
            Ok(_) => tracing::debug!(
                handler = handler_name,
                call = name,
                cpu_ticks = state.cpu_ticks,
                "handler call done"
            ),
            Err(err) => tracing::warn!(
                handler = handler_name,
                device = %scope.device_id,
                call = name,
                error = %err,
                "handler call failed"
            ),
        }
        result
    }
}

async fn call_export(
    exports: &Exports,
    instance: wasmtime::component::Instance,
    store: &mut Store<HostState>,
    request: Request<'_>,
) -> wasmtime::Result<Response> {
    Ok(match request {
        Request::Describe => Response::Info(exports.describe(store, instance).await?),
        Request::Report(device, update, report) => Response::Verdict(
            exports
                .interpret_report(store, instance, device, update, report)
                .await?,
        ),
        Request::Step(step, device, update) => {
            Response::Outcome(exports.step(store, instance, step, device, update).await?)
        }
    })
}

fn classify(err: &wasmtime::Error, state: &HostState, stderr: String) -> CallError {
    if let Some(failure) = &state.host_failure {
        return CallError::Host(failure.clone());
    }
    let message = format!("{err:?}");
    let kind = if state.limiter.refused.is_some() {
        TrapKind::MemoryLimit
    } else {
        match err.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => TrapKind::CpuDeadline,
            Some(Trap::StackOverflow) => TrapKind::StackOverflow,
            Some(Trap::UnreachableCodeReached) if stderr.contains("panicked") => TrapKind::Panic,
            // Rust guests keep a shadow stack in linear memory; runaway recursion with
            // large frames exhausts it before the wasm stack and lands out of bounds.
            Some(trap) => TrapKind::Other(format!("{trap}")),
            None => TrapKind::Other("error".into()),
        }
    };
    CallError::Trap {
        kind,
        message,
        stderr,
    }
}

/// Hands the guest's output to the log, one event per line, with who wrote it.
fn forward_output(scope: &CallScope, stream: &'static str, text: &str, dropped: u64) {
    for line in text.lines().filter(|line| !line.trim().is_empty()) {
        tracing::info!(
            target: "outpost::handler",
            handler = %scope.handler,
            device = %scope.device_id,
            stream,
            "{line}"
        );
    }
    if dropped > 0 {
        tracing::warn!(
            handler = %scope.handler,
            device = %scope.device_id,
            stream,
            dropped_bytes = dropped,
            "the handler wrote more than the output limit; the rest was dropped"
        );
    }
}
