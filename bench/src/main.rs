//! addcow benchmark runner.

fn main() {
    eprintln!("addcow-bench: not yet implemented");
    std::process::exit(1);
}
