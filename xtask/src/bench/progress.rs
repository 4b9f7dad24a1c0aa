//! The progress line: what runs, how far the run is, and about how long it has left.

use std::io::Write as _;
use std::time::{Duration, Instant};

/// Shows what runs: one line per measurement, with its result once it is there.
pub struct Progress {
    total: usize,
    done: usize,
    started: Instant,
}

impl Progress {
    pub fn new(total: usize) -> Self {
        Self {
            total,
            done: 0,
            started: Instant::now(),
        }
    }

    pub fn begin(&mut self, what: &str) {
        let elapsed = self.started.elapsed();
        let left = if self.done == 0 {
            String::new()
        } else {
            let per = elapsed / self.done as u32;
            format!(", ~{} left", minutes(per * (self.total - self.done) as u32))
        };
        eprint!(
            "[{:>3}/{} {}{left}] {what} … ",
            self.done + 1,
            self.total,
            minutes(elapsed)
        );
        let _ = std::io::stderr().flush();
    }

    pub fn end(&mut self, result: &str) {
        self.done += 1;
        eprintln!("{result}");
    }
}

pub fn minutes(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}m{:02}s", s / 60, s % 60)
}
