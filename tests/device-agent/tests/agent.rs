//! The C agent against bad input: credentials it must refuse, and a scripted device API
//! that sends malformed commands, oversized bodies and files that do not match what
//! was announced. Every case gets a clear reply or log line, the agent keeps serving,
//! and the sanitizers (ASan, UBSan, LeakSanitizer at exit) find nothing.
//!
//! The scripted API here is only for what the real gateway never sends; the agent's
//! normal life runs against the real `outpost` in the gateway's tests
//! (host/gateway/tests/outpost/device_agent.rs).

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use outpost_test_device_agent::{Agent, DEADLINE};

/// An ESP-IDF app image head: esp_image_header_t (magic 0xE9, chip id 5 = esp32c3), one
/// segment header, esp_app_desc_t (magic, secure_version, version, project), padded to
/// `size` bytes.
fn app_image(version: &str, secure_version: u32, size: usize) -> Vec<u8> {
    let mut image = vec![0u8; size.max(288)];
    image[0] = 0xE9;
    image[12..14].copy_from_slice(&5u16.to_le_bytes());
    let desc = &mut image[32..];
    desc[0..4].copy_from_slice(&0xABCD_5432u32.to_le_bytes());
    desc[4..8].copy_from_slice(&secure_version.to_le_bytes());
    desc[16..16 + version.len()].copy_from_slice(version.as_bytes());
    desc[48..48 + 13].copy_from_slice(b"outpost-light");
    image
}

/// One request the agent made.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    authorization: Option<String>,
    range: Option<String>,
    body: String,
}

/// A file the scripted API serves; `ranges` says whether it honours Range requests (a
/// server that does not answers 200 with the whole file).
struct File {
    path: &'static str,
    bytes: Vec<u8>,
    ranges: bool,
}

/// A device API that answers `next` from a script, everything else with 200, and
/// serves files by path.
struct ScriptedApi {
    addr: SocketAddr,
    requests: Receiver<Seen>,
    seen: Vec<Seen>,
}

impl ScriptedApi {
    /// Listens on loopback; `script(base URL)` gives the answers to `next`, in order.
    fn start(files: Vec<File>, script: impl FnOnce(&str) -> Vec<(u16, String)>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let script = script(&format!("http://{addr}"));
        let (tx, requests) = mpsc::channel();
        let script = Arc::new(Mutex::new(VecDeque::from(script)));
        let files = Arc::new(files);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let (tx, script, files) = (tx.clone(), Arc::clone(&script), Arc::clone(&files));
                std::thread::spawn(move || serve(stream, &tx, &script, &files));
            }
        });
        Self {
            addr,
            requests,
            seen: Vec::new(),
        }
    }

    fn credential(&self, dir: &Path) -> PathBuf {
        let path = dir.join("credential.json");
        std::fs::write(
            &path,
            serde_json::json!({"api": format!("http://{}", self.addr), "deviceId": "dev-1", "token": "device-token-1"})
                .to_string(),
        )
        .unwrap();
        path
    }

    /// Waits for a request `pred` accepts (one seen earlier counts).
    fn wait_for(&mut self, what: &str, pred: impl Fn(&Seen) -> bool) -> Seen {
        if let Some(found) = self.seen.iter().find(|s| pred(s)) {
            return found.clone();
        }
        let end = Instant::now() + DEADLINE;
        loop {
            match self
                .requests
                .recv_timeout(end.saturating_duration_since(Instant::now()))
            {
                Ok(seen) => {
                    self.seen.push(seen.clone());
                    if pred(&seen) {
                        return seen;
                    }
                }
                Err(_) => panic!("no {what}; saw {:#?}", self.seen),
            }
        }
    }

    /// Takes in every request made so far.
    fn drain(&mut self) {
        while let Ok(seen) = self.requests.try_recv() {
            self.seen.push(seen);
        }
    }

    /// The reply the agent sent to command `id`, as JSON.
    fn reply(&mut self, id: u64) -> serde_json::Value {
        let path = format!("/api/v1/devices/dev-1/commands/{id}/reply");
        let seen = self.wait_for(&format!("reply to {id}"), |s| s.path == path);
        serde_json::from_str(&seen.body).unwrap()
    }
}

fn serve(
    stream: TcpStream,
    tx: &Sender<Seen>,
    script: &Mutex<VecDeque<(u16, String)>>,
    files: &[File],
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut first = String::new();
    if reader.read_line(&mut first).unwrap_or(0) == 0 {
        return;
    }
    let mut length = 0usize;
    let mut authorization = None;
    let mut range = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap_or(0);
            } else if name.eq_ignore_ascii_case("authorization") {
                authorization = Some(value.trim().to_owned());
            } else if name.eq_ignore_ascii_case("range") {
                range = Some(value.trim().to_owned());
            }
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).unwrap();
    let mut parts = first.split_whitespace();
    let method = parts.next().unwrap_or("").to_owned();
    let path = parts.next().unwrap_or("").to_owned();
    let _ = tx.send(Seen {
        method,
        path: path.clone(),
        authorization,
        range: range.clone(),
        body: String::from_utf8_lossy(&body).into_owned(),
    });
    let mut content_range = String::new();
    let (status, answer): (u16, Vec<u8>) = if path.contains("/next?") {
        let next = script.lock().unwrap().pop_front();
        match next {
            Some((status, body)) => (status, body.into_bytes()),
            None => {
                // Nothing scripted: a long poll that ends empty.
                std::thread::sleep(Duration::from_millis(200));
                (204, Vec::new())
            }
        }
    } else if let Some(file) = files.iter().find(|f| f.path == path) {
        // bytes=FIRST-LAST, as the agent asks.
        let asked = range
            .as_deref()
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.split_once('-'))
            .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)));
        match asked {
            Some((first, last)) if file.ranges && first < file.bytes.len() => {
                let last = last.min(file.bytes.len() - 1);
                content_range = format!(
                    "Content-Range: bytes {first}-{last}/{}\r\n",
                    file.bytes.len()
                );
                (206, file.bytes[first..=last].to_vec())
            }
            _ => (200, file.bytes.clone()),
        }
    } else if path.starts_with("/firmware/") {
        (404, b"no such file".to_vec())
    } else {
        (200, b"{}".to_vec())
    };
    let reason = match status {
        200 => "OK",
        206 => "Partial Content",
        204 => "No Content",
        401 => "Unauthorized",
        _ => "Other",
    };
    let mut stream = stream;
    let _ = write!(
        stream,
        "HTTP/1.1 {status} {reason}\r\nContent-Length: {}\r\n{content_range}Content-Type: application/json\r\nConnection: close\r\n\r\n",
        answer.len()
    );
    let _ = stream.write_all(&answer);
}

fn command(id: u64, name: &str, payload: &str) -> (u16, String) {
    let encoded = base64::engine::general_purpose::STANDARD.encode(payload);
    (
        200,
        serde_json::json!({"id": id, "command": name, "payload": payload, "payloadBase64": encoded})
            .to_string(),
    )
}

fn agent_args(flash: &Path, image: &Path, credential: Option<&Path>) -> Vec<String> {
    let mut args = vec![
        "--flash".to_owned(),
        flash.to_str().unwrap().to_owned(),
        "--image".to_owned(),
        image.to_str().unwrap().to_owned(),
        "--model".to_owned(),
        "esp32-app".to_owned(),
        "--poll-wait".to_owned(),
        "1".to_owned(),
    ];
    if let Some(credential) = credential {
        args.push("--credential".to_owned());
        args.push(credential.to_str().unwrap().to_owned());
    }
    args
}

#[test]
fn a_bad_credential_is_refused_with_its_reason_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("first.bin");
    std::fs::write(&image, app_image("1.0.0", 0, 4096)).unwrap();
    let pem = "-----BEGIN CERTIFICATE-----\\nMIIB\\n-----END CERTIFICATE-----\\n";
    let cases: Vec<(String, &str)> = vec![
        ("not json".into(), "not a JSON object"),
        ("[1, 2]".into(), "not a JSON object"),
        (
            r#"{"api":"http://127.0.0.1:1","deviceId":"a","token":"t","x":[[[[[[1]]]]]]}"#.into(),
            "nested deeper than",
        ),
        (
            r#"{"api":"http://127.0.0.1:1","deviceId":"a"}"#.into(),
            "lacks api, deviceId or token",
        ),
        (
            r#"{"api":"ftp://127.0.0.1:1","deviceId":"a","token":"t"}"#.into(),
            "not an http(s) URL",
        ),
        (
            r#"{"api":"https://127.0.0.1:1","deviceId":"a","token":"t"}"#.into(),
            "an https api needs the caPem",
        ),
        (
            r#"{"api":"http://127.0.0.1:1","deviceId":"../admin","token":"t"}"#.into(),
            "starts with a dot",
        ),
        (
            r#"{"api":"http://127.0.0.1:1","deviceId":"a/b","token":"t"}"#.into(),
            "characters a URL path cannot carry",
        ),
        (
            r#"{"chunk":1,"of":2,"base64":"e30="}"#.into(),
            "a credential chunk out of order",
        ),
        (
            r#"{"api":"http://127.0.0.1:1","deviceId":"a","token":"t\r\nX-Evil: 1"}"#.into(),
            "characters a header cannot carry",
        ),
        (
            r#"{"api":"https://127.0.0.1:1","deviceId":"a","token":"t","caPem":"not a cert"}"#
                .into(),
            "not a PEM certificate",
        ),
        (
            format!(
                r#"{{"api":"http://127.0.0.1:1","deviceId":"{}","token":"t"}}"#,
                "a".repeat(80)
            ),
            "too long",
        ),
        (
            format!(
                r#"{{"api":"http://127.0.0.1:1","deviceId":"a","token":"t","caPem":"{pem}","pad":"{}"}}"#,
                "x".repeat(4000)
            ),
            "the credential is too large",
        ),
    ];
    for (i, (credential, needle)) in cases.iter().enumerate() {
        let file = dir.path().join(format!("credential-{i}.json"));
        std::fs::write(&file, credential).unwrap();
        let flash = dir.path().join(format!("flash-{i}"));
        let mut agent = Agent::start(
            &format!("bad-{i}"),
            &agent_args(&flash, &image, Some(&file)),
        );
        // The endpoint answers the gateway with the reason.
        let answer = agent.wait_for("endpoint", |_| true)["answer"].clone();
        assert_eq!(answer["status"], "error", "case {i}: {answer}");
        let status = agent.wait_exit();
        assert_eq!(status.code(), Some(1), "case {i}: {}", agent.stderr());
        assert!(
            agent.stderr().contains(needle),
            "case {i}: expected {needle:?} in:\n{}",
            agent.stderr()
        );
        // Nothing was stored: without a credential the agent says so and stops.
        let mut again = Agent::start(&format!("bad-{i}-again"), &agent_args(&flash, &image, None));
        assert_eq!(
            again.wait_exit().code(),
            Some(2),
            "case {i}: {}",
            again.stderr()
        );
    }
}

#[test]
fn malformed_commands_get_clear_replies_and_the_agent_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("first.bin");
    std::fs::write(&image, app_image("1.0.0", 3, 4096)).unwrap();
    let sha = "0".repeat(64);
    let begin = |url: &str, size: u64, sha256: &str| {
        serde_json::json!({"url": url, "size": size, "sha256": sha256, "version": "2.0.0"})
            .to_string()
    };
    // A server that ignores Range and sends more than was announced.
    let mut api = ScriptedApi::start(
        vec![File {
            path: "/firmware/longer",
            bytes: app_image("2.0.0", 3, 2000),
            ranges: false,
        }],
        |base| {
            vec![
                (200, "not json".into()),
                (200, r#"{"command":"ota-cancel","payloadBase64":""}"#.into()),
                (
                    200,
                    r#"{"id":3,"command":"ota-begin","payloadBase64":"%%%"}"#.into(),
                ),
                command(4, "reboot-now", ""),
                command(5, "ota-begin", &begin("ftp://127.0.0.1/x", 10, &sha)),
                command(
                    6,
                    "ota-begin",
                    &begin(&format!("{base}/firmware/x"), 10, "XYZ"),
                ),
                command(
                    7,
                    "ota-begin",
                    &begin(&format!("{base}/firmware/x"), 0, &sha),
                ),
                command(8, "ota-apply", "2.0.0"),
                command(
                    9,
                    "ota-begin",
                    &begin(&format!("{base}/firmware/longer"), 1000, &sha),
                ),
                (
                    200,
                    format!(
                        r#"{{"id":10,"command":"ota-cancel","payloadBase64":"","pad":"{}"}}"#,
                        "x".repeat(5000)
                    ),
                ),
                (
                    200,
                    r#"{"id":11,"command":"ota-cancel","payloadBase64":"","a":[[[[[1]]]]]}"#.into(),
                ),
                command(
                    12,
                    "ota-begin",
                    &begin(&format!("{base}/firmware/missing"), 1000, &sha),
                ),
                command(13, "ota-rollback", ""),
                command(
                    14,
                    "ota-begin",
                    &begin(&format!("{base}/firmware/{}", "a".repeat(600)), 10, &sha),
                ),
                (401, r#"{"error":"invalid device token"}"#.into()),
            ]
        },
    );
    let credential = api.credential(dir.path());
    let mut agent = Agent::start(
        "scripted",
        &agent_args(&dir.path().join("flash"), &image, Some(&credential)),
    );
    // Registration carries what the image says.
    let register = api.wait_for("register", |s| s.path.ends_with("/register"));
    assert_eq!(register.method, "POST");
    let body: serde_json::Value = serde_json::from_str(&register.body).unwrap();
    assert_eq!(body["firmwareVersion"], "1.0.0");
    assert_eq!(body["properties"]["secure_version"], "3");
    assert_eq!(body["properties"]["chip"], "esp32c3");

    let error = |reply: serde_json::Value| -> String {
        assert_eq!(reply["ok"], false, "{reply}");
        reply["error"].as_str().unwrap().to_owned()
    };
    assert_eq!(error(api.reply(3)), "payloadBase64 is not base64");
    assert_eq!(error(api.reply(4)), "unknown command reboot-now");
    assert!(error(api.reply(5)).contains("not an http(s) URL"));
    assert!(error(api.reply(6)).contains("sha256 is not 64 lowercase hex digits"));
    assert!(error(api.reply(7)).contains("size is missing or not a whole number"));
    assert_eq!(error(api.reply(8)), "nothing downloaded");
    // A file longer than announced: accepted, then refused at the first extra byte.
    assert_eq!(api.reply(9)["ok"], true);
    let failed = |api: &mut ScriptedApi, needle: &str| {
        let seen = api.wait_for(needle, |s| {
            s.path.ends_with("/reports") && s.body.contains("failed") && s.body.contains(needle)
        });
        serde_json::from_str::<serde_json::Value>(&seen.body).unwrap()
    };
    failed(&mut api, "longer than the 1000 bytes announced");
    // Ids 10 (a body over 3 KiB) and 11 (nested too deep) are dropped without a reply;
    // the agent goes on with 12.
    assert_eq!(api.reply(12)["ok"], true);
    failed(&mut api, "download: HTTP 404");
    assert_eq!(api.reply(13)["ok"], true);
    assert_eq!(api.reply(13)["payload"], "1.0.0");
    assert!(error(api.reply(14)).contains("url is missing, too long"));
    assert_eq!(agent.wait_exit().code(), Some(3), "{}", agent.stderr());
    api.drain();
    for id in [10, 11] {
        assert!(
            !api.seen
                .iter()
                .any(|s| s.path.ends_with(&format!("/commands/{id}/reply"))),
            "command {id} was answered"
        );
    }
    let stderr = agent.stderr();
    assert!(stderr.contains("command: not a JSON object"), "{stderr}");
    assert!(stderr.contains("a command without id"), "{stderr}");
    assert!(stderr.contains("larger than 3071 bytes"), "{stderr}");
    assert!(stderr.contains("nested deeper than 4 levels"), "{stderr}");
}

/// The JSON blocks of docs/device-agent.md marked `<!-- agent sends: NAME -->`.
fn documented(name: &str) -> serde_json::Value {
    let doc = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/device-agent.md"),
    )
    .unwrap();
    let marker = format!("<!-- agent sends: {name} -->");
    let after = doc
        .split_once(&marker)
        .unwrap_or_else(|| panic!("docs/device-agent.md has no {marker}"))
        .1;
    let block = after
        .split_once("```json\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .unwrap_or_else(|| panic!("no json block after {marker}"))
        .0;
    serde_json::from_str(block).unwrap_or_else(|err| panic!("{marker}: {err}"))
}

/// Whether `actual` has the documented shape: the same keys, recursively, and the same
/// kind of value at each; `kind` and `ok` must also be equal.
fn same_shape(doc: &serde_json::Value, actual: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (doc, actual) {
        (Value::Object(d), Value::Object(a)) => {
            d.len() == a.len()
                && d.iter().all(|(k, v)| {
                    a.get(k).is_some_and(|w| {
                        same_shape(v, w) && (!matches!(k.as_str(), "kind" | "ok") || v == w)
                    })
                })
        }
        (Value::String(_), Value::String(_))
        | (Value::Number(_), Value::Number(_))
        | (Value::Bool(_), Value::Bool(_))
        | (Value::Null, Value::Null) => true,
        (Value::Array(d), Value::Array(a)) => d.len() == a.len(),
        _ => false,
    }
}

#[test]
fn an_update_goes_as_documented_and_the_new_image_is_confirmed() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("first.bin");
    std::fs::write(&image, app_image("1.0.0", 1, 4096)).unwrap();
    let new = app_image("2.0.0", 1, 70_000);
    let sha = {
        // sha256 of the new image, by the agent's own check: computed here with the
        // system's sha256sum so the test does not trust the code under test.
        let file = dir.path().join("new.bin");
        std::fs::write(&file, &new).unwrap();
        let out = std::process::Command::new("sha256sum")
            .arg(&file)
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()[..64].to_owned()
    };
    let sha_for_script = sha.clone();
    let size = new.len() as u64;
    let file = File {
        path: "/firmware/new",
        bytes: new,
        ranges: true,
    };
    let mut api = ScriptedApi::start(vec![file], move |base| {
        vec![
            command(
                1,
                "ota-begin",
                &serde_json::json!({"url": format!("{base}/firmware/new"), "size": size,
                    "sha256": sha_for_script, "version": "2.0.0"})
                .to_string(),
            ),
            command(2, "ota-apply", "2.0.0"),
            // After the reboot: the image is confirmed; a rollback now boots 1.0.0 again.
            command(3, "ota-rollback", ""),
            (401, r#"{"error":"invalid device token"}"#.into()),
        ]
    });
    let credential = api.credential(dir.path());
    let mut args = agent_args(&dir.path().join("flash"), &image, Some(&credential));
    args.extend(["--segment-bytes".to_owned(), "16384".to_owned()]);
    let mut agent = Agent::start("happy", &args);
    let body = |seen: Seen| -> serde_json::Value { serde_json::from_str(&seen.body).unwrap() };
    let register = body(api.wait_for("register", |s| s.path.ends_with("/register")));
    assert_eq!(register["firmwareVersion"], "1.0.0");
    assert!(same_shape(&documented("register"), &register), "{register}");
    let ok = api.reply(1);
    assert!(same_shape(&documented("reply"), &ok), "{ok}");
    let progress = body(api.wait_for("progress 100", |s| {
        s.path.ends_with("/reports") && s.body.contains(r#""payload":"100""#)
    }));
    assert!(same_shape(&documented("report"), &progress), "{progress}");
    // Progress came in quarters between the segments, then 100 once the image was
    // checked.
    let reports: Vec<String> = api
        .seen
        .iter()
        .filter(|s| s.path.ends_with("/reports"))
        .map(|s| body(s.clone())["payload"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(reports, ["25", "50", "75", "100"]);
    assert_eq!(api.reply(2)["payload"], "2.0.0");
    // Rebooted into the new image, which registers, is confirmed and reports done.
    agent.wait_for("rebooting", |e| e["version"] == "2.0.0");
    let again = body(api.wait_for("register 2.0.0", |s| {
        s.path.ends_with("/register") && s.body.contains(r#""firmwareVersion":"2.0.0""#)
    }));
    assert_eq!(again["properties"]["secure_version"], "1");
    agent.wait_for("confirmed", |e| e["version"] == "2.0.0");
    let done = body(api.wait_for("done", |s| {
        s.path.ends_with("/reports") && s.body.contains(r#""kind":"done""#)
    }));
    assert_eq!(done["payload"], "2.0.0");
    // ota-rollback answers with the version it goes back to, and boots it.
    assert_eq!(api.reply(3)["payload"], "1.0.0");
    agent.wait_for("rolled_back", |e| e["version"] == "1.0.0");
    assert_eq!(agent.wait_exit().code(), Some(3), "{}", agent.stderr());
    api.drain();
    let after = api
        .seen
        .iter()
        .rfind(|s| s.path.ends_with("/register"))
        .map(|s| body(s.clone()))
        .unwrap();
    assert_eq!(after["firmwareVersion"], "1.0.0");
    // The download was five aligned segments of 16 KiB, each asked only of this file
    // (If-Range), and every API call carried the device token, the downloads none.
    for s in &api.seen {
        eprintln!("{} {} {}", s.method, s.path, s.body);
        if s.path.starts_with("/api/") {
            assert_eq!(
                s.authorization.as_deref(),
                Some("Bearer device-token-1"),
                "{s:?}"
            );
        } else {
            assert_eq!(s.authorization, None, "the token went to {}", s.path);
        }
    }
    let ranges: Vec<&str> = api
        .seen
        .iter()
        .filter(|s| s.path == "/firmware/new")
        .filter_map(|s| s.range.as_deref())
        .collect();
    assert_eq!(
        ranges,
        [
            "bytes=0-16383",
            "bytes=16384-32767",
            "bytes=32768-49151",
            "bytes=49152-65535",
            "bytes=65536-69999"
        ]
    );
}
