#!/usr/bin/env bash
# deploy/install-agent.sh — installs the Vigil agent on a bare node (run it as root, again at will:
# it is idempotent; a re-run upgrades the binary, replaces config and certificates, restarts).
#
#   install-agent.sh --binary PATH --config agent.yaml --ca ca.pem --cert NODE.pem --key NODE.key
#                    [--prefix DIR]
#
# Installs /usr/local/bin/vigil-agent, /etc/vigil/{agent.yaml, ca.pem, NODE.pem, NODE.key (0600,
# owned by the `vigil` system user, created if missing)}, the state dir /var/lib/vigil-agent and
# /etc/systemd/system/vigil-agent.service; runs `vigil-agent doctor` as the vigil user; then,
# when systemd runs and doctor found no error: daemon-reload, enable, (re)start.
# The certificates keep their file names, so agent.yaml names them relative to /etc/vigil:
#   tls: { ca: ca.pem, cert: NODE.pem, key: NODE.key }
#   state_dir: /var/lib/vigil-agent
#
# --prefix DIR installs the same files under DIR instead of / (packaging, tests): no user is
# created, nothing is chowned, doctor and systemctl are not run.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly HERE
readonly UNIT_SRC="$HERE/systemd/vigil-agent.service"
readonly STATE_DIR=/var/lib/vigil-agent
readonly USER_NAME=vigil

log() { printf 'install-agent: %s\n' "$*" >&2; }
die() {
    printf 'install-agent: error: %s\n' "$*" >&2
    exit 1
}
usage() {
    sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

binary="" config="" ca="" cert="" key="" prefix="/"
while [ $# -gt 0 ]; do
    case "$1" in
    --binary | --config | --ca | --cert | --key | --prefix)
        [ $# -ge 2 ] || die "$1 needs a value"
        case "$1" in
        --binary) binary="$2" ;;
        --config) config="$2" ;;
        --ca) ca="$2" ;;
        --cert) cert="$2" ;;
        --key) key="$2" ;;
        --prefix) prefix="$2" ;;
        esac
        shift 2
        ;;
    -h | --help) usage 0 ;;
    *)
        log "unknown argument: $1"
        usage 2 >&2
        ;;
    esac
done

for pair in "--binary:$binary" "--config:$config" "--ca:$ca" "--cert:$cert" "--key:$key"; do
    name="${pair%%:*}" value="${pair#*:}"
    [ -n "$value" ] || die "$name is required (see --help)"
    if [ ! -f "$value" ] || [ ! -r "$value" ]; then die "$name $value: not a readable file"; fi
done
[ -f "$UNIT_SRC" ] || die "$UNIT_SRC is missing (run the script from the repository's deploy/ directory)"
for f in "$ca" "$cert" "$key"; do
    case "$(basename "$f")" in
    agent.yaml) die "$f: a certificate or key may not be called agent.yaml" ;;
    esac
done

mkdir -p "$prefix"
prefix="$(cd "$prefix" && pwd)"
if [ "$prefix" = / ]; then
    system=1
    root=""
    [ "$(id -u)" -eq 0 ] || die "run as root (or use --prefix DIR to install the files elsewhere)"
else
    system=0
    root="$prefix"
fi

# state_dir must be the one the unit may write (ProtectSystem=strict).
state_line="$(sed -n 's/^state_dir:[[:space:]]*//p' "$config" | sed 's/[[:space:]]*#.*$//; s/^["'\'']//; s/["'\'']$//')"
if [ -n "$state_line" ] && [ "${state_line%/}" != "$STATE_DIR" ]; then
    log "warning: $config has state_dir: $state_line, but the unit only lets the agent write $STATE_DIR; set state_dir: $STATE_DIR"
fi

# --- user ----------------------------------------------------------------------------------------
if [ "$system" -eq 1 ] && ! id -u "$USER_NAME" >/dev/null 2>&1; then
    useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
        --shell /usr/sbin/nologin --comment "Vigil agent" "$USER_NAME"
    log "created system user $USER_NAME"
fi
owner() { # owner USER:GROUP FILE... (system installs only)
    local who="$1"
    shift
    if [ "$system" -eq 1 ]; then chown "$who" "$@"; fi
}

# --- files ---------------------------------------------------------------------------------------
# put SRC DEST MODE: copy through a temporary file and rename, so that a running binary or a
# reader never sees a half-written file.
put() {
    local src="$1" dest="$2" mode="$3"
    install -d -m 0755 "$(dirname "$dest")"
    install -m "$mode" "$src" "$dest.new.$$"
    mv -f "$dest.new.$$" "$dest"
}
bin_dest="$root/usr/local/bin/vigil-agent"
etc="$root/etc/vigil"
unit_dest="$root/etc/systemd/system/vigil-agent.service"

put "$binary" "$bin_dest" 0755
install -d -m 0755 "$etc"
put "$config" "$etc/agent.yaml" 0644
put "$ca" "$etc/$(basename "$ca")" 0644
put "$cert" "$etc/$(basename "$cert")" 0644
put "$key" "$etc/$(basename "$key")" 0600
owner "$USER_NAME:$USER_NAME" "$etc/$(basename "$key")"
install -d -m 0750 "$root$STATE_DIR"
owner "$USER_NAME:$USER_NAME" "$root$STATE_DIR"
chmod 0750 "$root$STATE_DIR"
put "$UNIT_SRC" "$unit_dest" 0644

# SupplementaryGroups=docker stops the unit from starting where no docker group exists.
dropin="$root/etc/systemd/system/vigil-agent.service.d/10-no-docker.conf"
if [ "$system" -eq 1 ]; then
    if getent group docker >/dev/null; then
        rm -f "$dropin"
        rmdir "$(dirname "$dropin")" 2>/dev/null || true
    else
        install -d -m 0755 "$(dirname "$dropin")"
        printf '# Written by install-agent.sh: this node has no docker group.\n[Service]\nSupplementaryGroups=\n' >"$dropin.new.$$"
        mv -f "$dropin.new.$$" "$dropin"
        log "no docker group on this node: the unit runs without it ($dropin)"
    fi
fi

log "installed $bin_dest, $etc/{agent.yaml,$(basename "$ca"),$(basename "$cert"),$(basename "$key")}, $root$STATE_DIR, $unit_dest"
if [ "$system" -eq 0 ]; then
    log "installed under $prefix only: no user, doctor or systemctl"
    exit 0
fi

# --- doctor, as the agent's user with the unit's groups -----------------------------------------
doctor_as=(runuser -u "$USER_NAME" -g "$USER_NAME")
if getent group docker >/dev/null; then doctor_as+=(-G docker); fi
doctor_ok=1
"${doctor_as[@]}" -- /usr/local/bin/vigil-agent doctor --config /etc/vigil/agent.yaml || doctor_ok=0

# --- systemd -------------------------------------------------------------------------------------
if [ ! -d /run/systemd/system ]; then
    log "systemd is not running here; start the agent under your supervisor as user $USER_NAME:"
    log "  runuser -u $USER_NAME -- /usr/local/bin/vigil-agent --config /etc/vigil/agent.yaml"
    [ "$doctor_ok" -eq 1 ] || die "doctor found errors (above): fix them first"
    exit 0
fi
systemctl daemon-reload
if [ "$doctor_ok" -ne 1 ]; then
    die "doctor found errors (above); the agent is installed but not started: fix them and run this script again (or start it anyway: systemctl enable --now vigil-agent)"
fi
systemctl enable --quiet vigil-agent
# restart, not start: a re-run must pick up the new binary, config and certificates.
systemctl restart vigil-agent
log "vigil-agent enabled and started; follow it with: journalctl -u vigil-agent -f"
