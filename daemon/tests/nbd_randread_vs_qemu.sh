#!/usr/bin/env bash
# 4 KiB random-read IOPS (fio ioengine=nbd, QD32) through `addcow serve` and through
# `qemu-nbd -f qcow2 --cache=none --aio=io_uring` serving a qcow2 overlay of the same data,
# interleaved in one run. Not part of CI (timing); run by hand:
#   cargo build --release -p addcow-daemon
#   daemon/tests/nbd_randread_vs_qemu.sh [ROUNDS] [SECONDS]
# Data: a 512 MiB random base; both overlays hold the same 64 MiB written at 128 MiB.
# Prints per round IOPS, p99 latency (us) and server CPU ticks (1/100 s), then medians + ratio.
set -euo pipefail
ROUNDS=${1:-4}
RT=${2:-5}
BIN=${ADDCOW:-$(cd "$(dirname "$0")/../.." && pwd)/target/release/addcow}
DIR=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$DIR"' EXIT
cd "$DIR"
dd if=/dev/urandom of=base.raw bs=1M count=512 status=none
dd if=/dev/urandom of=chunk.raw bs=1M count=64 status=none
"$BIN" create -b base.raw disk.add-cow >/dev/null
qemu-img create -q -f qcow2 -b base.raw -F raw overlay.qcow2
qemu-io -f qcow2 -c "write -s chunk.raw 128M 64M" -c flush overlay.qcow2 >/dev/null

PID=
start_addcow() {
  rm -f "$DIR/a.sock"
  "$BIN" serve --socket "$DIR/a.sock" --cache direct disk.add-cow 2>>a.log &
  PID=$!
  until [ -S "$DIR/a.sock" ]; do sleep 0.05; done
}
start_qemu() {
  rm -f "$DIR/q.sock"
  qemu-nbd -f qcow2 --cache=none --aio=io_uring -t -e 0 -k "$DIR/q.sock" overlay.qcow2 2>>q.log &
  PID=$!
  until [ -S "$DIR/q.sock" ]; do sleep 0.05; done
}
stop() { kill "$PID"; wait "$PID" || true; }
cpu() { awk '{print $14+$15}' "/proc/$1/stat"; }
fiorun() {
  fio --name=rr --ioengine=nbd --uri="nbd+unix:///?socket=$1" --rw=randread --bs=4k \
    --iodepth=32 --size=512M --runtime="$RT" --time_based --output-format=json 2>/dev/null |
    sed -n '/^{/,$p' |
    python3 -c 'import json,sys; r=json.load(sys.stdin)["jobs"][0]["read"]; print("%.0f %.0f" % (r["iops"], r["clat_ns"]["percentile"]["99.000000"]/1000))'
}
start_addcow
qemu-io -f raw -c "write -s chunk.raw 128M 64M" -c flush "nbd+unix:///?socket=$DIR/a.sock" >/dev/null
stop
A=(); Q=()
for r in $(seq "$ROUNDS"); do
  start_addcow; c0=$(cpu "$PID"); out=$(fiorun "$DIR/a.sock"); c1=$(cpu "$PID"); stop
  echo "round $r addcow   iops p99us: $out  cpu_ticks: $((c1 - c0))"; A+=("${out%% *}")
  start_qemu; c0=$(cpu "$PID"); out=$(fiorun "$DIR/q.sock"); c1=$(cpu "$PID"); stop
  echo "round $r qemu-nbd iops p99us: $out  cpu_ticks: $((c1 - c0))"; Q+=("${out%% *}")
done
python3 - "${A[*]}" "${Q[*]}" <<'PY'
import statistics, sys
a = statistics.median(map(float, sys.argv[1].split()))
q = statistics.median(map(float, sys.argv[2].split()))
print("median IOPS: addcow %.0f, qemu-nbd (qcow2) %.0f, ratio %.2f" % (a, q, a / q))
PY
