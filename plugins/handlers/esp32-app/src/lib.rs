//! An update handler for ESP-IDF application images, as a device vendor would write one.
//!
//! Before anything is sent to a device it reads the image's own header from the firmware
//! cache — the `esp_image_header_t` (magic 0xE9, chip id) and the `esp_app_desc_t` that
//! follows the first segment header (version, project name) — and checks them against
//! the device's properties `chip` and `project`, and its anti-rollback counter against the
//! device's `secure_version` (an older image needs `allowDowngrade` from the rollout). The
//! device then fetches the image itself
//! from the gateway's local URL (esp_https_ota, with Range resume) and reports progress.
//!
//! Device commands: `ota-begin` (payload: JSON with url, size, sha256, version),
//! `ota-apply`, `ota-cancel`, `ota-rollback` (boot the previous slot again, after a failed
//! apply). Device reports: `progress` (ASCII percent), `done` (ASCII
//! version now running), `failed` (ASCII reason).

mod image;

use outpost_handler_sdk::{
    Device, DeviceReport, Handler, HandlerInfo, Limits, Outcome, ReportVerdict, Update,
    extended_code, handler_property, ota, read_head,
};

use image::{AppImage, ImageError};

/// Facility 1 (update handler), component 0x32 (esp32-app) in ADU's extended code layout.
const fn code(value: u32) -> u32 {
    extended_code(1, 0x32, value)
}
const NO_FILE: u32 = 1;
const READ_FAILED: u32 = 2;
const NOT_AN_IMAGE: u32 = 3;
const WRONG_CHIP: u32 = 4;
const WRONG_PROJECT: u32 = 5;
const DEVICE_REFUSED: u32 = 6;
const DEVICE_FAILED: u32 = 7;
const WRONG_VERSION: u32 = 8;
const ROLLBACK_REFUSED: u32 = 9;
const ANTI_ROLLBACK: u32 = 10;

struct Esp32App;

impl Handler for Esp32App {
    fn describe() -> HandlerInfo {
        HandlerInfo {
            name: "esp32-app".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            device_types: vec!["esp32-app".into()],
            requested_limits: Limits {
                memory_mib: 16,
                cpu_ms: 200,
            },
        }
    }

    fn is_installed(device: Device, update: Update) -> Outcome {
        let image = match checked_image(&device, &update) {
            Ok(image) => image,
            Err(outcome) => return outcome,
        };
        if device.firmware_version.as_deref() == Some(image.version.as_str()) {
            Outcome::success(
                900,
                format!("{} {} is installed", image.project, image.version),
            )
        } else {
            Outcome::success(
                901,
                format!(
                    "{} {} is not installed (device runs {})",
                    image.project,
                    image.version,
                    device
                        .firmware_version
                        .as_deref()
                        .unwrap_or("an unknown version")
                ),
            )
        }
    }

    fn download(device: Device, update: Update) -> Outcome {
        match checked_image(&device, &update) {
            Ok(image) => ota::begin(&update.files[0], &image.version, "", code(DEVICE_REFUSED)),
            Err(outcome) => outcome,
        }
    }

    fn install(_device: Device, _update: Update) -> Outcome {
        // esp_https_ota writes the image to the passive slot while it downloads.
        Outcome::success(600, "written to the passive slot while downloading")
    }

    fn apply(_device: Device, update: Update) -> Outcome {
        ota::apply(&update.version, code(DEVICE_REFUSED))
    }

    fn cancel(_device: Device, _update: Update) -> Outcome {
        ota::cancel()
    }

    fn rollback(_device: Device, _update: Update) -> Outcome {
        // The previous image is still in the other OTA slot: the agent boots it.
        ota::rollback(code(ROLLBACK_REFUSED))
    }

    fn interpret_report(_device: Device, update: Update, report: DeviceReport) -> ReportVerdict {
        ota::verdict(
            &report,
            &update.version,
            code(WRONG_VERSION),
            code(DEVICE_FAILED),
        )
    }
}

/// Reads the image's headers and checks them against the device, or says why not.
fn checked_image(device: &Device, update: &Update) -> Result<AppImage, Outcome> {
    let Some(file) = update.files.first() else {
        return Err(Outcome::failure(code(NO_FILE), "the update has no files"));
    };
    let head = read_head(&file.file_id, image::HEAD_LEN).map_err(|err| {
        Outcome::failure(
            code(READ_FAILED),
            format!("cannot read {}: {err:?}", file.name),
        )
    })?;
    let image = AppImage::parse(&head).map_err(|err| {
        let value = match err {
            ImageError::WrongChip(_) => WRONG_CHIP,
            _ => NOT_AN_IMAGE,
        };
        Outcome::failure(code(value), format!("{}: {err}", file.name))
    })?;
    let property = |key: &str| {
        device
            .properties
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    if let Some(chip) = property("chip")
        && !chip.eq_ignore_ascii_case(image.chip)
    {
        return Err(Outcome::failure(
            code(WRONG_CHIP),
            format!("the image is for {}, the device is {chip}", image.chip),
        ));
    }
    if let Some(project) = property("project")
        && project != image.project
    {
        return Err(Outcome::failure(
            code(WRONG_PROJECT),
            format!(
                "the image is project {:?}, the device runs {project:?}",
                image.project
            ),
        ));
    }
    // ESP-IDF's anti-rollback: a device whose eFuse counter (`secure_version`, reported
    // at registration) is above the image's will not boot it. Refused here unless the
    // rollout explicitly allows a downgrade.
    let device_secure = match property("secure_version") {
        None => None,
        Some(text) => Some(text.trim().parse::<u32>().map_err(|_| {
            Outcome::failure(
                code(ANTI_ROLLBACK),
                format!("anti-rollback: the device's secure_version {text:?} is not a number"),
            )
        })?),
    };
    if let Some(device_secure) = device_secure
        && image.secure_version < device_secure
        && handler_property(update, "allowDowngrade") != Some(serde_json::Value::Bool(true))
    {
        return Err(Outcome::failure(
            code(ANTI_ROLLBACK),
            format!(
                "anti-rollback: the image's secure_version {} is below the device's {device_secure} \
                 (a downgrade needs allowDowngrade in the rollout)",
                image.secure_version
            ),
        ));
    }
    Ok(image)
}

outpost_handler_sdk::register!(Esp32App);
