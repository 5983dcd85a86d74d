#!/bin/sh
# deploy/docker/postgres-entrypoint.sh — entrypoint of the local image vigil-postgres:local (built
# by build-images.sh from the machine's PostgreSQL 15 binaries, no registry needed). Understands
# the same variables as the official `postgres` image, so docker-compose.yml works with either:
#   POSTGRES_USER (default vigil), POSTGRES_PASSWORD (required unless POSTGRES_HOST_AUTH_METHOD
#   is trust), POSTGRES_DB (default: POSTGRES_USER), PGDATA (default /var/lib/postgresql/data/pgdata).
# On first start (empty PGDATA) it runs initdb, creates the role and database, and allows
# password logins (scram-sha-256) from any address; then it runs postgres on 0.0.0.0:5432.
# Connections over the Unix socket inside the container are trusted (initdb's local auth), as in
# the official image: whoever can exec into the container owns the data files anyway.
# Runs as the `postgres` user (the image's USER); initdb and postgres refuse to run as root.
set -eu

PGBIN=/usr/lib/postgresql/15/bin
log() { echo "postgres-entrypoint: $*" >&2; }
die() { echo "postgres-entrypoint: error: $*" >&2; exit 1; }

: "${PGDATA:=/var/lib/postgresql/data/pgdata}"
: "${POSTGRES_USER:=vigil}"
: "${POSTGRES_DB:=$POSTGRES_USER}"
: "${POSTGRES_HOST_AUTH_METHOD:=scram-sha-256}"
export PGDATA

[ "$(id -u)" != 0 ] || die "run this image as the postgres user, not root"

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ] && [ "$POSTGRES_HOST_AUTH_METHOD" != trust ]; then
        die "POSTGRES_PASSWORD is empty: set it (or POSTGRES_HOST_AUTH_METHOD=trust, for a throwaway demo only)"
    fi
    log "initialising a new cluster in $PGDATA"
    mkdir -p "$PGDATA"
    chmod 700 "$PGDATA"
    "$PGBIN/initdb" -D "$PGDATA" -U postgres -E UTF8 --locale=C \
        --auth-local=trust --auth-host="$POSTGRES_HOST_AUTH_METHOD" >/dev/null
    # Start on the Unix socket only, so that no client (nor a health check over TCP) sees the
    # server before the role and database exist.
    "$PGBIN/pg_ctl" -D "$PGDATA" -w -s -o "-c listen_addresses='' -c jit=off" start
    esc() { printf '%s' "$1" | sed "s/'/''/g"; }
    q() { printf '"%s"' "$(printf '%s' "$1" | sed 's/"/""/g')"; }
    {
        if [ "$POSTGRES_USER" != postgres ]; then
            printf "CREATE ROLE %s LOGIN PASSWORD '%s';\n" "$(q "$POSTGRES_USER")" "$(esc "${POSTGRES_PASSWORD:-}")"
        elif [ -n "${POSTGRES_PASSWORD:-}" ]; then
            printf "ALTER ROLE postgres PASSWORD '%s';\n" "$(esc "$POSTGRES_PASSWORD")"
        fi
        if [ "$POSTGRES_DB" != postgres ]; then
            printf 'CREATE DATABASE %s OWNER %s;\n' "$(q "$POSTGRES_DB")" "$(q "$POSTGRES_USER")"
        fi
    } | "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -U postgres -d postgres >/dev/null
    "$PGBIN/pg_ctl" -D "$PGDATA" -w -s -m fast stop
    printf 'host all all all %s\n' "$POSTGRES_HOST_AUTH_METHOD" >>"$PGDATA/pg_hba.conf"
    log "cluster ready: role and database created"
fi

exec "$PGBIN/postgres" -D "$PGDATA" -c listen_addresses='*' -c jit=off "$@"
