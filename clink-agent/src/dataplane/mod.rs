//! The userspace data path: the gateway port peers connect to, the Import listeners local
//! clients connect to, the wire protocol between peers and the byte relay.

pub mod inbound;
pub mod local;
pub mod outbound;
pub mod relay;
pub mod wire;

use std::sync::{Arc, Weak};

use tokio::{net::TcpListener, task::JoinHandle};
use tokio_rustls::TlsAcceptor;
use tracing::{error, warn};

use crate::{
    agent::{Agent, Stats},
    api::ObjectKey,
    metrics::{BytesLabels, ConnLabels, DirectionLabels},
};

/// The data path in use; the only one until the kernel paths land.
pub const USERSPACE: &str = "userspace";

/// Accepts peers on the gateway port until the task is dropped.
pub fn serve_gateway(agent: Arc<Agent>, listener: TcpListener) -> JoinHandle<()> {
    let acceptor = TlsAcceptor::from(agent.identity.server.clone());
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((tcp, from)) => {
                    tokio::spawn(inbound::serve(agent.clone(), acceptor.clone(), tcp, from));
                }
                Err(e) => accept_failed(e).await,
            }
        }
    })
}

/// Accepts clients of one Import. It holds a weak reference so a listener task never keeps
/// the agent alive.
pub fn serve_import(agent: Weak<Agent>, key: ObjectKey, listener: TcpListener) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((tcp, from)) => {
                    let Some(agent) = agent.upgrade() else { return };
                    tokio::spawn(outbound::serve(agent, key.clone(), tcp, from));
                }
                Err(e) => accept_failed(e).await,
            }
        }
    })
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

/// Counts one tunneled connection from open to close, in `clink status` and in metrics.
struct ConnGuard<'a> {
    agent: &'a Agent,
    labels: ConnLabels,
}

impl<'a> ConnGuard<'a> {
    fn open(agent: &'a Agent, labels: ConnLabels) -> Self {
        Stats::add(&agent.stats.opened, 1);
        Stats::add(&agent.stats.active, 1);
        agent.metrics.opened.get_or_create(&labels).inc();
        agent
            .metrics
            .active
            .get_or_create(&DirectionLabels {
                direction: labels.direction,
            })
            .inc();
        ConnGuard { agent, labels }
    }

    /// The connection ended after carrying `sent` bytes to the remote side and `received`
    /// from it.
    fn close(self, sent: u64, received: u64) {
        let (stats, metrics) = (&self.agent.stats, &self.agent.metrics);
        Stats::add(&stats.bytes_out, sent);
        Stats::add(&stats.bytes_in, received);
        for (flow, n) in [("sent", sent), ("received", received)] {
            metrics
                .bytes
                .get_or_create(&BytesLabels {
                    direction: self.labels.direction,
                    service: self.labels.service.clone(),
                    peer: self.labels.peer.clone(),
                    flow,
                })
                .inc_by(n);
        }
        metrics.closed.get_or_create(&self.labels).inc();
    }
}

impl Drop for ConnGuard<'_> {
    fn drop(&mut self) {
        self.agent
            .stats
            .active
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        self.agent
            .metrics
            .active
            .get_or_create(&DirectionLabels {
                direction: self.labels.direction,
            })
            .dec();
    }
}
