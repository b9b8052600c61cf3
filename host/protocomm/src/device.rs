//! The device role: one protocomm instance answering endpoint requests.

use crate::security::{DeviceHandshake, DeviceRandomness, DeviceSecurity, SessionCipher};
use crate::{Error, ProtoVersion, SESSION_ENDPOINT, VERSION_ENDPOINT};

/// The device application: answers the decrypted request of an endpoint other than
/// `proto-ver` and `prov-session`.
pub type Application<'a> = dyn FnMut(&str, &[u8]) -> Result<Vec<u8>, Error> + 'a;

/// What kind of endpoint a name is, from the device's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `proto-ver`: plaintext, always available.
    Version,
    /// `prov-session`: plaintext handshake.
    Session,
    /// Anything else: encrypted under the session.
    Request,
}

impl Endpoint {
    /// Classifies an endpoint name.
    pub fn of(name: &str) -> Self {
        match name {
            VERSION_ENDPOINT => Self::Version,
            SESSION_ENDPOINT => Self::Session,
            _ => Self::Request,
        }
    }
}

/// One device's protocomm state: its security configuration, its `proto-ver` answer and
/// the current session (one at a time, as on ESP-IDF).
pub struct DeviceSession {
    security: DeviceSecurity,
    version: String,
    fixed_randomness: Option<DeviceRandomness>,
    handshake: Option<DeviceHandshake>,
    cipher: Option<SessionCipher>,
}

impl DeviceSession {
    /// A device with `security` that answers `proto-ver` with `version`.
    pub fn new(security: DeviceSecurity, version: &ProtoVersion) -> Self {
        Self {
            security,
            version: version.to_json(),
            fixed_randomness: None,
            handshake: None,
            cipher: None,
        }
    }

    /// Uses `random` for every session instead of fresh randomness (transcript tests).
    pub fn with_randomness(mut self, random: DeviceRandomness) -> Self {
        self.fixed_randomness = Some(random);
        self
    }

    /// Drops the current session (a new BLE connection or HTTP session id).
    pub fn reset(&mut self) {
        self.handshake = None;
        self.cipher = None;
    }

    /// Whether a session is established.
    pub fn is_established(&self) -> bool {
        self.cipher.is_some()
    }

    /// Answers one request on `endpoint`. `app` handles the decrypted requests of every
    /// other endpoint. An error means the device drops the link; the session is reset.
    pub fn handle(
        &mut self,
        endpoint: &str,
        request: &[u8],
        app: &mut Application<'_>,
    ) -> Result<Vec<u8>, Error> {
        let result = self.dispatch(endpoint, request, app);
        if result.is_err() {
            self.reset();
        }
        result
    }

    fn dispatch(
        &mut self,
        endpoint: &str,
        request: &[u8],
        app: &mut Application<'_>,
    ) -> Result<Vec<u8>, Error> {
        if request.is_empty() {
            return Err(Error::Empty("request"));
        }
        match Endpoint::of(endpoint) {
            Endpoint::Version => Ok(self.version.clone().into_bytes()),
            Endpoint::Session => {
                // A command 0 after a finished (or failed) handshake starts over, as the
                // firmware's session handler does.
                if self.cipher.is_some() || self.handshake.is_none() {
                    self.cipher = None;
                    self.handshake = Some(match self.fixed_randomness {
                        Some(random) => {
                            DeviceHandshake::with_randomness(self.security.clone(), random)
                        }
                        None => DeviceHandshake::new(self.security.clone())?,
                    });
                }
                let handshake = self.handshake.as_mut().expect("set above");
                let (response, cipher) = handshake.handle(request)?;
                if let Some(cipher) = cipher {
                    self.handshake = None;
                    self.cipher = Some(cipher);
                }
                Ok(response)
            }
            Endpoint::Request => {
                let cipher = self.cipher.as_mut().ok_or(Error::NoSession)?;
                let plain = cipher.decrypt(request)?;
                let response = app(endpoint, &plain)?;
                cipher.encrypt(&response)
            }
        }
    }
}
