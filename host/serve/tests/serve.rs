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
