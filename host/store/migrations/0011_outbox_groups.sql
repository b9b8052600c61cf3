-- Schema 11: telemetry in groups. The telemetry of one group commit (a batch POST, or
-- many devices' single records that queued up together) is stored as a few rows of up to
-- 128 messages each rather than a row per message: every message keeps its own id and
-- is published and acknowledged on its own, but the database writes (and later deletes)
-- one row and its index entries per group. A group row's `payload` holds its messages
-- (id, topic and payload of each, length-prefixed); `message_id` and `topic` are its
-- first message's. A row of one message is as before (`batch` 1).
ALTER TABLE outbox ADD COLUMN batch INTEGER NOT NULL DEFAULT 1 CHECK (batch BETWEEN 1 AND 128);
-- A group's payload bytes (its messages' payloads, what the limits count); NULL for a
-- row of one message, whose payload is just that.
ALTER TABLE outbox ADD COLUMN payload_bytes INTEGER CHECK (payload_bytes IS NULL OR payload_bytes >= 0);

-- (priority, seq) is covered by outbox_lane_order (lane, priority, seq): every read
-- names its lane. One index fewer to update per insert and delete.
DROP INDEX outbox_send_order;
