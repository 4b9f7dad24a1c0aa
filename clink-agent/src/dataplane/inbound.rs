//! Ingress: a peer connected to the gateway port. The TLS handshake proves the peer's identity
//! (a certificate of our fabric); the certificate's DNS name must be one of our Peers, for
//! heartbeats as for tunnels (another member of the fabric learns nothing here, not even our
//! labels). Then one request head: `GET /healthz` is answered with our labels;
//! `CONNECT <export>.<ns>:443` is
//! checked against the Export and ingress policy (with the peer identity from the certificate,
//! never from headers), the export target is dialled, and after `200` the bytes flow.
//!
//! A peer chooses what it asks for and how often: metric labels here come only from objects
//! that exist (`metrics::ConnLabels`), names it sent are logged through
//! [`Untrusted`], and each refusal it can repeat is logged through the rate limit
//! (`ctx.logs`, keyed by the refusal and the peer or address) and always counted.

use std::{future::Future, net::SocketAddr, pin::Pin, sync::Arc, time::Instant};

use bytes::BytesMut;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    time::{timeout, Duration},
};
use tokio_rustls::{server::TlsStream, TlsAcceptor};
use tracing::{debug, field, info, info_span, Span};

use super::{relay, ConnGuard, Context, Opened};
use crate::{
    connections::{Admission, Admitted},
    limits::{Listener, Permit},
    logging::{limited, Untrusted},
    metrics::{
        ConnLabels, DecisionLabels, FailLabels, HandshakeFailLabels, Metrics, INGRESS,
        UNKNOWN_PEER, UNKNOWN_SERVICE,
    },
    peer::io::{peer_io, PeerIo},
    policy::{self, Attributes},
    state::Snapshot,
    tls::{dns_names, CertInfo},
    wire,
};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a peer's connection may wait before sending its request. Importers keep a few
/// handshaked connections ready (`peer::pool`) and drop them after
/// [`POOL_MAX_IDLE`](crate::peer::pool::POOL_MAX_IDLE), which must stay below this.
pub const REQUEST_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
const TARGET_TIMEOUT: Duration = Duration::from_secs(5);
const LINGER_TIME: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 256 * 1024;

/// Serves one gateway connection; `handshake` is its permit until its request is read. Not
/// an `async fn`: that would keep its own copies of the arguments next to `handle`'s for the
/// life of the connection (ARCHITECTURE.md, "Buffers").
pub fn serve(
    ctx: Arc<Context>,
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    from: SocketAddr,
    handshake: Permit,
) -> impl Future<Output = ()> {
    let span = info_span!(
        "ingress",
        peer_addr = %from,
        peer = field::Empty,
        export = field::Empty,
        import = field::Empty,
        decision = field::Empty,
        datapath = ctx.datapath.name(),
    );
    super::set_up_then_carry(handle(ctx, acceptor, tcp, from, handshake), span)
}

/// The `peer` label of a peer: its name if it is one of our Peers (a fabric member that is not
/// would otherwise add a series per certificate name).
fn peer_label(snapshot: &Snapshot, peer: &str) -> String {
    if snapshot.peers.contains_key(peer) {
        peer.to_owned()
    } else {
        UNKNOWN_PEER.to_owned()
    }
}

/// Counts a refusal in `clink_connections_failed_total`.
fn count_failure(ctx: &Context, service: &str, peer: String, reason: &'static str) {
    ctx.metrics
        .failed
        .get_or_create(&FailLabels {
            direction: INGRESS,
            service: service.to_owned(),
            peer,
            reason,
        })
        .inc();
}

fn count_handshake_failure(ctx: &Context, reason: &'static str) {
    ctx.metrics
        .handshake_failures
        .get_or_create(&HandshakeFailLabels { reason })
        .inc();
}

async fn handle(
    ctx: Arc<Context>,
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    from: SocketAddr,
    handshake: Permit,
) -> Option<Opened<Box<TlsStream<PeerIo>>>> {
    let started = Instant::now();
    let _ = tcp.set_nodelay(true);
    if let Err(e) = ctx.dialer.timeouts().apply(&tcp) {
        tracing::warn!(error = %e, "cannot set keepalive/user timeout on a peer socket");
    }
    // Boxed, the handshake and the stream: the task keeps only what the connection needs
    // while it lasts (ARCHITECTURE.md, "Buffers"). Before the handshake there is no identity:
    // failures are limited per source address.
    let accept = timeout(HANDSHAKE_TIMEOUT, acceptor.accept(peer_io(tcp)));
    let mut tls = match Box::pin(accept).await {
        Ok(Ok(tls)) => {
            Metrics::observe(&ctx.metrics.handshake, INGRESS, started.elapsed());
            Box::new(tls)
        }
        Ok(Err(e)) => {
            count_handshake_failure(&ctx, "error");
            limited!(ctx.logs, "handshake", from.ip(), WARN, error = %e, "TLS handshake failed");
            return None;
        }
        Err(_) => {
            count_handshake_failure(&ctx, "timeout");
            limited!(
                ctx.logs,
                "handshake-timeout",
                from.ip(),
                WARN,
                "TLS handshake timed out"
            );
            return None;
        }
    };
    let peer = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(dns_names)
        .and_then(|names| names.into_iter().next());
    let Some(peer) = peer else {
        count_handshake_failure(&ctx, "no-identity");
        limited!(
            ctx.logs,
            "no-identity",
            from.ip(),
            WARN,
            "client certificate has no DNS name; closing"
        );
        return None;
    };
    Span::current().record("peer", field::display(Untrusted(&peer)));
    let mut buf = BytesMut::with_capacity(4096);
    // Importers keep a few handshaked connections ready: wait for their request longer than
    // for a handshake.
    // Boxed, like everything this task awaits before the connection is carried: the task's
    // future is as large as its largest state, for the life of the connection.
    let request = match Box::pin(timeout(
        REQUEST_IDLE_TIMEOUT,
        wire::read_head(&mut tls, &mut buf, wire::parse_request),
    ))
    .await
    {
        Ok(Ok(request)) => request,
        Ok(Err(e)) => {
            let error = e.to_string();
            count_failure(&ctx, "", peer_label(&ctx.snapshot(), &peer), "protocol");
            limited!(ctx.logs, "bad-request", &peer, WARN, error = %Untrusted(&error), "bad request");
            refuse(&mut tls, 400, &error).await;
            return None;
        }
        Err(_) => {
            debug!("no request on an idle connection; closing");
            return None;
        }
    };
    match (request.method.as_str(), request.target.as_str()) {
        ("GET", "/healthz") => {
            Box::pin(healthz(&ctx, &mut tls, &peer)).await;
            None
        }
        ("CONNECT", _) => {
            drop(handshake);
            let Some(permit) = ctx.limits.connection(Listener::Gateway, None) else {
                let max = ctx.limits.caps().connections;
                limited!(
                    ctx.logs,
                    "capacity",
                    "gateway",
                    WARN,
                    max_connections = max,
                    "at capacity: CONNECT refused (503)"
                );
                refuse(
                    &mut tls,
                    503,
                    &format!("at capacity: {max} tunneled connections"),
                )
                .await;
                return None;
            };
            // Boxed: the handshake's and the request's states are not kept next to it for
            // the life of the connection, and (in debug builds, where tokio boxes any task
            // future over 2 KiB itself) the task fits a smaller allocation.
            Box::pin(connect(
                ctx,
                tls,
                peer,
                Box::new(request),
                buf,
                started,
                permit,
            ))
            .await
        }
        (method, target) => {
            count_failure(&ctx, "", peer_label(&ctx.snapshot(), &peer), "protocol");
            limited!(
                ctx.logs,
                "unsupported-request",
                &peer,
                WARN,
                method = %Untrusted(method),
                target = %Untrusted(target),
                "unsupported request"
            );
            refuse(&mut tls, 405, "only CONNECT and GET /healthz are served").await;
            None
        }
    }
}

/// Answers with an error and closes. Input the peer is still sending is drained for a moment
/// first (a lingering close), so the close does not turn into a reset that destroys the answer
/// before the peer reads it. Boxed: the tasks that may refuse would otherwise keep room for
/// the drain (its timer) for the life of every connection they carry.
fn refuse<'a>(
    tls: &'a mut TlsStream<PeerIo>,
    status: u16,
    reason: &'a str,
) -> Pin<Box<impl Future<Output = ()> + Send + 'a>> {
    Box::pin(refuse_now(tls, status, reason))
}

async fn refuse_now(tls: &mut TlsStream<PeerIo>, status: u16, reason: &str) {
    let _ = tls.write_all(&wire::response(status, &[], reason)).await;
    let _ = tls.shutdown().await;
    let drain = async {
        let mut sink = vec![0u8; 4096];
        let mut left = LINGER_BYTES;
        while left > 0 {
            match tls.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = timeout(LINGER_TIME, drain).await;
}

/// Answers a configured Peer's heartbeat with our labels; any other member of the fabric gets
/// `403`, as its CONNECT would.
async fn healthz(ctx: &Context, tls: &mut TlsStream<PeerIo>, peer: &str) {
    if !ctx.snapshot().peers.contains_key(peer) {
        // Debug, not warn: an unconfigured member's heartbeats come every few seconds.
        limited!(
            ctx.logs,
            "heartbeat-refused",
            peer,
            DEBUG,
            "heartbeat refused: certificate of a fabric member that is not one of our Peers"
        );
        refuse(tls, 403, &format!("peer {peer:?} is not known here")).await;
        return;
    }
    debug!("heartbeat");
    let labels = wire::format_labels(&ctx.labels);
    let _ = tls
        .write_all(&wire::response(
            200,
            &[(wire::LABELS_HEADER, &labels)],
            "ok",
        ))
        .await;
    let _ = tls.shutdown().await;
}

async fn connect(
    ctx: Arc<Context>,
    mut tls: Box<TlsStream<PeerIo>>,
    peer: String,
    // Boxed: an `async fn` keeps its arguments' room for as long as it runs.
    request: Box<wire::Request>,
    early: BytesMut,
    started: Instant,
    permit: Permit,
) -> Option<Opened<Box<TlsStream<PeerIo>>>> {
    if let Some(import) = request.header_values(wire::IMPORT_HEADER).next() {
        Span::current().record("import", field::display(Untrusted(import)));
    }
    let snapshot = ctx.snapshot();
    let Some(peer_object) = snapshot.peers.get(&peer) else {
        count_failure(&ctx, "", UNKNOWN_PEER.to_owned(), "unknown-peer");
        limited!(
            ctx.logs,
            "unknown-peer",
            &peer,
            WARN,
            "refused: certificate of a fabric member that is not one of our Peers"
        );
        refuse(&mut tls, 403, &format!("peer {peer:?} is not known here")).await;
        return None;
    };
    // From here on `peer` is one of our Peers: a label value of bounded number.
    let fail = |service: &str, reason: &'static str| {
        count_failure(&ctx, service, peer.clone(), reason);
    };
    let Some((export_name, export_ns)) = wire::parse_authority(&request.target) else {
        fail("", "protocol");
        limited!(
            ctx.logs,
            "malformed-target",
            &peer,
            WARN,
            target = %Untrusted(&request.target),
            "refused: malformed CONNECT target"
        );
        refuse(
            &mut tls,
            400,
            "CONNECT target must be <export>.<namespace>:443",
        )
        .await;
        return None;
    };
    let export_id = format!("{export_ns}/{export_name}");
    Span::current().record("export", field::display(Untrusted(&export_id)));
    let Some(export) = snapshot
        .exports
        .get(&(export_ns.to_owned(), export_name.to_owned()))
    else {
        fail(UNKNOWN_SERVICE, "no-export");
        limited!(
            ctx.logs,
            "no-export",
            &peer,
            WARN,
            "refused: no such export"
        );
        refuse(&mut tls, 404, &format!("no export {export_id}")).await;
        return None;
    };

    // Only client attributes are taken from the remote side; who the peer is comes from its
    // certificate.
    let client: Attributes = request
        .header_values(wire::SOURCE_HEADER)
        .filter_map(|value| value.split_once('='))
        .filter(|(k, _)| k.starts_with("client.clusterlink.net/"))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let remote = policy::Remote {
        peer: &peer,
        peer_labels: &peer_object.status.labels,
        client: &client,
    };
    // Not kept while the connection lasts: a recheck builds them again (`Admission`).
    let decision = {
        let (src, dst) = policy::ingress_attributes(
            ctx.own(),
            remote,
            (export_ns, export_name),
            &export.metadata.labels,
        );
        snapshot.policies.decide(export_ns, &src, &dst)
    };
    ctx.metrics
        .decisions
        .get_or_create(&DecisionLabels {
            direction: INGRESS,
            action: decision.action.as_str(),
            tier: decision.tier.as_str(),
        })
        .inc();
    if !decision.is_allowed() {
        Span::current().record("decision", field::display(&decision));
        fail(&export_id, "denied");
        limited!(
            ctx.logs,
            "denied",
            (&peer, &export_id),
            WARN,
            "refused: ingress denied"
        );
        refuse(&mut tls, 403, &format!("ingress {decision}")).await;
        return None;
    }
    // What the connection was admitted with (decided again on every change); the request
    // itself is not kept for the life of the connection.
    let admission = Admission {
        side: Admitted::Ingress {
            namespace: export_ns.to_owned(),
            name: export_name.to_owned(),
            peer: peer.clone(),
        },
        client,
    };
    drop(request);

    let host = export.spec.host.as_str();
    let port = export.spec.port;
    let dialled = match timeout(TARGET_TIMEOUT, TcpStream::connect((host, port))).await {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".to_owned()),
    };
    let target = match dialled {
        Ok(t) => t,
        Err(e) => {
            let reason = format!("cannot reach {host}:{port}: {e}");
            fail(&export_id, "unreachable");
            limited!(
                ctx.logs,
                "unreachable",
                &export_id,
                WARN,
                %reason,
                "refused: target unreachable"
            );
            refuse(&mut tls, 502, &reason).await;
            return None;
        }
    };
    let _ = target.set_nodelay(true);
    let local = target
        .peer_addr()
        .unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
    let guard = ConnGuard::open(
        &ctx,
        ConnLabels {
            direction: INGRESS,
            service: export_id,
            peer,
        },
        local,
        admission,
        &snapshot,
    );
    let mut target = target;
    // Flushed, so rustls holds no record to send when the kernel may take the session over.
    let answered = async {
        tls.write_all(&wire::response(200, &[], "")).await?;
        tls.flush().await
    };
    if answered.await.is_err() {
        return None;
    }
    if !early.is_empty() && target.write_all(&early).await.is_err() {
        relay::arm_reset(tls.get_ref().0.get_ref());
        return None;
    }
    // The head buffer is not kept for the life of the connection.
    let early_len = early.len() as u64;
    drop(early);
    Metrics::observe(&ctx.metrics.setup, INGRESS, started.elapsed());
    log_client_certificate(&tls);
    // The decision is logged here rather than kept in the span: a span's fields are a string
    // every open connection holds (ARCHITECTURE.md, "Buffers").
    info!(conn = guard.id(), %decision, "tunnel open");
    Some(Opened {
        guard,
        local: target,
        tunnel: tls,
        early: early_len,
        started,
        _permit: permit,
    })
}

/// Which certificate the peer presented, for certificate rotations: logged for tunnels only
/// (not for every refused request or heartbeat, which a peer can repeat at will).
fn log_client_certificate(tls: &TlsStream<PeerIo>) {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first());
    if let Some(cert) = leaf.and_then(|leaf| CertInfo::from_der(leaf).ok()) {
        debug!(serial = %cert.serial, not_after = %cert.not_after_text(), "client certificate");
    }
}
