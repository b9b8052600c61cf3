//! Outpost's durable state: one SQLite file in the gateway's state directory.
//!
//! The store holds the device lobby, device groups, the cloud outbox and the update
//! handlers' own key-value state. It is opened
//! once per process and shared as a cheap-to-clone [`Store`] handle:
//!
//! * **Off the async runtime.** The SQLite connection lives on a dedicated thread; every
//!   call is sent there and awaited, so no tokio worker ever blocks on disk I/O.
//! * **WAL and full sync.** Readers (the CLI, while the daemon runs) never block the
//!   writer, and a committed transaction survives `kill -9` and power loss.
//! * **Versioned schema.** Migrations are embedded in the binary and applied in order;
//!   `PRAGMA user_version` records how far a file has come.
//! * **Never overwrites what it does not understand.** A file that is not a SQLite
//!   database, fails its integrity check, belongs to another program, or was written by
//!   a newer Outpost is refused with a [`StoreError`] that says so, and is left as it was.
//!
//! ```no_run
//! # async fn demo() -> Result<(), outpost_store::StoreError> {
//! use outpost_store::{DeviceState, NewDevice, Store};
//!
//! let store = Store::open("/var/lib/outpost/outpost.db").await?;
//! store
//!     .upsert_device(NewDevice::new("esp-0a1b2c", "thermostat", DeviceState::Discovered))
//!     .await?;
//! for device in store.list_devices().await? {
//!     println!("{} {}", device.id, device.state);
//! }
//! store.close().await?;
//! # Ok(()) }
//! ```

mod api_tokens;
pub mod backoff;
mod credentials;
mod devices;
mod error;
mod groups;
mod handler_state;
mod migrations;
mod onboarding;
mod open;
mod time;
mod worker;

pub use api_tokens::{API_TOKEN_PREFIX, ApiToken, Role};
pub use credentials::{DEVICE_TOKEN_PREFIX, random_hex_token};
pub use devices::{Device, DeviceState, NewDevice};
pub use error::StoreError;
pub use groups::Group;
pub use handler_state::StateWrite;
pub use migrations::SCHEMA_VERSION;
pub use onboarding::{Claim, OnboardingTarget, Transport};
/// The SQLite binding, re-exported for [`Store::call`] closures.
pub use rusqlite;
pub use time::{Timestamp, now_millis};

use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A handle to the open state database. Clones share one connection and one thread.
#[derive(Clone, Debug)]
pub struct Store {
    worker: worker::Handle,
    path: Arc<PathBuf>,
    credentials: credentials::CredentialCache,
    api_tokens: api_tokens::TokenCache,
}

impl Store {
    /// Opens (creating if absent) the database at `path` and brings its schema up to
    /// [`SCHEMA_VERSION`].
    ///
    /// The parent directory must exist. An existing file is checked before anything is
    /// written to it: see the crate docs for what is refused.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let opener_path = path.clone();
        let worker = worker::Handle::spawn(move || open::open(&opener_path)).await?;
        Ok(Self {
            worker,
            path: Arc::new(path),
            credentials: credentials::CredentialCache::default(),
            api_tokens: api_tokens::TokenCache::default(),
        })
    }

    /// The database file this store was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the store's connection, off the async runtime, and returns its result.
    ///
    /// This is the seam for crates that keep their own queries (the outbox, rollouts).
    /// `f` should be short: every other caller waits behind it. A panic inside `f` is
    /// caught and returned as [`StoreError::Panicked`]; an open transaction is rolled back.
    pub async fn call<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        F: FnOnce(&mut rusqlite::Connection) -> Result<R, StoreError> + Send + 'static,
        R: Send + 'static,
    {
        self.worker.call(f).await
    }

    /// Flushes and closes the database. Calls through other clones of this handle fail
    /// with [`StoreError::Closed`] afterwards.
    ///
    /// Closing the last connection checkpoints the write-ahead log into the main file,
    /// so a cleanly stopped gateway leaves a single self-contained database file.
    pub async fn close(self) -> Result<(), StoreError> {
        self.worker.close().await
    }
}

#[cfg(test)]
mod tests;
