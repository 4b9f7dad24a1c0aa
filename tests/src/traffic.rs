//! Traffic inside the clusters: sockets opened in a namespace, services, and transfers whose
//! content is checked by SHA-256.

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use anyhow::Result;
use clink_testbed::Netns;
use sha2::{Digest as _, Sha256};

/// A service answering every connection with its name, until dropped.
pub struct NamedService {
    pub addr: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NamedService {
    pub fn start(ns: &Netns, name: &str) -> Result<NamedService> {
        let listener = listen_in(ns)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let name = name.to_owned();
        let thread = std::thread::spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.write_all(name.as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Ok(NamedService {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for NamedService {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connects through a tunnel and returns what the service said (empty when refused).
pub fn ask(ns: &Netns, addr: SocketAddr) -> String {
    let Ok(mut s) = connect_in(ns, addr) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(15)));
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// A listener inside `ns` on loopback, port chosen by the kernel.
pub fn listen_in(ns: &Netns) -> Result<TcpListener> {
    Ok(ns.enter(|| TcpListener::bind("127.0.0.1:0"))?)
}

/// A client connection from inside `ns`.
pub fn connect_in(ns: &Netns, addr: SocketAddr) -> io::Result<TcpStream> {
    ns.enter(|| TcpStream::connect_timeout(&addr, Duration::from_secs(10)))
}

/// Deterministic pseudo-random bytes (xorshift), so each side can hash what it sent.
pub struct Pattern(u64);

impl Pattern {
    pub fn new(seed: u64) -> Pattern {
        Pattern(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            chunk.copy_from_slice(&self.0.to_le_bytes()[..chunk.len()]);
        }
    }
}

/// Writes `len` pattern bytes in writes of `chunk` bytes; returns their SHA-256.
pub fn send_pattern(
    w: &mut impl Write,
    seed: u64,
    len: usize,
    chunk: usize,
) -> io::Result<[u8; 32]> {
    let mut pattern = Pattern::new(seed);
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; chunk];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk);
        pattern.fill(&mut buf[..n]);
        w.write_all(&buf[..n])?;
        hash.update(&buf[..n]);
        left -= n;
    }
    Ok(hash.finalize().into())
}

/// A blocking reader that waits out spurious `WouldBlock`s.
///
/// On a socket in a sockmap (the sockmap data path splices the client's and the service's
/// sockets), the kernel's `tcp_bpf_recvmsg` answers a *blocking* read with EAGAIN when its
/// wait is woken without data: by the ACK of the socket's own FIN, or by its half-close from
/// another thread (Linux 6.18; `tests/sockmap_eagain.rs`). Only for streams without a read
/// timeout, where `WouldBlock` means nothing else.
pub struct Patient<R>(pub R);

impl<R: Read> Read for Patient<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.0.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_micros(50));
                }
                result => return result,
            }
        }
    }
}

/// Reads to end of stream; returns the byte count and SHA-256. The stream must have no read
/// timeout: `WouldBlock` is waited out (see [`Patient`]).
pub fn read_hash(r: &mut impl Read) -> io::Result<(usize, [u8; 32])> {
    let mut r = Patient(r);
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok((total, hash.finalize().into()));
        }
        hash.update(&buf[..n]);
        total += n;
    }
}

/// What one side of a two-way transfer sent and received.
#[derive(Debug, PartialEq, Eq)]
pub struct Transfer {
    pub sent: [u8; 32],
    pub received_len: usize,
    pub received: [u8; 32],
}

/// Sends `len` bytes of pattern `seed` on `stream` while reading everything the other side
/// sends; half-closes after sending.
pub fn exchange(stream: TcpStream, seed: u64, len: usize, chunk: usize) -> io::Result<Transfer> {
    let mut writer = stream.try_clone()?;
    let sender = std::thread::spawn(move || -> io::Result<[u8; 32]> {
        let digest = send_pattern(&mut writer, seed, len, chunk)?;
        writer.shutdown(Shutdown::Write)?;
        Ok(digest)
    });
    let mut reader = stream;
    let (received_len, received) = read_hash(&mut reader)?;
    let sent = sender.join().expect("sender thread panicked")?;
    Ok(Transfer {
        sent,
        received_len,
        received,
    })
}

/// The SHA-256 of `len` bytes of pattern `seed`.
pub fn pattern_digest(seed: u64, len: usize) -> [u8; 32] {
    send_pattern(&mut io::sink(), seed, len, 64 * 1024).expect("a sink never fails")
}

/// True when `stream` yields no data and ends (reset or EOF) within a few seconds: how a
/// refused tunneled connection looks to its client.
pub fn refused(stream: &mut TcpStream) -> bool {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(15)));
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
        ),
    }
}

/// Connects from `ns` to `addr` and tells whether the connection was refused as a tunneled
/// connection is: no data, then reset or end. The agent can reset so fast that `connect`
/// itself reports it.
pub fn refused_at(ns: &Netns, addr: SocketAddr) -> bool {
    match connect_in(ns, addr) {
        Ok(mut stream) => refused(&mut stream),
        Err(e) => e.kind() == io::ErrorKind::ConnectionReset,
    }
}

/// What a half-closing client needs from a tunnel: a request in 1-byte writes (`pause` apart)
/// and then one odd-sized write, the client's half-close, and a reply that the service sends
/// only after reading all of it: the request's length and SHA-256, then 3 MiB + 7 bytes of
/// pattern 9. Asserts every byte both ways; returns the bytes the client sent and received.
pub fn half_close_exchange(
    service: TcpListener,
    mut client: TcpStream,
    pause: Duration,
) -> (usize, usize) {
    const REPLY: usize = 3 * 1024 * 1024 + 7;
    let server = std::thread::spawn(move || {
        let (mut stream, _) = service.accept().unwrap();
        let (n, digest) = read_hash(&mut stream).unwrap();
        stream.write_all(format!("{n}:").as_bytes()).unwrap();
        stream.write_all(&digest).unwrap();
        let reply_digest = send_pattern(&mut stream, 9, REPLY, 4093).unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        reply_digest
    });
    let mut sent = Sha256::default();
    for b in b"hello" {
        client.write_all(&[*b]).unwrap();
        sent.update([*b]);
        std::thread::sleep(pause);
    }
    let mut odd = vec![0u8; 65_537];
    Pattern::new(5).fill(&mut odd);
    client.write_all(&odd).unwrap();
    sent.update(&odd);
    let expected: [u8; 32] = sent.finalize().into();
    client.shutdown(Shutdown::Write).unwrap();

    let mut reply = Vec::new();
    Patient(&mut client).read_to_end(&mut reply).unwrap();
    let head = format!("{}:", 5 + odd.len());
    assert!(
        reply.starts_with(head.as_bytes()),
        "reply starts {:?}",
        &reply[..16.min(reply.len())]
    );
    assert_eq!(&reply[head.len()..head.len() + 32], &expected);
    let tail = &reply[head.len() + 32..];
    assert_eq!(tail.len(), REPLY);
    let digest: [u8; 32] = Sha256::digest(tail).into();
    assert_eq!(digest, server.join().unwrap());
    (5 + odd.len(), reply.len())
}

/// Both directions of one exchange arrived intact: `len` bytes each way, the same SHA-256 at
/// both ends.
pub fn assert_intact(client: &Transfer, server: &Transfer, len: usize) {
    assert_eq!(server.received_len, len, "client->service length");
    assert_eq!(server.received, client.sent, "client->service bytes differ");
    assert_eq!(client.received_len, len, "service->client length");
    assert_eq!(client.received, server.sent, "service->client bytes differ");
}

/// `len` bytes each way at once between `client` (pattern 1) and the next connection
/// `service` accepts (pattern 2), checked by SHA-256 at both ends.
pub fn transfer_both_ways(service: TcpListener, client: TcpStream, len: usize) {
    let server = std::thread::spawn(move || {
        let (stream, _) = service.accept().unwrap();
        exchange(stream, 2, len, 128 * 1024).unwrap()
    });
    let at_client = exchange(client, 1, len, 100_000).unwrap();
    let at_server = server.join().unwrap();
    assert_intact(&at_client, &at_server, len);
    assert_eq!(at_client.sent, pattern_digest(1, len));
}

/// A service echoing every byte back, one thread per connection, until dropped.
pub struct EchoService {
    pub addr: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EchoService {
    pub fn start(ns: &Netns) -> Result<EchoService> {
        let listener = listen_in(ns)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        std::thread::spawn(move || {
                            let _ = s.set_nonblocking(false);
                            let mut buf = [0u8; 4096];
                            let mut s = s;
                            while let Ok(n @ 1..) = s.read(&mut buf) {
                                if s.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Ok(EchoService {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for EchoService {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One round trip of `msg` over an echoing connection: how long until all of it came back.
pub fn round_trip(stream: &mut TcpStream, msg: &[u8]) -> io::Result<Duration> {
    let started = std::time::Instant::now();
    stream.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    stream.read_exact(&mut back)?;
    if back != msg {
        return Err(io::Error::other("the echo differs from what was sent"));
    }
    Ok(started.elapsed())
}

/// The TCP state of `stream` by its kernel name (`TCP_INFO`'s `tcpi_state`); `"?"` if the
/// kernel does not say.
pub fn tcp_state(stream: &TcpStream) -> &'static str {
    use std::os::fd::AsRawFd as _;
    // SAFETY: all-zero is a valid `tcp_info` (plain integers).
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is writable for `len` bytes, and the kernel writes at most that.
    let ret = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            std::ptr::from_mut(&mut info).cast(),
            &mut len,
        )
    };
    if ret != 0 {
        return "?";
    }
    match info.tcpi_state {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT",
        9 => "LAST_ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        _ => "other",
    }
}
