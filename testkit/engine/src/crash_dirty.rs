//! Crash states of the dirty-bitmap sidecar against the raw image's writes: the checker of the
//! changed-block tracking crash rule.
//!
//! # Model
//! The log holds the raw image's completed writes and punches and the sidecar's completed
//! in-place writes and fdatasyncs ([`FileRole::Bitmaps`]), on one timeline. At crash point `P`
//! (the first `P` events happened), a sidecar write is durable if it precedes the `SyncBegin` of
//! a sidecar sync whose `SyncEnd` precedes `P`; every other sidecar write before `P` may or may
//! not have reached the disk, per 512-byte sector. Every raw-image operation before `P` may have
//! reached the disk (data can land before any sync).
//!
//! # The rule checked, for every crash state
//! A sector *may differ* at `P` if some raw-image operation before `P` wrote bytes there that
//! differ from the guest-visible content at the start (the bitmap's clear). Every such sector
//! must be dirty, in the crash state's sidecar, in every bitmap that was enabled at the start.
//! (Bits only go from 0 to 1 during a run with no clear, so the state with no volatile sidecar
//! write persisted is the adversarial one; the others are checked too.)
//!
//! Limit: operations count from their completion (as in [`crate::crash`]); a write still in
//! flight at `P` is not on the disk here.

use std::collections::HashMap;

use addcow_engine::dirty::sidecar;
use addcow_engine::io::recorder::{Event, FileRole};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const SECTOR: u64 = 512;

/// What the checker found.
#[derive(Debug, Clone, Default)]
pub struct DirtyReport {
    /// Crash points examined.
    pub points: usize,
    /// Crash states built and checked.
    pub states: usize,
    /// States with at least one sector that may differ and is clean.
    pub violating_states: usize,
    /// Sidecar writes and syncs in the log.
    pub sidecar_writes: usize,
    pub sidecar_syncs: usize,
    /// Sectors that may differ by the end of the log.
    pub changed_sectors: usize,
    /// The first few violations.
    pub examples: Vec<String>,
}

impl std::fmt::Display for DirtyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "dirty-bitmap crash check: {} states at {} points, {} sidecar writes, {} sidecar syncs, {} changed sectors, {} violating states",
            self.states,
            self.points,
            self.sidecar_writes,
            self.sidecar_syncs,
            self.changed_sectors,
            self.violating_states
        )?;
        for e in &self.examples {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

/// Checks `events` against the sidecar as it was before the run (`sidecar0`) and the disk's
/// guest-visible content then (`initial`); `random_states` extra random states per point.
pub fn check(
    initial: &[u8],
    sidecar0: &[u8],
    events: &[Event],
    seed: u64,
    random_states: usize,
) -> DirtyReport {
    let header = sidecar::parse(sidecar0, sidecar0.len() as u64).expect("initial sidecar parses");
    let enabled: Vec<&sidecar::Entry> = header.entries.iter().filter(|e| e.enabled).collect();
    assert!(!enabled.is_empty(), "no enabled bitmap to check");
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut report = DirtyReport::default();

    // Sidecar writes (pos, offset, data) and completed syncs (end pos -> begin pos).
    let mut side_writes: Vec<(usize, u64, &[u8])> = Vec::new();
    let mut syncs: Vec<(usize, usize)> = Vec::new();
    let mut begins: HashMap<u64, usize> = HashMap::new();
    // Per position: the sectors an image operation there may change.
    let mut changes: Vec<(usize, Vec<u64>)> = Vec::new();
    for (pos, ev) in events.iter().enumerate() {
        match ev {
            Event::Write {
                file: FileRole::Bitmaps,
                offset,
                data,
            } => side_writes.push((pos, *offset, data)),
            Event::SyncBegin {
                file: FileRole::Bitmaps,
                id,
            } => {
                begins.insert(*id, pos);
            }
            Event::SyncEnd {
                file: FileRole::Bitmaps,
                id,
            } => {
                if let Some(b) = begins.get(id) {
                    syncs.push((pos, *b));
                }
            }
            Event::Write {
                file: FileRole::Image,
                offset,
                data,
            } => changes.push((
                pos,
                differing(initial, *offset, Some(data), data.len() as u64),
            )),
            Event::Punch {
                file: FileRole::Image,
                offset,
                len,
            } => changes.push((pos, differing(initial, *offset, None, *len))),
            _ => {}
        }
    }
    report.sidecar_writes = side_writes.len();
    report.sidecar_syncs = syncs.len();

    let sectors = initial.len() as u64 / SECTOR;
    let mut required = vec![false; sectors as usize];
    let mut required_list: Vec<u64> = Vec::new();
    let mut next_change = 0;
    for p in 0..=events.len() {
        while next_change < changes.len() && changes[next_change].0 < p {
            for &s in &changes[next_change].1 {
                if !required[s as usize] {
                    required[s as usize] = true;
                    required_list.push(s);
                }
            }
            next_change += 1;
        }
        let horizon = syncs
            .iter()
            .filter(|(end, _)| *end < p)
            .map(|(_, begin)| *begin)
            .max()
            .unwrap_or(0);
        report.points += 1;
        let volatile: Vec<&(usize, u64, &[u8])> = side_writes
            .iter()
            .filter(|(pos, _, _)| *pos >= horizon && *pos < p)
            .collect();
        for k in 0..2 + random_states {
            let mut file = sidecar0.to_vec();
            for (pos, off, data) in &side_writes {
                if *pos >= p {
                    break;
                }
                let durable = *pos < horizon;
                if durable || k == 1 {
                    apply(&mut file, *off, data, |_| true);
                } else if k >= 2 && !volatile.is_empty() {
                    let mut r = rng.gen::<u64>();
                    apply(&mut file, *off, data, |_| {
                        r = r.rotate_left(1) ^ 0x9e37;
                        r & 1 == 1
                    });
                }
            }
            report.states += 1;
            let mut bad = None;
            'sectors: for &s in &required_list {
                for e in &enabled {
                    let g = (s * SECTOR) >> e.gran_log2;
                    let byte = e.bits_offset + g / 8;
                    let set = file
                        .get(byte as usize)
                        .is_some_and(|b| b & (1 << (g % 8)) != 0);
                    if !set {
                        bad = Some((s, e.name.clone()));
                        break 'sectors;
                    }
                }
            }
            if let Some((s, name)) = bad {
                report.violating_states += 1;
                if report.examples.len() < 5 {
                    report.examples.push(format!(
                        "crash point {p} (state {k}): sector {s} may differ but is clean in bitmap {name:?}"
                    ));
                }
            }
        }
    }
    report.changed_sectors = required_list.len();
    report
}

/// Sectors of `[offset, offset+len)` whose new bytes (`data`, or zeros) differ from `initial`.
fn differing(initial: &[u8], offset: u64, data: Option<&[u8]>, len: u64) -> Vec<u64> {
    let end = (offset + len).min(initial.len() as u64);
    let mut out = Vec::new();
    let mut at = offset;
    while at < end {
        let s = at / SECTOR;
        let s_end = ((s + 1) * SECTOR).min(end);
        let new: Vec<u8> = match data {
            Some(d) => d[(at - offset) as usize..(s_end - offset) as usize].to_vec(),
            None => vec![0; (s_end - at) as usize],
        };
        if initial[at as usize..s_end as usize] != new[..] {
            out.push(s);
        }
        at = s_end;
    }
    out
}

fn apply(file: &mut Vec<u8>, off: u64, data: &[u8], mut keep: impl FnMut(u64) -> bool) {
    let end = off as usize + data.len();
    if file.len() < end {
        file.resize(end, 0);
    }
    let mut at = off;
    while at < end as u64 {
        let s_end = ((at / SECTOR + 1) * SECTOR).min(end as u64);
        if keep(at / SECTOR) {
            let (a, b) = ((at - off) as usize, (s_end - off) as usize);
            file[at as usize..s_end as usize].copy_from_slice(&data[a..b]);
        }
        at = s_end;
    }
}
