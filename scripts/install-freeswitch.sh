#!/usr/bin/env bash
# Install the FreeSWITCH the tests run (1.10.12 built for Debian 12, ../shared/freeswitch) under /opt/freeswitch,
# when it is missing or is not that build (the tarball's sha256 is kept beside it as a marker). Idempotent.
#
#   SHOPCALL_FREESWITCH_TARBALL=/path/freeswitch-....tar.xz   another build of the same layout (it unpacks to
#                                                             /opt/freeswitch; its runtime-debs.txt beside it)
#   SHOPCALL_FREESWITCH_PREFIX=/usr/local/freeswitch           a FreeSWITCH already installed: nothing is
#                                                             installed, the tests run <prefix>/bin/freeswitch
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)

if [ -n "${SHOPCALL_FREESWITCH_PREFIX:-}" ]; then
  [ -x "$SHOPCALL_FREESWITCH_PREFIX/bin/freeswitch" ] || {
    echo "SHOPCALL_FREESWITCH_PREFIX=$SHOPCALL_FREESWITCH_PREFIX has no bin/freeswitch" >&2; exit 1; }
  echo "ok: using the FreeSWITCH installed at $SHOPCALL_FREESWITCH_PREFIX"
  exit 0
fi

prefix=/opt/freeswitch
tarball=${SHOPCALL_FREESWITCH_TARBALL:-}
if [ -z "$tarball" ]; then
  # ../shared/freeswitch beside the checkout (a clone anywhere keeps it beside itself), else the workspace's
  for dir in "$repo/../shared/freeswitch" /work/shared/freeswitch; do
    if [ -f "$dir/freeswitch-bookworm-amd64.tar.xz" ]; then tarball="$dir/freeswitch-bookworm-amd64.tar.xz"; break; fi
  done
fi
if [ -z "$tarball" ] || [ ! -f "$tarball" ]; then
  echo "no FreeSWITCH tarball: looked for ../shared/freeswitch/freeswitch-bookworm-amd64.tar.xz beside the" \
       "checkout (set SHOPCALL_FREESWITCH_TARBALL, or SHOPCALL_FREESWITCH_PREFIX for an installed one)" >&2
  exit 1
fi
dir=$(cd "$(dirname "$tarball")" && pwd)
sum=$(sha256sum "$tarball" | cut -d' ' -f1)
if [ -f "$tarball.sha256" ] && ! grep -q "^$sum " "$tarball.sha256"; then
  echo "$tarball does not match $tarball.sha256: refusing to install it" >&2
  exit 1
fi
marker="$prefix/.shopcall-tarball.sha256"
if [ -x "$prefix/bin/freeswitch" ] && [ "$(cat "$marker" 2>/dev/null)" = "$sum" ]; then
  echo "ok: FreeSWITCH at $prefix is $(basename "$tarball") ($sum)"
  exit 0
fi

[ "$(id -u)" = 0 ] || { echo "need root to install FreeSWITCH under $prefix" >&2; exit 1; }
if [ -f "$dir/runtime-debs.txt" ]; then
  mapfile -t debs < <(grep -v '^\s*\(#\|$\)' "$dir/runtime-debs.txt")
  missing=()
  for p in "${debs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing FreeSWITCH's runtime packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi
if [ -e "$prefix" ]; then
  echo "FreeSWITCH at $prefix is not $(basename "$tarball"): replacing it"
  rm -rf "$prefix"
fi
tar -C / -xJf "$tarball"
[ -x "$prefix/bin/freeswitch" ] || { echo "$tarball did not unpack to $prefix/bin/freeswitch" >&2; exit 1; }
"$prefix/bin/freeswitch" -version >/dev/null || { echo "$prefix/bin/freeswitch does not run" >&2; exit 1; }
echo "$sum" > "$marker"
echo "ok: installed $(basename "$tarball") to $prefix ($("$prefix/bin/freeswitch" -version | head -1))"
