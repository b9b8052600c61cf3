//! What the rollout engine shows on `/metrics` (through the `metrics` facade; the
//! gateway installs the Prometheus recorder and sets this gauge when a scrape comes, from
//! [`Rollouts::devices_by_status`](crate::Rollouts::devices_by_status)).

/// Devices targeted by rollouts (all rollouts the gateway keeps), by status.
pub const DEVICES: &str = "outpost_rollout_devices";

/// Registers the description (the `# HELP` line).
pub fn describe() {
    metrics::describe_gauge!(
        DEVICES,
        "Devices targeted by the rollouts the gateway keeps, by status (pending, running, succeeded, failed, cancelled, skipped)."
    );
}
