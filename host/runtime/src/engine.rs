//! The one wasmtime `Engine` of a gateway: pooling allocator, epoch interruption, and only
//! the wasm features a WASI Preview 2 handler needs.

use std::sync::Arc;
use std::time::Duration;

use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::RuntimeError;

/// Limits and sizes of the handler sandbox.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// Linear memory one call may use, in bytes (default 64 MiB).
    pub memory_limit: u64,
    /// Guest CPU time one call may use (default 1 s), measured in epoch ticks.
    pub cpu_time: Duration,
    /// Wall-clock time one call may take, including time parked in host calls such as a
    /// device request (default 30 s).
    pub wall_time: Duration,
    /// The longest a handler may wait for one device reply (default 10 s).
    pub max_device_wait: Duration,
    /// Handler instances running at once; further calls wait (default 4).
    pub max_instances: u32,
    /// Bytes of stdout and of stderr kept per call (default 64 KiB each).
    pub output_limit: usize,
    /// Log lines a call may write through the log import (default 1000).
    pub log_lines: u32,
    /// Bytes of log messages and fields a call may write (default 256 KiB).
    pub log_bytes: usize,
    /// The epoch tick: the granularity of CPU accounting (default 10 ms).
    pub epoch_tick: Duration,
    /// Where components without cached code are compiled (default: in this process).
    pub compiler: crate::Compiler,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            memory_limit: 64 << 20,
            cpu_time: Duration::from_secs(1),
            wall_time: Duration::from_secs(30),
            max_device_wait: Duration::from_secs(10),
            max_instances: 4,
            output_limit: 64 << 10,
            log_lines: 1000,
            log_bytes: 256 << 10,
            epoch_tick: Duration::from_millis(10),
            compiler: crate::Compiler::InProcess,
        }
    }
}

/// The native stack a guest may use; deeper recursion traps with a stack overflow.
const MAX_WASM_STACK: usize = 512 << 10;

/// Pool slots per running instance: a Rust wasip2 component has several core instances
/// (its module plus the canonical-ABI shims), each with its tables.
const CORE_INSTANCES_PER_COMPONENT: u32 = 8;

/// Bytes of a linear memory a slot keeps resident between calls (at most this much per
/// memory slot in use: a few MiB for a gateway's handful of slots).
const KEEP_RESIDENT_MEMORY: usize = 1 << 20;
/// Bytes of a table a slot keeps resident between calls.
const KEEP_RESIDENT_TABLE: usize = 64 << 10;

pub(crate) fn build_engine(config: &RuntimeConfig) -> Result<Engine, RuntimeError> {
    let instances = config.max_instances.max(1);
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(instances)
        .total_core_instances(instances * CORE_INSTANCES_PER_COMPONENT)
        .total_memories(instances * 2)
        .total_tables(instances * CORE_INSTANCES_PER_COMPONENT)
        .total_stacks(instances)
        .max_memory_size(usize::try_from(config.memory_limit).unwrap_or(usize::MAX))
        .max_memories_per_module(1)
        .max_tables_per_module(2);
    // Resetting a slot for the next call: the pages a call wrote, found with Linux's
    // PAGEMAP_SCAN (6.7+), are set back with memcpy/memset up to these sizes and stay
    // resident; only the rest is given back with madvise. An madvise on every call costs
    // a TLB shoot-down on every core: handler-bench measured 31 µs a call and 0.69 s for
    // the 10,000-device sweep with it, 15 µs and 0.10 s without. Without PAGEMAP_SCAN
    // wasmtime would memset the whole kept size every call, so an older kernel keeps
    // nothing resident and resets with madvise alone.
    if pagemap_scan_available() {
        pool.linear_memory_keep_resident(KEEP_RESIDENT_MEMORY)
            .table_keep_resident(KEEP_RESIDENT_TABLE)
            .pagemap_scan(wasmtime::Enabled::Auto);
    }

    let mut wasm = Config::new();
    wasm.allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
        .epoch_interruption(true)
        .max_wasm_stack(MAX_WASM_STACK)
        .wasm_component_model(true)
        // Handlers are plain WASI p2 components. Threads, GC, stack switching and the
        // async component ABI are not even compiled in (see the crate's wasmtime features);
        // of what is, turn off what they do not need.
        .wasm_memory64(false)
        .concurrency_support(false);
    Engine::new(&wasm).map_err(|err| RuntimeError::Engine(format!("{err:#}")))
}

/// Whether this kernel has the PAGEMAP_SCAN ioctl (Linux 6.7).
fn pagemap_scan_available() -> bool {
    let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else {
        return false;
    };
    let mut parts = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (6, 7)
}

/// Advances the engine's epoch every tick on its own thread, for as long as the engine
/// lives; dropping the ticker stops it.
#[derive(Debug)]
pub(crate) struct EpochTicker {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EpochTicker {
    pub(crate) fn start(engine: &Engine, tick: Duration) -> Result<Self, RuntimeError> {
        let weak = engine.weak();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("outpost-epoch".into())
            .spawn(move || {
                while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    match weak.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => break,
                    }
                }
            })
            .map_err(|err| RuntimeError::Engine(format!("cannot start the epoch ticker: {err}")))?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
