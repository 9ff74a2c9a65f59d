//! Untrusted text as it may appear in a log line or an error message: ids,
//! subjects, header values and error texts that quote what arrived. Control
//! characters (C0 such as ESC, NUL, backspace, CR and LF; DEL; C1), the
//! Unicode line and paragraph separators and the bidirectional and
//! zero-width format characters are written as `\u{..}` escapes, a
//! backslash as `\\`, and the text is cut after [`MAX_SHOWN_CHARS`]
//! characters, so what a publisher sends can neither drive a terminal, forge
//! a log line, nor flood one.

use std::fmt::{self, Write as _};

/// Most characters of an untrusted text shown; the rest is replaced by `…`.
pub const MAX_SHOWN_CHARS: usize = 256;

/// `T`'s `Display` output, escaped and bounded: use it for every tracing
/// field that carries data from the wire (`id = %Untrusted(&msg_id)`,
/// `error = %Untrusted(&err)`).
#[derive(Debug, Clone, Copy)]
pub struct Untrusted<T>(pub T);

impl<T: fmt::Display> fmt::Display for Untrusted<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_escaped(f, &self.0, MAX_SHOWN_CHARS)
    }
}

/// `text` escaped and bounded as [`Untrusted`] shows it.
pub fn escape_for_log(text: &str) -> String {
    Untrusted(text).to_string()
}

/// `text` escaped as [`Untrusted`] shows it, cut after `max_chars`
/// characters: for a short quote inside an error message.
pub fn escape_within(text: &str, max_chars: usize) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = write_escaped(&mut out, &text, max_chars);
    out
}

fn write_escaped(
    out: &mut dyn fmt::Write,
    value: &dyn fmt::Display,
    max_chars: usize,
) -> fmt::Result {
    let mut escaper = Escaper {
        out,
        left: max_chars,
        cut: false,
    };
    write!(escaper, "{value}")?;
    if escaper.cut {
        escaper.out.write_str("…")?;
    }
    Ok(())
}

/// Whether `c` is written escaped: control characters, and the format and
/// separator characters that reorder, hide or break lines of text.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{061c}' | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}'
            | '\u{2060}'..='\u{2069}' | '\u{feff}')
}

struct Escaper<'a> {
    out: &'a mut dyn fmt::Write,
    left: usize,
    cut: bool,
}

impl fmt::Write for Escaper<'_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        for c in text.chars() {
            if self.left == 0 {
                self.cut = true;
                return Ok(());
            }
            self.left -= 1;
            if c == '\\' {
                self.out.write_str("\\\\")?;
            } else if needs_escape(c) {
                write!(self.out, "\\u{{{:x}}}", c as u32)?;
            } else {
                self.out.write_char(c)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_and_format_characters_are_escaped() {
        assert_eq!(
            escape_for_log("a\u{1b}[2J\0\u{8}\r\n\t\u{7f}\u{85}\u{202e}\u{2028}b"),
            "a\\u{1b}[2J\\u{0}\\u{8}\\u{d}\\u{a}\\u{9}\\u{7f}\\u{85}\\u{202e}\\u{2028}b"
        );
        assert_eq!(escape_for_log("\\u{1b}"), "\\\\u{1b}");
        assert_eq!(escape_for_log("plain ünïcode id-1"), "plain ünïcode id-1");
    }

    #[test]
    fn a_quote_is_cut_where_asked() {
        assert_eq!(escape_within("ab\u{1b}cd", 3), "ab\\u{1b}…");
        assert_eq!(escape_within("abc", 3), "abc");
    }

    #[test]
    fn long_text_is_cut() {
        let shown = escape_for_log(&"x".repeat(60_000));
        assert_eq!(shown, format!("{}…", "x".repeat(MAX_SHOWN_CHARS)));
        let exact = "y".repeat(MAX_SHOWN_CHARS);
        assert_eq!(escape_for_log(&exact), exact);
    }

    #[test]
    fn any_display_is_escaped() {
        let err = std::io::Error::other("bad \u{1b}]0;title\u{7}");
        assert_eq!(Untrusted(&err).to_string(), "bad \\u{1b}]0;title\\u{7}");
    }
}
