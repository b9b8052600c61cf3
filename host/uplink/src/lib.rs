//! Outpost's cloud uplink.
//!
//! * [`contract`]: the MQTT contract with the fleet backend (topics, QoS, schemas);
//!   `docs/cloud-contract.md` is its prose.
//! * [`outbox`]: the durable store-and-forward queue every message for the cloud goes
//!   through (SQLite, group commit, priorities, TTL, bounds).
//! * [`Uplink`]: the MQTT session (our event loop on rumqttc's codec) that drains the outbox with QoS 1, deletes only what
//!   the broker acknowledged, reconnects with backoff and jitter, stops on refused
//!   credentials, and registers DPS-style with reprovisioning policies.
//! * [`inbox`]: deployments from the cloud, handed durably to the rollout engine.
//! * [`sas`]: SAS-style HMAC-SHA256 registration tokens.
//!
//! The `azure-iot` profile ([`Endpoint::Azure`]) runs the same outbox, retries and inbox
//! over Azure IoT Hub's MQTT dialect (`outpost-azure`): DPS instead of the registration
//! service, telemetry as device-to-cloud messages, state in the gateway's twin, commands
//! as direct methods.

mod azure;
pub mod contract;
pub mod inbox;
pub mod metrics;
pub mod mqtt;
pub mod outbox;
mod own_identity;
mod registration;
pub mod sas;
mod session;
pub mod settings;
pub mod telemetry;

pub use inbox::{DeploymentInbox, InboundDeployment};
pub use outbox::{Message, Outbox, OutboxError, OutboxLimits, OutboxStats, Priority};
pub use own_identity::OwnIdentityStatus;
pub use registration::RegistrationError;
pub use session::{ClaimError, LinkState, Uplink, UplinkStatus};
pub use settings::{
    AzureIdentity, AzureSettings, BrokerAddr, Credentials, DeviceUpdateSettings, Endpoint,
    OwnIdentity, OwnKey, ProtocolChoice, RegistrationSettings, TlsSettings, UplinkSettings,
};

pub(crate) use outpost_store::now_millis;
