//! Peer heartbeats: `GET /healthz` over mTLS to each Peer's gateways, about every second while
//! the peer is reachable and every ten seconds while it is not. Three answers in a row make a
//! peer reachable, five failures in a row unreachable; the outcome is the Peer's
//! `PeerReachable` condition, its `status.labels` (the labels the remote agent announces), the
//! `clink_peer_reachable` metric, and the order in which the data path tries peers and their
//! gateways.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Weak,
    },
    time::{Duration, Instant},
};

use bytes::BytesMut;
use rustls::pki_types::ServerName;
use tokio::{io::AsyncWriteExt as _, net::TcpStream, task::JoinHandle, time::timeout};
use tokio_rustls::{client::TlsStream, TlsConnector};
use tracing::{debug, info, warn};

use crate::{
    agent::Agent,
    api::{Endpoint, ObjectKey, PeerSpec},
    dataplane::{
        relay::{self, PeerIo},
        wire,
    },
};

pub const REACHABLE_INTERVAL: Duration = Duration::from_secs(1);
pub const UNREACHABLE_INTERVAL: Duration = Duration::from_secs(10);
pub const SUCCESSES_TO_REACHABLE: u32 = 3;
pub const FAILURES_TO_UNREACHABLE: u32 = 5;
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Idle pre-handshaked connections kept per peer once it carries traffic.
pub const POOL_SIZE: usize = 4;
/// A pooled connection older than this is dropped rather than used: the exporter closes
/// connections that have not sent a request within [`POOL_SERVER_IDLE`].
pub const POOL_MAX_IDLE: Duration = Duration::from_secs(20);
/// How long an exporter waits for the request on an accepted connection.
pub const POOL_SERVER_IDLE: Duration = Duration::from_secs(30);

/// Connections to one peer that have finished their TLS handshake and wait for a CONNECT, so
/// that a new client connection costs one round trip, not three. Filled in the background
/// after each use, so idle peers hold none.
#[derive(Default)]
pub struct Pool {
    idle: std::sync::Mutex<VecDeque<(Instant, TlsStream<PeerIo>)>>,
    filling: AtomicBool,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("idle", &self.len()).finish()
    }
}

impl Pool {
    /// The freshest idle connection still young enough to use.
    pub fn take(&self) -> Option<TlsStream<PeerIo>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((since, conn)) = idle.pop_back() {
            if since.elapsed() < POOL_MAX_IDLE {
                return Some(conn);
            }
        }
        None
    }

    pub fn len(&self) -> usize {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn put(&self, conn: TlsStream<PeerIo>) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|(since, _)| since.elapsed() < POOL_MAX_IDLE);
        idle.push_back((Instant::now(), conn));
    }
}

/// What the data path needs to know about a peer, shared lock-free with the heartbeat task.
#[derive(Debug, Default)]
pub struct PeerHealth {
    reachable: AtomicBool,
    /// The gateway that answered last; tried first.
    preferred: AtomicUsize,
    pub pool: Pool,
}

/// Tops up `health`'s pool to [`POOL_SIZE`] in the background, unless that is under way.
pub fn refill(agent: &Arc<Agent>, peer: &str, gateways: &[Endpoint], health: &Arc<PeerHealth>) {
    if health.pool.len() >= POOL_SIZE || health.pool.filling.swap(true, Ordering::AcqRel) {
        return;
    }
    let (agent, peer, gateways, health) = (
        Arc::downgrade(agent),
        peer.to_owned(),
        gateways.to_vec(),
        health.clone(),
    );
    tokio::spawn(async move {
        while health.pool.len() < POOL_SIZE {
            let Some(agent) = agent.upgrade() else { break };
            match connect_tls(&agent, &peer, &gateways, Some(&health)).await {
                Ok((conn, _)) => health.pool.put(conn),
                Err(e) => {
                    debug!(%peer, error = %e, "could not refill the connection pool");
                    break;
                }
            }
        }
        health.pool.filling.store(false, Ordering::Release);
    });
}

impl PeerHealth {
    pub fn reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }

    /// Gateway indexes, the one that last answered first, then the rest in listed order.
    pub fn gateway_order(&self, count: usize) -> Vec<usize> {
        let first = self
            .preferred
            .load(Ordering::Relaxed)
            .min(count.saturating_sub(1));
        std::iter::once(first)
            .chain((0..count).filter(move |&i| i != first))
            .take(count)
            .collect()
    }

    pub fn prefer(&self, gateway: usize) {
        self.preferred.store(gateway, Ordering::Relaxed);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("cannot connect to {gateway}: {reason}")]
    Connect { gateway: String, reason: String },
    #[error("TLS with {gateway} failed: {reason}")]
    Tls { gateway: String, reason: String },
    #[error("peer has no gateways")]
    NoGateway,
}

/// Opens an mTLS connection to `peer`, trying its gateways in order of health. Returns the
/// stream and the TLS handshake time.
pub async fn connect_tls(
    agent: &Agent,
    peer: &str,
    gateways: &[Endpoint],
    health: Option<&PeerHealth>,
) -> Result<(TlsStream<PeerIo>, Duration), DialError> {
    let server_name = ServerName::try_from(peer.to_owned()).map_err(|e| DialError::Tls {
        gateway: peer.to_owned(),
        reason: format!("peer name is not a DNS name: {e}"),
    })?;
    let order = match health {
        Some(h) => h.gateway_order(gateways.len()),
        None => (0..gateways.len()).collect(),
    };
    let mut last = DialError::NoGateway;
    for index in order {
        let gw = &gateways[index];
        let gateway = format!("{}:{}", gw.host, gw.port);
        let tcp = match timeout(
            CONNECT_TIMEOUT,
            TcpStream::connect((gw.host.as_str(), gw.port)),
        )
        .await
        {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => {
                last = DialError::Connect {
                    gateway,
                    reason: e.to_string(),
                };
                continue;
            }
            Err(_) => {
                last = DialError::Connect {
                    gateway,
                    reason: format!("timed out after {CONNECT_TIMEOUT:?}"),
                };
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let started = std::time::Instant::now();
        let connector = TlsConnector::from(agent.identity.client.clone());
        match timeout(
            CONNECT_TIMEOUT,
            connector.connect(server_name.clone(), relay::peer_io(tcp)),
        )
        .await
        {
            Ok(Ok(tls)) => {
                if let Some(h) = health {
                    h.prefer(index);
                }
                return Ok((tls, started.elapsed()));
            }
            Ok(Err(e)) => {
                last = DialError::Tls {
                    gateway,
                    reason: e.to_string(),
                }
            }
            Err(_) => {
                last = DialError::Tls {
                    gateway,
                    reason: "handshake timed out".into(),
                }
            }
        }
    }
    Err(last)
}

/// One heartbeat: the peer's announced labels, or why it did not answer.
async fn probe(
    agent: &Agent,
    peer: &str,
    spec: &PeerSpec,
    health: &PeerHealth,
) -> Result<BTreeMap<String, String>, String> {
    let attempt = async {
        let (mut tls, _) = connect_tls(agent, peer, &spec.gateways, Some(health))
            .await
            .map_err(|e| e.to_string())?;
        tls.write_all(&wire::healthz_request(peer))
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = BytesMut::with_capacity(1024);
        let resp = wire::read_response(&mut tls, &mut buf)
            .await
            .map_err(|e| e.to_string())?;
        if resp.status != 200 {
            return Err(format!("answered {}: {}", resp.status, resp.body));
        }
        let labels = resp
            .headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(wire::LABELS_HEADER))
            .map(|(_, v)| wire::parse_labels(v))
            .unwrap_or_default();
        Ok(labels)
    };
    match timeout(PROBE_TIMEOUT + CONNECT_TIMEOUT, attempt).await {
        Ok(r) => r,
        Err(_) => Err("heartbeat timed out".into()),
    }
}

/// Runs heartbeats for one Peer until aborted or the agent is gone.
pub fn spawn_heartbeat(
    agent: Weak<Agent>,
    key: ObjectKey,
    spec: PeerSpec,
    health: Arc<PeerHealth>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let peer = key.name.clone();
        let mut successes = 0u32;
        let mut failures = 0u32;
        // None until enough heartbeats have been seen to say either way.
        let mut state: Option<bool> = None;
        let mut labels: Option<BTreeMap<String, String>> = None;
        loop {
            let Some(agent) = agent.upgrade() else { return };
            let result = probe(&agent, &peer, &spec, &health).await;
            let last_ok = result.is_ok();
            let mut transition = None;
            match result {
                Ok(announced) => {
                    successes += 1;
                    failures = 0;
                    debug!(%peer, "heartbeat answered");
                    if state != Some(true) && successes >= SUCCESSES_TO_REACHABLE {
                        transition =
                            Some((true, format!("{successes} heartbeats answered in a row")));
                    }
                    if labels.as_ref() != Some(&announced) {
                        labels = Some(announced.clone());
                        agent.set_peer_status(&key, None, Some(announced)).await;
                    }
                }
                Err(reason) => {
                    failures += 1;
                    successes = 0;
                    debug!(%peer, %reason, "heartbeat failed");
                    if state != Some(false) && failures >= FAILURES_TO_UNREACHABLE {
                        transition = Some((
                            false,
                            format!("{failures} heartbeats failed in a row; last: {reason}"),
                        ));
                    }
                }
            }
            if let Some((reachable, message)) = transition {
                state = Some(reachable);
                health.reachable.store(reachable, Ordering::Relaxed);
                if reachable {
                    info!(%peer, %message, "peer reachable");
                } else {
                    warn!(%peer, %message, "peer unreachable");
                }
                agent
                    .set_peer_status(&key, Some((reachable, message)), None)
                    .await;
            }
            drop(agent);
            let interval = if state == Some(false) && !last_ok {
                UNREACHABLE_INTERVAL
            } else {
                REACHABLE_INTERVAL
            };
            tokio::time::sleep(interval).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthy_gateway_goes_first() {
        let h = PeerHealth::default();
        assert_eq!(h.gateway_order(3), [0, 1, 2]);
        h.prefer(2);
        assert_eq!(h.gateway_order(3), [2, 0, 1]);
        assert_eq!(h.gateway_order(1), [0]);
        assert!(h.gateway_order(0).is_empty());
    }
}
