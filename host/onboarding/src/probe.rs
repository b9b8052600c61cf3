//! Whether BLE onboarding can run on this machine: BlueZ is asked over D-Bus (the system
//! bus, or `DBUS_SYSTEM_BUS_ADDRESS`) for the configured adapter, as onboarding will.

use std::time::Duration;

use serde::Serialize;

/// How long the start-up probe waits for BlueZ.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// What onboarding can do, as reported by `/healthz`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum OnboardingStatus {
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

/// Asks BlueZ for `adapter` (or any) when BLE is `enabled`.
pub async fn probe(enabled: bool, adapter: Option<&str>) -> OnboardingStatus {
    if !enabled {
        return OnboardingStatus::Disabled;
    }
    let open = outpost_ble::central::Central::open(adapter, Default::default());
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
        assert_eq!(probe(false, Some("hci0")).await, OnboardingStatus::Disabled);
    }
}
