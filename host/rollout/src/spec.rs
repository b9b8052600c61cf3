//! Rollout settings: which devices, in which waves, with which thresholds, when.
//!
//! The same JSON arrives with a cloud deployment (`rollout` in `outpost.deployment/1`)
//! and is built by `outpost rollout create` for a local one. Unknown fields are refused,
//! so a typo never turns into a silent default.

use std::collections::BTreeMap;
use std::str::FromStr;

use jiff_cron::jiff;
use outpost_store::Device;
use serde::{Deserialize, Serialize};

/// How a rollout picks and paces its devices.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RolloutSpec {
    /// Which devices it targets.
    #[serde(default)]
    pub target: Target,
    /// Cumulative percentages of the targeted devices per wave, ascending and ending at
    /// 100 (`[10, 50, 100]`: 10 % first, then up to half, then the rest).
    #[serde(default = "default_waves")]
    pub waves: Vec<u8>,
    /// The share of a wave (percent) that must succeed before the next one starts;
    /// below it the rollout pauses for the operator.
    #[serde(default = "default_success")]
    pub success_threshold: u8,
    /// Failures that stop the whole rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_threshold: Option<ErrorThreshold>,
    /// `immediate`: every device of a wave at once; `batch`: at most `maxParallel` at a
    /// time, inside the maintenance window.
    #[serde(default)]
    pub priority: RolloutPriority,
    /// Devices updated at once in `batch` priority.
    #[serde(default = "default_parallel")]
    pub max_parallel: u32,
    /// Not before this time (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_at: Option<String>,
    /// Devices start only inside this window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<MaintenanceWindow>,
    /// A device that does not come back with the new version this long after apply
    /// counts as failed (RainMaker's rollback window).
    #[serde(default = "default_rollback")]
    pub rollback_window_secs: u64,
    /// How long a device may take to download before it counts as failed.
    #[serde(default = "default_download")]
    pub download_timeout_secs: u64,
    /// Let handlers install images older than a device's anti-rollback counter allows
    /// (ESP-IDF's `secure_version`): handed to them as `allowDowngrade: true` in the
    /// update's handler properties. Off unless asked for.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_downgrade: bool,
}

fn default_waves() -> Vec<u8> {
    vec![100]
}
const fn default_success() -> u8 {
    100
}
const fn default_parallel() -> u32 {
    8
}
const fn default_rollback() -> u64 {
    90
}
const fn default_download() -> u64 {
    600
}

impl Default for RolloutSpec {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every field has a default")
    }
}

/// Which devices: all conditions must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Target {
    /// Only devices of these types (default: every type the manifest has a handler for).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_types: Vec<String>,
    /// Only members of this device group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Only devices whose properties (manufacturer, model, site, customer, tag, …)
    /// have these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub properties: BTreeMap<String, String>,
    /// Only these devices.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
}

/// When failures stop the rollout: a count or a share of all targeted devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum ErrorThreshold {
    /// This many failed devices.
    Count(u32),
    /// This percentage of the targeted devices failed.
    Percent(u8),
}

impl ErrorThreshold {
    /// Whether `failed` of `total` crosses it.
    pub fn crossed(self, failed: u64, total: u64) -> bool {
        match self {
            Self::Count(n) => failed >= u64::from(n.max(1)),
            Self::Percent(p) => total > 0 && failed > 0 && failed * 100 >= u64::from(p) * total,
        }
    }
}

impl FromStr for ErrorThreshold {
    type Err = String;

    /// `5` (a count of failed devices) or `10%` (a share of the targeted ones).
    fn from_str(s: &str) -> Result<Self, String> {
        match s.strip_suffix('%') {
            Some(p) => p
                .parse()
                .map(Self::Percent)
                .map_err(|_| format!("{s:?}: expected a percentage such as 10%")),
            None => s
                .parse()
                .map(Self::Count)
                .map_err(|_| format!("{s:?}: expected a count (5) or a share (10%)")),
        }
    }
}

impl std::fmt::Display for ErrorThreshold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Count(n) => write!(f, "{n} failed devices"),
            Self::Percent(p) => write!(f, "{p}% failed devices"),
        }
    }
}

/// asvin's rollout priorities.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RolloutPriority {
    /// Paced and windowed.
    #[default]
    Batch,
    /// At once, ignoring the window.
    Immediate,
}

/// A recurring window: starts on `cron` (5 fields, minute first, in `timezone`) and
/// lasts `durationMinutes`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MaintenanceWindow {
    /// `minute hour day-of-month month day-of-week`, e.g. `0 2 * * *`.
    pub cron: String,
    /// How long each window lasts.
    pub duration_minutes: u32,
    /// An IANA time zone (`Europe/Berlin`); default UTC.
    #[serde(default = "utc")]
    pub timezone: String,
}

fn utc() -> String {
    "UTC".into()
}

impl MaintenanceWindow {
    fn schedule(&self) -> Result<jiff_cron::Schedule, String> {
        let fields = self.cron.split_whitespace().count();
        if fields != 5 {
            return Err(format!(
                "window.cron {:?} needs 5 fields (minute hour day month weekday), not {fields}",
                self.cron
            ));
        }
        jiff_cron::Schedule::from_str(&format!("0 {}", self.cron))
            .map_err(|err| format!("window.cron {:?}: {err}", self.cron))
    }

    fn zone(&self) -> Result<jiff::tz::TimeZone, String> {
        jiff::tz::TimeZone::get(&self.timezone)
            .map_err(|err| format!("window.timezone {:?}: {err}", self.timezone))
    }

    /// Whether `now` lies inside a window; `Err` for a window that cannot be read.
    pub fn is_open(&self, now: jiff::Timestamp) -> Result<bool, String> {
        let schedule = self.schedule()?;
        let zone = self.zone()?;
        let length = jiff::SignedDuration::from_mins(i64::from(self.duration_minutes));
        let since = now
            .checked_sub(length)
            .map_err(|err| format!("window: {err}"))?
            .to_zoned(zone);
        Ok(schedule
            .after(since)
            .next()
            .is_some_and(|start| start.timestamp() <= now))
    }
}

impl RolloutSpec {
    /// Checks what serde cannot; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.waves.is_empty() || self.waves.last() != Some(&100) {
            return Err(format!(
                "waves must be ascending cumulative percentages ending at 100, not {:?}",
                self.waves
            ));
        }
        if self.waves.windows(2).any(|w| w[0] >= w[1]) || self.waves[0] == 0 {
            return Err(format!(
                "waves must rise strictly from above 0 to 100, not {:?}",
                self.waves
            ));
        }
        if self.success_threshold > 100 {
            return Err(format!(
                "successThreshold is a percentage, not {}",
                self.success_threshold
            ));
        }
        if let Some(ErrorThreshold::Percent(p)) = self.error_threshold
            && !(1..=100).contains(&p)
        {
            return Err(format!("errorThreshold.percent must be 1-100, not {p}"));
        }
        if self.max_parallel == 0 {
            return Err("maxParallel must be at least 1".into());
        }
        if self.rollback_window_secs == 0 || self.download_timeout_secs == 0 {
            return Err("rollbackWindowSecs and downloadTimeoutSecs must be above 0".into());
        }
        if let Some(start) = &self.start_at {
            start
                .parse::<jiff::Timestamp>()
                .map_err(|err| format!("startAt {start:?} is not an RFC 3339 time: {err}"))?;
        }
        if let Some(window) = &self.window {
            window.schedule()?;
            window.zone()?;
            if window.duration_minutes == 0 {
                return Err("window.durationMinutes must be above 0".into());
            }
        }
        Ok(())
    }

    /// The start time as unix milliseconds, if one is set.
    pub fn start_millis(&self) -> Option<i64> {
        self.start_at
            .as_deref()
            .and_then(|s| s.parse::<jiff::Timestamp>().ok())
            .map(jiff::Timestamp::as_millisecond)
    }

    /// The wave (0-based) of the device at `index` among `total` targeted devices: wave
    /// k holds the devices up to ⌈waves[k] % of total⌉, so a first wave is never empty.
    pub fn wave_of(&self, index: usize, total: usize) -> u32 {
        self.waves
            .iter()
            .position(|pct| (index as u64) < (u64::from(*pct) * total as u64).div_ceil(100))
            .unwrap_or(self.waves.len() - 1) as u32
    }
}

impl Target {
    /// Whether `device` is targeted (apart from group membership, checked by the caller).
    pub fn matches(&self, device: &Device) -> bool {
        (self.device_types.is_empty() || self.device_types.contains(&device.device_type))
            && (self.devices.is_empty() || self.devices.contains(&device.id))
            && self.properties.iter().all(|(key, value)| {
                property(device, key).is_some_and(|actual| actual == value.as_str())
            })
    }
}

/// A device property by name: manufacturer, model, or one of its compat properties.
pub fn property<'a>(device: &'a Device, key: &str) -> Option<&'a str> {
    match key {
        "manufacturer" => device.manufacturer.as_deref(),
        "model" => device.model.as_deref(),
        _ => device.compat.get(key).map(String::as_str),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_one_wave_all_must_succeed_and_a_90_s_rollback_window() {
        let spec = RolloutSpec::default();
        assert_eq!(spec.waves, [100]);
        assert_eq!(spec.success_threshold, 100);
        assert_eq!(spec.rollback_window_secs, 90);
        assert_eq!(spec.priority, RolloutPriority::Batch);
        spec.validate().unwrap();
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused_with_the_field_named() {
        let typo = serde_json::from_str::<RolloutSpec>(r#"{"wave":[100]}"#).unwrap_err();
        assert!(typo.to_string().contains("unknown field `wave`"), "{typo}");
        for (json, needle) in [
            (r#"{"waves":[50]}"#, "ending at 100"),
            (r#"{"waves":[50,40,100]}"#, "rise strictly"),
            (
                r#"{"errorThreshold":{"percent":0}}"#,
                "errorThreshold.percent",
            ),
            (r#"{"maxParallel":0}"#, "maxParallel"),
            (r#"{"startAt":"tomorrow"}"#, "startAt"),
            (
                r#"{"window":{"cron":"0 2 * *","durationMinutes":60}}"#,
                "5 fields",
            ),
            (
                r#"{"window":{"cron":"0 2 * * *","durationMinutes":60,"timezone":"Mars/Base"}}"#,
                "window.timezone",
            ),
        ] {
            let spec: RolloutSpec = serde_json::from_str(json).unwrap();
            let err = spec.validate().unwrap_err();
            assert!(err.contains(needle), "{json}: {err}");
        }
    }

    #[test]
    fn waves_split_devices_by_cumulative_share() {
        let spec: RolloutSpec = serde_json::from_str(r#"{"waves":[10,50,100]}"#).unwrap();
        let waves: Vec<u32> = (0..20).map(|i| spec.wave_of(i, 20)).collect();
        assert_eq!(waves.iter().filter(|w| **w == 0).count(), 2);
        assert_eq!(waves.iter().filter(|w| **w == 1).count(), 8);
        assert_eq!(waves.iter().filter(|w| **w == 2).count(), 10);
        // A tiny fleet still gets a first wave of one.
        assert_eq!(spec.wave_of(0, 3), 0);
    }

    #[test]
    fn error_thresholds_by_count_and_share() {
        assert!(!ErrorThreshold::Count(3).crossed(2, 50));
        assert!(ErrorThreshold::Count(3).crossed(3, 50));
        assert!(!ErrorThreshold::Percent(10).crossed(4, 50));
        assert!(ErrorThreshold::Percent(10).crossed(5, 50));
        assert!(!ErrorThreshold::Percent(10).crossed(0, 0));
    }

    #[test]
    fn maintenance_windows_in_a_time_zone() {
        let window = MaintenanceWindow {
            cron: "0 2 * * *".into(),
            duration_minutes: 120,
            timezone: "Europe/Berlin".into(),
        };
        let at = |s: &str| s.parse::<jiff::Timestamp>().unwrap();
        // 02:00-04:00 in Berlin is 01:00-03:00 UTC in winter.
        assert!(window.is_open(at("2026-01-15T01:30:00Z")).unwrap());
        assert!(window.is_open(at("2026-01-15T02:59:00Z")).unwrap());
        assert!(!window.is_open(at("2026-01-15T03:01:00Z")).unwrap());
        assert!(!window.is_open(at("2026-01-15T00:30:00Z")).unwrap());
    }
}
