//! Claiming authorities: who turns a device's CSR into a certificate.
//!
//! Offline sites use a local CA from the config. The cloud uplink adds its own variant
//! (relaying `initiate`/`verify` to the fleet backend); the onboarding flow only sees
//! [`Authority`].

use std::path::Path;

use anyhow::{Context, bail};
use outpost_protocomm::claim::{CsrDocument, InitiateResponse, StartInfo, VerifyResponse};
use rcgen::{CertificateSigningRequestParams, Issuer, KeyPair};

/// How long the cloud has to sign a CSR.
const CLOUD_CLAIM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// A claiming authority.
pub(crate) enum Authority {
    /// A CA whose key is on this gateway.
    Local(LocalCa),
    /// The fleet backend, through the uplink; the local CA (if any) signs while offline
    /// and those claims are reported when the uplink returns.
    Cloud {
        /// The uplink.
        uplink: outpost_uplink::Uplink,
        /// The offline fallback.
        fallback: Option<LocalCa>,
    },
}

/// A signed certificate and who signed it.
pub(crate) struct Signed {
    /// What goes back to the device.
    pub(crate) response: VerifyResponse,
    /// The authority's name, recorded with the claim.
    pub(crate) authority: String,
    /// The cloud already knows (it signed): nothing to report later.
    pub(crate) reported: bool,
}

impl Authority {
    /// The name shown in status.
    pub(crate) fn name(&self) -> String {
        match self {
            Self::Local(ca) => ca.name(),
            Self::Cloud { fallback: None, .. } => "cloud".into(),
            Self::Cloud {
                fallback: Some(ca), ..
            } => format!("cloud (offline: {})", ca.name()),
        }
    }

    /// `claim/initiate`: the node id for a device.
    pub(crate) fn initiate(&self, start: &StartInfo) -> anyhow::Result<InitiateResponse> {
        let mac = start.mac_addr.to_ascii_lowercase();
        if mac.len() != 12 || !mac.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!(
                "the device sent a MAC address that is not 12 hex digits: {:?}",
                start.mac_addr
            );
        }
        Ok(InitiateResponse {
            node_id: format!("node-{mac}"),
        })
    }

    /// `claim/verify`: a certificate for the CSR, which must name `node_id`.
    pub(crate) async fn verify(
        &self,
        device_id: &str,
        node_id: &str,
        csr: &CsrDocument,
    ) -> anyhow::Result<Signed> {
        let local = |ca: &LocalCa| -> anyhow::Result<Signed> {
            Ok(Signed {
                response: ca.sign(node_id, &csr.csr)?,
                authority: ca.name(),
                reported: false,
            })
        };
        match self {
            Self::Local(ca) => local(ca),
            Self::Cloud { uplink, fallback } => {
                match uplink
                    .claim(device_id, node_id, &csr.csr, CLOUD_CLAIM_TIMEOUT)
                    .await
                {
                    Ok(certificate) => Ok(Signed {
                        response: VerifyResponse {
                            certificate,
                            mqtt_host: None,
                        },
                        authority: "cloud".into(),
                        reported: true,
                    }),
                    Err(outpost_uplink::ClaimError::Offline) => match fallback {
                        Some(ca) => {
                            tracing::info!(
                                "the uplink is offline: the local CA signs; the claim is reported when it returns"
                            );
                            local(ca)
                        }
                        None => bail!(
                            "the cloud uplink is offline and no local claiming CA is configured \
                             ([onboarding.claim]); try again when the uplink is connected"
                        ),
                    },
                    Err(outpost_uplink::ClaimError::NoClaimService) => match fallback {
                        Some(ca) => local(ca),
                        None => bail!(
                            "the azure-iot uplink has no claim service (IoT Hub signs no device \
                             certificates): configure a local claiming CA ([onboarding.claim], \
                             made with `outpost onboard ca-init`) to claim devices"
                        ),
                    },
                    Err(err) => Err(anyhow::Error::new(err).context("the cloud claim failed")),
                }
            }
        }
    }
}

/// A local CA (certificate + key, PEM).
pub(crate) struct LocalCa {
    subject: String,
    issuer: Issuer<'static, KeyPair>,
    valid_days: u32,
}

impl LocalCa {
    fn name(&self) -> String {
        format!("local-ca:{}", self.subject)
    }

    /// Loads the CA; errors name the file.
    pub(crate) fn load(cert: &Path, key_pem: &str, valid_days: u32) -> anyhow::Result<Self> {
        let cert_pem = std::fs::read_to_string(cert).with_context(|| {
            format!("cannot read the claiming CA certificate {}", cert.display())
        })?;
        let key =
            KeyPair::from_pem(key_pem).context("the claiming CA key is not a PEM private key")?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
            .with_context(|| format!("{} is not a PEM CA certificate", cert.display()))?;
        let subject = subject_cn(&cert_pem).unwrap_or_else(|| "claiming CA".into());
        Ok(Self {
            subject,
            issuer,
            valid_days,
        })
    }

    fn sign(&self, node_id: &str, csr_pem: &str) -> anyhow::Result<VerifyResponse> {
        let mut params = CertificateSigningRequestParams::from_pem(csr_pem)
            .context("the device's CSR does not parse or its signature is wrong")?;
        let cn = match params
            .params
            .distinguished_name
            .get(&rcgen::DnType::CommonName)
        {
            Some(rcgen::DnValue::Utf8String(s)) => Some(s.clone()),
            Some(rcgen::DnValue::PrintableString(p)) => Some(p.as_str().to_owned()),
            _ => None,
        };
        if cn.as_deref() != Some(node_id) {
            bail!("the CSR names {cn:?}, not the node id {node_id:?} it was given");
        }
        let now = std::time::SystemTime::now();
        params.params.not_before = now.into();
        params.params.not_after =
            (now + std::time::Duration::from_secs(u64::from(self.valid_days) * 86_400)).into();
        let mut serial = [0u8; 16];
        getrandom::fill(&mut serial).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
        serial[0] &= 0x7f;
        params.params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        params.params.is_ca = rcgen::IsCa::ExplicitNoCa;
        params.params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&self.issuer)
            .context("signing the device certificate failed")?;
        Ok(VerifyResponse {
            certificate: cert.pem(),
            mqtt_host: None,
        })
    }
}

fn subject_cn(cert_pem: &str) -> Option<String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).ok()?;
    let cert = pem.parse_x509().ok()?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_owned();
    Some(cn)
}

/// The certificate must carry the CSR's public key: an authority that answers with
/// another key's certificate would leave the device unable to use it.
pub(crate) fn certificate_matches_csr(certificate: &str, csr_pem: &str) -> anyhow::Result<()> {
    let (_, cert_pem) = x509_parser::pem::parse_x509_pem(certificate.as_bytes())
        .map_err(|e| anyhow::anyhow!("the certificate is not PEM: {e}"))?;
    let cert = cert_pem
        .parse_x509()
        .map_err(|e| anyhow::anyhow!("the certificate does not parse: {e}"))?;
    let (_, csr_block) = x509_parser::pem::parse_x509_pem(csr_pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("the CSR is not PEM: {e}"))?;
    use x509_parser::prelude::FromDer as _;
    let (_, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(&csr_block.contents)
            .map_err(|e| anyhow::anyhow!("the CSR does not parse: {e}"))?;
    if cert.public_key().raw != csr.certification_request_info.subject_pki.raw {
        bail!("the certificate does not match the CSR's key");
    }
    Ok(())
}

/// Creates a claiming CA (P-256) named `name` in `dir`: `claim-ca.pem` and
/// `claim-ca.key` (0600). Returns their paths; refuses to overwrite an existing CA.
pub fn create_ca(
    dir: &Path,
    name: &str,
) -> Result<(std::path::PathBuf, std::path::PathBuf), crate::OnboardingError> {
    write_ca(dir, name).map_err(|err| crate::OnboardingError::Settings(format!("{err:#}")))
}

fn write_ca(dir: &Path, name: &str) -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf)> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (cert_pem, key_pem) = outpost_serve::pki::new_ca(name).map_err(anyhow::Error::msg)?;
    let cert_path = dir.join("claim-ca.pem");
    let key_path = dir.join("claim-ca.key");
    for path in [&cert_path, &key_path] {
        if path.exists() {
            bail!("{} exists; not overwriting a CA", path.display());
        }
    }
    std::fs::write(&cert_path, cert_pem)?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key_path)?;
    file.write_all(key_pem.as_bytes())?;
    Ok((cert_path, key_path))
}
