//! Onboarding: from an imported manifest to provisioned (and claimed) devices in the
//! lobby, many devices at once.
//!
//! A run resolves its devices (one BLE scan for all BLE devices; SoftAP devices by
//! address), then onboards each on its own task, at most `ble.max_concurrent_sessions`
//! at a time (BLE connection attempts are serialised per adapter by the central):
//! proto-ver → session → optional Wi-Fi scan → assisted claiming when the device offers
//! it and an authority is configured → Wi-Fi config, apply, status until connected or
//! failed (on failure: control reset, then the next configured network) → lobby state.

mod authority;
pub mod manifest;
pub mod metrics;
mod nearby;
mod probe;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use outpost_ble::central::{Advert, Central};
use outpost_ble::softap::HttpLink;
use outpost_ble::{Link, ProvClient, Timeouts};
use outpost_protocomm::wifi::WifiStatus;
use outpost_protocomm::{ClientCredentials, SecurityVersion};
use outpost_store::{DeviceState, NewDevice, OnboardingTarget, Store, Transport};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

pub use authority::create_ca;
pub use manifest::ImportDefaults;
pub use nearby::{AdoptRequest, Adopted, DeviceDetails, MAX_DETAILED, MAX_LISTEN, NearbyDevice};
pub use probe::{OnboardingStatus, probe};

use authority::{Authority, LocalCa};

/// Runs kept in memory for the API to show.
const KEEP_RUNS: usize = 20;

/// Why onboarding refused a request or could not start.
#[derive(Debug, thiserror::Error)]
pub enum OnboardingError {
    /// The settings are unusable (a claiming CA that does not load, …).
    #[error("{0}")]
    Settings(String),
    /// A manifest was refused; nothing of it was imported.
    #[error("{0}")]
    Manifest(String),
    /// A run cannot start: the text says why and what to do.
    #[error("{0}")]
    Refused(String),
    /// A request is malformed or out of range: the text says how.
    #[error("{0}")]
    Invalid(String),
    /// A request names a device the gateway does not know (or has not heard).
    #[error("{0}")]
    Unknown(String),
    /// The state database failed.
    #[error(transparent)]
    Store(#[from] outpost_store::StoreError),
}

/// A site network handed to devices.
#[derive(Clone)]
pub struct WifiNetwork {
    /// The SSID.
    pub ssid: String,
    /// The WPA passphrase.
    pub passphrase: String,
}

impl std::fmt::Debug for WifiNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WifiNetwork")
            .field("ssid", &self.ssid)
            .finish_non_exhaustive()
    }
}

/// The offline claiming authority: a CA whose key signs the devices' CSRs.
#[derive(Clone)]
pub struct ClaimCaSettings {
    /// The CA certificate (PEM file).
    pub ca_cert: std::path::PathBuf,
    /// The CA's private key (PEM text).
    pub ca_key_pem: String,
    /// Validity of issued certificates, in days.
    pub valid_days: u32,
}

impl std::fmt::Debug for ClaimCaSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimCaSettings")
            .field("ca_cert", &self.ca_cert)
            .field("valid_days", &self.valid_days)
            .finish_non_exhaustive()
    }
}

/// What onboarding needs from the config (`[ble]` and `[onboarding]`).
#[derive(Clone, Debug)]
pub struct OnboardingSettings {
    /// Whether BLE may be used (`ble.enabled`).
    pub ble_enabled: bool,
    /// The BlueZ adapter, e.g. `hci0`; any when `None`.
    pub adapter: Option<String>,
    /// Devices onboarded at once.
    pub max_sessions: usize,
    /// The site networks, tried in order.
    pub networks: Vec<WifiNetwork>,
    /// Ask the device for a Wi-Fi scan first (when it can).
    pub scan: bool,
    /// How often the device's Wi-Fi status is asked while it joins.
    pub status_poll: Duration,
    /// How long a device may take to join a network.
    pub join_timeout: Duration,
    /// How long a BLE scan for the targets lasts.
    pub scan_timeout: Duration,
    /// Per-request and connect timeouts of the protocomm session.
    pub timeouts: Timeouts,
    /// The local claiming CA, if configured.
    pub claim_ca: Option<ClaimCaSettings>,
}

impl Default for OnboardingSettings {
    fn default() -> Self {
        Self {
            ble_enabled: true,
            adapter: None,
            max_sessions: 8,
            networks: Vec::new(),
            scan: true,
            status_poll: Duration::from_millis(500),
            join_timeout: Duration::from_secs(30),
            scan_timeout: Duration::from_secs(10),
            timeouts: Timeouts::default(),
            claim_ca: None,
        }
    }
}

/// The onboarding service of a running gateway.
pub struct Onboarder {
    store: Store,
    /// The device API's base URL handed to devices that run the Outpost agent.
    device_api: String,
    /// The CA (PEM) devices trust for `device_api` when it is HTTPS.
    device_api_ca: Option<String>,
    settings: OnboardingSettings,
    authority: Option<Authority>,
    /// Lobby events go to the cloud through it (when configured).
    uplink: Option<outpost_uplink::Uplink>,
    central: tokio::sync::Mutex<Option<Central>>,
    runs: Mutex<Vec<Arc<Run>>>,
    /// What the last nearby scan heard, for `adopt`.
    nearby: Mutex<Vec<NearbyDevice>>,
    /// Held while scanning: a nearby scan refuses while it is taken, a run's scan waits.
    radio: tokio::sync::Mutex<()>,
    next_run: AtomicU64,
    /// The runs in flight, and what stops them at shutdown.
    tasks: TaskTracker,
    stop: CancellationToken,
}

impl std::fmt::Debug for Onboarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Onboarder")
            .field("networks", &self.settings.networks.len())
            .field("claiming", &self.authority.as_ref().map(Authority::name))
            .finish_non_exhaustive()
    }
}

/// What `POST /api/v1/onboarding/runs` takes.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// Only these devices (names from the manifest); empty: every device not yet onboarded.
    #[serde(default)]
    pub devices: Vec<String>,
    /// Also devices already provisioned or claimed.
    #[serde(default)]
    pub all: bool,
}

/// One device's progress in a run.
#[derive(Clone, Debug, Serialize)]
pub struct DeviceProgress {
    /// The device's name in the manifest.
    pub name: String,
    /// How it is reached.
    pub transport: Transport,
    /// The current (or last) step.
    pub step: &'static str,
    /// Whether it is done (either way).
    pub done: bool,
    /// `provisioned`, `claimed` or `failed` when done.
    pub outcome: Option<DeviceState>,
    /// Why it failed.
    pub error: Option<String>,
    /// Node id from claiming.
    pub node_id: Option<String>,
    /// Networks tried.
    pub wifi_attempts: u32,
    /// What the device's own Wi-Fi scan saw, when it offers one (`wifi_scan` in
    /// proto-ver) and `[onboarding] scan` is on.
    pub wifi_scan: Option<WifiScan>,
    /// Time in the session's cryptography (handshake and records), milliseconds.
    pub crypto_ms: f64,
    /// Wall time of this device's onboarding, milliseconds.
    pub elapsed_ms: f64,
}

/// The networks a device saw before it was given the site's, and whether any of those
/// is among them.
#[derive(Clone, Debug, Serialize)]
pub struct WifiScan {
    /// Every network the device reported, strongest first.
    pub networks: Vec<outpost_protocomm::wifi::ScanEntry>,
    /// Whether a configured network (`[[onboarding.wifi]]`) is among them.
    pub sees_configured: bool,
    /// Set when none is: the device will most likely not join.
    pub warning: Option<String>,
}

impl WifiScan {
    fn new(
        mut networks: Vec<outpost_protocomm::wifi::ScanEntry>,
        configured: &[WifiNetwork],
    ) -> Self {
        networks.sort_by_key(|n| std::cmp::Reverse(n.rssi));
        let sees_configured = configured
            .iter()
            .any(|c| networks.iter().any(|n| n.ssid == c.ssid));
        let warning = (!sees_configured).then(|| {
            let mut wanted: Vec<&str> = configured.iter().map(|c| c.ssid.as_str()).collect();
            wanted.dedup();
            format!(
                "the device sees none of the configured networks ({}) among the {} it \
                 found: it will most likely not join; check the SSID and that the device is \
                 in range",
                wanted.join(", "),
                networks.len()
            )
        });
        Self {
            networks,
            sees_configured,
            warning,
        }
    }
}

/// A run and its devices.
pub struct Run {
    id: u64,
    started: Instant,
    finished_ms: Mutex<Option<f64>>,
    done: AtomicBool,
    devices: Mutex<Vec<DeviceProgress>>,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Run")
            .field("id", &self.id)
            .field("done", &self.done.load(Ordering::Acquire))
            .finish_non_exhaustive()
    }
}

/// What the API shows of a run.
#[derive(Debug, Serialize)]
pub struct RunView {
    /// The run's number.
    pub id: u64,
    /// Whether every device is done.
    pub done: bool,
    /// Wall time so far (or in all), milliseconds.
    pub elapsed_ms: f64,
    /// Devices provisioned or claimed.
    pub succeeded: usize,
    /// Devices that failed.
    pub failed: usize,
    /// Every device of the run.
    pub devices: Vec<DeviceProgress>,
}

impl Run {
    fn update(&self, index: usize, f: impl FnOnce(&mut DeviceProgress)) {
        f(&mut self.devices.lock().expect("run lock")[index]);
    }

    fn step(&self, index: usize, step: &'static str) {
        self.update(index, |d| d.step = step);
    }

    /// What the API shows of it now.
    pub fn view(&self) -> RunView {
        let devices = self.devices.lock().expect("run lock").clone();
        let elapsed_ms = self
            .finished_ms
            .lock()
            .expect("run lock")
            .unwrap_or_else(|| ms(self.started.elapsed()));
        RunView {
            id: self.id,
            done: self.done.load(Ordering::Acquire),
            elapsed_ms,
            succeeded: devices
                .iter()
                .filter(|d| d.done && d.outcome != Some(DeviceState::Failed))
                .count(),
            failed: devices
                .iter()
                .filter(|d| d.outcome == Some(DeviceState::Failed))
                .count(),
            devices,
        }
    }
}

/// The custom protocomm endpoint a device running the Outpost agent serves.
pub const AGENT_ENDPOINT: &str = "outpost-agent";

/// The largest credential written to [`AGENT_ENDPOINT`] in one request. A BLE write
/// carries at most 512 bytes (an ATT attribute), and the site CA alone is about 600, so a
/// larger credential goes in chunks: `{"chunk": i, "of": n, "base64": "…"}`, each part a
/// piece of the credential's base64, answered `{"status":"more"}` until the last, which is
/// answered as the whole credential would be.
pub const AGENT_CHUNK_LIMIT: usize = 400;

/// Base64 characters per chunk (a multiple of 4, so each part decodes alone).
const AGENT_CHUNK_BASE64: usize = 300;

/// The requests that hand over `credential` (JSON text): itself when it fits in one,
/// else its chunks.
pub fn credential_chunks(credential: &str) -> Vec<String> {
    use base64::Engine as _;
    if credential.len() <= AGENT_CHUNK_LIMIT {
        return vec![credential.to_owned()];
    }
    let encoded = base64::engine::general_purpose::STANDARD.encode(credential);
    let parts: Vec<&str> = encoded
        .as_bytes()
        .chunks(AGENT_CHUNK_BASE64)
        .map(|c| std::str::from_utf8(c).expect("base64 is ASCII"))
        .collect();
    let n = parts.len();
    parts
        .into_iter()
        .enumerate()
        .map(|(i, part)| serde_json::json!({"chunk": i, "of": n, "base64": part}).to_string())
        .collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// How a resolved device is reached.
enum Route {
    Ble(Advert),
    Http(SocketAddr),
}

impl Onboarder {
    /// The onboarding service: `settings` from the config; lobby events and cloud
    /// claims go through `uplink` when there is one; devices that run the Outpost agent
    /// are handed `device_api_url` (the local device API). A configured claiming CA must
    /// load.
    pub fn new(
        settings: OnboardingSettings,
        store: Store,
        uplink: Option<outpost_uplink::Uplink>,
        device_api_url: String,
    ) -> Result<Self, OnboardingError> {
        let local = match &settings.claim_ca {
            Some(claim) => Some(
                LocalCa::load(&claim.ca_cert, &claim.ca_key_pem, claim.valid_days)
                    .map_err(|err| OnboardingError::Settings(format!("{err:#}")))?,
            ),
            None => None,
        };
        let authority = match uplink.clone() {
            Some(uplink) => Some(Authority::Cloud {
                uplink,
                fallback: local,
            }),
            None => local.map(Authority::Local),
        };
        Ok(Self {
            device_api: {
                let mut url = device_api_url;
                url.truncate(url.trim_end_matches('/').len());
                url
            },
            device_api_ca: None,
            store,
            settings,
            authority,
            uplink,
            central: tokio::sync::Mutex::new(None),
            runs: Mutex::new(Vec::new()),
            nearby: Mutex::new(Vec::new()),
            radio: tokio::sync::Mutex::new(()),
            next_run: AtomicU64::new(1),
            tasks: TaskTracker::new(),
            stop: CancellationToken::new(),
        })
    }

    /// Devices are handed `ca_pem` with the device API's URL: the site CA, the only one
    /// they trust for an `https://` device API.
    pub fn with_device_api_ca(mut self, ca_pem: String) -> Self {
        self.device_api_ca = Some(ca_pem);
        self
    }

    /// A run by id.
    pub fn run(&self, id: u64) -> Option<Arc<Run>> {
        self.runs
            .lock()
            .expect("runs lock")
            .iter()
            .find(|r| r.id == id)
            .cloned()
    }

    /// Imports a manifest into the store (all or nothing); `defaults` fill what its
    /// entries leave out (see [`ImportDefaults`]).
    pub async fn import(
        &self,
        bytes: &[u8],
        defaults: &ImportDefaults,
    ) -> Result<usize, OnboardingError> {
        let targets = manifest::parse(bytes, defaults).map_err(OnboardingError::Manifest)?;
        let count = self
            .store
            .import_onboarding_targets(targets.clone())
            .await
            .map_err(|e| match e {
                outpost_store::StoreError::InvalidInput { .. } => {
                    OnboardingError::Manifest(e.to_string())
                }
                other => OnboardingError::Store(other),
            })?;
        for target in targets {
            if self
                .store
                .device(&target.name)
                .await
                .ok()
                .flatten()
                .is_none()
            {
                let _ = self
                    .store
                    .upsert_device(NewDevice::new(
                        target.name,
                        target.device_type,
                        DeviceState::Discovered,
                    ))
                    .await;
            }
        }
        Ok(count)
    }

    /// Starts a run; returns at once with its id.
    pub async fn start(self: &Arc<Self>, request: RunRequest) -> Result<Arc<Run>, OnboardingError> {
        if self.stop.is_cancelled() {
            return Err(OnboardingError::Refused(
                "the gateway is shutting down".into(),
            ));
        }
        if self.settings.networks.is_empty() {
            return Err(OnboardingError::Refused(
                "no site Wi-Fi is configured: add an [[onboarding.wifi]] network \
                        (ssid, passphrase) to the config"
                    .into(),
            ));
        }
        let all_targets = self.store.onboarding_targets().await?;
        let targets: Vec<OnboardingTarget> = if request.devices.is_empty() {
            let mut out = Vec::new();
            for target in all_targets {
                let state = self
                    .store
                    .device(&target.name)
                    .await
                    .ok()
                    .flatten()
                    .map(|d| d.state);
                if request.all
                    || !matches!(state, Some(DeviceState::Provisioned | DeviceState::Claimed))
                {
                    out.push(target);
                }
            }
            out
        } else {
            let mut by_name: HashMap<String, OnboardingTarget> = all_targets
                .into_iter()
                .map(|t| (t.name.clone(), t))
                .collect();
            let mut out = Vec::new();
            for name in &request.devices {
                out.push(by_name.remove(name).ok_or_else(|| {
                    OnboardingError::Refused(format!(
                        "{name} is not in the imported manifest (outpost onboard import FILE)"
                    ))
                })?);
            }
            out
        };
        if targets.is_empty() {
            return Err(OnboardingError::Refused(
                "nothing to onboard: every imported device is provisioned \
                        (use all to redo them)"
                    .into(),
            ));
        }
        ::metrics::counter!(metrics::RUNS).increment(1);
        let run = Arc::new(Run {
            id: self.next_run.fetch_add(1, Ordering::Relaxed),
            started: Instant::now(),
            finished_ms: Mutex::new(None),
            done: AtomicBool::new(false),
            devices: Mutex::new(
                targets
                    .iter()
                    .map(|t| DeviceProgress {
                        name: t.name.clone(),
                        transport: t.transport,
                        step: "queued",
                        done: false,
                        outcome: None,
                        error: None,
                        node_id: None,
                        wifi_attempts: 0,
                        wifi_scan: None,
                        crypto_ms: 0.0,
                        elapsed_ms: 0.0,
                    })
                    .collect(),
            ),
        });
        {
            let mut runs = self.runs.lock().expect("runs lock");
            runs.push(run.clone());
            if runs.len() > KEEP_RUNS {
                runs.remove(0);
            }
        }
        let this = self.clone();
        let task_run = run.clone();
        let stop = self.stop.clone();
        self.tasks.spawn(
            async move {
                tokio::select! {
                    () = this.execute(task_run, targets) => {}
                    () = stop.cancelled() => tracing::warn!(
                        "onboarding run stopped by the shutdown; start it again to finish"
                    ),
                }
            }
            .instrument(tracing::info_span!("onboarding_run", run = run.id)),
        );
        Ok(run)
    }

    /// Stops the runs in flight (their device sessions are dropped; the devices can be
    /// onboarded again) and waits for them. Later runs are refused.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    async fn central(&self) -> anyhow::Result<Central> {
        let mut slot = self.central.lock().await;
        if let Some(central) = &*slot {
            return Ok(central.clone());
        }
        let central = Central::open(self.settings.adapter.as_deref(), self.settings.timeouts)
            .await
            .context("cannot use Bluetooth (BlueZ on the system D-Bus)")?;
        *slot = Some(central.clone());
        Ok(central)
    }

    async fn execute(self: Arc<Self>, run: Arc<Run>, targets: Vec<OnboardingTarget>) {
        let routes = self.resolve(&run, &targets).await;
        let slots = Arc::new(Semaphore::new(self.settings.max_sessions));
        let mut tasks = tokio::task::JoinSet::new();
        for (index, (target, route)) in targets.into_iter().zip(routes).enumerate() {
            let route = match route {
                Ok(route) => route,
                Err(err) => {
                    self.finish(&run, index, &target, Err(err), Instant::now())
                        .await;
                    continue;
                }
            };
            let this = self.clone();
            let run = run.clone();
            let slots = slots.clone();
            let span = tracing::info_span!("onboard", device = %target.name);
            tasks.spawn(
                async move {
                    let _slot = slots.acquire_owned().await.expect("never closed");
                    let started = Instant::now();
                    let result = this.onboard(&run, index, &target, route).await;
                    this.finish(&run, index, &target, result, started).await;
                }
                .instrument(span),
            );
        }
        while tasks.join_next().await.is_some() {}
        *run.finished_ms.lock().expect("run lock") = Some(ms(run.started.elapsed()));
        run.done.store(true, Ordering::Release);
        let view = run.view();
        tracing::info!(
            succeeded = view.succeeded,
            failed = view.failed,
            elapsed_ms = view.elapsed_ms,
            "onboarding run finished"
        );
    }

    /// Finds every device: one BLE scan for all BLE targets, SoftAP by address.
    async fn resolve(&self, run: &Run, targets: &[OnboardingTarget]) -> Vec<anyhow::Result<Route>> {
        let ble_keys: Vec<String> = targets
            .iter()
            .filter(|t| t.transport == Transport::Ble)
            .map(|t| t.mac.clone().unwrap_or_else(|| t.name.clone()))
            .collect();
        let adverts: anyhow::Result<Vec<Advert>> = if ble_keys.is_empty() {
            Ok(Vec::new())
        } else if !self.settings.ble_enabled {
            Err(anyhow!(
                "BLE onboarding is disabled in the config (ble.enabled)"
            ))
        } else {
            for (index, t) in targets.iter().enumerate() {
                if t.transport == Transport::Ble {
                    run.step(index, "scanning");
                }
            }
            // One scan at a time on the adapter: wait for a nearby scan to finish.
            let _radio = self.radio.lock().await;
            match self.central().await {
                Ok(central) => central
                    .scan(
                        &ble_keys,
                        self.settings.scan_timeout,
                        Duration::from_millis(300),
                    )
                    .await
                    .context("BLE scan failed"),
                Err(err) => Err(err),
            }
        };
        targets
            .iter()
            .map(|t| match t.transport {
                Transport::Softap => t
                    .address
                    .as_deref()
                    .unwrap_or_default()
                    .parse()
                    .map(Route::Http)
                    .map_err(|_| anyhow!("address {:?} is not host:port", t.address)),
                Transport::Ble => {
                    let adverts = adverts.as_ref().map_err(|e| anyhow!("{e:#}"))?;
                    let key = t.mac.clone().unwrap_or_else(|| t.name.clone());
                    let found: Vec<&Advert> = adverts.iter().filter(|a| a.matches(&key)).collect();
                    match found.as_slice() {
                        [one] => Ok(Route::Ble((*one).clone())),
                        [] => Err(anyhow!(
                            "not found: no device advertised {key} during a {:?} scan",
                            self.settings.scan_timeout
                        )),
                        many => Err(anyhow!(
                            "duplicate name: {} devices advertise {key} ({}); put their MAC \
                             addresses in the manifest to tell them apart",
                            many.len(),
                            many.iter()
                                .map(|a| a.address.to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )),
                    }
                }
            })
            .collect()
    }

    async fn finish(
        &self,
        run: &Run,
        index: usize,
        target: &OnboardingTarget,
        result: anyhow::Result<DeviceState>,
        started: Instant,
    ) {
        let (state, error) = match result {
            Ok(state) => (state, None),
            Err(err) => (DeviceState::Failed, Some(format!("{err:#}"))),
        };
        match &error {
            None => tracing::info!(state = %state, "device onboarded"),
            Some(err) => tracing::warn!(error = %err, "onboarding failed"),
        }
        let outcome = state.to_string();
        ::metrics::counter!(metrics::DEVICES, "outcome" => outcome.clone()).increment(1);
        ::metrics::histogram!(metrics::DURATION, "outcome" => outcome)
            .record(started.elapsed().as_secs_f64());
        self.record_state(target, state).await;
        let _ = self
            .store
            .record_onboarding_attempt(&target.name, error.clone())
            .await;
        run.update(index, |d| {
            d.done = true;
            d.outcome = Some(state);
            d.step = if error.is_some() { "failed" } else { "done" };
            d.error = error;
            d.elapsed_ms = ms(started.elapsed());
        });
    }

    async fn onboard(
        &self,
        run: &Run,
        index: usize,
        target: &OnboardingTarget,
        route: Route,
    ) -> anyhow::Result<DeviceState> {
        self.record_state(target, DeviceState::Provisioning).await;
        run.step(index, "connecting");
        let link = match route {
            Route::Ble(advert) => Link::Ble(self.central().await?.connect(&advert).await?),
            Route::Http(addr) => Link::Http(HttpLink::new(addr, self.settings.timeouts)),
        };
        let mut client = ProvClient::new(link);
        let result = self.session(run, index, target, &mut client).await;
        run.update(index, |d| d.crypto_ms = ms(client.crypto_time()));
        client.close().await;
        result
    }

    async fn session(
        &self,
        run: &Run,
        index: usize,
        target: &OnboardingTarget,
        client: &mut ProvClient,
    ) -> anyhow::Result<DeviceState> {
        run.step(index, "version");
        let version = client.version().await.context("reading proto-ver")?;
        let security = version.security()?;
        let wanted = SecurityVersion::try_from(target.security).map_err(anyhow::Error::msg)?;
        if security != wanted {
            bail!(
                "the manifest says Security {} but the device runs Security {}",
                wanted.number(),
                security.number()
            );
        }
        let credentials = match security {
            SecurityVersion::Sec0 => ClientCredentials::Sec0,
            SecurityVersion::Sec1 => ClientCredentials::Sec1 {
                pop: target.pop.clone().unwrap_or_default().into_bytes(),
            },
            SecurityVersion::Sec2 => ClientCredentials::Sec2 {
                username: target.username.clone().unwrap_or_default().into_bytes(),
                password: target.password.clone().unwrap_or_default().into_bytes(),
                patch_ver: version.patch_ver(),
            },
        };
        run.step(index, "session");
        client.establish(credentials).await?;
        tracing::debug!("session established");

        if self.settings.scan && version.has_prov_cap("wifi_scan") {
            run.step(index, "wifi scan");
            let networks = client.scan().await.context("Wi-Fi scan")?;
            let scan = WifiScan::new(networks, &self.settings.networks);
            match &scan.warning {
                Some(warning) => tracing::warn!(networks = scan.networks.len(), "{warning}"),
                None => tracing::info!(
                    networks = scan.networks.len(),
                    "the device's Wi-Fi scan sees a configured network"
                ),
            }
            run.update(index, |d| d.wifi_scan = Some(scan));
        }

        let mut claimed = false;
        if version.can_claim() {
            if let Some(authority) = &self.authority {
                run.step(index, "claiming");
                let node_id = self
                    .claim(client, authority, target)
                    .await
                    .context("claiming")?;
                run.update(index, |d| d.node_id = Some(node_id));
                claimed = true;
            } else {
                tracing::info!(
                    "the device offers claiming, but no claiming authority is configured"
                );
            }
        }

        if version
            .apps
            .get("outpost")
            .is_some_and(|app| app.cap.iter().any(|c| c == "agent"))
        {
            run.step(index, "credential");
            self.hand_over_credential(client, target).await?;
        }

        self.join_wifi(run, index, client).await?;
        Ok(if claimed {
            DeviceState::Claimed
        } else {
            DeviceState::Provisioned
        })
    }

    /// Records where a device stands, keeping what it reported about itself (an agent
    /// device registers its properties while onboarding is still under way).
    async fn record_state(&self, target: &OnboardingTarget, state: DeviceState) {
        let result = match self.store.device(&target.name).await {
            Ok(Some(known)) if known.device_type == target.device_type => {
                self.store.set_device_state(&target.name, state).await
            }
            _ => self
                .store
                .upsert_device(NewDevice::new(&target.name, &target.device_type, state))
                .await
                .map(drop),
        };
        if let Err(err) = result {
            tracing::warn!(error = %err, "cannot record the device's state");
            return;
        }
        if let Some(uplink) = &self.uplink
            && let Err(err) = uplink
                .announce_device(&target.name, &target.device_type, &state.to_string())
                .await
        {
            tracing::warn!(error = %err, "cannot queue the device's lobby event");
        }
    }

    /// Hands a device that runs the Outpost agent (`outpost.cap` has `agent`) its
    /// credential for the local device API, over the secured session.
    async fn hand_over_credential(
        &self,
        client: &mut ProvClient,
        target: &OnboardingTarget,
    ) -> anyhow::Result<()> {
        let api = &self.device_api;
        let token = self
            .store
            .issue_device_credential(&target.name)
            .await
            .context("issuing the device credential")?;
        let mut message = serde_json::json!({
            "api": api,
            "deviceId": target.name,
            "token": token,
        });
        if let Some(ca) = &self.device_api_ca {
            message["caPem"] = serde_json::Value::String(ca.clone());
        }
        let chunks = credential_chunks(&message.to_string());
        let last = chunks.len() - 1;
        for (i, chunk) in chunks.iter().enumerate() {
            let answer = client
                .request(AGENT_ENDPOINT, chunk.as_bytes())
                .await
                .context("handing over the device credential")?;
            let answer: serde_json::Value = serde_json::from_slice(&answer)
                .context("the device answered the credential with something that is not JSON")?;
            let expected = if i == last { "ok" } else { "more" };
            if answer["status"] != expected {
                bail!("the device refused its credential: {answer}");
            }
        }
        tracing::info!(chunks = chunks.len(), "device credential handed over");
        Ok(())
    }

    async fn claim(
        &self,
        client: &mut ProvClient,
        authority: &Authority,
        target: &OnboardingTarget,
    ) -> anyhow::Result<String> {
        let start = client.claim_start().await?;
        let initiate = authority.initiate(&start)?;
        let csr = client.claim_csr(&initiate).await?;
        let verified = authority
            .verify(&target.name, &initiate.node_id, &csr.parsed)
            .await
            .and_then(|v| {
                authority::certificate_matches_csr(&v.response.certificate, &csr.parsed.csr)?;
                Ok(v)
            });
        let signed = match verified {
            Ok(v) => v,
            Err(err) => {
                let _ = client.claim_abort().await;
                return Err(err);
            }
        };
        client.claim_verify(&signed.response).await?;
        self.store
            .record_claim(
                &target.name,
                &initiate.node_id,
                &signed.response.certificate,
                &signed.authority,
            )
            .await?;
        if signed.reported {
            self.store.mark_claim_reported(&target.name).await?;
        }
        tracing::info!(node_id = %initiate.node_id, "claimed");
        Ok(initiate.node_id)
    }

    async fn join_wifi(
        &self,
        run: &Run,
        index: usize,
        client: &mut ProvClient,
    ) -> anyhow::Result<()> {
        // A device left in the failed state by an earlier attempt is reset first.
        let mut needs_reset = matches!(client.wifi_status().await?, WifiStatus::Failed { .. });
        let mut failures = Vec::new();
        for network in &self.settings.networks {
            run.update(index, |d| {
                d.wifi_attempts += 1;
                d.step = "wifi config";
            });
            if needs_reset {
                client
                    .reset_wifi()
                    .await
                    .context("resetting the failed Wi-Fi attempt")?;
            }
            client
                .configure_wifi(network.ssid.as_bytes(), network.passphrase.as_bytes())
                .await
                .context("sending Wi-Fi credentials")?;
            run.step(index, "joining");
            let deadline = Instant::now() + self.settings.join_timeout;
            let status = loop {
                match client.wifi_status().await? {
                    WifiStatus::Connected { ip4, .. } => {
                        tracing::info!(ssid = %network.ssid, %ip4, "joined the site network");
                        return Ok(());
                    }
                    WifiStatus::Failed { reason } => break reason,
                    WifiStatus::Connecting { .. } | WifiStatus::Disconnected => {}
                }
                if Instant::now() >= deadline {
                    bail!(
                        "the device did not join {} within {:?}",
                        network.ssid,
                        self.settings.join_timeout
                    );
                }
                tokio::time::sleep(self.settings.status_poll).await;
            };
            let reason =
                status.map_or_else(|| "failed (no reason given)".to_owned(), |r| r.to_string());
            tracing::warn!(ssid = %network.ssid, %reason, "Wi-Fi join failed");
            failures.push(format!("{}: {reason}", network.ssid));
            needs_reset = true;
        }
        bail!(
            "Wi-Fi failed on every configured network ({})",
            failures.join("; ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credential_larger_than_a_ble_write_goes_in_chunks_that_add_up() {
        use base64::Engine as _;
        let small = r#"{"api":"http://127.0.0.1:8080","deviceId":"PROV_1","token":"odt_1"}"#;
        assert_eq!(credential_chunks(small), vec![small.to_owned()]);
        let large = serde_json::json!({
            "api": "https://192.168.4.10:8443", "deviceId": "PROV_5E0000", "token": "odt_x",
            "caPem": format!("-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n", "A".repeat(700)),
        })
        .to_string();
        let chunks = credential_chunks(&large);
        assert!(chunks.len() > 1);
        let mut whole = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            // Each one fits a BLE write with room for Security 2's tag.
            assert!(chunk.len() <= AGENT_CHUNK_LIMIT, "{} bytes", chunk.len());
            let chunk: serde_json::Value = serde_json::from_str(chunk).unwrap();
            assert_eq!(chunk["chunk"], i);
            assert_eq!(chunk["of"], chunks.len());
            whole.extend(
                base64::engine::general_purpose::STANDARD
                    .decode(chunk["base64"].as_str().unwrap())
                    .unwrap(),
            );
        }
        assert_eq!(whole, large.as_bytes());
    }
}
