//! The MQTT topics of DPS and of IoT Hub's device surface, built and parsed.
//!
//! Device ids are not URL-encoded in topics (IoT Hub and the SDKs agree); request ids and
//! statuses travel in the property bag ([`crate::props`]).

use crate::props::{self, Props, PropsError};

/// What a device subscribes to for DPS's answers.
pub const DPS_RESPONSES: &str = "$dps/registrations/res/#";
/// What a device subscribes to for answers to its twin requests.
pub const TWIN_RESPONSES: &str = "$iothub/twin/res/#";
/// What a device subscribes to for desired-property patches.
pub const DESIRED_PATCHES: &str = "$iothub/twin/PATCH/properties/desired/#";
/// What a device subscribes to for direct-method calls.
pub const METHOD_CALLS: &str = "$iothub/methods/POST/#";

/// DPS: register (the body is a [`crate::dps::RegistrationRequest`]).
pub fn dps_register(rid: &str) -> String {
    format!(
        "$dps/registrations/PUT/iotdps-register/?$rid={}",
        encode(rid)
    )
}

/// DPS: ask how an operation stands.
pub fn dps_status(rid: &str, operation_id: &str) -> String {
    format!(
        "$dps/registrations/GET/iotdps-get-operationstatus/?$rid={}&operationId={}",
        encode(rid),
        encode(operation_id)
    )
}

/// DPS's answer with HTTP-like `status`, and how long to wait before asking again.
pub fn dps_response(status: u16, rid: &str, retry_after: Option<u32>) -> String {
    let mut topic = format!("$dps/registrations/res/{status}/?$rid={}", encode(rid));
    if let Some(seconds) = retry_after {
        topic.push_str(&format!("&retry-after={seconds}"));
    }
    topic
}

/// Device-to-cloud telemetry with its properties.
pub fn telemetry(device_id: &str, props: &Props) -> String {
    format!("devices/{device_id}/messages/events/{props}")
}

/// What a device subscribes to for cloud-to-device messages.
pub fn c2d_filter(device_id: &str) -> String {
    format!("devices/{device_id}/messages/devicebound/#")
}

/// A cloud-to-device message with its properties.
pub fn c2d(device_id: &str, props: &Props) -> String {
    format!("devices/{device_id}/messages/devicebound/{props}")
}

/// Twin: ask for the whole twin.
pub fn twin_get(rid: &str) -> String {
    format!("$iothub/twin/GET/?$rid={}", encode(rid))
}

/// Twin: patch the reported properties (the body is the patch).
pub fn twin_patch_reported(rid: &str) -> String {
    format!(
        "$iothub/twin/PATCH/properties/reported/?$rid={}",
        encode(rid)
    )
}

/// The hub's answer to a twin request; `version` is the reported properties' new version
/// after a patch.
pub fn twin_response(status: u16, rid: &str, version: Option<u64>) -> String {
    let mut topic = format!("$iothub/twin/res/{status}/?$rid={}", encode(rid));
    if let Some(version) = version {
        topic.push_str(&format!("&$version={version}"));
    }
    topic
}

/// A desired-property patch, at the desired properties' new version.
pub fn desired_patch(version: u64) -> String {
    format!("$iothub/twin/PATCH/properties/desired/?$version={version}")
}

/// A direct-method call.
pub fn method_call(name: &str, rid: &str) -> String {
    format!("$iothub/methods/POST/{name}/?$rid={}", encode(rid))
}

/// A device's answer to a direct-method call.
pub fn method_response(status: i32, rid: &str) -> String {
    format!("$iothub/methods/res/{status}/?$rid={}", encode(rid))
}

fn encode(text: &str) -> String {
    crate::sas::encode(text)
}

/// Why a topic is not one this surface knows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// Not a topic of this surface (or not this device's).
    #[error("not a topic of this surface: {0}")]
    Unknown(String),
    /// A required property is missing.
    #[error("the topic has no `{0}` property")]
    Missing(&'static str),
    /// A status or version is not a number.
    #[error("`{0}` is not a number")]
    NotANumber(&'static str),
    /// The property bag is malformed.
    #[error(transparent)]
    Props(#[from] PropsError),
}

fn required<'a>(props: &'a Props, key: &'static str) -> Result<&'a str, TopicError> {
    props.get(key).ok_or(TopicError::Missing(key))
}

fn number<T: std::str::FromStr>(text: &str, what: &'static str) -> Result<T, TopicError> {
    text.parse().map_err(|_| TopicError::NotANumber(what))
}

/// What a device publishes to DPS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DpsRequest {
    /// Register.
    Register {
        /// The request id.
        rid: String,
    },
    /// Ask about an operation.
    Status {
        /// The request id.
        rid: String,
        /// The operation.
        operation_id: String,
    },
}

impl DpsRequest {
    /// Reads a topic a device published to.
    pub fn parse(topic: &str) -> Result<Self, TopicError> {
        let (path, bag) = props::split(topic);
        let props = Props::parse(bag)?;
        let rid = || required(&props, "$rid").map(str::to_owned);
        match path {
            "$dps/registrations/PUT/iotdps-register/" => Ok(Self::Register { rid: rid()? }),
            "$dps/registrations/GET/iotdps-get-operationstatus/" => Ok(Self::Status {
                rid: rid()?,
                operation_id: required(&props, "operationId")?.to_owned(),
            }),
            _ => Err(TopicError::Unknown(topic.to_owned())),
        }
    }
}

/// DPS's answer, as a device reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DpsResponse {
    /// HTTP-like status (200, 202, 4xx, 5xx).
    pub status: u16,
    /// The request id it answers.
    pub rid: String,
    /// Seconds to wait before the next request, when given.
    pub retry_after: Option<u32>,
}

impl DpsResponse {
    /// Reads a topic DPS published.
    pub fn parse(topic: &str) -> Result<Self, TopicError> {
        let (path, bag) = props::split(topic);
        let status = path
            .strip_prefix("$dps/registrations/res/")
            .and_then(|rest| rest.strip_suffix('/'))
            .ok_or_else(|| TopicError::Unknown(topic.to_owned()))?;
        let props = Props::parse(bag)?;
        Ok(Self {
            status: number(status, "status")?,
            rid: required(&props, "$rid")?.to_owned(),
            retry_after: props
                .get("retry-after")
                .map(|text| number(text, "retry-after"))
                .transpose()?,
        })
    }
}

/// What a device publishes to its hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubRequest {
    /// Telemetry with its properties.
    Telemetry(Props),
    /// Get the twin.
    TwinGet {
        /// The request id.
        rid: String,
    },
    /// Patch the reported properties.
    TwinPatchReported {
        /// The request id.
        rid: String,
    },
    /// Answer a direct method.
    MethodResponse {
        /// The method's status (any integer the device chooses).
        status: i32,
        /// The call's request id.
        rid: String,
    },
}

impl HubRequest {
    /// Reads a topic `device_id` published to (another device's topic is unknown).
    pub fn parse(device_id: &str, topic: &str) -> Result<Self, TopicError> {
        let telemetry_prefix = format!("devices/{device_id}/messages/events/");
        if let Some(bag) = topic.strip_prefix(&telemetry_prefix) {
            return Ok(Self::Telemetry(Props::parse(bag.trim_start_matches('?'))?));
        }
        let (path, bag) = props::split(topic);
        let props = Props::parse(bag)?;
        let rid = || required(&props, "$rid").map(str::to_owned);
        if let Some(rest) = path.strip_prefix("$iothub/methods/res/") {
            let status = rest
                .strip_suffix('/')
                .ok_or_else(|| TopicError::Unknown(topic.to_owned()))?;
            return Ok(Self::MethodResponse {
                status: number(status, "status")?,
                rid: rid()?,
            });
        }
        match path {
            "$iothub/twin/GET/" => Ok(Self::TwinGet { rid: rid()? }),
            "$iothub/twin/PATCH/properties/reported/" => {
                Ok(Self::TwinPatchReported { rid: rid()? })
            }
            _ => Err(TopicError::Unknown(topic.to_owned())),
        }
    }
}

/// What a hub publishes to a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubMessage {
    /// The answer to a twin request.
    TwinResponse {
        /// HTTP-like status.
        status: u16,
        /// The request id.
        rid: String,
        /// The reported properties' version after a patch.
        version: Option<u64>,
    },
    /// A desired-property patch.
    DesiredPatch {
        /// The desired properties' version.
        version: Option<u64>,
    },
    /// A direct-method call.
    MethodCall {
        /// The method's name.
        name: String,
        /// The call's request id, to answer with.
        rid: String,
    },
    /// A cloud-to-device message with its properties.
    C2d(Props),
}

impl HubMessage {
    /// Reads a topic the hub published to `device_id`.
    pub fn parse(device_id: &str, topic: &str) -> Result<Self, TopicError> {
        let c2d_prefix = format!("devices/{device_id}/messages/devicebound/");
        if let Some(bag) = topic.strip_prefix(&c2d_prefix) {
            // The SDKs put `?` nowhere here; the bag follows the slash.
            return Ok(Self::C2d(Props::parse(bag.trim_start_matches('?'))?));
        }
        let (path, bag) = props::split(topic);
        let props = Props::parse(bag)?;
        let rid = || required(&props, "$rid").map(str::to_owned);
        if let Some(rest) = path.strip_prefix("$iothub/twin/res/") {
            let status = rest
                .strip_suffix('/')
                .ok_or_else(|| TopicError::Unknown(topic.to_owned()))?;
            return Ok(Self::TwinResponse {
                status: number(status, "status")?,
                rid: rid()?,
                version: props
                    .get("$version")
                    .map(|text| number(text, "$version"))
                    .transpose()?,
            });
        }
        if path == "$iothub/twin/PATCH/properties/desired/" {
            return Ok(Self::DesiredPatch {
                version: props
                    .get("$version")
                    .map(|text| number(text, "$version"))
                    .transpose()?,
            });
        }
        if let Some(rest) = path.strip_prefix("$iothub/methods/POST/") {
            let name = rest
                .strip_suffix('/')
                .filter(|name| !name.is_empty() && !name.contains('/'))
                .ok_or_else(|| TopicError::Unknown(topic.to_owned()))?;
            return Ok(Self::MethodCall {
                name: name.to_owned(),
                rid: rid()?,
            });
        }
        Err(TopicError::Unknown(topic.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dps_topics_round_trip() {
        assert_eq!(
            DpsRequest::parse(&dps_register("a-1")).unwrap(),
            DpsRequest::Register { rid: "a-1".into() }
        );
        assert_eq!(
            DpsRequest::parse(&dps_status("2", "op.5")).unwrap(),
            DpsRequest::Status {
                rid: "2".into(),
                operation_id: "op.5".into()
            }
        );
        assert_eq!(
            DpsResponse::parse(&dps_response(202, "2", Some(3))).unwrap(),
            DpsResponse {
                status: 202,
                rid: "2".into(),
                retry_after: Some(3)
            }
        );
        assert_eq!(
            DpsRequest::parse("$dps/registrations/PUT/iotdps-register/"),
            Err(TopicError::Missing("$rid"))
        );
        assert!(matches!(
            DpsRequest::parse("$dps/registrations/DELETE/x/?$rid=1"),
            Err(TopicError::Unknown(_))
        ));
    }

    #[test]
    fn hub_topics_round_trip() {
        let mut props = Props::default();
        props
            .push("$.ct", "application/json")
            .push("source", "esp-1");
        assert_eq!(
            HubRequest::parse("gw", &telemetry("gw", &props)).unwrap(),
            HubRequest::Telemetry(props.clone())
        );
        // Another device's telemetry topic is not this device's to publish.
        assert!(matches!(
            HubRequest::parse("gw", &telemetry("other", &props)),
            Err(TopicError::Unknown(_))
        ));
        assert_eq!(
            HubRequest::parse("gw", &twin_get("7")).unwrap(),
            HubRequest::TwinGet { rid: "7".into() }
        );
        assert_eq!(
            HubRequest::parse("gw", &twin_patch_reported("8")).unwrap(),
            HubRequest::TwinPatchReported { rid: "8".into() }
        );
        assert_eq!(
            HubRequest::parse("gw", &method_response(-3, "9")).unwrap(),
            HubRequest::MethodResponse {
                status: -3,
                rid: "9".into()
            }
        );
        assert_eq!(
            HubMessage::parse("gw", &twin_response(204, "8", Some(4))).unwrap(),
            HubMessage::TwinResponse {
                status: 204,
                rid: "8".into(),
                version: Some(4)
            }
        );
        assert_eq!(
            HubMessage::parse("gw", &desired_patch(12)).unwrap(),
            HubMessage::DesiredPatch { version: Some(12) }
        );
        assert_eq!(
            HubMessage::parse("gw", &method_call("reboot", "1")).unwrap(),
            HubMessage::MethodCall {
                name: "reboot".into(),
                rid: "1".into()
            }
        );
        assert_eq!(
            HubMessage::parse("gw", &c2d("gw", &props)).unwrap(),
            HubMessage::C2d(props)
        );
        assert_eq!(
            HubMessage::parse("gw", "$iothub/twin/res/abc/?$rid=1"),
            Err(TopicError::NotANumber("status"))
        );
    }
}
