//! The fan-out server over real TCP: Range, ETag, preconditions, bad paths, accounting.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use outpost_cache::server::{self, ServerConfig};
use outpost_cache::{FirmwareCache, Sha256};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::support::{
    Behaviour, Client, MIB, Origin, Site, artifact, get, manifest, sign, wait_until,
};

struct Served {
    site: Site,
    cache: FirmwareCache,
    addr: SocketAddr,
    stop: CancellationToken,
}

async fn serve(site: Site, config: ServerConfig) -> Served {
    let cache = site.cache().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(server::serve(cache.clone(), listener, config, stop.clone()));
    Served {
        site,
        cache,
        addr,
        stop,
    }
}

async fn with_blob(memory_bytes: u64, len: usize) -> (Served, Bytes, Sha256) {
    let mut site = Site::new().await;
    site.config.memory_bytes = memory_bytes;
    let served = serve(site, ServerConfig::default()).await;
    let bytes = artifact(len, 42);
    let file = served.site.dir.path().join("fw.bin");
    std::fs::write(&file, &bytes).unwrap();
    let sha = served.cache.import(&file).await.unwrap().sha256;
    (served, bytes, sha)
}

/// The whole Range and precondition suite, against a blob served from memory and one
/// served from its file.
async fn range_suite(memory_bytes: u64) {
    let len = 3 * MIB + 17;
    let (s, bytes, sha) = with_blob(memory_bytes, len).await;
    let path = format!("/firmware/{sha}");
    let etag = format!("\"{sha}\"");
    let last = len - 1;

    let whole = get(s.addr, &path, &[]).await;
    assert_eq!(whole.status, 200);
    assert_eq!(whole.body, bytes);
    assert_eq!(whole.header("etag"), Some(etag.as_str()));
    assert_eq!(whole.header("accept-ranges"), Some("bytes"));
    assert_eq!(
        whole.header("content-length"),
        Some(len.to_string().as_str())
    );
    assert!(whole.header("cache-control").unwrap().contains("immutable"));

    let mut client = Client::connect(s.addr).await;
    let head = client.send("HEAD", &path, &[]).await;
    assert_eq!((head.status, head.body.len()), (200, 0));
    assert_eq!(
        head.header("content-length"),
        Some(len.to_string().as_str())
    );

    for (range, first, end) in [
        ("bytes=0-0", 0, 1),                                  // first byte
        (&format!("bytes={last}-{last}") as &str, last, len), // last byte
        (&format!("bytes={last}-"), last, len),
        ("bytes=-1", last, len), // suffix: last byte
        ("bytes=-1000", len - 1000, len),
        (&format!("bytes=-{}", len * 2), 0, len), // suffix longer than the blob
        ("bytes=1000-", 1000, len),               // resume
        (&format!("bytes=10-{}", len * 5), 10, len), // end clamped
        ("bytes=524287-524288", 524_287, 524_289), // across a read chunk boundary
    ] {
        // Several on one keep-alive connection.
        let got = client.send("GET", &path, &[("range", range)]).await;
        assert_eq!(got.status, 206, "{range}");
        assert_eq!(
            got.header("content-range"),
            Some(format!("bytes {first}-{}/{len}", end - 1).as_str()),
            "{range}"
        );
        assert_eq!(got.body, bytes.slice(first..end), "{range}");
    }
    for range in [
        format!("bytes={len}-"),
        format!("bytes={}-{}", len + 10, len + 20),
        "bytes=-0".into(),
    ] {
        let got = client.send("GET", &path, &[("range", &range)]).await;
        assert_eq!(got.status, 416, "{range}");
        assert_eq!(
            got.header("content-range"),
            Some(format!("bytes */{len}").as_str())
        );
    }
    for range in ["bytes=5-1", "bytes=abc", "lines=0-1", "bytes=", "bytes 0-1"] {
        let got = client.send("GET", &path, &[("range", range)]).await;
        assert_eq!(
            (got.status, got.body.len()),
            (200, len),
            "malformed {range:?} is ignored"
        );
    }
    // Several ranges: multipart/byteranges, parts in order.
    let got = client
        .send("GET", &path, &[("range", "bytes=100-199, 0-9")])
        .await;
    assert_eq!(got.status, 206);
    let content_type = got.header("content-type").unwrap().to_owned();
    let boundary = content_type
        .strip_prefix("multipart/byteranges; boundary=")
        .unwrap();
    let text = got.body.clone();
    let expected = [
        format!("\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes 0-9/{len}\r\n\r\n").into_bytes(),
        bytes[0..10].to_vec(),
        format!("\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes 100-199/{len}\r\n\r\n").into_bytes(),
        bytes[100..200].to_vec(),
        format!("\r\n--{boundary}--\r\n").into_bytes(),
    ]
    .concat();
    assert_eq!(text.as_ref(), expected.as_slice());
    assert_eq!(
        got.header("content-length"),
        Some(expected.len().to_string().as_str())
    );

    // Preconditions.
    let got = client.send("GET", &path, &[("if-none-match", &etag)]).await;
    assert_eq!((got.status, got.body.len()), (304, 0));
    assert_eq!(got.header("etag"), Some(etag.as_str()));
    let got = client
        .send("GET", &path, &[("if-none-match", "\"other\"")])
        .await;
    assert_eq!(got.status, 200);
    let got = client
        .send(
            "GET",
            &path,
            &[("range", "bytes=10-19"), ("if-range", &etag)],
        )
        .await;
    assert_eq!((got.status, got.body.clone()), (206, bytes.slice(10..20)));
    let got = client
        .send(
            "GET",
            &path,
            &[("range", "bytes=10-19"), ("if-range", "\"stale\"")],
        )
        .await;
    assert_eq!(
        (got.status, got.body.len()),
        (200, len),
        "a changed validator gets the whole blob"
    );
    let got = client
        .send(
            "GET",
            &path,
            &[
                ("range", "bytes=10-19"),
                ("if-range", "Sat, 21 Nov 2026 10:00:00 GMT"),
            ],
        )
        .await;
    assert_eq!(got.status, 200);
    s.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_and_preconditions_from_memory() {
    range_suite(64 * MIB as u64).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_and_preconditions_from_the_file() {
    range_suite(0).await;
}

#[tokio::test]
async fn bad_paths_and_methods() {
    let (s, _, sha) = with_blob(MIB as u64, 1000).await;
    for path in [
        "/firmware/".to_owned(),
        "/firmware/../outpost.db".into(),
        "/firmware/..%2f..%2foutpost.db".into(),
        format!("/firmware/{sha}/../../outpost.db"),
        format!("/firmware/{}", &sha.to_hex()[..63]),
        format!("/firmware/{}g", &sha.to_hex()[..63]),
        "/firmware/blobs".into(),
        format!("/{sha}"),
        "/".into(),
        format!("/firmware/{}", Sha256::digest(b"unknown")),
    ] {
        let got = get(s.addr, &path, &[]).await;
        assert_eq!(got.status, 404, "{path}");
    }
    // Upper-case hex names the same blob.
    let got = get(
        s.addr,
        &format!("/firmware/{}", sha.to_hex().to_uppercase()),
        &[],
    )
    .await;
    assert_eq!(got.status, 200);
    let mut client = Client::connect(s.addr).await;
    let got = client.send("POST", &format!("/firmware/{sha}"), &[]).await;
    assert_eq!(got.status, 405);
    assert_eq!(got.header("allow"), Some("GET, HEAD"));
    let got = client
        .send("DELETE", &format!("/firmware/{sha}"), &[])
        .await;
    assert_eq!(got.status, 405);
    assert!(
        s.cache.get(sha).await.unwrap().is_some(),
        "nothing is deleted over HTTP"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_served_are_recorded_per_device() {
    let (s, _, sha) = with_blob(MIB as u64, 10_000).await;
    let path = format!("/firmware/{sha}");
    get(s.addr, &format!("{path}?device=esp-0a1b2c"), &[]).await;
    get(
        s.addr,
        &format!("{path}?device=esp-0a1b2c"),
        &[("range", "bytes=9000-")],
    )
    .await;
    get(
        s.addr,
        &format!("{path}?device=bad%20id"),
        &[("range", "bytes=0-99")],
    )
    .await;
    let mut client = Client::connect(s.addr).await;
    client
        .send("HEAD", &format!("{path}?device=esp-ffffff"), &[])
        .await;
    let served = s.cache.served(Some(sha)).await.unwrap();
    let find = |client: &str| {
        served
            .iter()
            .find(|r| r.client == client)
            .map(|r| (r.bytes, r.requests))
    };
    assert_eq!(find("esp-0a1b2c"), Some((11_000, 2)));
    assert_eq!(
        find("127.0.0.1"),
        Some((100, 1)),
        "an unusable id falls back to the address"
    );
    assert_eq!(find("esp-ffffff"), Some((0, 1)));
    assert_eq!(
        s.cache.info(sha).await.unwrap().unwrap().bytes_served,
        11_100
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_requests_fan_in_to_one_upstream_download() {
    const DEVICES: usize = 64;
    let origin = Origin::start().await;
    // 64 devices, all on 127.0.0.1: one address that stands for many.
    let defaults = ServerConfig::default();
    let config = ServerConfig {
        limits: outpost_serve::Limits {
            max_connections_per_client: DEVICES,
            ..defaults.limits.clone()
        },
        ..defaults
    };
    let s = serve(Site::new().await, config).await;
    let bytes = artifact(MIB, 77);
    let url = origin.publish("fw.bin", bytes.clone());
    s.cache
        .add_manifest(&sign(&manifest("7", &[("fw.bin", &bytes, Some(&url))])))
        .await
        .unwrap();
    let sha = Sha256::digest(&bytes);
    origin.script([Behaviour::HoldAfter(1000)]);
    let tasks: Vec<_> = (0..DEVICES)
        .map(|i| {
            let addr = s.addr;
            tokio::spawn(
                async move { get(addr, &format!("/firmware/{sha}?device=esp-{i}"), &[]).await },
            )
        })
        .collect();
    wait_until(
        "every device to wait on the download",
        Duration::from_secs(10),
        || s.cache.waiters(sha) == DEVICES,
    )
    .await;
    origin.release();
    for task in tasks {
        let got = task.await.unwrap();
        assert_eq!(got.status, 200);
        assert_eq!(got.body, bytes);
    }
    assert_eq!(origin.requests(), 1);
    assert_eq!(origin.body_bytes(), bytes.len() as u64);
    assert_eq!(s.cache.served(Some(sha)).await.unwrap().len(), DEVICES);
}

#[tokio::test]
async fn a_failing_origin_gets_503_with_retry_after() {
    let origin = Origin::start().await;
    let s = serve(Site::new().await, ServerConfig::default()).await;
    let bytes = artifact(5000, 78);
    let url = origin.publish("fw.bin", bytes.clone());
    s.cache
        .add_manifest(&sign(&manifest("8", &[("fw.bin", &bytes, Some(&url))])))
        .await
        .unwrap();
    origin.script([Behaviour::Corrupt, Behaviour::Corrupt, Behaviour::Corrupt]);
    let got = get(
        s.addr,
        &format!("/firmware/{}", Sha256::digest(&bytes)),
        &[],
    )
    .await;
    assert_eq!(got.status, 503);
    assert_eq!(got.header("retry-after"), Some("30"));
    assert!(String::from_utf8_lossy(&got.body).contains("failed after 3 attempt(s)"));
    // Retried on the next request.
    let got = get(
        s.addr,
        &format!("/firmware/{}", Sha256::digest(&bytes)),
        &[],
    )
    .await;
    assert_eq!((got.status, got.body), (200, bytes));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_bounded() {
    let mut site = Site::new().await;
    site.config.memory_bytes = MIB as u64;
    let s = serve(
        site,
        ServerConfig {
            limits: outpost_serve::Limits {
                max_connections: 2,
                ..outpost_serve::Limits::default()
            },
            ..ServerConfig::default()
        },
    )
    .await;
    let bytes = artifact(1000, 79);
    let file = s.site.dir.path().join("fw.bin");
    std::fs::write(&file, &bytes).unwrap();
    let sha = s.cache.import(&file).await.unwrap().sha256;
    let path = format!("/firmware/{sha}");
    let mut first = Client::connect(s.addr).await;
    let mut second = Client::connect(s.addr).await;
    assert_eq!(first.send("GET", &path, &[]).await.status, 200);
    assert_eq!(second.send("GET", &path, &[]).await.status, 200);
    // Both kept alive: a third connection is not served until one of them closes.
    let third = tokio::spawn(async move { get(s.addr, &path, &[]).await });
    let waited = tokio::time::timeout(Duration::from_millis(300), async {
        while !third.is_finished() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(
        waited.is_err(),
        "a third connection was served beyond the bound of 2"
    );
    drop(first);
    let got = tokio::time::timeout(Duration::from_secs(10), third)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.status, 200);
    drop(second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_links_are_required_unless_turned_off() {
    let signer = outpost_cache::links::LinkSigner::new([3; 32]);
    let bytes = artifact(10_000, 11);
    let sha = Sha256::digest(&bytes);
    let path = format!("/firmware/{sha}");
    let now = outpost_store::now_millis();
    for required in [true, false] {
        let s = serve(
            Site::new().await,
            ServerConfig {
                links: Some(signer.clone()),
                require_signed_links: required,
                ..ServerConfig::default()
            },
        )
        .await;
        let file = s.site.dir.path().join("fw.bin");
        std::fs::write(&file, &bytes).unwrap();
        s.cache.import(&file).await.unwrap();
        // A good link is served; a link for another device, or expired, never is.
        let good = format!(
            "{path}?{}",
            signer.query(&sha.to_string(), "esp-1", now + 60_000)
        );
        assert_eq!(get(s.addr, &good, &[]).await.body, bytes);
        let moved = good.replace("device=esp-1", "device=esp-2");
        assert_eq!(get(s.addr, &moved, &[]).await.status, 403);
        let expired = format!(
            "{path}?{}",
            signer.query(&sha.to_string(), "esp-1", now - 1)
        );
        let refused = get(s.addr, &expired, &[]).await;
        assert_eq!(refused.status, 403);
        assert!(String::from_utf8_lossy(&refused.body).contains("expired"));
        // A plain request: refused when links are required, with the way out named.
        let plain = get(s.addr, &path, &[]).await;
        if required {
            assert_eq!(plain.status, 403);
            let text = String::from_utf8_lossy(&plain.body);
            assert!(
                text.contains("only through signed per-device links"),
                "{text}"
            );
            let with_device = get(s.addr, &format!("{path}?device=esp-1"), &[]).await;
            assert_eq!(with_device.status, 403, "naming a device is not a link");
        } else {
            assert_eq!((plain.status, plain.body), (200, bytes.clone()));
        }
        s.stop.cancel();
    }
}
