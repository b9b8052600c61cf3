//! Update handlers' persistent key-value state, each handler in its own namespace and
//! within a byte quota.

use rusqlite::{OptionalExtension, params};

use crate::{Store, StoreError, Timestamp};

/// What a write did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateWrite {
    /// The value is stored.
    Stored,
    /// Storing it would take the handler past its quota; nothing changed.
    QuotaExceeded,
}

impl Store {
    /// The value a handler stored under `key`.
    pub async fn handler_state_get(
        &self,
        handler: &str,
        key: &str,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let (handler, key) = (handler.to_owned(), key.to_owned());
        self.call(move |conn| {
            Ok(conn
                .prepare_cached("SELECT value FROM handler_state WHERE handler = ?1 AND key = ?2")?
                .query_row(params![handler, key], |row| row.get(0))
                .optional()?)
        })
        .await
    }

    /// Stores `value` under `key` for `handler` if the handler's keys and values,
    /// this one included, fit in `quota` bytes.
    pub async fn handler_state_set(
        &self,
        handler: &str,
        key: &str,
        value: Vec<u8>,
        quota: u64,
    ) -> Result<StateWrite, StoreError> {
        let (handler, key) = (handler.to_owned(), key.to_owned());
        self.call(move |conn| {
            let tx = conn.transaction()?;
            let others: i64 = tx.query_row(
                "SELECT COALESCE(SUM(length(CAST(key AS BLOB)) + length(value)), 0) \
                 FROM handler_state WHERE handler = ?1 AND key <> ?2",
                params![handler, key],
                |row| row.get(0),
            )?;
            let needed = u64::try_from(others).unwrap_or(0) + (key.len() + value.len()) as u64;
            if needed > quota {
                return Ok(StateWrite::QuotaExceeded);
            }
            tx.execute(
                "INSERT INTO handler_state (handler, key, value, updated_at) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (handler, key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                params![handler, key, value, Timestamp::now().unix_millis()],
            )?;
            tx.commit()?;
            Ok(StateWrite::Stored)
        })
        .await
    }

    /// Removes `key` for `handler`; a missing key is not an error.
    pub async fn handler_state_delete(&self, handler: &str, key: &str) -> Result<(), StoreError> {
        let (handler, key) = (handler.to_owned(), key.to_owned());
        self.call(move |conn| {
            conn.prepare_cached("DELETE FROM handler_state WHERE handler = ?1 AND key = ?2")?
                .execute(params![handler, key])?;
            Ok(())
        })
        .await
    }
}
