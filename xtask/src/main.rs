//! `cargo xtask`: every project task that is more than one cargo command.

mod bench;
mod clink;
mod demo;
mod disk;
mod fuzz;
mod image;
mod run;
mod setup;
mod vm;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::{Parser, Subcommand};

use run::{cargo, step, Workspace};

#[derive(Parser)]
#[command(about = "ClusterLink-rs project tasks", version)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need, where it is missing: Debian packages, the
    /// nightly toolchain's rust-src, bpf-linker built against the nightly's LLVM.
    Setup,
    /// Setup, then `cargo build --workspace [ARGS]`.
    Build {
        /// Passed on to cargo build.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Setup, `cargo deny check`, build the binaries, `cargo clippy`, a short run of every
    /// fuzz target, then `cargo test --workspace [ARGS]` (needs root for the network-namespace
    /// tests); without ARGS, then the kernel-TLS tests in a VM. When ARGS pick packages, only
    /// their tests run.
    Test {
        /// Passed on to cargo test, e.g. `-p clink-tests -- --nocapture`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Boot Debian's kTLS-capable 6.1 kernel in qemu (virtme-ng, software emulation) and run
    /// COMMAND there as root after `modprobe tls`, with CLINK_REQUIRE_KTLS=1; fails if it
    /// fails, or if the VM does not boot or finish in time.
    VmTest(vm::Options),
    /// Regenerate the chart's CRDs (charts/clusterlink/crds/) from the Rust types in
    /// clink-agent/src/k8s/crd.rs; a test fails while the committed files differ.
    Crds,
    /// Run the cargo-fuzz targets in fuzz/ (nightly), each for a fixed time.
    Fuzz(fuzz::Options),
    /// Build the agent's container image (static musl binaries, FROM scratch) as an OCI
    /// archive under target/image/, with no container engine and no base image, and check
    /// it; or only check an archive (--check).
    Image(image::Options),
    /// Two clusters, one agent each, iperf3 through the mTLS tunnel and directly, then a
    /// policy removal that denies the next connection. Needs root.
    Demo,
    /// Throughput, latency, connection setup and memory of ClusterLink-rs next to direct
    /// TCP, an haproxy pair and a stunnel pair, in one interleaved run; writes
    /// target/bench/report.md and throughput.svg. Needs root.
    Bench(bench::Options),
    /// The bench's own clients and servers, started by `bench` inside the clusters.
    #[command(hide = true)]
    BenchTool {
        #[command(subcommand)]
        tool: bench::Tool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    run::prepare_env();
    let result = match cli.task {
        Task::Setup => setup::setup().map(|()| ExitCode::SUCCESS),
        Task::Build { args } => build(&args),
        Task::Test { args } => test(&args),
        Task::VmTest(opts) => vm::vm_test(opts),
        Task::Crds => crds(),
        Task::Fuzz(opts) => setup::setup()
            .and_then(|()| fuzz::fuzz(&opts))
            .map(|()| ExitCode::SUCCESS),
        Task::Image(opts) => image::image(opts),
        Task::Demo => demo::demo(),
        Task::Bench(opts) => bench::bench(opts),
        Task::BenchTool { tool } => bench::run_tool(tool).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            if run::interrupted() {
                ExitCode::from(130)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn build(args: &[String]) -> Result<ExitCode> {
    setup::setup()?;
    step("cargo build --workspace");
    let status = cargo().args(["build", "--workspace"]).args(args).status()?;
    Ok(run::exit_code(status))
}

/// The types live in clink-agent, which xtask does not depend on (its build.rs needs the
/// eBPF toolchain), so an example of clink-agent renders them.
fn crds() -> Result<ExitCode> {
    let dir = run::workspace_root().join("charts/clusterlink/crds");
    step("cargo run -p clink-agent --example crds");
    let status = cargo()
        .args(["run", "-q", "-p", "clink-agent", "--example", "crds", "--"])
        .arg(dir)
        .status()?;
    Ok(run::exit_code(status))
}

fn test(args: &[String]) -> Result<ExitCode> {
    setup::setup()?;
    // The guards look at the whole tree, so a run of a few packages' tests skips them.
    let guards = !picks_packages(args);
    if guards {
        // Advisories are left out: their database is fetched from GitHub, which CI cannot
        // reach (deny.toml).
        step("cargo deny check bans licenses sources");
        let status = cargo()
            .args(["deny", "check", "--hide-inclusion-graph"])
            .args(["bans", "licenses", "sources"])
            .status()?;
        if !status.success() {
            return Ok(run::exit_code(status));
        }
    }
    let ws = Workspace::locate()?;
    if guards {
        let fuzz_target = run::workspace_root().join("fuzz/target");
        disk::ensure_free(&[ws.target_dir.clone(), fuzz_target], disk::TEST_NEED)?;
    }
    if nix::unistd::geteuid().is_root() {
        for name in clink_testbed::remove_stale_namespaces()? {
            println!("removed namespace {name} left by a test run that was killed");
        }
    }
    step("cargo build --workspace --bins");
    let status = cargo().args(["build", "--workspace", "--bins"]).status()?;
    if !status.success() {
        return Ok(run::exit_code(status));
    }
    if guards {
        // Only the lints the workspace denies ([workspace.lints]) fail the run; clippy's other
        // warnings are shown.
        step("cargo clippy --workspace --all-targets");
        let status = cargo()
            .args(["clippy", "--workspace", "--all-targets"])
            .status()?;
        if !status.success() {
            return Ok(run::exit_code(status));
        }
        // Before the tests, so that a passing run ends with cargo test's summary.
        fuzz::fuzz(&fuzz::Options {
            seconds: fuzz::SECONDS_IN_TEST,
            targets: Vec::new(),
        })?;
    }
    let bin_dir = ws.target_dir.join("debug");
    step(&format!(
        "CLINK_BIN_DIR={} cargo test {}",
        bin_dir.display(),
        test_args(args).join(" ")
    ));
    let status = cargo()
        .arg("test")
        .args(test_args(args))
        .env("CLINK_BIN_DIR", &bin_dir)
        .status()?;
    if !args.is_empty() {
        println!("(the kernel-TLS tests in a VM run without ARGS, or with `cargo xtask vm-test`)");
        return Ok(run::exit_code(status));
    }
    // Run even after a host failure: CI wants both verdicts.
    let started = Instant::now();
    let vm = vm::vm_test_with_env(
        vm::Options {
            kernel: None,
            timeout: VM_TIMEOUT.as_secs(),
            cargo_test: Some(VM_TESTS.to_owned()),
            command: VM_FILTERS.iter().map(|f| (*f).to_owned()).collect(),
        },
        &[("CLINK_BIN_DIR", &bin_dir)],
    );
    step(&format!(
        "VM part (build, boot, tests, power-off) took {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    if !status.success() {
        if let Err(e) = &vm {
            eprintln!("error: {e:#}");
        }
        step("host tests FAILED");
        return Ok(run::exit_code(status));
    }
    let vm = vm?;
    // The last line says what the VM ran, so a run whose last test binary in the VM had
    // nothing to run does not read as a run that tested nothing.
    println!("vm: {} passed, {} failed", vm.passed, vm.failed);
    Ok(vm.code)
}

/// The tests `cargo xtask test` runs in the VM (`cargo xtask vm-test --cargo-test ...`): the
/// kernel check, the agent's kTLS unit tests, the kTLS end-to-end tests, and the guard that
/// the sockmap EAGAIN trigger (ARCHITECTURE.md, "Blocking readers") is the same on the VM's
/// older kernel, selected by [`VM_FILTERS`] in every binary. `--workspace` keeps cargo's
/// feature resolution that of the host run, so nothing rebuilds.
const VM_TESTS: &str = "--workspace --lib --test kernel_tls --test ktls --test sockmap_eagain";
/// libtest runs the tests whose names contain any of these: every kTLS test has "ktls" in
/// its name; the other is the EAGAIN guard's one test.
const VM_FILTERS: [&str; 2] = ["ktls", "blocking_recv_on_a_spliced_socket_fail_with_eagain"];

/// The VM part must stay inside CI's budget: boot takes 20-50 s under emulation, the kTLS
/// tests about 9 minutes (256 MiB each way through two agents is most of it).
const VM_TIMEOUT: Duration = Duration::from_secs(20 * 60);
/// Whether the cargo arguments (before `--`) choose packages.
fn picks_packages(args: &[String]) -> bool {
    args.iter()
        .take_while(|a| *a != "--")
        .any(|a| a == "-p" || a.starts_with("--package") || (a.starts_with("-p") && a.len() > 2))
}

/// `--workspace` unless the caller chose packages.
fn test_args(args: &[String]) -> Vec<String> {
    let workspace = (!picks_packages(args)).then(|| "--workspace".to_owned());
    workspace.into_iter().chain(args.iter().cloned()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn test_args_default_to_the_workspace() {
        assert_eq!(test_args(&[]), ["--workspace"]);
        assert_eq!(
            test_args(&strings(&["--", "-p"])),
            ["--workspace", "--", "-p"],
            "-p after -- is for the test binary"
        );
    }

    #[test]
    fn test_args_keep_a_package_choice() {
        for args in [
            &["-p", "clink-tests"][..],
            &["--package=clink-agent"],
            &["-pxtask"],
        ] {
            assert_eq!(test_args(&strings(args)), strings(args));
        }
    }

    #[test]
    fn vm_test_takes_a_command_or_test_binaries_after_the_separator() {
        let cli = Cli::try_parse_from(["xtask", "vm-test", "--", "sh", "-c", "exit 1"]).unwrap();
        let Task::VmTest(opts) = cli.task else {
            panic!("not the vm-test task")
        };
        assert_eq!(opts.command, ["sh", "-c", "exit 1"]);
        assert_eq!((opts.cargo_test, opts.timeout), (None, 900));

        let cli = Cli::try_parse_from([
            "xtask",
            "vm-test",
            "--timeout",
            "60",
            "--cargo-test",
            "--workspace --test kernel_tls",
            "--",
            "--nocapture",
        ])
        .unwrap();
        let Task::VmTest(opts) = cli.task else {
            panic!("not the vm-test task")
        };
        assert_eq!(
            opts.cargo_test.as_deref(),
            Some("--workspace --test kernel_tls")
        );
        assert_eq!(
            (opts.command, opts.timeout),
            (vec!["--nocapture".to_owned()], 60)
        );
    }

    #[test]
    fn fuzz_takes_seconds_and_targets() {
        let cli =
            Cli::try_parse_from(["xtask", "fuzz", "--seconds", "5", "labels_header"]).unwrap();
        let Task::Fuzz(opts) = cli.task else {
            panic!("not the fuzz task")
        };
        assert_eq!(opts.seconds, 5);
        assert_eq!(opts.targets, ["labels_header"]);
    }

    #[test]
    fn cli_passes_extra_args_through() {
        let cli = Cli::try_parse_from(["xtask", "test", "-p", "x", "--", "--nocapture"]).unwrap();
        let Task::Test { args } = cli.task else {
            panic!("not the test task")
        };
        assert_eq!(args, ["-p", "x", "--", "--nocapture"]);
    }
}
