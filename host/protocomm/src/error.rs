//! The one error type of the crate.

use crate::proto::Status;

/// What went wrong in a protocomm exchange.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A message did not decode as the protobuf it must be (truncated, garbage).
    #[error("malformed {what}: {source}")]
    Decode {
        /// Which message was expected.
        what: &'static str,
        /// What the decoder said.
        source: prost::DecodeError,
    },
    /// A message decoded but is not the one this step needs.
    #[error("unexpected {what}: {detail}")]
    Unexpected {
        /// Which message was expected.
        what: &'static str,
        /// What was there instead.
        detail: String,
    },
    /// The device answered a step with a failure status.
    #[error("the device answered {step} with status {status:?}")]
    Status {
        /// The step.
        step: &'static str,
        /// The status it gave.
        status: Status,
    },
    /// The client's proof did not match: wrong proof of possession (Security 1) or
    /// wrong SRP username/password (Security 2).
    #[error("proof of possession rejected: the PoP or SRP credentials do not match the device's")]
    ProofRejected,
    /// The device's proof did not match: it does not hold the session key.
    #[error("the device's proof is wrong: it did not derive the same session key")]
    DeviceProof,
    /// A field has the wrong length or value (a public key of the wrong size, A ≡ 0 mod N, …).
    #[error("invalid {what}: {detail}")]
    Invalid {
        /// Which value.
        what: &'static str,
        /// How it is wrong.
        detail: String,
    },
    /// Encryption or authentication failed (a GCM tag mismatch, an exhausted IV counter).
    #[error("crypto failure: {0}")]
    Crypto(String),
    /// An encrypted endpoint was used before a session was established.
    #[error("no session established")]
    NoSession,
    /// A request or response was empty where protocomm needs at least one byte.
    #[error("empty {0}")]
    Empty(&'static str),
    /// The `proto-ver` answer is not the JSON it must be.
    #[error("malformed proto-ver: {0}")]
    Version(String),
    /// Randomness was not available from the operating system.
    #[error("no randomness: {0}")]
    Random(String),
}

impl Error {
    pub(crate) fn decode(what: &'static str) -> impl FnOnce(prost::DecodeError) -> Self {
        move |source| Self::Decode { what, source }
    }

    pub(crate) fn unexpected(what: &'static str, detail: impl Into<String>) -> Self {
        Self::Unexpected {
            what,
            detail: detail.into(),
        }
    }

    pub(crate) fn invalid(what: &'static str, detail: impl Into<String>) -> Self {
        Self::Invalid {
            what,
            detail: detail.into(),
        }
    }

    /// `Ok` for `Success`, else [`Error::Status`] (an unknown value counts as internal error).
    pub(crate) fn check_status(step: &'static str, status: i32) -> Result<(), Self> {
        match Status::try_from(status).unwrap_or(Status::InternalError) {
            Status::Success => Ok(()),
            status => Err(Self::Status { step, status }),
        }
    }
}

/// Fills `buf` from the operating system's random source.
pub(crate) fn random(buf: &mut [u8]) -> Result<(), Error> {
    getrandom::fill(buf).map_err(|err| Error::Random(err.to_string()))
}
