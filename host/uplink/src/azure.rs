//! The `azure-iot` profile's side of the session: where the hub comes from (DPS or a
//! directly registered device), the credentials of each connection, the subscriptions,
//! what each outbox message becomes on IoT Hub, and what IoT Hub sends.
//!
//! | Outpost (outbox topic under `gw/{gateway}/`) | IoT Hub |
//! |---|---|
//! | `status` (online/offline) | reported `outpost.status` of the gateway's twin |
//! | `reported` (the gateway's state) | reported `outpost.gateway` |
//! | `lobby/{device}` | reported `outpost.devices.{device}.lobby` |
//! | `reported/{device}` | reported `outpost.devices.{device}.reported` |
//! | anything else (telemetry, results, rollouts, claims) | a device-to-cloud message on `devices/{gateway}/messages/events/` with `$.mid` (the message id), `$.ct`/`$.ce` (JSON, UTF-8), `outpost-topic` (the Outpost topic below the gateway), `outpost-schema` and, for a device's message, `outpost-device` |
//! | desired state `gateway` | the twin's desired properties (`$version` orders them) |
//! | commands | direct methods, answered on `$iothub/methods/res/{status}` |
//! | deployments | cloud-to-device messages with `outpost-schema=outpost.deployment/1` |
//!
//! A device id with a `.` (which twin property names may not hold) is written with `%2E`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use outpost_azure::adu;
use outpost_azure::props::Props;
use outpost_azure::provision::{self, DpsSettings, ProvisionError};
use outpost_azure::sas;
use outpost_azure::topics::{self, HubMessage};
use outpost_store::backoff::Backoff;
use serde_json::{Value, json};

use crate::contract::{self, Assignment, ReprovisionPolicy};
use crate::registration::RegistrationError;
use crate::settings::{AzureIdentity, AzureSettings, UplinkSettings, rustls_config};

/// IoT Hub's MQTT API version the gateway speaks.
pub(crate) const API_VERSION: &str = "2021-04-12";
/// How long a registration with DPS may take before it counts as a transient failure.
const DPS_TIMEOUT: Duration = Duration::from_secs(60);
/// Transient DPS failures: the first retry after 10–20 s, doubling up to 100 s.
const DPS_BACKOFF_MIN: Duration = Duration::from_secs(10);
const DPS_BACKOFF_MAX: Duration = Duration::from_secs(100);
/// A token is renewed this long before it expires (as Microsoft's SDKs do); one that lives
/// less than four times as long, at half its life.
const RENEW_MARGIN: Duration = Duration::from_secs(120);

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

fn assignment_for(
    azure: &AzureSettings,
    hub: &str,
    device_id: &str,
    substatus: &str,
) -> Assignment {
    Assignment {
        broker: format!("mqtts://{hub}:{}", azure.port),
        alternates: Vec::new(),
        device_id: device_id.to_owned(),
        // The username and the token are made at each connect (the token expires).
        username: None,
        password: None,
        substatus: substatus.to_owned(),
        policy: ReprovisionPolicy::default(),
        initial_state: None,
    }
}

/// The hub assignment: registered through DPS until assigned or refused (a transient
/// failure backs off and tries again), or the directly registered device's.
pub(crate) async fn assignment(
    azure: &AzureSettings,
    settings: &UplinkSettings,
) -> Result<Assignment, RegistrationError> {
    let (host, id_scope, registration_id, attestation) = match &azure.identity {
        AzureIdentity::Direct { hub, device_id, .. } => {
            return Ok(assignment_for(azure, hub, device_id, "initialAssignment"));
        }
        AzureIdentity::Dps {
            host,
            id_scope,
            registration_id,
            attestation,
        } => (host, id_scope, registration_id, attestation),
    };
    let tls = rustls_config(&settings.tls)
        .map_err(|why| RegistrationError::Fatal(format!("uplink TLS settings: {why}")))?;
    let dps = DpsSettings {
        host: host.clone(),
        port: azure.port,
        id_scope: id_scope.clone(),
        registration_id: registration_id.clone(),
        attestation: attestation.clone(),
        tls,
        payload: None,
        token_ttl: azure.token_ttl,
        timeout: DPS_TIMEOUT,
        client_version: format!("outpost/{}", settings.version),
    };
    let mut backoff = Backoff::new(DPS_BACKOFF_MIN, DPS_BACKOFF_MAX);
    loop {
        match provision::register(&dps).await {
            Ok(assigned) => {
                tracing::info!(hub = %assigned.hub, device = %assigned.device_id, substatus = %assigned.substatus, "DPS assigned the gateway");
                return Ok(assignment_for(
                    azure,
                    &assigned.hub,
                    &assigned.device_id,
                    &assigned.substatus,
                ));
            }
            Err(ProvisionError::Refused(why)) => {
                return Err(RegistrationError::Refused(format!(
                    "DPS refused the registration ({why}); not retrying. Fix [uplink.azure] \
                     (id_scope, registration_id, symmetric_key or group_key) and restart"
                )));
            }
            Err(err @ (ProvisionError::Failed { .. } | ProvisionError::Settings(_))) => {
                return Err(RegistrationError::Fatal(err.to_string()));
            }
            Err(ProvisionError::Transient(why)) => {
                let delay = backoff.next_delay();
                tracing::warn!(reason = %why, retry_in = ?delay, "DPS registration did not finish; trying again");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// The key the gateway signs its hub tokens with; `None` with X.509 (the client
/// certificate of `[uplink]` is the credential).
fn device_key(azure: &AzureSettings) -> Result<Option<String>, String> {
    match &azure.identity {
        AzureIdentity::Direct { key, .. } => Ok(key.clone()),
        AzureIdentity::Dps {
            registration_id,
            attestation,
            ..
        } => match attestation {
            provision::Attestation::SymmetricKey(key) => Ok(Some(key.clone())),
            provision::Attestation::GroupKey(group) => {
                sas::derive_device_key(group, registration_id)
                    .map(Some)
                    .map_err(|err| err.to_string())
            }
            provision::Attestation::X509 => Ok(None),
        },
    }
}

/// A connection's credentials at the hub and when to renew them.
pub(crate) struct HubLogin {
    /// `{hub}/{deviceId}/?api-version=…[&model-id=…]`.
    pub(crate) username: String,
    /// A SAS token for `{hub}/devices/{deviceId}`; empty with X.509 (not sent).
    pub(crate) password: String,
    /// When to reconnect with a fresh token (none with X.509).
    pub(crate) renew_in: Option<Duration>,
}

/// Credentials for one connection to `hub` as `device_id`.
pub(crate) fn login(azure: &AzureSettings, hub: &str, device_id: &str) -> Result<HubLogin, String> {
    let mut query = Props::default();
    query.push("api-version", API_VERSION);
    if azure.device_update.is_some() {
        query.push("model-id", adu::MODEL_ID);
    }
    let username = format!("{hub}/{device_id}/?{query}");
    let Some(key) = device_key(azure)? else {
        return Ok(HubLogin {
            username,
            password: String::new(),
            renew_in: None,
        });
    };
    let ttl = azure.token_ttl.max(Duration::from_secs(5));
    let expiry = unix_now() + ttl.as_secs();
    let password = sas::token(&key, &sas::hub_resource(hub, device_id), expiry, None)
        .map_err(|err| err.to_string())?;
    // Renewal is counted from now, when the token is made; expiry is in whole seconds.
    let renew_in = if ttl > RENEW_MARGIN * 4 {
        ttl - RENEW_MARGIN
    } else {
        ttl / 2
    };
    Ok(HubLogin {
        username,
        password,
        renew_in: Some(renew_in),
    })
}

/// What the gateway subscribes to at its hub.
pub(crate) fn subscriptions(device_id: &str) -> Vec<String> {
    vec![
        topics::TWIN_RESPONSES.to_owned(),
        topics::DESIRED_PATCHES.to_owned(),
        topics::METHOD_CALLS.to_owned(),
        topics::c2d_filter(device_id),
    ]
}

/// A twin property name for a device id (`.` is not allowed in one).
fn twin_name(device: &str) -> String {
    device.replace('.', "%2E")
}

/// A reported-properties patch of the gateway's twin (`outpost.*`).
pub(crate) fn reported(patch: &Value, rid: &str) -> (String, Bytes) {
    (
        topics::twin_patch_reported(rid),
        Bytes::from(json!({ "outpost": patch }).to_string()),
    )
}

/// The outbox topic (below `gw/{gateway}/`) of the Device Update agent's own reports:
/// their payload is the `deviceUpdate` component's patch.
pub(crate) const ADU_TOPIC: &str = "adu";
pub(crate) use contract::ADU_ROLLOUT_PREFIX;

/// A reported patch of Device Update's component (not under `outpost`).
fn reported_component(fields: Value, rid: &str) -> (String, Bytes) {
    (
        topics::twin_patch_reported(rid),
        Bytes::from(adu::component_patch(fields).to_string()),
    )
}

/// The `deviceUpdate.agent` a Device Update deployment's rollout status gives: in
/// progress (6), applied (0 with result 700 and the installed update id), cancelled (0,
/// `nodeployment`, result -1), or failed (255 with an extended result code that says
/// whether the signature, the manifest, compatibility or the devices failed).
pub(crate) fn adu_agent_of_rollout(workflow: &str, status: &contract::RolloutStatus) -> Value {
    let count = |key: &str| status.counts.get(key).copied().unwrap_or(0);
    let deploying = json!({ "action": adu::ACTION_PROCESS_DEPLOYMENT, "id": workflow });
    let total: u64 = status.counts.values().sum();
    match status.state.as_str() {
        "scheduled" | "running" | "paused" => json!({ "agent": {
            "state": adu::state::DEPLOYMENT_IN_PROGRESS,
            "workflow": deploying,
        }}),
        "finished" if count("failed") == 0 && count("succeeded") + count("skipped") > 0 => {
            let details = format!(
                "{} of {total} devices updated, {} already up to date",
                count("succeeded"),
                count("skipped")
            );
            json!({ "agent": {
                "state": adu::state::IDLE,
                "workflow": deploying,
                "installedUpdateId": adu::installed_update_id(&status.update_id),
                "lastInstallResult": adu::install_result(
                    adu::result::APPLY_SUCCESS, 0, &details,
                    &[(adu::result::APPLY_SUCCESS, 0, details.clone())]),
            }})
        }
        "cancelled" => json!({ "agent": {
            "state": adu::state::IDLE,
            "workflow": { "action": adu::ACTION_CANCEL, "id": adu::NO_DEPLOYMENT },
            "lastInstallResult": adu::install_result(
                adu::result::CANCELLED, 0, status.reason.as_deref().unwrap_or("cancelled"), &[]),
        }}),
        state => {
            let reason = status.reason.clone().unwrap_or_default();
            let (erc, details) = match state {
                "refused" if reason.contains("signature refused") => {
                    (adu::erc::SIGNATURE_REFUSED, reason)
                }
                "refused" if reason.starts_with("no device matches") => {
                    (adu::erc::NO_COMPATIBLE_COMPONENT, reason)
                }
                "refused" => (adu::erc::MALFORMED, reason),
                "stopped" => (
                    adu::erc::STOPPED,
                    format!(
                        "stopped with {} of {total} devices failed: {reason}",
                        count("failed")
                    ),
                ),
                _ => (
                    adu::erc::COMPONENT_FAILED,
                    format!("{} of {total} devices failed", count("failed")),
                ),
            };
            let steps = if state == "refused" {
                Vec::new()
            } else {
                vec![(adu::result::FAILURE, erc, details.clone())]
            };
            json!({ "agent": {
                "state": adu::state::FAILED,
                "workflow": deploying,
                "lastInstallResult": adu::install_result(adu::result::FAILURE, erc, &details, &steps),
            }})
        }
    }
}

/// The bytes of the twin's reported properties that device summaries may take: IoT
/// Hub refuses a twin whose reported section passes 32 KiB, and the gateway's status,
/// its own state and Device Update's component need the rest.
pub(crate) const TWIN_DEVICES_BUDGET: usize = 24 * 1024;

/// After IoT Hub refuses a device-summary patch, the summaries wait this long before
/// they go again.
const REFUSED_HOLD: Duration = Duration::from_secs(10);

/// The keys an entry of `outpost.devices` may hold; others (an earlier build's `lobby`
/// and `reported` objects) are removed from the twin.
const SUMMARY_KEYS: [&str; 5] = ["type", "state", "update", "installed", "result"];

/// The devices behind the gateway as its twin shows them: one small summary each
/// (`outpost.devices.{id}` = type, lobby state, installed update, update state, last
/// result), sent coalesced, as many as fit in the budget ([`TWIN_DEVICES_BUDGET`], made
/// smaller each time IoT Hub refuses a patch as too large); the detail (every lobby
/// event and reported state) goes as device-to-cloud messages.
#[derive(Debug)]
pub(crate) struct TwinDevices {
    /// Each known device's summary.
    summaries: BTreeMap<String, serde_json::Map<String, Value>>,
    /// Devices in the twin, with the bytes their entry takes.
    placed: BTreeMap<String, usize>,
    /// Devices whose summary changed since the last patch.
    dirty: BTreeSet<String>,
    /// Devices left out of the twin (no room).
    omitted: BTreeSet<String>,
    /// How many were left out when the last patch said so.
    omitted_reported: Option<usize>,
    /// Entries in the twin with keys to remove, and those keys.
    stale: BTreeMap<String, Vec<String>>,
    /// The bytes the summaries may take.
    budget: usize,
    /// Whether the twin's own entries are known (after a connect, once its GET answered).
    seeded: bool,
    /// No patch before this (after a refusal).
    hold_until: Option<std::time::Instant>,
}

impl Default for TwinDevices {
    fn default() -> Self {
        Self {
            summaries: BTreeMap::new(),
            placed: BTreeMap::new(),
            dirty: BTreeSet::new(),
            omitted: BTreeSet::new(),
            omitted_reported: None,
            stale: BTreeMap::new(),
            budget: TWIN_DEVICES_BUDGET,
            seeded: true,
            hold_until: None,
        }
    }
}

impl TwinDevices {
    /// Takes what a lobby event or a device's reported state says into its summary.
    fn note(&mut self, kind: &str, device: &str, payload: &[u8]) {
        let summary = self.summaries.entry(twin_name(device)).or_default();
        let changed = match kind {
            "lobby" => serde_json::from_slice::<contract::LobbyEvent>(payload)
                .ok()
                .map(|lobby| {
                    summary.insert("type".into(), lobby.device_type.into());
                    summary.insert("state".into(), lobby.state.into());
                }),
            _ => serde_json::from_slice::<contract::DeviceReported>(payload)
                .ok()
                .map(|reported| {
                    let agent = reported.agent;
                    summary.insert("update".into(), agent.state.into());
                    summary.insert(
                        "installed".into(),
                        agent.installed_update_id.map_or(Value::Null, Value::from),
                    );
                    summary.insert(
                        "result".into(),
                        agent
                            .last_install_result
                            .map_or(Value::Null, |r| r.result_code.into()),
                    );
                }),
        };
        if changed.is_some() {
            self.dirty.insert(twin_name(device));
        }
    }

    /// Every known summary goes again with the next patch (after a reconnect).
    pub(crate) fn resend_all(&mut self) {
        self.dirty.extend(self.summaries.keys().cloned());
        self.omitted_reported = None;
    }

    /// A new connection: nothing is patched until the twin's GET has said what the twin
    /// holds ([`seed`](Self::seed)), then every summary goes again.
    pub(crate) fn reconnected(&mut self) {
        self.seeded = false;
        self.resend_all();
    }

    /// IoT Hub refused a summary patch: with 400 (too large) the budget shrinks by a
    /// quarter; either way the summaries go again after a pause, placed anew against
    /// what the next twin GET shows.
    pub(crate) fn refused(&mut self, status: u16) {
        if status == 400 {
            self.budget = (self.budget / 4 * 3).max(4 * 1024);
        }
        self.hold_until = Some(std::time::Instant::now() + REFUSED_HOLD);
        self.reconnected();
    }

    /// Takes the devices in the twin (`outpost.devices` of a twin GET's reported
    /// properties) as what is placed: they count against the budget, and keys an
    /// earlier build left in them are removed with the next patch.
    pub(crate) fn seed(&mut self, twin: &[u8]) {
        self.seeded = true;
        let Ok(twin) = serde_json::from_slice::<Value>(twin) else {
            return;
        };
        self.placed.clear();
        if let Some(devices) = twin
            .pointer("/reported/outpost/devices")
            .and_then(Value::as_object)
        {
            for (name, entry) in devices {
                let mut kept = entry.as_object().cloned().unwrap_or_default();
                let stale: Vec<String> = kept
                    .keys()
                    .filter(|key| !SUMMARY_KEYS.contains(&key.as_str()))
                    .cloned()
                    .collect();
                kept.retain(|key, _| SUMMARY_KEYS.contains(&key.as_str()));
                self.placed
                    .insert(name.clone(), entry_size(name, &Value::Object(kept)));
                if !stale.is_empty() {
                    self.stale.insert(name.clone(), stale);
                }
            }
        }
    }

    /// The twin's GET was not answered with the twin: patch without knowing it.
    pub(crate) fn seed_unknown(&mut self) {
        self.seeded = true;
    }

    /// The coalesced patch of `outpost` for the summaries that changed, if any: a device
    /// already in the twin is updated; a new one is added while the budget allows and
    /// counted in `devicesNotInTwin` when not.
    pub(crate) fn patch(&mut self) -> Option<Value> {
        if !self.seeded
            || self
                .hold_until
                .is_some_and(|until| std::time::Instant::now() < until)
        {
            return None;
        }
        self.hold_until = None;
        let mut devices = serde_json::Map::new();
        for (name, keys) in std::mem::take(&mut self.stale) {
            let removals = keys.into_iter().map(|key| (key, Value::Null)).collect();
            devices.insert(name, Value::Object(removals));
        }
        let mut used: usize = self.placed.values().sum();
        for name in std::mem::take(&mut self.dirty) {
            let Some(summary) = self.summaries.get(&name) else {
                continue;
            };
            let entry = Value::Object(summary.clone());
            let size = entry_size(&name, &entry);
            let now = self.placed.get(&name).copied().unwrap_or(0);
            if used - now + size <= self.budget {
                used = used - now + size;
                self.placed.insert(name.clone(), size);
                self.omitted.remove(&name);
                match devices.get_mut(&name).and_then(Value::as_object_mut) {
                    Some(removals) => removals.extend(summary.clone()),
                    None => {
                        devices.insert(name, entry);
                    }
                }
            } else if now == 0 {
                self.omitted.insert(name);
            }
            // A placed device whose summary grew past the budget keeps its old entry.
        }
        let omitted = self.omitted.len();
        let omitted_changed = self.omitted_reported != Some(omitted);
        if devices.is_empty() && !omitted_changed {
            return None;
        }
        self.omitted_reported = Some(omitted);
        let mut patch = json!({ "devicesNotInTwin": omitted });
        if !devices.is_empty() {
            patch["devices"] = Value::Object(devices);
        }
        Some(patch)
    }
}

/// The bytes `"name":{…},` takes in the twin's JSON.
fn entry_size(name: &str, entry: &Value) -> usize {
    name.len() + entry.to_string().len() + 4
}

/// What an outbox message becomes at the hub: a reported-properties patch (state) or a
/// device-to-cloud message (everything else). `rid` names a twin patch's request. A
/// device's lobby events and reported state go as device-to-cloud messages and into
/// its summary in `devices` (sent coalesced by the session).
pub(crate) fn outgoing(
    gateway: &str,
    device_id: &str,
    message_id: &str,
    topic: &str,
    payload: &Bytes,
    rid: &str,
    devices: &mut TwinDevices,
) -> (String, Bytes) {
    let prefix = format!("{}/gw/{gateway}/", contract::ROOT);
    let tail = topic.strip_prefix(&prefix).unwrap_or(topic);
    let parts: Vec<&str> = tail.split('/').collect();
    let body = || serde_json::from_slice::<Value>(payload).unwrap_or(Value::Null);
    match parts.as_slice() {
        ["status"] => return reported(&json!({ "status": body() }), rid),
        ["reported"] => return reported(&json!({ "gateway": body() }), rid),
        [kind @ ("lobby" | "reported"), device] => devices.note(kind, device, payload),
        // The Device Update agent's own reports (acknowledgements, start-up).
        [ADU_TOPIC] => return reported_component(body(), rid),
        // A Device Update deployment's rollout: the agent's state and result.
        ["rollouts", id] if id.starts_with(ADU_ROLLOUT_PREFIX) => {
            if let Ok(status) = serde_json::from_slice::<contract::RolloutStatus>(payload)
                && status.reason.as_deref() != Some(contract::ADU_REPLACED)
            {
                let workflow = &id[ADU_ROLLOUT_PREFIX.len()..];
                return reported_component(adu_agent_of_rollout(workflow, &status), rid);
            }
        }
        _ => {}
    }
    d2c(device_id, message_id, tail, payload)
}

/// A device-to-cloud message for the Outpost topic `tail` (below `gw/{gateway}/`).
pub(crate) fn d2c(
    device_id: &str,
    message_id: &str,
    tail: &str,
    payload: &Bytes,
) -> (String, Bytes) {
    let parts: Vec<&str> = tail.split('/').collect();
    let mut props = Props::default();
    props
        .push("$.mid", message_id)
        .push("$.ct", "application/json")
        .push("$.ce", "utf-8")
        .push("outpost-topic", tail);
    if let Some(schema) = serde_json::from_slice::<SchemaOnly>(payload)
        .ok()
        .and_then(|s| s.schema)
    {
        props.push("outpost-schema", schema);
    }
    let device = match parts.as_slice() {
        ["telemetry" | "claimed" | "lobby" | "reported", device] | ["results", _, device] => {
            Some(*device)
        }
        _ => None,
    };
    if let Some(device) = device {
        props.push("outpost-device", device);
    }
    (topics::telemetry(device_id, &props), payload.clone())
}

#[derive(serde::Deserialize)]
struct SchemaOnly {
    schema: Option<String>,
}

/// What the hub sent, as the session acts on it.
pub(crate) enum Inbound {
    /// The answer to a twin request.
    TwinResponse {
        /// Its status.
        status: u16,
        /// The request id.
        rid: String,
    },
    /// A desired-properties patch (the session fetches the whole twin for it).
    DesiredPatch,
    /// A direct method.
    Method {
        /// Its name.
        name: String,
        /// The request id to answer.
        rid: String,
    },
    /// A cloud-to-device message.
    C2d(Props),
}

/// Reads a topic the hub published to `device_id`.
pub(crate) fn inbound(device_id: &str, topic: &str) -> Result<Inbound, String> {
    match HubMessage::parse(device_id, topic).map_err(|err| err.to_string())? {
        HubMessage::TwinResponse { status, rid, .. } => Ok(Inbound::TwinResponse { status, rid }),
        HubMessage::DesiredPatch { .. } => Ok(Inbound::DesiredPatch),
        HubMessage::MethodCall { name, rid } => Ok(Inbound::Method { name, rid }),
        HubMessage::C2d(props) => Ok(Inbound::C2d(props)),
    }
}

/// The desired properties of a twin GET's body as the gateway's desired state: the
/// version and the properties without IoT Hub's `$version` and `$metadata`.
pub(crate) fn desired_of_twin(body: &[u8]) -> Result<contract::DesiredState, String> {
    let twin: Value =
        serde_json::from_slice(body).map_err(|err| format!("the twin is not JSON: {err}"))?;
    let mut desired = twin
        .get("desired")
        .and_then(Value::as_object)
        .cloned()
        .ok_or("the twin has no desired properties")?;
    let version = desired
        .remove("$version")
        .and_then(|v| v.as_u64())
        .ok_or("the desired properties have no $version")?;
    // IoT Hub's own `$version`/`$metadata`, and Plug and Play components (`"__t": "c"`,
    // such as Device Update's `deviceUpdate`), which are not the gateway's desired state.
    desired.retain(|name, value| !name.starts_with('$') && value.get("__t") != Some(&json!("c")));
    Ok(contract::DesiredState {
        schema: contract::schema::DESIRED.to_owned(),
        version,
        body: Value::Object(desired),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_goes_to_the_twin_and_the_rest_to_device_to_cloud_messages() {
        let gateway = "gw-1";
        let mut devices = TwinDevices::default();
        let (topic, body) = outgoing(
            gateway,
            "gw-1",
            "m0",
            &contract::topics::status(gateway),
            &Bytes::from_static(b"{\"state\":\"online\"}"),
            "5",
            &mut devices,
        );
        assert_eq!(topic, "$iothub/twin/PATCH/properties/reported/?$rid=5");
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body, json!({"outpost": {"status": {"state": "online"}}}));

        // A device's reported state: the detail as a device-to-cloud message, and a
        // summary for the coalesced twin patch.
        let reported = reported_payload("esp.7", "Acme/fw/1.2", 700);
        let (topic, body) = outgoing(
            gateway,
            "gw-1",
            "m1",
            &contract::topics::device_reported(gateway, "esp.7"),
            &reported,
            "6",
            &mut devices,
        );
        assert_eq!(body, reported);
        let props =
            Props::parse(topic.strip_prefix("devices/gw-1/messages/events/").unwrap()).unwrap();
        assert_eq!(props.get("outpost-device"), Some("esp.7"));
        assert_eq!(props.get("outpost-topic"), Some("reported/esp.7"));
        assert_eq!(
            devices.patch().unwrap(),
            json!({"devicesNotInTwin": 0, "devices": {"esp%2E7":
                {"update": 0, "installed": "Acme/fw/1.2", "result": 700}}})
        );
        assert_eq!(devices.patch(), None, "nothing changed since");

        let telemetry = contract::topics::telemetry(gateway, "esp-1");
        let payload = Bytes::from_static(b"{\"schema\":\"outpost.telemetry/1\",\"t\":1}");
        let (topic, body) = outgoing(
            gateway,
            "gw-1",
            "m2",
            &telemetry,
            &payload,
            "7",
            &mut devices,
        );
        assert_eq!(body, payload);
        let props =
            Props::parse(topic.strip_prefix("devices/gw-1/messages/events/").unwrap()).unwrap();
        assert_eq!(props.get("$.mid"), Some("m2"));
        assert_eq!(props.get("$.ct"), Some("application/json"));
        assert_eq!(props.get("outpost-device"), Some("esp-1"));
        assert_eq!(props.get("outpost-topic"), Some("telemetry/esp-1"));
        assert_eq!(props.get("outpost-schema"), Some("outpost.telemetry/1"));
    }

    fn reported_payload(device: &str, installed: &str, result: i32) -> Bytes {
        let reported = contract::DeviceReported {
            schema: contract::schema::DEVICE_REPORTED.into(),
            message_id: contract::message_id(),
            device_id: device.into(),
            agent: contract::AgentState {
                device_properties: serde_json::Map::from_iter([
                    ("manufacturer".to_owned(), json!("Espressif")),
                    ("model".to_owned(), json!("esp32-app")),
                ]),
                compat_property_names: "manufacturer,model".into(),
                last_install_result: Some(contract::InstallResult {
                    result_code: result,
                    result_details: "applied and back with the new version".into(),
                    ..contract::InstallResult::default()
                }),
                state: 0,
                workflow: None,
                installed_update_id: Some(installed.into()),
            },
            desired_version: 3,
            at: 1_796_000_000_000,
        };
        Bytes::from(serde_json::to_vec(&reported).unwrap())
    }

    /// Passes device `id`'s lobby event through `outgoing`.
    fn lobby(devices: &mut TwinDevices, id: &str) {
        let topic = format!("outpost/v1/gw/gw/lobby/{id}");
        outgoing("gw", "gw", "m", &topic, &lobby_payload(id), "r", devices);
    }

    fn lobby_payload(device: &str) -> Bytes {
        let lobby = contract::LobbyEvent {
            schema: contract::schema::LOBBY.into(),
            message_id: contract::message_id(),
            device_id: device.into(),
            device_type: "esp32-app".into(),
            state: "claimed".into(),
            at: 1_796_000_000_000,
        };
        Bytes::from(serde_json::to_vec(&lobby).unwrap())
    }

    /// Applies a JSON merge patch (as IoT Hub does to reported properties).
    fn merge(target: &mut Value, patch: &Value) {
        match (target.as_object_mut(), patch.as_object()) {
            (Some(target), Some(patch)) => {
                for (key, value) in patch {
                    if value.is_null() {
                        target.remove(key);
                    } else {
                        merge(target.entry(key.clone()).or_insert(json!({})), value);
                    }
                }
            }
            _ => *target = patch.clone(),
        }
    }

    /// The twin's reported section with `n` devices behind the gateway whose ids are
    /// `id_len` characters: each device's lobby event and reported state pass through
    /// `outgoing` in batches of 64, each batch followed by its coalesced patch, as the
    /// session does. Returns the section and how many devices are in it.
    fn twin_with(n: usize, id_len: usize) -> (Value, usize, usize) {
        let gateway = "gw-1";
        let mut devices = TwinDevices::default();
        let mut twin = json!({});
        // The rest of what the gateway reports, at its largest.
        merge(
            &mut twin,
            &json!({"outpost": {"status": {"schema": "outpost.status/1",
            "state": "online", "since": 1_796_000_000_000_i64, "version": "0.1.0"}}}),
        );
        let ids: Vec<String> = (0..n).map(|i| format!("{i:0>id_len$}")).collect();
        let messages: Vec<(String, Bytes)> = ids
            .iter()
            .flat_map(|id| {
                [
                    (contract::topics::lobby(gateway, id), lobby_payload(id)),
                    (
                        contract::topics::device_reported(gateway, id),
                        reported_payload(id, "Outpost/light-fw/2.0.0", 700),
                    ),
                ]
            })
            .collect();
        let mut patches = 0;
        for batch in messages.chunks(64) {
            for (topic, payload) in batch {
                outgoing(gateway, "gw-1", "m", topic, payload, "r", &mut devices);
            }
            if let Some(patch) = devices.patch() {
                patches += 1;
                merge(&mut twin, &json!({ "outpost": patch }));
            }
        }
        let placed = twin["outpost"]["devices"]
            .as_object()
            .map_or(0, |d| d.len());
        (twin, placed, patches)
    }

    /// IoT Hub refuses reported properties over 32 KiB: with 200 devices behind the
    /// gateway the twin stays under it with every device's summary in it, and with ids
    /// long enough that not all fit, the rest are counted and their detail goes as
    /// device-to-cloud messages. Prints the sizes (`cargo test -p outpost-uplink twin_size
    /// -- --nocapture`).
    #[test]
    fn twin_size_with_200_devices_stays_under_iot_hubs_limit() {
        let (twin, placed, patches) = twin_with(200, 12);
        let size = twin.to_string().len();
        println!(
            "200 devices, 12-character ids: reported twin {size} bytes, {placed} devices in it, {patches} patches"
        );
        assert_eq!(placed, 200);
        assert_eq!(twin["outpost"]["devicesNotInTwin"], 0);
        assert!(size <= 32 * 1024, "{size}");
        assert_eq!(patches, 7, "one patch per batch of 64 messages");

        let (twin, placed, _) = twin_with(200, 64);
        let size = twin.to_string().len();
        println!(
            "200 devices, 64-character ids: reported twin {size} bytes, {placed} devices in it"
        );
        assert!(size <= 32 * 1024, "{size}");
        assert!(placed < 200 && placed > 100, "{placed}");
        assert_eq!(twin["outpost"]["devicesNotInTwin"], 200 - placed as u64);
    }

    #[test]
    fn an_earlier_builds_entries_are_cleaned_and_a_refusal_shrinks_the_budget() {
        let mut devices = TwinDevices::default();
        devices.reconnected();
        lobby(&mut devices, "a");
        assert_eq!(devices.patch(), None, "nothing before the twin is known");
        devices.seed(
            json!({"reported": {"outpost": {"devices": {
                "old": {"lobby": {"deviceType": "x".repeat(400)}, "type": "esp32-app"}
            }}}})
            .to_string()
            .as_bytes(),
        );
        let patch = devices.patch().unwrap();
        assert_eq!(patch["devices"]["old"], json!({"lobby": null}), "{patch}");
        assert_eq!(patch["devices"]["a"]["state"], "claimed");
        assert!(
            devices.placed["old"] < 100,
            "counted without what is removed"
        );
        // Refused as too large: a smaller budget, nothing until the twin is read again
        // and the pause is over, then every summary again.
        devices.refused(400);
        assert_eq!(devices.budget, TWIN_DEVICES_BUDGET / 4 * 3);
        devices.seed(b"{}");
        assert_eq!(devices.patch(), None, "paused");
        devices.hold_until = Some(std::time::Instant::now());
        assert_eq!(
            devices.patch().unwrap()["devices"]["a"]["type"],
            "esp32-app"
        );
    }

    #[test]
    fn devices_already_in_the_twin_count_and_a_reconnect_sends_every_summary_again() {
        let mut devices = TwinDevices::default();
        let big = "x".repeat(TWIN_DEVICES_BUDGET);
        devices.seed(
            json!({"reported": {"outpost": {"devices": {"old": {"type": big}}}}})
                .to_string()
                .as_bytes(),
        );
        outgoing(
            "gw",
            "gw",
            "m",
            "outpost/v1/gw/gw/lobby/new",
            &lobby_payload("new"),
            "r",
            &mut devices,
        );
        assert_eq!(
            devices.patch().unwrap(),
            json!({"devicesNotInTwin": 1}),
            "no room left next to the device already in the twin"
        );
        let mut devices = TwinDevices::default();
        lobby(&mut devices, "a");
        assert!(devices.patch().is_some());
        assert_eq!(devices.patch(), None);
        devices.resend_all();
        assert_eq!(
            devices.patch().unwrap()["devices"]["a"],
            json!({"type": "esp32-app", "state": "claimed"})
        );
    }

    #[test]
    fn a_twin_gives_the_desired_state_without_iot_hub_metadata() {
        let body =
            br#"{"desired":{"interval":5,"$version":7,"$metadata":{}},"reported":{"$version":2}}"#;
        let desired = desired_of_twin(body).unwrap();
        assert_eq!(desired.version, 7);
        assert_eq!(desired.body, json!({"interval": 5}));
        assert!(desired_of_twin(b"{}").is_err());
        assert!(desired_of_twin(br#"{"desired":{}}"#).is_err());
    }

    #[test]
    fn the_login_names_the_hub_device_model_and_renews_before_expiry() {
        let azure = AzureSettings {
            identity: AzureIdentity::Direct {
                hub: "hub.example".into(),
                device_id: "gw-1".into(),
                key: Some("a2V5".into()),
            },
            port: 8883,
            token_ttl: Duration::from_secs(3600),
            device_update: Some(crate::DeviceUpdateSettings {
                manufacturer: "Acme".into(),
                model: "site-gateway".into(),
            }),
            devices: Vec::new(),
        };
        let login = login(&azure, "hub.example", "gw-1").unwrap();
        assert_eq!(
            login.username,
            "hub.example/gw-1/?api-version=2021-04-12&model-id=dtmi%3Aazure%3Aiot%3AdeviceUpdateModel%3B3"
        );
        assert!(
            login
                .password
                .starts_with("SharedAccessSignature sr=hub.example%2Fdevices%2Fgw-1&sig=")
        );
        assert_eq!(login.renew_in, Some(Duration::from_secs(3480)));
        let short = AzureSettings {
            token_ttl: Duration::from_secs(60),
            ..azure
        };
        assert_eq!(
            super::login(&short, "hub.example", "gw-1")
                .unwrap()
                .renew_in,
            Some(Duration::from_secs(30))
        );
    }

    fn rollout(state: &str, counts: &[(&str, u64)], reason: Option<&str>) -> Bytes {
        let status = contract::RolloutStatus {
            schema: contract::schema::ROLLOUT.into(),
            message_id: "m".into(),
            deployment_id: "adu-wf-9".into(),
            update_id: "Acme/sensor-fw/2.0.0".into(),
            state: state.into(),
            reason: reason.map(str::to_owned),
            wave: 0,
            waves: 1,
            counts: counts.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
            at: 1,
        };
        Bytes::from(serde_json::to_vec(&status).unwrap())
    }

    fn agent(state: &str, counts: &[(&str, u64)], reason: Option<&str>) -> Value {
        let (topic, body) = outgoing(
            "gw",
            "gw",
            "m",
            "outpost/v1/gw/gw/rollouts/adu-wf-9",
            &rollout(state, counts, reason),
            "r1",
            &mut TwinDevices::default(),
        );
        assert_eq!(topic, "$iothub/twin/PATCH/properties/reported/?$rid=r1");
        let patch: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(patch["deviceUpdate"]["__t"], "c", "{patch}");
        patch["deviceUpdate"]["agent"].clone()
    }

    #[test]
    fn a_device_update_rollout_reports_as_the_agent_does() {
        let running = agent("running", &[("running", 2)], None);
        assert_eq!(running["state"], 6);
        assert_eq!(running["workflow"], json!({"action": 3, "id": "wf-9"}));
        let done = agent("finished", &[("succeeded", 2), ("skipped", 1)], None);
        assert_eq!(done["state"], 0);
        assert_eq!(
            done["installedUpdateId"],
            r#"{"provider":"Acme","name":"sensor-fw","version":"2.0.0"}"#
        );
        assert_eq!(done["lastInstallResult"]["resultCode"], 700);
        assert_eq!(
            done["lastInstallResult"]["stepResults"]["step_0"]["resultCode"],
            700
        );
        let failed = agent("finished", &[("succeeded", 1), ("failed", 1)], None);
        assert_eq!(failed["state"], 255);
        assert_eq!(failed["lastInstallResult"]["resultCode"], 0);
        assert_eq!(
            failed["lastInstallResult"]["extendedResultCodes"],
            "30000001"
        );
        assert!(failed.get("installedUpdateId").is_none(), "{failed}");
        let stopped = agent("stopped", &[("failed", 3)], Some("error threshold"));
        assert_eq!(
            stopped["lastInstallResult"]["extendedResultCodes"],
            "30000002"
        );
        for (reason, erc) in [
            (
                "the manifest was refused: update manifest signature refused: sjwk: …",
                "A0000001",
            ),
            (
                "no device matches: Acme/sensor-fw/2.0.0 needs …",
                "70000001",
            ),
            ("the manifest was refused: updateManifest: …", "20000001"),
        ] {
            let refused = agent("refused", &[], Some(reason));
            assert_eq!(refused["state"], 255);
            assert_eq!(refused["lastInstallResult"]["extendedResultCodes"], erc);
            assert_eq!(refused["lastInstallResult"]["resultDetails"], reason);
        }
        let cancelled = agent(
            "cancelled",
            &[("cancelled", 2)],
            Some("cancelled by the cloud"),
        );
        assert_eq!(cancelled["state"], 0);
        assert_eq!(
            cancelled["workflow"],
            json!({"action": 255, "id": "nodeployment"})
        );
        assert_eq!(cancelled["lastInstallResult"]["resultCode"], -1);
        // Other rollouts stay device-to-cloud messages.
        let (topic, _) = outgoing(
            "gw",
            "gw",
            "m",
            "outpost/v1/gw/gw/rollouts/local-1",
            &rollout("running", &[], None),
            "r1",
            &mut TwinDevices::default(),
        );
        assert!(topic.starts_with("devices/gw/messages/events/"), "{topic}");
    }
}
