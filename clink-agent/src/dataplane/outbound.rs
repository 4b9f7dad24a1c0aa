//! Egress: a local client connected to an Import's listener. The Import's sources are tried
//! in the order its `lbScheme` and peer health give: local egress policy first, then one mTLS
//! connection to the source's peer carrying a CONNECT for the export. The first peer that
//! answers 200 carries the connection; a source that is denied, refuses or cannot be reached
//! is skipped, and only when none is left is the client reset, with every reason logged.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Instant};

use bytes::BytesMut;
use tokio::{
    io::AsyncWriteExt as _,
    net::TcpStream,
    time::{timeout, Duration},
};
use tokio_rustls::client::TlsStream;
use tracing::{debug, field, info, info_span, warn, Span};

use super::{relay, ConnGuard, Context, Opened};
use crate::{
    api::{ImportSource, ObjectKey},
    clients::unmapped,
    connections::{Admission, Admitted},
    limits::Permit,
    logging::limited,
    metrics::{ConnLabels, DecisionLabels, FailLabels, Metrics, EGRESS, UNKNOWN_PEER},
    peer::{io::PeerIo, pool, DialError},
    policy::{self, Attributes},
    state::Snapshot,
    wire,
};

const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Why one source could not carry the connection.
#[derive(Debug, thiserror::Error)]
enum SourceError {
    #[error("no Peer named {0:?}")]
    UnknownPeer(String),
    #[error("egress {0}")]
    Denied(String),
    #[error(transparent)]
    Dial(#[from] DialError),
    /// `reason` is the peer's answer: Debug-escaped, so it cannot add lines to our log.
    #[error("refused by peer with {status}: {reason:?}")]
    Refused { status: u16, reason: String },
    #[error("protocol error from peer: {0}")]
    Wire(#[from] wire::WireError),
    #[error("no answer to CONNECT within {ANSWER_TIMEOUT:?}")]
    NoAnswer,
}

impl SourceError {
    /// The `reason` label of `clink_connections_failed_total`.
    fn reason(&self) -> &'static str {
        match self {
            SourceError::UnknownPeer(_) => "unknown-peer",
            SourceError::Denied(_) => "denied",
            SourceError::Dial(DialError::Tls { .. }) => "tls",
            SourceError::Dial(_) => "unreachable",
            SourceError::Refused { status: 403, .. } => "refused-403",
            SourceError::Refused { status: 404, .. } => "refused-404",
            SourceError::Refused { status: 502, .. } => "refused-502",
            SourceError::Refused { status: 503, .. } => "refused-503",
            SourceError::Refused { .. } => "refused",
            SourceError::Wire(_) | SourceError::NoAnswer => "protocol",
        }
    }
}

/// Serves one client of an Import; `permit` is its place under the connection caps. Not an
/// `async fn`: that would keep its own copies of the arguments next to `handle`'s for the
/// life of the connection (ARCHITECTURE.md, "Buffers").
pub fn serve(
    ctx: Arc<Context>,
    import: ObjectKey,
    client: TcpStream,
    from: SocketAddr,
    permit: Permit,
) -> impl Future<Output = ()> {
    let span = info_span!(
        "egress",
        import = %format!("{}/{}", import.namespace, import.name),
        client = %SocketAddr::new(unmapped(from.ip()), from.port()),
        source = field::Empty,
        peer = field::Empty,
        datapath = ctx.datapath.name(),
        service_addr = field::Empty,
    );
    super::set_up_then_carry(handle(ctx, import, client, from, permit), span)
}

/// Sets the connection up: a tunnel through the first source that takes it. `permit` is
/// its place under the caps, held until it ends.
async fn handle(
    ctx: Arc<Context>,
    key: ObjectKey,
    mut client: TcpStream,
    from: SocketAddr,
    permit: Permit,
) -> Option<Opened<Box<TlsStream<PeerIo>>>> {
    let started = Instant::now();
    // On the sockmap path, a client may have asked for the Import's service address.
    if let Ok(local) = client.local_addr() {
        if let Some(service) = ctx.datapath.original_destination(local, from) {
            Span::current().record("service_addr", field::display(service));
        }
    }
    let snapshot = ctx.snapshot();
    let Some(import) = snapshot.imports.get(&key) else {
        debug!("import was removed; closing");
        return None;
    };
    let _ = client.set_nodelay(true);
    let service = format!("{}/{}", key.namespace, key.name);
    // The client's own attributes; the rest are the source's and this agent's.
    let client_attributes = ctx.clients.attributes(from.ip());
    let metrics = &ctx.metrics;
    let mut failures = Vec::new();
    for source in ctx.balancer.order(&key, import, &ctx.peers) {
        let target = format!(
            "{}/{}@{}",
            source.export_namespace, source.export_name, source.peer
        );
        // Boxed: the dial and handshake are not kept in the task while the connection lasts.
        match Box::pin(try_source(
            &ctx,
            &snapshot,
            source,
            &client_attributes,
            &key,
        ))
        .await
        {
            Ok((tunnel, early, decision)) => {
                let span = Span::current();
                span.record("source", field::display(&target));
                span.record("peer", field::display(&source.peer));
                let labels = ConnLabels {
                    direction: EGRESS,
                    service,
                    peer: source.peer.clone(),
                };
                let admission = Admission {
                    side: Admitted::Egress {
                        import: key.clone(),
                        source: source.clone(),
                    },
                    client: client_attributes,
                };
                let local = SocketAddr::new(unmapped(from.ip()), from.port());
                let guard = ConnGuard::open(&ctx, labels, local, admission, &snapshot);
                let setup = started.elapsed();
                Metrics::observe(&metrics.setup, EGRESS, setup);
                // The decision is logged here rather than kept in the span: a span's fields
                // are a string every open connection holds (ARCHITECTURE.md, "Buffers").
                info!(
                    conn = guard.id(),
                    setup_ms = setup.as_secs_f64() * 1e3,
                    %decision,
                    "tunnel open"
                );
                if !early.is_empty() {
                    if let Err(e) = client.write_all(&early).await {
                        warn!(error = %e, "client went away");
                        return None;
                    }
                }
                return Some(Opened {
                    guard,
                    local: client,
                    tunnel,
                    early: early.len() as u64,
                    started,
                    _permit: permit,
                });
            }
            Err(e) => {
                // An Import may name a Peer that does not exist (yet): not a label value.
                let peer = match e {
                    SourceError::UnknownPeer(_) => UNKNOWN_PEER.to_owned(),
                    _ => source.peer.clone(),
                };
                metrics
                    .failed
                    .get_or_create(&FailLabels {
                        direction: EGRESS,
                        service: service.clone(),
                        peer,
                        reason: e.reason(),
                    })
                    .inc();
                // A local client can repeat this as fast as it connects.
                limited!(
                    ctx.logs,
                    e.reason(),
                    (&key, &target),
                    WARN,
                    %target,
                    error = %e,
                    "source skipped"
                );
                failures.push(format!("{target}: {e}"));
            }
        }
    }
    metrics
        .failed
        .get_or_create(&FailLabels {
            direction: EGRESS,
            service,
            peer: String::new(),
            reason: "no-source",
        })
        .inc();
    limited!(
        ctx.logs,
        "no-source",
        &key,
        WARN,
        reasons = %failures.join("; "),
        "connection refused: no source could carry it"
    );
    relay::arm_reset(&client);
    None
}

async fn try_source(
    ctx: &Context,
    snapshot: &Snapshot,
    source: &ImportSource,
    client: &Attributes,
    import: &ObjectKey,
) -> Result<(Box<TlsStream<PeerIo>>, BytesMut, String), SourceError> {
    let peer = snapshot
        .peers
        .get(&source.peer)
        .ok_or_else(|| SourceError::UnknownPeer(source.peer.clone()))?;
    let (src, dst) = policy::egress_attributes(ctx.own(), client, source, &peer.status.labels);
    // One snapshot per client connection: the sources and the policies it is checked
    // against come from the same configuration.
    let decision = snapshot.policies.decide(&import.namespace, &src, &dst);
    ctx.metrics
        .decisions
        .get_or_create(&DecisionLabels {
            direction: EGRESS,
            action: decision.action.as_str(),
            tier: decision.tier.as_str(),
        })
        .inc();
    if !decision.is_allowed() {
        return Err(SourceError::Denied(decision.to_string()));
    }
    debug!(peer = %source.peer, %decision, "egress allowed");
    let health = ctx.peers.get(&source.peer);
    let request = wire::connect_request(
        &source.export_name,
        &source.export_namespace,
        &format!("{}/{}", import.namespace, import.name),
        &src,
    );
    let generation = ctx.dialer.generation();
    let mut pooled = health.as_ref().and_then(|h| h.pool.take(generation));
    let (tls, buf, response) = loop {
        let reused = pooled.is_some();
        let mut tls = match pooled.take() {
            Some(tls) => tls,
            None => {
                let (tls, handshake) = ctx
                    .dialer
                    .connect_tls(&source.peer, &peer.spec.gateways, health.as_deref())
                    .await?;
                Metrics::observe(&ctx.metrics.handshake, EGRESS, handshake);
                tls
            }
        };
        let mut buf = BytesMut::with_capacity(4096);
        let response = timeout(ANSWER_TIMEOUT, async {
            tls.write_all(&request).await?;
            tls.flush().await?;
            wire::read_response(&mut tls, &mut buf).await
        })
        .await;
        match response {
            Ok(Ok(response)) => break (tls, buf, response),
            // The peer closed a pooled connection (restart, idle timeout): dial afresh.
            Ok(Err(e)) if reused => debug!(error = %e, "pooled connection was stale"),
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => return Err(SourceError::NoAnswer),
        }
    };
    if let Some(health) = &health {
        pool::refill(&ctx.dialer, &source.peer, &peer.spec.gateways, health);
    }
    if response.status != 200 {
        return Err(SourceError::Refused {
            status: response.status,
            reason: response.body,
        });
    }
    Ok((Box::new(tls), buf, decision.to_string()))
}
