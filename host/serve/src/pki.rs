//! The site's own certificate authority, for listeners that devices reach over TLS.
//!
//! The CA (`site-ca.pem`, and `site-ca.key` with mode 0600) is made once and kept in the
//! given directory; devices are handed its certificate when they are onboarded and trust
//! nothing else for the gateway. The listener's own certificate is issued anew at every
//! start for the names given (the names devices use to reach it), so changing them needs
//! only a restart and devices never need a new CA.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// The CA certificate's file name.
pub const CA_CERT: &str = "site-ca.pem";
/// The CA key's file name (mode 0600).
pub const CA_KEY: &str = "site-ca.key";

/// Why the site PKI could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The files are there but not a usable CA, or a certificate could not be made.
    #[error("the site CA in {dir}: {detail}")]
    Invalid {
        /// Where the CA lives.
        dir: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

/// The site CA and a server certificate for this start.
pub struct SitePki {
    ca_pem: String,
    acceptor: TlsAcceptor,
    names: Vec<String>,
}

impl std::fmt::Debug for SitePki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SitePki")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

impl SitePki {
    /// Loads the CA from `dir` (creating it on first use) and issues a server
    /// certificate for `names` (DNS names or IP addresses).
    pub fn load_or_create(dir: &Path, names: &[String]) -> Result<Self, PkiError> {
        let invalid = |detail: String| PkiError::Invalid {
            dir: dir.to_path_buf(),
            detail,
        };
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| PkiError::Io { path, source }
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
        let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
        let (ca_pem, key_pem) = match (
            std::fs::read_to_string(&cert_path),
            std::fs::read_to_string(&key_path),
        ) {
            (Ok(cert), Ok(key)) => (cert, key),
            (Err(c), Err(k))
                if c.kind() == std::io::ErrorKind::NotFound
                    && k.kind() == std::io::ErrorKind::NotFound =>
            {
                let (cert, key) = new_ca("outpost site CA").map_err(invalid)?;
                write_new(&key_path, &key, 0o600).map_err(io(&key_path))?;
                write_new(&cert_path, &cert, 0o644).map_err(io(&cert_path))?;
                (cert, key)
            }
            (Err(err), _) => return Err(io(&cert_path)(err)),
            (_, Err(err)) => return Err(io(&key_path)(err)),
        };
        let ca_key = rcgen::KeyPair::from_pem(&key_pem)
            .map_err(|e| invalid(format!("{CA_KEY} is not a private key: {e}")))?;
        let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key)
            .map_err(|e| invalid(format!("{CA_CERT} is not a CA certificate: {e}")))?;
        let ca_der = rustls_pki_types::pem::PemObject::from_pem_slice(ca_pem.as_bytes())
            .map_err(|e: rustls_pki_types::pem::Error| invalid(format!("{CA_CERT}: {e}")))?;

        let key = rcgen::KeyPair::generate().map_err(|e| invalid(e.to_string()))?;
        let mut params = rcgen::CertificateParams::new(names.to_vec())
            .map_err(|e| invalid(format!("the listener's names {names:?}: {e}")))?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "outpost gateway");
        params.use_authority_key_identifier_extension = true;
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        // A day of slack for devices whose clock runs behind; reissued at every start.
        let now = std::time::SystemTime::now();
        params.not_before = (now - std::time::Duration::from_secs(86_400)).into();
        params.not_after = (now + std::time::Duration::from_secs(397 * 86_400)).into();
        let leaf = params
            .signed_by(&key, &issuer)
            .map_err(|e| invalid(format!("issuing the server certificate: {e}")))?;
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone(), CertificateDer::clone(&ca_der)],
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .map_err(|e| invalid(format!("the server certificate: {e}")))?;
        Ok(Self {
            ca_pem,
            acceptor: TlsAcceptor::from(Arc::new(config)),
            names: names.to_vec(),
        })
    }

    /// The CA certificate (PEM) devices are handed to trust.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The acceptor for [`serve_tls`](crate::serve_tls).
    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }
}

/// A new CA (P-256) named `common_name`, valid for 20 years: its certificate and key,
/// both PEM. The site CA is one; onboarding's claiming CA is another.
pub fn new_ca(common_name: &str) -> Result<(String, String), String> {
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params =
        rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let now = std::time::SystemTime::now();
    params.not_before = (now - std::time::Duration::from_secs(86_400)).into();
    params.not_after = (now + std::time::Duration::from_secs(20 * 365 * 86_400)).into();
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Writes a file that must not exist yet, with `mode`, and syncs it.
fn write_new(path: &Path, text: &str, mode: u32) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}
