#!/usr/bin/env bash
# Checks every libvirt <domain> of docs/INTEGRATION.md with virt-xml-validate (libvirt's own
# RELAX NG schemas, package libvirt-clients: installed here when missing and we are root;
# skipped with a banner when it cannot be). The QEMU command lines of that page are booted by
# daemon/tests/vhost_tcg.rs.
set -euo pipefail
cd "$(dirname "$0")/.."

banner() { printf '\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n!!! %s\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\n' "$*"; }
# virt-xml-validate runs xmllint (libxml2-utils, only recommended by libvirt-clients).
if { ! command -v virt-xml-validate >/dev/null || ! command -v xmllint >/dev/null; } && [ "$(id -u)" -eq 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libvirt-clients libxml2-utils >/dev/null 2>&1 || true
fi
if ! command -v virt-xml-validate >/dev/null || ! command -v xmllint >/dev/null; then
  banner "SKIPPED: virt-xml-validate/xmllint (libvirt-clients, libxml2-utils) are not installed and could not be; the libvirt XML of docs/INTEGRATION.md is not checked"
  exit 0
fi

dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
# Each ```xml block that holds a <domain> into its own file.
awk -v dir="$dir" '
  /^```xml/ { n++; f = sprintf("%s/domain-%d.xml", dir, n); inside = 1; next }
  /^```/ && inside { inside = 0; close(f); next }
  inside { print > f }
' docs/INTEGRATION.md
count=0
for f in "$dir"/domain-*.xml; do
  grep -q '<domain' "$f" || continue
  virt-xml-validate "$f" domain
  count=$((count + 1))
done
[ "$count" -ge 3 ] || { echo "test-integration: expected at least 3 domains, found $count" >&2; exit 1; }
echo "== $count libvirt domains of docs/INTEGRATION.md are valid"
