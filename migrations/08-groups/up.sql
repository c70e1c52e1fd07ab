-- Groups: values many machines share, chosen by a label selector.
--
-- A machine's profile may now come from a group, so an enrolled (or later) machine's own
-- profile may be NULL: the rule that it always has one, its own or a group's, is kept by the
-- inventory (a group change that would take the last one away is refused), which SQLite's
-- CHECK cannot see. The table is rebuilt without that CHECK (SQLite cannot drop one); the
-- inventory opens the database with foreign keys off while it migrates, so dropping the old
-- table cascades to nothing.

CREATE TABLE machines_new (
    mac            TEXT PRIMARY KEY NOT NULL,
    uuid           TEXT,
    serial         TEXT,
    hostname       TEXT,
    -- the machine's own profile; NULL: none, or its groups'
    profile        TEXT,
    state          TEXT NOT NULL CHECK (state IN ('discovered', 'enrolled', 'installing',
                       'installed', 'registering', 'registered', 'handed_off', 'failed')),
    -- JSON objects of string → string: the machine's own; its groups' are added when read
    vars           TEXT NOT NULL DEFAULT '{}',
    labels         TEXT NOT NULL DEFAULT '{}',
    generation     INTEGER NOT NULL DEFAULT 0,
    arch           TEXT,
    platform       TEXT,
    last_ip        TEXT,
    failed_step    TEXT,
    failed_reason  TEXT,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL,
    last_seen      INTEGER,
    boot_ip        TEXT,
    state_at       INTEGER NOT NULL DEFAULT 0
);
INSERT INTO machines_new (mac, uuid, serial, hostname, profile, state, vars, labels, generation,
    arch, platform, last_ip, failed_step, failed_reason, created_at, updated_at, last_seen,
    boot_ip, state_at)
SELECT mac, uuid, serial, hostname, profile, state, vars, labels, generation, arch, platform,
    last_ip, failed_step, failed_reason, created_at, updated_at, last_seen, boot_ip, state_at
FROM machines;
DROP TABLE machines;
ALTER TABLE machines_new RENAME TO machines;
CREATE INDEX machines_state ON machines (state);
CREATE INDEX machines_discovered_seen ON machines (last_seen) WHERE state = 'discovered';
CREATE INDEX machines_reservation ON machines (json_extract(vars, '$.ip'))
    WHERE json_extract(vars, '$.ip') IS NOT NULL;

CREATE TABLE groups (
    name        TEXT PRIMARY KEY NOT NULL,
    -- JSON objects of string → string; an empty selector selects every machine
    selector    TEXT NOT NULL DEFAULT '{}',
    profile     TEXT,
    vars        TEXT NOT NULL DEFAULT '{}',
    labels      TEXT NOT NULL DEFAULT '{}',
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);
