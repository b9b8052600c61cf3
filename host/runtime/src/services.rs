//! What a handler's imports reach: the firmware cache, the device, the handler's state.
//!
//! The runtime defines these seams; the gateway plugs in the real cache, device transport
//! and SQLite-backed state. [`MemoryState`] is a complete in-memory state store with a
//! quota, for tests and for handlers whose state need not outlive the process.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A boxed future, so the seams can be trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why an artifact read failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// The offset lies beyond the end of the file.
    #[error("offset beyond the end of the file")]
    OutOfRange,
    /// The cache could not read the file.
    #[error("artifact unavailable: {0}")]
    Unavailable(String),
}

/// Read access to cached firmware files.
pub trait ArtifactSource: Send + Sync {
    /// Up to `max_len` bytes of `file_id` from `offset`; empty at the end of the file.
    fn read(
        &self,
        file_id: &str,
        offset: u64,
        max_len: usize,
    ) -> BoxFuture<'_, Result<Vec<u8>, ReadError>>;
}

/// Why a device exchange failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    /// No answer within the deadline.
    #[error("the device did not answer in time")]
    Timeout,
    /// The device is not connected.
    #[error("the device is not connected")]
    Disconnected,
    /// The device answered with an error.
    #[error("the device refused: {0}")]
    Rejected(String),
    /// The file is not part of the update.
    #[error("unknown file")]
    UnknownFile,
}

/// The transport to devices.
pub trait DeviceChannel: Send + Sync {
    /// Sends `command` to `device_id` and waits up to `timeout` for the reply.
    fn request<'a>(
        &'a self,
        device_id: &'a str,
        command: &'a str,
        payload: &'a [u8],
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Vec<u8>, ChannelError>>;

    /// A local download URL for `file_id`, valid for `device_id`.
    fn download_url(&self, device_id: &str, file_id: &str) -> Result<String, ChannelError>;
}

/// Why a state write was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// The handler's quota would be exceeded.
    #[error("state quota exceeded")]
    QuotaExceeded,
    /// The key is empty or longer than [`MAX_KEY_LEN`].
    #[error("invalid key")]
    InvalidKey,
    /// The backend failed; the call traps rather than lose a write silently.
    #[error("state backend failed: {0}")]
    Backend(String),
}

/// Keys longer than this are refused.
pub const MAX_KEY_LEN: usize = 256;

/// Per-handler persistent key-value state.
pub trait StateStore: Send + Sync {
    /// The value under `key` for `handler`.
    fn get<'a>(
        &'a self,
        handler: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, StateError>>;
    /// Stores `value` under `key` for `handler`, within its quota.
    fn set<'a>(
        &'a self,
        handler: &'a str,
        key: &'a str,
        value: Vec<u8>,
    ) -> BoxFuture<'a, Result<(), StateError>>;
    /// Removes `key` for `handler`.
    fn delete<'a>(
        &'a self,
        handler: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<(), StateError>>;
}

/// State kept in memory, with a per-handler quota over the bytes of keys and values.
#[derive(Debug)]
pub struct MemoryState {
    quota: usize,
    handlers: Mutex<HashMap<String, HashMap<String, Vec<u8>>>>,
}

impl MemoryState {
    /// An empty store allowing each handler `quota` bytes.
    pub fn new(quota: usize) -> Arc<Self> {
        Arc::new(Self {
            quota,
            handlers: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<String, Vec<u8>>>> {
        self.handlers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl StateStore for MemoryState {
    fn get<'a>(
        &'a self,
        handler: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, StateError>> {
        let value = self.lock().get(handler).and_then(|kv| kv.get(key).cloned());
        Box::pin(async move { Ok(value) })
    }

    fn set<'a>(
        &'a self,
        handler: &'a str,
        key: &'a str,
        value: Vec<u8>,
    ) -> BoxFuture<'a, Result<(), StateError>> {
        let result = (|| {
            if key.is_empty() || key.len() > MAX_KEY_LEN {
                return Err(StateError::InvalidKey);
            }
            let mut handlers = self.lock();
            let kv = handlers.entry(handler.to_owned()).or_default();
            let used: usize = kv
                .iter()
                .filter(|(k, _)| k.as_str() != key)
                .map(|(k, v)| k.len() + v.len())
                .sum();
            if used + key.len() + value.len() > self.quota {
                return Err(StateError::QuotaExceeded);
            }
            kv.insert(key.to_owned(), value);
            Ok(())
        })();
        Box::pin(async move { result })
    }

    fn delete<'a>(
        &'a self,
        handler: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<(), StateError>> {
        if let Some(kv) = self.lock().get_mut(handler) {
            kv.remove(key);
        }
        Box::pin(async { Ok(()) })
    }
}

/// The services one call may use.
#[derive(Clone)]
pub struct Services {
    /// The firmware cache.
    pub artifacts: Arc<dyn ArtifactSource>,
    /// The device transport.
    pub devices: Arc<dyn DeviceChannel>,
    /// Handler state.
    pub state: Arc<dyn StateStore>,
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Services").finish_non_exhaustive()
    }
}

/// Services that refuse everything: what a handler gets when it has no business reaching
/// out (`describe` at install time).
#[derive(Debug)]
struct Closed;

impl ArtifactSource for Closed {
    fn read(
        &self,
        _file_id: &str,
        _offset: u64,
        _max_len: usize,
    ) -> BoxFuture<'_, Result<Vec<u8>, ReadError>> {
        Box::pin(async { Err(ReadError::Unavailable("no artifacts in this call".into())) })
    }
}

impl DeviceChannel for Closed {
    fn request<'a>(
        &'a self,
        _device_id: &'a str,
        _command: &'a str,
        _payload: &'a [u8],
        _timeout: Duration,
    ) -> BoxFuture<'a, Result<Vec<u8>, ChannelError>> {
        Box::pin(async { Err(ChannelError::Disconnected) })
    }

    fn download_url(&self, _device_id: &str, _file_id: &str) -> Result<String, ChannelError> {
        Err(ChannelError::Disconnected)
    }
}

impl StateStore for Closed {
    fn get<'a>(
        &'a self,
        _handler: &'a str,
        _key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, StateError>> {
        Box::pin(async { Ok(None) })
    }

    fn set<'a>(
        &'a self,
        _handler: &'a str,
        _key: &'a str,
        _value: Vec<u8>,
    ) -> BoxFuture<'a, Result<(), StateError>> {
        Box::pin(async { Err(StateError::QuotaExceeded) })
    }

    fn delete<'a>(
        &'a self,
        _handler: &'a str,
        _key: &'a str,
    ) -> BoxFuture<'a, Result<(), StateError>> {
        Box::pin(async { Ok(()) })
    }
}

impl Services {
    /// Services that refuse every request: no artifacts, no device, no state writes.
    pub fn closed() -> Self {
        Self {
            artifacts: Arc::new(Closed),
            devices: Arc::new(Closed),
            state: Arc::new(Closed),
        }
    }
}
