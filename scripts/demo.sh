#!/usr/bin/env bash
# The README's main command: on a fresh Debian machine, installs the NBD clients the demo's printed
# commands use (qemu-utils, libnbd-bin) and what building needs (OpenSSL's headers, for TLS)
# when missing, builds addcow and serves the built-in demo
# overlay on ./addcow.sock. Extra arguments go to `addcow serve`.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v qemu-img >/dev/null || need_pkgs+=(qemu-utils)
command -v nbdinfo >/dev/null || need_pkgs+=(libnbd-bin)
command -v pkg-config >/dev/null && pkg-config --exists openssl 2>/dev/null || need_pkgs+=(libssl-dev pkg-config)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "== installing ${need_pkgs[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

cargo build --release -q -p addcow-daemon --bin addcow
exec ./target/release/addcow serve "$@"
