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
    }
}
