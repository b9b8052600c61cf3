//! What the uplink needs to know: where to connect, as whom, and how patiently.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// A broker address from `mqtt://host[:1883]` or `mqtts://host[:8883]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerAddr {
    /// TLS (`mqtts`).
    pub tls: bool,
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl BrokerAddr {
    /// Parses `mqtt://host[:port]` or `mqtts://host[:port]` (an IPv6 address in
    /// brackets); the port defaults to 1883 / 8883. Credentials, paths and queries are
    /// refused: they do not belong in a broker address.
    pub fn parse(url: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("invalid broker URL {url:?}: {why}");
        let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtts://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("mqtt://") {
            (false, rest)
        } else {
            return Err(bad("it must start with mqtt:// or mqtts://"));
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains(['/', '?', '#', '@']) {
            return Err(bad(
                "give only host and port; credentials go in username/password",
            ));
        }
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let (host, after) = bracketed
                .split_once(']')
                .ok_or_else(|| bad("unclosed '[' around an IPv6 address"))?;
            (host, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(bad("the host is missing"));
        }
        let port = match port {
            None if tls => 8883,
            None => 1883,
            Some(port) => port
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad("the port must be a number from 1 to 65535"))?,
        };
        Ok(Self {
            tls,
            host: host.to_owned(),
            port,
        })
    }
}

impl std::str::FromStr for BrokerAddr {
    type Err = String;
    fn from_str(url: &str) -> Result<Self, String> {
        Self::parse(url)
    }
}

impl serde::Serialize for BrokerAddr {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for BrokerAddr {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl std::fmt::Display for BrokerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// MQTT username and password (or token).
#[derive(Clone, Default)]
pub struct Credentials {
    /// The username.
    pub username: Option<String>,
    /// The password or token.
    pub password: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// How the gateway finds its broker.
#[derive(Clone, Debug)]
pub enum Endpoint {
    /// Brokers given in the config: the first is preferred, the others take over when it
    /// is lost (a cluster's nodes, or a standby), and the gateway returns to the first
    /// once it answers again.
    Fixed {
        /// The brokers, in order of preference (at least one).
        brokers: Vec<BrokerAddr>,
        /// Their credentials.
        credentials: Credentials,
    },
    /// DPS-style: register with an enrollment, then connect where assigned.
    Registration(RegistrationSettings),
    /// The `azure-iot` profile: Azure IoT Hub (through DPS or directly), speaking IoT
    /// Hub's MQTT dialect instead of Outpost's contract.
    Azure(AzureSettings),
}

/// How an `azure-iot` gateway finds its hub and proves who it is.
#[derive(Clone)]
pub enum AzureIdentity {
    /// Register with Azure's Device Provisioning Service, then connect where assigned.
    Dps {
        /// DPS's host (`global.azure-devices-provisioning.net`).
        host: String,
        /// The id scope.
        id_scope: String,
        /// The registration id (the device id DPS assigns with it).
        registration_id: String,
        /// The enrollment's key, or its group's.
        attestation: outpost_azure::provision::Attestation,
    },
    /// A device registered at a hub directly (what its connection string holds).
    Direct {
        /// The hub's host name (`{name}.azure-devices.net`).
        hub: String,
        /// The device id.
        device_id: String,
        /// The device's symmetric key (base64); `None`: X.509, the client certificate
        /// of the TLS settings.
        key: Option<String>,
    },
}

impl std::fmt::Debug for AzureIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Dps {
                host,
                id_scope,
                registration_id,
                attestation,
            } => f
                .debug_struct("Dps")
                .field("host", host)
                .field("id_scope", id_scope)
                .field("registration_id", registration_id)
                .field("attestation", attestation)
                .finish(),
            Self::Direct { hub, device_id, .. } => f
                .debug_struct("Direct")
                .field("hub", hub)
                .field("device_id", device_id)
                .field("key", &"<redacted>")
                .finish(),
        }
    }
}

/// The `azure-iot` profile's settings.
#[derive(Clone, Debug)]
pub struct AzureSettings {
    /// Where the hub comes from.
    pub identity: AzureIdentity,
    /// The MQTT port of DPS and the hub (8883).
    pub port: u16,
    /// How long each SAS token lives; the gateway reconnects with a new one before it
    /// expires.
    pub token_ttl: Duration,
    /// Device Update for IoT Hub: when set, the gateway announces Device Update's model,
    /// reports the `deviceUpdate` component and turns its deployments into rollouts.
    pub device_update: Option<DeviceUpdateSettings>,
    /// Devices behind the gateway that have a hub identity of their own: each gets a
    /// connection of its own, on which its telemetry, lobby events and reported state go
    /// (and its twin's desired properties come) instead of through the gateway's.
    pub devices: Vec<OwnIdentity>,
}

/// A device behind the gateway with its own IoT Hub identity.
#[derive(Clone)]
pub struct OwnIdentity {
    /// The device's id at the gateway (in the lobby, in Outpost topics).
    pub device: String,
    /// Its device id at the hub (and, through DPS, its registration id).
    pub hub_device_id: String,
    /// How it proves who it is.
    pub key: OwnKey,
}

/// How a device with its own hub identity signs its tokens.
#[derive(Clone)]
pub enum OwnKey {
    /// A device registered at the gateway's hub with this symmetric key (base64).
    Hub(String),
    /// Registered through DPS in the gateway's enrollment group: the key is derived from
    /// the group's for the registration id, and DPS assigns the hub.
    Group,
}

impl std::fmt::Debug for OwnIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnIdentity")
            .field("device", &self.device)
            .field("hub_device_id", &self.hub_device_id)
            .field(
                "key",
                &match self.key {
                    OwnKey::Hub(_) => "<redacted>",
                    OwnKey::Group => "<derived from the group key>",
                },
            )
            .finish()
    }
}

/// The gateway as a Device Update agent (its devices are the agent's components).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceUpdateSettings {
    /// `deviceProperties.manufacturer`: with `model`, what Device Update groups the
    /// gateway by.
    pub manufacturer: String,
    /// `deviceProperties.model`.
    pub model: String,
}

/// The registration service and the gateway's enrollment.
#[derive(Clone)]
pub struct RegistrationSettings {
    /// The broker the registration service listens on.
    pub broker: BrokerAddr,
    /// Credentials on that broker, if it wants any.
    pub credentials: Credentials,
    /// The id scope (`{scope}/registrations/{id}` in the token).
    pub scope: String,
    /// The registration id.
    pub registration_id: String,
    /// The enrollment's symmetric key, base64.
    pub key: String,
}

impl std::fmt::Debug for RegistrationSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistrationSettings")
            .field("broker", &self.broker)
            .field("credentials", &self.credentials)
            .field("scope", &self.scope)
            .field("registration_id", &self.registration_id)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// TLS material.
#[derive(Clone, Default)]
pub struct TlsSettings {
    /// A CA bundle (PEM) to trust instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// A client certificate chain (PEM) for mutual TLS.
    pub client_cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub client_key: Option<String>,
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings")
            .field("ca_file", &self.ca_file)
            .field("client_cert", &self.client_cert)
            .field(
                "client_key",
                &self.client_key.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// Everything the uplink runs on.
#[derive(Clone, Debug)]
pub struct UplinkSettings {
    /// The gateway id: the identity in every topic.
    pub gateway_id: String,
    /// The software version, reported in status.
    pub version: String,
    /// Where to connect.
    pub endpoint: Endpoint,
    /// TLS material for `mqtts` brokers.
    pub tls: TlsSettings,
    /// MQTT keepalive.
    pub keepalive: Duration,
    /// First reconnect delay (doubles with jitter up to `backoff_max`).
    pub backoff_min: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// With registration: how long the cached assignment may stay unreachable before the
    /// gateway registers again.
    pub reregister_after: Duration,
    /// Messages in flight (sent, not yet acknowledged) at most.
    pub window: usize,
    /// Which MQTT to speak (the `azure-iot` profile always speaks 3.1.1, as IoT Hub does).
    pub protocol: ProtocolChoice,
    /// MQTT 5: how long the broker keeps the gateway's session after the connection is
    /// lost (its subscriptions and what arrives for them).
    pub session_expiry: Duration,
}

/// `uplink.protocol`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ProtocolChoice {
    /// MQTT 5, and 3.1.1 with a broker that refuses 5.
    #[default]
    Auto,
    /// MQTT 3.1.1 only.
    V311,
    /// MQTT 5 only.
    V5,
}

impl UplinkSettings {
    /// Settings with the defaults for everything but the identity and endpoint.
    pub fn new(gateway_id: impl Into<String>, endpoint: Endpoint) -> Self {
        Self {
            gateway_id: gateway_id.into(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            endpoint,
            tls: TlsSettings::default(),
            keepalive: Duration::from_secs(30),
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            reregister_after: Duration::from_secs(300),
            window: 512,
            protocol: ProtocolChoice::Auto,
            session_expiry: Duration::from_secs(3600),
        }
    }
}

/// Builds the rustls client config: the CA file or the system store, and the client
/// certificate if given.
pub(crate) fn rustls_config(tls: &TlsSettings) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};

    let mut roots = rustls::RootCertStore::empty();
    if let Some(path) = &tls.ca_file {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|err| format!("cannot read the CA file {}: {err}", path.display()))?
            .collect::<Result<_, _>>()
            .map_err(|err| format!("the CA file {} is not PEM: {err}", path.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "the CA file {} holds no certificate",
                path.display()
            ));
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|err| format!("a certificate in {} is unusable: {err}", path.display()))?;
        }
    } else {
        let found = rustls_native_certs::load_native_certs();
        for cert in found.certs {
            let _ = roots.add(cert);
        }
        if roots.is_empty() {
            return Err("no system CA certificates found; set uplink.ca_file".to_owned());
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| format!("TLS set-up failed: {err}"))?
        .with_root_certificates(roots);
    let config = match (&tls.client_cert, &tls.client_key) {
        (Some(cert_path), Some(key_pem)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
                .map_err(|err| format!("cannot read {}: {err}", cert_path.display()))?
                .collect::<Result<_, _>>()
                .map_err(|err| format!("{} is not PEM: {err}", cert_path.display()))?;
            let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
                .map_err(|err| format!("the client key is not a PEM private key: {err}"))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|err| format!("the client certificate and key do not fit: {err}"))?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => {
            return Err("a client certificate needs its key, and a key its certificate".to_owned());
        }
    };
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        let b = BrokerAddr::parse("mqtts://broker.example:8884").unwrap();
        assert!(b.tls && b.host == "broker.example" && b.port == 8884);
        assert_eq!(BrokerAddr::parse("mqtt://127.0.0.1").unwrap().port, 1883);
        assert_eq!(BrokerAddr::parse("mqtts://h").unwrap().port, 8883);
        assert_eq!(BrokerAddr::parse("mqtt://[::1]:1884").unwrap().host, "::1");
        assert_eq!(
            BrokerAddr::parse("mqtt://[::1]:1884").unwrap().to_string(),
            "mqtt://[::1]:1884"
        );
        for bad in ["http://h", "mqtt://", "mqtt://h:70000", "mqtt://h:x"] {
            assert!(BrokerAddr::parse(bad).is_err(), "{bad}");
        }
        // The config's rules (this is the one parser): no credentials, paths or port 0,
        // and each refusal says why.
        for (bad, says) in [
            ("mqtt://user:pw@host", "credentials go in username/password"),
            ("mqtt://host/path", "give only host and port"),
            ("http://host", "must start with mqtt:// or mqtts://"),
            ("mqtt://host:0", "from 1 to 65535"),
            ("mqtt://[::1", "unclosed"),
            ("mqtt://:1883", "the host is missing"),
        ] {
            let err = BrokerAddr::parse(bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
        // Read from and written to the config as the URL text.
        let parsed: BrokerAddr = serde_json::from_str("\"mqtts://[::1]:18883/\"").unwrap();
        assert_eq!(
            serde_json::to_string(&parsed).unwrap(),
            "\"mqtts://[::1]:18883\""
        );
    }
}
