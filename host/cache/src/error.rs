//! The cache's one error type.

use std::path::PathBuf;
use std::sync::Arc;

use crate::Sha256;

/// What went wrong in the firmware cache. Cheap to clone: every caller waiting on one
/// download gets the same error.
#[derive(Clone, Debug, thiserror::Error)]
pub enum CacheError {
    /// A manifest was refused before anything was fetched; the reason says why.
    #[error("update manifest refused: {0}")]
    Manifest(String),

    /// The manifest is well formed but its signature does not verify, or its signer is not trusted.
    #[error("update manifest signature refused: {0}")]
    Signature(String),

    /// No verified manifest names this artifact, so the cache will not fetch it.
    #[error("no verified update manifest names artifact {0}")]
    NotNamed(Sha256),

    /// The artifact is not in the cache.
    #[error("artifact {0} is not in the cache")]
    NotCached(Sha256),

    /// The artifact is pinned by the holders listed and cannot be removed.
    #[error("artifact {sha256} is pinned by {holders:?}; unpin it first")]
    Pinned {
        /// The artifact.
        sha256: Sha256,
        /// Who pinned it.
        holders: Vec<String>,
    },

    /// Storing the artifact would exceed the cache's size budget even after evicting
    /// every blob that may be evicted.
    #[error(
        "the firmware cache is full: {needed} bytes needed, budget {budget} bytes, \
         {unevictable} bytes pinned or being served"
    )]
    Full {
        /// Bytes the new artifact needs.
        needed: u64,
        /// The configured budget.
        budget: u64,
        /// Bytes held by blobs that may not be evicted.
        unevictable: u64,
    },

    /// Bytes did not match what was promised (size or sha256); nothing was kept.
    #[error("artifact {sha256} failed verification: {detail}")]
    Verification {
        /// The artifact.
        sha256: Sha256,
        /// What did not match.
        detail: String,
    },

    /// The upstream download failed; it is retried later.
    #[error("downloading {sha256} from {url} failed after {attempts} attempt(s): {detail}")]
    Upstream {
        /// The artifact.
        sha256: Sha256,
        /// Where it was fetched from.
        url: String,
        /// Attempts made in this round.
        attempts: u32,
        /// The last failure.
        detail: String,
    },

    /// A file operation failed (a full disk shows here as "No space left on device").
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: Arc<std::io::Error>,
    },

    /// The state database failed.
    #[error(transparent)]
    Store(Arc<outpost_store::StoreError>),

    /// The cache is shutting down.
    #[error("the firmware cache is shutting down")]
    ShuttingDown,
}

impl From<outpost_store::StoreError> for CacheError {
    fn from(error: outpost_store::StoreError) -> Self {
        Self::Store(Arc::new(error))
    }
}

impl CacheError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io {
            action,
            path,
            source: Arc::new(source),
        }
    }

    /// A [`CacheError::Io`] whose cause is not an operating-system error.
    pub(crate) fn other(
        action: &'static str,
        path: impl Into<PathBuf>,
        message: impl std::fmt::Display,
    ) -> Self {
        Self::io(action, path)(std::io::Error::other(message.to_string()))
    }

    /// A blocking file task that panicked or was cancelled.
    pub(crate) fn task(error: &tokio::task::JoinError) -> Self {
        Self::other("running a file task for", "the firmware cache", error)
    }

    /// True when the error comes from the disk being full.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, Self::Io { source, .. } if source.raw_os_error() == Some(28))
    }
}
