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

/// TLS clients for the device listener: one that trusts only the site CA from the
/// state directory, one that trusts another CA.
mod tls {
    use std::sync::Arc;

    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, ServerName};
    use tokio_rustls::TlsConnector;

    use super::*;

    pub(super) fn trusting(pem: &str) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        TlsConnector::from(Arc::new(config))
    }

    /// One request over TLS; the whole answer, or the handshake's error.
    pub(super) async fn request(
        connector: &TlsConnector,
        to: SocketAddr,
        head: &str,
    ) -> Result<String, std::io::Error> {
        let stream = connect_from("127.0.0.2", to).await;
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let mut stream = connector.connect(name, stream).await?;
        stream.write_all(head.as_bytes()).await?;
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer).await;
        Ok(String::from_utf8_lossy(&answer).into_owned())
    }
}

#[test]
fn the_device_listener_speaks_tls_with_the_site_ca_and_serves_devices_only() {
    let site = Site::new("\n[devices]\nbind = \"127.0.0.1:0\"\n");
    let mut gateway = site.run();
    let api = gateway.ready();
    let admin = site.admin_token();
    let (_, health) = http_get(api, "/healthz", None);
    let url = health["devices_url"].as_str().unwrap().to_owned();
    let devices: SocketAddr = url.trim_start_matches("https://").parse().unwrap();
    let ca = std::fs::read_to_string(site.state().join("tls/site-ca.pem")).unwrap();
    let key = site.state().join("tls/site-ca.key");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let site_ca = tls::trusting(&ca);
        let get = |path: &str, token: &str| {
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n")
        };
        // Devices' endpoints and firmware are here; the operators' API is not.
        for (path, expect) in [
            ("/api/v1/devices/esp-1/next", "HTTP/1.1 401"),
            (&format!("/firmware/{}", "0".repeat(64)), "HTTP/1.1 403"),
            ("/api/v1/devices", "HTTP/1.1 404"),
            ("/api/v1/tokens", "HTTP/1.1 404"),
            ("/metrics", "HTTP/1.1 404"),
            ("/dashboard", "HTTP/1.1 404"),
        ] {
            let answer = tls::request(&site_ca, devices, &get(path, &admin)).await.unwrap();
            assert!(answer.starts_with(expect), "{path}: {answer}");
        }
        // A client that trusts another CA refuses the gateway; plain HTTP gets nothing.
        let stranger = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let other = params.self_signed(&stranger).unwrap().pem();
        let refused = tls::request(&tls::trusting(&other), devices, &get("/", "x")).await;
        assert!(refused.is_err(), "{refused:?}");
        let plain = get_from("127.0.0.2", devices, "/api/v1/devices/esp-1/next").await;
        assert!(!plain.starts_with("HTTP/1.1"), "{plain}");
    });
    gateway.stop_cleanly(libc::SIGTERM, &site);

    // The same CA after a restart: devices onboarded before keep trusting the gateway.
    let mut gateway = site.run();
    gateway.ready();
    assert_eq!(
        std::fs::read_to_string(site.state().join("tls/site-ca.pem")).unwrap(),
        ca
    );
    gateway.stop_cleanly(libc::SIGTERM, &site);
}

#[test]
fn the_admin_api_leaves_loopback_only_with_tls() {
    let site = Site::new("");
    let text = std::fs::read_to_string(site.config()).unwrap();
    site.write_config(&text.replace(
        "[api]\nbind = \"127.0.0.1:0\"\n",
        "[api]\nbind = \"0.0.0.0:0\"\n",
    ));
    let refused = site.command(&["config", "check"]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("api.tls = true"), "{stderr}");

    site.write_config(&text.replace(
        "[api]\nbind = \"127.0.0.1:0\"\n",
        "[api]\nbind = \"0.0.0.0:0\"\ntls = true\n",
    ));
    let mut gateway = site.run();
    let api = gateway.ready();
    let api = SocketAddr::from(([127, 0, 0, 1], api.port()));
    let ca = std::fs::read_to_string(site.state().join("tls/site-ca.pem")).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let answer = tls::request(
            &tls::trusting(&ca),
            api,
            "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let plain = get_from("127.0.0.2", api, "/healthz").await;
        assert!(!plain.starts_with("HTTP/1.1 200"), "{plain}");
    });
    gateway.stop_cleanly(libc::SIGTERM, &site);
}
