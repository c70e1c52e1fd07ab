-- Discovery rules, and what a discovered machine's DHCP requests said; as SQLite's up.sql of
-- this number.
ALTER TABLE machines ADD COLUMN vendor_class TEXT;
ALTER TABLE machines ADD COLUMN user_class TEXT;
ALTER TABLE machines ADD COLUMN dhcp_interface TEXT;
ALTER TABLE machines ADD COLUMN dhcp_relay TEXT;
ALTER TABLE machines ADD COLUMN proposed_rule TEXT;

CREATE TABLE rules (
    name        TEXT PRIMARY KEY NOT NULL,
    priority    BIGINT NOT NULL DEFAULT 100,
    enabled     BIGINT NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
    mode        TEXT NOT NULL DEFAULT 'enroll' CHECK (mode IN ('enroll', 'propose')),
    conditions  TEXT NOT NULL DEFAULT '{}',
    profile     TEXT,
    hostname    TEXT,
    labels      TEXT NOT NULL DEFAULT '{}',
    vars        TEXT NOT NULL DEFAULT '{}',
    -- `used` only grows (an index is never given twice), by a compare-and-set against `max`
    max         BIGINT CHECK (max IS NULL OR max >= 1),
    used        BIGINT NOT NULL DEFAULT 0,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);
