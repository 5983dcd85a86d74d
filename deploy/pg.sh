#!/usr/bin/env bash
# deploy/pg.sh — a local PostgreSQL cluster for development, the demo and the tests.
#
#   deploy/pg.sh install              apt-get install postgresql if the server binaries are missing
#   deploy/pg.sh bin                  print the server binaries' directory (exit 1 if missing)
#   deploy/pg.sh start DIR PORT       initdb DIR (once), start it on 127.0.0.1:PORT, create role and
#                                     database `vigil`, print postgres://vigil@127.0.0.1:PORT/vigil
#   deploy/pg.sh stop DIR             stop the cluster in DIR (no-op if not running)
#   deploy/pg.sh status DIR           say whether it runs, and on which port (exit 3 if not running)
#   deploy/pg.sh url DIR PORT         print the application URL (vigil role)
#   deploy/pg.sh admin-url DIR PORT   print the superuser URL (role postgres; may CREATE DATABASE)
#   DIR defaults to $ROOT/.vigil/pg and PORT to 55432 when omitted.
#
# DIR holds the cluster in DIR/data and the server log in DIR/postgres.log. Authentication is
# `trust` and the server listens on 127.0.0.1 only: a development cluster, never a production one.
# initdb and postgres refuse to run as root, so as root they run as the `postgres` system user
# (which then owns DIR; every parent of DIR must be searchable by it, e.g. anything under /tmp).
# Extra server options: VIGIL_PG_OPTS (e.g. "-c fsync=off"), passed to postgres at start.
# The server binaries: VIGIL_PG_BIN, else the newest /usr/lib/postgresql/*/bin, else initdb on PATH.
# Messages go to stderr; only URLs go to stdout, so `url=$(deploy/pg.sh start DIR PORT)` works.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT

log() { printf 'pg.sh: %s\n' "$*" >&2; }
die() {
    printf 'pg.sh: error: %s\n' "$*" >&2
    exit 1
}

usage() {
    sed -n '3,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

is_root() { [ "$(id -u)" -eq 0 ]; }

# Directory of the server binaries, or nothing (exit 1).
find_pg_bin() {
    if [ -n "${VIGIL_PG_BIN:-}" ]; then
        [ -x "$VIGIL_PG_BIN/initdb" ] && [ -x "$VIGIL_PG_BIN/postgres" ] || return 1
        printf '%s\n' "$VIGIL_PG_BIN"
        return 0
    fi
    local best="" best_version=-1 dir version
    for dir in /usr/lib/postgresql/*/bin; do
        version="${dir#/usr/lib/postgresql/}"
        version="${version%/bin}"
        [[ "$version" =~ ^[0-9]+$ ]] || continue
        if [ ! -x "$dir/initdb" ] || [ ! -x "$dir/postgres" ]; then
            continue
        fi
        if [ "$version" -gt "$best_version" ]; then
            best="$dir"
            best_version="$version"
        fi
    done
    if [ -z "$best" ] && command -v initdb >/dev/null 2>&1; then
        dir="$(dirname "$(readlink -f "$(command -v initdb)")")"
        [ -x "$dir/postgres" ] && best="$dir"
    fi
    [ -n "$best" ] || return 1
    printf '%s\n' "$best"
}

pg_bin() {
    find_pg_bin || die "PostgreSQL server binaries not found; run deploy/pg.sh install or apt-get install postgresql"
}

# Runs a server program as the postgres user when we are root, from / (its home may be unreadable).
as_pg() {
    if is_root; then
        (cd / && runuser -u postgres -- "$@")
    else
        (cd / && "$@")
    fi
}

check_port() {
    if ! [[ "$1" =~ ^[0-9]+$ ]] || [ "$1" -lt 1 ] || [ "$1" -gt 65535 ]; then
        die "invalid port '$1'"
    fi
}

# Something accepts connections on 127.0.0.1:$1?
port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

abs_dir() {
    [ -n "$1" ] || die "DIR must not be empty"
    mkdir -p "$1"
    (cd "$1" && pwd)
}

# Port of the running cluster in DIR/data, from postmaster.pid (line 4).
running_port() {
    sed -n 4p "$1/data/postmaster.pid" 2>/dev/null
}

is_running() {
    local bin
    bin="$(pg_bin)"
    [ -f "$1/data/PG_VERSION" ] && as_pg "$bin/pg_ctl" -D "$1/data" status >/dev/null 2>&1
}

app_url() { printf 'postgres://vigil@127.0.0.1:%s/vigil\n' "$1"; }
admin_url() { printf 'postgres://postgres@127.0.0.1:%s/postgres\n' "$1"; }

cmd_install() {
    local bin
    if bin="$(find_pg_bin)"; then
        log "PostgreSQL server binaries already installed in $bin"
        return 0
    fi
    command -v apt-get >/dev/null 2>&1 ||
        die "PostgreSQL is missing and this is not a Debian/Ubuntu system: install the PostgreSQL server (initdb, postgres, pg_ctl) and set VIGIL_PG_BIN"
    local sudo=()
    if ! is_root; then
        command -v sudo >/dev/null 2>&1 || die "PostgreSQL is missing; run this as root (apt-get install postgresql)"
        sudo=(sudo)
    fi
    log "installing PostgreSQL with apt-get"
    "${sudo[@]}" apt-get update
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y --no-install-recommends postgresql
    bin="$(find_pg_bin)" || die "apt-get install postgresql succeeded but initdb/postgres are still missing"
    log "PostgreSQL server binaries installed in $bin"
}

cmd_start() {
    [ $# -eq 2 ] || usage
    local dir port bin
    check_port "$2"
    port="$2"
    bin="$(pg_bin)"
    dir="$(abs_dir "$1")"

    if is_root; then
        id postgres >/dev/null 2>&1 ||
            die "running as root but there is no 'postgres' user to run the server as; run deploy/pg.sh install"
        if [ ! -f "$dir/data/PG_VERSION" ]; then
            chown postgres: "$dir"
            chmod 700 "$dir"
        fi
        runuser -u postgres -- test -w "$dir" -a -x "$dir" 2>/dev/null ||
            die "the postgres user cannot write $dir: one of its parent directories is not searchable by other users (e.g. a 0700 home directory); use a directory under /tmp, or chmod o+x the parents"
    fi

    if is_running "$dir"; then
        local actual
        actual="$(running_port "$dir")"
        if [ -n "$actual" ] && [ "$actual" != "$port" ]; then
            log "the cluster in $dir is already running, on port $actual (not $port)"
            port="$actual"
        else
            log "the cluster in $dir is already running on port $port"
        fi
        app_url "$port"
        return 0
    fi

    if port_in_use "$port"; then
        die "port $port on 127.0.0.1 is already in use by another program; pick another port (or stop it)"
    fi

    if [ ! -f "$dir/data/PG_VERSION" ]; then
        if [ -e "$dir/data" ] && [ -n "$(ls -A "$dir/data" 2>/dev/null)" ]; then
            die "$dir/data exists, is not empty and holds no PostgreSQL cluster; remove it or pick another DIR"
        fi
        log "creating a cluster in $dir/data"
        local out
        if ! out="$(as_pg "$bin/initdb" -D "$dir/data" -A trust -U postgres -E UTF8 --locale=C 2>&1)"; then
            printf '%s\n' "$out" >&2
            die "initdb failed"
        fi
        # The unix socket goes in DIR when the path is short enough (sun_path is 108 bytes).
        local sockdir="$dir"
        [ "${#dir}" -lt 90 ] || sockdir=""
        {
            printf "\n# Added by deploy/pg.sh\n"
            printf "listen_addresses = '127.0.0.1'\n"
            printf "unix_socket_directories = '%s'\n" "$sockdir"
            printf "max_connections = 200\n"
        } | as_pg tee -a "$dir/data/postgresql.conf" >/dev/null
    fi

    log "starting PostgreSQL on 127.0.0.1:$port (log: $dir/postgres.log)"
    if ! as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 \
        -o "-p $port ${VIGIL_PG_OPTS:-}" start >/dev/null; then
        tail -n 20 "$dir/postgres.log" >&2 || true
        die "PostgreSQL failed to start (see $dir/postgres.log)"
    fi

    local psql=("$bin/psql" -X -q -t -A -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d postgres)
    (cd / && "${psql[@]}") >/dev/null <<'SQL' || die "creating the vigil role and database failed"
SELECT 'CREATE ROLE vigil LOGIN CREATEDB'
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'vigil') \gexec
SELECT 'CREATE DATABASE vigil OWNER vigil'
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'vigil') \gexec
SQL
    log "PostgreSQL is ready"
    app_url "$port"
}

cmd_stop() {
    [ $# -eq 1 ] || usage
    local dir="$1" bin
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        log "no cluster in $dir; nothing to stop"
        return 0
    fi
    dir="$(cd "$dir" && pwd)"
    bin="$(pg_bin)"
    if ! is_running "$dir"; then
        log "the cluster in $dir is not running"
        return 0
    fi
    as_pg "$bin/pg_ctl" -D "$dir/data" -m fast -w -t 60 stop >/dev/null
    log "stopped the cluster in $dir"
}

cmd_status() {
    [ $# -eq 1 ] || usage
    local dir="$1"
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        log "no cluster in $dir"
        exit 3
    fi
    dir="$(cd "$dir" && pwd)"
    if is_running "$dir"; then
        log "running on 127.0.0.1:$(running_port "$dir") (data: $dir/data)"
    else
        log "not running (data: $dir/data)"
        exit 3
    fi
}

# The URL, on the port the cluster in DIR actually runs on if it runs.
url_port() {
    local dir="$1" port="$2" actual
    check_port "$port"
    if [ -f "$dir/data/PG_VERSION" ] && is_running "$dir"; then
        actual="$(running_port "$dir")"
        [ -n "$actual" ] && port="$actual"
    fi
    printf '%s\n' "$port"
}

main() {
    [ $# -ge 1 ] || usage
    local cmd="$1"
    shift
    [ $# -le 2 ] || usage
    local dir="${1:-$ROOT/.vigil/pg}" port="${2:-55432}"
    case "$cmd" in
        install) [ $# -eq 0 ] || usage; cmd_install ;;
        bin) [ $# -eq 0 ] || usage; pg_bin ;;
        start) cmd_start "$dir" "$port" ;;
        stop) [ $# -le 1 ] || usage; cmd_stop "$dir" ;;
        status) [ $# -le 1 ] || usage; cmd_status "$dir" ;;
        url) app_url "$(url_port "$dir" "$port")" ;;
        admin-url) admin_url "$(url_port "$dir" "$port")" ;;
        -h | --help | help) usage ;;
        *) log "unknown command '$cmd'"; usage ;;
    esac
}

main "$@"
