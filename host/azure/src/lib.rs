//! The Azure IoT dialect Outpost speaks as the `azure-iot` uplink profile, and that
//! `examples/hub-sim` answers in tests.
//!
//! * [`sas`]: shared access signatures byte for byte as DPS, IoT Hub and Microsoft's device
//!   SDKs form them, and the group-key derivation of DPS enrollment groups;
//! * [`props`]: the property bags IoT Hub and DPS carry at the end of MQTT topics
//!   (`?$rid=7&retry-after=3`, `$.ct=application%2Fjson&$.ce=utf-8`);
//! * [`topics`]: the topics of DPS and IoT Hub's MQTT surface, built and parsed;
//! * [`dps`] and [`twin`]: the JSON bodies of registration and of device twins;
//! * [`adu`]: Device Update's twin component (`deviceUpdate`): the deployment the service
//!   writes, the agent's reports and result codes;
//! * [`provision`]: registering with DPS over MQTT (symmetric keys, individual or group).

pub mod adu;
pub mod dps;
pub mod props;
pub mod provision;
pub mod sas;
pub mod topics;
pub mod twin;
