//! Loader for the eBPF programs of the local-leg splice (DESIGN.md §6.2, §7).
//!
//! [`load`] takes the object that build.rs compiled from `clink-ebpf` and embedded here,
//! scopes it to the calling process (its network namespace and pid, see
//! `clink_common::global`), loads the programs into the kernel, attaches `clink_skmsg` to the
//! `CLINK_SOCKS` sockhash (a map attachment: it only ever sees sockets in that map) and pins
//! programs and maps under one directory, so an operator can inspect them with
//! `bpftool prog show`, `bpftool map dump pinned <dir>/map_clink_ports`, ...
//!
//! [`LoadedEbpf::attach_cgroup`] then attaches `clink_sockops`, `clink_connect4` and
//! `clink_connect6` to a cgroup v2 directory; until then no socket is touched. The
//! attachments are bpf_links that are deliberately *not* pinned: they live exactly as long as
//! the agent's process, so an agent that dies, even by SIGKILL, never leaves connects
//! redirected to a listener that is gone. Pins do outlive a crash; the next [`load`] into the
//! same directory replaces them. Dropping the [`LoadedEbpf`] (or [`LoadedEbpf::remove`])
//! detaches, unpins everything and removes the directory.
//!
//! [`inspect`] reads what is pinned, for `clink bpf`.

use std::{
    fs, io,
    net::SocketAddr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use aya::{
    maps::{HashMap, Map, MapData, MapError, MapType, PerCpuArray, SockHash},
    pin::PinError,
    programs::{
        cgroup_sock_addr::CgroupSockAddrLinkId, sock_ops::SockOpsLinkId, CgroupAttachMode,
        CgroupSockAddr, ProgramError, ProgramInfo, ProgramType, SkMsg, SockOps,
    },
    Ebpf, EbpfLoader,
};
use clink_common::{
    global, map, program, PortFlags, PortKey, Redirect, ServiceKey, ServiceTarget, SockKey,
    SKMSG_BYTES_IDX, SKMSG_FALLBACKS_IDX, SKMSG_MSGS_IDX, SKMSG_PASSED_IDX, SKMSG_RESUMES_IDX,
};
use nix::{
    mount::{mount, MsFlags},
    sys::statfs::{statfs, BPF_FS_MAGIC, CGROUP2_SUPER_MAGIC},
};
use serde::Serialize;
use tracing::{debug, info, warn};

/// Where the agent pins its programs and maps unless told otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/clusterlink";

/// Where bpffs is mounted (by us, if nobody did).
const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// Pin file names under the pin directory: `prog_` or `map_` and the object's name.
pub const PIN_PROG_SOCKOPS: &str = "prog_clink_sockops";
pub const PIN_PROG_SKMSG: &str = "prog_clink_skmsg";
pub const PIN_PROG_CONNECT4: &str = "prog_clink_connect4";
pub const PIN_PROG_CONNECT6: &str = "prog_clink_connect6";
pub const PIN_MAP_SOCKS: &str = "map_clink_socks";
pub const PIN_MAP_PORTS: &str = "map_clink_ports";
pub const PIN_MAP_SKMSG_BYTES: &str = "map_clink_skmsg_bytes";
pub const PIN_MAP_SERVICES: &str = "map_clink_services";
pub const PIN_MAP_ORIG_DST: &str = "map_clink_orig_dst";
pub const PIN_MAP_REDIRECTS: &str = "map_clink_redirects";
pub const PIN_MAP_PENDING: &str = "map_clink_pending";
pub const PIN_MAP_UNSPLICED: &str = "map_clink_unspliced";
pub const PIN_MAP_FLOWS: &str = "map_clink_flows";
pub const PIN_MAP_COOKIES: &str = "map_clink_cookies";
pub const PIN_MAP_READS: &str = "map_clink_reads";

/// Every program: its name, its pin file and its type as `bpftool prog show` names it.
pub const PROGRAM_PINS: [(&str, &str, &str); 4] = [
    (program::SOCKOPS, PIN_PROG_SOCKOPS, "sock_ops"),
    (program::SKMSG, PIN_PROG_SKMSG, "sk_msg"),
    (program::CONNECT4, PIN_PROG_CONNECT4, "cgroup_sock_addr"),
    (program::CONNECT6, PIN_PROG_CONNECT6, "cgroup_sock_addr"),
];
/// Every map: its name, its pin file and its type as `bpftool map show` names it.
pub const MAP_PINS: [(&str, &str, &str); 11] = [
    (map::SOCKS, PIN_MAP_SOCKS, "sockhash"),
    (map::PORTS, PIN_MAP_PORTS, "hash"),
    (map::SKMSG_BYTES, PIN_MAP_SKMSG_BYTES, "percpu_array"),
    (map::SERVICES, PIN_MAP_SERVICES, "hash"),
    (map::ORIG_DST, PIN_MAP_ORIG_DST, "lru_hash"),
    (map::REDIRECTS, PIN_MAP_REDIRECTS, "lru_hash"),
    (map::PENDING, PIN_MAP_PENDING, "lru_hash"),
    (map::UNSPLICED, PIN_MAP_UNSPLICED, "lru_hash"),
    (map::FLOWS, PIN_MAP_FLOWS, "lru_hash"),
    (map::COOKIES, PIN_MAP_COOKIES, "lru_hash"),
    (map::READS, PIN_MAP_READS, "lru_hash"),
];

/// The programs [`LoadedEbpf::attach_cgroup`] attaches.
const CGROUP_PROGRAMS: [&str; 3] = [program::SOCKOPS, program::CONNECT4, program::CONNECT6];

/// The `clink-ebpf` object, empty when the agent was built with `AYA_BUILD_SKIP=1`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/clink-ebpf"));

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

/// What `clink_skmsg` did, summed over all CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SkMsgCounters {
    /// Bytes redirected into a peer socket's receive queue.
    pub bytes: u64,
    /// Messages (sends) redirected.
    pub messages: u64,
    /// Bytes of spliced sockets sent through the TCP stack because the reader was behind.
    pub passed_bytes: u64,
    /// Switches of a socket from the splice to the TCP stack (reader too far behind).
    pub fallbacks: u64,
    /// Switches back to the splice once the reader had read everything.
    pub resumes: u64,
}

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

/// Whether this agent was built with its eBPF programs (not with `AYA_BUILD_SKIP=1`).
pub fn built() -> bool {
    !EBPF_OBJECT.is_empty()
}

/// Probes the kernel by loading tiny programs and maps; needs the same privileges as [`load`].
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

/// The loaded programs and maps, pinned under [`LoadedEbpf::pin_dir`] until dropped.
pub struct LoadedEbpf {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    pinned: Vec<Pin>,
    log_forwarder: Option<tokio::task::JoinHandle<()>>,
    attached: Option<Attached>,
}

/// The cgroup attachments of [`LoadedEbpf::attach_cgroup`].
struct Attached {
    cgroup: PathBuf,
    sockops: SockOpsLinkId,
    connect: Vec<(&'static str, CgroupSockAddrLinkId)>,
}

/// A pin file and its inode: a later agent that replaced the pin must not lose it when this
/// one is dropped.
struct Pin {
    path: PathBuf,
    ino: u64,
}

/// Loads the embedded programs, attaches `clink_skmsg` to `CLINK_SOCKS` and pins programs and
/// maps under `pin_dir` (created if needed; bpffs is mounted at `/sys/fs/bpf` if `pin_dir` is
/// below it and nothing is mounted there). Pins left by an agent that did not shut down
/// cleanly are replaced.
///
/// Program logs (aya-log, debug level) are forwarded to `tracing` by a task on the current
/// tokio runtime; outside a runtime they are dropped.
pub fn load(pin_dir: &Path) -> Result<LoadedEbpf, EbpfError> {
    if !built() {
        return Err(EbpfError::NotBuilt);
    }
    check_privileges()?;
    raise_memlock_limit();
    // Into the kernel first: a verifier rejection leaves nothing behind on disk.
    let ebpf = load_programs(&Scope::current())?;

    ensure_bpffs(pin_dir)?;
    create_pin_dir(pin_dir)?;
    remove_unknown_pins(pin_dir);
    // From here on, dropping `loaded` removes whatever was pinned so far, and the directory.
    let mut loaded = LoadedEbpf {
        ebpf,
        pin_dir: pin_dir.to_path_buf(),
        pinned: Vec::new(),
        log_forwarder: None,
        attached: None,
    };
    loaded.pin_all()?;
    loaded.log_forwarder = spawn_log_forwarder(&mut loaded.ebpf);
    info!(
        pin_dir = %pin_dir.display(),
        programs = ?PROGRAM_PINS.map(|(name, _, _)| name),
        maps = ?MAP_PINS.map(|(name, _, _)| name),
        "eBPF programs loaded and pinned"
    );
    Ok(loaded)
}

/// What the programs are scoped to: the network namespace and the process of the agent.
#[derive(Debug)]
struct Scope {
    netns_cookie: u64,
    tgid: u32,
    pidns_dev: u64,
    pidns_ino: u64,
}

impl Scope {
    /// The calling process. Whatever cannot be found out is left 0: no namespace filter, and
    /// no connection recognised as the agent's own (then export targets are not spliced).
    fn current() -> Scope {
        let netns_cookie = netns_cookie().unwrap_or_else(|e| {
            warn!(error = %e, "no network namespace cookie (SO_NETNS_COOKIE, Linux 5.14); \
                  the eBPF programs will see sockets of every namespace in the cgroup");
            0
        });
        let (pidns_dev, pidns_ino) = match fs::metadata("/proc/self/ns/pid") {
            // The helper compares the kernel's dev_t, not stat's encoding of it.
            Ok(meta) => {
                let dev = meta.dev();
                let kernel_dev = (libc::major(dev) as u64) << 20 | libc::minor(dev) as u64;
                (kernel_dev, meta.ino())
            }
            Err(e) => {
                warn!(error = %e, "cannot stat /proc/self/ns/pid; export targets will not be \
                      spliced");
                (0, 0)
            }
        };
        let scope = Scope {
            netns_cookie,
            tgid: std::process::id(),
            pidns_dev,
            pidns_ino,
        };
        debug!(?scope, "eBPF programs scoped");
        scope
    }
}

fn netns_cookie() -> io::Result<u64> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    crate::flow::socket_option_u64(&socket, libc::SO_NETNS_COOKIE)
}

/// Creates the maps, loads the programs and attaches `clink_skmsg` to `CLINK_SOCKS`.
fn load_programs(scope: &Scope) -> Result<Ebpf, EbpfError> {
    let log_level = ebpf_log_level();
    let mut ebpf = EbpfLoader::new()
        .override_global(aya_log::LEVEL, &log_level, false)
        .override_global(global::NETNS_COOKIE, &scope.netns_cookie, true)
        .override_global(global::AGENT_TGID, &scope.tgid, true)
        .override_global(global::PIDNS_DEV, &scope.pidns_dev, true)
        .override_global(global::PIDNS_INO, &scope.pidns_ino, true)
        .load(EBPF_OBJECT)
        .map_err(EbpfError::Object)?;

    program_mut::<SockOps>(&mut ebpf, program::SOCKOPS)?
        .load()
        .map_err(|source| program_error(program::SOCKOPS, source))?;
    for name in [program::CONNECT4, program::CONNECT6] {
        program_mut::<CgroupSockAddr>(&mut ebpf, name)?
            .load()
            .map_err(|source| program_error(name, source))?;
    }
    let socks_fd = {
        let socks: SockHash<&MapData, SockKey> = map_ref(&ebpf, map::SOCKS)?;
        socks
            .fd()
            .try_clone()
            .map_err(|source| EbpfError::Fd { source })?
    };
    let skmsg = program_mut::<SkMsg>(&mut ebpf, program::SKMSG)?;
    skmsg
        .load()
        .map_err(|source| program_error(program::SKMSG, source))?;
    skmsg
        .attach(&socks_fd)
        .map_err(|source| program_error(program::SKMSG, source))?;
    Ok(ebpf)
}

impl LoadedEbpf {
    /// The directory holding the pins.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The pinned programs and maps, in the order they were pinned.
    pub fn pinned(&self) -> impl Iterator<Item = &Path> {
        self.pinned.iter().map(|pin| pin.path.as_path())
    }

    /// Attaches `clink_sockops`, `clink_connect4` and `clink_connect6` to the cgroup v2
    /// directory `cgroup`: from now on the sockets of its processes (and of its descendants')
    /// are handled. Attaching again first detaches from the previous cgroup.
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> Result<(), EbpfError> {
        check_cgroup2(cgroup)?;
        let dir = fs::File::open(cgroup).map_err(|source| EbpfError::Cgroup {
            path: cgroup.to_path_buf(),
            source,
        })?;
        self.detach_cgroup();
        // With bpf_link (kernel >= 5.7, what aya uses) every attachment already coexists with
        // others; aya passes AllowMultiple on as a link flag, which the kernel rejects.
        let mode = CgroupAttachMode::Single;
        let sockops = program_mut::<SockOps>(&mut self.ebpf, program::SOCKOPS)?
            .attach(&dir, mode)
            .map_err(|source| program_error(program::SOCKOPS, source))?;
        // Recorded at once, so that a failure below still detaches what is attached.
        self.attached = Some(Attached {
            cgroup: cgroup.to_path_buf(),
            sockops,
            connect: Vec::new(),
        });
        for name in [program::CONNECT4, program::CONNECT6] {
            let link = program_mut::<CgroupSockAddr>(&mut self.ebpf, name)?
                .attach(&dir, mode)
                .map_err(|source| program_error(name, source))?;
            if let Some(attached) = &mut self.attached {
                attached.connect.push((name, link));
            }
        }
        info!(
            cgroup = %cgroup.display(),
            programs = ?CGROUP_PROGRAMS,
            "eBPF programs attached"
        );
        Ok(())
    }

    /// The cgroup the programs are attached to.
    pub fn cgroup(&self) -> Option<&Path> {
        self.attached.as_ref().map(|a| a.cgroup.as_path())
    }

    /// Detaches from the cgroup (a no-op when not attached). Errors only mean the link was
    /// gone already, so they are logged, not returned.
    pub fn detach_cgroup(&mut self) {
        let Some(Attached {
            cgroup,
            sockops,
            connect,
        }) = self.attached.take()
        else {
            return;
        };
        for (name, link) in connect {
            if let Err(e) = program_mut::<CgroupSockAddr>(&mut self.ebpf, name)
                .and_then(|p| p.detach(link).map_err(|source| program_error(name, source)))
            {
                warn!(error = %e, "detaching from {}", cgroup.display());
            }
        }
        if let Err(e) = program_mut::<SockOps>(&mut self.ebpf, program::SOCKOPS).and_then(|p| {
            p.detach(sockops)
                .map_err(|source| program_error(program::SOCKOPS, source))
        }) {
            warn!(error = %e, "detaching from {}", cgroup.display());
        }
        info!(cgroup = %cgroup.display(), "eBPF programs detached");
    }

    /// Sends connects to `service` to the import listener on `listener_port` instead.
    pub fn set_service(
        &mut self,
        service: SocketAddr,
        listener_port: u16,
    ) -> Result<(), EbpfError> {
        let target = ServiceTarget {
            listener_port: u32::from(listener_port),
        };
        self.services()?
            .insert(ServiceKey::new(service), target, 0)
            .map_err(|source| map_error(map::SERVICES, source))
    }

    /// Stops redirecting connects to `service`; connections already made stay as they are.
    /// Removing a service that is not there is not an error.
    pub fn remove_service(&mut self, service: SocketAddr) -> Result<(), EbpfError> {
        match self.services()?.remove(&ServiceKey::new(service)) {
            Ok(()) => Ok(()),
            Err(MapError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => {
                Ok(())
            }
            Err(source) => Err(map_error(map::SERVICES, source)),
        }
    }

    /// Lets `clink_sockops` take sockets on `port` (at the end(s) given by `flags`).
    pub fn add_port(&mut self, port: u16, flags: PortFlags) -> Result<(), EbpfError> {
        self.ports()?
            .insert(PortKey::new(port), flags, 0)
            .map_err(|source| map_error(map::PORTS, source))
    }

    /// Stops `clink_sockops` from taking new sockets on `port`; established ones stay spliced
    /// until they close. Removing a port that is not there is not an error.
    pub fn remove_port(&mut self, port: u16) -> Result<(), EbpfError> {
        match self.ports()?.remove(&PortKey::new(port)) {
            Ok(()) => Ok(()),
            Err(MapError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => {
                Ok(())
            }
            Err(source) => Err(map_error(map::PORTS, source)),
        }
    }

    /// A descriptor of the map `name`, for the agent's half of the flow control.
    pub fn map_fd(&self, name: &'static str) -> Result<std::os::fd::OwnedFd, EbpfError> {
        use std::os::fd::AsFd as _;
        let data = match self.ebpf.map(name) {
            Some(Map::LruHashMap(data) | Map::SockHash(data)) => data,
            _ => return Err(EbpfError::MissingMap(name)),
        };
        data.fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| EbpfError::Fd { source })
    }

    /// What `clink_skmsg` has redirected so far.
    pub fn skmsg_counters(&self) -> Result<SkMsgCounters, EbpfError> {
        let counters: PerCpuArray<&MapData, u64> = map_ref(&self.ebpf, map::SKMSG_BYTES)?;
        sum_counters(&counters)
    }

    /// Detaches from the cgroup, unpins programs and maps and removes the pin directory (if
    /// nothing else is left in it); the kernel frees them once the agent's own references
    /// are gone too.
    pub fn remove(mut self) -> Result<(), EbpfError> {
        self.detach_cgroup();
        self.unpin_all()
    }

    fn ports(&mut self) -> Result<HashMap<&mut MapData, PortKey, PortFlags>, EbpfError> {
        let m = self
            .ebpf
            .map_mut(map::PORTS)
            .ok_or(EbpfError::MissingMap(map::PORTS))?;
        HashMap::try_from(m).map_err(|source| map_error(map::PORTS, source))
    }

    fn services(&mut self) -> Result<HashMap<&mut MapData, ServiceKey, ServiceTarget>, EbpfError> {
        let m = self
            .ebpf
            .map_mut(map::SERVICES)
            .ok_or(EbpfError::MissingMap(map::SERVICES))?;
        HashMap::try_from(m).map_err(|source| map_error(map::SERVICES, source))
    }

    fn pin_all(&mut self) -> Result<(), EbpfError> {
        for (name, pin, _) in PROGRAM_PINS {
            let path = self.pin_dir.join(pin);
            remove_stale_pin(&path)?;
            let result = self
                .ebpf
                .program_mut(name)
                .ok_or(EbpfError::MissingProgram(name))?
                .pin(&path);
            self.record_pin(path, result)?;
        }
        for (name, pin, _) in MAP_PINS {
            let path = self.pin_dir.join(pin);
            remove_stale_pin(&path)?;
            let result = self
                .ebpf
                .map(name)
                .ok_or(EbpfError::MissingMap(name))?
                .pin(&path);
            self.record_pin(path, result)?;
        }
        Ok(())
    }

    fn record_pin(&mut self, path: PathBuf, result: Result<(), PinError>) -> Result<(), EbpfError> {
        if let Err(source) = result {
            return Err(EbpfError::Pin { path, source });
        }
        match fs::metadata(&path) {
            Ok(meta) => {
                self.pinned.push(Pin {
                    path,
                    ino: meta.ino(),
                });
                Ok(())
            }
            Err(source) => Err(EbpfError::Inspect { path, source }),
        }
    }

    /// Idempotent, so that [`Self::remove`] followed by `Drop` does no harm.
    fn unpin_all(&mut self) -> Result<(), EbpfError> {
        if let Some(task) = self.log_forwarder.take() {
            task.abort();
        }
        let mut first_error = None;
        for Pin { path, ino } in self.pinned.drain(..) {
            match fs::metadata(&path) {
                Ok(meta) if meta.ino() == ino => {}
                Ok(_) => {
                    debug!(pin = %path.display(), "pin kept: another agent replaced it");
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => {
                    first_error.get_or_insert(EbpfError::Unpin { path, source });
                    continue;
                }
            }
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    first_error.get_or_insert(EbpfError::Unpin { path, source });
                }
            }
        }
        match fs::remove_dir(&self.pin_dir) {
            Ok(()) => debug!(pin_dir = %self.pin_dir.display(), "eBPF pins removed"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty => debug!(
                pin_dir = %self.pin_dir.display(),
                "pin directory kept: it holds pins that are not ours"
            ),
            Err(source) => {
                first_error.get_or_insert(EbpfError::Unpin {
                    path: self.pin_dir.clone(),
                    source,
                });
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for LoadedEbpf {
    fn drop(&mut self) {
        self.detach_cgroup();
        if let Err(e) = self.unpin_all() {
            warn!(error = %e, "cleaning up eBPF pins");
        }
    }
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, EbpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(EbpfError::MissingProgram(name))?
        .try_into()
        .map_err(|source| program_error(name, source))
}

fn map_ref<'a, T>(ebpf: &'a Ebpf, name: &'static str) -> Result<T, EbpfError>
where
    T: TryFrom<&'a aya::maps::Map, Error = MapError>,
{
    ebpf.map(name)
        .ok_or(EbpfError::MissingMap(name))?
        .try_into()
        .map_err(|source| map_error(name, source))
}

fn program_error(name: &'static str, source: ProgramError) -> EbpfError {
    EbpfError::Program { name, source }
}

fn map_error(name: &'static str, source: MapError) -> EbpfError {
    EbpfError::Map { name, source }
}

/// Retries when an empty parent disappears under `create_dir_all`: whoever shares the parent
/// (parallel tests, another agent's cleanup) may remove it when they think it is unused.
fn create_pin_dir(pin_dir: &Path) -> Result<(), EbpfError> {
    let mut attempts = 3;
    loop {
        match fs::create_dir_all(pin_dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound && attempts > 1 => attempts -= 1,
            Err(source) => {
                return Err(EbpfError::PinDir {
                    path: pin_dir.to_path_buf(),
                    source,
                })
            }
        }
    }
}

fn remove_stale_pin(path: &Path) -> Result<(), EbpfError> {
    match fs::remove_file(path) {
        Ok(()) => {
            warn!(pin = %path.display(), "replaced a pin left by an earlier agent");
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(EbpfError::Unpin {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Root, or the capabilities loading and pinning need: CAP_SYS_ADMIN alone, or CAP_BPF with
/// CAP_NET_ADMIN (sock_ops and sk_msg are networking programs).
pub fn check_privileges() -> Result<(), EbpfError> {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_BPF: u32 = 39;
    let effective = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
            u64::from_str_radix(hex.trim(), 16).ok()
        })
        .unwrap_or(0);
    let has = |cap: u32| effective & (1 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_NET_ADMIN)) {
        Ok(())
    } else {
        Err(EbpfError::NotPrivileged)
    }
}

fn sum_counters<T: std::borrow::Borrow<MapData>>(
    counters: &PerCpuArray<T, u64>,
) -> Result<SkMsgCounters, EbpfError> {
    let sum = |index| {
        counters
            .get(&index, 0)
            .map(|per_cpu| per_cpu.iter().sum())
            .map_err(|source| map_error(map::SKMSG_BYTES, source))
    };
    Ok(SkMsgCounters {
        bytes: sum(SKMSG_BYTES_IDX)?,
        messages: sum(SKMSG_MSGS_IDX)?,
        passed_bytes: sum(SKMSG_PASSED_IDX)?,
        fallbacks: sum(SKMSG_FALLBACKS_IDX)?,
        resumes: sum(SKMSG_RESUMES_IDX)?,
    })
}

/// Removes pins of ours (`prog_clink_*`, `map_clink_*`) that this version does not make: left
/// by an older agent, they would only confuse whoever reads the directory. The ones this
/// version makes are replaced one by one when pinning.
fn remove_unknown_pins(pin_dir: &Path) {
    let Ok(entries) = fs::read_dir(pin_dir) else {
        return;
    };
    let known: Vec<&str> = PROGRAM_PINS
        .iter()
        .map(|(_, pin, _)| *pin)
        .chain(MAP_PINS.iter().map(|(_, pin, _)| *pin))
        .collect();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let ours = name.starts_with("prog_clink_") || name.starts_with("map_clink_");
        if ours && !known.contains(&name) {
            match fs::remove_file(entry.path()) {
                Ok(()) => {
                    warn!(pin = %entry.path().display(), "removed a pin left by an earlier agent")
                }
                Err(e) => {
                    warn!(pin = %entry.path().display(), error = %e, "cannot remove a stale pin")
                }
            }
        }
    }
}

/// The mount point of the cgroup v2 file system, from `/proc/self/mountinfo`: `/sys/fs/cgroup`
/// on most hosts, `/sys/fs/cgroup/unified` on hybrid ones.
pub fn cgroup2_root() -> Result<PathBuf, EbpfError> {
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").map_err(|source| EbpfError::Inspect {
            path: PathBuf::from("/proc/self/mountinfo"),
            source,
        })?;
    cgroup2_mount(&mountinfo).ok_or(EbpfError::NoCgroup2)
}

/// The first cgroup2 mount point in a mountinfo text.
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "<id> <parent> <dev> <root> <mount point> <options> [optional...] - <fs> ..."
        let (mount, fs_type) = line.split_once(" - ")?;
        if !fs_type.starts_with("cgroup2 ") {
            return None;
        }
        mount
            .split(' ')
            .nth(4)
            .map(|p| PathBuf::from(unescape_mountinfo(p)))
    })
}

/// mountinfo writes space, tab, newline and backslash in paths as `\ooo` octal escapes.
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

/// What is pinned in a pin directory, read back from the kernel: `clink bpf`.
#[derive(Debug, Serialize)]
pub struct Inspection {
    pub pin_dir: PathBuf,
    pub programs: Vec<PinnedProgram>,
    /// `CLINK_PORTS`.
    pub ports: Vec<PortEntry>,
    /// `CLINK_SERVICES`.
    pub services: Vec<ServiceEntry>,
    /// `CLINK_SOCKS`, one entry per socket.
    pub sockets: Vec<SocketEntry>,
    /// `CLINK_REDIRECTS`.
    pub redirects: Vec<RedirectEntry>,
    /// `CLINK_SKMSG_BYTES`.
    pub skmsg: SkMsgCounters,
}

#[derive(Debug, Serialize)]
pub struct PinnedProgram {
    pub name: &'static str,
    pub pin: PathBuf,
    /// As `bpftool prog show` names it.
    pub kind: &'static str,
    pub id: u32,
    pub attached: Vec<Attachment>,
}

/// A cgroup bpf_link of a program.
#[derive(Debug, Serialize)]
pub struct Attachment {
    pub link_id: u32,
    /// As `bpftool cgroup show` names it (`cgroup_sock_ops`, `cgroup_inet4_connect`, ...).
    pub attach_type: String,
    pub cgroup_id: u64,
    /// The cgroup's directory, if found under the cgroup v2 mount.
    pub cgroup: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct PortEntry {
    pub port: u16,
    pub listener: bool,
    pub target: bool,
}

#[derive(Debug, Serialize)]
pub struct ServiceEntry {
    pub service: SocketAddr,
    pub listener_port: u16,
}

#[derive(Debug, Serialize)]
pub struct SocketEntry {
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

#[derive(Debug, Serialize)]
pub struct RedirectEntry {
    /// The client's address, as the agent's accepted socket sees it.
    pub client: SocketAddr,
    /// The import listener the client was sent to.
    pub listener: SocketAddr,
    /// The service address the client connected to.
    pub service: SocketAddr,
    /// The client socket's cookie.
    pub cookie: u64,
}

/// Reads everything pinned under `pin_dir`; needs the privileges of [`load`].
pub fn inspect(pin_dir: &Path) -> Result<Inspection, EbpfError> {
    check_privileges()?;
    let mut programs = Vec::new();
    for (name, pin, kind) in PROGRAM_PINS {
        let path = pin_dir.join(pin);
        let info =
            ProgramInfo::from_pin(&path).map_err(|source| EbpfError::Program { name, source })?;
        programs.push(PinnedProgram {
            name,
            pin: path,
            kind,
            id: info.id(),
            attached: Vec::new(),
        });
    }
    let cgroup_root = cgroup2_root().ok();
    for link in aya::programs::loaded_links().flatten() {
        let Some(program) = programs.iter_mut().find(|p| p.id == link.program_id()) else {
            continue;
        };
        let Ok((cgroup_id, attach_type)) = cgroup_link_info(link.id()) else {
            continue;
        };
        program.attached.push(Attachment {
            link_id: link.id(),
            attach_type: attach_type_name(attach_type),
            cgroup_id,
            cgroup: cgroup_root
                .as_deref()
                .and_then(|root| find_cgroup(root, cgroup_id)),
        });
    }

    let ports: HashMap<MapData, PortKey, PortFlags> =
        pinned_map(pin_dir, map::PORTS, PIN_MAP_PORTS)?;
    let mut ports: Vec<PortEntry> = ports
        .iter()
        .flatten()
        .map(|(key, flags)| PortEntry {
            port: u16::try_from(key.port).unwrap_or(u16::MAX),
            listener: flags.contains(PortFlags::LISTENER),
            target: flags.contains(PortFlags::TARGET),
        })
        .collect();
    ports.sort_by_key(|p| p.port);

    let services: HashMap<MapData, ServiceKey, ServiceTarget> =
        pinned_map(pin_dir, map::SERVICES, PIN_MAP_SERVICES)?;
    let mut services: Vec<ServiceEntry> = services
        .iter()
        .flatten()
        .map(|(key, target)| ServiceEntry {
            service: key.addr(),
            listener_port: u16::try_from(target.listener_port).unwrap_or(u16::MAX),
        })
        .collect();
    services.sort_by_key(|s| s.service);

    let socks: SockHash<MapData, SockKey> = pinned_map(pin_dir, map::SOCKS, PIN_MAP_SOCKS)?;
    let mut sockets: Vec<SocketEntry> = socks
        .keys()
        .flatten()
        .map(|key| {
            let (local, remote) = key.addrs();
            SocketEntry { local, remote }
        })
        .collect();
    sockets.sort_by_key(|s| (s.local, s.remote));

    let redirects: HashMap<MapData, SockKey, Redirect> =
        pinned_map(pin_dir, map::REDIRECTS, PIN_MAP_REDIRECTS)?;
    let mut redirects: Vec<RedirectEntry> = redirects
        .iter()
        .flatten()
        .map(|(key, redirect)| {
            let (listener, client) = key.addrs();
            RedirectEntry {
                client,
                listener,
                service: redirect.service.addr(),
                cookie: redirect.cookie,
            }
        })
        .collect();
    redirects.sort_by_key(|r| r.client);

    let counters: PerCpuArray<MapData, u64> =
        pinned_map(pin_dir, map::SKMSG_BYTES, PIN_MAP_SKMSG_BYTES)?;
    Ok(Inspection {
        pin_dir: pin_dir.to_path_buf(),
        programs,
        ports,
        services,
        sockets,
        redirects,
        skmsg: sum_counters(&counters)?,
    })
}

fn pinned_map<T>(pin_dir: &Path, name: &'static str, pin: &str) -> Result<T, EbpfError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let data = MapData::from_pin(pin_dir.join(pin)).map_err(|source| map_error(name, source))?;
    Map::from_map_data(data)
        .and_then(T::try_from)
        .map_err(|source| map_error(name, source))
}

/// `(cgroup id, attach type)` of a cgroup bpf_link, by raw `bpf(2)` calls: aya's `LinkInfo`
/// does not expose them.
fn cgroup_link_info(link_id: u32) -> io::Result<(u64, u32)> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
    const BPF_LINK_TYPE_CGROUP: u64 = 3;

    let bpf = |cmd: libc::c_long, attr: &mut [u64; 16]| -> io::Result<libc::c_long> {
        // SAFETY: `attr` is a zeroed `union bpf_attr` prefix of the size passed; the kernel
        // only writes through the pointers we put into it, which point to live buffers.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                attr.as_mut_ptr(),
                std::mem::size_of_val(attr),
            )
        };
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(ret)
        }
    };
    // union bpf_attr { struct { __u32 link_id; __u32 next_id; __u32 open_flags; } }
    let mut attr = [0u64; 16];
    attr[0] = u64::from(link_id);
    let fd = bpf(BPF_LINK_GET_FD_BY_ID, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // struct bpf_link_info { __u32 type; __u32 id; __u32 prog_id; union { struct {
    // __u64 cgroup_id; __u32 attach_type; } cgroup; ... } } (the union at offset 16)
    let mut info = [0u64; 4];
    // union bpf_attr { struct { __u32 bpf_fd; __u32 info_len; __aligned_u64 info; } info }
    let mut attr = [0u64; 16];
    attr[0] = fd.as_raw_fd() as u64 | (std::mem::size_of_val(&info) as u64) << 32;
    attr[1] = info.as_mut_ptr() as u64;
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    if info[0] & 0xffff_ffff != BPF_LINK_TYPE_CGROUP {
        return Err(io::Error::other("not a cgroup link"));
    }
    Ok((info[2], (info[3] & 0xffff_ffff) as u32))
}

fn attach_type_name(attach_type: u32) -> String {
    match attach_type {
        3 => "cgroup_sock_ops".to_owned(),
        10 => "cgroup_inet4_connect".to_owned(),
        11 => "cgroup_inet6_connect".to_owned(),
        other => format!("attach type {other}"),
    }
}

/// The directory under `root` whose cgroup id (its inode number) is `id`.
fn find_cgroup(root: &Path, id: u64) -> Option<PathBuf> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if fs::metadata(&dir).is_ok_and(|m| m.ino() == id) {
            return Some(dir);
        }
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(entry.path());
            }
        }
    }
    None
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK, whose default is far too small;
/// newer ones ignore it, so a failure here is only worth a debug line.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit only reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        debug!(error = %io::Error::last_os_error(), "cannot raise RLIMIT_MEMLOCK");
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

/// The level `aya_log_ebpf` statements are compiled down to (`AYA_LOG_LEVEL`, aya-log's
/// numbering: 0 off, 1 error ... 5 trace), from the tracing subscriber's maximum, so disabled
/// levels cost the programs nothing.
fn ebpf_log_level() -> u8 {
    use tracing::level_filters::LevelFilter;
    match LevelFilter::current() {
        LevelFilter::OFF => 0,
        LevelFilter::ERROR => 1,
        LevelFilter::WARN => 2,
        LevelFilter::INFO => 3,
        LevelFilter::DEBUG => 4,
        _ => 5,
    }
}

fn spawn_log_forwarder(ebpf: &mut Ebpf) -> Option<tokio::task::JoinHandle<()>> {
    use tokio::io::{unix::AsyncFd, Interest};

    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => logger,
        Err(e) => {
            debug!(error = %e, "eBPF programs have no logs to forward");
            return None;
        }
    };
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        debug!("no tokio runtime: eBPF program logs are not forwarded");
        return None;
    };
    let _entered = runtime.enter();
    // SAFETY: the logger owns the ring buffer's fd and returns that same fd from `as_raw_fd`
    // for as long as it lives, which is as long as the `AsyncFd`.
    let registered = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) };
    let mut logger = match registered {
        Ok(logger) => logger,
        Err(e) => {
            debug!(error = %e, "cannot poll the eBPF log ring buffer");
            return None;
        }
    };
    Some(runtime.spawn(async move {
        while let Ok(mut ready) = logger.readable_mut().await {
            ready.get_inner_mut().flush();
            ready.clear_ready();
        }
    }))
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashSet,
        io::{BufRead as _, BufReader, Read as _, Write as _},
        net::{TcpListener, TcpStream},
        os::fd::AsRawFd as _,
        process::{Child, Command, Stdio},
        sync::{
            atomic::{AtomicU32, Ordering},
            mpsc,
        },
        thread,
        time::Duration,
    };

    use super::*;

    static N: AtomicU32 = AtomicU32::new(0);

    fn unique(prefix: &str) -> String {
        let n = N.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{}-{n}", std::process::id())
    }

    /// Loads into a pin directory of its own and cleans up, parent included if empty, even
    /// when the test fails.
    struct Loaded(Option<LoadedEbpf>);

    impl Loaded {
        fn new() -> Option<Self> {
            if !nix::unistd::geteuid().is_root() {
                assert_ne!(
                    std::env::var("CI").as_deref(),
                    Ok("true"),
                    "eBPF tests need root in CI"
                );
                eprintln!("skipped: loading eBPF programs needs root");
                return None;
            }
            let dir = Path::new(DEFAULT_PIN_DIR).join(unique("unit"));
            Some(Self(Some(load(&dir).expect("load eBPF programs"))))
        }

        fn get(&mut self) -> &mut LoadedEbpf {
            self.0.as_mut().expect("loaded")
        }
    }

    impl Drop for Loaded {
        fn drop(&mut self) {
            drop(self.0.take());
            // Shared by concurrent tests and the agent: only removed when nobody uses it.
            let _ = fs::remove_dir(DEFAULT_PIN_DIR);
        }
    }

    /// A TCP connection over loopback: the listener binds `listen`, the client connects to
    /// `connect` on the listener's port.
    fn connected_pair(listen: &str, connect: &str) -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind(listen).unwrap();
        let port = listener.local_addr().unwrap().port();
        let client = TcpStream::connect((connect, port)).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, server)
    }

    fn payload(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// Sends `data` from `from` and reads it back on `to`, concurrently, since a redirected
    /// send waits for room in the peer's receive queue.
    fn transfer(from: &TcpStream, to: &mut TcpStream, data: &[u8]) -> Vec<u8> {
        let mut from = from.try_clone().unwrap();
        let data_to_send = data.to_vec();
        let writer = thread::spawn(move || from.write_all(&data_to_send).unwrap());
        let mut received = vec![0; data.len()];
        to.read_exact(&mut received).unwrap();
        writer.join().unwrap();
        received
    }

    /// Puts both ends of a connection into CLINK_SOCKS, as `clink_sockops` would once attached,
    /// and checks that sends in both directions are redirected and arrive intact.
    fn assert_redirected(listen: &str, connect: &str) {
        let Some(mut loaded) = Loaded::new() else {
            return;
        };
        let loaded = loaded.get();
        let (mut client, mut server) = connected_pair(listen, connect);
        for sock in [&client, &server] {
            let key = SockKey::from_addrs(sock.local_addr().unwrap(), sock.peer_addr().unwrap());
            // What `clink_sockops` records first: the flow state (no window: not an agent
            // socket) and how a sender finds it.
            let cookie = crate::flow::socket_cookie(sock).unwrap();
            let mut flows: aya::maps::HashMap<&mut MapData, u64, clink_common::Flow> =
                loaded.ebpf.map_mut(map::FLOWS).unwrap().try_into().unwrap();
            flows
                .insert(cookie, clink_common::Flow::default(), 0)
                .unwrap();
            let mut cookies: aya::maps::HashMap<&mut MapData, SockKey, u64> = loaded
                .ebpf
                .map_mut(map::COOKIES)
                .unwrap()
                .try_into()
                .unwrap();
            cookies.insert(key, cookie, 0).unwrap();
            let mut socks: SockHash<&mut MapData, SockKey> =
                loaded.ebpf.map_mut(map::SOCKS).unwrap().try_into().unwrap();
            socks.insert(key, sock.as_raw_fd(), 0).unwrap();
        }

        let up = payload(300_000, 1);
        let down = payload(200_000, 7);
        assert!(
            transfer(&client, &mut server, &up) == up,
            "client -> server bytes differ"
        );
        assert!(
            transfer(&server, &mut client, &down) == down,
            "server -> client bytes differ"
        );

        let counters = loaded.skmsg_counters().unwrap();
        assert_eq!(counters.bytes, (up.len() + down.len()) as u64);
        assert!(counters.messages >= 2, "{counters:?}");
    }

    #[test]
    fn skmsg_redirects_ipv4() {
        assert_redirected("127.0.0.1:0", "127.0.0.1");
    }

    #[test]
    fn skmsg_redirects_ipv6() {
        assert_redirected("[::1]:0", "::1");
    }

    /// A dual-stack listener's accepted socket is AF_INET6 (`::ffff:127.0.0.1`) while its IPv4
    /// client is AF_INET: the key normalisation must make them find each other.
    #[test]
    fn skmsg_redirects_ipv4_client_of_dual_stack_listener() {
        assert_redirected("[::]:0", "127.0.0.1");
    }

    #[test]
    fn skmsg_passes_sends_without_a_peer() {
        let Some(mut loaded) = Loaded::new() else {
            return;
        };
        let loaded = loaded.get();
        let (client, mut server) = connected_pair("127.0.0.1:0", "127.0.0.1");
        let mut socks: SockHash<&mut MapData, SockKey> =
            loaded.ebpf.map_mut(map::SOCKS).unwrap().try_into().unwrap();
        let key = SockKey::from_addrs(client.local_addr().unwrap(), client.peer_addr().unwrap());
        socks.insert(key, client.as_raw_fd(), 0).unwrap();

        let data = payload(100_000, 3);
        assert!(
            transfer(&client, &mut server, &data) == data,
            "bytes differ"
        );
        assert_eq!(loaded.skmsg_counters().unwrap(), SkMsgCounters::default());
    }

    /// A cgroup of its own under the cgroup v2 mount, removed at the end of the test.
    struct TestCgroup(PathBuf);

    impl TestCgroup {
        fn new() -> Self {
            let path = cgroup2_root()
                .expect("a cgroup v2 mount")
                .join(unique("clink-test"));
            fs::create_dir(&path).unwrap();
            Self(path)
        }
    }

    impl Drop for TestCgroup {
        fn drop(&mut self) {
            if let Err(e) = fs::remove_dir(&self.0) {
                eprintln!("removing {}: {e}", self.0.display());
            }
        }
    }

    /// The helper process, killed if the test ends early.
    struct Helper(Child);

    impl Drop for Helper {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn free_port() -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    }

    const HELPER_ENV: &str = "CLINK_SOCKOPS_HELPER_PORTS";

    /// Attaches the programs to a new cgroup, runs a helper process in it that opens one
    /// connection to an agent listener port, one to a port that is not in CLINK_PORTS and
    /// one to an export target port (as a process that is not the agent), and checks that
    /// only the first connection's two sockets are in CLINK_SOCKS, and that its data was
    /// spliced.
    #[test]
    fn sockops_adds_only_sockets_on_owned_ports() {
        let Some(mut loaded) = Loaded::new() else {
            return;
        };
        let loaded = loaded.get();
        let cgroup = TestCgroup::new();
        let (owned, other, target) = (free_port(), free_port(), free_port());
        loaded.add_port(owned, PortFlags::LISTENER).unwrap();
        loaded.add_port(target, PortFlags::TARGET).unwrap();
        loaded.attach_cgroup(&cgroup.0).unwrap();
        assert_eq!(loaded.cgroup(), Some(cgroup.0.as_path()));

        let mut helper = Helper(
            Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "ebpf::tests::sockops_helper", "--ignored"])
                .args(["--nocapture", "--test-threads=1"])
                .env(HELPER_ENV, format!("{owned} {other} {target}"))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        fs::write(cgroup.0.join("cgroup.procs"), helper.0.id().to_string()).unwrap();
        let mut to_helper = helper.0.stdin.take().unwrap();
        writeln!(to_helper, "go").unwrap();
        let helper_out = BufReader::new(helper.0.stdout.take().unwrap());
        let (port_tx, port_rx) = mpsc::channel();
        thread::spawn(move || {
            // Reads to the end, or the helper's own test harness fails on a closed stdout.
            // libtest prints "test <name> ... " before the test runs, on the same line.
            for line in helper_out.lines().map_while(Result::ok) {
                if let Some((_, port)) = line.split_once(READY) {
                    let _ = port_tx.send(port.trim().parse::<u32>().ok());
                }
            }
        });
        let client_port = port_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("helper exited or timed out (60 s) before reporting its client port")
            .expect("helper reported a bad client port");

        let socks: SockHash<&MapData, SockKey> = map_ref(&loaded.ebpf, map::SOCKS).unwrap();
        let keys: HashSet<SockKey> = socks.keys().map(Result::unwrap).collect();
        let lo = u32::from_ne_bytes([127, 0, 0, 1]);
        let client = SockKey::from_ctx(
            clink_common::AF_INET,
            lo,
            lo,
            [0; 4],
            [0; 4],
            client_port,
            u32::from(owned).to_be(),
        );
        assert_eq!(keys, HashSet::from([client, client.reversed()]));
        assert_eq!(loaded.skmsg_counters().unwrap().bytes, HELPER_BYTES as u64);

        writeln!(to_helper, "done").unwrap();
        assert!(helper.0.wait().unwrap().success(), "helper failed");
        // Detaching is explicit too, and leaves the cgroup as it was.
        loaded.detach_cgroup();
        assert_eq!(loaded.cgroup(), None);
    }

    #[test]
    fn cgroup2_mount_point_from_mountinfo() {
        let hybrid = "24 1 0:22 / /sys rw - sysfs sysfs rw\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let optional = "35 24 0:30 / /my\\040cgroups rw shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mount(optional), Some(PathBuf::from("/my cgroups")));
        assert_eq!(
            cgroup2_mount("24 1 0:22 / /sys rw - sysfs sysfs rw\n"),
            None
        );
    }

    #[test]
    fn attaching_to_a_directory_that_is_no_cgroup_fails() {
        let Some(mut loaded) = Loaded::new() else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let err = loaded.get().attach_cgroup(dir.path()).unwrap_err();
        assert!(matches!(err, EbpfError::NotCgroup2 { .. }), "{err}");
        assert_eq!(loaded.get().cgroup(), None);
    }

    const HELPER_BYTES: usize = 100_000;
    const READY: &str = "clink-sockops-helper-ready:";

    /// Runs in the test cgroup, started by `sockops_adds_only_sockets_on_owned_ports`.
    #[test]
    #[ignore = "helper process of sockops_adds_only_sockets_on_owned_ports"]
    fn sockops_helper() {
        let Ok(ports) = std::env::var(HELPER_ENV) else {
            return;
        };
        let ports: Vec<&str> = ports.split(' ').collect();
        let mut line = String::new();
        // Sockets are charged to the cgroup of their creator: wait to be moved first.
        std::io::stdin().read_line(&mut line).unwrap();
        let (client, mut server) = connected_pair(&format!("127.0.0.1:{}", ports[0]), "127.0.0.1");
        let _unowned = connected_pair(&format!("127.0.0.1:{}", ports[1]), "127.0.0.1");
        let _not_the_agent = connected_pair(&format!("127.0.0.1:{}", ports[2]), "127.0.0.1");
        let data = payload(HELPER_BYTES, 9);
        assert!(
            transfer(&client, &mut server, &data) == data,
            "bytes differ"
        );
        println!("{READY}{}", client.local_addr().unwrap().port());
        std::io::stdin().read_line(&mut line).unwrap();
    }
}
