#!/usr/bin/env bash
# deploy/test.sh — THE test command: installs what is missing, checks formatting and lints, builds
# everything, then runs every test against a throwaway PostgreSQL cluster (stopped and deleted on exit).
#
#   bash deploy/test.sh                 everything
#   bash deploy/test.sh -- FILTERS...   extra arguments for `cargo nextest run` (e.g. -E 'test(pg)')
#
# Environment: VIGIL_TEST_THREADS (default: 2 per CPU; the tests mostly wait on I/O),
# VIGIL_SKIP_LINT=1 skips fmt and clippy (local iterations only; CI always lints).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT
cd "$ROOT"

step() { printf '\n==> %s\n' "$*" >&2; }
log() { printf 'test.sh: %s\n' "$*" >&2; }
die() {
    printf '\ntest.sh: FAILED: %s\n' "$*" >&2
    exit 1
}

extra_args=()
if [ $# -gt 0 ]; then
    [ "$1" = "--" ] && shift
    extra_args=("$@")
fi

# --- tools -------------------------------------------------------------------------------------
step "checking tools"
if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || die "cargo not found: install the Rust toolchain (rustup) first"

# Programs the build and the end-to-end tests need, as "program:Debian package".
needed=(
    "cc:gcc"
    "runuser:util-linux"
    "chromium:chromium"
    "chromedriver:chromium-driver"
    # Prometheus' own checker of /metrics (tests/tests/metrics.rs).
    "promtool:prometheus"
)
missing=()
for pair in "${needed[@]}"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
bash deploy/pg.sh bin >/dev/null 2>&1 || missing+=(postgresql)
# The SMTP server of the email alert test (tests/tests/alerts.rs), run by Debian's Python.
/usr/bin/python3 -c "import aiosmtpd" >/dev/null 2>&1 || missing+=(python3-aiosmtpd)
if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" -eq 0 ] || die "missing packages (${missing[*]}): run this as root, or install them"
    log "installing: ${missing[*]}"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi
bash deploy/pg.sh install

have_nextest=1
cargo nextest --version >/dev/null 2>&1 || have_nextest=0
[ "$have_nextest" -eq 1 ] || log "cargo-nextest not found; falling back to cargo test"

# --- formatting and lints (fail fast) ----------------------------------------------------------
if [ "${VIGIL_SKIP_LINT:-0}" = 1 ] && [ "${CI:-}" != true ]; then
    log "VIGIL_SKIP_LINT=1: skipping cargo fmt and cargo clippy"
else
    step "cargo fmt --all -- --check"
    cargo fmt --all -- --check || die "code is not formatted: run 'cargo fmt --all' and commit the result"
    step "cargo clippy --workspace --all-targets -- -D warnings"
    cargo clippy --workspace --all-targets -- -D warnings || die "clippy reported warnings or errors (see above)"
fi

# --- throwaway PostgreSQL ----------------------------------------------------------------------
step "starting a throwaway PostgreSQL cluster"
pg_dir="$(mktemp -d /tmp/vigil-test-pg.XXXXXX)"
# shellcheck disable=SC2317  # invoked by the trap
cleanup() {
    local status=$?
    bash "$ROOT/deploy/pg.sh" stop "$pg_dir" >/dev/null 2>&1 || true
    rm -rf "$pg_dir"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

port=""
for _ in 1 2 3 4 5; do
    candidate=$((20000 + RANDOM % 40000))
    if VIGIL_PG_OPTS="-c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
        bash deploy/pg.sh start "$pg_dir" "$candidate" >/dev/null; then
        port="$candidate"
        break
    fi
done
[ -n "$port" ] || die "could not start PostgreSQL (see messages above)"
VIGIL_TEST_DATABASE_URL="$(bash deploy/pg.sh admin-url "$pg_dir" "$port")"
export VIGIL_TEST_DATABASE_URL
log "VIGIL_TEST_DATABASE_URL=$VIGIL_TEST_DATABASE_URL"

# --- build and test ----------------------------------------------------------------------------
step "cargo build --workspace --all-targets"
cargo build --workspace --all-targets || die "the build failed (see above)"

threads="${VIGIL_TEST_THREADS:-$((2 * $(nproc 2>/dev/null || echo 1)))}"
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"
set +e
if [ "$have_nextest" -eq 1 ]; then
    # nextest does not run doctests: run them first, so that nextest's summary is the last word.
    step "cargo test --workspace --doc"
    cargo test --workspace --doc --no-fail-fast -q
    doc_status=$?
    # The API against its OpenAPI document with openapi-spec-validator and schemathesis (PyPI,
    # pinned, in a virtualenv): before the main run, so that its summary stays the last word.
    step "deploy/conformance.sh"
    bash deploy/conformance.sh
    conformance_status=$?
    [ "$doc_status" -ne 0 ] || doc_status=$conformance_status
    step "cargo nextest run --workspace --no-fail-fast --test-threads $threads"
    cargo nextest run --workspace --no-fail-fast --test-threads "$threads" --no-tests warn "${extra_args[@]}"
    status=$?
    [ "$status" -ne 0 ] || status=$doc_status
else
    step "cargo test --workspace --no-fail-fast"
    cargo test --workspace --no-fail-fast "${extra_args[@]}" -- --test-threads "$threads"
    status=$?
fi
set -e

if [ "$status" -eq 0 ]; then
    printf '\ntest.sh: all checks and tests passed\n' >&2
else
    printf '\ntest.sh: FAILED: tests failed (exit status %s)\n' "$status" >&2
fi
exit "$status"
