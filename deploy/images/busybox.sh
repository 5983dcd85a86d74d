#!/usr/bin/env bash
# deploy/images/busybox.sh — build the local image `vigil-busybox:latest` (no registry needed):
# FROM scratch with Debian's static busybox, so tests and the demo can run small containers
# (e.g. `busybox httpd`). Installs busybox-static when missing (as root). Idempotent: an existing
# image is kept unless --force is given.
set -euo pipefail

IMAGE="${VIGIL_BUSYBOX_IMAGE:-vigil-busybox:latest}"
log() { printf 'busybox.sh: %s\n' "$*" >&2; }
die() { printf 'busybox.sh: error: %s\n' "$*" >&2; exit 1; }

command -v docker >/dev/null || die "docker is not installed"
if [ "${1:-}" != "--force" ] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "$IMAGE"
    exit 0
fi

bb=""
for c in /bin/busybox /usr/bin/busybox; do
    if [ -x "$c" ] && file -L "$c" 2>/dev/null | grep -q "statically linked"; then bb="$c"; break; fi
done
if [ -z "$bb" ]; then
    [ "$(id -u)" -eq 0 ] || die "busybox-static is missing: apt-get install busybox-static (as root)"
    log "installing busybox-static"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static file >&2
    bb=/bin/busybox
fi

ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/bin" "$ctx/www" "$ctx/tmp"
cp "$bb" "$ctx/bin/busybox"
for applet in sh httpd sleep cat echo ls kill wget nc; do ln -s busybox "$ctx/bin/$applet"; done
echo "vigil busybox ok" >"$ctx/www/index.html"
cat >"$ctx/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY bin /bin
COPY www /www
COPY tmp /tmp
ENV PATH=/bin
# Serve /www on port 8080 in the foreground by default.
CMD ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"]
DOCKERFILE
log "building $IMAGE"
docker build -q -t "$IMAGE" "$ctx" >&2
echo "$IMAGE"
