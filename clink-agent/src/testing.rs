//! Helpers for the unit tests of more than one module.

use tokio::net::{TcpListener, TcpStream};

/// A connected TCP pair on loopback: (the connecting end, the accepted end).
pub async fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (b, _) = l.accept().await.unwrap();
    (a, b)
}
