#!/bin/sh
# {{ banner[0] }}
# Debian's objects/localhost.cfg defines hostgroup linux-servers, which the generated hostgroups.cfg defines
# too (nagios refuses duplicates): stop reading it, then check the whole configuration and reload.
set -eu
cfg=/etc/nagios4/nagios.cfg
sed -i 's|^cfg_file=/etc/nagios4/objects/localhost.cfg$|#&|' "$cfg"
nagios4 -v "$cfg" >/dev/null || { nagios4 -v "$cfg" >&2; exit 1; }
systemctl reload-or-restart nagios4
