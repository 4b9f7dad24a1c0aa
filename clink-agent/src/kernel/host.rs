//! What the host offers the kernel data paths, checked in the order an operator would fix
//! it: privileges, a cgroup v2 mount, bpffs, and the kernel's program and map types.

use std::{
    io,
    path::{Path, PathBuf},
};

use aya::{maps::MapType, programs::ProgramType};
use nix::{
    mount::{mount, MsFlags},
    sys::statfs::{statfs, BPF_FS_MAGIC, CGROUP2_SUPER_MAGIC},
};
use procfs::process::MountInfos;
use tracing::{debug, info};

use super::EbpfError;

/// Where bpffs is mounted (by us, if nobody did).
pub(super) const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// What the running kernel supports of the local-leg splice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features {
    pub sock_ops: bool,
    pub sk_msg: bool,
    pub sockhash: bool,
    pub cgroup_sock_addr: bool,
}

impl Features {
    /// Whether everything the sockmap data path needs is there.
    pub fn sockmap(&self) -> bool {
        self.missing().is_none()
    }

    /// The first thing the sockmap data path needs that the kernel lacks.
    pub fn missing(&self) -> Option<&'static str> {
        [
            (self.sock_ops, "sock_ops programs"),
            (self.sk_msg, "sk_msg programs"),
            (self.sockhash, "sockhash maps"),
            (
                self.cgroup_sock_addr,
                "cgroup sock_addr (connect4/connect6) programs",
            ),
        ]
        .into_iter()
        .find_map(|(supported, what)| (!supported).then_some(what))
    }
}

/// Probes the kernel by loading tiny programs and maps; needs the same privileges as
/// [`super::loader::load`].
pub fn feature_check() -> Result<Features, EbpfError> {
    check_privileges()?;
    let prog = |what: &'static str, ty| {
        aya::sys::is_program_supported(ty).map_err(|e| EbpfError::Probe {
            what,
            source: Box::new(e),
        })
    };
    let sockhash = aya::sys::is_map_supported(MapType::SockHash).map_err(|e| EbpfError::Probe {
        what: "sockhash maps",
        source: Box::new(e),
    })?;
    Ok(Features {
        sock_ops: prog("sock_ops programs", ProgramType::SockOps)?,
        sk_msg: prog("sk_msg programs", ProgramType::SkMsg)?,
        sockhash,
        cgroup_sock_addr: prog("cgroup sock_addr programs", ProgramType::CgroupSockAddr)?,
    })
}

/// Root, or the capabilities loading and pinning need: CAP_SYS_ADMIN alone, or CAP_BPF with
/// CAP_NET_ADMIN (sock_ops and sk_msg are networking programs).
pub fn check_privileges() -> Result<(), EbpfError> {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_BPF: u32 = 39;
    let effective = procfs::process::Process::myself()
        .and_then(|me| me.status())
        .map_or(0, |status| status.capeff);
    let has = |cap: u32| effective & (1 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_NET_ADMIN)) {
        Ok(())
    } else {
        Err(EbpfError::NotPrivileged)
    }
}

/// The mount point of the cgroup v2 file system, from `/proc/self/mountinfo`: `/sys/fs/cgroup`
/// on most hosts, `/sys/fs/cgroup/unified` on hybrid ones.
pub fn cgroup2_root() -> Result<PathBuf, EbpfError> {
    let mounts = procfs::process::Process::myself()
        .and_then(|me| me.mountinfo())
        .map_err(|e| EbpfError::Inspect {
            path: PathBuf::from("/proc/self/mountinfo"),
            source: io::Error::other(e),
        })?;
    cgroup2_mount(&mounts).ok_or(EbpfError::NoCgroup2)
}

/// The first cgroup2 mount point of a mount table.
pub(super) fn cgroup2_mount(mounts: &MountInfos) -> Option<PathBuf> {
    mounts
        .iter()
        .find(|m| m.fs_type == "cgroup2")
        .map(|m| PathBuf::from(unescape_mountinfo(&m.mount_point.to_string_lossy())))
}

/// mountinfo writes space, tab, newline and backslash in paths as `\ooo` octal escapes, and
/// procfs 0.18 hands mount points over as written (it unescapes only `/proc/mounts`).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Fails unless `path` is a directory of a cgroup v2 file system.
pub fn check_cgroup2(path: &Path) -> Result<(), EbpfError> {
    let fs = statfs(path).map_err(|errno| EbpfError::Cgroup {
        path: path.to_path_buf(),
        source: io::Error::from(errno),
    })?;
    if fs.filesystem_type() == CGROUP2_SUPER_MAGIC && path.is_dir() {
        Ok(())
    } else {
        Err(EbpfError::NotCgroup2 {
            path: path.to_path_buf(),
        })
    }
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK, whose default is far too small;
/// newer ones ignore it, so a failure here is only worth a debug line.
pub(super) fn raise_memlock_limit() {
    use nix::sys::resource::{setrlimit, Resource, RLIM_INFINITY};
    if let Err(e) = setrlimit(Resource::RLIMIT_MEMLOCK, RLIM_INFINITY, RLIM_INFINITY) {
        debug!(error = %e, "cannot raise RLIMIT_MEMLOCK");
    }
}

/// Makes sure `pin_dir` is (or will be created) on a bpffs: if its nearest existing ancestor
/// is not, and `pin_dir` is below `/sys/fs/bpf`, mounts bpffs there.
pub fn ensure_bpffs(pin_dir: &Path) -> Result<(), EbpfError> {
    let existing = pin_dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let on_bpffs = |path: &Path| {
        statfs(path)
            .map(|fs| fs.filesystem_type() == BPF_FS_MAGIC)
            .map_err(|source| EbpfError::Statfs {
                path: path.to_path_buf(),
                source,
            })
    };
    if on_bpffs(existing)? {
        return Ok(());
    }
    if !pin_dir.starts_with(BPFFS_ROOT) {
        return Err(EbpfError::NotBpffs {
            path: pin_dir.to_path_buf(),
        });
    }
    mount(
        Some("bpf"),
        BPFFS_ROOT,
        Some("bpf"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|source| EbpfError::BpffsMount { source })?;
    info!("mounted bpffs at {BPFFS_ROOT}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use procfs::FromBufRead as _;

    use super::*;

    fn mounts(text: &str) -> MountInfos {
        MountInfos::from_buf_read(text.as_bytes()).unwrap()
    }

    #[test]
    fn cgroup2_mount_point_from_mountinfo() {
        let hybrid = "24 1 0:22 / /sys rw - sysfs sysfs rw\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(&mounts(hybrid)),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let optional = "35 24 0:30 / /my\\040cgroups rw shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(&mounts(optional)),
            Some(PathBuf::from("/my cgroups"))
        );
        assert_eq!(
            cgroup2_mount(&mounts("24 1 0:22 / /sys rw - sysfs sysfs rw\n")),
            None
        );
    }
}
