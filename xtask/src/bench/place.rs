//! Where the bench runs a process: a cluster's network namespace and, for the data paths
//! that attach eBPF programs to a cgroup, a cgroup v2 directory of the bench's own.
//!
//! Such a cgroup holds one data path's agents and every client and server of that path, and
//! nothing else, so the programs the agents attach see only the bench's traffic; it is never
//! the machine's root cgroup. Dropping it kills what is still inside and removes it.

use std::ffi::OsStr;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Every cgroup and pin directory the bench makes is called `clink-bench-<pid>-<role>`.
const PREFIX: &str = "clink-bench-";

/// A network namespace, optionally with a cgroup that processes started there join.
#[derive(Clone, Debug)]
pub struct Place {
    netns: String,
    cgroup: Option<PathBuf>,
}

impl Place {
    pub fn new(netns: &str, cgroup: Option<&Cgroup>) -> Self {
        Self {
            netns: netns.to_owned(),
            cgroup: cgroup.map(|cg| cg.path().to_owned()),
        }
    }

    /// A command that runs `program` here.
    ///
    /// With a cgroup, a shell moves itself into the cgroup and then becomes `nsenter`, which
    /// becomes `program`: one pid throughout, inside the cgroup from the start, so every
    /// socket the program opens belongs to the cgroup. `nsenter --net` rather than
    /// `ip netns exec`, which also gives the program a fresh /sys without the cgroup and bpf
    /// file systems that an agent attaching to the cgroup needs.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        match &self.cgroup {
            None => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", &self.netns]).arg(program);
                cmd
            }
            Some(cgroup) => {
                let mut cmd = Command::new("sh");
                cmd.args(["-c", r#"echo $$ > "$0/cgroup.procs" && exec "$@""#])
                    .arg(cgroup)
                    .arg("nsenter")
                    .arg(format!("--net=/run/netns/{}", self.netns))
                    .arg(program);
                cmd
            }
        }
    }
}

/// A cgroup v2 directory that removes itself.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates `<cgroup2 mount>/clink-bench-<pid>-<role>`.
    pub fn create(role: &str) -> Result<Self> {
        let path = cgroup2_root()?.join(format!("{PREFIX}{}-{role}", std::process::id()));
        fs::create_dir(&path).with_context(|| format!("create cgroup {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Err(e) = remove(&self.path) {
            eprintln!("bench: {e:#}");
        }
    }
}

/// Kills what is left in the cgroup at `path` (only the bench's own processes are ever
/// there) and removes it.
fn remove(path: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        for pid in pids(path)? {
            let _ = kill(pid, Signal::SIGKILL);
        }
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(e).with_context(|| format!("remove cgroup {}", path.display()))
            }
            // Busy while the killed processes are still exiting.
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
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

/// A directory on bpffs where one agent pins its programs and maps: unique per agent, so
/// that two agents on one host never share pins. An agent removes its pins when it stops;
/// dropping this removes what one that was killed left.
#[derive(Debug)]
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    /// `/sys/fs/bpf/clink-bench-<pid>-<role>`, not created: the agent does that.
    pub fn new(role: &str) -> Self {
        Self {
            path: Path::new(BPFFS).join(format!("{PREFIX}{}-{role}", std::process::id())),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        match fs::remove_dir_all(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => eprintln!("bench: remove {}: {e}", self.path.display()),
        }
    }
}

const BPFFS: &str = "/sys/fs/bpf";

/// Removes cgroups and pin directories left by bench runs that were killed before they
/// could clean up. Returns their paths.
pub fn remove_stale() -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for root in [cgroup2_root().ok(), Some(PathBuf::from(BPFFS))]
        .into_iter()
        .flatten()
    {
        let Ok(entries) = fs::read_dir(&root) else {
            continue;
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(owner_pid) else {
                continue;
            };
            if Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            if root == Path::new(BPFFS) {
                fs::remove_dir_all(entry.path())
                    .with_context(|| format!("remove {}", entry.path().display()))?;
            } else {
                remove(&entry.path())?;
            }
            removed.push(entry.path());
        }
    }
    Ok(removed)
}

/// The pid in `clink-bench-<pid>-<role>`, if `name` has that form.
fn owner_pid(name: &str) -> Option<u32> {
    let (pid, role) = name.strip_prefix(PREFIX)?.split_once('-')?;
    (!role.is_empty()).then_some(())?;
    pid.parse().ok()
}

/// Where cgroup v2 is mounted: `/sys/fs/cgroup` on most hosts, `/sys/fs/cgroup/unified` on
/// hybrid ones.
fn cgroup2_root() -> Result<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").context("read mountinfo")?;
    match cgroup2_mount_point(&mountinfo) {
        Some(path) => Ok(path),
        None => bail!("cgroup v2 is not mounted (no cgroup2 line in /proc/self/mountinfo)"),
    }
}

/// The first cgroup2 mount point in a mountinfo text: field 5 is the mount point, the first
/// field after the lone `-` is the file system type.
fn cgroup2_mount_point(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        (fs.split_whitespace().next()? == "cgroup2").then_some(())?;
        mount.split_whitespace().nth(4).map(PathBuf::from)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_on_hybrid_and_unified_hosts() {
        let hybrid = "\
34 25 0:29 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
35 34 0:30 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw
36 34 0:31 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu";
        assert_eq!(
            cgroup2_mount_point(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw";
        assert_eq!(
            cgroup2_mount_point(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            cgroup2_mount_point("36 34 0:31 / /x rw - cgroup cgroup rw"),
            None
        );
    }

    #[test]
    fn owner_pid_reads_only_bench_names() {
        assert_eq!(owner_pid("clink-bench-1234-sockmap"), Some(1234));
        assert_eq!(owner_pid("clink-bench-1234-"), None);
        assert_eq!(owner_pid("clink-bench-x-sockmap"), None);
        assert_eq!(owner_pid("system.slice"), None);
    }

    #[test]
    fn commands_run_in_the_namespace_and_join_the_cgroup_first() {
        let plain = Place::new("clk-1-0-a", None).command("iperf3");
        assert_eq!(crate::run::show(&plain), "ip netns exec clk-1-0-a iperf3");
        let place = Place {
            netns: "clk-1-0-a".into(),
            cgroup: Some(PathBuf::from("/cg/clink-bench-1-sockmap")),
        };
        let cmd = place.command("iperf3");
        let args: Vec<_> = cmd.get_args().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(cmd.get_program(), "sh");
        assert_eq!(
            args[2..],
            [
                "/cg/clink-bench-1-sockmap",
                "nsenter",
                "--net=/run/netns/clk-1-0-a",
                "iperf3"
            ]
        );
    }

    /// The real thing: a process started in a bench cgroup is in it, and dropping the
    /// cgroup kills it and removes the directory.
    #[test]
    fn processes_start_inside_the_cgroup_and_die_with_it() {
        if !clink_testbed::require_root("the cgroup test") || cgroup2_root().is_err() {
            return;
        }
        let netns = clink_testbed::Netns::new("cg").unwrap();
        let cgroup = Cgroup::create("test").unwrap();
        let path = cgroup.path().to_owned();
        let mut child = Place::new(netns.name(), Some(&cgroup))
            .command("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let pid = Pid::from_raw(child.id() as i32);
        clink_testbed::wait_for("the child to join", Duration::from_secs(5), || {
            pids(&path).unwrap().contains(&pid)
        })
        .unwrap();
        drop(cgroup);
        assert!(!path.exists());
        let status = child.wait().unwrap();
        assert!(!status.success());
    }
}
