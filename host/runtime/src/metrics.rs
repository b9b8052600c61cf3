//! What the handler runtime counts for `/metrics` (through the `metrics` facade; the
//! gateway installs the Prometheus recorder and renders it).

/// Calls into a handler, by handler, export and result.
pub const CALLS: &str = "outpost_handler_calls_total";
/// Calls that trapped, by handler and kind of trap.
pub const TRAPS: &str = "outpost_handler_traps_total";
/// How long calls took (wall clock, waits for the device included), by handler.
pub const DURATION: &str = "outpost_handler_call_duration_seconds";

/// Registers the descriptions (the `# HELP` lines).
pub fn describe() {
    metrics::describe_counter!(
        CALLS,
        "Calls into vendor update handlers, by handler, export and result (ok, trap, wall-clock, host)."
    );
    metrics::describe_counter!(
        TRAPS,
        "Handler calls that trapped, by handler and kind (CPU time limit, memory limit, stack overflow, panic, ...)."
    );
    metrics::describe_histogram!(
        DURATION,
        metrics::Unit::Seconds,
        "Wall-clock time of handler calls, waits for the device included, by handler."
    );
}
