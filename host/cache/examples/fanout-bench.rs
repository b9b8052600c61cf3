//! Fan-out benchmark: the firmware server against nginx (sendfile) on this machine, and
//! the single-flight count for many simultaneous cold requests.
//!
//! Run with `cargo xtask bench-cache` (installs nginx and wrk when missing), or directly:
//! `cargo run --release -p outpost-cache --example fanout-bench -- [--duration 10] [--rounds 2] [--cold 1000]`
//!
//! 1. One 4 MiB artifact, 64 connections, `wrk -t2 -c64 -d10s`, against nginx (started
//!    here on loopback with `sendfile on; tcp_nopush on; access_log off`) and against the
//!    Outpost server, in alternating rounds; the blob served from memory, then from its
//!    file in positioned reads. Prints req/s, GiB/s and the ratio to nginx.
//! 2. `--cold N` simultaneous requests for an artifact not yet cached, named by a signed
//!    manifest whose origin is a counting HTTP server here; prints upstream bytes / size.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use outpost_cache::manifest::{self, ManifestFile, Step, TrustedSigner, UpdateId, UpdateManifest};
use outpost_cache::server::{self, ServerConfig};
use outpost_cache::{CacheConfig, FetchConfig, FirmwareCache, Sha256};
use outpost_store::Store;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

type Error = Box<dyn std::error::Error + Send + Sync>;

struct Args {
    duration: u64,
    rounds: usize,
    cold: usize,
    size: usize,
}

fn args() -> Result<Args, Error> {
    let mut args = Args {
        duration: 10,
        rounds: 2,
        cold: 1000,
        size: 4 << 20,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--duration" => args.duration = value.parse()?,
            "--rounds" => args.rounds = value.parse()?,
            "--cold" => args.cold = value.parse()?,
            "--size-mib" => args.size = value.parse::<usize>()? << 20,
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    Ok(args)
}

fn main() -> Result<(), Error> {
    let args = args()?;
    for tool in ["nginx", "wrk"] {
        if which(tool).is_none() {
            return Err(format!(
                "{tool} is not installed; `cargo xtask bench-cache` installs nginx and wrk (Debian packages)"
            )
            .into());
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|dir| Path::new(dir).join(tool))
        .find(|path| path.is_file())
}

fn random_bytes(len: usize) -> Result<Bytes, Error> {
    let mut data = vec![0u8; len];
    getrandom::fill(&mut data).map_err(|e| e.to_string())?;
    Ok(Bytes::from(data))
}

struct Nginx {
    pid_file: PathBuf,
}

impl Nginx {
    fn start(prefix: &Path, www: &Path, port: u16) -> Result<Self, Error> {
        for dir in ["logs", "tmp"] {
            std::fs::create_dir_all(prefix.join(dir))?;
        }
        let pid_file = prefix.join("nginx.pid");
        let p = prefix.display();
        let conf = format!(
            "worker_processes auto;\npid {pid};\nerror_log {p}/logs/error.log;\ndaemon on;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  sendfile on;\n  tcp_nopush on;\n  access_log off;\n  keepalive_requests 100000;\n\
               client_body_temp_path {p}/tmp/body;\n  proxy_temp_path {p}/tmp/proxy;\n\
               fastcgi_temp_path {p}/tmp/fastcgi;\n  uwsgi_temp_path {p}/tmp/uwsgi;\n  scgi_temp_path {p}/tmp/scgi;\n\
               server {{ listen 127.0.0.1:{port}; root {www}; }}\n}}\n",
            pid = pid_file.display(),
            www = www.display(),
        );
        let conf_path = prefix.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let status = Command::new(which("nginx").ok_or("nginx")?)
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(prefix)
            .status()?;
        if !status.success() {
            return Err(format!("nginx failed to start ({status}); see {p}/logs/error.log").into());
        }
        Ok(Self { pid_file })
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(&self.pid_file) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
    }
}

#[derive(Clone, Copy)]
struct WrkResult {
    requests_per_sec: f64,
    gib_per_sec: f64,
}

fn wrk(url: &str, duration: u64) -> Result<WrkResult, Error> {
    // wrk's default 2 s request timeout is shorter than a 4 MiB response can take with 64
    // connections on two busy cores (the tail reached 1.7 s); a timeout there is wrk's own
    // bookkeeping, not a server error, so allow 30 s and still fail on any error left.
    let output = Command::new("wrk")
        .args([
            "-t2",
            "-c64",
            "--timeout",
            "30s",
            &format!("-d{duration}s"),
            url,
        ])
        .stderr(Stdio::inherit())
        .output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    if text.contains("Non-2xx") || text.contains("Socket errors") {
        return Err(format!("wrk saw errors against {url}:\n{text}").into());
    }
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.trim().strip_prefix(name).map(|v| v.trim().to_owned()))
            .ok_or_else(|| format!("wrk printed no {name:?}:\n{text}"))
    };
    let requests_per_sec: f64 = field("Requests/sec:")?.parse()?;
    let transfer = field("Transfer/sec:")?;
    let (number, unit) = transfer.split_at(
        transfer
            .find(|c: char| c.is_ascii_alphabetic())
            .unwrap_or(0),
    );
    let scale = match unit {
        "GB" => 1.0,
        "MB" => 1.0 / 1024.0,
        "KB" => 1.0 / (1024.0 * 1024.0),
        _ => 0.0,
    };
    Ok(WrkResult {
        requests_per_sec,
        gib_per_sec: number.parse::<f64>()? * scale,
    })
}

/// A cache in `dir` served on a free loopback port.
async fn serve_cache(
    dir: &Path,
    memory_bytes: u64,
    trusted_signers: Vec<TrustedSigner>,
    max_connections: usize,
) -> Result<(FirmwareCache, SocketAddr), Error> {
    std::fs::create_dir_all(dir)?;
    let store = Store::open(dir.join("outpost.db")).await?;
    let config = CacheConfig {
        root: dir.join("firmware"),
        max_bytes: 1 << 30,
        memory_bytes,
        trusted_signers,
        adu_roots: Vec::new(),
        fetch: FetchConfig::default(),
    };
    let cache = FirmwareCache::open(store, config).await?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    // wrk is one host that stands for many devices: one client may take every slot.
    let config = ServerConfig {
        limits: outpost_serve::Limits {
            max_connections,
            max_connections_per_client: max_connections,
            ..ServerConfig::default().limits
        },
        ..ServerConfig::default()
    };
    tokio::spawn(server::serve(
        cache.clone(),
        listener,
        config,
        CancellationToken::new(),
    ));
    Ok((cache, addr))
}

/// A served cache holding `file`.
async fn start_outpost(
    dir: &Path,
    file: &Path,
    memory_bytes: u64,
) -> Result<(SocketAddr, Sha256), Error> {
    let (cache, addr) = serve_cache(
        dir,
        memory_bytes,
        Vec::new(),
        ServerConfig::default().limits.max_connections,
    )
    .await?;
    Ok((addr, cache.import(file).await?.sha256))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

async fn run(args: Args) -> Result<(), Error> {
    let scratch = tempfile::Builder::new()
        .prefix("outpost-bench-")
        .tempdir_in("/tmp")?;
    // nginx's workers run as an unprivileged user: the files must be world-readable.
    std::fs::set_permissions(
        scratch.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let www = scratch.path().join("www");
    std::fs::create_dir_all(&www)?;
    let bytes = random_bytes(args.size)?;
    let file = www.join("fw.bin");
    std::fs::write(&file, &bytes)?;

    let nginx_port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
        probe.local_addr()?.port()
    };
    let _nginx = Nginx::start(&scratch.path().join("nginx"), &www, nginx_port)?;
    let (memory_addr, sha) = start_outpost(&scratch.path().join("memory"), &file, 1 << 30).await?;
    let (file_addr, _) = start_outpost(&scratch.path().join("file"), &file, 0).await?;

    let targets = [
        (
            "nginx 1.22 (sendfile)",
            format!("http://127.0.0.1:{nginx_port}/fw.bin"),
        ),
        (
            "outpost (blob in memory)",
            format!("http://{memory_addr}/firmware/{sha}"),
        ),
        (
            "outpost (blob from file)",
            format!("http://{file_addr}/firmware/{sha}"),
        ),
    ];
    // Check each serves the right bytes before timing it.
    for (name, url) in &targets {
        let got = fetch_once(url).await?;
        if got != bytes {
            return Err(format!("{name} served the wrong bytes").into());
        }
    }
    println!(
        "fan-out: {} MiB artifact, wrk -t2 -c64 -d{}s, {} round(s), median of rounds",
        args.size >> 20,
        args.duration,
        args.rounds
    );
    let mut results: Vec<Vec<WrkResult>> = vec![Vec::new(); targets.len()];
    for round in 0..args.rounds {
        for (index, (name, url)) in targets.iter().enumerate() {
            let url = url.clone();
            let duration = args.duration;
            let result = tokio::task::spawn_blocking(move || wrk(&url, duration)).await??;
            println!(
                "  round {}: {name:<26} {:>8.1} req/s {:>6.2} GiB/s",
                round + 1,
                result.requests_per_sec,
                result.gib_per_sec
            );
            results[index].push(result);
        }
    }
    let summary: Vec<(f64, f64)> = results
        .iter()
        .map(|runs| {
            let mut rps: Vec<f64> = runs.iter().map(|r| r.requests_per_sec).collect();
            let mut gib: Vec<f64> = runs.iter().map(|r| r.gib_per_sec).collect();
            (median(&mut rps), median(&mut gib))
        })
        .collect();
    let nginx_rps = summary[0].0;
    println!();
    println!(
        "  {:<26} {:>10} {:>8} {:>14}",
        "server", "req/s", "GiB/s", "ratio to nginx"
    );
    for ((name, _), (rps, gib)) in targets.iter().zip(&summary) {
        println!(
            "  {name:<26} {rps:>10.1} {gib:>8.2} {:>13.2}x",
            rps / nginx_rps
        );
    }

    if args.cold > 0 {
        cold(&args, scratch.path()).await?;
    }
    println!();
    println!(
        "rerun: cargo xtask bench-cache   (or cargo run --release -p outpost-cache --example fanout-bench)"
    );
    Ok(())
}

async fn fetch_once(url: &str) -> Result<Bytes, Error> {
    let uri: hyper::Uri = url.parse()?;
    let addr = format!(
        "{}:{}",
        uri.host().ok_or("host")?,
        uri.port_u16().unwrap_or(80)
    );
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = hyper::Request::get(uri.path())
        .header("host", "bench")
        .body(Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await?;
    if !response.status().is_success() {
        return Err(format!("{url}: {}", response.status()).into());
    }
    Ok(response.into_body().collect().await?.to_bytes())
}

/// N simultaneous cold requests through the server; counts what the origin sent.
async fn cold(args: &Args, scratch: &Path) -> Result<(), Error> {
    let bytes = random_bytes(args.size)?;
    let sent = Arc::new(AtomicU64::new(0));
    let origin = TcpListener::bind("127.0.0.1:0").await?;
    let origin_addr = origin.local_addr()?;
    {
        let (bytes, sent) = (bytes.clone(), sent.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = origin.accept().await {
                let (bytes, sent) = (bytes.clone(), sent.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |_request| {
                        sent.fetch_add(bytes.len() as u64, Ordering::SeqCst);
                        let body = Full::new(bytes.clone());
                        async move { Ok::<_, Infallible>(hyper::Response::new(body)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    }
    let key = ed25519_dalek::SigningKey::from_bytes(&[1u8; 32]);
    let sha = Sha256::digest(&bytes);
    let manifest = UpdateManifest {
        manifest_version: 1,
        update_id: UpdateId {
            provider: "Bench".into(),
            name: "cold".into(),
            version: "1".into(),
        },
        compatibility: vec![[("model".to_owned(), "bench".to_owned())].into()],
        steps: vec![Step {
            handler: "bench".into(),
            files: vec!["fw".into()],
            handler_properties: serde_json::Map::new(),
        }],
        files: vec![ManifestFile {
            id: "fw".into(),
            file_name: "fw.bin".into(),
            size_in_bytes: bytes.len() as u64,
            sha256: sha,
            url: Some(format!("http://{origin_addr}/fw.bin")),
        }],
        created_date_time: None,
    };
    let signer = TrustedSigner {
        name: "bench".into(),
        key: key.verifying_key(),
    };
    let (cache, addr) = serve_cache(
        &scratch.join("cold"),
        64 << 20,
        vec![signer],
        args.cold + 16,
    )
    .await?;
    cache
        .add_manifest(&manifest::sign(&manifest, &key, "bench")?)
        .await?;
    let url = format!("http://{addr}/firmware/{sha}");
    let started = Instant::now();
    let tasks: Vec<_> = (0..args.cold)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { fetch_once(&url).await })
        })
        .collect();
    let mut ok = 0;
    for task in tasks {
        if task.await?? == bytes {
            ok += 1;
        }
    }
    let elapsed = started.elapsed();
    let upstream = sent.load(Ordering::SeqCst);
    println!();
    println!(
        "cold fan-out: {} simultaneous requests for one uncached {} MiB artifact",
        args.cold,
        args.size >> 20
    );
    println!(
        "  {ok}/{} got the verified bytes in {:.2} s; upstream sent {upstream} bytes = {:.2} x the artifact size",
        args.cold,
        elapsed.as_secs_f64(),
        upstream as f64 / bytes.len() as f64
    );
    Ok(())
}
