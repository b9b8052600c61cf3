//! Espressif protocomm, sans-IO, for both roles.
//!
//! The gateway is the *client* (Espressif's `esp_prov` or phone app role): it reads
//! `proto-ver`, runs a [`ClientHandshake`] on `prov-session`, then sends encrypted
//! requests through the resulting [`SessionCipher`]. The ESP fleet simulator is the
//! *device*: a [`DeviceSession`] answers each endpoint the way ESP-IDF's protocomm does.
//! Nothing here does I/O: callers move the bytes over BLE GATT or HTTP.
//!
//! Wire facts and their sources are in the project's `esp-protocomm.md`; the crate's
//! tests reproduce the published and derived transcripts in both roles.

pub mod claim;
mod device;
mod error;
pub mod proto;
mod security;
pub mod srp;
mod version;
pub mod wifi;

pub use device::{Application, DeviceSession, Endpoint};
pub use error::Error;
pub use security::{
    ClientCredentials, ClientHandshake, DeviceHandshake, DeviceRandomness, DeviceSecurity,
    SecurityVersion, SessionCipher, Step,
};
pub use version::{AppInfo, ProtoVersion, ProvInfo};

/// The endpoint that carries the security handshake (plaintext `SessionData`).
pub const SESSION_ENDPOINT: &str = "prov-session";
/// The version endpoint (plaintext JSON, available before a session).
pub const VERSION_ENDPOINT: &str = "proto-ver";
/// Wi-Fi credentials and status.
pub const CONFIG_ENDPOINT: &str = "prov-config";
/// Wi-Fi scan.
pub const SCAN_ENDPOINT: &str = "prov-scan";
/// Provisioning control (reset after a failed attempt, re-provision).
pub const CTRL_ENDPOINT: &str = "prov-ctrl";
/// RainMaker assisted claiming.
pub const CLAIM_ENDPOINT: &str = "rmaker_claim";

/// The five endpoints of the provisioning managers with their fixed 16-bit BLE ids
/// (custom endpoints such as `rmaker_claim` have none: find them by name).
pub const STANDARD_ENDPOINT_IDS: [(&str, u16); 5] = [
    (CTRL_ENDPOINT, 0xFF4F),
    (SCAN_ENDPOINT, 0xFF50),
    (SESSION_ENDPOINT, 0xFF51),
    (CONFIG_ENDPOINT, 0xFF52),
    (VERSION_ENDPOINT, 0xFF53),
];

/// The provisioning service UUID of `wifi_provisioning` / `network_provisioning` (and
/// RainMaker devices).
pub const DEFAULT_SERVICE_UUID: &str = "1775244d-6b43-439b-877c-060f2d9bed07";
/// The service UUID of ESP-IDF's `wifi_prov_mgr` example (esp_prov's fallback).
pub const EXAMPLE_SERVICE_UUID: &str = "021a9004-0382-4aea-bff4-6b3f1c5adfb4";

/// Largest request or response a NimBLE device takes in one characteristic value.
pub const BLE_MAX_PAYLOAD: usize = 512;
/// Largest request body esp_http_server takes on the SoftAP transport.
pub const HTTP_MAX_BODY: usize = 4096;

/// The 128-bit characteristic UUID of a standard endpoint: the service UUID with its
/// 3rd and 4th bytes (as written) replaced by the endpoint's 16-bit id.
pub fn endpoint_uuid(service: &str, id16: u16) -> String {
    format!("{}{id16:04x}{}", &service[..4], &service[8..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_endpoint_uuids_follow_the_service() {
        assert_eq!(
            endpoint_uuid(DEFAULT_SERVICE_UUID, 0xFF51),
            "1775ff51-6b43-439b-877c-060f2d9bed07"
        );
        assert_eq!(
            endpoint_uuid(EXAMPLE_SERVICE_UUID, 0xFF4F),
            "021aff4f-0382-4aea-bff4-6b3f1c5adfb4"
        );
    }
}
