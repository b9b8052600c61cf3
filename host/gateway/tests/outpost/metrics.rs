//! `/metrics` as Prometheus reads it: the running gateway's answer, checked by
//! Prometheus's own `promtool check metrics` (Debian's prometheus package; the test
//! fails, never skips, without it).

use super::uplink::http;
use super::*;

/// GETs `/metrics` with `token`; the status and the text.
pub(crate) fn scrape(addr: SocketAddr, token: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("no header end");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_owned(), body.to_owned())
}

/// Runs `promtool check metrics` on `text`; panics with what it said unless it passes.
pub(crate) fn promtool_check(text: &str) {
    let output = output_with_stdin(
        Command::new("promtool").args(["check", "metrics"]),
        text.as_bytes(),
    );
    assert!(
        output.status.success(),
        "promtool check metrics failed:\n{}{}\n--- the text:\n{text}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The value of the sample `series` (name and labels exactly as rendered).
pub(crate) fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|value| value.trim().parse().unwrap())
}

#[test]
fn metrics_are_prometheus_text_that_promtool_accepts_and_count_what_happened() {
    let site = Site::new("[ble]\nenabled = false\n");
    site.seed(vec![NewDevice::new(
        "esp-1",
        "thermostat",
        DeviceState::Claimed,
    )]);
    let mut gateway = site.run();
    let addr = gateway.ready();
    let admin = site.admin_token();

    // Something to count: three telemetry records queued offline, a refused token, a 404.
    let (status, json) = http(addr, "POST", "/api/v1/devices/esp-1/credential", &admin, "");
    assert_eq!(status, 201, "{json}");
    let device = json["token"].as_str().unwrap().to_owned();
    let path = "/api/v1/devices/esp-1/telemetry";
    let (status, _) = http(addr, "POST", path, &device, r#"[{"t":1},{"t":2},{"t":3}]"#);
    assert_eq!(status, 202);
    let (status, _) = http(addr, "POST", path, "odt_wrong", r#"{"t":4}"#);
    assert_eq!(status, 401);
    assert_eq!(http_get(addr, "/api/v1/nothing-here", Some(&admin)).0, 404);

    // No token, no metrics.
    let (status, _, _) = scrape(addr, "wrong-token-0123456789");
    assert_eq!(status, 401);
    let (status, head, text) = scrape(addr, &admin);
    assert_eq!(status, 200, "{text}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    promtool_check(&text);

    let telemetry = r#"outpost_api_requests_total{route="/api/v1/devices/{id}/telemetry",status=""#;
    assert_eq!(
        sample(&text, &format!("{telemetry}202\"}}")),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, &format!("{telemetry}401\"}}")),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"outpost_api_requests_total{route="other",status="404"}"#
        ),
        Some(1.0),
        "{text}"
    );
    for (series, value) in [
        (r#"outpost_outbox_messages{priority="telemetry"}"#, 3.0),
        (r#"outpost_outbox_messages{priority="control"}"#, 0.0),
        (r#"outpost_uplink_state{state="offline"}"#, 1.0),
        (r#"outpost_uplink_state{state="connected"}"#, 0.0),
        ("outpost_uplink_up", 0.0),
        ("outpost_outbox_paced_writers", 0.0),
        // The three records were one POST: one group commit.
        ("outpost_outbox_commits_total", 1.0),
        (r#"outpost_rollout_devices{status="running"}"#, 0.0),
        ("outpost_cache_used_bytes", 0.0),
        (
            &format!(
                "outpost_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            ),
            1.0,
        ),
    ] {
        assert_eq!(sample(&text, series), Some(value), "{series} in:\n{text}");
    }
    assert!(
        sample(&text, r#"outpost_outbox_bytes{priority="telemetry"}"#).unwrap() > 0.0,
        "{text}"
    );
    // Every family has its help text and type, and counters end in _total.
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut words = line.split(' ').skip(2);
        let (name, kind) = (words.next().unwrap(), words.next().unwrap());
        assert!(name.starts_with("outpost_"), "{line}");
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "no help for {name}"
        );
        if kind == "counter" {
            assert!(name.ends_with("_total"), "{line}");
        }
    }
    // The operator's view of the same: the three records queued, no write paced (no
    // uplink, nothing to pace to).
    let output = site.command(&["uplink", "status"]);
    let status = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{status}");
    assert!(
        status.contains("outbox:   3 queued") && status.contains("0 telemetry writes paced now"),
        "{status}"
    );
    gateway.stop_cleanly(libc::SIGTERM, &site);
}
