//! Whether BLE onboarding can run on this machine: BlueZ is asked over D-Bus (the system
//! bus, or `DBUS_SYSTEM_BUS_ADDRESS`) for the configured adapter, as onboarding will.

use std::time::Duration;

use serde::Serialize;

use crate::config::BleSection;

/// How long the start-up probe waits for BlueZ.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// What onboarding can do, as reported by `/healthz`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub(crate) enum OnboardingStatus {
    /// `ble.enabled = false`.
    Disabled,
    /// Enabled, but BlueZ has no (or not the configured) adapter, or is not reachable.
    NoAdapter {
        /// What was looked for and not found.
        reason: String,
    },
    /// An adapter is there.
    Ready {
        /// Its name, e.g. `hci0`.
        adapter: String,
    },
}

/// Asks BlueZ for the adapter `ble` names (or any).
pub(crate) async fn probe(ble: &BleSection) -> OnboardingStatus {
    if !ble.enabled {
        return OnboardingStatus::Disabled;
    }
    let open = outpost_ble::central::Central::open(ble.adapter.as_deref(), Default::default());
    match tokio::time::timeout(PROBE_TIMEOUT, open).await {
        Ok(Ok(central)) => OnboardingStatus::Ready {
            adapter: central.name().to_owned(),
        },
        Ok(Err(err)) => OnboardingStatus::NoAdapter {
            reason: err.to_string(),
        },
        Err(_) => OnboardingStatus::NoAdapter {
            reason: format!("BlueZ did not answer within {PROBE_TIMEOUT:?}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_disabled_section_is_not_probed() {
        let ble = BleSection {
            enabled: false,
            ..BleSection::default()
        };
        assert_eq!(probe(&ble).await, OnboardingStatus::Disabled);
    }
}
