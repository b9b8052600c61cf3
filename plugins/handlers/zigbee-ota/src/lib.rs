//! An update handler for Zigbee end devices built on ESP32-H2/C6 (esp-zigbee-sdk), taking
//! standard Zigbee OTA upgrade files (ZCL OTA cluster, file format of ZCL §11.4).
//!
//! Before anything reaches a device it reads the OTA file header from the firmware cache
//! and checks: the upgrade file identifier `0x0BEEF11E`, the header version, that the
//! total image size matches the file the manifest names, the manufacturer code and image
//! type against the device's properties `manufacturer_code` and `image_type`, and that
//! the header's file version is the update's version. It remembers per device (handler
//! state) the last version it offered, for operators reading the log.
//!
//! File versions are shown as `major.minor.build` from the 32-bit field:
//! `(v >> 24).((v >> 16) & 0xff).(v & 0xffff)`.
//!
//! Device commands and reports are those of the esp32-app handler (`ota-begin` with
//! url, size, sha256 and version; `ota-apply`; `ota-cancel`; reports `progress`, `done`,
//! `failed`), as the Outpost agent on the device's co-processor speaks them.

use outpost_handler_sdk::{
    Device, DeviceReport, Handler, HandlerInfo, Limits, Outcome, ReportVerdict, Update,
    extended_code, log, ota, read_head, state,
};

/// Facility 1 (update handler), component 0x2B (zigbee-ota).
const fn code(value: u32) -> u32 {
    extended_code(1, 0x2B, value)
}
const NO_FILE: u32 = 1;
const READ_FAILED: u32 = 2;
const NOT_AN_OTA_FILE: u32 = 3;
const SIZE_MISMATCH: u32 = 4;
const WRONG_MANUFACTURER: u32 = 5;
const WRONG_IMAGE_TYPE: u32 = 6;
const VERSION_MISMATCH: u32 = 7;
const DEVICE_REFUSED: u32 = 8;
const DEVICE_FAILED: u32 = 9;
const WRONG_VERSION: u32 = 10;

const FILE_IDENTIFIER: u32 = 0x0BEE_F11E;
const HEADER_VERSION: u16 = 0x0100;
const HEADER_LEN: usize = 56;

/// What the handler reads from an OTA file header.
struct OtaHeader {
    manufacturer_code: u16,
    image_type: u16,
    file_version: u32,
    total_size: u32,
    description: String,
}

impl OtaHeader {
    fn parse(head: &[u8]) -> Result<Self, String> {
        if head.len() < HEADER_LEN {
            return Err(format!("not a Zigbee OTA file: only {} bytes", head.len()));
        }
        let u16_at = |at: usize| u16::from_le_bytes([head[at], head[at + 1]]);
        let u32_at =
            |at: usize| u32::from_le_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
        if u32_at(0) != FILE_IDENTIFIER {
            return Err(format!(
                "not a Zigbee OTA file: identifier {:#010x}, expected {FILE_IDENTIFIER:#010x}",
                u32_at(0)
            ));
        }
        if u16_at(4) != HEADER_VERSION {
            return Err(format!("unsupported OTA header version {:#06x}", u16_at(4)));
        }
        let header_len = usize::from(u16_at(6));
        if header_len < HEADER_LEN {
            return Err(format!("OTA header length {header_len} is too short"));
        }
        let text = &head[20..52];
        let end = text.iter().position(|b| *b == 0).unwrap_or(text.len());
        Ok(Self {
            manufacturer_code: u16_at(10),
            image_type: u16_at(12),
            file_version: u32_at(14),
            total_size: u32_at(52),
            description: String::from_utf8_lossy(&text[..end]).into_owned(),
        })
    }

    fn version(&self) -> String {
        let v = self.file_version;
        format!("{}.{}.{}", v >> 24, (v >> 16) & 0xff, v & 0xffff)
    }
}

/// A device property as a number (decimal or 0x-hex).
fn number_property(device: &Device, key: &str) -> Option<u32> {
    let text = device
        .properties
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.trim())?;
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

/// Reads and checks the header against the manifest and the device.
fn checked(device: &Device, update: &Update) -> Result<OtaHeader, Outcome> {
    let Some(file) = update.files.first() else {
        return Err(Outcome::failure(code(NO_FILE), "the update has no files"));
    };
    let head = read_head(&file.file_id, HEADER_LEN).map_err(|err| {
        Outcome::failure(
            code(READ_FAILED),
            format!("cannot read {}: {err:?}", file.name),
        )
    })?;
    let header = OtaHeader::parse(&head)
        .map_err(|why| Outcome::failure(code(NOT_AN_OTA_FILE), format!("{}: {why}", file.name)))?;
    if u64::from(header.total_size) != file.size {
        return Err(Outcome::failure(
            code(SIZE_MISMATCH),
            format!(
                "{}: the header says {} bytes, the file has {}",
                file.name, header.total_size, file.size
            ),
        ));
    }
    if let Some(expected) = number_property(device, "manufacturer_code")
        && expected != u32::from(header.manufacturer_code)
    {
        return Err(Outcome::failure(
            code(WRONG_MANUFACTURER),
            format!(
                "the image is for manufacturer {:#06x}, the device is {expected:#06x}",
                header.manufacturer_code
            ),
        ));
    }
    if let Some(expected) = number_property(device, "image_type")
        && expected != u32::from(header.image_type)
    {
        return Err(Outcome::failure(
            code(WRONG_IMAGE_TYPE),
            format!(
                "the image type is {:#06x}, the device takes {expected:#06x}",
                header.image_type
            ),
        ));
    }
    if header.version() != update.version {
        return Err(Outcome::failure(
            code(VERSION_MISMATCH),
            format!(
                "the file is version {} but the update says {}",
                header.version(),
                update.version
            ),
        ));
    }
    Ok(header)
}

struct ZigbeeOta;

impl Handler for ZigbeeOta {
    fn describe() -> HandlerInfo {
        HandlerInfo {
            name: "zigbee-ota".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            device_types: vec!["zigbee-sensor".into()],
            requested_limits: Limits {
                memory_mib: 8,
                cpu_ms: 100,
            },
        }
    }

    fn is_installed(device: Device, update: Update) -> Outcome {
        let header = match checked(&device, &update) {
            Ok(header) => header,
            Err(outcome) => return outcome,
        };
        if device.firmware_version.as_deref() == Some(header.version().as_str()) {
            Outcome::success(900, format!("{} is installed", header.version()))
        } else {
            Outcome::success(
                901,
                format!(
                    "{} ({}) is not installed (device runs {})",
                    header.version(),
                    header.description,
                    device
                        .firmware_version
                        .as_deref()
                        .unwrap_or("an unknown version")
                ),
            )
        }
    }

    fn download(device: Device, update: Update) -> Outcome {
        let header = match checked(&device, &update) {
            Ok(header) => header,
            Err(outcome) => return outcome,
        };
        let extra = format!(
            r#","imageType":{},"manufacturerCode":{}"#,
            header.image_type, header.manufacturer_code
        );
        let outcome = ota::begin(
            &update.files[0],
            &header.version(),
            &extra,
            code(DEVICE_REFUSED),
        );
        if outcome.result_code > 0 {
            // Remembered for the log of a later attempt; a full quota is no reason to fail.
            let key = format!("offered/{}", device.id);
            let previous = state::get(&key).map(|v| String::from_utf8_lossy(&v).into_owned());
            let _ = state::set(&key, header.version().as_bytes());
            log::write(
                log::Level::Info,
                "offered",
                &[
                    ("version".into(), header.version()),
                    (
                        "previously_offered".into(),
                        previous.unwrap_or_else(|| "-".into()),
                    ),
                ],
            );
        }
        outcome
    }

    fn install(_device: Device, _update: Update) -> Outcome {
        Outcome::success(600, "stored in the OTA partition while downloading")
    }

    fn apply(_device: Device, update: Update) -> Outcome {
        ota::apply(&update.version, code(DEVICE_REFUSED))
    }

    fn cancel(_device: Device, _update: Update) -> Outcome {
        ota::cancel()
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

outpost_handler_sdk::register!(ZigbeeOta);
