//! Moving bytes between the two legs of a tunneled connection on the userspace path.
//!
//! Each direction has one 64 KiB buffer, allocated once per connection: large enough that a
//! TLS leg fills four full 16 KiB records per read, small enough that 1,000 connections cost
//! 128 MiB at most and far less in practice (tokio only touches what it fills). End of stream
//! on one side becomes a shutdown of the other side's write half (half-close); an error on
//! either side (a reset) resets both TCP connections so the far ends see it too.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

pub const BUFFER_SIZE: usize = 64 * 1024;

/// rustls pulls ciphertext from its transport at most 4 KiB at a time; reading the TCP socket
/// through a 64 KiB buffer instead turns ~16 `recvmsg` calls into one, for one extra copy of
/// data that is in cache anyway. Writes pass straight through (rustls already hands the
/// socket whole records with `writev`).
pub const TLS_READ_BUFFER: usize = 64 * 1024;

/// The transport under every peer TLS connection.
pub type PeerIo = tokio::io::BufReader<TcpStream>;

pub fn peer_io(tcp: TcpStream) -> PeerIo {
    tokio::io::BufReader::with_capacity(TLS_READ_BUFFER, tcp)
}

/// A stream that runs over one TCP connection, so it can be reset.
pub trait OverTcp: AsyncRead + AsyncWrite + Unpin {
    fn tcp(&self) -> &TcpStream;
}

impl OverTcp for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl OverTcp for tokio_rustls::client::TlsStream<PeerIo> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0.get_ref()
    }
}

impl OverTcp for tokio_rustls::server::TlsStream<PeerIo> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0.get_ref()
    }
}

/// Makes the next close of `tcp` send RST instead of FIN.
pub fn arm_reset(tcp: &TcpStream) {
    // Failure only means the socket is already gone; nothing to propagate then.
    let _ = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO));
}

/// Counts the bytes read through it; the relay reports them when the connection ends.
struct Counted<T> {
    inner: T,
    read: u64,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.read += (buf.filled().len() - before) as u64;
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// How a relayed connection ended.
#[derive(Debug)]
pub struct Outcome {
    /// Bytes read from `a` (and so sent towards `b`).
    pub a_to_b: u64,
    /// Bytes read from `b`.
    pub b_to_a: u64,
    /// Set when the connection ended by an error (and both sides were reset).
    pub error: Option<io::Error>,
}

/// Relays until both directions are closed or one fails.
pub async fn relay<A: OverTcp, B: OverTcp>(a: A, b: B) -> Outcome {
    let mut a = Counted { inner: a, read: 0 };
    let mut b = Counted { inner: b, read: 0 };
    let result =
        tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, BUFFER_SIZE, BUFFER_SIZE).await;
    let error = result.err();
    if error.is_some() {
        arm_reset(a.inner.tcp());
        arm_reset(b.inner.tcp());
    }
    Outcome {
        a_to_b: a.read,
        b_to_a: b.read,
        error,
    }
}
