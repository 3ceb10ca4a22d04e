//! Crash states of a lifecycle operation (resize, rebase, commit) from its [`FileOp`] log.
//!
//! # Model
//! * One directory holds every file involved; files are named by their file name there. The
//!   initial state is the directory's files before the operation. Inodes are tracked apart from
//!   names: `Open` binds a log id to the inode a name held at that moment of the run, `Create`
//!   makes a new empty inode and names it, `Rename` moves a name, `Unlink` drops one.
//! * A crash point `P` means "the first `P` operations happened". A content operation (write,
//!   size change, punch) on an inode is durable at `P` if a `Sync` of that inode follows it
//!   before `P`; a directory operation is durable if a `SyncDir` follows it before `P`.
//! * Every other operation before `P` may or may not have reached the disk: content operations
//!   independently, writes even per 512-byte sector of the file (a torn write), size changes as
//!   a whole; directory operations as a prefix in log order (directory metadata is journaled in
//!   order). Persisted operations apply in log order.
//! * Per crash point: nothing volatile persisted, everything, only the directory operations,
//!   only the content operations, then random choices.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use addcow_engine::lifecycle::FileOp;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// The files of the directory: name → contents.
pub type Files = BTreeMap<String, Vec<u8>>;

/// One crash state.
#[derive(Debug, Clone)]
pub struct CrashState {
    /// Operations that had happened.
    pub point: usize,
    /// How volatile operations were chosen (for messages).
    pub how: String,
    /// The directory as it would be found after the crash.
    pub files: Files,
}

fn name(p: &Path) -> String {
    p.file_name()
        .expect("file name")
        .to_string_lossy()
        .into_owned()
}

/// Reads every regular file of `dir`.
pub fn snapshot_dir(dir: &Path) -> Files {
    let mut out = Files::new();
    for e in std::fs::read_dir(dir).expect("read dir") {
        let e = e.expect("dir entry");
        if e.file_type().expect("file type").is_file() {
            out.insert(
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).expect("read file"),
            );
        }
    }
    out
}

/// Replaces the regular files of `dir` by `files`.
pub fn materialize(dir: &Path, files: &Files) {
    for e in std::fs::read_dir(dir).expect("read dir") {
        let e = e.expect("dir entry");
        if e.file_type().expect("file type").is_file() {
            std::fs::remove_file(e.path()).expect("remove");
        }
    }
    for (n, data) in files {
        std::fs::write(dir.join(n), data).expect("write crash-state file");
    }
}

/// What each logged operation does, resolved to inodes.
#[derive(Debug, Clone)]
enum Step {
    Content { inode: usize, op: Content },
    Sync { inode: usize },
    Dir(DirOp),
    SyncDir,
    None,
}

#[derive(Debug, Clone)]
enum Content {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
    Punch { offset: u64, len: u64 },
}

#[derive(Debug, Clone)]
enum DirOp {
    Link { name: String, inode: usize },
    Rename { from: String, to: String },
    Unlink { name: String },
}

fn apply_dir(names: &mut BTreeMap<String, usize>, op: &DirOp) {
    match op {
        DirOp::Link { name, inode } => {
            names.insert(name.clone(), *inode);
        }
        DirOp::Rename { from, to } => {
            if let Some(i) = names.remove(from) {
                names.insert(to.clone(), i);
            }
        }
        DirOp::Unlink { name } => {
            names.remove(name);
        }
    }
}

fn apply_content(data: &mut Vec<u8>, op: &Content, sectors: Option<&[bool]>) {
    match op {
        Content::Write { offset, data: d } => {
            let off = *offset as usize;
            let mut pos = 0usize;
            let mut k = 0usize;
            while pos < d.len() {
                // Pieces end at 512-byte boundaries of the file.
                let abs = off + pos;
                let piece = (512 - abs % 512).min(d.len() - pos);
                if sectors.map_or(true, |s| s[k]) {
                    if data.len() < abs + piece {
                        data.resize(abs + piece, 0);
                    }
                    data[abs..abs + piece].copy_from_slice(&d[pos..pos + piece]);
                }
                pos += piece;
                k += 1;
            }
        }
        Content::SetLen(len) => data.resize(*len as usize, 0),
        Content::Punch { offset, len } => {
            let end = ((offset + len) as usize).min(data.len());
            let start = (*offset as usize).min(end);
            data[start..end].fill(0);
        }
    }
}

fn pieces(op: &Content) -> usize {
    match op {
        Content::Write { offset, data } => {
            let start = *offset as usize;
            let end = start + data.len();
            if data.is_empty() {
                0
            } else {
                (end - 1) / 512 - start / 512 + 1
            }
        }
        _ => 1,
    }
}

/// Every crash state of `log` over `initial`: each crash point with `per_point` states (the
/// first four fixed, see the module docs).
pub fn crash_states(
    initial: &Files,
    log: &[FileOp],
    seed: u64,
    per_point: usize,
) -> Vec<CrashState> {
    // Resolve the log against the names as they evolved in the run.
    let mut inode_init: Vec<Vec<u8>> = Vec::new();
    let mut init_names = BTreeMap::new();
    for (n, d) in initial {
        init_names.insert(n.clone(), inode_init.len());
        inode_init.push(d.clone());
    }
    let mut live = init_names.clone();
    let mut ids: HashMap<u64, usize> = HashMap::new();
    let mut steps = Vec::new();
    for op in log {
        let step = match op {
            FileOp::Open { id, path } => {
                let inode = *live.get(&name(path)).unwrap_or_else(|| {
                    panic!(
                        "opened {} which the directory does not hold",
                        path.display()
                    )
                });
                ids.insert(*id, inode);
                Step::None
            }
            FileOp::Create { id, path } => {
                let inode = inode_init.len();
                inode_init.push(Vec::new());
                ids.insert(*id, inode);
                let d = DirOp::Link {
                    name: name(path),
                    inode,
                };
                apply_dir(&mut live, &d);
                Step::Dir(d)
            }
            FileOp::Write { id, offset, data } => Step::Content {
                inode: ids[id],
                op: Content::Write {
                    offset: *offset,
                    data: data.clone(),
                },
            },
            FileOp::SetLen { id, len } => Step::Content {
                inode: ids[id],
                op: Content::SetLen(*len),
            },
            FileOp::Punch { id, offset, len } => Step::Content {
                inode: ids[id],
                op: Content::Punch {
                    offset: *offset,
                    len: *len,
                },
            },
            FileOp::Allocate { .. } => Step::None,
            FileOp::Sync { id } => Step::Sync { inode: ids[id] },
            FileOp::Rename { from, to } => {
                let d = DirOp::Rename {
                    from: name(from),
                    to: name(to),
                };
                apply_dir(&mut live, &d);
                Step::Dir(d)
            }
            FileOp::Unlink { path } => {
                let d = DirOp::Unlink { name: name(path) };
                apply_dir(&mut live, &d);
                Step::Dir(d)
            }
            FileOp::SyncDir { .. } => Step::SyncDir,
        };
        steps.push(step);
    }

    let mut rng = SmallRng::seed_from_u64(seed);
    let mut out = Vec::new();
    for point in 0..=steps.len() {
        let prefix = &steps[..point];
        // Durability boundaries inside the prefix.
        let mut last_sync: HashMap<usize, usize> = HashMap::new();
        let mut last_sync_dir = None;
        for (i, s) in prefix.iter().enumerate() {
            match s {
                Step::Sync { inode } => {
                    last_sync.insert(*inode, i);
                }
                Step::SyncDir => last_sync_dir = Some(i),
                _ => {}
            }
        }
        let volatile_content: Vec<usize> = prefix
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s {
                Step::Content { inode, .. } if last_sync.get(inode).map_or(true, |&l| i > l) => {
                    Some(i)
                }
                _ => None,
            })
            .collect();
        let volatile_dir: Vec<usize> = prefix
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s {
                Step::Dir(_) if last_sync_dir.map_or(true, |l| i > l) => Some(i),
                _ => None,
            })
            .collect();
        for k in 0..per_point.max(4) {
            // Per volatile content op: None = not persisted, Some(sectors) = persisted pieces.
            let mut chosen: HashMap<usize, Vec<bool>> = HashMap::new();
            let (how, dir_keep) = match k {
                0 => ("nothing volatile".to_string(), 0),
                1 => {
                    for &i in &volatile_content {
                        if let Step::Content { op, .. } = &prefix[i] {
                            chosen.insert(i, vec![true; pieces(op)]);
                        }
                    }
                    ("everything".to_string(), volatile_dir.len())
                }
                2 => ("only directory operations".to_string(), volatile_dir.len()),
                3 => {
                    for &i in &volatile_content {
                        if let Step::Content { op, .. } = &prefix[i] {
                            chosen.insert(i, vec![true; pieces(op)]);
                        }
                    }
                    ("only file contents".to_string(), 0)
                }
                _ => {
                    let torn = rng.gen_bool(0.5);
                    for &i in &volatile_content {
                        if let Step::Content { op, .. } = &prefix[i] {
                            if rng.gen_bool(0.5) {
                                let n = pieces(op);
                                let v = if torn {
                                    (0..n).map(|_| rng.gen_bool(0.5)).collect()
                                } else {
                                    vec![true; n]
                                };
                                chosen.insert(i, v);
                            }
                        }
                    }
                    (
                        format!("random{}", if torn { ", torn writes" } else { "" }),
                        rng.gen_range(0..=volatile_dir.len()),
                    )
                }
            };
            let dir_persisted: Vec<usize> = volatile_dir[..dir_keep].to_vec();
            let mut contents = inode_init.clone();
            let mut names = init_names.clone();
            for (i, s) in prefix.iter().enumerate() {
                match s {
                    Step::Content { inode, op } => {
                        let durable = last_sync.get(inode).is_some_and(|&l| i < l);
                        if durable {
                            apply_content(&mut contents[*inode], op, None);
                        } else if let Some(sectors) = chosen.get(&i) {
                            apply_content(&mut contents[*inode], op, Some(sectors));
                        }
                    }
                    Step::Dir(d) => {
                        let durable = last_sync_dir.is_some_and(|l| i < l);
                        if durable || dir_persisted.contains(&i) {
                            apply_dir(&mut names, d);
                        }
                    }
                    _ => {}
                }
            }
            let files = names
                .iter()
                .map(|(n, &i)| (n.clone(), contents[i].clone()))
                .collect();
            out.push(CrashState {
                point,
                how: format!(
                    "{how} (volatile: {} content, {} directory)",
                    volatile_content.len(),
                    volatile_dir.len()
                ),
                files,
            });
        }
    }
    out
}
