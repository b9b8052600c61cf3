//! The sandbox for vendor update handlers.
//!
//! A handler is a WASI Preview 2 component exporting the `outpost:handler@0.1.0` world
//! (`wit/outpost-handler-0.1.0`). The gateway loads it once ([`Runtime::load`]: compile,
//! check its imports and exports, pre-instantiate) and then calls it per device and step,
//! each call in a fresh `Store` under hard limits:
//!
//! * **memory**: a per-call cap on linear memory (default 64 MiB), over a pooling
//!   allocator sized for [`RuntimeConfig::max_instances`];
//! * **CPU**: epoch interruption with a 10 ms tick; a call may run for
//!   [`RuntimeConfig::cpu_time`] of guest execution, yielding to the async runtime each
//!   tick, and is interrupted past it;
//! * **wall clock**: an outer timeout that also covers time parked in host calls (a
//!   device that never answers);
//! * **stack**: deep recursion traps;
//! * **capabilities**: no filesystem, no sockets, no environment; stdout and stderr are
//!   captured into bounded buffers and forwarded to the log with the handler and device
//!   ids; the log import has a per-call budget.
//!
//! A trap becomes a [`CallError`] carrying its [`TrapKind`] and the guest's stderr; the
//! store is dropped and the next call starts clean.
//!
//! ```no_run
//! # async fn demo(wasm: &[u8], services: outpost_runtime::Services, device: outpost_runtime::Device,
//! #               update: outpost_runtime::Update) -> Result<(), Box<dyn std::error::Error>> {
//! use outpost_runtime::{Runtime, RuntimeConfig, Step};
//!
//! let runtime = Runtime::new(RuntimeConfig::default())?;
//! let handler = runtime.load("esp32-app", wasm)?;
//! let outcome = runtime.step(&handler, &services, Step::IsInstalled, &device, &update).await?;
//! println!("{} {}", outcome.result_code, outcome.details);
//! # Ok(()) }
//! ```

mod bindings;
mod cache;
mod call;
mod compiler;
mod engine;
mod error;
mod exports;
mod host;
pub mod metrics;
mod output;
pub mod package;
mod registry;
mod services;

use std::sync::Arc;

use tokio::sync::Semaphore;
use wasmtime::Engine;
use wasmtime::component::{Component, Linker};

pub use bindings::outpost::handler::types::{
    Artifact, Device, DeviceReport, HandlerInfo, Limits, Outcome, ReportVerdict, Update,
};
pub use cache::CacheOutcome;
pub use compiler::{COMPILE_REFUSED, Compiler, compile_entry};
pub use engine::RuntimeConfig;
pub use error::{CallError, LoadError, RuntimeError, SUMMARY_MAX, TrapKind, truncate};
pub use registry::{
    HandlerRegistry, HandlerState, HandlerSummary, InstallError, InstalledHandler, check_package,
};
pub use services::{
    ArtifactSource, BoxFuture, ChannelError, DeviceChannel, MAX_KEY_LEN, MemoryState, ReadError,
    Services, StateError, StateStore,
};

use call::{Request, Response};
use exports::Exports;
use host::HostState;

/// The WIT package versions this runtime offers handlers.
pub const WIT_VERSIONS: &[&str] = &["outpost:handler@0.1.0"];

/// A handler step with an ADU-style outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Step {
    /// 9xx: is the update already on the device?
    IsInstalled,
    /// 5xx: prepare the files.
    Download,
    /// 6xx: install them.
    Install,
    /// 7xx: switch to the new version.
    Apply,
    /// 8xx: stop an update in progress.
    Cancel,
    /// 11xx: return to the previous version.
    Rollback,
}

impl Step {
    /// The export's WIT name.
    pub const fn name(self) -> &'static str {
        match self {
            Self::IsInstalled => "is-installed",
            Self::Download => "download",
            Self::Install => "install",
            Self::Apply => "apply",
            Self::Cancel => "cancel",
            Self::Rollback => "rollback",
        }
    }
}

/// The handler host: one engine, one linker, a bound on instances running at once.
///
/// The engine, its epoch ticker and the linker are set up once: at once by
/// [`new`](Self::new), or by [`deferred`](Self::deferred) when the first handler loads. A
/// gateway with no handler installed never maps wasmtime's and Cranelift's code (1.8 MB of
/// an idle gateway's resident set, measured on x86_64) nor runs the ticker thread.
pub struct Runtime {
    config: RuntimeConfig,
    slots: Arc<Semaphore>,
    core: std::sync::OnceLock<Core>,
    /// Held while the core is built, so two first loads build it once.
    building: std::sync::Mutex<()>,
}

/// What a runtime sets up once: the engine, its ticker, the linker with the host imports.
struct Core {
    engine: Engine,
    linker: Linker<HostState>,
    ticker: engine::EpochTicker,
}

impl Core {
    fn build(config: &RuntimeConfig) -> Result<Self, RuntimeError> {
        let engine = engine::build_engine(config)?;
        let ticker = engine::EpochTicker::start(&engine, config.epoch_tick)?;
        let mut linker = Linker::new(&engine);
        call::link(&mut linker).map_err(|err| RuntimeError::Linker(format!("{err:#}")))?;
        Ok(Self {
            engine,
            linker,
            ticker,
        })
    }
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// A loaded handler, ready to instantiate. Cheap to clone; calls in flight keep the
/// version they started with when a new one replaces it.
#[derive(Clone)]
pub struct Handler {
    name: Arc<str>,
    pre: wasmtime::component::InstancePre<HostState>,
    exports: Exports,
    limits: CallLimits,
}

/// The limits one handler's calls run under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallLimits {
    /// Linear memory per call, bytes.
    pub memory: u64,
    /// Guest CPU time per call.
    pub cpu_time: std::time::Duration,
}

impl std::fmt::Debug for Handler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handler")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Handler {
    /// The name it was loaded under.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The limits its calls run under.
    pub fn limits(&self) -> CallLimits {
        self.limits
    }
}

impl Runtime {
    /// Sets up the engine, the epoch ticker and the linker with the host imports now, so
    /// a refusal shows at once.
    pub fn new(config: RuntimeConfig) -> Result<Self, RuntimeError> {
        let runtime = Self::deferred(config);
        runtime.core()?;
        Ok(runtime)
    }

    /// A runtime that sets up its engine, ticker and linker when the first handler loads
    /// (or [`engine`](Self::engine) is asked for); a refusal then fails that load with
    /// [`LoadError::Setup`], and the next load tries again.
    pub fn deferred(config: RuntimeConfig) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(config.max_instances.max(1) as usize)),
            config,
            core: std::sync::OnceLock::new(),
            building: std::sync::Mutex::new(()),
        }
    }

    /// The core, built on first use.
    fn core(&self) -> Result<&Core, RuntimeError> {
        if let Some(core) = self.core.get() {
            return Ok(core);
        }
        let _building = self
            .building
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(core) = self.core.get() {
            return Ok(core);
        }
        let core = Core::build(&self.config)?;
        tracing::debug!("handler runtime set up");
        Ok(self.core.get_or_init(|| core))
    }

    /// The engine if it is set up already.
    pub(crate) fn built(&self) -> Option<&Engine> {
        self.core.get().map(|core| &core.engine)
    }

    /// The limits in force.
    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    /// The engine, for precompiling components; set up now if it is not yet.
    pub fn engine(&self) -> Result<&Engine, RuntimeError> {
        Ok(&self.core()?.engine)
    }

    /// Compiles `wasm` and checks that it is a component the gateway can run: that it
    /// imports nothing the host does not provide and exports the handler interface.
    pub fn load(&self, name: &str, wasm: &[u8]) -> Result<Handler, LoadError> {
        check_header(wasm)?;
        let component = Component::new(self.engine()?, wasm)
            .map_err(|err| LoadError::Invalid(format!("{err:#}")))?;
        self.prepare(name, &component)
    }

    /// Pre-instantiates an already compiled component (see [`load`](Self::load)).
    pub fn prepare(&self, name: &str, component: &Component) -> Result<Handler, LoadError> {
        let pre = self
            .core()?
            .linker
            .instantiate_pre(component)
            .map_err(|err| LoadError::UnsupportedImport(format!("{err:#}")))?;
        let exports =
            Exports::new(&pre).map_err(|err| LoadError::WrongExports(format!("{err:#}")))?;
        Ok(Handler {
            name: name.into(),
            pre,
            exports,
            limits: CallLimits {
                memory: self.config.memory_limit,
                cpu_time: self.config.cpu_time,
            },
        })
    }

    /// The handler with the limits it asks for, each capped by this runtime's own: a
    /// handler may ask for less than the gateway allows, never more.
    pub fn with_requested_limits(&self, handler: Handler, memory_mib: u32, cpu_ms: u32) -> Handler {
        let limits = CallLimits {
            memory: (u64::from(memory_mib) << 20).min(self.config.memory_limit),
            cpu_time: std::time::Duration::from_millis(u64::from(cpu_ms)).min(self.config.cpu_time),
        };
        Handler { limits, ..handler }
    }

    /// Asks the handler to describe itself.
    pub async fn describe(
        &self,
        handler: &Handler,
        services: &Services,
    ) -> Result<HandlerInfo, CallError> {
        match self.invoke(handler, services, Request::Describe).await? {
            Response::Info(info) => Ok(info),
            _ => unreachable!("describe answers with handler info"),
        }
    }

    /// Runs one step for `device` and `update`.
    pub async fn step(
        &self,
        handler: &Handler,
        services: &Services,
        step: Step,
        device: &Device,
        update: &Update,
    ) -> Result<Outcome, CallError> {
        match self
            .invoke(handler, services, Request::Step(step, device, update))
            .await?
        {
            Response::Outcome(outcome) => Ok(outcome),
            _ => unreachable!("a step answers with an outcome"),
        }
    }

    /// Has the handler interpret a report from the device.
    pub async fn interpret_report(
        &self,
        handler: &Handler,
        services: &Services,
        device: &Device,
        update: &Update,
        report: &DeviceReport,
    ) -> Result<ReportVerdict, CallError> {
        match self
            .invoke(handler, services, Request::Report(device, update, report))
            .await?
        {
            Response::Verdict(verdict) => Ok(verdict),
            _ => unreachable!("interpret-report answers with a verdict"),
        }
    }
}

/// Tells a core module from a component before compiling, for a clearer error.
pub(crate) fn check_header(wasm: &[u8]) -> Result<(), LoadError> {
    const MAGIC: &[u8] = b"\0asm";
    if wasm.len() < 8 || &wasm[..4] != MAGIC {
        return Err(LoadError::NotWasm);
    }
    // Bytes 4..8: version 1 and layer 0 for a core module; layer 1 for a component.
    match wasm[4..8] {
        [1, 0, 0, 0] => Err(LoadError::CoreModule),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deferred_runtime_sets_up_on_first_use_and_only_once() {
        let runtime = Runtime::deferred(RuntimeConfig::default());
        assert!(runtime.built().is_none());
        assert!(matches!(
            runtime.load("junk", b"not wasm at all"),
            Err(LoadError::NotWasm)
        ));
        assert!(
            runtime.built().is_none(),
            "a file refused before compiling does not set up the engine"
        );
        let first: *const Engine = runtime.engine().expect("engine");
        let again: *const Engine = runtime.engine().expect("engine");
        assert!(std::ptr::eq(first, again));
        assert!(std::ptr::eq(runtime.built().expect("built"), first));
    }

    #[test]
    fn a_deferred_runtime_that_cannot_be_set_up_fails_each_load_with_the_reason() {
        // 8 GiB of linear memory per call is past the pool's 4 GiB reservation: wasmtime
        // refuses the engine.
        let config = RuntimeConfig {
            memory_limit: 8 << 30,
            ..RuntimeConfig::default()
        };
        assert!(matches!(
            Runtime::new(config.clone()),
            Err(RuntimeError::Engine(_))
        ));
        let runtime = Runtime::deferred(config);
        let component = b"\0asm\x0d\x00\x01\x00";
        for _ in 0..2 {
            match runtime.load("h", component) {
                Err(LoadError::Setup(RuntimeError::Engine(why))) => assert!(!why.is_empty()),
                other => panic!("expected a setup error, got {other:?}"),
            }
        }
        assert!(runtime.built().is_none());
    }
}
