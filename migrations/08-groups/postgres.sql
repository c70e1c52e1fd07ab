-- Groups; as SQLite's up.sql of this number. A machine's profile may now come from a group,
-- so the CHECK that an enrolled machine has its own goes (SQLite rebuilds the table for it;
-- PostgreSQL drops the constraint). The inventory keeps the rule that every machine past
-- discovery has a profile, its own or a group's.
ALTER TABLE machines DROP CONSTRAINT machines_profile_known;

CREATE TABLE groups (
    name        TEXT PRIMARY KEY NOT NULL,
    -- JSON objects of string → string; an empty selector selects every machine
    selector    TEXT NOT NULL DEFAULT '{}',
    profile     TEXT,
    vars        TEXT NOT NULL DEFAULT '{}',
    labels      TEXT NOT NULL DEFAULT '{}',
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);
