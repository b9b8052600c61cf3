//! A device as a BlueZ peripheral: the provisioning GATT service (one characteristic per
//! endpoint, named by a 0x2901 user description) and an advertisement.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bluer::Uuid;
use bluer::adv::{Advertisement, AdvertisementHandle};
use bluer::gatt::local::{
    Application, ApplicationHandle, Characteristic, CharacteristicRead, CharacteristicWrite,
    CharacteristicWriteMethod, Descriptor, DescriptorRead, ReqError, Service,
};
use futures_util::FutureExt;
use outpost_protocomm::{
    BLE_MAX_PAYLOAD, CLAIM_ENDPOINT, DEFAULT_SERVICE_UUID, STANDARD_ENDPOINT_IDS, endpoint_uuid,
};

use crate::device::SimDevice;

const USER_DESCRIPTION: Uuid = Uuid::from_u128(0x0000_2901_0000_1000_8000_0080_5f9b_34fb);

/// Keeps a device's GATT application and advertisement registered while alive.
pub(crate) struct Peripheral {
    _app: ApplicationHandle,
    _adv: AdvertisementHandle,
}

/// Registers `device` on `adapter`.
pub(crate) async fn serve(
    adapter: &bluer::Adapter,
    device: Arc<SimDevice>,
) -> anyhow::Result<Peripheral> {
    adapter.set_powered(true).await?;
    let service_uuid = Uuid::parse_str(DEFAULT_SERVICE_UUID)?;
    let mut endpoints: Vec<(&str, Uuid)> = STANDARD_ENDPOINT_IDS
        .iter()
        .map(|(name, id)| {
            (
                *name,
                Uuid::parse_str(&endpoint_uuid(DEFAULT_SERVICE_UUID, *id)).expect("valid uuid"),
            )
        })
        .collect();
    if device.identity.claim {
        // custom endpoints get the next ids in creation order (0xFF54, …)
        endpoints.push((
            CLAIM_ENDPOINT,
            Uuid::parse_str(&endpoint_uuid(DEFAULT_SERVICE_UUID, 0xFF54))?,
        ));
    }
    // The value each endpoint answered last (read after write); cleared per session.
    let values: Arc<Mutex<HashMap<&'static str, Vec<u8>>>> = Arc::default();
    let characteristics = endpoints
        .into_iter()
        .map(|(name, uuid)| {
            let name: &'static str = name;
            let read_values = values.clone();
            let write_values = values.clone();
            let write_device = device.clone();
            Characteristic {
                uuid,
                read: Some(CharacteristicRead {
                    read: true,
                    fun: Box::new(move |req| {
                        let value = read_values
                            .lock()
                            .expect("values lock")
                            .get(name)
                            .cloned()
                            .unwrap_or_default();
                        let offset = usize::from(req.offset).min(value.len());
                        async move { Ok(value[offset..].to_vec()) }.boxed()
                    }),
                    ..Default::default()
                }),
                write: Some(CharacteristicWrite {
                    write: true,
                    method: CharacteristicWriteMethod::Fun(Box::new(move |data, req| {
                        let device = write_device.clone();
                        let values = write_values.clone();
                        async move {
                            if req.offset != 0 {
                                return Err(ReqError::InvalidOffset);
                            }
                            // Sec2 handshakes are whole modpows: keep them off the reactor.
                            let answer = tokio::task::spawn_blocking(move || {
                                device.handle(name, &data, BLE_MAX_PAYLOAD)
                            })
                            .await
                            .map_err(|_| ReqError::Failed)?;
                            match answer {
                                Ok(answer) => {
                                    values.lock().expect("values lock").insert(name, answer);
                                    Ok(())
                                }
                                Err(_) => {
                                    values.lock().expect("values lock").clear();
                                    Err(ReqError::Failed)
                                }
                            }
                        }
                        .boxed()
                    })),
                    ..Default::default()
                }),
                descriptors: vec![Descriptor {
                    uuid: USER_DESCRIPTION,
                    read: Some(DescriptorRead {
                        read: true,
                        fun: Box::new(move |_| async move { Ok(name.as_bytes().to_vec()) }.boxed()),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }
        })
        .collect();
    let app = adapter
        .serve_gatt_application(Application {
            services: vec![Service {
                uuid: service_uuid,
                primary: true,
                characteristics,
                ..Default::default()
            }],
            ..Default::default()
        })
        .await?;
    let adv = adapter
        .advertise(Advertisement {
            advertisement_type: bluer::adv::Type::Peripheral,
            service_uuids: [service_uuid].into_iter().collect(),
            local_name: Some(device.identity.name.clone()),
            discoverable: Some(true),
            ..Default::default()
        })
        .await?;
    Ok(Peripheral {
        _app: app,
        _adv: adv,
    })
}
