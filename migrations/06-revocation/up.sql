-- Node certificates taken back: a machine reprovisioned or deleted, or a node that came back
-- with a new key. The CA's revocation list (GET /pki/crl.pem) is made from these rows. A row
-- goes once its certificate has surely expired (node certificates last 13 months; rows older
-- than 400 days are removed when a new one is added), so the list stays the size of what is
-- still valid.
CREATE TABLE revoked_certs (
    fingerprint  TEXT PRIMARY KEY NOT NULL,
    mac          TEXT NOT NULL,
    cert_pem     TEXT NOT NULL,
    revoked_at   INTEGER NOT NULL,
    reason       TEXT NOT NULL
);
