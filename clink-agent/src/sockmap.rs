//! The sockmap data path (DESIGN.md §6.2): which data path the agent runs, and keeping the
//! kernel's maps in step with the objects.
//!
//! [`select`] decides from `--datapath`: `userspace`, `sockmap` (fails with the missing
//! feature if the kernel or the privileges do not allow it) or `auto`. `auto` runs userspace
//! and logs whether sockmap could run: sockmap is opt-in because on the kernels tested (6.18)
//! a blocking read of a spliced socket can fail with EAGAIN. Event-driven clients are
//! unaffected. (The kernel's missing back-pressure on redirected sends is made up for by the
//! flow control in [`crate::flow`].) With sockmap the eBPF programs are loaded, pinned and
//! attached to a cgroup v2 directory, and [`Sockmap`], the agent's [`DatapathHook`], fills
//! their maps:
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
//! local hops (client <-> Import listener, agent <-> local export target), so the agent's
//! byte counters stay exact. [`report`] renders what is pinned for `clink bpf`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use clink_common::{map, PortFlags};
use tracing::{info, warn};

use crate::{
    agent::{Datapath, DatapathHook, Snapshot},
    api::{Import, ObjectKey},
    dataplane,
    ebpf::{self, EbpfError, Inspection, LoadedEbpf},
    flow::FlowControl,
};

/// The name of this data path in logs, metrics and `clink status`.
pub const SOCKMAP: &str = "sockmap";

/// The Import annotation that gives it service addresses (comma-separated IPs); clients in
/// the attached cgroup connect to `<ip>:<spec.port>`.
pub const SERVICE_IP_ANNOTATION: &str = "clusterlink.net/service-ip";

/// `--datapath`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Choice {
    /// Userspace, saying whether sockmap could run (sockmap is opt-in, see [`select`]).
    Auto,
    Userspace,
    Sockmap,
}

/// How to set up the sockmap data path.
#[derive(Clone, Debug)]
pub struct Options {
    pub choice: Choice,
    /// The cgroup v2 directory to attach to; `None`: the cgroup v2 root.
    pub cgroup: Option<PathBuf>,
    /// Where programs and maps are pinned.
    pub pin_dir: PathBuf,
}

/// Why the sockmap data path cannot run: the missing feature, and what the check found. The
/// message is the whole story (`reason` is not a `source`), so `{:#}` prints it once.
#[derive(Debug, thiserror::Error)]
#[error("missing {feature}: {reason}")]
pub struct Unavailable {
    pub feature: &'static str,
    pub reason: EbpfError,
}

/// `--datapath sockmap` was asked for and cannot run.
#[derive(Debug, thiserror::Error)]
#[error("--datapath sockmap: {0}")]
pub struct SelectError(pub Unavailable);

/// The data path the agent runs, and the sockmap handle to shut down on exit.
pub struct Selected {
    pub datapath: Datapath,
    pub sockmap: Option<Arc<Sockmap>>,
}

impl Selected {
    /// Detaches and unpins the eBPF programs, if any; the agent calls it on its way out.
    pub fn shutdown(&self) {
        if let Some(sockmap) = &self.sockmap {
            sockmap.shutdown();
        }
    }
}

/// Chooses the data path. Must run inside the tokio runtime, after the tracing subscriber is
/// set, so that the programs' aya-log output reaches the agent's log.
pub fn select(options: &Options) -> Result<Selected, SelectError> {
    let userspace = || Selected {
        datapath: Datapath::userspace(),
        sockmap: None,
    };
    match options.choice {
        Choice::Userspace => {
            info!(
                datapath = dataplane::USERSPACE,
                "data path chosen by --datapath"
            );
            return Ok(userspace());
        }
        Choice::Auto => {
            match check(options) {
                Ok(_) => info!(
                    datapath = dataplane::USERSPACE,
                    "the sockmap data path is available but not chosen automatically: on this \
                     kernel a blocking recv() on a spliced socket can fail with EAGAIN, which \
                     breaks clients that use blocking sockets; --datapath sockmap turns it on \
                     (clients with non-blocking I/O are not affected)"
                ),
                Err(unavailable) => info!(
                    datapath = dataplane::USERSPACE,
                    sockmap_missing = unavailable.feature,
                    reason = %unavailable.reason,
                    "using the userspace data path"
                ),
            }
            return Ok(userspace());
        }
        Choice::Sockmap => {}
    }
    match Sockmap::start(options) {
        Ok(sockmap) => {
            info!(
                datapath = SOCKMAP,
                cgroup = %sockmap.cgroup.display(),
                pin_dir = %options.pin_dir.display(),
                "data path: local hops are spliced in the kernel"
            );
            let sockmap = Arc::new(sockmap);
            Ok(Selected {
                datapath: Datapath {
                    name: SOCKMAP,
                    hook: Some(sockmap.clone()),
                    flow: Some(sockmap.flow.clone()),
                },
                sockmap: Some(sockmap),
            })
        }
        Err(unavailable) => Err(SelectError(unavailable)),
    }
}

/// Checks what the sockmap data path needs, in the order an operator would fix it.
fn check(options: &Options) -> Result<PathBuf, Unavailable> {
    let missing = |feature| move |reason| Unavailable { feature, reason };
    if !ebpf::built() {
        return Err(Unavailable {
            feature: "eBPF programs in this build",
            reason: EbpfError::NotBuilt,
        });
    }
    ebpf::check_privileges().map_err(missing("root or CAP_BPF with CAP_NET_ADMIN"))?;
    let cgroup = match &options.cgroup {
        Some(cgroup) => cgroup.clone(),
        None => ebpf::cgroup2_root().map_err(missing("cgroup v2"))?,
    };
    ebpf::check_cgroup2(&cgroup).map_err(missing("cgroup v2"))?;
    ebpf::ensure_bpffs(&options.pin_dir).map_err(missing("bpffs"))?;
    let features = ebpf::feature_check().map_err(missing("kernel eBPF support"))?;
    if let Some(feature) = features.missing() {
        return Err(Unavailable {
            feature,
            reason: EbpfError::Unsupported(feature),
        });
    }
    Ok(cgroup)
}

/// The sockmap data path's hook: keeps `CLINK_PORTS` and `CLINK_SERVICES` in step with the
/// objects. Map updates that fail are logged; the connections concerned then take the
/// userspace path, which always works.
pub struct Sockmap {
    cgroup: PathBuf,
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
    use std::os::fd::AsRawFd as _;
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
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            EbpfError::InUse {
                pin_dir: pin_dir.to_owned(),
                lock: path,
            }
        } else {
            lock_err(e)
        });
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
    fn start(options: &Options) -> Result<Sockmap, Unavailable> {
        let cgroup = check(options)?;
        let missing = |feature| move |reason| Unavailable { feature, reason };
        let lock =
            lock_pin_dir(&options.pin_dir).map_err(missing("sole use of the pin directory"))?;
        let mut ebpf = ebpf::load(&options.pin_dir).map_err(missing("a loadable eBPF program"))?;
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

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl DatapathHook for Sockmap {
    fn objects_changed(&self, snapshot: &Snapshot, import_ports: &BTreeMap<ObjectKey, u16>) {
        let want_ports = ports(snapshot, import_ports);
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

/// `clink bpf`: what is pinned under `pin_dir`, as JSON or in human terms next to the
/// `bpftool` commands that show the same.
pub fn report(pin_dir: &Path, json: bool) -> anyhow::Result<String> {
    use anyhow::Context as _;
    let inspection = ebpf::inspect(pin_dir).with_context(|| {
        format!(
            "reading the eBPF programs pinned under {} (is an agent running with \
             --datapath sockmap and this --bpf-pin-dir?)",
            pin_dir.display()
        )
    })?;
    if json {
        return Ok(serde_json::to_string_pretty(&inspection)? + "\n");
    }
    Ok(render(&inspection))
}

fn render(i: &Inspection) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    macro_rules! say {
        ($($arg:tt)*) => { let _ = writeln!(out, $($arg)*); };
    }
    let dir = i.pin_dir.display();
    let dump = |pin: &str| format!("  $ bpftool map dump pinned {dir}/{pin}");
    say!("eBPF programs and maps pinned under {dir}");

    say!("\nPrograms");
    let mut cgroups = BTreeSet::new();
    for p in &i.programs {
        let place = if p.name == clink_common::program::SKMSG {
            format!("attached to map {}", map::SOCKS)
        } else if p.attached.is_empty() {
            "not attached".to_owned()
        } else {
            let places: Vec<String> = p
                .attached
                .iter()
                .map(|a| {
                    let cgroup = a.cgroup.as_ref().map_or_else(
                        || format!("cgroup id {}", a.cgroup_id),
                        |c| c.display().to_string(),
                    );
                    cgroups.insert(cgroup.clone());
                    format!(
                        "attached to {cgroup} ({}, link {})",
                        a.attach_type, a.link_id
                    )
                })
                .collect();
            places.join("; ")
        };
        say!("  {:<15} {:<17} id {:<6} {place}", p.name, p.kind, p.id);
    }
    say!(
        "  $ bpftool prog show pinned {dir}/{}",
        ebpf::PIN_PROG_SOCKOPS
    );
    for cgroup in &cgroups {
        say!("  $ bpftool cgroup show {cgroup}");
    }

    say!(
        "\nService table ({}): connects to these addresses go to the import listener",
        map::SERVICES
    );
    if i.services.is_empty() {
        say!("  (none: annotate an Import with {SERVICE_IP_ANNOTATION})");
    }
    for s in &i.services {
        say!("  {:<24} -> listener port {}", s.service, s.listener_port);
    }
    say!("{}", dump(ebpf::PIN_MAP_SERVICES));

    say!("\nAgent ports ({})", map::PORTS);
    for p in &i.ports {
        let what = match (p.listener, p.target) {
            (true, true) => "import listener and export target",
            (true, false) => "import listener",
            (false, true) => "export target",
            (false, false) => "-",
        };
        say!("  {:<6} {what}", p.port);
    }
    say!("{}", dump(ebpf::PIN_MAP_PORTS));

    say!(
        "\nSocket pairs ({}): local hops spliced in the kernel",
        map::SOCKS
    );
    let sockets: BTreeSet<(SocketAddr, SocketAddr)> =
        i.sockets.iter().map(|s| (s.local, s.remote)).collect();
    if sockets.is_empty() {
        say!("  (none)");
    }
    for &(local, remote) in &sockets {
        if !sockets.contains(&(remote, local)) {
            say!("  {local:<24}  -> {remote}  (other end not in the map)");
        } else if local < remote {
            say!("  {local:<24} <-> {remote}");
        }
    }
    say!(
        "{}   (keys in hex; values cannot be read)",
        dump(ebpf::PIN_MAP_SOCKS)
    );

    say!("\nRedirected connects ({})", map::REDIRECTS);
    if i.redirects.is_empty() {
        say!("  (none open)");
    }
    for r in &i.redirects {
        say!(
            "  client {} asked for {}, got listener {} (socket cookie {})",
            r.client,
            r.service,
            r.listener,
            r.cookie
        );
    }
    say!("{}", dump(ebpf::PIN_MAP_REDIRECTS));

    say!(
        "\nSpliced by {} ({}): {} bytes in {} messages",
        clink_common::program::SKMSG,
        map::SKMSG_BYTES,
        i.skmsg.bytes,
        i.skmsg.messages
    );
    say!(
        "Flow control: {} bytes sent through the TCP stack while the agent was more than {} \
         bytes behind; {} switches to TCP, {} back to the splice",
        i.skmsg.passed_bytes,
        clink_common::FLOW_WINDOW,
        i.skmsg.fallbacks,
        i.skmsg.resumes
    );
    say!("{}", dump(ebpf::PIN_MAP_SKMSG_BYTES));
    out
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::api::{ImportSpec, ObjectMeta, Resource, Status};
    use crate::ebpf::Features;

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

    #[test]
    fn bpf_report_in_human_terms() {
        use crate::ebpf::{
            Attachment, PinnedProgram, PortEntry, RedirectEntry, ServiceEntry, SkMsgCounters,
            SocketEntry,
        };
        let addr = |s: &str| -> SocketAddr { s.parse().unwrap() };
        let socket = |local: &str, remote: &str| SocketEntry {
            local: addr(local),
            remote: addr(remote),
        };
        let inspection = Inspection {
            pin_dir: PathBuf::from("/sys/fs/bpf/clusterlink"),
            programs: vec![PinnedProgram {
                name: "clink_sockops",
                pin: PathBuf::from("/sys/fs/bpf/clusterlink/prog_clink_sockops"),
                kind: "sock_ops",
                id: 7,
                attached: vec![Attachment {
                    link_id: 3,
                    attach_type: "cgroup_sock_ops".to_owned(),
                    cgroup_id: 1,
                    cgroup: Some(PathBuf::from("/sys/fs/cgroup")),
                }],
            }],
            ports: vec![PortEntry {
                port: 7000,
                listener: true,
                target: false,
            }],
            services: vec![ServiceEntry {
                service: addr("10.96.0.10:80"),
                listener_port: 7000,
            }],
            sockets: vec![
                socket("127.0.0.1:7000", "127.0.0.1:40000"),
                socket("127.0.0.1:40000", "127.0.0.1:7000"),
                socket("127.0.0.1:8080", "127.0.0.1:41000"),
            ],
            redirects: vec![RedirectEntry {
                client: addr("127.0.0.1:40000"),
                listener: addr("127.0.0.1:7000"),
                service: addr("10.96.0.10:80"),
                cookie: 9,
            }],
            skmsg: SkMsgCounters {
                bytes: 1234,
                messages: 5,
                ..SkMsgCounters::default()
            },
        };
        let text = render(&inspection);
        for line in [
            "clink_sockops   sock_ops          id 7      attached to /sys/fs/cgroup \
             (cgroup_sock_ops, link 3)",
            "$ bpftool cgroup show /sys/fs/cgroup",
            "10.96.0.10:80            -> listener port 7000",
            "$ bpftool map dump pinned /sys/fs/bpf/clusterlink/map_clink_services",
            "7000   import listener",
            "127.0.0.1:7000           <-> 127.0.0.1:40000",
            "127.0.0.1:8080            -> 127.0.0.1:41000  (other end not in the map)",
            "client 127.0.0.1:40000 asked for 10.96.0.10:80, got listener 127.0.0.1:7000",
            "Spliced by clink_skmsg (CLINK_SKMSG_BYTES): 1234 bytes in 5 messages",
        ] {
            assert!(text.contains(line), "{line:?} not in:\n{text}");
        }
        assert_eq!(text.matches("<->").count(), 1, "{text}");
    }

    #[test]
    fn a_kernel_without_sockhash_is_named() {
        let features = Features {
            sock_ops: true,
            sk_msg: true,
            sockhash: false,
            cgroup_sock_addr: true,
        };
        assert!(!features.sockmap());
        assert_eq!(features.missing(), Some("sockhash maps"));
        let err = SelectError(Unavailable {
            feature: "sockhash maps",
            reason: EbpfError::Unsupported("sockhash maps"),
        });
        assert_eq!(
            err.to_string(),
            "--datapath sockmap: missing sockhash maps: the kernel does not support sockhash maps"
        );
    }

    #[test]
    fn userspace_is_chosen_without_touching_the_kernel() {
        let selected = select(&Options {
            choice: Choice::Userspace,
            cgroup: Some(PathBuf::from("/nonexistent")),
            pin_dir: PathBuf::from("/nonexistent"),
        })
        .unwrap();
        assert_eq!(selected.datapath.name, dataplane::USERSPACE);
        assert!(selected.sockmap.is_none());
    }

    #[test]
    fn a_cgroup_that_is_not_cgroup_v2_is_named_in_auto_and_fatal_when_forced() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to get past the privilege check");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let options = |choice| Options {
            choice,
            cgroup: Some(dir.path().to_path_buf()),
            pin_dir: PathBuf::from("/sys/fs/bpf/clink-unit-never-made"),
        };
        let err = select(&options(Choice::Sockmap))
            .err()
            .expect("forced sockmap fails");
        assert_eq!(err.0.feature, "cgroup v2");
        assert!(
            err.to_string().contains("is not a cgroup v2 directory"),
            "{err}"
        );
        let auto = select(&options(Choice::Auto)).unwrap();
        assert_eq!(auto.datapath.name, dataplane::USERSPACE);
        assert!(!Path::new("/sys/fs/bpf/clink-unit-never-made").exists());
    }
}
