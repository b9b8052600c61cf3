//! What the runtime tests share: the guests, and in-memory services.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use outpost_runtime::{
    ArtifactSource, BoxFuture, ChannelError, DeviceChannel, MemoryState, ReadError, Services,
};

pub(crate) fn esp32_app_wasm() -> &'static [u8] {
    static WASM: OnceLock<Vec<u8>> = OnceLock::new();
    WASM.get_or_init(|| {
        std::fs::read(outpost_test_guests::ESP32_APP)
            .unwrap_or_else(|err| panic!("{}: {err}", outpost_test_guests::ESP32_APP))
    })
}

pub(crate) fn hostile_wasm() -> &'static [u8] {
    static WASM: OnceLock<Vec<u8>> = OnceLock::new();
    WASM.get_or_init(|| {
        std::fs::read(outpost_test_guests::HOSTILE)
            .unwrap_or_else(|err| panic!("{}: {err}", outpost_test_guests::HOSTILE))
    })
}

/// A device transport whose devices never answer a request.
pub(crate) struct SilentDevices;

impl DeviceChannel for SilentDevices {
    fn request<'a>(
        &'a self,
        _device_id: &'a str,
        _command: &'a str,
        _payload: &'a [u8],
        _timeout: Duration,
    ) -> BoxFuture<'a, Result<Vec<u8>, ChannelError>> {
        Box::pin(std::future::pending())
    }

    fn download_url(&self, device_id: &str, file_id: &str) -> Result<String, ChannelError> {
        Ok(format!(
            "http://127.0.0.1:8080/firmware/{file_id}?device={device_id}"
        ))
    }
}

/// Firmware files held in memory.
pub(crate) struct Files(pub(crate) HashMap<String, Vec<u8>>);

impl ArtifactSource for Files {
    fn read(
        &self,
        file_id: &str,
        offset: u64,
        max_len: usize,
    ) -> BoxFuture<'_, Result<Vec<u8>, ReadError>> {
        let result = match self.0.get(file_id) {
            None => Err(ReadError::Unavailable(format!("{file_id} is not cached"))),
            Some(bytes) => match usize::try_from(offset) {
                Ok(start) if start <= bytes.len() => {
                    Ok(bytes[start..bytes.len().min(start + max_len)].to_vec())
                }
                _ => Err(ReadError::OutOfRange),
            },
        };
        Box::pin(async move { result })
    }
}

pub(crate) fn services_with(files: HashMap<String, Vec<u8>>, state_quota: usize) -> Services {
    Services {
        artifacts: Arc::new(Files(files)),
        devices: Arc::new(SilentDevices),
        state: MemoryState::new(state_quota),
    }
}

pub(crate) fn services() -> Services {
    services_with(HashMap::new(), 4096)
}
