//! The admin bearer token that guards `/api/v1`.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use hyper::header::HeaderValue;
use subtle::ConstantTimeEq;

use super::error::ApiError;

/// Tokens shorter than this are refused: they could be guessed over the network.
const MIN_LEN: usize = 16;

/// The file in the state directory that holds a generated token.
pub(crate) const TOKEN_FILE: &str = "admin-token";

/// The admin token. Its `Debug` never shows the value.
#[derive(Clone)]
pub(crate) struct AdminToken(String);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

/// Where the token in use came from.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum TokenOrigin {
    /// `api.admin_token` in the config.
    Config,
    /// Read from the state directory, generated at an earlier start.
    StateFile(PathBuf),
    /// Generated now and saved to this file.
    Generated(PathBuf),
}

impl AdminToken {
    /// Accepts a token from the config.
    pub(crate) fn new(value: &str) -> Result<Self, String> {
        let value = value.trim();
        if value.len() < MIN_LEN {
            return Err(format!(
                "the admin token is {} characters long; use at least {MIN_LEN}",
                value.len()
            ));
        }
        if !value.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the admin token must be printable ASCII without spaces".to_owned());
        }
        Ok(Self(value.to_owned()))
    }

    /// Reads `<state_dir>/admin-token`, or generates one there (mode 0600) if absent.
    pub(crate) fn load_or_generate(state_dir: &Path) -> anyhow::Result<(Self, TokenOrigin)> {
        let path = state_dir.join(TOKEN_FILE);
        let token = Self(random_token()?);
        let created = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path);
        match created {
            Ok(mut file) => {
                file.write_all(format!("{}\n", token.0).as_bytes())
                    .and_then(|()| file.sync_all())
                    .with_context(|| {
                        format!("cannot write the admin token to {}", path.display())
                    })?;
                Ok((token, TokenOrigin::Generated(path)))
            }
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
                Ok((Self::read(&path)?, TokenOrigin::StateFile(path)))
            }
            Err(err) => Err(err).with_context(|| format!("cannot create {}", path.display())),
        }
    }

    /// Reads `<state_dir>/admin-token` without ever creating it (for clients of a running
    /// gateway, which must not change its state directory).
    pub(crate) fn load(state_dir: &Path) -> anyhow::Result<Self> {
        Self::read(&state_dir.join(TOKEN_FILE))
    }

    fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the admin token {}", path.display()))?;
        let token = Self::new(&text).map_err(|why| {
            anyhow::anyhow!(
                "{}: {why}. Delete the file to have a new token generated",
                path.display()
            )
        })?;
        let mode = std::fs::metadata(path)?.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                "the admin token file can be read by other users; run: chmod 600 {}",
                path.display()
            );
        }
        Ok(token)
    }

    /// The value, to show once after generating it.
    pub(crate) fn reveal(&self) -> &str {
        &self.0
    }

    /// Checks an `Authorization` header, in constant time over the token bytes.
    pub(crate) fn check(&self, header: Option<&HeaderValue>) -> Result<(), ApiError> {
        let header = header.ok_or_else(|| {
            ApiError::unauthorized(
                "missing admin token: send the header Authorization: Bearer <token>",
            )
        })?;
        let presented = header
            .to_str()
            .ok()
            .and_then(|value| {
                let (scheme, token) = value.split_once(' ')?;
                scheme
                    .eq_ignore_ascii_case("bearer")
                    .then_some(token.trim())
            })
            .ok_or_else(|| {
                ApiError::unauthorized("the Authorization header must be: Bearer <token>")
            })?;
        if bool::from(presented.as_bytes().ct_eq(self.0.as_bytes())) {
            Ok(())
        } else {
            Err(ApiError::unauthorized("invalid admin token"))
        }
    }
}

/// 32 random bytes from the OS, hex-encoded.
pub(crate) fn random_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|err| anyhow::anyhow!("the OS random number generator failed: {err}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_with_owner_only_permissions_then_reuses() {
        let dir = tempfile::tempdir().unwrap();
        let (first, origin) = AdminToken::load_or_generate(dir.path()).unwrap();
        let path = dir.path().join(TOKEN_FILE);
        assert_eq!(origin, TokenOrigin::Generated(path.clone()));
        assert_eq!(first.reveal().len(), 64);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let (second, origin) = AdminToken::load_or_generate(dir.path()).unwrap();
        assert_eq!(origin, TokenOrigin::StateFile(path));
        assert_eq!(second.reveal(), first.reveal());
    }

    #[test]
    fn load_never_creates_a_token() {
        let dir = tempfile::tempdir().unwrap();
        let err = AdminToken::load(dir.path()).unwrap_err();
        assert!(
            err.to_string().contains("cannot read the admin token"),
            "{err}"
        );
        assert!(!dir.path().join(TOKEN_FILE).exists());
        let (generated, _) = AdminToken::load_or_generate(dir.path()).unwrap();
        assert_eq!(
            AdminToken::load(dir.path()).unwrap().reveal(),
            generated.reveal()
        );
    }

    #[test]
    fn a_damaged_token_file_is_an_error_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(TOKEN_FILE);
        std::fs::write(&path, "short\n").unwrap();
        let err = AdminToken::load_or_generate(dir.path()).unwrap_err();
        assert!(err.to_string().contains("at least 16"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "short\n");
    }

    #[test]
    fn checks_scheme_and_value() {
        let token = AdminToken::new("0123456789abcdef-token").unwrap();
        let header = |v: &str| HeaderValue::from_str(v).unwrap();
        assert!(
            token
                .check(Some(&header("Bearer 0123456789abcdef-token")))
                .is_ok()
        );
        assert!(
            token
                .check(Some(&header("bearer 0123456789abcdef-token")))
                .is_ok()
        );
        assert!(token.check(None).is_err());
        assert!(
            token
                .check(Some(&header("Basic 0123456789abcdef-token")))
                .is_err()
        );
        assert!(
            token
                .check(Some(&header("Bearer 0123456789abcdef-toke")))
                .is_err()
        );
        assert!(token.check(Some(&header("Bearer"))).is_err());
        assert!(AdminToken::new("short").is_err());
        assert!(AdminToken::new("has a space in the middle").is_err());
        assert!(!format!("{token:?}").contains("0123"));
    }
}
