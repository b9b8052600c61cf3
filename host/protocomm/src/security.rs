//! Security 0, 1 and 2 handshakes for both roles, and the session cipher they produce.

use aes::Aes256;
use aes_gcm::aead::consts::U16;
use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, AesGcm, Nonce};
use ctr::cipher::{KeyIvInit, StreamCipher};
use num_bigint::BigUint;
use prost::Message;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::Error;
use crate::error::random;
use crate::proto::{
    S0SessionCmd, S0SessionResp, S2SessionCmd0, S2SessionCmd1, S2SessionResp0, S2SessionResp1,
    Sec0MsgType, Sec0Payload, Sec1MsgType, Sec1Payload, Sec2MsgType, Sec2Payload, SecSchemeVersion,
    SessionCmd0, SessionCmd1, SessionData, SessionResp0, SessionResp1, Status, sec0_payload,
    sec1_payload, sec2_payload, session_data,
};
use crate::srp::{self, GROUP, N_LEN};

type Aes256Ctr = ctr::Ctr128BE<Aes256>;
type Aes256Gcm16 = AesGcm<Aes256, U16>;

/// Which protocomm security scheme a device runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub enum SecurityVersion {
    /// No encryption.
    Sec0,
    /// X25519 + proof of possession + AES-256-CTR.
    Sec1,
    /// SRP-6a 3072/SHA-512 + AES-256-GCM.
    Sec2,
}

impl SecurityVersion {
    /// 0, 1 or 2.
    pub const fn number(self) -> u8 {
        match self {
            Self::Sec0 => 0,
            Self::Sec1 => 1,
            Self::Sec2 => 2,
        }
    }
}

impl TryFrom<u8> for SecurityVersion {
    type Error = String;

    fn try_from(value: u8) -> Result<Self, Self::Error> {
        match value {
            0 => Ok(Self::Sec0),
            1 => Ok(Self::Sec1),
            2 => Ok(Self::Sec2),
            other => Err(format!(
                "security version {other} does not exist (0, 1 or 2)"
            )),
        }
    }
}

impl From<SecurityVersion> for u8 {
    fn from(value: SecurityVersion) -> Self {
        value.number()
    }
}

/// What the client knows to open a session.
#[derive(Clone)]
pub enum ClientCredentials {
    /// Security 0.
    Sec0,
    /// Security 1 with a proof of possession (empty for a `no_pop` device).
    Sec1 {
        /// The PoP printed on the device or its QR code.
        pop: Vec<u8>,
    },
    /// Security 2.
    Sec2 {
        /// SRP username (`wifiprov` on Espressif's examples and RainMaker).
        username: Vec<u8>,
        /// SRP password (RainMaker: the PoP).
        password: Vec<u8>,
        /// `sec_patch_ver` from proto-ver: 1 = IV counter, 0 = one fixed 16-byte IV.
        patch_ver: u32,
    },
}

impl std::fmt::Debug for ClientCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a PoP or password.
        match self {
            Self::Sec0 => f.write_str("Sec0"),
            Self::Sec1 { .. } => f.write_str("Sec1 { pop: <redacted> }"),
            Self::Sec2 {
                username,
                patch_ver,
                ..
            } => write!(
                f,
                "Sec2 {{ username: {:?}, password: <redacted>, patch_ver: {patch_ver} }}",
                String::from_utf8_lossy(username)
            ),
        }
    }
}

impl ClientCredentials {
    /// The scheme these credentials are for.
    pub const fn version(&self) -> SecurityVersion {
        match self {
            Self::Sec0 => SecurityVersion::Sec0,
            Self::Sec1 { .. } => SecurityVersion::Sec1,
            Self::Sec2 { .. } => SecurityVersion::Sec2,
        }
    }
}

/// The next thing a handshake needs.
pub enum Step {
    /// Send these bytes to `prov-session` and feed the answer to `step` again.
    Send(Vec<u8>),
    /// The session is established.
    Established(SessionCipher),
}

impl std::fmt::Debug for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Send(bytes) => write!(f, "Send({} bytes)", bytes.len()),
            Self::Established(_) => f.write_str("Established"),
        }
    }
}

enum ClientState {
    Sec0Sent,
    Sec1Sent {
        secret: StaticSecret,
        public: [u8; 32],
        pop: Vec<u8>,
    },
    Sec1Proved {
        stream: Box<Aes256Ctr>,
        public: [u8; 32],
    },
    Sec2Sent {
        a: BigUint,
        a_wire: Vec<u8>,
        username: Vec<u8>,
        password: Vec<u8>,
        patch_ver: u32,
    },
    Sec2Proved {
        key: [u8; 64],
        m1: [u8; 64],
        a_wire: Vec<u8>,
        patch_ver: u32,
    },
    Finished,
}

/// The client side of a `prov-session` handshake.
pub struct ClientHandshake {
    state: ClientState,
}

impl ClientHandshake {
    /// Starts a handshake with fresh randomness; returns it and the first message.
    pub fn start(credentials: ClientCredentials) -> Result<(Self, Vec<u8>), Error> {
        let mut secret = [0u8; 32];
        random(&mut secret)?;
        Ok(Self::start_with_secret(credentials, secret))
    }

    /// Starts a handshake with a given ephemeral secret (the X25519 private key for
    /// Security 1, SRP's `a` for Security 2), for reproducible transcripts.
    pub fn start_with_secret(credentials: ClientCredentials, secret: [u8; 32]) -> (Self, Vec<u8>) {
        match credentials {
            ClientCredentials::Sec0 => {
                let message = SessionData {
                    sec_ver: SecSchemeVersion::SecScheme0 as i32,
                    proto: Some(session_data::Proto::Sec0(Sec0Payload {
                        msg: Sec0MsgType::S0SessionCommand as i32,
                        payload: Some(sec0_payload::Payload::Sc(S0SessionCmd {})),
                    })),
                };
                let state = ClientState::Sec0Sent;
                (Self { state }, message.encode_to_vec())
            }
            ClientCredentials::Sec1 { pop } => {
                let secret = StaticSecret::from(secret);
                let public = PublicKey::from(&secret).to_bytes();
                let message = sec1_message(
                    Sec1MsgType::SessionCommand0,
                    sec1_payload::Payload::Sc0(SessionCmd0 {
                        client_pubkey: public.to_vec(),
                    }),
                );
                let state = ClientState::Sec1Sent {
                    secret,
                    public,
                    pop,
                };
                (Self { state }, message)
            }
            ClientCredentials::Sec2 {
                username,
                password,
                patch_ver,
            } => {
                let a = BigUint::from_bytes_be(&secret);
                let a_wire = srp::pad(&GROUP.g.modpow(&a, &GROUP.n));
                let message = sec2_message(
                    Sec2MsgType::S2SessionCommand0,
                    sec2_payload::Payload::Sc0(S2SessionCmd0 {
                        client_username: username.clone(),
                        client_pubkey: a_wire.clone(),
                    }),
                );
                let state = ClientState::Sec2Sent {
                    a,
                    a_wire,
                    username,
                    password,
                    patch_ver,
                };
                (Self { state }, message)
            }
        }
    }

    /// Whether the message last returned carried the client's proof: a device that
    /// drops the link now is rejecting the PoP or SRP credentials.
    pub fn awaiting_proof_verdict(&self) -> bool {
        matches!(
            self.state,
            ClientState::Sec1Proved { .. } | ClientState::Sec2Proved { .. }
        )
    }

    /// Takes the device's answer to the last message.
    pub fn step(&mut self, response: &[u8]) -> Result<Step, Error> {
        let state = std::mem::replace(&mut self.state, ClientState::Finished);
        match state {
            ClientState::Sec0Sent => {
                let payload = match decode_session(response, SecSchemeVersion::SecScheme0)? {
                    session_data::Proto::Sec0(payload) => payload,
                    _ => return Err(wrong_scheme(0)),
                };
                match payload.payload {
                    Some(sec0_payload::Payload::Sr(S0SessionResp { status }))
                        if payload.msg == Sec0MsgType::S0SessionResponse as i32 =>
                    {
                        Error::check_status("the Security 0 session", status)?;
                        Ok(Step::Established(SessionCipher::plain()))
                    }
                    _ => Err(Error::unexpected(
                        "Security 0 response",
                        "no session response",
                    )),
                }
            }
            ClientState::Sec1Sent {
                secret,
                public,
                pop,
            } => {
                let resp = match sec1_payload(response, Sec1MsgType::SessionResponse0)? {
                    sec1_payload::Payload::Sr0(resp) => resp,
                    _ => return Err(Error::unexpected("Security 1 response 0", "other member")),
                };
                Error::check_status("Security 1 command 0", resp.status)?;
                let device_public: [u8; 32] = fixed(&resp.device_pubkey, "device public key")?;
                let device_random: [u8; 16] = fixed(&resp.device_random, "device random")?;
                let shared = secret.diffie_hellman(&PublicKey::from(device_public));
                let key = sec1_key(shared.as_bytes(), &pop);
                let mut stream = Box::new(Aes256Ctr::new(&key.into(), &device_random.into()));
                let mut verify = device_public;
                stream.apply_keystream(&mut verify);
                let message = sec1_message(
                    Sec1MsgType::SessionCommand1,
                    sec1_payload::Payload::Sc1(SessionCmd1 {
                        client_verify_data: verify.to_vec(),
                    }),
                );
                self.state = ClientState::Sec1Proved { stream, public };
                Ok(Step::Send(message))
            }
            ClientState::Sec1Proved { mut stream, public } => {
                let resp = match sec1_payload(response, Sec1MsgType::SessionResponse1)? {
                    sec1_payload::Payload::Sr1(resp) => resp,
                    _ => return Err(Error::unexpected("Security 1 response 1", "other member")),
                };
                Error::check_status("Security 1 command 1", resp.status)?;
                let mut check: [u8; 32] = fixed(&resp.device_verify_data, "device verify data")?;
                stream.apply_keystream(&mut check);
                if !bool::from(check.ct_eq(&public)) {
                    return Err(Error::DeviceProof);
                }
                Ok(Step::Established(SessionCipher(Cipher::Ctr(stream))))
            }
            ClientState::Sec2Sent {
                a,
                a_wire,
                username,
                password,
                patch_ver,
            } => {
                let resp = match sec2_payload(response, Sec2MsgType::S2SessionResponse0)? {
                    sec2_payload::Payload::Sr0(resp) => resp,
                    _ => return Err(Error::unexpected("Security 2 response 0", "other member")),
                };
                Error::check_status("Security 2 command 0", resp.status)?;
                if resp.device_pubkey.is_empty() || resp.device_pubkey.len() > N_LEN {
                    return Err(Error::invalid(
                        "device public key B",
                        format!("{} bytes", resp.device_pubkey.len()),
                    ));
                }
                let b_pub = BigUint::from_bytes_be(&resp.device_pubkey);
                if (&b_pub % &GROUP.n) == BigUint::ZERO {
                    return Err(Error::invalid("device public key B", "B ≡ 0 mod N"));
                }
                let u = srp::scrambler(&BigUint::from_bytes_be(&a_wire), &b_pub);
                if u == BigUint::ZERO {
                    return Err(Error::invalid("scrambler u", "u = 0"));
                }
                let salt = resp.device_salt;
                let x = srp::private_key(&username, &password, &salt);
                let n = &GROUP.n;
                let kv = (&GROUP.k * GROUP.g.modpow(&x, n)) % n;
                let base = ((&b_pub % n) + n - kv) % n;
                let s = base.modpow(&(a + u * x), n);
                let key = srp::sha512(&[&srp::minimal(&s)]);
                let m1 = srp::client_proof(&username, &salt, &a_wire, &resp.device_pubkey, &key);
                let message = sec2_message(
                    Sec2MsgType::S2SessionCommand1,
                    sec2_payload::Payload::Sc1(S2SessionCmd1 {
                        client_proof: m1.to_vec(),
                    }),
                );
                self.state = ClientState::Sec2Proved {
                    key,
                    m1,
                    a_wire,
                    patch_ver,
                };
                Ok(Step::Send(message))
            }
            ClientState::Sec2Proved {
                key,
                m1,
                a_wire,
                patch_ver,
            } => {
                let resp = match sec2_payload(response, Sec2MsgType::S2SessionResponse1)? {
                    sec2_payload::Payload::Sr1(resp) => resp,
                    _ => return Err(Error::unexpected("Security 2 response 1", "other member")),
                };
                Error::check_status("Security 2 command 1", resp.status)?;
                let m2 = srp::server_proof(&a_wire, &m1, &key);
                if !bool::from(resp.device_proof.as_slice().ct_eq(&m2)) {
                    return Err(Error::DeviceProof);
                }
                SessionCipher::gcm(&key, patch_ver, &resp.device_nonce).map(Step::Established)
            }
            ClientState::Finished => Err(Error::unexpected(
                "handshake step",
                "the handshake is already finished",
            )),
        }
    }
}

/// What a device is configured with.
#[derive(Clone)]
pub enum DeviceSecurity {
    /// Security 0.
    Sec0,
    /// Security 1; an empty PoP means `no_pop`.
    Sec1 {
        /// The proof of possession.
        pop: Vec<u8>,
    },
    /// Security 2: the salt and verifier made offline for the username and password.
    Sec2 {
        /// The SRP salt as stored (sent verbatim).
        salt: Vec<u8>,
        /// `g^x mod N`.
        verifier: Vec<u8>,
        /// 1: IV = 8-byte session id ‖ shared counter; 0: one 16-byte IV.
        patch_ver: u32,
    },
}

impl DeviceSecurity {
    /// The scheme.
    pub const fn version(&self) -> SecurityVersion {
        match self {
            Self::Sec0 => SecurityVersion::Sec0,
            Self::Sec1 { .. } => SecurityVersion::Sec1,
            Self::Sec2 { .. } => SecurityVersion::Sec2,
        }
    }
}

/// The device's random choices for one session.
#[derive(Clone, Copy)]
pub struct DeviceRandomness {
    /// Security 1: the X25519 private key.
    pub sec1_private: [u8; 32],
    /// Security 1: the CTR initial counter block.
    pub sec1_random: [u8; 16],
    /// Security 2: SRP's `b`.
    pub sec2_b: [u8; 32],
    /// Security 2: the GCM IV (patch 0) or its first 8 bytes as the session id (patch 1).
    pub sec2_nonce: [u8; 16],
}

impl DeviceRandomness {
    /// Fresh values from the operating system.
    pub fn generate() -> Result<Self, Error> {
        let mut this = Self {
            sec1_private: [0; 32],
            sec1_random: [0; 16],
            sec2_b: [0; 32],
            sec2_nonce: [0; 16],
        };
        random(&mut this.sec1_private)?;
        random(&mut this.sec1_random)?;
        random(&mut this.sec2_b)?;
        random(&mut this.sec2_nonce)?;
        Ok(this)
    }
}

enum DeviceState {
    Idle,
    Sec1Answered {
        stream: Box<Aes256Ctr>,
        device_public: [u8; 32],
        client_public: [u8; 32],
    },
    Sec2Answered {
        a_wire: Vec<u8>,
        b_wire: Vec<u8>,
        username: Vec<u8>,
        key: [u8; 64],
    },
    Finished,
}

/// The device side of a `prov-session` handshake.
pub struct DeviceHandshake {
    security: DeviceSecurity,
    random: DeviceRandomness,
    state: DeviceState,
}

impl DeviceHandshake {
    /// A handshake with fresh randomness.
    pub fn new(security: DeviceSecurity) -> Result<Self, Error> {
        Ok(Self::with_randomness(
            security,
            DeviceRandomness::generate()?,
        ))
    }

    /// A handshake with given randomness, for reproducible transcripts.
    pub fn with_randomness(security: DeviceSecurity, random: DeviceRandomness) -> Self {
        Self {
            security,
            random,
            state: DeviceState::Idle,
        }
    }

    /// Answers one `prov-session` request. The second value is the session cipher once
    /// the handshake completes. Any error means the device drops the link.
    pub fn handle(&mut self, request: &[u8]) -> Result<(Vec<u8>, Option<SessionCipher>), Error> {
        let state = std::mem::replace(&mut self.state, DeviceState::Finished);
        let expected = match self.security.version() {
            SecurityVersion::Sec0 => SecSchemeVersion::SecScheme0,
            SecurityVersion::Sec1 => SecSchemeVersion::SecScheme1,
            SecurityVersion::Sec2 => SecSchemeVersion::SecScheme2,
        };
        let proto = decode_session(request, expected)?;
        match (state, proto, &self.security) {
            (DeviceState::Idle, session_data::Proto::Sec0(payload), DeviceSecurity::Sec0) => {
                if payload.msg != Sec0MsgType::S0SessionCommand as i32
                    || !matches!(payload.payload, Some(sec0_payload::Payload::Sc(_)))
                {
                    return Err(Error::unexpected(
                        "Security 0 command",
                        "not a session command",
                    ));
                }
                let response = SessionData {
                    sec_ver: SecSchemeVersion::SecScheme0 as i32,
                    proto: Some(session_data::Proto::Sec0(Sec0Payload {
                        msg: Sec0MsgType::S0SessionResponse as i32,
                        payload: Some(sec0_payload::Payload::Sr(S0SessionResp {
                            status: Status::Success as i32,
                        })),
                    })),
                };
                Ok((response.encode_to_vec(), Some(SessionCipher::plain())))
            }
            (
                DeviceState::Idle,
                session_data::Proto::Sec1(payload),
                DeviceSecurity::Sec1 { pop },
            ) => {
                let cmd = match expect_sec1(payload, Sec1MsgType::SessionCommand0)? {
                    sec1_payload::Payload::Sc0(cmd) => cmd,
                    _ => return Err(Error::unexpected("Security 1 command 0", "other member")),
                };
                let client_public: [u8; 32] = fixed(&cmd.client_pubkey, "client public key")?;
                let secret = StaticSecret::from(self.random.sec1_private);
                let device_public = PublicKey::from(&secret).to_bytes();
                let shared = secret.diffie_hellman(&PublicKey::from(client_public));
                let key = sec1_key(shared.as_bytes(), pop);
                let stream = Box::new(Aes256Ctr::new(&key.into(), &self.random.sec1_random.into()));
                let response = sec1_message(
                    Sec1MsgType::SessionResponse0,
                    sec1_payload::Payload::Sr0(SessionResp0 {
                        status: Status::Success as i32,
                        device_pubkey: device_public.to_vec(),
                        device_random: self.random.sec1_random.to_vec(),
                    }),
                );
                self.state = DeviceState::Sec1Answered {
                    stream,
                    device_public,
                    client_public,
                };
                Ok((response, None))
            }
            (
                DeviceState::Sec1Answered {
                    mut stream,
                    device_public,
                    client_public,
                },
                session_data::Proto::Sec1(payload),
                DeviceSecurity::Sec1 { .. },
            ) => {
                let cmd = match expect_sec1(payload, Sec1MsgType::SessionCommand1)? {
                    sec1_payload::Payload::Sc1(cmd) => cmd,
                    _ => return Err(Error::unexpected("Security 1 command 1", "other member")),
                };
                let mut check: [u8; 32] = fixed(&cmd.client_verify_data, "client verify data")?;
                stream.apply_keystream(&mut check);
                if !bool::from(check.ct_eq(&device_public)) {
                    return Err(Error::ProofRejected);
                }
                let mut verify = client_public;
                stream.apply_keystream(&mut verify);
                let response = sec1_message(
                    Sec1MsgType::SessionResponse1,
                    sec1_payload::Payload::Sr1(SessionResp1 {
                        status: Status::Success as i32,
                        device_verify_data: verify.to_vec(),
                    }),
                );
                Ok((response, Some(SessionCipher(Cipher::Ctr(stream)))))
            }
            (
                DeviceState::Idle,
                session_data::Proto::Sec2(payload),
                DeviceSecurity::Sec2 { salt, verifier, .. },
            ) => {
                let cmd = match expect_sec2(payload, Sec2MsgType::S2SessionCommand0)? {
                    sec2_payload::Payload::Sc0(cmd) => cmd,
                    _ => return Err(Error::unexpected("Security 2 command 0", "other member")),
                };
                if cmd.client_username.is_empty() {
                    return Err(Error::invalid("username", "empty"));
                }
                if cmd.client_pubkey.len() != N_LEN {
                    return Err(Error::invalid(
                        "client public key A",
                        format!("{} bytes, must be {N_LEN}", cmd.client_pubkey.len()),
                    ));
                }
                let n = &GROUP.n;
                let a_pub = BigUint::from_bytes_be(&cmd.client_pubkey);
                if (&a_pub % n) == BigUint::ZERO {
                    return Err(Error::invalid("client public key A", "A ≡ 0 mod N"));
                }
                let v = BigUint::from_bytes_be(verifier);
                let b = BigUint::from_bytes_be(&self.random.sec2_b);
                let b_pub = ((&GROUP.k * &v) + GROUP.g.modpow(&b, n)) % n;
                let u = srp::scrambler(&a_pub, &b_pub);
                if u == BigUint::ZERO {
                    return Err(Error::invalid("scrambler u", "u = 0"));
                }
                let s = ((a_pub * v.modpow(&u, n)) % n).modpow(&b, n);
                let key = srp::sha512(&[&srp::minimal(&s)]);
                let b_wire = srp::minimal(&b_pub);
                let response = sec2_message(
                    Sec2MsgType::S2SessionResponse0,
                    sec2_payload::Payload::Sr0(S2SessionResp0 {
                        status: Status::Success as i32,
                        device_pubkey: b_wire.clone(),
                        device_salt: salt.clone(),
                    }),
                );
                self.state = DeviceState::Sec2Answered {
                    a_wire: cmd.client_pubkey,
                    b_wire,
                    username: cmd.client_username,
                    key,
                };
                Ok((response, None))
            }
            (
                DeviceState::Sec2Answered {
                    a_wire,
                    b_wire,
                    username,
                    key,
                },
                session_data::Proto::Sec2(payload),
                DeviceSecurity::Sec2 {
                    salt, patch_ver, ..
                },
            ) => {
                let cmd = match expect_sec2(payload, Sec2MsgType::S2SessionCommand1)? {
                    sec2_payload::Payload::Sc1(cmd) => cmd,
                    _ => return Err(Error::unexpected("Security 2 command 1", "other member")),
                };
                let m1 = srp::client_proof(&username, salt, &a_wire, &b_wire, &key);
                if cmd.client_proof.len() != 64 || !bool::from(cmd.client_proof.ct_eq(&m1)) {
                    return Err(Error::ProofRejected);
                }
                let m2 = srp::server_proof(&a_wire, &m1, &key);
                let nonce = if *patch_ver >= 1 {
                    let mut iv = self.random.sec2_nonce[..8].to_vec();
                    iv.extend_from_slice(&1u32.to_be_bytes());
                    iv
                } else {
                    self.random.sec2_nonce.to_vec()
                };
                let cipher = SessionCipher::gcm(&key, *patch_ver, &nonce)?;
                let response = sec2_message(
                    Sec2MsgType::S2SessionResponse1,
                    sec2_payload::Payload::Sr1(S2SessionResp1 {
                        status: Status::Success as i32,
                        device_proof: m2.to_vec(),
                        device_nonce: nonce,
                    }),
                );
                Ok((response, Some(cipher)))
            }
            (DeviceState::Finished, ..) => Err(Error::unexpected(
                "session command",
                "the handshake is already finished",
            )),
            _ => Err(Error::unexpected(
                "session command",
                "out of order for this security scheme",
            )),
        }
    }
}

enum Cipher {
    Plain,
    Ctr(Box<Aes256Ctr>),
    GcmCounter {
        aead: Box<Aes256Gcm>,
        session_id: [u8; 8],
        counter: u32,
    },
    GcmFixed {
        aead: Box<Aes256Gcm16>,
        iv: [u8; 16],
    },
}

/// Encrypts and decrypts the requests and responses of an established session.
///
/// Both roles use one object, and order matters: Security 1 runs one CTR keystream
/// across both directions and Security 2 (patch 1) one IV counter, so each request and
/// response must pass through exactly once, in order.
pub struct SessionCipher(Cipher);

impl SessionCipher {
    fn plain() -> Self {
        Self(Cipher::Plain)
    }

    fn gcm(key: &[u8; 64], patch_ver: u32, nonce: &[u8]) -> Result<Self, Error> {
        let key = &key[..32];
        if patch_ver >= 1 {
            let iv: [u8; 12] = fixed(nonce, "device nonce (12 bytes with sec_patch_ver 1)")?;
            let mut session_id = [0u8; 8];
            session_id.copy_from_slice(&iv[..8]);
            let counter = u32::from_be_bytes([iv[8], iv[9], iv[10], iv[11]]);
            if counter == 0 {
                return Err(Error::invalid("device nonce", "IV counter 0"));
            }
            let aead = Aes256Gcm::new_from_slice(key).map_err(|e| Error::Crypto(e.to_string()))?;
            Ok(Self(Cipher::GcmCounter {
                aead: Box::new(aead),
                session_id,
                counter,
            }))
        } else {
            let iv: [u8; 16] = fixed(nonce, "device nonce (16 bytes with sec_patch_ver 0)")?;
            let aead =
                Aes256Gcm16::new_from_slice(key).map_err(|e| Error::Crypto(e.to_string()))?;
            Ok(Self(Cipher::GcmFixed {
                aead: Box::new(aead),
                iv,
            }))
        }
    }

    /// Whether this session encrypts at all (false for Security 0).
    pub fn is_encrypted(&self) -> bool {
        !matches!(self.0, Cipher::Plain)
    }

    /// Encrypts one message.
    pub fn encrypt(&mut self, plain: &[u8]) -> Result<Vec<u8>, Error> {
        self.apply(plain, true)
    }

    /// Decrypts one message; a Security 2 message that fails authentication is an error
    /// and does not advance the IV counter.
    pub fn decrypt(&mut self, data: &[u8]) -> Result<Vec<u8>, Error> {
        self.apply(data, false)
    }

    fn apply(&mut self, data: &[u8], encrypt: bool) -> Result<Vec<u8>, Error> {
        match &mut self.0 {
            Cipher::Plain => Ok(data.to_vec()),
            Cipher::Ctr(stream) => {
                let mut out = data.to_vec();
                stream
                    .try_apply_keystream(&mut out)
                    .map_err(|_| Error::Crypto("CTR keystream exhausted".into()))?;
                Ok(out)
            }
            Cipher::GcmCounter {
                aead,
                session_id,
                counter,
            } => {
                let mut iv = [0u8; 12];
                iv[..8].copy_from_slice(session_id);
                iv[8..].copy_from_slice(&counter.to_be_bytes());
                let nonce = Nonce::from_slice(&iv);
                let out = if encrypt {
                    aead.encrypt(nonce, data)
                } else {
                    aead.decrypt(nonce, data)
                }
                .map_err(|_| gcm_failure(encrypt))?;
                *counter = counter
                    .checked_add(1)
                    .ok_or_else(|| Error::Crypto("GCM IV counter exhausted".into()))?;
                Ok(out)
            }
            Cipher::GcmFixed { aead, iv } => {
                let nonce = aes_gcm::aead::generic_array::GenericArray::from_slice(iv.as_slice());
                if encrypt {
                    aead.encrypt(nonce, data)
                } else {
                    aead.decrypt(nonce, data)
                }
                .map_err(|_| gcm_failure(encrypt))
            }
        }
    }
}

fn gcm_failure(encrypt: bool) -> Error {
    Error::Crypto(if encrypt {
        "AES-GCM encryption failed".into()
    } else {
        "AES-GCM authentication failed (tampered, truncated or out-of-order message)".into()
    })
}

/// Security 1 key: the shared secret, XORed with SHA-256(PoP) when there is a PoP.
fn sec1_key(shared: &[u8; 32], pop: &[u8]) -> [u8; 32] {
    let mut key = *shared;
    if !pop.is_empty() {
        let digest = Sha256::digest(pop);
        for (k, d) in key.iter_mut().zip(digest.iter()) {
            *k ^= d;
        }
    }
    key
}

fn fixed<const N: usize>(bytes: &[u8], what: &'static str) -> Result<[u8; N], Error> {
    bytes
        .try_into()
        .map_err(|_| Error::invalid(what, format!("{} bytes, must be {N}", bytes.len())))
}

fn wrong_scheme(expected: u8) -> Error {
    Error::unexpected("session data", format!("not a Security {expected} message"))
}

fn decode_session(bytes: &[u8], expected: SecSchemeVersion) -> Result<session_data::Proto, Error> {
    if bytes.is_empty() {
        return Err(Error::Empty("session message"));
    }
    let data = SessionData::decode(bytes).map_err(Error::decode("SessionData"))?;
    if data.sec_ver != expected as i32 {
        return Err(Error::unexpected(
            "session data",
            format!(
                "security version {} where {} was expected",
                data.sec_ver, expected as i32
            ),
        ));
    }
    data.proto
        .ok_or_else(|| Error::unexpected("session data", "no security payload"))
}

fn sec1_payload(bytes: &[u8], msg: Sec1MsgType) -> Result<sec1_payload::Payload, Error> {
    match decode_session(bytes, SecSchemeVersion::SecScheme1)? {
        session_data::Proto::Sec1(payload) => expect_sec1(payload, msg),
        _ => Err(wrong_scheme(1)),
    }
}

fn expect_sec1(payload: Sec1Payload, msg: Sec1MsgType) -> Result<sec1_payload::Payload, Error> {
    if payload.msg != msg as i32 {
        return Err(Error::unexpected(
            "Security 1 message",
            format!("type {} where {msg:?} was expected", payload.msg),
        ));
    }
    payload
        .payload
        .ok_or_else(|| Error::unexpected("Security 1 message", "no payload"))
}

fn sec2_payload(bytes: &[u8], msg: Sec2MsgType) -> Result<sec2_payload::Payload, Error> {
    match decode_session(bytes, SecSchemeVersion::SecScheme2)? {
        session_data::Proto::Sec2(payload) => expect_sec2(payload, msg),
        _ => Err(wrong_scheme(2)),
    }
}

fn expect_sec2(payload: Sec2Payload, msg: Sec2MsgType) -> Result<sec2_payload::Payload, Error> {
    if payload.msg != msg as i32 {
        return Err(Error::unexpected(
            "Security 2 message",
            format!("type {} where {msg:?} was expected", payload.msg),
        ));
    }
    payload
        .payload
        .ok_or_else(|| Error::unexpected("Security 2 message", "no payload"))
}

fn sec1_message(msg: Sec1MsgType, payload: sec1_payload::Payload) -> Vec<u8> {
    SessionData {
        sec_ver: SecSchemeVersion::SecScheme1 as i32,
        proto: Some(session_data::Proto::Sec1(Sec1Payload {
            msg: msg as i32,
            payload: Some(payload),
        })),
    }
    .encode_to_vec()
}

fn sec2_message(msg: Sec2MsgType, payload: sec2_payload::Payload) -> Vec<u8> {
    SessionData {
        sec_ver: SecSchemeVersion::SecScheme2 as i32,
        proto: Some(session_data::Proto::Sec2(Sec2Payload {
            msg: msg as i32,
            payload: Some(payload),
        })),
    }
    .encode_to_vec()
}
