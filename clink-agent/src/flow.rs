//! The agent's half of the flow control of spliced sockets (see `clink_common::Flow`).
//!
//! The kernel queues a send redirected into a socket however far behind that socket's reader
//! is, and never makes the sender wait. Both directions of a local hop therefore need a bound
//! the kernel does not give:
//!
//! * Into the agent's socket (a client or target sends): `clink_skmsg` counts what it sends,
//!   the agent publishes what it has read ([`FlowControl::publish_read`] into `CLINK_READS`),
//!   and past [`FLOW_WINDOW`] the sender's bytes take the TCP stack, whose window makes it
//!   wait, until the agent has caught up.
//! * Into a client's or target's socket (the agent sends): the agent looks at that socket's
//!   queue ([`queued`], from `sock_diag`: the kernel counts redirected bytes in its receive
//!   memory) and waits while it holds more than [`FLOW_WINDOW`].

use std::{
    io,
    mem::size_of,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, OwnedFd},
};

use clink_common::{Flow, Redirect, SockKey};
pub use clink_common::{FLOW_WINDOW, READS_FROZEN};

/// Publish the read count at least this often (bytes), so a sender sees the agent keep up.
pub const PUBLISH_EVERY: u64 = FLOW_WINDOW / 4;
/// Look at a client's or target's queue at least every this many bytes sent into it (more
/// often only while the queue is close to the window).
pub const MIN_CHECK: u64 = FLOW_WINDOW / 8;

/// The maps the agent uses per connection on the sockmap path: `CLINK_READS` (written),
/// `CLINK_FLOWS` (read), `CLINK_SOCKS` (entries removed when a connection is demoted) and
/// `CLINK_REDIRECTS` (read: which service address a client asked for).
pub struct FlowControl {
    reads: OwnedFd,
    flows: OwnedFd,
    socks: OwnedFd,
    redirects: OwnedFd,
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
/// Update only an existing entry: sockets the programs did not splice have none.
const BPF_EXIST: u64 = 2;

#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// One `bpf(2)` map command on `fd`. `Ok(false)`: no such entry (ENOENT).
fn map_cmd<K, V>(
    cmd: libc::c_long,
    fd: &OwnedFd,
    key: &K,
    value: *mut V,
    flags: u64,
) -> io::Result<bool> {
    let attr = MapElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        pad: 0,
        key: (key as *const K) as u64,
        value: value as u64,
        flags,
    };
    // SAFETY: `attr` is a valid `bpf_attr` prefix for the map element commands; the key
    // (and value, where the command uses one) point to live objects of the map's key and
    // value sizes for the duration of the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &raw const attr,
            size_of::<MapElemAttr>(),
        )
    };
    if ret == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENOENT) => Ok(false),
        _ => Err(e),
    }
}

impl FlowControl {
    pub fn new(reads: OwnedFd, flows: OwnedFd, socks: OwnedFd, redirects: OwnedFd) -> Self {
        FlowControl {
            reads,
            flows,
            socks,
            redirects,
        }
    }

    /// The service address a client connected to before `clink_connect4/6` sent it to the
    /// Import listener, from the agent's accepted socket (`local`, `peer`); `None` for a
    /// client that connected to the listener itself.
    pub fn original_destination(&self, local: SocketAddr, peer: SocketAddr) -> Option<SocketAddr> {
        let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
        let key = SockKey::from_addrs(canonical(local), canonical(peer));
        let mut redirect = Redirect::default();
        match map_cmd(
            BPF_MAP_LOOKUP_ELEM,
            &self.redirects,
            &key,
            &raw mut redirect,
            0,
        ) {
            Ok(true) => Some(redirect.service.addr()),
            Ok(false) => None,
            Err(e) => {
                tracing::debug!(error = %e, "{} lookup failed", clink_common::map::REDIRECTS);
                None
            }
        }
    }

    /// Records that the agent has read `read` bytes in all from the socket with `cookie`.
    /// `Ok(false)`: the socket is not spliced (it has no entry), nothing to publish.
    pub fn publish_read(&self, cookie: u64, read: u64) -> io::Result<bool> {
        let mut read = read;
        map_cmd(
            BPF_MAP_UPDATE_ELEM,
            &self.reads,
            &cookie,
            &raw mut read,
            BPF_EXIST,
        )
    }

    /// Whether the sends into the agent's socket with `cookie` take the TCP stack now.
    pub fn passing(&self, cookie: u64) -> io::Result<bool> {
        let mut flow = Flow::default();
        Ok(
            map_cmd(BPF_MAP_LOOKUP_ELEM, &self.flows, &cookie, &raw mut flow, 0)?
                && flow.passing != 0,
        )
    }

    /// Takes the socket with `key` out of `CLINK_SOCKS`: the kernel gives it back its plain
    /// TCP functions. Anything still queued from a redirect would be dropped with it, so the
    /// caller makes sure nothing is.
    pub fn unsplice(&self, key: &SockKey) -> io::Result<bool> {
        map_cmd::<_, u8>(
            BPF_MAP_DELETE_ELEM,
            &self.socks,
            key,
            std::ptr::null_mut(),
            0,
        )
    }
}

/// Bytes redirected into the socket `fd` and not read yet (`FIONREAD`, which the kernel
/// answers from the socket's redirect queue while it is in a sockmap).
pub fn redirected_unread(fd: &impl AsRawFd) -> io::Result<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &raw mut n) } == 0 {
        Ok(u64::try_from(n).unwrap_or(0))
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The kernel's cookie of a socket (`SO_COOKIE`): how the programs key their flow state.
pub fn socket_cookie(fd: &impl AsRawFd) -> io::Result<u64> {
    socket_option_u64(fd, libc::SO_COOKIE)
}

/// A `u64` socket option at `SOL_SOCKET` level (`SO_COOKIE`, `SO_NETNS_COOKIE`).
pub fn socket_option_u64(fd: &impl AsRawFd, option: libc::c_int) -> io::Result<u64> {
    let mut value = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`.
    let ret = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    if ret == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const INET_DIAG_SKMEMINFO: u16 = 7;
const NLMSG_ERROR: u16 = 2;
/// Size of `struct inet_diag_msg`, which starts each answer.
const INET_DIAG_MSG_LEN: usize = 72;

/// Bytes waiting in the receive queue of the TCP socket whose local address is `local` and
/// whose peer is `peer` (in the caller's network namespace): its receive memory, which
/// includes the messages redirected into it. Asks the kernel through `sock_diag`.
pub fn queued(local: SocketAddr, peer: SocketAddr) -> io::Result<u64> {
    let (family, src, dst) = match (unmap(local.ip()), unmap(peer.ip())) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            (libc::AF_INET as u8, words(&s.octets()), words(&d.octets()))
        }
        (s, d) => (
            libc::AF_INET6 as u8,
            words(&v6(s).octets()),
            words(&v6(d).octets()),
        ),
    };
    let mut req = Vec::with_capacity(72);
    req.extend_from_slice(&72u32.to_ne_bytes()); // nlmsg_len
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // pid
    req.extend_from_slice(&[
        family,
        libc::IPPROTO_TCP as u8,
        1 << (INET_DIAG_SKMEMINFO - 1),
        0,
    ]);
    req.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    req.extend_from_slice(&local.port().to_be_bytes());
    req.extend_from_slice(&peer.port().to_be_bytes());
    for w in src.iter().chain(&dst) {
        req.extend_from_slice(w);
    }
    req.extend_from_slice(&0u32.to_ne_bytes()); // interface
    req.extend_from_slice(&[0xff; 8]); // INET_DIAG_NOCOOKIE
    debug_assert_eq!(req.len(), 72);

    DIAG.with(|diag| {
        let mut diag = diag.borrow_mut();
        let fd = match diag.as_ref() {
            Some(fd) => fd,
            None => diag.insert(diag_socket()?),
        };
        let result = ask(fd, &req);
        if result.is_err() {
            // Start over with a fresh socket next time (say, after a lost answer).
            *diag = None;
        }
        result
    })
}

thread_local! {
    /// One `sock_diag` socket per worker thread, used one request at a time.
    static DIAG: std::cell::RefCell<Option<OwnedFd>> = const { std::cell::RefCell::new(None) };
}

fn diag_socket() -> io::Result<OwnedFd> {
    // SAFETY: a plain socket syscall; the descriptor is owned by the returned value.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a descriptor we just opened and own.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) })
}

fn ask(fd: &OwnedFd, req: &[u8]) -> io::Result<u64> {
    // SAFETY: `req` is a live buffer of `req.len()` bytes.
    if unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = [0u8; 1024];
    // SAFETY: `buf` is a live buffer of `buf.len()` bytes.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    parse_skmeminfo(&buf[..n as usize])
}

/// The receive memory (`SK_MEMINFO_RMEM_ALLOC`) in a `sock_diag` answer.
fn parse_skmeminfo(msg: &[u8]) -> io::Result<u64> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("sock_diag: {what}"));
    let u16_at = |i: usize| msg.get(i..i + 2).map(|b| u16::from_ne_bytes([b[0], b[1]]));
    let u32_at = |i: usize| {
        msg.get(i..i + 4)
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    };
    let len = u32_at(0).ok_or_else(|| bad("short answer"))? as usize;
    let kind = u16_at(4).ok_or_else(|| bad("short answer"))?;
    if kind == NLMSG_ERROR {
        let errno = u32_at(16).ok_or_else(|| bad("short error"))? as i32;
        return Err(io::Error::from_raw_os_error(-errno));
    }
    let mut at = 16 + INET_DIAG_MSG_LEN;
    while at + 4 <= len.min(msg.len()) {
        let attr_len = u16_at(at).ok_or_else(|| bad("short attribute"))? as usize;
        let attr_kind = u16_at(at + 2).ok_or_else(|| bad("short attribute"))?;
        if attr_len < 4 {
            return Err(bad("malformed attribute"));
        }
        if attr_kind == INET_DIAG_SKMEMINFO {
            return u32_at(at + 4)
                .map(u64::from)
                .ok_or_else(|| bad("short SKMEMINFO"));
        }
        at += (attr_len + 3) & !3;
    }
    Err(bad("no SKMEMINFO in the answer"))
}

fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn v6(ip: IpAddr) -> std::net::Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// An address as the four 4-byte words of `inet_diag_sockid` (IPv4 in the first).
fn words(octets: &[u8]) -> [[u8; 4]; 4] {
    let mut w = [[0u8; 4]; 4];
    for (i, chunk) in octets.chunks(4).enumerate() {
        w[i].copy_from_slice(chunk);
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};

    #[test]
    fn queued_sees_unread_bytes_of_a_loopback_socket() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let (local, peer) = (server.local_addr().unwrap(), server.peer_addr().unwrap());
        assert_eq!(queued(local, peer).unwrap(), 0);
        client.write_all(&[7u8; 100_000]).unwrap();
        // The receive memory counts buffers (truesize), at least the bytes themselves.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while queued(local, peer).unwrap() < 100_000 {
            assert!(std::time::Instant::now() < deadline, "bytes never queued");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let mut buf = vec![0u8; 100_000];
        server.read_exact(&mut buf).unwrap();
        assert_eq!(queued(local, peer).unwrap(), 0);
        // The client's side, asked from the server's point of view reversed.
        assert_eq!(queued(peer, local).unwrap(), 0);
    }

    #[test]
    fn queued_fails_for_a_socket_that_does_not_exist() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        assert_eq!(queued(a, b).unwrap_err().raw_os_error(), Some(libc::ENOENT));
    }

    #[test]
    fn parse_rejects_truncated_answers() {
        assert!(parse_skmeminfo(&[]).is_err());
        assert!(parse_skmeminfo(&[0u8; 20]).is_err());
    }
}
