//! cgroup v2 directories of the test bed's own: where a test runs an agent that attaches eBPF
//! programs, and the clients and services those programs should see. Never the machine's
//! root cgroup; removed on drop with everything still inside.

use std::ffi::OsStr;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::names;
use crate::process::wait_for;

/// How long a removed cgroup's processes get to exit before the removal gives up.
const EMPTY_TIMEOUT: Duration = Duration::from_secs(10);

/// `<cgroup2 mount>/clk-<pid>-<n>-<role>`, created by [`Cgroup::new`].
///
/// Dropping it kills every process still inside and removes the directory, also while
/// unwinding from a failed test.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    pub fn new(role: &str) -> Result<Self> {
        let path = cgroup2_root()?.join(names::unique_name(role));
        fs::create_dir(&path).with_context(|| format!("create cgroup {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A command that runs `program` in this cgroup and in network namespace `netns` (see
    /// [`command_in`]).
    pub fn command(&self, netns: &str, program: impl AsRef<OsStr>) -> Command {
        command_in(&self.path, netns, program)
    }

    /// The processes in the cgroup now.
    pub fn pids(&self) -> Result<Vec<Pid>> {
        pids(&self.path)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Err(e) = remove(&self.path) {
            eprintln!("testbed: {e:#}");
        }
    }
}

/// A command that runs `program` inside the cgroup at `cgroup` and network namespace `netns`.
///
/// A shell moves itself into the cgroup and then becomes `nsenter`, which becomes `program`:
/// one pid throughout, inside the cgroup from the start, so every socket the program opens
/// belongs to the cgroup. `nsenter --net` rather than `ip netns exec`, which also gives the
/// program a fresh /sys without the cgroup and bpf file systems that an agent attaching to
/// the cgroup needs.
pub fn command_in(cgroup: &Path, netns: &str, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", r#"echo $$ > "$0/cgroup.procs" && exec "$@""#])
        .arg(cgroup)
        .arg("nsenter")
        .arg(format!("--net=/run/netns/{netns}"))
        .arg(program);
    cmd
}

/// Kills what is left in the cgroup at `path` and removes it.
fn remove(path: &Path) -> Result<()> {
    let mut busy = None;
    wait_for(
        &format!("cgroup {} to be empty", path.display()),
        EMPTY_TIMEOUT,
        || {
            // cgroup.kill (Linux 5.14) also gets processes forked meanwhile; the loop covers
            // older kernels.
            let _ = fs::write(path.join("cgroup.kill"), "1");
            for pid in pids(path).unwrap_or_default() {
                let _ = kill(pid, Signal::SIGKILL);
            }
            match fs::remove_dir(path) {
                Ok(()) => true,
                Err(e) if e.kind() == ErrorKind::NotFound => true,
                // Busy while the killed processes are still exiting.
                Err(e) => {
                    busy = Some(e);
                    false
                }
            }
        },
    )
    .with_context(|| match busy {
        Some(e) => format!("remove cgroup {}: {e}", path.display()),
        None => format!("remove cgroup {}", path.display()),
    })
}

fn pids(cgroup: &Path) -> Result<Vec<Pid>> {
    match fs::read_to_string(cgroup.join("cgroup.procs")) {
        Ok(text) => Ok(text
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .map(Pid::from_raw)
            .collect()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("read {}/cgroup.procs", cgroup.display())),
    }
}

/// Removes test bed cgroups whose process no longer runs. Returns their paths.
pub(crate) fn remove_stale() -> Result<Vec<PathBuf>> {
    let Ok(root) = cgroup2_root() else {
        return Ok(Vec::new());
    };
    let mut removed = Vec::new();
    for entry in fs::read_dir(&root).with_context(|| format!("read {}", root.display()))? {
        let path = entry?.path();
        if path
            .file_name()
            .and_then(OsStr::to_str)
            .is_some_and(names::is_stale)
        {
            remove(&path)?;
            removed.push(path);
        }
    }
    Ok(removed)
}

/// Where cgroup v2 is mounted: `/sys/fs/cgroup` on most hosts, `/sys/fs/cgroup/unified` on
/// hybrid ones. The mount table is read with procfs, as the agent reads it; unlike the agent,
/// the test bed takes the mount point as written (test hosts mount cgroup v2 at paths that
/// need no octal escapes).
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = procfs::process::Process::myself()
        .and_then(|me| me.mountinfo())
        .context("read /proc/self/mountinfo")?;
    match cgroup2_mount(&mounts) {
        Some(path) => Ok(path),
        None => bail!("cgroup v2 is not mounted (no cgroup2 line in /proc/self/mountinfo)"),
    }
}

fn cgroup2_mount(mounts: &procfs::process::MountInfos) -> Option<PathBuf> {
    mounts
        .iter()
        .find(|m| m.fs_type == "cgroup2")
        .map(|m| m.mount_point.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{require_root, Netns};

    fn cgroup2_mount(text: &str) -> Option<PathBuf> {
        use procfs::FromBufRead as _;
        super::cgroup2_mount(&procfs::process::MountInfos::from_buf_read(text.as_bytes()).unwrap())
    }

    #[test]
    fn finds_the_cgroup2_mount_on_hybrid_and_unified_hosts() {
        let hybrid = "\
34 25 0:29 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
35 34 0:30 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw
36 34 0:31 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu";
        assert_eq!(
            cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw";
        assert_eq!(
            cgroup2_mount(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(cgroup2_mount("36 34 0:31 / /x rw - cgroup cgroup rw"), None);
    }

    #[test]
    fn commands_join_the_cgroup_then_the_namespace() {
        let cmd = command_in(Path::new("/cg/clk-1-0-x"), "clk-1-0-a", "iperf3");
        let args: Vec<_> = cmd.get_args().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(cmd.get_program(), "sh");
        assert_eq!(
            args[2..],
            [
                "/cg/clk-1-0-x",
                "nsenter",
                "--net=/run/netns/clk-1-0-a",
                "iperf3"
            ]
        );
    }

    /// The real thing: a process started in the cgroup is in it, and dropping the cgroup
    /// kills it and removes the directory.
    #[test]
    fn processes_start_inside_the_cgroup_and_die_with_it() {
        if !require_root("processes_start_inside_the_cgroup_and_die_with_it") {
            return;
        }
        let netns = Netns::new("cg").unwrap();
        let cgroup = Cgroup::new("test").unwrap();
        let path = cgroup.path().to_owned();
        let mut child = cgroup
            .command(netns.name(), "sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let pid = Pid::from_raw(child.id() as i32);
        wait_for("the child to join", Duration::from_secs(5), || {
            cgroup.pids().unwrap().contains(&pid)
        })
        .unwrap();
        drop(cgroup);
        assert!(!path.exists());
        assert!(!child.wait().unwrap().success());
    }
}
