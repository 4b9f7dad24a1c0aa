//! Moving bytes between the two legs of a tunneled connection on the userspace path.
//!
//! A quiet connection holds no buffer, and a bulk transfer still moves 64 KiB per system call:
//!
//! * Each direction reads into its worker thread's 64 KiB scratch buffer and writes what it
//!   read straight away; only what a slower writer did not take is copied into a buffer of the
//!   direction's own, which is given back when a read finds the reader empty. Reads ask for
//!   4 KiB at first and four times more after every read that filled the request, up to
//!   64 KiB (4 -> 16 -> 64): large enough that a TLS leg is written as four full 16 KiB
//!   records at once, and a plaintext leg read in one `recvfrom`.
//! * A read goes on while the reader has bytes without waiting: a TLS reader hands out one
//!   record's plaintext per read, so records that arrived together leave in one write
//!   instead of one per record (docs/performance.md, "Small requests on the userspace
//!   path"). Nothing waits for more, so no byte is held back.
//! * rustls pulls ciphertext from its transport at most 4 KiB at a time. [`PeerIo`](crate::peer::io::PeerIo) reads the
//!   socket straight into rustls's buffer until a read comes back full (more is waiting), and
//!   from then on through its own 64 KiB buffer, until the socket is empty: one `recvfrom`
//!   instead of ~16, for one copy of data that is in cache anyway. Writes pass straight
//!   through (rustls already hands the socket whole records with `writev`).
//!
//! End of stream on one side becomes a shutdown of the other side's write half (half-close);
//! an error on either side (a reset) resets both TCP connections so the far ends see it too.
//! So does the agent ending the connection (idle, or no longer allowed: [`Lifetime`]), which
//! the relay polls before the two directions; the bytes moved are added to it per poll.

use std::{
    cell::RefCell,
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

/// The size relay reads start at, and the largest they grow to (the scratch buffer's size).
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

impl<T: OverTcp> OverTcp for Box<T> {
    fn tcp(&self) -> &TcpStream {
        (**self).tcp()
    }
}

/// Makes the next close of `tcp` send RST instead of FIN.
pub fn arm_reset(tcp: &TcpStream) {
    reset_on_close(tcp);
}

/// One direction of a relay: reads into its thread's scratch buffer, writes what it read at
/// once, keeps only what the writer did not take, and shuts the writer down after the
/// reader's end of stream.
///
/// A direction that waits for bytes holds no buffer: an idle tunneled connection costs the
/// relay nothing but this struct (ARCHITECTURE.md, "Buffers").
struct Pipe {
    /// Bytes read but not yet taken by a slower writer, from `pos` on. Its allocation is kept
    /// while bytes keep coming and given back when a read finds the reader empty.
    pending: Vec<u8>,
    pos: usize,
    /// How much the next read asks for: [`INITIAL_BUFFER`], quadrupled by every read that
    /// fills it, up to [`MAX_BUFFER`].
    window: usize,
    read_done: bool,
    need_flush: bool,
    done: bool,
    moved: u64,
}

/// What one read into the scratch buffer came to.
enum Step {
    /// Bytes were read and written, or kept for the writer.
    Moved,
    /// The same, and the reader's end of stream came right after them.
    MovedThenEof,
    /// End of stream.
    Eof,
    /// Nothing to read now.
    Idle,
}

thread_local! {
    /// The relay's read buffer, one per worker thread: every direction reads here and writes
    /// straight out, so a direction has a buffer of its own only while its writer is behind.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; MAX_BUFFER].into_boxed_slice());
}

impl Pipe {
    fn new() -> Pipe {
        Pipe {
            pending: Vec::new(),
            pos: 0,
            window: INITIAL_BUFFER,
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
            while self.pos < self.pending.len() {
                let n = ready!(Pin::new(&mut *w).poll_write(cx, &self.pending[self.pos..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                self.moved += n as u64;
                self.need_flush = true;
            }
            self.pending.clear();
            self.pos = 0;
            if self.read_done {
                ready!(Pin::new(&mut *w).poll_flush(cx))?;
                ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
                self.done = true;
                self.pending = Vec::new();
                return Poll::Ready(Ok(()));
            }
            let step = SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
                Ok(mut scratch) => self.read_and_write(cx, r, w, &mut scratch),
                // Only if a reader or writer ran a relay inside its own poll: a buffer of
                // its own for this one read.
                Err(_) => self.read_and_write(cx, r, w, &mut vec![0; self.window]),
            })?;
            match step {
                Step::Moved => {}
                Step::Eof | Step::MovedThenEof => self.read_done = true,
                Step::Idle => {
                    // The reader is empty: nothing is kept for it while it stays quiet.
                    self.pending = Vec::new();
                    if self.need_flush {
                        ready!(Pin::new(&mut *w).poll_flush(cx))?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// One read of up to `window` bytes into `scratch`, written out as far as the writer
    /// takes them without waiting; the rest is copied to `pending`.
    fn read_and_write<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
        scratch: &mut [u8],
    ) -> io::Result<Step>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let window = self.window.min(scratch.len());
        let mut rb = ReadBuf::new(&mut scratch[..window]);
        match Pin::new(&mut *r).poll_read(cx, &mut rb) {
            Poll::Pending => return Ok(Step::Idle),
            Poll::Ready(res) => res?,
        }
        if rb.filled().is_empty() {
            return Ok(Step::Eof);
        }
        // A TLS reader hands out one record's plaintext per read; what it already holds (the
        // records of one socket read) goes out in this write, one system call for all of them
        // instead of one per record. A plain socket's next read after a short one costs no
        // system call: tokio knows it was drained.
        // An error behind the bytes is returned after they are written, as when it came with
        // the next read: it resets both sides, and a reset is reported only once.
        let mut eof = false;
        let mut failed = None;
        while rb.remaining() > 0 {
            let before = rb.filled().len();
            match Pin::new(&mut *r).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().len() == before => {
                    eof = true;
                    break;
                }
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => {
                    failed = Some(e);
                    break;
                }
                Poll::Pending => break,
            }
        }
        let n = rb.filled().len();
        if n == window && self.window < MAX_BUFFER {
            // The read filled the window: there is more where it came from.
            self.window *= 4;
        }
        let mut written = 0;
        while written < n {
            match Pin::new(&mut *w).poll_write(cx, &scratch[written..n]) {
                Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(k)) => {
                    written += k;
                    self.moved += k as u64;
                    self.need_flush = true;
                }
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => break,
            }
        }
        self.pending.extend_from_slice(&scratch[written..n]);
        match failed {
            Some(e) => Err(e),
            None if eof => Ok(Step::MovedThenEof),
            None => Ok(Step::Moved),
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

    /// Keeps what it is given and counts the writes: the system calls a socket would see.
    #[derive(Default)]
    struct CountingWriter {
        got: Vec<u8>,
        writes: usize,
        shut: bool,
    }

    impl AsyncWrite for CountingWriter {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.got.extend_from_slice(buf);
            self.writes += 1;
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.shut = true;
            Poll::Ready(Ok(()))
        }
    }

    /// A TLS client and server over loopback, each over [`PeerIo`] as in the agent.
    async fn tls_pair() -> (
        tokio_rustls::client::TlsStream<PeerIo>,
        tokio_rustls::server::TlsStream<PeerIo>,
    ) {
        use crate::{
            peer::io::peer_io,
            tls::{create_fabric, create_peer_cert, Identity},
        };
        let dir = tempfile::tempdir().unwrap();
        create_fabric("f", dir.path()).unwrap();
        create_peer_cert("peer-a", "f", dir.path()).unwrap();
        let identity = Identity::load(&dir.path().join("peer-a"), "peer-a").unwrap();
        let (tcp_client, tcp_server) = pair().await;
        let acceptor = tokio_rustls::TlsAcceptor::from(identity.server.clone());
        let accept = tokio::spawn(async move { acceptor.accept(peer_io(tcp_server)).await });
        let name = rustls::pki_types::ServerName::try_from("peer-a").unwrap();
        let client = tokio_rustls::TlsConnector::from(identity.client.clone())
            .connect(name, peer_io(tcp_client))
            .await
            .unwrap();
        (client, accept.await.unwrap().unwrap())
    }

    /// Hands out one queued chunk per read, as tokio-rustls hands out one record's
    /// plaintext per read; then nothing (`Pending`), or the end of stream once `eof` is set.
    #[derive(Default)]
    struct RecordReader {
        records: std::collections::VecDeque<Vec<u8>>,
        eof: bool,
    }

    impl AsyncRead for RecordReader {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let Some(mut record) = self.records.pop_front() else {
                return if self.eof {
                    Poll::Ready(Ok(()))
                } else {
                    Poll::Pending
                };
            };
            let n = record.len().min(buf.remaining());
            buf.put_slice(&record[..n]);
            if n < record.len() {
                self.records.push_front(record.split_off(n));
            }
            Poll::Ready(Ok(()))
        }
    }

    /// Small records that arrived together leave the relay in one write, whole and in order,
    /// instead of one write per record; an end of stream right behind them still ends the
    /// direction after them.
    #[tokio::test]
    async fn records_read_together_are_written_in_one_go() {
        const RECORDS: usize = 16;
        const SIZE: usize = 64;
        let mut reader = RecordReader::default();
        let mut sent = Vec::new();
        for i in 0..RECORDS {
            let record: Vec<u8> = (0..SIZE).map(|j| (i * SIZE + j) as u8 ^ i as u8).collect();
            sent.extend_from_slice(&record);
            reader.records.push_back(record);
        }
        let mut pipe = Pipe::new();
        let mut out = CountingWriter::default();
        let step = poll_fn(|cx| Poll::Ready(pipe.poll(cx, &mut reader, &mut out))).await;
        assert!(step.is_pending(), "the direction stays open");
        assert_eq!(out.got, sent, "every byte, in order");
        assert_eq!(out.writes, 1, "{RECORDS} records, one write");
        assert_eq!(pipe.moved, (RECORDS * SIZE) as u64);

        // More records than the window holds: one write per window's worth.
        let big: Vec<u8> = (0..3 * INITIAL_BUFFER).map(|i| (i % 251) as u8).collect();
        for record in big.chunks(100) {
            reader.records.push_back(record.to_vec());
        }
        reader.records.push_back(b"last".to_vec());
        reader.eof = true;
        sent.extend_from_slice(&big);
        sent.extend_from_slice(b"last");
        let result = poll_fn(|cx| pipe.poll(cx, &mut reader, &mut out)).await;
        assert!(result.is_ok());
        assert_eq!(out.got, sent, "every byte, in order");
        assert!(out.shut, "the end of stream is passed on");
        assert!(out.writes <= 1 + 4, "{} writes", out.writes);
    }

    /// Bulk data through TLS over [`PeerIo`], in records of odd sizes, arrives intact.
    #[tokio::test]
    async fn bulk_through_tls_arrives_intact() {
        let (mut client, mut server) = tls_pair().await;
        let payload: Vec<u8> = (0..3_000_000u32)
            .map(|i| (i * 13 + i / 997) as u8)
            .collect();
        let expected = payload.clone();
        let writer = tokio::spawn(async move {
            for chunk in payload.chunks(7_001) {
                server.write_all(chunk).await.unwrap();
                server.flush().await.unwrap();
            }
            server.shutdown().await.unwrap();
        });
        let mut pipe = Pipe::new();
        let mut out = CountingWriter::default();
        poll_fn(|cx| pipe.poll(cx, &mut client, &mut out))
            .await
            .unwrap();
        writer.await.unwrap();
        assert!(out.got == expected, "every byte, in order");
        assert!(out.shut);
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
