//! Moving bytes between the two legs of a tunneled connection on the userspace path.
//!
//! Buffers grow with the traffic, so 1,000 quiet connections stay cheap and a bulk transfer
//! still moves 64 KiB per system call:
//!
//! * Each direction of the relay starts with a 4 KiB buffer. Every read that fills the buffer
//!   quadruples it, up to 64 KiB (4 -> 16 -> 64): large enough that a TLS leg is written as
//!   four full 16 KiB records at once, and a plaintext leg read in one `recvfrom`.
//! * rustls pulls ciphertext from its transport at most 4 KiB at a time. [`PeerIo`](crate::peer::io::PeerIo) reads the
//!   socket straight into rustls's buffer until a read comes back full (more is waiting), and
//!   from then on through its own 64 KiB buffer: one `recvfrom` instead of ~16, for one copy of
//!   data that is in cache anyway. Writes pass straight through (rustls already hands the
//!   socket whole records with `writev`).
//!
//! End of stream on one side becomes a shutdown of the other side's write half (half-close);
//! an error on either side (a reset) resets both TCP connections so the far ends see it too.
//! So does the agent ending the connection (idle, or no longer allowed: [`Lifetime`]), which
//! the relay polls before the two directions; the bytes moved are added to it per poll.

use std::{
    future::{poll_fn, Future as _},
    io,
    pin::{pin, Pin},
    task::{ready, Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use crate::{
    kernel::{sockopt::reset_on_close, LocalLeg},
    lifetime::Lifetime,
    peer::io::PeerIo,
};

/// The size relay buffers start at, and the largest they grow to.
pub const INITIAL_BUFFER: usize = 4 * 1024;
pub const MAX_BUFFER: usize = 64 * 1024;
/// A stream that runs over one TCP connection, so it can be reset.
pub trait OverTcp: AsyncRead + AsyncWrite + Unpin {
    fn tcp(&self) -> &TcpStream;
}

impl OverTcp for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl OverTcp for LocalLeg {
    fn tcp(&self) -> &TcpStream {
        LocalLeg::tcp(self)
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
    reset_on_close(tcp);
}

/// One direction of a relay: reads into a growing buffer, writes it out, and shuts the writer
/// down after the reader's end of stream.
struct Pipe {
    buf: Vec<u8>,
    pos: usize,
    filled: usize,
    read_done: bool,
    need_flush: bool,
    done: bool,
    moved: u64,
}

impl Pipe {
    fn new() -> Pipe {
        Pipe {
            buf: Vec::new(),
            pos: 0,
            filled: 0,
            read_done: false,
            need_flush: false,
            done: false,
            moved: 0,
        }
    }

    fn poll<R, W>(&mut self, cx: &mut Context<'_>, r: &mut R, w: &mut W) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            if self.pos == self.filled && !self.read_done {
                if self.buf.is_empty() {
                    self.buf = vec![0; INITIAL_BUFFER];
                } else if self.filled == self.buf.len() && self.buf.len() < MAX_BUFFER {
                    // The last read filled the buffer: there is more where it came from.
                    self.buf.resize(self.buf.len() * 4, 0);
                }
                let mut rb = ReadBuf::new(&mut self.buf);
                match Pin::new(&mut *r).poll_read(cx, &mut rb) {
                    Poll::Pending => {
                        if self.need_flush {
                            ready!(Pin::new(&mut *w).poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(res) => res?,
                }
                let n = rb.filled().len();
                self.pos = 0;
                self.filled = n;
                if n == 0 {
                    self.read_done = true;
                }
            }
            while self.pos < self.filled {
                let n = ready!(Pin::new(&mut *w).poll_write(cx, &self.buf[self.pos..self.filled]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                self.moved += n as u64;
                self.need_flush = true;
            }
            if self.read_done {
                ready!(Pin::new(&mut *w).poll_flush(cx))?;
                ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
                self.done = true;
                // Nothing more will be read this way: give the memory back.
                self.buf = Vec::new();
                return Poll::Ready(Ok(()));
            }
        }
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

/// Relays until both directions are closed, one fails, or `lifetime` is ended.
pub async fn relay<A: OverTcp, B: OverTcp>(mut a: A, mut b: B, lifetime: &Lifetime) -> Outcome {
    let (mut up, mut down) = (Pipe::new(), Pipe::new());
    let mut ended = pin!(lifetime.ended());
    let mut counted = 0;
    let result = poll_fn(|cx| {
        if let Poll::Ready(e) = ended.as_mut().poll(cx) {
            return Poll::Ready(Err(e));
        }
        let up_ready = up.poll(cx, &mut a, &mut b)?;
        let down_ready = down.poll(cx, &mut b, &mut a)?;
        // What the idle sweep looks at (an error ends the connection anyway).
        let moved = up.moved + down.moved;
        if moved != counted {
            lifetime.add_moved(moved - counted);
            counted = moved;
        }
        if up_ready.is_ready() && down_ready.is_ready() {
            Poll::Ready(Ok::<(), io::Error>(()))
        } else {
            Poll::Pending
        }
    })
    .await;
    let error = result.err();
    if error.is_some() {
        arm_reset(a.tcp());
        arm_reset(b.tcp());
    }
    Outcome {
        a_to_b: up.moved,
        b_to_a: down.moved,
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::tcp_pair as pair;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// client <-> (a relay b) <-> server, with half-close in both orders and a payload
    /// large enough to grow the buffers.
    #[tokio::test]
    async fn relays_both_ways_with_half_close_and_counts() {
        let (mut client, a) = pair().await;
        let (b, mut server) = pair().await;
        let relay = tokio::spawn(async move { relay(a, b, &Lifetime::default()).await });
        let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let expected = payload.clone();
        let server_task = tokio::spawn(async move {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            server.write_all(b"reply after FIN").await.unwrap();
            server.shutdown().await.unwrap();
            got
        });
        client.write_all(&payload).await.unwrap();
        client.shutdown().await.unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"reply after FIN");
        assert_eq!(server_task.await.unwrap(), expected);
        let outcome = relay.await.unwrap();
        assert!(outcome.error.is_none());
        assert_eq!(outcome.a_to_b, 1_000_000);
        assert_eq!(outcome.b_to_a, 15);
    }

    /// The agent ending the connection (idle, no longer allowed) resets both sides, and the
    /// outcome says why.
    #[tokio::test]
    async fn an_ending_resets_both_sides() {
        use crate::lifetime::{ending_of, Ending};
        let (mut client, a) = pair().await;
        let (b, mut server) = pair().await;
        let lifetime = std::sync::Arc::new(Lifetime::default());
        let relay = tokio::spawn({
            let lifetime = lifetime.clone();
            async move { relay(a, b, &lifetime).await }
        });
        client.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        server.read_exact(&mut got).await.unwrap();
        while lifetime.moved() < 5 {
            tokio::task::yield_now().await;
        }
        let why = Ending::Denied("egress deny by default (no policy matched)".into());
        assert!(lifetime.end(why.clone()));
        for side in [&mut client, &mut server] {
            let err = side.read(&mut got).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        }
        let outcome = relay.await.unwrap();
        assert_eq!(ending_of(outcome.error.as_ref().unwrap()), Some(&why));
        assert_eq!((outcome.a_to_b, outcome.b_to_a), (5, 0));
    }

    #[tokio::test]
    async fn a_reset_is_passed_on() {
        let (client, a) = pair().await;
        let (b, mut server) = pair().await;
        let relay = tokio::spawn(async move { relay(a, b, &Lifetime::default()).await });
        arm_reset(&client);
        drop(client);
        let mut buf = [0u8; 8];
        let err = server.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert!(relay.await.unwrap().error.is_some());
    }
}
