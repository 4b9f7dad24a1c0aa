//! Log lines that peers and local clients can cause, kept bounded. A peer chooses what it
//! sends and how often: fields built from what it sent are truncated and escaped
//! ([`Untrusted`]), so it can neither fill the log with one request nor forge a line; and
//! repeated failures of one kind from one source are rate-limited ([`LogLimiter`]), with the
//! count of lines left out on the next line let through. Metrics count every failure; the log
//! says why, for a sample of them.

use std::{
    collections::HashMap,
    fmt,
    hash::{BuildHasher as _, Hash, RandomState},
    sync::Mutex,
    time::{Duration, Instant},
};

use prometheus_client::metrics::{counter::Counter, family::Family};

use crate::metrics::LogLabels;

/// Characters of a peer-supplied value a log line shows; the rest is replaced by the
/// original length.
pub const MAX_FIELD_CHARS: usize = 128;

/// A value that came from the network, for a log field: Debug-escaped (quotes, `\n`, control
/// characters), so it stays within its field and line, and cut at [`MAX_FIELD_CHARS`]
/// characters, followed by `…(<n> bytes)` with its whole length.
pub struct Untrusted<'a>(pub &'a str);

impl fmt::Display for Untrusted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.char_indices().nth(MAX_FIELD_CHARS) {
            None => write!(f, "{:?}", self.0),
            Some((cut, _)) => write!(f, "{:?}…({} bytes)", &self.0[..cut], self.0.len()),
        }
    }
}

/// Logs a line through a [`LogLimiter`]: `limited!(limiter, reason, who, WARN, fields...,
/// "message")` logs `warn!(suppressed, fields..., "message")` if the limiter admits it. A
/// line of a level that is off does not ask the limiter (nor count as suppressed).
macro_rules! limited {
    ($limiter:expr, $reason:expr, $who:expr, $level:ident, $($arg:tt)+) => {
        if tracing::enabled!(tracing::Level::$level) {
            if let Some(admitted) = $limiter.admit($reason, $who) {
                tracing::event!(
                    tracing::Level::$level,
                    suppressed = admitted.suppressed(),
                    $($arg)+
                );
            }
        }
    };
}
pub(crate) use limited;

/// How many lines of one kind from one source the log takes per interval.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Lines per key and interval; 0: no limit.
    pub lines: u32,
    pub interval: Duration,
    /// Keys remembered at once. Past it, expired keys are forgotten; if none has expired,
    /// a new source shares one window per reason with every other new source.
    pub max_keys: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            lines: DEFAULT_LINES,
            interval: DEFAULT_INTERVAL,
            max_keys: DEFAULT_MAX_KEYS,
        }
    }
}

pub const DEFAULT_LINES: u32 = 10;
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_MAX_KEYS: usize = 1024;

/// Rate limit for log lines, per key: a static reason (what failed) and who caused it (peer
/// name, source address, Import). At most [`Limits::lines`] lines per key per
/// [`Limits::interval`]; the first line let through after some were suppressed carries their
/// count (`suppressed=<n>`), and every suppressed line counts in
/// `clink_log_lines_suppressed_total{reason}`. Memory is bounded: keys are stored as a
/// 64-bit hash (whatever the length of who), at most [`Limits::max_keys`] of them, plus one
/// shared window per reason.
pub struct LogLimiter {
    limits: Limits,
    hasher: RandomState,
    state: Mutex<State>,
    suppressed: Family<LogLabels, Counter>,
}

struct State {
    windows: HashMap<u64, Window>,
    /// Per reason, for new keys while `windows` is full.
    overflow: HashMap<&'static str, Window>,
    last_sweep: Option<Instant>,
}

#[derive(Clone, Copy, Debug)]
struct Window {
    start: Instant,
    passed: u32,
    /// Lines suppressed since the last one let through.
    suppressed: u64,
}

impl Window {
    fn new(now: Instant) -> Window {
        Window {
            start: now,
            passed: 0,
            suppressed: 0,
        }
    }

    fn admit(&mut self, limits: &Limits, now: Instant) -> Option<Admitted> {
        if now.duration_since(self.start) >= limits.interval {
            self.start = now;
            self.passed = 0;
        }
        if self.passed < limits.lines {
            self.passed += 1;
            let suppressed = std::mem::take(&mut self.suppressed);
            Some(Admitted { suppressed })
        } else {
            self.suppressed += 1;
            None
        }
    }
}

/// A line the limiter lets through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Admitted {
    suppressed: u64,
}

impl Admitted {
    /// Lines of this key left out since the last one let through, for the `suppressed` field
    /// (`None`, so no field, when there were none).
    pub fn suppressed(&self) -> Option<u64> {
        (self.suppressed > 0).then_some(self.suppressed)
    }
}

impl LogLimiter {
    /// A limiter counting what it suppresses in `suppressed` (the registry's
    /// `clink_log_lines_suppressed_total`).
    pub fn new(limits: Limits, suppressed: Family<LogLabels, Counter>) -> LogLimiter {
        LogLimiter {
            limits,
            hasher: RandomState::new(),
            state: Mutex::new(State {
                windows: HashMap::new(),
                overflow: HashMap::new(),
                last_sweep: None,
            }),
            suppressed,
        }
    }

    /// Whether to log a line for `reason` caused by `who`: `Some` to log it (with
    /// [`Admitted::suppressed`] as a field), `None` to leave it out.
    pub fn admit(&self, reason: &'static str, who: impl Hash) -> Option<Admitted> {
        self.admit_at(reason, who, Instant::now())
    }

    fn admit_at(&self, reason: &'static str, who: impl Hash, now: Instant) -> Option<Admitted> {
        if self.limits.lines == 0 {
            return Some(Admitted { suppressed: 0 });
        }
        let key = self.hasher.hash_one((reason, who));
        let admitted = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state
                .window(key, reason, &self.limits, now)
                .admit(&self.limits, now)
        };
        if admitted.is_none() {
            self.suppressed.get_or_create(&LogLabels { reason }).inc();
        }
        admitted
    }

    /// Keys remembered now (for tests of the bound).
    #[cfg(test)]
    fn keys(&self) -> usize {
        let state = self.state.lock().unwrap();
        state.windows.len() + state.overflow.len()
    }
}

impl State {
    fn window(
        &mut self,
        key: u64,
        reason: &'static str,
        limits: &Limits,
        now: Instant,
    ) -> &mut Window {
        if !self.windows.contains_key(&key) && self.windows.len() >= limits.max_keys {
            // Forget keys whose window has passed (what they suppressed since is in the
            // metric), at most once per interval: a flood of new keys does not rescan.
            let due = self
                .last_sweep
                .is_none_or(|last| now.duration_since(last) >= limits.interval);
            if due {
                self.last_sweep = Some(now);
                self.windows
                    .retain(|_, w| now.duration_since(w.start) < limits.interval);
            }
            if self.windows.len() >= limits.max_keys {
                return self
                    .overflow
                    .entry(reason)
                    .or_insert_with(|| Window::new(now));
            }
        }
        self.windows.entry(key).or_insert_with(|| Window::new(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(lines: u32, max_keys: usize) -> LogLimiter {
        LogLimiter::new(
            Limits {
                lines,
                interval: Duration::from_secs(10),
                max_keys,
            },
            Family::default(),
        )
    }

    fn suppressed_total(l: &LogLimiter, reason: &'static str) -> u64 {
        l.suppressed.get_or_create(&LogLabels { reason }).get()
    }

    #[test]
    fn untrusted_values_are_escaped_and_cut() {
        assert_eq!(Untrusted("default/svc").to_string(), "\"default/svc\"");
        assert_eq!(
            Untrusted("a\r\nfake=line \u{1b}[31m\"").to_string(),
            "\"a\\r\\nfake=line \\u{1b}[31m\\\"\""
        );
        let long = "é".repeat(20_000);
        let shown = Untrusted(&long).to_string();
        assert_eq!(
            shown,
            format!("\"{}\"…(40000 bytes)", "é".repeat(MAX_FIELD_CHARS))
        );
        let exact = "x".repeat(MAX_FIELD_CHARS);
        assert_eq!(Untrusted(&exact).to_string(), format!("\"{exact}\""));
    }

    #[test]
    fn lines_per_key_and_interval_then_the_suppressed_count() {
        let l = limiter(3, 100);
        let t0 = Instant::now();
        let admitted: Vec<_> = (0..10)
            .map(|i| l.admit_at("no-export", "peer-a", t0 + Duration::from_millis(i)))
            .collect();
        let first = Some(Admitted { suppressed: 0 });
        assert_eq!(&admitted[..3], &[first; 3]);
        assert!(admitted[3..].iter().all(Option::is_none), "{admitted:?}");
        assert_eq!(suppressed_total(&l, "no-export"), 7);
        // Another peer, another reason: keys of their own.
        assert_eq!(l.admit_at("no-export", "peer-b", t0), first);
        assert_eq!(l.admit_at("denied", "peer-a", t0), first);
        // The next interval: the first line says how many were left out, the next none.
        let later = t0 + Duration::from_secs(10);
        let next = l.admit_at("no-export", "peer-a", later).unwrap();
        assert_eq!(next.suppressed(), Some(7));
        let after = l.admit_at("no-export", "peer-a", later).unwrap();
        assert_eq!(after.suppressed(), None);
    }

    #[test]
    fn no_limit_with_zero_lines() {
        let l = limiter(0, 1);
        let t0 = Instant::now();
        for i in 0..1000 {
            let who = i.to_string();
            assert!(l.admit_at("handshake", &who, t0).is_some());
        }
        assert_eq!(l.keys(), 0);
    }

    #[test]
    fn a_flood_of_distinct_keys_stays_bounded() {
        let l = limiter(2, 64);
        let t0 = Instant::now();
        let mut logged = 0;
        for i in 0..100_000u32 {
            // Long, distinct sources: memory depends on neither their number nor length.
            let who = format!("{i:0>1000}");
            if l.admit_at("handshake", &who, t0).is_some() {
                logged += 1;
            }
        }
        // One line for each remembered key (two allowed, but each came once), then the
        // reason's shared window: two more.
        assert_eq!(logged, 64 + 2);
        assert_eq!(l.keys(), 64 + 1);
        assert_eq!(suppressed_total(&l, "handshake"), 100_000 - 66);

        // Once their windows have passed, old keys make room for new ones.
        let later = t0 + Duration::from_secs(11);
        let fresh = l.admit_at("handshake", "new-source", later).unwrap();
        assert_eq!(fresh.suppressed(), None);
        assert_eq!(l.keys(), 1 + 1);
        // More new keys in the same interval: no second sweep, no more room.
        for i in 0..1000 {
            l.admit_at("handshake", format!("again-{i}"), later);
        }
        assert!(l.keys() <= 64 + 1, "{}", l.keys());
    }
}
