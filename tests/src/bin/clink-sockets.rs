//! Test helper: makes TCP sockets inside a cgroup and hands them to the test over stdin.
//!
//! The sockmap data path acts on the sockets of processes in the cgroup its programs are
//! attached to, and a socket belongs to the cgroup of the process that created it for its
//! whole life, whoever uses it afterwards. So a test that wants a client or a service "in the
//! cgroup" asks this process, started as `clink-sockets <cgroup dir>` inside the cluster's
//! network namespace, for the sockets, and then drives them itself like any other.
//!
//! stdin is a Unix stream socket. Requests are lines: `listen <addr>` (a bound, listening
//! socket) or `socket 4` / `socket 6` (a fresh TCP socket to connect). Each answer is one
//! message: `+` with the socket attached (SCM_RIGHTS), or `-<error>`. It exits at end of
//! input.

use std::{
    io::{BufRead as _, BufReader, IoSlice},
    net::{SocketAddr, TcpListener},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    os::unix::net::UnixStream,
};

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

fn main() {
    let Some(cgroup) = std::env::args().nth(1) else {
        eprintln!("usage: clink-sockets <cgroup dir> (requests on stdin, a Unix socket)");
        std::process::exit(2);
    };
    // Before any socket exists: sockets are charged to their creator's cgroup.
    let procs = std::path::Path::new(&cgroup).join("cgroup.procs");
    if let Err(e) = std::fs::write(&procs, std::process::id().to_string()) {
        eprintln!("clink-sockets: joining {}: {e}", procs.display());
        std::process::exit(1);
    }
    // SAFETY: stdin is the Unix socket the test passed us, and nothing else owns fd 0.
    let control = unsafe { UnixStream::from_raw_fd(0) };
    let requests = BufReader::new(control.try_clone().expect("dup stdin"));
    for line in requests.lines() {
        let Ok(line) = line else { break };
        let answer = serve(line.trim());
        let sent = match &answer {
            Ok(fd) => sendmsg::<()>(
                control.as_raw_fd(),
                &[IoSlice::new(b"+")],
                &[ControlMessage::ScmRights(&[fd.as_raw_fd()])],
                MsgFlags::empty(),
                None,
            ),
            Err(e) => sendmsg::<()>(
                control.as_raw_fd(),
                &[IoSlice::new(format!("-{e}").as_bytes())],
                &[],
                MsgFlags::empty(),
                None,
            ),
        };
        if sent.is_err() {
            break;
        }
    }
}

fn serve(request: &str) -> Result<OwnedFd, String> {
    match request.split_once(' ') {
        Some(("listen", addr)) => {
            let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
            let listener = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
            Ok(listener.into())
        }
        Some(("socket", family)) => {
            let domain = match family {
                "4" => socket2::Domain::IPV4,
                "6" => socket2::Domain::IPV6,
                _ => return Err(format!("unknown family {family:?}")),
            };
            // socket2 sets SOCK_CLOEXEC itself.
            socket2::Socket::new(domain, socket2::Type::STREAM, None)
                .map(OwnedFd::from)
                .map_err(|e| format!("socket: {e}"))
        }
        _ => Err(format!("bad request {request:?}")),
    }
}
