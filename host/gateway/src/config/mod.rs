//! `outpost.toml`: the one file a site operator edits.
//!
//! Every key has a default except the gateway id, unknown keys are errors, and every
//! error names the file, line and column. Relative paths (the state directory, secret
//! files, CA files) are taken from the directory of the config file, so a config and its
//! neighbours can move together.

mod engines;
mod secret;

pub(crate) use engines::{outbox_lanes, outbox_limits, settings as uplink_settings};

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroU64};
use std::ops::Range;
use std::path::{Path, PathBuf};

use outpost_uplink::BrokerAddr;
use serde::{Deserialize, Deserializer, Serialize};

pub(crate) use secret::Secret;

/// Where `outpost` looks for its config when `--config` is not given.
pub(crate) const DEFAULT_PATH: &str = "gateway-config/outpost.toml";

/// The whole config, with defaults filled in and secrets resolved.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
    pub(crate) gateway: GatewaySection,
    #[serde(default)]
    pub(crate) api: ApiSection,
    #[serde(default)]
    pub(crate) log: LogSection,
    #[serde(default)]
    pub(crate) ble: BleSection,
    /// Absent: the gateway runs offline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) uplink: Option<UplinkSection>,
    #[serde(default)]
    pub(crate) outbox: OutboxSection,
    #[serde(default)]
    pub(crate) cache: CacheSection,
    /// Absent: no device listener; devices use the API listener (`api.public_url`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) devices: Option<DevicesSection>,
    #[serde(default)]
    pub(crate) onboarding: OnboardingSection,
    #[serde(default)]
    pub(crate) handlers: HandlersSection,

    /// Things the operator should know that are not errors (loose secret permissions).
    #[serde(skip)]
    pub(crate) warnings: Vec<String>,
}

/// `[gateway]`: who this gateway is and where it keeps its state.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GatewaySection {
    pub(crate) id: GatewayId,
    #[serde(default = "default_name")]
    pub(crate) name: String,
    #[serde(default = "default_state_dir")]
    pub(crate) state_dir: PathBuf,
    /// Accept secret files other users can read (a warning instead of an error).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) allow_insecure_secrets: bool,
}

/// `[api]`: the local HTTP API and dashboard.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ApiSection {
    #[serde(default = "default_bind")]
    pub(crate) bind: SocketAddr,
    /// Absent: generated at first start into the state directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) admin_token: Option<Secret>,
    /// The base URL devices reach the device API at (handed to them at onboarding);
    /// default: the bound address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) public_url: Option<String>,
    /// Connections one address may hold at once; more are refused with 503.
    #[serde(default = "default_connections_per_client")]
    pub(crate) max_connections_per_client: NonZeroU32,
    /// Serve the API over TLS with the site CA's certificate (needed to bind it beyond
    /// loopback).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) tls: bool,
}

/// `[devices]`: the listener for devices on the site network: the device endpoints and
/// `/firmware/`, over TLS with a certificate of the site CA that devices are handed at
/// onboarding.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DevicesSection {
    #[serde(default = "default_devices_bind")]
    pub(crate) bind: SocketAddr,
    /// The base URL devices reach it at (`https://192.168.4.1:8443`); default: the bound
    /// address (127.0.0.1 when it is unspecified).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) public_url: Option<String>,
    /// More names (DNS names or IP addresses) for the listener's certificate, beside the
    /// host of `public_url`, the bound address and the loopback names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) names: Vec<String>,
    /// Plain HTTP instead of TLS, for devices that cannot do TLS. Their tokens and
    /// firmware then cross the site network in the clear.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) plain_http: bool,
    /// Connections one address may hold at once; more are refused with 503.
    #[serde(default = "default_connections_per_client")]
    pub(crate) max_connections_per_client: NonZeroU32,
}

impl DevicesSection {
    /// The base URL devices use, given the bound address.
    pub(crate) fn public_url(&self, bound: SocketAddr) -> String {
        let scheme = if self.plain_http { "http" } else { "https" };
        match &self.public_url {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None if bound.ip().is_unspecified() => {
                format!("{scheme}://127.0.0.1:{}", bound.port())
            }
            None => format!("{scheme}://{bound}"),
        }
    }

    /// The names the listener's certificate is issued for.
    pub(crate) fn certificate_names(&self, bound: SocketAddr) -> Vec<String> {
        let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        if !bound.ip().is_unspecified() {
            names.push(bound.ip().to_string());
        }
        if let Some(host) = self
            .public_url
            .as_deref()
            .and_then(|url| url.parse::<hyper::Uri>().ok())
            .and_then(|uri| uri.host().map(|h| h.trim_matches(['[', ']']).to_owned()))
        {
            names.push(host);
        }
        names.extend(self.names.iter().cloned());
        names.sort();
        names.dedup();
        names
    }

    /// The listener's connection caps and timeouts.
    pub(crate) fn limits(&self) -> outpost_serve::Limits {
        outpost_serve::Limits {
            max_connections: 512,
            max_connections_per_client: as_usize(self.max_connections_per_client),
            ..outpost_serve::Limits::default()
        }
    }
}

fn default_devices_bind() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8443))
}

impl ApiSection {
    /// The listener's connection caps and timeouts.
    pub(crate) fn limits(&self) -> outpost_serve::Limits {
        outpost_serve::Limits {
            max_connections_per_client: as_usize(self.max_connections_per_client),
            ..outpost_serve::Limits::default()
        }
    }
}

fn as_usize(n: NonZeroU32) -> usize {
    usize::try_from(n.get()).unwrap_or(usize::MAX)
}

/// `[log]`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LogSection {
    #[serde(default)]
    pub(crate) format: LogFormat,
    #[serde(default = "default_log_level")]
    pub(crate) level: LogLevel,
}

/// How log lines are written to stderr.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// `[ble]`: onboarding over Bluetooth LE.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BleSection {
    #[serde(default = "yes")]
    pub(crate) enabled: bool,
    /// An adapter name such as `hci0`; absent: the first one found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) adapter: Option<String>,
    #[serde(default = "default_ble_sessions")]
    pub(crate) max_concurrent_sessions: NonZeroU32,
}

/// `[uplink]`: the MQTT connection to the cloud.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UplinkSection {
    /// Which cloud dialect: `outpost` (Outpost's MQTT contract, the default) or
    /// `azure-iot` (Azure IoT Hub and DPS, configured in `[uplink.azure]`).
    #[serde(default)]
    pub(crate) profile: UplinkProfile,
    /// A fixed broker; absent when `[uplink.registration]` assigns one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) broker: Option<BrokerAddr>,
    /// Several brokers instead of one (a cluster's nodes, a standby), in order of
    /// preference: the gateway fails over to the next when one is lost and returns to
    /// the first when it answers again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) brokers: Vec<BrokerAddr>,
    /// A CA bundle (PEM) to trust for `mqtts` instead of the system store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) ca_file: Option<PathBuf>,
    /// A client certificate (PEM) for mutual TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) client_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) client_key: Option<Secret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) username: Option<String>,
    /// Password or token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) password: Option<Secret>,
    #[serde(default = "default_keepalive_secs")]
    pub(crate) keepalive_secs: NonZeroU32,
    /// First reconnect delay; doubles with jitter up to `backoff_max_ms`.
    #[serde(default = "default_backoff_min_ms")]
    pub(crate) backoff_min_ms: NonZeroU32,
    #[serde(default = "default_backoff_max_ms")]
    pub(crate) backoff_max_ms: NonZeroU32,
    /// With registration: how long the cached assignment may stay unreachable before
    /// the gateway registers again.
    #[serde(default = "default_reregister_after_secs")]
    pub(crate) reregister_after_secs: NonZeroU32,
    /// Messages sent but not yet acknowledged, at most.
    #[serde(default = "default_window")]
    pub(crate) window: NonZeroU32,
    /// Which MQTT: `auto` (5, or 3.1.1 with a broker that refuses 5), `3.1.1` or `5`.
    #[serde(default)]
    pub(crate) protocol: MqttProtocol,
    /// MQTT 5: how long the broker keeps the gateway's session after a lost connection.
    #[serde(default = "default_session_expiry_secs")]
    pub(crate) session_expiry_secs: NonZeroU32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) registration: Option<RegistrationSection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) azure: Option<AzureSection>,
}

/// `uplink.protocol`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub(crate) enum MqttProtocol {
    /// MQTT 5 where the broker has it, else 3.1.1.
    #[default]
    #[serde(rename = "auto")]
    Auto,
    /// MQTT 3.1.1.
    #[serde(rename = "3.1.1")]
    V311,
    /// MQTT 5 only.
    #[serde(rename = "5")]
    V5,
}

fn default_session_expiry_secs() -> NonZeroU32 {
    NonZeroU32::new(3600).expect("non-zero")
}

/// `uplink.profile`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum UplinkProfile {
    /// Outpost's own MQTT contract (docs/cloud-contract.md).
    #[default]
    Outpost,
    /// Azure IoT Hub and DPS (docs/azure-iot.md).
    AzureIot,
}

/// `[uplink.azure]`: the `azure-iot` profile's hub, through DPS (`id_scope`) or directly
/// (`hub`).
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AzureSection {
    /// DPS's host.
    #[serde(default = "default_dps_host")]
    pub(crate) dps_host: String,
    /// DPS's id scope (with DPS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) id_scope: Option<String>,
    /// The registration id (with DPS); absent: the gateway id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) registration_id: Option<String>,
    /// The hub's host name (without DPS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) hub: Option<String>,
    /// The device id at the hub (without DPS); absent: the gateway id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) device_id: Option<String>,
    /// The individual enrollment's (or the device's) symmetric key, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) symmetric_key: Option<Secret>,
    /// An enrollment group's key, base64 (with DPS): the gateway derives its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) group_key: Option<Secret>,
    /// The MQTT port of DPS and the hub.
    #[serde(default = "default_azure_port")]
    pub(crate) port: u16,
    /// How long each SAS token lives (renewed 2 minutes before it expires).
    #[serde(default = "default_token_ttl_secs")]
    pub(crate) token_ttl_secs: NonZeroU32,
    /// Device Update for IoT Hub: absent, the gateway is no Device Update agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) device_update: Option<DeviceUpdateSection>,
    /// `[[uplink.azure.devices]]`: devices behind the gateway with a hub identity of
    /// their own (a connection each).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) devices: Vec<OwnIdentitySection>,
}

/// `[[uplink.azure.devices]]`: a device behind the gateway that IoT Hub knows as itself.
/// Its telemetry, lobby events and reported state go on its own connection (its own
/// twin and messages) instead of the gateway's.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OwnIdentitySection {
    /// The device's id at the gateway (as in the lobby).
    pub(crate) device: String,
    /// Its device id at the hub (its registration id through DPS); absent: `device`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) device_id: Option<String>,
    /// Its symmetric key at the gateway's hub, base64. Absent: it registers through DPS
    /// in the gateway's enrollment group with the key derived from `group_key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) symmetric_key: Option<Secret>,
}

/// `[uplink.azure.device_update]`: the gateway as a Device Update agent whose components
/// are its devices. Deployments need `[[cache.adu_roots]]`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeviceUpdateSection {
    /// `deviceProperties.manufacturer` (Device Update groups devices by it and `model`).
    pub(crate) manufacturer: String,
    /// `deviceProperties.model`.
    pub(crate) model: String,
}

fn default_dps_host() -> String {
    "global.azure-devices-provisioning.net".to_owned()
}
fn default_azure_port() -> u16 {
    8883
}
fn default_token_ttl_secs() -> NonZeroU32 {
    NonZeroU32::new(3600).expect("non-zero")
}

/// `[uplink.registration]`: DPS-style registration with an enrollment.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RegistrationSection {
    /// The broker the registration service listens on.
    pub(crate) broker: BrokerAddr,
    /// The id scope of the enrollment.
    pub(crate) scope: String,
    /// The registration id; absent: the gateway id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) registration_id: Option<String>,
    /// The enrollment's symmetric key (base64).
    pub(crate) key: Secret,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) password: Option<Secret>,
}

/// `[outbox]`: the durable queue of messages for the cloud (also offline).
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OutboxSection {
    /// Messages held at most; telemetry beyond is refused (and counted).
    #[serde(default = "default_outbox_messages")]
    pub(crate) max_messages: NonZeroU64,
    /// Payload bytes held at most, in MiB.
    #[serde(default = "default_outbox_mib")]
    pub(crate) max_size_mib: NonZeroU64,
    /// Time to live of a queued message, in seconds (Azure IoT Edge's default: 7200).
    #[serde(default = "default_outbox_ttl")]
    pub(crate) ttl_secs: NonZeroU64,
}

impl Default for OutboxSection {
    fn default() -> Self {
        Self {
            max_messages: default_outbox_messages(),
            max_size_mib: default_outbox_mib(),
            ttl_secs: default_outbox_ttl(),
        }
    }
}

/// Whether `host` is a host name or IP address alone (no scheme, port, path or spaces).
fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
}

/// The most brokers `[uplink] brokers` may list.
const MAX_BROKERS: usize = 16;

/// What each profile needs and refuses in `[uplink]`.
fn check_profile(uplink: &UplinkSection, gateway: &str) -> Result<(), String> {
    // MQTT's keep-alive is 16 bits; rumqttc's MQTT 5 client takes no less than 5 s.
    if !(5..=65_535).contains(&uplink.keepalive_secs.get()) {
        return Err(format!(
            "uplink.keepalive_secs = {}: give 5 to 65535",
            uplink.keepalive_secs
        ));
    }
    match uplink.profile {
        UplinkProfile::Outpost => {
            if uplink.azure.is_some() {
                return Err(
                    "[uplink.azure] is for uplink.profile = \"azure-iot\"; set the profile or \
                     remove the section"
                        .into(),
                );
            }
            if uplink.broker.is_none() && uplink.brokers.is_empty() && uplink.registration.is_none()
            {
                return Err(
                    "[uplink] needs a broker, or an [uplink.registration] that assigns one".into(),
                );
            }
            if uplink.broker.is_some() && uplink.registration.is_some() {
                return Err(
                    "[uplink]: broker and [uplink.registration] exclude each other (the \
                     registration assigns the broker)"
                        .into(),
                );
            }
            if !uplink.brokers.is_empty() {
                if uplink.broker.is_some() {
                    return Err("[uplink]: give broker or brokers, not both".into());
                }
                if uplink.registration.is_some() {
                    return Err(
                        "[uplink]: brokers and [uplink.registration] exclude each other (the \
                         registration assigns the broker)"
                            .into(),
                    );
                }
                if uplink.brokers.len() > MAX_BROKERS {
                    return Err(format!("[uplink] brokers: at most {MAX_BROKERS}"));
                }
                for (i, broker) in uplink.brokers.iter().enumerate() {
                    let same = |other: &BrokerAddr| {
                        other.host.eq_ignore_ascii_case(&broker.host) && other.port == broker.port
                    };
                    if uplink.brokers[..i].iter().any(same) {
                        return Err(format!("[uplink] brokers: {broker} is listed twice"));
                    }
                }
            }
            Ok(())
        }
        UplinkProfile::AzureIot => {
            if uplink.broker.is_some()
                || !uplink.brokers.is_empty()
                || uplink.registration.is_some()
            {
                return Err("uplink.profile = \"azure-iot\" finds its hub through \
                     [uplink.azure]: remove uplink.broker(s) and [uplink.registration]"
                    .into());
            }
            if uplink.username.is_some() || uplink.password.is_some() {
                return Err(
                    "uplink.profile = \"azure-iot\" signs its own SAS tokens: remove \
                     uplink.username and uplink.password"
                        .into(),
                );
            }
            if uplink.protocol == MqttProtocol::V5 {
                return Err(
                    "uplink.profile = \"azure-iot\": IoT Hub speaks MQTT 3.1.1; remove \
                     uplink.protocol = \"5\""
                        .into(),
                );
            }
            let azure = uplink.azure.as_ref().ok_or(
                "uplink.profile = \"azure-iot\" needs [uplink.azure] with id_scope (DPS) or hub",
            )?;
            match (&azure.id_scope, &azure.hub) {
                (Some(_), Some(_)) => {
                    return Err(
                        "[uplink.azure]: give id_scope (through DPS) or hub (a device \
                         registered at the hub), not both"
                            .into(),
                    );
                }
                (None, None) => {
                    return Err("[uplink.azure] needs id_scope (through DPS) or hub".into());
                }
                (None, Some(_)) if azure.group_key.is_some() => {
                    return Err(
                        "[uplink.azure]: a group_key needs DPS (id_scope); a hub takes \
                         the device's symmetric_key"
                            .into(),
                    );
                }
                (None, Some(_)) if azure.registration_id.is_some() => {
                    return Err(
                        "[uplink.azure]: registration_id is for DPS; a hub takes device_id".into(),
                    );
                }
                (Some(_), None) if azure.device_id.is_some() => {
                    return Err(
                        "[uplink.azure]: DPS assigns the device id; give registration_id".into(),
                    );
                }
                _ => {}
            }
            if let Some(hub) = &azure.hub
                && !valid_host(hub)
            {
                return Err(format!(
                    "[uplink.azure] hub {hub:?}: give the hub's host name only \
                     (site.azure-devices.net), no scheme, port or path"
                ));
            }
            if !valid_host(&azure.dps_host) {
                return Err(format!(
                    "[uplink.azure] dps_host {:?}: give a host name only",
                    azure.dps_host
                ));
            }
            for (key, id) in [
                ("device_id", &azure.device_id),
                ("registration_id", &azure.registration_id),
                ("id_scope", &azure.id_scope),
            ] {
                if let Some(id) = id
                    && !outpost_uplink::contract::valid_id(id)
                {
                    return Err(format!(
                        "[uplink.azure] {key} {id:?}: use 1-128 of A-Z a-z 0-9 . _ : -"
                    ));
                }
            }
            let mut own = std::collections::BTreeSet::new();
            let mut own_hub_ids = std::collections::BTreeSet::new();
            for device in &azure.devices {
                let hub_id = device.device_id.as_deref().unwrap_or(&device.device);
                for (key, id) in [("device", device.device.as_str()), ("device_id", hub_id)] {
                    if !outpost_uplink::contract::valid_id(id) {
                        return Err(format!(
                            "[[uplink.azure.devices]] {key} {id:?}: use 1-128 of \
                             A-Z a-z 0-9 . _ : -"
                        ));
                    }
                }
                let gateway_hub_id = azure
                    .device_id
                    .as_deref()
                    .or(azure.registration_id.as_deref())
                    .unwrap_or(gateway);
                if hub_id == gateway_hub_id {
                    return Err(format!(
                        "[[uplink.azure.devices]] {:?}: {hub_id:?} is the gateway's own id at \
                         the hub; give the device an id of its own (device_id)",
                        device.device
                    ));
                }
                if device.device == "gateway" {
                    return Err(
                        "[[uplink.azure.devices]]: \"gateway\" names the gateway's own desired \
                         state; a device cannot take it"
                            .into(),
                    );
                }
                if !own.insert(device.device.as_str()) {
                    return Err(format!(
                        "[[uplink.azure.devices]]: {:?} is listed twice",
                        device.device
                    ));
                }
                if !own_hub_ids.insert(hub_id) {
                    return Err(format!(
                        "[[uplink.azure.devices]]: two devices have the hub id {hub_id:?}"
                    ));
                }
                if device.symmetric_key.is_none()
                    && (azure.id_scope.is_none() || azure.group_key.is_none())
                {
                    return Err(format!(
                        "[[uplink.azure.devices]] {:?} has no symmetric_key: give its key at \
                         the hub, or register the gateway through a DPS enrollment group \
                         (id_scope and group_key), whose key the device's is derived from",
                        device.device
                    ));
                }
            }
            match (&azure.symmetric_key, &azure.group_key) {
                (Some(_), Some(_)) => {
                    Err("[uplink.azure]: give symmetric_key or group_key, not both".into())
                }
                // X.509: the gateway's certificate (CN = its registration or device id).
                (None, None) if uplink.client_cert.is_some() => Ok(()),
                (None, None) => Err(
                    "[uplink.azure] needs symmetric_key (or group_key for an enrollment group), \
                     or uplink.client_cert and uplink.client_key for X.509"
                        .into(),
                ),
                // Whether the key is base64 is checked once secrets are read.
                _ => Ok(()),
            }
        }
    }
}

fn default_keepalive_secs() -> NonZeroU32 {
    NonZeroU32::new(30).expect("non-zero")
}
fn default_backoff_min_ms() -> NonZeroU32 {
    NonZeroU32::new(1000).expect("non-zero")
}
fn default_backoff_max_ms() -> NonZeroU32 {
    NonZeroU32::new(60_000).expect("non-zero")
}
fn default_reregister_after_secs() -> NonZeroU32 {
    NonZeroU32::new(300).expect("non-zero")
}
fn default_window() -> NonZeroU32 {
    NonZeroU32::new(512).expect("non-zero")
}
fn default_outbox_messages() -> NonZeroU64 {
    NonZeroU64::new(1_000_000).expect("non-zero")
}
fn default_outbox_mib() -> NonZeroU64 {
    NonZeroU64::new(512).expect("non-zero")
}
fn default_outbox_ttl() -> NonZeroU64 {
    NonZeroU64::new(7200).expect("non-zero")
}

/// `[onboarding]`: what onboarding gives devices and how long it waits for them.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OnboardingSection {
    /// Site networks, tried in order: a device that fails to join one (wrong passphrase,
    /// AP not found) is reset and given the next, without a factory reset.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) wifi: Vec<WifiNetwork>,
    /// Ask each device for a Wi-Fi scan first (kept with the run: a warning when it sees
    /// none of the configured networks).
    #[serde(default = "yes")]
    pub(crate) scan: bool,
    /// How often a joining device is asked for its Wi-Fi state, in milliseconds.
    #[serde(default = "default_status_poll_ms")]
    pub(crate) status_poll_ms: NonZeroU32,
    /// How long a device may take to join the network, in seconds.
    #[serde(default = "default_join_timeout_secs")]
    pub(crate) join_timeout_secs: NonZeroU32,
    /// One request/response with a device, in seconds.
    #[serde(default = "default_request_timeout_secs")]
    pub(crate) request_timeout_secs: NonZeroU32,
    /// Connecting to a device (BLE connect + GATT discovery, or TCP), in seconds.
    #[serde(default = "default_connect_timeout_secs")]
    pub(crate) connect_timeout_secs: NonZeroU32,
    /// How long a BLE scan looks for the devices of a run, in seconds.
    #[serde(default = "default_scan_timeout_secs")]
    pub(crate) scan_timeout_secs: NonZeroU32,
    /// Offline claiming: a local CA signs the CSRs of devices that offer assisted
    /// claiming. Absent (and no uplink): such devices are provisioned but not claimed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) claim: Option<ClaimSection>,
}

/// `[[onboarding.wifi]]`: a site network.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WifiNetwork {
    pub(crate) ssid: String,
    pub(crate) passphrase: Secret,
}

/// `[onboarding.claim]`: the local claiming CA.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ClaimSection {
    /// The CA certificate (PEM).
    pub(crate) ca_cert: PathBuf,
    /// Its private key (PEM; best from a file of mode 0600).
    pub(crate) ca_key: Secret,
    /// Validity of the device certificates it signs, in days.
    #[serde(default = "default_claim_days")]
    pub(crate) valid_days: NonZeroU32,
}

impl Default for OnboardingSection {
    fn default() -> Self {
        Self {
            wifi: Vec::new(),
            scan: true,
            status_poll_ms: default_status_poll_ms(),
            join_timeout_secs: default_join_timeout_secs(),
            request_timeout_secs: default_request_timeout_secs(),
            connect_timeout_secs: default_connect_timeout_secs(),
            scan_timeout_secs: default_scan_timeout_secs(),
            claim: None,
        }
    }
}

fn default_status_poll_ms() -> NonZeroU32 {
    NonZeroU32::new(500).expect("non-zero")
}
fn default_join_timeout_secs() -> NonZeroU32 {
    NonZeroU32::new(60).expect("non-zero")
}
fn default_request_timeout_secs() -> NonZeroU32 {
    NonZeroU32::new(10).expect("non-zero")
}
fn default_connect_timeout_secs() -> NonZeroU32 {
    NonZeroU32::new(20).expect("non-zero")
}
fn default_scan_timeout_secs() -> NonZeroU32 {
    NonZeroU32::new(15).expect("non-zero")
}
fn default_claim_days() -> NonZeroU32 {
    NonZeroU32::new(3650).expect("non-zero")
}

/// `[cache]`: the firmware cache and its fan-out server.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CacheSection {
    /// Disk budget for cached firmware.
    #[serde(default = "default_cache_mib")]
    pub(crate) max_size_mib: NonZeroU64,
    /// Memory for blobs held in RAM while they are served.
    #[serde(default = "default_cache_memory_mib")]
    pub(crate) memory_mib: u64,
    /// A plain-HTTP firmware listener (`GET /firmware/{sha256}`), for devices that cannot
    /// do TLS. Absent: firmware is served on the device listener (`[devices]`), or on the
    /// API listener when there is none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) bind: Option<SocketAddr>,
    /// Device connections served at once.
    #[serde(default = "default_firmware_connections")]
    pub(crate) max_connections: NonZeroU32,
    /// Connections one address may hold at once; more are refused with 503.
    #[serde(default = "default_connections_per_client")]
    pub(crate) max_connections_per_client: NonZeroU32,
    /// Serve firmware only through signed per-device links (403 otherwise).
    #[serde(default = "default_true")]
    pub(crate) require_signed_links: bool,
    /// Attempts per upstream download before the error is reported.
    #[serde(default = "default_download_attempts")]
    pub(crate) download_attempts: NonZeroU32,
    /// Extra CA certificates (PEM) for HTTPS firmware origins, beside the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) ca_file: Option<PathBuf>,
    /// The base URL devices download from (`http://192.168.4.1:8070`); default: the
    /// bound address (loopback when `bind` is unspecified).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) public_url: Option<String>,
    /// Keys whose signed update manifests this gateway accepts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) trusted_signers: Vec<TrustedSignerEntry>,
    /// Device Update root keys whose signing keys may sign the deployments that IoT
    /// Hub's Device Update sends (uplink profile `azure-iot`). None is built in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) adu_roots: Vec<AduRootEntry>,
}

/// `[[cache.adu_roots]]`: a Device Update root key (RSA, as Device Update publishes
/// them: `kid`, base64 modulus `n`, exponent `e`).
#[derive(Debug, Deserialize, Serialize)]
#[serde(
    deny_unknown_fields,
    try_from = "AduRootFields",
    into = "AduRootFields"
)]
pub(crate) struct AduRootEntry(pub(crate) outpost_cache::adu::AduRootKey);

/// The fields of `[[cache.adu_roots]]` as written.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AduRootFields {
    kid: String,
    n: String,
    #[serde(default = "default_rsa_exponent")]
    e: String,
}

fn default_rsa_exponent() -> String {
    "AQAB".into()
}

impl TryFrom<AduRootFields> for AduRootEntry {
    type Error = String;
    fn try_from(fields: AduRootFields) -> Result<Self, String> {
        outpost_cache::adu::AduRootKey::from_base64(&fields.kid, &fields.n, &fields.e).map(Self)
    }
}

impl From<AduRootEntry> for AduRootFields {
    fn from(entry: AduRootEntry) -> Self {
        let (n, e) = entry.0.to_base64();
        Self {
            kid: entry.0.kid,
            n,
            e,
        }
    }
}

impl Clone for AduRootEntry {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

/// `[[cache.trusted_signers]]`: a key allowed to sign update manifests.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TrustedSignerEntry {
    /// The name manifests give as their JWS `kid`.
    pub(crate) name: String,
    pub(crate) public_key: PublicKey,
}

impl CacheSection {
    /// The base URL devices download firmware from, given the bound address.
    pub(crate) fn public_url(&self, bound: SocketAddr) -> String {
        match &self.public_url {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None if bound.ip().is_unspecified() => format!("http://127.0.0.1:{}", bound.port()),
            None => format!("http://{bound}"),
        }
    }

    /// The cache settings these give, with the cache in `root`.
    pub(crate) fn cache_config(&self, root: &Path) -> outpost_cache::CacheConfig {
        outpost_cache::CacheConfig {
            root: root.to_path_buf(),
            max_bytes: self.max_size_mib.get() << 20,
            memory_bytes: self.memory_mib << 20,
            trusted_signers: self
                .trusted_signers
                .iter()
                .map(|s| outpost_cache::manifest::TrustedSigner {
                    name: s.name.clone(),
                    key: s.public_key.0,
                })
                .collect(),
            adu_roots: self.adu_roots.iter().map(|r| r.0.clone()).collect(),
            fetch: outpost_cache::FetchConfig {
                attempts: self.download_attempts.get(),
                ca_file: self.ca_file.clone(),
                ..outpost_cache::FetchConfig::default()
            },
        }
    }

    /// The fan-out server settings.
    pub(crate) fn server_config(&self) -> outpost_cache::server::ServerConfig {
        let defaults = outpost_cache::server::ServerConfig::default();
        outpost_cache::server::ServerConfig {
            limits: outpost_serve::Limits {
                max_connections: as_usize(self.max_connections),
                max_connections_per_client: as_usize(self.max_connections_per_client),
                ..defaults.limits
            },
            require_signed_links: self.require_signed_links,
            ..defaults
        }
    }
}

/// `[handlers]`: limits for the vendor update handlers, and whose handlers to trust.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HandlersSection {
    #[serde(
        default = "default_handler_memory",
        deserialize_with = "handler_memory"
    )]
    pub(crate) memory_limit_mib: NonZeroU32,
    #[serde(default = "default_handler_cpu")]
    pub(crate) cpu_time_ms: NonZeroU32,
    /// Wall-clock time one handler call may take, waits for the device included.
    #[serde(
        default = "default_handler_wall_time",
        deserialize_with = "handler_wall_time"
    )]
    pub(crate) wall_time_secs: u32,
    #[serde(default = "default_handler_instances")]
    pub(crate) max_concurrent: NonZeroU32,
    /// Vendors whose signed packages may be installed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) trusted_vendors: Vec<TrustedVendorEntry>,
}

/// `[[handlers.trusted_vendors]]`: a vendor key and what it may sign for.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TrustedVendorEntry {
    pub(crate) name: String,
    pub(crate) public_key: PublicKey,
    /// Device types the key may sign handlers for; `"*"` for any.
    pub(crate) device_types: Vec<String>,
}

/// An ed25519 public key written `ed25519:<64 hex digits>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub(crate) struct PublicKey(pub(crate) outpost_runtime::package::VerifyingKey);

impl From<PublicKey> for String {
    fn from(key: PublicKey) -> Self {
        outpost_runtime::package::format_public_key(&key.0)
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        outpost_runtime::package::parse_public_key(&text)
            .map(Self)
            .map_err(serde::de::Error::custom)
    }
}

impl HandlersSection {
    /// The runtime limits these settings give.
    pub(crate) fn runtime_config(&self) -> outpost_runtime::RuntimeConfig {
        outpost_runtime::RuntimeConfig {
            memory_limit: u64::from(self.memory_limit_mib.get()) << 20,
            cpu_time: std::time::Duration::from_millis(u64::from(self.cpu_time_ms.get())),
            wall_time: std::time::Duration::from_secs(u64::from(self.wall_time_secs)),
            max_instances: self.max_concurrent.get(),
            ..outpost_runtime::RuntimeConfig::default()
        }
    }

    /// The trust store for package verification.
    pub(crate) fn trusted(&self) -> Vec<outpost_runtime::package::TrustedVendor> {
        self.trusted_vendors
            .iter()
            .map(|vendor| outpost_runtime::package::TrustedVendor {
                name: vendor.name.clone(),
                key: vendor.public_key.0,
                device_types: vendor.device_types.clone(),
            })
            .collect()
    }
}

fn default_name() -> String {
    "Outpost gateway".to_owned()
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("state")
}
fn default_bind() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_log_level() -> LogLevel {
    LogLevel("info".to_owned())
}
fn yes() -> bool {
    true
}
fn default_ble_sessions() -> NonZeroU32 {
    NonZeroU32::new(4).expect("nonzero")
}
fn default_cache_mib() -> NonZeroU64 {
    NonZeroU64::new(2048).expect("nonzero")
}
fn default_cache_memory_mib() -> u64 {
    64
}
fn default_true() -> bool {
    true
}
fn default_connections_per_client() -> NonZeroU32 {
    NonZeroU32::new(32).expect("nonzero")
}
fn default_firmware_connections() -> NonZeroU32 {
    NonZeroU32::new(512).expect("nonzero")
}
fn default_download_attempts() -> NonZeroU32 {
    NonZeroU32::new(5).expect("nonzero")
}
fn default_handler_memory() -> NonZeroU32 {
    NonZeroU32::new(64).expect("nonzero")
}
fn default_handler_cpu() -> NonZeroU32 {
    NonZeroU32::new(1000).expect("nonzero")
}
fn default_handler_wall_time() -> u32 {
    30
}
/// `handlers.wall_time_secs`: longer than the longest wait for one device reply (a
/// call that waits for a device must be able to), at most an hour.
fn handler_wall_time<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
    let device_wait = outpost_runtime::RuntimeConfig::default()
        .max_device_wait
        .as_secs();
    let secs = u32::deserialize(deserializer)?;
    if u64::from(secs) <= device_wait || secs > 3600 {
        return Err(serde::de::Error::custom(format!(
            "wall_time_secs {secs}: use {} to 3600 (a handler call waits up to {device_wait} s \
             for one device reply)",
            device_wait + 1
        )));
    }
    Ok(secs)
}
/// A handler is a 32-bit guest: its linear memory ends at 4 GiB, and so does the pool's
/// reservation for it (the engine, set up when the first handler loads, would refuse more).
fn handler_memory<'de, D: Deserializer<'de>>(deserializer: D) -> Result<NonZeroU32, D::Error> {
    let mib = NonZeroU32::deserialize(deserializer)?;
    if mib.get() > 4096 {
        return Err(serde::de::Error::custom(format!(
            "memory_limit_mib {mib}: use 1 to 4096 (a wasm32 handler addresses at most 4 GiB)"
        )));
    }
    Ok(mib)
}
fn default_handler_instances() -> NonZeroU32 {
    NonZeroU32::new(4).expect("nonzero")
}

impl Default for ApiSection {
    fn default() -> Self {
        Self {
            bind: default_bind(),
            admin_token: None,
            public_url: None,
            max_connections_per_client: default_connections_per_client(),
            tls: false,
        }
    }
}
impl Default for LogSection {
    fn default() -> Self {
        Self {
            format: LogFormat::default(),
            level: default_log_level(),
        }
    }
}
impl Default for BleSection {
    fn default() -> Self {
        Self {
            enabled: true,
            adapter: None,
            max_concurrent_sessions: default_ble_sessions(),
        }
    }
}
impl Default for CacheSection {
    fn default() -> Self {
        Self {
            max_size_mib: default_cache_mib(),
            memory_mib: default_cache_memory_mib(),
            bind: None,
            max_connections: default_firmware_connections(),
            max_connections_per_client: default_connections_per_client(),
            require_signed_links: true,
            download_attempts: default_download_attempts(),
            ca_file: None,
            public_url: None,
            trusted_signers: Vec::new(),
            adu_roots: Vec::new(),
        }
    }
}
impl Default for HandlersSection {
    fn default() -> Self {
        Self {
            memory_limit_mib: default_handler_memory(),
            cpu_time_ms: default_handler_cpu(),
            wall_time_secs: default_handler_wall_time(),
            max_concurrent: default_handler_instances(),
            trusted_vendors: Vec::new(),
        }
    }
}

/// A gateway id: it appears in MQTT topics and certificate names, so it is limited to
/// 1–64 ASCII letters, digits, `-`, `_` and `.`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub(crate) struct GatewayId(String);

impl GatewayId {
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for GatewayId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let id = String::deserialize(deserializer)?;
        let valid = (1..=64).contains(&id.len())
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !valid {
            return Err(serde::de::Error::custom(format!(
                "invalid gateway id {id:?}: use 1 to 64 ASCII letters, digits, '-', '_' or '.'"
            )));
        }
        Ok(Self(id))
    }
}

/// A tracing filter directive such as `info` or `outpost=debug,hyper=warn`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub(crate) struct LogLevel(String);

impl LogLevel {
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let level = String::deserialize(deserializer)?;
        tracing_subscriber::EnvFilter::builder()
            .parse(&level)
            .map_err(|err| {
                serde::de::Error::custom(format!("invalid log level {level:?}: {err}"))
            })?;
        Ok(Self(level))
    }
}

/// A config that could not be loaded, with enough context to fix it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file's content is wrong at a known place.
    #[error("{}:{line}:{column}: {message}", path.display())]
    At {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// The file's content is wrong, but the parser gave no place.
    #[error("{}: {message}", path.display())]
    Whole { path: PathBuf, message: String },
}

impl Config {
    /// Reads, parses, validates and resolves the config at `path`.
    pub(crate) fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses `text` as if read from `path`: relative paths are taken from its directory.
    pub(crate) fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let located = |span: Option<Range<usize>>, message: String| match span {
            Some(span) => {
                let (line, column) = line_column(text, span.start);
                ConfigError::At {
                    path: path.to_path_buf(),
                    line,
                    column,
                    message,
                }
            }
            None => ConfigError::Whole {
                path: path.to_path_buf(),
                message,
            },
        };
        let mut config: Self = toml::from_str(text)
            .map_err(|err| located(err.span(), err.message().trim_end().to_owned()))?;

        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let base = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
        config.gateway.state_dir = base.join(&config.gateway.state_dir);
        if let Some(uplink) = &mut config.uplink {
            if let Some(ca_file) = &mut uplink.ca_file {
                *ca_file = base.join(&*ca_file);
            }
            if let Some(cert) = &mut uplink.client_cert {
                *cert = base.join(&*cert);
            }
            if let Err(why) = check_profile(uplink, config.gateway.id.as_str()) {
                return Err(located(None, why));
            }
            if let Some(du) = uplink.azure.as_ref().and_then(|a| a.device_update.as_ref()) {
                for (key, value) in [("manufacturer", &du.manufacturer), ("model", &du.model)] {
                    if value.trim().is_empty() || value.len() > 64 || value.contains(',') {
                        return Err(located(
                            None,
                            format!(
                                "[uplink.azure.device_update] {key} {value:?}: give 1-64 \
                                 characters without ','"
                            ),
                        ));
                    }
                }
                if config.cache.adu_roots.is_empty() {
                    return Err(located(
                        None,
                        "[uplink.azure.device_update] needs the Device Update root keys that \
                         may vouch for deployment signers: add [[cache.adu_roots]] (kid, n, e)"
                            .into(),
                    ));
                }
            }
            if uplink.client_cert.is_some() != uplink.client_key.is_some() {
                return Err(located(
                    None,
                    "uplink.client_cert and uplink.client_key go together".into(),
                ));
            }
            if let Some(registration) = &uplink.registration
                && let Some(id) = &registration.registration_id
                && !outpost_uplink::contract::valid_id(id)
            {
                return Err(located(
                    None,
                    format!(
                        "uplink.registration.registration_id {id:?}: use 1-128 of A-Z a-z 0-9 . _ : -"
                    ),
                ));
            }
        }
        if let Some(ca_file) = &mut config.cache.ca_file {
            *ca_file = base.join(&*ca_file);
        }
        if let Some(claim) = &mut config.onboarding.claim {
            claim.ca_cert = base.join(&claim.ca_cert);
        }
        if let Some(network) = config
            .onboarding
            .wifi
            .iter()
            .find(|n| n.ssid.is_empty() || n.ssid.len() > outpost_protocomm::wifi::MAX_SSID)
        {
            return Err(located(
                None,
                format!(
                    "onboarding.wifi: SSID {:?} must be 1 to 32 bytes",
                    network.ssid
                ),
            ));
        }

        if !config.api.bind.ip().is_loopback() && !config.api.tls {
            return Err(located(
                None,
                format!(
                    "api.bind {} is beyond this machine, and the admin API would carry its \
                     tokens in the clear: set api.tls = true (the site CA's certificate), or bind \
                     127.0.0.1 and give devices a [devices] listener",
                    config.api.bind
                ),
            ));
        }
        if config.gateway.state_dir.exists() && !config.gateway.state_dir.is_dir() {
            return Err(located(
                None,
                format!(
                    "gateway.state_dir {} exists and is not a directory",
                    config.gateway.state_dir.display()
                ),
            ));
        }

        let mut warnings = Vec::new();
        let allow_insecure = config.gateway.allow_insecure_secrets;
        for secret in config.secrets_mut() {
            let span = secret.span();
            match secret.resolve(&base, allow_insecure) {
                Ok(warning) => warnings.extend(warning),
                Err(message) => return Err(located(Some(span), message)),
            }
        }
        // An Azure key must be base64 (read from its file or variable by now).
        if let Some(azure) = config.uplink.as_ref().and_then(|u| u.azure.as_ref()) {
            let gateway_key = azure.symmetric_key.as_ref().or(azure.group_key.as_ref());
            let keys = gateway_key
                .map(|key| ("[uplink.azure]", key))
                .into_iter()
                .chain(azure.devices.iter().filter_map(|d| {
                    d.symmetric_key
                        .as_ref()
                        .map(|key| ("[[uplink.azure.devices]]", key))
                }));
            for (section, key) in keys {
                if let Err(err) = outpost_azure::sas::sign(key.expose(), "") {
                    return Err(located(Some(key.span()), format!("{section}: {err}")));
                }
            }
        }
        // What `run` would refuse, `config check` refuses too.
        if let Some(token) = &config.api.admin_token
            && let Err(why) = crate::state_dir::AdminToken::new(token.expose())
        {
            return Err(located(Some(token.span()), why));
        }
        config.warnings = warnings;
        Ok(config)
    }

    fn secrets_mut(&mut self) -> impl Iterator<Item = &mut Secret> {
        let mut uplink_secrets: Vec<&mut Secret> = Vec::new();
        if let Some(uplink) = self.uplink.as_mut() {
            uplink_secrets.extend(uplink.password.as_mut());
            uplink_secrets.extend(uplink.client_key.as_mut());
            if let Some(registration) = uplink.registration.as_mut() {
                uplink_secrets.push(&mut registration.key);
                uplink_secrets.extend(registration.password.as_mut());
            }
            if let Some(azure) = uplink.azure.as_mut() {
                uplink_secrets.extend(azure.symmetric_key.as_mut());
                uplink_secrets.extend(azure.group_key.as_mut());
                uplink_secrets.extend(
                    azure
                        .devices
                        .iter_mut()
                        .filter_map(|d| d.symmetric_key.as_mut()),
                );
            }
        }
        let claim_key = self.onboarding.claim.as_mut().map(|c| &mut c.ca_key);
        let wifi = self.onboarding.wifi.iter_mut().map(|n| &mut n.passphrase);
        self.api
            .admin_token
            .as_mut()
            .into_iter()
            .chain(uplink_secrets)
            .chain(claim_key)
            .chain(wifi)
    }

    /// The effective config as TOML, secrets replaced by where they come from.
    pub(crate) fn to_redacted_toml(&self) -> String {
        let mut text = toml::to_string_pretty(self)
            .unwrap_or_else(|err| format!("# the effective config could not be rendered: {err}\n"));
        if self.uplink.is_none() {
            text.push_str("\n# [uplink] is not configured: the gateway runs offline.\n");
        }
        text
    }

    /// Where installed handler packages and their compiled code live.
    pub(crate) fn handlers_dir(&self) -> PathBuf {
        self.gateway.state_dir.join("handlers")
    }

    /// Where cached firmware lives.
    pub(crate) fn firmware_dir(&self) -> PathBuf {
        self.gateway.state_dir.join("firmware")
    }

    /// Where the SQLite state database lives.
    pub(crate) fn database_path(&self) -> PathBuf {
        self.gateway.state_dir.join("outpost.db")
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

#[cfg(test)]
mod tests;
