//! Helpers for the unit tests of more than one module.

use sha2::{Digest as _, Sha256};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

/// A connected TCP pair on loopback: (the connecting end, the accepted end).
pub async fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (b, _) = l.accept().await.unwrap();
    (a, b)
}

/// Writes `len` pseudo-random bytes in odd-sized writes, then half-closes; returns their
/// SHA-256.
pub async fn send_pattern(
    mut w: tokio::net::tcp::OwnedWriteHalf,
    seed: u64,
    len: usize,
) -> [u8; 32] {
    let mut hash = Sha256::new();
    let mut state = seed | 1;
    let mut buf = vec![0u8; 65_521];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        for chunk in buf[..n].chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
        }
        w.write_all(&buf[..n]).await.unwrap();
        hash.update(&buf[..n]);
        left -= n;
    }
    w.shutdown().await.unwrap();
    hash.finalize().into()
}

pub async fn receive_hashed(mut r: tokio::net::tcp::OwnedReadHalf) -> (usize, [u8; 32]) {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0;
    loop {
        let n = r.read(&mut buf).await.unwrap();
        if n == 0 {
            return (total, hash.finalize().into());
        }
        hash.update(&buf[..n]);
        total += n;
    }
}
