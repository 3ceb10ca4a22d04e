//! `addcow-bench`: the benchmark runner of addcow.
//!
//! * `compare`: serves identical data with addcow, qemu-nbd (qcow2 and raw), nbdkit (cow filter)
//!   and runs fio's io_uring engine on the raw file as the disk's limit; every profile of
//!   `fio-configs/` against every server, interleaved over rounds; writes a report, JSON and a chart.
//! * `embedded`: the engine without a socket against fio on the raw file, same profiles, same run.
//! * `remote`: overlays on a base served over NBD, against the same base local and qemu-nbd.
//! * `vhost`: vhost-user-blk, addcow vs qemu-storage-daemon (qcow2 overlay) and addcow
//!   vhost-user-blk vs addcow NBD, same run.
//! * `tls`: NBD over TCP with and without TLS (addcow), and qemu-nbd with TLS, same run.
//! * `qos`: per-export throttling: accuracy, isolation, cost (NBD and vhost-user-blk).
//! * `memory`: RSS cost of opening a fresh 1 TiB overlay.

use std::process::ExitCode;

use clap::Parser;

mod cli;
mod compare;
mod cost;
mod embedded;
mod error;
mod fio;
mod memory;
mod prepare;
mod profiles;
mod qos;
mod remote;
mod report;
mod servers;
mod stats;
mod sysinfo;
mod tls;
mod vhost;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let result = match cli.command {
        cli::Command::Compare(args) => compare::run(&args),
        cli::Command::Embedded(args) => embedded::run(&args),
        cli::Command::Vhost(args) => vhost::run(&args),
        cli::Command::Memory(args) => memory::run(&args),
        cli::Command::Remote(args) => remote::run(&args),
        cli::Command::Tls(args) => tls::run(&args),
        cli::Command::Qos(args) => qos::run(&args),
        cli::Command::Render(args) => report::render(&args.dir),
        cli::Command::MemoryChild(args) => memory::run_child(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("addcow-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
