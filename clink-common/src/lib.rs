//! Types shared by the eBPF programs (`clink-ebpf`) and the agent (`clink-agent`).
//!
//! Everything here is `#[repr(C)]` plain data without padding, because the same bytes are
//! written by one side and read by the other through BPF maps, and because `bpftool map dump`
//! shows them raw to an operator.
//!
//! Byte orders follow the kernel's `bpf_sock_ops`/`sk_msg_md` context fields where they can:
//! IP addresses stay in network byte order exactly as the kernel hands them over, so the
//! bytes of a key read as the dotted address in a hex dump. Ports are the exception: the
//! kernel gives the local port in host byte order and the remote port as a network-order
//! `u32`, and a key mixing both would have to swap conventions when it is reversed; the key
//! therefore stores both ports in host byte order.
//!
//! The `user` feature adds `aya::Pod` impls so the agent can use these types as map keys and
//! values.
#![no_std]

/// Names of the eBPF programs, as they appear in `bpftool prog show` (the kernel truncates
/// object names to [`BPF_OBJ_NAME_LEN`]` - 1` characters).
pub mod program {
    /// `sock_ops` program: adds established sockets the agent owns to [`super::map::SOCKS`].
    pub const SOCKOPS: &str = "clink_sockops";
    /// `sk_msg` program: redirects each send into the peer socket's receive queue.
    pub const SKMSG: &str = "clink_skmsg";
    /// `cgroup/connect4` program: sends connects to a service address to the import listener.
    pub const CONNECT4: &str = "clink_connect4";
    /// `cgroup/connect6` program: the same for IPv6 sockets (and IPv4-mapped addresses).
    pub const CONNECT6: &str = "clink_connect6";
}

/// Names of the eBPF maps, as they appear in `bpftool map show`.
pub mod map {
    /// `SOCKHASH` of established sockets keyed by [`super::SockKey`].
    pub const SOCKS: &str = "CLINK_SOCKS";
    /// `HASH` of local ports the agent owns: [`super::PortKey`] -> [`super::PortFlags`].
    pub const PORTS: &str = "CLINK_PORTS";
    /// `PERCPU_ARRAY` of `u64` counters written by the `sk_msg` program; see
    /// [`super::SKMSG_BYTES_IDX`] and [`super::SKMSG_MSGS_IDX`].
    pub const SKMSG_BYTES: &str = "CLINK_SKMSG_BYTES";
    /// `HASH` service table: [`super::ServiceKey`] (service address) ->
    /// [`super::ServiceTarget`] (the import listener's port).
    pub const SERVICES: &str = "CLINK_SERVICES";
    /// `LRU_HASH` socket cookie -> [`super::ServiceKey`]: the address a redirected connect
    /// asked for, written by the connect hooks, removed when the socket closes.
    pub const ORIG_DST: &str = "CLINK_ORIG_DST";
    /// `LRU_HASH` [`super::SockKey`] of the agent's accepted socket -> [`super::Redirect`]: how
    /// the agent finds the original destination of a connection it accepted.
    pub const REDIRECTS: &str = "CLINK_REDIRECTS";
    /// `LRU_HASH` [`super::SockKey`] -> `u32` (1): sockets to take once established: the
    /// agent's own connects to export targets (from `connect()`), and the accepting end of
    /// every connection whose connecting end was taken.
    pub const PENDING: &str = "CLINK_PENDING";
    /// `LRU_HASH` [`super::SockKey`] -> `u32` (1): sockets in `CLINK_SOCKS` that once sent
    /// through the TCP stack (their peer was not in the map yet) and therefore keep doing so,
    /// so their bytes cannot overtake each other.
    pub const UNSPLICED: &str = "CLINK_UNSPLICED";
    /// `LRU_HASH` socket cookie -> [`super::Flow`]: flow control of what is sent into each
    /// spliced socket.
    pub const FLOWS: &str = "CLINK_FLOWS";
    /// `LRU_HASH` socket cookie -> `u64`: bytes the agent has read from each of its spliced
    /// sockets, written by the agent (the other half of the flow control in [`super::Flow`]).
    pub const READS: &str = "CLINK_READS";
    /// `LRU_HASH` [`super::SockKey`] -> socket cookie of every socket in `CLINK_SOCKS`: how a
    /// sender finds its peer's entry in `CLINK_FLOWS`.
    pub const COOKIES: &str = "CLINK_COOKIES";
}

/// Read-only globals the agent sets when it loads the programs (aya `override_global`): they
/// scope the programs to the agent's network namespace and identify the agent's own process.
pub mod global {
    /// `u64`: the network namespace cookie of the agent (`SO_NETNS_COOKIE`); sockets of other
    /// namespaces are never touched. 0 = no filter.
    pub const NETNS_COOKIE: &str = "CLINK_NETNS_COOKIE";
    /// `u32`: the agent's process id, as seen in its own pid namespace.
    pub const AGENT_TGID: &str = "CLINK_AGENT_TGID";
    /// `u64`: device number of the agent's pid namespace file (`stat /proc/self/ns/pid`).
    pub const PIDNS_DEV: &str = "CLINK_PIDNS_DEV";
    /// `u64`: inode number of the agent's pid namespace file.
    pub const PIDNS_INO: &str = "CLINK_PIDNS_INO";
    /// `u32`: the node address (IPv4, network byte order) the connect hooks send connects to
    /// a service address from other network namespaces in the cgroup (pods) to; 0 = such
    /// connects are left alone.
    pub const NODE_IP4: &str = "CLINK_NODE_IP4";
    /// `u32`: 1 to recognise the agent's own connects to export targets (so that their local
    /// hop is spliced), 0 not to. Recognising them calls `bpf_get_ns_current_pid_tgid` from
    /// `sock_ops`, which older kernels (6.1) do not allow there; with 0 the verifier never
    /// sees that call (the global is read-only, so the branch is known).
    pub const AGENT_CONNECTS: &str = "CLINK_AGENT_CONNECTS";
}

/// Length of the kernel's object name buffer (`BPF_OBJ_NAME_LEN`), including the final NUL.
pub const BPF_OBJ_NAME_LEN: usize = 16;

/// Capacity of `CLINK_SOCKS`: two sockets per spliced local hop.
pub const SOCKS_MAX_ENTRIES: u32 = 65_536;
/// Capacity of `CLINK_PORTS`.
pub const PORTS_MAX_ENTRIES: u32 = 1_024;
/// Capacity of `CLINK_SERVICES`.
pub const SERVICES_MAX_ENTRIES: u32 = 4_096;
/// Capacity of each per-connection LRU map (`CLINK_ORIG_DST`, `CLINK_REDIRECTS`,
/// `CLINK_PENDING`, `CLINK_UNSPLICED`); the oldest entries go first when one is full.
pub const CONNS_MAX_ENTRIES: u32 = 65_536;
/// Number of slots in `CLINK_SKMSG_BYTES`.
pub const SKMSG_COUNTERS: u32 = 5;
/// `CLINK_SKMSG_BYTES` slot holding the bytes redirected by `clink_skmsg`.
pub const SKMSG_BYTES_IDX: u32 = 0;
/// `CLINK_SKMSG_BYTES` slot holding the number of messages redirected by `clink_skmsg`.
pub const SKMSG_MSGS_IDX: u32 = 1;
/// `CLINK_SKMSG_BYTES` slot holding the bytes of spliced sockets sent through the TCP stack
/// because their reader was more than [`FLOW_WINDOW`] behind.
pub const SKMSG_PASSED_IDX: u32 = 2;
/// `CLINK_SKMSG_BYTES` slot counting switches of a socket from the splice to the TCP stack.
pub const SKMSG_FALLBACKS_IDX: u32 = 3;
/// `CLINK_SKMSG_BYTES` slot counting switches back to the splice once the reader caught up.
pub const SKMSG_RESUMES_IDX: u32 = 4;

/// How far (bytes) the reader of a spliced socket may fall behind its sender. The kernel
/// queues redirected messages without limit and never makes the sender wait, so without this
/// bound a fast sender and a slow reader fill memory until sends fail with `ENOMEM` (seen on
/// Linux 6.18: 1.1 GB queued in half a second, then iperf3 fails). Past it, sends into the
/// agent's sockets take the TCP stack, whose receive window makes the sender wait, and the
/// agent stops sending into a client's or target's socket until it has caught up.
pub const FLOW_WINDOW: u64 = 2 << 20;

/// Set by the agent in its `CLINK_READS` entry while it takes a connection off the splice:
/// from then on every send into that socket takes the TCP stack, however small.
pub const READS_FROZEN: u64 = 1 << 63;

/// Value of `CLINK_FLOWS`, one per spliced socket (the receiving end).
///
/// - `sent`: bytes its peer has sent it since both were spliced, redirected or not (counted
///   by `clink_skmsg` for the agent's sockets only).
/// - `passing`: 1 while the peer's sends take the TCP stack. It goes back to 0 only when the
///   agent has read all of `sent` (`CLINK_READS`): then no byte that took the TCP stack is
///   left for a redirected one to overtake.
/// - `agent_reads`: 1 for the agent's own end of a connection (flow-controlled here); 0 for a
///   client's or target's socket (the agent paces what it sends them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Flow {
    pub sent: u64,
    pub passing: u32,
    pub agent_reads: u32,
}

/// `AF_INET`, as found in the context's `family` field.
pub const AF_INET: u32 = 2;
/// `AF_INET6`, as found in the context's `family` field.
pub const AF_INET6: u32 = 10;
/// `IPPROTO_TCP`, as found in the `bpf_sock_addr` context's `protocol` field.
pub const IPPROTO_TCP: u32 = 6;
/// Where the connect hooks send a connection to a service address: the import listener's
/// port on the loopback address of the socket's family (`127.0.0.1`, network byte order).
pub const LOOPBACK4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
/// `::1` as four network-order words.
pub const LOOPBACK6: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];

/// Key of `CLINK_SOCKS`: one direction of a TCP connection, seen from the socket that owns it.
///
/// - `family`: [`AF_INET`] or [`AF_INET6`]. IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`, what
///   a dual-stack listener sees for an IPv4 client) are stored as [`AF_INET`], so both ends
///   of one connection produce keys that reverse into each other.
/// - `src_ip4`/`dst_ip4`: local/remote IPv4 address in network byte order (zero for IPv6).
/// - `src_ip6`/`dst_ip6`: local/remote IPv6 address, four network-order words (zero for IPv4).
/// - `src_port`/`dst_port`: local/remote port in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub family: u32,
    pub src_ip4: u32,
    pub dst_ip4: u32,
    pub src_ip6: [u32; 4],
    pub dst_ip6: [u32; 4],
    pub src_port: u32,
    pub dst_port: u32,
}

impl SockKey {
    /// Builds the key from the raw context fields of `bpf_sock_ops` or `sk_msg_md`, keeping
    /// their conventions: addresses in network byte order, `local_port` in host byte order,
    /// `remote_port_be` a network-order `u32` (the port in its upper half on little-endian
    /// hosts).
    #[inline(always)]
    pub fn from_ctx(
        family: u32,
        local_ip4: u32,
        remote_ip4: u32,
        local_ip6: [u32; 4],
        remote_ip6: [u32; 4],
        local_port: u32,
        remote_port_be: u32,
    ) -> Self {
        let src_port = local_port;
        let dst_port = u32::from_be(remote_port_be);
        if family == AF_INET6 && is_v4_mapped(&local_ip6) && is_v4_mapped(&remote_ip6) {
            return Self::v4(local_ip6[3], remote_ip6[3], src_port, dst_port);
        }
        if family == AF_INET6 {
            return Self {
                family,
                src_ip6: local_ip6,
                dst_ip6: remote_ip6,
                src_port,
                dst_port,
                ..Self::default()
            };
        }
        Self::v4(local_ip4, remote_ip4, src_port, dst_port)
    }

    /// The key the other end of the same connection stores itself under.
    #[inline(always)]
    pub fn reversed(&self) -> Self {
        Self {
            family: self.family,
            src_ip4: self.dst_ip4,
            dst_ip4: self.src_ip4,
            src_ip6: self.dst_ip6,
            dst_ip6: self.src_ip6,
            src_port: self.dst_port,
            dst_port: self.src_port,
        }
    }

    /// Whether both ends are on this host, in the same network namespace: a local connection
    /// gets the destination address as its source address. Only such connections can be
    /// spliced, since both of their sockets exist here.
    #[inline(always)]
    pub fn is_local(&self) -> bool {
        if self.family == AF_INET6 {
            self.src_ip6 == self.dst_ip6
        } else {
            self.src_ip4 == self.dst_ip4
        }
    }

    #[inline(always)]
    fn v4(src_ip4: u32, dst_ip4: u32, src_port: u32, dst_port: u32) -> Self {
        Self {
            family: AF_INET,
            src_ip4,
            dst_ip4,
            src_port,
            dst_port,
            ..Self::default()
        }
    }
}

/// Whether an IPv6 address (four network-order words) is IPv4-mapped (`::ffff:a.b.c.d`).
#[inline(always)]
pub fn is_v4_mapped(ip6: &[u32; 4]) -> bool {
    ip6[0] == 0 && ip6[1] == 0 && ip6[2] == 0xffff_u32.to_be()
}

/// Key of `CLINK_SERVICES` and value of `CLINK_ORIG_DST`: a service address clients connect
/// to, with the same conventions as [`SockKey`] (addresses in network byte order, the unused
/// one zero, IPv4-mapped IPv6 stored as IPv4; port in host byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub family: u32,
    pub ip4: u32,
    pub ip6: [u32; 4],
    pub port: u32,
}

impl ServiceKey {
    /// From the `bpf_sock_addr` fields of an IPv4 connect: `user_ip4` and `user_port`
    /// (network byte order, in the low 16 bits).
    #[inline(always)]
    pub fn from_connect4(user_ip4: u32, user_port: u32) -> Self {
        Self {
            family: AF_INET,
            ip4: user_ip4,
            port: u32::from(u16::from_be(user_port as u16)),
            ..Self::default()
        }
    }

    /// From the `bpf_sock_addr` fields of an IPv6 connect; an IPv4-mapped address gives the
    /// IPv4 key, so one service entry serves both kinds of socket.
    #[inline(always)]
    pub fn from_connect6(user_ip6: [u32; 4], user_port: u32) -> Self {
        if is_v4_mapped(&user_ip6) {
            return Self::from_connect4(user_ip6[3], user_port);
        }
        Self {
            family: AF_INET6,
            ip6: user_ip6,
            port: u32::from(u16::from_be(user_port as u16)),
            ..Self::default()
        }
    }
}

/// Value of `CLINK_SERVICES`: where connects to the service address go instead.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceTarget {
    /// The import listener's port, host byte order.
    pub listener_port: u32,
}

impl ServiceTarget {
    /// The port as `bpf_sock_addr.user_port` wants it.
    #[inline(always)]
    pub fn user_port(&self) -> u32 {
        u32::from((self.listener_port as u16).to_be())
    }
}

/// Value of `CLINK_REDIRECTS`: the client socket's cookie and the service address it
/// connected to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Redirect {
    pub cookie: u64,
    pub service: ServiceKey,
    /// Explicit tail padding (to the 8-byte alignment of `cookie`), always zero.
    pub pad: u32,
}

/// Key of `CLINK_PORTS`: a TCP port in host byte order.
///
/// A `u32` rather than a `u16` so the key has no padding the two sides could disagree on.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortKey {
    pub port: u32,
}

impl PortKey {
    pub const fn new(port: u16) -> Self {
        Self { port: port as u32 }
    }
}

/// Value of `CLINK_PORTS`: what the port is to the agent, which decides which local
/// connections on it `clink_sockops` takes (never a connection between two other hosts or
/// namespaces: both ends must be local, see [`SockKey::is_local`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortFlags {
    pub bits: u32,
}

impl PortFlags {
    /// An agent listener (an Import's): both ends of every local connection to it, the
    /// agent's accepted socket and the client's.
    pub const LISTENER: Self = Self { bits: 1 << 0 };
    /// A local export target: both ends of the connections the agent's own process opens to
    /// it; other clients of the target are left alone.
    pub const TARGET: Self = Self { bits: 1 << 1 };
    /// Both: an export target that is itself an agent listener.
    pub const BOTH: Self = Self {
        bits: Self::LISTENER.bits | Self::TARGET.bits,
    };

    pub const fn contains(self, other: Self) -> bool {
        self.bits & other.bits == other.bits
    }
}

#[cfg(feature = "user")]
mod user {
    use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

    use super::{
        Flow, PortFlags, PortKey, Redirect, ServiceKey, ServiceTarget, SockKey, AF_INET, AF_INET6,
    };

    // SAFETY: all of these are `#[repr(C)]` structs of `u32`s (and one leading `u64`) without
    // implicit padding: every bit pattern is valid.
    unsafe impl aya::Pod for SockKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for PortKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for PortFlags {}
    // SAFETY: see above.
    unsafe impl aya::Pod for ServiceKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for ServiceTarget {}
    // SAFETY: see above (`pad` makes the tail padding explicit).
    unsafe impl aya::Pod for Redirect {}
    // SAFETY: a `u64` and two `u32`s, no padding: every bit pattern is valid.
    unsafe impl aya::Pod for Flow {}

    impl SockKey {
        /// The key `clink_sockops` stores a connected socket under, from the socket's
        /// `getsockname` (`local`) and `getpeername` (`remote`) addresses.
        pub fn from_addrs(local: SocketAddr, remote: SocketAddr) -> Self {
            let (local_ip4, local_ip6) = split(local.ip());
            let (remote_ip4, remote_ip6) = split(remote.ip());
            let family = match (local.ip(), remote.ip()) {
                (IpAddr::V4(_), IpAddr::V4(_)) => AF_INET,
                _ => AF_INET6,
            };
            Self::from_ctx(
                family,
                local_ip4,
                remote_ip4,
                local_ip6,
                remote_ip6,
                u32::from(local.port()),
                u32::from(remote.port()).to_be(),
            )
        }
    }

    impl SockKey {
        /// The local and remote addresses of the socket this key belongs to.
        pub fn addrs(&self) -> (SocketAddr, SocketAddr) {
            let port = |p: u32| u16::try_from(p).unwrap_or(u16::MAX);
            if self.family == AF_INET6 {
                (
                    SocketAddr::new(v6(self.src_ip6).into(), port(self.src_port)),
                    SocketAddr::new(v6(self.dst_ip6).into(), port(self.dst_port)),
                )
            } else {
                (
                    SocketAddr::new(v4(self.src_ip4).into(), port(self.src_port)),
                    SocketAddr::new(v4(self.dst_ip4).into(), port(self.dst_port)),
                )
            }
        }
    }

    impl ServiceKey {
        /// The key of a service address; IPv4-mapped IPv6 addresses become IPv4, as in the
        /// connect hooks.
        pub fn new(addr: SocketAddr) -> Self {
            let ip = addr.ip().to_canonical();
            let port = u32::from(addr.port());
            match ip {
                IpAddr::V4(ip) => Self {
                    family: AF_INET,
                    ip4: ne(ip),
                    port,
                    ..Self::default()
                },
                IpAddr::V6(ip) => Self {
                    family: AF_INET6,
                    ip6: words(ip),
                    port,
                    ..Self::default()
                },
            }
        }

        pub fn addr(&self) -> SocketAddr {
            let port = u16::try_from(self.port).unwrap_or(u16::MAX);
            if self.family == AF_INET6 {
                SocketAddr::new(v6(self.ip6).into(), port)
            } else {
                SocketAddr::new(v4(self.ip4).into(), port)
            }
        }
    }

    fn v4(ip: u32) -> Ipv4Addr {
        Ipv4Addr::from(ip.to_ne_bytes())
    }

    fn v6(words: [u32; 4]) -> Ipv6Addr {
        let mut octets = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            octets[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        Ipv6Addr::from(octets)
    }

    /// The address as the kernel context carries it: `(ip4, ip6)` in network byte order, the
    /// unused one zero. An IPv4 address goes into `ip6` too as `::ffff:a.b.c.d`, so a mixed
    /// pair normalises like a v4-mapped socket does.
    fn split(ip: IpAddr) -> (u32, [u32; 4]) {
        match ip {
            IpAddr::V4(v4) => (ne(v4), words(v4.to_ipv6_mapped())),
            IpAddr::V6(v6) => (0, words(v6)),
        }
    }

    fn ne(ip: Ipv4Addr) -> u32 {
        u32::from_ne_bytes(ip.octets())
    }

    fn words(ip: Ipv6Addr) -> [u32; 4] {
        let o = ip.octets();
        core::array::from_fn(|i| {
            u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
        })
    }

    impl From<u16> for PortKey {
        fn from(port: u16) -> Self {
            Self::new(port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LO: u32 = u32::from_ne_bytes([127, 0, 0, 1]);

    #[test]
    fn v4_key_reverses_into_peer_key() {
        // Client 127.0.0.1:40000 -> agent 127.0.0.1:15001, seen from each end.
        let client = SockKey::from_ctx(AF_INET, LO, LO, [0; 4], [0; 4], 40000, 15001u32.to_be());
        let agent = SockKey::from_ctx(AF_INET, LO, LO, [0; 4], [0; 4], 15001, 40000u32.to_be());
        assert_eq!(client.src_port, 40000);
        assert_eq!(client.dst_port, 15001);
        assert_eq!(client.reversed(), agent);
        assert_eq!(agent.reversed(), client);
    }

    #[test]
    fn v4_mapped_v6_socket_matches_v4_peer() {
        let mapped = [0, 0, 0xffff_u32.to_be(), LO];
        let agent = SockKey::from_ctx(AF_INET6, 0, 0, mapped, mapped, 15001, 40000u32.to_be());
        let client = SockKey::from_ctx(AF_INET, LO, LO, [0; 4], [0; 4], 40000, 15001u32.to_be());
        assert_eq!(agent.family, AF_INET);
        assert_eq!(agent.reversed(), client);
    }

    #[test]
    fn v6_key_keeps_addresses() {
        let a = [1u32.to_be(), 0, 0, 1];
        let b = [2u32.to_be(), 0, 0, 2];
        let key = SockKey::from_ctx(AF_INET6, 0, 0, a, b, 1, 2u32.to_be());
        assert_eq!(key.family, AF_INET6);
        assert_eq!((key.src_ip6, key.dst_ip6), (a, b));
        assert_eq!((key.src_ip4, key.dst_ip4), (0, 0));
    }

    #[test]
    fn port_flags() {
        assert!(PortFlags::BOTH.contains(PortFlags::LISTENER));
        assert!(PortFlags::BOTH.contains(PortFlags::TARGET));
        assert!(!PortFlags::LISTENER.contains(PortFlags::TARGET));
        assert_eq!(PortKey::new(8080).port, 8080);
    }

    #[test]
    fn local_means_same_address_at_both_ends() {
        let lo = SockKey::from_ctx(AF_INET, LO, LO, [0; 4], [0; 4], 40000, 15001u32.to_be());
        assert!(lo.is_local());
        let other = u32::from_ne_bytes([10, 0, 0, 2]);
        let remote = SockKey::from_ctx(AF_INET, LO, other, [0; 4], [0; 4], 1, 2u32.to_be());
        assert!(!remote.is_local());
        let a = [1u32.to_be(), 0, 0, 1];
        let b = [2u32.to_be(), 0, 0, 2];
        assert!(SockKey::from_ctx(AF_INET6, 0, 0, a, a, 1, 2u32.to_be()).is_local());
        assert!(!SockKey::from_ctx(AF_INET6, 0, 0, a, b, 1, 2u32.to_be()).is_local());
    }

    #[test]
    fn service_key_from_connect_contexts() {
        // user_port holds the network-order port in its low 16 bits.
        let port = u32::from(80u16.to_be());
        let vip = u32::from_ne_bytes([10, 96, 0, 10]);
        let v4 = ServiceKey::from_connect4(vip, port);
        assert_eq!((v4.family, v4.ip4, v4.port), (AF_INET, vip, 80));
        let mapped = [0, 0, 0xffff_u32.to_be(), vip];
        assert_eq!(ServiceKey::from_connect6(mapped, port), v4);
        let v6 = ServiceKey::from_connect6(LOOPBACK6, port);
        assert_eq!((v6.family, v6.ip6, v6.ip4), (AF_INET6, LOOPBACK6, 0));
        let target = ServiceTarget {
            listener_port: 7000,
        };
        assert_eq!(u16::from_be(target.user_port() as u16), 7000);
    }

    #[test]
    fn redirect_has_no_implicit_padding() {
        assert_eq!(
            core::mem::size_of::<Redirect>(),
            8 + core::mem::size_of::<ServiceKey>() + 4
        );
    }

    #[cfg(feature = "user")]
    #[test]
    fn addresses_round_trip() {
        use core::net::SocketAddr;
        for addr in ["10.96.0.10:80", "[fd00::10]:443"] {
            let addr: SocketAddr = addr.parse().unwrap();
            assert_eq!(ServiceKey::new(addr).addr(), addr);
        }
        let mapped: SocketAddr = "[::ffff:10.96.0.10]:80".parse().unwrap();
        assert_eq!(ServiceKey::new(mapped).family, AF_INET);
        let client: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let agent: SocketAddr = "127.0.0.1:15001".parse().unwrap();
        assert_eq!(SockKey::from_addrs(client, agent).addrs(), (client, agent));
        let v6: SocketAddr = "[::1]:5".parse().unwrap();
        assert_eq!(SockKey::from_addrs(v6, v6).addrs(), (v6, v6));
    }

    #[cfg(feature = "user")]
    #[test]
    fn from_addrs_matches_ctx() {
        use core::net::SocketAddr;
        let client: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let agent: SocketAddr = "127.0.0.1:15001".parse().unwrap();
        let expected = SockKey::from_ctx(AF_INET, LO, LO, [0; 4], [0; 4], 40000, 15001u32.to_be());
        assert_eq!(SockKey::from_addrs(client, agent), expected);
        let mapped_agent: SocketAddr = "[::ffff:127.0.0.1]:15001".parse().unwrap();
        let mapped_client: SocketAddr = "[::ffff:127.0.0.1]:40000".parse().unwrap();
        assert_eq!(
            SockKey::from_addrs(mapped_agent, mapped_client),
            expected.reversed()
        );
        let v6: SocketAddr = "[::1]:1".parse().unwrap();
        assert_eq!(SockKey::from_addrs(v6, v6).family, AF_INET6);
    }
}
