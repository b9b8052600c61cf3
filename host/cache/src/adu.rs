//! Device Update (ADU) deployments: the update manifest IoT Hub's Device Update service
//! puts in a device's twin, verified as the Device Update agent verifies it, and read
//! as an Outpost [`UpdateManifest`].
//!
//! A deployment (the twin's `deviceUpdate.service`) carries three things, which Outpost
//! keeps together as one [`AduDeployment`] (its JSON is the stored, re-verifiable form):
//!
//! * `updateManifest`: the manifest (v4 or v5) as a JSON **string**; its exact bytes
//!   are what the signature covers;
//! * `updateManifestSignature`: a JWS compact serialization (RS256) whose payload is
//!   `{"sha256": base64(sha256(updateManifest))}` and whose header carries the signing
//!   key itself as `sjwk`: another JWS (RS256, `kid` naming a root key) whose payload is
//!   the signing key as a JWK (`kty` RSA, `n`, `e`);
//! * `fileUrls`: file id → where to download it.
//!
//! Verification: the `sjwk` against the operator's [`AduRootKey`]s (by `kid`; none is
//! built in), the manifest's signature against that signing key, the payload's hash
//! against the manifest's bytes, and only then the manifest is parsed, mapped and
//! validated. A step's handler `outpost/{name}:{major}` names the WASM handler
//! `{name}` (Device Update's proxy-update model, with the gateway's devices as its
//! components). The manifest's `compatibility` is the agent's (the gateway's, which
//! Device Update matched); the devices a step updates are those its
//! `handlerProperties.compatibility` entries match, or else every device whose type
//! the step's handler serves. Each file must have a URL; its `sha256` is the name the firmware cache
//! fetches and checks it under, so a file that does not match never reaches a device.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use ring::signature::{RSA_PKCS1_2048_8192_SHA256, RsaPublicKeyComponents};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::manifest::{
    MANIFEST_VERSION, MAX_JWS_BYTES, ManifestFile, Step, UpdateId, UpdateManifest, VerifiedManifest,
};
use crate::{CacheError, Sha256};

/// The `signer` a verified ADU manifest names: `adu:{root kid}/{signing kid}`.
pub const SIGNER_PREFIX: &str = "adu:";

/// A Device Update root key the operator trusts (Device Update's published roots, or
/// a test root): the RSA public key's modulus and exponent, under its `kid`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AduRootKey {
    /// The key id a signing key's `sjwk` header names (such as `ADU.200702.R`).
    pub kid: String,
    /// The modulus, big-endian bytes.
    pub n: Vec<u8>,
    /// The public exponent, big-endian bytes (65537 is `[1, 0, 1]`).
    pub e: Vec<u8>,
}

impl AduRootKey {
    /// From the base64 (standard or URL-safe, padded or not) modulus and exponent, as
    /// JWKs and Device Update's documentation give them.
    pub fn from_base64(kid: &str, n: &str, e: &str) -> Result<Self, String> {
        // Leading zero bytes (a DER INTEGER's sign byte) are not part of the number.
        let strip = |bytes: Vec<u8>| {
            bytes
                .into_iter()
                .skip_while(|b| *b == 0)
                .collect::<Vec<u8>>()
        };
        let key = Self {
            kid: kid.to_owned(),
            n: strip(decode_any(n).map_err(|err| format!("root key {kid:?}: n: {err}"))?),
            e: strip(decode_any(e).map_err(|err| format!("root key {kid:?}: e: {err}"))?),
        };
        let bits = key
            .n
            .first()
            .map_or(0, |top| key.n.len() * 8 - top.leading_zeros() as usize);
        if !(2048..=8192).contains(&bits) {
            return Err(format!(
                "root key {kid:?}: a {bits}-bit modulus; RSA keys of 2048-8192 bits are accepted"
            ));
        }
        Ok(key)
    }

    /// The modulus and exponent as standard base64 (what [`from_base64`](Self::from_base64) reads).
    pub fn to_base64(&self) -> (String, String) {
        (STANDARD.encode(&self.n), STANDARD.encode(&self.e))
    }
}

pub use outpost_azure::adu::AduDeployment;

/// Whether a stored signed manifest is an ADU deployment (JSON) rather than an Outpost
/// JWS (which never starts with `{`).
pub fn is_adu(stored: &str) -> bool {
    stored.trim_start().starts_with('{')
}

fn decode_any(text: &str) -> Result<Vec<u8>, String> {
    let text = text.trim();
    [&URL_SAFE_NO_PAD, &URL_SAFE, &STANDARD, &STANDARD_NO_PAD]
        .iter()
        .find_map(|engine| engine.decode(text).ok())
        .ok_or_else(|| "not base64".to_owned())
}

#[derive(Deserialize)]
struct JwsHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    sjwk: Option<String>,
    #[serde(default)]
    crit: Option<Value>,
}

#[derive(Serialize, Deserialize)]
struct Jwk {
    kty: String,
    n: String,
    e: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    alg: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kid: Option<String>,
}

/// The three parts of a compact JWS, with the header parsed and the signature checked
/// against `key`; returns the header and the decoded payload.
fn verify_rs256(
    jws: &str,
    what: &str,
    key: impl FnOnce(&JwsHeader) -> Result<(Vec<u8>, Vec<u8>), CacheError>,
) -> Result<(JwsHeader, Vec<u8>), CacheError> {
    let refuse = |why: String| CacheError::Signature(format!("{what}: {why}"));
    let mut parts = jws.trim().split('.');
    let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(refuse(
            "not a JWS compact serialization (three base64url parts separated by '.')".into(),
        ));
    };
    let header: JwsHeader = URL_SAFE_NO_PAD
        .decode(header_b64)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or_else(|| refuse("the JWS header is not base64url JSON".into()))?;
    if header.alg != "RS256" {
        return Err(refuse(format!(
            "alg {:?} is not accepted; Device Update signs with RS256",
            header.alg
        )));
    }
    if header.crit.is_some() {
        return Err(refuse("crit header parameters are not supported".into()));
    }
    let (n, e) = key(&header)?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature_b64)
        .map_err(|_| refuse("the signature is not base64url".into()))?;
    let signing_input = format!("{header_b64}.{payload_b64}");
    RsaPublicKeyComponents { n: &n, e: &e }
        .verify(
            &RSA_PKCS1_2048_8192_SHA256,
            signing_input.as_bytes(),
            &signature,
        )
        .map_err(|_| refuse("the signature does not verify".into()))?;
    let payload = URL_SAFE_NO_PAD
        .decode(payload_b64)
        .map_err(|_| refuse("the payload is not base64url".into()))?;
    Ok((header, payload))
}

/// Verifies a stored [`AduDeployment`] against the trusted `roots`, then reads its
/// manifest as an Outpost [`UpdateManifest`] (validated) with each file's URL.
pub fn verify(stored: &str, roots: &[AduRootKey]) -> Result<VerifiedManifest, CacheError> {
    if stored.len() > MAX_JWS_BYTES {
        return Err(CacheError::Manifest(format!(
            "the deployment is {} bytes, more than the {MAX_JWS_BYTES} allowed",
            stored.len()
        )));
    }
    let deployment: AduDeployment = serde_json::from_str(stored).map_err(|err| {
        CacheError::Manifest(format!(
            "not a Device Update deployment (updateManifest, updateManifestSignature, fileUrls): {err}"
        ))
    })?;
    let mut signing_kid = String::new();
    let mut root_kid = String::new();
    let (_, payload) = verify_rs256(
        &deployment.update_manifest_signature,
        "updateManifestSignature",
        |header| {
            let sjwk = header.sjwk.as_deref().ok_or_else(|| {
                CacheError::Signature(
                    "updateManifestSignature: the header has no sjwk (the signing key)".into(),
                )
            })?;
            let (sjwk_header, jwk) = verify_rs256(sjwk, "sjwk", |header| {
                let kid = header.kid.as_deref().ok_or_else(|| {
                    CacheError::Signature("sjwk: the header has no kid naming its root key".into())
                })?;
                let root = roots.iter().find(|r| r.kid == kid).ok_or_else(|| {
                    CacheError::Signature(format!(
                        "sjwk: root key {kid:?} is not a trusted Device Update root (configured: {})",
                        if roots.is_empty() {
                            "none".to_owned()
                        } else {
                            roots.iter().map(|r| r.kid.as_str()).collect::<Vec<_>>().join(", ")
                        }
                    ))
                })?;
                Ok((root.n.clone(), root.e.clone()))
            })?;
            root_kid = sjwk_header.kid.unwrap_or_default();
            let jwk: Jwk = serde_json::from_slice(&jwk).map_err(|err| {
                CacheError::Signature(format!("sjwk: the payload is not an RSA JWK: {err}"))
            })?;
            if jwk.kty != "RSA" {
                return Err(CacheError::Signature(format!(
                    "sjwk: key type {:?} is not RSA",
                    jwk.kty
                )));
            }
            signing_kid = jwk.kid.clone().unwrap_or_default();
            let n = decode_any(&jwk.n)
                .map_err(|err| CacheError::Signature(format!("sjwk: n: {err}")))?;
            let e = decode_any(&jwk.e)
                .map_err(|err| CacheError::Signature(format!("sjwk: e: {err}")))?;
            Ok((n, e))
        },
    )?;
    #[derive(Deserialize)]
    struct Hash {
        sha256: String,
    }
    let hash: Hash = serde_json::from_slice(&payload).map_err(|_| {
        CacheError::Signature("updateManifestSignature: the payload is not {\"sha256\": …}".into())
    })?;
    let signed = decode_any(&hash.sha256)
        .map_err(|err| CacheError::Signature(format!("updateManifestSignature: sha256: {err}")))?;
    if signed != Sha256::digest(deployment.update_manifest.as_bytes()).as_bytes() {
        return Err(CacheError::Signature(
            "updateManifest does not match the hash its signature covers (altered after signing)"
                .into(),
        ));
    }
    let manifest = read_manifest(&deployment.update_manifest, &deployment.file_urls)?;
    manifest.validate()?;
    Ok(VerifiedManifest {
        manifest,
        signer: format!("{SIGNER_PREFIX}{root_kid}/{signing_kid}"),
        jws: stored.trim().to_owned(),
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AduManifest {
    manifest_version: Value,
    update_id: UpdateId,
    compatibility: Vec<serde_json::Map<String, Value>>,
    instructions: AduInstructions,
    #[serde(default)]
    files: BTreeMap<String, AduFile>,
    #[serde(default)]
    created_date_time: Option<String>,
}

#[derive(Deserialize)]
struct AduInstructions {
    steps: Vec<AduStep>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AduStep {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    handler: Option<String>,
    #[serde(default)]
    files: Vec<String>,
    #[serde(default)]
    handler_properties: serde_json::Map<String, Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AduFile {
    #[serde(alias = "filename")]
    file_name: String,
    size_in_bytes: u64,
    hashes: BTreeMap<String, String>,
}

/// Reads a v4/v5 update manifest as an Outpost manifest: inline steps with their
/// handler, files with their sha256 and URL.
fn read_manifest(
    text: &str,
    urls: &BTreeMap<String, String>,
) -> Result<UpdateManifest, CacheError> {
    let bad = |why: String| CacheError::Manifest(format!("updateManifest: {why}"));
    let adu: AduManifest = serde_json::from_str(text).map_err(|err| bad(err.to_string()))?;
    let version = match &adu.manifest_version {
        Value::String(v) => v.clone(),
        Value::Number(n) => n.to_string(),
        other => other.to_string(),
    };
    if !matches!(version.as_str(), "4" | "5") {
        return Err(bad(format!(
            "manifestVersion {version} is not supported (4 and 5 are)"
        )));
    }
    // The manifest's own compatibility names the agent (the gateway), which Device
    // Update matched before it deployed; the devices behind the gateway are chosen per
    // step below.
    for (index, entry) in adu.compatibility.iter().enumerate() {
        string_map(entry)
            .map_err(|key| bad(format!("compatibility[{index}].{key} is not a string")))?;
    }
    let mut compatibility = Vec::new();
    let mut steps = Vec::new();
    for (index, step) in adu.instructions.steps.into_iter().enumerate() {
        if step.kind.as_deref().is_some_and(|k| k != "inline") {
            return Err(bad(format!(
                "steps[{index}] is a {:?} step; only inline steps are supported (no detached \
                 child manifests)",
                step.kind.unwrap_or_default()
            )));
        }
        let handler = step
            .handler
            .ok_or_else(|| bad(format!("steps[{index}] has no handler")))?;
        let handler = outpost_handler(&handler).unwrap_or(handler);
        // Which devices: `handlerProperties.compatibility` (entries of device
        // properties), or else every device whose type this handler serves.
        match step.handler_properties.get("compatibility") {
            None => compatibility.push(BTreeMap::from([(
                crate::manifest::HANDLER_KEY.to_owned(),
                handler.clone(),
            )])),
            Some(Value::Array(entries)) => {
                for entry in entries {
                    let map = entry.as_object().ok_or_else(|| {
                        bad(format!(
                            "steps[{index}].handlerProperties.compatibility holds objects"
                        ))
                    })?;
                    compatibility.push(string_map(map).map_err(|key| {
                        bad(format!(
                            "steps[{index}].handlerProperties.compatibility.{key} is not a string"
                        ))
                    })?);
                }
            }
            Some(_) => {
                return Err(bad(format!(
                    "steps[{index}].handlerProperties.compatibility is a list of objects"
                )));
            }
        }
        steps.push(Step {
            handler,
            files: step.files,
            handler_properties: step.handler_properties,
        });
    }
    let mut files = Vec::new();
    for (id, file) in adu.files {
        let sha256 = file
            .hashes
            .get("sha256")
            .ok_or_else(|| bad(format!("file {id:?} has no sha256 hash")))?;
        let digest: [u8; 32] = decode_any(sha256)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or_else(|| bad(format!("file {id:?}: sha256 is not 32 base64 bytes")))?;
        let url = urls
            .get(&id)
            .ok_or_else(|| CacheError::Manifest(format!("fileUrls has no URL for file {id:?}")))?;
        files.push(ManifestFile {
            id,
            file_name: file.file_name,
            size_in_bytes: file.size_in_bytes,
            sha256: Sha256::from_bytes(digest),
            url: Some(url.clone()),
        });
    }
    Ok(UpdateManifest {
        manifest_version: MANIFEST_VERSION,
        update_id: adu.update_id,
        compatibility,
        steps,
        files,
        created_date_time: adu.created_date_time,
    })
}

/// A JSON object whose values are all strings, as a map; else the key that is not.
fn string_map(entry: &serde_json::Map<String, Value>) -> Result<BTreeMap<String, String>, String> {
    entry
        .iter()
        .map(|(key, value)| match value {
            Value::String(value) => Ok((key.clone(), value.clone())),
            _ => Err(key.clone()),
        })
        .collect()
}

/// The Outpost handler a Device Update handler name picks: `outpost/{name}:{major}`
/// is the WASM handler `{name}`; other names (`microsoft/swupdate:1`) stay as they are
/// and match no Outpost handler.
pub fn outpost_handler(adu_handler: &str) -> Option<String> {
    let rest = adu_handler.strip_prefix("outpost/")?;
    let (name, major) = rest.rsplit_once(':')?;
    (!name.is_empty() && !major.is_empty() && major.bytes().all(|b| b.is_ascii_digit()))
        .then(|| name.to_owned())
}

/// An RSA key that signs Device Update deployments (for tests, tools and simulators:
/// Device Update's own service signs real ones).
pub struct AduSigner {
    key: ring::signature::RsaKeyPair,
    kid: String,
}

impl AduSigner {
    /// From a PKCS#8 DER private key.
    pub fn from_pkcs8(kid: &str, der: &[u8]) -> Result<Self, String> {
        Ok(Self {
            key: ring::signature::RsaKeyPair::from_pkcs8(der)
                .map_err(|err| format!("key {kid:?}: {err}"))?,
            kid: kid.to_owned(),
        })
    }

    /// The public half as a trusted root.
    pub fn root(&self) -> AduRootKey {
        let public = RsaPublicKeyComponents::<Vec<u8>>::from(self.key.public());
        AduRootKey {
            kid: self.kid.clone(),
            n: public.n,
            e: public.e,
        }
    }

    fn jws(&self, header: &Value, payload: &[u8]) -> String {
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(payload)
        );
        let mut signature = vec![0; self.key.public().modulus_len()];
        self.key
            .sign(
                &ring::signature::RSA_PKCS1_SHA256,
                &ring::rand::SystemRandom::new(),
                input.as_bytes(),
                &mut signature,
            )
            .expect("an RSA key signs");
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature))
    }

    /// Signs `update_manifest` with this key, which `root` vouches for (its `sjwk`).
    pub fn sign_manifest(&self, root: &AduSigner, update_manifest: &str) -> String {
        let me = self.root();
        let jwk = Jwk {
            kty: "RSA".into(),
            n: STANDARD.encode(&me.n),
            e: STANDARD.encode(&me.e),
            alg: Some("RS256".into()),
            kid: Some(self.kid.clone()),
        };
        let sjwk = root.jws(
            &serde_json::json!({"alg": "RS256", "kid": root.kid}),
            serde_json::to_string(&jwk).expect("serialises").as_bytes(),
        );
        let hash = STANDARD.encode(Sha256::digest(update_manifest.as_bytes()).as_bytes());
        self.jws(
            &serde_json::json!({"alg": "RS256", "sjwk": sjwk}),
            serde_json::json!({ "sha256": hash }).to_string().as_bytes(),
        )
    }
}
