//! The API over real loopback connections, with a real hyper client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{self, HeaderMap};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use outpost_store::{DeviceState, NewDevice, Role, Store};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::*;

const TOKEN: &str = "test-admin-token-0123456789";

struct Running {
    addr: SocketAddr,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<()>,
    store: Store,
    outbox: outpost_uplink::Outbox,
    _dir: tempfile::TempDir,
}

async fn start() -> Running {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("outpost.db")).await.unwrap();
    let runtime =
        Arc::new(outpost_runtime::Runtime::new(outpost_runtime::RuntimeConfig::default()).unwrap());
    let (handlers, _) = HandlerRegistry::open(dir.path().join("handlers"), runtime, vec![])
        .await
        .unwrap();
    let firmware = outpost_cache::FirmwareCache::open(
        store.clone(),
        crate::config::CacheSection::default().cache_config(&dir.path().join("firmware")),
    )
    .await
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = crate::config::Config::parse(
        "[gateway]\nid = \"gw-test\"\n",
        &dir.path().join("outpost.toml"),
    )
    .unwrap();
    let (outbox, _writer) = outpost_uplink::Outbox::open(
        store.clone(),
        outpost_uplink::OutboxLimits::default(),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let handlers = Arc::new(handlers);
    let rollouts = outpost_rollout::Rollouts::new(
        store.clone(),
        firmware.clone(),
        Arc::clone(&handlers),
        outbox.clone(),
        outpost_uplink::DeploymentInbox::new(store.clone()),
        outpost_rollout::Mailbox::new(
            "http://127.0.0.1:8070".into(),
            outpost_cache::links::LinkSigner::new([9; 32]),
        ),
        "gw-test".into(),
    );
    let state = Arc::new(ApiState {
        onboarder: Arc::new(
            outpost_onboarding::Onboarder::new(
                config.onboarding_settings(),
                store.clone(),
                None,
                format!("http://{addr}"),
            )
            .unwrap(),
        ),
        store: store.clone(),
        admin: AdminToken::new(TOKEN).unwrap(),
        health: Health {
            status: "ok",
            version: "test",
            gateway: GatewayInfo {
                id: "gw-test".into(),
                name: "Test".into(),
            },
            uplink: "offline",
            onboarding: OnboardingStatus::Disabled,
            firmware_url: None,
            devices_url: None,
        },
        handlers,
        firmware,
        outbox: outbox.clone(),
        uplink: None,
        rollouts,
        links: outpost_cache::links::LinkSigner::new([9; 32]),
        require_signed_links: true,
    });
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(serve(
        listener,
        None,
        outpost_serve::Limits::default(),
        state,
        shutdown.clone(),
    ));
    Running {
        addr,
        shutdown,
        server,
        store,
        outbox,
        _dir: dir,
    }
}

impl Running {
    /// A claimed device in the lobby.
    async fn lobby_device(&self, id: &str) {
        self.store
            .upsert_device(NewDevice::new(id, "thermostat", DeviceState::Claimed))
            .await
            .unwrap();
    }

    /// A claimed device in the lobby, and its `Authorization` header value.
    async fn lobby_device_with_token(&self, id: &str) -> String {
        self.lobby_device(id).await;
        let token = self.store.issue_device_credential(id).await.unwrap();
        format!("Bearer {token}")
    }
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    json: serde_json::Value,
}

async fn request(addr: SocketAddr, method: Method, path: &str, auth: Option<&str>) -> Answer {
    request_with_body(addr, method, path, auth, Vec::new()).await
}

async fn request_with_body(
    addr: SocketAddr,
    method: Method,
    path: &str,
    auth: Option<&str>,
    body: Vec<u8>,
) -> Answer {
    request_with_headers(addr, method, path, auth, &[], body).await
}

async fn request_with_headers(
    addr: SocketAddr,
    method: Method,
    path: &str,
    auth: Option<&str>,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Answer {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, "localhost");
    if let Some(auth) = auth {
        builder = builder.header(header::AUTHORIZATION, auth);
    }
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let response = sender
        .send_request(builder.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let json = if body.is_empty() {
        serde_json::Value::Null
    } else {
        // JSON for everything but /metrics and the dashboard, which are text.
        serde_json::from_slice(&body).unwrap_or_else(|err| {
            let text = headers
                .get(header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"text/"));
            assert!(text, "not JSON ({err}): {body:?}");
            serde_json::Value::String(String::from_utf8_lossy(&body).into_owned())
        })
    };
    Answer {
        status,
        headers,
        json,
    }
}

fn assert_error_shape(answer: &Answer, status: StatusCode, code: &str) {
    assert_eq!(answer.status, status, "{}", answer.json);
    assert_eq!(answer.json["error"]["code"], code, "{}", answer.json);
    assert!(
        answer.json["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{}",
        answer.json
    );
    let keys: Vec<_> = answer.json["error"].as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        ["code", "message"],
        "unstable error shape: {}",
        answer.json
    );
    assert_eq!(answer.headers[header::CONTENT_TYPE], "application/json");
}

#[tokio::test]
async fn healthz_answers_without_a_token() {
    let api = start().await;
    let answer = request(api.addr, Method::GET, "/healthz", None).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json["status"], "ok");
    assert_eq!(answer.json["gateway"]["id"], "gw-test");
    assert_eq!(answer.json["uplink"], "offline");
    assert_eq!(answer.json["onboarding"]["state"], "disabled");
}

#[tokio::test]
async fn devices_need_the_admin_token() {
    let api = start().await;
    let mut device = NewDevice::new("esp-0a1b2c", "thermostat", DeviceState::Claimed);
    device.firmware_version = Some("1.4.2".into());
    api.store.upsert_device(device).await.unwrap();

    let none = request(api.addr, Method::GET, "/api/v1/devices", None).await;
    assert_error_shape(&none, StatusCode::UNAUTHORIZED, "unauthorized");
    assert_eq!(
        none.headers[header::WWW_AUTHENTICATE],
        "Bearer realm=\"outpost\""
    );

    let wrong = request(
        api.addr,
        Method::GET,
        "/api/v1/devices",
        Some("Bearer not-the-token-at-all"),
    )
    .await;
    assert_error_shape(&wrong, StatusCode::UNAUTHORIZED, "unauthorized");

    let scheme = request(
        api.addr,
        Method::GET,
        "/api/v1/devices",
        Some(&format!("Basic {TOKEN}")),
    )
    .await;
    assert_error_shape(&scheme, StatusCode::UNAUTHORIZED, "unauthorized");

    let right = request(
        api.addr,
        Method::GET,
        "/api/v1/devices",
        Some(&format!("Bearer {TOKEN}")),
    )
    .await;
    assert_eq!(right.status, StatusCode::OK, "{}", right.json);
    let devices = right.json["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0]["id"], "esp-0a1b2c");
    assert_eq!(devices[0]["state"], "claimed");
    assert_eq!(devices[0]["firmware_version"], "1.4.2");
    assert_eq!(right.headers[header::CACHE_CONTROL], "no-store");
}

#[tokio::test]
async fn unknown_paths_and_methods_get_the_error_shape() {
    let api = start().await;
    let auth = format!("Bearer {TOKEN}");
    let missing = request(api.addr, Method::GET, "/api/v1/nothing", Some(&auth)).await;
    assert_error_shape(&missing, StatusCode::NOT_FOUND, "not_found");

    // Without a token, /api/ paths do not reveal whether they exist.
    let hidden = request(api.addr, Method::GET, "/api/v1/nothing", None).await;
    assert_error_shape(&hidden, StatusCode::UNAUTHORIZED, "unauthorized");

    let outside = request(api.addr, Method::GET, "/index.php", None).await;
    assert_error_shape(&outside, StatusCode::NOT_FOUND, "not_found");

    let post = request(api.addr, Method::POST, "/api/v1/devices", Some(&auth)).await;
    assert_error_shape(&post, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    assert_eq!(post.headers[header::ALLOW], "GET");

    let delete = request(api.addr, Method::DELETE, "/healthz", None).await;
    assert_error_shape(
        &delete,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );
}

#[tokio::test]
async fn a_store_failure_is_a_json_500() {
    let api = start().await;
    api.store.clone().close().await.unwrap();
    let answer = request(
        api.addr,
        Method::GET,
        "/api/v1/devices",
        Some(&format!("Bearer {TOKEN}")),
    )
    .await;
    assert_error_shape(&answer, StatusCode::INTERNAL_SERVER_ERROR, "internal");
}

#[tokio::test]
async fn shutdown_stops_accepting_and_returns() {
    let api = start().await;
    assert_eq!(
        request(api.addr, Method::GET, "/healthz", None)
            .await
            .status,
        StatusCode::OK
    );
    api.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), api.server)
        .await
        .expect("serve() did not return after shutdown")
        .unwrap();
    assert!(
        TcpStream::connect(api.addr).await.is_err(),
        "still accepting after shutdown"
    );
}

#[tokio::test]
async fn handlers_can_be_listed_and_bad_packages_are_refused() {
    let api = start().await;
    let auth = format!("Bearer {TOKEN}");
    let list = request(api.addr, Method::GET, "/api/v1/handlers", Some(&auth)).await;
    assert_eq!(list.status, StatusCode::OK);
    assert_eq!(list.json["handlers"], serde_json::json!([]));

    let garbage = request_with_body(
        api.addr,
        Method::POST,
        "/api/v1/handlers",
        Some(&auth),
        b"definitely not a tar archive".repeat(40),
    )
    .await;
    assert_error_shape(
        &garbage,
        StatusCode::UNPROCESSABLE_ENTITY,
        "package_rejected",
    );

    let unknown = request(
        api.addr,
        Method::DELETE,
        "/api/v1/handlers/nope",
        Some(&auth),
    )
    .await;
    assert_error_shape(&unknown, StatusCode::NOT_FOUND, "not_found");
    let wrong = request(api.addr, Method::PUT, "/api/v1/handlers", Some(&auth)).await;
    assert_error_shape(&wrong, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    let anonymous = request_with_body(
        api.addr,
        Method::POST,
        "/api/v1/handlers",
        None,
        vec![0; 10],
    )
    .await;
    assert_error_shape(&anonymous, StatusCode::UNAUTHORIZED, "unauthorized");
}

#[tokio::test]
async fn telemetry_is_relayed_as_posted_and_bad_shapes_are_refused() {
    let running = start().await;
    let auth = running.lobby_device_with_token("esp-1").await;
    let path = "/api/v1/devices/esp-1/telemetry";
    let post = |body: &[u8]| {
        request_with_body(running.addr, Method::POST, path, Some(&auth), body.to_vec())
    };
    let one = post(b"  {\"t\": 1, \"nested\": {\"a\": [1, 2]}}\n").await;
    assert_eq!(one.status, StatusCode::ACCEPTED, "{}", one.json);
    let two = post(b"[ {\"t\":2} ,\n {\"t\":3} ]").await;
    assert_eq!(two.json["accepted"], 2, "{}", two.json);
    for (body, says) in [
        (&b"[1]"[..], "record 0 is not a JSON object"),
        (b"[{\"t\":4}, \"x\"]", "record 1 is not a JSON object"),
        (b"42", "a JSON object or an array of objects"),
        (b"[]", "1 to 100 records"),
        (b"{\"t\":", "a JSON object or an array of objects"),
        (b"{\"t\":5} {\"t\":6}", "trailing characters"),
    ] {
        let refused = post(body).await;
        assert_error_shape(&refused, StatusCode::BAD_REQUEST, "malformed_telemetry");
        let message = refused.json["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{message:?} should say {says:?}");
    }
    // Newline-delimited JSON (what a log collector sends): a record per line.
    let ndjson = |body: &[u8]| {
        request_with_headers(
            running.addr,
            Method::POST,
            path,
            Some(&auth),
            &[("content-type", "application/x-ndjson; charset=utf-8")],
            body.to_vec(),
        )
    };
    let lines = ndjson(b"{\"t\":4}\n{\"t\":5}\n").await;
    assert_eq!(lines.json["accepted"], 2, "{}", lines.json);
    let refused = ndjson(b"{\"t\":6}\n[6]\n").await;
    assert_error_shape(&refused, StatusCode::BAD_REQUEST, "malformed_telemetry");
    assert!(
        refused.json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("line 2"),
        "{}",
        refused.json
    );
    // Five messages queued, each carrying the device's object as it was posted (nothing
    // of a refused body).
    let queued = running.outbox.fetch(&mut [0; 3], 10).await.unwrap();
    let bodies: Vec<serde_json::Value> = queued
        .iter()
        .map(|m| serde_json::from_slice::<serde_json::Value>(&m.payload).unwrap()["body"].clone())
        .collect();
    assert_eq!(
        bodies,
        [
            serde_json::json!({"t": 1, "nested": {"a": [1, 2]}}),
            serde_json::json!({"t": 2}),
            serde_json::json!({"t": 3}),
            serde_json::json!({"t": 4}),
            serde_json::json!({"t": 5}),
        ]
    );
    running.shutdown.cancel();
    running.server.await.unwrap();
}

#[tokio::test]
async fn a_replaced_device_token_stops_at_once_and_a_revoked_one_too() {
    let running = start().await;
    running.lobby_device("esp-1").await;
    let admin = format!("Bearer {TOKEN}");
    let path = "/api/v1/devices/esp-1/credential";
    let issue = || request(running.addr, Method::POST, path, Some(&admin));
    let send = |token: String| async move {
        request_with_body(
            running.addr,
            Method::POST,
            "/api/v1/devices/esp-1/telemetry",
            Some(&format!("Bearer {token}")),
            b"{\"t\":1}".to_vec(),
        )
        .await
    };
    let first = issue().await.json["token"].as_str().unwrap().to_owned();
    assert_eq!(send(first.clone()).await.status, StatusCode::ACCEPTED);
    let second = issue().await.json["token"].as_str().unwrap().to_owned();
    assert_error_shape(&send(first).await, StatusCode::UNAUTHORIZED, "unauthorized");
    assert_eq!(send(second.clone()).await.status, StatusCode::ACCEPTED);
    let revoked = request(running.addr, Method::DELETE, path, Some(&admin)).await;
    assert_eq!(revoked.status, StatusCode::OK, "{}", revoked.json);
    assert_error_shape(
        &send(second).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    let again = request(running.addr, Method::DELETE, path, Some(&admin)).await;
    assert_error_shape(&again, StatusCode::NOT_FOUND, "no_credential");
    // Only the admin revokes.
    let anonymous = request(running.addr, Method::DELETE, path, None).await;
    assert_error_shape(&anonymous, StatusCode::UNAUTHORIZED, "unauthorized");
    running.shutdown.cancel();
    running.server.await.unwrap();
}

#[tokio::test]
async fn every_device_body_nested_past_64_levels_is_refused() {
    let running = start().await;
    let auth = running.lobby_device_with_token("esp-1").await;
    let deep = format!(r#"{{"x":{}1{}}}"#, "[".repeat(64), "]".repeat(64));
    for (path, code) in [
        ("/api/v1/devices/esp-1/telemetry", "malformed_telemetry"),
        ("/api/v1/devices/esp-1/register", "too_deep"),
        ("/api/v1/devices/esp-1/reports", "too_deep"),
        ("/api/v1/devices/esp-1/commands/1/reply", "too_deep"),
    ] {
        let refused = request_with_body(
            running.addr,
            Method::POST,
            path,
            Some(&auth),
            deep.clone().into_bytes(),
        )
        .await;
        assert_error_shape(&refused, StatusCode::BAD_REQUEST, code);
        let message = refused.json["error"]["message"].as_str().unwrap();
        assert!(message.contains("at most 64 deep"), "{path}: {message}");
    }
    // Nothing of it reached the outbox.
    assert!(
        running
            .outbox
            .fetch(&mut [0; 3], 10)
            .await
            .unwrap()
            .is_empty()
    );
    running.shutdown.cancel();
    running.server.await.unwrap();
}

/// Every route of `/api/v1` and `/metrics`, with the least role it needs.
const ROUTES: &[(&str, &str, Role)] = &[
    ("GET", "/metrics", Role::Viewer),
    ("GET", "/api/v1/whoami", Role::Viewer),
    ("GET", "/api/v1/devices", Role::Viewer),
    ("PUT", "/api/v1/devices/esp-1/properties", Role::Operator),
    ("POST", "/api/v1/devices/esp-1/credential", Role::Operator),
    ("DELETE", "/api/v1/devices/esp-1/credential", Role::Operator),
    ("GET", "/api/v1/onboarding/targets", Role::Viewer),
    ("POST", "/api/v1/onboarding/targets", Role::Operator),
    ("GET", "/api/v1/onboarding/nearby", Role::Operator),
    ("POST", "/api/v1/onboarding/nearby/adopt", Role::Operator),
    ("POST", "/api/v1/onboarding/runs", Role::Operator),
    ("GET", "/api/v1/onboarding/runs/1", Role::Viewer),
    ("GET", "/api/v1/claims", Role::Viewer),
    ("GET", "/api/v1/groups", Role::Viewer),
    ("POST", "/api/v1/groups", Role::Operator),
    ("PUT", "/api/v1/groups/g/members/esp-1", Role::Operator),
    ("GET", "/api/v1/firmware", Role::Viewer),
    ("POST", "/api/v1/firmware", Role::Operator),
    ("GET", "/api/v1/firmware/manifests", Role::Viewer),
    ("POST", "/api/v1/firmware/manifests", Role::Operator),
    (
        "POST",
        "/api/v1/firmware/0000000000000000000000000000000000000000000000000000000000000000/links",
        Role::Operator,
    ),
    (
        "PUT",
        "/api/v1/firmware/0000000000000000000000000000000000000000000000000000000000000000/pins/op",
        Role::Operator,
    ),
    (
        "DELETE",
        "/api/v1/firmware/0000000000000000000000000000000000000000000000000000000000000000/pins/op",
        Role::Operator,
    ),
    (
        "DELETE",
        "/api/v1/firmware/0000000000000000000000000000000000000000000000000000000000000000",
        Role::Operator,
    ),
    ("GET", "/api/v1/handlers", Role::Viewer),
    ("POST", "/api/v1/handlers", Role::Admin),
    ("DELETE", "/api/v1/handlers/acme", Role::Admin),
    ("GET", "/api/v1/rollouts", Role::Viewer),
    ("POST", "/api/v1/rollouts", Role::Operator),
    ("GET", "/api/v1/rollouts/r-1", Role::Viewer),
    ("POST", "/api/v1/rollouts/r-1/pause", Role::Operator),
    ("POST", "/api/v1/rollouts/r-1/resume", Role::Operator),
    ("POST", "/api/v1/rollouts/r-1/cancel", Role::Operator),
    ("POST", "/api/v1/rollouts/r-1/retry", Role::Operator),
    ("GET", "/api/v1/uplink", Role::Viewer),
    ("GET", "/api/v1/tokens", Role::Admin),
    ("POST", "/api/v1/tokens", Role::Admin),
    ("DELETE", "/api/v1/tokens/nobody", Role::Admin),
];

#[tokio::test]
async fn every_role_on_every_route() {
    let running = start().await;
    running.lobby_device("esp-1").await;
    let mut tokens = Vec::new();
    for role in Role::ALL {
        let token = running
            .store
            .create_api_token(&format!("{role}-1"), role)
            .await
            .unwrap();
        tokens.push((role, format!("Bearer {token}")));
    }
    tokens.push((Role::Admin, format!("Bearer {TOKEN}")));
    for &(method, path, needed) in ROUTES {
        let method: Method = method.parse().unwrap();
        for (role, auth) in &tokens {
            let answer = request(running.addr, method.clone(), path, Some(auth)).await;
            if *role >= needed {
                assert!(
                    answer.status != StatusCode::FORBIDDEN
                        && answer.status != StatusCode::UNAUTHORIZED,
                    "{role} on {method} {path}: {} {}",
                    answer.status,
                    answer.json
                );
            } else {
                assert_error_shape(&answer, StatusCode::FORBIDDEN, "forbidden");
                let message = answer.json["error"]["message"].as_str().unwrap();
                assert!(
                    message.contains(&format!("needs the {needed} role")),
                    "{role} on {method} {path}: {message}"
                );
            }
        }
        // No token, or a made-up one: 401 on every route.
        let anonymous = request(running.addr, method.clone(), path, None).await;
        assert_error_shape(&anonymous, StatusCode::UNAUTHORIZED, "unauthorized");
        let forged = format!(
            "Bearer {}{}",
            outpost_store::API_TOKEN_PREFIX,
            "0".repeat(64)
        );
        let forged = request(running.addr, method.clone(), path, Some(&forged)).await;
        assert_error_shape(&forged, StatusCode::UNAUTHORIZED, "unauthorized");
    }
    // whoami names the caller; a revoked token is refused with the next request.
    let (_, viewer) = &tokens[0];
    let me = request(running.addr, Method::GET, "/api/v1/whoami", Some(viewer)).await;
    assert_eq!(
        me.json,
        serde_json::json!({"name": "viewer-1", "role": "viewer"})
    );
    let admin = format!("Bearer {TOKEN}");
    let revoked = request(
        running.addr,
        Method::DELETE,
        "/api/v1/tokens/viewer-1",
        Some(&admin),
    )
    .await;
    assert_eq!(revoked.status, StatusCode::OK, "{}", revoked.json);
    let after = request(running.addr, Method::GET, "/api/v1/devices", Some(viewer)).await;
    assert_error_shape(&after, StatusCode::UNAUTHORIZED, "unauthorized");
    running.shutdown.cancel();
    running.server.await.unwrap();
}

#[tokio::test]
async fn tokens_are_made_listed_and_revoked_by_an_admin_and_shown_once() {
    let running = start().await;
    let admin = format!("Bearer {TOKEN}");
    let made = request_with_body(
        running.addr,
        Method::POST,
        "/api/v1/tokens",
        Some(&admin),
        br#"{"name":"grafana","role":"viewer"}"#.to_vec(),
    )
    .await;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.json);
    let token = made.json["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with(outpost_store::API_TOKEN_PREFIX));
    let again = request_with_body(
        running.addr,
        Method::POST,
        "/api/v1/tokens",
        Some(&admin),
        br#"{"name":"grafana","role":"admin"}"#.to_vec(),
    )
    .await;
    assert_error_shape(&again, StatusCode::CONFLICT, "token_exists");
    for bad in [
        &br#"{"name":"x","role":"root"}"#[..],
        br#"{"name":"a b","role":"viewer"}"#,
    ] {
        let refused = request_with_body(
            running.addr,
            Method::POST,
            "/api/v1/tokens",
            Some(&admin),
            bad.to_vec(),
        )
        .await;
        assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{}", refused.json);
    }
    let listed = request(running.addr, Method::GET, "/api/v1/tokens", Some(&admin)).await;
    let tokens = listed.json["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 1);
    assert_eq!(tokens[0]["name"], "grafana");
    assert_eq!(tokens[0]["role"], "viewer");
    assert!(
        !listed.json.to_string().contains(&token[4..]),
        "the token is never listed"
    );
    let gone = request(
        running.addr,
        Method::DELETE,
        "/api/v1/tokens/nobody",
        Some(&admin),
    )
    .await;
    assert_error_shape(&gone, StatusCode::NOT_FOUND, "no_token");
    running.shutdown.cancel();
    running.server.await.unwrap();
}

#[tokio::test]
async fn a_wifi_rotation_needs_the_tls_device_listener_and_one_kind_of_rollout() {
    let running = start().await;
    running.lobby_device_with_token("esp-1").await;
    let admin = format!("Bearer {TOKEN}");
    let post = |body: serde_json::Value| {
        request_with_body(
            running.addr,
            Method::POST,
            "/api/v1/rollouts",
            Some(&admin),
            body.to_string().into_bytes(),
        )
    };
    let wifi = serde_json::json!({"ssid": "site-new", "passphrase": "correct horse battery"});
    // This gateway has no TLS device listener: the passphrase would travel in the clear.
    let refused = post(serde_json::json!({"wifi": wifi})).await;
    assert_error_shape(&refused, StatusCode::CONFLICT, "no_device_listener");
    assert!(
        !refused.json.to_string().contains("correct horse"),
        "{}",
        refused.json
    );
    // Either a manifest or a rotation, not both, not neither.
    for body in [
        serde_json::json!({"wifi": wifi, "manifest": "a.b.c"}),
        serde_json::json!({"rollout": {}}),
    ] {
        let answer = post(body).await;
        assert_error_shape(&answer, StatusCode::BAD_REQUEST, "malformed_request");
        assert!(
            answer.json["error"]["message"]
                .as_str()
                .unwrap()
                .contains("give either manifest"),
            "{}",
            answer.json
        );
    }
    // An unknown field in the rotation is named.
    let typo = post(
        serde_json::json!({"wifi": {"ssid": "s", "passphrase": "correct horse", "fallback": 5}}),
    )
    .await;
    assert_error_shape(&typo, StatusCode::BAD_REQUEST, "malformed_request");
    assert!(
        typo.json.to_string().contains("unknown field `fallback`"),
        "{}",
        typo.json
    );
    assert!(
        !typo.json.to_string().contains("correct horse"),
        "{}",
        typo.json
    );
    running.shutdown.cancel();
    running.server.await.unwrap();
}
