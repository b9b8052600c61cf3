//! Upstream downloads: one attempt at bringing an artifact's bytes into its partial file.
//!
//! An attempt resumes from whatever the partial file already holds (`Range: bytes=N-`,
//! with `If-Range` when the origin gave a strong ETag), hashes the whole file as it
//! grows, and stops at the first byte the manifest does not allow. The caller decides
//! about retries from the [`AttemptError`] it returns.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http::header;
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Body as _;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sha2::Digest as _;
use tokio_util::sync::CancellationToken;

use crate::{CacheError, Sha256};

/// How upstream downloads behave.
#[derive(Clone, Debug)]
pub struct FetchConfig {
    /// Time allowed to open the TCP (and TLS) connection.
    pub connect_timeout: Duration,
    /// Time allowed between response head or body bytes before the attempt is abandoned.
    pub idle_timeout: Duration,
    /// Attempts per download round before the error is reported; a later request retries.
    pub attempts: u32,
    /// Wait after the first failed attempt; doubles each time, each wait drawn from the
    /// upper half of its step ([`outpost_store::backoff::Backoff`]).
    pub backoff_initial: Duration,
    /// The longest wait between attempts.
    pub backoff_max: Duration,
    /// Extra CA certificates (PEM) trusted for HTTPS origins, beside the system's.
    pub ca_file: Option<PathBuf>,
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            attempts: 5,
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            ca_file: None,
        }
    }
}

/// Why an attempt failed.
#[derive(Debug)]
pub(crate) enum AttemptError {
    /// Transient (connection, timeout, early end, 5xx): the partial file is kept and the
    /// next attempt resumes from it.
    Resume(String),
    /// The bytes cannot be trusted (too many, wrong hash, a range the origin mangled):
    /// the partial file is discarded and the next attempt starts from zero.
    Discard(String),
    /// The cache is shutting down; the partial file is kept for the next start.
    Cancelled,
    /// A local failure (disk), reported as is.
    Local(CacheError),
}

type HttpsClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// The system's CA store added to `extra` (the configured CA file's, checked at start),
/// rustls with ring, HTTP/1.1 over TCP or TLS.
fn build_client(
    extra: &rustls::RootCertStore,
    connect_timeout: Duration,
) -> Result<HttpsClient, CacheError> {
    let mut roots = extra.clone();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        // A system store can hold certificates rustls cannot use; skip those.
        let _ = roots.add(cert);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| CacheError::other("setting up TLS for", "firmware downloads", e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(https))
}

/// The HTTP(S) client shared by every download. It is built on the first download: the
/// system's CA store is read and parsed then, not at every gateway start (a gateway
/// that never downloads keeps neither the certificates nor the TLS code resident).
#[derive(Clone)]
pub(crate) struct Upstream {
    client: Arc<tokio::sync::OnceCell<HttpsClient>>,
    /// The trust anchors of [`FetchConfig::ca_file`], read and checked at start.
    extra_roots: Arc<rustls::RootCertStore>,
    config: Arc<FetchConfig>,
}

impl Upstream {
    /// Checks the configured CA file now, so a bad one stops the start with its reason.
    pub(crate) fn new(config: FetchConfig) -> Result<Self, CacheError> {
        let mut extra = rustls::RootCertStore::empty();
        if let Some(path) = &config.ca_file {
            use rustls_pki_types::pem::PemObject as _;
            let reading = |e: &dyn std::fmt::Display| CacheError::other("reading CA file", path, e);
            for cert in
                rustls_pki_types::CertificateDer::pem_file_iter(path).map_err(|e| reading(&e))?
            {
                extra
                    .add(cert.map_err(|e| reading(&e))?)
                    .map_err(|e| CacheError::other("adding a CA certificate from", path, e))?;
            }
            if extra.is_empty() {
                return Err(reading(&"it holds no PEM certificate"));
            }
        }
        Ok(Self {
            client: Arc::new(tokio::sync::OnceCell::new()),
            extra_roots: Arc::new(extra),
            config: Arc::new(config),
        })
    }

    /// The client, built on first use (reading the system store off the async workers).
    async fn client(&self) -> Result<&HttpsClient, AttemptError> {
        self.client
            .get_or_try_init(|| async {
                let extra = Arc::clone(&self.extra_roots);
                let connect_timeout = self.config.connect_timeout;
                tokio::task::spawn_blocking(move || build_client(&extra, connect_timeout))
                    .await
                    .map_err(|e| AttemptError::Local(CacheError::task(&e)))?
                    .map_err(AttemptError::Local)
            })
            .await
    }

    pub(crate) fn config(&self) -> &FetchConfig {
        &self.config
    }

    /// One attempt: brings `partial` to `size` bytes whose sha256 is `sha256`. `etag` is
    /// the origin's strong validator for the partial bytes (sent as `If-Range`); it is
    /// updated from the response, and a new one is saved by `remember` before any byte
    /// of that response reaches the partial file, so a resume after a crash can still
    /// send `If-Range`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn attempt(
        &self,
        url: &str,
        sha256: Sha256,
        size: u64,
        partial: &Path,
        etag: &mut Option<String>,
        remember: &crate::cache::SavedValidator,
        cancel: &CancellationToken,
    ) -> Result<(), AttemptError> {
        let (mut file, mut hasher, mut have) = open_partial(partial, size)
            .await
            .map_err(AttemptError::Local)?;
        if have < size {
            let mut request = http::Request::get(url)
                .header(
                    header::USER_AGENT,
                    concat!("outpost/", env!("CARGO_PKG_VERSION")),
                )
                .header(header::ACCEPT_ENCODING, "identity");
            if have > 0 {
                request = request.header(header::RANGE, format!("bytes={have}-"));
                if let Some(etag) = etag.as_deref() {
                    request = request.header(header::IF_RANGE, etag);
                }
            }
            let request = request
                .body(Empty::new())
                .map_err(|e| AttemptError::Discard(format!("bad url {url:?}: {e}")))?;
            let idle = self.config.idle_timeout;
            let client = self.client().await?;
            let response = tokio::select! {
                () = cancel.cancelled() => return Err(AttemptError::Cancelled),
                r = tokio::time::timeout(idle, client.request(request)) => r,
            };
            let response = match response {
                Err(_) => return Err(AttemptError::Resume(format!("no response within {idle:?}"))),
                Ok(Err(e)) => {
                    return Err(AttemptError::Resume(format!(
                        "request failed: {}",
                        error_chain(&e)
                    )));
                }
                Ok(Ok(response)) => response,
            };
            let status = response.status();
            let expected_len = match status.as_u16() {
                200 => {
                    if have > 0 {
                        // The origin ignored the range (or the If-Range validator changed):
                        // the body is the whole file again.
                        tracing::info!(%sha256, url, "upstream answered 200 to a resume; starting over");
                        file = truncate(file, partial).await.map_err(AttemptError::Local)?;
                        hasher = sha2::Sha256::new();
                        have = 0;
                    }
                    size
                }
                206 => {
                    let range = response
                        .headers()
                        .get(header::CONTENT_RANGE)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    let expected = format!("bytes {have}-{}/{size}", size - 1);
                    if range != expected {
                        return Err(AttemptError::Discard(format!(
                            "upstream sent Content-Range {range:?}, expected {expected:?}"
                        )));
                    }
                    size - have
                }
                _ => {
                    return Err(
                        if status.is_server_error()
                            || status.as_u16() == 429
                            || status.as_u16() == 408
                        {
                            AttemptError::Resume(format!("upstream answered {status}"))
                        } else if status.as_u16() == 416 {
                            AttemptError::Discard(format!("upstream answered {status} to a resume"))
                        } else {
                            AttemptError::Resume(format!("upstream answered {status}"))
                        },
                    );
                }
            };
            if let Some(length) = response
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                && length > expected_len
            {
                return Err(AttemptError::Discard(format!(
                    "upstream announces {length} bytes where {expected_len} remain of the manifest's {size}"
                )));
            }
            if let Some(tag) = response
                .headers()
                .get(header::ETAG)
                .and_then(|v| v.to_str().ok())
                .filter(|t| t.starts_with('"'))
                && etag.as_deref() != Some(tag)
            {
                remember
                    .save(tag.to_owned())
                    .await
                    .map_err(AttemptError::Local)?;
                *etag = Some(tag.to_owned());
            }
            let mut body = response.into_body();
            let mut pending: Vec<u8> = Vec::with_capacity(256 * 1024);
            loop {
                // Batch writes while bytes stream in; when the origin stalls, write what
                // has arrived so the partial file holds every byte received.
                let ready = std::future::poll_fn(|cx| match Pin::new(&mut body).poll_frame(cx) {
                    Poll::Ready(frame) => Poll::Ready(Some(frame)),
                    Poll::Pending => Poll::Ready(None),
                })
                .await;
                if ready.is_none() {
                    flush(&mut file, &mut pending, partial)
                        .await
                        .map_err(AttemptError::Local)?;
                }
                let frame = if let Some(frame) = ready {
                    Ok(frame)
                } else {
                    tokio::select! {
                    () = cancel.cancelled() => {
                        flush(&mut file, &mut pending, partial).await.map_err(AttemptError::Local)?;
                        return Err(AttemptError::Cancelled);
                    }
                    f = tokio::time::timeout(idle, body.frame()) => f,
                    }
                };
                let frame = match frame {
                    Err(_) => {
                        flush(&mut file, &mut pending, partial)
                            .await
                            .map_err(AttemptError::Local)?;
                        return Err(AttemptError::Resume(format!(
                            "upstream went silent for {idle:?} at {have} of {size} bytes"
                        )));
                    }
                    Ok(None) => break,
                    Ok(Some(Err(e))) => {
                        flush(&mut file, &mut pending, partial)
                            .await
                            .map_err(AttemptError::Local)?;
                        return Err(AttemptError::Resume(format!(
                            "upstream connection failed at {have} of {size} bytes: {}",
                            error_chain(&e)
                        )));
                    }
                    Ok(Some(Ok(frame))) => frame,
                };
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                if have + data.len() as u64 > size {
                    drop(file);
                    let _ = tokio::fs::remove_file(partial).await;
                    return Err(AttemptError::Discard(format!(
                        "upstream sent more than the manifest's {size} bytes"
                    )));
                }
                hasher.update(&data);
                have += data.len() as u64;
                metrics::counter!(crate::metrics::UPSTREAM_BYTES).increment(data.len() as u64);
                pending.extend_from_slice(&data);
                if pending.len() >= 256 * 1024 {
                    flush(&mut file, &mut pending, partial)
                        .await
                        .map_err(AttemptError::Local)?;
                }
            }
            flush(&mut file, &mut pending, partial)
                .await
                .map_err(AttemptError::Local)?;
            if have < size {
                return Err(AttemptError::Resume(format!(
                    "upstream ended the body at {have} of {size} bytes"
                )));
            }
        }
        let path = partial.to_path_buf();
        tokio::task::spawn_blocking(move || {
            file.sync_all().map_err(CacheError::io("syncing", path))
        })
        .await
        .map_err(|e| AttemptError::Local(CacheError::task(&e)))?
        .map_err(AttemptError::Local)?;
        let got = Sha256::from_bytes(hasher.finalize().into());
        if got != sha256 {
            let _ = tokio::fs::remove_file(partial).await;
            return Err(AttemptError::Discard(format!(
                "sha256 of the {size} bytes received is {got}"
            )));
        }
        Ok(())
    }
}

/// Opens (creating) the partial file, hashes what it already holds and returns the
/// file positioned at its end. A file longer than `size` is cut back to nothing.
async fn open_partial(
    path: &Path,
    size: u64,
) -> Result<(std::fs::File, sha2::Sha256, u64), CacheError> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(CacheError::io("opening partial download", &path))?;
        let mut hasher = sha2::Sha256::new();
        let len = file
            .metadata()
            .map_err(CacheError::io("reading partial download", &path))?
            .len();
        if len > size {
            file.set_len(0)
                .map_err(CacheError::io("truncating partial download", &path))?;
            return Ok((file, hasher, 0));
        }
        let mut buf = vec![0u8; 256 * 1024];
        let mut read = 0u64;
        loop {
            let n = file
                .read(&mut buf)
                .map_err(CacheError::io("reading partial download", &path))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            read += n as u64;
        }
        Ok((file, hasher, read))
    })
    .await
    .map_err(|e| CacheError::task(&e))?
}

async fn truncate(file: std::fs::File, path: &Path) -> Result<std::fs::File, CacheError> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        file.set_len(0)
            .map_err(CacheError::io("truncating partial download", &path))?;
        Ok(file)
    })
    .await
    .map_err(|e| CacheError::task(&e))?
}

/// Appends `pending` to the file off the async workers. The file is moved into the
/// blocking task and back.
async fn flush(
    file: &mut std::fs::File,
    pending: &mut Vec<u8>,
    path: &Path,
) -> Result<(), CacheError> {
    if pending.is_empty() {
        return Ok(());
    }
    let mut owned = file
        .try_clone()
        .map_err(CacheError::io("writing partial download", path))?;
    let data = std::mem::take(pending);
    let path = path.to_path_buf();
    let data = tokio::task::spawn_blocking(move || {
        owned
            .write_all(&data)
            .map_err(CacheError::io("writing partial download", &path))?;
        Ok::<_, CacheError>(data)
    })
    .await
    .map_err(|e| CacheError::task(&e))??;
    *pending = data;
    pending.clear();
    Ok(())
}

/// An error and its sources, on one line.
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
