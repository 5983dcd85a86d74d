#!/usr/bin/env bash
# deploy/docker/build-images.sh — build Vigil's container images locally, without any registry:
#
#   vigil-base:local       FROM scratch: static busybox (shell, health checks), the shared libraries
#                          the Vigil binaries need (ldd) with the dynamic loader, /etc/passwd and
#                          /etc/group with a `vigil` user (uid 10001), CA certificates, /tmp
#   vigil-postgres:local   PostgreSQL 15 from this machine's /usr/lib/postgresql/15 on vigil-base
#   vigil-collector:local  deploy/docker/Dockerfile.collector  (BASE_IMAGE=vigil-base:local)
#   vigil-agent:local      deploy/docker/Dockerfile.agent
#   vigil-testsvc:local    deploy/docker/Dockerfile.testsvc    (the demo service)
#
# Usage: bash deploy/docker/build-images.sh [--bin-dir DIR]
#   --bin-dir DIR   where vigil-collector, vigil-agent and vigil-testsvc are (default: VIGIL_BIN_DIR,
#                   else target/release when all three are there, else target/debug). Build them
#                   first: cargo build --release -p vigil-collector -p vigil-agent -p vigil-tests
#
# Debug binaries are stripped of debug info when staged (the images stay small either way).
# Docker's build cache makes a second run with unchanged binaries fast. Prints the
# docker-compose variables that select these images, e.g.
#   eval "$(bash deploy/docker/build-images.sh)" && docker-compose up -d
# Needs: docker, ldd, strip (binutils), static busybox (busybox-static; installed when missing and
# root), PostgreSQL 15 server binaries in /usr/lib/postgresql/15 (bash deploy/pg.sh install).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
readonly ROOT
HERE="$ROOT/deploy/docker"
readonly HERE
PG_VERSION=15
PG_LIB="/usr/lib/postgresql/$PG_VERSION"
PG_SHARE="/usr/share/postgresql/$PG_VERSION"

log() { printf 'build-images.sh: %s\n' "$*" >&2; }
die() {
    printf 'build-images.sh: error: %s\n' "$*" >&2
    exit 1
}

bin_dir="${VIGIL_BIN_DIR:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        --bin-dir)
            [ $# -ge 2 ] || die "--bin-dir needs a directory"
            bin_dir="$2"
            shift 2
            ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done

BINARIES=(vigil-collector vigil-agent vigil-testsvc)
has_all() {
    local b
    for b in "${BINARIES[@]}"; do [ -x "$1/$b" ] || return 1; done
}
if [ -z "$bin_dir" ]; then
    if has_all "$ROOT/target/release"; then bin_dir="$ROOT/target/release"; else bin_dir="$ROOT/target/debug"; fi
fi
has_all "$bin_dir" ||
    die "${BINARIES[*]} are not all in $bin_dir: build them first (cargo build --release -p vigil-collector -p vigil-agent -p vigil-tests), or pass --bin-dir"

command -v docker >/dev/null || die "docker is not installed"
docker info >/dev/null 2>&1 || die "the Docker daemon is not reachable (is it running, may this user use it?)"
for tool in ldd strip; do command -v "$tool" >/dev/null || die "$tool is missing (apt-get install binutils libc-bin)"; done
# shellcheck disable=SC2015  # die exits
[ -x "$PG_LIB/bin/postgres" ] && [ -x "$PG_LIB/bin/initdb" ] && [ -x "$PG_LIB/bin/pg_ctl" ] && [ -x "$PG_LIB/bin/psql" ] ||
    die "PostgreSQL $PG_VERSION server binaries are missing in $PG_LIB: run 'bash deploy/pg.sh install' (as root)"

busybox=""
for c in /bin/busybox /usr/bin/busybox; do
    if [ -x "$c" ] && file -L "$c" 2>/dev/null | grep -q "statically linked"; then
        busybox="$c"
        break
    fi
done
if [ -z "$busybox" ]; then
    [ "$(id -u)" -eq 0 ] || die "static busybox is missing: apt-get install busybox-static (as root)"
    log "installing busybox-static"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static file >&2
    busybox=/bin/busybox
fi

work="$(mktemp -d /tmp/vigil-images.XXXXXX)"
trap 'rm -rf "$work"' EXIT

# Copies every shared library the given ELF files load (and the dynamic loader) into rootfs $1,
# at the paths ldd reports. Libraries ldd cannot find are skipped (optional modules).
copy_libs() {
    local root="$1"
    shift
    local f lib
    for f in "$@"; do
        ldd "$f" 2>/dev/null || true
    done | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u |
        while read -r lib; do
            cp -L --parents "$lib" "$root/"
        done
}

# Builds image $1 from context dir $2 with Dockerfile $3 and extra arguments.
build() {
    local image="$1" ctx="$2" dockerfile="$3"
    shift 3
    log "building $image"
    local out
    if ! out="$(docker build -t "$image" -f "$dockerfile" "$@" "$ctx" 2>&1)"; then
        printf '%s\n' "$out" >&2
        die "docker build of $image failed (output above)"
    fi
}

# --- vigil-base:local --------------------------------------------------------------------------
base="$work/base"
rootfs="$base/rootfs"
mkdir -p "$rootfs"/{bin,etc/ssl/certs,tmp,usr/local/bin,var/lib,run}
chmod 1777 "$rootfs/tmp"
cp "$busybox" "$rootfs/bin/busybox"
for applet in $("$busybox" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$rootfs/bin/$applet"
done
copy_libs "$rootfs" "${BINARIES[@]/#/$bin_dir/}"
cat >"$rootfs/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/bin/sh
vigil:x:10001:10001:Vigil:/var/lib/vigil:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
PASSWD
cat >"$rootfs/etc/group" <<'GROUP'
root:x:0:
vigil:x:10001:
nogroup:x:65534:
GROUP
printf 'passwd: files\ngroup: files\nhosts: files dns\n' >"$rootfs/etc/nsswitch.conf"
if [ -s /etc/ssl/certs/ca-certificates.crt ]; then
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/"
else
    log "warning: /etc/ssl/certs/ca-certificates.crt is missing here; the images have no CA certificates (apt-get install ca-certificates)"
fi
cat >"$base/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY rootfs/ /
ENV PATH=/usr/local/bin:/usr/bin:/bin
CMD ["/bin/sh"]
DOCKERFILE
build vigil-base:local "$base" "$base/Dockerfile"

# --- vigil-postgres:local ----------------------------------------------------------------------
pg="$work/postgres"
mkdir -p "$pg/rootfs/usr/share/postgresql" "$pg/rootfs$PG_LIB"
# Everything but the LLVM JIT (llvmjit*.so and its bitcode pull in a 100 MB libLLVM; jit=off).
cp -a "$PG_LIB/bin" "$pg/rootfs$PG_LIB/"
if [ -d "$PG_LIB/lib" ]; then
    mkdir -p "$pg/rootfs$PG_LIB/lib"
    find "$PG_LIB/lib" -mindepth 1 -maxdepth 1 ! -name 'llvmjit*' ! -name bitcode -exec cp -a {} "$pg/rootfs$PG_LIB/lib/" \;
fi
cp -a "$PG_SHARE" "$pg/rootfs/usr/share/postgresql/"
[ -d /usr/share/zoneinfo ] && cp -a /usr/share/zoneinfo "$pg/rootfs/usr/share/"
mapfile -t pg_elves < <(find "$pg/rootfs$PG_LIB" -type f \( -perm -u+x -o -name '*.so' \))
copy_libs "$pg/rootfs" "${pg_elves[@]}"
cp "$HERE/postgres-entrypoint.sh" "$pg/"
build vigil-postgres:local "$pg" "$HERE/Dockerfile.postgres" --build-arg BASE_IMAGE=vigil-base:local

# --- the Vigil images --------------------------------------------------------------------------
for pair in collector:vigil-collector agent:vigil-agent testsvc:vigil-testsvc; do
    name="${pair%%:*}"
    binary="${pair#*:}"
    ctx="$work/$name"
    mkdir -p "$ctx"
    strip --strip-debug -o "$ctx/$binary" "$bin_dir/$binary"
    cp "$HERE/healthcheck.sh" "$ctx/healthcheck.sh"
    build "vigil-$name:local" "$ctx" "$HERE/Dockerfile.$name" --build-arg BASE_IMAGE=vigil-base:local
done

log "done (binaries from $bin_dir)"
cat <<VARS
export VIGIL_POSTGRES_IMAGE=vigil-postgres:local
export VIGIL_COLLECTOR_IMAGE=vigil-collector:local
export VIGIL_AGENT_IMAGE=vigil-agent:local
export VIGIL_DEMO_IMAGE=vigil-testsvc:local
VARS
