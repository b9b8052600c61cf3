//! The BLE central: scan, connect, endpoint map, write-then-read.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use btleplug::api::{
    BDAddr, Central as _, CentralEvent, Characteristic, Manager as _, Peripheral as _, ScanFilter,
    WriteType,
};
use btleplug::platform::{Adapter, Manager, Peripheral, PeripheralId};
use futures_util::StreamExt;
use outpost_protocomm::{
    BLE_MAX_PAYLOAD, DEFAULT_SERVICE_UUID, EXAMPLE_SERVICE_UUID, STANDARD_ENDPOINT_IDS,
    endpoint_uuid,
};
use tokio::sync::Mutex;
use tracing::{debug, info};
use uuid::Uuid;

use crate::{Error, Timeouts};

/// The Characteristic User Description descriptor that names each endpoint.
/// How long a write whose reply was lost (see [`reply_lost`]) gets to reach the device
/// before its answer is read.
const LOST_REPLY_GRACE: Duration = Duration::from_millis(50);
/// Reads whose reply was lost are asked again at most this often.
const LOST_REPLY_READS: u32 = 3;

/// dbus-tokio (under btleplug's BlueZ backend) can fail a D-Bus call with "Failed to send
/// message" although it queued the call: when several tasks send while its connection
/// task is woken but not yet running, the waker refuses and the caller gets that error,
/// yet the queued message still goes out. Only the reply is lost. Seen with 100 devices
/// onboarding at once.
fn reply_lost(err: &btleplug::Error) -> bool {
    err.to_string().contains("Failed to send message")
}

const USER_DESCRIPTION: Uuid = Uuid::from_u128(0x0000_2901_0000_1000_8000_0080_5f9b_34fb);

/// The name prefix Espressif's apps look for.
pub const NAME_PREFIX: &str = "PROV_";

/// A provisioning device seen while scanning.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Advert {
    /// btleplug's handle for it.
    pub id: PeripheralId,
    /// Its Bluetooth address.
    pub address: BDAddr,
    /// Its advertised local name.
    pub name: Option<String>,
    /// The 128-bit service UUIDs it advertises.
    pub services: Vec<Uuid>,
    /// The signal strength of its last advertisement, in dBm, when the adapter reports it.
    pub rssi: Option<i16>,
}

impl Advert {
    /// Whether it looks like a provisioning device: a known service UUID or a `PROV_` name.
    pub fn is_provisioning(&self) -> bool {
        self.services.iter().any(known_service)
            || self
                .name
                .as_deref()
                .is_some_and(|name| name.starts_with(NAME_PREFIX))
    }

    /// Whether `key` (a name or a MAC address, any case) names this device.
    pub fn matches(&self, key: &str) -> bool {
        self.name.as_deref() == Some(key) || self.address.to_string().eq_ignore_ascii_case(key)
    }
}

fn known_service(uuid: &Uuid) -> bool {
    [DEFAULT_SERVICE_UUID, EXAMPLE_SERVICE_UUID]
        .iter()
        .any(|known| Uuid::parse_str(known).is_ok_and(|k| &k == uuid))
}

/// A BLE adapter used as the gateway's central.
#[derive(Clone)]
pub struct Central {
    adapter: Adapter,
    name: String,
    /// BlueZ handles one LE connection attempt per adapter at a time; so do we.
    connecting: Arc<Mutex<()>>,
    timeouts: Timeouts,
}

impl Central {
    /// Opens the adapter named `wanted` (e.g. `hci0`), or the first one. BlueZ is
    /// reached on the system bus (`DBUS_SYSTEM_BUS_ADDRESS` when set).
    pub async fn open(wanted: Option<&str>, timeouts: Timeouts) -> Result<Self, Error> {
        let manager = Manager::new().await?;
        let mut found = Vec::new();
        for adapter in manager.adapters().await? {
            let info = adapter.adapter_info().await?;
            let name = info
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned();
            if wanted.is_none_or(|w| w == name) {
                info!(adapter = %name, "BLE adapter opened");
                return Ok(Self {
                    adapter,
                    name,
                    connecting: Arc::new(Mutex::new(())),
                    timeouts,
                });
            }
            found.push(name);
        }
        Err(Error::NoAdapter(match wanted {
            Some(w) => format!(
                "Bluetooth adapter {w} not found (BlueZ has: {})",
                if found.is_empty() {
                    "none".to_owned()
                } else {
                    found.join(", ")
                }
            ),
            None => "BlueZ has no Bluetooth adapter".to_owned(),
        }))
    }

    /// The adapter's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Scans for provisioning devices until every name or address in `wanted` has been
    /// seen (or `timeout`), then a little longer (`settle`) so that two devices
    /// advertising one name are both seen. Returns every provisioning device found.
    pub async fn scan(
        &self,
        wanted: &[String],
        timeout: Duration,
        settle: Duration,
    ) -> Result<Vec<Advert>, Error> {
        let mut events = self.adapter.events().await?;
        let services = [DEFAULT_SERVICE_UUID, EXAMPLE_SERVICE_UUID]
            .iter()
            .filter_map(|s| Uuid::parse_str(s).ok())
            .collect();
        self.adapter.start_scan(ScanFilter { services }).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut seen: BTreeMap<PeripheralId, Advert> = BTreeMap::new();
        let mut settle_until = None;
        loop {
            for advert in self.adverts().await? {
                seen.insert(advert.id.clone(), advert);
            }
            let all_found = wanted
                .iter()
                .all(|key| seen.values().any(|advert| advert.matches(key)));
            if all_found && settle_until.is_none() {
                settle_until = Some(tokio::time::Instant::now() + settle);
            }
            let until = settle_until.map_or(deadline, |s| s.min(deadline));
            if tokio::time::Instant::now() >= until {
                break;
            }
            // Wake on the next discovery/update event, or at the deadline.
            tokio::select! {
                event = events.next() => match event {
                    Some(CentralEvent::DeviceDiscovered(_) | CentralEvent::DeviceUpdated(_)) => {}
                    Some(_) => continue,
                    None => break,
                },
                () = tokio::time::sleep_until(until) => {}
            }
        }
        self.adapter.stop_scan().await?;
        Ok(seen.into_values().collect())
    }

    /// Every provisioning device heard during `listen`.
    pub async fn nearby(&self, listen: Duration) -> Result<Vec<Advert>, Error> {
        // Nothing is wanted, so the scan settles at once and then listens for `settle`.
        self.scan(&[], listen, listen).await
    }

    async fn adverts(&self) -> Result<Vec<Advert>, Error> {
        let mut out = Vec::new();
        for peripheral in self.adapter.peripherals().await? {
            let Some(props) = peripheral.properties().await? else {
                continue;
            };
            let advert = Advert {
                id: peripheral.id(),
                address: props.address,
                name: props.local_name.or(props.advertisement_name),
                services: props.services,
                rssi: props.rssi,
            };
            if advert.is_provisioning() {
                out.push(advert);
            }
        }
        Ok(out)
    }

    /// Connects to a device and maps its endpoints. Connection attempts on this adapter
    /// run one at a time.
    pub async fn connect(&self, advert: &Advert) -> Result<BleLink, Error> {
        let peripheral = self.adapter.peripheral(&advert.id).await?;
        let during = format!("connect to {}", advert.address);
        {
            let _turn = self.connecting.lock().await;
            let connect = async {
                if !peripheral.is_connected().await? {
                    peripheral.connect().await?;
                }
                peripheral.discover_services().await
            };
            tokio::time::timeout(self.timeouts.connect, connect)
                .await
                .map_err(|_| Error::Timeout {
                    during: during.clone(),
                    after: self.timeouts.connect,
                })??;
        }
        match map_endpoints(&peripheral, &advert.services).await {
            Ok(endpoints) => {
                debug!(device = %advert.address, endpoints = ?endpoints.keys().collect::<Vec<_>>(), "GATT endpoints mapped");
                Ok(BleLink {
                    peripheral,
                    endpoints,
                    timeout: self.timeouts.request,
                })
            }
            Err(err) => {
                let _ = peripheral.disconnect().await;
                Err(err)
            }
        }
    }
}

/// Builds the endpoint-name → characteristic map from the 0x2901 user descriptions of
/// the provisioning service; a legacy device without descriptors gets the standard
/// endpoints by their fixed 16-bit ids.
async fn map_endpoints(
    peripheral: &Peripheral,
    advertised: &[Uuid],
) -> Result<HashMap<String, Characteristic>, Error> {
    let services = peripheral.services();
    let service = services
        .iter()
        .find(|s| advertised.contains(&s.uuid) && s.characteristics.len() > 1)
        .or_else(|| services.iter().find(|s| known_service(&s.uuid)))
        .ok_or_else(|| {
            Error::MissingEndpoint("provisioning service (none of the GATT services)".into())
        })?;
    let mut endpoints = HashMap::new();
    for characteristic in &service.characteristics {
        let Some(descriptor) = characteristic
            .descriptors
            .iter()
            .find(|d| d.uuid == USER_DESCRIPTION)
        else {
            continue;
        };
        let name = peripheral.read_descriptor(descriptor).await?;
        let name = String::from_utf8_lossy(&name)
            .trim_end_matches('\0')
            .to_owned();
        endpoints.insert(name, characteristic.clone());
    }
    if endpoints.is_empty() {
        let service_uuid = service.uuid.to_string();
        for (name, id) in STANDARD_ENDPOINT_IDS {
            let Ok(uuid) = Uuid::parse_str(&endpoint_uuid(&service_uuid, id)) else {
                continue;
            };
            if let Some(c) = service.characteristics.iter().find(|c| c.uuid == uuid) {
                endpoints.insert(name.to_owned(), c.clone());
            }
        }
    }
    Ok(endpoints)
}

/// A connected device: endpoint map plus write-then-read.
pub struct BleLink {
    peripheral: Peripheral,
    endpoints: HashMap<String, Characteristic>,
    timeout: Duration,
}

impl BleLink {
    /// The largest request or response (NimBLE's 512 bytes).
    pub fn max_payload(&self) -> usize {
        BLE_MAX_PAYLOAD
    }

    /// Whether the GATT table has `endpoint`.
    pub fn has_endpoint(&self, endpoint: &str) -> bool {
        self.endpoints.contains_key(endpoint)
    }

    /// Write-with-response of the whole request, then a read of the same characteristic.
    pub async fn exchange(&mut self, endpoint: &str, request: &[u8]) -> Result<Vec<u8>, Error> {
        let characteristic = self
            .endpoints
            .get(endpoint)
            .ok_or_else(|| Error::MissingEndpoint(endpoint.to_owned()))?;
        let round = async {
            match self
                .peripheral
                .write(characteristic, request, WriteType::WithResponse)
                .await
            {
                Ok(()) => {}
                // The write went out; give it time to land before reading its answer (a
                // stale answer would fail the session's decoding or crypto, not pass).
                Err(err) if reply_lost(&err) => {
                    debug!(%err, endpoint, "write queued but its reply was lost");
                    tokio::time::sleep(LOST_REPLY_GRACE).await;
                }
                Err(err) => return Err(err),
            }
            let mut reads = 1;
            loop {
                match self.peripheral.read(characteristic).await {
                    // Reading again is harmless: the answer stays until the next write.
                    Err(err) if reply_lost(&err) && reads < LOST_REPLY_READS => {
                        debug!(%err, endpoint, "read reply lost; reading again");
                        reads += 1;
                    }
                    other => return other,
                }
            }
        };
        let response = tokio::time::timeout(self.timeout, round)
            .await
            .map_err(|_| Error::Timeout {
                during: endpoint.to_owned(),
                after: self.timeout,
            })?
            .map_err(|err| Error::Dropped {
                during: endpoint.to_owned(),
                detail: err.to_string(),
            })?;
        Ok(response)
    }

    /// Disconnects.
    pub async fn close(self) {
        if let Err(err) = self.peripheral.disconnect().await {
            debug!(%err, "disconnect failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_dbus_tokios_refused_send_counts_as_a_lost_reply() {
        let lost = btleplug::Error::Other("D-Bus error: Failed to send message".into());
        assert!(reply_lost(&lost));
        for other in [
            btleplug::Error::NotConnected,
            btleplug::Error::Other("org.bluez.Error.Failed: Not connected".into()),
            btleplug::Error::TimedOut(Duration::from_secs(1)),
        ] {
            assert!(!reply_lost(&other), "{other}");
        }
    }
}
