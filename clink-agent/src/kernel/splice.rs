//! The kernel byte pump of the kTLS path: payload moves local socket → pipe → tunnel socket
//! and back with splice(2), so it is never copied to the agent's memory. On the tunnel side
//! the kernel does the TLS record layer (see [`super::ktls`]); the pump is the same for a
//! plain tunnel socket, which is how it is tested on kernels without kTLS.
//!
//! Per direction one pipe ([`PIPE_SIZE`]). A direction fills its pipe only while it is empty,
//! so a `splice` into it that would block means the source has nothing (and tokio's readiness
//! for it is cleared), never that the pipe is full; while the pipe holds data, more is
//! spliced in (up to [`FILL_TARGET`]) without touching readiness, because a kTLS socket gives
//! one record (at most 16 KiB) per call. Syscalls per [`FILL_TARGET`] of bulk data: a few
//! `splice` in, one or two out.
//!
//! End of stream on one side becomes `shutdown(SHUT_WR)` on the other (on the tunnel side
//! after a TLS `close_notify`); an error on either side resets both TCP connections, as the
//! userspace relay does, and so does the agent ending the connection ([`Lifetime`]). A peer
//! that stopped answering is an error like any other: TCP keepalive and `TCP_USER_TIMEOUT`
//! (set on the tunnel socket before the hand-off; kTLS keeps them) fail the socket with
//! `ETIMEDOUT`, which wakes the direction waiting on it and fails its next `splice`.

use std::{io, net::Shutdown, os::fd::OwnedFd};

use nix::{
    fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags},
    unistd::pipe2,
};
use tokio::{io::Interest, net::TcpStream};

use super::{
    ktls::{Control, Tunnel},
    sockopt::reset_on_close,
};
use crate::lifetime::Lifetime;

/// Capacity asked for each pipe: 64 pages, four times Linux's default, so a bulk direction
/// moves up to [`FILL_TARGET`] per round. Pages are only taken while data sits in the pipe.
pub const PIPE_SIZE: usize = 256 * 1024;
/// How much a direction gathers in its pipe before writing it out.
pub const FILL_TARGET: usize = 128 * 1024;

/// How a spliced connection ended.
#[derive(Debug)]
pub struct Outcome {
    /// Payload bytes moved from the local socket into the tunnel.
    pub to_tunnel: u64,
    /// Payload bytes moved from the tunnel to the local socket.
    pub from_tunnel: u64,
    /// Of those, the bytes that passed through the agent's memory (application data the
    /// kernel handed over with `recvmsg`, after a control record); all others were spliced.
    pub copied: u64,
    /// Set when the connection ended by an error (and both sides were reset).
    pub error: Option<io::Error>,
}

/// One pipe, its two ends.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (read, write) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // A smaller pipe still works (the limit is /proc/sys/fs/pipe-max-size for non-root).
        let _ = fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as libc::c_int));
        Ok(Pipe { read, write })
    }
}

const FLAGS: SpliceFFlags = SpliceFFlags::SPLICE_F_NONBLOCK.union(SpliceFFlags::SPLICE_F_MOVE);

/// The end a direction writes to: the local socket, or the tunnel (which closes with a TLS
/// `close_notify` on the kTLS path).
enum Sink<'a> {
    Local(&'a TcpStream),
    Tunnel(&'a TcpStream, Option<&'a Tunnel>),
}

impl Sink<'_> {
    fn tcp(&self) -> &TcpStream {
        match self {
            Sink::Local(tcp) | Sink::Tunnel(tcp, _) => tcp,
        }
    }

    /// The half-close after the last byte: `sent` payload bytes went this way.
    async fn close(&self, sent: u64) -> io::Result<()> {
        match self {
            Sink::Tunnel(_, Some(tunnel)) => tunnel.close_write(sent).await,
            Sink::Local(tcp) | Sink::Tunnel(tcp, None) => {
                socket2::SockRef::from(*tcp).shutdown(Shutdown::Write)
            }
        }
    }
}

/// Moves bytes until both directions have ended, one fails, or `lifetime` is ended; `tunnel`
/// is `Some` when the tunnel socket is kTLS.
pub async fn pump(
    local: &TcpStream,
    tunnel_tcp: &TcpStream,
    tunnel: Option<&Tunnel>,
    lifetime: &Lifetime,
) -> Outcome {
    let (mut to_tunnel, mut from_tunnel) = (0u64, 0u64);
    let (mut copied_up, mut copied_down) = (0u64, 0u64);
    let result = async {
        let (up_pipe, down_pipe) = (Pipe::new()?, Pipe::new()?);
        let up = one_way(
            local,
            None,
            Sink::Tunnel(tunnel_tcp, tunnel),
            &up_pipe,
            (&mut to_tunnel, &mut copied_up),
            lifetime,
        );
        let down = one_way(
            tunnel_tcp,
            tunnel,
            Sink::Local(local),
            &down_pipe,
            (&mut from_tunnel, &mut copied_down),
            lifetime,
        );
        tokio::select! {
            both = async { tokio::try_join!(up, down) } => both.map(|_| ()),
            e = lifetime.ended() => Err(e),
        }
    }
    .await;
    let error = result.err();
    if error.is_some() {
        reset_on_close(local);
        reset_on_close(tunnel_tcp);
    }
    Outcome {
        to_tunnel,
        from_tunnel,
        copied: copied_up + copied_down,
        error,
    }
}

/// One direction: `src` → `pipe` → `dst`, then the half-close. `records` is set when `src`
/// is a kTLS socket, whose records that are not data make `splice` fail and are read with
/// `recvmsg`.
async fn one_way(
    src: &TcpStream,
    records: Option<&Tunnel>,
    dst: Sink<'_>,
    pipe: &Pipe,
    (moved, copied): (&mut u64, &mut u64),
    lifetime: &Lifetime,
) -> io::Result<()> {
    let mut in_pipe = 0usize;
    let mut eof = false;
    // Sending into a kTLS tunnel: its key's record budget bounds and counts the splices.
    let kernel_tls = match &dst {
        Sink::Tunnel(_, tunnel) => *tunnel,
        Sink::Local(_) => None,
    };
    loop {
        if in_pipe == 0 && !eof {
            src.readable().await?;
            match src.try_io(Interest::READABLE, || fill(src, pipe, FILL_TARGET)) {
                Ok(0) => eof = end_of_stream(records)?,
                Ok(n) => {
                    in_pipe = n;
                    // More while the pipe has room; a refusal here may mean a full pipe, so
                    // it clears no readiness and is answered by draining first.
                    while in_pipe < FILL_TARGET {
                        match fill(src, pipe, FILL_TARGET - in_pipe) {
                            Ok(0) => {
                                eof = end_of_stream(records)?;
                                break;
                            }
                            Ok(n) => in_pipe += n,
                            Err(_) => break,
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => match records {
                    Some(tunnel) if Tunnel::is_control_record(&e) => {
                        match tunnel.read_control()? {
                            Control::Data(data) => {
                                write_all(dst.tcp(), &data).await?;
                                *moved += data.len() as u64;
                                *copied += data.len() as u64;
                                lifetime.add_moved(data.len() as u64);
                            }
                            Control::CloseNotify => eof = true,
                            Control::Ignored => {}
                        }
                        continue;
                    }
                    _ => return Err(e),
                },
            }
        }
        while in_pipe > 0 {
            let len = kernel_tls.map_or(in_pipe, |t| in_pipe.min(t.send_allowance()));
            dst.tcp().writable().await?;
            match dst.tcp().try_io(Interest::WRITABLE, || {
                Ok(splice(&pipe.read, None, dst.tcp(), None, len, FLAGS)?)
            }) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    in_pipe -= n;
                    *moved += n as u64;
                    lifetime.add_moved(n as u64);
                    if let Some(tunnel) = kernel_tls {
                        tunnel.count_sent(n)?;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        if eof {
            return dst.close(*moved).await;
        }
    }
}

fn fill(src: &TcpStream, pipe: &Pipe, len: usize) -> io::Result<usize> {
    Ok(splice(src, None, &pipe.write, None, len, FLAGS)?)
}

/// `splice` found the end of `src`'s stream: fine on a plain socket; on a kTLS socket only
/// after `close_notify` (which arrives as a control record), so here it is a truncation.
fn end_of_stream(records: Option<&Tunnel>) -> io::Result<bool> {
    match records {
        None => Ok(true),
        Some(_) => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the peer closed the tunnel without close_notify",
        )),
    }
}

async fn write_all(tcp: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        tcp.writable().await?;
        match tcp.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{receive_hashed as receive, send_pattern as send, tcp_pair as pair};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// client <-> (local pump tunnel) <-> server on plain sockets: 64 MiB each way at once,
    /// content by SHA-256, each side's end of stream passed on as a half-close, counters.
    #[tokio::test]
    async fn pumps_64_mib_each_way_intact_with_half_close() {
        const LEN: usize = 64 * 1024 * 1024;
        let (client, local) = pair().await;
        let (tunnel, server) = pair().await;
        let pump =
            tokio::spawn(async move { pump(&local, &tunnel, None, &Lifetime::default()).await });
        let (client_r, client_w) = client.into_split();
        let (server_r, server_w) = server.into_split();
        let up = tokio::spawn(send(client_w, 1, LEN));
        let down = tokio::spawn(send(server_w, 2, LEN));
        let at_server = tokio::spawn(receive(server_r));
        let at_client = tokio::spawn(receive(client_r));
        let (sent_up, sent_down) = (up.await.unwrap(), down.await.unwrap());
        assert_eq!(at_server.await.unwrap(), (LEN, sent_up));
        assert_eq!(at_client.await.unwrap(), (LEN, sent_down));
        let outcome = pump.await.unwrap();
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
        assert_eq!(
            (outcome.to_tunnel, outcome.from_tunnel),
            (LEN as u64, LEN as u64)
        );
    }

    /// The client half-closes first; the server answers after that end of stream and the
    /// client still gets the whole answer.
    #[tokio::test]
    async fn an_answer_after_the_half_close_gets_through() {
        let (mut client, local) = pair().await;
        let (tunnel, mut server) = pair().await;
        let pump =
            tokio::spawn(async move { pump(&local, &tunnel, None, &Lifetime::default()).await });
        client.write_all(b"question").await.unwrap();
        client.shutdown().await.unwrap();
        let mut question = Vec::new();
        server.read_to_end(&mut question).await.unwrap();
        assert_eq!(question, b"question");
        server.write_all(b"answer after FIN").await.unwrap();
        server.shutdown().await.unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"answer after FIN");
        let outcome = pump.await.unwrap();
        assert!(outcome.error.is_none());
        assert_eq!((outcome.to_tunnel, outcome.from_tunnel), (8, 16));
    }

    /// The agent ending the connection resets both sides; what moved before is counted.
    #[tokio::test]
    async fn an_ending_resets_both_sides() {
        use crate::lifetime::{ending_of, Ending};
        let (mut client, local) = pair().await;
        let (tunnel, mut server) = pair().await;
        let lifetime = std::sync::Arc::new(Lifetime::default());
        let pump = tokio::spawn({
            let lifetime = lifetime.clone();
            async move { pump(&local, &tunnel, None, &lifetime).await }
        });
        server.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        client.read_exact(&mut got).await.unwrap();
        while lifetime.moved() < 5 {
            tokio::task::yield_now().await;
        }
        let why = Ending::Idle(std::time::Duration::from_secs(2));
        assert!(lifetime.end(why.clone()));
        for side in [&mut client, &mut server] {
            let err = side.read(&mut got).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        }
        let outcome = pump.await.unwrap();
        assert_eq!(ending_of(outcome.error.as_ref().unwrap()), Some(&why));
        assert_eq!((outcome.to_tunnel, outcome.from_tunnel), (0, 5));
    }

    #[tokio::test]
    async fn a_reset_is_passed_on() {
        let (client, local) = pair().await;
        let (tunnel, mut server) = pair().await;
        let pump =
            tokio::spawn(async move { pump(&local, &tunnel, None, &Lifetime::default()).await });
        reset_on_close(&client);
        drop(client);
        let mut buf = [0u8; 8];
        let err = server.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert!(pump.await.unwrap().error.is_some());
    }
}
