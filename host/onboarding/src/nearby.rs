//! The provisioning devices the gateway's radio hears now, and adopting one of them as an
//! onboarding target: what an installer does with a phone app, without the phone.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use outpost_ble::central::Advert;
use outpost_ble::{Link, ProvClient};
use serde::{Deserialize, Serialize};

use crate::{ImportDefaults, Onboarder, OnboardingError};

/// The longest a nearby scan may listen.
pub const MAX_LISTEN: Duration = Duration::from_secs(30);

/// The most devices one scan connects to for their proto-ver (the strongest first).
pub const MAX_DETAILED: usize = 16;

/// A provisioning device the adapter heard.
#[derive(Clone, Debug, Serialize)]
pub struct NearbyDevice {
    /// Its advertised name (`PROV_…`), when it sends one.
    pub name: Option<String>,
    /// Its Bluetooth address.
    pub address: String,
    /// The signal strength of its last advertisement (dBm), when the adapter reports it.
    pub rssi: Option<i16>,
    /// The imported onboarding target of that name or address, if there is one.
    pub target: Option<String>,
    /// What its `proto-ver` says, when the scan was asked for details.
    pub details: Option<DeviceDetails>,
    #[serde(skip)]
    advert: Advert,
}

/// A device's `proto-ver`, read over a short BLE connection.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DeviceDetails {
    /// The security version it runs (0, 1 or 2).
    pub security: Option<u8>,
    /// Its provisioning version (`v1.1`, `netprov-v1.2`, …).
    pub version: Option<String>,
    /// The provisioning capabilities (`wifi_scan`, `no_pop`, …).
    pub capabilities: Vec<String>,
    /// Application entries and their capabilities (`rmaker: [claim]`,
    /// `outpost: [agent]`).
    pub apps: BTreeMap<String, Vec<String>>,
    /// Why it could not be read.
    pub error: Option<String>,
}

/// `adopt`: a nearby device, its type and its secret become an onboarding target.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdoptRequest {
    /// The device's address or advertised name, as the last nearby scan listed it.
    pub device: String,
    /// Its device type (selects the update handler).
    pub device_type: String,
    /// The Security 1 proof of possession, or the Security 2 password (ESP-IDF's QR
    /// codes call both `pop`).
    #[serde(default)]
    pub pop: Option<String>,
    /// The Security 2 username.
    #[serde(default)]
    pub username: Option<String>,
    /// Its security version; by default what its `proto-ver` says.
    #[serde(default)]
    pub security: Option<u8>,
}

/// What `adopt` made.
#[derive(Clone, Debug, Serialize)]
pub struct Adopted {
    /// The target's name (the advertised name, or the address).
    pub name: String,
    /// The device's address.
    pub address: String,
    /// The security version it is onboarded with.
    pub security: u8,
}

impl Onboarder {
    /// Listens for `listen` (at most [`MAX_LISTEN`]) and lists the provisioning devices
    /// heard, strongest first; with `details`, connects to each in turn and reads its
    /// `proto-ver`. Refused while a run uses the radio. The list is kept for
    /// [`Onboarder::adopt`].
    pub async fn nearby(
        &self,
        listen: Duration,
        details: bool,
    ) -> Result<Vec<NearbyDevice>, OnboardingError> {
        if !self.settings.ble_enabled {
            return Err(OnboardingError::Refused(
                "BLE onboarding is disabled in the config (ble.enabled)".into(),
            ));
        }
        if listen.is_zero() || listen > MAX_LISTEN {
            return Err(OnboardingError::Invalid(format!(
                "a nearby scan listens for 1 to {} seconds",
                MAX_LISTEN.as_secs()
            )));
        }
        if self.runs_in_flight() {
            return Err(OnboardingError::Refused(
                "a run is using the radio: scan again when it is done".into(),
            ));
        }
        let _radio = self.radio_or_busy()?;
        let central = self
            .central()
            .await
            .map_err(|e| OnboardingError::Refused(format!("{e:#}")))?;
        let adverts = central
            .nearby(listen)
            .await
            .map_err(|e| OnboardingError::Refused(format!("BLE scan failed: {e}")))?;
        let targets = self.store.onboarding_targets().await?;
        let mut devices: Vec<NearbyDevice> = adverts
            .into_iter()
            .map(|advert| {
                let address = advert.address.to_string();
                let target = targets
                    .iter()
                    .find(|t| {
                        t.mac
                            .as_deref()
                            .is_some_and(|m| m.eq_ignore_ascii_case(&address))
                            || advert.name.as_deref() == Some(t.name.as_str())
                    })
                    .map(|t| t.name.clone());
                NearbyDevice {
                    name: advert.name.clone(),
                    address,
                    rssi: advert.rssi,
                    target,
                    details: None,
                    advert,
                }
            })
            .collect();
        devices.sort_by_key(|d| std::cmp::Reverse(d.rssi.unwrap_or(i16::MIN)));
        if details {
            for (index, device) in devices.iter_mut().enumerate() {
                device.details = Some(if index < MAX_DETAILED {
                    self.details(&device.advert).await
                } else {
                    DeviceDetails {
                        error: Some(format!(
                            "not read: a scan reads at most {MAX_DETAILED} devices' proto-ver"
                        )),
                        ..DeviceDetails::default()
                    }
                });
            }
        } else {
            // What an earlier scan read of a device still holds: no needless connection.
            let earlier = self.nearby.lock().expect("nearby lock");
            for device in &mut devices {
                device.details = earlier
                    .iter()
                    .find(|e| e.address == device.address && e.name == device.name)
                    .and_then(|e| e.details.clone())
                    .filter(|d| d.error.is_none());
            }
        }
        *self.nearby.lock().expect("nearby lock") = devices.clone();
        Ok(devices)
    }

    /// Reads a device's `proto-ver` over a short connection.
    async fn details(&self, advert: &Advert) -> DeviceDetails {
        let read = async {
            let link = self.central().await?.connect(advert).await?;
            let mut client = ProvClient::new(Link::Ble(link));
            let version = client.version().await;
            client.close().await;
            anyhow::Ok(version?)
        };
        match read.await {
            Ok(version) => DeviceDetails {
                security: version.security().ok().map(|s| s.number()),
                version: Some(version.prov.ver.clone()),
                capabilities: version.prov.cap.clone(),
                apps: version
                    .apps
                    .iter()
                    .map(|(name, app)| (name.clone(), app.cap.clone()))
                    .collect(),
                error: None,
            },
            Err(err) => DeviceDetails {
                error: Some(format!("{err:#}")),
                ..DeviceDetails::default()
            },
        }
    }

    /// Makes a device of the last nearby scan an onboarding target (replacing one of the
    /// same name), with its type and secret; `outpost onboard run` then onboards it.
    pub async fn adopt(&self, request: AdoptRequest) -> Result<Adopted, OnboardingError> {
        let seen = self
            .nearby
            .lock()
            .expect("nearby lock")
            .iter()
            .find(|d| {
                d.address.eq_ignore_ascii_case(&request.device)
                    || d.name.as_deref() == Some(request.device.as_str())
            })
            .cloned();
        let Some(device) = seen else {
            return Err(OnboardingError::Unknown(format!(
                "{:?} was not heard in the last nearby scan: scan first \
                 (outpost onboard scan) and adopt a device it lists",
                request.device
            )));
        };
        let security = match (request.security, &device.details) {
            (Some(security), _) => security,
            (
                None,
                Some(DeviceDetails {
                    security: Some(security),
                    ..
                }),
            ) => *security,
            (None, _) => {
                let _radio = self.radio_or_busy()?;
                let details = self.details(&device.advert).await;
                details.security.ok_or_else(|| {
                    OnboardingError::Refused(format!(
                        "cannot read {}'s proto-ver to learn its security version ({}): give \
                         it (--security)",
                        device.address,
                        details.error.as_deref().unwrap_or("no sec_ver")
                    ))
                })?
            }
        };
        // A device that says it runs Security 0 would get the site's Wi-Fi passphrase in
        // the clear: only when the operator asks for exactly that.
        if security == 0 && request.security != Some(0) {
            return Err(OnboardingError::Invalid(format!(
                "{} says it runs Security 0: the site's Wi-Fi credentials would go to it in \
                 the clear{}; adopt it with --security 0 only if that is what you expect",
                device.address,
                if request.pop.is_some() {
                    " and the PoP you gave would not be used"
                } else {
                    ""
                }
            )));
        }
        let name = device
            .name
            .clone()
            .unwrap_or_else(|| device.address.clone());
        let mut entry = serde_json::json!({
            "name": name,
            "mac": device.address,
            "transport": "ble",
            "security": security,
            "device_type": request.device_type,
        });
        match security {
            1 => entry["pop"] = request.pop.into(),
            2 => {
                entry["username"] = request.username.into();
                entry["password"] = request.pop.into();
            }
            _ => {}
        }
        self.import(entry.to_string().as_bytes(), &ImportDefaults::default())
            .await
            .map_err(|err| match err {
                OnboardingError::Manifest(why) => {
                    OnboardingError::Invalid(why.trim_start_matches("entry 1: ").to_owned())
                }
                other => other,
            })?;
        tracing::info!(device = %name, address = %device.address, security, "nearby device adopted");
        Ok(Adopted {
            name,
            address: device.address,
            security,
        })
    }

    /// The radio for a nearby scan or a proto-ver read, or a clear refusal while another
    /// scan (or a run's) holds it.
    fn radio_or_busy(&self) -> Result<tokio::sync::MutexGuard<'_, ()>, OnboardingError> {
        self.radio.try_lock().map_err(|_| {
            OnboardingError::Refused(
                "the radio is busy with another scan: try again when it is done".into(),
            )
        })
    }

    /// Whether a run has devices still in progress.
    fn runs_in_flight(&self) -> bool {
        self.runs
            .lock()
            .expect("runs lock")
            .iter()
            .any(|run| !run.done.load(Ordering::Acquire))
    }
}
