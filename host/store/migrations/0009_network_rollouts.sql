-- Rollouts that change a setting on the devices instead of their firmware: first, a
-- Wi-Fi credential rotation (`outpost wifi rotate`). `kind` says which; for 'wifi',
-- `network` holds the rotation (JSON: ssid, passphrase, fallbackSecs) and `manifest` is
-- empty. The passphrase is dropped (set to null in `network`) when the rollout ends.
ALTER TABLE rollouts ADD COLUMN kind TEXT NOT NULL DEFAULT 'update'
    CHECK (kind IN ('update', 'wifi'));
ALTER TABLE rollouts ADD COLUMN network TEXT CHECK (network IS NULL OR json_valid(network));
