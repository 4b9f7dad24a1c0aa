//! The agent's end of a local hop (a client of an import, or an export target) on the
//! sockmap path: a TCP stream that also keeps the agent's half of the flow control of
//! spliced sockets (see [`super::flow`]).
//!
//! * Reads: the running total is published to `CLINK_READS` every
//!   [`PUBLISH_EVERY`] bytes and whenever a read leaves the
//!   socket empty, so `clink_skmsg` redirects again as soon as the agent has caught up.
//! * Writes: the agent looks at the other socket's queue whenever it could have filled the
//!   window since the last look (the queue grows by at most what is written; at least every
//!   [`MIN_CHECK`] bytes) and, while it holds more than
//!   [`FLOW_WINDOW`], waits a millisecond at a time instead of writing: what TCP's window
//!   would have done.
//! * Demotion: a client (or target) that outruns the agent for good (bulk upload) ends up on
//!   the TCP stack through the sockmap's send path, which costs more than plain TCP. When the
//!   agent sees that (its socket's flow is `passing` at a bulk read), it keeps the sender on
//!   TCP (publishes a read count of 0), holds its own writes, waits until neither socket has
//!   a redirected byte left, and takes both out of `CLINK_SOCKS`: from then on the
//!   connection is plain TCP at plain TCP's speed. If the queues do not empty within
//!   [`DEMOTE_WAIT`], it gives up and tries again later.

use std::{
    future::Future as _,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
    time::{Duration, Instant},
};

use clink_common::SockKey;

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::Sleep,
};
use tracing::{debug, info, warn};

use prometheus_client::metrics::{counter::Counter, family::Family};

use super::{
    flow::{FlowControl, FLOW_WINDOW, MIN_CHECK, PUBLISH_EVERY, READS_FROZEN},
    sock_diag, sockopt,
};
use crate::metrics::DemotionLabels;

/// How long a write waits before looking at a full queue again.
const PACE: Duration = Duration::from_millis(1);
/// How long a demotion may wait for the redirect queues to empty.
const DEMOTE_WAIT: Duration = Duration::from_millis(200);
/// How long after the other socket left the map this one may leave: far longer than a send
/// that was already past the program takes to land.
const SETTLE: Duration = Duration::from_millis(2);
/// Bytes moved between two demotion attempts.
const DEMOTE_RETRY: u64 = 16 * FLOW_WINDOW;
/// A connection that has moved this much (both ways) is a bulk transfer: demoted to plain
/// TCP, which moves bulk faster than the splice on loopback (64 KiB segments; see
/// docs/performance.md). The splice is for the many short exchanges, where it saves latency.
pub const BULK: u64 = 4 * FLOW_WINDOW;

pub struct LocalLeg {
    tcp: TcpStream,
    /// Boxed: most legs are not spliced, and a leg is moved through several layers of the
    /// connection's task, each of which keeps room for it.
    flow: Option<Box<Spliced>>,
}

/// Flow state of a leg whose socket the programs spliced.
struct Spliced {
    control: Arc<FlowControl>,
    cookie: u64,
    read: u64,
    published: u64,
    /// The other end of the hop, as (its local address, its peer) for `sock_diag`.
    other: (SocketAddr, SocketAddr),
    written_since_check: u64,
    /// Look at the other queue again once this many bytes were written.
    next_check: u64,
    pause: Option<Pin<Box<Sleep>>>,
    /// The keys of both sockets in `CLINK_SOCKS` (this one first).
    keys: [SockKey; 2],
    /// Set while a demotion is under way: when it began, and when the other socket left
    /// the map (the second stage).
    demoting: Option<Instant>,
    other_out: Option<Instant>,
    /// No demotion before this many bytes were moved (after one gave up).
    demote_after: u64,
    /// Bytes written into the other socket.
    written: u64,
    /// Why the current demotion started.
    why: Reason,
    demotions: Family<DemotionLabels, Counter>,
}

/// Why a connection leaves the splice.
#[derive(Clone, Copy)]
enum Reason {
    Bulk,
    SenderOutran,
}

impl Reason {
    /// The `reason` label of `clink_sockmap_demotions_total`.
    fn label(self) -> &'static str {
        match self {
            Reason::Bulk => "bulk",
            Reason::SenderOutran => "sender-outran",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Reason::Bulk => "a bulk transfer",
            Reason::SenderOutran => "the sender outran the agent",
        }
    }
}

/// What a demotion step came to.
enum Demotion {
    Done,
    Waiting,
    GaveUp,
}

impl LocalLeg {
    /// A leg no kernel path touches.
    pub fn plain(tcp: TcpStream) -> LocalLeg {
        LocalLeg { tcp, flow: None }
    }

    /// A leg on the sockmap path: for a socket the programs spliced, the flow control runs
    /// (and counts demotions in `demotions`); otherwise this is the plain stream.
    pub fn new(
        tcp: TcpStream,
        control: &Arc<FlowControl>,
        demotions: &Family<DemotionLabels, Counter>,
    ) -> LocalLeg {
        let flow = spliced(&tcp, control, demotions).map(Box::new);
        LocalLeg { tcp, flow }
    }

    /// The TCP stream underneath.
    /// Whether the programs spliced this leg's socket (its bytes skip the TCP stack).
    pub fn spliced(&self) -> bool {
        self.flow.is_some()
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }
}

fn spliced(
    tcp: &TcpStream,
    control: &Arc<FlowControl>,
    demotions: &Family<DemotionLabels, Counter>,
) -> Option<Spliced> {
    let cookie = sockopt::socket_cookie(tcp)
        .map_err(|e| warn!(error = %e, "no socket cookie: flow control off"))
        .ok()?;
    // The programs made the entry when the connection was established, before accept() or
    // connect() returned; none means this socket is not spliced (say, a client outside the
    // cgroup) and TCP does the flow control as usual.
    match control.publish_read(cookie, 0) {
        Ok(true) => {}
        Ok(false) => {
            debug!("local hop not spliced: TCP flow control");
            return None;
        }
        Err(e) => {
            warn!(error = %e, "cannot update {}: flow control off", clink_common::map::READS);
            return None;
        }
    }
    let (local, peer) = (tcp.local_addr().ok()?, tcp.peer_addr().ok()?);
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let own = SockKey::from_addrs(canonical(local), canonical(peer));
    Some(Spliced {
        keys: [own, own.reversed()],
        demoting: None,
        other_out: None,
        demote_after: 0,
        written: 0,
        why: Reason::Bulk,
        demotions: demotions.clone(),
        control: control.clone(),
        cookie,
        read: 0,
        published: 0,
        other: (peer, local),
        written_since_check: 0,
        next_check: MIN_CHECK,
        pause: None,
    })
}

impl Spliced {
    fn publish(&mut self) {
        match self.control.publish_read(self.cookie, self.read) {
            Ok(_) => self.published = self.read,
            // Without it the sender stays on the TCP stack: slower, never wrong.
            Err(e) => debug!(error = %e, "read count not published"),
        }
    }

    /// Starts a demotion once the connection is a bulk transfer, or once the sender into
    /// this socket was moved to the TCP stack (`check_passing`, at a bulk read).
    fn consider_demotion(&mut self, check_passing: bool) {
        let moved = self.read + self.written;
        if self.demoting.is_some() || moved < self.demote_after {
            return;
        }
        let why = if moved >= BULK {
            Reason::Bulk
        } else if check_passing && self.control.passing(self.cookie).unwrap_or(false) {
            Reason::SenderOutran
        } else {
            return;
        };
        // From here on every send into this socket takes the TCP stack.
        if self.control.publish_read(self.cookie, READS_FROZEN).is_ok() {
            self.published = READS_FROZEN;
            self.demoting = Some(Instant::now());
            self.why = why;
            debug!(moved, reason = why.label(), "demoting to plain TCP");
        }
    }

    /// One step of a demotion, in two stages. First, once neither socket has a redirected
    /// byte queued, the other socket leaves the map (its sends are plain TCP from then on).
    /// Then, a moment later (a send that was already past the program when the first stage
    /// looked may still land here), this socket leaves once its own queue is empty again:
    /// the kernel drops whatever a socket still has queued when it leaves.
    fn demotion_step(&mut self, tcp: &TcpStream) -> Demotion {
        let Some(started) = self.demoting else {
            return Demotion::GaveUp;
        };
        let own = sockopt::redirected_unread(tcp);
        if let Some(out) = self.other_out {
            if out.elapsed() < SETTLE || !matches!(own, Ok(0)) {
                // Only the agent's own reads empty it now, and they do.
                return Demotion::Waiting;
            }
            if let Err(e) = self.control.unsplice(&self.keys[0]) {
                // Still spliced, but inert: its peer is out of the map, so nothing is
                // redirected into it any more, and its own sends take the TCP stack.
                warn!(error = %e, "cannot take the agent's socket out of the map");
            }
            info!(
                read = self.read,
                written = self.written,
                reason = self.why.label(),
                "demoted to plain TCP: {}",
                self.why.describe()
            );
            self.count(self.why.label());
            return Demotion::Done;
        }
        let other = sock_diag::queued(self.other.0, self.other.1);
        if let (Ok(0), Ok(0)) = (&own, &other) {
            match self.control.unsplice(&self.keys[1]) {
                Ok(_) => {
                    self.other_out = Some(Instant::now());
                    return Demotion::Waiting;
                }
                Err(e) => warn!(error = %e, "cannot take the other socket out of the map"),
            }
        } else if started.elapsed() < DEMOTE_WAIT {
            return Demotion::Waiting;
        }
        info!(
            ?own,
            ?other,
            "demotion given up: the redirect queues did not empty in time"
        );
        self.count("gave-up");
        self.demoting = None;
        self.demote_after = self.read + self.written + DEMOTE_RETRY;
        self.publish();
        Demotion::GaveUp
    }

    fn count(&self, reason: &'static str) {
        self.demotions
            .get_or_create(&DemotionLabels { reason })
            .inc();
    }

    /// Ready once the other socket's queue is short enough to write into.
    fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if let Some(pause) = &mut self.pause {
                ready!(pause.as_mut().poll(cx));
                self.pause = None;
            } else if self.written_since_check < self.next_check {
                return Poll::Ready(());
            }
            match sock_diag::queued(self.other.0, self.other.1) {
                Ok(queued) if queued > FLOW_WINDOW => {
                    self.pause = Some(Box::pin(tokio::time::sleep(PACE)));
                }
                Ok(queued) => {
                    // The queue grows by at most what is written: no need to look again
                    // before the window could be full.
                    self.written_since_check = 0;
                    self.next_check = (FLOW_WINDOW - queued).max(MIN_CHECK);
                    return Poll::Ready(());
                }
                Err(e) => {
                    // The other end is gone (the write will say so) or diag is unavailable.
                    debug!(error = %e, "queue length unknown");
                    self.written_since_check = 0;
                    self.next_check = MIN_CHECK;
                    return Poll::Ready(());
                }
            }
        }
    }
}

impl AsyncRead for LocalLeg {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.tcp).poll_read(cx, buf))?;
        let n = (buf.filled().len() - before) as u64;
        if let Some(flow) = &mut this.flow {
            flow.read += n;
            if flow.demoting.is_some() {
                if let Demotion::Done = flow.demotion_step(&this.tcp) {
                    this.flow = None;
                }
                return Poll::Ready(Ok(()));
            }
            // A read that did not fill the buffer emptied the socket: say so at once, so the
            // sender can go back to the splice.
            let drained = buf.remaining() > 0;
            if flow.read != flow.published
                && (drained || flow.read.saturating_sub(flow.published) >= PUBLISH_EVERY)
            {
                flow.publish();
                flow.consider_demotion(!drained && n > 0);
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for LocalLeg {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        while let Some(flow) = &mut this.flow {
            if flow.demoting.is_none() {
                ready!(flow.poll_room(cx));
                break;
            }
            // Nothing is written while a demotion waits for the other queue to empty.
            match flow.demotion_step(&this.tcp) {
                Demotion::Done => this.flow = None,
                Demotion::GaveUp => {}
                Demotion::Waiting => {
                    let pause = flow
                        .pause
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(PACE)));
                    ready!(pause.as_mut().poll(cx));
                    flow.pause = None;
                }
            }
        }
        let n = ready!(Pin::new(&mut this.tcp).poll_write(cx, data))?;
        if let Some(flow) = &mut this.flow {
            flow.written_since_check += n as u64;
            flow.written += n as u64;
            flow.consider_demotion(false);
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}
