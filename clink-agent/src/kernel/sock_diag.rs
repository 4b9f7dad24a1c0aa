//! A minimal `sock_diag` client: the receive memory of one TCP socket, which counts the
//! messages sk_msg redirected into it. Hand-written because it runs on the data path (once per
//! window of bytes written into a spliced socket) on one reused netlink socket per worker
//! thread, and asks for one attribute; the netlink crates would add allocation and parsing of
//! everything else. The tests check it against real loopback sockets.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::OwnedFd,
};

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
    use rustix::net::{netlink, socket_with, AddressFamily, SocketFlags, SocketType};
    Ok(socket_with(
        AddressFamily::NETLINK,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC,
        Some(netlink::SOCK_DIAG),
    )?)
}

fn ask(fd: &OwnedFd, req: &[u8]) -> io::Result<u64> {
    use rustix::net::{recv, send, RecvFlags, SendFlags};
    send(fd, req, SendFlags::empty())?;
    let mut buf = [0u8; 1024];
    let (n, _) = recv(fd, &mut buf, RecvFlags::empty())?;
    parse_skmeminfo(&buf[..n.min(buf.len())])
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
        // Less than any initial receive window (about 64 KiB on loopback), so that all of it
        // reaches the server's socket without the server reading: with 100,000 bytes Debian's
        // 6.1 kernel in the VM kept the rest in the client's send queue.
        const SENT: usize = 32 * 1024;
        client.write_all(&[7u8; SENT]).unwrap();
        // The receive memory counts buffers (truesize), at least the bytes themselves.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while queued(local, peer).unwrap() < SENT as u64 {
            assert!(std::time::Instant::now() < deadline, "bytes never queued");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let mut buf = vec![0u8; SENT];
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
