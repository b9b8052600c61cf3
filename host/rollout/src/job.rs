//! One device's update: its handler's steps, the device's reports, the rollback window,
//! and the ADU-shaped result.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use outpost_cache::manifest::VerifiedManifest;
use outpost_runtime::{
    Artifact, CallError, Device, DeviceReport, InstalledHandler, Outcome, ReportVerdict, Services,
    Step, Update,
};
use outpost_store::rusqlite::params;
use outpost_uplink::contract::{self, schema, topics};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::services::{StoreState, UpdateFiles};
use super::{DeviceStatus, Report, RolloutSpec, Rollouts, Work, now_millis};

/// ADU agent states.
const IDLE: i32 = 0;
const IN_PROGRESS: i32 = 6;
const FAILED: i32 = 255;
/// ADU workflow action applyDeployment.
const APPLY_DEPLOYMENT: i32 = 3;

/// An update in flight on one device.
pub(crate) struct Job {
    pub(crate) rollouts: Rollouts,
    pub(crate) rollout: String,
    pub(crate) device: String,
    /// What the rollout carries: an update manifest or a network change.
    pub(crate) work: Work,
    pub(crate) spec: RolloutSpec,
    pub(crate) reports: mpsc::UnboundedReceiver<Report>,
    pub(crate) cancel: CancellationToken,
}

/// One handler step (or network rollout step) as recorded.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Phase {
    step: &'static str,
    result_code: i32,
    extended_result_code: u32,
    details: String,
}

impl Phase {
    /// The record of `step` that ended with `outcome`.
    pub(crate) fn of(step: &'static str, outcome: &Outcome) -> Self {
        Self {
            step,
            result_code: outcome.result_code,
            extended_result_code: outcome.extended_code,
            details: bounded(&outcome.details),
        }
    }
}

/// What the store keeps per device: ADU's lastInstallResult and the steps behind it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Recorded {
    last_install_result: contract::InstallResult,
    phases: Vec<Phase>,
}

/// The context every step needs.
struct Ctx {
    handler: Arc<InstalledHandler>,
    services: Services,
    device: Device,
    update: Update,
    /// Index of the manifest step this handler runs.
    step_index: usize,
}

/// A failure that ends the update with this outcome.
pub(crate) struct Stop(pub(crate) DeviceStatus, pub(crate) Outcome);

pub(crate) fn outcome(code: i32, extended: u32, details: impl Into<String>) -> Outcome {
    Outcome {
        result_code: code,
        extended_code: extended,
        details: details.into(),
    }
}

/// The outcome of a handler call that failed: a short summary for the result (sent to
/// the cloud), the whole error with the guest's stderr for the log.
fn handler_failed(step: &str, err: &CallError) -> Outcome {
    tracing::warn!(step, error = %err, stderr = err.stderr(), "the handler failed");
    outcome(
        0,
        gateway_code(HANDLER_TRAPPED),
        format!("the handler failed: {}", err.summary()),
    )
}

/// The handler properties an update carries: the manifest step's, plus what the rollout
/// allows (`allowDowngrade: true`), as JSON text.
fn handler_properties(
    step: &serde_json::Map<String, serde_json::Value>,
    spec: &RolloutSpec,
) -> String {
    let mut properties = step.clone();
    // Only the rollout grants a downgrade: a manifest step that says so itself is overruled.
    if spec.allow_downgrade {
        properties.insert("allowDowngrade".into(), true.into());
    } else {
        properties.remove("allowDowngrade");
    }
    serde_json::Value::Object(properties).to_string()
}

/// The most a result's details keep (ADU's resultDetails is meant to be short).
const MAX_DETAILS: usize = 256;

/// `details` cut to [`MAX_DETAILS`] bytes at a character boundary, with an ellipsis.
fn bounded(details: &str) -> String {
    outpost_runtime::truncate(details, MAX_DETAILS)
}

/// Extended codes of the gateway itself (facility 2, component 0x01).
pub(crate) const fn gateway_code(value: u32) -> u32 {
    (2 << 28) | (0x01 << 20) | value
}
const NO_HANDLER: u32 = 1;
const HANDLER_TRAPPED: u32 = 2;
const DOWNLOAD_TIMEOUT: u32 = 3;
const ROLLBACK_WINDOW: u32 = 4;
const NO_DEVICE: u32 = 5;

impl Job {
    pub(crate) async fn run(mut self) {
        let rollouts = self.rollouts.clone();
        let device = self.device.clone();
        let mut phases = Vec::new();
        if let Work::Wifi(rotation) = self.work.clone() {
            let (status, last) = match self.rotate(&rotation, &mut phases).await {
                Ok(joined) => (DeviceStatus::Succeeded, joined),
                Err(Stop(status, last)) => (status, last),
            };
            self.finish(status, &last, &phases, 0, None).await;
            rollouts.job_ended(&device);
            return;
        }
        let (status, last) = match self.prepare().await {
            Err(stop) => (stop.0, stop.1),
            Ok(ctx) => {
                self.publish_reported(&ctx, IN_PROGRESS, None).await;
                match self.drive(&ctx, &mut phases).await {
                    Ok((status, last)) | Err(Stop(status, last)) => {
                        let result = self
                            .finish(status, &last, &phases, ctx.step_index, Some(&ctx))
                            .await;
                        let state =
                            if matches!(status, DeviceStatus::Succeeded | DeviceStatus::Skipped) {
                                IDLE
                            } else {
                                FAILED
                            };
                        self.publish_reported(&ctx, state, Some(result)).await;
                        rollouts.job_ended(&device);
                        return;
                    }
                }
            }
        };
        self.finish(status, &last, &phases, 0, None).await;
        rollouts.job_ended(&device);
    }

    /// Marks the device running, at `step`, one attempt more.
    /// With `only_pending`, only a device still pending is marked (one cancelled since
    /// the engine looked is not): false then.
    pub(crate) async fn mark_running(&self, step: &'static str, only_pending: bool) -> bool {
        let id = self.device.clone();
        let rollout = self.rollout.clone();
        self.rollouts
            .inner
            .store
            .call(move |conn| {
                let changed = conn.execute(
                    "UPDATE rollout_devices SET status = 'running', attempts = attempts + 1, \
                     started_at = ?3, finished_at = NULL, step = ?4, updated_at = ?3 \
                     WHERE rollout_id = ?1 AND device_id = ?2 AND (NOT ?5 OR status = 'pending')",
                    params![rollout, id, now_millis(), step, only_pending],
                )?;
                Ok(changed > 0)
            })
            .await
            .unwrap_or(false)
    }

    /// The update manifest (a job of a network rollout has none and never asks).
    fn manifest(&self) -> &Arc<VerifiedManifest> {
        match &self.work {
            Work::Update(manifest) => manifest,
            Work::Wifi(_) => unreachable!("a network rollout's job runs no handler steps"),
        }
    }

    /// Finds the device, its handler and the manifest step; marks the device running.
    async fn prepare(&mut self) -> Result<Ctx, Stop> {
        self.mark_running("is-installed", false).await;
        let inner = &self.rollouts.inner;
        let fail = |code: u32, details: String| {
            Stop(
                DeviceStatus::Failed,
                outcome(0, gateway_code(code), details),
            )
        };
        let device = match inner.store.device(&self.device).await {
            Ok(Some(device)) => device,
            Ok(None) => {
                return Err(fail(
                    NO_DEVICE,
                    format!("device {} is no longer known", self.device),
                ));
            }
            Err(err) => return Err(fail(NO_DEVICE, format!("the store failed: {err}"))),
        };
        if inner.handlers.is_compiling(&device.device_type) {
            // A gateway just started, or the handler is being installed: wait for it.
            self.set_step("handler-compiling", None).await;
        }
        let handler = tokio::select! {
            handler = inner.handlers.ready_for_device_type(&device.device_type) => handler,
            () = self.cancel.cancelled() => {
                return Err(Stop(
                    DeviceStatus::Cancelled,
                    outcome(-1, 0, "cancelled while its handler was compiling"),
                ));
            }
        };
        let Some(handler) = handler else {
            return Err(fail(
                NO_HANDLER,
                format!(
                    "no handler is installed for device type {}",
                    device.device_type
                ),
            ));
        };
        let manifest = &self.manifest().manifest;
        let Some((step_index, step)) = manifest
            .steps
            .iter()
            .enumerate()
            .find(|(_, s)| s.handler == handler.manifest.name)
        else {
            return Err(fail(
                NO_HANDLER,
                format!(
                    "the manifest has no step for handler {} (device type {})",
                    handler.manifest.name, device.device_type
                ),
            ));
        };
        let files: Vec<Artifact> = step
            .files
            .iter()
            .filter_map(|id| manifest.files.iter().find(|f| &f.id == id))
            .map(|f| Artifact {
                file_id: f.sha256.to_hex(),
                name: f.file_name.clone(),
                size: f.size_in_bytes,
            })
            .collect();
        let update = Update {
            provider: manifest.update_id.provider.clone(),
            name: manifest.update_id.name.clone(),
            version: manifest.update_id.version.clone(),
            handler_properties: handler_properties(&step.handler_properties, &self.spec),
            files: files.clone(),
        };
        let mut properties: Vec<(String, String)> = Vec::new();
        if let Some(m) = &device.manufacturer {
            properties.push(("manufacturer".into(), m.clone()));
        }
        if let Some(m) = &device.model {
            properties.push(("model".into(), m.clone()));
        }
        properties.extend(device.compat.iter().map(|(k, v)| (k.clone(), v.clone())));
        let services = Services {
            artifacts: Arc::new(UpdateFiles {
                cache: inner.firmware.clone(),
                files: files
                    .iter()
                    .map(|f| f.file_id.clone())
                    .collect::<HashSet<_>>(),
            }),
            devices: inner.mailbox.clone(),
            state: Arc::new(StoreState(inner.store.clone())),
        };
        Ok(Ctx {
            handler,
            services,
            device: Device {
                id: device.id.clone(),
                device_type: device.device_type.clone(),
                properties,
                firmware_version: device.firmware_version.clone(),
            },
            update,
            step_index,
        })
    }

    /// Runs the steps. Ok is a finished update (succeeded or skipped).
    async fn drive(
        &mut self,
        ctx: &Ctx,
        phases: &mut Vec<Phase>,
    ) -> Result<(DeviceStatus, Outcome), Stop> {
        let installed = self.step(ctx, Step::IsInstalled, phases).await?;
        if installed.result_code == 900 {
            return Ok((DeviceStatus::Skipped, installed));
        }
        let download = self.step(ctx, Step::Download, phases).await?;
        match download.result_code {
            503 => return Ok((DeviceStatus::Skipped, download)),
            501 => {
                let window = Duration::from_secs(self.spec.download_timeout_secs);
                if let Some(finished) = self.await_device(ctx, window, true).await? {
                    return Ok((DeviceStatus::Succeeded, finished));
                }
            }
            _ => {}
        }
        self.step(ctx, Step::Install, phases).await?;
        let applied = self.step(ctx, Step::Apply, phases).await?;
        let window = Duration::from_secs(self.spec.rollback_window_secs);
        self.set_step("verify", None).await;
        // After apply, a device that does not come back in its window, or reports a
        // failed apply, is rolled back by its handler.
        match self.await_device(ctx, window, false).await {
            Ok(Some(finished)) => Ok((DeviceStatus::Succeeded, finished)),
            Ok(None) => Err(self.roll_back(ctx, phases, applied).await),
            Err(Stop(DeviceStatus::Failed, failed)) => {
                Err(self.roll_back(ctx, phases, failed).await)
            }
            Err(stop) => Err(stop),
        }
    }

    /// One call into the device's handler.
    async fn call(&self, ctx: &Ctx, step: Step) -> Result<Outcome, CallError> {
        self.rollouts
            .inner
            .handlers
            .runtime()
            .step(
                &ctx.handler.handler,
                &ctx.services,
                step,
                &ctx.device,
                &ctx.update,
            )
            .await
    }

    /// The handler's rollback step after a failed apply: its outcome (11xx) is kept as a
    /// phase and told beside the failure, which stands either way.
    async fn roll_back(&mut self, ctx: &Ctx, phases: &mut Vec<Phase>, failed: Outcome) -> Stop {
        self.set_step(Step::Rollback.name(), None).await;
        let rollback = self
            .call(ctx, Step::Rollback)
            .await
            .unwrap_or_else(|err| handler_failed("rollback", &err));
        tracing::info!(code = rollback.result_code, details = %rollback.details, "handler rollback");
        phases.push(Phase::of(Step::Rollback.name(), &rollback));
        let said = if rollback.result_code > 0 {
            "rolled back"
        } else {
            "rollback failed"
        };
        let details = bounded(&format!("{}; {said}: {}", failed.details, rollback.details));
        Stop(DeviceStatus::Failed, Outcome { details, ..failed })
    }

    /// One handler call; a failure outcome or a trapped call stops the update.
    async fn step(
        &mut self,
        ctx: &Ctx,
        step: Step,
        phases: &mut Vec<Phase>,
    ) -> Result<Outcome, Stop> {
        if self.cancel.is_cancelled() {
            return Err(self.cancelled(ctx).await);
        }
        self.set_step(step.name(), None).await;
        let result = tokio::select! {
            result = self.call(ctx, step) => result,
            () = self.cancel.cancelled() => return Err(self.cancelled(ctx).await),
        };
        let outcome = result.unwrap_or_else(|err: CallError| handler_failed(step.name(), &err));
        tracing::info!(step = step.name(), code = outcome.result_code, details = %outcome.details, "handler step");
        phases.push(Phase::of(step.name(), &outcome));
        if outcome.result_code <= 0 {
            return Err(Stop(DeviceStatus::Failed, outcome));
        }
        Ok(outcome)
    }

    /// Waits for the device's reports through the handler. During the download
    /// (`downloading`), 100 % means go on (`Ok(None)`); a finished verdict ends the
    /// update either way. After apply, only a finished verdict ends it; silence until
    /// the window closes is a failure.
    async fn await_device(
        &mut self,
        ctx: &Ctx,
        window: Duration,
        downloading: bool,
    ) -> Result<Option<Outcome>, Stop> {
        let deadline = tokio::time::Instant::now() + window;
        loop {
            let report = tokio::select! {
                report = self.reports.recv() => report,
                () = tokio::time::sleep_until(deadline) => None,
                () = self.cancel.cancelled() => return Err(self.cancelled(ctx).await),
            };
            let Some(report) = report else {
                let (code, details) = if downloading {
                    (
                        DOWNLOAD_TIMEOUT,
                        format!(
                            "the device did not finish downloading within {} s",
                            window.as_secs()
                        ),
                    )
                } else {
                    (
                        ROLLBACK_WINDOW,
                        format!(
                            "the device did not come back with {} within the {} s rollback window",
                            ctx.update.version,
                            window.as_secs()
                        ),
                    )
                };
                return Err(Stop(
                    DeviceStatus::Failed,
                    outcome(0, gateway_code(code), details),
                ));
            };
            let verdict = self
                .rollouts
                .inner
                .handlers
                .runtime()
                .interpret_report(
                    &ctx.handler.handler,
                    &ctx.services,
                    &ctx.device,
                    &ctx.update,
                    &DeviceReport {
                        kind: report.kind,
                        payload: report.payload,
                    },
                )
                .await
                .map_err(|err| Stop(DeviceStatus::Failed, handler_failed("report", &err)))?;
            match verdict {
                ReportVerdict::Ignored => {}
                ReportVerdict::InProgress(progress) => {
                    self.set_step(if downloading { "download" } else { "verify" }, progress)
                        .await;
                    if downloading && progress == Some(100) {
                        return Ok(None);
                    }
                }
                ReportVerdict::Finished(done) if done.result_code > 0 => return Ok(Some(done)),
                ReportVerdict::Finished(failed) => return Err(Stop(DeviceStatus::Failed, failed)),
            }
        }
    }

    /// The handler's cancel step, then the cancelled stop.
    async fn cancelled(&self, ctx: &Ctx) -> Stop {
        let answer = self.call(ctx, Step::Cancel).await;
        let details = match answer {
            Ok(o) => format!("cancelled: {}", o.details),
            Err(err) => format!("cancelled; the handler's cancel failed: {err}"),
        };
        Stop(DeviceStatus::Cancelled, outcome(-1, 0, details))
    }

    pub(crate) async fn set_step(&self, step: &str, progress: Option<u8>) {
        let (rollout, device, step) = (self.rollout.clone(), self.device.clone(), step.to_owned());
        let _ = self
            .rollouts
            .inner
            .store
            .call(move |conn| {
                conn.execute(
                    "UPDATE rollout_devices SET step = ?3, progress = COALESCE(?4, progress), updated_at = ?5 \
                     WHERE rollout_id = ?1 AND device_id = ?2",
                    params![rollout, device, step, progress, now_millis()],
                )?;
                Ok(())
            })
            .await;
    }

    /// Records the end, queues the result for the cloud, returns the install result.
    async fn finish(
        &self,
        status: DeviceStatus,
        last: &Outcome,
        phases: &[Phase],
        step_index: usize,
        ctx: Option<&Ctx>,
    ) -> contract::InstallResult {
        let code = if status == DeviceStatus::Succeeded && last.result_code < 700 {
            700
        } else {
            last.result_code
        };
        let result = contract::InstallResult {
            result_code: code,
            extended_result_code: last.extended_code as i32,
            result_details: last.details.clone(),
            step_results: BTreeMap::from([(
                format!("step_{step_index}"),
                contract::StepResult {
                    result_code: code,
                    extended_result_code: last.extended_code as i32,
                    result_details: last.details.clone(),
                },
            )]),
        };
        let recorded = serde_json::to_string(&Recorded {
            last_install_result: result.clone(),
            phases: phases.to_vec(),
        })
        .expect("serialisable");
        let (rollout, device) = (self.rollout.clone(), self.device.clone());
        let now = now_millis();
        if let Err(err) = self
            .rollouts
            .inner
            .store
            .call(move |conn| {
                conn.execute(
                    "UPDATE rollout_devices SET status = ?3, result = ?4, finished_at = ?5, updated_at = ?5 \
                     WHERE rollout_id = ?1 AND device_id = ?2",
                    params![rollout, device, status.as_str(), recorded, now],
                )?;
                Ok(())
            })
            .await
        {
            tracing::error!(error = %err, "cannot record the device's result");
        }
        tracing::info!(status = status.as_str(), code, details = %last.details, "device update ended");
        if contract::valid_id(&self.device) {
            let agent = self.agent(
                ctx,
                if matches!(status, DeviceStatus::Succeeded | DeviceStatus::Skipped) {
                    IDLE
                } else {
                    FAILED
                },
                Some(result.clone()),
                status,
            );
            let topic = topics::result(&self.rollouts.inner.gateway, &self.rollout, &self.device);
            self.rollouts
                .enqueue(topic, false, |message_id| contract::DeploymentResult {
                    schema: schema::RESULT.into(),
                    message_id,
                    deployment_id: self.rollout.clone(),
                    device_id: self.device.clone(),
                    agent,
                    at: now,
                })
                .await;
        }
        result
    }

    fn agent(
        &self,
        ctx: Option<&Ctx>,
        state: i32,
        last: Option<contract::InstallResult>,
        status: DeviceStatus,
    ) -> contract::AgentState {
        // A network change installs no update: the device's update id stays unsaid.
        let installed_update_id = match &self.work {
            Work::Update(manifest) => Some(manifest.manifest.update_id.to_string()),
            Work::Wifi(_) => None,
        };
        contract::AgentState {
            device_properties: ctx
                .map(|c| {
                    c.device
                        .properties
                        .iter()
                        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                        .collect()
                })
                .unwrap_or_default(),
            compat_property_names: "manufacturer,model".into(),
            last_install_result: last,
            state,
            workflow: Some(contract::Workflow {
                action: APPLY_DEPLOYMENT,
                id: self.rollout.clone(),
                retry_timestamp: None,
            }),
            installed_update_id: installed_update_id
                .filter(|_| matches!(status, DeviceStatus::Succeeded | DeviceStatus::Skipped)),
        }
    }

    /// The device's reported state (retained), ADU-style.
    async fn publish_reported(&self, ctx: &Ctx, state: i32, last: Option<contract::InstallResult>) {
        if !contract::valid_id(&self.device) {
            return;
        }
        let status = if state == IDLE {
            DeviceStatus::Succeeded
        } else {
            DeviceStatus::Failed
        };
        let mut agent = self.agent(Some(ctx), state, last, status);
        if state == IN_PROGRESS {
            agent.installed_update_id = None;
        }
        let topic = topics::device_reported(&self.rollouts.inner.gateway, &self.device);
        self.rollouts
            .enqueue(topic, true, |message_id| contract::DeviceReported {
                schema: schema::DEVICE_REPORTED.into(),
                message_id,
                device_id: self.device.clone(),
                agent,
                desired_version: 0,
                at: now_millis(),
            })
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rollout_that_allows_downgrades_tells_the_handler() {
        let step = serde_json::json!({"imageType": 66})
            .as_object()
            .unwrap()
            .clone();
        let mut spec: RolloutSpec = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(handler_properties(&step, &spec), r#"{"imageType":66}"#);
        // A manifest step cannot grant itself a downgrade.
        let sneaky = serde_json::json!({"imageType": 66, "allowDowngrade": true})
            .as_object()
            .unwrap()
            .clone();
        assert_eq!(handler_properties(&sneaky, &spec), r#"{"imageType":66}"#);
        spec = serde_json::from_value(serde_json::json!({"allowDowngrade": true})).unwrap();
        assert_eq!(
            handler_properties(&step, &spec),
            r#"{"allowDowngrade":true,"imageType":66}"#
        );
    }

    #[test]
    fn details_are_cut_to_256_bytes_at_a_character_boundary() {
        assert_eq!(bounded("short"), "short");
        let long = "é".repeat(200);
        let cut = bounded(&long);
        assert!(cut.len() <= MAX_DETAILS, "{}", cut.len());
        assert!(cut.ends_with('…') && long.starts_with(cut.trim_end_matches('…')));
    }
}
