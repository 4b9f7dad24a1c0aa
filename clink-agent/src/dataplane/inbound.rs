//! Ingress: a peer connected to the gateway port. The TLS handshake proves the peer's identity
//! (a certificate of our fabric); the certificate's DNS name must be one of our Peers. Then one
//! request head: `GET /healthz` is answered with our labels; `CONNECT <export>.<ns>:443` is
//! checked against the Export and ingress policy (with the peer identity from the certificate,
//! never from headers), the export target is dialled, and after `200` the bytes flow.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use bytes::BytesMut;
use tokio::{
    io::AsyncWriteExt as _,
    net::TcpStream,
    time::{timeout, Duration},
};
use tokio_rustls::{server::TlsStream, TlsAcceptor};
use tracing::{debug, info, info_span, warn, Instrument as _};

use super::{relay, wire};
use crate::{
    agent::{ActiveGuard, Agent},
    policy::{attr, insert_labels, Attributes},
    tls::dns_names,
};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const TARGET_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn serve(agent: Arc<Agent>, acceptor: TlsAcceptor, tcp: TcpStream, from: SocketAddr) {
    let span = info_span!("ingress", peer_addr = %from);
    handle(agent, acceptor, tcp).instrument(span).await
}

async fn handle(agent: Arc<Agent>, acceptor: TlsAcceptor, tcp: TcpStream) {
    let started = Instant::now();
    let _ = tcp.set_nodelay(true);
    let mut tls = match timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            warn!(error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            warn!("TLS handshake timed out");
            return;
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
        warn!("client certificate has no DNS name; closing");
        return;
    };
    let mut buf = BytesMut::with_capacity(4096);
    let request = match timeout(
        HANDSHAKE_TIMEOUT,
        wire::read_head(&mut tls, &mut buf, wire::parse_request),
    )
    .await
    {
        Ok(Ok(request)) => request,
        Ok(Err(e)) => {
            warn!(%peer, error = %e, "bad request");
            refuse(&mut tls, 400, &e.to_string()).await;
            return;
        }
        Err(_) => {
            warn!(%peer, "no request within {HANDSHAKE_TIMEOUT:?}");
            return;
        }
    };
    match (request.method.as_str(), request.target.as_str()) {
        ("GET", "/healthz") => healthz(&agent, &mut tls, &peer).await,
        ("CONNECT", _) => connect(agent, tls, peer, request, buf, started).await,
        (method, target) => {
            warn!(%peer, method, target, "unsupported request");
            refuse(&mut tls, 405, "only CONNECT and GET /healthz are served").await;
        }
    }
}

async fn refuse(tls: &mut TlsStream<TcpStream>, status: u16, reason: &str) {
    let _ = tls.write_all(&wire::response(status, &[], reason)).await;
    let _ = tls.shutdown().await;
}

async fn healthz(agent: &Agent, tls: &mut TlsStream<TcpStream>, peer: &str) {
    debug!(%peer, "heartbeat");
    let labels = agent
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
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
    agent: Arc<Agent>,
    mut tls: TlsStream<TcpStream>,
    peer: String,
    request: wire::Request,
    early: BytesMut,
    started: Instant,
) {
    let import = request
        .header_values(wire::IMPORT_HEADER)
        .next()
        .unwrap_or("-")
        .to_owned();
    let snapshot = agent.snapshot();
    let Some(peer_object) = snapshot.peers.get(&peer) else {
        warn!(%peer, %import, "refused: certificate of a fabric member that is not one of our Peers");
        refuse(&mut tls, 403, &format!("peer {peer:?} is not known here")).await;
        return;
    };
    let Some((export_name, export_ns)) = wire::parse_authority(&request.target) else {
        warn!(%peer, target = %request.target, "refused: malformed CONNECT target");
        refuse(
            &mut tls,
            400,
            "CONNECT target must be <export>.<namespace>:443",
        )
        .await;
        return;
    };
    let export_id = format!("{export_ns}/{export_name}");
    let Some(export) = snapshot
        .exports
        .get(&(export_ns.to_owned(), export_name.to_owned()))
    else {
        warn!(%peer, %import, export = %export_id, "refused: no such export");
        refuse(&mut tls, 404, &format!("no export {export_id}")).await;
        return;
    };

    let mut src = Attributes::new();
    src.insert(attr::PEER_NAME.to_owned(), peer.clone());
    insert_labels(&mut src, attr::PEER_LABELS, &peer_object.status.labels);
    for value in request.header_values(wire::SOURCE_HEADER) {
        // Only client attributes are taken from the remote side; who the peer is comes from
        // its certificate.
        if let Some((k, v)) = value.split_once('=') {
            if k.starts_with("client.clusterlink.net/") {
                src.insert(k.to_owned(), v.to_owned());
            }
        }
    }
    let mut dst = Attributes::new();
    dst.insert(attr::EXPORT_NAME.to_owned(), export_name.to_owned());
    dst.insert(attr::EXPORT_NAMESPACE.to_owned(), export_ns.to_owned());
    insert_labels(&mut dst, attr::EXPORT_LABELS, &export.metadata.labels);
    dst.insert(attr::PEER_NAME.to_owned(), agent.name().to_owned());
    insert_labels(&mut dst, attr::PEER_LABELS, &agent.labels);
    let decision = snapshot.policies.decide(export_ns, &src, &dst);
    if !decision.is_allowed() {
        warn!(%peer, %import, export = %export_id, %decision, "refused: ingress denied");
        agent
            .stats
            .failed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        refuse(&mut tls, 403, &format!("ingress {decision}")).await;
        return;
    }

    let host = export.spec.host.as_str();
    let port = export.spec.port;
    let target = match timeout(TARGET_TIMEOUT, TcpStream::connect((host, port))).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            let reason = format!("cannot reach {host}:{port}: {e}");
            warn!(%peer, %import, export = %export_id, %reason, "refused: target unreachable");
            refuse(&mut tls, 502, &reason).await;
            return;
        }
        Err(_) => {
            let reason = format!("cannot reach {host}:{port}: timed out");
            warn!(%peer, %import, export = %export_id, %reason, "refused: target unreachable");
            refuse(&mut tls, 502, &reason).await;
            return;
        }
    };
    let _ = target.set_nodelay(true);
    let _active = ActiveGuard::new(&agent.stats);
    let mut target = target;
    if tls.write_all(&wire::response(200, &[], "")).await.is_err() {
        return;
    }
    if !early.is_empty() && target.write_all(&early).await.is_err() {
        relay::arm_reset(tls.get_ref().0);
        return;
    }
    info!(%peer, %import, export = %export_id, %decision, "tunnel open");
    let outcome = relay::relay(tls, target).await;
    let received = outcome.a_to_b + early.len() as u64;
    let sent = outcome.b_to_a;
    let stats = &agent.stats;
    stats
        .bytes_in
        .fetch_add(received, std::sync::atomic::Ordering::Relaxed);
    stats
        .bytes_out
        .fetch_add(sent, std::sync::atomic::Ordering::Relaxed);
    let duration_ms = started.elapsed().as_secs_f64() * 1e3;
    match outcome.error {
        None => info!(%peer, export = %export_id, received, sent, duration_ms, "closed"),
        Some(e) => {
            info!(%peer, export = %export_id, received, sent, duration_ms, error = %e, "reset")
        }
    }
}
