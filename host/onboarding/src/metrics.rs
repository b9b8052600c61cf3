//! What onboarding counts for `/metrics` (through the `metrics` facade; the gateway
//! installs the Prometheus recorder and renders it).

/// Onboarding runs started.
pub const RUNS: &str = "outpost_onboarding_runs_total";
/// Devices that finished an onboarding attempt, by outcome (the lobby state it left the
/// device in: `provisioned`, `claimed`, `failed`, ...).
pub const DEVICES: &str = "outpost_onboarding_devices_total";
/// How long one device's onboarding took, by outcome.
pub const DURATION: &str = "outpost_onboarding_duration_seconds";

/// Registers the descriptions (the `# HELP` lines).
pub fn describe() {
    metrics::describe_counter!(RUNS, "Onboarding runs started.");
    metrics::describe_counter!(
        DEVICES,
        "Devices that finished an onboarding attempt, by outcome (the lobby state reached)."
    );
    metrics::describe_histogram!(
        DURATION,
        metrics::Unit::Seconds,
        "Time one device's onboarding took, from the start of its session to its outcome."
    );
}
