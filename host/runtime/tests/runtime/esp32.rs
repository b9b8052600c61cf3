//! The esp32-app example handler end to end: signed package → registry → calls against
//! synthetic ESP-IDF app images and a device that records what it is asked.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use outpost_runtime::package::{Manifest, Package, RequestedLimits, TrustedVendor, sha256_hex};
use outpost_runtime::{
    Artifact, BoxFuture, ChannelError, Device, DeviceChannel, DeviceReport, HandlerRegistry,
    InstalledHandler, MemoryState, Outcome, ReportVerdict, Runtime, RuntimeConfig, Services, Step,
    Update,
};

use crate::support::{Files, esp32_app_wasm};

const ESP32C3: u16 = 0x0005;
const ESP32S3: u16 = 0x0009;

/// An ESP-IDF app image: image header, one segment header, app descriptor, then `body`.
fn esp_image(chip_id: u16, version: &str, project: &str, body: usize) -> Vec<u8> {
    esp_image_secure(chip_id, version, project, body, 0)
}

/// The same with the anti-rollback counter `secure_version` set.
fn esp_image_secure(
    chip_id: u16,
    version: &str,
    project: &str,
    body: usize,
    secure_version: u32,
) -> Vec<u8> {
    let mut image = vec![0u8; 24 + 8 + 256];
    image[0] = 0xE9; // ESP_IMAGE_HEADER_MAGIC
    image[1] = 4; // segment count
    image[12..14].copy_from_slice(&chip_id.to_le_bytes());
    image[24..28].copy_from_slice(&0x3C00_0020u32.to_le_bytes()); // load address
    image[28..32].copy_from_slice(&256u32.to_le_bytes()); // segment length
    let desc = 32;
    image[desc..desc + 4].copy_from_slice(&0xABCD_5432u32.to_le_bytes());
    image[desc + 4..desc + 8].copy_from_slice(&secure_version.to_le_bytes());
    image[desc + 16..desc + 16 + version.len()].copy_from_slice(version.as_bytes());
    image[desc + 48..desc + 48 + project.len()].copy_from_slice(project.as_bytes());
    image.extend((0..body).map(|n| (n % 253) as u8));
    image
}

/// A device that accepts every command and remembers them.
#[derive(Default)]
struct RecordingDevice {
    commands: Mutex<Vec<(String, String, String)>>,
}

impl DeviceChannel for RecordingDevice {
    fn request<'a>(
        &'a self,
        device_id: &'a str,
        command: &'a str,
        payload: &'a [u8],
        _timeout: Duration,
    ) -> BoxFuture<'a, Result<Vec<u8>, ChannelError>> {
        self.commands.lock().unwrap().push((
            device_id.to_owned(),
            command.to_owned(),
            String::from_utf8_lossy(payload).into_owned(),
        ));
        Box::pin(async { Ok(b"ok".to_vec()) })
    }

    fn download_url(&self, device_id: &str, file_id: &str) -> Result<String, ChannelError> {
        Ok(format!(
            "http://192.0.2.1:8081/firmware/{file_id}?device={device_id}"
        ))
    }
}

struct Site {
    registry: HandlerRegistry,
    handler: Arc<InstalledHandler>,
    device: Arc<RecordingDevice>,
    _dir: tempfile::TempDir,
}

async fn site() -> Site {
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::from_bytes(&[3; 32]);
    let trusted = vec![TrustedVendor {
        name: "contoso".into(),
        key: key.verifying_key(),
        device_types: vec!["esp32-app".into()],
    }];
    let runtime = Arc::new(Runtime::new(RuntimeConfig::default()).unwrap());
    let (registry, _) = HandlerRegistry::open(dir.path(), runtime, trusted)
        .await
        .unwrap();
    let mut package = Package::build(
        Manifest {
            format: 1,
            name: "esp32-app".into(),
            version: "0.1.0".into(),
            vendor: "contoso".into(),
            device_types: vec!["esp32-app".into()],
            wit: "outpost:handler@0.1.0".into(),
            limits: RequestedLimits {
                memory_mib: 16,
                cpu_ms: 200,
            },
            component: "handler.wasm".into(),
            files: Default::default(),
        },
        esp32_app_wasm().to_vec(),
    )
    .unwrap();
    package.sign(&key);
    let (handler, _) = registry.install(&package.to_tar()).await.unwrap();
    Site {
        registry,
        handler,
        device: Arc::new(RecordingDevice::default()),
        _dir: dir,
    }
}

fn thermostat(firmware: &str) -> Device {
    Device {
        id: "esp-0a1b2c".into(),
        device_type: "esp32-app".into(),
        properties: vec![
            ("manufacturer".into(), "Contoso".into()),
            ("chip".into(), "esp32c3".into()),
            ("project".into(), "thermostat".into()),
        ],
        firmware_version: Some(firmware.into()),
    }
}

impl Site {
    fn update_with(&self, image: &[u8]) -> (Update, Services) {
        let file_id = sha256_hex(image);
        let update = Update {
            provider: "contoso".into(),
            name: "thermostat-fw".into(),
            version: "2.0.0".into(),
            files: vec![Artifact {
                file_id: file_id.clone(),
                name: "thermostat.bin".into(),
                size: image.len() as u64,
            }],
            handler_properties: "{}".into(),
        };
        let services = Services {
            artifacts: Arc::new(Files(HashMap::from([(file_id, image.to_vec())]))),
            devices: Arc::clone(&self.device) as Arc<dyn DeviceChannel>,
            state: MemoryState::new(4096),
        };
        (update, services)
    }

    async fn step(&self, step: Step, device: &Device, image: &[u8]) -> Outcome {
        let (update, services) = self.update_with(image);
        self.registry
            .runtime()
            .step(&self.handler.handler, &services, step, device, &update)
            .await
            .unwrap_or_else(|err| panic!("{err}"))
    }

    async fn report(&self, kind: &str, payload: &str) -> ReportVerdict {
        let image = esp_image(ESP32C3, "2.0.0", "thermostat", 0);
        let (update, services) = self.update_with(&image);
        let report = DeviceReport {
            kind: kind.into(),
            payload: payload.as_bytes().to_vec(),
        };
        self.registry
            .runtime()
            .interpret_report(
                &self.handler.handler,
                &services,
                &thermostat("1.0.0"),
                &update,
                &report,
            )
            .await
            .unwrap()
    }
}

/// ADU's layout: facility 1 (handler) | component 0x32 (esp32-app) | value.
fn esp32_code(value: u32) -> u32 {
    (1 << 28) | (0x32 << 20) | value
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compatible_image_goes_through_every_step() {
    let site = site().await;
    let image = esp_image(ESP32C3, "2.0.0", "thermostat", 300_000);
    let device = thermostat("1.0.0");

    let outcome = site.step(Step::IsInstalled, &device, &image).await;
    assert_eq!(outcome.result_code, 901, "{}", outcome.details);
    assert_eq!(
        outcome.details,
        "thermostat 2.0.0 is not installed (device runs 1.0.0)"
    );

    let outcome = site.step(Step::Download, &device, &image).await;
    assert_eq!(outcome.result_code, 501, "{}", outcome.details);
    assert_eq!(
        site.step(Step::Install, &device, &image).await.result_code,
        600
    );
    assert_eq!(
        site.step(Step::Apply, &device, &image).await.result_code,
        700
    );
    assert_eq!(
        site.step(Step::Cancel, &device, &image).await.result_code,
        800
    );
    let rollback = site.step(Step::Rollback, &device, &image).await;
    assert_eq!(
        (rollback.result_code, rollback.details.as_str()),
        (1100, "device runs ok again")
    );

    let commands = site.device.commands.lock().unwrap().clone();
    let names: Vec<_> = commands.iter().map(|(_, c, _)| c.as_str()).collect();
    assert_eq!(
        names,
        ["ota-begin", "ota-apply", "ota-cancel", "ota-rollback"]
    );
    let sha = sha256_hex(&image);
    assert_eq!(
        commands[0].2,
        format!(
            r#"{{"url":"http://192.0.2.1:8081/firmware/{sha}?device=esp-0a1b2c","size":{},"sha256":"{sha}","version":"2.0.0"}}"#,
            image.len()
        )
    );
    assert!(commands.iter().all(|(d, _, _)| d == "esp-0a1b2c"));
}

/// ESP-IDF's anti-rollback: an image whose secure_version is below the device's counter
/// is refused before the device sees it, unless the rollout allows a downgrade.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_below_the_devices_secure_version_needs_an_allowed_downgrade() {
    let site = site().await;
    let mut device = thermostat("1.0.0");
    device
        .properties
        .push(("secure_version".into(), "3".into()));
    let older = esp_image_secure(ESP32C3, "2.0.0", "thermostat", 1000, 2);
    for step in [Step::IsInstalled, Step::Download] {
        let outcome = site.step(step, &device, &older).await;
        assert_eq!(outcome.result_code, 0, "{step:?}: {}", outcome.details);
        assert_eq!(outcome.extended_code, esp32_code(10));
        assert_eq!(
            outcome.details,
            "anti-rollback: the image's secure_version 2 is below the device's 3 (a downgrade \
             needs allowDowngrade in the rollout)"
        );
    }
    assert!(site.device.commands.lock().unwrap().is_empty());
    // A counter that is no number is refused too, not taken for none.
    let mut garbled = thermostat("1.0.0");
    garbled
        .properties
        .push(("secure_version".into(), "three".into()));
    let outcome = site.step(Step::Download, &garbled, &older).await;
    assert_eq!(
        (outcome.result_code, outcome.details.as_str()),
        (
            0,
            "anti-rollback: the device's secure_version \"three\" is not a number"
        )
    );
    // The same or a newer counter goes through; so does an older one the rollout allows.
    let same = esp_image_secure(ESP32C3, "2.0.0", "thermostat", 1000, 3);
    assert_eq!(
        site.step(Step::Download, &device, &same).await.result_code,
        501
    );
    let (mut update, services) = site.update_with(&older);
    update.handler_properties = r#"{"allowDowngrade":true}"#.into();
    let outcome = site
        .registry
        .runtime()
        .step(
            &site.handler.handler,
            &services,
            Step::Download,
            &device,
            &update,
        )
        .await
        .unwrap();
    assert_eq!(outcome.result_code, 501, "{}", outcome.details);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_for_another_chip_is_refused_before_the_device_sees_it() {
    let site = site().await;
    let image = esp_image(ESP32S3, "2.0.0", "thermostat", 1000);
    for step in [Step::IsInstalled, Step::Download] {
        let outcome = site.step(step, &thermostat("1.0.0"), &image).await;
        assert_eq!(outcome.result_code, 0, "{step:?}: {}", outcome.details);
        assert_eq!(outcome.extended_code, esp32_code(4));
        assert_eq!(
            outcome.details,
            "the image is for esp32s3, the device is esp32c3"
        );
    }
    assert!(
        site.device.commands.lock().unwrap().is_empty(),
        "the device was contacted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_running_version_is_already_installed() {
    let site = site().await;
    let image = esp_image(ESP32C3, "2.0.0", "thermostat", 1000);
    let outcome = site
        .step(Step::IsInstalled, &thermostat("2.0.0"), &image)
        .await;
    assert_eq!(
        (outcome.result_code, outcome.details.as_str()),
        (900, "thermostat 2.0.0 is installed")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_projects_and_non_images_are_refused_with_their_reason() {
    let site = site().await;
    let other_project = esp_image(ESP32C3, "2.0.0", "doorbell", 1000);
    let outcome = site
        .step(Step::IsInstalled, &thermostat("1.0.0"), &other_project)
        .await;
    assert_eq!(
        (outcome.result_code, outcome.extended_code),
        (0, esp32_code(5))
    );
    assert!(outcome.details.contains("doorbell"), "{}", outcome.details);

    let not_an_image = b"PK\x03\x04 a zip file, not firmware".repeat(20);
    let outcome = site
        .step(Step::IsInstalled, &thermostat("1.0.0"), &not_an_image)
        .await;
    assert_eq!(
        (outcome.result_code, outcome.extended_code),
        (0, esp32_code(3))
    );
    assert!(
        outcome.details.contains("not an ESP app image"),
        "{}",
        outcome.details
    );

    let truncated = esp_image(ESP32C3, "2.0.0", "thermostat", 0)[..100].to_vec();
    let outcome = site
        .step(Step::IsInstalled, &thermostat("1.0.0"), &truncated)
        .await;
    assert!(
        outcome.details.contains("only 100 bytes"),
        "{}",
        outcome.details
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_reports_are_interpreted() {
    let site = site().await;
    assert!(matches!(
        site.report("progress", "42").await,
        ReportVerdict::InProgress(Some(42))
    ));
    assert!(matches!(
        site.report("progress", "lots").await,
        ReportVerdict::InProgress(None)
    ));
    match site.report("done", "2.0.0").await {
        ReportVerdict::Finished(outcome) => assert_eq!(outcome.result_code, 700),
        other => panic!("{other:?}"),
    }
    match site.report("done", "1.0.0").await {
        ReportVerdict::Finished(outcome) => {
            assert_eq!(
                (outcome.result_code, outcome.extended_code),
                (0, esp32_code(8))
            );
        }
        other => panic!("{other:?}"),
    }
    match site.report("failed", "flash write error").await {
        ReportVerdict::Finished(outcome) => {
            assert_eq!(outcome.details, "device failed: flash write error");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        site.report("telemetry", "21.5C").await,
        ReportVerdict::Ignored
    ));
}
