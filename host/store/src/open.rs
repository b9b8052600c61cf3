//! Opening the database file: check what is there before writing anything, then set the
//! connection up and migrate.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags};

use crate::StoreError;
use crate::migrations::{self, APPLICATION_ID, SCHEMA_VERSION};

/// How long a statement waits for another connection's lock (the CLI reading while the
/// daemon writes) before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) fn open(path: &Path) -> Result<Connection, StoreError> {
    open_at(path, SCHEMA_VERSION)
}

/// Opens `path` and migrates it to `target` (tests use older targets to build fixtures).
pub(crate) fn open_at(path: &Path, target: u32) -> Result<Connection, StoreError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut conn = Connection::open_with_flags(path, flags).map_err(|source| StoreError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    conn.busy_timeout(BUSY_TIMEOUT)?;

    // Everything up to here only reads. Refuse before the first write (the journal mode
    // change below rewrites the header).
    check_existing(&conn, path)?;

    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "wal", |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(path = %path.display(), mode, "state database could not use WAL mode");
    }
    // FULL: a committed outbox message or device record survives power loss, not just a
    // crashed process. WAL keeps the cost to one fsync per commit.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", true)?;
    // 16 MiB of page cache (the default is 2 MiB): the outbox's hot pages and the ones a
    // checkpoint copies stay in memory instead of being read back.
    conn.pragma_update(None, "cache_size", -16384)?;
    migrations::migrate_to(&mut conn, target)?;
    Ok(conn)
}

fn check_existing(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let corrupt = |err: &rusqlite::Error| match err.sqlite_error_code() {
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => Some(StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: err.to_string(),
        }),
        _ => None,
    };
    let version = match migrations::current_version(conn) {
        Ok(version) => version,
        Err(err) => return Err(corrupt(&err).unwrap_or(StoreError::Sqlite(err))),
    };

    let integrity: String = conn
        .pragma_query_value(None, "quick_check", |row| row.get(0))
        .map_err(|err| corrupt(&err).unwrap_or(StoreError::Sqlite(err)))?;
    if integrity != "ok" {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: format!("integrity check: {integrity}"),
        });
    }

    let application_id: i32 = conn.pragma_query_value(None, "application_id", |r| r.get(0))?;
    if application_id != 0 && application_id != APPLICATION_ID {
        return Err(StoreError::Foreign {
            path: path.to_path_buf(),
            detail: format!("application_id {application_id:#x}"),
        });
    }
    if version == 0 {
        let tables: i64 =
            conn.query_row("SELECT count(*) FROM sqlite_schema", [], |row| row.get(0))?;
        if tables > 0 {
            return Err(StoreError::Foreign {
                path: path.to_path_buf(),
                detail: format!("{tables} schema objects but no schema version"),
            });
        }
    } else if application_id != APPLICATION_ID {
        return Err(StoreError::Foreign {
            path: path.to_path_buf(),
            detail: format!("schema version {version} without Outpost's application id"),
        });
    }
    if version > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            path: path.to_path_buf(),
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(())
}
