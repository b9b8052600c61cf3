//! Tokens for the local API, each with a [`Role`].
//!
//! A token is shown once, when it is made; the store keeps only its SHA-256, with a name
//! and a role. Checks read an in-memory copy of the table, which every create and revoke
//! updates in the same call, so a revoked token stops working with the next request.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, RwLock};

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};
use rusqlite::{Connection, params};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::credentials::random_hex_token;
use crate::{Store, StoreError, Timestamp};

/// The prefix of every API token (`opa_` + 64 hex digits).
pub const API_TOKEN_PREFIX: &str = "opa_";

/// What a token may do on the local API. Each role may do everything the ones below it
/// may.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads: every `GET`, the dashboard, `/metrics`.
    Viewer,
    /// Runs the site: onboarding, rollouts, firmware, groups, device credentials; not
    /// handler trust (installing or removing handlers) and not tokens.
    Operator,
    /// Everything.
    Admin,
}

impl Role {
    /// Every role, lowest first.
    pub const ALL: [Self; 3] = [Self::Viewer, Self::Operator, Self::Admin];

    /// The name the API, the CLI and the store use.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Operator => "operator",
            Self::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("{s:?} is not a role: use viewer, operator or admin"))
    }
}

impl ToSql for Role {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.as_str()))
    }
}

impl FromSql for Role {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        value
            .as_str()?
            .parse()
            .map_err(|e: String| FromSqlError::Other(e.into()))
    }
}

/// A token as listed: never the token itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ApiToken {
    /// Its unique name (who or what holds it).
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// When it was made (unix milliseconds).
    pub created_at: i64,
}

/// Tokens by the SHA-256 of the token.
type ByHash = HashMap<[u8; 32], ApiToken>;

/// The table in memory; loaded at the first check.
#[derive(Clone, Debug, Default)]
pub(crate) struct TokenCache {
    known: Arc<RwLock<Option<ByHash>>>,
}

impl TokenCache {
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Option<ByHash>> {
        self.known
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn load(conn: &Connection) -> Result<ByHash, StoreError> {
    let mut query = conn.prepare_cached(
        "SELECT token_sha256, name, role, created_at FROM api_tokens ORDER BY name",
    )?;
    let rows = query.query_map([], |row| {
        Ok((
            row.get::<_, Vec<u8>>(0)?,
            ApiToken {
                name: row.get(1)?,
                role: row.get(2)?,
                created_at: row.get(3)?,
            },
        ))
    })?;
    let mut known = HashMap::new();
    for row in rows {
        let (hash, token) = row?;
        if let Ok(hash) = <[u8; 32]>::try_from(hash) {
            known.insert(hash, token);
        }
    }
    Ok(known)
}

/// 1 to 64 of letters, digits, `.`, `_`, `-`.
fn check_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidInput {
            what: "token name",
            reason: format!("{name:?}: use 1 to 64 of letters, digits, '.', '_', '-'"),
        })
    }
}

impl Store {
    /// Makes a token named `name` with `role`. Returns the token; only its hash is
    /// kept, so show it once. A name already in use is [`StoreError::InvalidInput`].
    pub async fn create_api_token(&self, name: &str, role: Role) -> Result<String, StoreError> {
        check_name(name)?;
        let token = format!("{API_TOKEN_PREFIX}{}", random_hex_token()?);
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let entry = ApiToken {
            name: name.to_owned(),
            role,
            created_at: Timestamp::now().unix_millis(),
        };
        let cache = self.api_tokens.clone();
        self.call(move |conn| {
            let inserted = conn.execute(
                "INSERT INTO api_tokens (name, role, token_sha256, created_at) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (name) DO NOTHING",
                params![entry.name, entry.role, hash.to_vec(), entry.created_at],
            )?;
            if inserted == 0 {
                return Err(StoreError::Exists {
                    what: "API token",
                    id: entry.name,
                });
            }
            // Updated on the store's thread, in order with every other change.
            if let Some(known) = cache.write().as_mut() {
                known.insert(hash, entry);
            }
            Ok(())
        })
        .await?;
        Ok(token)
    }

    /// Every token, by name.
    pub async fn list_api_tokens(&self) -> Result<Vec<ApiToken>, StoreError> {
        let mut tokens: Vec<ApiToken> = self
            .call(|conn| Ok(load(conn)?.into_values().collect()))
            .await?;
        tokens.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(tokens)
    }

    /// Revokes the token named `name` at once. True when there was one.
    pub async fn revoke_api_token(&self, name: &str) -> Result<bool, StoreError> {
        let name = name.to_owned();
        let cache = self.api_tokens.clone();
        self.call(move |conn| {
            let removed = conn.execute("DELETE FROM api_tokens WHERE name = ?1", [&name])?;
            if let Some(known) = cache.write().as_mut() {
                known.retain(|_, token| token.name != name);
            }
            Ok(removed > 0)
        })
        .await
    }

    /// The token `presented` is, if it is one. Only its SHA-256 is looked up, so the
    /// lookup's timing says nothing about the token.
    pub async fn check_api_token(&self, presented: &str) -> Result<Option<ApiToken>, StoreError> {
        if !presented.starts_with(API_TOKEN_PREFIX) {
            return Ok(None);
        }
        let hash: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        if let Some(known) = self
            .api_tokens
            .known
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
        {
            return Ok(known.get(&hash).cloned());
        }
        let cache = self.api_tokens.clone();
        self.call(move |conn| {
            let mut slot = cache.write();
            if slot.is_none() {
                *slot = Some(load(conn)?);
            }
            Ok(slot.as_ref().and_then(|known| known.get(&hash).cloned()))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tokens_are_kept_hashed_checked_by_role_and_revoked_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("s.db")).await.unwrap();
        // A check before any token exists loads the (empty) table.
        assert_eq!(store.check_api_token("opa_00").await.unwrap(), None);
        let viewer = store
            .create_api_token("grafana", Role::Viewer)
            .await
            .unwrap();
        let operator = store
            .create_api_token("night-shift", Role::Operator)
            .await
            .unwrap();
        assert!(viewer.starts_with(API_TOKEN_PREFIX) && viewer.len() == 68);
        let checked = store.check_api_token(&viewer).await.unwrap().unwrap();
        assert_eq!(
            (checked.name.as_str(), checked.role),
            ("grafana", Role::Viewer)
        );
        assert_eq!(
            store
                .check_api_token(&operator)
                .await
                .unwrap()
                .unwrap()
                .role,
            Role::Operator
        );
        assert_eq!(store.check_api_token("opa_nope").await.unwrap(), None);
        assert_eq!(store.check_api_token("not-even-ours").await.unwrap(), None);

        // Names are unique and plain.
        let again = store.create_api_token("grafana", Role::Admin).await;
        assert!(matches!(again, Err(StoreError::Exists { .. })), "{again:?}");
        let odd = store.create_api_token("a b", Role::Admin).await;
        assert!(
            matches!(odd, Err(StoreError::InvalidInput { .. })),
            "{odd:?}"
        );

        // Only hashes are stored.
        let token = viewer.clone();
        let stored: Vec<Vec<u8>> = store
            .call(|conn| {
                let mut q = conn.prepare("SELECT token_sha256 FROM api_tokens")?;
                let rows = q
                    .query_map([], |r| r.get(0))?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            })
            .await
            .unwrap();
        assert!(
            stored
                .iter()
                .all(|h| h.len() == 32 && h.as_slice() != token.as_bytes())
        );

        let listed = store.list_api_tokens().await.unwrap();
        let names: Vec<_> = listed.iter().map(|t| (t.name.as_str(), t.role)).collect();
        assert_eq!(
            names,
            [("grafana", Role::Viewer), ("night-shift", Role::Operator)]
        );

        assert!(store.revoke_api_token("grafana").await.unwrap());
        assert_eq!(store.check_api_token(&viewer).await.unwrap(), None);
        assert!(!store.revoke_api_token("grafana").await.unwrap());
        assert!(store.check_api_token(&operator).await.unwrap().is_some());

        // A fresh store (a restart) reads the same from the file.
        store.close().await.unwrap();
        let store = Store::open(dir.path().join("s.db")).await.unwrap();
        assert_eq!(store.check_api_token(&viewer).await.unwrap(), None);
        assert_eq!(
            store
                .check_api_token(&operator)
                .await
                .unwrap()
                .unwrap()
                .name,
            "night-shift"
        );
    }
}
