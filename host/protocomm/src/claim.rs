//! RainMaker assisted claiming on the `rmaker_claim` endpoint (plaintext before the
//! session cipher): Start → Init (the claiming authority's initiate answer) → fetch the
//! CSR in fragments → Verify (push the certificate JSON in chunks) → or Abort.

use prost::Message;
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::proto::{
    PayloadBuf, RMakerClaimMsgType, RMakerClaimPayload, RMakerClaimStatus, RespPayload,
    r_maker_claim_payload,
};

/// The largest claim document a device buffers (and so the largest Init and Verify total).
pub const MAX_CLAIM_DOCUMENT: usize = 3071;
/// The fragment size the device uses for the CSR and the client uses to push the
/// certificate (Espressif's Android app uses the first CSR fragment's size, 200).
pub const CHUNK: usize = 200;

/// What the device sends on Start: the body of the claiming service's `initiate` call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartInfo {
    /// 12 uppercase hex digits, base MAC, no separators.
    pub mac_addr: String,
    /// IDF target, e.g. `esp32c3`.
    pub platform: String,
}

/// The claiming service's `initiate` answer, sent to the device on Init.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitiateResponse {
    /// The node id the device adopts (CSR subject `CN=<node_id>`).
    pub node_id: String,
}

/// The device's CSR document (what the client reassembles and relays to `verify`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CsrDocument {
    /// The CSR, PEM.
    pub csr: String,
    /// Asks the service for the MQTT host.
    #[serde(default)]
    pub send_mqtt_host: bool,
}

/// The `verify` answer pushed back to the device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyResponse {
    /// The device certificate, PEM.
    pub certificate: String,
    /// The MQTT endpoint for the device, when the service gives one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt_host: Option<String>,
}

fn request(msg: RMakerClaimMsgType, buf: PayloadBuf) -> Vec<u8> {
    RMakerClaimPayload {
        msg: msg as i32,
        payload: Some(r_maker_claim_payload::Payload::CmdPayload(buf)),
    }
    .encode_to_vec()
}

/// Start.
pub fn start() -> Vec<u8> {
    request(RMakerClaimMsgType::TypeCmdClaimStart, PayloadBuf::default())
}

/// Init with the whole initiate answer (one message).
pub fn init(initiate_json: &[u8]) -> Result<Vec<u8>, Error> {
    if initiate_json.is_empty() || initiate_json.len() > MAX_CLAIM_DOCUMENT {
        return Err(Error::invalid(
            "claim init document",
            format!(
                "{} bytes, must be 1..={MAX_CLAIM_DOCUMENT}",
                initiate_json.len()
            ),
        ));
    }
    Ok(request(
        RMakerClaimMsgType::TypeCmdClaimInit,
        PayloadBuf {
            offset: 0,
            payload: initiate_json.to_vec(),
            total_len: initiate_json.len() as u32,
        },
    ))
}

/// An empty Init asking for the next CSR fragment.
pub fn next_fragment() -> Vec<u8> {
    request(RMakerClaimMsgType::TypeCmdClaimInit, PayloadBuf::default())
}

/// The Verify chunks carrying `document` (the verify answer JSON).
pub fn verify_chunks(document: &[u8]) -> Result<Vec<Vec<u8>>, Error> {
    if document.is_empty() || document.len() > MAX_CLAIM_DOCUMENT {
        return Err(Error::invalid(
            "certificate document",
            format!("{} bytes, must be 1..={MAX_CLAIM_DOCUMENT}", document.len()),
        ));
    }
    let total = document.len() as u32;
    Ok(document
        .chunks(CHUNK)
        .enumerate()
        .map(|(i, chunk)| {
            request(
                RMakerClaimMsgType::TypeCmdClaimVerify,
                PayloadBuf {
                    offset: (i * CHUNK) as u32,
                    payload: chunk.to_vec(),
                    total_len: total,
                },
            )
        })
        .collect())
}

/// Abort.
pub fn abort() -> Vec<u8> {
    request(RMakerClaimMsgType::TypeCmdClaimAbort, PayloadBuf::default())
}

/// Decodes the device's answer to a request of type `sent`; a status other than
/// Success is an error naming it.
pub fn parse_response(bytes: &[u8], sent: RMakerClaimMsgType) -> Result<PayloadBuf, Error> {
    let payload = RMakerClaimPayload::decode(bytes).map_err(Error::decode("RMakerClaimPayload"))?;
    if payload.msg != sent as i32 + 1 {
        return Err(Error::unexpected(
            "rmaker_claim response",
            format!("type {} in answer to {sent:?}", payload.msg),
        ));
    }
    let resp = match payload.payload {
        Some(r_maker_claim_payload::Payload::RespPayload(resp)) => resp,
        None => RespPayload::default(),
        Some(_) => return Err(Error::unexpected("rmaker_claim response", "a command")),
    };
    match RMakerClaimStatus::try_from(resp.status) {
        Ok(RMakerClaimStatus::Success) => Ok(resp.buf.unwrap_or_default()),
        Ok(status) => Err(Error::Unexpected {
            what: "claim step",
            detail: format!("the device answered {sent:?} with {status:?}"),
        }),
        Err(_) => Err(Error::unexpected(
            "claim status",
            format!("unknown value {}", resp.status),
        )),
    }
}

/// Builds a device's answer (device role).
pub fn response(sent: i32, status: RMakerClaimStatus, buf: Option<PayloadBuf>) -> Vec<u8> {
    RMakerClaimPayload {
        msg: sent + 1,
        payload: Some(r_maker_claim_payload::Payload::RespPayload(RespPayload {
            status: status as i32,
            buf,
        })),
    }
    .encode_to_vec()
}

/// Reassembles a document sent in offset-addressed fragments (both roles).
#[derive(Debug, Default)]
pub struct Reassembly {
    data: Vec<u8>,
    total: usize,
}

impl Reassembly {
    /// Adds one fragment; returns the whole document once `offset + len == total`.
    /// Offset 0 restarts; a fragment out of place or beyond the limit is an error.
    pub fn push(&mut self, buf: &PayloadBuf) -> Result<Option<Vec<u8>>, Error> {
        let offset = buf.offset as usize;
        let total = buf.total_len as usize;
        if offset == 0 {
            self.data.clear();
            self.total = total;
        }
        if total == 0 || total > MAX_CLAIM_DOCUMENT || total != self.total {
            return Err(Error::invalid(
                "claim fragment",
                format!("total length {total} (expected 1..={MAX_CLAIM_DOCUMENT}, constant)"),
            ));
        }
        if offset != self.data.len() || offset + buf.payload.len() > total {
            return Err(Error::invalid(
                "claim fragment",
                format!(
                    "offset {offset} + {} bytes does not continue {} of {total}",
                    buf.payload.len(),
                    self.data.len()
                ),
            ));
        }
        self.data.extend_from_slice(&buf.payload);
        if self.data.len() == total {
            self.total = 0;
            Ok(Some(std::mem::take(&mut self.data)))
        } else {
            Ok(None)
        }
    }
}
