//! The transport under every peer TLS connection (both directions): the TCP socket, read
//! through a buffer that exists only while bulk data flows. rustls pulls ciphertext at most
//! 4 KiB at a time; once a read comes back full, one `recvfrom` fills up to 64 KiB instead of
//! ~16 small ones; once the socket is empty again the buffer is given back, so a quiet
//! connection holds none (ARCHITECTURE.md, "Buffers"). The buffer is not zeroed: the socket
//! reads into its spare capacity, so a burst touches only the pages it fills. A burst of one
//! 16 KiB record (a window of small responses) takes and gives back a buffer each time, and
//! zeroing 64 KiB for 12 KiB of ciphertext was a measurable part of its cost.

use std::{
    io,
    pin::Pin,
    task::{ready, Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

/// The read buffer under a peer TLS connection, once it carries bulk data.
pub const TLS_READ_BUFFER: usize = 64 * 1024;

/// Where the bytes handed to rustls stand in the TLS record framing (5-byte header with the
/// body length in its last two bytes, then the body). The kTLS hand-off needs it: the kernel
/// takes over at a record boundary, so rustls must not be left holding part of a record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Framing {
    header: [u8; 5],
    header_len: usize,
    body_left: usize,
}

impl Framing {
    /// Accounts for `bytes`, which follow everything fed before.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.header_len < 5 {
                let n = (5 - self.header_len).min(bytes.len());
                self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
                self.header_len += n;
                bytes = &bytes[n..];
                if self.header_len == 5 {
                    self.body_left =
                        usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
                }
            }
            if self.header_len == 5 {
                let n = self.body_left.min(bytes.len());
                self.body_left -= n;
                bytes = &bytes[n..];
                if self.body_left == 0 {
                    self.header_len = 0;
                }
            }
        }
    }

    /// Bytes still missing to finish the current record's header (if it is incomplete) or
    /// body; 0 at a record boundary.
    pub fn missing(&self) -> usize {
        match self.header_len {
            0 => 0,
            1..=4 => 5 - self.header_len,
            _ => self.body_left,
        }
    }
}

/// The transport under every peer TLS connection: the TCP socket, read through a buffer that
/// exists only while bulk data flows.
pub struct PeerIo {
    tcp: TcpStream,
    /// [`TLS_READ_BUFFER`] of capacity while bulk data flows, none otherwise; its length is
    /// what the last socket read brought, of which rustls has taken `pos`.
    buf: Vec<u8>,
    pos: usize,
    /// The framing of every byte handed to the reader (rustls).
    framing: Framing,
}

pub fn peer_io(tcp: TcpStream) -> PeerIo {
    PeerIo {
        tcp,
        buf: Vec::new(),
        pos: 0,
        framing: Framing::default(),
    }
}

impl PeerIo {
    pub fn get_ref(&self) -> &TcpStream {
        &self.tcp
    }

    /// Read from the socket but not yet handed to rustls.
    pub fn buffered(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// Where what rustls was handed stands in the record framing.
    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// Hands up to `n` buffered bytes to `consume` (which returns how many it took), keeping
    /// the framing: how the kTLS hand-off gives rustls what this buffer read ahead.
    pub fn take_buffered(&mut self, consume: impl FnOnce(&[u8]) -> usize) -> usize {
        let n = consume(&self.buf[self.pos..]).min(self.buf.len() - self.pos);
        self.framing.feed(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        n
    }

    /// Accounts for `bytes` the caller read from the socket itself and handed to rustls.
    pub fn note_fed(&mut self, bytes: &[u8]) {
        self.framing.feed(bytes);
    }

    /// The socket, once rustls is done with it.
    pub fn into_inner(self) -> TcpStream {
        self.tcp
    }
}

impl AsyncRead for PeerIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos == this.buf.len() {
            if this.buf.capacity() == 0 {
                let want = out.remaining();
                let before = out.filled().len();
                ready!(Pin::new(&mut this.tcp).poll_read(cx, out))?;
                this.framing.feed(&out.filled()[before..]);
                if want > 0 && out.filled().len() - before == want {
                    // The socket had at least as much as asked for: bulk data, buffer it.
                    this.buf = Vec::with_capacity(TLS_READ_BUFFER);
                }
                return Poll::Ready(Ok(()));
            }
            this.buf.clear();
            this.pos = 0;
            if read_into_spare(&this.tcp, cx, &mut this.buf)?.is_pending() {
                // The bulk is over (the socket is empty): read straight into rustls's
                // buffer again, and give this one back while the connection is quiet.
                this.buf = Vec::new();
                return Poll::Pending;
            }
        }
        let n = out.remaining().min(this.buf.len() - this.pos);
        out.put_slice(&this.buf[this.pos..this.pos + n]);
        this.framing.feed(&this.buf[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

/// One read from `tcp` into `buf`'s spare capacity (which is not zeroed first); end of stream
/// leaves `buf` as it was.
fn read_into_spare(
    tcp: &TcpStream,
    cx: &mut Context<'_>,
    buf: &mut Vec<u8>,
) -> Poll<io::Result<()>> {
    loop {
        ready!(tcp.poll_read_ready(cx))?;
        match tcp.try_read_buf(buf) {
            Ok(_) => return Poll::Ready(Ok(())),
            // Readiness was stale: try_read_buf cleared it, so the next poll registers.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for PeerIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::tcp_pair as pair;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test]
    async fn peer_io_buffers_only_bulk_reads() {
        let (mut tx, rx) = pair().await;
        let mut io = peer_io(rx);
        tx.write_all(b"tiny").await.unwrap();
        let mut small = [0u8; 4096];
        let n = io.read(&mut small).await.unwrap();
        assert_eq!(&small[..n], b"tiny");
        assert_eq!(io.buf.capacity(), 0, "a short read allocates nothing");
        let bulk = vec![9u8; 200_000];
        tx.write_all(&bulk).await.unwrap();
        drop(tx);
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = io.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(got, bulk);
    }

    /// A connection that carried bulk data and went quiet holds no read buffer; the next bulk
    /// burst takes one again.
    #[tokio::test]
    async fn peer_io_gives_the_buffer_back_when_the_socket_is_empty() {
        let (mut tx, rx) = pair().await;
        let mut io = peer_io(rx);
        let mut chunk = [0u8; 4096];
        for round in 0..2u8 {
            let bulk = vec![round; 200_000];
            tx.write_all(&bulk).await.unwrap();
            let n = io.read(&mut chunk).await.unwrap();
            assert_eq!(n, chunk.len());
            assert_eq!(
                io.buf.capacity(),
                TLS_READ_BUFFER,
                "a full read: the rest is buffered"
            );
            let mut got = chunk.to_vec();
            while got.len() < bulk.len() {
                let n = io.read(&mut chunk).await.unwrap();
                got.extend_from_slice(&chunk[..n]);
            }
            assert_eq!(got, bulk, "round {round}");
            let quiet = tokio::time::timeout(Duration::from_millis(50), io.read(&mut chunk)).await;
            assert!(quiet.is_err(), "nothing was sent");
            assert_eq!(
                io.buf.capacity(),
                0,
                "round {round}: a quiet connection holds no buffer"
            );
            assert!(io.buffered().is_empty());
        }
    }

    /// Records split anywhere, including inside the header, and hostile lengths.
    #[test]
    fn framing_follows_records_across_any_split() {
        let mut stream = Vec::new();
        for len in [0usize, 1, 300, 16_401, 65_535] {
            stream.extend_from_slice(&[23, 3, 3]);
            stream.extend_from_slice(&(len as u16).to_be_bytes());
            stream.extend(std::iter::repeat_n(7u8, len));
        }
        for chunk in [1usize, 2, 3, 4, 5, 6, 7, 4096, stream.len()] {
            let mut framing = Framing::default();
            let mut fed = 0;
            for piece in stream.chunks(chunk) {
                framing.feed(piece);
                fed += piece.len();
                if fed < stream.len() {
                    assert!(
                        framing.missing() > 0 || boundary_at(&stream, fed),
                        "{chunk} {fed}"
                    );
                }
            }
            assert_eq!(framing.missing(), 0, "chunk {chunk}");
        }
        let mut framing = Framing::default();
        framing.feed(&[23, 3, 3, 0x40]);
        assert_eq!(framing.missing(), 1, "inside the header");
        framing.feed(&[0x01, 9]);
        assert_eq!(framing.missing(), 0x4001 - 1);
    }

    fn boundary_at(stream: &[u8], at: usize) -> bool {
        let mut pos = 0;
        while pos < at {
            pos += 5 + usize::from(u16::from_be_bytes([stream[pos + 3], stream[pos + 4]]));
        }
        pos == at
    }
}
