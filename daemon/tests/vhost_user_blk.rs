//! End-to-end tests of `addcow serve --vhost-user-blk`, with libblkio's Rust implementation
//! (the `blkio` crate, driver `virtio-blk-vhost-user`) as the frontend: it maps its own memory
//! into the daemon over the vhost-user socket and drives real split virtqueues with EVENT_IDX.
//!
//! The same daemon also serves the overlay over NBD, so every content check is made twice: what
//! the vhost-user-blk frontend reads, and what an NBD client reads of the same disk, against a
//! model of what was written.

use std::mem::MaybeUninit;
use std::path::Path;
use std::time::Duration;

use addcow_daemon_testkit::vhost::{pattern, Frontend};
use addcow_daemon_testkit::{Daemon, Fixture, RawClient};
use blkio::ReqFlags;

const MIB: u64 = 1 << 20;

/// Starts `addcow serve` on `overlay` with NBD on `nbd` and vhost-user-blk on `vhost`.
fn start(nbd: &Path, vhost: &Path, overlay: &Path, cores: &str) -> Daemon {
    Daemon::start(
        nbd,
        &[
            "--cores",
            cores,
            "--vhost-user-blk",
            vhost.to_str().unwrap(),
            overlay.to_str().unwrap(),
        ],
    )
}

/// Reads the whole disk over NBD.
fn nbd_image(sock: &Path, size: u64) -> Vec<u8> {
    let mut c = RawClient::connect(sock, "").expect("nbd connect");
    let mut out = vec![0u8; size as usize];
    for (i, chunk) in out.chunks_mut(MIB as usize).enumerate() {
        assert_eq!(c.read(i as u64 * MIB, chunk).unwrap(), 0, "nbd read");
    }
    out
}

/// Asserts `got == want` and names the first differing byte.
fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i}: got {:#04x}, want {:#04x}",
            got[i], want[i]
        );
    }
}

#[test]
fn reads_writes_flush_discard_and_write_zeroes_match_the_model_over_both_front_ends() {
    let fx = Fixture::new(32 * MIB);
    let (nbd, vsock) = (fx.path("nbd.sock"), fx.path("vhost.sock"));
    let d = start(&nbd, &vsock, &fx.overlay(), "2");
    let mut model = fx.reference();
    let mut f = Frontend::connect(&vsock, 2).expect("blkio connect");
    assert_eq!(f.capacity(), 32 * MIB);

    // Fresh disk: the base's 0xab in the lower half, zeros above.
    assert_same(
        "fresh",
        &f.read(0, 15 * MIB, MIB as usize),
        &model[15 << 20..16 << 20],
    );
    assert_same(
        "fresh",
        &f.read(1, 16 * MIB, 65536),
        &model[16 << 20..(16 << 20) + 65536],
    );

    // Writes: one sector, across the base's end, 1 MiB, on both queues.
    let writes: [(usize, u64, usize); 5] = [
        (0, 512, 512),
        (1, 16 * MIB - 4096, 12288),
        (0, 3 * MIB + 1536, MIB as usize),
        (1, 31 * MIB, MIB as usize),
        (0, 7 * MIB, 4096),
    ];
    for (i, &(q, off, len)) in writes.iter().enumerate() {
        let data = pattern(i as u64 + 1, len);
        assert_eq!(f.write(q, off, &data), 0, "write {len} at {off}");
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
    // Read back through the other queue.
    for &(q, off, len) in &writes {
        // A sector either side too (clipped to the disk).
        let lo = off.saturating_sub(512) as usize;
        let hi = (off as usize + len + 512).min(model.len());
        let got = f.read(1 - q, lo as u64, hi - lo);
        assert_same("read back", &got, &model[lo..hi]);
    }

    // Discard and write-zeroes read as zeros afterwards (base data is never re-exposed).
    assert_eq!(f.discard(0, 3 * MIB, MIB), 0, "discard");
    model[3 << 20..4 << 20].fill(0);
    assert_eq!(f.write_zeroes(1, 8 * MIB, 2 * MIB), 0, "write-zeroes");
    model[8 << 20..10 << 20].fill(0);
    assert_same(
        "discarded",
        &f.read(0, 3 * MIB, 2 * MIB as usize),
        &model[3 << 20..5 << 20],
    );
    assert_same(
        "zeroed",
        &f.read(1, 8 * MIB, 2 * MIB as usize),
        &model[8 << 20..10 << 20],
    );
    assert_eq!(f.flush(0), 0, "flush");

    // Out of range: an error, not a crash.
    assert_ne!(f.write(0, 32 * MIB, &[1u8; 512]), 0, "write past the end");

    // The whole disk, as the vhost-user-blk frontend and as an NBD client see it.
    let mut whole = Vec::with_capacity(model.len());
    for i in 0..32 {
        whole.extend_from_slice(&f.read(i % 2, i as u64 * MIB, MIB as usize));
    }
    assert_same("whole disk over vhost-user-blk", &whole, &model);
    assert_same("whole disk over NBD", &nbd_image(&nbd, 32 * MIB), &model);
    drop(f);
    d.stop();
}

/// Page-aligned guest buffers are handed to the engine directly, others bounce: both must
/// read and write the same bytes (checked against the model and over NBD), at aligned and
/// unaligned disk offsets.
#[test]
fn aligned_guest_buffers_go_direct_and_misaligned_ones_bounce_with_the_same_data() {
    let fx = Fixture::new(16 * MIB);
    let (nbd, vsock) = (fx.path("nbd.sock"), fx.path("vhost.sock"));
    let d = start(&nbd, &vsock, &fx.overlay(), "1");
    let mut model = fx.reference();
    let mut f = Frontend::connect(&vsock, 1).expect("blkio connect");
    // (buffer offset in the region, disk offset, length): 0 and 8192 are page-aligned
    // (direct), 512 and 1536 are not (bounce); disk offsets aligned, sector-aligned only, and
    // across the base's end.
    let cases: [(usize, u64, usize); 6] = [
        (0, MIB, 65536),
        (512, 2 * MIB, 65536),
        (8192, 3 * MIB + 512, 12288),
        (1536, 4 * MIB + 512, 12288),
        (0, 8 * MIB - 4096, 8192),
        (512, 8 * MIB - 8192 - 512, 8192),
    ];
    for (i, &(at, off, len)) in cases.iter().enumerate() {
        let data = pattern(40 + i as u64, len);
        assert_eq!(f.write_from(0, off, &data, at), 0, "write case {i}");
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
    for (i, &(_, off, len)) in cases.iter().enumerate() {
        for at in [0usize, 4096, 512, 3584] {
            let lo = off as usize - 512;
            let got = f.read_into(0, lo as u64, len + 1024, at);
            assert_same(
                &format!("case {i} read into byte {at}"),
                &got,
                &model[lo..lo + len + 1024],
            );
        }
    }
    assert_eq!(f.flush(0), 0, "flush");
    assert_same("whole disk over NBD", &nbd_image(&nbd, 16 * MIB), &model);
    drop(f);
    d.stop();
}

#[test]
fn a_frontend_that_reconnects_finds_the_export_again() {
    let fx = Fixture::new(8 * MIB);
    let (nbd, vsock) = (fx.path("nbd.sock"), fx.path("vhost.sock"));
    let d = start(&nbd, &vsock, &fx.overlay(), "1");
    // The socket gets the NBD socket's hygiene: mode 0600, removed at exit.
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&vsock).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "socket mode");
    let data = pattern(9, 65536);
    {
        let mut f = Frontend::connect(&vsock, 1).expect("first connect");
        assert_eq!(f.write(0, MIB, &data), 0);
    }
    for round in 0..3 {
        let mut f =
            Frontend::connect(&vsock, 1).unwrap_or_else(|e| panic!("reconnect {round}: {e}"));
        assert_same("after reconnect", &f.read(0, MIB, data.len()), &data);
    }
    d.stop();
    assert!(!vsock.exists(), "socket left behind");
}

#[test]
fn flushed_writes_survive_sigkill_and_restart() {
    let fx = Fixture::new(16 * MIB);
    let (nbd, vsock) = (fx.path("nbd.sock"), fx.path("vhost.sock"));
    let ov = fx.overlay();
    let flushed = pattern(3, 256 << 10);
    let unflushed = pattern(4, 4096);
    {
        let mut d = start(&nbd, &vsock, &ov, "1");
        let mut f = Frontend::connect(&vsock, 1).expect("connect");
        assert_eq!(f.write(0, 5 * MIB, &flushed), 0);
        assert_eq!(f.flush(0), 0);
        assert_eq!(f.write(0, 12 * MIB, &unflushed), 0);
        d.signal(nix::sys::signal::Signal::SIGKILL);
        d.wait_exit();
    }
    let d = start(&nbd, &vsock, &ov, "1");
    let mut f = Frontend::connect(&vsock, 1).expect("connect after restart");
    assert_same(
        "flushed write",
        &f.read(0, 5 * MIB, flushed.len()),
        &flushed,
    );
    // The unflushed write: whole sectors of it or the zeros that were there, nothing else.
    let got = f.read(0, 12 * MIB, unflushed.len());
    for (i, s) in got.chunks(512).enumerate() {
        assert!(
            s == &unflushed[i * 512..(i + 1) * 512] || s.iter().all(|&b| b == 0),
            "unflushed sector {i} holds bytes never written"
        );
    }
    drop(f);
    d.stop();
}

#[test]
fn sigterm_answers_requests_in_flight_and_fails_none() {
    let fx = Fixture::new(64 * MIB);
    let (nbd, vsock) = (fx.path("nbd.sock"), fx.path("vhost.sock"));
    let ov = fx.overlay();
    let mut d = start(&nbd, &vsock, &ov, "1");
    let writer = {
        let vsock = vsock.clone();
        std::thread::spawn(move || {
            let mut f = Frontend::connect(&vsock, 1).expect("connect");
            let data = pattern(5, 64 << 10);
            f.buf()[..data.len()].copy_from_slice(&data);
            let addr = f.region.addr as *const u8;
            // Writes back to back until the daemon stops answering; every answer must be OK.
            let mut answers = Vec::new();
            for i in 0u64.. {
                let off = (i * (64 << 10)) % (64 * MIB);
                f.queues[0].write(off, addr, data.len(), 0, ReqFlags::empty());
                match f.try_complete(0, 3) {
                    Some(ret) => answers.push((off, ret)),
                    None => break,
                }
            }
            answers
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    d.signal(nix::sys::signal::Signal::SIGTERM);
    let st = d.wait_exit();
    assert!(st.success(), "exit {st}:\n{}", d.log());
    let answers = writer.join().expect("writer thread");
    assert!(answers.len() > 10, "only {} writes answered", answers.len());
    let failed: Vec<_> = answers.iter().filter(|a| a.1 != 0).collect();
    assert!(
        failed.is_empty(),
        "{} of {} writes failed during shutdown, e.g. {:?}",
        failed.len(),
        answers.len(),
        failed.first()
    );
    // And they are all there.
    let d = start(&nbd, &vsock, &ov, "1");
    let mut f = Frontend::connect(&vsock, 1).expect("connect after restart");
    let want = pattern(5, 64 << 10);
    for &(off, _) in answers.iter().rev().take(16) {
        assert_same("answered write", &f.read(0, off, want.len()), &want);
    }
    drop(f);
    d.stop();
}

/// `qemu-storage-daemon` exporting `image` (qcow2) as vhost-user-blk on `sock`; killed on drop.
struct Qsd(std::process::Child);

impl Qsd {
    fn start(image: &Path, sock: &Path) -> Qsd {
        let child = std::process::Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=qcow2,node-name=disk,file.driver=file,file.filename={}",
                image.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e0,node-name=disk,addr.type=unix,addr.path={},writable=on,num-queues=2",
                sock.display()
            ))
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon (Debian qemu-utils; scripts/test.sh installs it)");
        addcow_daemon_testkit::wait_until("qemu-storage-daemon's socket", || sock.exists());
        Qsd(child)
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The same writes and write-zeroes on two queues, then the whole disk read back.
fn exercise(f: &mut Frontend, size: u64) -> Vec<u8> {
    for (i, &(q, off, len)) in [
        (0usize, 512u64, 512usize),
        (1, 8 * MIB - 4096, 12288),
        (0, MIB + 1536, 700 << 10),
        (1, 15 * MIB, MIB as usize),
    ]
    .iter()
    .enumerate()
    {
        assert_eq!(
            f.write(q, off, &pattern(i as u64 + 11, len)),
            0,
            "write at {off}"
        );
    }
    assert_eq!(f.write_zeroes(0, 2 * MIB, MIB), 0, "write-zeroes");
    assert_eq!(f.write_zeroes(1, 6 * MIB, 4096), 0, "write-zeroes");
    assert_eq!(f.flush(1), 0, "flush");
    (0..size / MIB)
        .flat_map(|i| f.read((i % 2) as usize, i * MIB, MIB as usize))
        .collect()
}

#[test]
fn the_harness_sees_the_same_disk_through_qemu_storage_daemon() {
    let fx = Fixture::new(16 * MIB);
    let qcow = fx.path("disk.qcow2");
    addcow_daemon_testkit::run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            fx.path("base.raw").to_str().unwrap(),
            qcow.to_str().unwrap(),
            "16M",
        ],
    );
    let qsock = fx.path("qsd.sock");
    let qsd = Qsd::start(&qcow, &qsock);
    let theirs = {
        let mut f = Frontend::connect(&qsock, 2).expect("blkio to qemu-storage-daemon");
        assert_eq!(f.capacity(), 16 * MIB);
        exercise(&mut f, 16 * MIB)
    };
    drop(qsd);
    let (nbd, vsock) = (fx.path("nbd.sock"), fx.path("vhost.sock"));
    let d = start(&nbd, &vsock, &fx.overlay(), "2");
    let ours = {
        let mut f = Frontend::connect(&vsock, 2).expect("blkio to addcow");
        exercise(&mut f, 16 * MIB)
    };
    d.stop();
    assert_same("addcow vs qemu-storage-daemon", &ours, &theirs);
    // Both differ from the fresh disk where written, and match it elsewhere.
    let fresh = fx.reference();
    assert_ne!(ours, fresh);
    assert_same(
        "untouched tail",
        &ours[(12 << 20)..(15 << 20)],
        &fresh[(12 << 20)..(15 << 20)],
    );
}

#[test]
fn a_read_only_export_is_offered_read_only() {
    let fx = Fixture::new(8 * MIB);
    let (nbd, vsock) = (fx.path("nbd.sock"), fx.path("vhost.sock"));
    let d = Daemon::start(
        &nbd,
        &[
            "--read-only",
            "--vhost-user-blk",
            vsock.to_str().unwrap(),
            fx.overlay().to_str().unwrap(),
        ],
    );
    // VIRTIO_BLK_F_RO is offered: libblkio refuses to start it writable.
    let e = Frontend::connect_with(&vsock, 1, false)
        .err()
        .expect("a writable start of a read-only device must fail");
    assert!(e.message().contains("read-only"), "{}", e.message());
    let mut f = Frontend::connect_with(&vsock, 1, true).expect("read-only connect");
    assert_same("read", &f.read(0, 0, 4096), &fx.reference()[..4096]);
    drop(f);
    d.stop();
}

#[test]
fn two_queues_with_32_requests_in_flight_each_match_the_model() {
    const QD: usize = 32;
    const SLOT: usize = 64 << 10;
    let fx = Fixture::new(64 * MIB);
    let (nbd, vsock) = (fx.path("nbd.sock"), fx.path("vhost.sock"));
    let d = start(&nbd, &vsock, &fx.overlay(), "2");
    let mut f = Frontend::connect(&vsock, 2).expect("connect");
    let base = f.region.addr;
    let queues = std::mem::take(&mut f.queues);
    // Each thread owns one queue, one half of the disk and one half of the buffer region.
    let threads: Vec<_> = queues
        .into_iter()
        .enumerate()
        .map(|(t, mut q)| {
            std::thread::spawn(move || {
                let bufs = base + t * QD * SLOT;
                let half = 32 * MIB * t as u64;
                let mut writes = Vec::new();
                let mut done: Vec<MaybeUninit<blkio::Completion>> =
                    (0..QD).map(|_| MaybeUninit::uninit()).collect();
                for round in 0..8u64 {
                    for i in 0..QD {
                        // Distinct 64 KiB slots of this half, some rounds overwriting others.
                        let slot = (round * 7 + i as u64 * 13) % 512;
                        let off = half + slot * SLOT as u64;
                        let len = 4096 * (1 + (i + round as usize) % 16);
                        let data = pattern(round * 100 + i as u64 + t as u64 * 1000, len);
                        let addr = (bufs + i * SLOT) as *mut u8;
                        // SAFETY: slot i of this thread's half of the mapped region, not in
                        // use by any request in flight.
                        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), addr, len) };
                        q.write(off, addr, len, i, ReqFlags::empty());
                        writes.push((off, data));
                    }
                    let mut timeout = Duration::from_secs(60);
                    let mut got = 0;
                    while got < QD {
                        let n = q
                            .do_io(&mut done[got..], QD - got, Some(&mut timeout), None)
                            .expect("do_io");
                        assert!(n > 0, "requests not answered within 60 s");
                        for c in &done[got..got + n] {
                            // SAFETY: do_io initialised these completions.
                            let c = unsafe { c.assume_init_read() };
                            assert_eq!(c.ret, 0, "write {} failed", c.user_data);
                        }
                        got += n;
                    }
                }
                // Read the last round back, 32 reads in flight, each into its own slot.
                let last = &writes[writes.len() - QD..];
                for (i, (off, data)) in last.iter().enumerate() {
                    let addr = (bufs + i * SLOT) as *mut u8;
                    // SAFETY: as above; the writes from this slot were all answered.
                    unsafe { std::ptr::write_bytes(addr, 0x5c, data.len()) };
                    q.read(*off, addr, data.len(), i, ReqFlags::empty());
                }
                let mut timeout = Duration::from_secs(60);
                let mut got = 0;
                while got < QD {
                    let n = q
                        .do_io(&mut done[got..], QD - got, Some(&mut timeout), None)
                        .expect("do_io");
                    assert!(n > 0, "reads not answered within 60 s");
                    got += n;
                }
                for (i, (off, data)) in last.iter().enumerate() {
                    // SAFETY: every read was answered; slot i holds read i's data.
                    let back = unsafe {
                        std::slice::from_raw_parts((bufs + i * SLOT) as *const u8, data.len())
                    };
                    assert_same(&format!("queue {t} read at {off}"), back, data);
                }
                writes
            })
        })
        .collect();
    let mut model = fx.reference();
    for t in threads {
        // Within a thread, later rounds overwrite earlier ones: apply in order.
        for (off, data) in t.join().expect("queue thread") {
            model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        }
    }
    assert_same("whole disk over NBD", &nbd_image(&nbd, 64 * MIB), &model);
    drop(f);
    d.stop();
}

/// Requests of the hand-written frontend ([`hostile`]: unlike libblkio it can stop a queue
/// while requests are in flight) as these tests lay them out: chain `k` is descriptors
/// `3k..3k + 2` (head `3k`), its data at `DATA + k * stride`; each is appended to the avail
/// ring as it is made.
mod hand {
    use addcow_daemon_testkit::vhost::hostile::{Memory, DATA, T_IN, T_OUT};
    use vm_memory::{Bytes, GuestAddress};

    /// The head descriptor of chain `k`.
    pub fn head(k: u16) -> u16 {
        3 * k
    }

    /// Chain `k`: a WRITE of `data` (whole sectors) to `sector`.
    pub fn add_write(g: &Memory, k: u16, sector: u64, data: &[u8], stride: u64) {
        let buf = DATA + u64::from(k) * stride;
        g.mem.write_slice(data, GuestAddress(buf)).unwrap();
        g.data_chain(head(k), T_OUT, sector, buf, data.len() as u32);
        g.post(&[head(k)]);
    }

    /// Chain `k`: a request of type `kind` with a device-writable data descriptor of `len`
    /// bytes (T_IN, T_GET_ID) at `sector`.
    pub fn add_in(g: &Memory, k: u16, kind: u32, sector: u64, len: u32, stride: u64) {
        g.data_chain(head(k), kind, sector, DATA + u64::from(k) * stride, len);
        g.post(&[head(k)]);
    }

    /// Chain `k`: a READ of `len` bytes (whole sectors) at `sector`.
    pub fn add_read(g: &Memory, k: u16, sector: u64, len: u32, stride: u64) {
        add_in(g, k, T_IN, sector, len, stride)
    }
}

/// GET_VRING_BASE while a batch of large writes is in flight: every chain the daemon popped is
/// answered (used ring and status) before the base comes back, the base is exactly the used
/// index, and a frontend that reconnects at that base gets the rest served; nothing is lost.
#[test]
fn get_vring_base_mid_io_answers_what_was_popped_and_a_reconnect_serves_the_rest() {
    use addcow_daemon_testkit::vhost::hostile::{Call, Hostile, Memory, DATA};
    use vhost::VhostBackend;

    const CHAINS: u16 = 64;
    const LEN: usize = 1 << 20;
    let fx = Fixture::new(CHAINS as u64 * LEN as u64);
    let (nbd, vsock) = (fx.path("nbd.sock"), fx.path("vhost.sock"));
    let d = start(&nbd, &vsock, &fx.overlay(), "1");
    let guest = Memory::new(DATA + CHAINS as u64 * LEN as u64);
    let mut base = 0u16;
    let mut caught_in_flight = 0;
    let mut last_seed = 0;
    for round in 0..6u64 {
        let conn = Hostile::connect_queue(&vsock, &guest, Call::EventFd, false, 0, base);
        if guest.avail_idx() == guest.used_idx() {
            // Everything answered: a fresh set of writes over the whole disk.
            last_seed = 100 + round;
            for k in 0..CHAINS {
                let data = pattern(last_seed + u64::from(k), LEN);
                hand::add_write(
                    &guest,
                    k,
                    u64::from(k) * (LEN as u64 / 512),
                    &data,
                    LEN as u64,
                );
            }
        }
        conn.kick();
        // Let the daemon pop a batch and start writing it.
        std::thread::sleep(Duration::from_millis(20));
        let used_before = guest.used_idx();
        let got = conn
            .fe
            .get_vring_base(0)
            .unwrap_or_else(|e| panic!("round {round}: GET_VRING_BASE: {e}\n{}", d.log()))
            as u16;
        let used_after = guest.used_idx();
        assert_eq!(
            used_after, got,
            "round {round}: GET_VRING_BASE returned {got} with {used_after} chains answered"
        );
        for n in base..got {
            let id = guest.used(n).0;
            assert_eq!(id % 3, 0, "used entry {n}: head {id}");
            assert_eq!(
                guest.status(id),
                0,
                "round {round}: chain {} status",
                id / 3
            );
        }
        eprintln!("round {round}: used {used_before} before GET_VRING_BASE, base {got}");
        if used_before != got {
            caught_in_flight += 1;
        }
        base = got;
        drop(conn);
    }
    assert!(
        caught_in_flight > 0,
        "no round stopped the queue with a batch in flight (timing): the test proved nothing"
    );
    // A last frontend drains what is left.
    let conn = Hostile::connect_queue(&vsock, &guest, Call::EventFd, false, 0, base);
    conn.kick();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while guest.used_idx() != guest.avail_idx() {
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {} chains answered after 60 s",
            guest.used_idx(),
            guest.avail_idx()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    for n in base..guest.used_idx() {
        assert_eq!(guest.status(guest.used(n).0), 0, "drain: used entry {n}");
    }
    let end = conn.fe.get_vring_base(0).expect("GET_VRING_BASE") as u16;
    assert_eq!(end, guest.avail_idx(), "final base");
    drop(conn);
    let mut want = Vec::new();
    for k in 0..CHAINS {
        want.extend(pattern(last_seed + u64::from(k), LEN));
    }
    assert_same("disk after the rounds", &nbd_image(&nbd, fx.size), &want);
    d.stop();
}

/// A frontend that vanishes (closes its socket, no GET_VRING_BASE) while 1 MiB reads and writes
/// into page-aligned guest buffers (handed to the engine directly) are in flight: the daemon
/// neither crashes nor loses track of them. Their answers still land in the shared guest memory
/// (the daemon keeps its mapping until each request is answered): all 64 popped chains get
/// status OK and the reads the right bytes, and the next frontend is served.
#[test]
fn a_frontend_vanishing_mid_io_with_direct_buffers_leaves_the_daemon_serving() {
    use addcow_daemon_testkit::vhost::hostile::{Call, Hostile, Memory, DATA};

    const CHAINS: u16 = 64;
    const LEN: usize = 1 << 20;
    let fx = Fixture::new(CHAINS as u64 * LEN as u64);
    let (nbd, vsock) = (fx.path("nbd.sock"), fx.path("vhost.sock"));
    let d = start(&nbd, &vsock, &fx.overlay(), "1");
    let model = fx.reference();
    let mut caught_in_flight = 0;
    for round in 0..4u64 {
        let guest = Memory::new(DATA + CHAINS as u64 * LEN as u64);
        let conn = Hostile::connect_queue(&vsock, &guest, Call::EventFd, false, 0, 0);
        for k in 0..CHAINS {
            let sector = u64::from(k) * (LEN as u64 / 512);
            if k % 2 == 0 {
                hand::add_read(&guest, k, sector, LEN as u32, LEN as u64);
            } else {
                let data = pattern(round * 1000 + u64::from(k), LEN);
                hand::add_write(&guest, k, sector, &data, LEN as u64);
            }
        }
        conn.kick();
        // The core pops every available chain before it submits any: once one is answered,
        // all 64 were popped. Vanish right then, with most of them in flight.
        let popped_by = std::time::Instant::now() + Duration::from_secs(30);
        while guest.used_idx() == 0 {
            assert!(
                std::time::Instant::now() < popped_by,
                "nothing answered after 30 s"
            );
            std::thread::yield_now();
        }
        drop(conn);
        let used_at_drop = guest.used_idx();
        if used_at_drop < CHAINS {
            caught_in_flight += 1;
        }
        // Every popped chain is answered into the guest's memory after the socket closed.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let mut last = guest.used_idx();
        let mut still_since = std::time::Instant::now();
        while still_since.elapsed() < Duration::from_millis(500) {
            assert!(
                std::time::Instant::now() < deadline,
                "answers still trickling after 60 s"
            );
            std::thread::sleep(Duration::from_millis(20));
            let now = guest.used_idx();
            if now != last {
                last = now;
                still_since = std::time::Instant::now();
            }
        }
        let answered = guest.used_idx();
        eprintln!(
            "round {round}: {used_at_drop} answered at the disconnect, {answered} in the end"
        );
        for n in 0..answered {
            let id = guest.used(n).0;
            let k = id / 3;
            assert_eq!(guest.status(id), 0, "round {round}: chain {k} status");
            if k % 2 == 0 {
                // Reads cover regions no write touches: the fixture's bytes.
                let at = k as usize * LEN;
                let mut got = vec![0u8; LEN];
                vm_memory::Bytes::read_slice(
                    &guest.mem,
                    &mut got,
                    vm_memory::GuestAddress(DATA + at as u64),
                )
                .unwrap();
                assert_same(
                    &format!("round {round}: read {k}"),
                    &got,
                    &model[at..at + LEN],
                );
            }
        }
        assert_eq!(
            answered, CHAINS,
            "round {round}: popped chains left unanswered after the frontend vanished"
        );
    }
    assert!(
        caught_in_flight > 0,
        "no round disconnected with requests in flight (timing): the test proved nothing"
    );
    // The daemon still serves, and a frontend reads what NBD reads.
    let mut f = Frontend::connect(&vsock, 1).expect("connect after the vanished frontends");
    let data = pattern(7, 65536);
    assert_eq!(f.write(0, MIB, &data), 0);
    assert_same(
        "after the vanished frontends",
        &f.read(0, MIB, data.len()),
        &data,
    );
    let over_nbd = nbd_image(&nbd, fx.size);
    assert_same(
        "vhost-user-blk and NBD agree",
        &f.read(0, 0, 4 * MIB as usize),
        &over_nbd[..4 << 20],
    );
    drop(f);
    d.stop();
}

/// A frontend that vanishes with writes in flight and reconnects at once (QEMU with
/// `reconnect=1` resubmits what it saw unanswered): the next frontend is served only after
/// every chain of the old one was answered. Its first answer comes when the old frontend's
/// rings hold all their used entries, its writes to the same sectors as the old in-flight
/// ones win, and its used ring holds exactly the chains it submitted.
#[test]
fn a_frontend_reconnecting_mid_io_is_served_after_the_old_chains_are_answered() {
    use addcow_daemon_testkit::vhost::hostile::{Call, Hostile, Memory, DATA, T_GET_ID};

    const CHAINS: u16 = 64;
    const LEN: usize = 1 << 20;
    // The last MiB is never written: the new frontend's first chain reads it.
    let fx = Fixture::new((CHAINS as u64 + 1) * LEN as u64);
    let (nbd, vsock) = (fx.path("nbd.sock"), fx.path("vhost.sock"));
    // Two cores: the old frontend's queue 0 is served by core 0, the new one's queue 1 by
    // core 1, so nothing but the wait keeps the new queue from being served at once.
    let d = start(&nbd, &vsock, &fx.overlay(), "2");
    let model = fx.reference();
    let mem_len = DATA + (CHAINS as u64 + 2) * LEN as u64;
    let mut caught_in_flight = 0;
    for round in 0..3u64 {
        let old = Memory::new(mem_len);
        let conn = Hostile::connect_queue(&vsock, &old, Call::EventFd, false, 0, 0);
        for k in 0..CHAINS {
            let data = pattern(round * 1000 + u64::from(k), LEN);
            hand::add_write(
                &old,
                k,
                u64::from(k) * (LEN as u64 / 512),
                &data,
                LEN as u64,
            );
        }
        conn.kick();
        // Once one chain is answered all 64 were popped: vanish then.
        let popped_by = std::time::Instant::now() + Duration::from_secs(30);
        while old.used_idx() == 0 {
            assert!(
                std::time::Instant::now() < popped_by,
                "nothing answered after 30 s"
            );
            std::thread::yield_now();
        }
        drop(conn);
        let used_at_drop = old.used_idx();
        if used_at_drop < CHAINS {
            caught_in_flight += 1;
        }
        // Reconnect at once: a GET_ID (answered without the disk, so at once if the queue is
        // served), a small read of a part nobody writes, then new data for the sectors the old
        // frontend was writing.
        let new = Memory::new(mem_len);
        let conn = Hostile::connect_queue(&vsock, &new, Call::EventFd, false, 1, 0);
        hand::add_in(&new, 0, T_GET_ID, 0, 20, LEN as u64); // answered without the disk
        let last = u64::from(CHAINS) * (LEN as u64 / 512);
        hand::add_read(&new, 1, last, 4096, LEN as u64);
        for k in 2..CHAINS + 2 {
            let data = pattern(round * 1000 + 500 + u64::from(k), LEN);
            hand::add_write(
                &new,
                k,
                u64::from(k - 2) * (LEN as u64 / 512),
                &data,
                LEN as u64,
            );
        }
        conn.kick();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while new.used_idx() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "new frontend: nothing answered after 60 s\n{}",
                d.log()
            );
            std::thread::yield_now();
        }
        let old_used_then = old.used_idx();
        assert_eq!(
            old_used_then, CHAINS,
            "round {round}: the new frontend was answered while the old one had {} of {CHAINS} chains answered ({used_at_drop} at the disconnect)",
            old_used_then
        );
        while new.used_idx() != CHAINS + 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "new frontend: {} of {} answered after 60 s",
                new.used_idx(),
                CHAINS + 2
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        // Nothing more arrives in either used ring, and each holds each of its chains once.
        std::thread::sleep(Duration::from_millis(200));
        for (name, g, n) in [("old", &old, CHAINS), ("new", &new, CHAINS + 2)] {
            assert_eq!(g.used_idx(), n, "round {round}: {name} used index");
            let mut heads: Vec<u16> = (0..n).map(|i| g.used(i).0).collect();
            heads.sort_unstable();
            let want: Vec<u16> = (0..n).map(hand::head).collect();
            assert_eq!(heads, want, "round {round}: {name} used entries");
            for k in 0..n {
                assert_eq!(
                    g.status(hand::head(k)),
                    0,
                    "round {round}: {name} chain {k} status"
                );
            }
        }
        let mut read = vec![0u8; 4096];
        vm_memory::Bytes::read_slice(
            &new.mem,
            &mut read,
            vm_memory::GuestAddress(DATA + LEN as u64),
        )
        .unwrap();
        let at = CHAINS as usize * LEN;
        assert_same(
            &format!("round {round}: the new frontend's read"),
            &read,
            &model[at..at + 4096],
        );
        eprintln!("round {round}: {used_at_drop} of {CHAINS} answered at the disconnect");
        let mut want = Vec::new();
        for k in 2..CHAINS + 2 {
            want.extend(pattern(round * 1000 + 500 + u64::from(k), LEN));
        }
        want.extend_from_slice(&model[CHAINS as usize * LEN..]);
        assert_same(
            &format!("round {round}: the new frontend's writes win"),
            &nbd_image(&nbd, fx.size),
            &want,
        );
        drop(conn);
    }
    assert!(
        caught_in_flight > 0,
        "no round disconnected with writes in flight (timing): the test proved nothing"
    );
    d.stop();
}
