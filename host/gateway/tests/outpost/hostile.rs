//! The site network may be hostile: what one misbehaving host can and cannot do to a
//! running gateway's listeners. 127.0.0.0/8 is all loopback on Linux, so 127.0.0.1 is
//! the attacker and 127.0.0.2 an honest client.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use super::{Site, http_get};

async fn connect_from(source: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(to).await.unwrap()
}

/// A whole GET from `source`; the whole answer.
async fn get_from(source: &str, to: SocketAddr, path: &str) -> String {
    let mut stream = connect_from(source, to).await;
    let head = format!("GET {path} HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// 600 connections from 127.0.0.1 that never finish their request: half a head that
/// never ends, half a body that never ends. Returns them once the listener has seen
/// them all: one more from the same address is then refused.
async fn slowloris(to: SocketAddr) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for i in 0..600 {
        let mut stream = connect_from("127.0.0.1", to).await;
        let trickle = if i % 2 == 0 {
            "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ".to_owned()
        } else {
            "POST /api/v1/devices/esp-1/telemetry HTTP/1.1\r\nHost: x\r\n\
             Authorization: Bearer odt_0123\r\nContent-Length: 100000\r\n\r\n{\"t\":"
                .to_owned()
        };
        stream.write_all(trickle.as_bytes()).await.unwrap();
        held.push(stream);
    }
    let fence = get_from("127.0.0.1", to, "/healthz").await;
    assert!(fence.starts_with("HTTP/1.1 503"), "{fence}");
    held
}

#[test]
fn a_slowloris_from_one_address_stops_neither_listener_for_another() {
    let site = Site::new("");
    let mut gateway = site.run();
    let api = gateway.ready();
    let (_, health) = http_get(api, "/healthz", None);
    let firmware: SocketAddr = health["firmware_url"]
        .as_str()
        .unwrap()
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let blob = format!("/firmware/{}", "0".repeat(64));
        for (listener, path, expect) in [
            (api, "/healthz", "HTTP/1.1 200"),
            (firmware, blob.as_str(), "HTTP/1.1 4"),
        ] {
            let attack = slowloris(listener).await;
            let started = Instant::now();
            let answer = get_from("127.0.0.2", listener, path).await;
            let took = started.elapsed();
            assert!(answer.starts_with(expect), "{listener}{path}: {answer}");
            assert!(
                took < Duration::from_secs(1),
                "{listener}{path}: the honest client waited {took:?}"
            );
            drop(attack);
        }
    });
}
