//! Connections to a peer that have finished their TLS handshake and wait for a CONNECT, so
//! that a new client connection costs one round trip, not three.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use tokio_rustls::client::TlsStream;
use tracing::debug;

use super::{dial::Dialer, io::PeerIo, PeerHealth};
use crate::api::Endpoint;

/// Idle pre-handshaked connections kept per peer once it carries traffic.
pub const POOL_SIZE: usize = 4;
/// A pooled connection older than this is dropped rather than used: the exporter closes
/// connections that have not sent a request within
/// [`REQUEST_IDLE_TIMEOUT`](crate::dataplane::inbound::REQUEST_IDLE_TIMEOUT).
pub const POOL_MAX_IDLE: Duration = Duration::from_secs(20);

/// Connections to one peer that have finished their TLS handshake and wait for a CONNECT, so
/// that a new client connection costs one round trip, not three. Filled in the background
/// after each use, so idle peers hold none.
///
/// Each connection is kept with the generation of the credentials it was made with
/// ([`crate::tls::Credentials`]): after a certificate reload, connections made with the
/// previous certificate are dropped instead of used, so every tunnel opened after a reload
/// presents the new certificate (the pool would otherwise serve up to [`POOL_MAX_IDLE`] of
/// old ones).
#[derive(Default)]
pub struct Pool {
    idle: std::sync::Mutex<VecDeque<Idle>>,
    filling: AtomicBool,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("idle", &self.len()).finish()
    }
}

/// One pooled connection: since when it waits, and the credentials generation it was made
/// with.
struct Idle {
    since: Instant,
    generation: u64,
    conn: TlsStream<PeerIo>,
}

impl Pool {
    /// The freshest idle connection still young enough to use and made with credentials of
    /// `generation` (the current one); older ones are dropped.
    pub fn take(&self, generation: u64) -> Option<TlsStream<PeerIo>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(entry) = idle.pop_back() {
            if entry.since.elapsed() < POOL_MAX_IDLE && entry.generation == generation {
                return Some(entry.conn);
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

    fn put(&self, conn: TlsStream<PeerIo>, generation: u64) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|e| e.since.elapsed() < POOL_MAX_IDLE && e.generation == generation);
        idle.push_back(Idle {
            since: Instant::now(),
            generation,
            conn,
        });
    }
}

/// Tops up `health`'s pool to [`POOL_SIZE`] in the background, unless that is under way.
pub fn refill(dialer: &Arc<Dialer>, peer: &str, gateways: &[Endpoint], health: &Arc<PeerHealth>) {
    if health.pool.len() >= POOL_SIZE || health.pool.filling.swap(true, Ordering::AcqRel) {
        return;
    }
    let (dialer, peer, gateways, health) = (
        Arc::downgrade(dialer),
        peer.to_owned(),
        gateways.to_vec(),
        health.clone(),
    );
    tokio::spawn(async move {
        while health.pool.len() < POOL_SIZE {
            let Some(dialer) = dialer.upgrade() else {
                break;
            };
            // Read before dialing: a reload during the dial makes the connection count as
            // old, never an old one as new.
            let generation = dialer.generation();
            match dialer.connect_tls(&peer, &gateways, Some(&health)).await {
                Ok((conn, _)) => health.pool.put(conn, generation),
                Err(e) => {
                    debug!(%peer, error = %e, "could not refill the connection pool");
                    break;
                }
            }
        }
        health.pool.filling.store(false, Ordering::Release);
    });
}
