-- Schema 2: the durable outbox for messages bound for the cloud.
--
-- A message is written here before anything is sent and deleted only after the
-- broker acknowledged it, so a crash or a dead uplink loses nothing. Lower
-- `priority` goes first (registrations and results before telemetry); within a
-- priority, `seq` keeps the order of writing. `message_id` lets the cloud
-- de-duplicate the at-least-once redeliveries.
CREATE TABLE outbox (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT    NOT NULL UNIQUE,
    topic      TEXT    NOT NULL,
    payload    BLOB    NOT NULL,
    qos        INTEGER NOT NULL DEFAULT 1 CHECK (qos IN (0, 1, 2)),
    priority   INTEGER NOT NULL CHECK (priority >= 0),
    created_at INTEGER NOT NULL,  -- unix milliseconds
    expires_at INTEGER NOT NULL,  -- unix milliseconds; expired rows are dropped and counted
    attempts   INTEGER NOT NULL DEFAULT 0
) STRICT;

CREATE INDEX outbox_send_order ON outbox (priority, seq);
CREATE INDEX outbox_expiry ON outbox (expires_at);
