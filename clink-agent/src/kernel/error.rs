//! Why a kernel data path cannot load, attach or be inspected: each variant says what to fix.

use std::{io, path::PathBuf};

use aya::{maps::MapError, pin::PinError, programs::ProgramError};

use super::host::BPFFS_ROOT;

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error(
        "this clink-agent was built without its eBPF programs (AYA_BUILD_SKIP); rebuild it \
         after `cargo xtask setup`"
    )]
    NotBuilt,
    #[error("loading eBPF programs needs root (or CAP_SYS_ADMIN, or CAP_BPF and CAP_NET_ADMIN)")]
    NotPrivileged,
    #[error("{} is not on a bpf filesystem; mount one with `mount -t bpf bpf <dir>`", path.display())]
    NotBpffs { path: PathBuf },
    #[error("the kernel does not support {0}")]
    Unsupported(&'static str),
    #[error(
        "another clink-agent is using pin directory {} (lock {} is held); give each agent its \
         own --bpf-pin-dir and --cgroup",
        pin_dir.display(),
        lock.display()
    )]
    InUse { pin_dir: PathBuf, lock: PathBuf },
    #[error("cannot lock {}: {source}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "no cgroup v2 file system is mounted here (none in /proc/self/mountinfo; note that \
         `ip netns exec` gives its command a /sys without it: use `nsenter --net=...`)"
    )]
    NoCgroup2,
    #[error("{} is not a cgroup v2 directory", path.display())]
    NotCgroup2 { path: PathBuf },
    #[error("cannot use cgroup {}: {source}", path.display())]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("bpffs is not mounted at {BPFFS_ROOT} and mounting it failed: {source}")]
    BpffsMount {
        #[source]
        source: nix::Error,
    },
    #[error("cannot inspect {}: {source}", path.display())]
    Statfs {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot create pin directory {}: {source}", path.display())]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot parse the embedded eBPF object or create its maps: {0}")]
    Object(#[source] aya::EbpfError),
    #[error("the eBPF object has no program {0}")]
    MissingProgram(&'static str),
    #[error("the eBPF object has no map {0}")]
    MissingMap(&'static str),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("cannot pin {}: {source}", path.display())]
    Pin {
        path: PathBuf,
        #[source]
        source: PinError,
    },
    #[error("cannot inspect {}: {source}", path.display())]
    Inspect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove {}: {source}", path.display())]
    Unpin {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot duplicate a map's file descriptor: {source}")]
    Fd {
        #[source]
        source: io::Error,
    },
    #[error("probing kernel support for {what}: {source}")]
    Probe {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}
