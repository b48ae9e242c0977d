//! Text other people control (message bodies, names, group names, event
//! text), made safe to print on a terminal.
//!
//! A sender must not be able to forge a line: no raw control character
//! reaches the terminal (so no ANSI escape sequence, no carriage return
//! overwriting the line, no bell), no bidirectional-override character
//! reorders what is shown, and a message spanning several lines prints its
//! continuation lines behind [`CONTINUATION`], which no message line can
//! start with (every line a sender controls is behind a prefix the client
//! writes). Escapes are visible and unambiguous: `\n`-style for the common
//! ones, `\u{…}` for the rest, and a backslash itself is shown as `\\`.

use std::fmt::Write as _;

/// What continuation lines of a multi-line message start with.
pub const CONTINUATION: &str = "    | ";

/// Whether `c` changes how text around it is laid out or read: the Unicode
/// bidirectional controls and the invisible characters that can hide them.
fn is_bidi_or_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{061C}' | '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}'
    )
}

fn escape_into(out: &mut String, c: char) {
    match c {
        '\\' => out.push_str("\\\\"),
        '\t' => out.push_str("\\t"),
        '\r' => out.push_str("\\r"),
        '\u{1b}' => out.push_str("\\e"),
        c if c.is_control() || is_bidi_or_invisible(c) => {
            let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
        }
        c => out.push(c),
    }
}

/// One line of text: every control character, newline included, escaped.
/// For names and anything that must stay on one line.
pub fn one_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c == '\n' {
            out.push_str("\\n");
        } else {
            escape_into(&mut out, c);
        }
    }
    out
}

/// A message body: control characters escaped, and each newline followed
/// by [`CONTINUATION`] so that no line of it can pass for a new message.
pub fn body(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c == '\n' {
            out.push('\n');
            out.push_str(CONTINUATION);
        } else {
            escape_into(&mut out, c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_forged_line_from_issue_14_stays_one_visible_message() {
        let attack = "ok, see you at 5\n[team] bob: the new wifi password is on https://evil.example \u{1b}[31m(verified)\u{1b}[0m";
        let shown = body(attack);
        let lines: Vec<&str> = shown.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[1].starts_with(CONTINUATION), "{shown}");
        assert!(!shown.contains('\u{1b}'));
        assert!(shown.contains("\\e[31m(verified)"), "{shown}");
        assert_eq!(one_line(attack).lines().count(), 1);
    }

    #[test]
    fn bidi_overrides_and_carriage_returns_are_visible() {
        assert_eq!(one_line("abc\u{202E}fed"), "abc\\u{202e}fed");
        assert_eq!(one_line("hi\rbye"), "hi\\rbye");
        assert_eq!(one_line("a\\u{1b}"), "a\\\\u{1b}", "a typed escape cannot pose as a real one");
        assert_eq!(one_line("café 🙂"), "café 🙂");
    }

    proptest! {
        #[test]
        fn no_control_or_bidi_character_survives(text in any::<String>()) {
            for shown in [one_line(&text), body(&text)] {
                prop_assert!(shown.chars().all(|c| c == '\n' || !(c.is_control() || is_bidi_or_invisible(c))));
            }
            prop_assert!(!one_line(&text).contains('\n'));
            for line in body(&text).lines().skip(1) {
                prop_assert!(line.starts_with(CONTINUATION));
            }
        }
    }
}
