#!/usr/bin/env bash
# Builds the Debian package with cargo deb (metadata: [package.metadata.deb] in
# daemon/Cargo.toml; units and default configuration: packaging/). Prints the .deb's path on
# its last line.
#
#   scripts/build-deb.sh          release binary (what to ship; a release build of the
#                                 workspace takes several minutes on 2 cores)
#   scripts/build-deb.sh --debug  the debug binary (what the package test installs: no
#                                 release build; same units, configuration and docs)
set -euo pipefail
cd "$(dirname "$0")/.."
mode=release
[ "${1:-}" = "--debug" ] && mode=debug
# cargo-deb's own speed does not matter: built unoptimised it installs in under 2 minutes on 2
# cores instead of about 6 (a fresh CI machine pays this once per run).
command -v cargo-deb >/dev/null || CARGO_PROFILE_RELEASE_OPT_LEVEL=0 CARGO_PROFILE_RELEASE_LTO=false \
  CARGO_PROFILE_RELEASE_CODEGEN_UNITS=256 CARGO_PROFILE_RELEASE_DEBUG=false \
  cargo install cargo-deb --locked
if [ "$mode" = release ]; then
  cargo build --release -p addcow-daemon --bin addcow
else
  cargo build -p addcow-daemon --bin addcow
fi
# Man pages and completions, from the binary's own clap definitions.
rm -rf target/deb-stage
"target/$mode/addcow" gen-docs target/deb-stage
gzip -9n target/deb-stage/man/*.1
variant=()
if [ "$mode" = debug ]; then
  # cargo deb packages only target/release binaries: the debug variant names this copy.
  variant=(--variant debug)
  cp "target/debug/addcow" target/deb-stage/addcow
  strip --strip-debug target/deb-stage/addcow
fi
mkdir -p target/debian
out="target/debian/addcow-$mode.deb"
cargo deb -p addcow-daemon --no-build "${variant[@]}" --output "$out" >&2
echo "$out"
