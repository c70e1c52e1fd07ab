-- DHCP leases for address mode (dhcp_mode = "full"); as SQLite's up.sql of this number.
-- Two daemons offering from one pool take an address with one upsert whose own WHERE decides
-- who gets it.
CREATE TABLE leases (
    ip          TEXT PRIMARY KEY NOT NULL,
    mac         TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('offered', 'bound', 'declined')),
    expires_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);
CREATE INDEX leases_mac ON leases (mac);
