#!/usr/bin/env bash
# deploy/demo.sh — bring up a working Vigil on this machine: PostgreSQL (a private cluster, or
# VIGIL_DATABASE_URL), certificates, the collector, a local agent and example services.
#
#   deploy/demo.sh          build, start everything (again), wait for the first results, print the state
#   deploy/demo.sh status   print the service table
#   deploy/demo.sh stop     stop the demo's processes and its PostgreSQL cluster
#   deploy/demo.sh start-testsvc   (re)start only the demo service; Vigil's restart command for
#                           demo-ocr runs this
#
# Everything it makes lives in .vigil/ (certificates, agent state, logs, the database cluster);
# `rm -rf .vigil` after `stop` removes all of it. Ports: 7443 (agent gRPC), 18080 (demo service),
# 55432 (PostgreSQL, unless VIGIL_DATABASE_URL is set).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="$ROOT/.vigil"
RUN="$STATE/run"
cd "$ROOT"   # the agent runs demo-ocr's restart command (deploy/demo.sh start-testsvc) from here
BIN="$ROOT/target/debug"
PG_DIR="$STATE/pg"
PG_PORT=55432
CONFIG="$ROOT/config/collector.yaml"

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
die() { printf 'demo.sh: error: %s\n' "$*" >&2; exit 1; }

stop_proc() {
    local name=$1 pidfile="$RUN/$1.pid"
    [ -f "$pidfile" ] || return 0
    local pid
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        echo "stopped $name (pid $pid)"
    fi
    rm -f "$pidfile"
}

start_testsvc() {
    mkdir -p "$RUN"
    if [ -f "$RUN/testsvc.pid" ] && kill -0 "$(cat "$RUN/testsvc.pid")" 2>/dev/null; then
        echo "demo service already running"
        return 0
    fi
    setsid nohup "$BIN/vigil-testsvc" --listen 127.0.0.1:18080 >>"$RUN/testsvc.log" 2>&1 </dev/null &
    echo $! >"$RUN/testsvc.pid"
    for _ in $(seq 1 50); do
        port_free 18080 || { echo "demo service started (pid $(cat "$RUN/testsvc.pid"))"; return 0; }
        sleep 0.1
    done
    die "the demo service did not start (log: $RUN/testsvc.log)"
}

start_proc() {
    local name=$1; shift
    nohup "$@" >"$RUN/$name.log" 2>&1 &
    echo $! >"$RUN/$name.pid"
    sleep 0.3
    kill -0 "$(cat "$RUN/$name.pid")" 2>/dev/null \
        || { tail -n 20 "$RUN/$name.log" >&2; die "$name did not start (log: $RUN/$name.log)"; }
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

database_url() {
    if [ -n "${VIGIL_DATABASE_URL:-}" ]; then
        echo "$VIGIL_DATABASE_URL"
    else
        bash "$ROOT/deploy/pg.sh" url "$PG_DIR" "$PG_PORT"
    fi
}

cmd_status() {
    VIGIL_DATABASE_URL="$(database_url)" "$BIN/vigil-collector" status --config "$CONFIG"
}

cmd_stop() {
    for p in agent collector testsvc; do stop_proc "$p"; done
    if [ -z "${VIGIL_DATABASE_URL:-}" ] && [ -d "$PG_DIR" ]; then
        bash "$ROOT/deploy/pg.sh" stop "$PG_DIR"
    fi
}

cmd_start() {
    mkdir -p "$RUN"
    command -v cargo >/dev/null || die "cargo is not installed (https://rustup.rs)"

    say "Stopping a previous demo, if any"
    for p in agent collector testsvc; do stop_proc "$p"; done
    for port in 7443 18080; do
        port_free "$port" || die "port $port is in use by another program; stop it and run again"
    done

    say "PostgreSQL"
    local url
    if [ -n "${VIGIL_DATABASE_URL:-}" ]; then
        url="$VIGIL_DATABASE_URL"
        echo "using VIGIL_DATABASE_URL"
    else
        bash "$ROOT/deploy/pg.sh" install
        url=$(bash "$ROOT/deploy/pg.sh" start "$PG_DIR" "$PG_PORT")
    fi
    export VIGIL_DATABASE_URL="$url"

    say "Building (first time: a few minutes)"
    (cd "$ROOT" && cargo build --bin vigil-collector --bin vigil-agent --bin vigil-testsvc)

    say "Certificates in $STATE/certs"
    if [ ! -f "$STATE/certs/ca.pem" ]; then
        "$BIN/vigil-collector" ca init --dir "$STATE/certs"
    fi
    if [ ! -f "$STATE/certs/local.pem" ]; then
        "$BIN/vigil-collector" ca issue --node local --dir "$STATE/certs"
    fi

    say "Checking the config"
    "$BIN/vigil-collector" check-config --config "$CONFIG"

    say "Starting the demo service (fake OCR API) on 127.0.0.1:18080"
    start_testsvc
    say "Starting the collector on 127.0.0.1:7443"
    start_proc collector "$BIN/vigil-collector" serve --config "$CONFIG"
    say "Starting the agent for node 'local'"
    start_proc agent "$BIN/vigil-agent" --config "$ROOT/config/agent.yaml"

    say "Waiting for the first results"
    local ok=""
    for _ in $(seq 1 120); do
        if cmd_status 2>/dev/null | grep -E '^demo-web .* (HEALTHY|FAILING|DOWN) ' >/dev/null \
            && cmd_status 2>/dev/null | grep -E '^demo-ocr .* (HEALTHY|FAILING|DOWN) ' >/dev/null; then
            ok=1
            break
        fi
        kill -0 "$(cat "$RUN/collector.pid")" 2>/dev/null || { tail -n 20 "$RUN/collector.log" >&2; die "the collector stopped"; }
        kill -0 "$(cat "$RUN/agent.pid")" 2>/dev/null || { tail -n 20 "$RUN/agent.log" >&2; die "the agent stopped"; }
        sleep 0.5
    done
    [ -n "$ok" ] || { tail -n 20 "$RUN/collector.log" "$RUN/agent.log" >&2; die "no results after 60s"; }

    # A dashboard/API login for the demo (admin), made once and kept in the state directory.
    if [ ! -s "$STATE/demo-token" ]; then
        VIGIL_DATABASE_URL="$url" "$BIN/vigil-collector" token create --config "$CONFIG" \
            --role admin --name "demo-admin-$(date +%s)" >"$STATE/demo-token.tmp" 2>/dev/null \
            && mv "$STATE/demo-token.tmp" "$STATE/demo-token"
    fi
    local token
    token="$(cat "$STATE/demo-token" 2>/dev/null || echo '(vigil-collector token create failed)')"

    echo
    cmd_status
    cat <<MSG

Vigil is running.
  demo-web    HTTP page with a keyword            -> healthy
  demo-ocr    PDF upload to a fake OCR API        -> healthy (Vigil restarts it when it fails)
  demo-load   Nagios-style command with perfdata  -> healthy
  demo-broken nothing listens on its port         -> failing, then DOWN after 2 failures
  mineru      the real Mineru case on node gpu-01 -> unknown (no agent there in the demo)

Where to look:
  dashboard          http://127.0.0.1:8080/   log in with the token below
  token (admin)      $token
                     (kept in $STATE/demo-token; more: vigil-collector token create --role viewer ...)
  REST API           curl -H "Authorization: Bearer $token" http://127.0.0.1:8080/api/services/health
                     (document: http://127.0.0.1:8080/api/openapi.json)
  Prometheus         http://127.0.0.1:9464/metrics
  service table      bash deploy/demo.sh status
  logs               $RUN/collector.log  $RUN/agent.log  $RUN/testsvc.log
  the database       psql '$url'
                     (tables: check_results, service_state, events, nodes, services)
  make a service fail: kill \$(cat $RUN/testsvc.pid)
                     watch demo-ocr go DOWN, then Vigil restart it through the agent:
                     psql '$url' -c 'select id, service_id, action, origin, status from commands'
  act by hand        target/debug/vigil-collector ctl --config config/collector.yaml restart demo-ocr
  stop everything    bash deploy/demo.sh stop
MSG
}

case "${1:-start}" in
    start) cmd_start ;;
    start-testsvc) start_testsvc ;;
    status) cmd_status ;;
    stop) cmd_stop ;;
    -h|--help|help) sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' ;;
    *) die "unknown command ${1}; use start, status or stop" ;;
esac
