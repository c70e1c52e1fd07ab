-- When the machine entered its current state; as SQLite's up.sql of this number.
ALTER TABLE machines ADD COLUMN state_at BIGINT NOT NULL DEFAULT 0;
UPDATE machines SET state_at = updated_at;
