"""A pull-mode backup client in the style of virtnbdbackup, for the tests.

usage: backup_client.py URI CONTEXT OUT
  CONTEXT: "full" reads every byte (holes of base:allocation skipped, zeros written as holes);
           "qemu:dirty-bitmap:NAME" reads only the extents that bitmap marks dirty (flag 1).
  OUT: an existing image file the read extents are written into at their offsets (a restore
       applies a full backup and then each incremental in order onto the same file).
Prints one JSON line: {"bytes_read": N, "extents": M, "size": S}.
"""
import json
import sys

import nbd

CHUNK = 32 << 20
STATUS_MAX = 1 << 30


def extents(h, size, context):
    """Yields (offset, length, flags) for `context` over the whole export."""
    off = 0
    while off < size:
        got = []

        def cb(meta, start, entries, err):
            if meta != context:
                return 0
            pos = start
            for i in range(0, len(entries), 2):
                got.append((pos, entries[i], entries[i + 1]))
                pos += entries[i]
            return 0

        h.block_status(min(STATUS_MAX, size - off), off, cb)
        if not got:
            raise SystemExit(f"no {context} extents at {off}")
        for start, length, flags in got:
            length = min(length, size - start)
            if length <= 0:
                continue
            yield start, length, flags
        off = got[-1][0] + got[-1][1]


def main():
    uri, mode, out = sys.argv[1], sys.argv[2], sys.argv[3]
    h = nbd.NBD()
    context = "base:allocation" if mode == "full" else mode
    h.add_meta_context(context)
    h.connect_uri(uri)
    if not h.can_meta_context(context):
        raise SystemExit(f"server does not offer {context}")
    size = h.get_size()
    read = 0
    n = 0
    with open(out, "r+b") as f:
        f.truncate(size)
        for start, length, flags in extents(h, size, context):
            if mode == "full":
                # base:allocation: flag 2 = reads as zeros (nothing to copy into a fresh file,
                # but a restore onto an older copy must write the zeros).
                want = True
            else:
                want = bool(flags & 1)
            if not want:
                continue
            n += 1
            pos = start
            while pos < start + length:
                take = min(CHUNK, start + length - pos)
                data = h.pread(take, pos)
                f.seek(pos)
                f.write(data)
                read += take
                pos += take
        f.flush()
    h.shutdown()
    print(json.dumps({"bytes_read": read, "extents": n, "size": size}))


main()
