//! Tests that need root: run them, or say loudly that they did not run.

use nix::unistd::geteuid;

/// Whether a test that needs root can run.
///
/// True when running as root. Otherwise, in CI (`CI=true`) it panics so that a skipped test
/// cannot pass unnoticed; elsewhere it prints that `what` is skipped and returns false.
pub fn require_root(what: &str) -> bool {
    if geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{what} needs root (network namespaces, cgroups, eBPF), and CI=true forbids skipping it");
    }
    eprintln!("skipping {what}: it needs root (network namespaces, cgroups, eBPF)");
    false
}
