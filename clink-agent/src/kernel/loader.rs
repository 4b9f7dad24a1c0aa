//! Loads the eBPF programs of the local-leg splice (ARCHITECTURE.md, "Sockmap data path").
//!
//! [`load`] takes the object that build.rs compiled from `clink-ebpf` and embedded here,
//! scopes it to the calling process (its network namespace and pid, see
//! `clink_common::global`), loads the programs into the kernel, attaches `clink_skmsg` to the
//! `CLINK_SOCKS` sockhash (a map attachment: it only ever sees sockets in that map) and pins
//! programs and maps under one directory ([`super::pins`]).
//!
//! [`LoadedEbpf::attach_cgroup`] then attaches `clink_sockops`, `clink_connect4` and
//! `clink_connect6` to a cgroup v2 directory; until then no socket is touched. The
//! attachments are bpf_links that are deliberately *not* pinned: they live exactly as long as
//! the agent's process, so an agent that dies, even by SIGKILL, never leaves connects
//! redirected to a listener that is gone. Pins do outlive a crash; the next [`load`] into the
//! same directory replaces them. Dropping the [`LoadedEbpf`] (or [`LoadedEbpf::remove`])
//! detaches, unpins everything and removes the directory.

use std::{
    fs, io,
    net::{Ipv4Addr, SocketAddr},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use aya::{
    maps::{HashMap, Map, MapData, MapError, PerCpuArray, SockHash},
    pin::PinError,
    programs::{
        cgroup_sock_addr::CgroupSockAddrLinkId, sock_ops::SockOpsLinkId, CgroupAttachMode,
        CgroupSockAddr, ProgramError, SkMsg, SockOps,
    },
    Ebpf, EbpfLoader,
};
use clink_common::{global, map, program, PortFlags, PortKey, ServiceKey, ServiceTarget, SockKey};
use tracing::{debug, info, warn};

use super::{
    host,
    inspect::{sum_counters, SkMsgCounters},
    pins::{MAP_PINS, PROGRAM_PINS},
    sockopt, EbpfError,
};

/// The programs [`LoadedEbpf::attach_cgroup`] attaches.
const CGROUP_PROGRAMS: [&str; 3] = [program::SOCKOPS, program::CONNECT4, program::CONNECT6];

/// The `clink-ebpf` object, empty when the agent was built with `AYA_BUILD_SKIP=1`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/clink-ebpf"));

/// Whether this agent was built with its eBPF programs (not with `AYA_BUILD_SKIP=1`).
pub fn built() -> bool {
    !EBPF_OBJECT.is_empty()
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
///
/// `node`: see `CLINK_NODE_IP4`. `splice_targets`: recognise the agent's own connects to
/// export targets so their local hop is spliced (the sockmap path); on a kernel that does not
/// allow that (`bpf_get_ns_current_pid_tgid` in `sock_ops`, missing on 6.1) the programs are
/// loaded without it, and the log says so.
pub fn load(
    pin_dir: &Path,
    node: Option<Ipv4Addr>,
    splice_targets: bool,
) -> Result<LoadedEbpf, EbpfError> {
    if !built() {
        return Err(EbpfError::NotBuilt);
    }
    host::check_privileges()?;
    host::raise_memlock_limit();
    // Into the kernel first: a verifier rejection leaves nothing behind on disk.
    let mut scope = Scope::current(node);
    scope.agent_connects = u32::from(splice_targets);
    let ebpf = match load_programs(&scope) {
        Err(e) if splice_targets && e.to_string().contains(PID_HELPER) => {
            warn!(
                "this kernel does not let sock_ops programs call {PID_HELPER}: the agent's \
                 connections to export targets are not spliced (local clients still are)"
            );
            scope.agent_connects = 0;
            load_programs(&scope)?
        }
        loaded => loaded?,
    };

    host::ensure_bpffs(pin_dir)?;
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
    /// `CLINK_NODE_IP4`: network byte order, 0 for none.
    node_ip4: u32,
    /// `CLINK_AGENT_CONNECTS`.
    agent_connects: u32,
}

/// The helper `clink_sockops` needs to tell the agent's own connects apart.
const PID_HELPER: &str = "bpf_get_ns_current_pid_tgid";

impl Scope {
    /// The calling process. Whatever cannot be found out is left 0: no namespace filter, and
    /// no connection recognised as the agent's own (then export targets are not spliced).
    fn current(node: Option<Ipv4Addr>) -> Scope {
        let netns_cookie = sockopt::netns_cookie().unwrap_or_else(|e| {
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
            node_ip4: node.map_or(0, |ip| u32::from_ne_bytes(ip.octets())),
            agent_connects: 0,
        };
        debug!(?scope, "eBPF programs scoped");
        scope
    }
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
        .override_global(global::NODE_IP4, &scope.node_ip4, true)
        .override_global(global::AGENT_CONNECTS, &scope.agent_connects, true)
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
        host::check_cgroup2(cgroup)?;
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

pub(super) fn map_error(name: &'static str, source: MapError) -> EbpfError {
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
mod tests;
