//! The configuration file of `addcow serve` (`--config FILE`, TOML), merged into the command
//! line before [`super::config::DaemonConfig`] checks it.
//!
//! ```toml
//! [serve]                       # keys: the long option names of `addcow serve`
//! socket = "/run/addcow/nbd.sock"
//! control = "/run/addcow/control.sock"
//! allow-dir = ["/var/lib/addcow/images"]   # a repeatable option takes a list
//! state = "/var/lib/addcow/state.json"
//! copy-on-read = true                      # a flag: true (false is the same as leaving it out)
//!
//! [[export]]                    # keys: export-add's parameters, in kebab-case or as export-add spells them
//! name = "vm1"
//! overlay = "/var/lib/addcow/images/vm1.add-cow"
//! read-only = false
//! type = "nbd"                  # or "vhost-user-blk", with addr, num-queues, serial
//! ```
//!
//! The rules:
//! * The accepted `[serve]` keys are read from the clap definition of [`ServeArgs`]: every
//!   option with a long name except `config` itself (no nesting) and `help`/`version`; a new
//!   option is accepted in the file with no code here. Unknown keys and tables are errors.
//! * The command line overrides the file, key by key: an option given on the command line
//!   replaces the file's value, a list included (`--allow-dir` on the command line drops the
//!   file's `allow-dir`). A flag set to `true` in the file cannot be turned off on the command
//!   line (clap flags have no `--no-`); edit the file.
//! * `[[export]]` tables are exports as if given on the command line (served with the command
//!   line's trust, not held to `allow-dir`), checked against export-add's own parameter
//!   structure, so an option export-add learns is accepted here too. A command-line export
//!   (`OVERLAY`, `--export`) replaces a file export of the same name.
//! * There is no implicit default file: `addcow serve` reads a file only when `--config`
//!   names one (the packaged unit passes `--config /etc/addcow/addcow.toml`), so a
//!   hand-started daemon on a host with the package installed never picks up the service's
//!   sockets and exports by surprise.
//! * Every error names the file, the line and the key.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgAction, Args, FromArgMatches};
use serde_json::{Map, Value};
use toml::Spanned;

use super::ServeArgs;
use crate::host::control::methods::check_export_params;

/// A configuration file that could not be used: where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigFileError {
    /// The file.
    pub file: PathBuf,
    /// The line (1-based) of the offending key or value; 0 when the file could not be read.
    pub line: usize,
    /// The key (`serve.socket`, `export[2].overlay`), when the error is about one.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}", self.line)?;
        }
        if let Some(k) = &self.key {
            write!(f, ": {k}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigFileError {}

type Table = BTreeMap<Spanned<String>, Spanned<toml::Value>>;

/// The file's shape: a `[serve]` table and `[[export]]` tables, nothing else.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    serve: Table,
    #[serde(default)]
    export: Vec<Spanned<Table>>,
}

/// The `clap::Command` of `addcow serve` (what the file's `[serve]` keys are checked against).
fn serve_command() -> clap::Command {
    ServeArgs::augment_args(clap::Command::new("serve").no_binary_name(false))
}

/// `args` (clap's reading of `cli`, the words after `serve`) with the file that `--config`
/// names merged under it. Without `--config`, `args` unchanged.
pub fn merge(args: ServeArgs, cli: &[OsString]) -> Result<ServeArgs, ConfigFileError> {
    let Some(path) = args.config.clone() else {
        return Ok(args);
    };
    let text = std::fs::read_to_string(&path).map_err(|e| ConfigFileError {
        file: path.clone(),
        line: 0,
        key: None,
        message: format!("cannot read it: {e}"),
    })?;
    merge_text(&path, &text, cli)
}

/// [`merge`] of the file `path` holding `text`.
pub fn merge_text(path: &Path, text: &str, cli: &[OsString]) -> Result<ServeArgs, ConfigFileError> {
    let err = |offset: Option<usize>, key: Option<String>, message: String| ConfigFileError {
        file: path.to_path_buf(),
        line: offset.map_or(0, |o| line_of(text, o)),
        key,
        message,
    };
    let file: File = toml::from_str(text).map_err(|e| {
        err(
            e.span().map(|s| s.start),
            None,
            e.message().trim().to_string(),
        )
    })?;
    let cmd = serve_command();
    let mut argv: Vec<OsString> = vec!["serve".into()];
    argv.extend(cli.iter().cloned());
    let given = cmd
        .clone()
        .try_get_matches_from(&argv)
        .map_err(|e| ConfigFileError {
            file: path.to_path_buf(),
            line: 0,
            key: None,
            message: format!("command line: {}", e.render()),
        })?;

    // The file's [serve] keys as command-line words, for the options the command line leaves.
    let mut words: Vec<OsString> = Vec::new();
    for (key, value) in &file.serve {
        let name = key.get_ref().as_str();
        let at = Some(key.span().start);
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(name) && !matches!(name, "config" | "help" | "version"))
            .ok_or_else(|| {
                err(
                    at,
                    Some(format!("serve.{name}")),
                    "unknown key (the keys are the long options of `addcow serve`; exports go \
                     in [[export]] tables)"
                        .into(),
                )
            })?;
        if given.value_source(arg.get_id().as_str()) == Some(ValueSource::CommandLine) {
            continue;
        }
        let key_err = |m: String| err(Some(value.span().start), Some(format!("serve.{name}")), m);
        let mut mine = Vec::new();
        let flag = matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::Count);
        let list = matches!(arg.get_action(), ArgAction::Append);
        match value.get_ref() {
            toml::Value::Boolean(b) if flag => {
                if *b {
                    mine.push(OsString::from(format!("--{name}")));
                }
            }
            _ if flag => return Err(key_err("expected true or false".into())),
            toml::Value::Array(items) if list => {
                for item in items {
                    mine.push(word(name, item).map_err(&key_err)?);
                }
            }
            toml::Value::Array(_) => {
                return Err(key_err("takes one value, not a list".into()));
            }
            v => mine.push(word(name, v).map_err(&key_err)?),
        }
        // Checked alone, so that clap's complaint is pinned to this key.
        let mut alone: Vec<OsString> = vec!["serve".into()];
        alone.extend(mine.iter().cloned());
        if let Err(e) = cmd.clone().try_get_matches_from(&alone) {
            return Err(key_err(clap_message(&e)));
        }
        words.extend(mine);
    }

    let mut all: Vec<OsString> = vec!["serve".into()];
    all.extend(words);
    all.extend(cli.iter().cloned());
    let matches = cmd
        .try_get_matches_from(&all)
        .map_err(|e| err(None, None, clap_message(&e)))?;
    let mut args =
        ServeArgs::from_arg_matches(&matches).map_err(|e| err(None, None, clap_message(&e)))?;

    for (i, table) in file.export.iter().enumerate() {
        let params = export_params(table.get_ref(), |key, offset, m| {
            err(Some(offset), Some(format!("export[{}]{key}", i + 1)), m)
        })
        .and_then(|p| {
            check_export_params(&p).map(|()| p).map_err(|m| {
                err(
                    Some(table.span().start),
                    Some(format!("export[{}]", i + 1)),
                    m,
                )
            })
        })?;
        let name = params
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if args
            .file_exports
            .iter()
            .any(|o| o.get("name").and_then(Value::as_str) == Some(name))
        {
            return Err(err(
                Some(table.span().start),
                Some(format!("export[{}].name", i + 1)),
                format!("export name {name:?} given twice"),
            ));
        }
        args.file_exports.push(params);
    }
    Ok(args)
}

/// One `[[export]]` table as export-add parameters: kebab-case keys that export-add spells with
/// an underscore (`read-only`, `copy-on-read`) are renamed, the rest passed as they are.
fn export_params<E>(
    table: &Table,
    err: impl Fn(String, usize, String) -> E,
) -> Result<Map<String, Value>, E> {
    let mut out = Map::new();
    for (key, value) in table {
        let k = match key.get_ref().as_str() {
            "read-only" => "read_only",
            "copy-on-read" => "copy_on_read",
            other => other,
        };
        let v = serde_json::to_value(value.get_ref()).map_err(|e| {
            err(
                format!(".{}", key.get_ref()),
                value.span().start,
                e.to_string(),
            )
        })?;
        if out.insert(k.to_string(), v).is_some() {
            return Err(err(
                format!(".{}", key.get_ref()),
                key.span().start,
                "given twice (in two spellings)".into(),
            ));
        }
    }
    for required in ["name", "overlay"] {
        if !out.contains_key(required) {
            return Err(err(
                String::new(),
                table.values().next().map_or(0, |v| v.span().start),
                format!("missing key {required:?}"),
            ));
        }
    }
    Ok(out)
}

/// `--NAME=VALUE` for a scalar TOML value.
fn word(name: &str, v: &toml::Value) -> Result<OsString, String> {
    let s = match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        other => {
            return Err(format!(
                "expected a string or a number, not {}",
                other.type_str()
            ))
        }
    };
    Ok(OsString::from(format!("--{name}={s}")))
}

/// clap's error without its usage lines and color.
fn clap_message(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let first = text.lines().next().unwrap_or_default();
    first.trim_start_matches("error: ").to_string()
}

/// The 1-based line of byte `offset` of `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::config::DaemonConfig;

    fn merged(text: &str, cli: &[&str]) -> Result<ServeArgs, ConfigFileError> {
        let cli: Vec<OsString> = cli.iter().map(OsString::from).collect();
        merge_text(Path::new("/etc/addcow/addcow.toml"), text, &cli)
    }

    const FILE: &str = r#"
# a comment
[serve]
socket = "/run/addcow/nbd.sock"
control = "/run/addcow/control.sock"
allow-dir = ["/srv/a", "/srv/b"]
copy-on-read = true
max-connections = 7
socket-mode = "0660"
cache = "buffered"

[[export]]
name = "vm1"
overlay = "/srv/a/vm1.add-cow"
read-only = true

[[export]]
name = "vm2"
overlay = "/srv/b/vm2.add-cow"
type = "vhost-user-blk"
addr = "/run/addcow/vm2.vhost"
num-queues = 2
"#;

    #[test]
    fn serve_keys_are_the_long_options_and_exports_are_export_add_params() {
        let a = merged(FILE, &[]).unwrap();
        assert_eq!(a.socket, Some("/run/addcow/nbd.sock".into()));
        assert_eq!(a.allow_dirs, [PathBuf::from("/srv/a"), "/srv/b".into()]);
        assert!(a.copy_on_read);
        assert_eq!(a.max_connections, 7);
        assert_eq!(a.socket_mode, 0o660);
        assert_eq!(a.file_exports.len(), 2);
        assert_eq!(a.file_exports[0]["read_only"], Value::Bool(true));
        assert_eq!(a.file_exports[1]["num-queues"], serde_json::json!(2));
        let c = DaemonConfig::try_from(a).unwrap();
        assert!(!c.demo);
        assert_eq!(c.exports.len(), 2);
        assert!(c.exports[0].read_only);
        assert_eq!(c.exports[1].params()["type"], "vhost-user-blk");
    }

    #[test]
    fn the_command_line_overrides_the_file_key_by_key() {
        let a = merged(
            FILE,
            &[
                "--socket",
                "/tmp/x.sock",
                "--allow-dir",
                "/only",
                "--export",
                "vm1=/elsewhere.add-cow",
            ],
        )
        .unwrap();
        assert_eq!(a.socket, Some("/tmp/x.sock".into()));
        assert_eq!(a.allow_dirs, [PathBuf::from("/only")]);
        // Left alone by the command line: the file's.
        assert_eq!(a.control, Some("/run/addcow/control.sock".into()));
        let c = DaemonConfig::try_from(a).unwrap();
        let vm1: Vec<_> = c.exports.iter().filter(|e| e.name == "vm1").collect();
        assert_eq!(vm1.len(), 1, "the command line's vm1 replaces the file's");
        assert_eq!(vm1[0].overlay, PathBuf::from("/elsewhere.add-cow"));
        assert!(!vm1[0].read_only);
    }

    fn refused(text: &str) -> ConfigFileError {
        merged(text, &[]).expect_err("refused")
    }

    #[test]
    fn errors_name_the_file_the_line_and_the_key() {
        let e = refused("[serve]\nsocket = \"/s\"\nno-such-option = 1\n");
        assert_eq!(
            (e.line, e.key.as_deref()),
            (3, Some("serve.no-such-option"))
        );
        assert!(
            e.to_string()
                .starts_with("/etc/addcow/addcow.toml:3: serve.no-such-option: "),
            "{e}"
        );
        let e = refused("[serve]\n\nmax-connections = \"many\"\n");
        assert_eq!(
            (e.line, e.key.as_deref()),
            (3, Some("serve.max-connections"))
        );
        assert!(e.message.contains("many"), "{e}");
        let e = refused("[serve]\nsocket = [\"/a\", \"/b\"]\n");
        assert_eq!((e.line, e.key.as_deref()), (2, Some("serve.socket")));
        let e = refused("[serve]\ncopy-on-read = \"yes\"\n");
        assert!(e.message.contains("true or false"), "{e}");
        let e = refused("[serve]\nconfig = \"/other.toml\"\n");
        assert_eq!(e.key.as_deref(), Some("serve.config"));
        let e = refused("[serve]\nsocket-mode = \"0999\"\n");
        assert_eq!((e.line, e.key.as_deref()), (2, Some("serve.socket-mode")));
        // Not TOML: the parser's line.
        let e = refused("[serve]\nsocket = \n");
        assert_eq!((e.line, e.key), (2, None));
        // A table the file does not have.
        let e = refused("[[exports]]\nname = \"a\"\n");
        assert!(e.message.contains("exports"), "{e}");
        // Exports: export-add's parameters, checked at load.
        let e = refused("\n[[export]]\nname = \"a\"\noverlay = \"/a\"\nsize = 5\n");
        assert_eq!(e.key.as_deref(), Some("export[1]"));
        assert_eq!(e.line, 2);
        assert!(e.message.contains("size"), "{e}");
        let e = refused("[[export]]\nname = \"a\"\n");
        assert!(e.message.contains("overlay"), "{e}");
        let e = refused("[[export]]\nname = \"a\"\noverlay = \"/a\"\n[[export]]\nname = \"a\"\noverlay = \"/b\"\n");
        assert_eq!((e.line, e.key.as_deref()), (4, Some("export[2].name")));
        let e = refused(
            "[[export]]\nname = \"a\"\noverlay = \"/a\"\nread-only = true\nread_only = false\n",
        );
        assert!(e.message.contains("twice"), "{e}");
    }

    /// Every long option of `addcow serve` is a key of the file: the list comes from clap.
    #[test]
    fn every_long_option_is_accepted() {
        for arg in serve_command().get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if matches!(long, "config" | "help" | "version") {
                continue;
            }
            let text = format!("[serve]\n{long} = []\n");
            let e = merged(&text, &[]).err();
            // Known key: whatever the complaint, it is not "unknown key".
            assert!(
                e.as_ref()
                    .is_none_or(|e| !e.message.contains("unknown key")),
                "{long}: {e:?}"
            );
        }
    }
}
