//! The firmware cache as an operator meets it: the `outpost firmware` CLI, the daemon's
//! fan-out server, a download killed with SIGKILL and resumed, and a full disk.

use std::sync::{Arc, Mutex};

use super::*;

const MIB: usize = 1024 * 1024;

fn artifact(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 11) as u8)
        .collect()
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// A request's `Range` and `If-Range` headers.
type Conditions = (Option<String>, Option<String>);

/// The origin's strong validator for the file.
const ORIGIN_ETAG: &str = "\"origin-v1\"";

/// A blocking HTTP/1.1 origin on loopback, with a strong ETag. The first request gets
/// its first `hold_at` bytes and then nothing more until the test ends; later ones are
/// served properly, honouring `Range: bytes=N-`.
struct Origin {
    addr: SocketAddr,
    /// Each request's `Range` and `If-Range`.
    ranges: Arc<Mutex<Vec<Conditions>>>,
    _release: mpsc::Sender<()>,
}

impl Origin {
    fn start(bytes: Vec<u8>, hold_at: usize) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let ranges = Arc::new(Mutex::new(Vec::new()));
        let (release, held) = mpsc::channel::<()>();
        let seen = ranges.clone();
        std::thread::spawn(move || {
            let mut held = Some(held);
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let (mut range, mut if_range) = (None, None);
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    let lower = line.to_ascii_lowercase();
                    if let Some(value) = lower.strip_prefix("range: ") {
                        range = Some(value.trim().to_owned());
                    }
                    if lower.starts_with("if-range: ") {
                        if_range = Some(line["if-range: ".len()..].trim().to_owned());
                    }
                }
                seen.lock().unwrap().push((range.clone(), if_range));
                let start: usize = range
                    .as_deref()
                    .and_then(|r| r.strip_prefix("bytes="))
                    .and_then(|r| r.strip_suffix('-'))
                    .map_or(0, |n| n.parse().unwrap());
                let head = if start > 0 {
                    format!(
                        "HTTP/1.1 206 Partial Content\r\nETag: {ORIGIN_ETAG}\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{}\r\nConnection: close\r\n\r\n",
                        bytes.len() - start,
                        bytes.len() - 1,
                        bytes.len()
                    )
                } else {
                    format!(
                        "HTTP/1.1 200 OK\r\nETag: {ORIGIN_ETAG}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        bytes.len()
                    )
                };
                let _ = stream.write_all(head.as_bytes());
                if let Some(held) = held.take() {
                    let bytes = bytes.clone();
                    std::thread::spawn(move || {
                        let _ = stream.write_all(&bytes[..hold_at]);
                        let _ = stream.flush();
                        // Hold the connection open, silent, until the test is over.
                        let _ = held.recv();
                    });
                    continue;
                }
                let _ = stream.write_all(&bytes[start..]);
            }
        });
        Self {
            addr,
            ranges,
            _release: release,
        }
    }
}

/// A signed download link to `sha` from the running gateway (`outpost firmware link`),
/// as a path and query.
pub(crate) fn link(site: &Site, sha: &str) -> String {
    let url = stdout_of(&site.command(&["firmware", "link", sha, "--device", "esp-1"]));
    let url = url.trim();
    let path = url.find("/firmware/").map(|at| &url[at..]);
    path.unwrap_or_else(|| panic!("not a link: {url}"))
        .to_owned()
}

/// A raw GET; returns the status, the head and the body bytes.
pub(crate) fn fetch(addr: SocketAddr, path: &str, extra: &str) -> (u16, String, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("no header end");
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head, response[split + 4..].to_vec())
}

impl Gateway {
    /// Waits for the firmware server and the API; returns (API, firmware) addresses.
    pub(crate) fn ready_with_firmware(&mut self) -> (SocketAddr, SocketAddr) {
        let line = self.wait_for_line("firmware server line", |json, _| {
            json["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("firmware server listening"))
        });
        let json: serde_json::Value = serde_json::from_str(&line).unwrap();
        let firmware = json["addr"].as_str().unwrap().parse().unwrap();
        (self.ready(), firmware)
    }
}

/// A site that trusts a fleet key; returns the site and the key file.
fn fleet_site() -> (Site, PathBuf) {
    let site = Site::new("");
    let key = site.dir.path().join("fleet.key");
    let keygen = stdout_of(&site.command(&["handler", "keygen", "--out", key.to_str().unwrap()]));
    let public_key = keygen
        .lines()
        .find_map(|l| l.strip_prefix("Public key: "))
        .unwrap()
        .trim()
        .to_owned();
    site.write_config(&format!(
        "[gateway]\nid = \"gw-test\"\nstate_dir = \"state\"\n\n[cache]\nbind = \"127.0.0.1:0\"\n\n\
         [[cache.trusted_signers]]\nname = \"fleet\"\npublic_key = \"{public_key}\"\n\n[api]\nbind = \"127.0.0.1:0\"\n"
    ));
    (site, key)
}

/// Writes a manifest naming `bytes` at `url` and signs it with the CLI.
fn signed_manifest(site: &Site, key: &Path, bytes: &[u8], url: &str) -> PathBuf {
    let manifest = serde_json::json!({
        "manifestVersion": 1,
        "updateId": {"provider": "Acme", "name": "thermostat", "version": "2.0.0"},
        "compatibility": [{"manufacturer": "Acme", "model": "T1"}],
        "steps": [{"handler": "acme-esp32", "files": ["app"]}],
        "files": [{"id": "app", "fileName": "thermostat-2.0.0.bin", "sizeInBytes": bytes.len(),
                   "sha256": sha256_hex(bytes), "url": url}],
    });
    let json = site.dir.path().join("manifest.json");
    std::fs::write(&json, manifest.to_string()).unwrap();
    let jws = site.dir.path().join("manifest.jws");
    stdout_of(&site.command(&[
        "firmware",
        "manifest",
        "sign",
        json.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--kid",
        "fleet",
        "--out",
        jws.to_str().unwrap(),
    ]));
    jws
}

#[test]
fn a_download_killed_midway_resumes_after_restart_and_is_served_whole() {
    let bytes = artifact(3 * MIB, 1);
    let sha = sha256_hex(&bytes);
    let hold_at = MIB + 4321;
    let origin = Origin::start(bytes.clone(), hold_at);
    let (site, key) = fleet_site();
    let jws = signed_manifest(
        &site,
        &key,
        &bytes,
        &format!("http://{}/fw.bin", origin.addr),
    );

    let mut gateway = site.run();
    let (_, firmware) = gateway.ready_with_firmware();
    let accepted =
        stdout_of(&site.command(&["firmware", "manifest", "add", jws.to_str().unwrap()]));
    assert!(
        accepted.contains("Accepted Acme/thermostat/2.0.0 signed by fleet"),
        "{accepted}"
    );
    // The origin stalls after hold_at bytes; the gateway has written every byte it got.
    let partial = site
        .state()
        .join("firmware/partial")
        .join(format!("{sha}.part"));
    let end = Instant::now() + DEADLINE;
    while std::fs::metadata(&partial).map_or(0, |m| m.len()) != hold_at as u64 {
        assert!(
            Instant::now() < end,
            "the partial download never reached {hold_at} bytes"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let listed = stdout_of(&site.command(&["firmware", "list", "--json"]));
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(
        listed["blobs"].as_array().unwrap().len(),
        0,
        "nothing is cached before it is verified"
    );
    assert_eq!(listed["downloads"][0]["have"], hold_at);

    gateway.signal(libc::SIGKILL);
    let (status, _, _) = gateway.wait();
    assert!(!status.success());
    assert!(
        std::fs::read_dir(site.state().join("firmware/blobs"))
            .unwrap()
            .next()
            .is_none()
    );
    assert_eq!(std::fs::metadata(&partial).unwrap().len(), hold_at as u64);

    // Restarted, the gateway resumes from the partial file by itself.
    let mut gateway = site.run();
    let (_, firmware_after) = gateway.ready_with_firmware();
    let (status, head, body) = fetch(firmware_after, &link(&site, &sha), "");
    assert_eq!(status, 200, "{head}");
    assert_eq!(sha256_hex(&body), sha);
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("etag: \"{sha}\"")),
        "{head}"
    );
    // The resume asked for the rest, on condition that the file is still the one the
    // first response's ETag named: that validator was saved before the kill.
    let ranges = origin.ranges.lock().unwrap().clone();
    assert_eq!(
        ranges,
        vec![
            (None, None),
            (
                Some(format!("bytes={hold_at}-")),
                Some(ORIGIN_ETAG.to_owned())
            )
        ]
    );
    assert!(!partial.exists());
    // A resumed device asks for the rest and gets exactly that.
    let (status, head, body) = fetch(
        firmware_after,
        &link(&site, &sha),
        "Range: bytes=2000000-\r\n",
    );
    assert_eq!(status, 206, "{head}");
    assert_eq!(body, &bytes[2_000_000..]);
    let _ = firmware;
    gateway.stop_cleanly(libc::SIGTERM, &site);
}

#[test]
fn operator_import_list_remove_and_a_refused_manifest() {
    let (site, key) = fleet_site();
    std::fs::create_dir_all(site.state()).unwrap();
    let file = site.dir.path().join("vendor-1.2.bin");
    let bytes = artifact(200_000, 2);
    std::fs::write(&file, &bytes).unwrap();
    let sha = sha256_hex(&bytes);
    // Offline: straight into the state directory.
    let imported = stdout_of(&site.command(&["firmware", "import", file.to_str().unwrap()]));
    assert!(imported.contains(&sha), "{imported}");

    let mut gateway = site.run();
    let (_, firmware) = gateway.ready_with_firmware();
    let (status, _, body) = fetch(firmware, &link(&site, &sha), "Range: bytes=-100\r\n");
    assert_eq!(
        (status, body.as_slice()),
        (206, &bytes[bytes.len() - 100..])
    );
    // Online: uploaded through the running gateway's API, then served at once.
    let second = site.dir.path().join("vendor-1.3.bin");
    let second_bytes = artifact(300_000, 5);
    std::fs::write(&second, &second_bytes).unwrap();
    let uploaded = stdout_of(&site.command(&["firmware", "import", second.to_str().unwrap()]));
    assert!(uploaded.contains("into the running gateway"), "{uploaded}");
    let (status, _, body) = fetch(firmware, &link(&site, &sha256_hex(&second_bytes)), "");
    assert_eq!((status, body), (200, second_bytes));
    assert!(
        std::fs::read_dir(site.state().join("firmware/tmp"))
            .unwrap()
            .next()
            .is_none()
    );
    let listed = stdout_of(&site.command(&["firmware", "list"]));
    assert!(
        listed.contains(&sha) && listed.contains("import") && listed.contains("vendor-1.2.bin"),
        "{listed}"
    );
    assert!(
        listed.starts_with("2 file(s)") && listed.contains("vendor-1.3.bin"),
        "{listed}"
    );

    // A manifest signed by an unknown key is refused through the running gateway.
    let stranger = site.dir.path().join("stranger.key");
    stdout_of(&site.command(&["handler", "keygen", "--out", stranger.to_str().unwrap()]));
    let forged = signed_manifest(&site, &stranger, &bytes, "http://127.0.0.1:9/x.bin");
    let refused = site.command(&["firmware", "manifest", "add", forged.to_str().unwrap()]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("signature does not verify with \"fleet\"'s key"),
        "{stderr}"
    );
    let _ = key;

    // Pinned, it cannot be removed; the error names who holds it.
    let pinned = stdout_of(&site.command(&["firmware", "pin", &sha, "--holder", "deployment:7"]));
    assert!(pinned.contains("Pinned"), "{pinned}");
    let refused = site.command(&["firmware", "remove", &sha]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("pinned by [\"deployment:7\"]"), "{stderr}");
    stdout_of(&site.command(&["firmware", "unpin", &sha, "--holder", "deployment:7"]));
    let removed = stdout_of(&site.command(&["firmware", "remove", &sha]));
    assert!(removed.contains("Removed"), "{removed}");
    let (status, _, _) = fetch(firmware, &link(&site, &sha), "");
    assert_eq!(status, 404);
    let bad = site.command(&["firmware", "remove", "../../outpost.db"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a sha256 digest"));
    gateway.stop_cleanly(libc::SIGTERM, &site);
}

/// A real full disk: the firmware folder on a 3 MiB tmpfs in a private mount namespace
/// (root and `unshare` required; the test fails, never skips, without them).
#[test]
fn a_full_disk_fails_an_import_cleanly_and_loses_nothing() {
    let (site, _) = fleet_site();
    let firmware = site.state().join("firmware");
    std::fs::create_dir_all(&firmware).unwrap();
    let small = site.dir.path().join("small.bin");
    let big = site.dir.path().join("big.bin");
    std::fs::write(&small, artifact(MIB, 3)).unwrap();
    std::fs::write(&big, artifact(4 * MIB, 4)).unwrap();
    let outpost = env!("CARGO_BIN_EXE_outpost");
    let config = site.config();
    let script = format!(
        "set -e; mount -t tmpfs -o size=3m outpost-test {fw}; \
         {outpost} --config {config} firmware import {small}; \
         if {outpost} --config {config} firmware import {big} 2>{err}; then echo IMPORTED-BIG; fi; \
         {outpost} --config {config} firmware list --json > {list}; \
         ls -A {fw}/tmp {fw}/blobs > {files}; \
         sha256sum {fw}/blobs/* > {sums}",
        fw = firmware.display(),
        config = config.display(),
        small = small.display(),
        big = big.display(),
        err = site.dir.path().join("err").display(),
        list = site.dir.path().join("list.json").display(),
        files = site.dir.path().join("files").display(),
        sums = site.dir.path().join("sums").display(),
    );
    let output = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .expect("unshare (util-linux) is needed for the full-disk test");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the full-disk scenario could not run (it needs root for a tmpfs mount): {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        !stdout.contains("IMPORTED-BIG"),
        "a 4 MiB import fitted on a 3 MiB disk?"
    );
    let err = std::fs::read_to_string(site.dir.path().join("err")).unwrap();
    assert!(
        err.contains("big.bin was not imported") && err.contains("No space left on device"),
        "{err}"
    );
    let list: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(site.dir.path().join("list.json")).unwrap())
            .unwrap();
    let blobs = list["blobs"].as_array().unwrap();
    let small_sha = sha256_hex(&artifact(MIB, 3));
    assert_eq!(blobs.len(), 1);
    assert_eq!(blobs[0]["sha256"], small_sha.as_str());
    // The temporary copy is gone and the blob already there is intact.
    let files = std::fs::read_to_string(site.dir.path().join("files")).unwrap();
    assert_eq!(
        files
            .lines()
            .filter(|l| !l.is_empty() && !l.ends_with(':'))
            .collect::<Vec<_>>(),
        vec![small_sha.as_str()]
    );
    let sums = std::fs::read_to_string(site.dir.path().join("sums")).unwrap();
    assert!(sums.starts_with(&small_sha), "{sums}");
}
