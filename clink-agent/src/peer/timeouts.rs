//! How a peer connection notices a peer that vanished without a FIN or a reset (a crashed
//! node, a cut link, a firewall that drops): TCP keepalive probes while it is quiet, and
//! `TCP_USER_TIMEOUT` while data waits for an acknowledgement. Without them an idle tunnel
//! stays "active" for good and one with data in flight for ~15 minutes of retransmissions
//! (`tcp_retries2`), with the client hanging.
//!
//! Set on every peer socket, dialled (`peer::dial`: tunnels, the pool, heartbeats) and
//! accepted (`dataplane::inbound`). The kernel then fails the socket with `ETIMEDOUT`, which
//! ends the relay or the kTLS pump like a reset: both sides are reset. On the kTLS path the
//! options stay on the socket the kernel takes over.
//!
//! How long until a dead peer is noticed, as Linux does it: with data unacknowledged, the user
//! timeout. Quiet: probes start after `idle` and follow every `interval`; with a user timeout
//! the connection fails at the first probe at least the user timeout after the last packet
//! from the peer (the user timeout replaces the probe count), without one after `count`
//! unanswered probes. Defaults: 30 s idle, 10 s interval, 3 probes, 60 s user timeout, so
//! about a minute either way.

use std::{io, time::Duration};

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

/// `--peer-keepalive` and friends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    /// Quiet time before the first probe (`TCP_KEEPIDLE`).
    pub idle: Duration,
    /// Time between probes (`TCP_KEEPINTVL`).
    pub interval: Duration,
    /// Unanswered probes that fail the connection (`TCP_KEEPCNT`) when there is no user
    /// timeout.
    pub count: u32,
}

/// The dead-peer settings of peer sockets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerTimeouts {
    /// `None`: no keepalive probes.
    pub keepalive: Option<Keepalive>,
    /// How long sent data may stay unacknowledged (`TCP_USER_TIMEOUT`); `None`: the kernel's
    /// retransmission limit.
    pub user_timeout: Option<Duration>,
}

impl PeerTimeouts {
    /// Sets the options on `tcp`.
    pub fn apply(&self, tcp: &TcpStream) -> io::Result<()> {
        let socket = SockRef::from(tcp);
        if let Some(k) = self.keepalive {
            let params = TcpKeepalive::new()
                .with_time(k.idle)
                .with_interval(k.interval)
                .with_retries(k.count);
            socket.set_tcp_keepalive(&params)?;
        }
        if let Some(timeout) = self.user_timeout {
            socket.set_tcp_user_timeout(Some(timeout))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::tcp_pair;

    #[tokio::test]
    async fn the_kernel_takes_the_settings() {
        let (a, b) = tcp_pair().await;
        let timeouts = PeerTimeouts {
            keepalive: Some(Keepalive {
                idle: Duration::from_secs(7),
                interval: Duration::from_secs(2),
                count: 4,
            }),
            user_timeout: Some(Duration::from_millis(4500)),
        };
        timeouts.apply(&a).unwrap();
        let socket = SockRef::from(&a);
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), Duration::from_secs(7));
        assert_eq!(
            socket.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(2)
        );
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), 4);
        assert_eq!(
            socket.tcp_user_timeout().unwrap(),
            Some(Duration::from_millis(4500))
        );
        // Off: the socket keeps the kernel's defaults.
        PeerTimeouts::default().apply(&b).unwrap();
        let socket = SockRef::from(&b);
        assert!(!socket.keepalive().unwrap());
        assert_eq!(socket.tcp_user_timeout().unwrap(), None);
    }
}
