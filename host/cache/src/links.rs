//! Short-lived download links for one device and one file.
//!
//! The gateway hands each device a URL for the file it is to fetch:
//! `/firmware/{sha256}?device={id}&expires={unix ms}&sig={hex}`, where `sig` is
//! HMAC-SHA256 over `"{sha256}\n{device}\n{expires}"` with a key only the gateway holds.
//! The firmware server refuses such a link once it has expired, or when any of the three
//! was changed (another device's link, another file). A request without `sig` is
//! refused too unless the server is told not to require links
//! ([`ServerConfig::require_signed_links`](crate::server::ServerConfig)); an operator
//! asks the gateway for a link (`outpost firmware link`).

use hmac::{Hmac, Mac};

/// Why a signed link was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// Past its `expires`.
    #[error("this download link has expired; ask the gateway for a new one")]
    Expired,
    /// The signature does not match the file, device and expiry.
    #[error("this download link is not valid for this file and device")]
    Invalid,
    /// No signature at all.
    #[error(
        "this gateway serves firmware only through signed per-device links \
         (device=…&expires=…&sig=…); ask the gateway for one (outpost firmware link)"
    )]
    Missing,
}

/// Signs and checks download links.
#[derive(Clone)]
pub struct LinkSigner {
    key: [u8; 32],
}

impl std::fmt::Debug for LinkSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkSigner")
    }
}

impl LinkSigner {
    /// A signer with the gateway's link key.
    pub fn new(key: [u8; 32]) -> Self {
        Self { key }
    }

    /// A signer with the key kept in `path` (32 random bytes, mode 0600), created on
    /// first use. A file of another size is an error, never replaced silently.
    pub fn load_or_create(path: &std::path::Path) -> std::io::Result<Self> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        match std::fs::read(path) {
            Ok(bytes) => <[u8; 32]>::try_from(bytes.as_slice())
                .map(Self::new)
                .map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!(
                            "{} does not hold a 32-byte key; delete it and a new one is made",
                            path.display()
                        ),
                    )
                }),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                getrandom::fill(&mut key).map_err(std::io::Error::other)?;
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)?;
                file.write_all(&key)?;
                file.sync_all()?;
                Ok(Self::new(key))
            }
            Err(err) => Err(err),
        }
    }

    fn mac(&self, sha256: &str, device: &str, expires: i64) -> Hmac<sha2::Sha256> {
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&self.key).expect("any key size");
        mac.update(format!("{sha256}\n{device}\n{expires}").as_bytes());
        mac
    }

    /// The query string of a link to `sha256` for `device`, valid until `expires`
    /// (unix milliseconds).
    pub fn query(&self, sha256: &str, device: &str, expires: i64) -> String {
        let sig = hex::encode(self.mac(sha256, device, expires).finalize().into_bytes());
        format!("device={device}&expires={expires}&sig={sig}")
    }

    /// Checks a request's query for `sha256` at `now` (unix milliseconds). A query
    /// without `sig` is not a signed link: [`LinkError::Missing`].
    pub fn check(&self, sha256: &str, query: Option<&str>, now: i64) -> Result<(), LinkError> {
        let param = |name: &str| {
            query?
                .split('&')
                .filter_map(|pair| pair.split_once('='))
                .find(|(key, _)| *key == name)
                .map(|(_, value)| value)
        };
        let Some(sig) = param("sig") else {
            return Err(LinkError::Missing);
        };
        let device = param("device").unwrap_or_default();
        let expires: i64 = param("expires")
            .and_then(|e| e.parse().ok())
            .ok_or(LinkError::Invalid)?;
        let sig = hex::decode(sig).map_err(|_| LinkError::Invalid)?;
        // Constant-time comparison.
        self.mac(sha256, device, expires)
            .verify_slice(&sig)
            .map_err(|_| LinkError::Invalid)?;
        if expires < now {
            return Err(LinkError::Expired);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_is_good_for_its_file_and_device_until_it_expires() {
        let signer = LinkSigner::new([5; 32]);
        let sha = "ab".repeat(32);
        let query = signer.query(&sha, "esp-1", 2_000);
        assert_eq!(signer.check(&sha, Some(&query), 1_000), Ok(()));
        assert_eq!(
            signer.check(&sha, Some(&query), 2_001),
            Err(LinkError::Expired)
        );
        let other_device = query.replace("device=esp-1", "device=esp-2");
        assert_eq!(
            signer.check(&sha, Some(&other_device), 1_000),
            Err(LinkError::Invalid)
        );
        let later = query.replace("expires=2000", "expires=9000");
        assert_eq!(
            signer.check(&sha, Some(&later), 1_000),
            Err(LinkError::Invalid)
        );
        assert_eq!(
            signer.check(&"cd".repeat(32), Some(&query), 1_000),
            Err(LinkError::Invalid)
        );
        let other_key = LinkSigner::new([6; 32]);
        assert_eq!(
            other_key.check(&sha, Some(&query), 1_000),
            Err(LinkError::Invalid)
        );
        // Not a signed link at all: the server decides whether that is allowed.
        assert_eq!(
            signer.check(&sha, Some("device=esp-1"), 1_000),
            Err(LinkError::Missing)
        );
        assert_eq!(signer.check(&sha, None, 1_000), Err(LinkError::Missing));
        assert_eq!(
            signer.check(&sha, Some("sig=zz&expires=1"), 0),
            Err(LinkError::Invalid)
        );
    }
}
