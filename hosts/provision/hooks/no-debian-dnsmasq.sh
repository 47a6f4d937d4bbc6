#!/bin/sh
# {{ banner[0] }}
# The provision server's dnsmasq is the one `invoke provision-server` starts (--conf-file, bound to the provision
# interface). Earlier versions of this recipe installed Debian's dnsmasq service with an /etc/dnsmasq.d include
# reading the same configuration: the two would answer on the same interface. Stop and disable that service and
# drop the include; then run `invoke provision-server` again. Nothing to do where the service was never installed.
set -eu
rm -f /etc/dnsmasq.d/kvmconf.conf
if [ -e /lib/systemd/system/dnsmasq.service ]; then
    systemctl disable --now dnsmasq.service
fi
