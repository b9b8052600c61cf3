//! Outpost's HTTP/1.1 listeners, built for a site network that may be hostile.
//!
//! Every listener of the gateway (the local API, the firmware fan-out server, the device
//! listener) runs [`serve`], which gives each of them the same defences:
//!
//! * **a global cap** ([`Limits::max_connections`]): further connections wait in the
//!   kernel's listen backlog instead of taking memory and descriptors;
//! * **a per-client cap** ([`Limits::max_connections_per_client`], by source address):
//!   one host cannot take the global slots from everyone else. A connection over the cap
//!   gets a short `503` and is closed at once, so a slowloris from one address leaves
//!   the others served;
//! * **a header read timeout**: a request head (the first, or the next on a kept-alive
//!   connection) must arrive in full within [`Limits::header_read_timeout`], so idle and
//!   trickling connections are closed;
//! * **a write-stall timeout**: a client that stops reading its response for
//!   [`Limits::write_stall_timeout`] is disconnected, so a slow reader cannot hold a slot
//!   forever (a response that is merely slow to *produce*, such as a long poll or a cold
//!   firmware download, is not a stall);
//! * **a graceful drain** on shutdown, bounded by [`Limits::grace`];
//! * **TLS** when given a [`TlsAcceptor`] ([`serve_tls`]): the handshake must complete
//!   within the header read timeout, in the connection's own task, so a client that
//!   stalls it holds only its own slot.
//!
//! Request bodies are the handlers' to read, with [`read_body`] (a size cap and a
//! deadline for the whole body) and [`json::check_depth`] before any JSON is parsed.

pub mod body;
pub mod json;
pub mod pki;

mod clients;
mod stream;
mod watch;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use body::{BodyError, read_body};
pub use tokio_rustls::TlsAcceptor;

use clients::Clients;
use stream::Stream;
use watch::{StallClock, Watched};

/// The limits one listener enforces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Connections one source address may hold at once; more are refused with 503.
    pub max_connections_per_client: usize,
    /// Time allowed for a request head to arrive in full.
    pub header_read_timeout: Duration,
    /// Time a response may wait for a client that does not read it.
    pub write_stall_timeout: Duration,
    /// How long open connections get to finish after shutdown begins.
    pub grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            max_connections_per_client: 32,
            header_read_timeout: Duration::from_secs(10),
            write_stall_timeout: Duration::from_secs(60),
            grace: Duration::from_secs(5),
        }
    }
}

/// Serves HTTP/1.1 on `listener` until `shutdown` is cancelled, then lets open
/// connections finish their current request (up to [`Limits::grace`]) and returns.
///
/// `make_service` is called once per accepted connection with the peer's address. `name`
/// names the listener in logs.
pub async fn serve<M, S, B>(
    listener: TcpListener,
    limits: Limits,
    name: &'static str,
    shutdown: CancellationToken,
    make_service: M,
) where
    M: FnMut(SocketAddr) -> S,
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    serve_tls(listener, None, limits, name, shutdown, make_service).await;
}

/// As [`serve`], over TLS when `tls` is given.
pub async fn serve_tls<M, S, B>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    limits: Limits,
    name: &'static str,
    shutdown: CancellationToken,
    mut make_service: M,
) where
    M: FnMut(SocketAddr) -> S,
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let clients = Clients::new(name, limits.max_connections_per_client.max(1));
    let connections = TaskTracker::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true)
        .writev(true);

    loop {
        let slot = tokio::select! {
            () = shutdown.cancelled() => break,
            slot = Arc::clone(&slots).acquire_owned() => slot.expect("the semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, or the peer gave up before accept: the
                    // listener itself is fine. Pause so an fd shortage does not spin.
                    tracing::warn!(listener = name, %error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(client) = clients.admit(peer.ip()) else {
            clients::refuse(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = make_service(peer);
        let http = http.clone();
        let shutdown = shutdown.clone();
        let stall_timeout = limits.write_stall_timeout;
        let handshake_timeout = limits.header_read_timeout;
        let tls = tls.clone();
        connections.spawn(async move {
            let _held = (slot, client);
            let stream = match tls {
                None => Stream::Plain(stream),
                Some(acceptor) => {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => Stream::Tls(Box::new(tls)),
                        Ok(Err(error)) => {
                            tracing::debug!(listener = name, %peer, %error, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(listener = name, %peer, "TLS handshake timed out");
                            return;
                        }
                    }
                }
            };
            let stall = StallClock::new();
            let io = TokioIo::new(Watched::new(stream, stall.clone()));
            let connection = http.serve_connection(io, service);
            tokio::pin!(connection);
            let mut draining = false;
            loop {
                tokio::select! {
                    result = connection.as_mut() => {
                        if let Err(error) = result {
                            tracing::debug!(listener = name, %peer, %error, "connection ended with an error");
                        }
                        break;
                    }
                    () = shutdown.cancelled(), if !draining => {
                        connection.as_mut().graceful_shutdown();
                        draining = true;
                    }
                    () = stall.exceeded(stall_timeout) => {
                        tracing::debug!(listener = name, %peer, "closing a connection whose client stopped reading");
                        break;
                    }
                }
            }
        });
    }

    drop(listener);
    connections.close();
    if tokio::time::timeout(limits.grace, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            listener = name,
            "connections still open {:?} after shutdown began; closing them",
            limits.grace
        );
    }
}
