//! The agent's half of the flow control of spliced sockets (see `clink_common::Flow`).
//!
//! The kernel queues a send redirected into a socket however far behind that socket's reader
//! is, and never makes the sender wait. Both directions of a local hop therefore need a bound
//! the kernel does not give:
//!
//! * Into the agent's socket (a client or target sends): `clink_skmsg` counts what it sends,
//!   the agent publishes what it has read ([`FlowControl::publish_read`] into `CLINK_READS`),
//!   and past [`FLOW_WINDOW`] the sender's bytes take the TCP stack, whose window makes it
//!   wait, until the agent has caught up.
//! * Into a client's or target's socket (the agent sends): the agent looks at that socket's
//!   queue ([`super::sock_diag::queued`], from `sock_diag`: the kernel counts redirected bytes in its receive
//!   memory) and waits while it holds more than [`FLOW_WINDOW`].

use std::{io, net::SocketAddr, os::fd::OwnedFd};

use clink_common::{Flow, Redirect, SockKey};

use super::syscall::{
    map_cmd, BPF_EXIST, BPF_MAP_DELETE_ELEM, BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM,
};
pub use clink_common::{FLOW_WINDOW, READS_FROZEN};

/// Publish the read count at least this often (bytes), so a sender sees the agent keep up.
pub const PUBLISH_EVERY: u64 = FLOW_WINDOW / 4;
/// Look at a client's or target's queue at least every this many bytes sent into it (more
/// often only while the queue is close to the window).
pub const MIN_CHECK: u64 = FLOW_WINDOW / 8;

/// The maps the agent uses per connection on the sockmap path: `CLINK_READS` (written),
/// `CLINK_FLOWS` (read), `CLINK_SOCKS` (entries removed when a connection is demoted) and
/// `CLINK_REDIRECTS` (read: which service address a client asked for).
pub struct FlowControl {
    reads: OwnedFd,
    flows: OwnedFd,
    socks: OwnedFd,
    redirects: OwnedFd,
}

impl FlowControl {
    pub fn new(reads: OwnedFd, flows: OwnedFd, socks: OwnedFd, redirects: OwnedFd) -> Self {
        FlowControl {
            reads,
            flows,
            socks,
            redirects,
        }
    }

    /// The service address a client connected to before `clink_connect4/6` sent it to the
    /// Import listener, from the agent's accepted socket (`local`, `peer`); `None` for a
    /// client that connected to the listener itself.
    pub fn original_destination(&self, local: SocketAddr, peer: SocketAddr) -> Option<SocketAddr> {
        let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
        let key = SockKey::from_addrs(canonical(local), canonical(peer));
        let mut redirect = Redirect::default();
        match map_cmd(
            BPF_MAP_LOOKUP_ELEM,
            &self.redirects,
            &key,
            &raw mut redirect,
            0,
        ) {
            Ok(true) => Some(redirect.service.addr()),
            Ok(false) => None,
            Err(e) => {
                tracing::debug!(error = %e, "{} lookup failed", clink_common::map::REDIRECTS);
                None
            }
        }
    }

    /// Records that the agent has read `read` bytes in all from the socket with `cookie`.
    /// `Ok(false)`: the socket is not spliced (it has no entry), nothing to publish.
    pub fn publish_read(&self, cookie: u64, read: u64) -> io::Result<bool> {
        let mut read = read;
        map_cmd(
            BPF_MAP_UPDATE_ELEM,
            &self.reads,
            &cookie,
            &raw mut read,
            BPF_EXIST,
        )
    }

    /// Whether the sends into the agent's socket with `cookie` take the TCP stack now.
    pub fn passing(&self, cookie: u64) -> io::Result<bool> {
        let mut flow = Flow::default();
        Ok(
            map_cmd(BPF_MAP_LOOKUP_ELEM, &self.flows, &cookie, &raw mut flow, 0)?
                && flow.passing != 0,
        )
    }

    /// Takes the socket with `key` out of `CLINK_SOCKS`: the kernel gives it back its plain
    /// TCP functions. Anything still queued from a redirect would be dropped with it, so the
    /// caller makes sure nothing is.
    pub fn unsplice(&self, key: &SockKey) -> io::Result<bool> {
        map_cmd::<_, u8>(
            BPF_MAP_DELETE_ELEM,
            &self.socks,
            key,
            std::ptr::null_mut(),
            0,
        )
    }
}
