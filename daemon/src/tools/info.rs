//! `addcow info`.

use std::path::PathBuf;
use std::process::ExitCode;

use addcow_engine::format::{bitmap_len, LayerFormat, Overlay, SECTOR_SIZE, VERSION};

use super::{fail, human_size, print_json};

/// Arguments of `addcow info`.
#[derive(clap::Args, Debug)]
pub struct InfoArgs {
    /// Print JSON (exact byte counts) instead of text.
    #[arg(long)]
    pub json: bool,
    /// Describe every layer of the backing chain, top first (as `qemu-img info
    /// --backing-chain`); with `--json`, an array with one object per layer.
    #[arg(long)]
    pub backing_chain: bool,
    /// The `.add-cow` file to describe (opened read-only, without a lock, like `qemu-img info -U`).
    #[arg(value_name = "OVERLAY")]
    pub overlay: PathBuf,
}

/// What `addcow info --json` prints.
#[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Info {
    /// The overlay as given.
    pub overlay: String,
    /// Always "add-cow".
    pub format: String,
    /// Format version (1).
    pub version: u32,
    /// Bytes the guest sees (the raw image's size).
    pub virtual_size: u64,
    /// The base path as stored in the header (`null` = no base).
    pub backing_file: Option<String>,
    /// The base path as resolved against the overlay's directory (canonical).
    pub backing_file_resolved: Option<String>,
    /// The base's size in bytes.
    pub backing_size: Option<u64>,
    /// The raw image path as stored in the header.
    pub image_file: String,
    /// The raw image path as resolved against the overlay's directory (canonical).
    pub image_file_resolved: String,
    /// Bytes of bitmap (one bit per 512-byte sector).
    pub bitmap_bytes: u64,
    /// Bytes whose sectors live in the raw image.
    pub allocated_bytes: u64,
    /// `allocated_bytes` as a percentage of `virtual_size`.
    pub allocated_percent: f64,
    /// Every bit set: the raw image is now a standalone disk.
    pub complete: bool,
    /// Non-fatal findings (see `addcow check`).
    pub warnings: Vec<String>,
    /// The dirty bitmaps in the overlay's `.bitmaps` sidecar.
    #[serde(default)]
    pub dirty_bitmaps: Vec<addcow_engine::dirty::BitmapInfo>,
}

/// One layer of `addcow info --backing-chain`.
#[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct ChainLayerInfo {
    /// Position in the chain, numbered like `qemu:allocation-depth`: 1 = the top overlay.
    pub depth: u32,
    /// The file naming the layer (canonical when it resolves).
    pub path: String,
    /// "add-cow" or "raw".
    pub format: LayerFormat,
    /// Bytes the layer presents.
    pub virtual_size: u64,
    /// An add-cow layer's raw image (canonical); `null` for a raw layer.
    pub image_file: Option<String>,
    /// The layer's base (canonical); `null` at the bottom.
    pub backing_file: Option<String>,
    /// An add-cow layer's bytes held by its own raw image; a raw layer's size.
    pub allocated_bytes: u64,
}

/// Every layer of the chain under (and including) the overlay `o`, top first.
pub fn gather_chain(o: &Overlay) -> Vec<ChainLayerInfo> {
    let layers = o.base.as_ref().map_or(&[][..], |c| &c.layers[..]);
    let remote = o.base.as_ref().and_then(|c| c.remote.as_ref());
    // The layer under layer `i` (0 = the top's base): a file layer, or the remote bottom.
    let name_of = |i: usize| -> Option<String> {
        match layers.get(i) {
            Some(l) => Some(absolute(&l.path)),
            None if i == layers.len() => remote.map(|r| r.uri.text.clone()),
            None => None,
        }
    };
    let mut out = vec![ChainLayerInfo {
        depth: 1,
        path: absolute(&o.meta_path),
        format: LayerFormat::AddCow,
        virtual_size: o.virtual_size,
        image_file: Some(absolute(&o.image_path)),
        backing_file: name_of(0),
        allocated_bytes: o.bitmap.count_set() * SECTOR_SIZE,
    }];
    for (i, l) in layers.iter().enumerate() {
        out.push(ChainLayerInfo {
            depth: i as u32 + 2,
            path: absolute(&l.path),
            format: l.format,
            virtual_size: l.size,
            image_file: l.bitmap.is_some().then(|| absolute(&l.data_path)),
            backing_file: name_of(i + 1),
            allocated_bytes: l
                .bitmap
                .as_ref()
                .map_or(l.size, |b| b.count_set() * SECTOR_SIZE),
        });
    }
    if let Some(r) = remote {
        // An NBD URI is shown as stored, never made into a path.
        out.push(ChainLayerInfo {
            depth: layers.len() as u32 + 2,
            path: r.uri.text.clone(),
            format: LayerFormat::Nbd,
            virtual_size: r.size,
            image_file: None,
            backing_file: None,
            allocated_bytes: r.size,
        });
    }
    out
}

fn print_chain(chain: &[ChainLayerInfo]) {
    for (i, l) in chain.iter().enumerate() {
        if i > 0 {
            println!();
        }
        let fmt = match l.format {
            LayerFormat::AddCow => "add-cow",
            LayerFormat::Raw => "raw",
            LayerFormat::Nbd => "raw over NBD (remote)",
        };
        println!("layer {}:        {}", l.depth, l.path);
        println!("format:         {fmt}");
        println!(
            "virtual size:   {} ({} bytes)",
            human_size(l.virtual_size),
            l.virtual_size
        );
        if let Some(img) = &l.image_file {
            println!("raw image:      {img}");
            println!(
                "allocated:      {} ({} bytes)",
                human_size(l.allocated_bytes),
                l.allocated_bytes
            );
        }
        match &l.backing_file {
            Some(b) => println!("base:           {b}"),
            None => println!("base:           none"),
        }
    }
}

/// `p` made absolute and free of `..` (canonical) when possible, else as it is.
fn absolute(p: &std::path::Path) -> String {
    std::fs::canonicalize(p)
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}

/// Gathers [`Info`] from an open overlay.
pub fn gather(overlay: &std::path::Path, o: &Overlay) -> Info {
    let allocated = o.bitmap.count_set() * SECTOR_SIZE;
    let percent = if o.virtual_size == 0 {
        100.0
    } else {
        allocated as f64 * 100.0 / o.virtual_size as f64
    };
    let lossy = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    Info {
        overlay: overlay.display().to_string(),
        format: "add-cow".into(),
        version: VERSION,
        virtual_size: o.virtual_size,
        backing_file: (!o.header.backing_file.is_empty()).then(|| lossy(&o.header.backing_file)),
        backing_file_resolved: o.base_path.as_deref().map(absolute).or_else(|| {
            // A remote base whose server did not answer: its URI, as stored.
            addcow_engine::format::paths::nbd_uri(std::path::Path::new(&lossy(
                &o.header.backing_file,
            )))
            .ok()
            .flatten()
            .map(|u| u.text)
        }),
        backing_size: o.base_size,
        image_file: lossy(&o.header.image_file),
        image_file_resolved: absolute(&o.image_path),
        bitmap_bytes: bitmap_len(o.virtual_size),
        allocated_bytes: allocated,
        allocated_percent: percent,
        complete: o.bitmap.is_full(),
        warnings: o.warnings.clone(),
        dirty_bitmaps: Vec::new(),
    }
}

/// Adds the overlay's dirty bitmaps to `info` (a sidecar that cannot be read is a warning).
fn add_bitmaps(info: &mut Info, o: &Overlay) {
    match addcow_engine::dirty::DirtySet::open(&o.meta_path, o.virtual_size, true, None) {
        Ok(set) => info.dirty_bitmaps = set.list(),
        Err(e) => info.warnings.push(format!("dirty bitmaps: {e}")),
    }
}

/// Runs `addcow info`.
pub fn run(args: InfoArgs) -> ExitCode {
    let o = match super::inspect(&args.overlay) {
        Ok(o) => o,
        // An image server that is down does not hide the overlay: described without its base
        // (size unknown), with a warning.
        Err(e) if matches!(e.kind(), addcow_engine::ErrorKind::Remote { .. }) => {
            let ro = addcow_engine::format::OpenOptions {
                read_only: true,
                no_lock: true,
                skip_base: true,
                ..Default::default()
            };
            match Overlay::open(&args.overlay, &ro) {
                Ok(mut o) => {
                    o.warnings.push(format!("remote base unreachable: {e}"));
                    o
                }
                Err(e) => return fail("info", e),
            }
        }
        Err(e) => return fail("info", e),
    };
    if args.backing_chain {
        let chain = gather_chain(&o);
        if args.json {
            return print_json("info", &chain);
        }
        print_chain(&chain);
        return ExitCode::SUCCESS;
    }
    let mut info = gather(&args.overlay, &o);
    add_bitmaps(&mut info, &o);
    if args.json {
        return print_json("info", &info);
    }
    println!("overlay:        {}", info.overlay);
    println!("format:         add-cow version {}", info.version);
    println!(
        "virtual size:   {} ({} bytes)",
        human_size(info.virtual_size),
        info.virtual_size
    );
    match (&info.backing_file, &info.backing_file_resolved) {
        (Some(stored), Some(resolved)) => {
            println!("base:           {resolved} (stored as {stored:?})");
            if let Some(s) = info.backing_size {
                println!("base size:      {} ({s} bytes)", human_size(s));
            }
        }
        _ => println!("base:           none (unwritten sectors read as zeros)"),
    }
    println!(
        "raw image:      {} (stored as {:?})",
        info.image_file_resolved, info.image_file
    );
    println!(
        "bitmap:         {} ({} bytes)",
        human_size(info.bitmap_bytes),
        info.bitmap_bytes
    );
    println!(
        "allocated:      {} ({} bytes), {:.2}% of the disk",
        human_size(info.allocated_bytes),
        info.allocated_bytes,
        info.allocated_percent
    );
    println!(
        "complete:       {}",
        if info.complete {
            "yes (the raw image is a standalone disk)"
        } else {
            "no"
        }
    );
    for b in &info.dirty_bitmaps {
        println!(
            "dirty bitmap:   {} (granularity {}, {}, {} dirty)",
            b.name,
            human_size(b.granularity),
            if b.enabled { "enabled" } else { "disabled" },
            human_size(b.dirty_bytes)
        );
    }
    for w in &info.warnings {
        println!("warning:        {w}");
    }
    ExitCode::SUCCESS
}
