#!/usr/bin/env bash
# Fuzzes addcow's parsers with cargo-fuzz (libFuzzer): the add-cow header and bitmap, the NBD
# handshake (also under each TLS policy, through STARTTLS), NBD request decoding, the request planner and whole connections, the control socket's
# JSON-RPC, the control path's open checks (allowed folders) on real files, and virtio-blk
# requests (descriptor chains over guest memory).
# Each target runs SECONDS (default 600) from its corpus (fuzz/corpus/TARGET, seeded from
# fuzz/seeds/TARGET); the executions and any crash are reported at the end, and the script exits
# non-zero if a target crashed (the input is kept in fuzz/artifacts/TARGET: turn it into a
# regression test). Runs on stable Rust (no sanitizer: the targets are safe Rust).
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${1:-600}"
[ $# -gt 0 ] && shift
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(overlay_header bitmaps_sidecar nbd_handshake nbd_handshake_tls nbd_transmission nbd_plan nbd_client_reply control_json control_open_checks virtio_blk_request)

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
cargo fuzz build -s none

status=0
summary=()
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  log="artifacts/$t/last-run.log"
  echo "== fuzz $t for ${secs}s"
  set +e
  cargo fuzz run -s none "$t" "corpus/$t" "seeds/$t" -- \
    -max_total_time="$secs" -timeout=60 -rss_limit_mb=4096 -print_final_stats=1 >"$log" 2>&1
  rc=$?
  set -e
  runs=$(grep -oE '^Done [0-9]+ runs' "$log" | grep -oE '[0-9]+' || true)
  [ -n "$runs" ] || runs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' || echo "?")
  crashes=$(find "artifacts/$t" -maxdepth 1 -type f \( -name 'crash-*' -o -name 'timeout-*' -o -name 'oom-*' -o -name 'leak-*' \) | wc -l)
  corpus=$(find "corpus/$t" -type f | wc -l)
  summary+=("$t: $runs executions, corpus $corpus, crash files $crashes, exit $rc")
  if [ "$rc" -ne 0 ] || [ "$crashes" -ne 0 ]; then
    status=1
    tail -n 40 "$log"
  fi
done
echo "== fuzz summary (${secs}s per target)"
printf '%s\n' "${summary[@]}"
exit $status
