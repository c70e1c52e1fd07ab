-- Discovery rules, and what a discovered machine's DHCP requests said (for their conditions).

-- What the machine's last DHCP request said: option 60 and option 77, and the interface it
-- arrived on or the relay (giaddr) it came through. Observations, like arch and platform.
ALTER TABLE machines ADD COLUMN vendor_class TEXT;
ALTER TABLE machines ADD COLUMN user_class TEXT;
ALTER TABLE machines ADD COLUMN dhcp_interface TEXT;
ALTER TABLE machines ADD COLUMN dhcp_relay TEXT;
-- A propose-mode rule that matches this discovered machine, waiting for an operator.
ALTER TABLE machines ADD COLUMN proposed_rule TEXT;

CREATE TABLE rules (
    name        TEXT PRIMARY KEY NOT NULL,
    priority    INTEGER NOT NULL DEFAULT 100,
    enabled     INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
    mode        TEXT NOT NULL DEFAULT 'enroll' CHECK (mode IN ('enroll', 'propose')),
    -- JSON object: fact or label → value (a trailing * matches a prefix)
    conditions  TEXT NOT NULL DEFAULT '{}',
    profile     TEXT,
    hostname    TEXT,
    labels      TEXT NOT NULL DEFAULT '{}',
    vars        TEXT NOT NULL DEFAULT '{}',
    -- most machines it enrolls (NULL: no limit), and how many it has: the n-th gets index n.
    -- `used` only grows (an index is never given twice), by a compare-and-set against `max`.
    max         INTEGER CHECK (max IS NULL OR max >= 1),
    used        INTEGER NOT NULL DEFAULT 0,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);
