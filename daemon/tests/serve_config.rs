//! `addcow serve --config FILE` through the real binary: the file's options and exports are
//! served, the command line overrides them, and a bad file stops the daemon with an error that
//! names the file, the line and the key.

use std::process::{Command, Stdio};

use addcow_daemon_testkit::{addcow_bin, exit_of, Control, Daemon, Fixture};
use serde_json::json;

#[test]
fn the_file_serves_its_exports_and_the_command_line_overrides_it() {
    let f = Fixture::new(1 << 20);
    let b = f.make_overlay("b");
    let c = f.make_overlay("c");
    let config = f.path("addcow.toml");
    std::fs::write(
        &config,
        format!(
            "[serve]\ncontrol = {:?}\nmax-connections = 3\n\n[[export]]\nname = \"a\"\noverlay = {:?}\n\
             read-only = true\n\n[[export]]\nname = \"b\"\noverlay = {:?}\n",
            f.path("ctl.sock"),
            f.overlay(),
            b
        ),
    )
    .unwrap();
    let export = format!("b={}", c.display());
    let d = Daemon::start(
        &f.path("nbd.sock"),
        &["--config", config.to_str().unwrap(), "--export", &export],
    );
    let mut ctl = Control::connect(&f.path("ctl.sock"));
    let list = ctl.ok("query-exports", json!({}));
    let by_name = |n: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == n)
            .unwrap_or_else(|| panic!("{n} not served: {list}"))
            .clone()
    };
    assert_eq!(by_name("a")["read_only"], true);
    assert_eq!(by_name("a")["overlay"], json!(f.overlay()));
    // The command line's b replaces the file's.
    assert_eq!(by_name("b")["overlay"], json!(c));
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    drop(ctl);
    d.stop();
}

#[test]
fn a_bad_file_is_refused_naming_the_file_the_line_and_the_key() {
    let f = Fixture::new(1 << 20);
    let config = f.path("addcow.toml");
    std::fs::write(
        &config,
        "[serve]\nsocket = \"/x.sock\"\nmax-connections = \"many\"\n",
    )
    .unwrap();
    let child = Command::new(addcow_bin())
        .args(["serve", "--config", config.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (status, stderr) = exit_of(child, "a bad --config file was accepted");
    assert_eq!(status.code(), Some(1), "{stderr}");
    let want = format!("{}:3: serve.max-connections:", config.display());
    assert!(stderr.contains(&want), "wanted {want:?} in:\n{stderr}");
    assert!(stderr.contains("many"), "{stderr}");
}
