//! `addcow serve --metrics`: curl reads `/metrics` over TCP and over a Unix socket, and the text
//! is checked by a strict parser of the Prometheus text exposition format (0.0.4): every line
//! is a HELP/TYPE comment or a well-formed sample of a declared family, no series twice,
//! histograms cumulative with `+Inf` equal to `_count`. The values follow what clients did.

use std::collections::{BTreeMap, HashMap};

use addcow_daemon_testkit::*;
use serde_json::json;

const MIB: u64 = 1 << 20;

/// One sample: metric name, labels (sorted), value.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A parsed exposition: the declared type of each family and every sample.
#[derive(Debug, Default)]
struct Exposition {
    types: HashMap<String, String>,
    samples: Vec<Sample>,
}

fn is_name(s: &str, colon: bool) -> bool {
    let mut chars = s.chars();
    let ok_first = |c: char| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':');
    match chars.next() {
        Some(c) if ok_first(c) => {}
        _ => return false,
    }
    chars.all(|c| ok_first(c) || c.is_ascii_digit())
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s.parse::<f64>().map_err(|_| format!("bad value {s:?}")),
    }
}

/// A label set without `le`, as sorted pairs.
type LabelKey = Vec<(String, String)>;

/// The family a sample belongs to, given the declared types.
fn family_of<'a>(name: &'a str, types: &HashMap<String, String>) -> Option<&'a str> {
    if types.contains_key(name) {
        return Some(name);
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if types.get(base).map(String::as_str) == Some("histogram") {
                return Some(base);
            }
        }
    }
    None
}

/// Parses `text` strictly; any deviation from the format is an error naming the line.
fn parse_exposition(text: &str) -> Result<Exposition, String> {
    let mut exp = Exposition::default();
    let mut seen_series: Vec<(String, BTreeMap<String, String>)> = Vec::new();
    let mut helped: Vec<String> = Vec::new();
    let mut families_with_samples: Vec<String> = Vec::new();
    if !text.ends_with('\n') {
        return Err("the exposition must end with a newline".into());
    }
    for (n, line) in text.lines().enumerate() {
        let err = |m: String| format!("line {}: {m}: {line:?}", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('#') {
            let rest = rest.strip_prefix(' ').unwrap_or(rest);
            let mut parts = rest.splitn(3, ' ');
            match parts.next() {
                Some("HELP") => {
                    let name = parts
                        .next()
                        .ok_or_else(|| err("HELP without a name".into()))?;
                    if !is_name(name, true) {
                        return Err(err(format!("bad metric name {name:?}")));
                    }
                    if helped.iter().any(|h| h == name) {
                        return Err(err("second HELP for a family".into()));
                    }
                    let help = parts.next().unwrap_or("");
                    // Only \\ and \n escapes are allowed in HELP text.
                    let mut chars = help.chars();
                    while let Some(c) = chars.next() {
                        if c == '\\' && !matches!(chars.next(), Some('\\' | 'n')) {
                            return Err(err("bad escape in HELP".into()));
                        }
                    }
                    helped.push(name.to_string());
                }
                Some("TYPE") => {
                    let name = parts
                        .next()
                        .ok_or_else(|| err("TYPE without a name".into()))?;
                    let ty = parts
                        .next()
                        .ok_or_else(|| err("TYPE without a type".into()))?;
                    if !is_name(name, true) {
                        return Err(err(format!("bad metric name {name:?}")));
                    }
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&ty) {
                        return Err(err(format!("unknown type {ty:?}")));
                    }
                    if exp.types.contains_key(name) {
                        return Err(err("second TYPE for a family".into()));
                    }
                    if families_with_samples.iter().any(|f| f == name) {
                        return Err(err("TYPE after the family's samples".into()));
                    }
                    exp.types.insert(name.to_string(), ty.to_string());
                }
                _ => {} // other comments are allowed
            }
            continue;
        }
        // name{label="value",...} value [timestamp]
        let name_end = line
            .find(['{', ' '])
            .ok_or_else(|| err("no value".into()))?;
        let name = &line[..name_end];
        if !is_name(name, true) {
            return Err(err(format!("bad metric name {name:?}")));
        }
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(r) = rest.strip_prefix('{') {
            let mut chars = r.char_indices().peekable();
            let mut consumed = None;
            loop {
                // Label name up to '=' (or the closing brace).
                let mut lname = String::new();
                loop {
                    match chars.next() {
                        Some((i, '}')) if lname.is_empty() => {
                            consumed = Some(i + 1);
                            break;
                        }
                        Some((_, '=')) => break,
                        Some((_, c)) => lname.push(c),
                        None => return Err(err("unterminated label set".into())),
                    }
                }
                if consumed.is_some() {
                    break;
                }
                if !is_name(&lname, false) {
                    return Err(err(format!("bad label name {lname:?}")));
                }
                if chars.next().map(|c| c.1) != Some('"') {
                    return Err(err("label value must be quoted".into()));
                }
                let mut value = String::new();
                loop {
                    match chars.next() {
                        Some((_, '\\')) => match chars.next() {
                            Some((_, '\\')) => value.push('\\'),
                            Some((_, '"')) => value.push('"'),
                            Some((_, 'n')) => value.push('\n'),
                            _ => return Err(err("bad escape in a label value".into())),
                        },
                        Some((_, '"')) => break,
                        Some((_, '\n')) | None => {
                            return Err(err("unterminated label value".into()))
                        }
                        Some((_, c)) => value.push(c),
                    }
                }
                if labels.insert(lname.clone(), value).is_some() {
                    return Err(err(format!("label {lname:?} twice")));
                }
                match chars.next() {
                    Some((_, ',')) => {
                        if let Some((i, '}')) = chars.peek().copied() {
                            chars.next();
                            consumed = Some(i + 1);
                            break;
                        }
                    }
                    Some((i, '}')) => {
                        consumed = Some(i + 1);
                        break;
                    }
                    _ => return Err(err("expected ',' or '}' after a label".into())),
                }
            }
            rest = &r[consumed.unwrap_or(r.len())..];
        }
        let rest = rest
            .strip_prefix(' ')
            .ok_or_else(|| err("expected one space before the value".into()))?;
        let mut fields = rest.split(' ');
        let value = parse_value(fields.next().unwrap_or("")).map_err(err)?;
        if let Some(ts) = fields.next() {
            ts.parse::<i64>()
                .map_err(|_| err(format!("bad timestamp {ts:?}")))?;
        }
        if fields.next().is_some() {
            return Err(err("trailing fields".into()));
        }
        let family = family_of(name, &exp.types)
            .ok_or_else(|| err(format!("sample of {name:?} without a TYPE before it")))?
            .to_string();
        if exp.types[&family] == "counter" && (value.is_nan() || value < 0.0) {
            return Err(err("negative or NaN counter".into()));
        }
        if !families_with_samples.contains(&family) {
            families_with_samples.push(family);
        }
        let key = (name.to_string(), labels.clone());
        if seen_series.contains(&key) {
            return Err(err("the same series twice".into()));
        }
        seen_series.push(key);
        exp.samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    // Histograms: per label set, `le` ascending, counts cumulative, +Inf == _count.
    for (family, ty) in &exp.types {
        if ty != "histogram" {
            continue;
        }
        let mut sets: BTreeMap<LabelKey, Vec<(f64, f64)>> = BTreeMap::new();
        for s in exp
            .samples
            .iter()
            .filter(|s| s.name == format!("{family}_bucket"))
        {
            let le = s
                .labels
                .get("le")
                .ok_or_else(|| format!("{family}: bucket without le"))?;
            let le = parse_value(le)?;
            let mut key: Vec<(String, String)> = s
                .labels
                .iter()
                .filter(|(k, _)| *k != "le")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            key.sort();
            sets.entry(key).or_default().push((le, s.value));
        }
        for (key, buckets) in &sets {
            for w in buckets.windows(2) {
                if w[0].0.partial_cmp(&w[1].0) != Some(std::cmp::Ordering::Less) || w[1].1 < w[0].1
                {
                    return Err(format!("{family}{key:?}: buckets not ascending/cumulative"));
                }
            }
            let last = buckets.last().ok_or("empty histogram")?;
            if last.0 != f64::INFINITY {
                return Err(format!("{family}{key:?}: no +Inf bucket"));
            }
            let count = exp
                .samples
                .iter()
                .find(|s| {
                    s.name == format!("{family}_count")
                        && s.labels
                            .iter()
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect::<Vec<_>>()
                            == *key
                })
                .ok_or_else(|| format!("{family}{key:?}: no _count"))?;
            if count.value != last.1 {
                return Err(format!("{family}{key:?}: +Inf bucket != _count"));
            }
        }
    }
    Ok(exp)
}

impl Exposition {
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
    }

    fn exports(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .samples
            .iter()
            .filter_map(|s| s.labels.get("export").cloned())
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

#[test]
fn the_strict_parser_rejects_malformed_text() {
    let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\",y=\"q\\\"\\\\\"} 3\n\
                # TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 3.5\nh_count 2\n";
    let e = parse_exposition(good).unwrap();
    assert_eq!(e.get("a_total", &[("x", "1"), ("y", "q\"\\")]), Some(3.0));
    for bad in [
        "a_total 1\n",                        // no TYPE
        "# TYPE a counter\na{x=1} 1\n",       // unquoted label
        "# TYPE a counter\na{x=\"1\"} one\n", // bad value
        "# TYPE a counter\na{x=\"1\"}  1\n",  // two spaces
        "# TYPE a counter\na 1\na 2\n",       // series twice
        "# TYPE a counter\na -1\n",           // negative counter
        "# TYPE a counter\n# TYPE a gauge\n", // TYPE twice
        "# TYPE a counter\na{1x=\"1\"} 1\n",  // bad label name
        "# TYPE a counter\na{x=\"\\q\"} 1\n", // bad escape
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n",
        "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_count 1\n", // no +Inf
        "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_count 1\n",
        "# TYPE a counter\na 1", // no final newline
        "# TYPE a kounter\na 1\n",
    ] {
        assert!(parse_exposition(bad).is_err(), "accepted: {bad:?}");
    }
}

fn curl(args: &[&str]) -> (String, String) {
    let mut all = vec!["-sS", "--fail", "-w", "\n%{content_type}"];
    all.extend_from_slice(args);
    let out = run("curl", &all);
    let (body, ct) = out.rsplit_once('\n').expect("curl output");
    (body.to_string(), ct.to_string())
}

#[test]
fn metrics_over_tcp_follow_the_clients_and_the_exports() {
    let f = Fixture::new(8 * MIB);
    let b = f.make_overlay("b");
    let control = f.path("ctl.sock");
    let d = Daemon::start(
        &f.path("nbd.sock"),
        &[
            "--metrics",
            "127.0.0.1:0",
            "--control",
            control.to_str().unwrap(),
            "--export",
            &format!("vm \"1\"={}", f.overlay().display()),
        ],
    );
    let log = d.log();
    let addr = log
        .lines()
        .find(|l| l.contains("serving metrics"))
        .and_then(|l| l.split("metrics=").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no metrics address in the log:\n{log}"))
        .to_string();
    let url = format!("http://{addr}/metrics");

    // The export name needs escaping in a label value (and percent-encoding in the URI).
    qemu_io(
        &d.uri_of("vm%20%221%22"),
        &[
            "write -P 0x41 0 1M",
            "write -P 0x42 4M 4k",
            "read -P 0x41 0 64k",
            "flush",
        ],
    );
    let mut c = Control::connect(&control);
    c.ok("export-add", serde_json::json!({"name": "b", "overlay": b}));
    // qemu-io's connection ends a moment after it saw its last reply.
    wait_until("qemu-io's connection accounted and gone", || {
        let q = c.ok("query-stats", json!({"name": "vm \"1\""}));
        q[0]["clients"] == 0 && q[0]["in_flight"] == 0
    });

    let (text, content_type) = curl(&[&url]);
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let exp = parse_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    eprintln!("{text}");
    assert_eq!(exp.exports(), ["b", "vm \"1\""]);
    let vm = "vm \"1\"";
    let w = [("export", vm), ("op", "write")];
    assert_eq!(exp.get("addcow_requests_total", &w), Some(2.0), "{text}");
    assert_eq!(
        exp.get("addcow_request_bytes_total", &w),
        Some((MIB + 4096) as f64)
    );
    assert_eq!(exp.get("addcow_request_errors_total", &w), Some(0.0));
    assert_eq!(
        exp.get("addcow_request_duration_seconds_count", &w),
        Some(2.0)
    );
    let sum = exp.get("addcow_request_duration_seconds_sum", &w).unwrap();
    assert!(sum > 0.0 && sum < 60.0, "{sum}");
    let r = [("export", vm), ("op", "read")];
    assert_eq!(exp.get("addcow_requests_total", &r), Some(1.0));
    assert_eq!(exp.get("addcow_request_bytes_total", &r), Some(65536.0));
    assert_eq!(
        exp.get("addcow_virtual_bytes", &[("export", vm)]),
        Some((8 * MIB) as f64)
    );
    assert_eq!(
        exp.get("addcow_allocated_bytes", &[("export", vm)]),
        Some((MIB + 4096) as f64)
    );
    assert_eq!(
        exp.get("addcow_allocated_bytes", &[("export", "b")]),
        Some(0.0)
    );
    assert_eq!(exp.get("addcow_clients", &[("export", vm)]), Some(0.0));
    assert_eq!(
        exp.get("addcow_requests_in_flight", &[("export", vm)]),
        Some(0.0)
    );
    assert!(exp.get("addcow_commits_total", &[("export", vm)]).unwrap() >= 1.0);
    assert!(exp.get("addcow_bits_set_total", &[("export", vm)]).unwrap() >= 2056.0);
    assert_eq!(exp.get("addcow_exports", &[]), Some(2.0));
    assert_eq!(exp.get("addcow_writer_panics_total", &[]), Some(0.0));
    assert_eq!(exp.types["addcow_request_duration_seconds"], "histogram");
    assert_eq!(exp.types["addcow_requests_total"], "counter");

    // A client connected shows; a deleted export's series are gone.
    let client = HoldingClient::start(&d.uri_of("b"));
    wait_until("the client's first read", || {
        c.ok("query-stats", json!({"name": "b"}))[0]["ops"]["read"]["requests"] != 0
    });
    let (text, _) = curl(&[&url]);
    let exp = parse_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(exp.get("addcow_clients", &[("export", "b")]), Some(1.0));
    assert!(
        exp.get("addcow_requests_total", &[("export", "b"), ("op", "read")])
            .unwrap()
            >= 1.0
    );
    c.ok("export-del", json!({"name": "b", "mode": "hard"}));
    drop(client);
    let (text, _) = curl(&[&url]);
    let exp = parse_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(exp.exports(), [vm]);

    // Only GET /metrics.
    let out = run_raw(
        "curl",
        &[
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{addr}/other"),
        ],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404");
    let out = run_raw(
        "curl",
        &[
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "POST",
            &url,
        ],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "405");
    d.stop();
}

#[test]
fn metrics_over_a_unix_socket() {
    let f = Fixture::new(4 * MIB);
    let msock = f.path("metrics.sock");
    let d = Daemon::start(
        &f.path("nbd.sock"),
        &[
            "--metrics",
            msock.to_str().unwrap(),
            f.overlay().to_str().unwrap(),
        ],
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&msock).unwrap().permissions().mode() & 0o777,
        0o600
    );
    qemu_io(&d.uri(), &["write -P 1 0 4k"]);
    let (text, _) = curl(&[
        "--unix-socket",
        msock.to_str().unwrap(),
        "http://localhost/metrics",
    ]);
    let exp = parse_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(exp.exports(), [""]);
    assert_eq!(
        exp.get("addcow_requests_total", &[("export", ""), ("op", "write")]),
        Some(1.0)
    );
    d.stop();
    assert!(!msock.exists(), "metrics socket file left behind");
}
