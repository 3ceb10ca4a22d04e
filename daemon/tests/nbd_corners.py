#!/usr/bin/python3
"""NBD protocol corners against `addcow serve`, through libnbd (nbdsh's Python module).

Usage: nbd_corners.py SOCKET [RO_SOCKET]

Expects the daemon's layout used by the tests: export "" of size S (a multiple of 1 MiB) whose
first S/2 bytes come from a base filled with 0xab and whose second half is past the base
(unallocated, reads as zeros), nothing written yet; and a read-only export "ro" with the same
layout on RO_SOCKET (default: SOCKET). Exits non-zero (with a message) at the first failed check.
"""
import errno
import sys

import nbd

SOCK = sys.argv[1]
URI = "nbd+unix:///?socket=" + SOCK
RO_URI = "nbd+unix:///ro?socket=" + (sys.argv[2] if len(sys.argv) > 2 else SOCK)
checks = 0


def check(cond, what):
    global checks
    checks += 1
    if not cond:
        print("FAILED:", what, file=sys.stderr)
        sys.exit(1)


def expect_errno(fn, want, what):
    try:
        fn()
    except nbd.Error as e:
        check(e.errnum == want, "%s: errno %s, want %s (%s)" % (what, e.errnum, want, e))
        return
    check(False, what + ": no error")


def connect(uri=URI, structured=True, contexts=("base:allocation", "qemu:allocation-depth")):
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    for c in contexts:
        h.add_meta_context(c)
    h.connect_uri(uri)
    return h


def extents(h, count, offset, flags=0):
    got = {}

    def cb(ctx, off, entries, err):
        got[ctx] = list(zip(entries[0::2], entries[1::2]))
        return 0

    h.block_status(count, offset, cb, flags)
    return got


def chunks(h, count, offset, flags=0):
    seen = []

    def cb(buf, off, status, err):
        seen.append((status, off, len(buf)))
        return 0

    data = h.pread_structured(count, offset, cb, flags)
    return data, seen


h = connect()
S = h.get_size()
half = S // 2
check(S % (1 << 20) == 0 and S >= (2 << 20), "size %d" % S)
check(h.get_structured_replies_negotiated(), "structured replies negotiated")
for what, fn in [("flush", h.can_flush), ("fua", h.can_fua), ("trim", h.can_trim),
                 ("zero", h.can_zero), ("fast zero", h.can_fast_zero), ("df", h.can_df),
                 ("multi-conn", h.can_multi_conn), ("cache", h.can_cache)]:
    check(fn(), "can " + what)
check(not h.is_read_only(), "rw export is writable")
check(h.can_meta_context("base:allocation"), "base:allocation negotiated")
check(h.can_meta_context("qemu:allocation-depth"), "allocation-depth negotiated")
check(h.get_block_size(nbd.SIZE_MINIMUM) == 1, "min block 1")
check(h.get_block_size(nbd.SIZE_PREFERRED) == 4096, "preferred block 4096")
check(h.get_block_size(nbd.SIZE_MAXIMUM) == 32 << 20, "max block 32 MiB")

# Allocation before any write: base half, zero half.
e = extents(h, S, 0)
check(e["base:allocation"] == [(half, 0), (half, 3)], "base:allocation %r" % e)
check(e["qemu:allocation-depth"] == [(half, 2), (half, 0)], "depth %r" % e)
e = extents(h, S, 0, nbd.CMD_FLAG_REQ_ONE)
check(all(len(v) == 1 and v[0][0] <= S for v in e.values()), "REQ_ONE: one extent %r" % e)

# Structured read across the boundary: data then hole; DF: one data chunk.
data, seen = chunks(h, 8192, half - 4096)
check(data == b"\xab" * 4096 + b"\0" * 4096, "read across base end")
check(sorted(s for s, _, _ in seen) == [nbd.READ_DATA, nbd.READ_HOLE], "chunks %r" % seen)
data, seen = chunks(h, 8192, half - 4096, nbd.CMD_FLAG_DF)
check(len(seen) == 1 and seen[0][0] == nbd.READ_DATA, "DF chunks %r" % seen)
data, seen = chunks(h, 65536, half)
check(seen == [(nbd.READ_HOLE, half, 65536)] and data == bytes(65536), "hole read %r" % seen)

# Writes: unaligned, FUA, zero, trim, cache, flush.
h.pwrite(b"\x5a" * 100, 7, nbd.CMD_FLAG_FUA)
check(h.pread(512, 0) == b"\xab" * 7 + b"\x5a" * 100 + b"\xab" * 405, "unaligned RMW keeps base")
e = extents(h, 4096, 0)
check(e["qemu:allocation-depth"][0] == (512, 1), "written sector depth 1: %r" % e)
h.pwrite(b"\x11" * 4096, half + 8192)
check(h.pread(4096, half + 8192) == b"\x11" * 4096, "write past base end")
h.zero(4096, 65536, nbd.CMD_FLAG_FAST_ZERO)
check(h.pread(4096, 65536) == bytes(4096), "fast zero reads zero")
h.zero(1000, 70000, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
check(h.pread(1000, 70000) == bytes(1000), "no-hole zero reads zero")
expect_errno(lambda: h.zero(100, 131073, nbd.CMD_FLAG_FAST_ZERO), errno.ENOTSUP,
             "fast zero of a partial sector")
check(h.pread(2, 131172) == b"\xab\xab", "failed fast zero left data alone")
h.trim(4096, 2 * 65536, nbd.CMD_FLAG_FUA)
check(h.pread(4096, 2 * 65536) == bytes(4096), "trimmed range reads zero")
h.cache(65536, 0)
h.flush()

# Strict mode off: the server must refuse bad requests and keep going.
h.set_strict_mode(0)
expect_errno(lambda: h.pread(512, S), errno.EINVAL, "read past end")
expect_errno(lambda: h.pread(2, S - 1), errno.EINVAL, "read straddling end")
expect_errno(lambda: h.pwrite(b"x" * 512, S - 256), errno.ENOSPC, "write past end")
expect_errno(lambda: h.cache(512, S), errno.EINVAL, "cache past end")
expect_errno(lambda: h.pread(512, 0, 0x100), errno.EINVAL, "unknown read flag")
expect_errno(lambda: h.pwrite(b"y" * 512, 0, nbd.CMD_FLAG_DF), errno.EINVAL, "DF on write")
expect_errno(lambda: h.block_status(512, S, lambda *a: 0), errno.EINVAL, "status past end")
check(h.pread(512, 0)[7:107] == b"\x5a" * 100, "connection still fine after refusals")
h.shutdown()

# Multi-conn coherency: write on one connection, flush on a second, read on a third.
hs = [connect() for _ in range(3)]
hs[0].pwrite(b"\xc3" * 65536, 3 * 65536)
hs[1].flush()
check(hs[2].pread(65536, 3 * 65536) == b"\xc3" * 65536, "multi-conn coherency")
for x in hs:
    x.shutdown()

# Simple replies: no DF, holes come back as zeros.
h = connect(structured=False, contexts=())
check(not h.get_structured_replies_negotiated(), "structured refused on request")
check(not h.can_df(), "no DF without structured replies")
check(h.pread(4096, half + 65536) == bytes(4096), "simple read of hole")
check(h.pread(8, 0) == b"\xab" * 7 + b"\x5a", "simple read of data")
h.set_strict_mode(0)
expect_errno(lambda: h.pread(512, 0, nbd.CMD_FLAG_DF), errno.EINVAL, "DF without structured")
expect_errno(lambda: h.block_status(512, 0, lambda *a: 0), errno.EINVAL,
             "block status without contexts")
h.shutdown()

# Read-only export: flags and EPERM.
h = connect(RO_URI)
check(h.is_read_only(), "ro export advertises READ_ONLY")
check(not h.can_trim() and not h.can_zero(), "ro export: no trim/zero")
check(h.pread(16, 0) == b"\xab" * 16, "ro read")
h.set_strict_mode(0)
expect_errno(lambda: h.pwrite(b"z" * 512, 0), errno.EPERM, "write on ro")
expect_errno(lambda: h.trim(512, 0), errno.EPERM, "trim on ro")
h.shutdown()

# INFO before GO gives the same answers; LIST_META_CONTEXT lists both contexts.
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(URI)
listed = []
h.opt_list_meta_context(lambda name: listed.append(name) or 0)
check(sorted(listed) == ["base:allocation", "qemu:allocation-depth"], "listed %r" % listed)
h.opt_info()
info = (h.get_size(), h.can_multi_conn(), h.get_block_size(nbd.SIZE_MAXIMUM))
h.opt_go()
check((h.get_size(), h.can_multi_conn(), h.get_block_size(nbd.SIZE_MAXIMUM)) == info,
      "INFO matches GO")
h.shutdown()
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri("nbd+unix:///nonexistent?socket=" + SOCK)
try:
    h.opt_go()
    check(False, "GO to unknown export succeeded")
except nbd.Error:
    pass
h.set_export_name("")
h.opt_go()
check(h.get_size() == S, "GO after a failed GO")
h.shutdown()

print("nbd_corners: %d checks passed" % checks)
