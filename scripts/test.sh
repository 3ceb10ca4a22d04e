#!/usr/bin/env bash
# Runs every test of addcow on a fresh Debian machine: installs what the suite needs when it is
# missing (apt-get, as root; cargo-fuzz with cargo), then formatting, lints, the whole test suite,
# the root-only tests (loop-mounted file systems), a bounded fuzz run and the benchmark smoke run.
#
# Longer runs: ADDCOW_SOAK_SECS (default 30) for the soak test, ADDCOW_FUZZ_SECS (default 10)
# per fuzz target; scripts/fuzz.sh alone for long fuzzing.
set -euo pipefail
cd "$(dirname "$0")/.."

# Every step's banner carries the seconds since the start, so a slow CI run shows where it went.
step() { echo "== [+${SECONDS}s] $*"; }

need_pkgs=()
command -v qemu-img >/dev/null || need_pkgs+=(qemu-utils)
command -v fio >/dev/null || need_pkgs+=(fio)
command -v nbdinfo >/dev/null || need_pkgs+=(libnbd-bin)
command -v nbdkit >/dev/null || need_pkgs+=(nbdkit)
command -v curl >/dev/null || need_pkgs+=(curl)
command -v qemu-storage-daemon >/dev/null || need_pkgs+=(qemu-utils)
command -v mkfs.ext4 >/dev/null || need_pkgs+=(e2fsprogs)
command -v losetup >/dev/null || need_pkgs+=(mount)
command -v prlimit >/dev/null || need_pkgs+=(util-linux)
/usr/bin/python3 -c 'import nbd' 2>/dev/null || need_pkgs+=(python3-libnbd)
command -v blockdev >/dev/null || need_pkgs+=(util-linux)
command -v openssl >/dev/null || need_pkgs+=(openssl)
pkg-config --exists openssl 2>/dev/null || need_pkgs+=(libssl-dev pkg-config)
# The vhost-user-blk TCG smoke test: a static busybox for the guest's initramfs, and QEMU's
# system emulator (without its recommends: no GUI, no firmware beyond SeaBIOS) of exactly the
# installed qemu-utils' version: another version would replace qemu-utils (apt removes it), so
# a qemu-utils from bookworm-backports gets its emulator from there, and when that cannot be
# installed without removing anything the TCG test is skipped with a message.
lean_pkgs=()
[ -x /bin/busybox ] || [ -x /usr/bin/busybox ] || lean_pkgs+=(busybox-static)
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
qemu_utils_version=""
if ! command -v qemu-system-x86_64 >/dev/null; then
  qemu_utils_version=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
  case "$qemu_utils_version" in
    *bpo12*)
      [ -n "$(grep -rls bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null)" ] ||
        echo 'deb http://deb.debian.org/debian bookworm-backports main' |
        $SUDO tee /etc/apt/sources.list.d/addcow-bookworm-backports.list >/dev/null ;;
  esac
fi
if [ ${#need_pkgs[@]} -gt 0 ] || [ ${#lean_pkgs[@]} -gt 0 ] || ! command -v qemu-system-x86_64 >/dev/null; then
  step "installing ${need_pkgs[*]} ${lean_pkgs[*]}"
  $SUDO apt-get update -qq
fi
if [ ${#need_pkgs[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
if [ ${#lean_pkgs[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${lean_pkgs[@]}" >/dev/null
fi
if ! command -v qemu-system-x86_64 >/dev/null; then
  qemu_system="qemu-system-x86${qemu_utils_version:+=$qemu_utils_version}"
  target_release=()
  case "$qemu_utils_version" in *bpo12*) target_release=(-t bookworm-backports) ;; esac
  step "installing $qemu_system (the TCG smoke test's emulator)"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends --no-remove \
    "${target_release[@]}" "$qemu_system" >/dev/null ||
    step "$qemu_system cannot be installed without removing packages: the TCG smoke test will be skipped"
fi

step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
cargo clippy -p addcow-engine -p addcow-engine-testkit --all-targets --features crash-recorder -- -D warnings
cargo clippy -p addcow-engine --all-targets --features crash-recorder,unsafe-populate-bits-first -- -D warnings
cargo clippy -p addcow-daemon --all-targets --features fuzzing -- -D warnings
cargo clippy -p addcow-engine --all-targets --features fault-injection -- -D warnings
cargo clippy -p addcow-engine --all-targets --features crash-recorder,unsafe-lifecycle-order -- -D warnings
cargo clippy -p addcow-engine --all-targets --features crash-recorder,unsafe-flush-skips-data-sync -- -D warnings
cargo clippy -p addcow-engine --all-targets --features crash-recorder,unsafe-dirty-bits-after-data -- -D warnings
cargo clippy -p addcow-engine --all-targets --features lifecycle-hooks -- -D warnings
# The engine without TLS (an embedder that drops OpenSSL).
cargo clippy -p addcow-engine --all-targets --no-default-features -- -D warnings

step "module structure (no import cycle between modules, at most 16 modules per folder)"
python3 scripts/check_modules.py --self-test
python3 scripts/check_modules.py

step "tests"
if command -v cargo-nextest >/dev/null; then
  cargo nextest run --workspace --no-fail-fast
  cargo nextest run -p addcow-engine --features crash-recorder --no-fail-fast -E 'test(crash)'
  cargo nextest run -p addcow-engine --features fault-injection --no-fail-fast -E 'binary(engine_faults) | binary(engine_populate_faults) | binary(engine_publication) | binary(engine_fleece)'
else
  cargo test --workspace --no-fail-fast
  cargo test -p addcow-engine --features crash-recorder --no-fail-fast crash
  cargo test -p addcow-engine --features fault-injection --no-fail-fast --test engine_faults --test engine_populate_faults --test engine_publication --test engine_fleece
fi
# The dirty-marks protocol once more on one CPU: there a setter is preempted between setting its
# bits and marking them (the window a FLUSH must not slip through), not only run beside others.
taskset -c 0 cargo test -p addcow-engine --no-fail-fast --test dirty_protocol
# A lifecycle tool acting on an overlay that a stopping server let go of just before the tool's
# lock (the test acts as that server at that moment).
cargo test -p addcow-engine --features lifecycle-hooks --no-fail-fast --test lifecycle_ops
# The last partial O_DIRECT unit on a real 4096-byte-sector device: a loop device with ext4 on it,
# which needs root and the loop driver.
if [ "$(id -u)" -eq 0 ] && losetup -f >/dev/null 2>&1; then
  cargo test -p addcow-engine --no-fail-fast --test engine_4k_device -- --ignored
else
  step "SKIPPED engine_4k_device: needs root and a free loop device (losetup -f failed or not root)"
fi
# The ordering checks must be able to fail: with the commit order deliberately broken, the crash
# checker must find violations, the recorder-log ordering tests must fail and the failed-data-sync
# fault tests must find a bit on disk (they are should_panic there).
cargo test -p addcow-engine --features crash-recorder,unsafe-bits-before-sync --no-fail-fast --test crash_consistency crash_checker_detects_bits_before_sync
# Populate (stream) with its bits set before the copied data is written: the checker must find it.
cargo test -p addcow-engine --features crash-recorder,unsafe-populate-bits-first --no-fail-fast --test crash_consistency crash_checker_detects_populate_bits_first
# Copy-on-read copies through populate: with that order broken, a workload whose only populates
# are copy-on-read reads must show violating crash states too.
cargo test -p addcow-engine --features crash-recorder,unsafe-populate-bits-first --no-fail-fast --test crash_consistency crash_checker_detects_copy_on_read_bits_first
cargo test -p addcow-engine --features crash-recorder,unsafe-bits-before-sync --no-fail-fast --test engine_ordering
cargo test -p addcow-engine --features fault-injection,unsafe-bits-before-sync --no-fail-fast --test engine_faults data_fdatasync
# A FLUSH answered without the data sync when no bit is new (overwrites of set sectors lost):
# the crash checker must find it and the recorder-log FLUSH-cost test must fail (should_panic).
cargo test -p addcow-engine --features crash-recorder,unsafe-flush-skips-data-sync --no-fail-fast --test crash_consistency crash_checker_detects_skipped_data_sync
cargo test -p addcow-engine --features crash-recorder,unsafe-flush-skips-data-sync --no-fail-fast --test engine_flush_cost crash_flush_costs_only_what_was_written
# Changed-block tracking: with an enabled persistent dirty bitmap, every crash state has every
# sector that may differ dirty in the sidecar; with the data let go before its dirty bits are
# durable, the checker must find crash states where a changed sector is clean.
cargo test -p addcow-engine --features crash-recorder --no-fail-fast --test crash_dirty_bitmaps
cargo test -p addcow-engine --features crash-recorder,unsafe-dirty-bits-after-data --no-fail-fast --test crash_dirty_bitmaps crash_checker_detects_dirty_bits_after_data
# The same for resize, rebase and commit: with each one's order broken, the lifecycle crash
# checker must find crash states that do not open or read wrong (the tests assert violations).
cargo test -p addcow-engine --features crash-recorder,unsafe-lifecycle-order --no-fail-fast --test lifecycle_crash
cargo test --workspace --doc

step "heavy or timing-sensitive daemon tests, one at a time (restarts under QEMU, 100 kill cycles,"
echo "   qemu-img map of a fragmented overlay, EMFILE, buffer budget under a 32 MiB-write flood,"
echo "   planned restarts of nbdkit, qemu-nbd and qemu-storage-daemon as image servers under reads,"
echo "   a TLS image server killed and restarted under a served nbds:// base,"
echo "   soak for ${ADDCOW_SOAK_SECS:-30}s, online stream jobs under fio verify and SIGKILL,"
echo "   export-add against a folder symlink switched in a loop, QD1 reads beside a hostile"
echo "   vhost-user-blk frontend on the same core, NBD over TLS with qemu-io, nbdinfo, nbdcopy and"
echo "   libnbd: x509, PSK, verify-peer, authz, reloads, hostile handshakes, a full + 6 incremental"
echo "   backups restored under fio with SIGKILLs)"
cargo test -p addcow-daemon --test nbd_restart --test nbd_kill --test nbd_block_status \
  --test nbd_hygiene --test nbd_memory --test nbd_soak --test control_stream --test remote_base \
  --test remote_base_tls --test control_allow --test vhost_hostile --test nbd_tls --test backup_loop \
  -- --ignored --test-threads=1 --nocapture 2>&1 \
  | grep -vE '^\[(addcow|qsd)\]'

step "vhost-user-blk and NBD under a real guest: QEMU TCG boots a kernel with vhost-user-blk-pci, then with the NBD client (docs/INTEGRATION.md's command lines)"
# A kernel and its virtio modules: the host's /boot/vmlinuz-* or ADDCOW_TCG_KERNEL, else the
# Debian kernel package's vmlinuz and virtio modules extracted (not installed) under target/.
if [ -z "${ADDCOW_TCG_KERNEL:-}" ] && ! ls /boot/vmlinuz-* >/dev/null 2>&1; then
  kdir="$PWD/target/tcg-kernel"
  if ! ls "$kdir"/boot/vmlinuz-* >/dev/null 2>&1; then
    kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}' || true)
    mkdir -p "$kdir"
    (cd "$kdir" && apt-get download -qq "$kpkg" 2>/dev/null && \
      dpkg-deb --fsys-tarfile "$kpkg"_*.deb | tar -x --wildcards './boot/vmlinuz-*' \
        './lib/modules/*/kernel/drivers/virtio/*' './lib/modules/*/kernel/drivers/block/virtio_blk.ko' && \
      rm -f "$kpkg"_*.deb) || step "could not download Debian's kernel package (${kpkg:-none found})"
  fi
  ADDCOW_TCG_KERNEL=$(ls "$kdir"/boot/vmlinuz-* 2>/dev/null | head -n1 || true)
  export ADDCOW_TCG_KERNEL
fi
if ! command -v qemu-system-x86_64 >/dev/null; then
  step "SKIPPED vhost_tcg: qemu-system-x86_64 is not installed (see the install step above)"
elif [ -z "${ADDCOW_TCG_KERNEL:-}" ] && ! ls /boot/vmlinuz-* >/dev/null 2>&1; then
  step "SKIPPED vhost_tcg: no guest kernel (no /boot/vmlinuz-*, and Debian's kernel package could not be downloaded)"
else
  ADDCOW_TCG=1 cargo test -p addcow-daemon --test vhost_tcg -- --ignored --nocapture 2>&1 | grep -vE '^\[addcow\]'
fi

step "root-only tests (a loop-mounted ext4 filled up: ENOSPC; FAST_ZERO on a ramfs)"
if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/test.sh: the ENOSPC test needs root (losetup, mount); run the suite as root" >&2
  exit 1
fi
cargo test -p addcow-daemon --test nbd_enospc --test nbd_protocol -- --ignored

step "the Debian package (debug binary; about a minute): build, dpkg -i, serve an overlay of"
echo "   the config through the unit's ExecStart (systemctl where systemd is PID 1), addcow ctl"
echo "   export-add, restart, both served; then purged"
scripts/test-deb.sh
step "docs/INTEGRATION.md: its libvirt domains checked with virt-xml-validate"
scripts/test-integration.sh

step "fuzzing, bounded (${ADDCOW_FUZZ_SECS:-10}s per target; scripts/fuzz.sh for long runs)"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
scripts/fuzz.sh "${ADDCOW_FUZZ_SECS:-10}"

step "benchmark smoke run (compare --quick: every profile x every server once, no thresholds)" && cargo run -q -p addcow-bench -- compare --quick
step "vhost-user-blk benchmark smoke run (vhost --quick: addcow vs qemu-storage-daemon vs addcow NBD, once)"
cargo run -q -p addcow-bench -- vhost --quick
step "TLS benchmark smoke run (tls --quick: addcow TCP, addcow TLS, qemu-nbd TLS, once)"
cargo run -q -p addcow-bench -- tls --quick
step "QoS benchmark smoke run (qos --quick: throttle accuracy, isolation, cost, over NBD and vhost-user-blk, once)"
cargo run -q -p addcow-bench -- qos --quick
step "done"
