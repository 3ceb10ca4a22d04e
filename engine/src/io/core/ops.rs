//! What one SQE is: the op kinds kept in the core's slab and how their entries are built.

use std::os::fd::RawFd;

use io_uring::{opcode, squeue, types};

use super::super::buf::IoBuf;
use super::super::disk::Role;

/// A file as an SQE names it: a plain fd or a registered-file slot.
#[derive(Debug, Clone, Copy)]
pub(super) enum Target {
    Fd(RawFd),
    Fixed(u32),
}

macro_rules! with_target {
    ($t:expr, |$f:ident| $body:expr) => {
        match $t {
            Target::Fd(fd) => {
                let $f = types::Fd(fd);
                $body
            }
            Target::Fixed(i) => {
                let $f = types::Fixed(i);
                $body
            }
        }
    };
}

/// One read/write transfer: enough to build (and rebuild, for a short transfer) its SQE.
#[derive(Debug, Clone, Copy)]
pub(super) struct Xfer {
    pub(super) target: Target,
    pub(super) role: Role,
    pub(super) ptr: *mut u8,
    pub(super) len: u32,
    pub(super) off: u64,
    /// Registered buffer index when `ptr..ptr+len` lies in an arena slot registered here.
    pub(super) fixed: Option<u16>,
}

/// A read that landed in a bounce buffer because the destination was not aligned for O_DIRECT.
pub(super) struct Bounce {
    pub(super) buf: IoBuf,
    pub(super) skip: usize,
    pub(super) dest: *mut u8,
    pub(super) len: usize,
}

pub(super) enum OpKind {
    Read(Xfer, Option<Bounce>),
    Write(Xfer),
    Punch { target: Target, off: u64, len: u64 },
    Sync { target: Target, role: Role, id: u64 },
}

/// One submitted SQE (key = its `user_data`).
pub(super) struct Op {
    pub(super) task: usize,
    pub(super) kind: OpKind,
}

pub(super) fn op_name(role: Role, write: bool) -> &'static str {
    match (role, write) {
        (Role::Image, false) => "read raw image",
        (Role::Image, true) => "write raw image",
        (Role::Meta, false) => "read metadata",
        (Role::Meta, true) => "write bitmap",
        (Role::Base, _) => "read base",
    }
}

pub(super) fn build_entry(kind: &OpKind) -> squeue::Entry {
    match kind {
        OpKind::Read(x, _) => match x.fixed {
            Some(i) => with_target!(x.target, |f| opcode::ReadFixed::new(f, x.ptr, x.len, i)
                .offset(x.off)
                .build()),
            None => with_target!(x.target, |f| opcode::Read::new(f, x.ptr, x.len)
                .offset(x.off)
                .build()),
        },
        OpKind::Write(x) => match x.fixed {
            Some(i) => with_target!(x.target, |f| opcode::WriteFixed::new(f, x.ptr, x.len, i)
                .offset(x.off)
                .build()),
            None => with_target!(x.target, |f| opcode::Write::new(f, x.ptr, x.len)
                .offset(x.off)
                .build()),
        },
        OpKind::Punch { target, off, len } => {
            with_target!(*target, |f| opcode::Fallocate::new(f, *len)
                .offset(*off)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build())
        }
        OpKind::Sync { target, .. } => with_target!(*target, |f| opcode::Fsync::new(f)
            .flags(types::FsyncFlags::DATASYNC)
            .build()),
    }
}
