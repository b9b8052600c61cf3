//! The device lobby: every device the gateway knows and where it stands.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use rusqlite::{OptionalExtension, Row, params};
use serde::Serialize;

use crate::{Store, StoreError, Timestamp};

/// Where a device stands in its life at this site.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// Seen (an advert, a manifest line, a device API registration), not yet provisioned.
    Discovered,
    /// An onboarding session is under way.
    Provisioning,
    /// Holds the site's Wi-Fi credentials and reported a connection.
    Provisioned,
    /// Holds a certificate from the claiming authority.
    Claimed,
    /// The last onboarding attempt failed; it may be retried.
    Failed,
    /// Taken out of service by the operator; kept for its history.
    Retired,
}

impl DeviceState {
    /// Every state, in life order.
    pub const ALL: [Self; 6] = [
        Self::Discovered,
        Self::Provisioning,
        Self::Provisioned,
        Self::Claimed,
        Self::Failed,
        Self::Retired,
    ];

    /// The name stored in the database and shown to operators.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Discovered => "discovered",
            Self::Provisioning => "provisioning",
            Self::Provisioned => "provisioned",
            Self::Claimed => "claimed",
            Self::Failed => "failed",
            Self::Retired => "retired",
        }
    }
}

impl fmt::Display for DeviceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DeviceState {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| StoreError::Decode {
                what: "device state",
                detail: format!("unknown state {s:?}"),
            })
    }
}

/// A device as stored in the lobby.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Device {
    /// Stable id (its name or MAC address as onboarding found it).
    pub id: String,
    /// Selects the update handler.
    pub device_type: String,
    /// Compatibility property `manufacturer`.
    pub manufacturer: Option<String>,
    /// Compatibility property `model`.
    pub model: Option<String>,
    /// Further compatibility properties.
    pub compat: BTreeMap<String, String>,
    /// The firmware version the device last reported.
    pub firmware_version: Option<String>,
    /// Where it stands.
    pub state: DeviceState,
    /// When the gateway first recorded it.
    pub created_at: Timestamp,
    /// When this record last changed.
    pub updated_at: Timestamp,
    /// When the device was last heard from, if ever.
    pub last_seen_at: Option<Timestamp>,
}

/// The fields a caller supplies to record a device; the store keeps the timestamps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewDevice {
    /// See [`Device::id`].
    pub id: String,
    /// See [`Device::device_type`].
    pub device_type: String,
    /// See [`Device::manufacturer`].
    pub manufacturer: Option<String>,
    /// See [`Device::model`].
    pub model: Option<String>,
    /// See [`Device::compat`].
    pub compat: BTreeMap<String, String>,
    /// See [`Device::firmware_version`].
    pub firmware_version: Option<String>,
    /// See [`Device::state`].
    pub state: DeviceState,
}

impl NewDevice {
    /// A device with only the required fields set.
    pub fn new(id: impl Into<String>, device_type: impl Into<String>, state: DeviceState) -> Self {
        Self {
            id: id.into(),
            device_type: device_type.into(),
            manufacturer: None,
            model: None,
            compat: BTreeMap::new(),
            firmware_version: None,
            state,
        }
    }

    fn validate(&self) -> Result<(), StoreError> {
        validate_name("device id", &self.id)?;
        validate_name("device type", &self.device_type)
    }
}

/// Ids and type names end up in MQTT topics, URLs and log lines: keep them printable.
pub(crate) fn validate_name(what: &'static str, value: &str) -> Result<(), StoreError> {
    let reason = if value.is_empty() {
        "must not be empty".to_owned()
    } else if value.len() > 128 {
        format!("is {} bytes long; at most 128 are allowed", value.len())
    } else if let Some(c) = value.chars().find(|c| c.is_control()) {
        format!("contains the control character {c:?}")
    } else {
        return Ok(());
    };
    Err(StoreError::InvalidInput { what, reason })
}

const COLUMNS: &str = "id, device_type, manufacturer, model, compat, firmware_version, state, \
                       created_at, updated_at, last_seen_at";

fn from_row(row: &Row<'_>) -> Result<Device, StoreError> {
    let compat: String = row.get("compat")?;
    let state: String = row.get("state")?;
    Ok(Device {
        id: row.get("id")?,
        device_type: row.get("device_type")?,
        manufacturer: row.get("manufacturer")?,
        model: row.get("model")?,
        compat: serde_json::from_str(&compat).map_err(|err| StoreError::Decode {
            what: "compat properties",
            detail: err.to_string(),
        })?,
        firmware_version: row.get("firmware_version")?,
        state: state.parse()?,
        created_at: Timestamp::from_unix_millis(row.get("created_at")?),
        updated_at: Timestamp::from_unix_millis(row.get("updated_at")?),
        last_seen_at: row
            .get::<_, Option<i64>>("last_seen_at")?
            .map(Timestamp::from_unix_millis),
    })
}

fn query_one(conn: &rusqlite::Connection, id: &str) -> Result<Option<Device>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!("SELECT {COLUMNS} FROM devices WHERE id = ?1"))?;
    let mut rows = stmt.query([id])?;
    rows.next()?.map(from_row).transpose()
}

impl Store {
    /// Records a device, or updates every supplied field of an existing one (its
    /// `created_at` is kept). Returns the stored record.
    pub async fn upsert_device(&self, device: NewDevice) -> Result<Device, StoreError> {
        device.validate()?;
        self.call(move |conn| {
            let now = Timestamp::now().unix_millis();
            let compat =
                serde_json::to_string(&device.compat).map_err(|err| StoreError::InvalidInput {
                    what: "compat properties",
                    reason: err.to_string(),
                })?;
            conn.prepare_cached(
                "INSERT INTO devices (id, device_type, manufacturer, model, compat, \
                     firmware_version, state, created_at, updated_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8) \
                 ON CONFLICT (id) DO UPDATE SET device_type = excluded.device_type, \
                     manufacturer = excluded.manufacturer, model = excluded.model, \
                     compat = excluded.compat, firmware_version = excluded.firmware_version, \
                     state = excluded.state, updated_at = excluded.updated_at",
            )?
            .execute(params![
                device.id,
                device.device_type,
                device.manufacturer,
                device.model,
                compat,
                device.firmware_version,
                device.state.as_str(),
                now,
            ])?;
            query_one(conn, &device.id)?.ok_or(StoreError::NotFound {
                what: "device",
                id: device.id,
            })
        })
        .await
    }

    /// One device by id.
    pub async fn device(&self, id: &str) -> Result<Option<Device>, StoreError> {
        let id = id.to_owned();
        self.call(move |conn| query_one(conn, &id)).await
    }

    /// Every device, ordered by id.
    pub async fn list_devices(&self) -> Result<Vec<Device>, StoreError> {
        self.call(|conn| {
            let mut stmt =
                conn.prepare_cached(&format!("SELECT {COLUMNS} FROM devices ORDER BY id"))?;
            let mut rows = stmt.query([])?;
            let mut devices = Vec::new();
            while let Some(row) = rows.next()? {
                devices.push(from_row(row)?);
            }
            Ok(devices)
        })
        .await
    }

    /// Moves a device to `state`.
    pub async fn set_device_state(&self, id: &str, state: DeviceState) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.call(move |conn| {
            let changed = conn
                .prepare_cached("UPDATE devices SET state = ?2, updated_at = ?3 WHERE id = ?1")?
                .execute(params![id, state.as_str(), Timestamp::now().unix_millis()])?;
            if changed == 0 {
                return Err(StoreError::NotFound { what: "device", id });
            }
            Ok(())
        })
        .await
    }

    /// Records that the device was just heard from.
    pub async fn touch_device(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.call(move |conn| {
            let changed = conn
                .prepare_cached("UPDATE devices SET last_seen_at = ?2 WHERE id = ?1")?
                .execute(params![id, Timestamp::now().unix_millis()])?;
            if changed == 0 {
                return Err(StoreError::NotFound { what: "device", id });
            }
            Ok(())
        })
        .await
    }

    /// Loads device `id`, lets `change` edit what may change, and stores it (its type
    /// and lobby state are kept unless `change` sets them). [`StoreError::NotFound`]
    /// when the lobby does not have it.
    pub async fn update_device(
        &self,
        id: &str,
        change: impl FnOnce(&mut NewDevice),
    ) -> Result<Device, StoreError> {
        let known = self.device(id).await?.ok_or_else(|| StoreError::NotFound {
            what: "device",
            id: id.to_owned(),
        })?;
        let mut device = NewDevice {
            id: known.id,
            device_type: known.device_type,
            manufacturer: known.manufacturer,
            model: known.model,
            compat: known.compat,
            firmware_version: known.firmware_version,
            state: known.state,
        };
        change(&mut device);
        self.upsert_device(device).await
    }

    /// Whether a device with this id exists.
    pub async fn has_device(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_owned();
        self.call(move |conn| {
            Ok(conn
                .prepare_cached("SELECT 1 FROM devices WHERE id = ?1")?
                .query_row([id], |_| Ok(()))
                .optional()?
                .is_some())
        })
        .await
    }
}
