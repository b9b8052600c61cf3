//! From the config to the engine crates' settings: `[uplink]` and `[outbox]` for the
//! uplink, `[ble]` and `[onboarding]` for onboarding.

use std::time::Duration;

use outpost_uplink::{
    AzureIdentity, AzureSettings, Credentials, Endpoint, OutboxLimits, RegistrationSettings,
    TlsSettings, UplinkSettings,
};

use crate::config::{AzureSection, Config, UplinkProfile, UplinkSection};

/// The `azure-iot` profile's settings from `[uplink.azure]` (checked by the parser).
fn azure(gateway: &str, section: &AzureSection) -> AzureSettings {
    // No key: X.509, the client certificate of [uplink] (checked when the config is read).
    let key = section
        .symmetric_key
        .as_ref()
        .or(section.group_key.as_ref())
        .map(|key| key.expose().to_owned());
    let identity = match (&section.id_scope, &section.hub) {
        (Some(id_scope), _) => AzureIdentity::Dps {
            host: section.dps_host.clone(),
            id_scope: id_scope.clone(),
            registration_id: section
                .registration_id
                .clone()
                .unwrap_or_else(|| gateway.to_owned()),
            attestation: match key {
                None => outpost_azure::provision::Attestation::X509,
                Some(key) if section.group_key.is_some() => {
                    outpost_azure::provision::Attestation::GroupKey(key)
                }
                Some(key) => outpost_azure::provision::Attestation::SymmetricKey(key),
            },
        },
        (None, hub) => AzureIdentity::Direct {
            hub: hub.clone().unwrap_or_default(),
            device_id: section
                .device_id
                .clone()
                .unwrap_or_else(|| gateway.to_owned()),
            key,
        },
    };
    AzureSettings {
        identity,
        port: section.port,
        token_ttl: Duration::from_secs(u64::from(section.token_ttl_secs.get())),
        device_update: section.device_update.as_ref().map(|du| {
            outpost_uplink::DeviceUpdateSettings {
                manufacturer: du.manufacturer.clone(),
                model: du.model.clone(),
            }
        }),
        devices: section
            .devices
            .iter()
            .map(|device| outpost_uplink::OwnIdentity {
                device: device.device.clone(),
                hub_device_id: device
                    .device_id
                    .clone()
                    .unwrap_or_else(|| device.device.clone()),
                key: match &device.symmetric_key {
                    Some(key) => outpost_uplink::OwnKey::Hub(key.expose().to_owned()),
                    None => outpost_uplink::OwnKey::Group,
                },
            })
            .collect(),
    }
}

/// The devices whose messages have a lane of their own in the outbox (those with a hub
/// identity of their own).
pub(crate) fn outbox_lanes(config: &Config) -> std::collections::BTreeSet<String> {
    config
        .uplink
        .as_ref()
        .filter(|uplink| uplink.profile == UplinkProfile::AzureIot)
        .and_then(|uplink| uplink.azure.as_ref())
        .map(|azure| azure.devices.iter().map(|d| d.device.clone()).collect())
        .unwrap_or_default()
}

/// The outbox bounds from `[outbox]`.
pub(crate) fn outbox_limits(config: &Config) -> OutboxLimits {
    OutboxLimits {
        max_messages: config.outbox.max_messages.get(),
        max_bytes: config.outbox.max_size_mib.get().saturating_mul(1024 * 1024),
        default_ttl: Duration::from_secs(config.outbox.ttl_secs.get()),
    }
}

/// The uplink settings, when `[uplink]` is configured.
pub(crate) fn settings(config: &Config, uplink: &UplinkSection) -> UplinkSettings {
    let gateway = config.gateway.id.as_str().to_owned();
    let endpoint = match (&uplink.registration, &uplink.broker) {
        _ if uplink.profile == UplinkProfile::AzureIot => Endpoint::Azure(azure(
            &gateway,
            uplink
                .azure
                .as_ref()
                .expect("the config parser requires [uplink.azure] for azure-iot"),
        )),
        (Some(registration), _) => Endpoint::Registration(RegistrationSettings {
            broker: registration.broker.clone(),
            credentials: Credentials {
                username: registration.username.clone(),
                password: registration
                    .password
                    .as_ref()
                    .map(|p| p.expose().to_owned()),
            },
            scope: registration.scope.clone(),
            registration_id: registration
                .registration_id
                .clone()
                .unwrap_or_else(|| gateway.clone()),
            key: registration.key.expose().to_owned(),
        }),
        (None, broker) => Endpoint::Fixed {
            brokers: broker.iter().chain(&uplink.brokers).cloned().collect(),
            credentials: Credentials {
                username: uplink.username.clone(),
                password: uplink.password.as_ref().map(|p| p.expose().to_owned()),
            },
        },
    };
    let mut settings = UplinkSettings::new(gateway, endpoint);
    settings.tls = TlsSettings {
        ca_file: uplink.ca_file.clone(),
        client_cert: uplink.client_cert.clone(),
        client_key: uplink.client_key.as_ref().map(|k| k.expose().to_owned()),
    };
    settings.keepalive = Duration::from_secs(u64::from(uplink.keepalive_secs.get()));
    settings.backoff_min = Duration::from_millis(u64::from(uplink.backoff_min_ms.get()));
    settings.backoff_max = Duration::from_millis(u64::from(uplink.backoff_max_ms.get()));
    settings.reregister_after = Duration::from_secs(u64::from(uplink.reregister_after_secs.get()));
    settings.protocol = match uplink.protocol {
        crate::config::MqttProtocol::Auto => outpost_uplink::ProtocolChoice::Auto,
        crate::config::MqttProtocol::V311 => outpost_uplink::ProtocolChoice::V311,
        crate::config::MqttProtocol::V5 => outpost_uplink::ProtocolChoice::V5,
    };
    settings.session_expiry = Duration::from_secs(u64::from(uplink.session_expiry_secs.get()));
    settings.window = uplink.window.get() as usize;
    settings
}

impl Config {
    /// Onboarding's settings from `[ble]` and `[onboarding]`.
    pub(crate) fn onboarding_settings(&self) -> outpost_onboarding::OnboardingSettings {
        let o = &self.onboarding;
        let secs = |n: std::num::NonZeroU32| Duration::from_secs(u64::from(n.get()));
        outpost_onboarding::OnboardingSettings {
            ble_enabled: self.ble.enabled,
            adapter: self.ble.adapter.clone(),
            max_sessions: self.ble.max_concurrent_sessions.get() as usize,
            networks: o
                .wifi
                .iter()
                .map(|n| outpost_onboarding::WifiNetwork {
                    ssid: n.ssid.clone(),
                    passphrase: n.passphrase.expose().to_owned(),
                })
                .collect(),
            scan: o.scan,
            status_poll: Duration::from_millis(u64::from(o.status_poll_ms.get())),
            join_timeout: secs(o.join_timeout_secs),
            scan_timeout: secs(o.scan_timeout_secs),
            timeouts: outpost_ble::Timeouts {
                request: secs(o.request_timeout_secs),
                connect: secs(o.connect_timeout_secs),
            },
            claim_ca: o
                .claim
                .as_ref()
                .map(|claim| outpost_onboarding::ClaimCaSettings {
                    ca_cert: claim.ca_cert.clone(),
                    ca_key_pem: claim.ca_key.expose().to_owned(),
                    valid_days: claim.valid_days.get(),
                }),
        }
    }
}
