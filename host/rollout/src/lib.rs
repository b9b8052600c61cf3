//! Rollouts: deployments carried out device by device, wave by wave.
//!
//! A rollout is a signed update manifest plus [`RolloutSpec`] settings. It comes from the
//! cloud (`deployments/{id}` over the uplink) or is created locally (`outpost rollout
//! create`, for offline sites). Its targeted devices and their waves are fixed when it is
//! created. The engine then, on every wake-up:
//!
//! * starts the devices of the current wave (all at once for `immediate`, `maxParallel`
//!   inside the maintenance window for `batch`);
//! * stops the whole rollout when failures cross the error threshold (hawkBit's
//!   emergency stop), cancelling the devices in flight;
//! * moves to the next wave when the current one is done and enough of it succeeded, or
//!   pauses for the operator when not.
//!
//! Each device runs through its handler (chosen by device type): is-installed, download,
//! install, apply, and then the device must come back with the new version within the
//! rollback window. Results are ADU-shaped, kept in the store and queued for the cloud
//! through the outbox (`results/…`, `reported/…`, `rollouts/…`).

mod job;
pub mod metrics;
mod network;
mod services;
pub mod spec;
mod state;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use outpost_cache::FirmwareCache;
use outpost_cache::manifest::VerifiedManifest;
use outpost_runtime::HandlerRegistry;
use outpost_store::rusqlite::{OptionalExtension, params};
use outpost_store::{Device, Store, StoreError};
use outpost_uplink::contract::{self, schema, topics};
use outpost_uplink::{DeploymentInbox, Message, Outbox, Priority};
use serde::{Deserialize as _, Serialize};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use network::WifiRotation;
pub use services::{Mailbox, Pending};
pub use spec::RolloutSpec;
pub use state::{DeviceStatus, RolloutState};

/// How often the engine looks again without being woken.
const TICK: Duration = Duration::from_secs(1);

use outpost_store::now_millis;

/// What a rollout carries to each device.
#[derive(Clone, Debug)]
pub(crate) enum Work {
    /// A signed update manifest, run through the devices' handlers.
    Update(Arc<VerifiedManifest>),
    /// A Wi-Fi credential rotation, sent to the devices' agents.
    Wifi(Arc<WifiRotation>),
}

/// A rollout row about to be stored.
struct NewRollout {
    origin: Origin,
    kind: &'static str,
    manifest: String,
    update_id: String,
    network: Option<String>,
}

/// Where a rollout came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A deployment over the uplink.
    Cloud,
    /// `outpost rollout create` or the local API.
    Local,
}

impl Origin {
    const fn as_str(self) -> &'static str {
        match self {
            Self::Cloud => "cloud",
            Self::Local => "local",
        }
    }
}

/// Why an operator's request was refused.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    /// The request is wrong; the text says how.
    #[error("{0}")]
    Invalid(String),
    /// No rollout with that id.
    #[error("no rollout {0:?}")]
    NotFound(String),
    /// The rollout is not in a state that allows it.
    #[error("{0}")]
    Conflict(String),
    /// The disk under the state database is full: nothing of the call was written, and
    /// the same call succeeds once there is room again.
    #[error("{0}")]
    DiskFull(String),
    /// The store or cache failed.
    #[error("{0}")]
    Internal(String),
}

fn internal(err: impl std::fmt::Display) -> RolloutError {
    RolloutError::Internal(err.to_string())
}

impl From<StoreError> for RolloutError {
    fn from(err: StoreError) -> Self {
        if err.is_disk_full() {
            Self::DiskFull(err.to_string())
        } else {
            internal(err)
        }
    }
}

/// A rollout as the API and CLI show it.
#[derive(Clone, Debug, Serialize)]
pub struct RolloutView {
    /// The rollout id (the deployment id for a cloud rollout).
    pub id: String,
    /// `cloud` or `local`.
    pub origin: String,
    /// `update` (a signed manifest) or `wifi` (a Wi-Fi credential rotation).
    pub kind: String,
    /// The manifest's update id (`provider/name@version`); `wifi/<ssid>` for a rotation.
    pub update_id: String,
    /// Where it stands.
    pub state: RolloutState,
    /// Why it paused, stopped or was cancelled.
    pub reason: Option<String>,
    /// The wave in progress, 0-based.
    pub wave: u32,
    /// How many waves it has.
    pub waves: u32,
    /// Its [`RolloutSpec`], as stored.
    pub spec: serde_json::Value,
    /// Devices per [`DeviceStatus`].
    pub counts: BTreeMap<String, u64>,
    /// Per wave: devices and how many succeeded/failed.
    pub wave_counts: Vec<BTreeMap<String, u64>>,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Unix milliseconds of the last change.
    pub updated_at: i64,
    /// Unix milliseconds when it ended.
    pub finished_at: Option<i64>,
    /// Every targeted device, when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<DeviceProgress>>,
}

/// One targeted device's progress.
#[derive(Clone, Debug, Serialize)]
pub struct DeviceProgress {
    /// The device.
    pub device_id: String,
    /// Its wave, 0-based.
    pub wave: u32,
    /// Where it stands.
    pub status: DeviceStatus,
    /// The handler step in flight or last run.
    pub step: Option<String>,
    /// Download or install progress, percent.
    pub progress: Option<u8>,
    /// The recorded result (ADU's lastInstallResult and the steps behind it).
    pub result: Option<serde_json::Value>,
    /// How many times it was started.
    pub attempts: u32,
    /// Unix milliseconds.
    pub started_at: Option<i64>,
    /// Unix milliseconds.
    pub finished_at: Option<i64>,
}

/// A device report on its way to the update it concerns.
#[derive(Debug)]
pub(crate) struct Report {
    pub(crate) kind: String,
    pub(crate) payload: Vec<u8>,
}

/// An update in flight on one device.
#[derive(Debug)]
struct Running {
    rollout: String,
    reports: mpsc::UnboundedSender<Report>,
    cancel: CancellationToken,
    /// Stops the job without a trace at shutdown: the device stays `running` in the
    /// store and starts over at the next start.
    abort: tokio::task::AbortHandle,
}

/// The rollout engine. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Rollouts {
    inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) store: Store,
    pub(crate) firmware: FirmwareCache,
    pub(crate) handlers: Arc<HandlerRegistry>,
    pub(crate) outbox: Outbox,
    pub(crate) inbox: DeploymentInbox,
    pub(crate) mailbox: Arc<Mailbox>,
    pub(crate) gateway: String,
    wake: Notify,
    running: Mutex<HashMap<String, Running>>,
    jobs: TaskTracker,
    /// What each rollout carries (manifests verified in this process), by rollout.
    works: Mutex<HashMap<String, Work>>,
}

impl Rollouts {
    /// The engine; call [`run`](Self::run) to drive it.
    pub fn new(
        store: Store,
        firmware: FirmwareCache,
        handlers: Arc<HandlerRegistry>,
        outbox: Outbox,
        inbox: DeploymentInbox,
        mailbox: Arc<Mailbox>,
        gateway: String,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                firmware,
                handlers,
                outbox,
                inbox,
                mailbox,
                gateway,
                wake: Notify::new(),
                running: Mutex::new(HashMap::new()),
                jobs: TaskTracker::new(),
                works: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The device mailbox handlers talk through.
    pub fn mailbox(&self) -> &Arc<Mailbox> {
        &self.inner.mailbox
    }

    fn running(&self) -> MutexGuard<'_, HashMap<String, Running>> {
        self.inner
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Drives every rollout until `shutdown`; then cancels nothing (devices in flight
    /// are picked up again at the next start) and waits for the jobs to wind down.
    pub async fn run(self, shutdown: CancellationToken) {
        // Devices that were mid-update when the gateway stopped start over (is-installed
        // first, so a device that finished meanwhile is recognised).
        if let Err(err) = self
            .inner
            .store
            .call(|conn| {
                conn.execute(
                    "UPDATE rollout_devices SET status = 'pending', step = NULL, progress = NULL \
                     WHERE status = 'running'",
                    [],
                )?;
                Ok(())
            })
            .await
        {
            tracing::error!(error = %err, "cannot recover rollouts");
            return;
        }
        loop {
            if let Err(err) = self.ingest_deployments().await {
                tracing::warn!(error = %err, "reading deployments from the cloud failed");
            }
            match self.active().await {
                Ok(ids) => {
                    for id in ids {
                        if let Err(err) = self.advance(&id, &shutdown).await {
                            tracing::warn!(rollout = %id, error = %err, "advancing a rollout failed");
                        }
                    }
                }
                Err(err) => tracing::warn!(error = %err, "listing rollouts failed"),
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = self.inner.wake.notified() => {}
                () = self.inner.inbox.arrived() => {}
                () = tokio::time::sleep(TICK) => {}
            }
        }
        // Not cancelled through the handlers: a shutdown is not the operator's cancel.
        for job in self.running().values() {
            job.abort.abort();
        }
        self.inner.jobs.close();
        self.inner.jobs.wait().await;
    }

    /// Wakes the engine (after a change it should act on).
    pub fn wake(&self) {
        self.inner.wake.notify_one();
    }

    async fn active(&self) -> Result<Vec<String>, RolloutError> {
        self.inner
            .store
            .call(|conn| {
                let mut stmt = conn.prepare_cached(
                    "SELECT id FROM rollouts WHERE state IN ('scheduled', 'running') ORDER BY created_at",
                )?;
                let ids = stmt
                    .query_map([], |row| row.get(0))?
                    .collect::<Result<Vec<String>, _>>()?;
                Ok(ids)
            })
            .await
            .map_err(RolloutError::from)
    }

    /// Turns the deployments waiting in the uplink's inbox into rollouts (or records
    /// why not, and tells the cloud).
    async fn ingest_deployments(&self) -> Result<(), RolloutError> {
        let pending = self
            .inner
            .inbox
            .pending()
            .await
            .map_err(RolloutError::from)?;
        for inbound in pending {
            let id = inbound.id;
            let outcome = match inbound.deployment {
                Err(reason) => Err(RolloutError::Invalid(reason)),
                Ok(deployment) if deployment.schema == schema::DEPLOYMENT_CANCEL => {
                    // Never answered on the rollouts topic: the cancelled rollouts are.
                    let cancelled = self
                        .cancel_prefixed(&deployment.manifest, "cancelled by the cloud")
                        .await;
                    self.inner
                        .inbox
                        .settle(&id, cancelled.map_err(|err| err.to_string()))
                        .await
                        .map_err(RolloutError::from)?;
                    continue;
                }
                Ok(deployment) => {
                    let spec = if deployment.rollout.is_null() {
                        Ok(RolloutSpec::default())
                    } else {
                        RolloutSpec::deserialize(&deployment.rollout)
                            .map_err(|err| RolloutError::Invalid(format!("rollout: {err}")))
                    };
                    match spec {
                        Ok(spec) => {
                            // Device Update deploys a goal state: a new one replaces
                            // the one in progress, usable or not (cancelled first, so
                            // the new one's reports are the last word).
                            if id.starts_with(contract::ADU_ROLLOUT_PREFIX) {
                                let replaced = self
                                    .cancel_prefixed(
                                        contract::ADU_ROLLOUT_PREFIX,
                                        contract::ADU_REPLACED,
                                    )
                                    .await;
                                if let Err(err) = replaced {
                                    tracing::warn!(error = %err, "cannot cancel the deployment replaced");
                                }
                            }
                            self.create(Some(id.clone()), Origin::Cloud, &deployment.manifest, spec)
                                .await
                                .map(drop)
                        }
                        Err(err) => Err(err),
                    }
                }
            };
            let settled = match outcome {
                Ok(()) => Ok(()),
                Err(err) => {
                    tracing::warn!(deployment = %id, error = %err, "deployment refused");
                    self.publish_refusal(&id, &err.to_string()).await;
                    Err(err.to_string())
                }
            };
            self.inner
                .inbox
                .settle(&id, settled)
                .await
                .map_err(RolloutError::from)?;
        }
        Ok(())
    }

    /// Creates a rollout: verifies the manifest, pins its files, fixes the devices and
    /// their waves. `id` defaults to a fresh one.
    pub async fn create(
        &self,
        id: Option<String>,
        origin: Origin,
        jws: &str,
        spec: RolloutSpec,
    ) -> Result<RolloutView, RolloutError> {
        let id = self.new_id(id, origin, &spec).await?;
        let verified = self
            .inner
            .firmware
            .add_manifest(jws)
            .await
            .map_err(|err| RolloutError::Invalid(format!("the manifest was refused: {err}")))?;
        let manifest = &verified.manifest;
        let step_handlers: HashSet<&str> =
            manifest.steps.iter().map(|s| s.handler.as_str()).collect();
        let targeted: Vec<Device> = self
            .targets(&spec)
            .await?
            .into_iter()
            .filter(|d| compatible(&verified, d, |t| self.inner.handlers.handler_name_for(t)))
            .filter(|d| {
                // A handler still compiling counts: the device's job waits for it.
                self.inner
                    .handlers
                    .handler_name_for(&d.device_type)
                    .is_some_and(|name| step_handlers.contains(name.as_str()))
            })
            .collect();
        if targeted.is_empty() {
            return Err(RolloutError::Invalid(format!(
                "no device matches: {} needs a device compatible with {} whose type has an \
                 installed handler among [{}] and that the target selects",
                manifest.update_id,
                serde_json::to_string(&manifest.compatibility).unwrap_or_default(),
                step_handlers.into_iter().collect::<Vec<_>>().join(", ")
            )));
        }
        for file in &manifest.files {
            self.inner
                .firmware
                .pin(file.sha256, &pin_holder(&id))
                .await
                .map_err(|err| RolloutError::Invalid(format!("file {}: {err}", file.id)))?;
            self.inner.firmware.prefetch(file.sha256);
        }
        let row = NewRollout {
            origin,
            kind: "update",
            manifest: jws.to_owned(),
            update_id: manifest.update_id.to_string(),
            network: None,
        };
        self.insert(&id, row, &spec, &targeted).await
    }

    /// Creates a Wi-Fi credential rotation (always local): the devices the target selects
    /// that run the Outpost agent (they hold a device credential) move to `rotation`'s
    /// network, wave by wave, under the rollout's thresholds.
    pub async fn create_wifi(
        &self,
        id: Option<String>,
        rotation: WifiRotation,
        spec: RolloutSpec,
    ) -> Result<RolloutView, RolloutError> {
        rotation.validate().map_err(RolloutError::Invalid)?;
        let id = self.new_id(id, Origin::Local, &spec).await?;
        let agents = self
            .inner
            .store
            .devices_with_credentials()
            .await
            .map_err(RolloutError::from)?;
        let targeted: Vec<Device> = self
            .targets(&spec)
            .await?
            .into_iter()
            .filter(|d| agents.contains(&d.id))
            .collect();
        if targeted.is_empty() {
            return Err(RolloutError::Invalid(
                "no device matches: a Wi-Fi rotation needs devices that run the Outpost agent \
                 (they hold a device credential) and that the target selects"
                    .into(),
            ));
        }
        let row = NewRollout {
            origin: Origin::Local,
            kind: "wifi",
            manifest: String::new(),
            update_id: rotation.update_id(),
            network: Some(serde_json::to_string(&rotation).expect("serialisable")),
        };
        let view = self.insert(&id, row, &spec, &targeted).await?;
        self.lock_works().insert(id, Work::Wifi(Arc::new(rotation)));
        Ok(view)
    }

    /// Checks the settings and the id (a fresh one when none is given).
    async fn new_id(
        &self,
        id: Option<String>,
        origin: Origin,
        spec: &RolloutSpec,
    ) -> Result<String, RolloutError> {
        spec.validate().map_err(RolloutError::Invalid)?;
        let id = id.unwrap_or_else(|| format!("local-{}", contract::message_id()));
        if origin == Origin::Local && id.starts_with(contract::ADU_ROLLOUT_PREFIX) {
            return Err(RolloutError::Invalid(format!(
                "rollout ids starting with {:?} are Device Update's",
                contract::ADU_ROLLOUT_PREFIX
            )));
        }
        if !contract::valid_id(&id) {
            return Err(RolloutError::Invalid(format!(
                "rollout id {id:?} must be 1-128 characters of A-Z a-z 0-9 . _ : -"
            )));
        }
        if self.view(&id, false).await.is_ok() {
            return Err(RolloutError::Conflict(format!(
                "a rollout {id:?} already exists"
            )));
        }
        Ok(id)
    }

    /// The lobby devices `spec` targets (not retired, its selectors, its group).
    async fn targets(&self, spec: &RolloutSpec) -> Result<Vec<Device>, RolloutError> {
        let group_members = match &spec.target.group {
            None => None,
            Some(group) => Some(
                self.inner
                    .store
                    .list_groups()
                    .await
                    .map_err(RolloutError::from)?
                    .into_iter()
                    .find(|g| &g.id == group)
                    .ok_or_else(|| RolloutError::Invalid(format!("no device group {group:?}")))?
                    .members
                    .into_iter()
                    .collect::<HashSet<_>>(),
            ),
        };
        let mut targeted: Vec<Device> = self
            .inner
            .store
            .list_devices()
            .await
            .map_err(RolloutError::from)?
            .into_iter()
            .filter(|d| d.state != outpost_store::DeviceState::Retired)
            .filter(|d| spec.target.matches(d))
            .filter(|d| group_members.as_ref().is_none_or(|m| m.contains(&d.id)))
            .collect();
        targeted.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(targeted)
    }

    /// Stores a new rollout and its devices in their waves, then starts it.
    async fn insert(
        &self,
        id: &str,
        row: NewRollout,
        spec: &RolloutSpec,
        targeted: &[Device],
    ) -> Result<RolloutView, RolloutError> {
        let now = now_millis();
        let state = match spec.start_millis() {
            Some(start) if start > now => RolloutState::Scheduled,
            _ => RolloutState::Running,
        };
        let total = targeted.len();
        let rows: Vec<(String, u32)> = targeted
            .iter()
            .enumerate()
            .map(|(i, d)| (d.id.clone(), spec.wave_of(i, total)))
            .collect();
        let spec_json = serde_json::to_string(spec).expect("serialisable");
        let id2 = id.to_owned();
        let update_id = row.update_id.clone();
        self.inner
            .store
            .call(move |conn| {
                let tx = conn.transaction()?;
                tx.execute(
                    "INSERT INTO rollouts (id, origin, manifest, update_id, spec, state, wave, \
                     created_at, updated_at, kind, network) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0, ?7, ?7, ?8, ?9)",
                    params![
                        id2,
                        row.origin.as_str(),
                        row.manifest,
                        row.update_id,
                        spec_json,
                        state,
                        now,
                        row.kind,
                        row.network
                    ],
                )?;
                for (device, wave) in rows {
                    tx.execute(
                        "INSERT INTO rollout_devices (rollout_id, device_id, wave, status, updated_at) \
                         VALUES (?1, ?2, ?3, 'pending', ?4)",
                        params![id2, device, wave, now],
                    )?;
                }
                tx.commit()?;
                Ok(())
            })
            .await
            .map_err(RolloutError::from)?;
        tracing::info!(rollout = %id, update = %update_id, devices = total, %state, "rollout created");
        self.publish_status(id).await;
        self.wake();
        self.view(id, false).await
    }

    /// One step of the engine for rollout `id`.
    async fn advance(&self, id: &str, shutdown: &CancellationToken) -> Result<(), RolloutError> {
        let view = self.view(id, true).await?;
        let spec: RolloutSpec = serde_json::from_value(view.spec.clone()).map_err(internal)?;
        let devices = view.devices.unwrap_or_default();
        if view.state == RolloutState::Scheduled {
            if spec
                .start_millis()
                .is_none_or(|start| start <= now_millis())
            {
                self.set_state(id, RolloutState::Running, None, None)
                    .await?;
            }
            return Ok(());
        }
        let total = devices.len() as u64;
        let failed = view.counts.get("failed").copied().unwrap_or(0);
        if let Some(threshold) = spec.error_threshold
            && threshold.crossed(failed, total)
        {
            let reason = format!(
                "error threshold crossed: {failed} of {total} devices failed (threshold: {threshold})"
            );
            tracing::warn!(rollout = %id, %reason, "rollout stopped");
            self.cancel_devices(id).await?;
            self.set_state(id, RolloutState::Stopped, Some(reason), None)
                .await?;
            return Ok(());
        }
        let wave = view.wave;
        let in_wave: Vec<&DeviceProgress> = devices.iter().filter(|d| d.wave == wave).collect();
        let done = in_wave.iter().all(|d| !d.status.is_open());
        if done {
            let ok = in_wave.iter().filter(|d| d.status.is_success()).count() as u64;
            let n = in_wave.len() as u64;
            let pct = (ok * 100).checked_div(n).unwrap_or(100);
            if pct < u64::from(spec.success_threshold) {
                let reason = format!(
                    "wave {} of {}: {ok} of {n} devices succeeded ({pct}%), below the {}% \
                     success threshold; resume to go on, or retry the failed devices",
                    wave + 1,
                    view.waves,
                    spec.success_threshold
                );
                self.set_state(id, RolloutState::Paused, Some(reason), None)
                    .await?;
            } else {
                self.next_wave(id, wave, view.waves).await?;
            }
            return Ok(());
        }
        if spec.priority == spec::RolloutPriority::Batch
            && let Some(window) = &spec.window
            && !window
                .is_open(jiff_cron::jiff::Timestamp::now())
                .unwrap_or(false)
        {
            return Ok(());
        }
        let limit = match spec.priority {
            spec::RolloutPriority::Immediate => usize::MAX,
            spec::RolloutPriority::Batch => spec.max_parallel as usize,
        };
        // The jobs in memory, not the store's rows: a job just started may not have
        // marked its row yet.
        let mut running = self.running().values().filter(|j| j.rollout == id).count();
        let work = self.work_of(id).await?;
        // Devices pull: one that is not connected (no poll for a minute) stays pending
        // until it checks in again, as after a gateway restart or a power cut.
        for device in in_wave
            .iter()
            .filter(|d| d.status == DeviceStatus::Pending)
            .filter(|d| self.inner.mailbox.present(&d.device_id))
        {
            if running >= limit || shutdown.is_cancelled() {
                break;
            }
            if self.start_device(id, &device.device_id, &work, &spec) {
                running += 1;
            }
        }
        Ok(())
    }

    async fn next_wave(&self, id: &str, wave: u32, waves: u32) -> Result<(), RolloutError> {
        if wave + 1 >= waves {
            self.set_state(id, RolloutState::Finished, None, None)
                .await?;
            self.unpin(id).await;
            tracing::info!(rollout = %id, "rollout finished");
        } else {
            tracing::info!(rollout = %id, wave = wave + 2, "next wave");
            self.set_state(id, RolloutState::Running, None, Some(wave + 1))
                .await?;
        }
        self.wake();
        Ok(())
    }

    /// What rollout `id` carries: its manifest, verified again as read back (once per
    /// process: the store is not trusted with signatures), or its network change.
    async fn work_of(&self, id: &str) -> Result<Work, RolloutError> {
        if let Some(known) = self.lock_works().get(id) {
            return Ok(known.clone());
        }
        let id2 = id.to_owned();
        let (kind, jws, network): (String, String, Option<String>) = self
            .inner
            .store
            .call(move |conn| {
                Ok(conn.query_row(
                    "SELECT kind, manifest, network FROM rollouts WHERE id = ?1",
                    [id2],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )?)
            })
            .await
            .map_err(RolloutError::from)?;
        let work = if kind == "wifi" {
            let rotation: WifiRotation = network
                .as_deref()
                .and_then(|text| serde_json::from_str(text).ok())
                .ok_or_else(|| {
                    RolloutError::Conflict(format!(
                        "rollout {id} ended and its Wi-Fi passphrase was dropped; start a new \
                         rotation"
                    ))
                })?;
            Work::Wifi(Arc::new(rotation))
        } else {
            Work::Update(Arc::new(
                self.inner
                    .firmware
                    .add_manifest(&jws)
                    .await
                    .map_err(|err| RolloutError::Internal(format!("the stored manifest: {err}")))?,
            ))
        };
        self.lock_works().insert(id.to_owned(), work.clone());
        Ok(work)
    }

    fn lock_works(&self) -> MutexGuard<'_, HashMap<String, Work>> {
        self.inner
            .works
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts the update of one device unless it already has one in flight.
    fn start_device(&self, rollout: &str, device: &str, work: &Work, spec: &RolloutSpec) -> bool {
        if self.running().contains_key(device) {
            return false;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let job = job::Job {
            rollouts: self.clone(),
            rollout: rollout.to_owned(),
            device: device.to_owned(),
            work: work.clone(),
            spec: spec.clone(),
            reports: rx,
            cancel: cancel.clone(),
        };
        let span = tracing::info_span!("update", rollout = %rollout, device = %device);
        // Registered before the job can end (it removes itself): the engine task is the
        // only one starting jobs, and the job waits for this lock to deregister.
        let mut running = self.running();
        let handle = self
            .inner
            .jobs
            .spawn(tracing::Instrument::instrument(job.run(), span));
        running.insert(
            device.to_owned(),
            Running {
                rollout: rollout.to_owned(),
                reports: tx,
                cancel,
                abort: handle.abort_handle(),
            },
        );
        true
    }

    /// Called by a job when it ends.
    fn job_ended(&self, device: &str) {
        self.running().remove(device);
        self.wake();
    }

    /// Hands a device's report to the update in flight on it. False when none is.
    pub fn report(&self, device: &str, kind: String, payload: Vec<u8>) -> bool {
        self.running()
            .get(device)
            .is_some_and(|job| job.reports.send(Report { kind, payload }).is_ok())
    }

    /// Pauses a running or scheduled rollout: no device starts; those in flight finish.
    pub async fn pause(&self, id: &str) -> Result<RolloutView, RolloutError> {
        let view = self.view(id, false).await?;
        if !matches!(view.state, RolloutState::Running | RolloutState::Scheduled) {
            return Err(RolloutError::Conflict(format!(
                "rollout {id} is {}; only a running or scheduled rollout can be paused",
                view.state
            )));
        }
        self.set_state(
            id,
            RolloutState::Paused,
            Some("paused by the operator".into()),
            None,
        )
        .await?;
        self.view(id, false).await
    }

    /// Resumes a paused rollout. A wave that paused below its success threshold is
    /// accepted as it is and the next one starts.
    pub async fn resume(&self, id: &str) -> Result<RolloutView, RolloutError> {
        let view = self.view(id, true).await?;
        if view.state != RolloutState::Paused {
            return Err(RolloutError::Conflict(format!(
                "rollout {id} is {}; only a paused rollout can be resumed",
                view.state
            )));
        }
        let wave_done = view
            .devices
            .as_deref()
            .unwrap_or_default()
            .iter()
            .all(|d| d.wave != view.wave || !d.status.is_open());
        let spec: RolloutSpec = serde_json::from_value(view.spec.clone()).map_err(internal)?;
        if spec
            .start_millis()
            .is_some_and(|start| start > now_millis())
        {
            // Paused before it began: it waits for its start time again.
            self.set_state(id, RolloutState::Scheduled, None, None)
                .await?;
        } else if wave_done {
            self.next_wave(id, view.wave, view.waves).await?;
        } else {
            self.set_state(id, RolloutState::Running, None, None)
                .await?;
        }
        self.wake();
        self.view(id, false).await
    }

    /// Cancels every active rollout whose id starts with `prefix` (never empty), saying
    /// `reason`.
    async fn cancel_prefixed(&self, prefix: &str, reason: &str) -> Result<(), RolloutError> {
        if prefix.is_empty() {
            return Err(RolloutError::Invalid(
                "an empty prefix would cancel everything".into(),
            ));
        }
        let prefix_owned = prefix.to_owned();
        let ids: Vec<String> = self
            .inner
            .store
            .call(move |conn| {
                let mut stmt = conn.prepare_cached(
                    "SELECT id FROM rollouts WHERE state IN ('scheduled', 'running', 'paused') \
                     AND substr(id, 1, length(?1)) = ?1 ORDER BY created_at",
                )?;
                let ids = stmt
                    .query_map([prefix_owned], |row| row.get(0))?
                    .collect::<Result<Vec<String>, _>>()?;
                Ok(ids)
            })
            .await?;
        for id in &ids {
            tracing::info!(rollout = %id, reason, "rollout cancelled");
            self.cancel_because(id, reason).await?;
        }
        Ok(())
    }

    /// Cancels a rollout: devices in flight are cancelled through their handler, pending
    /// ones never start, and the files are unpinned.
    pub async fn cancel(&self, id: &str) -> Result<RolloutView, RolloutError> {
        self.cancel_because(id, "cancelled by the operator").await
    }

    async fn cancel_because(&self, id: &str, reason: &str) -> Result<RolloutView, RolloutError> {
        let view = self.view(id, false).await?;
        if matches!(view.state, RolloutState::Cancelled | RolloutState::Finished) {
            return Err(RolloutError::Conflict(format!(
                "rollout {id} is already {}",
                view.state
            )));
        }
        self.cancel_devices(id).await?;
        self.set_state(id, RolloutState::Cancelled, Some(reason.into()), None)
            .await?;
        self.unpin(id).await;
        self.view(id, false).await
    }

    /// Puts the failed devices back in line and runs the rollout again.
    pub async fn retry(&self, id: &str) -> Result<RolloutView, RolloutError> {
        let view = self.view(id, false).await?;
        if view.state == RolloutState::Cancelled {
            return Err(RolloutError::Conflict(format!(
                "rollout {id} was cancelled"
            )));
        }
        if view.counts.get("failed").copied().unwrap_or(0) == 0 {
            return Err(RolloutError::Conflict(format!(
                "rollout {id} has no failed devices"
            )));
        }
        // A rotation whose passphrase is gone cannot run again: refused before any change.
        let work = self.work_of(id).await?;
        let id2 = id.to_owned();
        // The retried devices form the current wave again, so thresholds apply to them.
        let first_failed_wave: u32 = self
            .inner
            .store
            .call(move |conn| {
                let tx = conn.transaction()?;
                let wave: u32 = tx.query_row(
                    "SELECT MIN(wave) FROM rollout_devices WHERE rollout_id = ?1 AND status = 'failed'",
                    [&id2],
                    |r| r.get(0),
                )?;
                tx.execute(
                    "UPDATE rollout_devices SET status = 'pending', step = NULL, progress = NULL, \
                     finished_at = NULL, updated_at = ?2 WHERE rollout_id = ?1 AND status = 'failed'",
                    params![id2, now_millis()],
                )?;
                tx.commit()?;
                Ok(wave)
            })
            .await
            .map_err(RolloutError::from)?;
        if let Work::Update(manifest) = &work {
            for file in &manifest.manifest.files {
                let _ = self.inner.firmware.pin(file.sha256, &pin_holder(id)).await;
            }
        }
        self.set_state(
            id,
            RolloutState::Running,
            None,
            Some(first_failed_wave.min(view.wave)),
        )
        .await?;
        self.wake();
        self.view(id, false).await
    }

    async fn cancel_devices(&self, id: &str) -> Result<(), RolloutError> {
        for job in self.running().values().filter(|j| j.rollout == id) {
            job.cancel.cancel();
        }
        let id2 = id.to_owned();
        self.inner
            .store
            .call(move |conn| {
                conn.execute(
                    "UPDATE rollout_devices SET status = 'cancelled', updated_at = ?2 \
                     WHERE rollout_id = ?1 AND status = 'pending'",
                    params![id2, now_millis()],
                )?;
                Ok(())
            })
            .await
            .map_err(RolloutError::from)
    }

    async fn unpin(&self, id: &str) {
        if let Ok(Work::Update(manifest)) = self.work_of(id).await {
            for file in &manifest.manifest.files {
                if let Err(err) = self
                    .inner
                    .firmware
                    .unpin(file.sha256, &pin_holder(id))
                    .await
                {
                    tracing::warn!(rollout = %id, error = %err, "unpinning failed");
                }
            }
        }
    }

    async fn set_state(
        &self,
        id: &str,
        state: RolloutState,
        reason: Option<String>,
        wave: Option<u32>,
    ) -> Result<(), RolloutError> {
        let id2 = id.to_owned();
        let ends = state.has_ended();
        // A rotation that can no longer run drops its Wi-Fi passphrase: cancelled, or
        // finished with every device on the new network. (Stopped, or finished with
        // failures, it keeps it: those devices may be retried.) The old bytes are
        // overwritten (secure_delete) and the write-ahead log emptied, so the passphrase
        // does not linger on disk either.
        let cancelled = state == RolloutState::Cancelled;
        let finished = state == RolloutState::Finished;
        let forgot = self
            .inner
            .store
            .call(move |conn| {
                let now = now_millis();
                conn.execute(
                    "UPDATE rollouts SET state = ?2, reason = ?3, wave = COALESCE(?4, wave), \
                     updated_at = ?5, finished_at = CASE WHEN ?6 THEN ?5 ELSE NULL END WHERE id = ?1",
                    params![id2, state, reason, wave, now, ends],
                )?;
                if !(cancelled || finished) {
                    return Ok(false);
                }
                let secret_kept: bool = conn.query_row(
                    "SELECT kind = 'wifi' AND json_extract(network, '$.passphrase') IS NOT NULL \
                     AND (?2 OR NOT EXISTS (SELECT 1 FROM rollout_devices WHERE rollout_id = ?1 \
                          AND status NOT IN ('succeeded', 'skipped'))) \
                     FROM rollouts WHERE id = ?1",
                    params![id2, cancelled],
                    |r| r.get(0),
                )?;
                if !secret_kept {
                    return Ok(false);
                }
                conn.pragma_update(None, "secure_delete", true)?;
                let dropped = conn.execute(
                    "UPDATE rollouts SET network = json_set(network, '$.passphrase', NULL) WHERE id = ?1",
                    [&id2],
                );
                conn.pragma_update(None, "secure_delete", false)?;
                dropped?;
                conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
                Ok(true)
            })
            .await
            .map_err(RolloutError::from)?;
        if forgot {
            self.lock_works().remove(id);
            tracing::info!(rollout = %id, "the rotation's Wi-Fi passphrase was dropped");
        }
        self.publish_status(id).await;
        Ok(())
    }

    /// Every rollout, newest first, without per-device detail.
    pub async fn list(&self) -> Result<Vec<RolloutView>, RolloutError> {
        let ids: Vec<String> = self
            .inner
            .store
            .call(|conn| {
                let mut stmt =
                    conn.prepare_cached("SELECT id FROM rollouts ORDER BY created_at DESC")?;
                let ids = stmt
                    .query_map([], |row| row.get(0))?
                    .collect::<Result<Vec<String>, _>>()?;
                Ok(ids)
            })
            .await
            .map_err(RolloutError::from)?;
        let mut views = Vec::with_capacity(ids.len());
        for id in ids {
            views.push(self.view(&id, false).await?);
        }
        Ok(views)
    }

    /// How many devices of all kept rollouts stand in each status (every status
    /// listed, zeros included).
    pub async fn devices_by_status(&self) -> Result<Vec<(DeviceStatus, u64)>, RolloutError> {
        let counted: Vec<(String, i64)> = self
            .inner
            .store
            .call(|conn| {
                let mut stmt = conn.prepare_cached(
                    "SELECT status, count(*) FROM rollout_devices GROUP BY status",
                )?;
                let rows = stmt
                    .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            })
            .await
            .map_err(RolloutError::from)?;
        Ok(DeviceStatus::ALL
            .into_iter()
            .map(|status| {
                let count = counted
                    .iter()
                    .find(|(name, _)| name == status.as_str())
                    .map_or(0, |(_, n)| u64::try_from(*n).unwrap_or(0));
                (status, count)
            })
            .collect())
    }

    /// One rollout, with its devices when `devices` is set.
    pub async fn view(&self, id: &str, devices: bool) -> Result<RolloutView, RolloutError> {
        let id2 = id.to_owned();
        let found = self
            .inner
            .store
            .call(move |conn| {
                let head = conn
                    .query_row(
                        "SELECT origin, update_id, spec, state, reason, wave, created_at, updated_at, finished_at, kind \
                         FROM rollouts WHERE id = ?1",
                        [&id2],
                        |r| {
                            Ok((
                                r.get::<_, String>(0)?,
                                r.get::<_, String>(1)?,
                                r.get::<_, String>(2)?,
                                r.get::<_, RolloutState>(3)?,
                                r.get::<_, Option<String>>(4)?,
                                r.get::<_, u32>(5)?,
                                r.get::<_, i64>(6)?,
                                r.get::<_, i64>(7)?,
                                r.get::<_, Option<i64>>(8)?,
                                r.get::<_, String>(9)?,
                            ))
                        },
                    )
                    .optional()?;
                let Some(head) = head else { return Ok(None) };
                let mut stmt = conn.prepare_cached(
                    "SELECT device_id, wave, status, step, progress, result, attempts, started_at, finished_at \
                     FROM rollout_devices WHERE rollout_id = ?1 ORDER BY wave, device_id",
                )?;
                let rows = stmt
                    .query_map([&id2], |r| {
                        Ok(DeviceProgress {
                            device_id: r.get(0)?,
                            wave: r.get(1)?,
                            status: r.get(2)?,
                            step: r.get(3)?,
                            progress: r.get(4)?,
                            result: r
                                .get::<_, Option<String>>(5)?
                                .and_then(|s| serde_json::from_str(&s).ok()),
                            attempts: r.get(6)?,
                            started_at: r.get(7)?,
                            finished_at: r.get(8)?,
                        })
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Some((head, rows)))
            })
            .await
            .map_err(RolloutError::from)?;
        let Some((
            (origin, update_id, spec, state, reason, wave, created, updated, finished, kind),
            rows,
        )) = found
        else {
            return Err(RolloutError::NotFound(id.to_owned()));
        };
        let spec: serde_json::Value = serde_json::from_str(&spec).map_err(internal)?;
        let waves = spec["waves"].as_array().map_or(1, Vec::len) as u32;
        let mut counts: BTreeMap<String, u64> = DeviceStatus::ALL
            .iter()
            .map(|s| (s.to_string(), 0))
            .collect();
        let mut wave_counts: Vec<BTreeMap<String, u64>> = (0..waves)
            .map(|_| {
                DeviceStatus::ALL
                    .iter()
                    .map(|s| (s.to_string(), 0))
                    .chain([("devices".to_owned(), 0)])
                    .collect()
            })
            .collect();
        for row in &rows {
            *counts.entry(row.status.to_string()).or_default() += 1;
            if let Some(w) = wave_counts.get_mut(row.wave as usize) {
                *w.entry(row.status.to_string()).or_default() += 1;
                *w.entry("devices".into()).or_default() += 1;
            }
        }
        Ok(RolloutView {
            id: id.to_owned(),
            origin,
            kind,
            update_id,
            state,
            reason,
            wave,
            waves,
            spec,
            counts,
            wave_counts,
            created_at: created,
            updated_at: updated,
            finished_at: finished,
            devices: devices.then_some(rows),
        })
    }

    /// Queues the rollout's status for the cloud (retained).
    async fn publish_status(&self, id: &str) {
        let Ok(view) = self.view(id, false).await else {
            return;
        };
        self.enqueue(
            topics::rollout(&self.inner.gateway, id),
            true,
            |message_id| contract::RolloutStatus {
                schema: schema::ROLLOUT.into(),
                message_id,
                deployment_id: view.id,
                update_id: view.update_id,
                state: view.state.to_string(),
                reason: view.reason,
                wave: view.wave,
                waves: view.waves,
                counts: view.counts,
                at: now_millis(),
            },
        )
        .await;
    }

    async fn publish_refusal(&self, id: &str, reason: &str) {
        self.enqueue(
            topics::rollout(&self.inner.gateway, id),
            true,
            |message_id| contract::RolloutStatus {
                schema: schema::ROLLOUT.into(),
                message_id,
                deployment_id: id.to_owned(),
                update_id: String::new(),
                state: RolloutState::Refused.to_string(),
                reason: Some(reason.to_owned()),
                wave: 0,
                waves: 0,
                counts: BTreeMap::new(),
                at: now_millis(),
            },
        )
        .await;
    }

    /// Queues a State-class message; a full outbox is logged (State has its reserve).
    /// `body` is built with the message's id, so the payload's `messageId` and the id
    /// the outbox (and the cloud) dedupes on are one.
    async fn enqueue<B: Serialize>(
        &self,
        topic: String,
        retain: bool,
        body: impl FnOnce(String) -> B,
    ) {
        let message_id = contract::message_id();
        let payload = serde_json::to_vec(&body(message_id.clone())).expect("serialisable");
        let message = Message {
            message_id,
            topic,
            payload,
            priority: Priority::State,
            retain,
            ttl: None,
        };
        if let Err(err) = self.inner.outbox.enqueue(message).await {
            tracing::warn!(error = %err, "cannot queue a rollout message for the cloud");
        }
    }
}

fn pin_holder(rollout: &str) -> String {
    format!("deployment:{rollout}")
}

/// Whether the device matches one of the manifest's compatibility entries.
fn compatible(
    manifest: &VerifiedManifest,
    device: &Device,
    handler_of: impl Fn(&str) -> Option<String>,
) -> bool {
    manifest.manifest.compatibility.iter().any(|entry| {
        entry.iter().all(|(key, value)| match key.as_str() {
            "deviceType" => device.device_type == *value,
            outpost_cache::manifest::HANDLER_KEY => {
                handler_of(&device.device_type).as_deref() == Some(value.as_str())
            }
            _ => spec::property(device, key) == Some(value.as_str()),
        })
    })
}
