//! Test bed for ClusterLink-rs: network-namespace "clusters", cgroups and pin directories of
//! its own, agent processes with their certificates and CLI, process guards and waits.
//!
//! Used by the end-to-end tests (`tests/`), by `cargo xtask demo` and `cargo xtask bench`,
//! and by the agent's own unit tests. Everything it makes is uniquely named per process and
//! per call (`clk-<pid>-<n>-<role>`), lives only inside namespaces and cgroups it created
//! itself, and is removed on drop (also while unwinding from a panic), so tests can run in
//! parallel and leave nothing behind; [`remove_stale`] removes what a killed process left.
//!
//! It depends on nothing that needs the eBPF toolchain (not on `clink-agent`): xtask builds
//! it on a fresh machine. It runs the `clink-agent` and `clink` binaries instead.
//!
//! ```no_run
//! let topo = clink_testbed::two_clusters()?;
//! let listener = topo.b().netns().enter(|| std::net::TcpListener::bind((topo.b().ip(), 0)))?;
//! let addr = listener.local_addr()?;
//! let client = topo.a().netns().enter(|| std::net::TcpStream::connect(addr))?;
//! # drop(client);
//! # Ok::<(), anyhow::Error>(())
//! ```

mod agent;
mod certs;
mod cgroup;
mod k8s_api;
mod k8s_tools;
mod ktls;
mod logs;
mod names;
mod netns;
mod pins;
mod process;
mod root;
mod topology;

pub use agent::{checked, peer_reachable, start_agent, AgentFiles, Clink};
pub use certs::{
    kubelet_layout, kubelet_update, make_certificates, reissue_certificate, replace_files,
    PEER_FILES,
};
pub use cgroup::{cgroup2_root, command_in, Cgroup};
pub use k8s_api::{chart_crds_dir, ApiRequest, ApiServer};
pub use k8s_tools::{
    apiserver_script, helm_path, k8s_python_path, k8s_tools_dir, kmock_path, kubectl_path,
    kubernetes_validate_path, require_k8s_tool,
};
pub use ktls::{ktls_available, require_ktls, set_tls_ulp, REQUIRE_KTLS};
pub use logs::{last_lines, read_from, strip_ansi};
pub use names::unique_name;
pub use netns::{remove_stale_namespaces, Netns};
pub use pins::{PinDir, BPFFS};
pub use process::{bin_path, wait_for, ChildGuard};
pub use root::require_root;
pub use topology::{pod, three_clusters, two_clusters, Cluster, Pod, Topology};

/// Removes the namespaces, cgroups, pin directories and API-emulator directories left by test
/// bed processes that were killed before they could clean up. Returns what it removed.
pub fn remove_stale() -> anyhow::Result<Vec<String>> {
    let mut removed: Vec<String> = remove_stale_namespaces()?
        .into_iter()
        .map(|name| format!("namespace {name}"))
        .collect();
    for path in cgroup::remove_stale()?
        .into_iter()
        .chain(pins::remove_stale()?)
        .chain(k8s_api::remove_stale()?)
    {
        removed.push(path.display().to_string());
    }
    Ok(removed)
}
