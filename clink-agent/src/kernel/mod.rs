//! The kernel data paths (ARCHITECTURE.md, "Sockmap data path" and "kTLS data path"): everything that puts eBPF programs and kernel
//! features on the byte path, and the [`Datapath`] seam the rest of the agent sees.
//!
//! | module | concern |
//! |---|---|
//! | [`choice`] | `--datapath`: what the host offers, what runs, and why (logged) |
//! | [`host`] | host probes: privileges, cgroup v2, bpffs, kernel program and map support |
//! | [`loader`] | loading, scoping, pinning and attaching the embedded eBPF object |
//! | [`pins`] | the pin directory's layout: one file per program and map |
//! | [`sockmap`] | the sockmap path's control side: `CLINK_PORTS`/`CLINK_SERVICES` kept in step with the objects |
//! | [`flow`] | the agent's half of the flow control of spliced sockets |
//! | [`local`] | the agent's end of a local hop (flow control and demotion on the sockmap path) |
//! | [`inspect`], [`render`] | `clink bpf`: what is pinned, read back, and shown next to `bpftool` commands |
//! | [`ktls`] | the kTLS path: probe, hand-off of rustls's session to the kernel, control records |
//! | [`splice`] | the kTLS path's byte pump: local socket ↔ pipe ↔ tunnel socket with splice(2) |
//! | `syscall`, `sock_diag`, `sockopt` | the raw kernel interfaces no maintained crate covers |

pub mod choice;
pub mod error;
pub mod flow;
pub mod host;
pub mod inspect;
pub mod ktls;
pub mod loader;
pub mod local;
pub mod pins;
pub mod render;
mod sock_diag;
pub mod sockmap;
pub mod sockopt;
pub mod splice;
mod syscall;

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;

pub use choice::{select, Choice, Options, SelectError, Unavailable};
pub use error::EbpfError;
pub use ktls::Ktls;
pub use local::LocalLeg;
pub use sockmap::{Hops, Sockmap};

use crate::{api::ObjectKey, metrics::Metrics, state::Snapshot};

/// The data path connections take. The agent tells it about every object change; the
/// connection handlers ask it for the agent's end of each local hop. Userspace needs nothing
/// from the kernel; every kernel path degrades to it per connection.
#[derive(Clone)]
pub enum Datapath {
    /// tokio and rustls move every byte.
    Userspace,
    /// The local hops (client <-> Import listener, agent <-> local export target) are spliced
    /// in the kernel by sk_msg; the tunnel leg stays in userspace.
    Sockmap(Arc<Sockmap>),
    /// The tunnel leg's TLS records are made and read by the kernel (kTLS), and payload moves
    /// between the local socket and the tunnel socket by splice(2); the local hop is plain
    /// TCP (a kTLS socket cannot be in a sockmap). Connections the kernel cannot take stay
    /// in userspace. With `--cgroup`, the connect hooks also run (no splicing): service
    /// addresses reach the Import listeners, also from pods on the node (`--node-address`).
    Ktls(Arc<Ktls>, Option<Arc<Sockmap>>),
}

impl Datapath {
    /// Its name in logs, metrics and `clink status`.
    pub fn name(&self) -> &'static str {
        match self {
            Datapath::Userspace => choice::USERSPACE,
            Datapath::Sockmap(_) => choice::SOCKMAP,
            Datapath::Ktls(..) => choice::KTLS,
        }
    }

    /// Brings the kernel's maps in step with `snapshot`, where `import_ports` is the port each
    /// Import listens on. Runs under the agent's change lock, before connections see the
    /// snapshot.
    pub fn objects_changed(&self, snapshot: &Snapshot, import_ports: &BTreeMap<ObjectKey, u16>) {
        match self {
            Datapath::Userspace | Datapath::Ktls(_, None) => {}
            Datapath::Sockmap(hooks) | Datapath::Ktls(_, Some(hooks)) => {
                hooks.objects_changed(snapshot, import_ports)
            }
        }
    }

    /// The agent's end of a local hop: on the sockmap path a socket the programs spliced
    /// runs the flow control (and counts its demotions in `metrics`).
    pub fn local_leg(&self, tcp: TcpStream, metrics: &Metrics) -> LocalLeg {
        match self {
            Datapath::Userspace | Datapath::Ktls(..) => LocalLeg::plain(tcp),
            Datapath::Sockmap(sockmap) => LocalLeg::new(tcp, sockmap.flow(), &metrics.demotions),
        }
    }

    /// The service address a redirected client asked for, from the agent's accepted socket
    /// (`local`, `peer`); `None` for a client that connected to the listener itself.
    pub fn original_destination(&self, local: SocketAddr, peer: SocketAddr) -> Option<SocketAddr> {
        match self {
            Datapath::Userspace | Datapath::Ktls(_, None) => None,
            Datapath::Sockmap(hooks) | Datapath::Ktls(_, Some(hooks)) => {
                hooks.flow().original_destination(local, peer)
            }
        }
    }

    /// The kernel TLS support, on the kTLS path.
    pub fn ktls(&self) -> Option<&Ktls> {
        match self {
            Datapath::Ktls(ktls, _) => Some(ktls),
            Datapath::Userspace | Datapath::Sockmap(_) => None,
        }
    }

    /// Detaches and unpins the eBPF programs, if any; the agent calls it on its way out.
    pub fn shutdown(&self) {
        match self {
            Datapath::Userspace | Datapath::Ktls(_, None) => {}
            Datapath::Sockmap(hooks) | Datapath::Ktls(_, Some(hooks)) => hooks.shutdown(),
        }
    }
}
