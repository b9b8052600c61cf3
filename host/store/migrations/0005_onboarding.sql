-- Schema 5: onboarding targets (the imported device manifest) and claims.

-- One row per device the operator wants onboarded, from `outpost onboard import`.
-- `key` is the device's BLE name or MAC address (BLE) or its name (SoftAP). The PoP
-- and SRP password are the device's own per-unit secrets (printed on its label/QR):
-- they live only in this state database, which is private to the gateway.
CREATE TABLE onboarding_targets (
    name            TEXT    PRIMARY KEY NOT NULL,
    device_type     TEXT    NOT NULL,
    transport       TEXT    NOT NULL CHECK (transport IN ('ble', 'softap')),
    mac             TEXT,
    address         TEXT,             -- host:port for SoftAP
    security        INTEGER NOT NULL CHECK (security IN (0, 1, 2)),
    pop             TEXT,
    username        TEXT,
    password        TEXT,
    imported_at     INTEGER NOT NULL, -- unix milliseconds
    last_attempt_at INTEGER,
    last_error      TEXT
) STRICT;

-- Certificates obtained through assisted claiming. `reported_at` stays NULL until the
-- cloud uplink has reported the claim (claims made offline wait for it).
CREATE TABLE claims (
    device_id   TEXT    PRIMARY KEY NOT NULL,
    node_id     TEXT    NOT NULL,
    certificate TEXT    NOT NULL,
    authority   TEXT    NOT NULL,     -- 'local-ca:<subject>' or 'cloud'
    claimed_at  INTEGER NOT NULL,
    reported_at INTEGER
) STRICT;

CREATE INDEX claims_unreported ON claims (claimed_at) WHERE reported_at IS NULL;
