//! Signed update manifests: what may be fetched, and how big and which hash it must be.
//!
//! A manifest is a JSON document (modelled on the Device Update import manifest) carried
//! in a **JWS compact serialization** (RFC 7515) signed with **EdDSA over Ed25519**
//! (RFC 8037):
//!
//! ```text
//! BASE64URL(header) "." BASE64URL(manifest JSON) "." BASE64URL(signature)
//! header = {"alg":"EdDSA","typ":"outpost-update-manifest","kid":"<trusted signer name>"}
//! ```
//!
//! Verification checks the header (only `EdDSA`, the explicit `typ`, no `crit`), picks
//! the trusted key named by `kid`, verifies the signature over the first two segments
//! exactly as received, and only then parses and validates the manifest. The full
//! format is in `docs/update-manifests.md`.

use std::collections::{BTreeMap, HashSet};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::{CacheError, Sha256};

/// The JWS `typ` every manifest carries (explicit typing, RFC 8725 §3.11).
pub const MANIFEST_TYP: &str = "outpost-update-manifest";
/// The manifest format version this build reads.
pub const MANIFEST_VERSION: u32 = 1;
/// At most this many files per manifest (as Device Update).
pub const MAX_FILES: usize = 10;
/// At most this many steps per manifest (as Device Update).
pub const MAX_STEPS: usize = 10;
/// At most this many bytes over all files of one manifest (2 GiB, as Device Update).
pub const MAX_TOTAL_BYTES: u64 = 2 << 30;
/// A signed manifest larger than this is refused unread.
pub const MAX_JWS_BYTES: usize = 256 * 1024;

/// A compatibility key that matches the devices whose type the named update handler
/// serves (`{"handler": "esp32-app"}`); other keys are device properties (and
/// `deviceType`).
pub const HANDLER_KEY: &str = "handler";

/// A key allowed to sign update manifests, under the name its JWS `kid` gives.
#[derive(Clone, Debug)]
pub struct TrustedSigner {
    /// The signer's name, matched against the JWS `kid`.
    pub name: String,
    /// Its public key.
    pub key: VerifyingKey,
}

/// Which update is this: the triple that identifies it everywhere.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateId {
    /// Who publishes it ("Acme").
    pub provider: String,
    /// What it updates ("thermostat-firmware").
    pub name: String,
    /// Its version ("1.4.2").
    pub version: String,
}

impl std::fmt::Display for UpdateId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.provider, self.name, self.version)
    }
}

/// One step of the update: a handler and the files it is given.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Step {
    /// The update handler that runs this step (its registry name).
    pub handler: String,
    /// Ids of the files the step uses.
    pub files: Vec<String>,
    /// Free-form properties passed to the handler.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub handler_properties: serde_json::Map<String, serde_json::Value>,
}

/// One file the update needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ManifestFile {
    /// The file's id, referenced by steps.
    pub id: String,
    /// A plain file name, for people and handlers.
    pub file_name: String,
    /// Its exact size.
    pub size_in_bytes: u64,
    /// Its sha256, the name it is cached under.
    pub sha256: Sha256,
    /// Where to fetch it (http or https). A file without one can only come from an
    /// operator import.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// An update manifest (format version 1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateManifest {
    /// Always [`MANIFEST_VERSION`].
    pub manifest_version: u32,
    /// Which update this is.
    pub update_id: UpdateId,
    /// Which devices it is for: each entry is a set of properties a device must all
    /// match (such as `manufacturer` and `model`); a device matching any entry is compatible.
    pub compatibility: Vec<BTreeMap<String, String>>,
    /// The steps, in order.
    pub steps: Vec<Step>,
    /// The files.
    pub files: Vec<ManifestFile>,
    /// When the manifest was made (RFC 3339), informational.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_date_time: Option<String>,
}

impl UpdateManifest {
    /// Checks everything a well-formed manifest promises; the error names the field.
    pub fn validate(&self) -> Result<(), CacheError> {
        let bad = |why: String| Err(CacheError::Manifest(why));
        if self.manifest_version != MANIFEST_VERSION {
            return bad(format!(
                "manifestVersion {} is not supported (this gateway reads {MANIFEST_VERSION})",
                self.manifest_version
            ));
        }
        for (field, value) in [
            ("updateId.provider", &self.update_id.provider),
            ("updateId.name", &self.update_id.name),
            ("updateId.version", &self.update_id.version),
        ] {
            if value.is_empty() || value.len() > 128 || value.contains(['/', '\0']) {
                return bad(format!(
                    "{field} must be 1-128 characters without '/': {value:?}"
                ));
            }
        }
        if self.compatibility.is_empty() || self.compatibility.iter().any(BTreeMap::is_empty) {
            return bad("compatibility needs at least one non-empty entry".into());
        }
        if self.files.is_empty() || self.files.len() > MAX_FILES {
            return bad(format!(
                "a manifest lists 1 to {MAX_FILES} files, this one {}",
                self.files.len()
            ));
        }
        if self.steps.is_empty() || self.steps.len() > MAX_STEPS {
            return bad(format!(
                "a manifest has 1 to {MAX_STEPS} steps, this one {}",
                self.steps.len()
            ));
        }
        let mut ids = HashSet::new();
        let mut total = 0u64;
        for file in &self.files {
            if file.id.is_empty() || !ids.insert(file.id.as_str()) {
                return bad(format!("file id {:?} is empty or repeated", file.id));
            }
            if !is_plain_file_name(&file.file_name) {
                return bad(format!(
                    "file {:?}: fileName {:?} must be a plain name (no '/', '\\\\', '..' or control characters)",
                    file.id, file.file_name
                ));
            }
            if let Some(url) = &file.url {
                let uri: http::Uri = url.parse().map_err(|e| {
                    CacheError::Manifest(format!("file {:?}: url {url:?}: {e}", file.id))
                })?;
                if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                    return bad(format!(
                        "file {:?}: url {url:?} must be http:// or https:// with a host",
                        file.id
                    ));
                }
            }
            total = total.saturating_add(file.size_in_bytes);
        }
        if total > MAX_TOTAL_BYTES {
            return bad(format!(
                "files total {total} bytes, more than the {MAX_TOTAL_BYTES} allowed"
            ));
        }
        for (index, step) in self.steps.iter().enumerate() {
            if step.handler.is_empty() {
                return bad(format!("steps[{index}].handler is empty"));
            }
            if let Some(missing) = step.files.iter().find(|id| !ids.contains(id.as_str())) {
                return bad(format!(
                    "steps[{index}] names file {missing:?}, which is not in files"
                ));
            }
        }
        Ok(())
    }

    /// The file with this sha256, if the manifest lists it.
    pub fn file(&self, sha256: &Sha256) -> Option<&ManifestFile> {
        self.files.iter().find(|f| &f.sha256 == sha256)
    }
}

fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\'])
        && !name.chars().any(char::is_control)
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    typ: Option<String>,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    crit: Option<serde_json::Value>,
}

/// A manifest whose signature verified against a trusted signer.
#[derive(Clone, Debug)]
pub struct VerifiedManifest {
    /// The manifest.
    pub manifest: UpdateManifest,
    /// The name of the signer whose key verified it.
    pub signer: String,
    /// The signed form, exactly as received.
    pub jws: String,
}

/// Signs `manifest` as a JWS compact serialization, with `kid` naming the signer.
pub fn sign(manifest: &UpdateManifest, key: &SigningKey, kid: &str) -> Result<String, CacheError> {
    manifest.validate()?;
    let header = serde_json::to_vec(&Header {
        alg: "EdDSA".into(),
        typ: Some(MANIFEST_TYP.into()),
        kid: Some(kid.into()),
        crit: None,
    })
    .map_err(|e| CacheError::Manifest(e.to_string()))?;
    let payload = serde_json::to_vec(manifest).map_err(|e| CacheError::Manifest(e.to_string()))?;
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(payload)
    );
    let signature = key.sign(signing_input.as_bytes());
    Ok(format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature.to_bytes())
    ))
}

/// Verifies a JWS compact manifest against `trusted` signers, then parses and validates it.
pub fn verify(jws: &str, trusted: &[TrustedSigner]) -> Result<VerifiedManifest, CacheError> {
    let refuse = |why: String| CacheError::Signature(why);
    let jws = jws.trim();
    if jws.len() > MAX_JWS_BYTES {
        return Err(CacheError::Manifest(format!(
            "signed manifest is {} bytes, more than the {MAX_JWS_BYTES} allowed",
            jws.len()
        )));
    }
    let mut parts = jws.split('.');
    let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(refuse(
            "not a JWS compact serialization (three base64url parts separated by '.')".into(),
        ));
    };
    let header_bytes = URL_SAFE_NO_PAD
        .decode(header_b64)
        .map_err(|e| refuse(format!("JWS header is not base64url: {e}")))?;
    let header: Header = serde_json::from_slice(&header_bytes)
        .map_err(|e| refuse(format!("JWS header is not the expected JSON: {e}")))?;
    if header.alg != "EdDSA" {
        return Err(refuse(format!(
            "JWS alg {:?} is not accepted; manifests are signed with EdDSA",
            header.alg
        )));
    }
    if header.typ.as_deref() != Some(MANIFEST_TYP) {
        return Err(refuse(format!(
            "JWS typ {:?} is not {MANIFEST_TYP:?}",
            header.typ
        )));
    }
    if header.crit.is_some() {
        return Err(refuse(
            "JWS crit header parameters are not supported".into(),
        ));
    }
    let kid = header
        .kid
        .ok_or_else(|| refuse("JWS header has no kid naming the signer".into()))?;
    let signer = trusted
        .iter()
        .find(|s| s.name == kid)
        .ok_or_else(|| refuse(format!("signer {kid:?} is not a trusted manifest signer")))?;
    let signature_bytes = URL_SAFE_NO_PAD
        .decode(signature_b64)
        .map_err(|e| refuse(format!("JWS signature is not base64url: {e}")))?;
    let signature = Signature::from_slice(&signature_bytes).map_err(|_| {
        refuse(format!(
            "JWS signature is {} bytes, not 64",
            signature_bytes.len()
        ))
    })?;
    let signing_input = &jws[..header_b64.len() + 1 + payload_b64.len()];
    signer
        .key
        .verify_strict(signing_input.as_bytes(), &signature)
        .map_err(|_| refuse(format!("signature does not verify with {kid:?}'s key")))?;
    let payload = URL_SAFE_NO_PAD
        .decode(payload_b64)
        .map_err(|e| CacheError::Manifest(format!("payload is not base64url: {e}")))?;
    let manifest: UpdateManifest = serde_json::from_slice(&payload)
        .map_err(|e| CacheError::Manifest(format!("payload: {e}")))?;
    manifest.validate()?;
    Ok(VerifiedManifest {
        manifest,
        signer: kid,
        jws: jws.to_owned(),
    })
}
