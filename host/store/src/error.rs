use std::path::PathBuf;

/// Everything that can go wrong with the state database.
///
/// The variants that concern an existing file ([`Corrupt`](Self::Corrupt),
/// [`Foreign`](Self::Foreign), [`TooNew`](Self::TooNew)) are raised before anything is
/// written to it: the file is left exactly as it was found.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file could not be opened at all (missing directory, permissions).
    #[error("cannot open state database {path}: {source}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// What SQLite said.
        #[source]
        source: rusqlite::Error,
    },

    /// The file is not a SQLite database, or failed SQLite's integrity check.
    #[error(
        "state database {path} is corrupt ({detail}); it was left untouched. \
         Move it aside to start with an empty state, or restore it from a backup"
    )]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// What SQLite reported.
        detail: String,
    },

    /// The file is a SQLite database, but not one Outpost wrote.
    #[error(
        "{path} is a SQLite database that Outpost did not create ({detail}); it was left \
         untouched. Point gateway.state_dir at a directory of Outpost's own"
    )]
    Foreign {
        /// The database file.
        path: PathBuf,
        /// Why it was not recognised.
        detail: String,
    },

    /// The file was written by a newer Outpost with a schema this build does not know.
    #[error(
        "state database {path} has schema version {found}, newer than the {supported} this \
         outpost supports; it was left untouched. Run the newer outpost, or restore a backup \
         made before the upgrade"
    )]
    TooNew {
        /// The database file.
        path: PathBuf,
        /// The version in the file.
        found: u32,
        /// The newest version this build knows.
        supported: u32,
    },

    /// Applying a migration failed; the transaction was rolled back, so the file is still
    /// at the last version that completed.
    #[error("migrating the state database to schema version {version} failed: {source}")]
    Migration {
        /// The version that could not be applied.
        version: u32,
        /// What SQLite said.
        #[source]
        source: rusqlite::Error,
    },

    /// A query failed.
    #[error("state database error: {0}")]
    Sqlite(#[from] rusqlite::Error),

    /// A caller passed a value the store does not accept.
    #[error("invalid {what}: {reason}")]
    InvalidInput {
        /// Which value.
        what: &'static str,
        /// Why it is refused.
        reason: String,
    },

    /// A row with that key exists already.
    #[error("{what} {id:?} exists already")]
    Exists {
        /// The kind of row.
        what: &'static str,
        /// Its key.
        id: String,
    },

    /// The row a call refers to does not exist.
    #[error("{what} {id:?} not found")]
    NotFound {
        /// The kind of row.
        what: &'static str,
        /// Its id.
        id: String,
    },

    /// A stored value could not be decoded (a state name, a JSON column).
    #[error("state database holds an unreadable {what}: {detail}")]
    Decode {
        /// Which value.
        what: &'static str,
        /// What is wrong with it.
        detail: String,
    },

    /// A [`Store::call`](crate::Store::call) closure panicked; its transaction was rolled back.
    #[error("a state database call panicked: {0}")]
    Panicked(String),

    /// The OS random number generator failed (no token could be made).
    #[error("the OS random number generator failed: {0}")]
    Entropy(String),

    /// One failure reported to every caller that shared the transaction (a group
    /// commit): the cause itself, shared.
    #[error(transparent)]
    Shared(std::sync::Arc<StoreError>),

    /// The store was closed, or its thread is gone.
    #[error("the state database is closed")]
    Closed,
}

impl StoreError {
    /// Whether SQLite failed because the disk (or the file system under the state
    /// directory) is full. Nothing of the failed transaction was written; the same call
    /// succeeds once there is room again, so callers answer "insufficient storage", not
    /// "internal error".
    pub fn is_disk_full(&self) -> bool {
        let sqlite = match self {
            Self::Sqlite(err)
            | Self::Open { source: err, .. }
            | Self::Migration { source: err, .. } => err,
            Self::Shared(inner) => return inner.is_disk_full(),
            _ => return false,
        };
        matches!(
            sqlite.sqlite_error_code(),
            Some(rusqlite::ErrorCode::DiskFull)
        )
    }
}
