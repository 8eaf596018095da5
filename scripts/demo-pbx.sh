#!/usr/bin/env bash
# The demo PBX: `setup` builds Debian's Asterisk 22 into a debootstrap root (once), `run` starts it in the
# foreground wired to shopcall, `call NUMBER DIGITS` places a real SIP call into it. See scripts/demo_pbx.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export SHOPCALL_ASTERISK_ROOT=${SHOPCALL_ASTERISK_ROOT:-/var/cache/shopcall/asterisk-root}
case "${1:-}" in
  setup) exec scripts/build-asterisk-root.sh "$SHOPCALL_ASTERISK_ROOT" ;;
  run) scripts/build-asterisk-root.sh "$SHOPCALL_ASTERISK_ROOT"; exec .venv/bin/python scripts/demo_pbx.py run ;;
  call) shift; exec .venv/bin/python scripts/demo_pbx.py call "$@" ;;
  *) echo "usage: $0 setup | run | call [NUMBER] [DIGITS]" >&2; exit 2 ;;
esac
