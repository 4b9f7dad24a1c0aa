//! The transport under every peer TLS connection (both directions): the TCP socket, read
//! through a buffer that exists only while bulk data flows. rustls pulls ciphertext at most
//! 4 KiB at a time; once a read comes back full, one `recvfrom` fills 64 KiB instead of ~16
//! small ones (ARCHITECTURE.md, "Buffers").

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

/// The transport under every peer TLS connection: the TCP socket, read through a buffer that
/// exists only while bulk data flows.
pub struct PeerIo {
    tcp: TcpStream,
    buf: Vec<u8>,
    pos: usize,
    filled: usize,
}

pub fn peer_io(tcp: TcpStream) -> PeerIo {
    PeerIo {
        tcp,
        buf: Vec::new(),
        pos: 0,
        filled: 0,
    }
}

impl PeerIo {
    pub fn get_ref(&self) -> &TcpStream {
        &self.tcp
    }
}

impl AsyncRead for PeerIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos == this.filled {
            if this.buf.is_empty() {
                let want = out.remaining();
                let before = out.filled().len();
                ready!(Pin::new(&mut this.tcp).poll_read(cx, out))?;
                if want > 0 && out.filled().len() - before == want {
                    // The socket had at least as much as asked for: bulk data, buffer it.
                    this.buf = vec![0; TLS_READ_BUFFER];
                }
                return Poll::Ready(Ok(()));
            }
            let mut rb = ReadBuf::new(&mut this.buf);
            ready!(Pin::new(&mut this.tcp).poll_read(cx, &mut rb))?;
            this.pos = 0;
            this.filled = rb.filled().len();
        }
        let n = out.remaining().min(this.filled - this.pos);
        out.put_slice(&this.buf[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
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
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test]
    async fn peer_io_buffers_only_bulk_reads() {
        let (mut tx, rx) = pair().await;
        let mut io = peer_io(rx);
        tx.write_all(b"tiny").await.unwrap();
        let mut small = [0u8; 4096];
        let n = io.read(&mut small).await.unwrap();
        assert_eq!(&small[..n], b"tiny");
        assert!(io.buf.is_empty(), "a short read allocates nothing");
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
        assert_eq!(io.buf.len(), TLS_READ_BUFFER);
    }
}
