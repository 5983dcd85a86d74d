#!/bin/sh
# deploy/docker/healthcheck.sh — container health checks for the Vigil images, with nothing but a
# POSIX shell and awk (busybox or Debian): reads the container's own /proc/net/tcp{,6}.
#
#   vigil-healthcheck listen PORT      healthy when something listens on TCP PORT (collector, testsvc)
#   vigil-healthcheck connected PORT   healthy when an established connection goes to remote TCP
#                                      PORT (the agent's stream to the collector)
set -eu

usage() { echo "usage: vigil-healthcheck listen|connected PORT" >&2; exit 2; }
[ $# -eq 2 ] || usage
mode="$1"
port="$2"
case "$port" in '' | *[!0-9]*) usage ;; esac
hex="$(printf '%04X' "$port")"

case "$mode" in
    listen) field=2 state=0A ;;    # local address, TCP_LISTEN
    connected) field=3 state=01 ;; # remote address, TCP_ESTABLISHED
    *) usage ;;
esac

if cat /proc/net/tcp /proc/net/tcp6 2>/dev/null |
    awk -v f="$field" -v p="$hex" -v s="$state" '
        { n = split($f, a, ":"); if (toupper(a[n]) == p && $4 == s) found = 1 }
        END { exit found ? 0 : 1 }'; then
    exit 0
fi
if [ "$mode" = listen ]; then
    echo "unhealthy: nothing listens on TCP port $port" >&2
else
    echo "unhealthy: no established connection to TCP port $port (collector unreachable?)" >&2
fi
exit 1
