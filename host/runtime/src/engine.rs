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

/// Advances the engine's epoch every tick on its own thread while a call runs, for as
/// long as the engine lives; dropping the ticker stops it.
///
/// With no call running the thread parks: an idle gateway (most of them, most of the
/// time) would otherwise wake a hundred times a second for nothing. Deadlines are set
/// relative to the epoch when a call starts ([`Running`] is taken before that), so a
/// paused epoch cannot shorten or lengthen any call's budget.
#[derive(Debug)]
pub(crate) struct EpochTicker {
    shared: Arc<TickerShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct TickerShared {
    state: std::sync::Mutex<TickerState>,
    wake: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct TickerState {
    /// Calls running now.
    running: usize,
    stop: bool,
    /// Ticks made so far.
    ticks: u64,
}

/// Keeps the epoch advancing while it lives (one per call in flight).
#[derive(Debug)]
pub(crate) struct Running {
    shared: Arc<TickerShared>,
}

impl EpochTicker {
    pub(crate) fn start(engine: &Engine, tick: Duration) -> Result<Self, RuntimeError> {
        let weak = engine.weak();
        let shared = Arc::new(TickerShared::default());
        let ticking = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("outpost-epoch".into())
            .spawn(move || {
                loop {
                    {
                        let state = ticking.state.lock().unwrap_or_else(|p| p.into_inner());
                        let state = ticking
                            .wake
                            .wait_while(state, |state| state.running == 0 && !state.stop)
                            .unwrap_or_else(|p| p.into_inner());
                        if state.stop {
                            break;
                        }
                    }
                    std::thread::sleep(tick);
                    match weak.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => break,
                    }
                    ticking.lock().ticks += 1;
                }
            })
            .map_err(|err| RuntimeError::Engine(format!("cannot start the epoch ticker: {err}")))?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Marks a call as running until the returned guard drops; the epoch advances
    /// meanwhile.
    pub(crate) fn running(&self) -> Running {
        let mut state = self.shared.lock();
        state.running += 1;
        if state.running == 1 {
            self.shared.wake.notify_one();
        }
        Running {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Ticks made so far.
    #[cfg(test)]
    fn ticks(&self) -> u64 {
        self.shared.lock().ticks
    }
}

impl TickerShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, TickerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.running = state.running.saturating_sub(1);
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits (bounded) until the ticker has made more than `than` ticks.
    fn ticks_past(ticker: &EpochTicker, than: u64) -> u64 {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let ticks = ticker.ticks();
            if ticks > than {
                return ticks;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the ticker made no tick in 10 s while a call was running"
            );
            std::thread::yield_now();
        }
    }

    #[test]
    fn ticks_only_while_a_call_runs() {
        let tick = Duration::from_millis(2);
        let engine = build_engine(&RuntimeConfig::default()).expect("engine");
        let ticker = EpochTicker::start(&engine, tick).expect("ticker");

        // Idle: a hundred ticks' time passes without one.
        std::thread::sleep(tick * 100);
        assert_eq!(ticker.ticks(), 0, "an idle ticker ticked");

        let first = ticker.running();
        let second = ticker.running();
        let ticked = ticks_past(&ticker, 3);
        drop(first);
        // One call still runs: it keeps ticking.
        ticks_past(&ticker, ticked);
        drop(second);
        // The tick in progress when the last call ended may still land; then none.
        let parked = ticker.ticks() + 1;
        std::thread::sleep(tick * 100);
        assert!(
            ticker.ticks() <= parked,
            "the ticker kept ticking with no call running ({} ticks, at most {parked} expected)",
            ticker.ticks()
        );

        // And it wakes again.
        let again = ticker.running();
        ticks_past(&ticker, parked);
        drop(again);
        drop(ticker);
    }
}
