//! The sockmap data path's test set-up: a cgroup and a pin directory per cluster, and a
//! process inside that cgroup that makes the sockets its programs act on.

use std::{
    io::{self, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::Result;
use clink_testbed::{bin_path, Cgroup, ChildGuard, Netns, PinDir};

/// The data path a fabric's agents run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Datapath {
    Userspace,
    Sockmap,
    /// `--datapath ktls`: needs a kernel with kernel TLS.
    Ktls,
}

impl Datapath {
    /// As `clink status` and the `clink_datapath` metric show it.
    pub fn name(self) -> &'static str {
        match self {
            Datapath::Userspace => "userspace",
            Datapath::Sockmap => "sockmap",
            Datapath::Ktls => "ktls",
        }
    }
}

/// Where a sockmap agent runs and pins (plain paths; a [`SockmapSandbox`] owns them).
#[derive(Clone, Debug)]
pub struct SockmapSetup {
    /// The agent runs in this cgroup and attaches its programs to it.
    pub cgroup: PathBuf,
    /// `--bpf-pin-dir`.
    pub pin_dir: PathBuf,
}

/// A cgroup and a pin directory for one test cluster, uniquely named, removed on drop (also
/// when a test fails): the processes left in the cgroup are killed first, then what a killed
/// agent left pinned is removed.
pub struct SockmapSandbox {
    pub setup: SockmapSetup,
    _cgroup: Cgroup,
    _pins: PinDir,
}

impl SockmapSandbox {
    pub fn new(role: &str) -> Result<SockmapSandbox> {
        let cgroup = Cgroup::new(role)?;
        let pins = PinDir::new(role);
        Ok(SockmapSandbox {
            setup: SockmapSetup {
                cgroup: cgroup.path().to_owned(),
                pin_dir: pins.path().to_owned(),
            },
            _cgroup: cgroup,
            _pins: pins,
        })
    }
}

/// A `clink-sockets` process in a cluster's network namespace and cgroup that makes sockets
/// for the test: sockets belong to their creator's cgroup for life, so a client or service
/// made there is one the cgroup's eBPF programs act on, while the test drives it.
pub struct Sockets {
    control: std::sync::Mutex<std::os::unix::net::UnixStream>,
    _child: ChildGuard,
}

impl Sockets {
    pub fn start(netns: &Netns, cgroup: &Path) -> Result<Sockets> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", netns.name()))
            .arg(bin_path("clink-sockets")?)
            .arg(cgroup)
            .stdin(std::os::fd::OwnedFd::from(theirs))
            .stdout(Stdio::null());
        let child = ChildGuard::spawn(&mut cmd)?;
        Ok(Sockets {
            control: std::sync::Mutex::new(ours),
            _child: child,
        })
    }

    /// A listening socket bound to `addr`.
    pub fn listen(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        Ok(TcpListener::from(self.request(&format!("listen {addr}"))?))
    }

    /// A socket of the cgroup connected to `addr` (by the calling thread, blocking).
    pub fn connect(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        use std::os::fd::AsRawFd as _;
        let family = if addr.is_ipv4() { 4 } else { 6 };
        let socket = self.request(&format!("socket {family}"))?;
        let target = nix::sys::socket::SockaddrStorage::from(addr);
        nix::sys::socket::connect(socket.as_raw_fd(), &target).map_err(io::Error::from)?;
        Ok(TcpStream::from(socket))
    }

    fn request(&self, line: &str) -> io::Result<std::os::fd::OwnedFd> {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
        use std::os::fd::{AsRawFd as _, FromRawFd as _};
        let mut control = self.control.lock().unwrap_or_else(|e| e.into_inner());
        writeln!(control, "{line}")?;
        let mut buf = [0u8; 512];
        let mut iov = [io::IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = recvmsg::<()>(
            control.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let mut fd = None;
        for cmsg in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(fds) = cmsg {
                // SAFETY: the kernel just installed these descriptors in this process.
                fd = fds
                    .first()
                    .map(|&fd| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
            }
        }
        let len = msg.bytes;
        match fd {
            Some(fd) => Ok(fd),
            None if len == 0 => Err(io::Error::other("clink-sockets exited")),
            None => Err(io::Error::other(format!(
                "clink-sockets: {}",
                String::from_utf8_lossy(&buf[1..len])
            ))),
        }
    }
}
