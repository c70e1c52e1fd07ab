-- Files every daemon sharing this database must hold the same copy of (the node CA, the
-- daemon's SSH key, the admin token), each sealed with the daemons' --secret-key-file; as
-- SQLite's up.sql of this number. A row is written once, by the first daemon that has the
-- file, and never replaced: the others take it.
CREATE TABLE shared_files (
    name        TEXT PRIMARY KEY NOT NULL,
    sealed      BYTEA NOT NULL,
    created_at  BIGINT NOT NULL
);
