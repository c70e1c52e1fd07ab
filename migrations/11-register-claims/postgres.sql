-- Which daemon runs a machine's registration, and until when; as SQLite's up.sql of this
-- number. A claim is taken (and renewed) by one upsert whose own WHERE lets it through only
-- if the row is free, ran out, or is already the claimer's.
CREATE TABLE register_claims (
    mac     TEXT PRIMARY KEY NOT NULL REFERENCES machines (mac) ON DELETE CASCADE,
    daemon  TEXT NOT NULL,
    until   BIGINT NOT NULL
);
