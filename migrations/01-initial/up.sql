-- provision inventory, schema version 1.
-- Times are Unix milliseconds (UTC). MACs are normalised lower-case aa:bb:cc:dd:ee:ff.

CREATE TABLE machines (
    mac            TEXT PRIMARY KEY NOT NULL,
    uuid           TEXT,
    serial         TEXT,
    hostname       TEXT,
    profile        TEXT,
    state          TEXT NOT NULL CHECK (state IN ('discovered', 'enrolled', 'installing',
                       'installed', 'registering', 'registered', 'handed_off', 'failed')),
    -- JSON objects of string → string
    vars           TEXT NOT NULL DEFAULT '{}',
    labels         TEXT NOT NULL DEFAULT '{}',
    -- bumped by every reprovision; names the install a token belongs to
    generation     INTEGER NOT NULL DEFAULT 0,
    -- what the last boot request said about the machine
    arch           TEXT,
    platform       TEXT,
    last_ip        TEXT,
    failed_step    TEXT,
    failed_reason  TEXT,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL,
    -- an enrolled (or later) machine always knows what it installs
    CHECK (state = 'discovered' OR profile IS NOT NULL)
);
CREATE INDEX machines_state ON machines (state);

-- Append-only history. No foreign key: the history of a deleted machine is kept.
CREATE TABLE events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at          INTEGER NOT NULL,
    mac         TEXT,
    kind        TEXT NOT NULL,
    from_state  TEXT,
    to_state    TEXT,
    detail      TEXT NOT NULL DEFAULT ''
);
CREATE INDEX events_mac ON events (mac, id);

-- One install token per machine at most. Only the SHA-256 of the token is stored.
CREATE TABLE install_tokens (
    mac         TEXT PRIMARY KEY NOT NULL REFERENCES machines (mac) ON DELETE CASCADE,
    hash        TEXT NOT NULL UNIQUE,
    generation  INTEGER NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    burnt_at    INTEGER,
    -- when the installer fetched the profile's `local_boot_after` artifact: from then on the
    -- machine's network boots go to its local disk while it finishes and phones home
    handed_over_at INTEGER
);

-- SSH host public keys posted at phone-home, pinned for the registrar.
CREATE TABLE host_keys (
    mac         TEXT NOT NULL REFERENCES machines (mac) ON DELETE CASCADE,
    algorithm   TEXT NOT NULL,
    key         TEXT NOT NULL,
    added_at    INTEGER NOT NULL,
    PRIMARY KEY (mac, algorithm)
);
