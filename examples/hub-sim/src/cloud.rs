//! What DPS and the hubs do: enrollments and registrations with reprovisioning policies,
//! the hubs' device registries and twins, telemetry, direct methods and cloud-to-device
//! messages. Everything observable is printed as a JSON event.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use outpost_azure::dps::{ErrorBody, OperationStatus, RegistrationRequest, RegistrationState};
use outpost_azure::props::Props;
use outpost_azure::sas;
use outpost_azure::topics::{self, DpsRequest, HubRequest};
use outpost_azure::twin::Section;
use rumqttc::{Connect, ConnectReturnCode, Publish};
use serde_json::{Value, json};

use crate::broker::{Broker, Delivery, ListenerId, Service};
use crate::emit;

/// The largest device-to-cloud message IoT Hub takes.
const MAX_MESSAGE: usize = 256 * 1024;

/// Whether DPS takes `id` as a registration id: lowercase letters, digits, `-._:`, at most
/// 128.
fn valid_registration_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._:".contains(&b))
}

/// The listener DPS answers on; hubs are 1..
pub(crate) const DPS: ListenerId = 0;

/// What DPS does with a device's data when it is assigned to another hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Policy {
    /// Re-provision and migrate data (DPS's default).
    Migrate,
    /// Re-provision and reset to the initial configuration.
    Reset,
    /// Never re-provision: the device stays at its first hub.
    Never,
}

impl std::str::FromStr for Policy {
    type Err = anyhow::Error;
    fn from_str(text: &str) -> anyhow::Result<Self> {
        match text {
            "migrate" => Ok(Self::Migrate),
            "reset" => Ok(Self::Reset),
            "never" => Ok(Self::Never),
            other => {
                anyhow::bail!("unknown reprovisioning policy {other:?} (migrate, reset, never)")
            }
        }
    }
}

/// The `key` of an enrollment or device that authenticates with an X.509 certificate
/// (never base64, so never a symmetric key).
pub(crate) const X509: &str = "<x509>";

/// An individual enrollment or an enrollment group.
#[derive(Debug, Clone)]
pub(crate) struct Enrollment {
    /// The registration id (individual) or the group's name.
    pub(crate) name: String,
    /// The symmetric key (a group's members derive theirs from it).
    pub(crate) key: String,
    /// Whether this is a group.
    pub(crate) group: bool,
    /// The hub (index into the hubs) it assigns to.
    pub(crate) hub: usize,
    /// The reprovisioning policy.
    pub(crate) policy: Policy,
}

struct Registration {
    hub: usize,
    created: String,
    etag: u64,
}

struct Operation {
    state: RegistrationState,
}

struct Device {
    key: String,
    enabled: bool,
    desired: Section,
    reported: Section,
    model_id: Option<String>,
}

impl Device {
    fn new(key: String, initial: &Value) -> Self {
        let mut desired = Section::new();
        if let Some(object) = initial.as_object() {
            desired.properties = object.clone();
        }
        Self {
            key,
            enabled: true,
            desired,
            reported: Section::new(),
            model_id: None,
        }
    }
}

struct PendingMethod {
    device: String,
    hub: usize,
    name: String,
}

#[derive(Default)]
struct State {
    enrollments: Vec<Enrollment>,
    registrations: HashMap<String, Registration>,
    operations: HashMap<String, Operation>,
    /// Per hub, the devices by id.
    devices: Vec<HashMap<String, Device>>,
    methods: HashMap<String, PendingMethod>,
    /// DPS requests still to answer 429.
    throttle: u32,
    /// Which enrollment authenticated each DPS connection.
    dps_clients: HashMap<String, String>,
    telemetry: u64,
}

/// What the command line sets up.
pub(crate) struct Setup {
    /// DPS's id scope.
    pub(crate) id_scope: String,
    /// The hubs' host names.
    pub(crate) hubs: Vec<String>,
    /// Individual enrollments and groups.
    pub(crate) enrollments: Vec<Enrollment>,
    /// Devices registered at the first hub directly: id and key.
    pub(crate) devices: Vec<(String, String)>,
    /// The desired properties of every device DPS creates.
    pub(crate) initial_twin: Value,
    /// DPS requests to answer 429 first.
    pub(crate) throttle: u32,
    /// The `retry-after` of a 202.
    pub(crate) retry_after: u32,
}

/// DPS and the hubs.
pub(crate) struct Cloud {
    id_scope: String,
    /// The hubs' host names (clients connect to `{name}:8883`).
    hubs: Vec<String>,
    initial_twin: Value,
    retry_after: u32,
    broker: Arc<Broker>,
    state: Mutex<State>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

fn timestamp() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

fn random_id() -> String {
    let mut bytes = [0u8; 12];
    getrandom::fill(&mut bytes).expect("the OS's random source");
    hex::encode(bytes)
}

/// The payload as an event shows it: JSON if it is, else text, else base64.
fn payload_json(payload: &[u8]) -> Value {
    use base64::Engine;
    if let Ok(json) = serde_json::from_slice::<Value>(payload) {
        return json;
    }
    match std::str::from_utf8(payload) {
        Ok(text) => Value::from(text),
        Err(_) => json!({ "base64": base64::engine::general_purpose::STANDARD.encode(payload) }),
    }
}

fn props_json(props: &Props) -> Value {
    Value::Object(
        props
            .0
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect(),
    )
}

impl Cloud {
    /// DPS and the hubs as `setup` says, delivering through `broker`.
    pub(crate) fn new(setup: Setup, broker: Arc<Broker>) -> Self {
        let mut registry: Vec<HashMap<String, Device>> =
            setup.hubs.iter().map(|_| HashMap::new()).collect();
        for (id, key) in setup.devices {
            registry[0].insert(id, Device::new(key, &Value::Null));
        }
        Self {
            id_scope: setup.id_scope,
            hubs: setup.hubs,
            initial_twin: setup.initial_twin,
            retry_after: setup.retry_after,
            broker,
            state: Mutex::new(State {
                enrollments: setup.enrollments,
                devices: registry,
                throttle: setup.throttle,
                ..State::default()
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("state lock")
    }

    /// What events call a listener: `dps` or the hub's host name.
    fn service_name(&self, listener: ListenerId) -> String {
        if listener == DPS {
            "dps".to_owned()
        } else {
            self.hubs[listener - 1].clone()
        }
    }

    /// Which hub listener a host name is.
    fn hub_index(&self, name: &str) -> Option<usize> {
        self.hubs
            .iter()
            .position(|hub| hub.eq_ignore_ascii_case(name))
    }

    fn send(&self, listener: ListenerId, client: &str, topic: String, body: &Value) -> Delivery {
        self.broker.deliver(
            listener,
            client,
            topic,
            Bytes::from(body.to_string()),
            false,
        )
    }

    // --- DPS ------------------------------------------------------------------------

    fn dps_connect(
        &self,
        connect: &Connect,
        certificate_cn: Option<&str>,
    ) -> Result<Option<u64>, (ConnectReturnCode, String)> {
        let bad = |why: String| (ConnectReturnCode::BadUserNamePassword, why);
        let login = connect
            .login
            .as_ref()
            .ok_or_else(|| bad("no username".into()))?;
        let prefix = format!("{}/registrations/{}/", self.id_scope, connect.client_id);
        let query = login.username.strip_prefix(&prefix).ok_or_else(|| {
            bad(format!(
                "the username is not `{prefix}api-version=…` for client id {:?}",
                connect.client_id
            ))
        })?;
        let query = Props::parse(query).map_err(|err| bad(err.to_string()))?;
        if query.get("api-version").is_none() {
            return Err(bad("the username names no api-version".into()));
        }
        let registration = &connect.client_id;
        let resource = sas::dps_resource(&self.id_scope, registration);
        let now = now();
        let mut state = self.state();
        if !valid_registration_id(registration) {
            return Err((
                ConnectReturnCode::BadClientId,
                format!("registration id {registration:?}: DPS takes 1-128 of a-z 0-9 - . _ :"),
            ));
        }
        // X.509: a certificate from --client-ca whose CN is the registration id, no token.
        if let Some(enrollment) = state
            .enrollments
            .iter()
            .find(|e| !e.group && &e.name == registration && e.key == X509)
        {
            if certificate_cn != Some(registration.as_str()) {
                return Err((
                    ConnectReturnCode::NotAuthorized,
                    format!(
                        "enrollment {registration:?} is X.509: a client certificate with CN \
                         {registration:?} is needed (got {certificate_cn:?})"
                    ),
                ));
            }
            if !login.password.is_empty() {
                return Err(bad(format!(
                    "enrollment {registration:?} is X.509: the CONNECT carries no token"
                )));
            }
            let name = enrollment.name.clone();
            state.dps_clients.insert(registration.clone(), name);
            return Ok(None);
        }
        let mut last = None;
        // An individual enrollment decides alone; groups only for ids without one.
        let individual = state
            .enrollments
            .iter()
            .any(|e| !e.group && &e.name == registration);
        for enrollment in &state.enrollments {
            let key = if enrollment.group && !individual {
                sas::derive_device_key(&enrollment.key, registration).ok()
            } else if !enrollment.group && &enrollment.name == registration {
                Some(enrollment.key.clone())
            } else {
                None
            };
            let Some(key) = key else { continue };
            match sas::verify(&login.password, &key, &resource, now) {
                Ok(token) => {
                    if token
                        .key_name
                        .as_deref()
                        .is_some_and(|name| name != "registration")
                    {
                        last = Some("`skn` must be `registration` when given".to_owned());
                        continue;
                    }
                    let name = enrollment.name.clone();
                    state.dps_clients.insert(registration.clone(), name);
                    return Ok(Some(token.expiry));
                }
                Err(err) => last = Some(err.to_string()),
            }
        }
        Err((
            ConnectReturnCode::NotAuthorized,
            last.unwrap_or_else(|| format!("no enrollment for {registration:?}")),
        ))
    }

    fn dps_publish(&self, client: &str, publish: &Publish) -> Result<(), String> {
        let request = DpsRequest::parse(&publish.topic).map_err(|err| err.to_string())?;
        let rid = match &request {
            DpsRequest::Register { rid } | DpsRequest::Status { rid, .. } => rid.clone(),
        };
        let reply = |status: u16, retry: Option<u32>, body: &Value| {
            self.send(DPS, client, topics::dps_response(status, &rid, retry), body);
        };
        let error = |status: u16, code: u32, message: String| {
            let body = ErrorBody {
                error_code: code,
                tracking_id: random_id(),
                message,
            };
            reply(
                status,
                None,
                &serde_json::to_value(body).unwrap_or_default(),
            );
        };
        {
            let mut state = self.state();
            if state.throttle > 0 {
                state.throttle -= 1;
                drop(state);
                emit(&json!({"event": "dps_throttled", "registration": client}));
                let body = json!({"errorCode": 429001, "trackingId": random_id(),
                    "message": "Operations are being throttled for this tenant."});
                reply(429, Some(1), &body);
                return Ok(());
            }
        }
        match request {
            DpsRequest::Register { .. } => {
                let body: RegistrationRequest = match serde_json::from_slice(&publish.payload) {
                    Ok(body) => body,
                    Err(err) => {
                        error(
                            400,
                            400004,
                            format!("the registration body is not valid: {err}"),
                        );
                        return Ok(());
                    }
                };
                if body.registration_id != client {
                    error(
                        400,
                        400004,
                        format!(
                            "the body's registrationId {:?} is not the connection's {client:?}",
                            body.registration_id
                        ),
                    );
                    return Ok(());
                }
                let state = self.assign(client);
                let operation_id = format!("4.{}.{}", random_id(), random_id());
                emit(&json!({
                    "event": "dps_registered",
                    "registration": client,
                    "hub": state.assigned_hub,
                    "device": state.device_id,
                    "substatus": state.substatus,
                    "payload": body.payload,
                }));
                {
                    // Only a registration's latest operation is kept.
                    let mut guard = self.state();
                    guard
                        .operations
                        .retain(|_, op| op.state.registration_id != client);
                    guard
                        .operations
                        .insert(operation_id.clone(), Operation { state });
                }
                let body = OperationStatus {
                    operation_id,
                    status: "assigning".into(),
                    registration_state: None,
                };
                reply(
                    202,
                    Some(self.retry_after),
                    &serde_json::to_value(body).unwrap_or_default(),
                );
            }
            DpsRequest::Status { operation_id, .. } => {
                let found = self
                    .state()
                    .operations
                    .get(&operation_id)
                    .filter(|op| op.state.registration_id == client)
                    .map(|op| op.state.clone());
                match found {
                    Some(state) => {
                        let body = OperationStatus {
                            operation_id,
                            status: state.status.clone(),
                            registration_state: Some(state),
                        };
                        reply(200, None, &serde_json::to_value(body).unwrap_or_default());
                    }
                    None => error(404, 404002, format!("no operation {operation_id:?}")),
                }
            }
        }
        Ok(())
    }

    /// Assigns `registration` to its enrollment's hub, applying the reprovisioning policy
    /// when it was somewhere else.
    /// (The device's payload goes to a custom allocation function at DPS, which
    /// hub-sim does not have; so no payload comes back, as with DPS's own policies.)
    fn assign(&self, registration: &str) -> RegistrationState {
        let mut state = self.state();
        let Some(enrollment) = state
            .dps_clients
            .get(registration)
            .and_then(|name| state.enrollments.iter().find(|e| &e.name == name))
            .cloned()
        else {
            return RegistrationState {
                registration_id: registration.to_owned(),
                status: "failed".into(),
                error_code: Some(404201),
                error_message: Some("the enrollment was removed".into()),
                ..RegistrationState::default()
            };
        };
        let key = if enrollment.group {
            sas::derive_device_key(&enrollment.key, registration).unwrap_or_default()
        } else {
            enrollment.key.clone()
        };
        let timestamp = timestamp();
        let previous = state
            .registrations
            .get(registration)
            .map(|r| (r.hub, r.created.clone(), r.etag));
        let (hub, substatus, created, etag) = match previous {
            None => {
                state.devices[enrollment.hub].insert(
                    registration.to_owned(),
                    Device::new(key.clone(), &self.initial_twin),
                );
                (enrollment.hub, "initialAssignment", timestamp.clone(), 1)
            }
            Some((old, created, etag))
                if old == enrollment.hub || enrollment.policy == Policy::Never =>
            {
                let devices = &mut state.devices[old];
                let device = devices
                    .entry(registration.to_owned())
                    .or_insert_with(|| Device::new(key.clone(), &self.initial_twin));
                device.key = key.clone();
                (old, "initialAssignment", created, etag + 1)
            }
            Some((old, created, etag)) => {
                let moved = state.devices[old].remove(registration);
                self.broker.forget(old + 1, registration);
                let (device, substatus) = match (enrollment.policy, moved) {
                    // The device is created anew at the new hub with the old twin's
                    // properties: its sections count their `$version`s from 1 again.
                    (Policy::Migrate, Some(mut device)) => {
                        device.key = key.clone();
                        device.model_id = None;
                        device.desired.version = 1;
                        device.reported.version = 1;
                        (device, "deviceDataMigrated")
                    }
                    _ => (
                        Device::new(key.clone(), &self.initial_twin),
                        "deviceDataReset",
                    ),
                };
                state.devices[enrollment.hub].insert(registration.to_owned(), device);
                (enrollment.hub, substatus, created, etag + 1)
            }
        };
        state.registrations.insert(
            registration.to_owned(),
            Registration {
                hub,
                created: created.clone(),
                etag,
            },
        );
        RegistrationState {
            registration_id: registration.to_owned(),
            created_date_time_utc: Some(created),
            assigned_hub: Some(self.hubs[hub].clone()),
            device_id: Some(registration.to_owned()),
            status: "assigned".into(),
            substatus: Some(substatus.into()),
            last_updated_date_time_utc: Some(timestamp),
            etag: Some(format!("\"{etag:08x}\"")),
            ..RegistrationState::default()
        }
    }

    // --- hubs -----------------------------------------------------------------------

    fn hub_connect(
        &self,
        hub: usize,
        connect: &Connect,
        certificate_cn: Option<&str>,
    ) -> Result<Option<u64>, (ConnectReturnCode, String)> {
        let bad = |why: String| (ConnectReturnCode::BadUserNamePassword, why);
        let login = connect
            .login
            .as_ref()
            .ok_or_else(|| bad("no username".into()))?;
        let device_id = &connect.client_id;
        let (host, rest) = login
            .username
            .split_once('/')
            .ok_or_else(|| bad("the username is not `{hub}/{deviceId}/?api-version=…`".into()))?;
        if self.hub_index(host) != Some(hub) {
            return Err(bad(format!(
                "the username names hub {host:?}, this is {:?}",
                self.hubs[hub]
            )));
        }
        let query = rest
            .strip_prefix(device_id.as_str())
            .and_then(|rest| rest.strip_prefix("/?"))
            .ok_or_else(|| {
                bad(format!(
                    "the username's device is not the client id {device_id:?}"
                ))
            })?;
        let query = Props::parse(query).map_err(|err| bad(err.to_string()))?;
        if query.get("api-version").is_none() {
            return Err(bad("the username names no api-version".into()));
        }
        let mut state = self.state();
        let device = state.devices[hub].get_mut(device_id).ok_or_else(|| {
            (
                ConnectReturnCode::NotAuthorized,
                format!("no device {device_id:?} at this hub"),
            )
        })?;
        if !device.enabled {
            return Err((
                ConnectReturnCode::NotAuthorized,
                "the device is disabled".into(),
            ));
        }
        if device.key == X509 {
            // CA-signed X.509: the certificate's CN is the device id; no token.
            if certificate_cn != Some(device_id.as_str()) {
                return Err((
                    ConnectReturnCode::NotAuthorized,
                    format!(
                        "device {device_id:?} authenticates with X.509: a client certificate \
                         with CN {device_id:?} is needed (got {certificate_cn:?})"
                    ),
                ));
            }
            if !login.password.is_empty() {
                return Err(bad(format!(
                    "device {device_id:?} authenticates with X.509: the CONNECT carries no token"
                )));
            }
            device.model_id = query.get("model-id").map(str::to_owned);
            return Ok(None);
        }
        let token = sas::verify(
            &login.password,
            &device.key,
            &sas::hub_resource(&self.hubs[hub], device_id),
            now(),
        )
        .map_err(|err| (ConnectReturnCode::NotAuthorized, err.to_string()))?;
        if token.key_name.is_some() {
            return Err((
                ConnectReturnCode::NotAuthorized,
                "a device token has no `skn` (hub-sim has no shared access policies)".into(),
            ));
        }
        device.model_id = query.get("model-id").map(str::to_owned);
        Ok(Some(token.expiry))
    }

    fn hub_publish(&self, hub: usize, device: &str, publish: &Publish) -> Result<(), String> {
        let request = HubRequest::parse(device, &publish.topic).map_err(|err| err.to_string())?;
        let listener = hub + 1;
        match request {
            HubRequest::Telemetry(_) if publish.payload.len() > MAX_MESSAGE => {
                return Err(format!(
                    "a {} byte message is over IoT Hub's 256 KiB",
                    publish.payload.len()
                ));
            }
            HubRequest::Telemetry(props) => {
                self.state().telemetry += 1;
                emit(&json!({
                    "event": "telemetry",
                    "hub": self.hubs[hub],
                    "device": device,
                    "properties": props_json(&props),
                    "payload": payload_json(&publish.payload),
                }));
            }
            HubRequest::TwinGet { rid } => {
                let body = {
                    let state = self.state();
                    let twin = state.devices[hub]
                        .get(device)
                        .ok_or_else(|| "the device was deleted".to_owned())?;
                    json!({"desired": twin.desired.to_json(), "reported": twin.reported.to_json()})
                };
                self.send(
                    listener,
                    device,
                    topics::twin_response(200, &rid, None),
                    &body,
                );
            }
            HubRequest::TwinPatchReported { rid } => {
                let outcome = match serde_json::from_slice::<Value>(&publish.payload) {
                    Ok(patch) => {
                        let mut state = self.state();
                        let twin = state.devices[hub]
                            .get_mut(device)
                            .ok_or_else(|| "the device was deleted".to_owned())?;
                        twin.reported
                            .apply(&patch)
                            .map(|version| (version, patch))
                            .map_err(|err| err.to_string())
                    }
                    Err(err) => Err(format!("the patch is not JSON: {err}")),
                };
                match outcome {
                    Ok((version, patch)) => {
                        emit(&json!({
                            "event": "reported",
                            "hub": self.hubs[hub],
                            "device": device,
                            "patch": patch,
                            "version": version,
                        }));
                        self.send(
                            listener,
                            device,
                            topics::twin_response(204, &rid, Some(version)),
                            &Value::Null,
                        );
                    }
                    Err(error) => {
                        emit(
                            &json!({"event": "reported_refused", "device": device, "error": error}),
                        );
                        self.send(
                            listener,
                            device,
                            topics::twin_response(400, &rid, None),
                            &json!({"errorCode": 400004, "message": error}),
                        );
                    }
                }
            }
            HubRequest::MethodResponse { status, rid } => {
                let pending = self.state().methods.remove(&rid);
                match pending {
                    Some(call) if call.device == device && call.hub == hub => emit(&json!({
                        "event": "method_response",
                        "device": device,
                        "name": call.name,
                        "rid": rid,
                        "status": status,
                        "payload": payload_json(&publish.payload),
                    })),
                    _ => emit(
                        &json!({"event": "method_response_unexpected", "device": device, "rid": rid}),
                    ),
                }
            }
        }
        Ok(())
    }

    // --- the operator ---------------------------------------------------------------

    fn find_device(&self, state: &State, device: &str) -> anyhow::Result<usize> {
        state
            .devices
            .iter()
            .position(|devices| devices.contains_key(device))
            .ok_or_else(|| anyhow::anyhow!("no device {device:?} at any hub"))
    }

    /// Patches a device's desired properties and sends the patch if it listens.
    pub(crate) fn desired(&self, device: &str, patch: &Value) -> anyhow::Result<Value> {
        let (hub, version) = {
            let mut state = self.state();
            let hub = self.find_device(&state, device)?;
            let twin = state.devices[hub].get_mut(device).expect("found");
            (hub, twin.desired.apply(patch)?)
        };
        let mut body = patch.clone();
        if let Some(object) = body.as_object_mut() {
            object.insert("$version".into(), Value::from(version));
        }
        let delivery = self.send(hub + 1, device, topics::desired_patch(version), &body);
        Ok(
            json!({"event": "desired", "device": device, "version": version,
            "delivered": delivery == Delivery::Sent}),
        )
    }

    /// Calls a direct method; its answer (or a 404 or 504) comes as a `method_response`.
    pub(crate) fn method(
        self: &Arc<Self>,
        device: &str,
        name: &str,
        payload: &Value,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        let hub = self.find_device(&self.state(), device)?;
        let rid = random_id();
        let topic = topics::method_call(name, &rid);
        if !self.broker.listening(hub + 1, device, &topic) {
            return Ok(
                json!({"event": "method_response", "device": device, "name": name,
                "rid": rid, "status": 404,
                "payload": {"errorCode": 404103, "message": "the device is not online for direct methods"}}),
            );
        }
        self.state().methods.insert(
            rid.clone(),
            PendingMethod {
                device: device.to_owned(),
                hub,
                name: name.to_owned(),
            },
        );
        self.send(hub + 1, device, topic, payload);
        let cloud = self.clone();
        let (who, what, call) = (device.to_owned(), name.to_owned(), rid.clone());
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            if cloud.state().methods.remove(&call).is_some() {
                emit(
                    &json!({"event": "method_response", "device": who, "name": what,
                    "rid": call, "status": 504,
                    "payload": {"errorCode": 504101, "message": "the device did not answer in time"}}),
                );
            }
        });
        Ok(json!({"event": "method_called", "device": device, "name": name, "rid": rid}))
    }

    /// Sends a cloud-to-device message (kept until the device takes it).
    pub(crate) fn c2d(
        &self,
        device: &str,
        payload: &Value,
        properties: &Value,
    ) -> anyhow::Result<Value> {
        let hub = self.find_device(&self.state(), device)?;
        let mut application: Vec<(String, String)> = properties
            .as_object()
            .map(|object| {
                object
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.clone(),
                            v.as_str().map_or_else(|| v.to_string(), str::to_owned),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        application.sort();
        let message_id = random_id();
        let mut props = Props::default();
        props
            .push("$.mid", message_id.clone())
            .push("$.to", format!("/devices/{device}/messages/devicebound"));
        props.0.extend(application);
        let body = match payload {
            Value::String(text) => Bytes::from(text.clone()),
            other => Bytes::from(other.to_string()),
        };
        let delivery =
            self.broker
                .deliver(hub + 1, device, topics::c2d(device, &props), body, true);
        Ok(
            json!({"event": "c2d", "device": device, "message_id": message_id,
            "delivery": format!("{delivery:?}").to_lowercase()}),
        )
    }

    /// The whole twin of a device.
    pub(crate) fn twin(&self, device: &str) -> anyhow::Result<Value> {
        let state = self.state();
        let hub = self.find_device(&state, device)?;
        let twin = &state.devices[hub][device];
        Ok(
            json!({"event": "twin", "device": device, "hub": self.hubs[hub],
            "model_id": twin.model_id, "enabled": twin.enabled,
            "desired": twin.desired.to_json(), "reported": twin.reported.to_json()}),
        )
    }

    /// Points an enrollment at another hub (its devices move when they next register).
    pub(crate) fn reassign(&self, enrollment: &str, hub: &str) -> anyhow::Result<Value> {
        let index = self
            .hub_index(hub)
            .ok_or_else(|| anyhow::anyhow!("no hub {hub:?} (hubs: {:?})", self.hubs))?;
        let mut state = self.state();
        let entry = state
            .enrollments
            .iter_mut()
            .find(|e| e.name == enrollment)
            .ok_or_else(|| anyhow::anyhow!("no enrollment {enrollment:?}"))?;
        entry.hub = index;
        Ok(json!({"event": "reassigned", "enrollment": enrollment, "hub": hub}))
    }

    /// Disables or enables a device at its hub (disabling ends its connection).
    pub(crate) fn set_enabled(&self, device: &str, enabled: bool) -> anyhow::Result<Value> {
        let hub = {
            let mut state = self.state();
            let hub = self.find_device(&state, device)?;
            state.devices[hub].get_mut(device).expect("found").enabled = enabled;
            hub
        };
        if !enabled {
            self.broker.kick(hub + 1, device);
        }
        Ok(json!({"event": if enabled { "enabled" } else { "disabled" }, "device": device}))
    }

    /// Ends a device's connection (it may connect again).
    pub(crate) fn kick(&self, device: &str) -> anyhow::Result<Value> {
        let hub = self.find_device(&self.state(), device)?;
        let kicked = self.broker.kick(hub + 1, device);
        Ok(json!({"event": "kicked", "device": device, "connected": kicked}))
    }

    /// Counters.
    pub(crate) fn stats(&self) -> Value {
        let state = self.state();
        json!({"event": "stats", "telemetry": state.telemetry,
            "registrations": state.registrations.len(),
            "devices": state.devices.iter().map(HashMap::len).sum::<usize>()})
    }
}

impl Service for Cloud {
    fn connect(
        &self,
        listener: ListenerId,
        peer: SocketAddr,
        connect: &Connect,
        certificate_cn: Option<&str>,
    ) -> Result<Option<u64>, ConnectReturnCode> {
        let outcome = if listener == DPS {
            self.dps_connect(connect, certificate_cn)
        } else {
            self.hub_connect(listener - 1, connect, certificate_cn)
        };
        let service = self.service_name(listener);
        match outcome {
            Ok(expiry) => {
                let model_id = (listener != DPS)
                    .then(|| {
                        self.state().devices[listener - 1]
                            .get(&connect.client_id)
                            .and_then(|d| d.model_id.clone())
                    })
                    .flatten();
                emit(
                    &json!({"event": "connected", "service": service, "client": connect.client_id,
                    "peer": peer.to_string(), "clean_session": connect.clean_session,
                    "keep_alive": connect.keep_alive, "token_expiry": expiry, "model_id": model_id}),
                );
                Ok(expiry)
            }
            Err((code, why)) => {
                emit(&json!({"event": "auth_refused", "service": service,
                    "client": connect.client_id, "code": code as u8, "reason": why}));
                Err(code)
            }
        }
    }

    fn may_subscribe(&self, listener: ListenerId, client: &str, filter: &str) -> bool {
        if listener == DPS {
            filter == topics::DPS_RESPONSES
        } else {
            [
                topics::TWIN_RESPONSES,
                topics::DESIRED_PATCHES,
                topics::METHOD_CALLS,
            ]
            .contains(&filter)
                || filter == topics::c2d_filter(client)
        }
    }

    fn publish(&self, listener: ListenerId, client: &str, publish: Publish) -> Result<(), String> {
        let outcome = if listener == DPS {
            self.dps_publish(client, &publish)
        } else {
            self.hub_publish(listener - 1, client, &publish)
        };
        if let Err(why) = &outcome {
            emit(
                &json!({"event": "protocol_error", "client": client, "topic": publish.topic, "error": why}),
            );
        }
        outcome
    }

    fn subscribed(&self, listener: ListenerId, client: &str, filters: &[String]) {
        let service = self.service_name(listener);
        emit(
            &json!({"event": "subscribed", "service": service, "client": client, "filters": filters}),
        );
    }

    fn disconnected(&self, listener: ListenerId, client: &str, why: &str) {
        let service = self.service_name(listener);
        emit(&json!({"event": "disconnected", "service": service, "client": client, "why": why}));
    }
}
