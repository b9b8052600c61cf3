//! Signed update manifests: every refusal happens before anything is fetched.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::SigningKey;
use outpost_cache::manifest::{self, TrustedSigner, UpdateManifest};
use outpost_cache::{CacheError, Sha256};

use crate::support::{Origin, Site, artifact, manifest, sign, signer};

fn refused(jws: &str) -> String {
    match manifest::verify(jws, &[signer().1]) {
        Ok(_) => panic!("manifest was accepted"),
        Err(error) => error.to_string(),
    }
}

fn forge(header: &str, payload: &str, key: &SigningKey) -> String {
    use ed25519_dalek::Signer as _;
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(payload)
    );
    let signature = key.sign(input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature.to_bytes()))
}

#[test]
fn a_signed_manifest_verifies_and_round_trips() {
    let bytes = artifact(1000, 1);
    let m = manifest(
        "1.0.0",
        &[("app.bin", &bytes, Some("http://127.0.0.1:1/app.bin"))],
    );
    let verified = manifest::verify(&sign(&m), &[signer().1]).unwrap();
    assert_eq!(verified.manifest, m);
    assert_eq!(verified.signer, "fleet");
    assert_eq!(
        verified
            .manifest
            .file(&Sha256::digest(&bytes))
            .unwrap()
            .size_in_bytes,
        1000
    );
}

#[test]
fn signature_failures_are_refused() {
    let bytes = artifact(1000, 1);
    let m = manifest("1.0.0", &[("app.bin", &bytes, None)]);
    let jws = sign(&m);
    let parts: Vec<&str> = jws.split('.').collect();

    // Payload changed after signing (a bigger size, say).
    let mut changed = m.clone();
    changed.files[0].size_in_bytes = 999_999;
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&changed).unwrap()),
        parts[2]
    );
    assert!(
        refused(&tampered).contains("does not verify"),
        "{}",
        refused(&tampered)
    );

    // Signed by a key that is not trusted under that name.
    let stranger = SigningKey::from_bytes(&[9u8; 32]);
    let other = manifest::sign(&m, &stranger, "fleet").unwrap();
    assert!(refused(&other).contains("does not verify"));
    let unknown = manifest::sign(&m, &stranger, "mallory").unwrap();
    assert!(refused(&unknown).contains("\"mallory\" is not a trusted manifest signer"));

    let payload = serde_json::to_string(&m).unwrap();
    let key = signer().0;
    for (header, expect) in [
        (
            r#"{"alg":"none","typ":"outpost-update-manifest","kid":"fleet"}"#,
            "alg \"none\"",
        ),
        (
            r#"{"alg":"HS256","typ":"outpost-update-manifest","kid":"fleet"}"#,
            "alg \"HS256\"",
        ),
        (r#"{"alg":"EdDSA","kid":"fleet"}"#, "typ None"),
        (
            r#"{"alg":"EdDSA","typ":"JWT","kid":"fleet"}"#,
            "typ Some(\"JWT\")",
        ),
        (
            r#"{"alg":"EdDSA","typ":"outpost-update-manifest"}"#,
            "no kid",
        ),
        (
            r#"{"alg":"EdDSA","typ":"outpost-update-manifest","kid":"fleet","crit":["exp"]}"#,
            "crit",
        ),
        ("not json", "not the expected JSON"),
    ] {
        let error = refused(&forge(header, &payload, &key));
        assert!(error.contains(expect), "{header}: {error}");
    }

    // An unsigned token ("alg":"none" with an empty signature).
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"outpost-update-manifest","kid":"fleet"}"#),
        URL_SAFE_NO_PAD.encode(&payload)
    );
    assert!(refused(&none).contains("alg \"none\""));
    // Signature cut short, and shapes that are not JWS compact.
    let short = format!("{}.{}.{}", parts[0], parts[1], &parts[2][..20]);
    assert!(refused(&short).contains("not 64"));
    for junk in [
        "",
        "a.b",
        "a.b.c.d",
        "!!!.b.c",
        &format!("{}.{}.@@", parts[0], parts[1]),
    ] {
        assert!(
            matches!(
                manifest::verify(junk, &[signer().1]),
                Err(CacheError::Signature(_))
            ),
            "{junk:?}"
        );
    }
    // No signer trusted at all.
    assert!(manifest::verify(&jws, &[] as &[TrustedSigner]).is_err());
}

#[test]
fn malformed_manifests_are_refused_even_when_signed() {
    let bytes = artifact(100, 2);
    let good = manifest(
        "1.0.0",
        &[("app.bin", &bytes, Some("https://cdn.example/app.bin"))],
    );
    type Mutation = Box<dyn Fn(&mut UpdateManifest)>;
    let cases: Vec<(&str, Mutation)> = vec![
        (
            "fileName",
            Box::new(|m| m.files[0].file_name = "../../outpost.db".into()),
        ),
        (
            "fileName",
            Box::new(|m| m.files[0].file_name = "a/b".into()),
        ),
        (
            "url \"file:///etc/passwd\"",
            Box::new(|m| m.files[0].url = Some("file:///etc/passwd".into())),
        ),
        (
            "must be http",
            Box::new(|m| m.files[0].url = Some("ftp://host/x".into())),
        ),
        (
            "empty or repeated",
            Box::new(|m| m.files.push(m.files[0].clone())),
        ),
        (
            "not in files",
            Box::new(|m| m.steps[0].files.push("nope".into())),
        ),
        ("1 to 10 files", Box::new(|m| m.files.clear())),
        (
            "1 to 10 files",
            Box::new(|m| {
                for i in 0..10 {
                    let mut f = m.files[0].clone();
                    f.id = format!("x{i}");
                    m.files.push(f);
                }
            }),
        ),
        (
            "files total",
            Box::new(|m| m.files[0].size_in_bytes = 3 << 30),
        ),
        ("manifestVersion 2", Box::new(|m| m.manifest_version = 2)),
        ("compatibility", Box::new(|m| m.compatibility.clear())),
        (
            "updateId.version",
            Box::new(|m| m.update_id.version = "1/2".into()),
        ),
    ];
    for (expect, mutate) in cases {
        let mut m = good.clone();
        mutate(&mut m);
        // Sign the bad payload by hand: `sign` itself refuses invalid manifests.
        let jws = forge(
            r#"{"alg":"EdDSA","typ":"outpost-update-manifest","kid":"fleet"}"#,
            &serde_json::to_string(&m).unwrap(),
            &signer().0,
        );
        let error = refused(&jws);
        assert!(
            error.starts_with("update manifest refused") && error.contains(expect),
            "{expect}: {error}"
        );
        assert!(manifest::sign(&m, &signer().0, "fleet").is_err());
    }
    // Unknown fields are refused too (a typo must not silently drop a constraint).
    let mut value = serde_json::to_value(&good).unwrap();
    value["files"][0]["sha512"] = "x".into();
    let jws = forge(
        r#"{"alg":"EdDSA","typ":"outpost-update-manifest","kid":"fleet"}"#,
        &value.to_string(),
        &signer().0,
    );
    assert!(refused(&jws).contains("unknown field `sha512`"));
    // Oversized input is refused unread.
    assert!(refused(&"a".repeat(300 * 1024)).contains("more than"));
}

#[tokio::test]
async fn a_refused_manifest_records_nothing_and_fetches_nothing() {
    let origin = Origin::start().await;
    let bytes = artifact(4096, 3);
    let url = origin.publish("app.bin", bytes.clone());
    let site = Site::new().await;
    let cache = site.cache().await;
    let stranger = SigningKey::from_bytes(&[9u8; 32]);
    let jws = manifest::sign(
        &manifest("1.0.0", &[("app.bin", &bytes, Some(&url))]),
        &stranger,
        "fleet",
    )
    .unwrap();
    assert!(matches!(
        cache.add_manifest(&jws).await,
        Err(CacheError::Signature(_))
    ));
    assert!(cache.manifests().await.unwrap().is_empty());
    let sha = Sha256::digest(&bytes);
    assert!(matches!(cache.ensure(sha).await, Err(CacheError::NotNamed(s)) if s == sha));
    assert_eq!(
        origin.requests(),
        0,
        "nothing may be fetched for an unverified manifest"
    );

    // The same manifest properly signed is accepted and its file fetched.
    let verified = cache
        .add_manifest(&sign(&manifest(
            "1.0.0",
            &[("app.bin", &bytes, Some(&url))],
        )))
        .await
        .unwrap();
    assert_eq!(
        verified.manifest.update_id.to_string(),
        "Acme/thermostat/1.0.0"
    );
    assert_eq!(cache.manifests().await.unwrap().len(), 1);
    assert_eq!(cache.ensure(sha).await.unwrap().read_all().unwrap(), bytes);
    assert_eq!(origin.requests(), 1);
}
