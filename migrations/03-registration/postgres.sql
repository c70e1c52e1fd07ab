-- Registration steps and node certificates; as SQLite's up.sql of this number.
CREATE TABLE register_steps (
    mac        TEXT NOT NULL REFERENCES machines (mac) ON DELETE CASCADE,
    seq        BIGINT NOT NULL,
    name       TEXT NOT NULL,
    status     TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    exit_code  BIGINT,
    output     TEXT NOT NULL DEFAULT '',
    at         BIGINT NOT NULL,
    PRIMARY KEY (mac, name)
);

CREATE TABLE node_certs (
    mac          TEXT PRIMARY KEY NOT NULL REFERENCES machines (mac) ON DELETE CASCADE,
    cert_pem     TEXT NOT NULL,
    fingerprint  TEXT NOT NULL,
    subject      TEXT NOT NULL,
    signed_at    BIGINT NOT NULL
);
