//! Wi-Fi provisioning requests (client role) and their answers: `prov-config`,
//! `prov-scan`, `prov-ctrl`. The bytes here are the *plaintext*; the session cipher
//! encrypts them.

use prost::Message;

use crate::Error;
use crate::proto::{
    CmdApplyConfig, CmdCtrlReset, CmdGetStatus, CmdScanResult, CmdScanStart, CmdScanStatus,
    CmdSetConfig, Status, WiFiConfigMsgType, WiFiConfigPayload, WiFiCtrlMsgType, WiFiCtrlPayload,
    WiFiScanMsgType, WiFiScanPayload, WifiConnectFailedReason, WifiStationState, resp_get_status,
    wi_fi_config_payload, wi_fi_ctrl_payload, wi_fi_scan_payload,
};

/// Longest SSID a device accepts.
pub const MAX_SSID: usize = 32;
/// Longest WPA passphrase a device accepts.
pub const MAX_PASSPHRASE: usize = 63;

/// `SetConfig` with an SSID and passphrase (no BSSID, any channel).
pub fn set_config(ssid: &[u8], passphrase: &[u8]) -> Result<Vec<u8>, Error> {
    if ssid.is_empty() || ssid.len() > MAX_SSID {
        return Err(Error::invalid(
            "SSID",
            format!("{} bytes, must be 1..=32", ssid.len()),
        ));
    }
    if passphrase.len() > MAX_PASSPHRASE {
        return Err(Error::invalid(
            "passphrase",
            format!("{} bytes, must be at most 63", passphrase.len()),
        ));
    }
    Ok(WiFiConfigPayload {
        msg: WiFiConfigMsgType::TypeCmdSetConfig as i32,
        payload: Some(wi_fi_config_payload::Payload::CmdSetConfig(CmdSetConfig {
            ssid: ssid.to_vec(),
            passphrase: passphrase.to_vec(),
            bssid: Vec::new(),
            channel: 0,
        })),
    }
    .encode_to_vec())
}

/// `ApplyConfig`.
pub fn apply_config() -> Vec<u8> {
    WiFiConfigPayload {
        msg: WiFiConfigMsgType::TypeCmdApplyConfig as i32,
        payload: Some(wi_fi_config_payload::Payload::CmdApplyConfig(
            CmdApplyConfig {},
        )),
    }
    .encode_to_vec()
}

/// `GetStatus`.
pub fn get_status() -> Vec<u8> {
    WiFiConfigPayload {
        msg: WiFiConfigMsgType::TypeCmdGetStatus as i32,
        payload: Some(wi_fi_config_payload::Payload::CmdGetStatus(CmdGetStatus {})),
    }
    .encode_to_vec()
}

fn config_response(bytes: &[u8], msg: WiFiConfigMsgType) -> Result<WiFiConfigPayload, Error> {
    let payload = WiFiConfigPayload::decode(bytes).map_err(Error::decode("WiFiConfigPayload"))?;
    if payload.msg != msg as i32 {
        return Err(Error::unexpected(
            "prov-config response",
            format!("type {} where {msg:?} was expected", payload.msg),
        ));
    }
    Ok(payload)
}

/// Checks the answer to `SetConfig`.
pub fn parse_set_config(bytes: &[u8]) -> Result<(), Error> {
    match config_response(bytes, WiFiConfigMsgType::TypeRespSetConfig)?.payload {
        Some(wi_fi_config_payload::Payload::RespSetConfig(resp)) => {
            Error::check_status("SetConfig", resp.status)
        }
        None => Ok(()), // all fields zero: Success
        _ => Err(Error::unexpected("SetConfig response", "other member")),
    }
}

/// Checks the answer to `ApplyConfig`.
pub fn parse_apply_config(bytes: &[u8]) -> Result<(), Error> {
    match config_response(bytes, WiFiConfigMsgType::TypeRespApplyConfig)?.payload {
        Some(wi_fi_config_payload::Payload::RespApplyConfig(resp)) => {
            Error::check_status("ApplyConfig", resp.status)
        }
        None => Ok(()),
        _ => Err(Error::unexpected("ApplyConfig response", "other member")),
    }
}

/// Why a device could not join the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailReason {
    /// Wrong passphrase.
    AuthError,
    /// No access point with that SSID.
    NetworkNotFound,
}

impl std::fmt::Display for FailReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::AuthError => "authentication failed (wrong Wi-Fi passphrase)",
            Self::NetworkNotFound => "access point not found (wrong SSID or out of range)",
        })
    }
}

/// The station state a device reports.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum WifiStatus {
    /// Still trying; `attempts_remaining` after a failed attempt when the firmware retries.
    Connecting {
        /// Attempts left, when the device says.
        attempts_remaining: Option<u32>,
    },
    /// Joined.
    Connected {
        /// Its IPv4 address.
        ip4: String,
        /// The SSID it joined.
        ssid: String,
        /// The channel.
        channel: i32,
    },
    /// Gave up, for this reason.
    Failed {
        /// Why (absent when the firmware did not say).
        reason: Option<FailReason>,
    },
    /// Not connected and not trying.
    Disconnected,
}

/// Parses the answer to `GetStatus`.
pub fn parse_status(bytes: &[u8]) -> Result<WifiStatus, Error> {
    let resp = match config_response(bytes, WiFiConfigMsgType::TypeRespGetStatus)?.payload {
        Some(wi_fi_config_payload::Payload::RespGetStatus(resp)) => resp,
        None => Default::default(),
        _ => return Err(Error::unexpected("GetStatus response", "other member")),
    };
    Error::check_status("GetStatus", resp.status)?;
    let state = WifiStationState::try_from(resp.sta_state).map_err(|_| {
        Error::unexpected("station state", format!("unknown value {}", resp.sta_state))
    })?;
    Ok(match (state, resp.state) {
        (WifiStationState::Connected, Some(resp_get_status::State::Connected(info))) => {
            WifiStatus::Connected {
                ip4: info.ip4_addr,
                ssid: String::from_utf8_lossy(&info.ssid).into_owned(),
                channel: info.channel,
            }
        }
        (WifiStationState::Connected, _) => WifiStatus::Connected {
            ip4: String::new(),
            ssid: String::new(),
            channel: 0,
        },
        (WifiStationState::Connecting, Some(resp_get_status::State::AttemptFailed(failed))) => {
            WifiStatus::Connecting {
                attempts_remaining: Some(failed.attempts_remaining),
            }
        }
        (WifiStationState::Connecting, _) => WifiStatus::Connecting {
            attempts_remaining: None,
        },
        (WifiStationState::ConnectionFailed, Some(resp_get_status::State::FailReason(r))) => {
            WifiStatus::Failed {
                reason: match WifiConnectFailedReason::try_from(r) {
                    Ok(WifiConnectFailedReason::AuthError) => Some(FailReason::AuthError),
                    Ok(WifiConnectFailedReason::NetworkNotFound) => {
                        Some(FailReason::NetworkNotFound)
                    }
                    Err(_) => None,
                },
            }
        }
        (WifiStationState::ConnectionFailed, _) => WifiStatus::Failed { reason: None },
        (WifiStationState::Disconnected, _) => WifiStatus::Disconnected,
    })
}

/// `prov-ctrl` Reset: valid after a failed attempt; clears the station config so new
/// credentials can be sent without a factory reset.
pub fn ctrl_reset() -> Vec<u8> {
    WiFiCtrlPayload {
        msg: WiFiCtrlMsgType::TypeCmdCtrlReset as i32,
        status: Status::Success as i32,
        payload: Some(wi_fi_ctrl_payload::Payload::CmdCtrlReset(CmdCtrlReset {})),
    }
    .encode_to_vec()
}

/// Checks the answer to a `prov-ctrl` Reset.
pub fn parse_ctrl_reset(bytes: &[u8]) -> Result<(), Error> {
    let payload = WiFiCtrlPayload::decode(bytes).map_err(Error::decode("WiFiCtrlPayload"))?;
    if payload.msg != WiFiCtrlMsgType::TypeRespCtrlReset as i32 {
        return Err(Error::unexpected(
            "prov-ctrl response",
            format!("type {}", payload.msg),
        ));
    }
    Error::check_status("prov-ctrl Reset", payload.status)
}

/// `ScanStart`, blocking until the scan is done.
pub fn scan_start(group_channels: u32, period_ms: u32) -> Vec<u8> {
    scan_message(
        WiFiScanMsgType::TypeCmdScanStart,
        wi_fi_scan_payload::Payload::CmdScanStart(CmdScanStart {
            blocking: true,
            passive: false,
            group_channels,
            period_ms,
        }),
    )
}

/// `ScanStatus`.
pub fn scan_status() -> Vec<u8> {
    scan_message(
        WiFiScanMsgType::TypeCmdScanStatus,
        wi_fi_scan_payload::Payload::CmdScanStatus(CmdScanStatus {}),
    )
}

/// `ScanResult` for `count` entries from `start_index`.
pub fn scan_result(start_index: u32, count: u32) -> Vec<u8> {
    scan_message(
        WiFiScanMsgType::TypeCmdScanResult,
        wi_fi_scan_payload::Payload::CmdScanResult(CmdScanResult { start_index, count }),
    )
}

fn scan_message(msg: WiFiScanMsgType, payload: wi_fi_scan_payload::Payload) -> Vec<u8> {
    WiFiScanPayload {
        msg: msg as i32,
        status: Status::Success as i32,
        payload: Some(payload),
    }
    .encode_to_vec()
}

/// Decodes a `prov-scan` answer of type `msg` and checks its status.
pub fn parse_scan(bytes: &[u8], msg: WiFiScanMsgType) -> Result<WiFiScanPayload, Error> {
    let payload = WiFiScanPayload::decode(bytes).map_err(Error::decode("WiFiScanPayload"))?;
    if payload.msg != msg as i32 {
        return Err(Error::unexpected(
            "prov-scan response",
            format!("type {} where {msg:?} was expected", payload.msg),
        ));
    }
    Error::check_status("prov-scan", payload.status)?;
    Ok(payload)
}

/// One network a device saw.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ScanEntry {
    /// The SSID (trailing NULs removed).
    pub ssid: String,
    /// Its channel.
    pub channel: u32,
    /// Signal strength in dBm.
    pub rssi: i32,
    /// Its security as the device reported it: `open`, `wep`, `wpa-psk`, `wpa2-psk`,
    /// `wpa-wpa2-psk`, `wpa2-enterprise`, `wpa3-psk`, `wpa2-wpa3-psk`, or `unknown (N)`.
    pub auth: String,
    /// The access point's BSSID (`aa:bb:cc:dd:ee:ff`); empty when the device sent none.
    pub bssid: String,
}

/// The name a scan entry gives an `auth` value of `wifi_scan.proto`.
fn auth_name(auth: i32) -> String {
    use crate::proto::WifiAuthMode;
    match WifiAuthMode::try_from(auth) {
        Ok(WifiAuthMode::Open) => "open".into(),
        Ok(WifiAuthMode::Wep) => "wep".into(),
        Ok(WifiAuthMode::WpaPsk) => "wpa-psk".into(),
        Ok(WifiAuthMode::Wpa2Psk) => "wpa2-psk".into(),
        Ok(WifiAuthMode::WpaWpa2Psk) => "wpa-wpa2-psk".into(),
        Ok(WifiAuthMode::Wpa2Enterprise) => "wpa2-enterprise".into(),
        Ok(WifiAuthMode::Wpa3Psk) => "wpa3-psk".into(),
        Ok(WifiAuthMode::Wpa2Wpa3Psk) => "wpa2-wpa3-psk".into(),
        Err(_) => format!("unknown ({auth})"),
    }
}

/// The entries of a `ScanResult` answer.
pub fn parse_scan_entries(bytes: &[u8]) -> Result<Vec<ScanEntry>, Error> {
    match parse_scan(bytes, WiFiScanMsgType::TypeRespScanResult)?.payload {
        Some(wi_fi_scan_payload::Payload::RespScanResult(result)) => Ok(result
            .entries
            .into_iter()
            .map(|entry| ScanEntry {
                ssid: String::from_utf8_lossy(&entry.ssid)
                    .trim_end_matches('\0')
                    .to_owned(),
                channel: entry.channel,
                rssi: entry.rssi,
                auth: auth_name(entry.auth),
                bssid: entry
                    .bssid
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":"),
            })
            .collect()),
        None => Ok(Vec::new()),
        _ => Err(Error::unexpected("ScanResult response", "other member")),
    }
}

/// The result count of a `ScanStatus` answer (`None` while the scan runs).
pub fn parse_scan_status(bytes: &[u8]) -> Result<Option<u32>, Error> {
    match parse_scan(bytes, WiFiScanMsgType::TypeRespScanStatus)?.payload {
        Some(wi_fi_scan_payload::Payload::RespScanStatus(status)) => {
            Ok(status.scan_finished.then_some(status.result_count))
        }
        None => Ok(None),
        _ => Err(Error::unexpected("ScanStatus response", "other member")),
    }
}
