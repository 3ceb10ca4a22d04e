#!/usr/bin/env bash
# The Debian package, end to end: builds it (from the debug binary: scripts/build-deb.sh
# --debug), installs it with dpkg -i, writes /etc/addcow/addcow.toml naming an overlay, starts
# the service (systemctl where systemd is PID 1; otherwise the installed unit's ExecStart= line
# under systemd-socket-activate with the sockets and FileDescriptorName= of the installed socket
# units, as systemd would), reads the disk with qemu-io, adds a second export with `addcow ctl`,
# restarts, and checks both are served. Purges the package at the end.
#
# Needs root and dpkg (CI: a throwaway machine); skipped with a banner otherwise, and skipped
# (loudly) when an addcow package (or its config files, or /var/lib/addcow/state.json) is
# already on the machine: its cleanup purges the package it installed.
set -euo pipefail
cd "$(dirname "$0")/.."

banner() { printf '\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n!!! %s\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\n' "$*"; }
if [ "$(id -u)" -ne 0 ]; then
  banner "SKIPPED: the .deb install test needs root (dpkg -i); not run"
  exit 0
fi
if ! command -v dpkg >/dev/null; then
  banner "SKIPPED: the .deb install test needs dpkg; not run"
  exit 0
fi
# The cleanup purges the package and removes its state file: never on a machine where addcow was
# there before this test (an install, or config files left by a removed one, or a state file).
if status=$(dpkg-query -W -f='${Status}' addcow 2>/dev/null) && [ "${status##* }" != not-installed ]; then
  banner "SKIPPED: an addcow package is already here ($status): this test would purge it; not run"
  exit 0
fi
if [ -e /var/lib/addcow/state.json ]; then
  banner "SKIPPED: /var/lib/addcow/state.json exists: this test would remove it; not run"
  exit 0
fi
for tool in qemu-io qemu-img python3; do
  command -v "$tool" >/dev/null || { echo "test-deb: $tool is missing" >&2; exit 1; }
done

deb=$(scripts/build-deb.sh --debug | tail -n 1)
echo "== built $deb ($(du -h "$deb" | cut -f1))"

UNITS=/usr/lib/systemd/system
IMG=/var/lib/addcow/images/addcow-deb-test
daemon_pid=""
cleanup() {
  set +e
  [ -n "$daemon_pid" ] && kill "$daemon_pid" 2>/dev/null && wait "$daemon_pid" 2>/dev/null
  if [ "${systemd:-0}" = 1 ]; then
    systemctl stop addcow.service addcow-nbd.socket addcow-control.socket 2>/dev/null
  fi
  dpkg --purge addcow >/dev/null 2>&1
  rm -rf "$IMG" /var/lib/addcow/state.json /run/addcow
}
trap cleanup EXIT

dpkg -i "$deb"
echo "== installed: checking the files"
for f in /usr/bin/addcow /etc/addcow/addcow.toml "$UNITS/addcow.service" "$UNITS/addcow-nbd.socket" \
  "$UNITS/addcow-control.socket" "$UNITS/addcow@.service" \
  /usr/share/man/man1/addcow.1.gz /usr/share/man/man1/addcow-serve.1.gz \
  /usr/share/man/man1/addcow-ctl.1.gz /usr/share/bash-completion/completions/addcow \
  /usr/share/zsh/vendor-completions/_addcow /usr/share/fish/vendor_completions.d/addcow.fish; do
  [ -e "$f" ] || { echo "test-deb: $f is not installed" >&2; exit 1; }
done
dpkg-query -W -f='${Conffiles}\n' addcow | grep -q /etc/addcow/addcow.toml ||
  { echo "test-deb: /etc/addcow/addcow.toml is not a conffile" >&2; exit 1; }
grep -q '^Type=notify' "$UNITS/addcow.service"
# An upgrade restarts the service only: restarting the socket units would close the sockets
# the clients are queued on.
ctl_dir=$(mktemp -d)
dpkg-deb -e "$deb" "$ctl_dir"
grep -q 'deb-systemd-invoke $_dh_action addcow.service >' "$ctl_dir/postinst" ||
  { echo "test-deb: postinst does not restart addcow.service after an upgrade" >&2; exit 1; }
if grep 'deb-systemd-invoke $_dh_action' "$ctl_dir/postinst" | grep -q socket; then
  echo "test-deb: postinst restarts a socket unit on upgrade" >&2; exit 1
fi
# The units as systemd reads them (works without systemd running); the template as an instance.
if command -v systemd-analyze >/dev/null; then
  cp "$UNITS/addcow@.service" "$ctl_dir/addcow@test.service"
  systemd-analyze verify "$UNITS/addcow.service" "$UNITS/addcow-nbd.socket" \
    "$UNITS/addcow-control.socket" "$ctl_dir/addcow@test.service"
else
  banner "systemd-analyze is missing: the units are not verified"
fi
rm -rf "$ctl_dir"
grep -q '^FileDescriptorName=control' "$UNITS/addcow-control.socket"
# An overlay in the image folder, and a configuration that serves it.
rm -rf "$IMG" /var/lib/addcow/state.json
mkdir -p "$IMG"
qemu-img create -q -f raw "$IMG/base.raw" 4M
qemu-io -f raw -c 'write -P 0xab 0 4M' "$IMG/base.raw" >/dev/null
addcow create --base "$IMG/base.raw" "$IMG/vm1.add-cow" >/dev/null
addcow create --base "$IMG/base.raw" "$IMG/vm2.add-cow" >/dev/null
write_config() {
  cat >/etc/addcow/addcow.toml <<EOF
[serve]
control = "/run/addcow/control.sock"
state = "/var/lib/addcow/state.json"
allow-dir = ["$IMG"]

[[export]]
name = "vm1"
overlay = "$IMG/vm1.add-cow"
EOF
}

NBD=$(sed -n 's/^ListenStream=//p' "$UNITS/addcow-nbd.socket")
CONTROL=$(sed -n 's/^ListenStream=//p' "$UNITS/addcow-control.socket")
uri() { echo "nbd+unix:///$1?socket=$NBD"; }

systemd=0
[ "$(cat /proc/1/comm 2>/dev/null)" = systemd ] && systemd=1
start() {
  if [ "$systemd" = 1 ]; then
    systemctl daemon-reload
    systemctl start addcow-nbd.socket addcow-control.socket addcow.service
    return
  fi
  # As systemd would: the sockets of the socket units, named by their FileDescriptorName=,
  # then the unit's ExecStart= line.
  local exec names
  exec=$(sed -n 's/^ExecStart=//p' "$UNITS/addcow.service")
  names="$(sed -n 's/^FileDescriptorName=//p' "$UNITS/addcow-nbd.socket"):$(sed -n 's/^FileDescriptorName=//p' "$UNITS/addcow-control.socket")"
  mkdir -p /run/addcow
  rm -f "$NBD" "$CONTROL"
  # shellcheck disable=SC2086 # ExecStart= is a command line.
  systemd-socket-activate -l "$NBD" -l "$CONTROL" --fdname="$names" -E ADDCOW_LOG=info \
    $exec 2>>"$IMG/daemon.log" &
  daemon_pid=$!
  for _ in $(seq 200); do [ -S "$NBD" ] && [ -S "$CONTROL" ] && return; sleep 0.05; done
  echo "test-deb: the sockets never appeared" >&2; cat "$IMG/daemon.log" >&2; exit 1
}
stop() {
  if [ "$systemd" = 1 ]; then systemctl restart addcow.service; return; fi
  kill -TERM "$daemon_pid"
  wait "$daemon_pid" || { echo "test-deb: the daemon exited badly" >&2; cat "$IMG/daemon.log" >&2; exit 1; }
  daemon_pid=""
}
read_ok() { # EXPORT PATTERN
  qemu-io -f raw -c "read -P $2 0 64k" "$(uri "$1")" | grep -q 'read 65536/65536' ||
    { echo "test-deb: export $1 does not read $2" >&2; cat "$IMG/daemon.log" >&2 2>/dev/null; exit 1; }
}

if [ "$systemd" = 1 ]; then
  echo "== systemd is PID 1: starting addcow.service"
else
  banner "systemd is not PID 1 here: running the unit's ExecStart= under systemd-socket-activate instead of starting the unit"
  command -v systemd-socket-activate >/dev/null ||
    { echo "test-deb: systemd-socket-activate (package systemd) is missing" >&2; exit 1; }
fi
echo "== the packaged configuration: the service starts with no export"
start
addcow ctl --control "$CONTROL" --json query-exports | python3 -c 'import json,sys; assert json.load(sys.stdin)==[]'
stop
[ "$systemd" = 1 ] && systemctl stop addcow.service
rm -f /var/lib/addcow/state.json

echo "== a configuration naming an overlay"
write_config
start
echo "== reading vm1 (from the configuration)"
qemu-img info "$(uri vm1)" | grep -q 'virtual size: 4 MiB'
read_ok vm1 0xab
echo "== adding vm2 with addcow ctl, writing into it"
addcow ctl --control "$CONTROL" export-add name=vm2 overlay="$IMG/vm2.add-cow" | grep -q vm2
qemu-io -f raw -c 'write -P 0xcd 0 64k' -c flush "$(uri vm2)" >/dev/null
addcow ctl --control "$CONTROL" --json query-exports |
  python3 -c 'import json,sys; n=sorted(e["name"] for e in json.load(sys.stdin)); assert n==["vm1","vm2"], n'
echo "== restarting"
stop
[ "$systemd" = 1 ] || start
echo "== both served after the restart"
read_ok vm1 0xab
read_ok vm2 0xcd
addcow ctl --control "$CONTROL" query-exports | grep -q vm2
echo "== the .deb test passed"
