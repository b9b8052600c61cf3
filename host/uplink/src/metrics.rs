//! What the uplink and the outbox count for `/metrics` (through the `metrics` facade;
//! the gateway installs the Prometheus recorder and renders it). Queue depths and the
//! link state are read when a scrape comes ([`Outbox::depth`](crate::Outbox::depth),
//! [`Uplink::status`](crate::Uplink::status)).

/// MQTT publishes handed to the broker (QoS 1), including re-sends after a reconnect.
pub const PUBLISHED: &str = "outpost_uplink_published_total";
/// PUBACKs received.
pub const ACKED: &str = "outpost_uplink_acked_total";
/// Messages an MQTT 5 broker refused for good in its PUBACK (dropped).
pub const REFUSED_BY_BROKER: &str = "outpost_uplink_refused_by_broker_total";
/// Messages the outbox refused because it was full, by priority.
pub const OUTBOX_REFUSED: &str = "outpost_outbox_refused_total";
/// Messages whose time to live ran out before delivery, by priority.
pub const OUTBOX_EXPIRED: &str = "outpost_outbox_expired_total";
/// Outbox rows that could not be read back (damaged; left to expire).
pub const OUTBOX_UNREADABLE: &str = "outpost_outbox_unreadable_rows_total";

/// Handles to the counters every publish and PUBACK moves, taken once per connection
/// (a `counter!` lookup per message was ~3% of the gateway's CPU under load). Take it
/// after the process's recorder is installed: a handle from before counts nowhere.
pub(crate) struct Delivery {
    /// [`PUBLISHED`].
    pub(crate) published: metrics::Counter,
    /// [`ACKED`].
    pub(crate) acked: metrics::Counter,
}

impl Delivery {
    /// The handles from the installed recorder.
    pub(crate) fn new() -> Self {
        Self {
            published: metrics::counter!(PUBLISHED),
            acked: metrics::counter!(ACKED),
        }
    }
}

/// Registers the descriptions (the `# HELP` lines).
pub fn describe() {
    metrics::describe_counter!(
        PUBLISHED,
        "MQTT publishes handed to the broker (QoS 1), re-sends included."
    );
    metrics::describe_counter!(ACKED, "MQTT PUBACKs received from the broker.");
    metrics::describe_counter!(
        REFUSED_BY_BROKER,
        "Messages an MQTT 5 broker refused for good in its PUBACK (not authorised, an invalid topic or payload); dropped."
    );
    metrics::describe_counter!(
        OUTBOX_REFUSED,
        "Messages the outbox refused because it was at its limits, by priority."
    );
    metrics::describe_counter!(
        OUTBOX_EXPIRED,
        "Messages dropped undelivered when their time to live ran out, by priority."
    );
    metrics::describe_counter!(
        OUTBOX_UNREADABLE,
        "Outbox rows that could not be read back (damaged); skipped and left to expire."
    );
}
