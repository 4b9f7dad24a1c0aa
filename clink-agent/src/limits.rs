//! How much the agent takes on at once, so that a flood from a peer or a local user is refused
//! early and cheaply instead of taking the descriptors that heartbeats, the admin API, the
//! store and the connections already open need.
//!
//! Every accepted socket holds a permit while it lives:
//!
//! * a gateway connection holds a *handshake* permit from `accept` until its request head is
//!   read (TLS handshake, a pooled connection waiting for its request, a heartbeat);
//! * a tunneled connection (a `CONNECT` on the gateway, a client of an Import) holds a
//!   *connection* permit until it ends; a client of an Import also holds one of its Import's
//!   permits when `--max-import-connections` is set.
//!
//! Without a permit the connection is refused at once: the gateway answers a `CONNECT` with
//! `503`, and resets a connection it cannot even handshake; an Import listener resets the
//! client. Each refusal counts in `clink_connection_refusals_total{listener,limit}`.
//!
//! The defaults follow from the open-file limit (raised to the hard limit at start-up): what
//! [`RESERVED_FDS`] and the two HTTP servers keep aside, then an eighth of the rest (at most
//! [`DEFAULT_HANDSHAKES`]) for handshakes, and what remains divided by the descriptors one
//! tunneled connection holds (2; 6 on the kTLS path, whose pump has a pipe per direction).

use std::{sync::Arc, time::Duration};

use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::{LimitLabels, RefusalLabels};

/// Descriptors kept for everything that is not a connection: heartbeats (one socket per peer
/// while it dials), the store's files, the Kubernetes client, eBPF maps and programs, the
/// listeners, logs.
pub const RESERVED_FDS: u64 = 256;
/// Connections at once to the admin API, and to the metrics endpoint (each).
pub const HTTP_CONNECTIONS: usize = 64;
/// How long a client of the admin API or of the metrics endpoint may take to send a request
/// head (also how long an idle keep-alive connection stays open).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The most gateway connections that may be in their TLS handshake or waiting for their
/// request at once, by default.
pub const DEFAULT_HANDSHAKES: usize = 1024;
/// Descriptors one tunneled connection holds: its two sockets, and on the kTLS path a pipe
/// (two descriptors) per direction.
pub const FDS_PER_CONNECTION: u64 = 2;
pub const FDS_PER_KTLS_CONNECTION: u64 = 6;

/// The caps an operator asked for (`None`: derive from the open-file limit).
#[derive(Clone, Copy, Debug, Default)]
pub struct Requested {
    pub connections: Option<usize>,
    pub import_connections: Option<usize>,
    pub handshakes: Option<usize>,
}

/// The caps in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    /// Tunneled connections at once, both directions together.
    pub connections: usize,
    /// Clients of one Import at once (never more than `connections`).
    pub import_connections: usize,
    /// Gateway connections before their request.
    pub handshakes: usize,
    /// Descriptors the caps may use at most: what they were derived from.
    pub open_files: u64,
}

impl Caps {
    /// The caps for an open-file limit of `open_files` and connections holding
    /// `fds_per_connection` descriptors each. Explicit caps are taken as they are; the result
    /// says when they exceed what the limit holds (the agent warns: connections past it fail
    /// with EMFILE instead of being refused cleanly).
    pub fn derive(
        requested: Requested,
        open_files: u64,
        fds_per_connection: u64,
    ) -> Result<(Caps, Option<String>), String> {
        let kept = RESERVED_FDS + 2 * HTTP_CONNECTIONS as u64;
        let available = open_files.saturating_sub(kept);
        if available < 64 {
            return Err(format!(
                "the open-file limit ({open_files}) leaves no room for connections: the agent \
                 keeps {kept} descriptors for itself; raise it (ulimit -n, LimitNOFILE=)"
            ));
        }
        let handshakes = requested
            .handshakes
            .unwrap_or_else(|| DEFAULT_HANDSHAKES.min((available / 8) as usize))
            .max(1);
        let left = available.saturating_sub(handshakes as u64);
        let fits = (left / fds_per_connection.max(1)) as usize;
        let connections = requested.connections.unwrap_or(fits).max(1);
        let import_connections = requested
            .import_connections
            .unwrap_or(connections)
            .clamp(1, connections);
        let warning = (handshakes as u64 + connections as u64 * fds_per_connection > available)
            .then(|| {
                format!(
                    "--max-connections {connections} and --max-handshakes {handshakes} need more \
                     descriptors than the open-file limit ({open_files}) leaves after the \
                     {kept} the agent keeps: at most {fits} connections fit; past that they \
                     fail with EMFILE instead of being refused"
                )
            });
        Ok((
            Caps {
                connections,
                import_connections,
                handshakes,
                open_files,
            },
            warning,
        ))
    }
}

/// The agent's open-file limit (soft, after start-up raised it to the hard one).
pub fn open_file_limit() -> u64 {
    use nix::sys::resource::{getrlimit, Resource};
    getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft)
}

/// The permits of the agent's connections, and the counters that show them.
pub struct Limits {
    caps: Caps,
    connections: Arc<Semaphore>,
    handshakes: Arc<Semaphore>,
    refusals: Family<RefusalLabels, Counter>,
    in_use: Family<LimitLabels, Gauge>,
}

/// What a connection holds while it lives; dropping it gives the permits back.
pub struct Permit {
    _permits: (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>),
    gauge: Gauge,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// The listener a refusal happened on.
#[derive(Clone, Copy, Debug)]
pub enum Listener {
    Gateway,
    Import,
}

impl Listener {
    fn name(self) -> &'static str {
        match self {
            Listener::Gateway => "gateway",
            Listener::Import => "import",
        }
    }
}

impl Limits {
    pub fn new(
        caps: Caps,
        refusals: Family<RefusalLabels, Counter>,
        limits: Family<LimitLabels, Gauge>,
        in_use: Family<LimitLabels, Gauge>,
    ) -> Limits {
        for (limit, value) in [
            ("connections", caps.connections),
            ("import-connections", caps.import_connections),
            ("handshakes", caps.handshakes),
        ] {
            limits
                .get_or_create(&LimitLabels { limit })
                .set(value as i64);
        }
        Limits {
            caps,
            connections: Arc::new(Semaphore::new(caps.connections)),
            handshakes: Arc::new(Semaphore::new(caps.handshakes)),
            refusals,
            in_use,
        }
    }

    pub fn caps(&self) -> Caps {
        self.caps
    }

    /// A semaphore for one Import's clients.
    pub fn import_semaphore(&self) -> Arc<Semaphore> {
        Arc::new(Semaphore::new(self.caps.import_connections))
    }

    /// A permit for a gateway connection until its request is read; `None` (counted) at the
    /// cap.
    pub fn handshake(&self) -> Option<Permit> {
        match self.handshakes.clone().try_acquire_owned() {
            Ok(p) => Some(self.held("handshakes", p, None)),
            Err(_) => {
                self.refused(Listener::Gateway, "handshakes");
                None
            }
        }
    }

    /// A permit for a tunneled connection (and one of its Import's, for a client of an
    /// Import); `None` (counted) at a cap.
    pub fn connection(
        &self,
        listener: Listener,
        import: Option<&Arc<Semaphore>>,
    ) -> Option<Permit> {
        let own = match import {
            Some(sem) => match sem.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    self.refused(listener, "import-connections");
                    return None;
                }
            },
            None => None,
        };
        match self.connections.clone().try_acquire_owned() {
            Ok(p) => Some(self.held("connections", p, own)),
            Err(_) => {
                self.refused(listener, "connections");
                None
            }
        }
    }

    /// Tunneled connections open now (set up or being set up).
    pub fn open_connections(&self) -> usize {
        self.caps.connections - self.connections.available_permits()
    }

    fn held(
        &self,
        limit: &'static str,
        permit: OwnedSemaphorePermit,
        import: Option<OwnedSemaphorePermit>,
    ) -> Permit {
        let gauge = self.in_use.get_or_create(&LimitLabels { limit }).clone();
        gauge.inc();
        Permit {
            _permits: (permit, import),
            gauge,
        }
    }

    fn refused(&self, listener: Listener, limit: &'static str) {
        self.refusals
            .get_or_create(&RefusalLabels {
                listener: listener.name(),
                limit,
            })
            .inc();
    }
}

/// The listen backlog of every listener: connections the kernel completes before the agent
/// accepts them (the kernel caps it at `net.core.somaxconn`, 4,096 on current kernels).
/// tokio's and std's `bind` use 128, which a burst of connects fills.
pub const LISTEN_BACKLOG: i32 = 1024;

/// A TCP listener on `addr` with a [`LISTEN_BACKLOG`] backlog.
pub fn bind_tcp(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    tokio::net::TcpListener::from_std(socket.into())
}

/// The HTTP/1 settings of the admin API and the metrics endpoint: a client must send each
/// request head within [`HEADER_TIMEOUT`] (hyper only enforces it with a timer).
pub fn http1() -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    builder
}

/// The cap on one HTTP server's connections ([`HTTP_CONNECTIONS`]).
pub struct HttpCap {
    permits: Arc<Semaphore>,
    refused: Counter,
}

impl HttpCap {
    /// `listener` names the server in `clink_connection_refusals_total`.
    pub fn new(listener: &'static str, refusals: &Family<RefusalLabels, Counter>) -> HttpCap {
        HttpCap {
            permits: Arc::new(Semaphore::new(HTTP_CONNECTIONS)),
            refused: refusals
                .get_or_create(&RefusalLabels {
                    listener,
                    limit: "http-connections",
                })
                .clone(),
        }
    }

    /// A permit for one more connection; `None` (counted) at the cap: the caller drops the
    /// connection.
    pub fn admit(&self) -> Option<OwnedSemaphorePermit> {
        let permit = self.permits.clone().try_acquire_owned().ok();
        if permit.is_none() {
            self.refused.inc();
        }
        permit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(caps: Caps) -> Limits {
        Limits::new(
            caps,
            Family::default(),
            Family::default(),
            Family::default(),
        )
    }

    #[test]
    fn defaults_fit_the_open_file_limit() {
        let (caps, warning) = Caps::derive(Requested::default(), 1_048_576, 2).unwrap();
        assert_eq!(caps.handshakes, DEFAULT_HANDSHAKES);
        assert_eq!(caps.connections, (1_048_576 - 256 - 128 - 1024) / 2);
        assert_eq!(caps.import_connections, caps.connections);
        assert!(warning.is_none());
        // A small limit: an eighth of what is left for handshakes, the rest for connections.
        let (caps, _) = Caps::derive(Requested::default(), 1024, 6).unwrap();
        assert_eq!(caps.handshakes, 80);
        assert_eq!(caps.connections, (1024 - 384 - 80) / 6);
        let used = caps.handshakes as u64 + caps.connections as u64 * 6;
        assert!(used <= 1024 - 384, "{caps:?} uses {used}");
    }

    #[test]
    fn explicit_caps_beyond_the_limit_warn() {
        let requested = Requested {
            connections: Some(10_000),
            import_connections: Some(50_000),
            handshakes: None,
        };
        let (caps, warning) = Caps::derive(requested, 4096, 2).unwrap();
        assert_eq!(caps.connections, 10_000);
        assert_eq!(caps.import_connections, 10_000, "never above the total");
        let warning = warning.expect("10,000 connections do not fit in 4,096 descriptors");
        assert!(warning.contains("EMFILE"), "{warning}");
        assert!(Caps::derive(Requested::default(), 300, 2)
            .unwrap_err()
            .contains("ulimit -n"));
    }

    #[test]
    fn permits_run_out_and_come_back() {
        let (caps, _) = Caps::derive(
            Requested {
                connections: Some(3),
                import_connections: Some(2),
                handshakes: Some(1),
            },
            65_536,
            2,
        )
        .unwrap();
        let l = limits(caps);
        let import = l.import_semaphore();
        let a = l.connection(Listener::Import, Some(&import)).unwrap();
        let _b = l.connection(Listener::Import, Some(&import)).unwrap();
        assert!(
            l.connection(Listener::Import, Some(&import)).is_none(),
            "import cap"
        );
        let c = l.connection(Listener::Gateway, None).unwrap();
        assert!(l.connection(Listener::Gateway, None).is_none(), "total cap");
        assert_eq!(l.open_connections(), 3);
        drop(a);
        drop(c);
        assert_eq!(l.open_connections(), 1);
        assert!(l.connection(Listener::Import, Some(&import)).is_some());
        let h = l.handshake().unwrap();
        assert!(l.handshake().is_none());
        drop(h);
        assert!(l.handshake().is_some());
        let refused = |listener, limit| {
            l.refusals
                .get_or_create(&RefusalLabels { listener, limit })
                .get()
        };
        assert_eq!(refused("import", "import-connections"), 1);
        assert_eq!(refused("gateway", "connections"), 1);
        assert_eq!(refused("gateway", "handshakes"), 1);
        assert_eq!(
            l.in_use
                .get_or_create(&LimitLabels {
                    limit: "connections"
                })
                .get(),
            1,
            "only _b is held"
        );
    }
}
