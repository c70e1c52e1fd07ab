-- DHCP leases for address mode (dhcp_mode = "full"). One row per address; a lease is live
-- while expires_at is in the future. State 'offered' holds an address between OFFER and
-- REQUEST; 'bound' after ACK; 'declined' quarantines an address a client found in use.
CREATE TABLE leases (
    ip          TEXT PRIMARY KEY NOT NULL,
    mac         TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('offered', 'bound', 'declined')),
    expires_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);
CREATE INDEX leases_mac ON leases (mac);
