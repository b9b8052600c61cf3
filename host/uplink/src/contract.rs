//! The cloud contract, version 1: topics, QoS, retained use and payload schemas.
//!
//! `docs/cloud-contract.md` is the prose of this module; the two change together. Every
//! payload is a JSON object whose `schema` names its type and version
//! (`outpost.telemetry/1`), so a backend can route on it and a newer field never breaks an
//! older reader (unknown fields are ignored both ways).

use serde::{Deserialize, Serialize};

/// The topic root of contract version 1.
pub const ROOT: &str = "outpost/v1";

/// The largest payload either side may publish, in bytes (MQTT allows 256 MiB; brokers
/// and devices do not).
pub const MAX_PAYLOAD: usize = 256 * 1024;

/// The largest telemetry body a device may post, in bytes (serialised JSON).
pub const MAX_TELEMETRY_BODY: usize = 16 * 1024;

/// Topic builders. Identifiers are checked by [`valid_id`] before they reach a topic.
pub mod topics {
    use super::ROOT;

    /// Registration request (gateway → cloud, QoS 1).
    pub fn registration_request(registration_id: &str) -> String {
        format!("{ROOT}/register/{registration_id}/req")
    }
    /// Registration responses (cloud → gateway, QoS 1); the gateway subscribes first.
    pub fn registration_response(registration_id: &str) -> String {
        format!("{ROOT}/register/{registration_id}/res")
    }
    /// Gateway status (retained, QoS 1; also the last will, so it reads `offline` when
    /// the gateway vanishes).
    pub fn status(gateway: &str) -> String {
        format!("{ROOT}/gw/{gateway}/status")
    }
    /// The gateway's own reported state (retained, QoS 1).
    pub fn gateway_reported(gateway: &str) -> String {
        format!("{ROOT}/gw/{gateway}/reported")
    }
    /// A device entered or changed in the lobby (QoS 1).
    pub fn lobby(gateway: &str, device: &str) -> String {
        format!("{ROOT}/gw/{gateway}/lobby/{device}")
    }
    /// Device telemetry relayed by the gateway (QoS 1).
    pub fn telemetry(gateway: &str, device: &str) -> String {
        // Once per ingest request: joined directly, `format!` showed in the profile.
        const GW: &str = "/gw/";
        const TELEMETRY: &str = "/telemetry/";
        let mut topic = String::with_capacity(
            ROOT.len() + GW.len() + gateway.len() + TELEMETRY.len() + device.len(),
        );
        for part in [ROOT, GW, gateway, TELEMETRY, device] {
            topic.push_str(part);
        }
        topic
    }
    /// A device's reported state with update-agent metadata (retained, QoS 1).
    pub fn device_reported(gateway: &str, device: &str) -> String {
        format!("{ROOT}/gw/{gateway}/reported/{device}")
    }
    /// Desired state for `target` (`gateway` or a device id), published retained by the
    /// cloud (cloud → gateway).
    pub fn desired(gateway: &str, target: &str) -> String {
        format!("{ROOT}/gw/{gateway}/desired/{target}")
    }
    /// A command (cloud → gateway, QoS 1); the id is the request id.
    pub fn command(gateway: &str, rid: &str) -> String {
        format!("{ROOT}/gw/{gateway}/commands/{rid}")
    }
    /// The answer to a command (gateway → cloud, QoS 1).
    pub fn command_result(gateway: &str, rid: &str) -> String {
        format!("{ROOT}/gw/{gateway}/commands/{rid}/result")
    }
    /// A deployment for this gateway (cloud → gateway, QoS 1).
    pub fn deployment(gateway: &str, deployment: &str) -> String {
        format!("{ROOT}/gw/{gateway}/deployments/{deployment}")
    }
    /// A per-device deployment result (gateway → cloud, QoS 1).
    pub fn result(gateway: &str, deployment: &str, device: &str) -> String {
        format!("{ROOT}/gw/{gateway}/results/{deployment}/{device}")
    }
    /// A rollout's progress: state, wave and counts (retained, QoS 1).
    pub fn rollout(gateway: &str, deployment: &str) -> String {
        format!("{ROOT}/gw/{gateway}/rollouts/{deployment}")
    }
    /// A claim request: a device's CSR to be signed (gateway → cloud, QoS 1).
    pub fn claim_request(gateway: &str, rid: &str) -> String {
        format!("{ROOT}/gw/{gateway}/claims/{rid}/req")
    }
    /// The answer to a claim request (cloud → gateway, QoS 1).
    pub fn claim_response(gateway: &str, rid: &str) -> String {
        format!("{ROOT}/gw/{gateway}/claims/{rid}/res")
    }
    /// A claim the gateway made offline with its local CA, reported later (QoS 1).
    pub fn claim_report(gateway: &str, device: &str) -> String {
        format!("{ROOT}/gw/{gateway}/claimed/{device}")
    }
    /// What a gateway subscribes to on its assigned broker.
    pub fn gateway_subscriptions(gateway: &str) -> Vec<String> {
        vec![
            format!("{ROOT}/gw/{gateway}/desired/+"),
            format!("{ROOT}/gw/{gateway}/commands/+"),
            format!("{ROOT}/gw/{gateway}/deployments/+"),
            format!("{ROOT}/gw/{gateway}/claims/+/res"),
        ]
    }
}

/// Whether `id` may appear as one topic level: 1–128 characters of `[A-Za-z0-9._:-]`
/// (no `/`, `+`, `#`, spaces or control characters).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// The device whose own traffic `topic` is (`gw/{gateway}/telemetry|lobby|reported/{device}`):
/// what goes out on the device's own connection when it has a cloud identity of its own.
pub fn lane_device(topic: &str) -> Option<&str> {
    let rest = topic.strip_prefix(ROOT)?.strip_prefix("/gw/")?;
    let mut levels = rest.split('/');
    let (_gateway, kind, device) = (levels.next()?, levels.next()?, levels.next()?);
    (levels.next().is_none() && matches!(kind, "telemetry" | "lobby" | "reported"))
        .then_some(device)
}

/// Schema names, one per payload type.
pub mod schema {
    /// [`super::GatewayStatus`].
    pub const STATUS: &str = "outpost.status/1";
    /// [`super::RegistrationRequest`].
    pub const REGISTRATION_REQUEST: &str = "outpost.registration-request/1";
    /// [`super::RegistrationResponse`].
    pub const REGISTRATION_RESPONSE: &str = "outpost.registration-response/1";
    /// [`super::LobbyEvent`].
    pub const LOBBY: &str = "outpost.lobby/1";
    /// [`super::Telemetry`].
    pub const TELEMETRY: &str = "outpost.telemetry/1";
    /// [`super::DeviceReported`].
    pub const DEVICE_REPORTED: &str = "outpost.device-reported/1";
    /// [`super::GatewayReported`].
    pub const GATEWAY_REPORTED: &str = "outpost.gateway-reported/1";
    /// [`super::DesiredState`].
    pub const DESIRED: &str = "outpost.desired/1";
    /// [`super::Command`].
    pub const COMMAND: &str = "outpost.command/1";
    /// [`super::CommandResult`].
    pub const COMMAND_RESULT: &str = "outpost.command-result/1";
    /// [`super::Deployment`].
    pub const DEPLOYMENT: &str = "outpost.deployment/1";
    /// A [`super::Deployment`] that cancels: the active rollouts whose ids start with its
    /// `manifest` (a prefix, never empty) are cancelled. Made by the gateway itself for
    /// Device Update's cancel; not part of the MQTT contract.
    pub const DEPLOYMENT_CANCEL: &str = "outpost.deployment-cancel/1";
    /// [`super::DeploymentResult`].
    pub const RESULT: &str = "outpost.result/1";
    /// [`super::RolloutStatus`].
    pub const ROLLOUT: &str = "outpost.rollout/1";
    /// [`super::ClaimRequest`].
    pub const CLAIM_REQUEST: &str = "outpost.claim-request/1";
    /// [`super::ClaimResponse`].
    pub const CLAIM_RESPONSE: &str = "outpost.claim-response/1";
    /// [`super::ClaimReport`].
    pub const CLAIM_REPORT: &str = "outpost.claim-report/1";
}

/// `…/status`: online or offline, retained; the offline copy is the last will.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayStatus {
    /// [`schema::STATUS`].
    pub schema: String,
    /// The gateway's id.
    pub gateway_id: String,
    /// `online` or `offline`.
    pub state: String,
    /// The gateway software version.
    pub version: String,
    /// Unix milliseconds when the state began (`0` in the last will: unknown).
    pub since: i64,
}

/// The reprovisioning policy of an enrollment (Azure DPS semantics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ReprovisionPolicy {
    /// Move to the new broker and keep the state (the default).
    #[default]
    Migrate,
    /// Move and start again from the enrollment's initial state.
    Reset,
    /// Stay on the first assignment.
    Never,
}

/// `register/{id}/req`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrationRequest {
    /// [`schema::REGISTRATION_REQUEST`].
    pub schema: String,
    /// Request id, echoed in the response.
    pub rid: String,
    /// The enrollment's registration id (the gateway id unless configured).
    pub registration_id: String,
    /// `SharedAccessSignature sr=…&sig=…&se=…&skn=registration` (see [`crate::sas`]).
    pub sas: String,
    /// Free data for the cloud's allocation logic (gateway id, version).
    #[serde(default)]
    pub payload: serde_json::Value,
}

/// `register/{id}/res`: `status` follows HTTP (200 assigned, 202 assigning, 401, 429, 5xx).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrationResponse {
    /// [`schema::REGISTRATION_RESPONSE`].
    pub schema: String,
    /// The request id this answers.
    pub rid: String,
    /// HTTP-like status.
    pub status: u16,
    /// Seconds to wait before the next attempt (429, 202).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
    /// What went wrong (status ≥ 400).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The assignment (status 200).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assignment: Option<Assignment>,
}

/// Where and as whom the gateway connects; cached by the gateway.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Assignment {
    /// `mqtt://host:port` or `mqtts://host:port`.
    pub broker: String,
    /// Other brokers of the same cluster, in order of preference after `broker`: the
    /// gateway fails over to them as to `uplink.brokers` (absent: none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alternates: Vec<String>,
    /// The identity on that broker (the gateway id in topics).
    pub device_id: String,
    /// MQTT username on the assigned broker, if it wants one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// MQTT password or token on the assigned broker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// `initialAssignment`, `deviceDataMigrated`, `deviceDataReset` or
    /// `reprovisionedToInitialAssignment` (DPS substatus).
    pub substatus: String,
    /// The enrollment's reprovisioning policy.
    #[serde(default)]
    pub policy: ReprovisionPolicy,
    /// The desired state to start from (after a reset or the first assignment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_state: Option<DesiredState>,
}

/// `lobby/{device}`: a device entered the lobby or changed state there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LobbyEvent {
    /// [`schema::LOBBY`].
    pub schema: String,
    /// De-duplication id.
    pub message_id: String,
    /// The device.
    pub device_id: String,
    /// Its device type (selects the update handler).
    pub device_type: String,
    /// Its lobby state (`discovered`, `provisioned`, `claimed`, …).
    pub state: String,
    /// Unix milliseconds.
    pub at: i64,
}

/// `telemetry/{device}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Telemetry<B = serde_json::Value, S = String> {
    /// [`schema::TELEMETRY`].
    pub schema: S,
    /// De-duplication id (the cloud may see a message twice, never zero times).
    pub message_id: S,
    /// The device.
    pub device_id: S,
    /// Unix milliseconds when the gateway accepted it.
    pub received_at: i64,
    /// The device's JSON object, as posted (≤ [`MAX_TELEMETRY_BODY`] bytes); the gateway
    /// relays the posted text unparsed (`Box<RawValue>`).
    pub body: B,
}

/// ADU-style update-agent metadata in a device's reported state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentState {
    /// `manufacturer`, `model`, … as the device reports them.
    #[serde(default)]
    pub device_properties: serde_json::Map<String, serde_json::Value>,
    /// Which device properties decide compatibility (≤ 5, default "manufacturer,model").
    pub compat_property_names: String,
    /// The last install's result, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_install_result: Option<InstallResult>,
    /// Idle 0, DeploymentInProgress 6, Failed 255.
    pub state: i32,
    /// The workflow the state belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<Workflow>,
    /// `{provider}/{name}/{version}` of what is installed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub installed_update_id: Option<String>,
}

/// ADU `lastInstallResult`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstallResult {
    /// > 0 success (700 applied), ≤ 0 failure.
    pub result_code: i32,
    /// `facility(4) | component(8) | value(20)`.
    pub extended_result_code: i32,
    /// Free text.
    #[serde(default)]
    pub result_details: String,
    /// `step_0`, `step_1`, … → that step's result.
    #[serde(default)]
    pub step_results: std::collections::BTreeMap<String, StepResult>,
}

/// One step's result.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StepResult {
    /// As [`InstallResult::result_code`].
    pub result_code: i32,
    /// As [`InstallResult::extended_result_code`].
    pub extended_result_code: i32,
    /// Free text.
    #[serde(default)]
    pub result_details: String,
}

/// ADU `workflow`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Workflow {
    /// applyDeployment 3, cancel 255.
    pub action: i32,
    /// The deployment id.
    pub id: String,
    /// Set when the service asked for a retry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_timestamp: Option<String>,
}

/// `reported/{device}` (retained).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceReported {
    /// [`schema::DEVICE_REPORTED`].
    pub schema: String,
    /// De-duplication id.
    pub message_id: String,
    /// The device.
    pub device_id: String,
    /// The update agent's state.
    pub agent: AgentState,
    /// The desired-state version this report reflects.
    #[serde(default)]
    pub desired_version: u64,
    /// Unix milliseconds.
    pub at: i64,
}

/// `reported` (retained): the gateway's own state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayReported {
    /// [`schema::GATEWAY_REPORTED`].
    pub schema: String,
    /// De-duplication id.
    pub message_id: String,
    /// The gateway.
    pub gateway_id: String,
    /// Its software version.
    pub version: String,
    /// The desired-state version applied.
    pub desired_version: u64,
    /// Devices in the lobby.
    pub devices: u64,
    /// The registration substatus of the current assignment, if registered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub substatus: Option<String>,
    /// Unix milliseconds.
    pub at: i64,
}

/// `desired/{target}` (retained, cloud → gateway). A version lower than the one held is
/// ignored; the body replaces the previous one whole.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DesiredState {
    /// [`schema::DESIRED`].
    pub schema: String,
    /// Monotonic per target.
    pub version: u64,
    /// The desired properties.
    pub body: serde_json::Value,
}

/// `commands/{rid}` (cloud → gateway).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Command {
    /// [`schema::COMMAND`].
    pub schema: String,
    /// The command name (`ping`, `report-state`, …).
    pub name: String,
    /// Its arguments.
    #[serde(default)]
    pub args: serde_json::Value,
}

/// `commands/{rid}/result`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CommandResult {
    /// [`schema::COMMAND_RESULT`].
    pub schema: String,
    /// De-duplication id.
    pub message_id: String,
    /// The command's request id.
    pub rid: String,
    /// HTTP-like status: 200 done, 400 malformed, 404 unknown command.
    pub status: u16,
    /// The answer.
    #[serde(default)]
    pub body: serde_json::Value,
}

/// `deployments/{id}` (cloud → gateway): a signed update manifest and its rollout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Deployment {
    /// [`schema::DEPLOYMENT`].
    pub schema: String,
    /// The deployment id (as in the topic).
    pub deployment_id: String,
    /// The signed manifest (JWS, EdDSA) as imported by `outpost firmware import`.
    pub manifest: String,
    /// Rollout settings (groups, waves, thresholds, window).
    #[serde(default)]
    pub rollout: serde_json::Value,
}

/// `results/{deployment}/{device}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentResult {
    /// [`schema::RESULT`].
    pub schema: String,
    /// De-duplication id.
    pub message_id: String,
    /// The deployment.
    pub deployment_id: String,
    /// The device.
    pub device_id: String,
    /// The agent state after the attempt, with per-step results.
    pub agent: AgentState,
    /// Unix milliseconds.
    pub at: i64,
}

/// `rollouts/{deployment}` (retained): where a rollout stands. Published on every change
/// of state or wave, and when it ends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// [`schema::ROLLOUT`].
    pub schema: String,
    /// De-duplication id.
    pub message_id: String,
    /// The deployment.
    pub deployment_id: String,
    /// `{provider}/{name}/{version}`.
    pub update_id: String,
    /// `scheduled`, `running`, `paused`, `stopped`, `cancelled` or `finished`.
    pub state: String,
    /// Why it paused or stopped, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The wave in progress (0-based) and how many there are.
    pub wave: u32,
    /// Number of waves.
    pub waves: u32,
    /// Devices by status: pending, running, succeeded, failed, cancelled, skipped.
    pub counts: std::collections::BTreeMap<String, u64>,
    /// Unix milliseconds.
    pub at: i64,
}

/// The rollouts made from Device Update deployments are named this and the workflow
/// id. Device Update deploys a goal state: a new one replaces the one in progress.
pub const ADU_ROLLOUT_PREFIX: &str = "adu-";

/// The reason a Device Update rollout is cancelled with when a newer deployment
/// replaces it (its end is not reported to Device Update: the new one's state is).
pub const ADU_REPLACED: &str = "replaced by a newer Device Update deployment";

/// `claims/{rid}/req`: sign this device's CSR.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimRequest {
    /// [`schema::CLAIM_REQUEST`].
    pub schema: String,
    /// De-duplication id.
    pub message_id: String,
    /// The request id (as in the topic).
    pub rid: String,
    /// The device in the gateway's lobby.
    pub device_id: String,
    /// The node id the device put in its CSR.
    pub node_id: String,
    /// The CSR, PEM.
    pub csr: String,
}

/// `claims/{rid}/res`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimResponse {
    /// [`schema::CLAIM_RESPONSE`].
    pub schema: String,
    /// The request id.
    pub rid: String,
    /// 200 signed, 400 bad CSR, 403 not allowed.
    pub status: u16,
    /// The certificate, PEM (status 200).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    /// What went wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `claimed/{device}`: a claim made offline by the gateway's local CA.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimReport {
    /// [`schema::CLAIM_REPORT`].
    pub schema: String,
    /// De-duplication id.
    pub message_id: String,
    /// The device.
    pub device_id: String,
    /// Its node id.
    pub node_id: String,
    /// The certificate issued, PEM.
    pub certificate: String,
    /// Who signed it (`local-ca:<subject>`).
    pub authority: String,
    /// Unix milliseconds.
    pub claimed_at: i64,
}

/// A fresh message id: unix milliseconds, then 64 bits that start at random in each
/// process and count up, in hex; ids sort by time and never collide in practice.
pub fn message_id() -> String {
    // A random 64-bit start per process, counted up per id: unique within the process,
    // and across restarts with the time prefix; one getrandom call per process.
    static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let start = *START.get_or_init(|| {
        let mut random = [0u8; 8];
        // The OS source does not fail on Linux after boot; the time prefix and the count
        // still keep ids apart within one gateway if it did.
        let _ = getrandom::fill(&mut random);
        u64::from_le_bytes(random)
    });
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // 12 hex digits of the time (48 bits: until the year 10889), then 16 of the count;
    // `hex` rather than `format!`, whose padding machinery showed in the ingest profile.
    let mut bytes = [0u8; 14];
    let millis = u64::try_from(crate::now_millis()).unwrap_or(0);
    bytes[..6].copy_from_slice(&millis.to_be_bytes()[2..]);
    bytes[6..].copy_from_slice(&start.wrapping_add(n).to_be_bytes());
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_devices_own_traffic_is_its_telemetry_lobby_events_and_reported_state() {
        for (kind, own) in [
            ("telemetry", true),
            ("lobby", true),
            ("reported", true),
            ("claimed", false),
            ("desired", false),
        ] {
            let topic = format!("{ROOT}/gw/gw-1/{kind}/esp-1");
            assert_eq!(lane_device(&topic), own.then_some("esp-1"), "{topic}");
        }
        assert_eq!(
            topics::telemetry("gw-1", "esp-1"),
            format!("{ROOT}/gw/gw-1/telemetry/esp-1")
        );
        assert_eq!(
            lane_device(&topics::telemetry("gw-1", "esp-1")),
            Some("esp-1")
        );
        assert_eq!(lane_device(&topics::result("gw-1", "d1", "esp-1")), None);
        assert_eq!(lane_device(&topics::status("gw-1")), None);
        assert_eq!(lane_device("other/v1/gw/gw-1/telemetry/esp-1"), None);
        assert_eq!(
            lane_device(&format!("{ROOT}/gw/gw-1/telemetry/esp-1/x")),
            None
        );
    }

    use super::*;

    #[test]
    fn ids_that_would_break_topics_are_invalid() {
        assert!(valid_id("esp-0a1b2c"));
        assert!(valid_id("gw.site:1_a"));
        for bad in ["", "a/b", "a+b", "#", "a b", "é", &"x".repeat(129)] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn message_ids_are_unique_and_time_ordered() {
        let a = message_id();
        let b = message_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 28);
        assert!(a[..12] <= b[..12]);
        // The prefix is the time in milliseconds, the rest counts up per id.
        let millis = i64::from_str_radix(&a[..12], 16).unwrap();
        assert!((crate::now_millis() - millis).abs() < 60_000, "{a}");
        let count = |id: &str| u64::from_str_radix(&id[12..], 16).unwrap();
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        // (Other tests in this process may take ids in between.)
        assert!((1..1_000_000).contains(&count(&b).wrapping_sub(count(&a))));
    }

    #[test]
    fn unknown_fields_are_ignored_for_forward_compatibility() {
        let text =
            r#"{"schema":"outpost.desired/1","version":3,"body":{"interval":30},"future":1}"#;
        let desired: DesiredState = serde_json::from_str(text).unwrap();
        assert_eq!(desired.version, 3);
    }
}
