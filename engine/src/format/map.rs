//! Allocation runs in the shape of `qemu-img map --output=json`.
//!
//! Runs, in order, cover the whole disk:
//! * bit set: the raw image holds the bytes: `depth 0, present, data, offset = start`;
//! * bit clear, inside the base: the base holds them: `depth 1, present, offset = start`, with
//!   `data`/`zero` from the base's own data and holes (`SEEK_DATA`/`SEEK_HOLE`);
//! * when the base is itself an add-cow overlay (a backing chain), its clear sectors go on down:
//!   the layer `k` levels below the top that holds a range reports `depth k` (its set bits are
//!   data of its raw image; a raw bottom layer reports its data and holes as above);
//! * bit clear in every layer, no base or past a layer's end: reads as zeros:
//!   `depth 0, present false, zero, no offset` (what `qemu-img map` prints for a qcow2 overlay
//!   past its backing file's end).
//!
//! * a remote (NBD) bottom layer reports data, and zeros where its server's `base:allocation`
//!   says so (asked once, on a connection of its own);
//!
//! Adjacent runs with the same attributes and contiguous offsets are merged, as qemu does.

use std::fs::File;

use crate::error::{Error, Result};
use crate::format::chain::{Over, RunSrc, Runs};
use crate::format::{BaseChain, Overlay};
use crate::nbd::client;
use crate::sys::{next_data, next_hole};

/// One run of `qemu-img map --output=json` shape.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MapRun {
    /// First byte of the run.
    pub start: u64,
    /// Bytes in the run.
    pub length: u64,
    /// 0 = the top raw image, 1 = the base, 2 = the base's base, ...
    pub depth: u32,
    /// Whether some layer holds the data (false past the base's end).
    pub present: bool,
    /// Whether the run reads as zeros.
    pub zero: bool,
    /// Whether the run has data.
    pub data: bool,
    /// Always false (qemu prints it; add-cow never compresses).
    #[serde(default)]
    pub compressed: bool,
    /// Offset in the file that holds the data, where it applies.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub offset: Option<u64>,
}

impl MapRun {
    fn raw(start: u64, length: u64) -> MapRun {
        MapRun {
            start,
            length,
            depth: 0,
            present: true,
            zero: false,
            data: true,
            compressed: false,
            offset: Some(start),
        }
    }

    #[cfg(test)]
    fn base(start: u64, length: u64, data: bool) -> MapRun {
        MapRun::layer(start, length, 1, data)
    }

    fn layer(start: u64, length: u64, depth: u32, data: bool) -> MapRun {
        MapRun {
            start,
            length,
            depth,
            present: true,
            zero: !data,
            data,
            compressed: false,
            offset: Some(start),
        }
    }

    fn absent(start: u64, length: u64) -> MapRun {
        MapRun {
            start,
            length,
            depth: 0,
            present: false,
            zero: true,
            data: false,
            compressed: false,
            offset: None,
        }
    }

    /// Whether `next` continues this run (same attributes, contiguous offsets).
    fn joins(&self, next: &MapRun) -> bool {
        self.start + self.length == next.start
            && self.depth == next.depth
            && self.present == next.present
            && self.zero == next.zero
            && self.data == next.data
            && match (self.offset, next.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a + self.length == b,
                _ => false,
            }
    }
}

fn push(runs: &mut Vec<MapRun>, run: MapRun) {
    if run.length == 0 {
        return;
    }
    if let Some(last) = runs.last_mut() {
        if last.joins(&run) {
            last.length += run.length;
            return;
        }
    }
    runs.push(run);
}

/// Pushes the runs of `[start, end)` of a raw file at `depth` (data or hole), clipped to `len`,
/// and an absent run past its end.
fn push_file(
    runs: &mut Vec<MapRun>,
    file: &File,
    len: u64,
    depth: u32,
    start: u64,
    end: u64,
) -> std::io::Result<()> {
    let limit = end.min(len);
    let mut p = start;
    while p < limit {
        match next_data(file, p)? {
            None => {
                push(runs, MapRun::layer(p, limit - p, depth, false));
                p = limit;
            }
            Some(d) if d > p => {
                let stop = d.min(limit);
                push(runs, MapRun::layer(p, stop - p, depth, false));
                p = stop;
            }
            Some(_) => {
                let h = next_hole(file, p, len)?.max(p + 1);
                let stop = h.min(limit);
                push(runs, MapRun::layer(p, stop - p, depth, true));
                p = stop;
            }
        }
    }
    if p < end {
        push(runs, MapRun::absent(p.max(start), end - p.max(start)));
    }
    Ok(())
}

/// A remote bottom layer as the map sees it: its size and the ranges that read as zeros.
struct RemoteMap {
    size: u64,
    zeros: Vec<(u64, u64)>,
}

impl RemoteMap {
    /// Pushes `[start, end)` at `depth`: data, zeros where the server said so, absent past the
    /// export's end.
    fn push(&self, runs: &mut Vec<MapRun>, depth: u32, start: u64, end: u64) {
        let limit = end.min(self.size).max(start);
        let mut p = start;
        let mut i = self.zeros.partition_point(|z| z.1 <= start);
        while p < limit {
            match self.zeros.get(i) {
                Some(&(zs, ze)) if zs < limit => {
                    if zs > p {
                        push(runs, MapRun::layer(p, zs - p, depth, true));
                        p = zs;
                    }
                    let stop = ze.min(limit);
                    push(runs, MapRun::layer(p, stop - p, depth, false));
                    p = stop;
                    i += 1;
                }
                _ => {
                    push(runs, MapRun::layer(p, limit - p, depth, true));
                    p = limit;
                }
            }
        }
        if end > limit {
            push(runs, MapRun::absent(limit, end - limit));
        }
    }
}

/// The allocation of the whole overlay as runs, in the order and shape `qemu-img map
/// --output=json` prints them: the chain's runs (from the in-memory bitmaps), each described by
/// the layer that supplies it (a raw bottom layer's data/hole layout, a remote one's zeros).
pub fn map_runs(overlay: &Overlay) -> Result<Vec<MapRun>> {
    let mut runs = Vec::new();
    let empty = BaseChain {
        layers: Vec::new(),
        remote: None,
    };
    let chain = overlay.base.as_ref().unwrap_or(&empty);
    let remote = match &chain.remote {
        Some(r) => {
            let mut sess = client::connect(&r.uri, std::time::Duration::from_secs(10))
                .map_err(|e| e.with_op("map remote base"))?;
            let zeros = client::zero_ranges(&mut sess, &r.uri);
            client::disconnect(&mut sess.stream);
            Some(RemoteMap {
                size: r.size,
                zeros,
            })
        }
        None => None,
    };
    let stack = Over {
        top: &overlay.bitmap,
        size: overlay.virtual_size,
        lower: chain,
    };
    for run in Runs::new(&stack, 0, overlay.virtual_size) {
        let (start, end) = (run.offset, run.offset + run.len);
        let depth = match run.src {
            RunSrc::Zero => {
                push(&mut runs, MapRun::absent(start, run.len));
                continue;
            }
            RunSrc::Layer(0) => {
                push(&mut runs, MapRun::raw(start, run.len));
                continue;
            }
            RunSrc::Layer(d) => d,
        };
        // Depth `d` is layer `d - 1` of the base chain (or the remote bottom after them).
        match (chain.layers.get(depth - 1), &remote) {
            (Some(l), _) if l.bitmap.is_some() => {
                push(&mut runs, MapRun::layer(start, run.len, depth as u32, true));
            }
            (Some(l), _) => push_file(&mut runs, &l.data, l.size, depth as u32, start, end)
                .map_err(|e| {
                    Error::io("map base", e)
                        .with_offset(start)
                        .with_path(&l.path)
                })?,
            (None, Some(r)) => r.push(&mut runs, depth as u32, start, end),
            (None, None) => push(&mut runs, MapRun::absent(start, run.len)),
        }
    }
    Ok(runs)
}

/// The runs as `qemu-img map --output=json` prints them, byte for byte: one object per line,
/// `[` before the first and `]` after the last, a newline at the end.
pub fn map_json(runs: &[MapRun]) -> String {
    let mut out = String::from("[");
    for (i, r) in runs.iter().enumerate() {
        if i > 0 {
            out.push_str(",\n");
        }
        out.push_str(&format!(
            "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
            r.start, r.length, r.depth, r.present, r.zero, r.data, r.compressed
        ));
        if let Some(o) = r.offset {
            out.push_str(&format!(", \"offset\": {o}"));
        }
        out.push('}');
    }
    out.push_str("]\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_matches_qemu_layout() {
        let runs = vec![MapRun::base(0, 65536, false), MapRun::absent(65536, 512)];
        assert_eq!(
            map_json(&runs),
            "[{ \"start\": 0, \"length\": 65536, \"depth\": 1, \"present\": true, \"zero\": true, \"data\": false, \"compressed\": false, \"offset\": 0},\n\
             { \"start\": 65536, \"length\": 512, \"depth\": 0, \"present\": false, \"zero\": true, \"data\": false, \"compressed\": false}]\n"
        );
        let back: Vec<MapRun> = serde_json::from_str(&map_json(&runs)).unwrap();
        assert_eq!(back, runs);
        assert_eq!(map_json(&[]), "[]\n");
    }

    #[test]
    fn adjacent_runs_merge() {
        let mut runs = Vec::new();
        push(&mut runs, MapRun::raw(0, 512));
        push(&mut runs, MapRun::raw(512, 512));
        push(&mut runs, MapRun::base(1024, 512, true));
        push(&mut runs, MapRun::absent(1536, 512));
        push(&mut runs, MapRun::absent(2048, 0));
        push(&mut runs, MapRun::absent(2048, 512));
        assert_eq!(
            runs,
            vec![
                MapRun::raw(0, 1024),
                MapRun::base(1024, 512, true),
                MapRun::absent(1536, 1024)
            ]
        );
    }
}
