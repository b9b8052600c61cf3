//! The local dashboard in headless Chromium (Debian's `chromium` and `chromium-driver`),
//! driven over the W3C WebDriver protocol: the page loads with the admin token, shows
//! the devices and a rollout, and pauses and resumes it.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::rollouts::{FleetSite, Release, onboard_fleet};
use super::uplink::free_port;
use super::{DEADLINE, Gateway, http_get, stdout_of};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// WebDriver's key for an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// One WebDriver request. chromedriver may keep the socket open after its answer, so
/// the body is read by its Content-Length, not to the end of the stream.
fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader
        .read_line(&mut status_line)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap();
        }
    }
    let mut bytes = vec![0u8; length];
    reader.read_exact(&mut bytes).unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

/// chromedriver on a free loopback port with one headless Chromium session.
pub(crate) struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    pub(crate) fn start() -> Self {
        for tool in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(tool).exists(),
                "{tool} is missing: apt-get install chromium chromium-driver (.ci/run does)"
            );
        }
        let port = free_port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let end = Instant::now() + DEADLINE;
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < end,
                "chromedriver did not listen on {addr}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let profile = tempfile::tempdir().unwrap();
        let capabilities = serde_json::json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
        }}});
        let (status, answer) = http(addr, "POST", "/session", &capabilities.to_string());
        assert_eq!(status, 200, "no browser session: {answer}");
        let session = answer["value"]["sessionId"].as_str().unwrap().to_owned();
        Self {
            driver,
            addr,
            session,
            _profile: profile,
        }
    }

    fn command(&self, method: &str, path: &str, body: &serde_json::Value) -> serde_json::Value {
        let (status, answer) = http(
            self.addr,
            method,
            &format!("/session/{}{path}", self.session),
            &body.to_string(),
        );
        assert_eq!(status, 200, "{method} {path}: {answer}");
        answer["value"].clone()
    }

    pub(crate) fn open(&self, url: &str) {
        self.command("POST", "/url", &serde_json::json!({ "url": url }));
    }

    /// Runs `script` in the page and returns its value.
    pub(crate) fn eval(&self, script: &str) -> serde_json::Value {
        self.command(
            "POST",
            "/execute/sync",
            &serde_json::json!({ "script": script, "args": [] }),
        )
    }

    /// Polls `script` until its value satisfies `pred`.
    pub(crate) fn wait_for(
        &self,
        what: &str,
        script: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let end = Instant::now() + DEADLINE;
        loop {
            let value = self.eval(script);
            if pred(&value) {
                return value;
            }
            assert!(
                Instant::now() < end,
                "the page never showed {what}: {value}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Clicks the element `css` selects, as a user would.
    pub(crate) fn click(&self, css: &str) {
        let found = self.command(
            "POST",
            "/element",
            &serde_json::json!({ "using": "css selector", "value": css }),
        );
        let element = found[ELEMENT].as_str().unwrap().to_owned();
        self.command(
            "POST",
            &format!("/element/{element}/click"),
            &serde_json::json!({}),
        );
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = http(
            self.addr,
            "DELETE",
            &format!("/session/{}", self.session),
            "",
        );
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

#[test]
fn the_dashboard_shows_devices_and_pauses_and_resumes_a_rollout_in_chromium() {
    let fleet = FleetSite::new("");
    let mut gateway = Gateway::spawn(&fleet.site.config(), &[]);
    let addr = gateway.ready();
    let admin = fleet.site.admin_token();
    fleet.install_handlers();
    let (_lights, _sensors) = onboard_fleet(&fleet, 3, 2, &[]);
    let release = Release::new();
    for (name, bytes) in [("a.bin", &release.app), ("b.ota", &release.zigbee)] {
        let path = fleet.site.dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        stdout_of(
            &fleet
                .site
                .command(&["firmware", "import", path.to_str().unwrap()]),
        );
    }
    let jws = fleet.sign(&release.manifest(None));
    // Scheduled for later, so it stands still while the page steers it.
    let created = fleet.site.command(&[
        "rollout",
        "create",
        "--manifest",
        jws.to_str().unwrap(),
        "--id",
        "evening",
        "--start-at",
        "2099-01-01T00:00:00Z",
    ]);
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );

    let browser = Browser::start();
    // Without the token the page asks for it and shows nothing else.
    browser.open(&format!("http://{addr}/dashboard"));
    browser.wait_for(
        "the token form",
        "return document.getElementById('login').hidden",
        |v| v == false,
    );
    // With it (in the fragment, which never reaches the server) the page loads.
    browser.open(&format!("http://{addr}/dashboard#token={admin}"));
    browser.wait_for(
        "its data",
        "return document.body.dataset.loaded || document.getElementById('error').textContent || null",
        |v| v == "true",
    );
    assert_eq!(
        browser.eval("return location.hash"),
        "",
        "the token is not left in the URL"
    );
    let (_, lobby) = http_get(addr, "/api/v1/devices", Some(&admin));
    let mut expected: Vec<String> = lobby["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_owned())
        .collect();
    expected.sort();
    let shown = browser.eval(
        "return [...document.querySelectorAll('#devices tbody tr')].map(r => r.dataset.deviceId).sort()",
    );
    assert_eq!(shown, serde_json::json!(expected));
    assert_eq!(expected.len(), 5);
    let firmware = browser.eval(
        "return [...document.querySelectorAll('#devices tbody tr td:nth-child(4)')].map(td => td.textContent)",
    );
    assert!(
        firmware.as_array().unwrap().iter().all(|v| v == "1.0.0"),
        "{firmware}"
    );
    let seen = browser.eval(
        "return [...document.querySelectorAll('#devices tbody tr td:nth-child(6)')].map(td => td.textContent)",
    );
    assert!(
        seen.as_array()
            .unwrap()
            .iter()
            .all(|v| v.as_str().unwrap().ends_with(" ago")),
        "last seen, relative: {seen}"
    );
    let state =
        "return document.querySelector('[data-rollout=\"evening\"] .state')?.textContent || null";
    browser.wait_for("the scheduled rollout", state, |v| v == "scheduled");
    assert_eq!(
        browser.eval(
            "return document.querySelectorAll('[data-rollout=\"evening\"] tr[data-wave]').length"
        ),
        1
    );

    browser.click("[data-rollout=\"evening\"] button[data-action=\"pause\"]");
    browser.wait_for("the paused rollout", state, |v| v == "paused");
    let (_, view) = http_get(addr, "/api/v1/rollouts/evening", Some(&admin));
    assert_eq!(view["state"], "paused");
    assert_eq!(view["reason"], "paused by the operator");

    browser.click("[data-rollout=\"evening\"] button[data-action=\"resume\"]");
    browser.wait_for("the resumed rollout", state, |v| v == "scheduled");
    let (_, view) = http_get(addr, "/api/v1/rollouts/evening", Some(&admin));
    assert_eq!(view["state"], "scheduled");
    assert_eq!(view["counts"]["pending"], 5);

    // A viewer's token (made with the CLI, through the running gateway) sees the same
    // rollout and no action on it.
    let made = stdout_of(&fleet.site.command(&[
        "tokens",
        "create",
        "--role",
        "viewer",
        "--name",
        "wall-screen",
    ]));
    let viewer = made.lines().last().unwrap().trim().to_owned();
    assert!(viewer.starts_with("opa_"), "{made}");
    browser.open(&format!("http://{addr}/dashboard#token={viewer}"));
    browser.wait_for(
        "the viewer's page",
        "return document.getElementById('role').textContent || null",
        |v| v == "wall-screen (viewer)",
    );
    browser.wait_for("the scheduled rollout", state, |v| v == "scheduled");
    assert_eq!(
        browser.eval("return document.querySelectorAll('[data-rollout] button').length"),
        0,
        "a viewer is offered no actions"
    );
    // The API refuses the viewer what the page does not offer.
    let (status, json) =
        super::uplink::http(addr, "POST", "/api/v1/rollouts/evening/pause", &viewer, "");
    assert_eq!(status, 403, "{json}");
    let listed = stdout_of(&fleet.site.command(&["tokens", "list"]));
    assert!(
        listed.contains("wall-screen") && listed.contains("viewer"),
        "{listed}"
    );
    let revoked = stdout_of(&fleet.site.command(&["tokens", "revoke", "wall-screen"]));
    assert!(revoked.contains("Revoked"), "{revoked}");
    assert_eq!(http_get(addr, "/api/v1/devices", Some(&viewer)).0, 401);
}

/// Onboarding from the page, as an installer with a laptop would: scan, adopt a nearby
/// device with the secret on its label, onboard it, watch the run; a viewer is offered
/// none of it.
#[test]
fn the_dashboard_scans_adopts_and_onboards_a_nearby_device_in_chromium() {
    use super::onboarding::{BleFleet, ble_fleet};
    let BleFleet {
        gateway,
        addr,
        fleet,
        site,
        // Held to the end: dropping the simulator stops the devices.
        sim: _sim,
        ..
    } = ble_fleet("2", "2", &[]);
    let admin = site.admin_token();
    let label = &fleet["devices"][0];
    let (name, address, password) = (
        label["name"].as_str().unwrap(),
        label["mac"].as_str().unwrap().to_ascii_uppercase(),
        label["password"].as_str().unwrap(),
    );

    let browser = Browser::start();
    browser.open(&format!("http://{addr}/dashboard#token={admin}"));
    browser.wait_for(
        "its data",
        "return document.body.dataset.loaded || document.getElementById('error').textContent || null",
        |v| v == "true",
    );
    browser.click("#scan");
    let rows = browser.wait_for(
        "the nearby devices",
        "return [...document.querySelectorAll('#nearby tbody tr')].map(r => r.dataset.address)",
        |v| v.as_array().is_some_and(|a| a.len() == 2),
    );
    assert!(
        rows.as_array()
            .unwrap()
            .iter()
            .any(|a| a == address.as_str()),
        "{rows}"
    );
    let row = format!("#nearby tr[data-address=\"{address}\"]");
    browser.eval(&format!(
        "const row = document.querySelector('{row}');
         const set = (f, v) => row.querySelector(`[data-field=\"${{f}}\"]`).value = v;
         set('device_type', 'esp32-app'); set('security', '2');
         set('username', 'wifiprov'); set('pop', '{password}');
         return null"
    ));
    browser.click(&format!("{row} button[data-action=\"adopt\"]"));
    browser.wait_for(
        "the adopted device",
        &format!("return document.querySelector('{row} .target').textContent"),
        |v| v == name,
    );
    browser.wait_for(
        "the new target",
        &format!("return !!document.querySelector('#onboarding tr[data-target=\"{name}\"]')"),
        |v| v == true,
    );
    browser.click("#run");
    let status = browser.wait_for(
        "the finished run",
        "const s = document.getElementById('onboarding-status');
         return s.dataset.done === 'true' ? s.textContent : (document.getElementById('error').textContent || null)",
        |v| v.as_str().is_some_and(|s| s.contains(" done: ")),
    );
    assert!(
        status
            .as_str()
            .unwrap()
            .ends_with("done: 1 onboarded, 0 failed"),
        "{status}"
    );
    let (_, lobby) = http_get(addr, "/api/v1/devices", Some(&admin));
    let onboarded: Vec<&serde_json::Value> = lobby["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["state"] == "provisioned" || d["state"] == "claimed")
        .collect();
    assert_eq!(onboarded.len(), 1, "{lobby}");
    assert_eq!(onboarded[0]["id"], name);
    assert_eq!(onboarded[0]["device_type"], "esp32-app");

    // A viewer sees the targets but is offered no scan, adoption or run.
    let made = stdout_of(&site.command(&[
        "tokens",
        "create",
        "--role",
        "viewer",
        "--name",
        "lobby-screen",
    ]));
    let viewer = made.lines().last().unwrap().trim().to_owned();
    browser.open(&format!("http://{addr}/dashboard#token={viewer}"));
    browser.wait_for(
        "the viewer's page",
        "return document.getElementById('role').textContent || null",
        |v| v == "lobby-screen (viewer)",
    );
    browser.wait_for(
        "the targets",
        &format!("return !!document.querySelector('#onboarding tr[data-target=\"{name}\"]')"),
        |v| v == true,
    );
    assert_eq!(
        browser.eval("return document.getElementById('onboarding-actions').hidden"),
        true,
        "a viewer is offered no onboarding actions"
    );
    drop(gateway);
}
