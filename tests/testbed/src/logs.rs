//! Reading the log files of processes a test or the bench started.

use std::fs;
use std::path::Path;

/// The text of the file at `path` from byte `offset` on; empty if it cannot be read.
pub fn read_from(path: &Path, offset: u64) -> String {
    let bytes = fs::read(path).unwrap_or_default();
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(bytes.len());
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

/// The last `n` lines of `log`, without colour.
pub fn last_lines(log: &str, n: usize) -> Vec<String> {
    let lines: Vec<_> = log.lines().map(strip_ansi).collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

/// Drops terminal colour sequences, in case a process writes them to its log file.
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ parameters... final letter
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_lines_keeps_the_tail() {
        assert_eq!(last_lines("a\nb\nc\n", 2), ["b", "c"]);
        assert_eq!(last_lines("a\n", 5), ["a"]);
    }

    #[test]
    fn strip_ansi_drops_colour() {
        assert_eq!(strip_ansi("\u{1b}[33mWARN\u{1b}[0m x"), "WARN x");
    }

    #[test]
    fn read_from_skips_what_was_read() {
        let file = tempfile::NamedTempFile::new().unwrap();
        fs::write(file.path(), "old\nnew\n").unwrap();
        assert_eq!(read_from(file.path(), 4), "new\n");
        assert_eq!(read_from(file.path(), 99), "");
    }
}
