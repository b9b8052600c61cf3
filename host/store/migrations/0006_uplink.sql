-- Schema 6: the cloud uplink's own state.

-- Running totals the operator sees in `outpost uplink status`: messages refused because
-- the outbox was full, dropped because their time to live ran out, and delivered.
CREATE TABLE outbox_counters (
    name  TEXT    PRIMARY KEY NOT NULL CHECK (name IN ('refused', 'expired', 'delivered')),
    value INTEGER NOT NULL DEFAULT 0
) STRICT;
INSERT INTO outbox_counters (name, value) VALUES ('refused', 0), ('expired', 0), ('delivered', 0);

-- The cached registration result (one row): where the gateway was assigned and with
-- which identity. Reused at every start; replaced only when it stops working.
CREATE TABLE uplink_assignment (
    id            INTEGER PRIMARY KEY CHECK (id = 1),
    assignment    TEXT    NOT NULL,   -- JSON, the registration response's assignment
    registered_at INTEGER NOT NULL    -- unix milliseconds
) STRICT;

-- Desired state from the cloud, per target ('gateway' or a device id), latest version.
CREATE TABLE desired_state (
    target      TEXT    PRIMARY KEY NOT NULL,
    version     INTEGER NOT NULL,
    body        TEXT    NOT NULL,     -- JSON
    received_at INTEGER NOT NULL
) STRICT;

-- Deployments received from the cloud, kept for the rollout engine.
CREATE TABLE inbound_deployments (
    id          TEXT    PRIMARY KEY NOT NULL,
    body        TEXT    NOT NULL,     -- JSON, as received
    received_at INTEGER NOT NULL
) STRICT;

-- Per-device credentials for the local device API: only the SHA-256 of the token.
CREATE TABLE device_credentials (
    device_id    TEXT PRIMARY KEY NOT NULL,
    token_sha256 BLOB NOT NULL UNIQUE CHECK (length(token_sha256) = 32),
    created_at   INTEGER NOT NULL
) STRICT;

-- Retained messages (gateway status, reported state) go through the outbox too.
ALTER TABLE outbox ADD COLUMN retain INTEGER NOT NULL DEFAULT 0 CHECK (retain IN (0, 1));
