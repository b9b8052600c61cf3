//! Device Update deployments: verified root → signing key → manifest as the Device
//! Update agent does, with keys made for the tests (tests/support/fixtures/adu).

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use outpost_cache::Sha256;
use outpost_cache::adu::{self, AduDeployment, AduRootKey, AduSigner};

fn key(name: &str, kid: &str) -> AduSigner {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/support/fixtures/adu")
        .join(format!("{name}.pk8.der"));
    AduSigner::from_pkcs8(kid, &std::fs::read(&path).unwrap()).unwrap()
}

fn root() -> AduSigner {
    key("root", "ADU.test.R")
}

fn signing() -> AduSigner {
    key("signing", "ADU.test.S")
}

fn trusted() -> Vec<AduRootKey> {
    vec![root().root()]
}

const FIRMWARE: &[u8] = b"esp32 firmware image 2.0.0";

fn manifest_text(version: &str, sha256: &[u8]) -> String {
    serde_json::json!({
        "manifestVersion": version,
        "updateId": {"provider": "Acme", "name": "sensor-fw", "version": "2.0.0"},
        "compatibility": [{"manufacturer": "Acme", "model": "site-gateway"}],
        "instructions": {"steps": [{
            "type": "inline",
            "handler": "outpost/esp32-app:1",
            "files": ["f0"],
            "handlerProperties": {
                "installedCriteria": "2.0.0",
                "compatibility": [{"manufacturer": "Acme", "model": "esp32-sensor"}]
            }
        }]},
        "files": {"f0": {
            "fileName": "sensor-2.0.0.bin",
            "sizeInBytes": FIRMWARE.len(),
            "hashes": {"sha256": STANDARD.encode(sha256)}
        }},
        "createdDateTime": "2026-12-01T10:00:00Z"
    })
    .to_string()
}

fn deployment(manifest: &str, signature: String) -> String {
    AduDeployment {
        update_manifest: manifest.to_owned(),
        update_manifest_signature: signature,
        file_urls: BTreeMap::from([("f0".into(), "http://127.0.0.1:9/sensor.bin".into())]),
    }
    .to_stored()
}

fn signed(manifest: &str) -> String {
    deployment(manifest, signing().sign_manifest(&root(), manifest))
}

fn refused(stored: &str) -> String {
    match adu::verify(stored, &trusted()) {
        Ok(_) => panic!("the deployment was accepted"),
        Err(err) => err.to_string(),
    }
}

#[test]
fn a_deployment_signed_through_a_trusted_root_reads_as_an_update_manifest() {
    let digest = Sha256::digest(FIRMWARE);
    let text = manifest_text("5", digest.as_bytes());
    let stored = signed(&text);
    assert!(adu::is_adu(&stored));
    let verified = adu::verify(&stored, &trusted()).unwrap();
    assert_eq!(verified.signer, "adu:ADU.test.R/ADU.test.S");
    assert_eq!(
        verified.jws, stored,
        "the stored form is kept to verify again"
    );
    let m = &verified.manifest;
    assert_eq!(m.update_id.to_string(), "Acme/sensor-fw/2.0.0");
    // The manifest's compatibility is the gateway's; the step's picks the devices.
    assert_eq!(m.compatibility.len(), 1);
    assert_eq!(m.compatibility[0]["model"], "esp32-sensor");
    assert_eq!(
        m.steps[0].handler, "esp32-app",
        "outpost/{{name}}:{{major}} picks {{name}}"
    );
    assert_eq!(adu::outpost_handler("microsoft/swupdate:1"), None);
    assert_eq!(adu::outpost_handler("outpost/esp32-app"), None);
    assert_eq!(m.steps[0].handler_properties["installedCriteria"], "2.0.0");
    assert_eq!(m.files[0].sha256, digest);
    assert_eq!(m.files[0].size_in_bytes, FIRMWARE.len() as u64);
    assert_eq!(
        m.files[0].url.as_deref(),
        Some("http://127.0.0.1:9/sensor.bin")
    );
    // Without the step's compatibility: every device the step's handler serves.
    let any_device = text.replace(
        r#""compatibility":[{"manufacturer":"Acme","model":"esp32-sensor"}],"#,
        "",
    );
    assert_ne!(any_device, text);
    let verified = adu::verify(&signed(&any_device), &trusted()).unwrap();
    assert_eq!(
        verified.manifest.compatibility,
        [BTreeMap::from([(
            "handler".to_owned(),
            "esp32-app".to_owned()
        )])]
    );
    // Version 4 manifests read the same, with `filename` as Device Update wrote it then.
    let v4 = manifest_text("4", digest.as_bytes()).replace("fileName", "filename");
    assert!(adu::verify(&signed(&v4), &trusted()).is_ok());
    // The root as configured (base64 n/e) is the same key, also when n is written as a
    // DER INTEGER (a leading zero byte), and it verifies the deployment.
    let (n, e) = root().root().to_base64();
    assert_eq!(
        AduRootKey::from_base64("ADU.test.R", &n, &e).unwrap(),
        root().root()
    );
    let mut der_n = vec![0];
    der_n.extend(&root().root().n);
    let configured = AduRootKey::from_base64("ADU.test.R", &STANDARD.encode(der_n), &e).unwrap();
    assert!(adu::verify(&signed(&text), &[configured]).is_ok());
    // A 2047-bit modulus is refused at configuration, not at the first deployment.
    let mut short = vec![0x7F];
    short.extend([0xFF; 255]);
    let err = AduRootKey::from_base64("short", &STANDARD.encode(short), &e).unwrap_err();
    assert!(err.contains("2047-bit"), "{err}");
}

#[test]
fn a_signing_key_from_an_unknown_root_is_refused() {
    let text = manifest_text("5", Sha256::digest(FIRMWARE).as_bytes());
    let other = key("other-root", "ADU.other.R");
    let stored = deployment(&text, signing().sign_manifest(&other, &text));
    let err = refused(&stored);
    assert!(
        err.contains("\"ADU.other.R\" is not a trusted Device Update root"),
        "{err}"
    );
    // With no roots configured nothing is accepted, and the error says so.
    let err = adu::verify(&signed(&text), &[]).unwrap_err().to_string();
    assert!(err.contains("configured: none"), "{err}");
}

#[test]
fn a_manifest_or_file_hash_altered_after_signing_is_refused() {
    let digest = Sha256::digest(FIRMWARE);
    let text = manifest_text("5", digest.as_bytes());
    let signature = signing().sign_manifest(&root(), &text);
    // Someone points the file at other bytes: the manifest no longer has the signed hash.
    let tampered = manifest_text("5", Sha256::digest(b"something else").as_bytes());
    let err = refused(&deployment(&tampered, signature.clone()));
    assert!(err.contains("does not match the hash"), "{err}");
    // Even whitespace counts: the signed bytes are the manifest string as received.
    let err = refused(&deployment(&format!("{text} "), signature));
    assert!(err.contains("does not match the hash"), "{err}");
}

#[test]
fn a_forged_signing_key_or_signature_is_refused() {
    let text = manifest_text("5", Sha256::digest(FIRMWARE).as_bytes());
    let good = signing().sign_manifest(&root(), &text);
    let parts: Vec<&str> = good.split('.').collect();
    // The manifest signed by a key that the root never vouched for, presented under the
    // good sjwk: the signature does not verify with the vouched key.
    let rogue = key("other-root", "ADU.test.S").sign_manifest(&root(), &text);
    let rogue_parts: Vec<&str> = rogue.split('.').collect();
    let swapped = format!("{}.{}.{}", parts[0], parts[1], rogue_parts[2]);
    let err = refused(&deployment(&text, swapped));
    assert!(
        err.contains("updateManifestSignature: the signature does not verify"),
        "{err}"
    );
    // An sjwk whose payload (the key) was swapped after the root signed it.
    let header: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
    let sjwk = header["sjwk"].as_str().unwrap();
    let rogue_header: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(rogue_parts[0]).unwrap()).unwrap();
    let rogue_sjwk: Vec<&str> = rogue_header["sjwk"].as_str().unwrap().split('.').collect();
    let sjwk_parts: Vec<&str> = sjwk.split('.').collect();
    let forged_sjwk = format!("{}.{}.{}", sjwk_parts[0], rogue_sjwk[1], sjwk_parts[2]);
    let forged_header = URL_SAFE_NO_PAD
        .encode(serde_json::json!({"alg": "RS256", "sjwk": forged_sjwk}).to_string());
    let err = refused(&deployment(
        &text,
        format!("{forged_header}.{}.{}", rogue_parts[1], rogue_parts[2]),
    ));
    assert!(err.contains("sjwk: the signature does not verify"), "{err}");
    // Only RS256.
    let none = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","sjwk":"x"}"#);
    let err = refused(&deployment(&text, format!("{none}.{}.", parts[1])));
    assert!(err.contains("alg \"none\" is not accepted"), "{err}");
    // No sjwk at all.
    let bare = URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256"}"#);
    let err = refused(&deployment(
        &text,
        format!("{bare}.{}.{}", parts[1], parts[2]),
    ));
    assert!(err.contains("no sjwk"), "{err}");
    // Not a JWS.
    let err = refused(&deployment(&text, "junk".into()));
    assert!(err.contains("not a JWS compact serialization"), "{err}");
}

#[test]
fn malformed_deployments_and_manifests_say_what_is_wrong() {
    let digest = Sha256::digest(FIRMWARE);
    // Not a deployment at all.
    let err = refused("{\"updateManifest\": 1}");
    assert!(err.contains("not a Device Update deployment"), "{err}");
    // Unsupported manifest version.
    let err = refused(&signed(&manifest_text("3", digest.as_bytes())));
    assert!(err.contains("manifestVersion 3 is not supported"), "{err}");
    // A file without a URL.
    let text = manifest_text("5", digest.as_bytes());
    let no_url = AduDeployment {
        update_manifest: text.clone(),
        update_manifest_signature: signing().sign_manifest(&root(), &text),
        file_urls: BTreeMap::new(),
    };
    let err = refused(&no_url.to_stored());
    assert!(err.contains("fileUrls has no URL for file \"f0\""), "{err}");
    // A hash that is not 32 bytes.
    let err = refused(&signed(&manifest_text("5", &[1, 2, 3])));
    assert!(err.contains("sha256 is not 32 base64 bytes"), "{err}");
    // A reference step (a detached child manifest) is not supported yet.
    let reference = text.replace("\"type\":\"inline\"", "\"type\":\"reference\"");
    let err = refused(&signed(&reference));
    assert!(err.contains("only inline steps are supported"), "{err}");
    // A step's device compatibility is a list of objects of strings.
    let bad = text.replace(r#""model":"esp32-sensor""#, r#""model":7"#);
    let err = refused(&signed(&bad));
    assert!(
        err.contains("handlerProperties.compatibility.model is not a string"),
        "{err}"
    );
    // The mapped manifest is validated as every manifest is (a plain file name).
    let traversal = text.replace("sensor-2.0.0.bin", "../boot.bin");
    let err = refused(&signed(&traversal));
    assert!(err.contains("must be a plain name"), "{err}");
    // Oversized input is refused unread.
    let huge = "x".repeat(300 * 1024);
    let err = refused(&format!("{{\"updateManifest\":\"{huge}\"}}"));
    assert!(err.contains("more than the"), "{err}");
    // A root key that is not a real RSA modulus is refused at configuration.
    let err = AduRootKey::from_base64("tiny", "AQAB", "AQAB").unwrap_err();
    assert!(err.contains("2048-8192 bits"), "{err}");
}
