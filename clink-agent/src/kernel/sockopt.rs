//! Socket facts the kernel paths key their state by.

use std::{io, mem::size_of, os::fd::AsFd};

/// The kernel's cookie of a socket (`SO_COOKIE`): how the programs key their flow state.
pub fn socket_cookie(fd: impl AsFd) -> io::Result<u64> {
    Ok(rustix::net::sockopt::socket_cookie(fd)?)
}

/// Bytes redirected into the socket `fd` and not read yet (`FIONREAD`, which the kernel
/// answers from the socket's redirect queue while it is in a sockmap).
pub fn redirected_unread(fd: impl AsFd) -> io::Result<u64> {
    Ok(rustix::io::ioctl_fionread(fd)?)
}

/// The cookie of the network namespace the calling thread is in (`SO_NETNS_COOKIE`, Linux
/// 5.14), asked of a throwaway socket. Neither rustix, nix nor socket2 has this option.
pub fn netns_cookie() -> io::Result<u64> {
    use std::os::fd::AsRawFd as _;
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    let mut value = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`, a live u64.
    let ret = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
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

/// Makes the next close of `fd` send RST instead of FIN (`SO_LINGER` 0), so the far end
/// sees a reset, not a clean end.
pub fn reset_on_close(fd: impl AsFd) {
    // Failure only means the socket is already gone; nothing to propagate then.
    let _ = socket2::SockRef::from(&fd).set_linger(Some(std::time::Duration::ZERO));
}

/// Bytes the socket has ever queued for sending: acknowledged (`tcpi_bytes_acked` of
/// `TCP_INFO`, Linux 4.1, which counts the SYN too) plus still queued (`SIOCOUTQ`); only
/// differences of two readings mean something. How the kTLS path knows that every
/// record the kernel made has reached TCP before it sends FIN (see `ktls::Tunnel`).
/// `libc::tcp_info` is glibc's struct, which ends before `tcpi_bytes_acked`, and no crate
/// has `SIOCOUTQ`; so both are read raw. The acknowledged count is read on both sides of the
/// queue length and the pair kept only when it did not move, so the sum is exact.
pub fn bytes_queued_ever(fd: impl AsFd) -> io::Result<u64> {
    use std::os::fd::AsRawFd as _;
    let fd = fd.as_fd().as_raw_fd();
    let acked = || -> io::Result<u64> {
        // Up to and including tcpi_bytes_acked (offset 120 in struct tcp_info, stable ABI).
        let mut info = [0u8; 128];
        let mut len = info.len() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `info`.
        let ret = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_TCP,
                libc::TCP_INFO,
                info.as_mut_ptr().cast(),
                &raw mut len,
            )
        };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        if (len as usize) < info.len() {
            return Err(io::Error::other(
                "TCP_INFO has no tcpi_bytes_acked (kernel before 4.1)",
            ));
        }
        let mut field = [0u8; 8];
        field.copy_from_slice(&info[120..128]);
        Ok(u64::from_ne_bytes(field))
    };
    loop {
        let before = acked()?;
        let mut queued: libc::c_int = 0;
        // SAFETY: SIOCOUTQ (= TIOCOUTQ) writes one int.
        if unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &raw mut queued) } != 0 {
            return Err(io::Error::last_os_error());
        }
        if acked()? == before {
            return Ok(before + queued.max(0) as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    #[test]
    fn cookies_and_unread_bytes_of_a_loopback_pair() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let (a, b) = (
            socket_cookie(&client).unwrap(),
            socket_cookie(&server).unwrap(),
        );
        assert_ne!(a, 0);
        assert_ne!(a, b, "every socket has its own cookie");
        assert_eq!(socket_cookie(&client).unwrap(), a, "and keeps it");
        assert_eq!(redirected_unread(&server).unwrap(), 0);
        client.write_all(&[1u8; 1000]).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while redirected_unread(&server).unwrap() < 1000 {
            assert!(std::time::Instant::now() < deadline, "bytes never arrived");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(netns_cookie().unwrap(), netns_cookie().unwrap());
        // The SYN's sequence number counts too: callers compare two readings.
        let base = bytes_queued_ever(&client).unwrap();
        assert!((1000..=1001).contains(&base), "{base}");
        client.write_all(&[2u8; 500]).unwrap();
        assert_eq!(bytes_queued_ever(&client).unwrap(), base + 500);
    }
}
