//! Child processes that cannot outlive a test, and waits with a deadline.

use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long a child gets to exit after SIGTERM before it is killed.
const TERM_GRACE: Duration = Duration::from_secs(2);

/// Polls `f` until it returns true, or fails after `timeout` naming `what` it waited for.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(5);
    loop {
        if f() {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(pause.min(timeout.saturating_sub(start.elapsed())));
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// A child process that is stopped and reaped when the guard drops: SIGTERM first, SIGKILL
/// if it has not exited after a short grace period.
#[derive(Debug)]
pub struct ChildGuard(pub Child);

impl ChildGuard {
    /// Spawns `cmd` under a guard.
    pub fn spawn(cmd: &mut Command) -> Result<Self> {
        let child = cmd.spawn().with_context(|| format!("spawn {cmd:?}"))?;
        Ok(Self(child))
    }

    /// Stops the child now (as on drop) and returns how it ended.
    pub fn stop(mut self) -> Result<std::process::ExitStatus> {
        self.terminate()
    }

    fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        let child = &mut self.0;
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        let pid = Pid::from_raw(i32::try_from(child.id()).context("pid out of range")?);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + TERM_GRACE;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        Ok(child.wait()?)
    }
}

impl Deref for ChildGuard {
    type Target = Child;

    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for ChildGuard {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Err(e) = self.terminate() {
            eprintln!("testbed: stopping child {}: {e:#}", self.0.id());
        }
    }
}

/// Path of a workspace binary (`clink-agent`, `clink`) for tests to run.
///
/// Looks in `$CLINK_BIN_DIR` (set by `cargo xtask test`), else in the workspace's
/// `target/debug` (or `$CARGO_TARGET_DIR/debug`). Fails with a hint if the binary is not there.
pub fn bin_path(name: &str) -> Result<PathBuf> {
    let dir = match std::env::var_os("CLINK_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../target")))
            .join("debug"),
    };
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{} not found: build it first (`cargo xtask test` does), or set CLINK_BIN_DIR",
            path.display()
        );
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_for_returns_once_true() {
        let mut calls = 0;
        wait_for("third call", Duration::from_secs(5), || {
            calls += 1;
            calls == 3
        })
        .unwrap();
        assert_eq!(calls, 3);
    }

    #[test]
    fn wait_for_names_what_timed_out() {
        let err = wait_for("godot", Duration::from_millis(30), || false).unwrap_err();
        assert!(err.to_string().contains("godot"), "{err}");
    }

    #[test]
    fn child_guard_stops_and_reaps() {
        let guard = ChildGuard::spawn(Command::new("sleep").arg("60")).unwrap();
        let pid = guard.id();
        let started = Instant::now();
        drop(guard);
        assert!(
            started.elapsed() < TERM_GRACE,
            "sleep should die on SIGTERM"
        );
        // Reaped: the pid no longer names a process (not even a zombie) of ours.
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    }

    #[test]
    fn child_guard_kills_what_ignores_sigterm() {
        let guard = ChildGuard::spawn(
            Command::new("sh").args(["-c", "trap '' TERM; while :; do sleep 0.05; done"]),
        )
        .unwrap();
        // Give the shell time to install its trap.
        std::thread::sleep(Duration::from_millis(200));
        let status = guard.stop().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(Signal::SIGKILL as i32)
        );
    }
}
