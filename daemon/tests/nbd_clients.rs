//! `addcow serve` with real NBD clients: qemu-img, qemu-io, nbdinfo, nbdcopy, nbdsh (libnbd
//! Python) and fio, each against the built binary on a temp socket, over real overlays.

use addcow_daemon_testkit::{
    addcow_ok, assert_identical, qemu_io, run, run_raw, write_file, Daemon, Fixture,
};

const MIB: u64 = 1 << 20;

/// Normalized allocation: (start, length, data, zero) runs, adjacent equal runs merged.
fn merge(runs: Vec<(u64, u64, bool, bool)>) -> Vec<(u64, u64, bool, bool)> {
    let mut out: Vec<(u64, u64, bool, bool)> = Vec::new();
    for r in runs {
        match out.last_mut() {
            Some(l) if l.2 == r.2 && l.3 == r.3 && l.0 + l.1 == r.0 => l.1 += r.1,
            _ => out.push(r),
        }
    }
    out
}

fn json_runs(text: &str) -> Vec<(u64, u64, bool, bool)> {
    let start = text.find('[').expect("JSON array in output");
    let v: serde_json::Value = serde_json::from_str(&text[start..]).expect("map JSON");
    let runs = v
        .as_array()
        .expect("array")
        .iter()
        .map(|r| {
            (
                r["start"].as_u64().expect("start"),
                r["length"].as_u64().expect("length"),
                r["data"].as_bool().expect("data"),
                r["zero"].as_bool().expect("zero"),
            )
        })
        .collect();
    merge(runs)
}

#[test]
fn qemu_img_info_map_compare_and_convert() {
    let fx = Fixture::new(8 * MIB);
    let d = Daemon::start(&fx.path("s.sock"), &[fx.overlay().to_str().unwrap()]);
    let uri = d.uri();

    let info = run("qemu-img", &["info", "--output=json", "-f", "raw", &uri]);
    let v: serde_json::Value =
        serde_json::from_str(&info[info.find('{').unwrap()..]).expect("info JSON");
    assert_eq!(v["virtual-size"].as_u64(), Some(8 * MIB), "{info}");

    qemu_io(&uri, &["write -P 0x5a 1M 64k", "flush"]);
    let mut reference = fx.reference();
    reference[MIB as usize..(MIB + 65536) as usize].fill(0x5a);
    write_file(&fx.path("ref.raw"), &reference);

    // qemu-img map through NBD matches the expected allocation and `addcow map`.
    let map = run("qemu-img", &["map", "-f", "raw", "--output=json", &uri]);
    let got = json_runs(&map);
    assert_eq!(
        got,
        vec![(0, 4 * MIB, true, false), (4 * MIB, 4 * MIB, false, true)],
        "{map}"
    );
    let ours = addcow_ok(".", &["map", "--json", fx.overlay().to_str().unwrap()]);
    assert_eq!(
        json_runs(&ours),
        got,
        "addcow map:\n{ours}\nqemu-img map:\n{map}"
    );

    assert_identical(&uri, fx.path("ref.raw").to_str().unwrap());

    // convert -n writes a whole image into the export.
    let src: Vec<u8> = (0..8 * MIB).map(|i| (i * 7 % 251) as u8).collect();
    write_file(&fx.path("src.raw"), &src);
    let srcp = fx.path("src.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-W",
            "-m",
            "8",
            "-f",
            "raw",
            "-O",
            "raw",
            srcp.to_str().unwrap(),
            &uri,
        ],
    );
    assert_identical(&uri, srcp.to_str().unwrap());
    d.stop();
}

#[test]
fn qemu_io_patterns_aligned_unaligned_aio_flush() {
    let fx = Fixture::new(8 * MIB);
    let d = Daemon::start(&fx.path("s.sock"), &[fx.overlay().to_str().unwrap()]);
    let uri = d.uri();
    qemu_io(
        &uri,
        &[
            "read -P 0xab 0 4M",
            "read -P 0 4M 4M",
            "write -P 0x11 0 64k",
            "read -P 0x11 0 64k",
            "write -P 0x22 7 100",
            "read -P 0x11 0 7",
            "read -P 0x22 7 100",
            "read -P 0x11 107 405",
            "write -P 0x33 4095k 3000",
            "read -P 0xab 4094k 1k",
            "read -P 0x33 4095k 3000",
            "read -P 0 4196280 1024",
            "aio_write -P 0x44 1M 128k",
            "aio_write -P 0x55 2M 128k",
            "aio_write -P 0x66 6M 1000",
            "aio_flush",
            "read -P 0x44 1M 128k",
            "read -P 0x55 2M 128k",
            "read -P 0x66 6M 1000",
            "aio_read -P 0x44 1M 64k",
            "aio_read -P 0xab 3M 64k",
            "aio_flush",
            "flush",
        ],
    );
    // A mismatch must be detected (the check above can fail).
    let bad = run_raw("qemu-io", &["-f", "raw", "-c", "read -P 0x99 0 512", &uri]);
    let text =
        String::from_utf8_lossy(&bad.stdout).to_string() + &String::from_utf8_lossy(&bad.stderr);
    assert!(text.contains("Pattern verification failed"), "{text}");
    d.stop();
}

/// The first three columns (offset, length, type) of each line of `nbdinfo --map`.
fn map_rows(map: &str) -> Vec<[String; 3]> {
    map.lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert!(f.len() >= 3, "map line {l:?} in:\n{map}");
            [f[0].to_owned(), f[1].to_owned(), f[2].to_owned()]
        })
        .collect()
}

fn want_rows(want: &[(u64, u64, u32)]) -> Vec<[String; 3]> {
    want.iter()
        .map(|(o, l, t)| [o.to_string(), l.to_string(), t.to_string()])
        .collect()
}

#[test]
fn nbdinfo_list_map_depth_and_can() {
    let fx = Fixture::new(8 * MIB);
    // The second export: its own overlay (and raw image) on the same 4 MiB base, but 6 MiB
    // where the first is 8, so its size, bytes and map tell it apart from the first.
    let second = fx.path("second.add-cow");
    addcow_engine::format::create(&addcow_engine::format::CreateOptions {
        overlay: second.clone(),
        base: Some(fx.path("base.raw")),
        image: Some(fx.path("second.raw")),
        size: Some(6 * MIB),
        force: false,
    })
    .expect("create the second overlay");
    let d = Daemon::start(
        &fx.path("s.sock"),
        &[
            fx.overlay().to_str().unwrap(),
            "--export",
            &format!("second={}", second.display()),
        ],
    );
    let uri = d.uri();
    let list = run("nbdinfo", &["--list", &uri]);
    assert!(list.contains("export=\"\""), "{list}");
    assert!(list.contains("export=\"second\""), "{list}");
    assert!(list.contains("qemu:allocation-depth"), "{list}");

    qemu_io(&uri, &["write -P 1 0 64k"]);
    let map = run("nbdinfo", &["--map", &uri]);
    let rows: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows[0][..3], ["0", "4194304", "0"], "{map}");
    assert_eq!(rows[1][..3], ["4194304", "4194304", "3"], "{map}");
    let depth = run("nbdinfo", &["--map=qemu:allocation-depth", &uri]);
    let rows: Vec<Vec<&str>> = depth
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows[0][..3], ["0", "65536", "1"], "{depth}");
    assert_eq!(rows[1][..3], ["65536", "4128768", "2"], "{depth}");
    assert_eq!(rows[2][..3], ["4194304", "4194304", "0"], "{depth}");
    // The second export is the second overlay: its own size, untouched by the write above
    // (base then zeros), and its writes land in its own raw image only.
    let uri2 = d.uri_of("second");
    assert_eq!(
        run("nbdinfo", &["--size", &uri]).trim(),
        (8 * MIB).to_string()
    );
    assert_eq!(
        run("nbdinfo", &["--size", &uri2]).trim(),
        (6 * MIB).to_string()
    );
    let depth2 = run("nbdinfo", &["--map=qemu:allocation-depth", &uri2]);
    assert_eq!(
        map_rows(&depth2),
        want_rows(&[(0, 4 * MIB, 2), (4 * MIB, 2 * MIB, 0)]),
        "{depth2}"
    );
    qemu_io(
        &uri2,
        &[
            "read -P 0xab 0 4M",
            "read -P 0 4M 2M",
            "write -P 0x5e 1M 64k",
            "read -P 0x5e 1M 64k",
            "flush",
        ],
    );
    let depth2 = run("nbdinfo", &["--map=qemu:allocation-depth", &uri2]);
    assert_eq!(
        map_rows(&depth2),
        want_rows(&[
            (0, MIB, 2),
            (MIB, 64 << 10, 1),
            (MIB + (64 << 10), 3 * MIB - (64 << 10), 2),
            (4 * MIB, 2 * MIB, 0),
        ]),
        "{depth2}"
    );
    qemu_io(&uri, &["read -P 1 0 64k", "read -P 0xab 1M 64k"]);
    let at_1m = |raw: &str| {
        let bytes = std::fs::read(fx.path(raw)).expect("read raw image");
        bytes[MIB as usize..(MIB + (64 << 10)) as usize].to_vec()
    };
    assert!(at_1m("second.raw").iter().all(|b| *b == 0x5e), "second.raw");
    assert!(at_1m("disk.raw").iter().all(|b| *b == 0), "disk.raw");

    for can in [
        "multi-conn",
        "trim",
        "zero",
        "fua",
        "flush",
        "cache",
        "df",
        "fast-zero",
    ] {
        let out = run_raw("nbdinfo", &["--can", can, &uri]);
        assert_eq!(out.status.code(), Some(0), "--can {can}");
    }
    let out = run_raw("nbdinfo", &["--can", "read-only", &uri]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "rw export must not be read-only"
    );
    d.stop();

    let d = Daemon::start(
        &fx.path("ro.sock"),
        &["--read-only", fx.overlay().to_str().unwrap()],
    );
    for (can, want) in [
        ("read-only", 0),
        ("trim", 2),
        ("zero", 2),
        ("multi-conn", 0),
    ] {
        let out = run_raw("nbdinfo", &["--can", can, &d.uri()]);
        assert_eq!(
            out.status.code(),
            Some(want),
            "read-only export --can {can}"
        );
    }
    d.stop();
}

#[test]
fn nbdcopy_both_directions_with_four_connections() {
    let fx = Fixture::new(16 * MIB);
    let d = Daemon::start(&fx.path("s.sock"), &[fx.overlay().to_str().unwrap()]);
    let uri = d.uri();
    let out = fx.path("out.raw");
    run(
        "nbdcopy",
        &[
            "--connections=4",
            "--requests=64",
            &uri,
            out.to_str().unwrap(),
        ],
    );
    assert!(
        std::fs::read(&out).unwrap() == fx.reference(),
        "export → file"
    );

    let mut src: Vec<u8> = (0..16 * MIB).map(|i| (i / 4096 % 253) as u8).collect();
    src[(3 * MIB) as usize..(5 * MIB) as usize].fill(0); // a zero run: nbdcopy zeroes/trims it
    let srcp = fx.path("src.raw");
    write_file(&srcp, &src);
    run(
        "nbdcopy",
        &["--connections=4", srcp.to_str().unwrap(), &uri],
    );
    let back = fx.path("back.raw");
    run(
        "nbdcopy",
        &["--connections=4", &uri, back.to_str().unwrap()],
    );
    assert!(std::fs::read(&back).unwrap() == src, "file → export → file");
    d.stop();
}

#[test]
fn nbdsh_protocol_corners_and_multi_conn() {
    let fx = Fixture::new(8 * MIB);
    let ro_overlay = fx.make_overlay("ro");
    let d = Daemon::start(&fx.path("s.sock"), &[fx.overlay().to_str().unwrap()]);
    let ro = Daemon::start(
        &fx.path("ro.sock"),
        &[
            "--read-only",
            "--export",
            &format!("ro={}", ro_overlay.display()),
        ],
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/nbd_corners.py");
    let out = run(
        "/usr/bin/python3",
        &[script, d.sock.to_str().unwrap(), ro.sock.to_str().unwrap()],
    );
    assert!(out.contains("checks passed"), "{out}");
    d.stop();
    ro.stop();
}

/// Runs fio's nbd engine against `uri`: 4 jobs at queue depth 32, each writing random 4 KiB
/// blocks with crc32c headers into its own 32 MiB region and verifying them (`verify_fatal`),
/// plus `extra` options. Returns the per-job JSON objects.
fn fio_verify(uri: &str, extra: &[&str]) -> Vec<serde_json::Value> {
    let uri = format!("--uri={uri}");
    let mut args = vec![
        "--name=verify",
        "--ioengine=nbd",
        uri.as_str(),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=32",
        "--numjobs=4",
        "--size=32M",
        "--offset_increment=32M",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--output-format=json",
    ];
    args.extend_from_slice(extra);
    let out = run("fio", &args);
    let v: serde_json::Value =
        serde_json::from_str(&out[out.find('{').expect("fio JSON")..]).expect("fio JSON");
    let jobs = v["jobs"].as_array().expect("jobs").clone();
    assert_eq!(jobs.len(), 4, "{out}");
    for j in &jobs {
        assert_eq!(j["error"].as_i64(), Some(0), "{j}");
    }
    jobs
}

#[test]
fn fio_verify_four_jobs_qd32() {
    let fx = Fixture::new(128 * MIB);
    let d = Daemon::start(&fx.path("s.sock"), &[fx.overlay().to_str().unwrap()]);
    // Every block written once, then read back and verified in a separate phase (the
    // 10-second time-based run is below).
    for j in fio_verify(&d.uri(), &["--do_verify=1"]) {
        assert_eq!(j["write"]["io_bytes"].as_u64(), Some(32 * MIB), "{j}");
        assert!(
            j["read"]["io_bytes"].as_u64() >= Some(32 * MIB),
            "verify reads: {j}"
        );
    }
    d.stop();
}

/// The load test as stated: fio's nbd engine, 4 jobs at queue depth 32 for 10 seconds of
/// random 4 KiB writes, every written block read back and checked against its crc32c while the
/// run goes on (`verify_backlog`: time-based runs have no separate verify phase), zero errors.
#[test]
fn fio_verify_ten_seconds_four_jobs_qd32() {
    let fx = Fixture::new(128 * MIB);
    let d = Daemon::start(&fx.path("s.sock"), &[fx.overlay().to_str().unwrap()]);
    let extra = ["--verify_backlog=4096", "--time_based", "--runtime=10"];
    for j in fio_verify(&d.uri(), &extra) {
        assert!(j["job_runtime"].as_u64() >= Some(10_000), "ran 10 s: {j}");
        let written = j["write"]["io_bytes"].as_u64().unwrap_or(0);
        let verified = j["read"]["io_bytes"].as_u64().unwrap_or(0);
        assert!(written > 0 && verified > 0, "wrote and verified: {j}");
    }
    d.stop();
}
