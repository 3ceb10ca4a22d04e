//! Test-only: applies the engine's [`FaultPlan`](crate::io::testing::faults::FaultPlan) to a chain
//! about to be pushed (feature `fault-injection`).

use super::ops::{CoreOp, OpKind};
use super::Core;
use crate::io::disk::state::Role;
use crate::io::testing::faults::{FaultAction, FaultFile, FaultOp, Injected};

fn classify(op: &CoreOp) -> Option<(FaultFile, FaultOp, Option<usize>)> {
    let file = match op.file()?.role {
        Role::Image => FaultFile::Image,
        Role::Meta => FaultFile::Meta,
        Role::Base => FaultFile::Base,
        Role::Scratch => FaultFile::Scratch,
    };
    Some(match &op.kind {
        OpKind::Read { into, .. } => (file, FaultOp::Read, Some(into.len())),
        OpKind::Write { from, .. } => (file, FaultOp::Write, Some(from.len())),
        OpKind::Punch { .. } => (file, FaultOp::Punch, None),
        OpKind::Allocate { .. } => (file, FaultOp::Allocate, None),
        OpKind::Sync { .. } => (file, FaultOp::Sync, None),
        OpKind::Sock { .. } => return None,
    })
}

impl Core {
    /// Marks the ops of `chain` the plan picks; in a chain, the ops after one that fails, is
    /// cancelled or comes back short do not run and complete with `-ECANCELED`.
    pub(super) fn inject(&self, chain: &mut [CoreOp]) {
        let Some(plan) = &self.faults else {
            return;
        };
        let last = chain.len().saturating_sub(1);
        let mut broken = false;
        for (i, op) in chain.iter_mut().enumerate() {
            if broken {
                op.fault = Some(Injected::Result(-libc::ECANCELED));
                continue;
            }
            let Some((file, kind, len)) = classify(op) else {
                continue;
            };
            let Some(action) = plan.decide(file, kind) else {
                continue;
            };
            let (fault, breaks) = match action {
                FaultAction::Fail(errno) => (Injected::Result(-errno), true),
                FaultAction::Cancel => (Injected::Result(-libc::ECANCELED), true),
                FaultAction::Short(n) => {
                    (Injected::Short(n), len.is_some_and(|l| (n as usize) < l))
                }
                FaultAction::Panic => (Injected::Panic, false),
            };
            op.fault = Some(fault);
            broken = breaks && i < last;
        }
    }
}
