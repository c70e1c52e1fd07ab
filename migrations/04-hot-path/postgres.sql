-- When a machine last asked for anything, coalesced events, and the indexes eviction,
-- retention and reservations read; as SQLite's up.sql of this number.
ALTER TABLE machines ADD COLUMN last_seen BIGINT;
UPDATE machines SET last_seen = updated_at;
CREATE INDEX machines_discovered_seen ON machines (last_seen) WHERE state = 'discovered';

-- DHCP reservations (the `ip` variable) without scanning every machine.
CREATE INDEX machines_reservation ON machines ((vars::json ->> 'ip'))
    WHERE (vars::json ->> 'ip') IS NOT NULL;

ALTER TABLE events ADD COLUMN count BIGINT NOT NULL DEFAULT 1;
