//! The device side of Outpost updates, as firmware built with the Outpost agent runs it
//! after onboarding: register with the gateway's device API, long-poll for the next
//! command, download the image from the gateway's firmware server (checking size and
//! sha256 as esp_https_ota would), report progress, reboot into the new version on
//! `ota-apply` and report it, boot the previous image again on `ota-rollback` — or
//! misbehave as told, for the failure tests.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::events::emit;

/// How an agent misbehaves during an update.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum UpdateFault {
    /// Refuses `ota-begin` (low battery).
    Refuse,
    /// Reports a failed download (flash write error).
    DownloadFails,
    /// Never comes back after apply (the bootloader rolled back silently).
    NeverReturns,
    /// Comes back running the old version.
    WrongVersion,
    /// Cannot join the network of a Wi-Fi rotation (its access point has another
    /// passphrase than the one sent) and falls back to the old one.
    WifiRefused,
}

/// What the device knows about itself.
#[derive(Clone, Debug)]
pub(crate) struct AgentProfile {
    pub(crate) manufacturer: String,
    pub(crate) model: String,
    pub(crate) chip: String,
    pub(crate) project: String,
    /// Further properties reported at registration.
    pub(crate) properties: Vec<(String, String)>,
    pub(crate) firmware_version: String,
    pub(crate) reboot: Duration,
    pub(crate) fault: Option<UpdateFault>,
    /// Hand the credential to an agent elsewhere: write it to this directory instead of
    /// starting the built-in agent.
    pub(crate) handoff: Option<std::path::PathBuf>,
    /// The access points in range (SSID, passphrase).
    pub(crate) networks: Vec<(String, String)>,
    /// The SSID it is on.
    pub(crate) network: String,
}

/// The credential the gateway handed over at onboarding.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Credential {
    pub(crate) api: String,
    pub(crate) device_id: String,
    pub(crate) token: String,
    /// The site CA (PEM) to trust for an `https://` device API; nothing else is trusted.
    #[serde(default)]
    pub(crate) ca_pem: Option<String>,
}

/// A TLS client that trusts only the CA the gateway handed over.
fn trusting(ca_pem: &str) -> anyhow::Result<tokio_rustls::TlsConnector> {
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(cert.context("the handed-over CA is not PEM")?)
            .context("the handed-over CA")?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// A command as docs/rollouts.md specifies it: `{id, command, payload?, payloadBase64}`.
/// The agent reads the payload from `payloadBase64`, which is always there (`payload`
/// only when the bytes are UTF-8).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Pending {
    id: u64,
    command: String,
    payload_base64: String,
}

/// `wifi-rotate`: the network to move to, and how long to keep the old one.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Rotate {
    ssid: String,
    passphrase: String,
    fallback_secs: u64,
}

#[derive(Deserialize)]
struct Begin {
    url: String,
    size: u64,
    sha256: String,
    version: String,
}

struct Agent {
    credential: Credential,
    /// For `https://` URLs: trusts only the handed-over CA.
    tls: Option<tokio_rustls::TlsConnector>,
    profile: Mutex<AgentProfile>,
    /// The version downloaded to the passive slot.
    staged: Mutex<Option<String>>,
    /// The version it ran before the last `ota-apply`: the other slot, to roll back to.
    previous: Mutex<Option<String>>,
    download: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Starts the agent's loop on the current runtime.
pub(crate) fn start(credential: Credential, profile: AgentProfile) {
    let tls = match credential.ca_pem.as_deref().map(trusting) {
        Some(Ok(tls)) => Some(tls),
        Some(Err(err)) => {
            emit(
                &json!({"event": "agent_error", "device": credential.device_id, "error": format!("{err:#}")}),
            );
            None
        }
        None => None,
    };
    let agent = Arc::new(Agent {
        credential,
        tls,
        profile: Mutex::new(profile),
        staged: Mutex::new(None),
        previous: Mutex::new(None),
        download: Mutex::new(None),
    });
    tokio::spawn(async move {
        loop {
            if let Err(err) = Arc::clone(&agent).run().await {
                emit(
                    &json!({"event": "agent_error", "device": agent.credential.device_id, "error": format!("{err:#}")}),
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    });
}

impl Agent {
    fn profile(&self) -> AgentProfile {
        self.profile.lock().expect("profile lock").clone()
    }

    async fn run(self: Arc<Self>) -> anyhow::Result<()> {
        self.register().await?;
        emit(
            &json!({"event": "agent_ready", "device": self.credential.device_id, "version": self.profile().firmware_version}),
        );
        loop {
            let (status, body) = self.call(Method::GET, "next?wait=20", None).await?;
            match status {
                StatusCode::NO_CONTENT => continue,
                StatusCode::OK => {
                    let pending: Pending =
                        serde_json::from_slice(&body).context("a malformed command")?;
                    Arc::clone(&self).command(pending).await?;
                }
                other => bail!("next: {other} {}", String::from_utf8_lossy(&body)),
            }
        }
    }

    async fn register(&self) -> anyhow::Result<()> {
        let profile = self.profile();
        let mut properties = serde_json::Map::new();
        properties.insert("chip".into(), json!(profile.chip));
        properties.insert("project".into(), json!(profile.project));
        for (key, value) in &profile.properties {
            properties.insert(key.clone(), json!(value));
        }
        let body = json!({
            "manufacturer": profile.manufacturer,
            "model": profile.model,
            "firmwareVersion": profile.firmware_version,
            "properties": properties,
        });
        let (status, answer) = self.call(Method::POST, "register", Some(body)).await?;
        if status != StatusCode::OK {
            bail!("register: {status} {}", String::from_utf8_lossy(&answer));
        }
        Ok(())
    }

    async fn command(self: Arc<Self>, pending: Pending) -> anyhow::Result<()> {
        let device = self.credential.device_id.clone();
        emit(&json!({"event": "command", "device": device, "command": pending.command}));
        let fault = self.profile().fault;
        let reply = match pending.command.as_str() {
            "ota-begin" if fault == Some(UpdateFault::Refuse) => {
                json!({"ok": false, "error": "battery too low for an update"})
            }
            "ota-begin" => {
                let payload = base64::engine::general_purpose::STANDARD
                    .decode(&pending.payload_base64)
                    .context("ota-begin with a payloadBase64 that is not base64")?;
                let begin: Begin = serde_json::from_slice(&payload)
                    .context("ota-begin without a valid payload")?;
                let agent = Arc::clone(&self);
                let task = tokio::spawn(async move { agent.download(begin).await });
                if let Some(old) = self.download.lock().expect("lock").replace(task) {
                    old.abort();
                }
                json!({"ok": true})
            }
            "ota-apply" => {
                let staged = self.staged.lock().expect("lock").clone();
                match staged {
                    None => json!({"ok": false, "error": "nothing downloaded"}),
                    Some(version) => {
                        *self.previous.lock().expect("lock") =
                            Some(self.profile().firmware_version);
                        let agent = Arc::clone(&self);
                        tokio::spawn(async move { agent.reboot(version).await });
                        json!({"ok": true})
                    }
                }
            }
            "ota-cancel" => {
                if let Some(task) = self.download.lock().expect("lock").take() {
                    task.abort();
                }
                *self.staged.lock().expect("lock") = None;
                json!({"ok": true})
            }
            "ota-rollback" => {
                let previous = self.previous.lock().expect("lock").take();
                match previous {
                    None => json!({"ok": false, "error": "no previous image to boot"}),
                    Some(previous) => {
                        // Only an unconfirmed new image is given up (the other slot is
                        // booted); a device the bootloader already took back stays as it is.
                        let rebooted = {
                            let mut profile = self.profile.lock().expect("lock");
                            let new_image_runs = profile.firmware_version != previous;
                            profile.firmware_version.clone_from(&previous);
                            new_image_runs
                        };
                        emit(
                            &json!({"event": "rolled_back", "device": device, "version": previous, "rebooted": rebooted}),
                        );
                        let agent = Arc::clone(&self);
                        tokio::spawn(async move {
                            if let Err(err) = agent.register().await {
                                emit(
                                    &json!({"event": "agent_error", "device": agent.credential.device_id, "error": format!("register: {err:#}")}),
                                );
                            }
                        });
                        json!({"ok": true, "payload": previous})
                    }
                }
            }
            "wifi-rotate" => {
                let rotate = base64::engine::general_purpose::STANDARD
                    .decode(&pending.payload_base64)
                    .ok()
                    .and_then(|bytes| serde_json::from_slice::<Rotate>(&bytes).ok());
                match rotate {
                    None => json!({"ok": false, "error": "wifi-rotate without a valid payload"}),
                    Some(rotate) => {
                        let agent = Arc::clone(&self);
                        tokio::spawn(async move { agent.rotate(rotate).await });
                        json!({"ok": true})
                    }
                }
            }
            other => json!({"ok": false, "error": format!("unknown command {other}")}),
        };
        let (status, body) = self
            .call(
                Method::POST,
                &format!("commands/{}/reply", pending.id),
                Some(reply),
            )
            .await?;
        if status != StatusCode::OK {
            emit(
                &json!({"event": "reply_refused", "device": device, "status": status.as_u16(), "body": String::from_utf8_lossy(&body)}),
            );
        }
        Ok(())
    }

    async fn report(&self, kind: &str, payload: &str) {
        let body = json!({"kind": kind, "payload": payload});
        if let Err(err) = self.call(Method::POST, "reports", Some(body)).await {
            emit(
                &json!({"event": "agent_error", "device": self.credential.device_id, "error": format!("report: {err:#}")}),
            );
        }
    }

    /// Joins the rotation's network, keeping the old one as the fallback: reports `done`
    /// with the new SSID once the gateway is reached over it, or falls back and reports
    /// `failed`.
    async fn rotate(&self, rotate: Rotate) {
        let device = self.credential.device_id.clone();
        let profile = self.profile();
        let old = profile.network.clone();
        // Joining takes a moment, as the reboot does.
        tokio::time::sleep(profile.reboot).await;
        let in_range = profile
            .networks
            .iter()
            .any(|(ssid, pass)| *ssid == rotate.ssid && *pass == rotate.passphrase);
        let joined = in_range && profile.fault != Some(UpdateFault::WifiRefused);
        if joined {
            self.profile
                .lock()
                .expect("lock")
                .network
                .clone_from(&rotate.ssid);
            emit(&json!({"event": "wifi_joined", "device": device, "ssid": rotate.ssid}));
            // The gateway is reached over the new network: the fallback is not needed.
            self.report("done", &rotate.ssid).await;
        } else {
            let why = if profile
                .networks
                .iter()
                .any(|(ssid, _)| *ssid == rotate.ssid)
            {
                "wrong passphrase (4-way handshake failed)"
            } else {
                "no such network in range"
            };
            emit(
                &json!({"event": "wifi_fallback", "device": device, "ssid": rotate.ssid, "back_on": old, "fallback_secs": rotate.fallback_secs}),
            );
            self.report(
                "failed",
                &format!("cannot join {}: {why}; back on {old}", rotate.ssid),
            )
            .await;
        }
    }

    /// Downloads the image as esp_https_ota would and reports the outcome.
    async fn download(&self, begin: Begin) {
        let device = self.credential.device_id.clone();
        if self.profile().fault == Some(UpdateFault::DownloadFails) {
            self.report("failed", "flash write error at 0x110000").await;
            return;
        }
        let fetched = fetch(self.tls.as_ref(), &begin.url).await;
        match fetched {
            Ok(bytes)
                if bytes.len() as u64 == begin.size
                    && hex::encode(Sha256::digest(&bytes)) == begin.sha256 =>
            {
                emit(
                    &json!({"event": "downloaded", "device": device, "bytes": bytes.len(), "version": begin.version}),
                );
                *self.staged.lock().expect("lock") = Some(begin.version);
                self.report("progress", "100").await;
            }
            Ok(bytes) => {
                self.report(
                    "failed",
                    &format!(
                        "image check failed ({} bytes, sha256 mismatch)",
                        bytes.len()
                    ),
                )
                .await;
            }
            Err(err) => self.report("failed", &format!("download: {err:#}")).await,
        }
    }

    /// Reboots into `version`, registers again and reports what runs.
    async fn reboot(&self, version: String) {
        let device = self.credential.device_id.clone();
        tokio::time::sleep(self.profile().reboot).await;
        let fault = self.profile().fault;
        if fault != Some(UpdateFault::WrongVersion) && fault != Some(UpdateFault::NeverReturns) {
            self.profile.lock().expect("lock").firmware_version = version;
        }
        let running = self.profile().firmware_version;
        emit(&json!({"event": "rebooted", "device": device, "version": running}));
        if let Err(err) = self.register().await {
            emit(
                &json!({"event": "agent_error", "device": device, "error": format!("register: {err:#}")}),
            );
        }
        if fault != Some(UpdateFault::NeverReturns) {
            self.report("done", &running).await;
        }
    }

    /// One request to the device API with the device's token.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let url = format!(
            "{}/api/v1/devices/{}/{path}",
            self.credential.api, self.credential.device_id
        );
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        request(
            self.tls.as_ref(),
            method,
            &url,
            Some(&self.credential.token),
            Bytes::from(body),
        )
        .await
    }
}

async fn fetch(tls: Option<&tokio_rustls::TlsConnector>, url: &str) -> anyhow::Result<Bytes> {
    let (status, bytes) = request(tls, Method::GET, url, None, Bytes::new()).await?;
    if status != StatusCode::OK {
        bail!("{url}: {status}");
    }
    Ok(bytes)
}

/// One HTTP/1.1 request over a fresh connection: TLS for `https://` (trusting only the
/// handed-over CA), plain TCP otherwise.
async fn request(
    tls: Option<&tokio_rustls::TlsConnector>,
    method: Method,
    url: &str,
    token: Option<&str>,
    body: Bytes,
) -> anyhow::Result<(StatusCode, Bytes)> {
    let uri: hyper::Uri = url.parse().with_context(|| format!("bad URL {url}"))?;
    let authority = uri
        .authority()
        .with_context(|| format!("no host in {url}"))?
        .clone();
    let https = uri.scheme_str() == Some("https");
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let stream = tokio::net::TcpStream::connect((authority.host(), port))
        .await
        .with_context(|| format!("cannot connect to {authority}"))?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, authority.as_str())
        .header(hyper::header::CONTENT_TYPE, "application/json");
    if let Some(token) = token {
        builder = builder.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = builder.body(Full::new(body))?;
    if https {
        let tls = tls.with_context(|| format!("{url}: https, but no CA was handed over"))?;
        let host = authority.host().trim_matches(['[', ']']).to_owned();
        let name = rustls_pki_types::ServerName::try_from(host)
            .with_context(|| format!("{url}: not a server name"))?;
        let stream = tls
            .connect(name, stream)
            .await
            .with_context(|| format!("TLS with {authority}"))?;
        exchange(TokioIo::new(stream), request).await
    } else {
        exchange(TokioIo::new(stream), request).await
    }
}

async fn exchange<IO>(io: IO, request: Request<Full<Bytes>>) -> anyhow::Result<(StatusCode, Bytes)>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(connection);
    let response = sender.send_request(request).await?;
    let status = response.status();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok((status, bytes))
}
