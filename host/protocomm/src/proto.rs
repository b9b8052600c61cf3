//! The protobuf messages of protocomm, Espressif Wi-Fi provisioning and RainMaker claiming.
//!
//! Written by hand with `prost` derives from the field numbers in the `.proto` files of
//! ESP-IDF (`components/protocomm/proto`, `components/wifi_provisioning/proto`) and
//! ESP RainMaker (`esp_rmaker_claim.proto`); no `protoc` is needed. Every schema is proto3,
//! so zero values (`msg = 0`, `status = 0`, `sec_ver = 0`) never appear on the wire and
//! decode as their defaults. Names follow the `.proto` files so they can be checked
//! against them line by line; the field comments say only what the schema does not.
#![allow(missing_docs)] // one doc per message would repeat its `.proto` name

/// `constants.proto`: the status shared by the session and Wi-Fi messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Status {
    Success = 0,
    InvalidSecScheme = 1,
    InvalidProto = 2,
    TooManySessions = 3,
    InvalidArgument = 4,
    InternalError = 5,
    CryptoError = 6,
    InvalidSession = 7,
}

/// `session.proto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum SecSchemeVersion {
    SecScheme0 = 0,
    SecScheme1 = 1,
    SecScheme2 = 2,
}

/// `session.proto`: what `prov-session` carries both ways. (There is no field 1.)
#[derive(Clone, PartialEq, prost::Message)]
pub struct SessionData {
    #[prost(enumeration = "SecSchemeVersion", tag = "2")]
    pub sec_ver: i32,
    #[prost(oneof = "session_data::Proto", tags = "10, 11, 12")]
    pub proto: Option<session_data::Proto>,
}

/// The `proto` oneof of [`SessionData`].
pub mod session_data {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Proto {
        #[prost(message, tag = "10")]
        Sec0(super::Sec0Payload),
        #[prost(message, tag = "11")]
        Sec1(super::Sec1Payload),
        #[prost(message, tag = "12")]
        Sec2(super::Sec2Payload),
    }
}

// ---- sec0.proto ----

#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct S0SessionCmd {}

#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct S0SessionResp {
    #[prost(enumeration = "Status", tag = "1")]
    pub status: i32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Sec0MsgType {
    S0SessionCommand = 0,
    S0SessionResponse = 1,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Sec0Payload {
    #[prost(enumeration = "Sec0MsgType", tag = "1")]
    pub msg: i32,
    #[prost(oneof = "sec0_payload::Payload", tags = "20, 21")]
    pub payload: Option<sec0_payload::Payload>,
}

/// The `payload` oneof of [`Sec0Payload`].
pub mod sec0_payload {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Payload {
        #[prost(message, tag = "20")]
        Sc(super::S0SessionCmd),
        #[prost(message, tag = "21")]
        Sr(super::S0SessionResp),
    }
}

// ---- sec1.proto ----

#[derive(Clone, PartialEq, prost::Message)]
pub struct SessionCmd0 {
    #[prost(bytes = "vec", tag = "1")]
    pub client_pubkey: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SessionResp0 {
    #[prost(enumeration = "Status", tag = "1")]
    pub status: i32,
    #[prost(bytes = "vec", tag = "2")]
    pub device_pubkey: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    pub device_random: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SessionCmd1 {
    /// Field 2, not 1.
    #[prost(bytes = "vec", tag = "2")]
    pub client_verify_data: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SessionResp1 {
    #[prost(enumeration = "Status", tag = "1")]
    pub status: i32,
    /// Field 3, not 2.
    #[prost(bytes = "vec", tag = "3")]
    pub device_verify_data: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Sec1MsgType {
    SessionCommand0 = 0,
    SessionResponse0 = 1,
    SessionCommand1 = 2,
    SessionResponse1 = 3,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Sec1Payload {
    #[prost(enumeration = "Sec1MsgType", tag = "1")]
    pub msg: i32,
    #[prost(oneof = "sec1_payload::Payload", tags = "20, 21, 22, 23")]
    pub payload: Option<sec1_payload::Payload>,
}

/// The `payload` oneof of [`Sec1Payload`].
pub mod sec1_payload {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Payload {
        #[prost(message, tag = "20")]
        Sc0(super::SessionCmd0),
        #[prost(message, tag = "21")]
        Sr0(super::SessionResp0),
        #[prost(message, tag = "22")]
        Sc1(super::SessionCmd1),
        #[prost(message, tag = "23")]
        Sr1(super::SessionResp1),
    }
}

// ---- sec2.proto ----

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Sec2MsgType {
    S2SessionCommand0 = 0,
    S2SessionResponse0 = 1,
    S2SessionCommand1 = 2,
    S2SessionResponse1 = 3,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct S2SessionCmd0 {
    #[prost(bytes = "vec", tag = "1")]
    pub client_username: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub client_pubkey: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct S2SessionResp0 {
    #[prost(enumeration = "Status", tag = "1")]
    pub status: i32,
    #[prost(bytes = "vec", tag = "2")]
    pub device_pubkey: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    pub device_salt: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct S2SessionCmd1 {
    #[prost(bytes = "vec", tag = "1")]
    pub client_proof: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct S2SessionResp1 {
    #[prost(enumeration = "Status", tag = "1")]
    pub status: i32,
    #[prost(bytes = "vec", tag = "2")]
    pub device_proof: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    pub device_nonce: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Sec2Payload {
    #[prost(enumeration = "Sec2MsgType", tag = "1")]
    pub msg: i32,
    #[prost(oneof = "sec2_payload::Payload", tags = "20, 21, 22, 23")]
    pub payload: Option<sec2_payload::Payload>,
}

/// The `payload` oneof of [`Sec2Payload`].
pub mod sec2_payload {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Payload {
        #[prost(message, tag = "20")]
        Sc0(super::S2SessionCmd0),
        #[prost(message, tag = "21")]
        Sr0(super::S2SessionResp0),
        #[prost(message, tag = "22")]
        Sc1(super::S2SessionCmd1),
        #[prost(message, tag = "23")]
        Sr1(super::S2SessionResp1),
    }
}

// ---- wifi_constants.proto ----

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum WifiStationState {
    Connected = 0,
    Connecting = 1,
    Disconnected = 2,
    ConnectionFailed = 3,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum WifiConnectFailedReason {
    AuthError = 0,
    NetworkNotFound = 1,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum WifiAuthMode {
    Open = 0,
    Wep = 1,
    WpaPsk = 2,
    Wpa2Psk = 3,
    WpaWpa2Psk = 4,
    Wpa2Enterprise = 5,
    Wpa3Psk = 6,
    Wpa2Wpa3Psk = 7,
}

#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct WifiAttemptFailed {
    #[prost(uint32, tag = "1")]
    pub attempts_remaining: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct WifiConnectedState {
    #[prost(string, tag = "1")]
    pub ip4_addr: String,
    #[prost(enumeration = "WifiAuthMode", tag = "2")]
    pub auth_mode: i32,
    #[prost(bytes = "vec", tag = "3")]
    pub ssid: Vec<u8>,
    #[prost(bytes = "vec", tag = "4")]
    pub bssid: Vec<u8>,
    #[prost(int32, tag = "5")]
    pub channel: i32,
}

// ---- wifi_config.proto (prov-config) ----

#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct CmdGetStatus {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RespGetStatus {
    #[prost(enumeration = "Status", tag = "1")]
    pub status: i32,
    #[prost(enumeration = "WifiStationState", tag = "2")]
    pub sta_state: i32,
    #[prost(oneof = "resp_get_status::State", tags = "10, 11, 12")]
    pub state: Option<resp_get_status::State>,
}

/// The `state` oneof of [`RespGetStatus`].
pub mod resp_get_status {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum State {
        #[prost(enumeration = "super::WifiConnectFailedReason", tag = "10")]
        FailReason(i32),
        #[prost(message, tag = "11")]
        Connected(super::WifiConnectedState),
        #[prost(message, tag = "12")]
        AttemptFailed(super::WifiAttemptFailed),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CmdSetConfig {
    #[prost(bytes = "vec", tag = "1")]
    pub ssid: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub passphrase: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    pub bssid: Vec<u8>,
    #[prost(int32, tag = "4")]
    pub channel: i32,
}

#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct RespSetConfig {
    #[prost(enumeration = "Status", tag = "1")]
    pub status: i32,
}

#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct CmdApplyConfig {}

#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct RespApplyConfig {
    #[prost(enumeration = "Status", tag = "1")]
    pub status: i32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum WiFiConfigMsgType {
    TypeCmdGetStatus = 0,
    TypeRespGetStatus = 1,
    TypeCmdSetConfig = 2,
    TypeRespSetConfig = 3,
    TypeCmdApplyConfig = 4,
    TypeRespApplyConfig = 5,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct WiFiConfigPayload {
    #[prost(enumeration = "WiFiConfigMsgType", tag = "1")]
    pub msg: i32,
    #[prost(
        oneof = "wi_fi_config_payload::Payload",
        tags = "10, 11, 12, 13, 14, 15"
    )]
    pub payload: Option<wi_fi_config_payload::Payload>,
}

/// The `payload` oneof of [`WiFiConfigPayload`].
pub mod wi_fi_config_payload {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Payload {
        #[prost(message, tag = "10")]
        CmdGetStatus(super::CmdGetStatus),
        #[prost(message, tag = "11")]
        RespGetStatus(super::RespGetStatus),
        #[prost(message, tag = "12")]
        CmdSetConfig(super::CmdSetConfig),
        #[prost(message, tag = "13")]
        RespSetConfig(super::RespSetConfig),
        #[prost(message, tag = "14")]
        CmdApplyConfig(super::CmdApplyConfig),
        #[prost(message, tag = "15")]
        RespApplyConfig(super::RespApplyConfig),
    }
}

// ---- wifi_scan.proto (prov-scan) ----

#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct CmdScanStart {
    #[prost(bool, tag = "1")]
    pub blocking: bool,
    #[prost(bool, tag = "2")]
    pub passive: bool,
    #[prost(uint32, tag = "3")]
    pub group_channels: u32,
    #[prost(uint32, tag = "4")]
    pub period_ms: u32,
}

#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct RespScanStart {}

#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct CmdScanStatus {}

#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct RespScanStatus {
    #[prost(bool, tag = "1")]
    pub scan_finished: bool,
    #[prost(uint32, tag = "2")]
    pub result_count: u32,
}

#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct CmdScanResult {
    #[prost(uint32, tag = "1")]
    pub start_index: u32,
    #[prost(uint32, tag = "2")]
    pub count: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct WiFiScanResult {
    #[prost(bytes = "vec", tag = "1")]
    pub ssid: Vec<u8>,
    #[prost(uint32, tag = "2")]
    pub channel: u32,
    #[prost(int32, tag = "3")]
    pub rssi: i32,
    #[prost(bytes = "vec", tag = "4")]
    pub bssid: Vec<u8>,
    #[prost(enumeration = "WifiAuthMode", tag = "5")]
    pub auth: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RespScanResult {
    #[prost(message, repeated, tag = "1")]
    pub entries: Vec<WiFiScanResult>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum WiFiScanMsgType {
    TypeCmdScanStart = 0,
    TypeRespScanStart = 1,
    TypeCmdScanStatus = 2,
    TypeRespScanStatus = 3,
    TypeCmdScanResult = 4,
    TypeRespScanResult = 5,
}

/// Note `status` lives here, in the outer message (field 2), unlike `wifi_config`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WiFiScanPayload {
    #[prost(enumeration = "WiFiScanMsgType", tag = "1")]
    pub msg: i32,
    #[prost(enumeration = "Status", tag = "2")]
    pub status: i32,
    #[prost(oneof = "wi_fi_scan_payload::Payload", tags = "10, 11, 12, 13, 14, 15")]
    pub payload: Option<wi_fi_scan_payload::Payload>,
}

/// The `payload` oneof of [`WiFiScanPayload`].
pub mod wi_fi_scan_payload {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Payload {
        #[prost(message, tag = "10")]
        CmdScanStart(super::CmdScanStart),
        #[prost(message, tag = "11")]
        RespScanStart(super::RespScanStart),
        #[prost(message, tag = "12")]
        CmdScanStatus(super::CmdScanStatus),
        #[prost(message, tag = "13")]
        RespScanStatus(super::RespScanStatus),
        #[prost(message, tag = "14")]
        CmdScanResult(super::CmdScanResult),
        #[prost(message, tag = "15")]
        RespScanResult(super::RespScanResult),
    }
}

// ---- wifi_ctrl.proto (prov-ctrl) ----

#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct CmdCtrlReset {}
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct RespCtrlReset {}
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct CmdCtrlReprov {}
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct RespCtrlReprov {}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum WiFiCtrlMsgType {
    TypeCtrlReserved = 0,
    TypeCmdCtrlReset = 1,
    TypeRespCtrlReset = 2,
    TypeCmdCtrlReprov = 3,
    TypeRespCtrlReprov = 4,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct WiFiCtrlPayload {
    #[prost(enumeration = "WiFiCtrlMsgType", tag = "1")]
    pub msg: i32,
    #[prost(enumeration = "Status", tag = "2")]
    pub status: i32,
    #[prost(oneof = "wi_fi_ctrl_payload::Payload", tags = "11, 12, 13, 14")]
    pub payload: Option<wi_fi_ctrl_payload::Payload>,
}

/// The `payload` oneof of [`WiFiCtrlPayload`].
pub mod wi_fi_ctrl_payload {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Payload {
        #[prost(message, tag = "11")]
        CmdCtrlReset(super::CmdCtrlReset),
        #[prost(message, tag = "12")]
        RespCtrlReset(super::RespCtrlReset),
        #[prost(message, tag = "13")]
        CmdCtrlReprov(super::CmdCtrlReprov),
        #[prost(message, tag = "14")]
        RespCtrlReprov(super::RespCtrlReprov),
    }
}

// ---- esp_rmaker_claim.proto (package rmaker_claim, endpoint `rmaker_claim`) ----

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum RMakerClaimStatus {
    Success = 0,
    Fail = 1,
    InvalidParam = 2,
    InvalidState = 3,
    NoMemory = 4,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PayloadBuf {
    #[prost(uint32, tag = "1")]
    pub offset: u32,
    #[prost(bytes = "vec", tag = "2")]
    pub payload: Vec<u8>,
    #[prost(uint32, tag = "3")]
    pub total_len: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RespPayload {
    #[prost(enumeration = "RMakerClaimStatus", tag = "1")]
    pub status: i32,
    #[prost(message, optional, tag = "2")]
    pub buf: Option<PayloadBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum RMakerClaimMsgType {
    TypeCmdClaimStart = 0,
    TypeRespClaimStart = 1,
    TypeCmdClaimInit = 2,
    TypeRespClaimInit = 3,
    TypeCmdClaimVerify = 4,
    TypeRespClaimVerify = 5,
    TypeCmdClaimAbort = 6,
    TypeRespClaimAbort = 7,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RMakerClaimPayload {
    #[prost(enumeration = "RMakerClaimMsgType", tag = "1")]
    pub msg: i32,
    #[prost(oneof = "r_maker_claim_payload::Payload", tags = "10, 11")]
    pub payload: Option<r_maker_claim_payload::Payload>,
}

/// The `payload` oneof of [`RMakerClaimPayload`].
pub mod r_maker_claim_payload {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Payload {
        #[prost(message, tag = "10")]
        CmdPayload(super::PayloadBuf),
        #[prost(message, tag = "11")]
        RespPayload(super::RespPayload),
    }
}
