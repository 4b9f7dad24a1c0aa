//! `--datapath`: which data path the agent runs. `userspace` never touches the kernel;
//! `sockmap` fails at start, naming the missing feature, if the host or the privileges do not
//! allow it; `auto` runs userspace and logs whether sockmap could run: sockmap is opt-in
//! because on the kernels tested (6.18) a blocking read of a spliced socket can fail with
//! EAGAIN (ARCHITECTURE.md, "Sockmap data path"). Event-driven clients are unaffected.

use std::{path::PathBuf, sync::Arc};

use tracing::info;

use super::{host, loader, Datapath, EbpfError, Sockmap};

/// The names of the data paths in logs, metrics and `clink status`.
pub const USERSPACE: &str = "userspace";
pub const SOCKMAP: &str = "sockmap";

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

/// Chooses the data path. Must run inside the tokio runtime, after the tracing subscriber is
/// set, so that the programs' aya-log output reaches the agent's log.
pub fn select(options: &Options) -> Result<Datapath, SelectError> {
    match options.choice {
        Choice::Userspace => {
            info!(datapath = USERSPACE, "data path chosen by --datapath");
            return Ok(Datapath::Userspace);
        }
        Choice::Auto => {
            match check(options) {
                Ok(_) => info!(
                    datapath = USERSPACE,
                    "the sockmap data path is available but not chosen automatically: on this \
                     kernel a blocking recv() on a spliced socket can fail with EAGAIN, which \
                     breaks clients that use blocking sockets; --datapath sockmap turns it on \
                     (clients with non-blocking I/O are not affected)"
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
    match Sockmap::start(options) {
        Ok(sockmap) => {
            info!(
                datapath = SOCKMAP,
                cgroup = %sockmap.cgroup().display(),
                pin_dir = %options.pin_dir.display(),
                "data path: local hops are spliced in the kernel"
            );
            Ok(Datapath::Sockmap(Arc::new(sockmap)))
        }
        Err(unavailable) => Err(SelectError(unavailable)),
    }
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
        assert_eq!(auto.name(), USERSPACE);
        assert!(!Path::new("/sys/fs/bpf/clink-unit-never-made").exists());
    }
}
