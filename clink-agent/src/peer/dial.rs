//! Dialing peers: TCP to one of a Peer's gateways (the one that answered last first), then
//! TLS 1.3 with the fabric's client certificate, SNI and verified DNS name = the Peer's name.
//! Used by tunnels, the connection pool and heartbeats alike.

use std::{sync::Arc, time::Duration};

use rustls::pki_types::ServerName;
use tokio::{net::TcpStream, time::timeout};
use tokio_rustls::{client::TlsStream, TlsConnector};
use tracing::warn;

use super::{
    io::{peer_io, PeerIo},
    PeerHealth, PeerTimeouts,
};
use crate::{api::Endpoint, tls::Credentials};

pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("cannot connect to {gateway}: {reason}")]
    Connect { gateway: String, reason: String },
    #[error("TLS with {gateway} failed: {reason}")]
    Tls { gateway: String, reason: String },
    #[error("peer has no gateways")]
    NoGateway,
}

/// Opens mTLS connections to peers with this agent's current client configuration
/// (certificate, fabric CA, session resumption cache), taken from [`Credentials`] per dial,
/// on sockets with the dead-peer timeouts.
pub struct Dialer {
    credentials: Arc<Credentials>,
    timeouts: PeerTimeouts,
}

impl Dialer {
    pub fn new(credentials: Arc<Credentials>, timeouts: PeerTimeouts) -> Dialer {
        Dialer {
            credentials,
            timeouts,
        }
    }

    /// The keepalive and user timeout of peer sockets, for the gateway's accepted ones too.
    pub fn timeouts(&self) -> &PeerTimeouts {
        &self.timeouts
    }

    /// The generation of the credentials new dials use: pooled connections of an older one
    /// are not used for new tunnels.
    pub fn generation(&self) -> u64 {
        self.credentials.generation()
    }

    /// Opens an mTLS connection to `peer`, trying its gateways in order of health. Returns the
    /// stream and the TLS handshake time.
    pub async fn connect_tls(
        &self,
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
        let (client, _) = self.credentials.client();
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
            if let Err(e) = self.timeouts.apply(&tcp) {
                // The connection still works; a dead peer is only noticed later.
                warn!(%gateway, error = %e, "cannot set keepalive/user timeout on a peer socket");
            }
            let started = std::time::Instant::now();
            let connector = TlsConnector::from(client.clone());
            match timeout(
                CONNECT_TIMEOUT,
                connector.connect(server_name.clone(), peer_io(tcp)),
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
}
