-- Schema 8: tokens for the local API, each with a role.
--
-- Only the SHA-256 of a token is kept; the token itself is shown once, when it is made.
-- The admin token from the config (or <state_dir>/admin-token) is not stored here: it
-- is the bootstrap admin that makes the others.
CREATE TABLE api_tokens (
    name         TEXT    PRIMARY KEY NOT NULL,
    role         TEXT    NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    token_sha256 BLOB    NOT NULL UNIQUE CHECK (length(token_sha256) = 32),
    created_at   INTEGER NOT NULL  -- unix milliseconds
) STRICT;
