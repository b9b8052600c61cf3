//! `GET /metrics`: the gateway's metrics in the Prometheus text format.
//!
//! The engines count what happens through the `metrics` facade (their `metrics` modules
//! name and describe each series); this module installs the Prometheus recorder once per
//! process, counts API requests, and sets the gauges that are read from state when a
//! scrape comes (queue depths, the link state, rollout devices by status). Every name is
//! listed with its meaning in docs/operations.md.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock, PoisonError};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use super::{ApiError, ApiState};

/// API requests, by route (the path with its ids replaced) and status.
const API_REQUESTS: &str = "outpost_api_requests_total";
/// Messages waiting in the outbox, by priority.
const OUTBOX_MESSAGES: &str = "outpost_outbox_messages";
/// Their payload bytes, by priority.
const OUTBOX_BYTES: &str = "outpost_outbox_bytes";
/// Messages delivered since the database was created.
const OUTBOX_DELIVERED: &str = "outpost_outbox_delivered_total";
/// Outbox group commits since start.
const OUTBOX_COMMITS: &str = "outpost_outbox_commits_total";
/// Telemetry writes waiting now for the publisher (pacing).
const OUTBOX_PACED: &str = "outpost_outbox_paced_writers";
/// 1 while the uplink is connected.
const UPLINK_UP: &str = "outpost_uplink_up";
/// 1 for the uplink's current state.
const UPLINK_STATE: &str = "outpost_uplink_state";
/// Connection attempts since start.
const UPLINK_ATTEMPTS: &str = "outpost_uplink_connect_attempts_total";
/// Connections made since start; one more than the reconnects.
const UPLINK_CONNECTIONS: &str = "outpost_uplink_connections_total";
/// Moves from one of several brokers to another.
const UPLINK_FAILOVERS: &str = "outpost_uplink_failovers_total";
/// Bytes the firmware cache holds.
const CACHE_USED: &str = "outpost_cache_used_bytes";
/// The cache's budget.
const CACHE_BUDGET: &str = "outpost_cache_budget_bytes";
/// 1, labelled with the version.
const BUILD_INFO: &str = "outpost_build_info";

/// The states `outpost_uplink_state` reports, each 0 or 1.
const UPLINK_STATES: [&str; 6] = [
    "offline",
    "starting",
    "registering",
    "connecting",
    "connected",
    "stopped",
];

/// Histogram buckets for durations, in seconds: handler calls take milliseconds to
/// minutes (a device downloading), onboarding a few seconds to a minute.
const SECONDS_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// The process's recorder, installed on first use (the `metrics` facade has one global
/// recorder per process).
pub(crate) fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)
            .expect("the bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics stays empty");
        }
        describe();
        metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        handle
    })
}

fn describe() {
    outpost_cache::metrics::describe();
    outpost_uplink::metrics::describe();
    outpost_runtime::metrics::describe();
    outpost_onboarding::metrics::describe();
    outpost_rollout::metrics::describe();
    metrics::describe_counter!(
        API_REQUESTS,
        "Local API requests, by route (ids replaced by {id}) and HTTP status."
    );
    metrics::describe_gauge!(
        OUTBOX_MESSAGES,
        "Messages waiting in the outbox, by priority (control, state, telemetry)."
    );
    metrics::describe_gauge!(
        OUTBOX_BYTES,
        metrics::Unit::Bytes,
        "Payload bytes waiting in the outbox, by priority."
    );
    metrics::describe_counter!(
        OUTBOX_DELIVERED,
        "Messages the broker acknowledged and the outbox deleted, since the state database was created."
    );
    metrics::describe_counter!(
        OUTBOX_COMMITS,
        "Database commits that wrote or acknowledged outbox messages, since start; each takes every write queued by then."
    );
    metrics::describe_gauge!(
        OUTBOX_PACED,
        "Telemetry writes waiting now (each at most 1 s) because the publisher is a window behind: devices post faster than the broker takes."
    );
    metrics::describe_gauge!(
        UPLINK_UP,
        "1 while the uplink is connected to its broker, else 0."
    );
    metrics::describe_gauge!(
        UPLINK_STATE,
        "1 for the uplink's current state (offline, starting, registering, connecting, connected, stopped), 0 for the others."
    );
    metrics::describe_counter!(UPLINK_ATTEMPTS, "Uplink connection attempts since start.");
    metrics::describe_counter!(
        UPLINK_CONNECTIONS,
        "Uplink connections made since start (reconnects are this minus one)."
    );
    metrics::describe_counter!(
        UPLINK_FAILOVERS,
        "Moves from one of the uplink's brokers to another since start (lost, or back to the first)."
    );
    metrics::describe_gauge!(
        CACHE_USED,
        metrics::Unit::Bytes,
        "Bytes of firmware cached."
    );
    metrics::describe_gauge!(
        CACHE_BUDGET,
        metrics::Unit::Bytes,
        "The firmware cache's budget (cache.max_size_mib)."
    );
    metrics::describe_gauge!(BUILD_INFO, "Always 1; the version is a label.");
}

/// Counts one API request. The handle for each route and status is looked up once and
/// kept (routes are a fixed set, statuses a few dozen), so a request costs an increment
/// rather than a registry lookup with its labels built.
pub(crate) fn count_request(path: &str, status: StatusCode) {
    type Counters = HashMap<(&'static str, u16), metrics::Counter>;
    static COUNTERS: OnceLock<Mutex<Counters>> = OnceLock::new();
    // The recorder is in place before any handle is kept (one from before counts nowhere).
    handle();
    let route = route_label(path);
    let counter = COUNTERS
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .entry((route, status.as_u16()))
        .or_insert_with(|| {
            metrics::counter!(API_REQUESTS, "route" => route, "status" => status.as_str().to_owned())
        })
        .clone();
    counter.increment(1);
}

/// `GET /metrics`.
pub(crate) async fn render(state: &ApiState) -> Result<Response<Full<Bytes>>, ApiError> {
    let handle = handle();
    let depth = state
        .outbox
        .depth()
        .await
        .map_err(|e| ApiError::internal(format!("the outbox could not be read: {e}")))?;
    for (priority, messages, bytes) in depth {
        metrics::gauge!(OUTBOX_MESSAGES, "priority" => priority.name()).set(messages as f64);
        metrics::gauge!(OUTBOX_BYTES, "priority" => priority.name()).set(bytes as f64);
    }
    let stats = state.outbox.stats();
    metrics::counter!(OUTBOX_DELIVERED).absolute(stats.delivered);
    metrics::counter!(OUTBOX_COMMITS).absolute(stats.commits);
    metrics::gauge!(OUTBOX_PACED).set(stats.paced as f64);

    let current = match &state.uplink {
        None => "offline",
        Some(uplink) => {
            let status = uplink.status();
            metrics::counter!(UPLINK_ATTEMPTS).absolute(status.connect_attempts);
            metrics::counter!(UPLINK_CONNECTIONS).absolute(status.connections);
            metrics::counter!(UPLINK_FAILOVERS).absolute(status.failovers);
            match status.state {
                outpost_uplink::LinkState::Starting => "starting",
                outpost_uplink::LinkState::Registering => "registering",
                outpost_uplink::LinkState::Connecting => "connecting",
                outpost_uplink::LinkState::Connected => "connected",
                outpost_uplink::LinkState::Stopped => "stopped",
            }
        }
    };
    for name in UPLINK_STATES {
        metrics::gauge!(UPLINK_STATE, "state" => name).set(f64::from(u8::from(name == current)));
    }
    metrics::gauge!(UPLINK_UP).set(f64::from(u8::from(current == "connected")));

    metrics::gauge!(CACHE_USED).set(state.firmware.used_bytes() as f64);
    metrics::gauge!(CACHE_BUDGET).set(state.firmware.config().max_bytes as f64);

    let devices = state
        .rollouts
        .devices_by_status()
        .await
        .map_err(|e| ApiError::internal(format!("the rollouts could not be read: {e}")))?;
    for (status, count) in devices {
        metrics::gauge!(outpost_rollout::metrics::DEVICES, "status" => status.as_str())
            .set(count as f64);
    }

    handle.run_upkeep();
    let mut response = Response::new(Full::new(Bytes::from(handle.render())));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// The route a path belongs to, with ids replaced, so labels stay few.
pub(crate) fn route_label(path: &str) -> &'static str {
    // No route has more than 7 segments; a longer path is `other` without a list built.
    let mut parts = [""; 8];
    let mut count = 0;
    for part in path.trim_end_matches('/').split('/').skip(1) {
        if count == parts.len() {
            return "other";
        }
        parts[count] = part;
        count += 1;
    }
    match &parts[..count] {
        [] | [""] => "/",
        ["dashboard"] => "/dashboard",
        ["healthz"] => "/healthz",
        ["metrics"] => "/metrics",
        ["firmware", _] => "/firmware/{sha256}",
        ["api", "v1", "devices"] => "/api/v1/devices",
        ["api", "v1", "devices", _, "telemetry"] => "/api/v1/devices/{id}/telemetry",
        ["api", "v1", "devices", _, "register"] => "/api/v1/devices/{id}/register",
        ["api", "v1", "devices", _, "next"] => "/api/v1/devices/{id}/next",
        ["api", "v1", "devices", _, "reports"] => "/api/v1/devices/{id}/reports",
        ["api", "v1", "devices", _, "commands", _, "reply"] => {
            "/api/v1/devices/{id}/commands/{n}/reply"
        }
        ["api", "v1", "devices", _, "properties"] => "/api/v1/devices/{id}/properties",
        ["api", "v1", "devices", _, "credential"] => "/api/v1/devices/{id}/credential",
        ["api", "v1", "onboarding", "targets"] => "/api/v1/onboarding/targets",
        ["api", "v1", "onboarding", "runs"] => "/api/v1/onboarding/runs",
        ["api", "v1", "onboarding", "runs", _] => "/api/v1/onboarding/runs/{id}",
        ["api", "v1", "claims"] => "/api/v1/claims",
        ["api", "v1", "groups"] => "/api/v1/groups",
        ["api", "v1", "groups", _, "members", _] => "/api/v1/groups/{id}/members/{device}",
        ["api", "v1", "firmware"] => "/api/v1/firmware",
        ["api", "v1", "firmware", "manifests"] => "/api/v1/firmware/manifests",
        ["api", "v1", "firmware", _] => "/api/v1/firmware/{sha256}",
        ["api", "v1", "firmware", _, "links"] => "/api/v1/firmware/{sha256}/links",
        ["api", "v1", "firmware", _, "pins", _] => "/api/v1/firmware/{sha256}/pins/{holder}",
        ["api", "v1", "handlers"] => "/api/v1/handlers",
        ["api", "v1", "handlers", _] => "/api/v1/handlers/{name}",
        ["api", "v1", "rollouts"] => "/api/v1/rollouts",
        ["api", "v1", "rollouts", _] => "/api/v1/rollouts/{id}",
        ["api", "v1", "rollouts", _, _] => "/api/v1/rollouts/{id}/{action}",
        ["api", "v1", "uplink"] => "/api/v1/uplink",
        ["api", "v1", "tokens"] => "/api/v1/tokens",
        ["api", "v1", "tokens", _] => "/api/v1/tokens/{id}",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_labelled_without_their_ids() {
        assert_eq!(
            route_label("/api/v1/devices/esp-1/commands/7/reply"),
            "/api/v1/devices/{id}/commands/{n}/reply"
        );
        assert_eq!(
            route_label("/api/v1/firmware/ab12/links"),
            "/api/v1/firmware/{sha256}/links"
        );
        assert_eq!(route_label("/"), "/");
        assert_eq!(route_label("/metrics"), "/metrics");
        assert_eq!(route_label("/api/v1/../../etc/passwd"), "other");
        assert_eq!(route_label("/no/such/thing"), "other");
        assert_eq!(route_label("/a/b/c/d/e/f/g/h/i"), "other");
        assert_eq!(
            route_label("/api/v1/devices/esp-1/telemetry/"),
            "/api/v1/devices/{id}/telemetry"
        );
    }
}
