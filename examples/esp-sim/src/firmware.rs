//! Firmware files as the simulated devices' vendors build them, for tests and the demo:
//! ESP-IDF application images and Zigbee OTA upgrade files.

use std::path::PathBuf;

/// `esp-sim firmware …`: writes one firmware file.
#[derive(Debug, clap::Args)]
pub(crate) struct FirmwareArgs {
    /// `esp-app` (an ESP-IDF app image) or `zigbee-ota` (a Zigbee OTA upgrade file).
    #[arg(long, value_parser = ["esp-app", "zigbee-ota"])]
    kind: String,
    /// The version: `esp_app_desc_t.version`, or `major.minor.build` for Zigbee.
    #[arg(long)]
    version: String,
    /// ESP-IDF target of an app image (esp32, esp32c3, esp32h2, …).
    #[arg(long, default_value = "esp32c3")]
    chip: String,
    /// `esp_app_desc_t.project_name`.
    #[arg(long, default_value = "outpost-light")]
    project: String,
    /// Zigbee manufacturer code.
    #[arg(long, default_value = "0x131b", value_parser = parse_u16)]
    manufacturer_code: u16,
    /// Zigbee image type.
    #[arg(long, default_value = "0x0042", value_parser = parse_u16)]
    image_type: u16,
    /// File size in bytes.
    #[arg(long, default_value_t = 256 * 1024)]
    size: usize,
    /// Where to write it.
    #[arg(long)]
    out: PathBuf,
}

fn parse_u16(s: &str) -> Result<u16, String> {
    match s.strip_prefix("0x") {
        Some(hex) => u16::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("{s:?}: {e}"))
}

/// `esp_chip_id_t` of an ESP-IDF target.
fn chip_id(chip: &str) -> anyhow::Result<u16> {
    Ok(match chip {
        "esp32" => 0x0000,
        "esp32s2" => 0x0002,
        "esp32c3" => 0x0005,
        "esp32s3" => 0x0009,
        "esp32c2" => 0x000C,
        "esp32c6" => 0x000D,
        "esp32h2" => 0x0010,
        "esp32p4" => 0x0012,
        other => anyhow::bail!("unknown chip {other:?}"),
    })
}

/// An ESP-IDF app image: `esp_image_header_t`, one segment header, `esp_app_desc_t`
/// with version and project, then filler up to `len` bytes.
fn esp_app_image(
    chip_id: u16,
    version: &str,
    project: &str,
    len: usize,
) -> anyhow::Result<Vec<u8>> {
    anyhow::ensure!(len >= 24 + 8 + 256, "an app image needs at least 288 bytes");
    anyhow::ensure!(
        version.len() < 32 && project.len() < 32,
        "version and project are at most 31 bytes"
    );
    let mut image = vec![0u8; len];
    image[0] = 0xE9; // ESP_IMAGE_HEADER_MAGIC
    image[1] = 1; // one segment
    image[12..14].copy_from_slice(&chip_id.to_le_bytes());
    image[28..32].copy_from_slice(&((len - 32) as u32).to_le_bytes());
    let desc = 32;
    image[desc..desc + 4].copy_from_slice(&0xABCD_5432u32.to_le_bytes());
    image[desc + 16..desc + 16 + version.len()].copy_from_slice(version.as_bytes());
    image[desc + 48..desc + 48 + project.len()].copy_from_slice(project.as_bytes());
    for (i, byte) in image.iter_mut().enumerate().skip(desc + 256) {
        *byte = (i * 7 % 251) as u8;
    }
    Ok(image)
}

/// A Zigbee OTA upgrade file (ZCL §11.4): the 56-byte header, then a body.
fn zigbee_ota_file(
    manufacturer: u16,
    image_type: u16,
    version: &str,
    len: usize,
) -> anyhow::Result<Vec<u8>> {
    anyhow::ensure!(len >= 56, "an OTA file needs at least its 56-byte header");
    let parts: Vec<u32> = version
        .split('.')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .map_err(|_| anyhow::anyhow!("version {version:?} is not major.minor.build"))?;
    let [major, minor, build] = parts[..] else {
        anyhow::bail!("version {version:?} is not major.minor.build");
    };
    anyhow::ensure!(
        major < 256 && minor < 256 && build < 65536,
        "version {version:?} out of range"
    );
    let file_version = (major << 24) | (minor << 16) | build;
    let mut file = vec![0u8; len];
    file[0..4].copy_from_slice(&0x0BEE_F11Eu32.to_le_bytes());
    file[4..6].copy_from_slice(&0x0100u16.to_le_bytes());
    file[6..8].copy_from_slice(&56u16.to_le_bytes());
    file[10..12].copy_from_slice(&manufacturer.to_le_bytes());
    file[12..14].copy_from_slice(&image_type.to_le_bytes());
    file[14..18].copy_from_slice(&file_version.to_le_bytes());
    file[18..20].copy_from_slice(&2u16.to_le_bytes()); // Zigbee PRO
    file[20..34].copy_from_slice(b"outpost sensor");
    file[52..56].copy_from_slice(&(len as u32).to_le_bytes());
    for (i, byte) in file.iter_mut().enumerate().skip(56) {
        *byte = (i * 13 % 241) as u8;
    }
    Ok(file)
}

/// Writes the file the arguments describe.
pub(crate) fn write(args: &FirmwareArgs) -> anyhow::Result<()> {
    let bytes = match args.kind.as_str() {
        "esp-app" => esp_app_image(
            chip_id(&args.chip)?,
            &args.version,
            &args.project,
            args.size,
        )?,
        _ => zigbee_ota_file(
            args.manufacturer_code,
            args.image_type,
            &args.version,
            args.size,
        )?,
    };
    std::fs::write(&args.out, bytes)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", args.out.display()))
}
