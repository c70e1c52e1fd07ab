-- Registration (the registrar's steps over SSH) and node certificates.

-- Progress of the current registration run: one row per finished (or failed) role step.
-- A fresh run (phone-home, `provision register`) clears the machine's rows; a daemon restart
-- keeps them, so a run interrupted by a crash resumes at its first step without an 'ok' row.
CREATE TABLE register_steps (
    mac        TEXT NOT NULL REFERENCES machines (mac) ON DELETE CASCADE,
    seq        INTEGER NOT NULL,
    name       TEXT NOT NULL,
    status     TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    exit_code  INTEGER,
    output     TEXT NOT NULL DEFAULT '',
    at         INTEGER NOT NULL,
    PRIMARY KEY (mac, name)
);

-- The certificate provision's CA signed for a node's own key (the key never leaves the node).
-- Kept so a re-registration of the same key reuses it (registering again changes nothing) and
-- so controllers can read the fingerprint from the inventory.
CREATE TABLE node_certs (
    mac          TEXT PRIMARY KEY NOT NULL REFERENCES machines (mac) ON DELETE CASCADE,
    cert_pem     TEXT NOT NULL,
    fingerprint  TEXT NOT NULL,
    subject      TEXT NOT NULL,
    signed_at    INTEGER NOT NULL
);
