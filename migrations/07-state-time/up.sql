-- When the machine entered its current state (updated_at also moves with edits of its vars,
-- labels or hostname): the web UI's "in state" column and the dashboard's late installs.
ALTER TABLE machines ADD COLUMN state_at INTEGER NOT NULL DEFAULT 0;
UPDATE machines SET state_at = updated_at;
