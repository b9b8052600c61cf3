//! One simulated ESP device: protocomm device role, Wi-Fi station, RainMaker claiming.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use outpost_protocomm::proto::{
    PayloadBuf, RMakerClaimMsgType, RMakerClaimPayload, RMakerClaimStatus, RespGetStatus,
    RespScanResult, RespScanStatus, RespSetConfig, Status, WiFiConfigMsgType, WiFiConfigPayload,
    WiFiCtrlMsgType, WiFiCtrlPayload, WiFiScanMsgType, WiFiScanPayload, WiFiScanResult,
    WifiAuthMode, WifiConnectFailedReason, WifiConnectedState, WifiStationState,
    r_maker_claim_payload, resp_get_status, wi_fi_config_payload, wi_fi_ctrl_payload,
    wi_fi_scan_payload,
};
use outpost_protocomm::{
    AppInfo, CLAIM_ENDPOINT, CONFIG_ENDPOINT, CTRL_ENDPOINT, DeviceSecurity, DeviceSession,
    Endpoint, Error, ProtoVersion, ProvInfo, SCAN_ENDPOINT, SecurityVersion, claim,
};
use prost::Message;
use serde::Serialize;

use crate::events::emit;

/// The Outpost agent's custom endpoint: the gateway hands over the device API
/// credential here.
const AGENT_ENDPOINT: &str = "outpost-agent";

/// How a device misbehaves, for the bad-input tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Fault {
    /// Drops the link right after the security handshake.
    DropAfterSession,
    /// Answers the handshake with garbage.
    Garbage,
    /// Answers `proto-ver` with more bytes than the transport carries.
    Oversized,
}

/// The site's access point, as the simulated radios see it.
#[derive(Clone, Debug)]
pub(crate) struct AccessPoint {
    pub(crate) ssid: String,
    pub(crate) passphrase: String,
    /// How long joining takes.
    pub(crate) connect_delay: Duration,
}

/// Everything fixed about one device.
#[derive(Clone, Debug)]
pub(crate) struct Identity {
    pub(crate) index: usize,
    pub(crate) name: String,
    pub(crate) mac: [u8; 6],
    pub(crate) security: SecurityVersion,
    pub(crate) pop: String,
    pub(crate) username: String,
    pub(crate) patch_ver: u32,
    pub(crate) claim: bool,
    pub(crate) fault: Option<Fault>,
    /// Runs the Outpost update agent once it has its credential.
    pub(crate) agent: Option<crate::agent::AgentProfile>,
}

impl Identity {
    pub(crate) fn mac_colon(&self) -> String {
        self.mac
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":")
    }
}

enum Wifi {
    Idle,
    Configured {
        ssid: Vec<u8>,
        passphrase: Vec<u8>,
    },
    Joining {
        since: Instant,
        ssid: Vec<u8>,
        outcome: Result<(), WifiConnectFailedReason>,
    },
    Connected {
        ssid: Vec<u8>,
    },
    Failed(WifiConnectFailedReason),
}

enum Claim {
    KeyGenerated,
    Started,
    SendingCsr {
        document: Vec<u8>,
        sent: usize,
        node_id: String,
    },
    AwaitingCertificate {
        node_id: String,
        reassembly: claim::Reassembly,
    },
    Claimed,
}

struct State {
    session: DeviceSession,
    wifi: Wifi,
    claim: Claim,
    gone: bool,
    agent: AgentHandover,
}

/// The credential as it comes to the `outpost-agent` endpoint: in one request, or in
/// chunks (`{"chunk": i, "of": n, "base64": …}`) when it is larger than a BLE write.
#[derive(Default)]
struct AgentHandover {
    started: bool,
    /// The requests so far, as they came (what a handed-off agent is given).
    requests: Vec<Vec<u8>>,
    /// The decoded chunks so far.
    assembly: Vec<u8>,
}

/// A simulated device.
pub(crate) struct SimDevice {
    pub(crate) identity: Identity,
    ap: AccessPoint,
    key: Option<rcgen::KeyPair>,
    state: Mutex<State>,
}

impl SimDevice {
    pub(crate) fn new(identity: Identity, ap: AccessPoint) -> anyhow::Result<Self> {
        let security = match identity.security {
            SecurityVersion::Sec0 => DeviceSecurity::Sec0,
            SecurityVersion::Sec1 => DeviceSecurity::Sec1 {
                pop: identity.pop.as_bytes().to_vec(),
            },
            SecurityVersion::Sec2 => {
                let mut salt = [0u8; 16];
                getrandom_fill(&mut salt)?;
                DeviceSecurity::Sec2 {
                    verifier: outpost_protocomm::srp::verifier(
                        identity.username.as_bytes(),
                        identity.pop.as_bytes(),
                        &salt,
                    ),
                    salt: salt.to_vec(),
                    patch_ver: identity.patch_ver,
                }
            }
        };
        let mut cap = vec!["wifi_scan".to_owned()];
        match identity.security {
            SecurityVersion::Sec0 => cap.insert(0, "no_sec".into()),
            SecurityVersion::Sec1 if identity.pop.is_empty() => cap.insert(0, "no_pop".into()),
            _ => {}
        }
        let mut version = ProtoVersion {
            prov: ProvInfo {
                ver: "v1.1".into(),
                sec_ver: Some(identity.security.number()),
                sec_patch_ver: Some(if identity.security == SecurityVersion::Sec2 {
                    identity.patch_ver
                } else {
                    0
                }),
                cap,
            },
            apps: Default::default(),
        };
        let key = if identity.claim {
            version.apps.insert(
                "rmaker".into(),
                AppInfo {
                    ver: "1.0".into(),
                    cap: vec!["claim".into()],
                },
            );
            Some(rcgen::KeyPair::generate()?)
        } else {
            None
        };
        if identity.agent.is_some() {
            version.apps.insert(
                "outpost".into(),
                AppInfo {
                    ver: "1.0".into(),
                    cap: vec!["agent".into()],
                },
            );
        }
        Ok(Self {
            identity,
            ap,
            key,
            state: Mutex::new(State {
                session: DeviceSession::new(security, &version),
                wifi: Wifi::Idle,
                claim: Claim::KeyGenerated,
                gone: false,
                agent: AgentHandover::default(),
            }),
        })
    }

    /// `outpost-agent`: takes the device API credential (whole or in chunks) and starts
    /// the update agent.
    fn agent(&self, handover: &mut AgentHandover, plain: &[u8]) -> Result<Vec<u8>, Error> {
        use base64::Engine as _;
        let Some(profile) = &self.identity.agent else {
            return Err(Error::Invalid {
                what: "endpoint",
                detail: format!("{AGENT_ENDPOINT} is not served"),
            });
        };
        let invalid = |detail: String| Error::Invalid {
            what: "agent credential",
            detail,
        };
        let message: serde_json::Value =
            serde_json::from_slice(plain).map_err(|err| invalid(err.to_string()))?;
        if let Some(chunk) = message.get("chunk") {
            let (i, n) = (chunk.as_u64(), message["of"].as_u64());
            let part = message["base64"].as_str();
            let (Some(i), Some(n), Some(part)) = (i, n, part) else {
                return Err(invalid(format!("a malformed chunk: {message}")));
            };
            if i == 0 {
                handover.requests.clear();
                handover.assembly.clear();
            }
            if i != handover.requests.len() as u64 || i >= n {
                return Err(invalid(format!("chunk {i} of {n} out of order")));
            }
            handover.requests.push(plain.to_vec());
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(part)
                .map_err(|err| invalid(format!("chunk {i}: {err}")))?;
            handover.assembly.extend_from_slice(&decoded);
            if i + 1 < n {
                return Ok(br#"{"status":"more"}"#.to_vec());
            }
        } else {
            handover.requests = vec![plain.to_vec()];
            handover.assembly = plain.to_vec();
        }
        let whole = std::mem::take(&mut handover.assembly);
        let requests = std::mem::take(&mut handover.requests);
        let started = &mut handover.started;
        let credential: crate::agent::Credential =
            serde_json::from_slice(&whole).map_err(|err| invalid(err.to_string()))?;
        emit(
            &serde_json::json!({"event": "credential", "device": self.identity.name, "api": credential.api}),
        );
        if let Some(dir) = &profile.handoff {
            // The requests exactly as the gateway sent them, one per line, as the endpoint
            // of a real device gets them.
            let path = dir.join(format!("{}.json", self.identity.name));
            std::fs::write(&path, requests.join(&b'\n')).map_err(|err| Error::Invalid {
                what: "agent credential",
                detail: format!("cannot write {}: {err}", path.display()),
            })?;
            emit(
                &serde_json::json!({"event": "handed_off", "device": self.identity.name, "device_id": credential.device_id, "path": path}),
            );
        } else if !*started {
            *started = true;
            crate::agent::start(credential, profile.clone());
        }
        Ok(br#"{"status":"ok"}"#.to_vec())
    }

    /// A new connection or HTTP session: the protocomm session starts over.
    pub(crate) fn new_session(&self) {
        self.state.lock().expect("device lock").session.reset();
    }

    /// Answers one request; `Err` means the device drops the link.
    pub(crate) fn handle(
        &self,
        endpoint: &str,
        request: &[u8],
        limit: usize,
    ) -> Result<Vec<u8>, String> {
        let mut guard = self.state.lock().expect("device lock");
        let state = &mut *guard;
        if state.gone {
            return Err("the device has gone away".into());
        }
        match (self.identity.fault, Endpoint::of(endpoint)) {
            (Some(Fault::Oversized), Endpoint::Version) => {
                return Ok(vec![b' '; limit + 64]);
            }
            (Some(Fault::Garbage), Endpoint::Session) => {
                let mut junk = vec![0u8; 37];
                getrandom_fill(&mut junk).map_err(|e| e.to_string())?;
                junk[0] = 0xff;
                return Ok(junk);
            }
            _ => {}
        }
        let was_established = state.session.is_established();
        let name = &self.identity.name;
        let wifi = &mut state.wifi;
        let claim_state = &mut state.claim;
        let handover = &mut state.agent;
        let mut app = |endpoint: &str, plain: &[u8]| -> Result<Vec<u8>, Error> {
            match endpoint {
                AGENT_ENDPOINT => self.agent(handover, plain),
                CONFIG_ENDPOINT => self.config(wifi, plain),
                SCAN_ENDPOINT => Ok(self.scan(plain)?),
                CTRL_ENDPOINT => Ok(ctrl(wifi, plain)?),
                CLAIM_ENDPOINT => self.claim(claim_state, plain),
                other => Err(Error::Invalid {
                    what: "endpoint",
                    detail: format!("{other} is not served"),
                }),
            }
        };
        let result = state.session.handle(endpoint, request, &mut app);
        match &result {
            Err(err) => emit(&serde_json::json!({
                "event": "link_dropped", "device": name, "endpoint": endpoint, "reason": err.to_string(),
            })),
            Ok(_) if !was_established && state.session.is_established() => {
                emit(&serde_json::json!({"event": "session", "device": name}));
                if self.identity.fault == Some(Fault::DropAfterSession) {
                    state.gone = true;
                }
            }
            Ok(_) => {}
        }
        if result.as_ref().is_ok_and(|r| r.len() > limit) {
            return Err(format!("response larger than {limit} bytes"));
        }
        result.map_err(|err| err.to_string())
    }

    fn config(&self, wifi: &mut Wifi, plain: &[u8]) -> Result<Vec<u8>, Error> {
        let payload = WiFiConfigPayload::decode(plain).map_err(|source| Error::Decode {
            what: "WiFiConfigPayload",
            source,
        })?;
        let msg = WiFiConfigMsgType::try_from(payload.msg).map_err(|_| Error::Invalid {
            what: "prov-config message",
            detail: format!("type {}", payload.msg),
        })?;
        let reply = match msg {
            WiFiConfigMsgType::TypeCmdSetConfig => {
                let Some(wi_fi_config_payload::Payload::CmdSetConfig(cmd)) = payload.payload else {
                    return Err(Error::Invalid {
                        what: "SetConfig",
                        detail: "no cmd_set_config".into(),
                    });
                };
                let valid = !cmd.ssid.is_empty()
                    && cmd.ssid.len() <= 32
                    && cmd.passphrase.len() <= 63
                    && (cmd.bssid.is_empty() || cmd.bssid.len() == 6);
                if valid && !matches!(wifi, Wifi::Joining { .. } | Wifi::Connected { .. }) {
                    *wifi = Wifi::Configured {
                        ssid: cmd.ssid,
                        passphrase: cmd.passphrase,
                    };
                }
                let status = if valid {
                    Status::Success
                } else {
                    Status::InvalidArgument
                };
                wi_fi_config_payload::Payload::RespSetConfig(RespSetConfig {
                    status: status as i32,
                })
            }
            WiFiConfigMsgType::TypeCmdApplyConfig => {
                let status = match std::mem::replace(wifi, Wifi::Idle) {
                    Wifi::Configured { ssid, passphrase } => {
                        let outcome = if ssid != self.ap.ssid.as_bytes() {
                            Err(WifiConnectFailedReason::NetworkNotFound)
                        } else if passphrase != self.ap.passphrase.as_bytes() {
                            Err(WifiConnectFailedReason::AuthError)
                        } else {
                            Ok(())
                        };
                        *wifi = Wifi::Joining {
                            since: Instant::now(),
                            ssid,
                            outcome,
                        };
                        Status::Success
                    }
                    other => {
                        *wifi = other;
                        Status::InternalError
                    }
                };
                wi_fi_config_payload::Payload::RespApplyConfig(
                    outpost_protocomm::proto::RespApplyConfig {
                        status: status as i32,
                    },
                )
            }
            WiFiConfigMsgType::TypeCmdGetStatus => {
                self.advance(wifi);
                let (sta_state, state) = match wifi {
                    Wifi::Idle | Wifi::Configured { .. } => (WifiStationState::Disconnected, None),
                    Wifi::Joining { .. } => (WifiStationState::Connecting, None),
                    Wifi::Connected { ssid } => (
                        WifiStationState::Connected,
                        Some(resp_get_status::State::Connected(WifiConnectedState {
                            ip4_addr: format!("192.168.1.{}", 10 + self.identity.index % 240),
                            auth_mode: WifiAuthMode::Wpa2Psk as i32,
                            ssid: ssid.clone(),
                            bssid: vec![0x02, 0, 0, 0, 0, 1],
                            channel: 6,
                        })),
                    ),
                    Wifi::Failed(reason) => (
                        WifiStationState::ConnectionFailed,
                        Some(resp_get_status::State::FailReason(*reason as i32)),
                    ),
                };
                wi_fi_config_payload::Payload::RespGetStatus(RespGetStatus {
                    status: Status::Success as i32,
                    sta_state: sta_state as i32,
                    state,
                })
            }
            _ => {
                return Err(Error::Invalid {
                    what: "prov-config message",
                    detail: format!("{msg:?} is a response"),
                });
            }
        };
        Ok(WiFiConfigPayload {
            msg: payload.msg + 1,
            payload: Some(reply),
        }
        .encode_to_vec())
    }

    fn advance(&self, wifi: &mut Wifi) {
        if let Wifi::Joining {
            since,
            ssid,
            outcome,
        } = wifi
            && since.elapsed() >= self.ap.connect_delay
        {
            let next = match outcome {
                Ok(()) => Wifi::Connected {
                    ssid: std::mem::take(ssid),
                },
                Err(reason) => Wifi::Failed(*reason),
            };
            let state = match &next {
                Wifi::Connected { .. } => "connected".to_owned(),
                Wifi::Failed(reason) => format!("failed: {reason:?}"),
                _ => unreachable!(),
            };
            emit(
                &serde_json::json!({"event": "wifi", "device": self.identity.name, "state": state}),
            );
            *wifi = next;
        }
    }

    fn scan(&self, plain: &[u8]) -> Result<Vec<u8>, Error> {
        let payload = WiFiScanPayload::decode(plain).map_err(|source| Error::Decode {
            what: "WiFiScanPayload",
            source,
        })?;
        let networks = [
            (self.ap.ssid.as_str(), -48),
            ("neighbour-2g", -71),
            ("printer-setup", -80),
            ("guest", -66),
            ("warehouse-ap", -75),
        ];
        let reply = match WiFiScanMsgType::try_from(payload.msg) {
            Ok(WiFiScanMsgType::TypeCmdScanStart) => {
                wi_fi_scan_payload::Payload::RespScanStart(Default::default())
            }
            Ok(WiFiScanMsgType::TypeCmdScanStatus) => {
                wi_fi_scan_payload::Payload::RespScanStatus(RespScanStatus {
                    scan_finished: true,
                    result_count: networks.len() as u32,
                })
            }
            Ok(WiFiScanMsgType::TypeCmdScanResult) => {
                let Some(wi_fi_scan_payload::Payload::CmdScanResult(cmd)) = payload.payload else {
                    return Err(Error::Invalid {
                        what: "ScanResult",
                        detail: "no cmd_scan_result".into(),
                    });
                };
                let (start, count) = (cmd.start_index as usize, cmd.count as usize);
                if start + count > networks.len() {
                    return Err(Error::Invalid {
                        what: "ScanResult",
                        detail: format!("{start}+{count} beyond {} results", networks.len()),
                    });
                }
                wi_fi_scan_payload::Payload::RespScanResult(RespScanResult {
                    entries: networks[start..start + count]
                        .iter()
                        .enumerate()
                        .map(|(i, (ssid, rssi))| WiFiScanResult {
                            ssid: ssid.as_bytes().to_vec(),
                            channel: 1 + (i as u32 * 5) % 11,
                            rssi: *rssi,
                            bssid: vec![0x02, 0, 0, 0, 0, (start + i) as u8],
                            auth: WifiAuthMode::Wpa2Psk as i32,
                        })
                        .collect(),
                })
            }
            _ => {
                return Err(Error::Invalid {
                    what: "prov-scan message",
                    detail: format!("type {}", payload.msg),
                });
            }
        };
        Ok(WiFiScanPayload {
            msg: payload.msg + 1,
            status: Status::Success as i32,
            payload: Some(reply),
        }
        .encode_to_vec())
    }

    fn claim(&self, state: &mut Claim, plain: &[u8]) -> Result<Vec<u8>, Error> {
        let Some(key) = &self.key else {
            return Err(Error::Invalid {
                what: "endpoint",
                detail: "rmaker_claim is not served".into(),
            });
        };
        let payload = RMakerClaimPayload::decode(plain).map_err(|source| Error::Decode {
            what: "RMakerClaimPayload",
            source,
        })?;
        let buf = match payload.payload {
            Some(r_maker_claim_payload::Payload::CmdPayload(buf)) => buf,
            _ => PayloadBuf::default(),
        };
        let msg = RMakerClaimMsgType::try_from(payload.msg)
            .unwrap_or(RMakerClaimMsgType::TypeRespClaimAbort);
        let (status, reply) = match msg {
            RMakerClaimMsgType::TypeCmdClaimStart => {
                let doc = serde_json::json!({
                    "mac_addr": hex::encode_upper(self.identity.mac),
                    "platform": "esp32c3",
                })
                .to_string()
                .into_bytes();
                *state = Claim::Started;
                (RMakerClaimStatus::Success, Some(whole(doc)))
            }
            RMakerClaimMsgType::TypeCmdClaimInit => self.claim_init(state, key, &buf),
            RMakerClaimMsgType::TypeCmdClaimVerify => self.claim_verify(state, key, &buf),
            RMakerClaimMsgType::TypeCmdClaimAbort => {
                emit(&serde_json::json!({
                    "event": "claim-aborted", "device": self.identity.name,
                }));
                *state = Claim::KeyGenerated;
                (RMakerClaimStatus::Success, None)
            }
            _ => (RMakerClaimStatus::Fail, None),
        };
        Ok(claim::response(payload.msg, status, reply))
    }

    fn claim_init(
        &self,
        state: &mut Claim,
        key: &rcgen::KeyPair,
        buf: &PayloadBuf,
    ) -> (RMakerClaimStatus, Option<PayloadBuf>) {
        if let Claim::Started = state {
            if buf.payload.is_empty() || buf.payload.len() != buf.total_len as usize {
                return (RMakerClaimStatus::InvalidParam, None);
            }
            let Ok(init) = serde_json::from_slice::<claim::InitiateResponse>(&buf.payload) else {
                return (RMakerClaimStatus::InvalidParam, None);
            };
            if init.node_id.is_empty() || init.node_id.len() >= 64 {
                return (RMakerClaimStatus::InvalidParam, None);
            }
            let csr = (|| {
                let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
                params
                    .distinguished_name
                    .push(rcgen::DnType::CommonName, init.node_id.clone());
                params.serialize_request(key)?.pem()
            })();
            let Ok(csr) = csr else {
                return (RMakerClaimStatus::Fail, None);
            };
            let document = serde_json::to_vec(&claim::CsrDocument {
                csr,
                send_mqtt_host: true,
            })
            .expect("plain data");
            *state = Claim::SendingCsr {
                document,
                sent: 0,
                node_id: init.node_id,
            };
        }
        match state {
            Claim::SendingCsr {
                document,
                sent,
                node_id,
            } => {
                let end = (*sent + claim::CHUNK).min(document.len());
                let fragment = PayloadBuf {
                    offset: *sent as u32,
                    payload: document[*sent..end].to_vec(),
                    total_len: document.len() as u32,
                };
                *sent = end;
                if end == document.len() {
                    *state = Claim::AwaitingCertificate {
                        node_id: std::mem::take(node_id),
                        reassembly: claim::Reassembly::default(),
                    };
                }
                (RMakerClaimStatus::Success, Some(fragment))
            }
            _ => (RMakerClaimStatus::InvalidState, None),
        }
    }

    fn claim_verify(
        &self,
        state: &mut Claim,
        key: &rcgen::KeyPair,
        buf: &PayloadBuf,
    ) -> (RMakerClaimStatus, Option<PayloadBuf>) {
        let Claim::AwaitingCertificate {
            node_id,
            reassembly,
        } = state
        else {
            return (RMakerClaimStatus::InvalidState, None);
        };
        let document = match reassembly.push(buf) {
            Ok(Some(document)) => document,
            Ok(None) => return (RMakerClaimStatus::Success, None),
            Err(_) => return (RMakerClaimStatus::InvalidParam, None),
        };
        let verdict = serde_json::from_slice::<claim::VerifyResponse>(&document)
            .map_err(|e| e.to_string())
            .and_then(|resp| certificate_matches(&resp.certificate, key));
        match verdict {
            Ok(()) => {
                emit(&serde_json::json!({
                    "event": "claimed", "device": self.identity.name, "node_id": node_id,
                }));
                *state = Claim::Claimed;
                (RMakerClaimStatus::Success, None)
            }
            Err(reason) => {
                emit(&serde_json::json!({
                    "event": "claim_refused", "device": self.identity.name, "reason": reason,
                }));
                *state = Claim::KeyGenerated;
                (RMakerClaimStatus::InvalidParam, None)
            }
        }
    }
}

fn whole(doc: Vec<u8>) -> PayloadBuf {
    PayloadBuf {
        offset: 0,
        total_len: doc.len() as u32,
        payload: doc,
    }
}

fn ctrl(wifi: &mut Wifi, plain: &[u8]) -> Result<Vec<u8>, Error> {
    let payload = WiFiCtrlPayload::decode(plain).map_err(|source| Error::Decode {
        what: "WiFiCtrlPayload",
        source,
    })?;
    let (msg, status, reply) = match WiFiCtrlMsgType::try_from(payload.msg) {
        Ok(WiFiCtrlMsgType::TypeCmdCtrlReset) => {
            // Only valid after a failed attempt, as in the provisioning manager.
            let status = if matches!(wifi, Wifi::Failed(_)) {
                *wifi = Wifi::Idle;
                Status::Success
            } else {
                Status::InternalError
            };
            (
                WiFiCtrlMsgType::TypeRespCtrlReset,
                status,
                wi_fi_ctrl_payload::Payload::RespCtrlReset(Default::default()),
            )
        }
        Ok(WiFiCtrlMsgType::TypeCmdCtrlReprov) => {
            *wifi = Wifi::Idle;
            (
                WiFiCtrlMsgType::TypeRespCtrlReprov,
                Status::Success,
                wi_fi_ctrl_payload::Payload::RespCtrlReprov(Default::default()),
            )
        }
        _ => {
            return Err(Error::Invalid {
                what: "prov-ctrl message",
                detail: format!("type {}", payload.msg),
            });
        }
    };
    Ok(WiFiCtrlPayload {
        msg: msg as i32,
        status: status as i32,
        payload: Some(reply),
    }
    .encode_to_vec())
}

/// The certificate must carry this device's public key.
fn certificate_matches(pem: &str, key: &rcgen::KeyPair) -> Result<(), String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| format!("certificate is not PEM: {e}"))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| format!("certificate does not parse: {e}"))?;
    use rcgen::PublicKeyData as _;
    if cert.public_key().subject_public_key.data.as_ref() != key.der_bytes() {
        return Err("the certificate does not carry this device's public key".into());
    }
    Ok(())
}

pub(crate) fn getrandom_fill(buf: &mut [u8]) -> anyhow::Result<()> {
    getrandom::fill(buf).map_err(|err| anyhow::anyhow!("no randomness: {err}"))
}
