//! Device Update for IoT Hub (ADU) as it appears in a device twin: the `deviceUpdate`
//! IoT Plug and Play component, its `service` (desired: the deployment) and `agent`
//! (reported: the device's state and last result), with the codes the Device Update
//! agent uses.
//!
//! The service writes `deviceUpdate.service` = `{workflow: {action, id}, updateManifest,
//! updateManifestSignature, fileUrls}`; action 3 (ProcessDeployment) deploys, 255
//! (Cancel) cancels. The agent reports `deviceUpdate.agent` = `{deviceProperties,
//! compatPropertyNames, state, workflow, installedUpdateId, lastInstallResult}` and
//! acknowledges the service property (`ac`/`av`).

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The Plug and Play model the agent announces (MQTT username `&model-id=`).
pub const MODEL_ID: &str = "dtmi:azure:iot:deviceUpdateModel;3";
/// The contract model in `agent.deviceProperties.contractModelId`.
pub const CONTRACT_MODEL_ID: &str = "dtmi:azure:iot:deviceUpdateContractModel;3";
/// The agent version in `agent.deviceProperties.aduVer` (the Device Update agent
/// release whose contract Outpost follows).
pub const ADU_VER: &str = "DU;agent/1.1.0";
/// The component's name in the twin.
pub const COMPONENT: &str = "deviceUpdate";
/// Which device properties decide compatibility.
pub const COMPAT_PROPERTY_NAMES: &str = "manufacturer,model";
/// `workflow.action`: process a deployment.
pub const ACTION_PROCESS_DEPLOYMENT: i64 = 3;
/// `workflow.action`: cancel.
pub const ACTION_CANCEL: i64 = 255;
/// The workflow id reported after a cancel.
pub const NO_DEPLOYMENT: &str = "nodeployment";

/// `agent.state` values.
pub mod state {
    /// Nothing in progress.
    pub const IDLE: i64 = 0;
    /// A deployment is being processed.
    pub const DEPLOYMENT_IN_PROGRESS: i64 = 6;
    /// The last deployment failed.
    pub const FAILED: i64 = 255;
}

/// `lastInstallResult.resultCode` values (> 0 success, ≤ 0 failure).
pub mod result {
    /// Apply succeeded: the update is installed.
    pub const APPLY_SUCCESS: i64 = 700;
    /// General failure (the extended result code says which).
    pub const FAILURE: i64 = 0;
    /// Cancelled.
    pub const CANCELLED: i64 = -1;
}

/// Extended result codes (`facility << 28 | component << 20 | value`) Outpost reports.
pub mod erc {
    /// The manifest's signature chain did not verify (facility 10, infrastructure/JWS).
    pub const SIGNATURE_REFUSED: u32 = 0xA000_0001;
    /// The deployment or its manifest is malformed (facility 2, upper layer).
    pub const MALFORMED: u32 = 0x2000_0001;
    /// No device behind the gateway is compatible (facility 7, component enumerator).
    pub const NO_COMPATIBLE_COMPONENT: u32 = 0x7000_0001;
    /// One or more devices failed their update (facility 3, step handler).
    pub const COMPONENT_FAILED: u32 = 0x3000_0001;
    /// The rollout was stopped (error threshold or operator) (facility 3).
    pub const STOPPED: u32 = 0x3000_0002;
}

/// An extended result code as the twin carries it (eight hex digits).
pub fn erc_text(code: u32) -> String {
    format!("{code:08X}")
}

/// A deployment as the service writes it, without its workflow: the manifest string
/// (its exact bytes are signed), the signature JWS and the file URLs. Its JSON is the
/// form the gateway stores and verifies again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AduDeployment {
    /// The manifest, a JSON document as a string.
    pub update_manifest: String,
    /// The JWS over the manifest's hash.
    pub update_manifest_signature: String,
    /// File id → download URL.
    #[serde(default)]
    pub file_urls: std::collections::BTreeMap<String, String>,
}

impl AduDeployment {
    /// Its stored form.
    pub fn to_stored(&self) -> String {
        serde_json::to_string(self).expect("strings serialise")
    }
}

/// What the service asks for in `deviceUpdate.service`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Goal {
    /// Deploy (action 3) the workflow `id`.
    Deploy {
        /// The workflow id.
        id: String,
        /// The deployment.
        deployment: AduDeployment,
    },
    /// Cancel (action 255) whatever is in progress.
    Cancel,
}

/// The `deviceUpdate.service` of a twin GET's body with the desired properties'
/// `$version`, if the twin has one.
pub fn service_of_twin(twin: &Value) -> Option<(u64, Value)> {
    let desired = twin.get("desired")?;
    let version = desired.get("$version")?.as_u64()?;
    let service = desired.get(COMPONENT)?.get("service")?;
    Some((version, service.clone()))
}

/// Reads the service property: the goal, or why it cannot be acted on.
pub fn goal(service: &Value) -> Result<Goal, String> {
    let workflow = service
        .get("workflow")
        .ok_or("the service property has no workflow")?;
    let action = workflow
        .get("action")
        .and_then(Value::as_i64)
        .ok_or("workflow.action is not a number")?;
    match action {
        ACTION_PROCESS_DEPLOYMENT => {
            let id = workflow
                .get("id")
                .and_then(Value::as_str)
                .ok_or("workflow.id is not a string")?
                .to_owned();
            let deployment = AduDeployment::deserialize(service).map_err(|err| {
                format!("the deployment lacks updateManifest, updateManifestSignature or fileUrls: {err}")
            })?;
            Ok(Goal::Deploy { id, deployment })
        }
        ACTION_CANCEL => Ok(Goal::Cancel),
        other => Err(format!(
            "workflow.action {other} is not supported (3 deploys, 255 cancels)"
        )),
    }
}

/// Whether a deployment's manifest is for this agent: one of its `compatibility` entries
/// matches the agent's `deviceProperties` in every key (as Device Update matched before
/// it deployed). A manifest that cannot be read is left to its verification to refuse.
pub fn is_for_agent(update_manifest: &str, device_properties: &Value) -> bool {
    let Ok(manifest) = serde_json::from_str::<Value>(update_manifest) else {
        return true;
    };
    let Some(entries) = manifest.get("compatibility").and_then(Value::as_array) else {
        return true;
    };
    entries.iter().any(|entry| {
        entry.as_object().is_some_and(|entry| {
            entry
                .iter()
                .all(|(key, value)| device_properties.get(key) == Some(value))
        })
    })
}

/// A reported patch of the component: `{"deviceUpdate": {"__t": "c", ...fields}}`.
pub fn component_patch(fields: Value) -> Value {
    let mut component = json!({ "__t": "c" });
    if let (Some(out), Value::Object(fields)) = (component.as_object_mut(), fields) {
        out.extend(fields);
    }
    json!({ COMPONENT: component })
}

/// The agent's report at start: who the gateway is for Device Update, and Idle.
pub fn agent_startup(manufacturer: &str, model: &str, outpost_version: &str) -> Value {
    json!({
        "agent": {
            "deviceProperties": {
                "manufacturer": manufacturer,
                "model": model,
                "contractModelId": CONTRACT_MODEL_ID,
                "aduVer": ADU_VER,
                "outpostVer": outpost_version,
            },
            "compatPropertyNames": COMPAT_PROPERTY_NAMES,
        }
    })
}

/// The acknowledgement of the service property at desired `version` (`ac` an HTTP-like
/// status). Only the workflow is echoed: the manifest would double the twin's size.
pub fn service_ack(service: &Value, version: u64, status: u16, description: &str) -> Value {
    json!({
        "service": {
            "value": { "workflow": service.get("workflow").cloned().unwrap_or(Value::Null) },
            "ac": status,
            "av": version,
            "ad": description,
        }
    })
}

/// `installedUpdateId` for an update id written `provider/name/version`: the JSON
/// object as a string, as the agent reports it.
pub fn installed_update_id(update_id: &str) -> Option<String> {
    let mut parts = update_id.splitn(3, '/');
    let (Some(provider), Some(name), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    // In the agent's order (provider, name, version), which a JSON map would not keep.
    let text = |s: &str| Value::String(s.to_owned()).to_string();
    Some(format!(
        "{{\"provider\":{},\"name\":{},\"version\":{}}}",
        text(provider),
        text(name),
        text(version)
    ))
}

/// A `lastInstallResult` with one step result per step summary given.
pub fn install_result(code: i64, erc: u32, details: &str, steps: &[(i64, u32, String)]) -> Value {
    let step_results: serde_json::Map<String, Value> = steps
        .iter()
        .enumerate()
        .map(|(index, (code, erc, details))| {
            (
                format!("step_{index}"),
                json!({
                    "resultCode": code,
                    "extendedResultCodes": erc_text(*erc),
                    "resultDetails": details,
                }),
            )
        })
        .collect();
    json!({
        "resultCode": code,
        "extendedResultCodes": erc_text(erc),
        "resultDetails": details,
        "stepResults": step_results,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_twin_gives_the_goal_and_the_agent_answers_in_the_component() {
        let twin = json!({"desired": {"$version": 7, "deviceUpdate": {"__t": "c", "service": {
            "workflow": {"action": 3, "id": "wf-1"},
            "updateManifest": "{}",
            "updateManifestSignature": "a.b.c",
            "fileUrls": {"f0": "http://127.0.0.1/x"}
        }}}});
        let (version, service) = service_of_twin(&twin).unwrap();
        assert_eq!(version, 7);
        let Goal::Deploy { id, deployment } = goal(&service).unwrap() else {
            panic!("not a deployment")
        };
        assert_eq!(id, "wf-1");
        assert_eq!(deployment.file_urls["f0"], "http://127.0.0.1/x");
        let ack = component_patch(service_ack(&service, version, 200, ""));
        assert_eq!(ack["deviceUpdate"]["__t"], "c");
        assert_eq!(ack["deviceUpdate"]["service"]["av"], 7);
        assert_eq!(
            ack["deviceUpdate"]["service"]["value"]["workflow"]["id"],
            "wf-1"
        );
        let cancel = json!({"workflow": {"action": 255, "id": "nodeployment"}});
        assert_eq!(goal(&cancel).unwrap(), Goal::Cancel);
        let err = goal(&json!({"workflow": {"action": 1, "id": "x"}})).unwrap_err();
        assert!(err.contains("not supported"), "{err}");
        let err = goal(&json!({"workflow": {"action": 3, "id": "x"}})).unwrap_err();
        assert!(err.contains("updateManifest"), "{err}");
        assert_eq!(
            installed_update_id("Acme/fw/2.0").unwrap(),
            r#"{"provider":"Acme","name":"fw","version":"2.0"}"#
        );
        let agent = agent_startup("Contoso", "site-gateway", "0.1.0");
        let properties = &agent["agent"]["deviceProperties"];
        let manifest = |model: &str| {
            json!({"compatibility": [{"manufacturer": "Contoso", "model": model}]}).to_string()
        };
        assert!(is_for_agent(&manifest("site-gateway"), properties));
        assert!(!is_for_agent(&manifest("toaster"), properties));
        let result = install_result(700, 0, "", &[(700, 0, "2 devices".into())]);
        assert_eq!(
            result["stepResults"]["step_0"]["extendedResultCodes"],
            "00000000"
        );
        assert_eq!(erc_text(erc::SIGNATURE_REFUSED), "A0000001");
    }
}
