//! The pin directory's layout: one file per program and map, named `prog_` or `map_` and the
//! object's name, so `bpftool prog show pinned <dir>/prog_clink_sockops` and
//! `bpftool map dump pinned <dir>/map_clink_ports` read as what they are.

use clink_common::{map, program};

/// Where the agent pins its programs and maps unless told otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/clusterlink";

/// Pin file names under the pin directory: `prog_` or `map_` and the object's name.
pub const PIN_PROG_SOCKOPS: &str = "prog_clink_sockops";
pub const PIN_PROG_SKMSG: &str = "prog_clink_skmsg";
pub const PIN_PROG_CONNECT4: &str = "prog_clink_connect4";
pub const PIN_PROG_CONNECT6: &str = "prog_clink_connect6";
pub const PIN_MAP_SOCKS: &str = "map_clink_socks";
pub const PIN_MAP_PORTS: &str = "map_clink_ports";
pub const PIN_MAP_SKMSG_BYTES: &str = "map_clink_skmsg_bytes";
pub const PIN_MAP_SERVICES: &str = "map_clink_services";
pub const PIN_MAP_ORIG_DST: &str = "map_clink_orig_dst";
pub const PIN_MAP_REDIRECTS: &str = "map_clink_redirects";
pub const PIN_MAP_PENDING: &str = "map_clink_pending";
pub const PIN_MAP_UNSPLICED: &str = "map_clink_unspliced";
pub const PIN_MAP_FLOWS: &str = "map_clink_flows";
pub const PIN_MAP_COOKIES: &str = "map_clink_cookies";
pub const PIN_MAP_READS: &str = "map_clink_reads";

/// Every program: its name, its pin file and its type as `bpftool prog show` names it.
pub const PROGRAM_PINS: [(&str, &str, &str); 4] = [
    (program::SOCKOPS, PIN_PROG_SOCKOPS, "sock_ops"),
    (program::SKMSG, PIN_PROG_SKMSG, "sk_msg"),
    (program::CONNECT4, PIN_PROG_CONNECT4, "cgroup_sock_addr"),
    (program::CONNECT6, PIN_PROG_CONNECT6, "cgroup_sock_addr"),
];
/// Every map: its name, its pin file and its type as `bpftool map show` names it.
pub const MAP_PINS: [(&str, &str, &str); 11] = [
    (map::SOCKS, PIN_MAP_SOCKS, "sockhash"),
    (map::PORTS, PIN_MAP_PORTS, "hash"),
    (map::SKMSG_BYTES, PIN_MAP_SKMSG_BYTES, "percpu_array"),
    (map::SERVICES, PIN_MAP_SERVICES, "hash"),
    (map::ORIG_DST, PIN_MAP_ORIG_DST, "lru_hash"),
    (map::REDIRECTS, PIN_MAP_REDIRECTS, "lru_hash"),
    (map::PENDING, PIN_MAP_PENDING, "lru_hash"),
    (map::UNSPLICED, PIN_MAP_UNSPLICED, "lru_hash"),
    (map::FLOWS, PIN_MAP_FLOWS, "lru_hash"),
    (map::COOKIES, PIN_MAP_COOKIES, "lru_hash"),
    (map::READS, PIN_MAP_READS, "lru_hash"),
];
