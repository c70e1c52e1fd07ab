#!/bin/sh
# provision phone-home: post this host's SSH public host keys once, so provision can pin them.
set -eu
[ -e /var/lib/provision/phoned-home ] && exit 0
ssh-keygen -A >/dev/null
cat /etc/ssh/ssh_host_*_key.pub | curl -fsS --retry 10 -H 'Content-Type: text/plain' --data-binary @- {{ phone_home_url|shell }}
mkdir -p /var/lib/provision
touch /var/lib/provision/phoned-home
