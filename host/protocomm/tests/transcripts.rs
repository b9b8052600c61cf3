//! The transcripts of `vectors.json` (Espressif's esp_prov run with fixed randomness
//! against an independent device), reproduced in both roles, plus the failure cases.

use outpost_protocomm::proto::{RMakerClaimMsgType, RMakerClaimStatus};
use outpost_protocomm::wifi::{self, FailReason, WifiStatus};
use outpost_protocomm::{
    ClientCredentials, ClientHandshake, DeviceRandomness, DeviceSecurity, DeviceSession, Error,
    ProtoVersion, ProvInfo, SessionCipher, Step, claim, srp,
};
use serde_json::Value;

fn vectors() -> Value {
    serde_json::from_str(include_str!("vectors.json")).unwrap()
}

fn hex(v: &Value, key: &str) -> Vec<u8> {
    let text = v[key]
        .as_str()
        .unwrap_or_else(|| panic!("vector {key} missing"));
    hex::decode(text).unwrap()
}

fn arr<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out[..bytes.len().min(N)].copy_from_slice(&bytes[..bytes.len().min(N)]);
    out
}

fn version(sec_ver: u8, patch: u32) -> ProtoVersion {
    ProtoVersion {
        prov: ProvInfo {
            ver: "v1.1".into(),
            sec_ver: Some(sec_ver),
            sec_patch_ver: Some(patch),
            cap: vec!["wifi_scan".into()],
        },
        apps: Default::default(),
    }
}

fn send(step: Step) -> Vec<u8> {
    match step {
        Step::Send(bytes) => bytes,
        Step::Established(_) => panic!("handshake ended early"),
    }
}

fn established(step: Step) -> SessionCipher {
    match step {
        Step::Established(cipher) => cipher,
        Step::Send(_) => panic!("handshake wants another round"),
    }
}

/// The device answers every decrypted request with `reply`, recording what it got.
fn app<'a>(
    seen: &'a mut Vec<Vec<u8>>,
    reply: &'a [u8],
) -> impl FnMut(&str, &[u8]) -> Result<Vec<u8>, Error> + 'a {
    move |endpoint, plain| {
        assert_eq!(endpoint, "prov-config");
        seen.push(plain.to_vec());
        Ok(reply.to_vec())
    }
}

fn sec1_randomness(v: &Value) -> DeviceRandomness {
    DeviceRandomness {
        sec1_private: arr(&hex(v, "device_private")),
        sec1_random: arr(&hex(v, "device_random")),
        sec2_b: [0; 32],
        sec2_nonce: [0; 16],
    }
}

fn sec2_randomness(v: &Value) -> DeviceRandomness {
    DeviceRandomness {
        sec1_private: [0; 32],
        sec1_random: [0; 16],
        sec2_b: arr(&hex(v, "b")),
        sec2_nonce: arr(&hex(v, "iv_session_id")),
    }
}

fn sec2_device(v: &Value, patch: u32) -> DeviceSession {
    DeviceSession::new(
        DeviceSecurity::Sec2 {
            salt: hex(v, "salt"),
            verifier: hex(v, "verifier"),
            patch_ver: patch,
        },
        &version(2, patch),
    )
}

fn sec2_client(v: &Value, password: &str, patch: u32) -> ClientCredentials {
    ClientCredentials::Sec2 {
        username: v["username"].as_str().unwrap().as_bytes().to_vec(),
        password: password.as_bytes().to_vec(),
        patch_ver: patch,
    }
}

#[test]
fn security1_client_role_reproduces_the_transcript() {
    let v = &vectors()["security1"];
    let pop = v["pop"].as_str().unwrap().as_bytes().to_vec();
    let (mut client, cmd0) = ClientHandshake::start_with_secret(
        ClientCredentials::Sec1 { pop },
        arr(&hex(v, "client_private")),
    );
    assert_eq!(cmd0, hex(v, "SessionData_cmd0"));
    let cmd1 = send(client.step(&hex(v, "SessionData_resp0")).unwrap());
    assert_eq!(cmd1, hex(v, "SessionData_cmd1"));
    assert!(client.awaiting_proof_verdict());
    let mut cipher = established(client.step(&hex(v, "SessionData_resp1")).unwrap());
    assert!(cipher.is_encrypted());
    let plain = hex(v, "app_req_plain(prov-config SetConfig)");
    assert_eq!(plain, wifi::set_config(b"myssid", b"mypassword").unwrap());
    assert_eq!(cipher.encrypt(&plain).unwrap(), hex(v, "app_req_cipher"));
    assert_eq!(
        cipher.decrypt(&hex(v, "app_resp_cipher")).unwrap(),
        hex(v, "app_resp_plain")
    );
    wifi::parse_set_config(&hex(v, "app_resp_plain")).unwrap();
}

#[test]
fn security1_device_role_reproduces_the_transcript() {
    let v = &vectors()["security1"];
    let mut device = DeviceSession::new(
        DeviceSecurity::Sec1 {
            pop: v["pop"].as_str().unwrap().as_bytes().to_vec(),
        },
        &version(1, 0),
    )
    .with_randomness(sec1_randomness(v));
    let mut seen = Vec::new();
    let reply = hex(v, "app_resp_plain");
    let mut app = app(&mut seen, &reply);
    let resp0 = device
        .handle("prov-session", &hex(v, "SessionData_cmd0"), &mut app)
        .unwrap();
    assert_eq!(resp0, hex(v, "SessionData_resp0"));
    let resp1 = device
        .handle("prov-session", &hex(v, "SessionData_cmd1"), &mut app)
        .unwrap();
    assert_eq!(resp1, hex(v, "SessionData_resp1"));
    let answer = device
        .handle("prov-config", &hex(v, "app_req_cipher"), &mut app)
        .unwrap();
    assert_eq!(answer, hex(v, "app_resp_cipher"));
    drop(app);
    assert_eq!(seen, vec![hex(v, "app_req_plain(prov-config SetConfig)")]);
}

#[test]
fn security2_derivations_match_the_published_values() {
    let v = &vectors()["security2"];
    assert_eq!(
        srp::verifier(b"wifiprov", b"abcd1234", &hex(v, "salt")),
        hex(v, "verifier")
    );
    assert_eq!(srp::N_LEN, hex(v, "A").len());
}

#[test]
fn security2_client_role_reproduces_the_transcript() {
    let v = &vectors()["security2"];
    assert_eq!(v["sec_patch_ver"], 1);
    let (mut client, cmd0) =
        ClientHandshake::start_with_secret(sec2_client(v, "abcd1234", 1), arr(&hex(v, "a")));
    assert_eq!(cmd0.len(), 406);
    assert_eq!(cmd0, hex(v, "SessionData_cmd0"));
    let cmd1 = send(client.step(&hex(v, "SessionData_resp0")).unwrap());
    assert_eq!(cmd1, hex(v, "SessionData_cmd1"));
    let mut cipher = established(client.step(&hex(v, "SessionData_resp1")).unwrap());
    let plain = hex(v, "app_req_plain(prov-config SetConfig)");
    assert_eq!(
        cipher.encrypt(&plain).unwrap(),
        hex(v, "app_req_cipher(ct||tag16)")
    );
    assert_eq!(
        cipher
            .decrypt(&hex(v, "app_resp_cipher(ct||tag16)"))
            .unwrap(),
        hex(v, "app_resp_plain")
    );
}

#[test]
fn security2_device_role_reproduces_the_transcript() {
    let v = &vectors()["security2"];
    let mut device = sec2_device(v, 1).with_randomness(sec2_randomness(v));
    let mut seen = Vec::new();
    let reply = hex(v, "app_resp_plain");
    let mut app = app(&mut seen, &reply);
    let resp0 = device
        .handle("prov-session", &hex(v, "SessionData_cmd0"), &mut app)
        .unwrap();
    assert_eq!(resp0.len(), 416);
    assert_eq!(resp0, hex(v, "SessionData_resp0"));
    let resp1 = device
        .handle("prov-session", &hex(v, "SessionData_cmd1"), &mut app)
        .unwrap();
    assert_eq!(resp1, hex(v, "SessionData_resp1"));
    let answer = device
        .handle(
            "prov-config",
            &hex(v, "app_req_cipher(ct||tag16)"),
            &mut app,
        )
        .unwrap();
    assert_eq!(answer, hex(v, "app_resp_cipher(ct||tag16)"));
    drop(app);
    assert_eq!(seen, vec![hex(v, "app_req_plain(prov-config SetConfig)")]);
}

/// Runs a full handshake between the two roles with fresh randomness.
fn handshake(
    device: &mut DeviceSession,
    credentials: ClientCredentials,
) -> Result<SessionCipher, Error> {
    let (mut client, mut message) = ClientHandshake::start(credentials)?;
    let mut noop = |_: &str, _: &[u8]| -> Result<Vec<u8>, Error> { Ok(Vec::new()) };
    loop {
        let answer = device.handle("prov-session", &message, &mut noop)?;
        match client.step(&answer)? {
            Step::Send(next) => message = next,
            Step::Established(cipher) => return Ok(cipher),
        }
    }
}

fn exchange(device: &mut DeviceSession, cipher: &mut SessionCipher, plain: &[u8]) -> Vec<u8> {
    let request = cipher.encrypt(plain).unwrap();
    let mut echo = |_: &str, p: &[u8]| -> Result<Vec<u8>, Error> {
        let mut out = b"echo:".to_vec();
        out.extend_from_slice(p);
        Ok(out)
    };
    let answer = device.handle("prov-config", &request, &mut echo).unwrap();
    cipher.decrypt(&answer).unwrap()
}

#[test]
fn both_roles_interoperate_for_every_scheme_and_patch_version() {
    let v = &vectors()["security2"];
    let cases: Vec<(DeviceSession, ClientCredentials)> = vec![
        (
            DeviceSession::new(DeviceSecurity::Sec0, &version(0, 0)),
            ClientCredentials::Sec0,
        ),
        (
            DeviceSession::new(DeviceSecurity::Sec1 { pop: Vec::new() }, &version(1, 0)),
            ClientCredentials::Sec1 { pop: Vec::new() },
        ),
        (
            DeviceSession::new(
                DeviceSecurity::Sec1 {
                    pop: b"pop".to_vec(),
                },
                &version(1, 0),
            ),
            ClientCredentials::Sec1 {
                pop: b"pop".to_vec(),
            },
        ),
        (sec2_device(v, 0), sec2_client(v, "abcd1234", 0)),
        (sec2_device(v, 1), sec2_client(v, "abcd1234", 1)),
    ];
    for (mut device, credentials) in cases {
        let label = format!("{credentials:?}");
        let mut cipher = handshake(&mut device, credentials).expect(&label);
        for round in 0..3 {
            let plain = format!("request {round}").into_bytes();
            let mut expected = b"echo:".to_vec();
            expected.extend_from_slice(&plain);
            assert_eq!(
                exchange(&mut device, &mut cipher, &plain),
                expected,
                "{label}"
            );
        }
    }
}

#[test]
fn patch_0_keeps_one_iv_and_patch_1_counts() {
    let v = &vectors()["security2"];
    for (patch, same) in [(0, true), (1, false)] {
        let mut device = sec2_device(v, patch);
        let mut cipher = handshake(&mut device, sec2_client(v, "abcd1234", patch)).unwrap();
        let first = cipher.encrypt(b"same").unwrap();
        // keep the device in step so the session stays usable
        let mut noop = |_: &str, _: &[u8]| -> Result<Vec<u8>, Error> { Ok(b"x".to_vec()) };
        let answer = device.handle("prov-config", &first, &mut noop).unwrap();
        cipher.decrypt(&answer).unwrap();
        let second = cipher.encrypt(b"same").unwrap();
        assert_eq!(first == second, same, "patch {patch}");
    }
}

#[test]
fn a_wrong_pop_is_rejected_at_the_proof_step() {
    let mut device = DeviceSession::new(
        DeviceSecurity::Sec1 {
            pop: b"abcd1234".to_vec(),
        },
        &version(1, 0),
    );
    let err = handshake(
        &mut device,
        ClientCredentials::Sec1 {
            pop: b"wrong".to_vec(),
        },
    )
    .err()
    .expect("a wrong PoP must fail");
    assert!(matches!(err, Error::ProofRejected), "{err}");
    assert!(err.to_string().contains("proof of possession rejected"));
    assert!(!device.is_established());
}

#[test]
fn a_wrong_srp_password_or_username_is_rejected_at_the_proof_step() {
    let v = &vectors()["security2"];
    for credentials in [
        sec2_client(v, "abcd1235", 1),
        ClientCredentials::Sec2 {
            username: b"someone".to_vec(),
            password: b"abcd1234".to_vec(),
            patch_ver: 1,
        },
    ] {
        let mut device = sec2_device(v, 1);
        let err = handshake(&mut device, credentials)
            .err()
            .expect("must fail");
        assert!(matches!(err, Error::ProofRejected), "{err}");
        assert!(!device.is_established());
    }
}

#[test]
fn a_device_with_the_wrong_key_fails_the_clients_check() {
    // The client checks the device's proof too: a device answering with a proof made
    // for another session is caught.
    let v = &vectors()["security1"];
    let (mut client, _) = ClientHandshake::start_with_secret(
        ClientCredentials::Sec1 {
            pop: b"other pop".to_vec(),
        },
        arr(&hex(v, "client_private")),
    );
    send(client.step(&hex(v, "SessionData_resp0")).unwrap());
    let err = client.step(&hex(v, "SessionData_resp1")).err().unwrap();
    assert!(matches!(err, Error::DeviceProof), "{err}");
}

#[test]
fn garbage_truncated_and_out_of_order_frames_are_errors_in_both_roles() {
    let v = &vectors()["security2"];
    let mut noop = |_: &str, _: &[u8]| -> Result<Vec<u8>, Error> { Ok(Vec::new()) };
    let cmd0 = hex(v, "SessionData_cmd0");

    let mut device = sec2_device(v, 1);
    // garbage protobuf
    let err = device
        .handle("prov-session", &[0xff, 0xff, 0xff], &mut noop)
        .unwrap_err();
    assert!(matches!(err, Error::Decode { .. }), "{err}");
    // truncated command 0
    let err = device
        .handle("prov-session", &cmd0[..200], &mut noop)
        .unwrap_err();
    assert!(matches!(err, Error::Decode { .. }), "{err}");
    // empty write
    assert!(matches!(
        device.handle("proto-ver", &[], &mut noop).unwrap_err(),
        Error::Empty(_)
    ));
    // an encrypted endpoint before any session
    assert!(matches!(
        device
            .handle("prov-config", b"\x08\x00", &mut noop)
            .unwrap_err(),
        Error::NoSession
    ));
    // command 1 before command 0
    let err = device
        .handle("prov-session", &hex(v, "SessionData_cmd1"), &mut noop)
        .unwrap_err();
    assert!(matches!(err, Error::Unexpected { .. }), "{err}");
    // a Security 1 message to a Security 2 device
    let err = device
        .handle(
            "prov-session",
            &hex(&vectors()["security1"], "SessionData_cmd0"),
            &mut noop,
        )
        .unwrap_err();
    assert!(matches!(err, Error::Unexpected { .. }), "{err}");
    // A of the wrong length (re-encoded with 383 bytes)
    let mut short = cmd0.clone();
    short.truncate(cmd0.len() - 1);
    assert!(device.handle("prov-session", &short, &mut noop).is_err());

    // Client side: truncated and garbage answers.
    let (mut client, _) =
        ClientHandshake::start_with_secret(sec2_client(v, "abcd1234", 1), arr(&hex(v, "a")));
    let resp0 = hex(v, "SessionData_resp0");
    assert!(matches!(
        client.step(&resp0[..100]).unwrap_err(),
        Error::Decode { .. }
    ));
    let (mut client, _) =
        ClientHandshake::start_with_secret(sec2_client(v, "abcd1234", 1), arr(&hex(v, "a")));
    assert!(client.step(b"\x10\x02\x62\x00").is_err());
}

#[test]
fn a_tampered_gcm_message_is_refused_without_desynchronising_the_session() {
    let v = &vectors()["security2"];
    let mut device = sec2_device(v, 1);
    let mut cipher = handshake(&mut device, sec2_client(v, "abcd1234", 1)).unwrap();
    let request = cipher.encrypt(b"hello").unwrap();
    let mut tampered = request.clone();
    tampered[0] ^= 1;
    let mut device_cipher_probe = |_: &str, _: &[u8]| -> Result<Vec<u8>, Error> {
        panic!("a tampered message must not reach the application")
    };
    let err = device
        .handle("prov-config", &tampered, &mut device_cipher_probe)
        .unwrap_err();
    assert!(matches!(err, Error::Crypto(_)), "{err}");
    // The device drops the session on any error, as the firmware drops the link.
    assert!(!device.is_established());
}

#[test]
fn wifi_status_answers_decode_with_their_reasons() {
    use outpost_protocomm::proto::{
        RespGetStatus, WiFiConfigMsgType, WiFiConfigPayload, WifiConnectFailedReason,
        WifiConnectedState, WifiStationState, resp_get_status, wi_fi_config_payload,
    };
    use prost::Message;
    let encode = |sta: WifiStationState, state: Option<resp_get_status::State>| {
        WiFiConfigPayload {
            msg: WiFiConfigMsgType::TypeRespGetStatus as i32,
            payload: Some(wi_fi_config_payload::Payload::RespGetStatus(
                RespGetStatus {
                    status: 0,
                    sta_state: sta as i32,
                    state,
                },
            )),
        }
        .encode_to_vec()
    };
    assert_eq!(
        wifi::parse_status(&encode(
            WifiStationState::ConnectionFailed,
            Some(resp_get_status::State::FailReason(
                WifiConnectFailedReason::AuthError as i32
            ))
        ))
        .unwrap(),
        WifiStatus::Failed {
            reason: Some(FailReason::AuthError)
        }
    );
    assert_eq!(
        wifi::parse_status(&encode(
            WifiStationState::ConnectionFailed,
            Some(resp_get_status::State::FailReason(
                WifiConnectFailedReason::NetworkNotFound as i32
            ))
        ))
        .unwrap(),
        WifiStatus::Failed {
            reason: Some(FailReason::NetworkNotFound)
        }
    );
    assert_eq!(
        wifi::parse_status(&encode(
            WifiStationState::Connected,
            Some(resp_get_status::State::Connected(WifiConnectedState {
                ip4_addr: "192.168.1.20".into(),
                ssid: b"site".to_vec(),
                channel: 6,
                ..Default::default()
            }))
        ))
        .unwrap(),
        WifiStatus::Connected {
            ip4: "192.168.1.20".into(),
            ssid: "site".into(),
            channel: 6
        }
    );
    // `08 01` alone: GetStatus response with every field zero = Connected, no details.
    assert!(matches!(
        wifi::parse_status(&[0x08, 0x01]).unwrap(),
        WifiStatus::Connected { .. }
    ));
    // A SetConfig answer where a GetStatus answer belongs.
    assert!(wifi::parse_status(&[0x08, 0x03]).is_err());
    assert!(wifi::set_config(&[b'x'; 33], b"pw").is_err());
    assert!(wifi::set_config(b"ssid", &[b'x'; 64]).is_err());
}

#[test]
fn claim_documents_travel_in_fragments_and_bad_fragments_are_refused() {
    use outpost_protocomm::proto::PayloadBuf;
    let document: Vec<u8> = (0..750u32).map(|i| b'a' + (i % 26) as u8).collect();
    let chunks = claim::verify_chunks(&document).unwrap();
    assert_eq!(chunks.len(), 4);
    let mut reassembly = claim::Reassembly::default();
    let mut whole = None;
    for chunk in &chunks {
        use outpost_protocomm::proto::{RMakerClaimPayload, r_maker_claim_payload};
        use prost::Message;
        let msg = RMakerClaimPayload::decode(chunk.as_slice()).unwrap();
        assert_eq!(msg.msg, RMakerClaimMsgType::TypeCmdClaimVerify as i32);
        let Some(r_maker_claim_payload::Payload::CmdPayload(buf)) = msg.payload else {
            panic!("no payload")
        };
        whole = reassembly.push(&buf).unwrap();
    }
    assert_eq!(whole.unwrap(), document);

    let mut reassembly = claim::Reassembly::default();
    let first = PayloadBuf {
        offset: 0,
        payload: vec![1; 10],
        total_len: 30,
    };
    assert!(reassembly.push(&first).unwrap().is_none());
    let gap = PayloadBuf {
        offset: 15,
        payload: vec![1; 10],
        total_len: 30,
    };
    assert!(reassembly.push(&gap).is_err());
    let over = PayloadBuf {
        offset: 0,
        payload: vec![1; 40],
        total_len: 30,
    };
    assert!(reassembly.push(&over).is_err());
    let huge = PayloadBuf {
        offset: 0,
        payload: vec![1; 10],
        total_len: 5000,
    };
    assert!(reassembly.push(&huge).is_err());
    assert!(claim::verify_chunks(&vec![0; 4000]).is_err());

    let ok = claim::response(
        RMakerClaimMsgType::TypeCmdClaimStart as i32,
        RMakerClaimStatus::Success,
        Some(first.clone()),
    );
    assert_eq!(
        claim::parse_response(&ok, RMakerClaimMsgType::TypeCmdClaimStart).unwrap(),
        first
    );
    let refused = claim::response(
        RMakerClaimMsgType::TypeCmdClaimVerify as i32,
        RMakerClaimStatus::InvalidParam,
        None,
    );
    let err = claim::parse_response(&refused, RMakerClaimMsgType::TypeCmdClaimVerify).unwrap_err();
    assert!(err.to_string().contains("InvalidParam"), "{err}");
    // An answer to another command.
    assert!(claim::parse_response(&ok, RMakerClaimMsgType::TypeCmdClaimInit).is_err());
}

#[test]
fn security0_wire_bytes_match_the_note() {
    let (mut client, cmd) = ClientHandshake::start_with_secret(ClientCredentials::Sec0, [0; 32]);
    assert_eq!(cmd, [0x52, 0x03, 0xa2, 0x01, 0x00]);
    let mut device = DeviceSession::new(DeviceSecurity::Sec0, &version(0, 0));
    let mut noop = |_: &str, _: &[u8]| -> Result<Vec<u8>, Error> { Ok(Vec::new()) };
    let resp = device.handle("prov-session", &cmd, &mut noop).unwrap();
    assert_eq!(resp, [0x52, 0x05, 0x08, 0x01, 0xaa, 0x01, 0x00]);
    let cipher = established(client.step(&resp).unwrap());
    assert!(!cipher.is_encrypted());
}
