//! Text from a guest, made safe to show on a terminal.
//!
//! A guest writes what it likes to its serial console, and banger shows that text: `vm logs`, and
//! the end of the console quoted in an error. A hostile guest could hide escape sequences in it
//! that retitle the window, move the cursor to rewrite what was printed above, or, on some
//! terminals, answer back as if typed. Every control character but newline and tab (C0, DEL and
//! C1, ESC included) is therefore shown as a visible escape (`\x1b`, `\u{9b}`) instead of being
//! sent. Output that goes to a file or a pipe is left as it is: there it is data.

use std::borrow::Cow;

/// `text` with every control character except `\n` and `\t` made visible.
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_unsafe) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if is_unsafe(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

fn is_unsafe(c: char) -> bool {
    c.is_control() && c != '\n' && c != '\t'
}

/// Turns a byte stream arriving in chunks into printable text, keeping a UTF-8 sequence that a
/// chunk boundary split until its end arrives (invalid bytes become U+FFFD).
#[derive(Debug, Default)]
pub struct Printable {
    carry: Vec<u8>,
}

impl Printable {
    pub fn push(&mut self, chunk: &[u8]) -> String {
        self.carry.extend_from_slice(chunk);
        // Keep back at most the 3 bytes of an unfinished sequence at the end (whatever came
        // before it, invalid bytes included).
        let rest = self.carry.split_off(unfinished_tail(&self.carry));
        let text = String::from_utf8_lossy(&self.carry).into_owned();
        self.carry = rest;
        printable(&text).into_owned()
    }

    /// What is left at the end of the stream.
    pub fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&std::mem::take(&mut self.carry)).into_owned();
        printable(&text).into_owned()
    }
}

/// Where an unfinished UTF-8 sequence at the end of `bytes` starts (`bytes.len()` if none).
fn unfinished_tail(bytes: &[u8]) -> usize {
    for back in 1..=bytes.len().min(3) {
        let at = bytes.len() - back;
        let need = match bytes[at] {
            0x80..=0xBF => continue, // a continuation byte: its lead is further back
            0xC2..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF4 => 4,
            _ => return bytes.len(),
        };
        return if need > back { at } else { bytes.len() };
    }
    bytes.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences_are_shown_not_sent() {
        assert_eq!(printable("plain\ttext\n"), "plain\ttext\n");
        assert!(matches!(printable("plain"), Cow::Borrowed(_)));
        // Window title, cursor movement, a bell, a carriage return and a C1 CSI.
        assert_eq!(
            printable("\x1b]0;owned\x07\x1b[2Ak\r\u{9b}31m"),
            "\\u{1b}]0;owned\\u{7}\\u{1b}[2Ak\\r\\u{9b}31m"
        );
        assert_eq!(printable("\x7f"), "\\u{7f}");
        assert_eq!(printable("héllo ✓"), "héllo ✓");
    }

    #[test]
    fn a_stream_keeps_characters_split_across_chunks() {
        let mut p = Printable::default();
        let bytes = "ok ✓\x1b[1m".as_bytes();
        let (a, b) = bytes.split_at(5); // inside the 3-byte ✓
        let mut out = p.push(a);
        out.push_str(&p.push(b));
        out.push_str(&p.finish());
        assert_eq!(out, "ok ✓\\u{1b}[1m");
        // Invalid bytes do not stall the stream.
        let mut p = Printable::default();
        assert_eq!(p.push(b"a\xffb"), "a\u{fffd}b");
        assert_eq!(p.push(b"\xe2\x9c"), "");
        assert_eq!(p.finish(), "\u{fffd}");
        // An invalid byte earlier in a chunk does not cost a character split at its end.
        let mut p = Printable::default();
        assert_eq!(p.push(b"a\xffb\xe2\x9c"), "a\u{fffd}b");
        assert_eq!(p.push(b"\x93!"), "\u{2713}!");
        assert_eq!(p.finish(), "");
    }
}
