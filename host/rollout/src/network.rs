//! Network rollouts: a Wi-Fi credential rotation carried out device by device, in the
//! waves and under the thresholds of any rollout (`outpost wifi rotate`).
//!
//! Each device's agent gets `wifi-rotate` with `{ssid, passphrase, fallbackSecs}`. It
//! answers at once, then joins the new network, keeps the old one as its fallback for
//! `fallbackSecs`, and reports `done` (the SSID it is on) once it reached the gateway
//! over the new network, or `failed` (why, and that it is back on the old one) when it
//! could not join or reach the gateway in time and fell back by itself.

use std::time::Duration;

use outpost_runtime::{DeviceChannel as _, Outcome};
use serde::{Deserialize, Serialize};

use super::job::{Job, Phase, Stop, gateway_code, outcome};
use super::{DeviceStatus, Report};

/// The device command.
pub(crate) const COMMAND: &str = "wifi-rotate";

/// How long the device gets to accept the command.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Added to the fallback time for the device's report to arrive: it may first have to
/// join the old network again (the C agent tries three times, 30 s each at most).
const REPORT_MARGIN: Duration = Duration::from_secs(120);

/// Extended codes (facility 2, gateway component).
const WIFI_REFUSED: u32 = 6;
const WIFI_FAILED: u32 = 7;
const WIFI_TIMEOUT: u32 = 8;

/// The fallback time when none is given.
const fn default_fallback_secs() -> u64 {
    120
}

/// A Wi-Fi credential rotation: the network every targeted device moves to.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WifiRotation {
    /// The new network's SSID (1-32 bytes).
    pub ssid: String,
    /// Its WPA2/WPA3 passphrase: 8-63 printable ASCII characters, or 64 hex digits (a
    /// raw PSK). Kept in the state database until the rollout finishes or is cancelled.
    pub passphrase: String,
    /// How long a device keeps its old network as the fallback while it tries the new
    /// one (30-3600 s).
    #[serde(default = "default_fallback_secs")]
    pub fallback_secs: u64,
}

impl std::fmt::Debug for WifiRotation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WifiRotation")
            .field("ssid", &self.ssid)
            .field("passphrase", &"<redacted>")
            .field("fallback_secs", &self.fallback_secs)
            .finish()
    }
}

impl WifiRotation {
    /// Checks what a device could not use, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.ssid.is_empty() || self.ssid.len() > 32 {
            return Err(format!(
                "ssid must be 1-32 bytes, not {} bytes",
                self.ssid.len()
            ));
        }
        if self.ssid.chars().any(char::is_control) {
            return Err("ssid must not contain control characters".into());
        }
        let p = &self.passphrase;
        let raw_psk = p.len() == 64 && p.bytes().all(|b| b.is_ascii_hexdigit());
        let ascii = (8..=63).contains(&p.len()) && p.bytes().all(|b| (0x20..0x7f).contains(&b));
        if !raw_psk && !ascii {
            return Err(
                "passphrase must be 8-63 printable ASCII characters or 64 hex digits (WPA2/WPA3)"
                    .into(),
            );
        }
        if !(30..=3600).contains(&self.fallback_secs) {
            return Err(format!(
                "fallbackSecs must be 30-3600, not {}",
                self.fallback_secs
            ));
        }
        Ok(())
    }

    /// What the device is sent.
    fn payload(&self) -> Vec<u8> {
        serde_json::json!({
            "ssid": self.ssid,
            "passphrase": self.passphrase,
            "fallbackSecs": self.fallback_secs,
        })
        .to_string()
        .into_bytes()
    }

    /// The rollout's update id, as lists show it.
    pub(crate) fn update_id(&self) -> String {
        format!("wifi/{}", self.ssid)
    }
}

impl Job {
    /// One device's rotation: send, then wait for its report. Ok is success.
    pub(crate) async fn rotate(
        &mut self,
        rotation: &WifiRotation,
        phases: &mut Vec<Phase>,
    ) -> Result<Outcome, Stop> {
        // A device cancelled since the engine looked gets nothing: no passphrase goes out.
        if !self.mark_running("send", true).await {
            return Err(cancelled("cancelled before the network was sent"));
        }
        let mailbox = self.rollouts.inner.mailbox.clone();
        let payload = rotation.payload();
        let accepted = tokio::select! {
            answer = mailbox.request(&self.device, COMMAND, &payload, ACCEPT_TIMEOUT) => answer,
            () = self.cancel.cancelled() => return Err(cancelled("cancelled before the device accepted the network")),
        };
        let sent = match accepted {
            Ok(_) => outcome(1, 0, format!("the device is joining {}", rotation.ssid)),
            Err(err) => outcome(
                0,
                gateway_code(WIFI_REFUSED),
                format!("{COMMAND} refused: {err:?}"),
            ),
        };
        phases.push(Phase::of("send", &sent));
        if sent.result_code <= 0 {
            return Err(Stop(DeviceStatus::Failed, sent));
        }
        self.set_step("join", None).await;
        let window = Duration::from_secs(rotation.fallback_secs) + REPORT_MARGIN;
        let deadline = tokio::time::Instant::now() + window;
        loop {
            let report: Option<Report> = tokio::select! {
                report = self.reports.recv() => report,
                () = tokio::time::sleep_until(deadline) => None,
                () = self.cancel.cancelled() => return Err(cancelled(&format!(
                    "cancelled while the device was joining {}: it goes on by itself, and may be \
                     on it or back on the old network",
                    rotation.ssid
                ))),
            };
            let Some(report) = report else {
                let timeout = outcome(
                    0,
                    gateway_code(WIFI_TIMEOUT),
                    format!(
                        "the device did not report within {} s (its fallback time and {} s)",
                        window.as_secs(),
                        REPORT_MARGIN.as_secs()
                    ),
                );
                phases.push(Phase::of("join", &timeout));
                return Err(Stop(DeviceStatus::Failed, timeout));
            };
            let text = String::from_utf8_lossy(&report.payload).trim().to_owned();
            let joined = match report.kind.as_str() {
                "done" if text == rotation.ssid => outcome(700, 0, format!("device is on {text}")),
                "done" => outcome(
                    0,
                    gateway_code(WIFI_FAILED),
                    format!("device is on {text}, expected {}", rotation.ssid),
                ),
                "failed" => outcome(
                    0,
                    gateway_code(WIFI_FAILED),
                    format!("device failed: {text}"),
                ),
                _ => continue,
            };
            phases.push(Phase::of("join", &joined));
            return if joined.result_code > 0 {
                Ok(joined)
            } else {
                Err(Stop(DeviceStatus::Failed, joined))
            };
        }
    }
}

fn cancelled(details: &str) -> Stop {
    Stop(DeviceStatus::Cancelled, outcome(-1, 0, details))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rotation(ssid: &str, passphrase: &str, fallback_secs: u64) -> WifiRotation {
        WifiRotation {
            ssid: ssid.into(),
            passphrase: passphrase.into(),
            fallback_secs,
        }
    }

    #[test]
    fn what_a_device_could_not_use_is_refused_with_the_field() {
        assert!(rotation("site", "correct horse", 120).validate().is_ok());
        assert!(rotation("site", &"ab".repeat(32), 120).validate().is_ok());
        for (bad, needle) in [
            (
                rotation("", "correct horse", 120),
                "ssid must be 1-32 bytes",
            ),
            (rotation(&"s".repeat(33), "correct horse", 120), "ssid"),
            (rotation("a\nb", "correct horse", 120), "control characters"),
            (rotation("site", "short", 120), "passphrase must be"),
            (rotation("site", &"x".repeat(64), 120), "passphrase must be"),
            (rotation("site", "tab\there12", 120), "passphrase must be"),
            (
                rotation("site", "correct horse", 5),
                "fallbackSecs must be 30-3600",
            ),
        ] {
            let err = bad.validate().unwrap_err();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn the_passphrase_never_shows_in_debug_output() {
        let text = format!("{:?}", rotation("site", "correct horse", 120));
        assert!(!text.contains("correct horse"), "{text}");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = serde_json::from_str::<WifiRotation>(
            r#"{"ssid":"s","passphrase":"correct horse","fallback":5}"#,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("unknown field `fallback`"),
            "{err}"
        );
    }
}
