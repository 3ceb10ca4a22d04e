#!/usr/bin/env bash
# What a running backup (backup-begin: copy-before-write into a scratch file) costs the guest's
# writes, measured in one run of one daemon: fio randwrite 4 KiB (QD32) and sequential write
# 1 MiB (QD8) over NBD, each on an overlay with no backup and on one with a backup active.
#
# Each workload writes the whole disk twice:
#   pass 1: every 64 KiB chunk is written for the first time since backup-begin: with the backup,
#           each first write of a chunk copies it (read through the chain + write to the
#           scratch) before it goes on. The worst case: a guest rewriting its whole disk while
#           the backup runs.
#   pass 2: the same writes again: every chunk is copied already, a write only checks a bit.
# Ratios are backup / no backup for the same pass (both overlays over the same base, both
# fresh before pass 1).
#
#   scripts/backup_cost.sh                # 1 GiB disk; ADDCOW=path/to/addcow, SIZE=2G, DIR=...
set -euo pipefail

ADDCOW=${ADDCOW:-target/release/addcow}
SIZE=${SIZE:-1G}
DIR=${DIR:-$(mktemp -d "${TMPDIR:-/var/tmp}/backup-cost.XXXXXX")}
[ -x "$ADDCOW" ] || { echo "no $ADDCOW (cargo build --release -p addcow-daemon)" >&2; exit 1; }
command -v fio >/dev/null || { echo "fio is needed" >&2; exit 1; }

PID=
cleanup() {
    if [ -n "$PID" ]; then kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi
    rm -rf "$DIR"
}
trap cleanup EXIT

bytes=$(python3 -c "import sys; s=sys.argv[1]; m={'K':1<<10,'M':1<<20,'G':1<<30}; print(int(s[:-1])*m[s[-1]] if s[-1] in m else int(s))" "$SIZE")
echo "disk: $SIZE over a base of random data; folder $DIR" >&2
head -c "$bytes" /dev/urandom > "$DIR/base.raw"
exports=()
for e in rand-plain rand-backup seq-plain seq-backup; do
    "$ADDCOW" create -b "$DIR/base.raw" "$DIR/$e.add-cow" >/dev/null
    exports+=(--export "$e=$DIR/$e.add-cow")
done
"$ADDCOW" serve --socket "$DIR/nbd.sock" --control "$DIR/ctl.sock" --allow-dir "$DIR" \
    "${exports[@]}" 2>"$DIR/daemon.log" &
PID=$!
for _ in $(seq 100); do [ -S "$DIR/ctl.sock" ] && [ -S "$DIR/nbd.sock" ] && break; sleep 0.1; done

ctl() { "$ADDCOW" ctl --control "$DIR/ctl.sock" "$@" >/dev/null; }

# fio over NBD on export $1: $2 = randwrite|write, $3 = block size, $4 = depth; prints MiB/s.
run_fio() {
    sync # each run starts with no dirty pages of an earlier one being written back
    fio --name=guest --ioengine=nbd --uri="nbd+unix:///$1?socket=$DIR/nbd.sock" \
        --rw="$2" --bs="$3" --iodepth="$4" --size="$SIZE" --randrepeat=0 \
        --output-format=json 2>/dev/null |
        python3 -c "import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index('{'):]); print('%.1f' % (j['jobs'][0]['write']['bw_bytes']/1048576))"
}

ctl backup-begin export=rand-backup checkpoint=c1
ctl backup-begin export=seq-backup checkpoint=c1
printf '%-22s %6s %12s %12s %7s\n' workload pass "no backup" "backup" ratio
for w in "rand randwrite 4k 32" "seq write 1M 8"; do
    set -- $w
    for pass in 1 2; do
        plain=$(run_fio "$1-plain" "$2" "$3" "$4")
        backup=$(run_fio "$1-backup" "$2" "$3" "$4")
        ratio=$(python3 -c "print('%.2f' % ($backup / $plain))")
        printf '%-22s %6s %9s MiB/s %7s MiB/s %6s\n' "$2 $3 QD$4" "$pass" "$plain" "$backup" "$ratio"
    done
done
copied=$("$ADDCOW" ctl --json --control "$DIR/ctl.sock" query-exports |
    python3 -c "import json,sys; print(sum((e.get('backup') or {}).get('bytes_copied',0) for e in json.load(sys.stdin) if (e.get('backup') or {}).get('role')=='source'))")
echo "copied into the scratch files: $((copied >> 20)) MiB" >&2
ctl backup-end export=rand-backup
ctl backup-end export=seq-backup
