-- Node certificates taken back; as SQLite's up.sql of this number.
CREATE TABLE revoked_certs (
    fingerprint  TEXT PRIMARY KEY NOT NULL,
    mac          TEXT NOT NULL,
    cert_pem     TEXT NOT NULL,
    revoked_at   BIGINT NOT NULL,
    reason       TEXT NOT NULL
);
