-- Schema 7: rollouts (deployments acted on) and each targeted device's progress.

-- A deployment the gateway carries out: from the cloud (a signed manifest and rollout
-- settings over the uplink) or created locally for an offline site. `spec` holds the
-- rollout settings (target selector, waves, thresholds, priority, start, window) as JSON.
CREATE TABLE rollouts (
    id          TEXT    PRIMARY KEY NOT NULL,
    origin      TEXT    NOT NULL CHECK (origin IN ('cloud', 'local')),
    manifest    TEXT    NOT NULL,           -- the signed manifest (JWS), as received
    update_id   TEXT    NOT NULL,           -- provider/name/version
    spec        TEXT    NOT NULL CHECK (json_valid(spec)),
    state       TEXT    NOT NULL,           -- scheduled|running|paused|stopped|cancelled|finished
    wave        INTEGER NOT NULL DEFAULT 0, -- the wave in progress (0-based)
    reason      TEXT,                       -- why it paused or stopped
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    finished_at INTEGER
) STRICT;

-- One row per targeted device, fixed when the rollout starts (its wave too).
CREATE TABLE rollout_devices (
    rollout_id  TEXT    NOT NULL REFERENCES rollouts (id) ON DELETE CASCADE,
    device_id   TEXT    NOT NULL,
    wave        INTEGER NOT NULL,
    status      TEXT    NOT NULL,           -- pending|running|succeeded|failed|cancelled|skipped
    step        TEXT,                       -- the handler step under way or last run
    progress    INTEGER,                    -- percent, as the device reported it
    result      TEXT    CHECK (result IS NULL OR json_valid(result)), -- ADU lastInstallResult
    attempts    INTEGER NOT NULL DEFAULT 0,
    started_at  INTEGER,
    finished_at INTEGER,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (rollout_id, device_id)
) STRICT, WITHOUT ROWID;

CREATE INDEX rollout_devices_by_device ON rollout_devices (device_id);

-- Inbound deployments are consumed into rollouts; remember what became of each.
ALTER TABLE inbound_deployments ADD COLUMN outcome TEXT;
