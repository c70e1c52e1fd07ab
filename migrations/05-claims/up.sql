-- Install claims need evidence, and boot requests are claims.
--
-- boot_ip: the address a machine's boot requests (DHCP, TFTP, /ipxe) came from, an
-- observation. last_ip is the address provision SSHes to and hands to Ansible: from now on set
-- only by a phone-home (behind a live install token from the address the token was issued to)
-- or by the operator (vars.ssh_host). Before, any later /ipxe rewrote it. Machines that never
-- phoned home keep their address only as boot_ip; for the others, last_ip stays (it was set
-- by their phone-home, though a later boot request may have overwritten it).
ALTER TABLE machines ADD COLUMN boot_ip TEXT;
UPDATE machines SET boot_ip = last_ip;
UPDATE machines SET last_ip = NULL WHERE state IN ('discovered', 'enrolled', 'installing');

-- The address an install token was issued to: configs and phone-homes from another address
-- are refused, and a live token is not replaced by a request from another address. NULL for
-- tokens issued before this migration (not checked).
ALTER TABLE install_tokens ADD COLUMN ip TEXT;
