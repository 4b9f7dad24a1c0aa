//! Test bed for ClusterLink-rs: network-namespace "clusters", process guards and waits.
//!
//! Used by the end-to-end tests (`tests/`) and by `cargo xtask demo`. Everything it makes is
//! uniquely named per process and per call, lives only inside namespaces it created itself,
//! and is removed on drop (also while unwinding from a panic), so tests can run in parallel
//! and leave nothing behind.
//!
//! ```no_run
//! let topo = clink_testbed::two_clusters()?;
//! let listener = topo.b().netns().enter(|| std::net::TcpListener::bind((topo.b().ip(), 0)))?;
//! let addr = listener.local_addr()?;
//! let client = topo.a().netns().enter(|| std::net::TcpStream::connect(addr))?;
//! # drop(client);
//! # Ok::<(), anyhow::Error>(())
//! ```

mod netns;
mod process;
mod topology;

pub use netns::{remove_stale_namespaces, Netns};
pub use process::{bin_path, require_root, wait_for, ChildGuard};
pub use topology::{three_clusters, two_clusters, Cluster, Topology};
