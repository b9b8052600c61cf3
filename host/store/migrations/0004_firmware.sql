-- Schema 4: the firmware cache. Blob bytes live in files named by their sha256 under the
-- state directory's firmware/ folder; these tables hold what is known about them.

-- One row per verified, complete blob on disk. A row is written only after the file has
-- been fsynced, checked against its size and sha256, and renamed into place.
CREATE TABLE firmware_blobs (
    sha256      TEXT    NOT NULL PRIMARY KEY,  -- lowercase hex
    size        INTEGER NOT NULL CHECK (size >= 0),
    source      TEXT    NOT NULL CHECK (source IN ('manifest', 'import')),
    origin      TEXT    NOT NULL,              -- the URL fetched, or the imported file's name
    added_at    INTEGER NOT NULL,              -- unix milliseconds
    last_access INTEGER NOT NULL               -- unix milliseconds; drives LRU eviction
) STRICT, WITHOUT ROWID;

-- Who needs a blob kept: a pinned blob is never evicted. A holder is a free-form name,
-- such as "deployment:<id>".
CREATE TABLE firmware_pins (
    sha256    TEXT    NOT NULL,
    holder    TEXT    NOT NULL,
    pinned_at INTEGER NOT NULL,
    PRIMARY KEY (sha256, holder)
) STRICT, WITHOUT ROWID;

-- Update manifests whose signature verified, kept in their signed (JWS compact) form.
CREATE TABLE update_manifests (
    id          TEXT    NOT NULL PRIMARY KEY,  -- provider/name/version
    signer      TEXT    NOT NULL,              -- the trusted key's name (the JWS kid)
    jws         TEXT    NOT NULL,
    received_at INTEGER NOT NULL
) STRICT;

-- The files each manifest names: only these may be fetched from upstream.
CREATE TABLE manifest_files (
    manifest_id TEXT    NOT NULL REFERENCES update_manifests (id) ON DELETE CASCADE,
    sha256      TEXT    NOT NULL,
    size        INTEGER NOT NULL CHECK (size >= 0),
    name        TEXT    NOT NULL,
    url         TEXT,
    PRIMARY KEY (manifest_id, sha256)
) STRICT;
CREATE INDEX manifest_files_by_sha256 ON manifest_files (sha256);

-- Upstream downloads that have not completed: what resuming needs and the last error.
CREATE TABLE firmware_downloads (
    sha256     TEXT    NOT NULL PRIMARY KEY,
    url        TEXT    NOT NULL,
    etag       TEXT,                           -- the origin's validator, sent as If-Range
    attempts   INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    updated_at INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

-- Bytes served to each client (a device id, or the peer address when none is given).
CREATE TABLE firmware_served (
    sha256   TEXT    NOT NULL,
    client   TEXT    NOT NULL,
    bytes    INTEGER NOT NULL,
    requests INTEGER NOT NULL,
    last_at  INTEGER NOT NULL,
    PRIMARY KEY (sha256, client)
) STRICT, WITHOUT ROWID;
