//! `--datapath`: which data path the agent runs. `userspace` never touches the kernel;
//! `sockmap` and `ktls` fail at start, naming the missing feature, if the host or the
//! privileges do not allow them; `auto` runs ktls where the kernel has kernel TLS, else
//! userspace, and logs why. Sockmap is never picked by `auto`: on the kernels tested (6.18) a
//! blocking read of a spliced socket fails with EAGAIN when its wait is woken without data,
//! as by the ACK of the client's own FIN (send, `shutdown(SHUT_WR)`, `recv`) or by its own
//! half-close from another thread; nothing the agent does prevents it (ARCHITECTURE.md,
//! "Blocking readers"; `tests/tests/sockmap_eagain.rs`). Clients that do not block in
//! `recv` are unaffected.

use std::{net::Ipv4Addr, path::PathBuf, sync::Arc};

use tracing::{info, warn};

use super::{host, ktls::KtlsUnavailable, loader, Datapath, EbpfError, Hops, Ktls, Sockmap};

/// The names of the data paths in logs, metrics and `clink status`.
pub const USERSPACE: &str = "userspace";
pub const SOCKMAP: &str = "sockmap";
pub const KTLS: &str = "ktls";

/// `--datapath`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Choice {
    /// ktls where the kernel has kernel TLS, else userspace; says why, and whether sockmap
    /// could run (sockmap is opt-in, see [`select`]).
    Auto,
    Userspace,
    Sockmap,
    Ktls,
}

/// How to set up the kernel data paths.
#[derive(Clone, Debug)]
pub struct Options {
    pub choice: Choice,
    /// The cgroup v2 directory to attach to; `None`: the cgroup v2 root on the sockmap path,
    /// and no connect hooks on the kTLS path (they attach only where told to).
    pub cgroup: Option<PathBuf>,
    /// Where programs and maps are pinned.
    pub pin_dir: PathBuf,
    /// Where connects to service addresses from other network namespaces in the cgroup
    /// (pods on this node) are sent: the node's address, on which the Import listeners
    /// listen. `None`: only clients in the agent's namespace are redirected.
    pub node_address: Option<Ipv4Addr>,
}

/// Why the sockmap data path cannot run: the missing feature, and what the check found. The
/// message is the whole story (`reason` is not a `source`), so `{:#}` prints it once.
#[derive(Debug, thiserror::Error)]
#[error("missing {feature}: {reason}")]
pub struct Unavailable {
    pub feature: &'static str,
    pub reason: EbpfError,
}

/// A forced `--datapath` cannot run.
#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    #[error("--datapath sockmap: {0}")]
    Sockmap(Unavailable),
    #[error("--datapath ktls: missing kernel TLS: {0}")]
    Ktls(KtlsUnavailable),
}

/// Chooses the data path. Must run inside the tokio runtime, after the tracing subscriber is
/// set, so that the programs' aya-log output reaches the agent's log.
pub fn select(options: &Options) -> Result<Datapath, SelectError> {
    match options.choice {
        Choice::Userspace => {
            info!(datapath = USERSPACE, "data path chosen by --datapath");
            return Ok(Datapath::Userspace);
        }
        Choice::Ktls => {
            return match Ktls::probe() {
                Ok(ktls) => Ok(ktls_chosen(ktls, options, "data path chosen by --datapath")),
                Err(missing) => Err(SelectError::Ktls(missing)),
            };
        }
        Choice::Auto => {
            match Ktls::probe() {
                Ok(ktls) => {
                    return Ok(ktls_chosen(
                        ktls,
                        options,
                        "the kernel has kernel TLS: tunnels are encrypted and spliced in the \
                         kernel",
                    ))
                }
                Err(missing) => info!(
                    ktls_missing = %missing,
                    "the kTLS data path is not available"
                ),
            }
            match check(options) {
                Ok(_) => info!(
                    datapath = USERSPACE,
                    "the sockmap data path is available but not chosen automatically: on this \
                     kernel a blocking recv() on a spliced socket fails with EAGAIN when the \
                     client's own FIN is acknowledged or its socket half-closed while it waits \
                     (send, shutdown(SHUT_WR), recv), which breaks clients that use blocking \
                     sockets; --datapath sockmap turns it on (clients that do not block in \
                     recv are not affected)"
                ),
                Err(unavailable) => info!(
                    datapath = USERSPACE,
                    sockmap_missing = unavailable.feature,
                    reason = %unavailable.reason,
                    "using the userspace data path"
                ),
            }
            return Ok(Datapath::Userspace);
        }
        Choice::Sockmap => {}
    }
    match Sockmap::start(options, Hops::Spliced) {
        Ok(sockmap) => {
            info!(
                datapath = SOCKMAP,
                cgroup = %sockmap.cgroup().display(),
                pin_dir = %options.pin_dir.display(),
                "data path: local hops are spliced in the kernel"
            );
            Ok(Datapath::Sockmap(Arc::new(sockmap)))
        }
        Err(unavailable) => Err(SelectError::Sockmap(unavailable)),
    }
}

/// The kTLS path, with the connect hooks attached to `--cgroup` if one was given and they
/// can run there (without them, clients connect to the Import listeners themselves; a
/// missing feature is logged, not fatal: the tunnels are in the kernel either way).
fn ktls_chosen(ktls: Ktls, options: &Options, why: &str) -> Datapath {
    info!(datapath = KTLS, ciphers = %ktls.ciphers(), "{why}");
    let hooks = match &options.cgroup {
        None => {
            info!(
                "no --cgroup: service addresses are not redirected on the kTLS path; clients \
                 connect to the Import listeners"
            );
            None
        }
        Some(_) => match Sockmap::start(options, Hops::Redirected) {
            Ok(hooks) => {
                info!(
                    cgroup = %hooks.cgroup().display(),
                    pin_dir = %options.pin_dir.display(),
                    node_address = ?options.node_address,
                    "connect hooks attached: service addresses go to the Import listeners \
                     (local hops are not spliced on the kTLS path)"
                );
                Some(Arc::new(hooks))
            }
            Err(unavailable) => {
                warn!(
                    missing = unavailable.feature,
                    reason = %unavailable.reason,
                    "the connect hooks cannot run; service addresses are not redirected \
                     (tunnels still use kernel TLS)"
                );
                None
            }
        },
    };
    Datapath::Ktls(Arc::new(ktls), hooks)
}

/// Checks what the sockmap data path needs, in the order an operator would fix it.
pub(super) fn check(options: &Options) -> Result<PathBuf, Unavailable> {
    let missing = |feature| move |reason| Unavailable { feature, reason };
    if !loader::built() {
        return Err(Unavailable {
            feature: "eBPF programs in this build",
            reason: EbpfError::NotBuilt,
        });
    }
    host::check_privileges().map_err(missing("root or CAP_BPF with CAP_NET_ADMIN"))?;
    let cgroup = match &options.cgroup {
        Some(cgroup) => cgroup.clone(),
        None => host::cgroup2_root().map_err(missing("cgroup v2"))?,
    };
    host::check_cgroup2(&cgroup).map_err(missing("cgroup v2"))?;
    host::ensure_bpffs(&options.pin_dir).map_err(missing("bpffs"))?;
    let features = host::feature_check().map_err(missing("kernel eBPF support"))?;
    if let Some(feature) = features.missing() {
        return Err(Unavailable {
            feature,
            reason: EbpfError::Unsupported(feature),
        });
    }
    Ok(cgroup)
}

#[cfg(test)]
mod tests {
    #[test]
    fn ktls_is_named_when_the_kernel_lacks_it_and_fatal_when_forced() {
        let options = Options {
            choice: Choice::Ktls,
            cgroup: None,
            pin_dir: PathBuf::from("/nonexistent"),
            node_address: None,
        };
        match select(&options) {
            Ok(datapath) => assert_eq!(datapath.name(), KTLS),
            Err(err) => {
                let text = err.to_string();
                assert!(
                    text.starts_with("--datapath ktls: missing kernel TLS"),
                    "{text}"
                );
                assert!(text.contains("CONFIG_TLS"), "{text}");
            }
        }
    }

    use std::path::{Path, PathBuf};

    use super::*;
    use crate::kernel::host::Features;

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
        let err = SelectError::Sockmap(Unavailable {
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
            node_address: None,
        })
        .unwrap();
        assert!(matches!(selected, Datapath::Userspace));
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
            node_address: None,
        };
        let err = select(&options(Choice::Sockmap))
            .err()
            .expect("forced sockmap fails");
        let SelectError::Sockmap(unavailable) = &err else {
            panic!("{err}");
        };
        assert_eq!(unavailable.feature, "cgroup v2");
        assert!(
            err.to_string().contains("is not a cgroup v2 directory"),
            "{err}"
        );
        let auto = select(&options(Choice::Auto)).unwrap();
        let expected = if Ktls::probe().is_ok() {
            KTLS
        } else {
            USERSPACE
        };
        assert_eq!(auto.name(), expected);
        assert!(!Path::new("/sys/fs/bpf/clink-unit-never-made").exists());
    }
}
