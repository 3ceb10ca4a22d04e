//! `addcow create`.

use std::path::PathBuf;
use std::process::ExitCode;

use addcow_engine::format::{create_with, CreateOptions, Preallocation};

use super::{fail, human_size, parse_size};

/// Arguments of `addcow create`.
///
/// Writes the 2560-byte header and an all-clear bitmap. Paths given relative to the working
/// directory are stored relative to the overlay's directory (so the overlay keeps working when
/// its folder is moved); absolute paths are stored as given.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  addcow create -b ubuntu.img vm1.add-cow          # vm1.raw, same size as ubuntu.img\n  addcow create -b ubuntu.img -i /data/vm1.raw --size 20G vm1.add-cow\n  addcow create --size 10G scratch.add-cow         # no base: unwritten sectors read as zeros\n  addcow create -b ubuntu.img --preallocation falloc vm2.add-cow  # raw image allocated up front"
)]
pub struct CreateArgs {
    /// Base image the overlay reads unwritten sectors from (opened read-only, never written).
    /// Without it, unwritten sectors read as zeros and --size is required.
    #[arg(short = 'b', long = "base", value_name = "BASE")]
    pub base: Option<PathBuf>,
    /// Raw image that receives the writes [default: OVERLAY with its extension replaced by
    /// `.raw`]. Created sparse if it does not exist; if it exists, its size is the disk's size.
    #[arg(short = 'i', long = "image", value_name = "IMAGE")]
    pub image: Option<PathBuf>,
    /// Size of a new raw image, in bytes or with a K/M/G/T suffix (binary: 1G = 2^30); a multiple
    /// of 512 [default: the base's size].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub size: Option<u64>,
    /// Overwrite an existing overlay (still refused while another process has it open).
    #[arg(long)]
    pub force: bool,
    /// How to allocate a new raw image (qemu-img's names): `off` sparse, `falloc` fallocate
    /// it whole (no data written), `full` write zeros over it. Refused (other than `off`) when
    /// the raw image exists. The bitmap is always allocated. Not recorded in the overlay.
    #[arg(long, value_name = "MODE", default_value = "off", value_parser = |s: &str| s.parse::<Preallocation>())]
    pub preallocation: Preallocation,
    /// The `.add-cow` metadata file to create.
    #[arg(value_name = "OVERLAY")]
    pub overlay: PathBuf,
}

/// Runs `addcow create`.
pub fn run(args: CreateArgs) -> ExitCode {
    let opts = CreateOptions {
        overlay: args.overlay.clone(),
        base: args.base,
        image: args.image,
        size: args.size,
        force: args.force,
    };
    if let Err(e) = create_with(&opts, args.preallocation) {
        return fail("create", e);
    }
    // Report what was made, from the file itself.
    // The base is not opened again (an image server may be down: with --size none is needed);
    // it is named as stored.
    let report = addcow_engine::format::OpenOptions {
        read_only: true,
        no_lock: true,
        skip_base: true,
        ..Default::default()
    };
    match addcow_engine::format::Overlay::open(&args.overlay, &report) {
        Ok(o) => {
            println!(
                "Created {}: virtual size {} ({} bytes), raw image {}, base {}",
                args.overlay.display(),
                human_size(o.virtual_size),
                o.virtual_size,
                o.image_path.display(),
                if o.header.backing_file.is_empty() {
                    "none".to_string()
                } else {
                    String::from_utf8_lossy(&o.header.backing_file).into_owned()
                },
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail("create", format!("created, but reopening failed: {e}")),
    }
}
