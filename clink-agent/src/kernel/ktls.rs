//! The kTLS data path (ARCHITECTURE.md, "kTLS data path"): after the mTLS handshake and the CONNECT/`200`
//! exchange (both in rustls), the tunnel socket's TLS 1.3 traffic secrets go to the kernel
//! (`TLS_TX`/`TLS_RX`), and [`super::splice`] moves the payload without copying it to the
//! agent.
//!
//! Crates: rustls's secret extraction (`enable_secret_extraction`,
//! `dangerous_extract_secrets`) and `ktls-core` for the socket side (`TCP_ULP`, the
//! `tls12_crypto_info_*` structs built from rustls's secrets, the cipher probe, sending a
//! control record). The `ktls` crate (rustls organisation) does not fit: it hands off only
//! a `tokio_rustls` stream over its own `CorkStream` transport and returns its own stream
//! type to read and write through, where this path needs the bare socket for `splice`; it
//! also brings a second `nix` and `thiserror`.
//!
//! What the hand-off guarantees (no byte lost or injected):
//! * rustls may have read ahead. What `PeerIo` buffered is given to rustls; a record rustls
//!   holds only part of is completed by reading exactly its missing bytes from the socket;
//!   the plaintext rustls then holds is returned to the caller, who writes it to the local
//!   socket before the pump starts. The kernel starts at the next record boundary with
//!   rustls's record sequence numbers.
//! * Until the secrets are extracted every check can still fail back to userspace with the
//!   rustls stream intact (`Handoff::Userspace`): no kTLS in the kernel (`ENOENT` from
//!   `TCP_ULP`), a cipher the kernel lacks, a peer that already closed, records rustls still
//!   has to send. After extraction a failure resets the connection.
//!
//! Records that are not application data, on the receiving side (`splice` refuses them with
//! `EINVAL`/`EIO`; they are read with `recvmsg` and the `TLS_GET_RECORD_TYPE` cmsg):
//! * `close_notify`: the peer's end of stream (half-close).
//! * other alerts: the connection is reset.
//! * NewSessionTicket (client side): ignored. The gateway sends no tickets on this path
//!   (`send_tls13_tickets = 0`, [`crate::tls::Identity::for_ktls`]), and tickets a peer sends
//!   with its handshake reach rustls before the `200` anyway.
//! * KeyUpdate: the connection is reset. Following it needs rustls's key schedule
//!   (`KernelConnection`, only on rustls's unbuffered connections) and a kernel that accepts
//!   new keys on a live socket (Linux 6.13 and later); Debian 6.1 refuses with `EBUSY`. No
//!   peer of ours sends one early: rustls updates keys only near the AES-GCM
//!   confidentiality limit (2^24 records, 256 GiB one way in full records), so a tunnel
//!   to a userspace peer that carries that much one way is reset.
//! * The kernel never updates keys, so the sending side holds the tunnel to that limit
//!   itself ([`RecordBudget`]): it reads the kernel's `TLS_TX` record sequence now and then
//!   and resets the tunnel before the sequence reaches the suite's confidentiality limit
//!   (rustls's figure: 2^24 records for AES-GCM; ChaCha20-Poly1305 has none that matters).
//!
//! Sending side: the kernel closes a record per `splice` into the socket. On half-close a
//! `close_notify` goes out as a control record, then FIN; but the kernel may still hold
//! records it could not pass to TCP yet (it reports them as sent and pushes them from a
//! work queue), and FIN before them would truncate the stream. So FIN waits until TCP has
//! queued every byte the kernel made: what rustls wrote, the payload, and 22 bytes per
//! record (5 header, 1 content type, 16 tag), counted from the `TLS_TX` record sequence.

use std::{
    io::{self, Read as _},
    net::Shutdown,
    os::fd::{AsFd, AsRawFd as _},
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Duration,
};

use ktls_core::{
    ffi::send_tls_control_message, setup_ulp, Compatibilities, ContentType, ProtocolVersion,
    TlsCryptoInfoRx, TlsCryptoInfoTx,
};
use rustls::{
    client::ClientConnectionData, server::ServerConnectionData, CipherSuite, ConnectionCommon,
};
use tokio::{io::Interest, net::TcpStream, time::timeout};
use tracing::debug;

use super::sockopt::{bytes_queued_ever, reset_on_close};
use crate::peer::io::PeerIo;

/// How long completing a record rustls holds part of may take at the hand-off.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long FIN may wait for the kernel to pass its records to TCP without any progress.
const FLUSH_STALL: Duration = Duration::from_secs(60);
/// TLS 1.3 record overhead with AES-GCM and ChaCha20-Poly1305: header, content type, tag.
const RECORD_OVERHEAD: u64 = 5 + 1 + 16;
/// The largest TLS 1.3 record plaintext (2^14) plus room for the content type.
const MAX_RECORD: usize = 16 * 1024 + 256;

/// Why the kernel cannot take TLS at all (start-up probe).
#[derive(Debug, thiserror::Error)]
pub enum KtlsUnavailable {
    #[error(
        "setsockopt(TCP_ULP, \"tls\") on a loopback socket failed: {0} (the kernel needs \
         CONFIG_TLS, built in or as the `tls` module)"
    )]
    Ulp(#[source] io::Error),
    #[error("kernel TLS is there but takes none of the TLS 1.3 AES-GCM ciphers")]
    NoCipher,
    #[error("cannot make a loopback socket pair to probe kernel TLS: {0}")]
    Probe(#[source] io::Error),
}

/// The kernel's kTLS support, probed at start-up: which TLS 1.3 ciphers it takes.
#[derive(Debug)]
pub struct Ktls {
    aes_128_gcm: bool,
    aes_256_gcm: bool,
    chacha20_poly1305: bool,
}

impl Ktls {
    /// Sets `TCP_ULP` "tls" on a connected loopback socket, then asks the kernel which TLS
    /// 1.3 ciphers it accepts.
    pub fn probe() -> Result<Ktls, KtlsUnavailable> {
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").map_err(KtlsUnavailable::Probe)?;
        let addr = listener.local_addr().map_err(KtlsUnavailable::Probe)?;
        let client = std::net::TcpStream::connect(addr).map_err(KtlsUnavailable::Probe)?;
        if let Err(e) = setup_ulp(&client) {
            return Err(KtlsUnavailable::Ulp(match e {
                ktls_core::Error::Ulp(e) => e,
                other => io::Error::other(other.to_string()),
            }));
        }
        let ciphers = Compatibilities::probe()
            .map_err(KtlsUnavailable::Probe)?
            .ok_or(KtlsUnavailable::NoCipher)?
            .tls13;
        let ktls = Ktls {
            aes_128_gcm: ciphers.aes_128_gcm(),
            aes_256_gcm: ciphers.aes_256_gcm(),
            chacha20_poly1305: ciphers.chacha20_poly1305(),
        };
        if !ktls.aes_128_gcm && !ktls.aes_256_gcm {
            return Err(KtlsUnavailable::NoCipher);
        }
        Ok(ktls)
    }

    /// The TLS 1.3 ciphers the kernel takes, for the log.
    pub fn ciphers(&self) -> String {
        [
            (self.aes_128_gcm, "AES-128-GCM"),
            (self.aes_256_gcm, "AES-256-GCM"),
            (self.chacha20_poly1305, "ChaCha20-Poly1305"),
        ]
        .iter()
        .filter(|(ok, _)| *ok)
        .map(|(_, name)| *name)
        .collect::<Vec<_>>()
        .join(",")
    }

    fn takes(&self, suite: CipherSuite) -> bool {
        match suite {
            CipherSuite::TLS13_AES_128_GCM_SHA256 => self.aes_128_gcm,
            CipherSuite::TLS13_AES_256_GCM_SHA384 => self.aes_256_gcm,
            CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => self.chacha20_poly1305,
            _ => false,
        }
    }

    /// Gives the tunnel's TLS session to the kernel (see the module documentation). On
    /// [`Handoff::Failed`] the tunnel socket has been reset.
    pub async fn handoff<S: TunnelTls>(&self, mut tls: S) -> Handoff<S> {
        let fd = match tls.parts().0.get_ref().as_fd().try_clone_to_owned() {
            Ok(fd) => fd,
            Err(e) => return Handoff::Userspace(tls, Fallback::Ulp(e.to_string()), Vec::new()),
        };
        let handoff = self.try_handoff(tls).await;
        if matches!(handoff, Handoff::Failed(_)) {
            reset_on_close(&fd);
        }
        handoff
    }

    async fn try_handoff<S: TunnelTls>(&self, mut tls: S) -> Handoff<S> {
        let (io, conn) = tls.parts();
        if conn.protocol_version() != Some(rustls::ProtocolVersion::TLSv1_3) {
            return Handoff::Userspace(tls, Fallback::Version, Vec::new());
        }
        let (suite, record_limit) = match conn.negotiated_cipher_suite() {
            Some(suite) if self.takes(suite.suite()) => (
                suite.suite(),
                suite
                    .tls13()
                    .map_or(u64::MAX, |s| s.common.confidentiality_limit),
            ),
            _ => return Handoff::Userspace(tls, Fallback::Cipher, Vec::new()),
        };
        if let Err(e) = setup_ulp(io.get_ref()) {
            return Handoff::Userspace(tls, ulp_refused(e), Vec::new());
        }
        // Plaintext rustls decrypts on the way: taken out as it comes, because rustls stops
        // reading once its own plaintext buffer (16 KiB) is full, and a peer that sends right
        // after its `200` (the exporter's target talks first) fills it at once.
        let mut plaintext = Vec::new();
        match timeout(DRAIN_TIMEOUT, to_record_boundary(&mut tls, &mut plaintext)).await {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => return Handoff::Userspace(tls, Fallback::Buffered, plaintext),
            Ok(Err(e)) => return Handoff::Failed(e),
            Err(_) => {
                return Handoff::Failed(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the peer left a TLS record unfinished at the hand-off",
                ))
            }
        }
        let (io, conn) = tls.parts();
        match conn.process_new_packets() {
            Ok(state) if state.peer_has_closed() => {
                return Handoff::Userspace(tls, Fallback::PeerClosed, plaintext)
            }
            Ok(_) => {}
            Err(e) => return Handoff::Failed(io::Error::other(e)),
        }
        if conn.wants_write() {
            return Handoff::Userspace(tls, Fallback::PendingWrite, plaintext);
        }
        let queued = match bytes_queued_ever(io.get_ref()) {
            Ok(queued) => queued,
            Err(e) => return Handoff::Userspace(tls, Fallback::Ulp(e.to_string()), plaintext),
        };
        // From here on the rustls session is given up: failures reset the connection.
        if let Err(e) = take_plaintext(conn, &mut plaintext) {
            return Handoff::Failed(e);
        }
        let client = S::CLIENT;
        let (io, conn) = tls.into_parts();
        let secrets = match conn.dangerous_extract_secrets() {
            Ok(secrets) => secrets,
            Err(e) => return Handoff::Failed(io::Error::other(e)),
        };
        let tcp = io.into_inner();
        match install(&tcp, secrets) {
            Ok(tx_seq) => Handoff::Kernel(
                Tunnel {
                    tcp,
                    client,
                    suite,
                    queued_at_handoff: queued,
                    tx_seq_at_handoff: tx_seq,
                    budget: RecordBudget::new(record_limit, tx_seq),
                },
                plaintext,
            ),
            Err(e) => Handoff::Failed(e),
        }
    }
}

/// Sets `TLS_TX` and `TLS_RX` from rustls's secrets; returns the first TX record sequence.
fn install(tcp: &TcpStream, secrets: rustls::ExtractedSecrets) -> io::Result<u64> {
    let kernel_err = |e: ktls_core::Error| io::Error::other(e.to_string());
    let secrets = ktls_core::ExtractedSecrets::try_from(secrets).map_err(kernel_err)?;
    let (tx_seq, tx) = secrets.tx;
    let (rx_seq, rx) = secrets.rx;
    TlsCryptoInfoTx::new(ProtocolVersion::TLSv1_3, tx, tx_seq)
        .and_then(|info| info.set(tcp))
        .map_err(kernel_err)?;
    TlsCryptoInfoRx::new(ProtocolVersion::TLSv1_3, rx, rx_seq)
        .and_then(|info| info.set(tcp))
        .map_err(kernel_err)?;
    Ok(tx_seq)
}

/// Moves the plaintext rustls has decrypted into `into`.
fn take_plaintext<D>(conn: &mut ConnectionCommon<D>, into: &mut Vec<u8>) -> io::Result<()> {
    let mut chunk = [0u8; 4096];
    loop {
        match conn.reader().read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => into.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

/// Gives rustls what `PeerIo` read ahead, then completes a record rustls holds only part of
/// by reading exactly its missing bytes; the plaintext rustls decrypts meanwhile goes to
/// `plaintext`. `false`: rustls would not take more, so the kernel cannot start at a
/// boundary.
async fn to_record_boundary<S: TunnelTls>(
    tls: &mut S,
    plaintext: &mut Vec<u8>,
) -> io::Result<bool> {
    let mut chunk = vec![0u8; MAX_RECORD + 5];
    loop {
        let (io, conn) = tls.parts();
        while !io.buffered().is_empty() {
            let mut failed = None;
            let taken = io.take_buffered(|mut bytes| match conn.read_tls(&mut bytes) {
                Ok(n) => n,
                Err(e) => {
                    failed = Some(e);
                    0
                }
            });
            if let Some(e) = failed {
                return Err(e);
            }
            conn.process_new_packets().map_err(io::Error::other)?;
            take_plaintext(conn, plaintext)?;
            if taken == 0 {
                return Ok(false);
            }
        }
        let missing = io.framing().missing();
        if missing == 0 {
            return Ok(true);
        }
        let want = missing.min(chunk.len());
        io.get_ref().readable().await?;
        let n = match io.get_ref().try_read(&mut chunk[..want]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        io.note_fed(&chunk[..n]);
        let mut rest = &chunk[..n];
        while !rest.is_empty() {
            if conn.read_tls(&mut rest)? == 0 {
                return Err(io::Error::other("rustls refused the rest of a record"));
            }
            conn.process_new_packets().map_err(io::Error::other)?;
            take_plaintext(conn, plaintext)?;
        }
    }
}

/// A tunnel TLS stream the hand-off can take apart: the transport and the rustls session.
pub trait TunnelTls {
    type Data;
    /// Whether this is the connecting side (the importer).
    const CLIENT: bool;
    fn parts(&mut self) -> (&mut PeerIo, &mut ConnectionCommon<Self::Data>);
    fn into_parts(self) -> (PeerIo, rustls::Connection);
}

impl TunnelTls for tokio_rustls::client::TlsStream<PeerIo> {
    type Data = ClientConnectionData;
    const CLIENT: bool = true;
    fn parts(&mut self) -> (&mut PeerIo, &mut ConnectionCommon<ClientConnectionData>) {
        let (io, conn) = self.get_mut();
        (io, conn)
    }
    fn into_parts(self) -> (PeerIo, rustls::Connection) {
        let (io, conn) = self.into_inner();
        (io, conn.into())
    }
}

impl TunnelTls for tokio_rustls::server::TlsStream<PeerIo> {
    type Data = ServerConnectionData;
    const CLIENT: bool = false;
    fn parts(&mut self) -> (&mut PeerIo, &mut ConnectionCommon<ServerConnectionData>) {
        let (io, conn) = self.get_mut();
        (io, conn)
    }
    fn into_parts(self) -> (PeerIo, rustls::Connection) {
        let (io, conn) = self.into_inner();
        (io, conn.into())
    }
}

/// A boxed stream, as the connection handlers keep it (so that each layer of the connection's
/// task holds a pointer, not a copy of the rustls session).
impl<T: TunnelTls> TunnelTls for Box<T> {
    type Data = T::Data;
    const CLIENT: bool = T::CLIENT;
    fn parts(&mut self) -> (&mut PeerIo, &mut ConnectionCommon<T::Data>) {
        (**self).parts()
    }
    fn into_parts(self) -> (PeerIo, rustls::Connection) {
        (*self).into_parts()
    }
}

/// What became of a hand-off.
pub enum Handoff<S> {
    /// The kernel has the session; the plaintext rustls had received goes to the local
    /// socket first.
    Kernel(Tunnel, Vec<u8>),
    /// The kernel did not take it; the stream carries on in userspace, after the plaintext
    /// already taken out of rustls (on the way to a record boundary), which goes to the
    /// local socket first.
    Userspace(S, Fallback, Vec<u8>),
    /// The session was lost half-way: reset the connection.
    Failed(io::Error),
}

/// Why the kernel refused `TCP_ULP` "tls" on a tunnel socket. It takes it only on an
/// ESTABLISHED socket and says `ENOTCONN` otherwise: at the hand-off that means the peer's
/// FIN (or reset) came first, which is the peer closing, not a kernel without kTLS.
fn ulp_refused(e: ktls_core::Error) -> Fallback {
    match &e {
        ktls_core::Error::Ulp(io) if io.raw_os_error() == Some(libc::ENOTCONN) => {
            Fallback::PeerClosed
        }
        _ => Fallback::Ulp(e.to_string()),
    }
}

/// Why a connection stayed in userspace.
#[derive(Debug)]
pub enum Fallback {
    Version,
    Cipher,
    Ulp(String),
    Buffered,
    PeerClosed,
    PendingWrite,
}

impl Fallback {
    /// The `result` label of `clink_ktls_handoffs_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Fallback::Version => "fallback-version",
            Fallback::Cipher => "fallback-cipher",
            Fallback::Ulp(_) => "fallback-no-ktls",
            Fallback::Buffered => "fallback-buffered",
            Fallback::PeerClosed => "fallback-peer-closed",
            Fallback::PendingWrite => "fallback-pending-write",
        }
    }
}

impl std::fmt::Display for Fallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fallback::Version => f.write_str("the tunnel is not TLS 1.3"),
            Fallback::Cipher => f.write_str("the kernel does not take the negotiated cipher"),
            Fallback::Ulp(e) => write!(f, "the socket does not take kernel TLS: {e}"),
            Fallback::Buffered => f.write_str("rustls holds too much unread plaintext"),
            Fallback::PeerClosed => {
                f.write_str("the peer already closed its side (TLS close_notify or TCP FIN)")
            }
            Fallback::PendingWrite => f.write_str("rustls still has records to send"),
        }
    }
}

/// A tunnel socket whose TLS records the kernel makes and reads.
pub struct Tunnel {
    tcp: TcpStream,
    client: bool,
    suite: CipherSuite,
    /// Bytes TCP had queued when the kernel took over (all written by rustls).
    queued_at_handoff: u64,
    tx_seq_at_handoff: u64,
    budget: RecordBudget,
}

/// Holds a kTLS tunnel's sending side to its cipher's confidentiality limit: the records one
/// key may encrypt (rustls updates keys before it; the kernel cannot). Every record carries at
/// least one payload byte, so after reading the kernel's record sequence `seq`, the next
/// `limit - seq - RECORD_MARGIN` bytes cannot take it past the margin, and the sequence is
/// read again only after that many: with full records that is every 16 MiB at first, and
/// the reads get
/// closer together only near the limit, where [`RecordBudget::allowance`] also makes the
/// `splice` calls no larger than what is left to send before the next read. The tunnel is
/// reset while [`RECORD_MARGIN`] records are left: room for the `close_notify`.
#[derive(Debug)]
pub struct RecordBudget {
    limit: u64,
    /// Payload bytes sent since the sequence was last read.
    unchecked: AtomicU64,
    /// How many may be sent before it must be read again.
    check_after: AtomicU64,
}

/// A kTLS tunnel's key encrypted as many records as its cipher allows.
#[derive(Debug, thiserror::Error)]
#[error(
    "the tunnel's key encrypted {records} TLS records, the cipher's limit is {limit}: the \
     kernel cannot update keys, so the connection is reset"
)]
pub struct RecordLimit {
    records: u64,
    limit: u64,
}

impl RecordLimit {
    /// Whether `e` is the pump's error for a tunnel that reached its record limit.
    pub fn is(e: &io::Error) -> bool {
        e.get_ref().is_some_and(|inner| inner.is::<RecordLimit>())
    }
}

/// Records left under the limit at which a tunnel is reset.
const RECORD_MARGIN: u64 = 16;

impl RecordBudget {
    fn new(limit: u64, seq: u64) -> RecordBudget {
        RecordBudget {
            limit,
            unchecked: AtomicU64::new(0),
            check_after: AtomicU64::new(limit.saturating_sub(seq + RECORD_MARGIN)),
        }
    }

    /// The most bytes the next send may carry: what is left before the sequence must be read
    /// again (at least one byte, which makes at most one record).
    fn allowance(&self) -> u64 {
        let (after, sent) = (self.check_after.load(Relaxed), self.unchecked.load(Relaxed));
        after.saturating_sub(sent).max(1)
    }

    /// Counts `n` payload bytes sent; `seq` reads the record sequence when it is due. Fails
    /// when the tunnel must not send more under this key.
    fn charge(&self, n: u64, seq: impl FnOnce() -> io::Result<u64>) -> io::Result<()> {
        let unchecked = self.unchecked.fetch_add(n, Relaxed) + n;
        if unchecked < self.check_after.load(Relaxed) {
            return Ok(());
        }
        let seq = seq()?;
        let left = self.limit.saturating_sub(seq);
        if left <= RECORD_MARGIN {
            return Err(io::Error::other(RecordLimit {
                records: seq,
                limit: self.limit,
            }));
        }
        self.unchecked.store(0, Relaxed);
        self.check_after.store(left - RECORD_MARGIN, Relaxed);
        Ok(())
    }
}

/// A record that is not application data, or data `recvmsg` returned with one.
#[derive(Debug, PartialEq, Eq)]
pub enum Control {
    Data(Vec<u8>),
    CloseNotify,
    Ignored,
}

impl Tunnel {
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Counts `n` payload bytes spliced into the tunnel; fails (and the caller resets the
    /// connection) once its key must not encrypt more ([`RecordBudget`]).
    pub fn count_sent(&self, n: usize) -> io::Result<()> {
        self.budget
            .charge(n as u64, || tx_record_seq(&self.tcp, self.suite))
    }

    /// The most bytes the next `splice` into the tunnel may move (see [`RecordBudget`]).
    pub fn send_allowance(&self) -> usize {
        usize::try_from(self.budget.allowance()).unwrap_or(usize::MAX)
    }

    /// Lowers the record limit to `records` past the current sequence, for tests that reach
    /// it without sending 256 GiB.
    #[cfg(test)]
    fn limit_records(&mut self, records: u64) -> io::Result<()> {
        let seq = tx_record_seq(&self.tcp, self.suite)?;
        self.budget = RecordBudget::new(seq + records, seq);
        Ok(())
    }

    /// Whether `splice` from the socket failed because the next record is not data.
    pub fn is_control_record(e: &io::Error) -> bool {
        matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EIO))
    }

    /// Reads the record `splice` refused, with its type.
    pub fn read_control(&self) -> io::Result<Control> {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, TlsGetRecordType};
        let mut buf = vec![0u8; MAX_RECORD];
        let mut space = nix::cmsg_space!(u8);
        let (len, record_type) = {
            let mut iov = [io::IoSliceMut::new(&mut buf)];
            let msg = recvmsg::<()>(
                self.tcp.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_DONTWAIT,
            )?;
            let mut record_type = None;
            for cmsg in msg.cmsgs()? {
                if let ControlMessageOwned::TlsGetRecordType(t) = cmsg {
                    record_type = Some(match t {
                        TlsGetRecordType::ChangeCipherSpec => 20,
                        TlsGetRecordType::Alert => 21,
                        TlsGetRecordType::Handshake => 22,
                        TlsGetRecordType::ApplicationData => 23,
                        TlsGetRecordType::Unknown(t) => t,
                        _ => 0,
                    });
                }
            }
            (msg.bytes, record_type)
        };
        let Some(record_type) = record_type else {
            return Err(io::Error::other(
                "recvmsg on the kTLS socket returned no record type",
            ));
        };
        buf.truncate(len);
        classify(record_type, buf, self.client)
    }

    /// The half-close of the sending side after `sent` payload bytes: `close_notify`, then
    /// FIN once TCP holds every record (see the module documentation).
    pub async fn close_write(&self, sent: u64) -> io::Result<()> {
        let mut alert = [1u8, 0]; // warning, close_notify
        loop {
            self.tcp.writable().await?;
            match self.tcp.try_io(Interest::WRITABLE, || {
                send_tls_control_message(self.tcp.as_raw_fd(), ContentType::Alert, &mut alert)
            }) {
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        self.flushed(sent + alert.len() as u64).await?;
        socket2::SockRef::from(&self.tcp).shutdown(Shutdown::Write)
    }

    /// Waits until TCP has queued every record made from `plaintext` bytes.
    async fn flushed(&self, plaintext: u64) -> io::Result<()> {
        let mut pause = Duration::from_micros(200);
        let mut last = 0;
        let mut since = tokio::time::Instant::now();
        loop {
            let records = tx_record_seq(&self.tcp, self.suite)? - self.tx_seq_at_handoff;
            let expected = self.queued_at_handoff + plaintext + RECORD_OVERHEAD * records;
            let queued = bytes_queued_ever(&self.tcp)?;
            if queued >= expected {
                if queued > expected {
                    debug!(
                        queued,
                        expected, "TCP holds more than the records account for"
                    );
                }
                return Ok(());
            }
            if queued != last {
                last = queued;
                since = tokio::time::Instant::now();
            } else if since.elapsed() > FLUSH_STALL {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the kernel did not pass its last TLS records to TCP",
                ));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }
}

/// The sequence number of the next record the kernel will make (`getsockopt(SOL_TLS,
/// TLS_TX)` answers with the crypto info, record sequence included).
fn tx_record_seq(tcp: &TcpStream, suite: CipherSuite) -> io::Result<u64> {
    fn get<T>(fd: impl AsFd, rec_seq: impl FnOnce(&T) -> [u8; 8]) -> io::Result<u64> {
        // SAFETY: the tls12_crypto_info_* structs are plain bytes; all zeros is valid.
        let mut info: T = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<T>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `info`.
        let ret = unsafe {
            libc::getsockopt(
                fd.as_fd().as_raw_fd(),
                libc::SOL_TLS,
                libc::TLS_TX,
                (&raw mut info).cast(),
                &raw mut len,
            )
        };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(u64::from_be_bytes(rec_seq(&info)))
    }
    match suite {
        CipherSuite::TLS13_AES_128_GCM_SHA256 => {
            get(tcp, |i: &libc::tls12_crypto_info_aes_gcm_128| i.rec_seq)
        }
        CipherSuite::TLS13_AES_256_GCM_SHA384 => {
            get(tcp, |i: &libc::tls12_crypto_info_aes_gcm_256| i.rec_seq)
        }
        _ => get(tcp, |i: &libc::tls12_crypto_info_chacha20_poly1305| {
            i.rec_seq
        }),
    }
}

/// What a record that `splice` refused means for the connection (see the module
/// documentation). Input from the network: every malformed record is an error, none panics.
fn classify(record_type: u8, payload: Vec<u8>, client: bool) -> io::Result<Control> {
    const ALERT: u8 = 21;
    const HANDSHAKE: u8 = 22;
    const APPLICATION_DATA: u8 = 23;
    const NEW_SESSION_TICKET: u8 = 4;
    const KEY_UPDATE: u8 = 24;
    let fatal = |what: String| Err(io::Error::new(io::ErrorKind::ConnectionAborted, what));
    match record_type {
        APPLICATION_DATA => Ok(Control::Data(payload)),
        ALERT => match payload[..] {
            [_, 0] => Ok(Control::CloseNotify),
            [level, description] => fatal(format!(
                "the peer sent TLS alert {description} (level {level})"
            )),
            _ => fatal("the peer sent a malformed TLS alert".into()),
        },
        HANDSHAKE => {
            let mut rest = &payload[..];
            while !rest.is_empty() {
                let [kind, a, b, c, body @ ..] = rest else {
                    return fatal("the peer sent a truncated handshake message".into());
                };
                let len = u32::from_be_bytes([0, *a, *b, *c]) as usize;
                let Some(after) = body.get(len..) else {
                    return fatal("the peer sent a truncated handshake message".into());
                };
                match *kind {
                    NEW_SESSION_TICKET if client => {}
                    KEY_UPDATE => {
                        return fatal(
                            "the peer sent a TLS KeyUpdate, which the kTLS path cannot follow"
                                .into(),
                        )
                    }
                    other => return fatal(format!("the peer sent handshake message {other}")),
                }
                rest = after;
            }
            Ok(Control::Ignored)
        }
        other => fatal(format!("the peer sent a TLS record of type {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        peer::io::peer_io,
        testing::{receive_hashed as receive, send_pattern as send, tcp_pair as local_pair},
        tls::{create_fabric, create_peer_cert, Identity},
    };
    use rustls::{crypto::ring::cipher_suite, pki_types::ServerName, SupportedCipherSuite};
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };
    use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};

    /// The kernel's kTLS, or `None` (and a line saying why the test is skipped) where it has
    /// none. With `CLINK_REQUIRE_KTLS=1` (the VM harness) a kernel without it fails the test.
    fn ktls_or_skip(test: &str) -> Option<Ktls> {
        clink_testbed::require_ktls(test).then(|| Ktls::probe().expect("probed just now"))
    }

    /// A client and a server TLS stream over loopback, configured as the kTLS path
    /// configures them, with `suite` the only cipher suite.
    async fn tls_pair(
        suite: SupportedCipherSuite,
    ) -> (client::TlsStream<PeerIo>, server::TlsStream<PeerIo>) {
        let dir = tempfile::tempdir().unwrap();
        create_fabric("f", dir.path()).unwrap();
        create_peer_cert("peer-a", "f", dir.path()).unwrap();
        let provider = Arc::new(rustls::crypto::CryptoProvider {
            cipher_suites: vec![suite],
            ..rustls::crypto::ring::default_provider()
        });
        let identity = Identity::load_with(&dir.path().join("peer-a"), "peer-a", provider)
            .unwrap()
            .for_ktls();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(identity.server.clone());
        let accept = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            acceptor.accept(peer_io(tcp)).await.unwrap()
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("peer-a").unwrap();
        let client = TlsConnector::from(identity.client.clone())
            .connect(name, peer_io(tcp))
            .await
            .unwrap();
        (client, accept.await.unwrap())
    }

    use std::sync::Arc;

    const SUITES: [SupportedCipherSuite; 3] = [
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];

    /// The peer's FIN before the hand-off is counted as the peer closing: the kernel refuses
    /// the TLS ULP on a socket past ESTABLISHED with `ENOTCONN`. Without kTLS the same call
    /// fails for want of the `tls` module, which stays `fallback-no-ktls`.
    #[test]
    fn a_socket_the_peer_closed_is_refused_as_peer_closed() {
        let ktls = ktls_or_skip("a_socket_the_peer_closed_is_refused_as_peer_closed");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tunnel = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (peer, _) = listener.accept().unwrap();
        peer.shutdown(std::net::Shutdown::Write).unwrap();
        tunnel
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        assert_eq!(
            tunnel.peek(&mut [0u8; 1]).unwrap(),
            0,
            "the FIN has arrived"
        );
        let why = ulp_refused(setup_ulp(&tunnel).expect_err("the ULP on a closing socket"));
        let expected = match ktls {
            Some(_) => "fallback-peer-closed",
            None => "fallback-no-ktls",
        };
        assert_eq!(why.label(), expected, "{why}");
        // An established socket still takes it where the kernel has kTLS.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let open = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        assert_eq!(setup_ulp(&open).is_ok(), ktls.is_some());
    }

    /// rustls's secrets become the kernel's crypto info for every suite we offer; the two
    /// ends' secrets mirror each other (one side's TX is the other's RX, sequence included).
    #[tokio::test]
    async fn secrets_become_kernel_crypto_info_for_every_suite() {
        fn key_of(secrets: &rustls::ConnectionTrafficSecrets) -> Vec<u8> {
            match secrets {
                rustls::ConnectionTrafficSecrets::Aes128Gcm { key, iv }
                | rustls::ConnectionTrafficSecrets::Aes256Gcm { key, iv }
                | rustls::ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                    [key.as_ref(), iv.as_ref()].concat()
                }
                _ => unreachable!("only AEADs the kernel has"),
            }
        }
        for suite in SUITES {
            let (mut client, mut server) = tls_pair(suite).await;
            server.write_all(b"200").await.unwrap();
            server.flush().await.unwrap();
            let mut answer = [0u8; 3];
            client.read_exact(&mut answer).await.unwrap();
            let (_, client) = client.into_parts();
            let (_, server) = server.into_parts();
            let client = client.dangerous_extract_secrets().unwrap();
            let server = server.dangerous_extract_secrets().unwrap();
            assert_eq!(client.rx.0, server.tx.0, "{suite:?}");
            assert_eq!(client.tx.0, server.rx.0, "{suite:?}");
            assert_eq!(key_of(&client.rx.1), key_of(&server.tx.1), "{suite:?}");
            assert_eq!(key_of(&client.tx.1), key_of(&server.rx.1), "{suite:?}");
            let converted = ktls_core::ExtractedSecrets::try_from(client).unwrap();
            let (seq, tx) = converted.tx;
            TlsCryptoInfoTx::new(ProtocolVersion::TLSv1_3, tx, seq).unwrap();
            let (seq, rx) = converted.rx;
            TlsCryptoInfoRx::new(ProtocolVersion::TLSv1_3, rx, seq).unwrap();
        }
    }

    /// Plaintext rustls decrypted past the answer is not lost by a hand-off: without kernel
    /// TLS the stream carries on in userspace and still yields it; with it, the hand-off
    /// returns it, and then 64 MiB each way go through two kTLS sockets and the splice pump
    /// (content by SHA-256, half-close passed on as close_notify + FIN).
    #[tokio::test]
    async fn a_handoff_keeps_every_byte_in_the_kernel_or_in_userspace() {
        let ktls = ktls_or_skip("a_handoff_keeps_every_byte_in_the_kernel_or_in_userspace");
        for suite in SUITES {
            let (mut client, mut server) = tls_pair(suite).await;
            let early: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
            // The answer and early payload in one record: rustls decrypts both at once.
            server
                .write_all(&[b"200\n".as_slice(), &early].concat())
                .await
                .unwrap();
            server.flush().await.unwrap();
            let mut answer = [0u8; 4];
            client.read_exact(&mut answer).await.unwrap();
            let Some(ktls) = &ktls else {
                let fake = Ktls {
                    aes_128_gcm: true,
                    aes_256_gcm: true,
                    chacha20_poly1305: true,
                };
                let Handoff::Userspace(mut client, why, taken) = fake.handoff(client).await else {
                    panic!("a kernel without kTLS took a session");
                };
                assert_eq!(why.label(), "fallback-no-ktls", "{why}");
                assert!(
                    taken.is_empty(),
                    "nothing is taken from rustls before the checks"
                );
                let mut got = vec![0u8; early.len()];
                client.read_exact(&mut got).await.unwrap();
                assert_eq!(got, early);
                client.write_all(b"still rustls").await.unwrap();
                client.flush().await.unwrap();
                let mut back = [0u8; 12];
                server.read_exact(&mut back).await.unwrap();
                assert_eq!(&back, b"still rustls");
                continue;
            };
            if !ktls.takes(suite.suite()) {
                eprintln!("{suite:?}: the kernel does not take it; skipped");
                continue;
            }
            let (client, plaintext) = match ktls.handoff(client).await {
                Handoff::Kernel(tunnel, plaintext) => (tunnel, plaintext),
                Handoff::Userspace(_, why, _) => panic!("{suite:?}: stayed in userspace: {why}"),
                Handoff::Failed(e) => panic!("{suite:?}: {e}"),
            };
            assert_eq!(plaintext, early, "{suite:?}");
            let server = match ktls.handoff(server).await {
                Handoff::Kernel(tunnel, plaintext) => {
                    assert!(plaintext.is_empty());
                    tunnel
                }
                Handoff::Userspace(_, why, _) => panic!("{suite:?}: stayed in userspace: {why}"),
                Handoff::Failed(e) => panic!("{suite:?}: {e}"),
            };
            through_two_kernel_tunnels(client, server).await;
        }
    }

    /// The record budget never lets the sequence pass the limit, even if every record held
    /// one byte, and reads it rarely when records are full: simulated senders, each splice
    /// up to 128 KiB as the pump's, and the budget's own allowance.
    #[test]
    fn the_record_budget_stops_before_the_limit_and_reads_rarely() {
        const LIMIT: u64 = 1 << 24;
        const FILL: u64 = 128 * 1024;
        // (records per splice of n bytes, smallest expected reads, largest)
        let full = |n: u64| n.div_ceil(16 * 1024);
        let tiny = |n: u64| n;
        for (name, records_of, start) in [
            ("full records", &full as &dyn Fn(u64) -> u64, 0),
            ("one byte per record", &tiny, 0),
            ("full records, late hand-off", &full, LIMIT - 100_000),
        ] {
            let budget = RecordBudget::new(LIMIT, start);
            let (mut seq, mut reads, mut sent) = (start, 0u64, 0u64);
            let error = loop {
                let n = FILL.min(budget.allowance());
                seq += records_of(n);
                sent += n;
                assert!(seq <= LIMIT, "{name}: sequence {seq} past the limit");
                let read = || {
                    reads += 1;
                    Ok(seq)
                };
                if let Err(e) = budget.charge(n, read) {
                    break e;
                }
            };
            assert!(
                seq >= LIMIT - RECORD_MARGIN - 16,
                "{name}: stopped early at {seq}"
            );
            assert!(error.to_string().contains("limit is 16777216"), "{error}");
            if name == "full records" {
                // 256 GiB in full records, less the partial records of the smaller sends
                // near the end (under 1% of the bytes), with a read per MiB or fewer.
                assert!(sent > LIMIT * 16 * 1024 / 100 * 99, "{name}: {sent}");
                eprintln!("{name}: {reads} reads of the sequence for {sent} bytes");
                assert!(reads < sent >> 20, "{name}: {reads} reads for {sent} bytes");
            }
        }
        // No limit to speak of (ChaCha20-Poly1305): never read.
        let budget = RecordBudget::new(u64::MAX, 7);
        for _ in 0..1000 {
            budget
                .charge(FILL, || panic!("read without a limit"))
                .unwrap();
        }
    }

    /// In the kernel: a tunnel whose key reaches its record limit is reset by the pump, the
    /// kernel's sequence stays under the limit, and the data sent before arrives intact.
    #[tokio::test]
    async fn a_tunnel_at_its_record_limit_is_reset_before_it() {
        let Some(ktls) = ktls_or_skip("a_tunnel_at_its_record_limit_is_reset_before_it") else {
            return;
        };
        const RECORDS: u64 = 2000;
        let (mut client, mut server) = tls_pair(SUITES[0]).await;
        server.write_all(b"200\n").await.unwrap();
        server.flush().await.unwrap();
        let mut answer = [0u8; 4];
        client.read_exact(&mut answer).await.unwrap();
        let mut client = in_kernel(ktls.handoff(client).await);
        let server = in_kernel(ktls.handoff(server).await);
        let start = tx_record_seq(client.tcp(), client.suite).unwrap();
        client.limit_records(RECORDS).unwrap();
        let (app, app_local) = local_pair().await;
        let (service_local, service) = local_pair().await;
        let (a, b) = (
            pump_task(app_local, client),
            pump_task(service_local, server),
        );
        let (_app_r, app_w) = app.into_split();
        let (service_r, _service_w) = service.into_split();
        // Far more than 2,000 records' worth: the sender fails once the tunnel is reset.
        let up = tokio::spawn(send(app_w, 1, 256 * 1024 * 1024));
        let at_service = tokio::spawn(receive(service_r));
        let (outcome, client) = a.await.unwrap();
        let seq = tx_record_seq(client.tcp(), client.suite).unwrap();
        drop(client); // the reset the pump armed reaches the far side

        let error = outcome.error.expect("the pump ended with an error");
        assert!(RecordLimit::is(&error), "{error}");
        assert!(error.to_string().contains("cannot update keys"), "{error}");
        assert!(
            seq <= start + RECORDS,
            "sequence {seq}, limit {}",
            start + RECORDS
        );
        assert!(
            seq >= start + RECORDS - RECORD_MARGIN - 16,
            "stopped early: {seq}"
        );
        assert!(outcome.to_tunnel > 0);
        let (far_side, _) = b.await.unwrap();
        assert!(far_side.error.is_some(), "the far side saw a clean end");
        assert!(
            far_side.from_tunnel <= outcome.to_tunnel,
            "{} arrived, {} sent",
            far_side.from_tunnel,
            outcome.to_tunnel
        );
        let _ = up.await;
        let _ = at_service.await;
    }

    /// The tunnel a hand-off gave the kernel; panics if it stayed in userspace or failed.
    fn in_kernel<S>(handoff: Handoff<S>) -> Tunnel {
        match handoff {
            Handoff::Kernel(tunnel, _) => tunnel,
            Handoff::Userspace(_, why, _) => panic!("stayed in userspace: {why}"),
            Handoff::Failed(e) => panic!("{e}"),
        }
    }

    /// The pump between `local` and a kernel tunnel, in a task that gives the tunnel back.
    fn pump_task(
        local: TcpStream,
        tunnel: Tunnel,
    ) -> tokio::task::JoinHandle<(super::super::splice::Outcome, Tunnel)> {
        tokio::spawn(async move {
            let outcome = super::super::splice::pump(
                &local,
                tunnel.tcp(),
                Some(&tunnel),
                &Default::default(),
            )
            .await;
            (outcome, tunnel)
        })
    }

    /// app <-> pump <-> kTLS client socket <-> kTLS server socket <-> pump <-> service.
    async fn through_two_kernel_tunnels(client: Tunnel, server: Tunnel) {
        const LEN: usize = 64 * 1024 * 1024;
        let (app, app_local) = local_pair().await;
        let (service_local, service) = local_pair().await;
        let (a, b) = (
            pump_task(app_local, client),
            pump_task(service_local, server),
        );
        let (app_r, app_w) = app.into_split();
        let (service_r, service_w) = service.into_split();
        let up = tokio::spawn(send(app_w, 1, LEN));
        let down = tokio::spawn(send(service_w, 2, LEN));
        let at_service = tokio::spawn(receive(service_r));
        let at_app = tokio::spawn(receive(app_r));
        let (sent_up, sent_down) = (up.await.unwrap(), down.await.unwrap());
        assert_eq!(at_service.await.unwrap(), (LEN, sent_up));
        assert_eq!(at_app.await.unwrap(), (LEN, sent_down));
        for (pump, _) in [a.await.unwrap(), b.await.unwrap()] {
            assert!(pump.error.is_none(), "{:?}", pump.error);
            assert_eq!((pump.to_tunnel, pump.from_tunnel), (LEN as u64, LEN as u64));
        }
    }

    /// A broken or hostile peer on a kernel tunnel: a KeyUpdate (which the kernel cannot
    /// follow), a record that does not decrypt, and a close in the middle of a record. Each
    /// ends the pump with an error that says what happened, promptly, and the local end of
    /// the connection sees a reset: never a hang, and never a clean end of stream that would
    /// pass truncated data off as complete.
    #[tokio::test]
    async fn a_broken_peer_resets_the_local_connection() {
        let Some(ktls) = ktls_or_skip("a_broken_peer_resets_the_local_connection") else {
            return;
        };
        for case in ["key-update", "garbage", "cut-record"] {
            let (mut peer, mut server) = tls_pair(SUITES[0]).await;
            server.write_all(b"200\n").await.unwrap();
            server.flush().await.unwrap();
            let mut answer = [0u8; 4];
            peer.read_exact(&mut answer).await.unwrap();
            let tunnel = in_kernel(ktls.handoff(server).await);
            let (mut app, app_local) = local_pair().await;
            let pump = pump_task(app_local, tunnel);
            // A little real data first: it must arrive before the failure.
            peer.write_all(b"hello").await.unwrap();
            peer.flush().await.unwrap();
            let mut hello = [0u8; 5];
            app.read_exact(&mut hello).await.unwrap();
            assert_eq!(&hello, b"hello");
            let raw = peer.get_ref().0.get_ref();
            match case {
                "key-update" => {
                    peer.get_mut().1.refresh_traffic_keys().unwrap();
                    peer.flush().await.unwrap();
                }
                // An application-data record the kernel cannot decrypt.
                "garbage" => {
                    write_raw(raw, &[[23, 3, 3, 0, 32].as_slice(), &[0x5a; 32]].concat()).await
                }
                // A record header promising 100 bytes, 10 of them, then FIN.
                _ => {
                    write_raw(raw, &[[23, 3, 3, 0, 100].as_slice(), &[7; 10]].concat()).await;
                    socket2::SockRef::from(raw)
                        .shutdown(std::net::Shutdown::Write)
                        .unwrap();
                }
            }
            // The task closed the local end; dropping the tunnel here closes the other (both
            // with a reset after an error).
            let (outcome, _) = tokio::time::timeout(std::time::Duration::from_secs(30), pump)
                .await
                .unwrap_or_else(|_| panic!("{case}: the pump hangs"))
                .unwrap();
            let error = outcome
                .error
                .unwrap_or_else(|| panic!("{case}: ended without an error"));
            eprintln!("{case}: {error}");
            let mut rest = Vec::new();
            let read = app.read_to_end(&mut rest).await;
            assert!(
                matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
                "{case}: the local end saw {read:?} after {} more bytes, not a reset",
                rest.len()
            );
        }
    }

    async fn write_raw(tcp: &TcpStream, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            tcp.writable().await.unwrap();
            match tcp.try_write(bytes) {
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn records_that_are_not_data() {
        assert_eq!(
            classify(23, b"abc".to_vec(), true).unwrap(),
            Control::Data(b"abc".to_vec())
        );
        assert_eq!(
            classify(21, vec![1, 0], true).unwrap(),
            Control::CloseNotify
        );
        let err = classify(21, vec![2, 40], false).unwrap_err();
        assert!(err.to_string().contains("alert 40"), "{err}");
        assert!(classify(21, vec![1], false).is_err());
        assert!(classify(21, vec![], false).is_err());
        // Two NewSessionTickets in one record: ignored by a client, refused by a server.
        let ticket = [4u8, 0, 0, 2, 9, 9];
        let tickets = [ticket, ticket].concat();
        assert_eq!(
            classify(22, tickets.clone(), true).unwrap(),
            Control::Ignored
        );
        assert!(classify(22, tickets, false).is_err());
        let err = classify(22, vec![24, 0, 0, 1, 0], true).unwrap_err();
        assert!(err.to_string().contains("KeyUpdate"), "{err}");
        // Lengths past the record, headers cut short, unknown types.
        assert!(classify(22, vec![4, 0, 0, 9, 1], true).is_err());
        assert!(classify(22, vec![4, 0], true).is_err());
        assert!(classify(22, vec![4, 0xff, 0xff, 0xff], true).is_err());
        assert!(classify(20, vec![1], true).is_err());
        assert!(classify(99, vec![], true).is_err());
    }
}
