//! `addcow`: NBD daemon and image tools for add-cow overlays.

fn main() {
    eprintln!("addcow: not yet implemented");
    std::process::exit(1);
}
