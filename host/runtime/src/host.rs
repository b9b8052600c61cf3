//! The host side of a handler's imports, and the per-call state a `Store` carries.

use std::collections::HashSet;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::bindings::outpost::handler::{artifacts, clock, device_channel, log, state, types};
use crate::services::{self, Services};

/// The most one artifact read returns, whatever the guest asks for.
pub(crate) const MAX_READ: u32 = 64 << 10;

/// Everything a `Store` holds for one call.
pub(crate) struct HostState {
    pub(crate) wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    pub(crate) limiter: MemoryLimiter,
    /// Epoch ticks the guest has run for in this call.
    pub(crate) cpu_ticks: u64,
    /// Set when a host service failed and the call was trapped because of it.
    pub(crate) host_failure: Option<String>,
    pub(crate) scope: CallScope,
}

/// Who is calling about what, and what the call may still use.
pub(crate) struct CallScope {
    pub(crate) handler: String,
    pub(crate) device_id: String,
    /// The file ids of the update the call is about: the only ones it may read.
    pub(crate) files: HashSet<String>,
    pub(crate) services: Services,
    pub(crate) max_device_wait: Duration,
    pub(crate) log_lines_left: u32,
    pub(crate) log_bytes_left: usize,
    pub(crate) log_dropped: u64,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Caps linear memory per call and remembers whether the cap was hit, so the trap that
/// follows can be reported as what it is.
pub(crate) struct MemoryLimiter {
    pub(crate) limit: usize,
    pub(crate) refused: Option<usize>,
}

/// Table elements per table; far above what compiled Rust needs.
const MAX_TABLE_ELEMENTS: usize = 100_000;

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.refused = Some(desired);
            wasmtime::bail!(
                "memory limit of {} MiB reached: the handler asked for {} MiB",
                self.limit >> 20,
                desired >> 20
            );
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

impl types::Host for HostState {}

impl log::Host for HostState {
    async fn write(
        &mut self,
        level: log::Level,
        message: String,
        fields: Vec<(String, String)>,
    ) -> wasmtime::Result<()> {
        let scope = &mut self.scope;
        let size = message.len() + fields.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
        if scope.log_lines_left == 0 || scope.log_bytes_left < size {
            scope.log_dropped += 1;
            return Ok(());
        }
        scope.log_lines_left -= 1;
        scope.log_bytes_left -= size;
        let fields = fields
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ");
        let (handler, device) = (scope.handler.as_str(), scope.device_id.as_str());
        match level {
            log::Level::Trace => {
                tracing::trace!(target: "outpost::handler", handler, device, fields, "{message}");
            }
            log::Level::Debug => {
                tracing::debug!(target: "outpost::handler", handler, device, fields, "{message}");
            }
            log::Level::Info => {
                tracing::info!(target: "outpost::handler", handler, device, fields, "{message}");
            }
            log::Level::Warn => {
                tracing::warn!(target: "outpost::handler", handler, device, fields, "{message}");
            }
            log::Level::Error => {
                tracing::error!(target: "outpost::handler", handler, device, fields, "{message}");
            }
        }
        Ok(())
    }
}

impl artifacts::Host for HostState {
    async fn read(
        &mut self,
        file_id: String,
        offset: u64,
        max_len: u32,
    ) -> wasmtime::Result<Result<Vec<u8>, artifacts::ReadError>> {
        if !self.scope.files.contains(&file_id) {
            return Ok(Err(artifacts::ReadError::NotInUpdate));
        }
        let len = max_len.min(MAX_READ) as usize;
        let source = std::sync::Arc::clone(&self.scope.services.artifacts);
        Ok(match source.read(&file_id, offset, len).await {
            Ok(mut bytes) => {
                bytes.truncate(len);
                Ok(bytes)
            }
            Err(services::ReadError::OutOfRange) => Err(artifacts::ReadError::OutOfRange),
            Err(services::ReadError::Unavailable(why)) => {
                Err(artifacts::ReadError::Unavailable(why))
            }
        })
    }
}

fn channel_error(err: services::ChannelError) -> device_channel::ChannelError {
    match err {
        services::ChannelError::Timeout => device_channel::ChannelError::Timeout,
        services::ChannelError::Disconnected => device_channel::ChannelError::Disconnected,
        services::ChannelError::Rejected(why) => device_channel::ChannelError::Rejected(why),
        services::ChannelError::UnknownFile => device_channel::ChannelError::UnknownFile,
    }
}

impl device_channel::Host for HostState {
    async fn request(
        &mut self,
        command: String,
        payload: Vec<u8>,
        timeout_ms: u32,
    ) -> wasmtime::Result<Result<Vec<u8>, device_channel::ChannelError>> {
        let wait = Duration::from_millis(u64::from(timeout_ms)).min(self.scope.max_device_wait);
        let devices = std::sync::Arc::clone(&self.scope.services.devices);
        let device_id = self.scope.device_id.clone();
        // The channel's own deadline, enforced here too: a transport that never answers
        // must not hold the call until its wall-clock limit.
        let reply =
            tokio::time::timeout(wait, devices.request(&device_id, &command, &payload, wait)).await;
        Ok(match reply {
            Ok(reply) => reply.map_err(channel_error),
            Err(_) => Err(device_channel::ChannelError::Timeout),
        })
    }

    async fn download_url(
        &mut self,
        file_id: String,
    ) -> wasmtime::Result<Result<String, device_channel::ChannelError>> {
        if !self.scope.files.contains(&file_id) {
            return Ok(Err(device_channel::ChannelError::UnknownFile));
        }
        Ok(self
            .scope
            .services
            .devices
            .download_url(&self.scope.device_id, &file_id)
            .map_err(channel_error))
    }
}

impl HostState {
    /// Records a failed host service and returns the error that traps the call: the guest
    /// must not carry on as if a write had happened.
    fn host_failed(&mut self, err: &services::StateError) -> wasmtime::Error {
        let message = format!("handler state: {err}");
        self.host_failure = Some(message.clone());
        wasmtime::Error::msg(message)
    }
}

impl state::Host for HostState {
    async fn get(&mut self, key: String) -> wasmtime::Result<Option<Vec<u8>>> {
        let store = std::sync::Arc::clone(&self.scope.services.state);
        match store.get(&self.scope.handler, &key).await {
            Ok(value) => Ok(value),
            Err(err) => Err(self.host_failed(&err)),
        }
    }

    async fn set(
        &mut self,
        key: String,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<(), state::StateError>> {
        let store = std::sync::Arc::clone(&self.scope.services.state);
        match store.set(&self.scope.handler, &key, value).await {
            Ok(()) => Ok(Ok(())),
            Err(services::StateError::QuotaExceeded) => Ok(Err(state::StateError::QuotaExceeded)),
            Err(services::StateError::InvalidKey) => Ok(Err(state::StateError::InvalidKey)),
            Err(err @ services::StateError::Backend(_)) => Err(self.host_failed(&err)),
        }
    }

    async fn delete(&mut self, key: String) -> wasmtime::Result<()> {
        let store = std::sync::Arc::clone(&self.scope.services.state);
        match store.delete(&self.scope.handler, &key).await {
            Ok(()) => Ok(()),
            Err(err) => Err(self.host_failed(&err)),
        }
    }
}

impl clock::Host for HostState {
    async fn now_ms(&mut self) -> wasmtime::Result<u64> {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        Ok(u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
    }

    async fn monotonic_ns(&mut self) -> wasmtime::Result<u64> {
        static START: OnceLock<Instant> = OnceLock::new();
        let elapsed = START.get_or_init(Instant::now).elapsed();
        Ok(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX))
    }
}
