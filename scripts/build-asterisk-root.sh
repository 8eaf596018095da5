#!/usr/bin/env bash
# Builds (once) a debootstrap root holding Debian's own Asterisk 22 from the "sid" suite.
# The host's apt sources are never touched: debootstrap takes the suite directly, so the host's libc stays.
# Usage: build-asterisk-root.sh ROOT   (prints nothing on success when ROOT is already complete)
set -euo pipefail
root=${1:?usage: build-asterisk-root.sh ROOT}
cache=${SHOPCALL_CACHE:-/var/cache/shopcall}
marker="$root/.shopcall-asterisk-ready"
[ -f "$marker" ] && exit 0

[ "$(id -u)" = 0 ] || { echo "build-asterisk-root: must run as root (debootstrap, chroot)" >&2; exit 1; }
command -v debootstrap >/dev/null || { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }

# Use the mirror apt on this machine is already configured with.
mirror=$(grep -rhoE 'https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
         | grep -v security | head -n1 | tr -d ' ' || true)
[ -n "$mirror" ] || { echo "build-asterisk-root: no Debian mirror found in apt's sources" >&2; exit 1; }

# never delete through a bind mount (a test's work dir, sounds) into the host's own files
if grep -qE " ($root|$root.partial)/" /proc/mounts; then
  echo "build-asterisk-root: $root has active mounts (a running Asterisk?); stop it first" >&2; exit 1
fi
mkdir -p "$cache/debootstrap-debs"
rm -rf --one-file-system "$root.partial"
mkdir -p "$root.partial"
# --cache-dir keeps the downloaded .debs for the next build; a missing cache only costs time.
debootstrap --variant=minbase --cache-dir="$cache/debootstrap-debs" \
  --include=asterisk,asterisk-core-sounds-en-gsm,asterisk-core-sounds-ru-gsm \
  sid "$root.partial" "$mirror" >"$cache/debootstrap.log" 2>&1 || {
    echo "build-asterisk-root: debootstrap failed, last lines of $cache/debootstrap.log:" >&2
    tail -n 20 "$cache/debootstrap.log" >&2; exit 1; }
rm -rf --one-file-system "$root"
mv "$root.partial" "$root"
touch "$marker"
