//! Peer heartbeats: `GET /healthz` over mTLS to each Peer's gateways, about every second while
//! the peer is reachable and every ten seconds while it is not. Three answers in a row make a
//! peer reachable, five failures in a row unreachable; the outcome is the Peer's
//! `PeerReachable` condition, its `status.labels` (the labels the remote agent announces), the
//! `clink_peer_reachable` metric, and the order in which the data path tries peers and their
//! gateways.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Weak,
    },
    time::Duration,
};

use bytes::BytesMut;
use tokio::{io::AsyncWriteExt as _, sync::mpsc, task::JoinHandle, time::timeout};
use tracing::{debug, info, warn};

use super::{
    dial::{Dialer, CONNECT_TIMEOUT},
    pool::Pool,
};
use crate::{
    api::{ObjectKey, PeerSpec},
    wire,
};

pub const REACHABLE_INTERVAL: Duration = Duration::from_secs(1);
pub const UNREACHABLE_INTERVAL: Duration = Duration::from_secs(10);
pub const SUCCESSES_TO_REACHABLE: u32 = 3;
pub const FAILURES_TO_UNREACHABLE: u32 = 5;
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the data path needs to know about a peer, shared lock-free with the heartbeat task.
#[derive(Debug, Default)]
pub struct PeerHealth {
    reachable: AtomicBool,
    /// The gateway that answered last; tried first.
    preferred: AtomicUsize,
    pub pool: Pool,
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

/// One heartbeat: the peer's announced labels, or why it did not answer.
async fn probe(
    dialer: &Dialer,
    peer: &str,
    spec: &PeerSpec,
    health: &PeerHealth,
) -> Result<BTreeMap<String, String>, String> {
    let attempt = async {
        let (mut tls, _) = dialer
            .connect_tls(peer, &spec.gateways, Some(health))
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
            // The body is the peer's: escaped, so it cannot add lines to our log.
            return Err(format!("answered {}: {:?}", resp.status, resp.body));
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

/// What heartbeats learned about a Peer, for its status: a change of reachability (with the
/// condition's message) and/or the labels it announces.
#[derive(Debug)]
pub struct PeerEvent {
    pub key: ObjectKey,
    pub reachable: Option<(bool, String)>,
    pub labels: Option<BTreeMap<String, String>>,
}

/// Runs heartbeats for one Peer until aborted, the dialer is gone, or nobody listens for
/// its events. `health` is updated in place (the data path reads it); status changes go to
/// `events`.
pub fn spawn_heartbeat(
    dialer: Weak<Dialer>,
    key: ObjectKey,
    spec: PeerSpec,
    health: Arc<PeerHealth>,
    events: mpsc::UnboundedSender<PeerEvent>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let peer = key.name.clone();
        let mut successes = 0u32;
        let mut failures = 0u32;
        // None until enough heartbeats have been seen to say either way.
        let mut state: Option<bool> = None;
        let mut labels: Option<BTreeMap<String, String>> = None;
        loop {
            let Some(dialer) = dialer.upgrade() else {
                return;
            };
            let result = probe(&dialer, &peer, &spec, &health).await;
            drop(dialer);
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
                        let event = PeerEvent {
                            key: key.clone(),
                            reachable: None,
                            labels: Some(announced),
                        };
                        if events.send(event).is_err() {
                            return;
                        }
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
                let event = PeerEvent {
                    key: key.clone(),
                    reachable: Some((reachable, message)),
                    labels: None,
                };
                if events.send(event).is_err() {
                    return;
                }
            }
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
