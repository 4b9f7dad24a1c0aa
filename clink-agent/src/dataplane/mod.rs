//! The userspace data path: the gateway port peers connect to, the Import listeners local
//! clients connect to, the wire protocol between peers and the byte relay.

pub mod inbound;
pub mod outbound;
pub mod relay;
pub mod wire;

use std::sync::Arc;

use tokio::{net::TcpListener, task::JoinHandle};
use tokio_rustls::TlsAcceptor;
use tracing::{error, warn};

use crate::{
    agent::{AcceptFn, Agent},
    api::ObjectKey,
};

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

/// The function the agent uses to serve each Import's listener. It holds a weak reference so
/// a listener task never keeps the agent alive.
pub fn import_acceptor(agent: &Arc<Agent>) -> AcceptFn {
    let weak = Arc::downgrade(agent);
    Arc::new(move |key: ObjectKey, listener: TcpListener| {
        let weak = weak.clone();
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((tcp, from)) => {
                        let Some(agent) = weak.upgrade() else { return };
                        tokio::spawn(outbound::serve(agent, key.clone(), tcp, from));
                    }
                    Err(e) => accept_failed(e).await,
                }
            }
        })
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
