#!/usr/bin/env bash
# deploy/conformance.sh — checks the REST API against its own OpenAPI document with the
# ecosystem's tools: openapi-spec-validator validates /api/openapi.json, and schemathesis runs a
# bounded property-based run against a live collector (real PostgreSQL) with a viewer's and an
# operator's token: no 5xx, no undocumented status code or content type, no response outside its
# schema. Both come from PyPI, pinned, in a virtualenv; the live collector is the test harness's
# (tests/tests/api.rs, `conformance_with_schemathesis`).
#
# Environment: VIGIL_CONFORMANCE_VENV (default: $CARGO_TARGET_DIR or target, /conformance-venv),
# VIGIL_CONFORMANCE_EXAMPLES (default 25 per operation), VIGIL_CONFORMANCE_SECONDS (default 40,
# the time bound of each schemathesis run).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT
cd "$ROOT"

readonly OPENAPI_SPEC_VALIDATOR=0.9.0
readonly SCHEMATHESIS=4.32.5

log() { printf 'conformance.sh: %s\n' "$*" >&2; }
die() {
    printf 'conformance.sh: FAILED: %s\n' "$*" >&2
    exit 1
}

target="${CARGO_TARGET_DIR:-$ROOT/target}"
venv="${VIGIL_CONFORMANCE_VENV:-$target/conformance-venv}"

if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    [ "$(id -u)" -eq 0 ] || die "python3-venv is missing: run this as root, or install it"
    log "installing python3-venv"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv
fi
want="openapi-spec-validator==$OPENAPI_SPEC_VALIDATOR schemathesis==$SCHEMATHESIS"
if [ "$(cat "$venv/.vigil-pins" 2>/dev/null)" != "$want" ]; then
    log "virtualenv $venv: $want"
    rm -rf "$venv"
    python3 -m venv "$venv"
    # shellcheck disable=SC2086
    "$venv/bin/pip" install --quiet --disable-pip-version-check $want
    echo "$want" >"$venv/.vigil-pins"
fi
bash deploy/pg.sh install >/dev/null

export VIGIL_CONFORMANCE_VENV="$venv"
run=(-p vigil-tests --test api --run-ignored only -E 'test(conformance_with_schemathesis)'
    --no-capture)
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run "${run[@]}"
else
    cargo test -p vigil-tests --test api conformance_with_schemathesis -- --ignored --nocapture
fi
