//! Builds the eBPF programs of `clink-ebpf` and leaves the object at `$OUT_DIR/clink-ebpf`,
//! where `src/kernel/loader.rs` embeds it.
//!
//! aya-build runs `rustup run nightly cargo build --package clink-ebpf --bins --release
//! --target bpfel-unknown-none -Z build-std=core` in its own target directory under
//! `$OUT_DIR`, linking with `bpf-linker --btf`. That needs the nightly toolchain with its
//! `rust-src` component and `bpf-linker` on `PATH`; `cargo xtask setup` installs them.
//!
//! With `AYA_BUILD_SKIP=1` nothing is built and an empty object is embedded instead: the agent
//! still compiles (for example on a machine without nightly) and reports at run time that it
//! has no eBPF programs.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{anyhow, bail, Context as _};

const EBPF_PACKAGE: &str = "clink-ebpf";
const TOOLCHAIN: &str = "nightly";
/// aya-build's own switch; it is honoured here too so the embedded object always exists.
const SKIP_ENV: &str = "AYA_BUILD_SKIP";
const SETUP_HINT: &str = "run `cargo xtask setup` to install the eBPF toolchain \
                          (nightly with rust-src, bpf-linker)";

fn main() -> anyhow::Result<()> {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR")?);
    let ebpf_dir = manifest_dir
        .parent()
        .context("clink-agent has no parent directory")?
        .join(EBPF_PACKAGE);
    let ebpf_dir = ebpf_dir
        .to_str()
        .with_context(|| format!("{} is not UTF-8", ebpf_dir.display()))?;

    println!("cargo:rerun-if-env-changed={SKIP_ENV}");
    if skipped() {
        println!("cargo:warning={SKIP_ENV} is set: embedding an empty eBPF object");
        let object = out_dir.join(EBPF_PACKAGE);
        return fs::write(&object, [])
            .with_context(|| format!("writing the empty eBPF object {}", object.display()));
    }

    check_toolchain()?;
    // aya-build forwards every line the inner cargo prints as a cargo warning, and cargo
    // replays those on every later build; keep only real diagnostics.
    env::set_var("CARGO_TERM_QUIET", "true");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: EBPF_PACKAGE,
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(TOOLCHAIN),
    )
    .with_context(|| format!("building the eBPF programs ({EBPF_PACKAGE}) failed; {SETUP_HINT}"))
}

fn skipped() -> bool {
    env::var(SKIP_ENV).is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// Fails early, with the way out, when a piece of the eBPF toolchain is missing: the errors
/// cargo gives further down (a missing linker, "can't find crate for `core`") do not say.
fn check_toolchain() -> anyhow::Result<()> {
    let linker = find_in_path("bpf-linker")
        .ok_or_else(|| anyhow!("bpf-linker is not on PATH; {SETUP_HINT}"))?;
    // A new bpf-linker (for a new LLVM) must relink the programs.
    println!("cargo:rerun-if-changed={}", linker.display());

    let output = Command::new("rustup")
        .args(["run", TOOLCHAIN, "rustc", "--print", "sysroot"])
        .output()
        .with_context(|| format!("running `rustup run {TOOLCHAIN} rustc`; {SETUP_HINT}"))?;
    if !output.status.success() {
        bail!(
            "the {TOOLCHAIN} toolchain is not usable ({}); {SETUP_HINT}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let sysroot = PathBuf::from(String::from_utf8(output.stdout)?.trim());
    let core_src = sysroot.join("lib/rustlib/src/rust/library/core/Cargo.toml");
    if !core_src.is_file() {
        bail!(
            "the {TOOLCHAIN} toolchain has no rust-src component ({} is missing); {SETUP_HINT}",
            core_src.display()
        );
    }
    Ok(())
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
