#!/usr/bin/env bash
# Set up shopcall on this Debian/Ubuntu machine; safe to run again (it only does what is missing).
#   ./install.sh               venv, prompts, database (embedded PostgreSQL unless a URL is configured),
#                              dialplan include, systemd unit for `shopcall serve`
#   ./install.sh --demo-pbx    also a sandboxed Asterisk 22 with a demo endpoint, to place a call without a PBX
set -euo pipefail
cd "$(dirname "$0")"
HERE=$(pwd)
DEMO=0
for arg in "$@"; do
  case "$arg" in
    --demo-pbx) DEMO=1 ;;
    -h|--help) sed -n '2,5p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "install.sh: run as root (it installs packages and a systemd unit)" >&2; exit 1; }

CONF_DIR=/etc/shopcall
CONF=$CONF_DIR/shopcall.toml
export SHOPCALL_CONFIG=$CONF
export SHOPCALL_CACHE=${SHOPCALL_CACHE:-/var/cache/shopcall}
step() { printf '\n== %s\n' "$*"; }

step "Debian packages"
pkgs=(espeak-ng sox)
python3 -m venv --help >/dev/null 2>&1 && python3 -c 'import ensurepip' 2>/dev/null || pkgs+=(python3-venv)
[ $DEMO = 1 ] && pkgs+=(debootstrap sip-tester)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python 3.11+ is required" >&2; exit 1; }

step "Python venv ($HERE/.venv)"
[ -x .venv/bin/python ] || python3 -m venv .venv
mkdir -p "$SHOPCALL_CACHE/pip"
PIP_CACHE_DIR="$SHOPCALL_CACHE/pip" .venv/bin/pip install -q --disable-pip-version-check -e . 2>&1 \
  | grep -v "is ignored: it is neither a file nor a directory" || true
ln -sf "$HERE/.venv/bin/shopcall" /usr/local/bin/shopcall

step "Configuration ($CONF)"
mkdir -p "$CONF_DIR"
if [ ! -f "$CONF" ]; then
  cp shopcall.example.toml "$CONF"
  echo "wrote $CONF from shopcall.example.toml: set [shop] name and timezone there"
fi
shopcall check-config

step "Database"
shopcall db migrate
[ -f "$CONF_DIR/directory.toml" ] || cp examples/directory.toml "$CONF_DIR/directory.toml"
echo "directory (employees, groups, numbers): $CONF_DIR/directory.toml — edit it, then: shopcall db load $CONF_DIR/directory.toml"
shopcall db load "$CONF_DIR/directory.toml"

step "Prompts (espeak-ng, cached by text)"
shopcall prompts build

step "Dialplan include"
if [ -d /etc/asterisk ]; then
  shopcall render-dialplan --pbx asterisk -o /etc/asterisk/shopcall.conf
  grep -q 'shopcall.conf' /etc/asterisk/extensions.conf 2>/dev/null \
    || echo "add to /etc/asterisk/extensions.conf:  #include \"/etc/asterisk/shopcall.conf\"  then: asterisk -rx 'dialplan reload'"
else
  shopcall render-dialplan --pbx asterisk -o "$CONF_DIR/asterisk-shopcall.conf"
  echo "no /etc/asterisk here: copy $CONF_DIR/asterisk-shopcall.conf to your PBX and #include it"
fi

if [ $DEMO = 1 ]; then
  step "Demo PBX (Debian's Asterisk 22 in a debootstrap root)"
  scripts/demo-pbx.sh setup
fi

step "systemd unit"
cat > /etc/systemd/system/shopcall.service <<UNIT
[Unit]
Description=shopcall: the shop's call centre on your PBX (FastAGI server)
After=network-online.target postgresql.service asterisk.service
Wants=network-online.target

[Service]
Environment=SHOPCALL_CONFIG=$CONF
ExecStart=$HERE/.venv/bin/shopcall serve
Restart=always
RestartSec=2

[Install]
WantedBy=multi-user.target
UNIT
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  systemctl enable --now shopcall.service
  echo "shopcall is running: systemctl status shopcall"
else
  echo "systemd is not running here: start it with  shopcall serve"
fi
[ $DEMO = 1 ] && echo "demo PBX: scripts/demo-pbx.sh run (foreground), then in another terminal: scripts/demo-pbx.sh call 100 2"
echo "done"
