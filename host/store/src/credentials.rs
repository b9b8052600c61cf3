//! Device credentials: the bearer tokens devices present to the local device API.
//!
//! A token is shown once, when it is issued; the store keeps only its SHA-256. Issuing
//! a new token replaces the old one at once, and [`Store::revoke_device_credential`]
//! removes it: both also clear the in-memory copy the checks use, so a replaced or
//! revoked token stops working with the next request, not at the next restart.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use rusqlite::{OptionalExtension, params};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::{Store, StoreError, Timestamp};

/// The prefix of every device token (`opd_` + 64 hex digits).
pub const DEVICE_TOKEN_PREFIX: &str = "opd_";

/// The hashes of device tokens, by device id, as loaded from the store.
#[derive(Clone, Debug, Default)]
pub(crate) struct CredentialCache {
    known: Arc<RwLock<HashMap<String, [u8; 32]>>>,
}

impl CredentialCache {
    fn get(&self, device_id: &str) -> Option<[u8; 32]> {
        self.known
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(device_id)
            .copied()
    }

    fn set(&self, device_id: &str, hash: Option<[u8; 32]>) {
        let mut known = self
            .known
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match hash {
            Some(hash) => known.insert(device_id.to_owned(), hash),
            None => known.remove(device_id),
        };
    }
}

/// 32 random bytes from the OS as 64 hex digits.
pub fn random_hex_token() -> Result<String, StoreError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|err| StoreError::Entropy(err.to_string()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

impl Store {
    /// Issues a new token for `device_id` (which must be in the lobby), replacing any
    /// earlier one. Returns the token; only its hash is kept, so show it once.
    pub async fn issue_device_credential(&self, device_id: &str) -> Result<String, StoreError> {
        if !self.has_device(device_id).await? {
            return Err(StoreError::NotFound {
                what: "device",
                id: device_id.to_owned(),
            });
        }
        let token = format!("{DEVICE_TOKEN_PREFIX}{}", random_hex_token()?);
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let id = device_id.to_owned();
        self.call(move |conn| {
            conn.execute(
                "INSERT INTO device_credentials (device_id, token_sha256, created_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (device_id) DO UPDATE SET token_sha256 = excluded.token_sha256, \
                 created_at = excluded.created_at",
                params![id, hash.to_vec(), Timestamp::now().unix_millis()],
            )?;
            Ok(())
        })
        .await?;
        self.credentials.set(device_id, Some(hash));
        Ok(token)
    }

    /// Whether `token` is `device_id`'s current credential (compared in constant time).
    pub async fn check_device_credential(
        &self,
        device_id: &str,
        token: &str,
    ) -> Result<bool, StoreError> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let expected = match self.credentials.get(device_id) {
            Some(hash) => Some(hash),
            None => {
                let id = device_id.to_owned();
                let loaded = self
                    .call(move |conn| {
                        Ok(conn
                            .query_row(
                                "SELECT token_sha256 FROM device_credentials WHERE device_id = ?1",
                                [id],
                                |row| row.get::<_, Vec<u8>>(0),
                            )
                            .optional()?)
                    })
                    .await?;
                let hash = loaded.and_then(|bytes| <[u8; 32]>::try_from(bytes).ok());
                if hash.is_some() {
                    self.credentials.set(device_id, hash);
                }
                hash
            }
        };
        Ok(expected.is_some_and(|hash| bool::from(hash.ct_eq(&digest))))
    }

    /// The devices that hold a credential for the device API: those that run the Outpost
    /// agent (handed one at onboarding, or issued one by the operator).
    pub async fn devices_with_credentials(
        &self,
    ) -> Result<std::collections::HashSet<String>, StoreError> {
        self.call(|conn| {
            let mut stmt = conn.prepare_cached("SELECT device_id FROM device_credentials")?;
            let ids = stmt
                .query_map([], |row| row.get::<_, String>(0))?
                .collect::<Result<_, _>>()?;
            Ok(ids)
        })
        .await
    }

    /// Revokes `device_id`'s credential at once. True when there was one.
    pub async fn revoke_device_credential(&self, device_id: &str) -> Result<bool, StoreError> {
        let id = device_id.to_owned();
        let removed = self
            .call(move |conn| {
                Ok(conn.execute("DELETE FROM device_credentials WHERE device_id = ?1", [id])?)
            })
            .await?;
        self.credentials.set(device_id, None);
        Ok(removed > 0)
    }
}

#[cfg(test)]
mod tests {
    use crate::{DeviceState, NewDevice, Store, StoreError};

    #[tokio::test]
    async fn a_replaced_or_revoked_token_stops_working_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("s.db")).await.unwrap();
        assert!(matches!(
            store.issue_device_credential("ghost").await,
            Err(StoreError::NotFound { .. })
        ));
        store
            .upsert_device(NewDevice::new("esp-1", "light", DeviceState::Provisioned))
            .await
            .unwrap();
        let first = store.issue_device_credential("esp-1").await.unwrap();
        assert!(first.starts_with(super::DEVICE_TOKEN_PREFIX) && first.len() == 68);
        assert!(
            store
                .check_device_credential("esp-1", &first)
                .await
                .unwrap()
        );
        assert!(
            !store
                .check_device_credential("esp-2", &first)
                .await
                .unwrap()
        );
        assert!(
            !store
                .check_device_credential("esp-1", "opd_guess")
                .await
                .unwrap()
        );
        // Replaced: the old one fails with the very next check (it was cached).
        let second = store.issue_device_credential("esp-1").await.unwrap();
        assert!(
            !store
                .check_device_credential("esp-1", &first)
                .await
                .unwrap()
        );
        assert!(
            store
                .check_device_credential("esp-1", &second)
                .await
                .unwrap()
        );
        // Only the hash is kept.
        let stored: Vec<u8> = store
            .call(|c| {
                Ok(c.query_row(
                    "SELECT token_sha256 FROM device_credentials WHERE device_id = 'esp-1'",
                    [],
                    |r| r.get(0),
                )?)
            })
            .await
            .unwrap();
        assert_eq!(stored.len(), 32);
        assert!(!String::from_utf8_lossy(&stored).contains(&second[4..]));
        // Revoked: gone at once, and a second revoke finds nothing.
        assert!(store.revoke_device_credential("esp-1").await.unwrap());
        assert!(
            !store
                .check_device_credential("esp-1", &second)
                .await
                .unwrap()
        );
        assert!(!store.revoke_device_credential("esp-1").await.unwrap());
        // A fresh handle on the same file (another process) agrees.
        let third = store.issue_device_credential("esp-1").await.unwrap();
        store.close().await.unwrap();
        let reopened = Store::open(dir.path().join("s.db")).await.unwrap();
        assert!(
            reopened
                .check_device_credential("esp-1", &third)
                .await
                .unwrap()
        );
        reopened.close().await.unwrap();
    }
}
