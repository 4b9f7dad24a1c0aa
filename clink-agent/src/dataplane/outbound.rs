//! Egress: a local client connected to an Import's listener. Each source of the Import is
//! tried in order: local egress policy first, then one mTLS connection to the source's peer
//! carrying a CONNECT for the export. The first peer that answers 200 carries the connection;
//! if none does, the client is reset and the log line says why for every source.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use bytes::BytesMut;
use rustls::pki_types::ServerName;
use tokio::{
    io::AsyncWriteExt as _,
    net::TcpStream,
    time::{timeout, Duration},
};
use tokio_rustls::{client::TlsStream, TlsConnector};
use tracing::{debug, info, info_span, warn, Instrument as _};

use super::{relay, wire};
use crate::{
    agent::{ActiveGuard, Agent},
    api::{ImportSource, ObjectKey, Peer},
    policy::{attr, insert_labels, Attributes},
};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why one source could not carry the connection.
#[derive(Debug, thiserror::Error)]
enum DialError {
    #[error("cannot connect to {gateway}: {reason}")]
    Connect { gateway: String, reason: String },
    #[error("TLS with {gateway} failed: {reason}")]
    Tls { gateway: String, reason: String },
    #[error("refused by peer with {status}: {reason}")]
    Refused { status: u16, reason: String },
    #[error("protocol error from peer: {0}")]
    Wire(#[from] wire::WireError),
}

pub async fn serve(agent: Arc<Agent>, import: ObjectKey, client: TcpStream, from: SocketAddr) {
    let span = info_span!("egress", %import, client = %from);
    handle(agent, import, client, from).instrument(span).await
}

fn source_attributes(agent: &Agent) -> Attributes {
    let mut src = Attributes::new();
    src.insert(attr::PEER_NAME.to_owned(), agent.name().to_owned());
    insert_labels(&mut src, attr::PEER_LABELS, &agent.labels);
    src
}

fn destination_attributes(source: &ImportSource, peer: &Peer) -> Attributes {
    let mut dst = Attributes::new();
    dst.insert(attr::EXPORT_NAME.to_owned(), source.export_name.clone());
    dst.insert(
        attr::EXPORT_NAMESPACE.to_owned(),
        source.export_namespace.clone(),
    );
    dst.insert(attr::PEER_NAME.to_owned(), source.peer.clone());
    insert_labels(&mut dst, attr::PEER_LABELS, &peer.status.labels);
    dst
}

async fn handle(agent: Arc<Agent>, key: ObjectKey, client: TcpStream, _from: SocketAddr) {
    let started = Instant::now();
    let _active = ActiveGuard::new(&agent.stats);
    let snapshot = agent.snapshot();
    let Some(import) = snapshot.imports.get(&key) else {
        debug!("import was removed; closing");
        return;
    };
    let _ = client.set_nodelay(true);
    let src = source_attributes(&agent);
    let mut failures = Vec::new();
    for source in &import.spec.sources {
        let target = format!(
            "{}/{}@{}",
            source.export_namespace, source.export_name, source.peer
        );
        let Some(peer) = snapshot.peers.get(&source.peer) else {
            failures.push(format!("{target}: no Peer named {:?}", source.peer));
            continue;
        };
        let dst = destination_attributes(source, peer);
        let namespace = key.namespace.as_str();
        let decision = snapshot.policies.decide(namespace, &src, &dst);
        if !decision.is_allowed() {
            warn!(%target, %decision, "egress denied by local policy");
            failures.push(format!("{target}: egress {decision}"));
            continue;
        }
        debug!(%target, %decision, "egress allowed");
        match dial(&agent, peer, source, &src, &key).await {
            Ok((tunnel, early)) => {
                let setup = started.elapsed();
                info!(%target, %decision, setup_ms = setup.as_secs_f64() * 1e3, "tunnel open");
                carry(&agent, client, tunnel, early, &target, started).await;
                return;
            }
            Err(e) => {
                warn!(%target, error = %e, "source failed");
                failures.push(format!("{target}: {e}"));
            }
        }
    }
    agent
        .stats
        .failed
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    warn!(
        reasons = %failures.join("; "),
        "connection refused: no source could carry it"
    );
    relay::arm_reset(&client);
}

async fn dial(
    agent: &Agent,
    peer: &Peer,
    source: &ImportSource,
    src: &Attributes,
    import: &ObjectKey,
) -> Result<(TlsStream<TcpStream>, BytesMut), DialError> {
    let server_name = ServerName::try_from(source.peer.clone()).map_err(|e| DialError::Tls {
        gateway: source.peer.clone(),
        reason: format!("peer name is not a DNS name: {e}"),
    })?;
    let mut last = None;
    for gw in &peer.spec.gateways {
        let gateway = format!("{}:{}", gw.host, gw.port);
        let tcp = match timeout(
            CONNECT_TIMEOUT,
            TcpStream::connect((gw.host.as_str(), gw.port)),
        )
        .await
        {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => {
                last = Some(DialError::Connect {
                    gateway,
                    reason: e.to_string(),
                });
                continue;
            }
            Err(_) => {
                last = Some(DialError::Connect {
                    gateway,
                    reason: format!("timed out after {CONNECT_TIMEOUT:?}"),
                });
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let connector = TlsConnector::from(agent.identity.client.clone());
        let tls = timeout(
            HANDSHAKE_TIMEOUT,
            connector.connect(server_name.clone(), tcp),
        )
        .await;
        let mut tls = match tls {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                return Err(DialError::Tls {
                    gateway,
                    reason: e.to_string(),
                })
            }
            Err(_) => {
                return Err(DialError::Tls {
                    gateway,
                    reason: "handshake timed out".into(),
                })
            }
        };
        let request = wire::connect_request(
            &source.export_name,
            &source.export_namespace,
            &import.to_string(),
            src,
        );
        let mut buf = BytesMut::with_capacity(4096);
        let response = timeout(HANDSHAKE_TIMEOUT, async {
            tls.write_all(&request).await?;
            tls.flush().await?;
            wire::read_response(&mut tls, &mut buf).await
        })
        .await
        .map_err(|_| DialError::Tls {
            gateway: gateway.clone(),
            reason: "no answer to CONNECT".into(),
        })??;
        if response.status != 200 {
            return Err(DialError::Refused {
                status: response.status,
                reason: response.body,
            });
        }
        return Ok((tls, buf));
    }
    Err(last.unwrap_or(DialError::Connect {
        gateway: "-".into(),
        reason: "peer has no gateways".into(),
    }))
}

async fn carry(
    agent: &Agent,
    mut client: TcpStream,
    tunnel: TlsStream<TcpStream>,
    early: BytesMut,
    target: &str,
    started: Instant,
) {
    if !early.is_empty() {
        if let Err(e) = client.write_all(&early).await {
            warn!(%target, error = %e, "client went away");
            return;
        }
    }
    let outcome = relay::relay(client, tunnel).await;
    let sent = outcome.a_to_b;
    let received = outcome.b_to_a + early.len() as u64;
    let stats = &agent.stats;
    stats
        .bytes_out
        .fetch_add(sent, std::sync::atomic::Ordering::Relaxed);
    stats
        .bytes_in
        .fetch_add(received, std::sync::atomic::Ordering::Relaxed);
    let duration_ms = started.elapsed().as_secs_f64() * 1e3;
    match outcome.error {
        None => info!(%target, sent, received, duration_ms, "closed"),
        Some(e) => info!(%target, sent, received, duration_ms, error = %e, "reset"),
    }
}
