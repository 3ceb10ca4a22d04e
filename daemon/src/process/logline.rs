//! One log record, one line: a writer for the log that escapes every line break inside a
//! record (`\n` → `\\n`, `\r` → `\\r`), so that a name a client chose (an export, a method, a
//! path) can never start a forged line in the log, whichever way it was formatted.

use std::io::{self, Write};

/// Wraps the log's writer (the formatter writes each record with one `write_all`, ending in
/// its newline; see [`escape_record`]).
#[derive(Debug)]
pub struct OneLine<W: Write>(pub W);

impl<W: Write> Write for OneLine<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_all(&escape_record(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// `record` with every `\n` but a final one, and every `\r`, written as an escape.
pub fn escape_record(record: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    let (body, end) = match record.strip_suffix(b"\n") {
        Some(b) => (b, &b"\n"[..]),
        None => (record, &b""[..]),
    };
    if !body.iter().any(|&b| b == b'\n' || b == b'\r') {
        return record.into();
    }
    let mut out = Vec::with_capacity(record.len() + 16);
    for &b in body {
        match b {
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b => out.push(b),
        }
    }
    out.extend_from_slice(end);
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inner_line_breaks_are_escaped() {
        assert_eq!(&*escape_record(b"a b\n"), b"a b\n");
        assert_eq!(&*escape_record(b"a\nFORGED x\n"), b"a\\nFORGED x\n");
        assert_eq!(&*escape_record(b"a\r\nb"), b"a\\r\\nb");
        let mut w = OneLine(Vec::new());
        w.write_all(b"x=\"1\n2\"\n").unwrap();
        assert_eq!(w.0, b"x=\"1\\n2\"\n");
    }
}
