//! The guest SDK for Outpost update handlers.
//!
//! A handler is a Rust `cdylib` built for `wasm32-wasip2`. It implements [`Handler`] and
//! registers the type with [`register!`]; the SDK generates the component exports of the
//! `outpost:handler@0.1.0` world from `wit/outpost-handler-0.1.0`.
//!
//! ```ignore
//! use outpost_handler_sdk::{Device, Handler, HandlerInfo, Limits, Outcome, Update};
//!
//! struct Thermostat;
//!
//! impl Handler for Thermostat {
//!     fn describe() -> HandlerInfo {
//!         HandlerInfo {
//!             name: "thermostat".into(),
//!             version: "1.0.0".into(),
//!             device_types: vec!["contoso-thermostat".into()],
//!             requested_limits: Limits { memory_mib: 16, cpu_ms: 200 },
//!         }
//!     }
//!     fn is_installed(device: Device, update: Update) -> Outcome {
//!         if device.firmware_version.as_deref() == Some(update.version.as_str()) {
//!             Outcome::success(900, "installed")
//!         } else {
//!             Outcome::success(901, "not installed")
//!         }
//!     }
//! }
//!
//! outpost_handler_sdk::register!(Thermostat);
//! ```
//!
//! The imports — [`log`], [`artifacts`], [`device_channel`], [`state`], [`clock`] — are
//! the only ways out of the sandbox.

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit/outpost-handler-0.1.0",
        world: "update-handler",
        pub_export_macro: true,
        export_macro_name: "export_update_handler",
        default_bindings_module: "outpost_handler_sdk::bindings",
    });
}

pub use bindings::outpost::handler::types::{
    Artifact, Device, DeviceReport, HandlerInfo, Limits, Outcome, ReportVerdict, Update,
};
pub use bindings::outpost::handler::{artifacts, clock, device_channel, log, state};

/// The device protocol of the Outpost agent on ESP devices (esp_https_ota style): the
/// device downloads from the gateway's local URL itself and reports back.
///
/// Commands: `ota-begin` (JSON: url, size, sha256, version, plus handler extras),
/// `ota-apply` (the version), `ota-cancel`, `ota-rollback` (answered with the version
/// the device runs afterwards). Reports: `progress` (ASCII percent), `done`
/// (ASCII version now running), `failed` (ASCII reason).
pub mod ota {
    use super::{Artifact, DeviceReport, Outcome, ReportVerdict, device_channel, log};

    /// How long the device gets to answer a command, in milliseconds.
    pub const DEVICE_TIMEOUT_MS: u32 = 10_000;

    /// Hands the device a download URL for `file` (`ota-begin`): 501 while it downloads,
    /// or a failure with extended code `refused`. `extra` is appended to the JSON object
    /// (`,"imageType":66`), empty for none.
    pub fn begin(file: &Artifact, version: &str, extra: &str, refused: u32) -> Outcome {
        let url = match device_channel::download_url(&file.file_id) {
            Ok(url) => url,
            Err(err) => return Outcome::failure(refused, format!("no download URL: {err:?}")),
        };
        let begin = format!(
            r#"{{"url":"{url}","size":{},"sha256":"{}","version":"{version}"{extra}}}"#,
            file.size, file.file_id
        );
        match device_channel::request("ota-begin", begin.as_bytes(), DEVICE_TIMEOUT_MS) {
            Ok(_) => {
                log::write(
                    log::Level::Info,
                    "device is downloading",
                    &[("url".into(), url), ("version".into(), version.into())],
                );
                Outcome::success(501, format!("device is downloading {version}"))
            }
            Err(err) => Outcome::failure(refused, format!("ota-begin refused: {err:?}")),
        }
    }

    /// Has the device boot into what it downloaded (`ota-apply`): 700, or a failure with
    /// extended code `refused`.
    pub fn apply(version: &str, refused: u32) -> Outcome {
        match device_channel::request("ota-apply", version.as_bytes(), DEVICE_TIMEOUT_MS) {
            Ok(_) => Outcome::success(700, format!("device is rebooting into {version}")),
            Err(err) => Outcome::failure(refused, format!("ota-apply refused: {err:?}")),
        }
    }

    /// Has the device go back to the image it ran before the update (`ota-rollback`): 1100
    /// with the version it answers it runs, or a failure with extended code `refused`.
    /// The agent acts only while the new image runs unconfirmed (ESP-IDF: pending verify,
    /// then `esp_ota_mark_app_invalid_rollback_and_reboot`); a device that already runs
    /// the previous image (the bootloader took it back) does nothing and says which.
    pub fn rollback(refused: u32) -> Outcome {
        match device_channel::request("ota-rollback", &[], DEVICE_TIMEOUT_MS) {
            Ok(answer) => Outcome::success(
                1100,
                format!(
                    "device runs {} again",
                    String::from_utf8_lossy(&answer).trim()
                ),
            ),
            Err(err) => Outcome::failure(refused, format!("ota-rollback refused: {err:?}")),
        }
    }

    /// Stops a download (`ota-cancel`): 800 cancelled, 801 unable to cancel.
    pub fn cancel() -> Outcome {
        match device_channel::request("ota-cancel", &[], DEVICE_TIMEOUT_MS) {
            Ok(_) => Outcome::success(800, "download aborted"),
            Err(err) => Outcome::success(801, format!("unable to cancel: {err:?}")),
        }
    }

    /// Interprets a report. A `done` with another version than `expected` fails with
    /// `wrong_version`; `failed` fails with `device_failed` (both extended codes).
    pub fn verdict(
        report: &DeviceReport,
        expected: &str,
        wrong_version: u32,
        device_failed: u32,
    ) -> ReportVerdict {
        let text = String::from_utf8_lossy(&report.payload).trim().to_owned();
        match report.kind.as_str() {
            "progress" => ReportVerdict::InProgress(text.parse::<u8>().ok().filter(|p| *p <= 100)),
            "done" if text == expected => {
                ReportVerdict::Finished(Outcome::success(700, format!("device runs {text}")))
            }
            "done" => ReportVerdict::Finished(Outcome::failure(
                wrong_version,
                format!("device runs {text}, expected {expected}"),
            )),
            "failed" => ReportVerdict::Finished(Outcome::failure(
                device_failed,
                format!("device failed: {text}"),
            )),
            _ => ReportVerdict::Ignored,
        }
    }
}

/// Reads the first `len` bytes of `file_id` from the gateway's firmware cache (fewer
/// when the file is shorter), in reads the host allows.
pub fn read_head(file_id: &str, len: usize) -> Result<Vec<u8>, artifacts::ReadError> {
    let mut head = Vec::with_capacity(len);
    while head.len() < len {
        let want = (len - head.len()).min(64 * 1024) as u32;
        let chunk = artifacts::read(file_id, head.len() as u64, want)?;
        if chunk.is_empty() {
            break;
        }
        head.extend_from_slice(&chunk);
    }
    Ok(head)
}

/// ADU's extended result code layout: facility (4 bits) | component (8 bits) | value (20 bits).
pub const fn extended_code(facility: u8, component: u8, value: u32) -> u32 {
    ((facility as u32 & 0xF) << 28) | ((component as u32) << 20) | (value & 0xF_FFFF)
}

impl Outcome {
    /// A successful step with `code` from the step's range (e.g. 700 for apply).
    pub fn success(code: i32, details: impl Into<String>) -> Self {
        debug_assert!(code > 0, "success codes are greater than zero");
        Self {
            result_code: code,
            extended_code: 0,
            details: details.into(),
        }
    }

    /// A failed step (result code 0) with an extended code saying why.
    pub fn failure(extended_code: u32, details: impl Into<String>) -> Self {
        Self {
            result_code: 0,
            extended_code,
            details: details.into(),
        }
    }

    /// A step stopped by a cancel (result code -1).
    pub fn cancelled(details: impl Into<String>) -> Self {
        Self {
            result_code: -1,
            extended_code: 0,
            details: details.into(),
        }
    }
}

/// What a handler implements. Only [`describe`](Handler::describe) and
/// [`is_installed`](Handler::is_installed) are required; the other steps default to what
/// a handler that needs nothing for them would answer.
pub trait Handler {
    /// Names the handler, its device types and the limits it needs.
    fn describe() -> HandlerInfo;

    /// 900 installed, 901 not installed.
    fn is_installed(device: Device, update: Update) -> Outcome;

    /// 500 done. Default: nothing to prepare.
    fn download(_device: Device, _update: Update) -> Outcome {
        Outcome::success(500, "nothing to download")
    }

    /// 600 done. Default: nothing to install.
    fn install(_device: Device, _update: Update) -> Outcome {
        Outcome::success(600, "nothing to install")
    }

    /// 700 applied. Default: nothing to apply.
    fn apply(_device: Device, _update: Update) -> Outcome {
        Outcome::success(700, "nothing to apply")
    }

    /// 800 cancelled, 801 unable to cancel. Default: 801.
    fn cancel(_device: Device, _update: Update) -> Outcome {
        Outcome::success(801, "this handler cannot cancel")
    }

    /// 1100 restored. Default: a failure, as the handler cannot roll back.
    fn rollback(_device: Device, _update: Update) -> Outcome {
        Outcome::failure(0, "this handler cannot roll back")
    }

    /// Default: every report is ignored.
    fn interpret_report(_device: Device, _update: Update, _report: DeviceReport) -> ReportVerdict {
        ReportVerdict::Ignored
    }
}

/// One of the update's handler properties (the manifest step's, plus what the rollout
/// adds: `allowDowngrade: true` when it allows older images), or `None` when absent or
/// when the properties are not a JSON object.
pub fn handler_property(update: &Update, key: &str) -> Option<serde_json::Value> {
    match serde_json::from_str::<serde_json::Value>(&update.handler_properties) {
        Ok(serde_json::Value::Object(mut map)) => map.remove(key),
        _ => None,
    }
}

/// Writes a log line at `level` with no fields.
pub fn log_line(level: log::Level, message: &str) {
    log::write(level, message, &[]);
}

/// Exports a [`Handler`] implementation as the component's `handler` interface.
#[macro_export]
macro_rules! register {
    ($handler:ty) => {
        #[doc(hidden)]
        type __OutpostRegisteredHandler = $handler;

        #[doc(hidden)]
        mod __outpost_handler_export {
            use $crate::bindings::exports::outpost::handler::handler::Guest;
            use $crate::{Device, DeviceReport, Handler, HandlerInfo, Outcome, ReportVerdict, Update};

            struct Exported;

            impl Guest for Exported {
                fn describe() -> HandlerInfo {
                    <super::__OutpostRegisteredHandler as Handler>::describe()
                }
                fn is_installed(device: Device, update: Update) -> Outcome {
                    <super::__OutpostRegisteredHandler as Handler>::is_installed(device, update)
                }
                fn download(device: Device, update: Update) -> Outcome {
                    <super::__OutpostRegisteredHandler as Handler>::download(device, update)
                }
                fn install(device: Device, update: Update) -> Outcome {
                    <super::__OutpostRegisteredHandler as Handler>::install(device, update)
                }
                fn apply(device: Device, update: Update) -> Outcome {
                    <super::__OutpostRegisteredHandler as Handler>::apply(device, update)
                }
                fn cancel(device: Device, update: Update) -> Outcome {
                    <super::__OutpostRegisteredHandler as Handler>::cancel(device, update)
                }
                fn rollback(device: Device, update: Update) -> Outcome {
                    <super::__OutpostRegisteredHandler as Handler>::rollback(device, update)
                }
                fn interpret_report(device: Device, update: Update, report: DeviceReport) -> ReportVerdict {
                    <super::__OutpostRegisteredHandler as Handler>::interpret_report(device, update, report)
                }
            }

            $crate::bindings::export_update_handler!(Exported with_types_in $crate::bindings);
        }
    };
}
