//! The provisioning client: one device session over a [`Link`].

use std::time::{Duration, Instant};

use outpost_protocomm::proto::{RMakerClaimMsgType, WiFiScanMsgType};
use outpost_protocomm::wifi::{self, ScanEntry, WifiStatus};
use outpost_protocomm::{
    CLAIM_ENDPOINT, CONFIG_ENDPOINT, CTRL_ENDPOINT, ClientCredentials, ClientHandshake,
    ProtoVersion, SCAN_ENDPOINT, SESSION_ENDPOINT, SessionCipher, Step, VERSION_ENDPOINT, claim,
};

use crate::{Error, Link};

/// Drives one device: version, session, Wi-Fi, claim.
pub struct ProvClient {
    link: Link,
    cipher: Option<SessionCipher>,
    crypto_time: Duration,
}

/// The CSR a device produced during claiming, as the JSON document it sent.
#[derive(Clone, Debug)]
pub struct ClaimCsr {
    /// The document (`{"csr":"…","send_mqtt_host":true}`), ready for the authority.
    pub document: Vec<u8>,
    /// Its parsed form.
    pub parsed: claim::CsrDocument,
}

impl ProvClient {
    /// A client over `link`; no session yet.
    pub fn new(link: Link) -> Self {
        Self {
            link,
            cipher: None,
            crypto_time: Duration::ZERO,
        }
    }

    /// Time spent in the session's cryptography so far (handshake and records).
    pub fn crypto_time(&self) -> Duration {
        self.crypto_time
    }

    /// Reads `proto-ver` (plaintext; the write must carry at least one byte).
    pub async fn version(&mut self) -> Result<ProtoVersion, Error> {
        let answer = self.link.exchange(VERSION_ENDPOINT, b"ESP").await?;
        Ok(ProtoVersion::parse(&answer)?)
    }

    /// Runs the security handshake. A device that drops the link at the proof step is
    /// rejecting the PoP or SRP credentials, and is reported as such.
    pub async fn establish(&mut self, credentials: ClientCredentials) -> Result<(), Error> {
        let started = Instant::now();
        let (mut handshake, mut message) = ClientHandshake::start(credentials)?;
        self.crypto_time += started.elapsed();
        loop {
            let answer = match self.link.exchange(SESSION_ENDPOINT, &message).await {
                Ok(answer) => answer,
                Err(err) if err.is_dropped() && handshake.awaiting_proof_verdict() => {
                    return Err(Error::Protocol(outpost_protocomm::Error::ProofRejected));
                }
                Err(err) => return Err(err),
            };
            let started = Instant::now();
            let step = handshake.step(&answer);
            self.crypto_time += started.elapsed();
            match step? {
                Step::Send(next) => message = next,
                Step::Established(cipher) => {
                    self.cipher = Some(cipher);
                    return Ok(());
                }
            }
        }
    }

    /// One encrypted request: plaintext in, plaintext out.
    pub async fn request(&mut self, endpoint: &str, plain: &[u8]) -> Result<Vec<u8>, Error> {
        let cipher = self
            .cipher
            .as_mut()
            .ok_or(Error::Protocol(outpost_protocomm::Error::NoSession))?;
        let started = Instant::now();
        let data = cipher.encrypt(plain)?;
        self.crypto_time += started.elapsed();
        let answer = self.link.exchange(endpoint, &data).await?;
        let started = Instant::now();
        let cipher = self.cipher.as_mut().expect("checked above");
        let plain = cipher.decrypt(&answer);
        self.crypto_time += started.elapsed();
        Ok(plain?)
    }

    /// Scans for networks (blocking scan, then the results in pages: 4 per request
    /// over BLE, as esp_prov does, to stay under the characteristic limit).
    pub async fn scan(&mut self) -> Result<Vec<ScanEntry>, Error> {
        let (group, period) = if self.link.is_ble() { (0, 0) } else { (5, 120) };
        let answer = self
            .request(SCAN_ENDPOINT, &wifi::scan_start(group, period))
            .await?;
        wifi::parse_scan(&answer, WiFiScanMsgType::TypeRespScanStart)?;
        let mut count = None;
        for _ in 0..50 {
            let answer = self.request(SCAN_ENDPOINT, &wifi::scan_status()).await?;
            count = wifi::parse_scan_status(&answer)?;
            if count.is_some() {
                break;
            }
        }
        let count = count.ok_or_else(|| Error::Timeout {
            during: "Wi-Fi scan".into(),
            after: Duration::ZERO,
        })?;
        let page = if self.link.is_ble() { 4 } else { 100 };
        let mut entries = Vec::new();
        let mut start = 0;
        while start < count {
            let n = page.min(count - start);
            let answer = self
                .request(SCAN_ENDPOINT, &wifi::scan_result(start, n))
                .await?;
            entries.extend(wifi::parse_scan_entries(&answer)?);
            start += n;
        }
        Ok(entries)
    }

    /// Sends the station credentials and applies them.
    pub async fn configure_wifi(&mut self, ssid: &[u8], passphrase: &[u8]) -> Result<(), Error> {
        let answer = self
            .request(CONFIG_ENDPOINT, &wifi::set_config(ssid, passphrase)?)
            .await?;
        wifi::parse_set_config(&answer)?;
        let answer = self.request(CONFIG_ENDPOINT, &wifi::apply_config()).await?;
        Ok(wifi::parse_apply_config(&answer)?)
    }

    /// Asks for the station state.
    pub async fn wifi_status(&mut self) -> Result<WifiStatus, Error> {
        let answer = self.request(CONFIG_ENDPOINT, &wifi::get_status()).await?;
        Ok(wifi::parse_status(&answer)?)
    }

    /// Clears a failed station config so new credentials can be sent (`prov-ctrl`
    /// Reset), when the device has the control endpoint.
    pub async fn reset_wifi(&mut self) -> Result<bool, Error> {
        if !self.link.has_endpoint(CTRL_ENDPOINT) {
            return Ok(false);
        }
        let answer = self.request(CTRL_ENDPOINT, &wifi::ctrl_reset()).await?;
        wifi::parse_ctrl_reset(&answer)?;
        Ok(true)
    }

    async fn claim_step(
        &mut self,
        request: &[u8],
        sent: RMakerClaimMsgType,
    ) -> Result<outpost_protocomm::proto::PayloadBuf, Error> {
        let answer = self.request(CLAIM_ENDPOINT, request).await?;
        Ok(claim::parse_response(&answer, sent)?)
    }

    /// Claim Start: the device's `{"mac_addr", "platform"}`.
    pub async fn claim_start(&mut self) -> Result<claim::StartInfo, Error> {
        let buf = self
            .claim_step(&claim::start(), RMakerClaimMsgType::TypeCmdClaimStart)
            .await?;
        serde_json::from_slice(&buf.payload).map_err(|err| {
            Error::Protocol(outpost_protocomm::Error::Invalid {
                what: "claim start document",
                detail: err.to_string(),
            })
        })
    }

    /// Claim Init with the authority's initiate answer, then fetches every CSR fragment.
    pub async fn claim_csr(
        &mut self,
        initiate: &claim::InitiateResponse,
    ) -> Result<ClaimCsr, Error> {
        let init = serde_json::to_vec(initiate).expect("plain data serialises");
        let mut buf = self
            .claim_step(&claim::init(&init)?, RMakerClaimMsgType::TypeCmdClaimInit)
            .await?;
        let mut reassembly = claim::Reassembly::default();
        let mut fragments = 0;
        let document = loop {
            if let Some(document) = reassembly.push(&buf)? {
                break document;
            }
            fragments += 1;
            if fragments > claim::MAX_CLAIM_DOCUMENT {
                return Err(Error::Protocol(outpost_protocomm::Error::Invalid {
                    what: "CSR fragments",
                    detail: "the device never completed the document".into(),
                }));
            }
            buf = self
                .claim_step(
                    &claim::next_fragment(),
                    RMakerClaimMsgType::TypeCmdClaimInit,
                )
                .await?;
        };
        let parsed = serde_json::from_slice(&document).map_err(|err| {
            Error::Protocol(outpost_protocomm::Error::Invalid {
                what: "CSR document",
                detail: err.to_string(),
            })
        })?;
        Ok(ClaimCsr { document, parsed })
    }

    /// Claim Verify: pushes the authority's answer (with the certificate) in chunks.
    pub async fn claim_verify(&mut self, verify: &claim::VerifyResponse) -> Result<(), Error> {
        let document = serde_json::to_vec(verify).expect("plain data serialises");
        for chunk in claim::verify_chunks(&document)? {
            self.claim_step(&chunk, RMakerClaimMsgType::TypeCmdClaimVerify)
                .await?;
        }
        Ok(())
    }

    /// Claim Abort: the device returns to "key generated" and can be claimed again.
    pub async fn claim_abort(&mut self) -> Result<(), Error> {
        self.claim_step(&claim::abort(), RMakerClaimMsgType::TypeCmdClaimAbort)
            .await
            .map(drop)
    }

    /// Ends the session and the link.
    pub async fn close(self) {
        self.link.close().await;
    }
}
