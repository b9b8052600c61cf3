//! Signed handler packages (documented in `docs/handler-packages.md`).
//!
//! A package is a plain tar archive of regular files, flat (no directories):
//!
//! * `outpost-handler.json` — the [`Manifest`];
//! * the component it names (e.g. `handler.wasm`) and any other files it lists;
//! * `outpost-handler.sig` — one line `ed25519 <public key hex> <signature hex>`.
//!
//! The signature is an ed25519 signature over the package [`digest`](Package::digest): the
//! SHA-256 of a text that lists the manifest's SHA-256 and every other file's name and
//! SHA-256. The manifest lists every file with its SHA-256, so every byte of the package
//! except the signature is covered, and an entry the manifest does not list is refused.

use std::collections::BTreeMap;
use std::io::Read;

use ed25519_dalek::{Signature, Signer};
pub use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::WIT_VERSIONS;

/// The manifest's name inside the archive.
pub const MANIFEST_FILE: &str = "outpost-handler.json";
/// The signature's name inside the archive.
pub const SIGNATURE_FILE: &str = "outpost-handler.sig";
/// The largest entry accepted (a component, the manifest).
pub const MAX_ENTRY_SIZE: u64 = 32 << 20;
/// The most entries a package may hold.
pub const MAX_ENTRIES: usize = 16;
/// The manifest format this gateway reads.
pub const FORMAT: u32 = 1;

/// What a package says about its handler.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: u32,
    /// The handler's name: 1–64 of `a-z 0-9 - _ .`, unique on a gateway.
    pub name: String,
    /// The handler's version (semver).
    pub version: String,
    /// Who made it; must match the name of the trusted key that signed it.
    pub vendor: String,
    /// The device types it updates.
    pub device_types: Vec<String>,
    /// The WIT world version it was built against, e.g. `outpost:handler@0.1.0`.
    pub wit: String,
    /// The limits it asks for.
    pub limits: RequestedLimits,
    /// The component's file name in the package.
    pub component: String,
    /// Every file in the package but the manifest and the signature: name → SHA-256 (hex).
    pub files: BTreeMap<String, String>,
}

/// Sandbox limits a package asks for; the gateway caps them with its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestedLimits {
    /// Linear memory per call, MiB.
    pub memory_mib: u32,
    /// Guest CPU time per call, ms.
    pub cpu_ms: u32,
}

/// A vendor key the gateway trusts, and the device types it may sign handlers for.
#[derive(Clone, Debug)]
pub struct TrustedVendor {
    /// The vendor's name, as packages give it.
    pub name: String,
    /// Its public key.
    pub key: VerifyingKey,
    /// Device types it may sign for; `"*"` allows all.
    pub device_types: Vec<String>,
}

impl TrustedVendor {
    fn may_sign_for(&self, device_type: &str) -> bool {
        self.device_types
            .iter()
            .any(|t| t == "*" || t == device_type)
    }
}

/// Why a package was refused. Nothing is installed or changed when one is.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    /// The bytes are not a readable tar archive.
    #[error("not a readable tar archive: {0}")]
    NotATar(String),
    /// An entry name is absolute, climbs out (`..`), has directories or odd characters.
    #[error("unsafe entry name {0:?}: packages hold flat file names only")]
    UnsafePath(String),
    /// An entry is a symlink, hard link, device file, directory or anything but a file.
    #[error("entry {name:?} is a {kind}, not a regular file")]
    NotARegularFile {
        /// The entry.
        name: String,
        /// What it is.
        kind: String,
    },
    /// An entry is larger than [`MAX_ENTRY_SIZE`].
    #[error("entry {name:?} is {size} bytes; at most {MAX_ENTRY_SIZE} are accepted")]
    EntryTooLarge {
        /// The entry.
        name: String,
        /// Its size.
        size: u64,
    },
    /// More than [`MAX_ENTRIES`] entries.
    #[error("more than {MAX_ENTRIES} entries")]
    TooManyEntries,
    /// Two entries have the same name.
    #[error("entry {0:?} appears twice")]
    DuplicateEntry(String),
    /// No manifest.
    #[error("no {MANIFEST_FILE} in the package")]
    MissingManifest,
    /// The manifest does not parse or breaks a rule.
    #[error("invalid manifest: {0}")]
    BadManifest(String),
    /// An entry the manifest does not list (so no signature covers it).
    #[error("entry {0:?} is not covered by the manifest and its signature")]
    NotCovered(String),
    /// A file the manifest lists is missing.
    #[error("the manifest lists {0:?} but the package does not hold it")]
    MissingFile(String),
    /// A file's content does not match the manifest.
    #[error("{0:?} does not match its SHA-256 in the manifest")]
    HashMismatch(String),
    /// No signature entry.
    #[error("the package is not signed (no {SIGNATURE_FILE})")]
    Unsigned,
    /// The signature entry does not parse.
    #[error("malformed signature: {0}")]
    BadSignatureFormat(String),
    /// The signing key is not in the trust store.
    #[error("signed by an unknown key ed25519:{0}; add it to handlers.trusted_vendors to trust it")]
    UnknownKey(String),
    /// The signature does not verify.
    #[error("the signature does not verify: the package was altered or signed with another key")]
    BadSignature,
    /// The key belongs to another vendor than the manifest names.
    #[error("the manifest names vendor {manifest:?} but the key belongs to {key_owner:?}")]
    VendorMismatch {
        /// The vendor in the manifest.
        manifest: String,
        /// The vendor the key is trusted for.
        key_owner: String,
    },
    /// The key may not sign for one of the device types.
    #[error("vendor {vendor:?} is not trusted to sign handlers for device type {device_type:?}")]
    DeviceTypeNotAllowed {
        /// The vendor.
        vendor: String,
        /// The device type.
        device_type: String,
    },
    /// The package targets a WIT version this gateway does not offer.
    #[error("the handler is built for {wit}; this gateway offers {}", WIT_VERSIONS.join(", "))]
    UnsupportedWit {
        /// The version asked for.
        wit: String,
    },
}

/// A package read from an archive: structurally checked, not yet verified.
#[derive(Clone, Debug)]
pub struct Package {
    manifest: Manifest,
    manifest_bytes: Vec<u8>,
    files: BTreeMap<String, Vec<u8>>,
    signature: Option<(VerifyingKey, Signature)>,
}

/// A package whose signature verified against the trust store.
#[derive(Clone, Debug)]
pub struct VerifiedPackage {
    package: Package,
    vendor: String,
}

impl VerifiedPackage {
    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.package.manifest
    }

    /// The component's bytes.
    pub fn component(&self) -> &[u8] {
        self.package.component()
    }

    /// The trusted vendor that signed it.
    pub fn vendor(&self) -> &str {
        &self.vendor
    }

    /// The package as it arrived, to store.
    pub fn package(&self) -> &Package {
        &self.package
    }
}

impl Package {
    /// Builds an unsigned package from a manifest's fields and its component.
    pub fn build(mut manifest: Manifest, component: Vec<u8>) -> Result<Self, PackageError> {
        manifest.files = BTreeMap::from([(manifest.component.clone(), sha256_hex(&component))]);
        check_manifest(&manifest)?;
        let manifest_bytes = serde_json::to_vec_pretty(&manifest)
            .map_err(|err| PackageError::BadManifest(err.to_string()))?;
        let files = BTreeMap::from([(manifest.component.clone(), component)]);
        Ok(Self {
            manifest,
            manifest_bytes,
            files,
            signature: None,
        })
    }

    /// Reads and structurally checks an archive. Every rule about entries is enforced
    /// here; the signature is checked by [`verify`](Self::verify).
    pub fn read(archive: impl Read) -> Result<Self, PackageError> {
        let mut tar = tar::Archive::new(archive);
        let entries = tar
            .entries()
            .map_err(|err| PackageError::NotATar(err.to_string()))?;
        let mut contents: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for (index, entry) in entries.enumerate() {
            let mut entry = entry.map_err(|err| PackageError::NotATar(err.to_string()))?;
            if index >= MAX_ENTRIES {
                return Err(PackageError::TooManyEntries);
            }
            let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            check_entry_name(&name)?;
            let kind = entry.header().entry_type();
            if !kind.is_file() {
                return Err(PackageError::NotARegularFile {
                    name,
                    kind: entry_kind(kind),
                });
            }
            let size = entry.size();
            if size > MAX_ENTRY_SIZE {
                return Err(PackageError::EntryTooLarge { name, size });
            }
            let mut bytes = Vec::with_capacity(size as usize);
            entry
                .by_ref()
                .take(MAX_ENTRY_SIZE + 1)
                .read_to_end(&mut bytes)
                .map_err(|err| PackageError::NotATar(format!("reading {name}: {err}")))?;
            if contents.insert(name.clone(), bytes).is_some() {
                return Err(PackageError::DuplicateEntry(name));
            }
        }

        let manifest_bytes = contents
            .remove(MANIFEST_FILE)
            .ok_or(PackageError::MissingManifest)?;
        let manifest: Manifest = serde_json::from_slice(&manifest_bytes)
            .map_err(|err| PackageError::BadManifest(err.to_string()))?;
        check_manifest(&manifest)?;
        let signature = contents
            .remove(SIGNATURE_FILE)
            .map(|bytes| parse_signature(&bytes))
            .transpose()?;

        for name in contents.keys() {
            if !manifest.files.contains_key(name) {
                return Err(PackageError::NotCovered(name.clone()));
            }
        }
        for (name, sha) in &manifest.files {
            let bytes = contents
                .get(name)
                .ok_or_else(|| PackageError::MissingFile(name.clone()))?;
            if !sha256_hex(bytes).eq_ignore_ascii_case(sha) {
                return Err(PackageError::HashMismatch(name.clone()));
            }
        }
        Ok(Self {
            manifest,
            manifest_bytes,
            files: contents,
            signature,
        })
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The component's bytes.
    pub fn component(&self) -> &[u8] {
        &self.files[&self.manifest.component]
    }

    /// What the signature covers: SHA-256 over the manifest's and every file's SHA-256.
    pub fn digest(&self) -> [u8; 32] {
        let mut text = format!(
            "outpost-handler-package/{FORMAT}\n{MANIFEST_FILE} {}\n",
            sha256_hex(&self.manifest_bytes)
        );
        for (name, sha) in &self.manifest.files {
            text.push_str(&format!("{name} {}\n", sha.to_ascii_lowercase()));
        }
        Sha256::digest(text.as_bytes()).into()
    }

    /// Signs the package, replacing any earlier signature.
    pub fn sign(&mut self, key: &SigningKey) {
        let signature = key.sign(&self.digest());
        self.signature = Some((key.verifying_key(), signature));
    }

    /// Checks the signature against the trusted vendors, the vendor's right to sign for
    /// every device type, and the WIT version.
    pub fn verify(self, trusted: &[TrustedVendor]) -> Result<VerifiedPackage, PackageError> {
        let (key, signature) = self.signature.ok_or(PackageError::Unsigned)?;
        let vendor = trusted
            .iter()
            .find(|vendor| vendor.key == key)
            .ok_or_else(|| PackageError::UnknownKey(hex::encode(key.as_bytes())))?;
        key.verify_strict(&self.digest(), &signature)
            .map_err(|_| PackageError::BadSignature)?;
        if vendor.name != self.manifest.vendor {
            return Err(PackageError::VendorMismatch {
                manifest: self.manifest.vendor.clone(),
                key_owner: vendor.name.clone(),
            });
        }
        if let Some(device_type) = self
            .manifest
            .device_types
            .iter()
            .find(|t| !vendor.may_sign_for(t))
        {
            return Err(PackageError::DeviceTypeNotAllowed {
                vendor: vendor.name.clone(),
                device_type: device_type.clone(),
            });
        }
        if !WIT_VERSIONS.contains(&self.manifest.wit.as_str()) {
            return Err(PackageError::UnsupportedWit {
                wit: self.manifest.wit.clone(),
            });
        }
        let vendor = vendor.name.clone();
        Ok(VerifiedPackage {
            package: self,
            vendor,
        })
    }

    /// The archive bytes: manifest, files, then the signature if signed.
    pub fn to_tar(&self) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        let mut append = |name: &str, bytes: &[u8]| {
            let mut header = tar::Header::new_ustar();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            header.set_entry_type(tar::EntryType::Regular);
            builder
                .append_data(&mut header, name, bytes)
                .expect("writing to memory cannot fail");
        };
        append(MANIFEST_FILE, &self.manifest_bytes);
        for (name, bytes) in &self.files {
            append(name, bytes);
        }
        if let Some((key, signature)) = &self.signature {
            let line = format!(
                "ed25519 {} {}\n",
                hex::encode(key.as_bytes()),
                hex::encode(signature.to_bytes())
            );
            append(SIGNATURE_FILE, line.as_bytes());
        }
        builder.into_inner().expect("writing to memory cannot fail")
    }
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Parses a public key written as `ed25519:<64 hex digits>`.
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, String> {
    let bytes = prefixed_key(text, "ed25519:", "a public key")?;
    VerifyingKey::from_bytes(&bytes).map_err(|err| format!("not a valid ed25519 public key: {err}"))
}

/// Writes a public key as `ed25519:<hex>`.
pub fn format_public_key(key: &VerifyingKey) -> String {
    format!("ed25519:{}", hex::encode(key.as_bytes()))
}

/// A new signing key from the OS random source.
pub fn generate_key() -> Result<SigningKey, String> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|err| format!("the OS random source failed: {err}"))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// The private key file format: `ed25519-secret:<64 hex digits>`.
pub fn format_secret_key(key: &SigningKey) -> String {
    format!("ed25519-secret:{}\n", hex::encode(key.to_bytes()))
}

/// Parses a private key file.
pub fn parse_secret_key(text: &str) -> Result<SigningKey, String> {
    let bytes = prefixed_key(text, "ed25519-secret:", "a signing key")?;
    Ok(SigningKey::from_bytes(&bytes))
}

/// The 32 bytes of `<prefix><64 hex digits>`.
fn prefixed_key(text: &str, prefix: &str, what: &str) -> Result<[u8; 32], String> {
    let hex_key = text
        .trim()
        .strip_prefix(prefix)
        .ok_or_else(|| format!("{what} looks like {prefix}<64 hex digits>"))?;
    hex::decode(hex_key)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| format!("{what} has 64 hex digits after {prefix}"))
}

fn parse_signature(bytes: &[u8]) -> Result<(VerifyingKey, Signature), PackageError> {
    let bad = |why: &str| PackageError::BadSignatureFormat(why.to_owned());
    let text = std::str::from_utf8(bytes).map_err(|_| bad("not text"))?;
    let mut parts = text.split_whitespace();
    let (Some("ed25519"), Some(key), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad(
            "expected one line: ed25519 <public key hex> <signature hex>",
        ));
    };
    let key = parse_public_key(&format!("ed25519:{key}")).map_err(|why| bad(&why))?;
    let signature: [u8; 64] = hex::decode(signature)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| bad("the signature has 128 hex digits"))?;
    Ok((key, Signature::from_bytes(&signature)))
}

fn check_entry_name(name: &str) -> Result<(), PackageError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(PackageError::UnsafePath(name.to_owned()))
    }
}

fn entry_kind(kind: tar::EntryType) -> String {
    match kind {
        tar::EntryType::Symlink => "symbolic link".into(),
        tar::EntryType::Link => "hard link".into(),
        tar::EntryType::Char => "character device".into(),
        tar::EntryType::Block => "block device".into(),
        tar::EntryType::Directory => "directory".into(),
        tar::EntryType::Fifo => "FIFO".into(),
        other => format!("{other:?} entry"),
    }
}

/// Handler names become directory names: keep them plain.
pub(crate) fn valid_handler_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        })
        && !name.starts_with('.')
}

fn check_manifest(manifest: &Manifest) -> Result<(), PackageError> {
    let bad = |why: String| Err(PackageError::BadManifest(why));
    if manifest.format != FORMAT {
        return bad(format!(
            "format {} is not supported (this gateway reads {FORMAT})",
            manifest.format
        ));
    }
    if !valid_handler_name(&manifest.name) {
        return bad(format!(
            "handler name {:?}: use 1-64 of a-z 0-9 - _ . (not starting with .)",
            manifest.name
        ));
    }
    if manifest.version.is_empty() || manifest.vendor.is_empty() {
        return bad("version and vendor must not be empty".into());
    }
    if manifest.device_types.is_empty() || manifest.device_types.iter().any(String::is_empty) {
        return bad("device_types must list at least one non-empty device type".into());
    }
    if manifest.limits.memory_mib == 0 || manifest.limits.cpu_ms == 0 {
        return bad("limits must be greater than zero".into());
    }
    check_entry_name(&manifest.component).map_err(|_| {
        PackageError::BadManifest(format!(
            "component {:?} is not a plain file name",
            manifest.component
        ))
    })?;
    if [MANIFEST_FILE, SIGNATURE_FILE].contains(&manifest.component.as_str()) {
        return bad("the component cannot use a reserved file name".into());
    }
    if !manifest.files.contains_key(&manifest.component) {
        return bad(format!(
            "files does not list the component {:?}",
            manifest.component
        ));
    }
    Ok(())
}
