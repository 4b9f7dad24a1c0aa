//! The sockmap data path's control side: the eBPF programs loaded, pinned and attached to a
//! cgroup v2 directory, and their maps kept in step with the objects:
//!
//! - `CLINK_PORTS`: every Import listener port (`LISTENER`: both ends of local connections to
//!   it are spliced) and every Export target port (`TARGET`: both ends of the agent's own
//!   connections to it are spliced).
//! - `CLINK_SERVICES`: service addresses. An Import annotated with
//!   `clusterlink.net/service-ip: <ip>[,<ip>...]` is reachable at `<ip>:<spec.port>` from
//!   every process in the cgroup: the `connect4`/`connect6` hooks send such connects to the
//!   Import's listener on loopback. The address needs no route or interface; clients that
//!   connect to the listener directly keep working.
//!
//! The userspace relay keeps reading and writing its sockets: the kernel only shortcuts the
//! local hops, so the agent's byte counters stay exact. The kernel's missing back-pressure on
//! redirected sends is made up for by [`super::flow`].

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use clink_common::{map, PortFlags};
use tracing::{info, warn};

use super::{
    choice::{self, Options, Unavailable},
    flow::FlowControl,
    loader::{self, LoadedEbpf},
    EbpfError,
};
use crate::{
    api::{Import, ObjectKey},
    state::Snapshot,
};

/// The Import annotation that gives it service addresses (comma-separated IPs); clients in
/// the attached cgroup connect to `<ip>:<spec.port>`.
pub const SERVICE_IP_ANNOTATION: &str = "clusterlink.net/service-ip";

/// What the programs do for the agent's connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hops {
    /// The sockmap path: Import listener and Export target ports in `CLINK_PORTS`, their
    /// local hops spliced by sk_msg; service addresses redirected.
    Spliced,
    /// The kTLS path: only service addresses redirected (and recorded); `CLINK_PORTS` stays
    /// empty, so no socket is spliced by sk_msg (the agent splices with splice(2)).
    Redirected,
}

/// The eBPF programs' control side: keeps `CLINK_PORTS` and `CLINK_SERVICES` in step with
/// the objects. Map updates that fail are logged; the connections concerned then take the
/// userspace path, which always works.
pub struct Sockmap {
    cgroup: PathBuf,
    hops: Hops,
    flow: Arc<FlowControl>,
    state: Mutex<State>,
    /// Held while this agent owns the pin directory (see [`lock_pin_dir`]).
    _lock: std::fs::File,
}

/// Where agents lock their pin directories: two agents sharing one would replace each
/// other's programs and maps while both run.
const LOCK_DIR: &str = "/run/clusterlink";

/// Takes the exclusive lock of `pin_dir`, released by the kernel when the agent exits (also
/// on SIGKILL, which is when a successor legitimately replaces the pins).
fn lock_pin_dir(pin_dir: &Path) -> Result<std::fs::File, EbpfError> {
    let name: String = pin_dir
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let path = Path::new(LOCK_DIR).join(format!("bpf{name}.lock"));
    let lock_err = |source| EbpfError::Lock {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(LOCK_DIR).map_err(lock_err)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(lock_err)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(EbpfError::InUse {
                pin_dir: pin_dir.to_owned(),
                lock: path,
            })
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(lock_err(e)),
    }
    Ok(file)
}

struct State {
    /// `None` once shut down.
    ebpf: Option<LoadedEbpf>,
    /// What the maps hold, as far as this agent put it there.
    ports: BTreeMap<u16, PortFlags>,
    services: BTreeMap<SocketAddr, u16>,
    /// Annotation problems already logged, so each is logged once, not on every change.
    reported: BTreeSet<String>,
}

impl Sockmap {
    pub(super) fn start(options: &Options, hops: Hops) -> Result<Sockmap, Unavailable> {
        let cgroup = choice::check(options)?;
        let missing = |feature| move |reason| Unavailable { feature, reason };
        let lock =
            lock_pin_dir(&options.pin_dir).map_err(missing("sole use of the pin directory"))?;
        let mut ebpf = loader::load(
            &options.pin_dir,
            options.node_address,
            hops == Hops::Spliced,
        )
        .map_err(missing("a loadable eBPF program"))?;
        let fd = |name| {
            ebpf.map_fd(name)
                .map_err(missing("a loadable eBPF program"))
        };
        let flow = FlowControl::new(
            fd(map::READS)?,
            fd(map::FLOWS)?,
            fd(map::SOCKS)?,
            fd(map::REDIRECTS)?,
        );
        ebpf.attach_cgroup(&cgroup)
            .map_err(missing("a cgroup v2 attachment"))?;
        Ok(Sockmap {
            cgroup,
            hops,
            flow: Arc::new(flow),
            _lock: lock,
            state: Mutex::new(State {
                ebpf: Some(ebpf),
                ports: BTreeMap::new(),
                services: BTreeMap::new(),
                reported: BTreeSet::new(),
            }),
        })
    }

    /// Detaches from the cgroup and removes the pins; later changes are ignored.
    pub fn shutdown(&self) {
        let ebpf = self.lock().ebpf.take();
        if let Some(ebpf) = ebpf {
            match ebpf.remove() {
                Ok(()) => info!("eBPF programs detached and unpinned"),
                Err(e) => warn!(error = %e, "cleaning up the eBPF programs"),
            }
        }
    }

    /// The cgroup v2 directory the programs are attached to.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// The agent's half of the flow control of the sockets this path splices.
    pub fn flow(&self) -> &Arc<FlowControl> {
        &self.flow
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Sockmap {
    /// Writes the ports and service addresses `snapshot` asks for into the maps.
    pub fn objects_changed(&self, snapshot: &Snapshot, import_ports: &BTreeMap<ObjectKey, u16>) {
        let want_ports = match self.hops {
            Hops::Spliced => ports(snapshot, import_ports),
            Hops::Redirected => BTreeMap::new(),
        };
        let mut state = self.lock();
        let state = &mut *state;
        let want_services = services(snapshot, import_ports, &mut state.reported);
        let Some(ebpf) = state.ebpf.as_mut() else {
            return;
        };
        // New entries first: a service that moves to another listener is never unmapped.
        for (&port, &flags) in &want_ports {
            if state.ports.get(&port) != Some(&flags) {
                match ebpf.add_port(port, flags) {
                    Ok(()) => {
                        state.ports.insert(port, flags);
                    }
                    Err(e) => warn!(port, error = %e, "{} not updated", map::PORTS),
                }
            }
        }
        for (&service, &listener) in &want_services {
            if state.services.get(&service) != Some(&listener) {
                match ebpf.set_service(service, listener) {
                    Ok(()) => {
                        info!(%service, listener, "service address redirected to the import listener");
                        state.services.insert(service, listener);
                    }
                    Err(e) => warn!(%service, error = %e, "{} not updated", map::SERVICES),
                }
            }
        }
        state.ports.retain(|port, _| {
            want_ports.contains_key(port)
                || ebpf
                    .remove_port(*port)
                    .inspect_err(|e| warn!(port, error = %e, "{} not updated", map::PORTS))
                    .is_err()
        });
        state.services.retain(|service, _| {
            if want_services.contains_key(service) {
                return true;
            }
            match ebpf.remove_service(*service) {
                Ok(()) => {
                    info!(%service, "service address no longer redirected");
                    false
                }
                Err(e) => {
                    warn!(%service, error = %e, "{} not updated", map::SERVICES);
                    true
                }
            }
        });
    }
}

/// Import listener ports and Export target ports.
fn ports(snapshot: &Snapshot, import_ports: &BTreeMap<ObjectKey, u16>) -> BTreeMap<u16, PortFlags> {
    let mut ports: BTreeMap<u16, PortFlags> = BTreeMap::new();
    let mut add = |port: u16, flag: PortFlags| {
        let flags = ports.entry(port).or_default();
        flags.bits |= flag.bits;
    };
    for &port in import_ports.values() {
        add(port, PortFlags::LISTENER);
    }
    for export in snapshot.exports.values() {
        add(export.spec.port, PortFlags::TARGET);
    }
    ports
}

/// Service address -> listener port, from the annotations of Imports that have a listener.
/// Problems (a bad address, two Imports claiming one address) are logged once each.
fn services(
    snapshot: &Snapshot,
    import_ports: &BTreeMap<ObjectKey, u16>,
    reported: &mut BTreeSet<String>,
) -> BTreeMap<SocketAddr, u16> {
    let mut report = |problem: String| {
        if reported.insert(problem.clone()) {
            warn!("{problem}");
        }
    };
    let mut services: BTreeMap<SocketAddr, (u16, &ObjectKey)> = BTreeMap::new();
    // Sorted, so that which of two conflicting Imports wins does not change between calls.
    let imports: BTreeMap<&ObjectKey, &Import> = snapshot.imports.iter().collect();
    for (key, import) in imports {
        let ips = match service_ips(import) {
            Ok(ips) => ips,
            Err(e) => {
                report(format!("{key}: {e}; no service address"));
                continue;
            }
        };
        let Some(&listener) = import_ports.get(key) else {
            continue;
        };
        for ip in ips {
            let service = SocketAddr::new(ip, import.spec.port);
            match services.get(&service) {
                Some((_, owner)) => report(format!(
                    "{key}: service address {service} is already {owner}'s; ignored"
                )),
                None => {
                    services.insert(service, (listener, key));
                }
            }
        }
    }
    services
        .into_iter()
        .map(|(service, (listener, _))| (service, listener))
        .collect()
}

/// The service addresses of an Import ([`SERVICE_IP_ANNOTATION`]); none without it.
pub fn service_ips(import: &Import) -> Result<Vec<IpAddr>, String> {
    let Some(value) = import.metadata.annotations.get(SERVICE_IP_ANNOTATION) else {
        return Ok(Vec::new());
    };
    value
        .split(',')
        .map(str::trim)
        .filter(|ip| !ip.is_empty())
        .map(|ip| {
            let parsed: IpAddr = ip.parse().map_err(|_| {
                format!(
                    "metadata.annotations[{SERVICE_IP_ANNOTATION}]: {ip:?} is not an IP address"
                )
            })?;
            if parsed.is_unspecified() || parsed.is_multicast() {
                return Err(format!(
                    "metadata.annotations[{SERVICE_IP_ANNOTATION}]: {ip} cannot be a service \
                     address"
                ));
            }
            Ok(parsed.to_canonical())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::api::{ImportSpec, ObjectMeta, Resource, Status};

    fn import(name: &str, port: u16, ips: Option<&str>) -> (ObjectKey, Import) {
        let mut metadata = ObjectMeta {
            name: name.to_owned(),
            namespace: Some("default".to_owned()),
            ..ObjectMeta::default()
        };
        if let Some(ips) = ips {
            metadata
                .annotations
                .insert(SERVICE_IP_ANNOTATION.to_owned(), ips.to_owned());
        }
        let key = ObjectKey {
            kind: crate::api::Kind::Import,
            namespace: "default".to_owned(),
            name: name.to_owned(),
        };
        let import = Resource {
            api_version: crate::api::API_VERSION.to_owned(),
            kind: "Import".to_owned(),
            metadata,
            spec: ImportSpec {
                port,
                target_port: 0,
                sources: Vec::new(),
                lb_scheme: Default::default(),
            },
            status: Status::default(),
        };
        (key, import)
    }

    fn snapshot(imports: Vec<(ObjectKey, Import)>) -> Snapshot {
        Snapshot {
            imports: imports.into_iter().collect::<HashMap<_, _>>(),
            ..Snapshot::default()
        }
    }

    #[test]
    fn annotation_gives_service_addresses_on_the_import_port() {
        let (a, ia) = import("a", 80, Some("10.96.0.10, fd00::10"));
        let (b, ib) = import("b", 443, None);
        let (c, ic) = import("c", 80, Some("::ffff:10.96.0.11"));
        let listeners = BTreeMap::from([(a.clone(), 7000), (b.clone(), 7001), (c.clone(), 7002)]);
        let got = services(
            &snapshot(vec![(a, ia), (b, ib), (c, ic)]),
            &listeners,
            &mut BTreeSet::new(),
        );
        let want = BTreeMap::from([
            ("10.96.0.10:80".parse().unwrap(), 7000),
            ("[fd00::10]:80".parse().unwrap(), 7000),
            ("10.96.0.11:80".parse().unwrap(), 7002),
        ]);
        assert_eq!(got, want);
    }

    #[test]
    fn bad_or_conflicting_addresses_are_reported_once_and_skipped() {
        let (a, ia) = import("a", 80, Some("10.96.0.10"));
        let (b, ib) = import("b", 80, Some("10.96.0.10"));
        let (c, ic) = import("c", 80, Some("not-an-ip"));
        let (d, id) = import("d", 80, Some("0.0.0.0"));
        let listeners = BTreeMap::from([(a.clone(), 7000), (b.clone(), 7001)]);
        let snap = snapshot(vec![(a, ia), (b, ib), (c, ic), (d, id)]);
        let mut reported = BTreeSet::new();
        let got = services(&snap, &listeners, &mut reported);
        assert_eq!(
            got,
            BTreeMap::from([("10.96.0.10:80".parse().unwrap(), 7000)])
        );
        let problems: Vec<&String> = reported.iter().collect();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems
            .iter()
            .any(|p| p.contains("is already Import default/a's")));
        assert!(problems
            .iter()
            .any(|p| p.contains("\"not-an-ip\" is not an IP address")));
        assert!(problems
            .iter()
            .any(|p| p.contains("0.0.0.0 cannot be a service address")));
        services(&snap, &listeners, &mut reported);
        assert_eq!(reported.len(), 3);
    }

    #[test]
    fn listener_and_target_ports() {
        let (a, ia) = import("a", 80, None);
        let mut snap = snapshot(vec![(a.clone(), ia)]);
        let export = crate::api::Export {
            api_version: crate::api::API_VERSION.to_owned(),
            kind: "Export".to_owned(),
            metadata: ObjectMeta::default(),
            spec: crate::api::ExportSpec {
                host: "127.0.0.1".to_owned(),
                port: 8080,
            },
            status: Status::default(),
        };
        snap.exports
            .insert(("default".to_owned(), "e".to_owned()), export.clone());
        let mut same = export;
        same.spec.port = 7000;
        snap.exports
            .insert(("default".to_owned(), "f".to_owned()), same);
        let got = ports(&snap, &BTreeMap::from([(a, 7000)]));
        assert_eq!(
            got,
            BTreeMap::from([(7000, PortFlags::BOTH), (8080, PortFlags::TARGET)])
        );
    }
}
