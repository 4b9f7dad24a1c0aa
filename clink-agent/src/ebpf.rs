//! Loader for the eBPF programs of the local-leg splice (DESIGN.md §6.2, §7).
//!
//! [`load`] takes the object that build.rs compiled from `clink-ebpf` and embedded here,
//! loads `clink_sockops` and `clink_skmsg` into the kernel, attaches `clink_skmsg` to the
//! `CLINK_SOCKS` sockhash (a map attachment: it only ever sees sockets in that map) and pins
//! programs and maps under one directory, so an operator can inspect them with
//! `bpftool prog show`, `bpftool map dump pinned <dir>/map_clink_ports`, ... Nothing is
//! attached to a cgroup here: until `clink_sockops` is, the map stays empty and no socket
//! is touched. Dropping the [`LoadedEbpf`] (or [`LoadedEbpf::remove`]) unpins everything and
//! removes the directory.

use std::{
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use aya::{
    maps::{HashMap, MapData, MapError, MapType, PerCpuArray, SockHash},
    pin::PinError,
    programs::{ProgramError, ProgramType, SkMsg, SockOps},
    Ebpf, EbpfLoader,
};
use clink_common::{map, program, PortFlags, PortKey, SockKey, SKMSG_BYTES_IDX, SKMSG_MSGS_IDX};
use nix::{
    mount::{mount, MsFlags},
    sys::statfs::{statfs, BPF_FS_MAGIC},
};
use tracing::{debug, info, warn};

/// Where the agent pins its programs and maps unless told otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/clusterlink";

/// Where bpffs is mounted (by us, if nobody did).
const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// Pin file names under the pin directory: `prog_` or `map_` and the object's name.
pub const PIN_PROG_SOCKOPS: &str = "prog_clink_sockops";
pub const PIN_PROG_SKMSG: &str = "prog_clink_skmsg";
pub const PIN_MAP_SOCKS: &str = "map_clink_socks";
pub const PIN_MAP_PORTS: &str = "map_clink_ports";
pub const PIN_MAP_SKMSG_BYTES: &str = "map_clink_skmsg_bytes";

const PROGRAM_PINS: [(&str, &str); 2] = [
    (program::SOCKOPS, PIN_PROG_SOCKOPS),
    (program::SKMSG, PIN_PROG_SKMSG),
];
const MAP_PINS: [(&str, &str); 3] = [
    (map::SOCKS, PIN_MAP_SOCKS),
    (map::PORTS, PIN_MAP_PORTS),
    (map::SKMSG_BYTES, PIN_MAP_SKMSG_BYTES),
];

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
    #[error("cannot duplicate the {} file descriptor: {source}", map::SOCKS)]
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

/// Bytes and messages `clink_skmsg` redirected, summed over all CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SkMsgCounters {
    pub bytes: u64,
    pub messages: u64,
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
        self.sock_ops && self.sk_msg && self.sockhash && self.cgroup_sock_addr
    }
}

/// Probes the kernel by loading tiny programs and maps; needs the same privileges as [`load`].
pub fn feature_check() -> Result<Features, EbpfError> {
    ensure_privileged()?;
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
    if EBPF_OBJECT.is_empty() {
        return Err(EbpfError::NotBuilt);
    }
    ensure_privileged()?;
    raise_memlock_limit();
    // Into the kernel first: a verifier rejection leaves nothing behind on disk.
    let ebpf = load_programs()?;

    ensure_bpffs(pin_dir)?;
    create_pin_dir(pin_dir)?;
    // From here on, dropping `loaded` removes whatever was pinned so far, and the directory.
    let mut loaded = LoadedEbpf {
        ebpf,
        pin_dir: pin_dir.to_path_buf(),
        pinned: Vec::new(),
        log_forwarder: None,
    };
    loaded.pin_all()?;
    loaded.log_forwarder = spawn_log_forwarder(&mut loaded.ebpf);
    info!(
        pin_dir = %pin_dir.display(),
        programs = ?PROGRAM_PINS.map(|(name, _)| name),
        maps = ?MAP_PINS.map(|(name, _)| name),
        "eBPF programs loaded and pinned"
    );
    Ok(loaded)
}

/// Creates the maps, loads both programs and attaches `clink_skmsg` to `CLINK_SOCKS`.
fn load_programs() -> Result<Ebpf, EbpfError> {
    let log_level = ebpf_log_level();
    let mut ebpf = EbpfLoader::new()
        .override_global(aya_log::LEVEL, &log_level, false)
        .load(EBPF_OBJECT)
        .map_err(EbpfError::Object)?;

    program_mut::<SockOps>(&mut ebpf, program::SOCKOPS)?
        .load()
        .map_err(|source| program_error(program::SOCKOPS, source))?;
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

    /// What `clink_skmsg` has redirected so far.
    pub fn skmsg_counters(&self) -> Result<SkMsgCounters, EbpfError> {
        let counters: PerCpuArray<&MapData, u64> = map_ref(&self.ebpf, map::SKMSG_BYTES)?;
        let sum = |index| {
            counters
                .get(&index, 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .map_err(|source| map_error(map::SKMSG_BYTES, source))
        };
        Ok(SkMsgCounters {
            bytes: sum(SKMSG_BYTES_IDX)?,
            messages: sum(SKMSG_MSGS_IDX)?,
        })
    }

    /// Unpins programs and maps and removes the pin directory (if nothing else is left in
    /// it); the kernel frees them once the agent's own references are gone too.
    pub fn remove(mut self) -> Result<(), EbpfError> {
        self.unpin_all()
    }

    fn ports(&mut self) -> Result<HashMap<&mut MapData, PortKey, PortFlags>, EbpfError> {
        let m = self
            .ebpf
            .map_mut(map::PORTS)
            .ok_or(EbpfError::MissingMap(map::PORTS))?;
        HashMap::try_from(m).map_err(|source| map_error(map::PORTS, source))
    }

    fn pin_all(&mut self) -> Result<(), EbpfError> {
        for (name, pin) in PROGRAM_PINS {
            let path = self.pin_dir.join(pin);
            remove_stale_pin(&path)?;
            let result = self
                .ebpf
                .program_mut(name)
                .ok_or(EbpfError::MissingProgram(name))?
                .pin(&path);
            self.record_pin(path, result)?;
        }
        for (name, pin) in MAP_PINS {
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
fn ensure_privileged() -> Result<(), EbpfError> {
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
fn ensure_bpffs(pin_dir: &Path) -> Result<(), EbpfError> {
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

    use aya::programs::CgroupAttachMode;

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
        let mut socks: SockHash<&mut MapData, SockKey> =
            loaded.ebpf.map_mut(map::SOCKS).unwrap().try_into().unwrap();
        for sock in [&client, &server] {
            let key = SockKey::from_addrs(sock.local_addr().unwrap(), sock.peer_addr().unwrap());
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
            let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
            // "... <mount point> <options> - cgroup2 <source> <options>"
            let root = mountinfo
                .lines()
                .find_map(|line| {
                    let (mount, fs_type) = line.split_once(" - ")?;
                    fs_type
                        .starts_with("cgroup2 ")
                        .then(|| mount.split(' ').nth(4))
                        .flatten()
                })
                .expect("a cgroup v2 mount");
            let path = Path::new(root).join(unique("clink-test"));
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

    /// Attaches `clink_sockops` to a new cgroup, runs a helper process in it that opens one
    /// connection to a port in CLINK_PORTS and one to a port that is not, and checks that only
    /// the first connection's two sockets are in CLINK_SOCKS, and that its data was spliced.
    #[test]
    fn sockops_adds_only_sockets_on_owned_ports() {
        let Some(mut loaded) = Loaded::new() else {
            return;
        };
        let loaded = loaded.get();
        let cgroup = TestCgroup::new();
        let (owned, other) = (free_port(), free_port());
        loaded.add_port(owned, PortFlags::BOTH).unwrap();
        let sockops = program_mut::<SockOps>(&mut loaded.ebpf, program::SOCKOPS).unwrap();
        sockops
            // With bpf_link (kernel >= 5.7, what aya uses) every attachment already coexists
            // with others; aya passes AllowMultiple on as a link flag, which the kernel rejects.
            .attach(fs::File::open(&cgroup.0).unwrap(), CgroupAttachMode::Single)
            .unwrap();

        let mut helper = Helper(
            Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "ebpf::tests::sockops_helper", "--ignored"])
                .args(["--nocapture", "--test-threads=1"])
                .env(HELPER_ENV, format!("{owned} {other}"))
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
        let (owned, other) = ports.split_once(' ').unwrap();
        let mut line = String::new();
        // Sockets are charged to the cgroup of their creator: wait to be moved first.
        std::io::stdin().read_line(&mut line).unwrap();
        let (client, mut server) = connected_pair(&format!("127.0.0.1:{owned}"), "127.0.0.1");
        let _unowned = connected_pair(&format!("127.0.0.1:{other}"), "127.0.0.1");
        let data = payload(HELPER_BYTES, 9);
        assert!(
            transfer(&client, &mut server, &data) == data,
            "bytes differ"
        );
        println!("{READY}{}", client.local_addr().unwrap().port());
        std::io::stdin().read_line(&mut line).unwrap();
    }
}
