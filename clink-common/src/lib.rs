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
}

/// Length of the kernel's object name buffer (`BPF_OBJ_NAME_LEN`), including the final NUL.
pub const BPF_OBJ_NAME_LEN: usize = 16;

/// Capacity of `CLINK_SOCKS`: two sockets per spliced local hop.
pub const SOCKS_MAX_ENTRIES: u32 = 65_536;
/// Capacity of `CLINK_PORTS`.
pub const PORTS_MAX_ENTRIES: u32 = 1_024;
/// Number of slots in `CLINK_SKMSG_BYTES`.
pub const SKMSG_COUNTERS: u32 = 2;
/// `CLINK_SKMSG_BYTES` slot holding the bytes redirected by `clink_skmsg`.
pub const SKMSG_BYTES_IDX: u32 = 0;
/// `CLINK_SKMSG_BYTES` slot holding the number of messages redirected by `clink_skmsg`.
pub const SKMSG_MSGS_IDX: u32 = 1;

/// `AF_INET`, as found in the context's `family` field.
pub const AF_INET: u32 = 2;
/// `AF_INET6`, as found in the context's `family` field.
pub const AF_INET6: u32 = 10;

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

#[inline(always)]
fn is_v4_mapped(ip6: &[u32; 4]) -> bool {
    ip6[0] == 0 && ip6[1] == 0 && ip6[2] == 0xffff_u32.to_be()
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

/// Value of `CLINK_PORTS`: which end of a connection the port must be on for `clink_sockops`
/// to take the socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortFlags {
    pub bits: u32,
}

impl PortFlags {
    /// Sockets whose local port is this port (the agent's own listeners and their accepted
    /// sockets).
    pub const LOCAL: Self = Self { bits: 1 << 0 };
    /// Sockets whose remote port is this port (clients connecting to an agent listener, or
    /// the agent connecting to a local exported service).
    pub const REMOTE: Self = Self { bits: 1 << 1 };
    /// Both ends of a connection to this port.
    pub const BOTH: Self = Self {
        bits: Self::LOCAL.bits | Self::REMOTE.bits,
    };

    pub const fn contains(self, other: Self) -> bool {
        self.bits & other.bits == other.bits
    }
}

#[cfg(feature = "user")]
mod user {
    use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

    use super::{PortFlags, PortKey, SockKey, AF_INET, AF_INET6};

    // SAFETY: all three are `#[repr(C)]` structs of `u32`s: no padding, every bit pattern valid.
    unsafe impl aya::Pod for SockKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for PortKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for PortFlags {}

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
        assert!(PortFlags::BOTH.contains(PortFlags::LOCAL));
        assert!(PortFlags::BOTH.contains(PortFlags::REMOTE));
        assert!(!PortFlags::LOCAL.contains(PortFlags::REMOTE));
        assert_eq!(PortKey::new(8080).port, 8080);
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
