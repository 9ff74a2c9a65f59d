//! The worker's log: one line per event on stderr, human-readable text or
//! one JSON object per line (`log.json`), never ANSI colours.
//!
//! Every field that carries data from the wire is written through
//! [`jetinfer_schemas::Untrusted`] (escaped, bounded) where it is logged.
//! Beneath that, [`Guarded`] holds for every line, whoever logged it (the
//! NATS client, the HTTP server): a control byte still in a formatted line
//! (C0 other than the line's final `\n`, DEL, C1) is written as an escape
//! (`\xNN` in text, `\u00NN` in JSON, so each line still parses), so
//! nothing that reaches a log can drive a terminal or start a forged line.

use std::io::{self, Write};

use tracing::Subscriber;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Installs the worker's log on stderr for the whole process, filtered by
/// `RUST_LOG` (default `info`).
pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::registry()
        .with(layer(json, io::stderr).with_filter(filter))
        .init();
}

/// The worker's log format (text, or JSON with `json`) writing to `writer`
/// through [`Guarded`]: what [`init`] installs, for a test to capture.
pub fn layer<S, W>(json: bool, writer: W) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let writer = Guarded {
        inner: writer,
        json,
    };
    let text = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .with_writer(writer);
    if json {
        text.json().boxed()
    } else {
        text.boxed()
    }
}

/// A log writer that escapes the control bytes a formatted line holds.
/// The formatter hands it one whole line per write, ending in `\n`.
pub struct Guarded<W> {
    inner: W,
    /// Escape as JSON string escapes (`\u00NN`) rather than `\xNN`.
    json: bool,
}

impl<'a, W: MakeWriter<'a>> MakeWriter<'a> for Guarded<W> {
    type Writer = GuardedWriter<W::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        GuardedWriter {
            inner: self.inner.make_writer(),
            json: self.json,
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        GuardedWriter {
            inner: self.inner.make_writer_for(meta),
            json: self.json,
        }
    }
}

/// One line's writer of [`Guarded`].
pub struct GuardedWriter<W> {
    inner: W,
    json: bool,
}

impl<W: Write> Write for GuardedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let (body, end) = match buf.strip_suffix(b"\n") {
            Some(body) => (body, &b"\n"[..]),
            None => (buf, &b""[..]),
        };
        if !body.iter().any(|&b| b < 0x20 || b == 0x7f || b == 0xc2) {
            self.inner.write_all(buf)?;
            return Ok(buf.len());
        }
        let mut out = Vec::with_capacity(buf.len() + 16);
        let mut bytes = body.iter().copied().peekable();
        while let Some(b) = bytes.next() {
            // C1 controls are U+0080 to U+009F: 0xC2 then 0x80..=0x9F in UTF-8.
            let c1 = (b == 0xc2)
                .then(|| bytes.next_if(|next| (0x80..=0x9f).contains(next)))
                .flatten();
            let control = c1.or((b < 0x20 || b == 0x7f).then_some(b));
            match control {
                Some(c) if self.json => write!(out, "\\u{c:04x}")?,
                Some(c) => write!(out, "\\x{c:02x}")?,
                None => out.push(b),
            }
        }
        out.extend_from_slice(end);
        self.inner.write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guarded(json: bool, line: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut writer = GuardedWriter {
            inner: &mut out,
            json,
        };
        writer.write_all(line).unwrap();
        out
    }

    #[test]
    fn control_bytes_are_escaped_and_the_line_end_kept() {
        let line = "id=\u{1b}[2J\0\u{8}\u{7f}\u{85} é\nforged\n".as_bytes();
        assert_eq!(
            guarded(false, line),
            b"id=\\x1b[2J\\x00\\x08\\x7f\\x85 \xc3\xa9\\x0aforged\n"
        );
        assert_eq!(
            guarded(true, line),
            b"id=\\u001b[2J\\u0000\\u0008\\u007f\\u0085 \xc3\xa9\\u000aforged\n"
        );
    }

    #[test]
    fn clean_lines_pass_unchanged() {
        let line = "a clean line, ünïcode and all\n".as_bytes();
        assert_eq!(guarded(false, line), line);
        assert_eq!(guarded(true, line), line);
    }
}
