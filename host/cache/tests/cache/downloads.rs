//! Upstream downloads: single flight, resume, bad origins, restarts.

use std::time::Duration;

use outpost_cache::{CacheError, FirmwareCache, Sha256};

use crate::support::{Behaviour, MIB, Origin, Site, artifact, manifest, sign, wait_until};

async fn named(
    site: &Site,
    origin: &Origin,
    len: usize,
    seed: u64,
) -> (FirmwareCache, bytes::Bytes, Sha256) {
    let bytes = artifact(len, seed);
    let url = origin.publish(&format!("fw-{seed}.bin"), bytes.clone());
    let cache = site.cache().await;
    cache
        .add_manifest(&sign(&manifest(
            &format!("1.{seed}"),
            &[("fw.bin", &bytes, Some(&url))],
        )))
        .await
        .unwrap();
    let sha = Sha256::digest(&bytes);
    (cache, bytes, sha)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_one_upstream_download() {
    let origin = Origin::start().await;
    let site = Site::new().await;
    let (cache, bytes, sha) = named(&site, &origin, 2 * MIB, 1).await;
    // The origin holds the body after 64 KiB until every waiter has joined.
    origin.script([Behaviour::HoldAfter(64 * 1024)]);
    const CALLERS: usize = 100;
    let tasks: Vec<_> = (0..CALLERS)
        .map(|_| {
            let cache = cache.clone();
            tokio::spawn(
                async move { cache.ensure(sha).await.map(|blob| blob.read_all().unwrap()) },
            )
        })
        .collect();
    wait_until(
        "every caller to wait on the one download",
        Duration::from_secs(10),
        || cache.waiters(sha) == CALLERS && origin.requests() == 1,
    )
    .await;
    origin.release();
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap(), bytes);
    }
    assert_eq!(origin.requests(), 1, "exactly one upstream request");
    assert_eq!(
        origin.body_bytes(),
        bytes.len() as u64,
        "upstream bytes / artifact size = 1.00"
    );
    assert!(!cache.is_downloading(sha));
    assert_eq!(site.files_in("blobs"), vec![sha.to_hex()]);
    assert!(site.files_in("partial").is_empty());
}

#[tokio::test]
async fn an_origin_dying_mid_stream_is_resumed_with_range() {
    let origin = Origin::start().await;
    let site = Site::new().await;
    let (cache, bytes, sha) = named(&site, &origin, 3 * MIB, 2).await;
    let cut = MIB as u64 + 12_345;
    origin.script([Behaviour::CutAfter(cut)]);
    assert_eq!(cache.ensure(sha).await.unwrap().read_all().unwrap(), bytes);
    let seen = origin.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].0, None);
    // The origin breaks the connection after `cut` bytes; what reached the cache before
    // that (at least all but the frames still queued) is kept and the rest asked for.
    let resumed_at: u64 = seen[1]
        .0
        .as_deref()
        .unwrap()
        .strip_prefix("bytes=")
        .unwrap()
        .strip_suffix('-')
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        resumed_at > cut - 5 * 64 * 1024 && resumed_at <= cut,
        "resumed at {resumed_at}"
    );
    assert!(
        seen[1].1.as_deref().is_some_and(|v| v.starts_with('"')),
        "If-Range carries the origin's ETag"
    );
    assert_eq!(
        origin.body_bytes(),
        cut + bytes.len() as u64 - resumed_at,
        "resumed, not restarted"
    );
}

#[tokio::test]
async fn an_origin_that_ignores_range_is_restarted_from_zero() {
    let origin = Origin::start().await;
    let site = Site::new().await;
    let (cache, bytes, sha) = named(&site, &origin, MIB, 3).await;
    origin.script([Behaviour::CutAfter(512 * 1024), Behaviour::IgnoreRange]);
    assert_eq!(cache.ensure(sha).await.unwrap().read_all().unwrap(), bytes);
    assert_eq!(origin.requests(), 2);
    assert!(origin.seen()[1].0.is_some(), "the cache asked to resume");
    assert_eq!(origin.body_bytes(), 512 * 1024 + bytes.len() as u64);
}

#[tokio::test]
async fn a_mangled_content_range_discards_the_partial_bytes() {
    let origin = Origin::start().await;
    let site = Site::new().await;
    let (cache, bytes, sha) = named(&site, &origin, MIB, 4).await;
    origin.script([
        Behaviour::CutAfter(512 * 1024),
        Behaviour::WrongContentRange,
    ]);
    assert_eq!(cache.ensure(sha).await.unwrap().read_all().unwrap(), bytes);
    let seen = origin.seen();
    assert_eq!(seen.len(), 3);
    assert_eq!(
        seen[2].0, None,
        "after a mangled range the download starts over"
    );
}

#[tokio::test]
async fn wrong_bytes_are_never_cached_and_a_later_request_retries() {
    let origin = Origin::start().await;
    let site = Site::new().await;
    let (cache, bytes, sha) = named(&site, &origin, MIB, 5).await;
    origin.script([Behaviour::Corrupt, Behaviour::Corrupt, Behaviour::Corrupt]);
    let error = cache.ensure(sha).await.unwrap_err();
    assert!(
        matches!(&error, CacheError::Upstream { attempts: 3, detail, .. } if detail.contains("sha256 of the")),
        "{error}"
    );
    assert!(cache.get(sha).await.unwrap().is_none());
    assert!(site.files_in("blobs").is_empty());
    assert!(
        site.files_in("partial").is_empty(),
        "a partial file with wrong bytes is deleted"
    );
    let pending = cache.pending().await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].attempts, 3);
    assert!(pending[0].last_error.as_deref().unwrap().contains("sha256"));
    // The origin recovers; the next request fetches it properly.
    assert_eq!(cache.ensure(sha).await.unwrap().read_all().unwrap(), bytes);
    assert!(cache.pending().await.unwrap().is_empty());
}

#[tokio::test]
async fn too_many_bytes_are_refused() {
    let origin = Origin::start().await;
    let site = Site::new().await;
    let (cache, _, sha) = named(&site, &origin, 200_000, 6).await;
    origin.script([
        Behaviour::Oversize(10),
        Behaviour::Oversize(1),
        Behaviour::Oversize(70_000),
    ]);
    let error = cache.ensure(sha).await.unwrap_err();
    assert!(
        error
            .to_string()
            .contains("more than the manifest's 200000 bytes"),
        "{error}"
    );
    assert!(site.files_in("blobs").is_empty());
    assert!(site.files_in("partial").is_empty());
}

#[tokio::test]
async fn server_errors_are_retried_with_backoff() {
    let origin = Origin::start().await;
    let site = Site::new().await;
    let (cache, bytes, sha) = named(&site, &origin, 10_000, 7).await;
    origin.script([Behaviour::Status(503), Behaviour::Status(500)]);
    assert_eq!(cache.ensure(sha).await.unwrap().read_all().unwrap(), bytes);
    assert_eq!(origin.requests(), 3);
    // A dead origin: every attempt fails, the error names it, nothing is cached.
    let site = Site::new().await;
    let bytes = artifact(1000, 8);
    let cache = site.cache().await;
    let dead = "http://127.0.0.1:9/gone.bin";
    cache
        .add_manifest(&sign(&manifest("9", &[("gone.bin", &bytes, Some(dead))])))
        .await
        .unwrap();
    let error = cache.ensure(Sha256::digest(&bytes)).await.unwrap_err();
    assert!(
        error.to_string().contains(dead) && error.to_string().contains("3 attempt(s)"),
        "{error}"
    );
}

#[tokio::test]
async fn a_download_interrupted_by_shutdown_resumes_after_restart() {
    let origin = Origin::start().await;
    let site = Site::new().await;
    let (cache, bytes, sha) = named(&site, &origin, 2 * MIB, 9).await;
    let half = MIB as u64;
    origin.script([Behaviour::HoldAfter(half)]);
    cache.prefetch(sha);
    let partial = site.root().join("partial").join(format!("{sha}.part"));
    wait_until("half the artifact on disk", Duration::from_secs(10), || {
        std::fs::metadata(&partial).is_ok_and(|m| m.len() == half)
    })
    .await;
    // Nothing is served while the download is incomplete.
    assert!(cache.get(sha).await.unwrap().is_none());
    cache.shutdown().await.unwrap();
    assert_eq!(
        std::fs::metadata(&partial).unwrap().len(),
        half,
        "the partial file survives"
    );

    // A new cache on the same state resumes by itself, from where the bytes end.
    let cache = site.cache().await;
    let blob = cache.ensure(sha).await.unwrap();
    assert_eq!(blob.read_all().unwrap(), bytes);
    let seen = origin.seen();
    assert_eq!(
        seen.last().unwrap().0.as_deref(),
        Some(format!("bytes={half}-").as_str())
    );
    assert!(!partial.exists());
}

#[tokio::test]
async fn a_blob_damaged_on_disk_is_deleted_not_served() {
    let site = Site::new().await;
    let cache = site.cache().await;
    let bytes = artifact(300_000, 10);
    let file = site.dir.path().join("app.bin");
    std::fs::write(&file, &bytes).unwrap();
    let info = cache.import(&file).await.unwrap();
    cache.shutdown().await.unwrap();
    // Flip one byte of the stored blob behind the cache's back.
    let path = site.root().join("blobs").join(info.sha256.to_hex());
    let mut damaged = std::fs::read(&path).unwrap();
    damaged[1234] ^= 1;
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, &damaged).unwrap();

    let cache = site.cache().await;
    assert!(cache.get(info.sha256).await.unwrap().is_none());
    assert!(!path.exists());
    assert!(cache.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn recovery_drops_leftovers_of_a_crash() {
    let site = Site::new().await;
    let cache = site.cache().await;
    let bytes = artifact(50_000, 11);
    let file = site.dir.path().join("a.bin");
    std::fs::write(&file, &bytes).unwrap();
    let kept = cache.import(&file).await.unwrap();
    cache.shutdown().await.unwrap();
    // What a crash can leave: a half-written import, a renamed file with no row, a
    // partial download nobody asked for, and a row whose file is gone.
    std::fs::write(site.root().join("tmp").join("import-1234"), b"half").unwrap();
    std::fs::create_dir_all(site.root().join("tmp/upload-99")).unwrap();
    std::fs::write(site.root().join("tmp/upload-99/fw.bin"), b"half an upload").unwrap();
    let orphan = Sha256::digest(b"orphan");
    std::fs::write(site.root().join("blobs").join(orphan.to_hex()), b"orphan").unwrap();
    std::fs::write(
        site.root().join("partial").join(format!("{orphan}.part")),
        b"x",
    )
    .unwrap();
    let ghost = Sha256::digest(b"ghost");
    site.store
        .call(move |conn| {
            conn.execute(
                "INSERT INTO firmware_blobs VALUES (?1, 5, 'import', 'ghost', 0, 0)",
                [ghost.to_hex()],
            )?;
            Ok(())
        })
        .await
        .unwrap();

    let cache = site.cache().await;
    assert!(site.files_in("tmp").is_empty());
    assert!(site.files_in("partial").is_empty());
    assert_eq!(site.files_in("blobs"), vec![kept.sha256.to_hex()]);
    let listed: Vec<Sha256> = cache
        .list()
        .await
        .unwrap()
        .iter()
        .map(|b| b.sha256)
        .collect();
    assert_eq!(listed, vec![kept.sha256]);
    assert_eq!(
        cache
            .get(kept.sha256)
            .await
            .unwrap()
            .unwrap()
            .read_all()
            .unwrap(),
        bytes
    );
}

/// An HTTPS origin with a certificate from a private CA; returns its URL base and the CA (PEM).
async fn tls_origin(bytes: bytes::Bytes) -> (String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (acceptor, bytes) = (acceptor.clone(), bytes.clone());
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(stream).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |_request| {
                    let body = http_body_util::Full::new(bytes.clone());
                    async move { Ok::<_, std::convert::Infallible>(http::Response::new(body)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (format!("https://{addr}"), ca_cert.pem())
}

#[tokio::test]
async fn https_origins_are_verified_against_the_configured_ca() {
    let bytes = artifact(300_000, 12);
    let sha = Sha256::digest(&bytes);
    let (base, ca_pem) = tls_origin(bytes.clone()).await;
    let url = format!("{base}/fw.bin");

    // Without the private CA the origin's certificate is not trusted: nothing is fetched.
    let site = Site::new().await;
    let cache = site.cache().await;
    cache
        .add_manifest(&sign(&manifest("tls", &[("fw.bin", &bytes, Some(&url))])))
        .await
        .unwrap();
    let error = cache.ensure(sha).await.unwrap_err().to_string();
    assert!(
        error.contains("certificate") || error.contains("UnknownIssuer"),
        "{error}"
    );
    assert!(site.files_in("blobs").is_empty());

    // With it, the download goes through.
    let mut site = Site::new().await;
    let ca_file = site.dir.path().join("origin-ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    site.config.fetch.ca_file = Some(ca_file);
    let cache = site.cache().await;
    cache
        .add_manifest(&sign(&manifest("tls", &[("fw.bin", &bytes, Some(&url))])))
        .await
        .unwrap();
    assert_eq!(cache.ensure(sha).await.unwrap().read_all().unwrap(), bytes);

    // A CA file that is not PEM is a clear error at open.
    let mut site = Site::new().await;
    let junk = site.dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    site.config.fetch.ca_file = Some(junk.clone());
    let error = FirmwareCache::open(site.store.clone(), site.config.clone())
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains(&junk.display().to_string()), "{error}");
}

#[tokio::test]
async fn a_silent_origin_times_out_and_the_next_attempt_resumes() {
    let origin = Origin::start().await;
    let mut site = Site::new().await;
    site.config.fetch.idle_timeout = Duration::from_millis(300);
    let (cache, bytes, sha) = named(&site, &origin, MIB, 13).await;
    // Goes silent after 256 KiB and never continues; the next request is served.
    origin.script([Behaviour::HoldAfter(256 * 1024)]);
    assert_eq!(cache.ensure(sha).await.unwrap().read_all().unwrap(), bytes);
    let seen = origin.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].0.as_deref(), Some("bytes=262144-"));
    let pending_error = site
        .store
        .call(|conn| {
            Ok(
                conn.query_row("SELECT count(*) FROM firmware_downloads", [], |r| {
                    r.get::<_, i64>(0)
                })?,
            )
        })
        .await
        .unwrap();
    assert_eq!(pending_error, 0);
}
