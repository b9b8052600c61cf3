//! The JSON bodies of DPS registration over MQTT (api-version 2019-03-31).

use serde::{Deserialize, Serialize};

/// The API version devices name in their DPS username.
pub const API_VERSION: &str = "2019-03-31";

/// The MQTT username a device registers with:
/// `{idScope}/registrations/{registrationId}/api-version=…&ClientVersion=…`.
pub fn username(id_scope: &str, registration_id: &str, client_version: &str) -> String {
    format!(
        "{id_scope}/registrations/{registration_id}/api-version={API_VERSION}&ClientVersion={}",
        crate::sas::encode(client_version)
    )
}

/// The body of a registration request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrationRequest {
    /// The registration id (the one in the username).
    pub registration_id: String,
    /// Custom data for DPS's allocation (any JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<serde_json::Value>,
}

/// Where a registration stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OperationStatus {
    /// The operation to ask about.
    pub operation_id: String,
    /// `assigning`, `assigned`, `failed` or `unassigned`.
    pub status: String,
    /// Present once the operation ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_state: Option<RegistrationState>,
}

/// The outcome of a registration.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrationState {
    /// The registration id.
    pub registration_id: String,
    /// When the registration was first made (ISO 8601).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_date_time_utc: Option<String>,
    /// The IoT Hub's host name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_hub: Option<String>,
    /// The device id at that hub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// `assigned`, `failed`, `disabled`, …
    pub status: String,
    /// `initialAssignment`, `deviceDataMigrated`, `deviceDataReset` or
    /// `reprovisionedToInitialAssignment`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub substatus: Option<String>,
    /// DPS's error code when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<u32>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    /// When it last changed (ISO 8601).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated_date_time_utc: Option<String>,
    /// The registration's etag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// Data the allocation returned to the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<serde_json::Value>,
}

/// DPS's error body (4xx and 5xx answers).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    /// DPS's six-digit code (the HTTP status, then three digits).
    pub error_code: u32,
    /// An id to quote to support.
    #[serde(default)]
    pub tracking_id: String,
    /// What went wrong.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_use_dps_field_names() {
        let status = OperationStatus {
            operation_id: "4.abc".into(),
            status: "assigned".into(),
            registration_state: Some(RegistrationState {
                registration_id: "gw-1".into(),
                assigned_hub: Some("127.0.0.9".into()),
                device_id: Some("gw-1".into()),
                status: "assigned".into(),
                substatus: Some("initialAssignment".into()),
                ..RegistrationState::default()
            }),
        };
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["operationId"], "4.abc");
        assert_eq!(json["registrationState"]["assignedHub"], "127.0.0.9");
        assert_eq!(json["registrationState"]["substatus"], "initialAssignment");
        assert!(json["registrationState"].get("errorCode").is_none());
        let back: OperationStatus = serde_json::from_value(json).unwrap();
        assert_eq!(back, status);
        assert_eq!(
            username("0ne001", "gw-1", "outpost/0.1.0"),
            "0ne001/registrations/gw-1/api-version=2019-03-31&ClientVersion=outpost%2F0.1.0"
        );
    }
}
