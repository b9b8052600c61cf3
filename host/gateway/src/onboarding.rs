//! Whether BLE onboarding can run on this machine.
//!
//! The check reads the kernel's Bluetooth class directory: a Linux host with a usable
//! controller lists it there as `hciN`. Onboarding itself talks to BlueZ over D-Bus.

use std::path::Path;

use serde::Serialize;

use crate::config::BleSection;

/// Where the kernel lists Bluetooth controllers.
pub(crate) const SYSFS_BLUETOOTH: &str = "/sys/class/bluetooth";

/// What onboarding can do, as reported by `/healthz`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub(crate) enum OnboardingStatus {
    /// `ble.enabled = false`.
    Disabled,
    /// Enabled, but the machine has no (or not the configured) adapter.
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

/// Looks for the adapter `ble` asks for under `sysfs` (normally [`SYSFS_BLUETOOTH`]).
pub(crate) fn probe(ble: &BleSection, sysfs: &Path) -> OnboardingStatus {
    if !ble.enabled {
        return OnboardingStatus::Disabled;
    }
    let mut adapters: Vec<String> = std::fs::read_dir(sysfs)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|entry| entry.file_name().into_string().ok())
                // hciN:M entries are connections, not controllers.
                .filter(|name| name.starts_with("hci") && !name.contains(':'))
                .collect()
        })
        .unwrap_or_default();
    adapters.sort();
    match &ble.adapter {
        Some(wanted) if adapters.contains(wanted) => OnboardingStatus::Ready {
            adapter: wanted.clone(),
        },
        Some(wanted) => OnboardingStatus::NoAdapter {
            reason: format!(
                "Bluetooth adapter {wanted} not found in {} (found: {})",
                sysfs.display(),
                if adapters.is_empty() {
                    "none".to_owned()
                } else {
                    adapters.join(", ")
                }
            ),
        },
        None => match adapters.into_iter().next() {
            Some(adapter) => OnboardingStatus::Ready { adapter },
            None => OnboardingStatus::NoAdapter {
                reason: format!("no Bluetooth adapter found in {}", sysfs.display()),
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ble(enabled: bool, adapter: Option<&str>) -> BleSection {
        BleSection {
            enabled,
            adapter: adapter.map(str::to_owned),
            ..BleSection::default()
        }
    }

    #[test]
    fn reports_disabled_missing_and_present_adapters() {
        let sysfs = tempfile::tempdir().unwrap();
        assert_eq!(
            probe(&ble(false, None), sysfs.path()),
            OnboardingStatus::Disabled
        );
        assert!(matches!(
            probe(&ble(true, None), sysfs.path()),
            OnboardingStatus::NoAdapter { .. }
        ));

        for name in ["hci1", "hci0", "hci0:64"] {
            std::fs::create_dir(sysfs.path().join(name)).unwrap();
        }
        assert_eq!(
            probe(&ble(true, None), sysfs.path()),
            OnboardingStatus::Ready {
                adapter: "hci0".into()
            }
        );
        assert_eq!(
            probe(&ble(true, Some("hci1")), sysfs.path()),
            OnboardingStatus::Ready {
                adapter: "hci1".into()
            }
        );
        match probe(&ble(true, Some("hci7")), sysfs.path()) {
            OnboardingStatus::NoAdapter { reason } => {
                assert!(
                    reason.contains("hci7") && reason.contains("hci0, hci1"),
                    "{reason}"
                );
            }
            other => panic!("expected NoAdapter, got {other:?}"),
        }
    }

    #[test]
    fn a_missing_sysfs_directory_means_no_adapter() {
        let status = probe(&ble(true, None), Path::new("/nonexistent/bluetooth"));
        assert!(matches!(status, OnboardingStatus::NoAdapter { .. }));
    }
}
