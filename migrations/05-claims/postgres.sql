-- Boot requests are claims: boot_ip is what they said, last_ip only what a phone-home (or the
-- operator) set; install tokens name the address they were issued to. As SQLite's up.sql of
-- this number.
ALTER TABLE machines ADD COLUMN boot_ip TEXT;
UPDATE machines SET boot_ip = last_ip;
UPDATE machines SET last_ip = NULL WHERE state IN ('discovered', 'enrolled', 'installing');
ALTER TABLE install_tokens ADD COLUMN ip TEXT;
