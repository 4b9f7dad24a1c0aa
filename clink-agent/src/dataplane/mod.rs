//! The connections: the gateway port peers connect to (`inbound`), the Import listeners
//! local clients connect to (`outbound`), and the byte relay between their legs. Every
//! connection works from a [`Context`]: what it may read of the agent, and nothing else.

pub mod inbound;
pub mod outbound;
pub mod relay;

use std::{collections::BTreeMap, future::Future, net::SocketAddr, sync::Arc, time::Instant};

use futures::{future::OptionFuture, FutureExt as _};
use tokio::{
    io::AsyncWriteExt as _,
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, error, info, info_span, warn, Instrument as _, Span};

use crate::connections::{Admission, BytePath, Conn, ConnTable};
use crate::{
    api::ObjectKey,
    clients::Clients,
    kernel::{
        ktls::{Handoff, RecordLimit, TunnelTls},
        splice, Datapath, Ktls,
    },
    lb::Balancer,
    lifetime::ending_of,
    limits::{Limits, Listener, Permit},
    logging::LogLimiter,
    metrics::{
        BytesLabels, ConnLabels, DirectionLabels, HandoffLabels, KtlsBytesLabels, Metrics,
        PathLabels, TerminatedLabels,
    },
    peer::{Dialer, Peers},
    policy::Own,
    state::{Snapshot, SnapshotCell},
    tls::Credentials,
};

/// What the data path needs of the agent: who we are, the current objects and policies,
/// the peers' health and a dialer, the counters, and the data path in use. The agent owns
/// it and changes only the snapshot (and the peers' health entries) behind it.
pub struct Context {
    /// This peer's name (its certificate's DNS name) and the labels it announces.
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Our certificate and the fabric CA, as the last (re)load left them: the gateway takes
    /// its configuration from here per accepted connection, the dialer per dial.
    pub credentials: Arc<Credentials>,
    pub dialer: Arc<Dialer>,
    pub snapshot: SnapshotCell,
    pub peers: Peers,
    pub balancer: Balancer,
    pub clients: Clients,
    pub metrics: Arc<Metrics>,
    pub datapath: Datapath,
    /// The open tunneled connections and their paths.
    pub connections: ConnTable,
    /// The caps on connections at once, and their permits.
    pub limits: Limits,
    /// Set to `true` once the agent shuts down: the gateway and the Import listeners stop
    /// accepting (and close), open connections go on.
    pub draining: tokio::sync::watch::Sender<bool>,
    /// The rate limit of log lines about failures a peer or a client can repeat.
    pub logs: LogLimiter,
}

impl Context {
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.get()
    }

    /// This agent in access decisions.
    pub fn own(&self) -> Own<'_> {
        Own {
            name: &self.name,
            labels: &self.labels,
        }
    }

    /// Stops every listener of the data path (also those an apply binds later).
    pub fn stop_accepting(&self) {
        self.draining.send_replace(true);
    }

    /// Accepts from `listener` until the agent drains (`None` then: the caller closes it).
    async fn accept(
        &self,
        listener: &TcpListener,
    ) -> Option<std::io::Result<(TcpStream, SocketAddr)>> {
        let mut draining = self.draining.subscribe();
        tokio::select! {
            biased;
            _ = draining.wait_for(|d| *d) => None,
            accepted = listener.accept() => Some(accepted),
        }
    }
}

/// Accepts peers on the gateway port until the agent drains or the task is dropped.
pub fn serve_gateway(ctx: Arc<Context>, listener: TcpListener) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(accepted) = ctx.accept(&listener).await {
            match accepted {
                Ok((tcp, from)) => {
                    let Some(permit) = ctx.limits.handshake() else {
                        at_capacity(&ctx, tcp, from, "gateway");
                        continue;
                    };
                    // The certificate and CA of the moment: a reload applies from the next
                    // connection on, open ones keep theirs.
                    let acceptor = TlsAcceptor::from(ctx.credentials.server());
                    tokio::spawn(inbound::serve(ctx.clone(), acceptor, tcp, from, permit));
                }
                Err(e) => accept_failed(e).await,
            }
        }
    })
}

/// Accepts clients of one Import until the agent drains or the task is dropped.
pub fn serve_import(ctx: Arc<Context>, key: ObjectKey, listener: TcpListener) -> JoinHandle<()> {
    let own = ctx.limits.import_semaphore();
    tokio::spawn(async move {
        while let Some(accepted) = ctx.accept(&listener).await {
            match accepted {
                Ok((tcp, from)) => {
                    let Some(permit) = ctx.limits.connection(Listener::Import, Some(&own)) else {
                        at_capacity(&ctx, tcp, from, "import");
                        continue;
                    };
                    tokio::spawn(outbound::serve(ctx.clone(), key.clone(), tcp, from, permit));
                }
                Err(e) => accept_failed(e).await,
            }
        }
    })
}

/// Refuses a connection past a cap: a reset, at once, so the descriptor is free again and the
/// client knows. Logged through the log limiter, per listener (each refusal counts in
/// `clink_connection_refusals_total`).
fn at_capacity(ctx: &Context, tcp: TcpStream, from: SocketAddr, listener: &'static str) {
    relay::arm_reset(&tcp);
    drop(tcp);
    let caps = ctx.limits.caps();
    crate::logging::limited!(
        ctx.logs,
        "capacity",
        listener,
        WARN,
        listener,
        client = %from,
        max_connections = caps.connections,
        max_import_connections = caps.import_connections,
        max_handshakes = caps.handshakes,
        "at capacity: refusing connections (reset)"
    );
}

/// Accept errors are transient (EMFILE, ECONNABORTED): log and back off briefly instead of
/// spinning or giving up the port.
async fn accept_failed(e: std::io::Error) {
    if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
        error!(error = %e, "out of file descriptors; pausing accepts");
    } else {
        warn!(error = %e, "accept failed");
    }
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
}

/// What carrying one tunneled connection came to.
struct Carried {
    /// Payload bytes sent towards the remote side, and received from it.
    sent: u64,
    received: u64,
    /// Set when the connection ended by an error (and both sides were reset).
    error: Option<std::io::Error>,
    /// The path the payload took.
    path: BytePath,
}

impl Carried {
    /// A connection that failed before any payload moved.
    fn failed(error: std::io::Error, path: BytePath) -> Carried {
        Carried {
            sent: 0,
            received: 0,
            error: Some(error),
            path,
        }
    }
}

/// A tunneled connection once it is set up (both peers agreed, the early bytes passed on):
/// what carrying it takes, and no more. The set-up runs in the connection's span; the
/// carried connection keeps none (a span and its formatted fields cost every open
/// connection about half a KiB, ARCHITECTURE.md "Buffers"), so what is logged about it
/// from then on names it itself: `conn`, its number in `clink connections`, which the
/// set-up's `tunnel open` line gives too.
struct Opened<S> {
    guard: ConnGuard,
    local: TcpStream,
    tunnel: S,
    /// Payload bytes from the remote side already passed on during the set-up.
    early: u64,
    started: Instant,
    /// The connection's place under the caps, held until it ends.
    _permit: Permit,
}

impl<S: TunnelTls + relay::OverTcp> Opened<S> {
    /// Carries the connection to its end, then counts and logs it.
    async fn run(self) {
        let carried = carry(&self.guard.ctx, &self.guard, self.local, self.tunnel).await;
        let sent = carried.sent;
        let received = carried.received + self.early;
        let duration_ms = self.started.elapsed().as_secs_f64() * 1e3;
        let path = carried.path.as_str();
        let guard = self.guard;
        let labels = &guard.labels;
        let (conn, local) = (guard.id(), guard.local);
        let (service, peer) = (labels.service.as_str(), labels.peer.as_str());
        // An error (both sides were reset) is a field of its own, absent otherwise.
        let error = carried.error.as_ref().map(tracing::field::display);
        let what = if error.is_some() { "reset" } else { "closed" };
        info!(
            conn,
            direction = labels.direction,
            service,
            peer,
            %local,
            sent,
            received,
            duration_ms,
            path,
            error,
            "{what}"
        );
        guard.close(sent, received);
    }
}

/// Runs `setup` in `span`, then carries what it set up (if it did) outside the span. The
/// set-up's state is dropped before the connection is carried.
fn set_up_then_carry<S, F>(setup: F, span: Span) -> impl Future<Output = ()>
where
    S: TunnelTls + relay::OverTcp,
    F: Future<Output = Option<Opened<S>>>,
{
    setup
        .instrument(span)
        .then(|opened| OptionFuture::from(opened.map(Opened::run)))
        .map(drop)
}

/// Moves a tunneled connection's bytes between the local socket and the tunnel: in the
/// kernel where the data path is kTLS and the kernel takes the session, else in userspace.
/// Counts why the agent reset it, where it did (`clink_connections_terminated_total`).
async fn carry<S>(ctx: &Context, guard: &ConnGuard, local: TcpStream, tls: S) -> Carried
where
    S: TunnelTls + relay::OverTcp,
{
    let carried = move_bytes(ctx, guard, local, tls).await;
    let reason = carried.error.as_ref().and_then(|e| match ending_of(e) {
        Some(ending) => Some(ending.label()),
        // Keepalive or TCP_USER_TIMEOUT on the tunnel socket: the peer stopped answering.
        None if e.raw_os_error() == Some(libc::ETIMEDOUT) => Some("peer-timeout"),
        None if RecordLimit::is(e) => Some("record-limit"),
        None => None,
    });
    if let Some(reason) = reason {
        ctx.metrics
            .terminated
            .get_or_create(&TerminatedLabels {
                direction: guard.labels.direction,
                reason,
            })
            .inc();
    }
    carried
}

async fn move_bytes<S>(ctx: &Context, guard: &ConnGuard, local: TcpStream, tls: S) -> Carried
where
    S: TunnelTls + relay::OverTcp,
{
    // Boxed: every connection task's future is as large as its largest state, and the
    // userspace relay should not pay for the kTLS path's (ARCHITECTURE.md, "Buffers").
    match ctx.datapath.ktls() {
        None => relay_userspace(ctx, guard, local, tls).await,
        Some(ktls) => Box::pin(carry_ktls(ctx, guard, local, tls, ktls)).await,
    }
}

/// The kTLS data path: the session handed to the kernel and the bytes spliced, or relayed in
/// userspace where the kernel did not take it.
async fn carry_ktls<S>(
    ctx: &Context,
    guard: &ConnGuard,
    local: TcpStream,
    tls: S,
    ktls: &Ktls,
) -> Carried
where
    S: TunnelTls + relay::OverTcp,
{
    let direction = guard.labels.direction;
    let count = |result| {
        ctx.metrics
            .ktls_handoffs
            .get_or_create(&HandoffLabels { direction, result })
            .inc();
    };
    // Boxed, like the pump below: the hand-off's state is not kept while the bytes flow.
    // In a span of its own while it lasts, for what the hand-off logs.
    let handoff = Box::pin(ktls.handoff(tls))
        .instrument(info_span!("handoff", conn = guard.id()))
        .await;
    let mut local = local;
    match handoff {
        Handoff::Kernel(tunnel, plaintext) => {
            count("kernel");
            guard.set_path(BytePath::Ktls);
            debug!(
                conn = guard.id(),
                early = plaintext.len(),
                "tunnel handed to kernel TLS"
            );
            if let Err(failed) =
                write_early(&mut local, tunnel.tcp(), &plaintext, BytePath::Ktls).await
            {
                return failed;
            }
            let outcome = Box::pin(splice::pump(
                &local,
                tunnel.tcp(),
                Some(&tunnel),
                &guard.conn.lifetime,
            ))
            .await;
            let copied = outcome.copied + plaintext.len() as u64;
            let spliced = (outcome.to_tunnel + outcome.from_tunnel) - outcome.copied;
            for (moved, n) in [("spliced", spliced), ("copied", copied)] {
                ctx.metrics
                    .ktls_bytes
                    .get_or_create(&KtlsBytesLabels { moved })
                    .inc_by(n);
            }
            Carried {
                sent: outcome.to_tunnel,
                received: outcome.from_tunnel + plaintext.len() as u64,
                error: outcome.error,
                path: BytePath::Ktls,
            }
        }
        Handoff::Userspace(tls, why, taken) => {
            count(why.label());
            info!(
                conn = guard.id(),
                reason = %why,
                "kernel TLS did not take the tunnel; relaying in userspace"
            );
            // Decrypted on the way to a record boundary (usually nothing): it goes first.
            if let Err(failed) =
                write_early(&mut local, tls.tcp(), &taken, BytePath::Userspace).await
            {
                return failed;
            }
            let mut carried = relay_userspace(ctx, guard, local, tls).await;
            carried.received += taken.len() as u64;
            carried
        }
        Handoff::Failed(e) => {
            count("failed");
            warn!(conn = guard.id(), error = %e, "kernel TLS hand-off failed; connection reset");
            relay::arm_reset(&local);
            Carried::failed(e, BytePath::Ktls)
        }
    }
}

/// Writes `early` (plaintext taken out of rustls at the hand-off) to the local socket before
/// any other byte; if that fails, both connections are reset and that is what was carried.
async fn write_early(
    local: &mut TcpStream,
    tunnel: &TcpStream,
    early: &[u8],
    path: BytePath,
) -> Result<(), Carried> {
    local.write_all(early).await.map_err(|e| {
        relay::arm_reset(local);
        relay::arm_reset(tunnel);
        Carried::failed(e, path)
    })
}

/// The userspace relay, over the data path's local leg (spliced on the sockmap path).
async fn relay_userspace<S>(ctx: &Context, guard: &ConnGuard, local: TcpStream, tls: S) -> Carried
where
    S: relay::OverTcp,
{
    let local = ctx.datapath.local_leg(local, &ctx.metrics);
    let path = if local.spliced() {
        BytePath::Sockmap
    } else {
        BytePath::Userspace
    };
    guard.set_path(path);
    let relay = relay::relay(local, tls, &guard.conn.lifetime);
    // The sockmap leg logs its demotion to TCP: in a span that names the connection. Plain
    // relays log nothing and keep no span (see `Opened`).
    let outcome = if path == BytePath::Sockmap {
        relay
            .instrument(info_span!("spliced", conn = guard.id()))
            .await
    } else {
        relay.await
    };
    Carried {
        sent: outcome.a_to_b,
        received: outcome.b_to_a,
        error: outcome.error,
        path,
    }
}

/// Counts one tunneled connection from open to close, in the metrics (which `clink status`
/// reads too), and keeps its entry in the connection table. `local` is the client (egress)
/// or the export target (ingress); `admission` is what `snapshot` admitted it with.
struct ConnGuard {
    ctx: Arc<Context>,
    labels: ConnLabels,
    conn: Arc<Conn>,
    local: std::net::SocketAddr,
}

impl ConnGuard {
    fn open(
        ctx: &Arc<Context>,
        labels: ConnLabels,
        local: std::net::SocketAddr,
        admission: Admission,
        snapshot: &Arc<Snapshot>,
    ) -> Self {
        let metrics = &ctx.metrics;
        metrics.opened.get_or_create(&labels).inc();
        metrics
            .active
            .get_or_create(&DirectionLabels {
                direction: labels.direction,
            })
            .inc();
        let conn = ctx.connections.insert(
            labels.direction,
            &labels.service,
            &labels.peer,
            local,
            admission,
        );
        // After the insert: a change published from now on finds the entry.
        ctx.connections
            .admitted(&conn, snapshot, &ctx.snapshot(), ctx.own());
        ConnGuard {
            ctx: ctx.clone(),
            labels,
            conn,
            local,
        }
    }

    /// The connection's number in the table (`clink connections`), which every line logged
    /// about it names.
    fn id(&self) -> u64 {
        self.conn.id
    }

    /// The connection's payload takes `path` (decided once, when the bytes start to move).
    fn set_path(&self, path: BytePath) {
        self.ctx.connections.set_path(self.conn.id, path);
        self.ctx
            .metrics
            .paths
            .get_or_create(&PathLabels {
                direction: self.labels.direction,
                path: path.as_str(),
            })
            .inc();
    }

    /// The connection ended after carrying `sent` bytes to the remote side and `received`
    /// from it.
    fn close(self, sent: u64, received: u64) {
        for (flow, n) in [("sent", sent), ("received", received)] {
            self.ctx
                .metrics
                .bytes
                .get_or_create(&BytesLabels {
                    direction: self.labels.direction,
                    service: self.labels.service.clone(),
                    peer: self.labels.peer.clone(),
                    flow,
                })
                .inc_by(n);
        }
        self.ctx.metrics.closed.get_or_create(&self.labels).inc();
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.ctx.connections.remove(self.conn.id);
        self.ctx
            .metrics
            .active
            .get_or_create(&DirectionLabels {
                direction: self.labels.direction,
            })
            .dec();
    }
}
