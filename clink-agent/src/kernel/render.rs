//! `clink bpf`: what is pinned under a pin directory, as JSON or in human terms next to the
//! `bpftool` commands that show the same (as `cilium-dbg bpf` does).

use std::{collections::BTreeSet, fmt::Write as _, net::SocketAddr, path::Path};

use clink_common::map;

use crate::connections::ConnectionInfo;

use super::{
    inspect::{self, Inspection},
    pins,
    sockmap::SERVICE_IP_ANNOTATION,
};

/// `clink bpf`: what is pinned under `pin_dir`, and the agent's open connections with
/// each one's path (or why they could not be read), as JSON or in human terms next to the
/// `bpftool` commands that show the same.
pub fn report(
    pin_dir: &Path,
    json: bool,
    connections: Result<Vec<ConnectionInfo>, String>,
) -> anyhow::Result<String> {
    use anyhow::Context as _;
    let mut inspection = inspect::inspect(pin_dir).with_context(|| {
        format!(
            "reading the eBPF programs pinned under {} (is an agent running with \
             --datapath sockmap or ktls, with the privileges to load programs, and this \
             --bpf-pin-dir?)",
            pin_dir.display()
        )
    })?;
    match connections {
        Ok(list) => inspection.connections = list,
        Err(why) => inspection.connections_error = Some(why),
    }
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
        pins::PIN_PROG_SOCKOPS
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
    say!("{}", dump(pins::PIN_MAP_SERVICES));

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
    say!("{}", dump(pins::PIN_MAP_PORTS));

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
        dump(pins::PIN_MAP_SOCKS)
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
    say!("{}", dump(pins::PIN_MAP_REDIRECTS));

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
    say!("{}", dump(pins::PIN_MAP_SKMSG_BYTES));

    say!("\nConnections (from the agent): the path each one's payload takes");
    if let Some(why) = &i.connections_error {
        say!("  (not shown: {why})");
    } else if i.connections.is_empty() {
        say!("  (none open)");
    } else {
        say!(
            "  {:<6} {:<8} {:<10} {:<28} {:<16} {:<24} {}",
            "ID",
            "DIR",
            "PATH",
            "SERVICE",
            "PEER",
            "LOCAL END",
            map::SOCKS
        );
    }
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    for c in &i.connections {
        let local = canonical(c.local);
        let in_socks = i
            .sockets
            .iter()
            .any(|s| canonical(s.local) == local || canonical(s.remote) == local);
        say!(
            "  {:<6} {:<8} {:<10} {:<28} {:<16} {:<24} {}",
            c.id,
            c.direction,
            c.path,
            c.service,
            c.peer,
            local,
            if in_socks { "spliced" } else { "-" }
        );
    }
    say!("  $ clink connections");
    out
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::connections::BytePath;

    #[test]
    fn bpf_report_in_human_terms() {
        use crate::kernel::inspect::{
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
                name: "clink_sockops".to_owned(),
                pin: PathBuf::from("/sys/fs/bpf/clusterlink/prog_clink_sockops"),
                kind: "sock_ops".to_owned(),
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
            connections: vec![
                ConnectionInfo {
                    id: 3,
                    direction: "egress".to_owned(),
                    service: "default/iperf".to_owned(),
                    peer: "peer-b".to_owned(),
                    local: addr("[::ffff:127.0.0.1]:40000"),
                    path: BytePath::Sockmap,
                    opened_at: 1,
                },
                ConnectionInfo {
                    id: 4,
                    direction: "ingress".to_owned(),
                    service: "default/echo".to_owned(),
                    peer: "peer-c".to_owned(),
                    local: addr("127.0.0.1:9000"),
                    path: BytePath::Ktls,
                    opened_at: 1,
                },
            ],
            connections_error: None,
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
            "3      egress   sockmap    default/iperf                peer-b           \
             127.0.0.1:40000          spliced",
            "4      ingress  ktls       default/echo                 peer-c           \
             127.0.0.1:9000           -",
        ] {
            assert!(text.contains(line), "{line:?} not in:\n{text}");
        }
        assert_eq!(text.matches("<->").count(), 1, "{text}");
    }
}
