//! What ends a tunneled connection besides its two ends: the agent, when the connection carried
//! no byte either way for the idle timeout, or when a change of the objects no longer allows it
//! (see `connections`, which decides). The byte pumps (`dataplane::relay`, `kernel::splice`)
//! poll [`Lifetime::ended`] next to their sockets and count what they move into it; an ending
//! is an error like a reset, so both sockets are reset and the far ends see it.
//!
//! Cost per connection: one `Lifetime` (an atomic counter, a `Notify`, the reason), allocated
//! once with the table entry; per read or write one relaxed atomic add, no timer: the idle
//! check is a sweep over the table (see `connections::ConnTable::sweep_idle`).

use std::{
    fmt, io,
    sync::{
        atomic::{AtomicU64, Ordering},
        OnceLock,
    },
    time::Duration,
};

use tokio::sync::Notify;

/// Why the agent ended an open connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    /// No byte moved either way for this long (`--idle-timeout`).
    Idle(Duration),
    /// A policy change denies it: the decision now, as `Decision` displays it.
    Denied(String),
    /// Its Import, Export or Peer was deleted or no longer names it: which.
    Removed(String),
    /// The agent shuts down and the drain timeout (`--drain-timeout`) passed.
    Shutdown,
}

impl Ending {
    /// The `reason` label of `clink_connections_terminated_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Ending::Idle(_) => "idle",
            Ending::Denied(_) => "denied",
            Ending::Removed(_) => "removed",
            Ending::Shutdown => "shutdown",
        }
    }
}

impl fmt::Display for Ending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ending::Idle(limit) => write!(
                f,
                "closed by the agent: no byte moved either way for {}s (--idle-timeout)",
                limit.as_secs_f64()
            ),
            Ending::Denied(decision) => {
                write!(f, "closed by the agent: after a policy change, {decision}")
            }
            Ending::Removed(what) => write!(f, "closed by the agent: {what}"),
            Ending::Shutdown => {
                f.write_str("closed by the agent: shutting down, and the drain timeout passed")
            }
        }
    }
}

impl std::error::Error for Ending {}

/// The agent's ending of one connection, if `error` is one (see [`Lifetime::ended`]).
pub fn ending_of(error: &io::Error) -> Option<&Ending> {
    error.get_ref()?.downcast_ref::<Ending>()
}

/// Shared by one connection's pump and its entry in the connection table.
#[derive(Default)]
pub struct Lifetime {
    /// Payload bytes moved so far, both ways together (what the idle sweep compares).
    moved: AtomicU64,
    end: Notify,
    why: OnceLock<Ending>,
}

impl Lifetime {
    /// The pump moved `n` more bytes.
    pub fn add_moved(&self, n: u64) {
        self.moved.fetch_add(n, Ordering::Relaxed);
    }

    /// Bytes moved so far.
    pub fn moved(&self) -> u64 {
        self.moved.load(Ordering::Relaxed)
    }

    /// Ends the connection for `why`; `false` if it was ended already (the first reason
    /// stands).
    pub fn end(&self, why: Ending) -> bool {
        if self.why.set(why).is_err() {
            return false;
        }
        // Stores a permit when the pump is not waiting yet: the ending is never lost.
        self.end.notify_one();
        true
    }

    /// Why the connection was ended, once it was.
    pub fn ending(&self) -> Option<&Ending> {
        self.why.get()
    }

    /// Resolves when the agent ends the connection, with the error the pump ends with
    /// ([`ending_of`] gives the reason back).
    pub async fn ended(&self) -> io::Error {
        loop {
            self.end.notified().await;
            if let Some(why) = self.why.get() {
                return io::Error::other(why.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_ending_before_the_pump_waits_is_kept_and_the_first_reason_stands() {
        let lifetime = Lifetime::default();
        lifetime.add_moved(3);
        lifetime.add_moved(4);
        assert_eq!(lifetime.moved(), 7);
        assert!(lifetime.end(Ending::Idle(Duration::from_secs(2))));
        assert!(!lifetime.end(Ending::Denied("deny".into())));
        let error = lifetime.ended().await;
        assert_eq!(
            ending_of(&error),
            Some(&Ending::Idle(Duration::from_secs(2)))
        );
        assert_eq!(
            error.to_string(),
            "closed by the agent: no byte moved either way for 2s (--idle-timeout)"
        );
        assert_eq!(ending_of(&io::Error::other("reset")), None);
        assert_eq!(ending_of(&io::ErrorKind::TimedOut.into()), None);
    }
}
