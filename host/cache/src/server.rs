//! The fan-out server: `GET`/`HEAD /firmware/{sha256}` over HTTP/1.1 for devices on the
//! site network.
//!
//! * The ETag is the sha256 in quotes; blobs never change, so responses are
//!   `Cache-Control: public, max-age=31536000, immutable`, and `If-None-Match` gets 304.
//! * One `Range` gets a 206 with `Content-Range`; several get `multipart/byteranges`; a
//!   range past the end gets 416 with `Content-Range: bytes */{len}`; a malformed one is
//!   ignored (200), as RFC 9110 §14.2 asks. `If-Range` with a different validator sends
//!   the whole blob.
//! * A cold artifact named by a verified manifest is fetched once (single flight) while
//!   the request waits; no byte is sent before the whole blob has been verified.
//! * Hot blobs are served from memory as reference-counted slices (no copy per request);
//!   larger ones from the file with positioned reads of 512 KiB.
//! * `?device=<id>` names the client for the bytes-served record; without it the peer
//!   address is used.
//! * The listener's defences (a global and a per-client connection cap, header and
//!   write-stall timeouts, a bounded drain) are outpost-serve's, set in
//!   [`ServerConfig::limits`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::{Body, Frame, SizeHint};
use hyper::service::service_fn;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::cache::BlobBody;
use crate::range::{self, RangeRequest};
use crate::{Blob, CacheError, FirmwareCache, Sha256};

/// How the fan-out server behaves.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The listener's connection caps and timeouts.
    pub limits: outpost_serve::Limits,
    /// Checks signed per-device links (`?device=…&expires=…&sig=…`); without it a
    /// signed link is refused, since it cannot be checked.
    pub links: Option<crate::links::LinkSigner>,
    /// Refuse (403) a request that is not a valid signed link. Off, a request without
    /// `sig` is served to anyone who can reach the listener (a bench, a lab).
    pub require_signed_links: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            limits: outpost_serve::Limits {
                max_connections: 512,
                header_read_timeout: Duration::from_secs(30),
                ..outpost_serve::Limits::default()
            },
            links: None,
            require_signed_links: false,
        }
    }
}

/// How long a request may wait for a cold artifact's download before it gets 503.
const COLD_WAIT: Duration = Duration::from_secs(600);

/// Positioned reads of this size serve blobs that are not held in memory.
const FILE_CHUNK: u64 = 512 * 1024;

/// Serves the cache on `listener` until `shutdown` fires, then lets open connections
/// finish their current response (up to the limits' grace).
pub async fn serve(
    cache: FirmwareCache,
    listener: TcpListener,
    config: ServerConfig,
    shutdown: CancellationToken,
) {
    let links = config.links.clone();
    let required = config.require_signed_links;
    outpost_serve::serve(listener, config.limits, "firmware", shutdown, move |peer| {
        let cache = cache.clone();
        let links = links.clone();
        service_fn(move |request| {
            let cache = cache.clone();
            let links = links.clone();
            async move {
                Ok::<_, Infallible>(answer(&cache, links.as_ref(), required, &request, peer).await)
            }
        })
    })
    .await;
}

/// A signed link that is expired or forged gets 403, and so does a request without one
/// when links are `required`; anything else goes on.
fn check_link<B>(
    links: Option<&crate::links::LinkSigner>,
    required: bool,
    request: &Request<B>,
) -> Option<Response<FirmwareBody>> {
    use crate::links::LinkError;
    let query = request.uri().query();
    let name = request
        .uri()
        .path()
        .strip_prefix("/firmware/")
        .unwrap_or("")
        .to_ascii_lowercase();
    let now = outpost_store::now_millis();
    let verdict = match links {
        Some(links) => links.check(&name, query, now),
        None if query.is_some_and(|q| q.split('&').any(|p| p.starts_with("sig="))) => {
            Err(LinkError::Invalid)
        }
        None => Err(LinkError::Missing),
    };
    match verdict {
        Ok(()) => None,
        Err(LinkError::Missing) if !required => None,
        Err(err) => Some(plain(StatusCode::FORBIDDEN, &format!("{err}\n"))),
    }
}

/// Answers one request as the fan-out server does: the signed link first (403 for a
/// bad one, and for none when `required`), then the file. For other listeners that
/// serve `/firmware/` too (the gateway's device listener).
pub async fn answer<B>(
    cache: &FirmwareCache,
    links: Option<&crate::links::LinkSigner>,
    required: bool,
    request: &Request<B>,
    peer: SocketAddr,
) -> Response<FirmwareBody> {
    if let Some(refused) = check_link(links, required, request) {
        return refused;
    }
    respond(cache, request, peer).await
}

/// Answers one request, with no link check.
pub async fn respond<B>(
    cache: &FirmwareCache,
    request: &Request<B>,
    peer: SocketAddr,
) -> Response<FirmwareBody> {
    let method = request.method();
    let Some(name) = request.uri().path().strip_prefix("/firmware/") else {
        return plain(StatusCode::NOT_FOUND, "not found\n");
    };
    let Ok(sha256) = name.to_ascii_lowercase().parse::<Sha256>() else {
        return plain(
            StatusCode::NOT_FOUND,
            "firmware is addressed by its sha256 (64 hex digits)\n",
        );
    };
    if method != Method::GET && method != Method::HEAD {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let client = client_name(request.uri().query()).unwrap_or_else(|| peer.ip().to_string());
    let blob = match tokio::time::timeout(COLD_WAIT, cache.ensure(sha256)).await {
        Ok(Ok(blob)) => blob,
        Ok(Err(CacheError::NotNamed(_) | CacheError::NotCached(_))) => {
            return plain(StatusCode::NOT_FOUND, "no such firmware\n");
        }
        Ok(Err(error)) => {
            tracing::warn!(%sha256, %error, "firmware request could not be served");
            let mut response = plain(StatusCode::SERVICE_UNAVAILABLE, &format!("{error}\n"));
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("30"));
            return response;
        }
        Err(_) => {
            let mut response = plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "firmware is still downloading\n",
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("30"));
            return response;
        }
    };
    let etag = format!("\"{sha256}\"");
    let mut builder = Response::builder()
        .header(header::ETAG, &etag)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CACHE_CONTROL, "public, max-age=31536000, immutable");
    let headers = request.headers();
    let text = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    if text(header::IF_NONE_MATCH).is_some_and(|v| range::if_none_match(v, &etag)) {
        return builder
            .status(StatusCode::NOT_MODIFIED)
            .body(FirmwareBody::empty())
            .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, "response\n"));
    }
    let size = blob.size();
    let wanted = match text(header::RANGE) {
        Some(value) if text(header::IF_RANGE).is_none_or(|v| range::if_range(v, &etag)) => {
            range::parse(value, size)
        }
        _ => RangeRequest::Whole,
    };
    let head = method == Method::HEAD;
    let (status, segments, length) = match wanted {
        RangeRequest::Whole => {
            builder = builder.header(header::CONTENT_TYPE, "application/octet-stream");
            (StatusCode::OK, vec![Segment::Blob(0, size)], size)
        }
        RangeRequest::Unsatisfiable => {
            return builder
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{size}"))
                .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
                .body(FirmwareBody::full(Bytes::from(format!(
                    "range not satisfiable: the firmware is {size} bytes\n"
                ))))
                .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, "response\n"));
        }
        RangeRequest::Ranges(ranges) if ranges.len() == 1 => {
            let (first, last) = ranges[0];
            builder = builder
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .header(
                    header::CONTENT_RANGE,
                    format!("bytes {first}-{last}/{size}"),
                );
            (
                StatusCode::PARTIAL_CONTENT,
                vec![Segment::Blob(first, last + 1)],
                last - first + 1,
            )
        }
        RangeRequest::Ranges(ranges) => {
            let boundary = format!("outpost-{}", &sha256.to_hex()[..16]);
            builder = builder.header(
                header::CONTENT_TYPE,
                format!("multipart/byteranges; boundary={boundary}"),
            );
            let mut segments = Vec::with_capacity(ranges.len() * 2 + 1);
            let mut length = 0;
            for (first, last) in ranges {
                let part = Bytes::from(format!(
                    "\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes {first}-{last}/{size}\r\n\r\n"
                ));
                length += part.len() as u64 + (last - first + 1);
                segments.push(Segment::Literal(part));
                segments.push(Segment::Blob(first, last + 1));
            }
            let end = Bytes::from(format!("\r\n--{boundary}--\r\n"));
            length += end.len() as u64;
            segments.push(Segment::Literal(end));
            (StatusCode::PARTIAL_CONTENT, segments, length)
        }
    };
    let body = if head {
        cache.record_served(sha256, &client, 0);
        FirmwareBody::empty()
    } else {
        FirmwareBody::blob(blob, segments, length, client, cache.clone())
    };
    builder
        .status(status)
        .header(header::CONTENT_LENGTH, length)
        .body(body)
        .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, "response\n"))
}

/// The `device` query parameter, if it is a plausible device id.
fn client_name(query: Option<&str>) -> Option<String> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == "device")
        .map(|(_, value)| value)
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map(str::to_owned)
}

fn plain(status: StatusCode, text: &str) -> Response<FirmwareBody> {
    let mut response = Response::new(FirmwareBody::full(Bytes::from(text.to_owned())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

enum Segment {
    Literal(Bytes),
    /// Bytes `start..end` of the blob.
    Blob(u64, u64),
}

/// A response body: a small fixed text, or parts of a blob.
pub struct FirmwareBody {
    inner: BodyInner,
}

enum BodyInner {
    Full(Option<Bytes>),
    Blob(Box<BlobStream>),
}

struct BlobStream {
    blob: Blob,
    segments: std::collections::VecDeque<Segment>,
    remaining: u64,
    sent: u64,
    reading: Option<JoinHandle<std::io::Result<Bytes>>>,
    client: String,
    cache: FirmwareCache,
}

impl FirmwareBody {
    fn empty() -> Self {
        Self {
            inner: BodyInner::Full(None),
        }
    }

    fn full(bytes: Bytes) -> Self {
        Self {
            inner: BodyInner::Full(Some(bytes)),
        }
    }

    fn blob(
        blob: Blob,
        segments: Vec<Segment>,
        length: u64,
        client: String,
        cache: FirmwareCache,
    ) -> Self {
        Self {
            inner: BodyInner::Blob(Box::new(BlobStream {
                blob,
                segments: segments.into(),
                remaining: length,
                sent: 0,
                reading: None,
                client,
                cache,
            })),
        }
    }
}

impl Drop for BlobStream {
    fn drop(&mut self) {
        if let Some(reading) = self.reading.take() {
            reading.abort();
        }
        self.cache
            .record_served(self.blob.sha256(), &self.client, self.sent);
    }
}

impl Body for FirmwareBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match &mut self.inner {
            BodyInner::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            BodyInner::Blob(stream) => stream.poll_next(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            BodyInner::Full(bytes) => bytes.is_none(),
            BodyInner::Blob(stream) => stream.remaining == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            BodyInner::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            BodyInner::Blob(stream) => SizeHint::with_exact(stream.remaining),
        }
    }
}

impl BlobStream {
    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        loop {
            if let Some(reading) = &mut self.reading {
                let result = ready!(Pin::new(reading).poll(cx));
                self.reading = None;
                let chunk = match result {
                    Ok(Ok(chunk)) => chunk,
                    Ok(Err(error)) => return Poll::Ready(Some(Err(error))),
                    Err(error) => {
                        return Poll::Ready(Some(Err(std::io::Error::other(error.to_string()))));
                    }
                };
                return Poll::Ready(Some(Ok(self.emit(chunk))));
            }
            let Some(segment) = self.segments.pop_front() else {
                return Poll::Ready(None);
            };
            match segment {
                Segment::Literal(bytes) => return Poll::Ready(Some(Ok(self.emit(bytes)))),
                Segment::Blob(start, end) if start >= end => {}
                Segment::Blob(start, end) => match self.blob.body() {
                    BlobBody::Memory(bytes) => {
                        let (start, end) = (to_usize(start), to_usize(end));
                        let slice = bytes.slice(start..end);
                        return Poll::Ready(Some(Ok(self.emit(slice))));
                    }
                    BlobBody::File(file) => {
                        let take = (end - start).min(FILE_CHUNK);
                        if start + take < end {
                            self.segments.push_front(Segment::Blob(start + take, end));
                        }
                        let file = file.clone();
                        self.reading = Some(tokio::task::spawn_blocking(move || {
                            let mut buf = vec![0u8; to_usize(take)];
                            std::os::unix::fs::FileExt::read_exact_at(
                                file.as_ref(),
                                &mut buf,
                                start,
                            )?;
                            Ok(Bytes::from(buf))
                        }));
                    }
                },
            }
        }
    }

    fn emit(&mut self, bytes: Bytes) -> Frame<Bytes> {
        self.remaining = self.remaining.saturating_sub(bytes.len() as u64);
        self.sent += bytes.len() as u64;
        Frame::data(bytes)
    }
}

fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

use std::future::Future as _;
