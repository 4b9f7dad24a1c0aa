//! Uniquely named network namespaces that remove themselves.

use std::ffi::OsStr;
use std::fs::File;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use nix::sched::{setns, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::names;

/// A named network namespace (`/run/netns/<name>`) with `lo` up.
///
/// Dropping it kills every process inside it and deletes it; the interfaces inside go with it.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `clk-<pid>-<n>-<role>` with a fresh `n`.
    pub fn new(role: &str) -> Result<Self> {
        Self::with_id(names::next_id(), role)
    }

    pub(crate) fn with_id(id: u32, role: &str) -> Result<Self> {
        let name = names::with_id(id, role);
        ip(["netns", "add", &name])?;
        // From here on, Drop removes the namespace even if the next step fails.
        let netns = Self { name };
        netns.ip(["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip netns exec <name> <program>`: add arguments, then spawn or run it.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `ip -n <name> <args>` and fails with its stderr if it fails.
    pub fn ip<I, S>(&self, args: I) -> Result<()>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<_> = ["-n".as_ref(), self.name.as_ref()]
            .into_iter()
            .map(OsStr::to_owned)
            .chain(args.into_iter().map(|a| a.as_ref().to_owned()))
            .collect();
        ip(args)
    }

    /// Runs `f` on a fresh thread that has joined this namespace.
    ///
    /// Sockets created by `f` belong to this namespace for their whole life, whichever thread
    /// uses them afterwards: this is how a test opens a client or server socket "inside a
    /// cluster" and then drives it from the test's own thread or runtime.
    ///
    /// # Panics
    /// If the namespace cannot be entered, and with `f`'s own panic if `f` panics.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|scope| {
            let thread = scope.spawn(move || {
                let ns = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
                // setns affects only this thread, which ends when f returns.
                setns(&ns, CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("setns into {path}: {e}"));
                f()
            });
            thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    fn pids(&self) -> Result<Vec<Pid>> {
        let out = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .stdin(Stdio::null())
            .output()
            .context("run `ip netns pids`")?;
        if !out.status.success() {
            bail!(
                "ip netns pids {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(parse_pids(&String::from_utf8_lossy(&out.stdout)))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        match self.pids() {
            Ok(pids) => {
                for pid in pids {
                    // Never ourselves, should a thread of ours still be inside.
                    if pid.as_raw() as u32 != std::process::id() {
                        let _ = kill(pid, Signal::SIGKILL);
                    }
                }
            }
            Err(e) => eprintln!("testbed: {e:#}"),
        }
        if let Err(e) = ip(["netns", "del", &self.name]) {
            eprintln!("testbed: {e:#}");
        }
    }
}

fn parse_pids(text: &str) -> Vec<Pid> {
    text.split_whitespace()
        .filter_map(|w| w.parse().ok())
        .map(Pid::from_raw)
        .collect()
}

/// Runs `ip <args>` and fails with its stderr if it fails.
pub(crate) fn ip<I, S>(args: I) -> Result<()>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new("ip");
    cmd.args(args).stdin(Stdio::null());
    let out = cmd
        .output()
        .with_context(|| format!("run {cmd:?} (is iproute2 installed?)"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Deletes namespaces left behind by test bed processes that no longer run (killed before
/// their destructors ran). Returns the names it deleted.
pub fn remove_stale_namespaces() -> Result<Vec<String>> {
    let entries = match std::fs::read_dir("/run/netns") {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).context("read /run/netns"),
    };
    let mut removed = Vec::new();
    for entry in entries {
        let name = entry.context("read /run/netns")?.file_name();
        let Some(name) = name.to_str().filter(|name| names::is_stale(name)) else {
            continue;
        };
        drop(Netns {
            name: name.to_owned(),
        });
        removed.push(name.to_owned());
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_pids_skips_noise() {
        let pids: Vec<i32> = parse_pids("12\n345\n\n")
            .into_iter()
            .map(Pid::as_raw)
            .collect();
        assert_eq!(pids, [12, 345]);
    }
}
