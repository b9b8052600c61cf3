//! Onboarding targets (the imported manifest) and the claims made for them.

use rusqlite::{Row, params};
use serde::Serialize;

use crate::devices::validate_name;
use crate::{Store, StoreError, Timestamp};

/// How the gateway reaches a device to onboard it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Bluetooth LE GATT (protocomm over BLE).
    Ble,
    /// The device's SoftAP HTTP server (protocomm over HTTP).
    Softap,
}

impl Transport {
    /// The name the manifest, the store and the API use.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Ble => "ble",
            Self::Softap => "softap",
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Transport {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ble" => Ok(Self::Ble),
            "softap" => Ok(Self::Softap),
            other => Err(format!("unknown transport {other:?} (ble or softap)")),
        }
    }
}

/// A device the operator asked to onboard.
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct OnboardingTarget {
    /// BLE name (e.g. `PROV_A1B2C3`) or MAC address; the lobby id of the device.
    pub name: String,
    /// Selects the update handler later.
    pub device_type: String,
    /// How it is reached.
    pub transport: Transport,
    /// MAC address, when known.
    pub mac: Option<String>,
    /// `host:port` of the device's SoftAP HTTP server.
    pub address: Option<String>,
    /// Security scheme 0, 1 or 2.
    pub security: u8,
    /// Security 1 proof of possession.
    #[serde(skip)]
    pub pop: Option<String>,
    /// Security 2 username.
    pub username: Option<String>,
    /// Security 2 password.
    #[serde(skip)]
    pub password: Option<String>,
    /// When the last attempt started, if any.
    pub last_attempt_at: Option<Timestamp>,
    /// Why the last attempt failed (absent after a success).
    pub last_error: Option<String>,
}

impl std::fmt::Debug for OnboardingTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnboardingTarget")
            .field("name", &self.name)
            .field("transport", &self.transport)
            .field("security", &self.security)
            .finish_non_exhaustive()
    }
}

/// A certificate a device obtained by assisted claiming.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Claim {
    /// The lobby id.
    pub device_id: String,
    /// The node id the authority assigned (the certificate's CN).
    pub node_id: String,
    /// PEM.
    pub certificate: String,
    /// Who signed it.
    pub authority: String,
    /// When.
    pub claimed_at: Timestamp,
    /// When the uplink reported it to the cloud; `None` while it waits.
    pub reported_at: Option<Timestamp>,
}

const TARGET_COLUMNS: &str = "name, device_type, transport, mac, address, security, pop, \
     username, password, last_attempt_at, last_error";

fn target_from_row(row: &Row<'_>) -> Result<OnboardingTarget, StoreError> {
    Ok(OnboardingTarget {
        name: row.get(0)?,
        device_type: row.get(1)?,
        transport: row
            .get::<_, String>(2)?
            .parse()
            .map_err(|detail| StoreError::Decode {
                what: "onboarding transport",
                detail,
            })?,
        mac: row.get(3)?,
        address: row.get(4)?,
        security: row.get(5)?,
        pop: row.get(6)?,
        username: row.get(7)?,
        password: row.get(8)?,
        last_attempt_at: row
            .get::<_, Option<i64>>(9)?
            .map(Timestamp::from_unix_millis),
        last_error: row.get(10)?,
    })
}

fn claim_from_row(row: &Row<'_>) -> Result<Claim, StoreError> {
    Ok(Claim {
        device_id: row.get(0)?,
        node_id: row.get(1)?,
        certificate: row.get(2)?,
        authority: row.get(3)?,
        claimed_at: Timestamp::from_unix_millis(row.get(4)?),
        reported_at: row
            .get::<_, Option<i64>>(5)?
            .map(Timestamp::from_unix_millis),
    })
}

impl Store {
    /// Records (or replaces, by name) every target in one transaction; nothing is written
    /// if any is invalid.
    pub async fn import_onboarding_targets(
        &self,
        targets: Vec<OnboardingTarget>,
    ) -> Result<usize, StoreError> {
        for target in &targets {
            validate_name("device name", &target.name)?;
            validate_name("device type", &target.device_type)?;
        }
        self.call(move |conn| {
            let tx = conn.transaction()?;
            let now = Timestamp::now().unix_millis();
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO onboarding_targets (name, device_type, transport, mac, address, \
                         security, pop, username, password, imported_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) \
                     ON CONFLICT (name) DO UPDATE SET device_type = excluded.device_type, \
                         transport = excluded.transport, mac = excluded.mac, \
                         address = excluded.address, security = excluded.security, \
                         pop = excluded.pop, username = excluded.username, \
                         password = excluded.password, imported_at = excluded.imported_at",
                )?;
                for t in &targets {
                    insert.execute(params![
                        t.name,
                        t.device_type,
                        t.transport.as_str(),
                        t.mac,
                        t.address,
                        t.security,
                        t.pop,
                        t.username,
                        t.password,
                        now
                    ])?;
                }
            }
            tx.commit()?;
            Ok(targets.len())
        })
        .await
    }

    /// Every target, by name.
    pub async fn onboarding_targets(&self) -> Result<Vec<OnboardingTarget>, StoreError> {
        self.call(|conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {TARGET_COLUMNS} FROM onboarding_targets ORDER BY name"
            ))?;
            let mut rows = stmt.query([])?;
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
                out.push(target_from_row(row)?);
            }
            Ok(out)
        })
        .await
    }

    /// Records the outcome of an attempt on `name` (`error` `None` = success).
    pub async fn record_onboarding_attempt(
        &self,
        name: &str,
        error: Option<String>,
    ) -> Result<(), StoreError> {
        let name = name.to_owned();
        self.call(move |conn| {
            conn.prepare_cached(
                "UPDATE onboarding_targets SET last_attempt_at = ?2, last_error = ?3 \
                 WHERE name = ?1",
            )?
            .execute(params![name, Timestamp::now().unix_millis(), error])?;
            Ok(())
        })
        .await
    }

    /// Records a claim (replacing an earlier one of the same device: it was re-claimed).
    pub async fn record_claim(
        &self,
        device_id: &str,
        node_id: &str,
        certificate: &str,
        authority: &str,
    ) -> Result<Claim, StoreError> {
        let (device_id, node_id, certificate, authority) = (
            device_id.to_owned(),
            node_id.to_owned(),
            certificate.to_owned(),
            authority.to_owned(),
        );
        self.call(move |conn| {
            let now = Timestamp::now();
            conn.prepare_cached(
                "INSERT INTO claims (device_id, node_id, certificate, authority, claimed_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5) \
                 ON CONFLICT (device_id) DO UPDATE SET node_id = excluded.node_id, \
                     certificate = excluded.certificate, authority = excluded.authority, \
                     claimed_at = excluded.claimed_at, reported_at = NULL",
            )?
            .execute(params![
                device_id,
                node_id,
                certificate,
                authority,
                now.unix_millis()
            ])?;
            Ok(Claim {
                device_id,
                node_id,
                certificate,
                authority,
                claimed_at: now,
                reported_at: None,
            })
        })
        .await
    }

    /// Every claim; with `unreported_only`, those the uplink has not reported yet, oldest
    /// first (what the uplink sends when it comes back).
    pub async fn claims(&self, unreported_only: bool) -> Result<Vec<Claim>, StoreError> {
        self.call(move |conn| {
            let mut stmt = conn.prepare_cached(if unreported_only {
                "SELECT device_id, node_id, certificate, authority, claimed_at, reported_at \
                 FROM claims WHERE reported_at IS NULL ORDER BY claimed_at"
            } else {
                "SELECT device_id, node_id, certificate, authority, claimed_at, reported_at \
                 FROM claims ORDER BY device_id"
            })?;
            let mut rows = stmt.query([])?;
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
                out.push(claim_from_row(row)?);
            }
            Ok(out)
        })
        .await
    }

    /// Marks a claim reported to the cloud.
    pub async fn mark_claim_reported(&self, device_id: &str) -> Result<(), StoreError> {
        let device_id = device_id.to_owned();
        self.call(move |conn| {
            conn.prepare_cached("UPDATE claims SET reported_at = ?2 WHERE device_id = ?1")?
                .execute(params![device_id, Timestamp::now().unix_millis()])?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(name: &str) -> OnboardingTarget {
        OnboardingTarget {
            name: name.into(),
            device_type: "esp-light".into(),
            transport: Transport::Ble,
            mac: None,
            address: None,
            security: 2,
            pop: None,
            username: Some("wifiprov".into()),
            password: Some("secret".into()),
            last_attempt_at: None,
            last_error: None,
        }
    }

    #[tokio::test]
    async fn targets_import_replace_and_record_attempts_and_claims_wait_for_the_uplink() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db")).await.unwrap();
        assert_eq!(
            store
                .import_onboarding_targets(vec![target("PROV_1"), target("PROV_2")])
                .await
                .unwrap(),
            2
        );
        let mut again = target("PROV_1");
        again.security = 1;
        store.import_onboarding_targets(vec![again]).await.unwrap();
        let targets = store.onboarding_targets().await.unwrap();
        assert_eq!(targets.len(), 2);
        assert_eq!(targets[0].security, 1);
        assert_eq!(targets[1].password.as_deref(), Some("secret"));
        // An invalid name refuses the whole import.
        assert!(
            store
                .import_onboarding_targets(vec![target("PROV_3"), target("")])
                .await
                .is_err()
        );
        assert_eq!(store.onboarding_targets().await.unwrap().len(), 2);

        store
            .record_onboarding_attempt("PROV_2", Some("proof of possession rejected".into()))
            .await
            .unwrap();
        let failed = &store.onboarding_targets().await.unwrap()[1];
        assert!(failed.last_attempt_at.is_some());
        assert_eq!(
            failed.last_error.as_deref(),
            Some("proof of possession rejected")
        );

        store
            .record_claim("PROV_1", "node-1", "PEM", "local-ca:test")
            .await
            .unwrap();
        assert_eq!(store.claims(true).await.unwrap().len(), 1);
        store.mark_claim_reported("PROV_1").await.unwrap();
        assert!(store.claims(true).await.unwrap().is_empty());
        assert!(store.claims(false).await.unwrap()[0].reported_at.is_some());
        store.close().await.unwrap();
    }
}
