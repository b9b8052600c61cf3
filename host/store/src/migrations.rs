//! The schema, as an ordered list of embedded SQL migrations.
//!
//! Migration N takes a database from `user_version` N-1 to N inside one transaction, so
//! a failure leaves the file at the last version that completed. Released migrations are
//! never edited: a change to the schema is a new file.

use rusqlite::Connection;

use crate::StoreError;

/// Marks a database as Outpost's (`PRAGMA application_id`, the ASCII bytes "OPST").
pub(crate) const APPLICATION_ID: i32 = 0x4f50_5354;

struct Migration {
    version: u32,
    sql: &'static str,
}

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        sql: include_str!("../migrations/0001_lobby.sql"),
    },
    Migration {
        version: 2,
        sql: include_str!("../migrations/0002_outbox.sql"),
    },
    Migration {
        version: 3,
        sql: include_str!("../migrations/0003_handler_state.sql"),
    },
    Migration {
        version: 4,
        sql: include_str!("../migrations/0004_firmware.sql"),
    },
    Migration {
        version: 5,
        sql: include_str!("../migrations/0005_onboarding.sql"),
    },
    Migration {
        version: 6,
        sql: include_str!("../migrations/0006_uplink.sql"),
    },
    Migration {
        version: 7,
        sql: include_str!("../migrations/0007_rollouts.sql"),
    },
    Migration {
        version: 8,
        sql: include_str!("../migrations/0008_api_tokens.sql"),
    },
    Migration {
        version: 9,
        sql: include_str!("../migrations/0009_network_rollouts.sql"),
    },
    Migration {
        version: 10,
        sql: include_str!("../migrations/0010_outbox_lanes.sql"),
    },
    Migration {
        version: 11,
        sql: include_str!("../migrations/0011_outbox_groups.sql"),
    },
];

/// The schema version this build writes and the newest it can open.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// Reads `PRAGMA user_version`.
pub(crate) fn current_version(conn: &Connection) -> rusqlite::Result<u32> {
    conn.pragma_query_value(None, "user_version", |row| row.get(0))
}

/// Applies every migration above the file's version, up to and including `target`.
pub(crate) fn migrate_to(conn: &mut Connection, target: u32) -> Result<(), StoreError> {
    let from = current_version(conn)?;
    for migration in MIGRATIONS
        .iter()
        .filter(|m| m.version > from && m.version <= target)
    {
        let version = migration.version;
        let wrap = |source| StoreError::Migration { version, source };
        let tx = conn.transaction().map_err(wrap)?;
        if version == 1 {
            tx.pragma_update(None, "application_id", APPLICATION_ID)
                .map_err(wrap)?;
        }
        tx.execute_batch(migration.sql).map_err(wrap)?;
        tx.pragma_update(None, "user_version", version)
            .map_err(wrap)?;
        tx.commit().map_err(wrap)?;
        tracing::info!(version, "state database migrated");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_one_by_one() {
        for (index, migration) in MIGRATIONS.iter().enumerate() {
            assert_eq!(migration.version as usize, index + 1);
        }
    }
}
