//! `cargo xtask bench --vm`: the bench, run inside the kTLS-capable VM of
//! `cargo xtask vm-test` (ARCHITECTURE.md, "Kernel TLS tests in a VM").
//!
//! The host builds the binaries and copies them to a directory of its own (a build running
//! meanwhile may replace those in target/), then boots the VM, whose guest sees the host's
//! disk read-only, and runs there `xtask bench --in-vm DIR` with the same options. That
//! bench sets up its clusters, cgroups and agents in the guest kernel, so nothing it makes
//! touches the host, and writes its report into the output directory, which the VM is given
//! as a writable directory.

use std::fs;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::meta::Meta;
use super::progress::minutes;
use super::Options;
use crate::run::{self, step};
use crate::vm::{run_in_vm, GuestCommand};

/// What a `--vm` run may take, boot and power-off included. The default set takes about
/// 10 minutes on the 2-core build machine with other work on it.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(25 * 60);

pub fn bench_in_vm(opts: &Options) -> Result<ExitCode> {
    let started = Instant::now();
    let bins = super::build_all()?;
    let out = match &opts.out {
        Some(out) => out.clone(),
        None => run::Workspace::locate()?.target_dir.join("bench-vm"),
    };
    fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;
    // The guest mounts it at the same path: it must be absolute.
    let out = out
        .canonicalize()
        .with_context(|| format!("resolve {}", out.display()))?;
    let staged = tempfile::Builder::new()
        .prefix("clink-bench-vm-")
        .tempdir()
        .context("create a directory for the binaries the VM runs")?;
    for bin in ["clink-agent", "clink", "xtask"] {
        fs::copy(bins.join(bin), staged.path().join(bin))
            .with_context(|| format!("copy {}", bins.join(bin).display()))?;
    }
    // The compare agent too, so that a rebuild during the run changes nothing it measures.
    if let Some(dir) = &opts.compare_agent {
        let (from, to) = (dir.join("clink-agent"), staged.path().join(COMPARE_DIR));
        fs::create_dir(&to).with_context(|| format!("create {}", to.display()))?;
        fs::copy(&from, to.join("clink-agent"))
            .with_context(|| format!("copy {} (--compare-agent)", from.display()))?;
    }
    let command = GuestCommand {
        dir: run::workspace_root(),
        argv: guest_args(opts, &staged.path().to_string_lossy(), &out, Meta::host()),
    };
    let vm = run_in_vm(
        opts.vm_kernel.clone(),
        Duration::from_secs(opts.vm_timeout),
        &[command],
        &[],
        &[&out],
    )?;
    step(&format!(
        "report: {}\n    (the whole --vm run took {})",
        out.join("report.md").display(),
        minutes(started.elapsed())
    ));
    Ok(vm.code)
}

/// Where in the staged directory the `--compare-agent` build's agent goes.
const COMPARE_DIR: &str = "compare";

/// The bench's command line in the guest: the binaries in `bins`, the report to `out`,
/// every choice of the host's command line passed on.
fn guest_args(opts: &Options, bins: &str, out: &Path, host: [String; 2]) -> Vec<String> {
    let mut argv = vec![
        format!("{bins}/xtask"),
        "bench".to_owned(),
        "--in-vm".to_owned(),
        bins.to_owned(),
        "--out".to_owned(),
        out.display().to_string(),
    ];
    if opts.quick {
        argv.push("--quick".to_owned());
    }
    for scenario in &opts.scenarios {
        argv.push("--scenario".to_owned());
        argv.push(value_name(*scenario));
    }
    for path in &opts.paths {
        argv.push("--path".to_owned());
        argv.push(value_name(*path));
    }
    if opts.compare_agent.is_some() {
        argv.push("--compare-agent".to_owned());
        argv.push(format!("{bins}/{COMPARE_DIR}"));
    }
    if let Some(reps) = opts.reps {
        argv.push("--reps".to_owned());
        argv.push(reps.to_string());
    }
    for (flag, value) in [
        ("--pipelined-connections", opts.pipelined_connections),
        ("--pipelined-depth", opts.pipelined_depth),
    ] {
        if let Some(value) = value {
            argv.push(flag.to_owned());
            argv.push(value.to_string());
        }
    }
    for text in host {
        argv.push("--host".to_owned());
        argv.push(text);
    }
    argv
}

/// How clap spells a value on the command line.
fn value_name(value: impl clap::ValueEnum) -> String {
    value
        .to_possible_value()
        .map(|v| v.get_name().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::path::PathBuf;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        opts: Options,
    }

    /// The host's options from `host_args` and the guest's command line made from them
    /// (binaries in /tmp/b, report to /w/target/bench-vm).
    fn guest_of(host_args: &[&str], host: [String; 2]) -> (Options, Vec<String>) {
        let opts = Cli::try_parse_from(host_args).unwrap().opts;
        let argv = guest_args(&opts, "/tmp/b", &PathBuf::from("/w/target/bench-vm"), host);
        (opts, argv)
    }

    #[test]
    fn the_guest_bench_gets_the_hosts_choices() {
        let (_, argv) = guest_of(
            &[
                "bench",
                "--vm",
                "--path",
                "ktls",
                "--path",
                "userspace",
                "--scenario",
                "cpu",
                "--reps",
                "2",
                "--pipelined-depth",
                "4",
                "--quick",
            ],
            ["cargo xtask bench --vm".into(), "2 × CPU".into()],
        );
        assert_eq!(
            argv.join(" "),
            "/tmp/b/xtask bench --in-vm /tmp/b --out /w/target/bench-vm --quick --scenario cpu \
             --path ktls --path userspace --reps 2 --pipelined-depth 4 --host cargo xtask bench \
             --vm --host 2 × CPU"
        );
        // What the guest is given parses, and does not ask for another VM.
        let guest = Cli::try_parse_from(&argv[1..]).unwrap().opts;
        assert!(!guest.vm);
        assert_eq!(guest.in_vm, Some(PathBuf::from("/tmp/b")));
        assert_eq!(guest.host.len(), 2);
    }

    /// The compare agent is run from the staged copy, as the route `compare`.
    #[test]
    fn the_guest_bench_gets_the_staged_compare_agent() {
        let (opts, argv) = guest_of(
            &[
                "bench",
                "--vm",
                "--compare-agent",
                "/home/me/ring-build",
                "--path",
                "userspace",
                "--path",
                "compare",
            ],
            ["h".into(), "m".into()],
        );
        let guest = Cli::try_parse_from(&argv[1..]).unwrap().opts;
        assert_eq!(guest.compare_agent, Some(PathBuf::from("/tmp/b/compare")));
        assert_eq!(guest.paths, opts.paths);
    }
}
