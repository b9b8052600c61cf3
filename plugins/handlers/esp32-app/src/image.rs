//! The head of an ESP-IDF application image: `esp_image_header_t` (24 bytes), the first
//! `esp_image_segment_header_t` (8 bytes), then `esp_app_desc_t` (256 bytes).

use std::fmt;

/// Bytes needed to read everything this handler checks.
pub(crate) const HEAD_LEN: usize = 24 + 8 + 256;

const IMAGE_MAGIC: u8 = 0xE9;
const APP_DESC_MAGIC: u32 = 0xABCD_5432;
const APP_DESC_OFFSET: usize = 24 + 8;

/// What the handler learns from an image.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct AppImage {
    /// The chip it was built for, as ESP-IDF names targets ("esp32c3").
    pub(crate) chip: &'static str,
    /// `esp_app_desc_t.version`.
    pub(crate) version: String,
    /// `esp_app_desc_t.project_name`.
    pub(crate) project: String,
    /// `esp_app_desc_t.secure_version`: the anti-rollback counter the image carries.
    pub(crate) secure_version: u32,
}

#[derive(Debug)]
pub(crate) enum ImageError {
    TooShort(usize),
    BadMagic(u8),
    WrongChip(u16),
    NoAppDescriptor(u32),
}

impl fmt::Display for ImageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooShort(len) => write!(f, "not an ESP app image: only {len} bytes"),
            Self::BadMagic(byte) => write!(
                f,
                "not an ESP app image: magic byte {byte:#04x}, expected 0xe9"
            ),
            Self::WrongChip(id) => write!(f, "unknown chip id {id:#06x}"),
            Self::NoAppDescriptor(magic) => {
                write!(
                    f,
                    "not an ESP app image: app descriptor magic {magic:#010x}, expected 0xabcd5432"
                )
            }
        }
    }
}

impl AppImage {
    pub(crate) fn parse(head: &[u8]) -> Result<Self, ImageError> {
        if head.len() < HEAD_LEN {
            return Err(ImageError::TooShort(head.len()));
        }
        if head[0] != IMAGE_MAGIC {
            return Err(ImageError::BadMagic(head[0]));
        }
        let chip_id = u16::from_le_bytes([head[12], head[13]]);
        let chip = chip_name(chip_id).ok_or(ImageError::WrongChip(chip_id))?;
        let desc = &head[APP_DESC_OFFSET..];
        let magic = u32::from_le_bytes([desc[0], desc[1], desc[2], desc[3]]);
        if magic != APP_DESC_MAGIC {
            return Err(ImageError::NoAppDescriptor(magic));
        }
        // magic(4) secure_version(4) reserv1(8) version[32] project_name[32] …
        Ok(Self {
            chip,
            version: c_string(&desc[16..48]),
            project: c_string(&desc[48..80]),
            secure_version: u32::from_le_bytes([desc[4], desc[5], desc[6], desc[7]]),
        })
    }
}

/// `esp_chip_id_t` → the ESP-IDF target name.
fn chip_name(id: u16) -> Option<&'static str> {
    Some(match id {
        0x0000 => "esp32",
        0x0002 => "esp32s2",
        0x0005 => "esp32c3",
        0x0009 => "esp32s3",
        0x000C => "esp32c2",
        0x000D => "esp32c6",
        0x0010 => "esp32h2",
        0x0012 => "esp32p4",
        _ => return None,
    })
}

fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}
