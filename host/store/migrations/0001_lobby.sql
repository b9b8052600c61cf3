-- Schema 1: the device lobby and groups.

-- Every device the gateway knows, from first sight (BLE advert, device API
-- registration, manifest import) onwards. `compat` holds the compatibility
-- properties beyond manufacturer/model as a JSON object of strings (ADU's
-- compatPropertyNames draw from it).
CREATE TABLE devices (
    id               TEXT    PRIMARY KEY NOT NULL,
    device_type      TEXT    NOT NULL,
    manufacturer     TEXT,
    model            TEXT,
    compat           TEXT    NOT NULL DEFAULT '{}' CHECK (json_valid(compat)),
    firmware_version TEXT,
    state            TEXT    NOT NULL,
    created_at       INTEGER NOT NULL,  -- unix milliseconds
    updated_at       INTEGER NOT NULL,  -- unix milliseconds
    last_seen_at     INTEGER            -- unix milliseconds, NULL until first contact
) STRICT;

CREATE INDEX devices_by_type ON devices (device_type);
CREATE INDEX devices_by_state ON devices (state);

-- Named sets of devices, the unit a rollout targets.
CREATE TABLE groups (
    id          TEXT    PRIMARY KEY NOT NULL,
    name        TEXT    NOT NULL,
    description TEXT    NOT NULL DEFAULT '',
    created_at  INTEGER NOT NULL
) STRICT;

CREATE TABLE group_members (
    group_id  TEXT    NOT NULL REFERENCES groups (id) ON DELETE CASCADE,
    device_id TEXT    NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    added_at  INTEGER NOT NULL,
    PRIMARY KEY (group_id, device_id)
) STRICT, WITHOUT ROWID;

CREATE INDEX group_members_by_device ON group_members (device_id);
