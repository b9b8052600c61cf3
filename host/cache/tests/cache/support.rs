//! Shared parts: a real HTTP origin on loopback that can misbehave on cue, signed
//! manifests, caches over real SQLite stores, and a small HTTP client.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::{Body, Frame};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use outpost_cache::manifest::{self, ManifestFile, Step, TrustedSigner, UpdateId, UpdateManifest};
use outpost_cache::{CacheConfig, FetchConfig, FirmwareCache, Sha256};
use outpost_store::Store;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};

pub(crate) const MIB: usize = 1024 * 1024;

/// Deterministic pseudo-random bytes (xorshift), so blobs differ from each other.
pub(crate) fn artifact(len: usize, seed: u64) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

/// What the origin does with one request.
#[derive(Clone, Debug)]
pub(crate) enum Behaviour {
    /// Serve properly, honouring Range.
    Normal,
    /// Send this many body bytes, then break the connection.
    CutAfter(u64),
    /// Send this many body bytes, then wait for a permit on the origin's gate.
    HoldAfter(u64),
    /// Serve the bytes with one flipped.
    Corrupt,
    /// Serve the bytes plus this many extra, without a Content-Length.
    Oversize(u64),
    /// Answer every request with the whole file (200), Range or not.
    IgnoreRange,
    /// Answer with this status and no body.
    Status(u16),
    /// Answer a range request with a Content-Range that starts elsewhere.
    WrongContentRange,
}

pub(crate) struct OriginState {
    files: Mutex<HashMap<String, Bytes>>,
    script: Mutex<VecDeque<Behaviour>>,
    /// Requests received, with their Range and If-Range headers.
    pub(crate) seen: Mutex<Vec<(Option<String>, Option<String>)>>,
    pub(crate) requests: AtomicU64,
    pub(crate) body_bytes: AtomicU64,
    pub(crate) gate: Semaphore,
}

/// A real HTTP/1.1 origin on 127.0.0.1.
#[derive(Clone)]
pub(crate) struct Origin {
    pub(crate) addr: SocketAddr,
    pub(crate) state: Arc<OriginState>,
}

impl Origin {
    pub(crate) async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(OriginState {
            files: Mutex::default(),
            script: Mutex::default(),
            seen: Mutex::default(),
            requests: AtomicU64::new(0),
            body_bytes: AtomicU64::new(0),
            gate: Semaphore::new(0),
        });
        let shared = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(origin_respond(&state, &request)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, state }
    }

    /// Publishes `bytes` at `/name`; returns its URL.
    pub(crate) fn publish(&self, name: &str, bytes: Bytes) -> String {
        self.state
            .files
            .lock()
            .unwrap()
            .insert(format!("/{name}"), bytes);
        format!("http://{}/{name}", self.addr)
    }

    /// Queues behaviours for the next requests, in order; later requests are Normal.
    pub(crate) fn script(&self, behaviours: impl IntoIterator<Item = Behaviour>) {
        self.state.script.lock().unwrap().extend(behaviours);
    }

    pub(crate) fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    pub(crate) fn body_bytes(&self) -> u64 {
        self.state.body_bytes.load(Ordering::SeqCst)
    }

    pub(crate) fn seen(&self) -> Vec<(Option<String>, Option<String>)> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Lets one held response continue.
    pub(crate) fn release(&self) {
        self.state.gate.add_permits(1);
    }
}

fn origin_respond(
    state: &Arc<OriginState>,
    request: &Request<hyper::body::Incoming>,
) -> Response<ChannelBody> {
    state.requests.fetch_add(1, Ordering::SeqCst);
    let text = |name| {
        request
            .headers()
            .get(name)
            .and_then(|v: &http::HeaderValue| v.to_str().ok())
            .map(str::to_owned)
    };
    let (range, if_range) = (text(header::RANGE), text(header::IF_RANGE));
    state
        .seen
        .lock()
        .unwrap()
        .push((range.clone(), if_range.clone()));
    let behaviour = state
        .script
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or(Behaviour::Normal);
    let Some(file) = state
        .files
        .lock()
        .unwrap()
        .get(request.uri().path())
        .cloned()
    else {
        return status_only(StatusCode::NOT_FOUND);
    };
    let etag = format!("\"{}\"", &Sha256::digest(&file).to_hex()[..12]);
    let mut start = 0u64;
    if let (Some(range), false) = (range, matches!(behaviour, Behaviour::IgnoreRange)) {
        let validator_ok = if_range.as_deref().is_none_or(|v| v == etag);
        if validator_ok {
            start = range
                .trim_start_matches("bytes=")
                .trim_end_matches('-')
                .parse()
                .unwrap();
        }
    }
    let len = file.len() as u64;
    let mut builder = Response::builder().header(header::ETAG, &etag);
    if start > 0 {
        let first = if matches!(behaviour, Behaviour::WrongContentRange) {
            0
        } else {
            start
        };
        builder = builder.status(StatusCode::PARTIAL_CONTENT).header(
            header::CONTENT_RANGE,
            format!("bytes {first}-{}/{len}", len - 1),
        );
    }
    let mut body = file.slice(start as usize..);
    match behaviour {
        Behaviour::Status(code) => return status_only(StatusCode::from_u16(code).unwrap()),
        Behaviour::Corrupt => {
            let mut bytes = body.to_vec();
            let last = bytes.len() - 1;
            bytes[last] ^= 0xff;
            body = Bytes::from(bytes);
        }
        Behaviour::Oversize(extra) => {
            let mut bytes = body.to_vec();
            bytes.extend(std::iter::repeat_n(0u8, extra as usize));
            body = Bytes::from(bytes);
        }
        _ => {}
    }
    let sized = !matches!(behaviour, Behaviour::Oversize(_) | Behaviour::CutAfter(_));
    if sized {
        builder = builder.header(header::CONTENT_LENGTH, body.len());
    }
    let (tx, rx) = mpsc::channel(4);
    let state = state.clone();
    tokio::spawn(async move {
        let mut limit = match behaviour {
            Behaviour::CutAfter(n) | Behaviour::HoldAfter(n) => n as usize,
            _ => usize::MAX,
        };
        let mut sent = 0usize;
        for chunk in body.chunks(64 * 1024) {
            let mut chunk = Bytes::copy_from_slice(chunk);
            if sent + chunk.len() > limit {
                let head = chunk.split_to(limit - sent);
                if !head.is_empty() {
                    state
                        .body_bytes
                        .fetch_add(head.len() as u64, Ordering::SeqCst);
                    if tx.send(Ok(Frame::data(head))).await.is_err() {
                        return;
                    }
                    sent = limit;
                }
                match behaviour {
                    Behaviour::CutAfter(_) => {
                        let _ = tx
                            .send(Err(std::io::Error::other("origin cut the connection")))
                            .await;
                        return;
                    }
                    _ => {
                        let Ok(permit) = state.gate.acquire().await else {
                            return;
                        };
                        permit.forget();
                        limit = usize::MAX;
                    }
                }
            }
            sent += chunk.len();
            state
                .body_bytes
                .fetch_add(chunk.len() as u64, Ordering::SeqCst);
            if tx.send(Ok(Frame::data(chunk))).await.is_err() {
                return;
            }
        }
    });
    builder.body(ChannelBody(rx)).unwrap()
}

fn status_only(status: StatusCode) -> Response<ChannelBody> {
    let (_, rx) = mpsc::channel(1);
    let mut response = Response::new(ChannelBody(rx));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, 0.into());
    response
}

pub(crate) struct ChannelBody(mpsc::Receiver<Result<Frame<Bytes>, std::io::Error>>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx)
    }
}

/// The test signing key and its trust entry.
pub(crate) fn signer() -> (SigningKey, TrustedSigner) {
    let key = SigningKey::from_bytes(&[7u8; 32]);
    let trusted = TrustedSigner {
        name: "fleet".into(),
        key: key.verifying_key(),
    };
    (key, trusted)
}

/// A valid manifest for the files given as (file name, bytes, url).
pub(crate) fn manifest(version: &str, files: &[(&str, &Bytes, Option<&str>)]) -> UpdateManifest {
    UpdateManifest {
        manifest_version: 1,
        update_id: UpdateId {
            provider: "Acme".into(),
            name: "thermostat".into(),
            version: version.into(),
        },
        compatibility: vec![[("manufacturer".to_owned(), "Acme".to_owned())].into()],
        steps: vec![Step {
            handler: "acme-esp32".into(),
            files: (0..files.len()).map(|i| format!("f{i}")).collect(),
            handler_properties: serde_json::Map::new(),
        }],
        files: files
            .iter()
            .enumerate()
            .map(|(i, (name, bytes, url))| ManifestFile {
                id: format!("f{i}"),
                file_name: (*name).into(),
                size_in_bytes: bytes.len() as u64,
                sha256: Sha256::digest(bytes),
                url: url.map(str::to_owned),
            })
            .collect(),
        created_date_time: None,
    }
}

pub(crate) fn sign(manifest: &UpdateManifest) -> String {
    manifest::sign(manifest, &signer().0, "fleet").unwrap()
}

/// A test site: a state folder, its store and the cache settings.
pub(crate) struct Site {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) store: Store,
    pub(crate) config: CacheConfig,
}

impl Site {
    pub(crate) async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("outpost.db")).await.unwrap();
        let config = CacheConfig {
            root: dir.path().join("firmware"),
            max_bytes: 64 * MIB as u64,
            memory_bytes: 16 * MIB as u64,
            trusted_signers: vec![signer().1],
            adu_roots: Vec::new(),
            fetch: FetchConfig {
                connect_timeout: Duration::from_secs(5),
                idle_timeout: Duration::from_secs(10),
                attempts: 3,
                backoff_initial: Duration::from_millis(5),
                backoff_max: Duration::from_millis(20),
                ca_file: None,
            },
        };
        Self { dir, store, config }
    }

    pub(crate) async fn cache(&self) -> FirmwareCache {
        let cache = FirmwareCache::open(self.store.clone(), self.config.clone())
            .await
            .unwrap();
        cache.resume_pending().await.unwrap();
        cache
    }

    pub(crate) fn root(&self) -> &Path {
        &self.config.root
    }

    /// Files in one of the cache's folders.
    pub(crate) fn files_in(&self, folder: &str) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.root().join(folder))
            .map(|entries| {
                entries
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

/// Polls `condition` until it holds; fails the test after `limit`.
pub(crate) async fn wait_until(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A response as the test client saw it.
#[derive(Debug)]
pub(crate) struct Got {
    pub(crate) status: u16,
    pub(crate) headers: http::HeaderMap,
    pub(crate) body: Bytes,
}

impl Got {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// One HTTP/1.1 connection to a server under test.
pub(crate) struct Client {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
}

impl Client {
    pub(crate) async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(connection);
        Self { sender }
    }

    pub(crate) async fn send(&mut self, method: &str, path: &str, headers: &[(&str, &str)]) -> Got {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "gateway");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        self.sender.ready().await.expect("connection still open");
        let response = self
            .sender
            .send_request(request.body(Empty::new()).unwrap())
            .await
            .unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        Got {
            status,
            headers,
            body,
        }
    }
}

/// One request on a fresh connection.
pub(crate) async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Got {
    Client::connect(addr).await.send("GET", path, headers).await
}
