-- The hot path and the bounds: when a machine last asked for anything, coalesced events, and
-- the indexes that eviction, retention and reservations read.

-- When a boot request (DHCP, TFTP attribution, /ipxe) last came from the machine, Unix ms.
-- Discovered machines over the cap are evicted least recently seen first. The index covers
-- discovered machines only, so a sighting of any other machine rewrites no index.
ALTER TABLE machines ADD COLUMN last_seen INTEGER;
UPDATE machines SET last_seen = updated_at;
CREATE INDEX machines_discovered_seen ON machines (last_seen) WHERE state = 'discovered';

-- DHCP reservations (the `ip` variable) without scanning every machine.
CREATE INDEX machines_reservation ON machines (json_extract(vars, '$.ip'))
    WHERE json_extract(vars, '$.ip') IS NOT NULL;

-- How many identical observations (same machine, kind and detail, in one write batch) the row
-- stands for.
ALTER TABLE events ADD COLUMN count INTEGER NOT NULL DEFAULT 1;
