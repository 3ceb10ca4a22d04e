//! Crash-state builder and checker over a [`Recorder`] log.
//!
//! # Model
//! * **Files.** The log holds the engine's completed writes and hole punches to the raw image and
//!   the `.add-cow` file, and the begin/end of each fdatasync, on one timeline. A crash point `P`
//!   means "the first `P` events happened". Per the recorder's durability model, an operation on
//!   file F is durable at `P` if it sits before the `SyncBegin` of a sync of F whose `SyncEnd` is
//!   before `P`. Every other operation before `P` may or may not have reached the disk, per
//!   512-byte sector of that file (the atomic unit), in any combination; when several of them
//!   hit one sector, the later one wins if both persisted.
//! * **Client.** The harness records what the client was answered ([`ClientEvent`]) and, in an
//!   [`IssueLog`], what it had seen when it *issued* each request: how many client events had
//!   been logged before a write was issued (so the write cannot be on disk before that) and how
//!   many writes had been answered before a flush was issued (the writes that flush covers).
//!   Without an entry, a write counts as possibly issued from the start, and a flush covers every
//!   write answered before its answer (right for sequential logs).
//! * **Workload discipline.** Each byte of the virtual disk must be written by one client thread
//!   at a time, each write answered before that thread issues the next (threads may share a
//!   sector, not a byte). Then the writes of a byte are ordered by their ids (issue order).
//!
//! # What is checked, for every crash state
//! Let `G[b]` be the value of the newest write of byte `b` that is *guaranteed* at `P` (answered
//! before a FLUSH that was answered before `P`, or a FUA write answered before `P`), or the
//! initial content when there is none. Byte `b` must read `G[b]` or the value of a write that
//! may have been issued before `P` and is newer than `G[b]`'s write. Anything else (zeros the
//! client never wrote, stale raw-image bytes, an older value) is a violation.
//!
//! # Crash states
//! Crash points: every `SyncBegin` (just before and after), every `SyncEnd`, every FLUSH answer,
//! every metadata write, the start and end of the log, plus random points. At each point the
//! first four states are fixed (no volatile operation persisted; all of them; only the
//! metadata file's; only the raw image's: the adversarial case for invariant 1), the rest
//! random: per (operation, sector), per whole operation, or a per-file prefix in log order.
//!
//! Limits: an operation counts only once its completion is logged, so a write still in flight
//! at the crash point is never partly persisted here; the recorder logs at completion, which
//! is when the engine may rely on it anyway.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use addcow_engine::io::recorder::{ClientEvent, Event, FileRole, Recorder};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::reference::{RefView, SECTOR};

/// The overlay's files before the run.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The `.add-cow` file.
    pub meta: Vec<u8>,
    /// The raw image.
    pub image: Vec<u8>,
    /// The base, if the header names one.
    pub base: Option<Vec<u8>>,
}

/// What the harness knew when it issued a write.
#[derive(Debug, Clone, Copy)]
pub struct WriteIssue {
    /// Client events logged before the write was issued.
    pub clients_before: usize,
    /// Whether it was a FUA write (durable once answered).
    pub fua: bool,
}

/// Issue-time facts the log itself does not hold (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct IssueLog {
    /// Per write id.
    pub writes: HashMap<u64, WriteIssue>,
    /// Per flush id: how many writes had been answered when it was issued.
    pub flushes: HashMap<u64, usize>,
}

/// Pushes client events into the engine's recorder and keeps the [`IssueLog`] consistent with
/// the log order (both under one lock). Ids are issue order.
#[derive(Debug)]
pub struct ClientTracker {
    recorder: Arc<Recorder>,
    state: Mutex<TrackerState>,
}

#[derive(Debug, Default)]
struct TrackerState {
    next_id: u64,
    clients: usize,
    answered_writes: usize,
    issue: IssueLog,
}

impl ClientTracker {
    /// A tracker logging into `recorder`.
    pub fn new(recorder: Arc<Recorder>) -> ClientTracker {
        ClientTracker {
            recorder,
            state: Mutex::new(TrackerState::default()),
        }
    }

    /// Call right before submitting a write (or write-zeroes / trim); returns its id.
    pub fn issue_write(&self, fua: bool) -> u64 {
        let mut st = self.state.lock().unwrap();
        let id = st.next_id;
        st.next_id += 1;
        let clients_before = st.clients;
        st.issue.writes.insert(
            id,
            WriteIssue {
                clients_before,
                fua,
            },
        );
        id
    }

    /// Call once the write was answered successfully, with the bytes the client expects there.
    pub fn answer_write(&self, id: u64, offset: u64, data: Vec<u8>) {
        let mut st = self.state.lock().unwrap();
        self.recorder
            .push(Event::Client(ClientEvent::WriteAnswered {
                id,
                offset,
                data,
            }));
        st.clients += 1;
        st.answered_writes += 1;
    }

    /// Call right before submitting a flush; returns its id.
    pub fn issue_flush(&self) -> u64 {
        let mut st = self.state.lock().unwrap();
        let id = st.next_id;
        st.next_id += 1;
        let covered = st.answered_writes;
        st.issue.flushes.insert(id, covered);
        id
    }

    /// Call once the flush was answered successfully.
    pub fn answer_flush(&self, id: u64) {
        let mut st = self.state.lock().unwrap();
        self.recorder
            .push(Event::Client(ClientEvent::FlushAnswered { id }));
        st.clients += 1;
    }

    /// The issue log so far.
    pub fn issue_log(&self) -> IssueLog {
        self.state.lock().unwrap().issue.clone()
    }
}

/// How many crash states to build.
#[derive(Debug, Clone)]
pub struct CheckConfig {
    /// Seed of the RNG choosing crash points and persisted subsets.
    pub seed: u64,
    /// Build at least this many crash states in all.
    pub min_states: usize,
    /// Crash points chosen at random, on top of every sync begin/end, flush answer and
    /// metadata write.
    pub random_points: usize,
    /// At least this many states per crash point (the first four are fixed: nothing volatile
    /// persisted, everything, only metadata, only data).
    pub min_states_per_point: usize,
    /// Keep up to this many crash states (evenly spread) in [`Report::samples`], for opening
    /// with the real engine.
    pub samples: usize,
}

impl CheckConfig {
    /// Defaults: `min_states` states, 64 random points, at least 6 states per point.
    pub fn new(seed: u64, min_states: usize) -> CheckConfig {
        CheckConfig {
            seed,
            min_states,
            random_points: 64,
            min_states_per_point: 6,
            samples: 0,
        }
    }
}

/// The checker's result.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Seed used.
    pub seed: u64,
    /// Crash points examined.
    pub points: usize,
    /// Crash states built and checked.
    pub states: usize,
    /// Crash states with at least one violation.
    pub violating_states: usize,
    /// Descriptions of the first few violations.
    pub examples: Vec<String>,
    /// Client writes and flushes found in the log.
    pub client_writes: usize,
    /// Flushes answered.
    pub flushes: usize,
    /// Sampled crash states: (`.add-cow` bytes, raw-image bytes).
    pub samples: Vec<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "crash check (seed {}): {} states at {} points, {} client writes, {} flushes, {} violating states",
            self.seed, self.states, self.points, self.client_writes, self.flushes, self.violating_states
        )?;
        for e in &self.examples {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
enum OpData<'a> {
    Bytes(&'a [u8]),
    Zeros(u64),
}

#[derive(Debug, Clone, Copy)]
struct FileOp<'a> {
    pos: usize,
    offset: u64,
    data: OpData<'a>,
}

impl FileOp<'_> {
    fn len(&self) -> u64 {
        match self.data {
            OpData::Bytes(d) => d.len() as u64,
            OpData::Zeros(n) => n,
        }
    }
}

/// Applies `op` to `buf` for the file sectors where `keep(sector)` says so.
fn apply_op(buf: &mut Vec<u8>, op: &FileOp<'_>, mut keep: impl FnMut(u64) -> bool) {
    let len = op.len();
    if len == 0 {
        return;
    }
    let end = op.offset + len;
    let end = match op.data {
        OpData::Bytes(_) => {
            if buf.len() < end as usize {
                buf.resize(end as usize, 0);
            }
            end
        }
        // A punch never grows the file.
        OpData::Zeros(_) => end.min(buf.len() as u64),
    };
    let mut pos = op.offset;
    while pos < end {
        let sector = pos / SECTOR as u64;
        let sector_end = ((sector + 1) * SECTOR as u64).min(end);
        if keep(sector) {
            let (from, to) = (pos as usize, sector_end as usize);
            match op.data {
                OpData::Bytes(d) => {
                    let off = (pos - op.offset) as usize;
                    buf[from..to].copy_from_slice(&d[off..off + (to - from)]);
                }
                OpData::Zeros(_) => buf[from..to].fill(0),
            }
        }
        pos = sector_end;
    }
}

/// One file's operations and sync horizons.
#[derive(Debug, Default)]
struct FileLog<'a> {
    ops: Vec<FileOp<'a>>,
    /// (end position, begin position) of completed syncs, by end position.
    syncs: Vec<(usize, usize)>,
}

impl FileLog<'_> {
    /// Operations with `pos` below this are durable at crash point `p`.
    fn horizon(&self, p: usize) -> usize {
        self.syncs
            .iter()
            .filter(|(end, _)| *end < p)
            .map(|(_, begin)| *begin)
            .max()
            .unwrap_or(0)
    }
}

#[derive(Debug)]
struct ClientWrite<'a> {
    id: u64,
    offset: u64,
    data: &'a [u8],
    possible_from: usize,
    guaranteed_from: usize,
}

/// Applies every file operation of the log to `initial`, in order: the files as they must be
/// once the run ended (used to prove that the log is complete).
pub fn replay_all(initial: &Snapshot, events: &[Event]) -> (Vec<u8>, Vec<u8>) {
    let (image, meta) = split_files(events);
    let mut meta_buf = initial.meta.clone();
    let mut image_buf = initial.image.clone();
    for op in &meta.ops {
        apply_op(&mut meta_buf, op, |_| true);
    }
    for op in &image.ops {
        apply_op(&mut image_buf, op, |_| true);
    }
    (meta_buf, image_buf)
}

fn split_files(events: &[Event]) -> (FileLog<'_>, FileLog<'_>) {
    let mut image = FileLog::default();
    let mut meta = FileLog::default();
    let mut begins: HashMap<(bool, u64), usize> = HashMap::new();
    for (pos, ev) in events.iter().enumerate() {
        let pick = |f: &FileRole| matches!(f, FileRole::Image);
        // The dirty-bitmap sidecar has its own checker (`crash_dirty`).
        if matches!(
            ev,
            Event::Write {
                file: FileRole::Bitmaps,
                ..
            } | Event::Punch {
                file: FileRole::Bitmaps,
                ..
            } | Event::SyncBegin {
                file: FileRole::Bitmaps,
                ..
            } | Event::SyncEnd {
                file: FileRole::Bitmaps,
                ..
            }
        ) {
            continue;
        }
        match ev {
            Event::Write { file, offset, data } => {
                let log = if pick(file) { &mut image } else { &mut meta };
                log.ops.push(FileOp {
                    pos,
                    offset: *offset,
                    data: OpData::Bytes(data),
                });
            }
            Event::Punch { file, offset, len } => {
                let log = if pick(file) { &mut image } else { &mut meta };
                log.ops.push(FileOp {
                    pos,
                    offset: *offset,
                    data: OpData::Zeros(*len),
                });
            }
            Event::SyncBegin { file, id } => {
                begins.insert((pick(file), *id), pos);
            }
            Event::SyncEnd { file, id } => {
                // A SyncEnd without its begin proves nothing.
                if let Some(begin) = begins.get(&(pick(file), *id)) {
                    let log = if pick(file) { &mut image } else { &mut meta };
                    log.syncs.push((pos, *begin));
                }
            }
            Event::Client(_) => {}
        }
    }
    (image, meta)
}

/// Which volatile operations a crash state keeps.
#[derive(Debug, Clone, Copy)]
enum Strategy {
    Nothing,
    Everything,
    MetaOnly,
    ImageOnly,
    /// Each (operation, sector) independently with this probability.
    Sectors(f64),
    /// Each whole operation independently with this probability.
    Ops(f64),
    /// Per file, the volatile operations in log order up to a random cut.
    Prefix,
}

/// The crash-state checker over one run's log.
pub struct Checker<'a> {
    initial: &'a Snapshot,
    events: &'a [Event],
    image: FileLog<'a>,
    meta: FileLog<'a>,
    writes: Vec<ClientWrite<'a>>,
    flushes: usize,
    initial_disk: Vec<u8>,
}

impl<'a> Checker<'a> {
    /// Prepares the checker. Panics if the initial snapshot does not decode or a client event
    /// is malformed (those are harness bugs, not engine bugs).
    pub fn new(initial: &'a Snapshot, events: &'a [Event], issue: &IssueLog) -> Checker<'a> {
        let view = RefView::decode(&initial.meta, &initial.image, initial.base.as_deref())
            .expect("initial snapshot decodes");
        let initial_disk = view.read_all();
        let (image, meta) = split_files(events);

        // Client events: positions, answer ranks.
        let mut client_pos = Vec::new();
        let mut answered: Vec<(u64, u64, &'a [u8], usize)> = Vec::new();
        let mut flush_marks: Vec<(usize, usize)> = Vec::new(); // (pos, writes covered)
        for (pos, ev) in events.iter().enumerate() {
            if let Event::Client(c) = ev {
                client_pos.push(pos);
                match c {
                    ClientEvent::WriteAnswered { id, offset, data } => {
                        answered.push((*id, *offset, data, pos));
                    }
                    ClientEvent::FlushAnswered { id } => {
                        let covered = issue.flushes.get(id).copied().unwrap_or(answered.len());
                        assert!(
                            covered <= answered.len(),
                            "flush {id} covers unanswered writes"
                        );
                        flush_marks.push((pos, covered));
                    }
                }
            }
        }
        let mut writes = Vec::with_capacity(answered.len());
        for (rank, (id, offset, data, pos)) in answered.iter().enumerate() {
            let info = issue.writes.get(id);
            let possible_from = match info {
                Some(w) if w.clients_before > 0 => client_pos[w.clients_before - 1] + 1,
                _ => 0,
            };
            let mut guaranteed_from = usize::MAX;
            if info.is_some_and(|w| w.fua) {
                guaranteed_from = pos + 1;
            }
            if let Some((fpos, _)) = flush_marks.iter().find(|(_, covered)| *covered > rank) {
                guaranteed_from = guaranteed_from.min(fpos + 1);
            }
            writes.push(ClientWrite {
                id: *id,
                offset: *offset,
                data,
                possible_from,
                guaranteed_from,
            });
        }
        Checker {
            initial,
            events,
            image,
            meta,
            writes,
            flushes: flush_marks.len(),
            initial_disk,
        }
    }

    fn crash_points(&self, rng: &mut SmallRng, random_points: usize) -> Vec<usize> {
        let n = self.events.len();
        let mut points = vec![0, n];
        for (pos, ev) in self.events.iter().enumerate() {
            match ev {
                Event::SyncBegin { .. } => points.extend([pos, pos + 1]),
                Event::SyncEnd { .. } => points.push(pos + 1),
                Event::Client(ClientEvent::FlushAnswered { .. }) => points.push(pos + 1),
                Event::Write {
                    file: FileRole::Meta,
                    ..
                } => points.push(pos + 1),
                _ => {}
            }
        }
        for _ in 0..random_points {
            points.push(rng.gen_range(0..=n));
        }
        points.sort_unstable();
        points.dedup();
        points
    }

    /// Builds and checks crash states; see the module docs.
    pub fn run(&self, cfg: &CheckConfig) -> Report {
        let mut rng = SmallRng::seed_from_u64(cfg.seed);
        let points = self.crash_points(&mut rng, cfg.random_points);
        let per_point = cfg
            .min_states_per_point
            .max(cfg.min_states.div_ceil(points.len().max(1)));
        let mut report = Report {
            seed: cfg.seed,
            points: points.len(),
            client_writes: self.writes.len(),
            flushes: self.flushes,
            ..Report::default()
        };

        let size = self.initial_disk.len();
        let sectors = size / SECTOR;
        // Guaranteed value per byte and the id + 1 of the write that put it there (0 = initial).
        let mut g = self.initial_disk.clone();
        let mut g_seq = vec![0u64; size];
        let mut by_guarantee: Vec<usize> = (0..self.writes.len()).collect();
        by_guarantee.sort_by_key(|&i| self.writes[i].guaranteed_from);
        let mut next_guaranteed = 0;

        let mut durable_meta = self.initial.meta.clone();
        let mut durable_image = self.initial.image.clone();
        let (mut meta_done, mut image_done) = (0usize, 0usize);
        let mut pending: Vec<Vec<usize>> = vec![Vec::new(); sectors];

        for &p in &points {
            // Durable prefixes grow with p.
            let h_meta = self.meta.horizon(p);
            while meta_done < self.meta.ops.len() && self.meta.ops[meta_done].pos < h_meta {
                apply_op(&mut durable_meta, &self.meta.ops[meta_done], |_| true);
                meta_done += 1;
            }
            let h_image = self.image.horizon(p);
            while image_done < self.image.ops.len() && self.image.ops[image_done].pos < h_image {
                apply_op(&mut durable_image, &self.image.ops[image_done], |_| true);
                image_done += 1;
            }
            // Guarantees grow with p.
            while next_guaranteed < by_guarantee.len()
                && self.writes[by_guarantee[next_guaranteed]].guaranteed_from <= p
            {
                let w = &self.writes[by_guarantee[next_guaranteed]];
                for (i, &byte) in w.data.iter().enumerate() {
                    let b = w.offset as usize + i;
                    if b < size && g_seq[b] < w.id + 1 {
                        g[b] = byte;
                        g_seq[b] = w.id + 1;
                    }
                }
                next_guaranteed += 1;
            }
            // Writes that may be on disk but are not guaranteed, per sector.
            for v in pending.iter_mut() {
                v.clear();
            }
            for (i, w) in self.writes.iter().enumerate() {
                if w.possible_from <= p && w.guaranteed_from > p && !w.data.is_empty() {
                    let first = w.offset as usize / SECTOR;
                    let last = ((w.offset as usize + w.data.len() - 1) / SECTOR).min(sectors - 1);
                    for v in pending.iter_mut().take(last + 1).skip(first) {
                        v.push(i);
                    }
                }
            }
            let versions: Vec<Vec<Vec<u8>>> = pending
                .iter()
                .enumerate()
                .map(|(s, p)| {
                    if p.is_empty() {
                        Vec::new()
                    } else {
                        self.sector_versions(s, &g, &g_seq, p)
                    }
                })
                .collect();
            let mut allowed: Vec<Option<Vec<[u64; 4]>>> = vec![None; sectors];
            let volatile_meta: Vec<&FileOp<'_>> = self.meta.ops[meta_done..]
                .iter()
                .filter(|o| o.pos < p)
                .collect();
            let volatile_image: Vec<&FileOp<'_>> = self.image.ops[image_done..]
                .iter()
                .filter(|o| o.pos < p)
                .collect();

            for k in 0..per_point {
                let strategy = match k {
                    0 => Strategy::Nothing,
                    1 => Strategy::Everything,
                    2 => Strategy::MetaOnly,
                    3 => Strategy::ImageOnly,
                    _ => match rng.gen_range(0..5) {
                        0 => Strategy::Ops(rng.gen_range(0.1..0.9)),
                        1 => Strategy::Prefix,
                        2 => Strategy::Sectors(0.5),
                        _ => Strategy::Sectors(rng.gen_range(0.05..0.95)),
                    },
                };
                let mut meta = durable_meta.clone();
                let mut image = durable_image.clone();
                build_state(&mut meta, &volatile_meta, strategy, true, &mut rng);
                build_state(&mut image, &volatile_image, strategy, false, &mut rng);
                report.states += 1;
                if cfg.samples > 0
                    && report.samples.len() < cfg.samples
                    && report.states % (points.len() * per_point / cfg.samples).max(1) == 0
                {
                    report.samples.push((meta.clone(), image.clone()));
                }
                let found =
                    self.check_state(&meta, &image, &g, &g_seq, &pending, &versions, &mut allowed);
                if let Some(msg) = found {
                    report.violating_states += 1;
                    if report.examples.len() < 8 {
                        report.examples.push(format!(
                            "crash point {p}/{} ({strategy:?}; durable: meta ops < {h_meta}, image ops < {h_image}): {msg}",
                            self.events.len()
                        ));
                    }
                }
            }
        }
        report
    }

    /// Whole-sector versions a pending-write sector may show: the guaranteed content with one
    /// pending write applied, and with all of them applied in issue order. A cheap way to accept
    /// most sectors before checking byte by byte.
    fn sector_versions(
        &self,
        s: usize,
        g: &[u8],
        g_seq: &[u64],
        pending: &[usize],
    ) -> Vec<Vec<u8>> {
        let base = s * SECTOR;
        let apply = |version: &mut [u8], w: &ClientWrite<'_>| {
            let from = (w.offset as usize).max(base);
            let to = (w.offset as usize + w.data.len()).min(base + SECTOR);
            for b in from..to {
                if w.id + 1 > g_seq[b] {
                    version[b - base] = w.data[b - w.offset as usize];
                }
            }
        };
        let mut versions = Vec::with_capacity(pending.len() + 1);
        let mut all = g[base..base + SECTOR].to_vec();
        let mut order: Vec<usize> = pending.to_vec();
        order.sort_by_key(|&wi| self.writes[wi].id);
        for &wi in &order {
            let mut one = g[base..base + SECTOR].to_vec();
            apply(&mut one, &self.writes[wi]);
            versions.push(one);
            apply(&mut all, &self.writes[wi]);
        }
        versions.push(all);
        versions
    }

    /// Per byte of sector `s`, the set of values it may read (a 256-bit set).
    fn allowed_bytes(&self, s: usize, g: &[u8], g_seq: &[u64], pending: &[usize]) -> Vec<[u64; 4]> {
        let base = s * SECTOR;
        let mut allowed = vec![[0u64; 4]; SECTOR];
        let set = |a: &mut [u64; 4], v: u8| a[usize::from(v / 64)] |= 1 << (v % 64);
        for (i, a) in allowed.iter_mut().enumerate() {
            set(a, g[base + i]);
        }
        for &wi in pending {
            let w = &self.writes[wi];
            let from = (w.offset as usize).max(base);
            let to = (w.offset as usize + w.data.len()).min(base + SECTOR);
            for b in from..to {
                if w.id + 1 > g_seq[b] {
                    set(&mut allowed[b - base], w.data[b - w.offset as usize]);
                }
            }
        }
        allowed
    }

    /// The first violation of crash state (`meta`, `image`), if any.
    #[allow(clippy::too_many_arguments)]
    fn check_state(
        &self,
        meta: &[u8],
        image: &[u8],
        g: &[u8],
        g_seq: &[u64],
        pending: &[Vec<usize>],
        versions: &[Vec<Vec<u8>>],
        allowed: &mut [Option<Vec<[u64; 4]>>],
    ) -> Option<String> {
        if image.len() != self.initial.image.len() {
            return Some(format!(
                "raw image is {} bytes, was {}",
                image.len(),
                self.initial.image.len()
            ));
        }
        let view = match RefView::decode(meta, image, self.initial.base.as_deref()) {
            Ok(v) => v,
            Err(e) => return Some(format!("overlay does not decode: {e}")),
        };
        let mut actual = [0u8; SECTOR];
        for (s, pending_here) in pending.iter().enumerate().take(view.sectors() as usize) {
            view.read_sector(s as u64, &mut actual);
            let range = s * SECTOR..(s + 1) * SECTOR;
            if actual[..] == g[range.clone()] || versions[s].iter().any(|v| v[..] == actual[..]) {
                continue;
            }
            let allowed_here =
                allowed[s].get_or_insert_with(|| self.allowed_bytes(s, g, g_seq, pending_here));
            for (i, &a) in actual.iter().enumerate() {
                if allowed_here[i][usize::from(a / 64)] & (1 << (a % 64)) != 0 {
                    continue;
                }
                let b = s * SECTOR + i;
                let mut msg = format!(
                    "byte {b} (sector {s}, bit {}) reads {a:#04x}; must read {:#04x} ({})",
                    view.bit(s as u64),
                    g[b],
                    match g_seq[b] {
                        0 => "initial content".to_string(),
                        n => format!("write {}, guaranteed", n - 1),
                    }
                );
                let others: Vec<String> = pending_here
                    .iter()
                    .map(|&wi| &self.writes[wi])
                    .filter(|w| {
                        w.id + 1 > g_seq[b]
                            && (b as u64) >= w.offset
                            && (b as u64) < w.offset + w.data.len() as u64
                    })
                    .map(|w| format!("write {}={:#04x}", w.id, w.data[b - w.offset as usize]))
                    .collect();
                if !others.is_empty() {
                    let _ = write!(msg, " or a newer pending one [{}]", others.join(", "));
                }
                let _ = write!(
                    msg,
                    "; initial {:#04x}",
                    self.initial_disk.get(b).copied().unwrap_or(0)
                );
                return Some(msg);
            }
        }
        None
    }
}

fn build_state(
    buf: &mut Vec<u8>,
    ops: &[&FileOp<'_>],
    strategy: Strategy,
    is_meta: bool,
    rng: &mut SmallRng,
) {
    match strategy {
        Strategy::Nothing => {}
        Strategy::Everything => ops.iter().for_each(|op| apply_op(buf, op, |_| true)),
        Strategy::MetaOnly | Strategy::ImageOnly => {
            if is_meta == matches!(strategy, Strategy::MetaOnly) {
                ops.iter().for_each(|op| apply_op(buf, op, |_| true));
            }
        }
        Strategy::Sectors(prob) => {
            for op in ops {
                apply_op(buf, op, |_| rng.gen_bool(prob));
            }
        }
        Strategy::Ops(prob) => {
            for op in ops {
                if rng.gen_bool(prob) {
                    apply_op(buf, op, |_| true);
                }
            }
        }
        Strategy::Prefix => {
            let cut = rng.gen_range(0..=ops.len());
            ops[..cut].iter().for_each(|op| apply_op(buf, op, |_| true));
        }
    }
}
