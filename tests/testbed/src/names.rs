//! Names of what the test bed makes: `clk-<pid>-<n>-<role>`, unique on the machine, and
//! recognisable afterwards as ours, with the pid of the process that made it.

use std::sync::atomic::{AtomicU32, Ordering};

/// Every namespace, cgroup and pin directory this crate makes starts with this.
pub(crate) const PREFIX: &str = "clk-";

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A number unique within this process; with the pid it makes names unique on the machine.
pub(crate) fn next_id() -> u32 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// `clk-<pid>-<id>-<role>`.
pub(crate) fn with_id(id: u32, role: &str) -> String {
    format!("{PREFIX}{}-{id}-{role}", std::process::id())
}

/// `clk-<pid>-<n>-<role>` with a fresh `n`: a name no other call, test or test process on
/// this machine gets, for anything a test makes outside the test bed (a pin directory of a
/// loader under test, a temporary object name).
pub fn unique_name(role: &str) -> String {
    with_id(next_id(), role)
}

/// The pid in `clk-<pid>-<n>-<role>`, if `name` has that form.
pub(crate) fn owner_pid(name: &str) -> Option<u32> {
    let mut parts = name.strip_prefix(PREFIX)?.splitn(3, '-');
    let pid = parts.next()?.parse().ok()?;
    parts.next()?.parse::<u32>().ok()?;
    parts.next().filter(|role| !role.is_empty())?;
    Some(pid)
}

/// Whether `name` was made by a process that no longer runs.
pub(crate) fn is_stale(name: &str) -> bool {
    owner_pid(name).is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_reads_only_testbed_names() {
        assert_eq!(owner_pid("clk-1234-7-a"), Some(1234));
        assert_eq!(owner_pid("clk-1234-7-wan"), Some(1234));
        assert_eq!(owner_pid("clk-1234-7-peer-a"), Some(1234));
        assert_eq!(owner_pid("clk-1234-7-"), None);
        assert_eq!(owner_pid("clk-x-7-a"), None);
        assert_eq!(owner_pid("clk-1234-a"), None);
        assert_eq!(owner_pid("blue"), None);
    }

    #[test]
    fn unique_names_differ_and_are_ours() {
        let (a, b) = (unique_name("x"), unique_name("x"));
        assert_ne!(a, b);
        assert_eq!(owner_pid(&a), Some(std::process::id()));
        assert!(!is_stale(&a));
    }
}
