-- Schema 3: the per-handler key-value state behind the handler world's `state` import.
-- Each handler sees only its own keys; its quota is checked against the sum of
-- length(key) + length(value) over its rows, in the same transaction as the write.
CREATE TABLE handler_state (
    handler    TEXT    NOT NULL,
    key        TEXT    NOT NULL,
    value      BLOB    NOT NULL,
    updated_at INTEGER NOT NULL,  -- unix milliseconds
    PRIMARY KEY (handler, key)
) STRICT, WITHOUT ROWID;
