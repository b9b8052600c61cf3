//! The one error type of the crate.

/// What went wrong while talking to a device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// BlueZ / btleplug refused or failed.
    #[error("Bluetooth: {0}")]
    Ble(#[from] btleplug::Error),
    /// No adapter, or not the configured one.
    #[error("{0}")]
    NoAdapter(String),
    /// The device dropped the link or never answered (a GATT error or a closed socket
    /// without a response is how protocomm devices refuse a request).
    #[error("the device dropped the link during {during}: {detail}")]
    Dropped {
        /// The endpoint or step.
        during: String,
        /// What the transport said.
        detail: String,
    },
    /// A step took too long.
    #[error("timed out after {after:?} during {during}")]
    Timeout {
        /// The endpoint or step.
        during: String,
        /// The limit.
        after: std::time::Duration,
    },
    /// A request too large for the transport.
    #[error("request to {endpoint} is {len} bytes; the transport carries at most {limit}")]
    TooLarge {
        /// The endpoint.
        endpoint: String,
        /// Its size.
        len: usize,
        /// The transport's limit.
        limit: usize,
    },
    /// The device does not have this endpoint.
    #[error("the device has no {0} endpoint")]
    MissingEndpoint(String),
    /// HTTP-level failure (connect, status code).
    #[error("HTTP: {0}")]
    Http(String),
    /// A protocomm-level failure (malformed answer, bad status, crypto).
    #[error(transparent)]
    Protocol(#[from] outpost_protocomm::Error),
}

impl Error {
    /// Whether the link is gone (the session cannot continue).
    pub fn is_dropped(&self) -> bool {
        matches!(self, Self::Dropped { .. } | Self::Ble(_))
    }
}
