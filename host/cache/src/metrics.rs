//! What the cache counts for `/metrics` (through the `metrics` facade; the gateway
//! installs the Prometheus recorder and renders it).

/// Requests for firmware that was already cached.
pub const HITS: &str = "outpost_cache_hits_total";
/// Requests for firmware that had to be downloaded first.
pub const MISSES: &str = "outpost_cache_misses_total";
/// Bytes served to devices.
pub const SERVED_BYTES: &str = "outpost_cache_served_bytes_total";
/// Bytes received from firmware origins.
pub const UPSTREAM_BYTES: &str = "outpost_cache_upstream_bytes_total";
/// Files evicted to make room.
pub const EVICTIONS: &str = "outpost_cache_evictions_total";

/// Registers the descriptions (the `# HELP` lines).
pub fn describe() {
    metrics::describe_counter!(HITS, "Firmware requests answered from the cache.");
    metrics::describe_counter!(
        MISSES,
        "Firmware requests that waited for an upstream download."
    );
    metrics::describe_counter!(
        SERVED_BYTES,
        metrics::Unit::Bytes,
        "Firmware bytes served to devices."
    );
    metrics::describe_counter!(
        UPSTREAM_BYTES,
        metrics::Unit::Bytes,
        "Firmware bytes downloaded from origins."
    );
    metrics::describe_counter!(EVICTIONS, "Cached firmware files evicted to make room.");
}
