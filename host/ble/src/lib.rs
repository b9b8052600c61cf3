//! Onboarding transports and the provisioning client of the gateway.
//!
//! * [`central`]: a BLE central on btleplug (BlueZ over D-Bus on Linux). It scans for
//!   devices advertising the provisioning service or a `PROV_` name, connects (one
//!   connection attempt at a time per adapter), maps endpoints by their 0x2901 user
//!   descriptions and runs each request as write-with-response then read.
//! * [`softap`]: the SoftAP/HTTP transport: `POST /<endpoint>` with the session cookie.
//! * [`client`]: [`ProvClient`] drives a device over either transport: `proto-ver`,
//!   the security handshake, Wi-Fi scan/config/apply/status, control reset, and the
//!   RainMaker claim steps.

pub mod central;
pub mod client;
mod error;
pub mod softap;

pub use client::{ClaimCsr, ProvClient};
pub use error::Error;

use std::time::Duration;

/// One device link: the transport a [`ProvClient`] talks through.
pub enum Link {
    /// A BLE GATT connection.
    Ble(central::BleLink),
    /// An HTTP connection to the device's SoftAP address.
    Http(softap::HttpLink),
}

impl Link {
    /// Sends one request to `endpoint` and returns the device's answer.
    pub async fn exchange(&mut self, endpoint: &str, request: &[u8]) -> Result<Vec<u8>, Error> {
        let limit = self.max_payload();
        if request.len() > limit {
            return Err(Error::TooLarge {
                endpoint: endpoint.to_owned(),
                len: request.len(),
                limit,
            });
        }
        let response = match self {
            Self::Ble(link) => link.exchange(endpoint, request).await,
            Self::Http(link) => link.exchange(endpoint, request).await,
        }?;
        if response.len() > limit {
            return Err(Error::TooLarge {
                endpoint: format!("{endpoint} (the device's answer)"),
                len: response.len(),
                limit,
            });
        }
        Ok(response)
    }

    /// The largest request (and response) the transport carries.
    pub fn max_payload(&self) -> usize {
        match self {
            Self::Ble(link) => link.max_payload(),
            Self::Http(_) => outpost_protocomm::HTTP_MAX_BODY,
        }
    }

    /// Whether this is BLE (scan results are paged 4 at a time there).
    pub fn is_ble(&self) -> bool {
        matches!(self, Self::Ble(_))
    }

    /// Whether the device offers `endpoint` (BLE knows from its GATT table; HTTP does not).
    pub fn has_endpoint(&self, endpoint: &str) -> bool {
        match self {
            Self::Ble(link) => link.has_endpoint(endpoint),
            Self::Http(_) => true,
        }
    }

    /// Ends the link (BLE disconnect; HTTP drops the socket).
    pub async fn close(self) {
        match self {
            Self::Ble(link) => link.close().await,
            Self::Http(link) => drop(link),
        }
    }
}

/// Time limits of one device session.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// One request/response exchange.
    pub request: Duration,
    /// Connecting and discovering the GATT table (BLE) or the TCP connect (HTTP).
    pub connect: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            request: Duration::from_secs(10),
            connect: Duration::from_secs(20),
        }
    }
}
