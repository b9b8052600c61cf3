//! The state directory: what a running gateway keeps there for others to find it, and
//! what keeps two gateways off one state.
//!
//! * `outpost.lock`: held (exclusively) by the running gateway, with its pid;
//! * `api-address`: the local API's address (its port may be ephemeral);
//! * `admin-token`: the generated admin token (mode 0600) when the config sets none.
//!
//! The CLI reads these to reach the running gateway; it never imports the server.

use std::fs::{DirBuilder, File, OpenOptions, TryLockError};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::config::Config;

/// The file in the state directory that names the running gateway's API address.
pub(crate) const API_ADDRESS_FILE: &str = "api-address";
/// The lock file a running gateway holds.
pub(crate) const LOCK_FILE: &str = "outpost.lock";

/// The API address of the gateway running on `state_dir`, if one runs.
pub(crate) fn running_gateway(state_dir: &Path) -> anyhow::Result<Option<std::net::SocketAddr>> {
    let Ok(file) = File::open(state_dir.join(LOCK_FILE)) else {
        return Ok(None);
    };
    match file.try_lock_shared() {
        Ok(()) => return Ok(None),
        Err(TryLockError::WouldBlock) => {}
        Err(TryLockError::Error(err)) => return Err(err).context("checking for a running gateway"),
    }
    let path = state_dir.join(API_ADDRESS_FILE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("a gateway is running but {} cannot be read", path.display()))?;
    let addr: std::net::SocketAddr = text
        .trim()
        .parse()
        .with_context(|| format!("{} does not hold an address", path.display()))?;
    Ok(Some(addr))
}

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
}

/// 32 random bytes from the OS, hex-encoded.
pub(crate) fn random_token() -> anyhow::Result<String> {
    Ok(outpost_store::random_hex_token()?)
}

/// The admin token a client of the running gateway uses: the config's, or the one the
/// gateway generated in its state directory.
pub(crate) fn admin_token_for(config: &Config) -> anyhow::Result<AdminToken> {
    match &config.api.admin_token {
        Some(secret) => AdminToken::new(secret.expose()).map_err(anyhow::Error::msg),
        None => AdminToken::load(&config.gateway.state_dir),
    }
}

/// Creates the state directory (mode 0700) and holds an exclusive lock on it, so two
/// gateways never share one state.
#[derive(Debug)]
pub(crate) struct StateDirLock {
    _file: File,
    path: PathBuf,
}

impl StateDirLock {
    /// Creates the directory if need be and locks it; an error names the holder.
    pub(crate) fn acquire(state_dir: &Path) -> anyhow::Result<Self> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .with_context(|| {
                format!("cannot create the state directory {}", state_dir.display())
            })?;
        let path = state_dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open the lock file {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                anyhow::bail!(
                    "another outpost (pid {}) is running with the state directory {}; stop it \
                     first, or give this one its own gateway.state_dir",
                    holder.trim(),
                    state_dir.display()
                );
            }
            Err(TryLockError::Error(err)) => {
                return Err(err).with_context(|| format!("cannot lock {}", path.display()));
            }
        }
        file.set_len(0)?;
        write!(file, "{}", std::process::id())?;
        Ok(Self { _file: file, path })
    }
}

impl Drop for StateDirLock {
    fn drop(&mut self) {
        // The lock goes with the file handle; emptying the file just clears the stale pid.
        if let Ok(file) = OpenOptions::new().write(true).open(&self.path) {
            let _ = file.set_len(0);
        }
    }
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
}
