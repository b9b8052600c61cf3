//! The listener's defences against a hostile site network, over real loopback sockets.
//! 127.0.0.0/8 is all loopback on Linux, so 127.0.0.1 and 127.0.0.2 are two clients.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use outpost_serve::{Limits, read_body, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

/// `/big` answers 64 MiB; `POST` reads its body; anything else answers `ok`.
async fn answer(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = if request.uri().path() == "/big" {
        Bytes::from(vec![b'x'; 64 << 20])
    } else if request.method() == hyper::Method::POST {
        match read_body(request.into_body(), 4096, Duration::from_secs(30)).await {
            Ok(body) => body,
            Err(error) => {
                let mut response = Response::new(Full::new(Bytes::from(error.to_string())));
                *response.status_mut() = StatusCode::BAD_REQUEST;
                return Ok(response);
            }
        }
    } else {
        Bytes::from_static(b"ok")
    };
    Ok(Response::new(Full::new(body)))
}

struct Server {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(limits: Limits) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(listener, limits, "test", shutdown.clone(), |_| {
            service_fn(answer)
        }));
        Self {
            addr,
            shutdown,
            task,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("serve returns after shutdown")
            .unwrap();
    }
}

async fn connect_from(source: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(to).await.unwrap()
}

/// Sends a whole GET and returns the whole answer.
async fn get(source: &str, to: SocketAddr, path: &str) -> String {
    let mut stream = connect_from(source, to).await;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_from_one_address_leaves_another_address_served_within_a_second() {
    // The firmware server's global cap: before per-client caps, 513 slow connections
    // from one host were enough to stop it.
    let limits = Limits {
        max_connections: 512,
        ..Limits::default()
    };
    let server = Server::start(limits.clone()).await;
    let mut attack = Vec::new();
    for i in 0..600 {
        let mut stream = connect_from("127.0.0.1", server.addr).await;
        let trickle: &[u8] = if i % 2 == 0 {
            // a request head that never ends
            b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: "
        } else {
            // a whole head, then a body that never ends
            b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n{\"a\":"
        };
        stream.write_all(trickle).await.unwrap();
        attack.push(stream);
    }
    // One more from the attacker: accepted in order after the 600, so once it is
    // answered, the server has seen them all. It is over the cap, so it is refused.
    let refused = get("127.0.0.1", server.addr, "/").await;
    assert!(
        refused.starts_with("HTTP/1.1 503") && refused.contains("too many connections"),
        "{refused}"
    );

    let started = Instant::now();
    let answer = get("127.0.0.2", server.addr, "/").await;
    let took = started.elapsed();
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok"),
        "{answer}"
    );
    assert!(
        took < Duration::from_secs(1),
        "another client waited {took:?}"
    );

    drop(attack);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_disconnected_and_its_slot_freed() {
    let stall = Duration::from_millis(500);
    let server = Server::start(Limits {
        max_connections_per_client: 1,
        write_stall_timeout: stall,
        ..Limits::default()
    })
    .await;
    // 64 MiB asked for and never read: the socket buffers fill and the write waits.
    let mut reader = connect_from("127.0.0.1", server.addr).await;
    reader
        .write_all(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let asked = Instant::now();
    // The slot stays taken until the stall is noticed; then the same address is served.
    let deadline = asked + Duration::from_secs(10);
    let mut refusals = 0;
    loop {
        let answer = get("127.0.0.1", server.addr, "/").await;
        if answer.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        refusals += 1;
        assert!(
            Instant::now() < deadline,
            "the stalled connection was never closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refusals > 0, "the slow reader held the only slot at first");
    assert!(
        asked.elapsed() >= stall,
        "freed after {:?}, before the stall timeout",
        asked.elapsed()
    );
    // What the slow reader got is cut short of 64 MiB.
    let mut got = Vec::new();
    let _ = reader.read_to_end(&mut got).await;
    assert!(got.len() < 64 << 20, "{} bytes", got.len());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_that_never_ends_is_closed_after_the_header_timeout() {
    let server = Server::start(Limits {
        header_read_timeout: Duration::from_millis(300),
        ..Limits::default()
    })
    .await;
    let mut stream = connect_from("127.0.0.1", server.addr).await;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the server kept the connection open");
    assert!(started.elapsed() >= Duration::from_millis(250));
    let answer = String::from_utf8_lossy(&answer);
    // hyper answers 408 to a head that timed out, or just closes.
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_a_request_in_flight_finish() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let (began, mut begun) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(serve(
        listener,
        Limits::default(),
        "test",
        shutdown.clone(),
        move |_| {
            let began = began.clone();
            service_fn(move |request| {
                let _ = began.send(());
                answer(request)
            })
        },
    ));
    let mut stream = connect_from("127.0.0.1", addr).await;
    stream
        .write_all(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\nab")
        .await
        .unwrap();
    begun.recv().await.unwrap();
    shutdown.cancel();
    stream.write_all(b"cd").await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("abcd"),
        "{answer}"
    );
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("serve returns once the request is done")
        .unwrap();
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the listener is closed"
    );
}

mod tls {
    use std::sync::Arc;

    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;

    /// A CA, and a server certificate it signed for 127.0.0.1.
    fn site_pki() -> (CertificateDer<'static>, Arc<rustls::ServerConfig>) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone(), ca_cert.der().clone()],
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
        (ca_cert.der().clone(), Arc::new(config))
    }

    fn client_trusting(ca: CertificateDer<'static>) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        TlsConnector::from(Arc::new(config))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tls_serves_a_client_that_trusts_the_site_ca_and_no_other() {
        let (ca, server) = site_pki();
        let (stranger_ca, _) = site_pki();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let limits = Limits {
            header_read_timeout: Duration::from_millis(500),
            ..Limits::default()
        };
        let task = tokio::spawn(outpost_serve::serve_tls(
            listener,
            Some(TlsAcceptor::from(server)),
            limits,
            "test",
            shutdown.clone(),
            |_| service_fn(answer),
        ));
        let name = ServerName::try_from("127.0.0.1").unwrap();

        // A client that stalls its handshake holds only its own connection.
        let mut stalled = connect_from("127.0.0.1", addr).await;
        stalled.write_all(&[0x16, 0x03, 0x01]).await.unwrap();

        let stream = connect_from("127.0.0.2", addr).await;
        let mut tls = client_trusting(ca)
            .connect(name.clone(), stream)
            .await
            .unwrap();
        tls.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        tls.read_to_end(&mut answer).await.unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok"),
            "{answer}"
        );

        // A client that trusts another CA refuses the server.
        let stream = connect_from("127.0.0.2", addr).await;
        let refused = client_trusting(stranger_ca).connect(name, stream).await;
        assert!(
            refused.is_err(),
            "a certificate from an untrusted CA was accepted"
        );

        // Plain HTTP on the TLS port gets no HTTP answer.
        let plain = get("127.0.0.2", addr, "/").await;
        assert!(!plain.contains("HTTP/1.1 200"), "{plain}");

        // The stalled handshake is cut off after the header timeout.
        let mut rest = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(5), stalled.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "a stalled handshake was never closed");

        shutdown.cancel();
        task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_site_ca_is_made_once_kept_private_and_signs_the_listener() {
        use outpost_serve::pki::{CA_KEY, PkiError, SitePki};
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let tls_dir = dir.path().join("tls");
        let names = vec!["127.0.0.1".to_owned(), "gateway.local".to_owned()];
        let first = SitePki::load_or_create(&tls_dir, &names).unwrap();
        let again = SitePki::load_or_create(&tls_dir, &names).unwrap();
        assert_eq!(
            first.ca_pem(),
            again.ca_pem(),
            "the CA is kept across starts"
        );
        let mode = std::fs::metadata(tls_dir.join(CA_KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(outpost_serve::serve_tls(
            listener,
            Some(again.acceptor()),
            Limits::default(),
            "test",
            shutdown.clone(),
            |_| service_fn(answer),
        ));
        use rustls_pki_types::pem::PemObject as _;
        let ca = CertificateDer::from_pem_slice(first.ca_pem().as_bytes()).unwrap();
        for name in ["127.0.0.1", "gateway.local"] {
            let stream = connect_from("127.0.0.1", addr).await;
            let server = ServerName::try_from(name.to_owned()).unwrap();
            let mut tls = client_trusting(ca.clone())
                .connect(server, stream)
                .await
                .unwrap();
            tls.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut answer = Vec::new();
            tls.read_to_end(&mut answer).await.unwrap();
            assert!(String::from_utf8_lossy(&answer).ends_with("ok"));
        }
        // A name the certificate was not issued for is refused.
        let stream = connect_from("127.0.0.1", addr).await;
        let other = ServerName::try_from("elsewhere.example").unwrap();
        assert!(client_trusting(ca).connect(other, stream).await.is_err());
        shutdown.cancel();
        task.await.unwrap();

        // A damaged key is an error that names the file, never silently replaced.
        std::fs::write(tls_dir.join(CA_KEY), "garbage").unwrap();
        let err = SitePki::load_or_create(&tls_dir, &names).unwrap_err();
        assert!(matches!(err, PkiError::Invalid { .. }), "{err}");
        assert!(err.to_string().contains(CA_KEY), "{err}");
    }
}
