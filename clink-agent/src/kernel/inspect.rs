//! Reads back what is pinned under a pin directory, from the kernel: programs, their cgroup
//! attachments, and the maps' contents (`clink bpf`).

use std::{
    fs,
    net::SocketAddr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use aya::{
    maps::{HashMap, Map, MapData, MapError, PerCpuArray, SockHash},
    programs::ProgramInfo,
};
use clink_common::{
    map, PortFlags, PortKey, Redirect, ServiceKey, ServiceTarget, SockKey, SKMSG_BYTES_IDX,
    SKMSG_FALLBACKS_IDX, SKMSG_MSGS_IDX, SKMSG_PASSED_IDX, SKMSG_RESUMES_IDX,
};
use serde::{Deserialize, Serialize};

use super::{host, loader, pins::*, syscall, EbpfError};
use crate::connections::ConnectionInfo;

/// What `clink_skmsg` did, summed over all CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SkMsgCounters {
    /// Bytes redirected into a peer socket's receive queue.
    pub bytes: u64,
    /// Messages (sends) redirected.
    pub messages: u64,
    /// Bytes of spliced sockets sent through the TCP stack because the reader was behind.
    pub passed_bytes: u64,
    /// Switches of a socket from the splice to the TCP stack (reader too far behind).
    pub fallbacks: u64,
    /// Switches back to the splice once the reader had read everything.
    pub resumes: u64,
}

pub(super) fn sum_counters<T: std::borrow::Borrow<MapData>>(
    counters: &PerCpuArray<T, u64>,
) -> Result<SkMsgCounters, EbpfError> {
    let sum = |index| {
        counters
            .get(&index, 0)
            .map(|per_cpu| per_cpu.iter().sum())
            .map_err(|source| loader::map_error(map::SKMSG_BYTES, source))
    };
    Ok(SkMsgCounters {
        bytes: sum(SKMSG_BYTES_IDX)?,
        messages: sum(SKMSG_MSGS_IDX)?,
        passed_bytes: sum(SKMSG_PASSED_IDX)?,
        fallbacks: sum(SKMSG_FALLBACKS_IDX)?,
        resumes: sum(SKMSG_RESUMES_IDX)?,
    })
}

/// What is pinned in a pin directory, read back from the kernel: `clink bpf` (its `-o json`
/// is this type, camelCase, which tests read back typed).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Inspection {
    pub pin_dir: PathBuf,
    pub programs: Vec<PinnedProgram>,
    /// `CLINK_PORTS`.
    pub ports: Vec<PortEntry>,
    /// `CLINK_SERVICES`.
    pub services: Vec<ServiceEntry>,
    /// `CLINK_SOCKS`, one entry per socket.
    pub sockets: Vec<SocketEntry>,
    /// `CLINK_REDIRECTS`.
    pub redirects: Vec<RedirectEntry>,
    /// `CLINK_SKMSG_BYTES`.
    pub skmsg: SkMsgCounters,
    /// The agent's open tunneled connections and each one's path (from its admin API, not
    /// from the maps); empty with `connectionsError` set when the agent could not be asked.
    #[serde(default)]
    pub connections: Vec<ConnectionInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections_error: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PinnedProgram {
    pub name: String,
    pub pin: PathBuf,
    /// As `bpftool prog show` names it.
    pub kind: String,
    pub id: u32,
    pub attached: Vec<Attachment>,
}

/// A cgroup bpf_link of a program.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    pub link_id: u32,
    /// As `bpftool cgroup show` names it (`cgroup_sock_ops`, `cgroup_inet4_connect`, ...).
    pub attach_type: String,
    pub cgroup_id: u64,
    /// The cgroup's directory, if found under the cgroup v2 mount.
    pub cgroup: Option<PathBuf>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortEntry {
    pub port: u16,
    pub listener: bool,
    pub target: bool,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntry {
    pub service: SocketAddr,
    pub listener_port: u16,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SocketEntry {
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RedirectEntry {
    /// The client's address, as the agent's accepted socket sees it.
    pub client: SocketAddr,
    /// The import listener the client was sent to.
    pub listener: SocketAddr,
    /// The service address the client connected to.
    pub service: SocketAddr,
    /// The client socket's cookie.
    pub cookie: u64,
}

/// Reads everything pinned under `pin_dir`; needs the privileges of [`loader::load`].
pub fn inspect(pin_dir: &Path) -> Result<Inspection, EbpfError> {
    host::check_privileges()?;
    let mut programs = Vec::new();
    for (name, pin, kind) in PROGRAM_PINS {
        let path = pin_dir.join(pin);
        let info =
            ProgramInfo::from_pin(&path).map_err(|source| EbpfError::Program { name, source })?;
        programs.push(PinnedProgram {
            name: name.to_owned(),
            pin: path,
            kind: kind.to_owned(),
            id: info.id(),
            attached: Vec::new(),
        });
    }
    let cgroup_root = host::cgroup2_root().ok();
    for link in aya::programs::loaded_links().flatten() {
        let Some(program) = programs.iter_mut().find(|p| p.id == link.program_id()) else {
            continue;
        };
        let Ok((cgroup_id, attach_type)) = syscall::cgroup_link_info(link.id()) else {
            continue;
        };
        program.attached.push(Attachment {
            link_id: link.id(),
            attach_type: attach_type_name(attach_type),
            cgroup_id,
            cgroup: cgroup_root
                .as_deref()
                .and_then(|root| find_cgroup(root, cgroup_id)),
        });
    }

    let ports: HashMap<MapData, PortKey, PortFlags> =
        pinned_map(pin_dir, map::PORTS, PIN_MAP_PORTS)?;
    let mut ports: Vec<PortEntry> = ports
        .iter()
        .flatten()
        .map(|(key, flags)| PortEntry {
            port: u16::try_from(key.port).unwrap_or(u16::MAX),
            listener: flags.contains(PortFlags::LISTENER),
            target: flags.contains(PortFlags::TARGET),
        })
        .collect();
    ports.sort_by_key(|p| p.port);

    let services: HashMap<MapData, ServiceKey, ServiceTarget> =
        pinned_map(pin_dir, map::SERVICES, PIN_MAP_SERVICES)?;
    let mut services: Vec<ServiceEntry> = services
        .iter()
        .flatten()
        .map(|(key, target)| ServiceEntry {
            service: key.addr(),
            listener_port: u16::try_from(target.listener_port).unwrap_or(u16::MAX),
        })
        .collect();
    services.sort_by_key(|s| s.service);

    let socks: SockHash<MapData, SockKey> = pinned_map(pin_dir, map::SOCKS, PIN_MAP_SOCKS)?;
    let mut sockets: Vec<SocketEntry> = socks
        .keys()
        .flatten()
        .map(|key| {
            let (local, remote) = key.addrs();
            SocketEntry { local, remote }
        })
        .collect();
    sockets.sort_by_key(|s| (s.local, s.remote));

    let redirects: HashMap<MapData, SockKey, Redirect> =
        pinned_map(pin_dir, map::REDIRECTS, PIN_MAP_REDIRECTS)?;
    let mut redirects: Vec<RedirectEntry> = redirects
        .iter()
        .flatten()
        .map(|(key, redirect)| {
            let (listener, client) = key.addrs();
            RedirectEntry {
                client,
                listener,
                service: redirect.service.addr(),
                cookie: redirect.cookie,
            }
        })
        .collect();
    redirects.sort_by_key(|r| r.client);

    let counters: PerCpuArray<MapData, u64> =
        pinned_map(pin_dir, map::SKMSG_BYTES, PIN_MAP_SKMSG_BYTES)?;
    Ok(Inspection {
        pin_dir: pin_dir.to_path_buf(),
        programs,
        ports,
        services,
        sockets,
        redirects,
        skmsg: sum_counters(&counters)?,
        connections: Vec::new(),
        connections_error: None,
    })
}

fn pinned_map<T>(pin_dir: &Path, name: &'static str, pin: &str) -> Result<T, EbpfError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let data =
        MapData::from_pin(pin_dir.join(pin)).map_err(|source| loader::map_error(name, source))?;
    Map::from_map_data(data)
        .and_then(T::try_from)
        .map_err(|source| loader::map_error(name, source))
}

fn attach_type_name(attach_type: u32) -> String {
    match attach_type {
        3 => "cgroup_sock_ops".to_owned(),
        10 => "cgroup_inet4_connect".to_owned(),
        11 => "cgroup_inet6_connect".to_owned(),
        other => format!("attach type {other}"),
    }
}

/// The directory under `root` whose cgroup id (its inode number) is `id`.
fn find_cgroup(root: &Path, id: u64) -> Option<PathBuf> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if fs::metadata(&dir).is_ok_and(|m| m.ino() == id) {
            return Some(dir);
        }
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(entry.path());
            }
        }
    }
    None
}
